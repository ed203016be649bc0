//! DIMSE command sets (PS3.7 §6.3, §9.3, §10.3): group 0000 elements, always implicit VR little
//! endian. Decoding is bounded by the command's byte length (itself bounded by
//! [`MAX_COMMAND_LEN`]); unknown command elements are skipped. Elements are written by the one
//! element writer ([`crate::dicom::element`]).

use crate::dicom::element;
use crate::dicom::transfer_syntax::DatasetEncoding::ImplicitVrLittleEndian;
use crate::dicom::vr::{trim_padding, Vr};

/// Largest command set we assemble. A C-STORE-RQ is about 200 bytes; 64 KiB leaves room for
/// long error comments and private extensions while bounding a hostile peer.
pub const MAX_COMMAND_LEN: usize = 64 * 1024;

/// Command Field values, PS3.7 Annex E.
pub mod command_field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    pub const N_GET_RQ: u16 = 0x0110;
    pub const N_SET_RQ: u16 = 0x0120;
    pub const N_ACTION_RQ: u16 = 0x0130;
    pub const N_CREATE_RQ: u16 = 0x0140;
    pub const N_DELETE_RQ: u16 = 0x0150;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command Data Set Type value meaning "no data set" (PS3.7 §9.3, E.1); any other value means
/// a data set follows.
pub const NO_DATA_SET: u16 = 0x0101;

/// Status codes we send (PS3.7 Annex C, PS3.4 B.2.3).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP Class not supported (PS3.7 C.5.3).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: Not Authorized (PS3.7 C.5.x general status 0124H): an instance no `[[input]]`
    /// of the node accepts, refused instead of acknowledged and dropped.
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    /// Unrecognized operation (PS3.7 C.5.10).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Refused: Out of Resources (PS3.4 B.2.3), used for any failure to store.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: Data Set does not match SOP Class (PS3.4 B.2.3): the dataset's SOP Class/Instance
    /// UID disagree with the command's.
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    /// Error: Cannot understand (PS3.4 B.2.3).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// A decoded command set; UIDs without their trailing NUL pad.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSet {
    pub command_field: u16,
    pub message_id: Option<u16>,
    pub message_id_being_responded_to: Option<u16>,
    pub affected_sop_class_uid: Option<Vec<u8>>,
    pub affected_sop_instance_uid: Option<Vec<u8>>,
    pub priority: Option<u16>,
    pub command_data_set_type: u16,
    pub status: Option<u16>,
    pub error_comment: Option<Vec<u8>>,
    /// The elements only retrieval messages carry (boxed: most commands are C-STOREs).
    pub retrieve: Option<Box<Retrieve>>,
}

/// Command elements of C-MOVE and C-GET and of the C-STOREs they cause (PS3.7 §9.3.3,
/// §9.3.4, §9.3.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retrieve {
    /// Move Destination (0000,0600) of a C-MOVE-RQ.
    pub move_destination: Option<Vec<u8>>,
    /// Number of Remaining, Completed, Failed and Warning Sub-operations (0000,1020)-(0000,1023)
    /// of a C-MOVE/C-GET response.
    pub suboperations: [Option<u16>; 4],
    /// Move Originator Application Entity Title (0000,1030) of a C-STORE sub-operation.
    pub move_originator_ae_title: Option<Vec<u8>>,
    /// Move Originator Message ID (0000,1031).
    pub move_originator_message_id: Option<u16>,
}

impl CommandSet {
    pub fn has_data_set(&self) -> bool {
        self.command_data_set_type != NO_DATA_SET
    }

    fn retrieve_mut(&mut self) -> &mut Retrieve {
        self.retrieve.get_or_insert_with(Box::default)
    }
}

/// Why a command set could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    Truncated,
    NotGroup0000,
    BadValueLength(u16),
    MissingCommandField,
    MissingDataSetType,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Truncated => f.write_str("command element runs past the command set"),
            CommandError::NotGroup0000 => f.write_str("command set holds a non-0000 element"),
            CommandError::BadValueLength(e) => write!(f, "bad length for (0000,{e:04X})"),
            CommandError::MissingCommandField => f.write_str("no Command Field"),
            CommandError::MissingDataSetType => f.write_str("no Command Data Set Type"),
        }
    }
}

impl std::error::Error for CommandError {}

