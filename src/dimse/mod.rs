//! DIMSE (PS3.7): command sets, message assembly from PDV fragments, the C-ECHO and C-STORE
//! logic of the acceptor, and the per-association [`service::Service`] that drives them.
//!
//! Owns: turning a complete message into either a response or a store request, and (in
//! `service`) everything one association holds between PDUs. Pure: no sockets, no files, no
//! clocks. Must never hand untrusted data set bytes to a full parser: routing values
//! come from the bounded top-level [`crate::dicom::scan`]. The standard's tables (tags,
//! UIDs, transfer syntaxes, SOP classes) are [`crate::dicom`]'s; of the association layer only
//! [`service`] knows anything (it drives the association machine).
#![forbid(unsafe_code)]

pub mod command;
pub mod message;
pub mod query;
pub mod service;

use crate::dicom::scan::{self, Scanned};
use crate::dicom::sop_class::VERIFICATION;
use crate::dicom::tags;
use crate::dicom::transfer_syntax::TransferSyntax;
use crate::dicom::uid::is_valid_uid;
use command::{command_field, response_to, status, CommandSet};
pub use message::{Assembled, Assembler, AssemblyError, Message};

/// A validated C-STORE request ready for storage.
#[derive(Debug)]
pub struct StoreRequest {
    pub presentation_context_id: u8,
    pub command: CommandSet,
    pub transfer_syntax: &'static TransferSyntax,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub routing: Scanned,
    pub data_set: Vec<u8>,
}

/// What to do with a complete message.
#[derive(Debug)]
pub enum Action {
    /// Send this response command on the message's presentation context.
    Respond { pc: u8, response: CommandSet },
    /// Store, then respond with the storage outcome.
    Store(Box<StoreRequest>),
    /// The message breaks DIMSE rules beyond a status answer: abort the association.
    Abort(&'static str),
}

fn fail(msg: &Message, st: u16, comment: &str) -> Action {
    Action::Respond {
        pc: msg.presentation_context_id,
        response: response_to(&msg.command, st, Some(comment)),
    }
}

/// The accepted presentation context a message arrived on (PS3.8 §9.3.3.2), as DIMSE needs it.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub abstract_syntax: &'a str,
    pub transfer_syntax: &'static TransferSyntax,
}

/// Decides what a complete message on the accepted context `ctx` needs; a C-STORE's data set is
/// scanned for `wanted` (sorted tags, which must include [`tags::ROUTING`]).
pub fn handle(msg: Message, ctx: Context<'_>, wanted: &[u32]) -> Action {
    let c = &msg.command;
    match c.command_field {
        command_field::C_ECHO_RQ => Action::Respond {
            pc: msg.presentation_context_id,
            response: response_to(c, status::SUCCESS, None),
        },
        command_field::C_STORE_RQ => handle_store(msg, ctx, wanted),
        command_field::C_GET_RQ
        | command_field::C_FIND_RQ
        | command_field::C_MOVE_RQ
        | command_field::N_EVENT_REPORT_RQ
        | command_field::N_GET_RQ
        | command_field::N_SET_RQ
        | command_field::N_ACTION_RQ
        | command_field::N_CREATE_RQ
        | command_field::N_DELETE_RQ => fail(
            &msg,
            status::UNRECOGNIZED_OPERATION,
            "operation not supported",
        ),
        // C-CANCEL has no response; a response command or an unknown field from the requestor
        // is a protocol violation.
        command_field::C_CANCEL_RQ => Action::Abort("C-CANCEL with no operation to cancel"),
        _ => Action::Abort("unknown or response command field from the requestor"),
    }
}