fn trim_uid(v: &[u8]) -> Vec<u8> {
    trim_padding(v).to_vec()
}

fn us(v: &[u8], elem: u16) -> Result<u16, CommandError> {
    match v {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(CommandError::BadValueLength(elem)),
    }
}

/// Decodes a command set (implicit VR little endian, PS3.7 §6.3.1).
pub fn decode(bytes: &[u8]) -> Result<CommandSet, CommandError> {
    let mut c = CommandSet::default();
    let (mut have_field, mut have_type) = (false, false);
    let mut rest = bytes;
    while !rest.is_empty() {
        let hdr: &[u8; 8] = rest
            .get(..8)
            .and_then(|h| h.try_into().ok())
            .ok_or(CommandError::Truncated)?;
        let group = u16::from_le_bytes([hdr[0], hdr[1]]);
        let elem = u16::from_le_bytes([hdr[2], hdr[3]]);
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        if group != 0x0000 {
            return Err(CommandError::NotGroup0000);
        }
        let v = rest
            .get(8..8usize.saturating_add(len))
            .ok_or(CommandError::Truncated)?;
        rest = &rest[8 + len..];
        match elem {
            0x0002 => c.affected_sop_class_uid = Some(trim_uid(v)),
            0x0100 => {
                c.command_field = us(v, elem)?;
                have_field = true;
            }
            0x0110 => c.message_id = Some(us(v, elem)?),
            0x0120 => c.message_id_being_responded_to = Some(us(v, elem)?),
            0x0700 => c.priority = Some(us(v, elem)?),
            0x0800 => {
                c.command_data_set_type = us(v, elem)?;
                have_type = true;
            }
            0x0900 => c.status = Some(us(v, elem)?),
            0x0600 => c.retrieve_mut().move_destination = Some(trim_uid(v)),
            0x0902 => c.error_comment = Some(trim_uid(v)),
            0x1000 => c.affected_sop_instance_uid = Some(trim_uid(v)),
            0x1020..=0x1023 => {
                c.retrieve_mut().suboperations[usize::from(elem - 0x1020)] = Some(us(v, elem)?)
            }
            0x1030 => c.retrieve_mut().move_originator_ae_title = Some(trim_uid(v)),
            0x1031 => c.retrieve_mut().move_originator_message_id = Some(us(v, elem)?),
            _ => {} // group length and other elements: not needed
        }
    }
    if !have_field {
        return Err(CommandError::MissingCommandField);
    }
    if !have_type {
        return Err(CommandError::MissingDataSetType);
    }
    Ok(c)
}

/// One command element (0000,`elem`) of VR `vr` (PS3.7 Annex E; implicit VR, so the VR only
/// decides the padding, PS3.5 §7.1.1: UIDs with NUL, the AE titles and the Error Comment with
/// a space).
fn put(out: &mut Vec<u8>, elem: u16, vr: Vr, value: &[u8]) {
    element::put(out, ImplicitVrLittleEndian, u32::from(elem), vr, value);
}

/// Encodes a command set with its Command Group Length (0000,0000), elements in tag order.
pub fn encode(c: &CommandSet, out: &mut Vec<u8>) {
    let start = out.len();
    // Command Group Length (0000,0000), patched once the group is written.
    put(out, 0x0000, Vr::UL, &[0; 4]);
    let body = out.len();
    if let Some(u) = &c.affected_sop_class_uid {
        put(out, 0x0002, Vr::UI, u);
    }
    put(out, 0x0100, Vr::US, &c.command_field.to_le_bytes());
    if let Some(v) = c.message_id {
        put(out, 0x0110, Vr::US, &v.to_le_bytes());
    }
    if let Some(v) = c.message_id_being_responded_to {
        put(out, 0x0120, Vr::US, &v.to_le_bytes());
    }
    let r = c.retrieve.as_deref();
    if let Some(v) = r.and_then(|r| r.move_destination.as_ref()) {
        put(out, 0x0600, Vr::AE, v);
    }
    if let Some(v) = c.priority {
        put(out, 0x0700, Vr::US, &v.to_le_bytes());
    }
    put(out, 0x0800, Vr::US, &c.command_data_set_type.to_le_bytes());
    if let Some(v) = c.status {
        put(out, 0x0900, Vr::US, &v.to_le_bytes());
    }
    if let Some(v) = &c.error_comment {
        put(out, 0x0902, Vr::LO, v);
    }
    if let Some(u) = &c.affected_sop_instance_uid {
        put(out, 0x1000, Vr::UI, u);
    }
    if let Some(r) = r {
        for (i, n) in r.suboperations.iter().enumerate() {
            if let Some(n) = n {
                put(out, 0x1020 + i as u16, Vr::US, &n.to_le_bytes());
            }
        }
        if let Some(v) = &r.move_originator_ae_title {
            put(out, 0x1030, Vr::AE, v);
        }
        if let Some(v) = r.move_originator_message_id {
            put(out, 0x1031, Vr::US, &v.to_le_bytes());
        }
    }
    let group_len = (out.len() - body) as u32;
    out[start + 8..start + 12].copy_from_slice(&group_len.to_le_bytes());
}