fn handle_store(mut msg: Message, ctx: Context<'_>, wanted: &[u32]) -> Action {
    let pc = msg.presentation_context_id;
    let Some(data_set) = msg.data_set.take() else {
        return fail(
            &msg,
            status::CANNOT_UNDERSTAND,
            "C-STORE without a data set",
        );
    };
    let header = match store_header(pc, msg.command, ctx) {
        Ok(h) => h,
        Err(response) => return Action::Respond { pc, response },
    };
    let scanned = match scan::scan(&data_set, ctx.transfer_syntax.encoding, wanted) {
        Ok(s) => s,
        Err(e) => {
            return Action::Respond {
                pc,
                response: response_to(
                    &header.command,
                    status::CANNOT_UNDERSTAND,
                    Some(&e.to_string()),
                ),
            }
        }
    };
    match store_request(header, scanned, data_set) {
        Ok(r) => Action::Store(r),
        Err(response) => Action::Respond { pc, response },
    }
}

/// A C-STORE request whose command and context were checked, before its data set is looked at
/// (a data set streamed to storage is checked as it arrives).
#[derive(Debug, Clone)]
pub struct StoreHeader {
    pub presentation_context_id: u8,
    pub command: CommandSet,
    pub transfer_syntax: &'static TransferSyntax,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

/// The checks of a C-STORE-RQ's command against its accepted context (PS3.4 B.2.3 statuses):
/// the header, or the failure response to send once the message is complete.
pub fn store_header(
    pc: u8,
    command: CommandSet,
    ctx: Context<'_>,
) -> Result<StoreHeader, CommandSet> {
    let refuse = |st: u16, why: &str| response_to(&command, st, Some(why));
    if ctx.abstract_syntax == VERIFICATION {
        return Err(refuse(
            status::SOP_CLASS_NOT_SUPPORTED,
            "C-STORE on Verification",
        ));
    }
    let (Some(cmd_class), Some(cmd_instance)) = (
        &command.affected_sop_class_uid,
        &command.affected_sop_instance_uid,
    ) else {
        return Err(refuse(
            status::CANNOT_UNDERSTAND,
            "command lacks affected SOP UIDs",
        ));
    };
    if cmd_class.as_slice() != ctx.abstract_syntax.as_bytes() {
        return Err(refuse(
            status::SOP_CLASS_NOT_SUPPORTED,
            "SOP class differs from the presentation context's",
        ));
    }
    if !is_valid_uid(cmd_instance) || !is_valid_uid(cmd_class) {
        return Err(refuse(status::CANNOT_UNDERSTAND, "invalid UID in command"));
    }
    let sop_class_uid = String::from_utf8_lossy(cmd_class).into_owned();
    let sop_instance_uid = String::from_utf8_lossy(cmd_instance).into_owned();
    Ok(StoreHeader {
        presentation_context_id: pc,
        transfer_syntax: ctx.transfer_syntax,
        sop_class_uid,
        sop_instance_uid,
        command,
    })
}

/// The checks of a scanned data set against its command: the store request, or the failure
/// response. `data_set` is empty for a data set streamed to storage.
pub fn store_request(
    header: StoreHeader,
    scanned: Scanned,
    data_set: Vec<u8>,
) -> Result<Box<StoreRequest>, CommandSet> {
    let refuse = |st: u16, why: &str| response_to(&header.command, st, Some(why));
    let ds_class = scanned.uid(tags::SOP_CLASS_UID);
    let ds_instance = scanned.uid(tags::SOP_INSTANCE_UID);
    if ds_class != Some(header.sop_class_uid.as_bytes())
        || ds_instance != Some(header.sop_instance_uid.as_bytes())
    {
        return Err(refuse(
            status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "data set SOP Class/Instance UID differ from the command's",
        ));
    }
    for t in [tags::STUDY_INSTANCE_UID, tags::SERIES_INSTANCE_UID] {
        if scanned
            .uid(t)
            .is_some_and(|u| !u.is_empty() && !is_valid_uid(u))
        {
            return Err(refuse(
                status::CANNOT_UNDERSTAND,
                "invalid Study/Series Instance UID",
            ));
        }
    }
    Ok(Box::new(StoreRequest {
        presentation_context_id: header.presentation_context_id,
        command: header.command,
        transfer_syntax: header.transfer_syntax,
        sop_class_uid: header.sop_class_uid,
        sop_instance_uid: header.sop_instance_uid,
        routing: scanned,
        data_set,
    }))
}