/// The response command to a request (PS3.7 §9.3.1.2, §9.3.5.2).
pub fn response_to(rq: &CommandSet, status: u16, comment: Option<&str>) -> CommandSet {
    let is_store = rq.command_field == command_field::C_STORE_RQ;
    CommandSet {
        command_field: rq.command_field | 0x8000,
        message_id: None,
        message_id_being_responded_to: rq.message_id,
        affected_sop_class_uid: rq.affected_sop_class_uid.clone(),
        affected_sop_instance_uid: if is_store {
            rq.affected_sop_instance_uid.clone()
        } else {
            None
        },
        priority: None,
        command_data_set_type: NO_DATA_SET,
        status: Some(status),
        error_comment: comment.map(|c| c.as_bytes()[..c.len().min(64)].to_vec()),
        retrieve: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C-MOVE's elements (PS3.7 §9.3.4): Move Destination (an AE title, padded with a space,
    /// not a NUL: PS3.5 §6.2) and the sub-operation counts of a response round-trip.
    #[test]
    fn c_move_elements_round_trip() {
        let rq = CommandSet {
            command_field: command_field::C_MOVE_RQ,
            message_id: Some(3),
            affected_sop_class_uid: Some(b"1.2.840.10008.5.1.4.1.2.1.2".to_vec()),
            priority: Some(0),
            command_data_set_type: 0x0000,
            retrieve: Some(Box::new(Retrieve {
                move_destination: Some(b"GATE1".to_vec()),
                suboperations: [Some(0), Some(3), Some(1), None],
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut b = Vec::new();
        encode(&rq, &mut b);
        let at = b
            .windows(6)
            .position(|w| w == b"GATE1 ")
            .expect("padded with a space");
        assert_eq!(&b[at - 8..at - 4], &[0, 0, 0x00, 0x06], "(0000,0600)");
        assert_eq!(decode(&b).unwrap(), rq);
    }

    #[test]
    fn encode_decode_round_trip_and_group_length() {
        let rq = CommandSet {
            command_field: command_field::C_STORE_RQ,
            message_id: Some(7),
            affected_sop_class_uid: Some(b"1.2.840.10008.5.1.4.1.1.2".to_vec()),
            affected_sop_instance_uid: Some(b"1.2.3".to_vec()),
            priority: Some(0),
            command_data_set_type: 0x0000,
            ..Default::default()
        };
        let mut b = Vec::new();
        encode(&rq, &mut b);
        assert_eq!(
            u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize,
            b.len() - 12
        );
        assert_eq!(decode(&b).unwrap(), rq);
        let rsp = response_to(&rq, status::SUCCESS, None);
        let mut r = Vec::new();
        encode(&rsp, &mut r);
        let d = decode(&r).unwrap();
        assert_eq!(d.command_field, command_field::C_STORE_RSP);
        assert_eq!(d.message_id_being_responded_to, Some(7));
        assert_eq!(d.status, Some(0));
        assert!(!d.has_data_set());
    }

    #[test]
    fn bounded_and_strict() {
        assert_eq!(
            decode(&[0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(CommandError::Truncated)
        );
        assert_eq!(
            decode(&[8, 0, 0, 1, 0, 0, 0, 0]),
            Err(CommandError::NotGroup0000)
        );
        assert_eq!(
            decode(&[0, 0, 0, 1, 1, 0, 0, 0, 5]),
            Err(CommandError::BadValueLength(0x100))
        );
        assert_eq!(decode(&[]), Err(CommandError::MissingCommandField));
    }
}
