//! Assembles DIMSE messages from PDV fragments (PS3.7 §9.1, PS3.8 Annex E): the command
//! fragments, then (when the command says so) the data set fragments, all on one presentation
//! context, one message at a time (no interleaving; we negotiate no asynchronous interleaving of
//! fragments). Command and dataset may share a PDU. Sizes are bounded: the command by
//! [`MAX_COMMAND_LEN`], the dataset by the configured maximum message size.

use super::command::{self, CommandError, CommandSet, MAX_COMMAND_LEN};
use crate::ul::{AbortReason, Pdv};

/// A complete DIMSE message.
#[derive(Debug)]
pub struct Message {
    pub presentation_context_id: u8,
    pub command: CommandSet,
    /// The data set bytes exactly as received, if the command announced one.
    pub data_set: Option<Vec<u8>>,
}

/// A violation of the message rules; the association is aborted with `abort_reason()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssemblyError {
    /// A data set fragment where a command fragment must come, or the reverse.
    UnexpectedFragment(&'static str),
    /// A fragment on another presentation context than the message's.
    ContextChanged,
    /// A presentation context that was not accepted.
    UnknownContext(u8),
    CommandTooLong,
    DataSetTooLong {
        max: usize,
    },
    BadCommand(CommandError),
}

impl AssemblyError {
    pub fn abort_reason(&self) -> AbortReason {
        match self {
            AssemblyError::UnexpectedFragment(_) | AssemblyError::ContextChanged => {
                AbortReason::UNEXPECTED_PDU_PARAMETER
            }
            _ => AbortReason::INVALID_PDU_PARAMETER_VALUE,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            AssemblyError::UnexpectedFragment(w) => w,
            AssemblyError::ContextChanged => "fragment on another presentation context",
            AssemblyError::UnknownContext(_) => "PDV on a presentation context not accepted",
            AssemblyError::CommandTooLong => "command set above 64 KiB",
            AssemblyError::DataSetTooLong { .. } => "data set above the maximum message size",
            AssemblyError::BadCommand(_) => "command set cannot be decoded",
        }
    }
}

impl std::fmt::Display for AssemblyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AssemblyError::BadCommand(e) => write!(f, "command set cannot be decoded: {e}"),
            AssemblyError::UnknownContext(id) => write!(f, "PDV on unaccepted context {id}"),
            other => f.write_str(other.describe()),
        }
    }
}

impl std::error::Error for AssemblyError {}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    Idle,
    Command {
        pc: u8,
        buf: Vec<u8>,
    },
    DataSet {
        pc: u8,
        command: CommandSet,
        buf: Vec<u8>,
    },
    /// The data set goes to the caller fragment by fragment ([`Assembler::begin_stream`]).
    Streaming {
        pc: u8,
        received: usize,
    },
}

/// What one PDV did.
#[derive(Debug)]
pub enum Assembled<'a> {
    /// Nothing complete yet.
    Pending,
    Message(Message),
    /// The next bytes of a data set being streamed; `last`: the message is complete.
    Streamed {
        data: &'a [u8],
        last: bool,
    },
}

/// Per-association assembler.
#[derive(Debug)]
pub struct Assembler {
    phase: Phase,
    max_data_set: usize,
}

impl Assembler {
    pub fn new(max_data_set: usize) -> Self {
        Assembler {
            phase: Phase::Idle,
            max_data_set,
        }
    }

    /// Drops the message in progress (the association is gone).
    pub fn reset(&mut self) {
        self.phase = Phase::Idle;
    }

    /// True while a message is partly received.
    pub fn in_progress(&self) -> bool {
        !matches!(self.phase, Phase::Idle)
    }

    /// Bytes held for the message in progress.
    pub fn buffered(&self) -> usize {
        match &self.phase {
            Phase::Idle => 0,
            Phase::Command { buf, .. } | Phase::DataSet { buf, .. } => buf.len(),
            Phase::Streaming { .. } => 0,
        }
    }

    /// From now on the data set in progress is not buffered: its later fragments come out of
    /// [`Assembler::push_pdv`] as [`Assembled::Streamed`]. Returns its context, command and the
    /// bytes received so far; `None` when no data set is in progress.
    pub fn begin_stream(&mut self) -> Option<(u8, CommandSet, Vec<u8>)> {
        match std::mem::take(&mut self.phase) {
            Phase::DataSet { pc, command, buf } => {
                self.phase = Phase::Streaming {
                    pc,
                    received: buf.len(),
                };
                Some((pc, command, buf))
            }
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Adds one PDV; returns a message when this PDV completed one. `accepted` says whether a
    /// presentation context ID was accepted at negotiation. For an assembler that never
    /// streams ([`Assembler::begin_stream`] is not called).
    pub fn push(
        &mut self,
        pdv: Pdv<'_>,
        accepted: impl Fn(u8) -> bool,
    ) -> Result<Option<Message>, AssemblyError> {
        match self.push_pdv(pdv, accepted)? {
            Assembled::Message(m) => Ok(Some(m)),
            Assembled::Pending | Assembled::Streamed { .. } => Ok(None),
        }
    }

    /// Adds one PDV: a complete message, the next bytes of a streamed data set, or nothing yet.
    pub fn push_pdv<'a>(
        &mut self,
        pdv: Pdv<'a>,
        accepted: impl Fn(u8) -> bool,
    ) -> Result<Assembled<'a>, AssemblyError> {
        let pc = pdv.presentation_context_id;
        if !accepted(pc) {
            return Err(AssemblyError::UnknownContext(pc));
        }
        match std::mem::take(&mut self.phase) {
            Phase::Idle => {
                if !pdv.is_command() {
                    return Err(AssemblyError::UnexpectedFragment(
                        "data set fragment before its command",
                    ));
                }
                self.command_fragment(pc, Vec::new(), pdv)
            }
            Phase::Command { pc: mpc, buf } => {
                if mpc != pc {
                    return Err(AssemblyError::ContextChanged);
                }
                if !pdv.is_command() {
                    return Err(AssemblyError::UnexpectedFragment(
                        "data set fragment inside a command",
                    ));
                }
                self.command_fragment(pc, buf, pdv)
            }
            Phase::DataSet {
                pc: mpc,
                command,
                mut buf,
            } => {
                if mpc != pc {
                    return Err(AssemblyError::ContextChanged);
                }
                if pdv.is_command() {
                    return Err(AssemblyError::UnexpectedFragment(
                        "command fragment inside a data set (interleaved messages)",
                    ));
                }
                if buf.len() + pdv.data.len() > self.max_data_set {
                    return Err(AssemblyError::DataSetTooLong {
                        max: self.max_data_set,
                    });
                }
                buf.extend_from_slice(pdv.data);
                if pdv.is_last() {
                    Ok(Assembled::Message(Message {
                        presentation_context_id: pc,
                        command,
                        data_set: Some(buf),
                    }))
                } else {
                    self.phase = Phase::DataSet { pc, command, buf };
                    Ok(Assembled::Pending)
                }
            }
            Phase::Streaming { pc: mpc, received } => {
                if mpc != pc {
                    return Err(AssemblyError::ContextChanged);
                }
                if pdv.is_command() {
                    return Err(AssemblyError::UnexpectedFragment(
                        "command fragment inside a data set (interleaved messages)",
                    ));
                }
                let received = received.saturating_add(pdv.data.len());
                if received > self.max_data_set {
                    return Err(AssemblyError::DataSetTooLong {
                        max: self.max_data_set,
                    });
                }
                let last = pdv.is_last();
                if !last {
                    self.phase = Phase::Streaming { pc, received };
                }
                Ok(Assembled::Streamed {
                    data: pdv.data,
                    last,
                })
            }
        }
    }

    fn command_fragment<'a>(
        &mut self,
        pc: u8,
        mut buf: Vec<u8>,
        pdv: Pdv<'_>,
    ) -> Result<Assembled<'a>, AssemblyError> {
        if buf.len() + pdv.data.len() > MAX_COMMAND_LEN {
            return Err(AssemblyError::CommandTooLong);
        }
        buf.extend_from_slice(pdv.data);
        if !pdv.is_last() {
            self.phase = Phase::Command { pc, buf };
            return Ok(Assembled::Pending);
        }
        let command = command::decode(&buf).map_err(AssemblyError::BadCommand)?;
        if command.has_data_set() {
            self.phase = Phase::DataSet {
                pc,
                command,
                buf: Vec::new(),
            };
            Ok(Assembled::Pending)
        } else {
            Ok(Assembled::Message(Message {
                presentation_context_id: pc,
                command,
                data_set: None,
            }))
        }
    }
}

/// Appends `data` as P-DATA-TF PDUs of PDVs on `pc`, each PDU at most `max_pdu` long (0 = no
/// limit; we then cut at 1 MiB). `is_command` sets bit 0 of the message control header; the last
/// fragment sets bit 1 (PS3.8 E.2).
pub fn fragment(out: &mut Vec<u8>, pc: u8, is_command: bool, data: &[u8], max_pdu: u32) {
    let max_pdu = if max_pdu == 0 {
        1 << 20
    } else {
        max_pdu as usize
    };
    // PDU length counts the PDV item header (4 + 2 bytes) too; keep at least 1 data byte.
    let chunk = max_pdu.saturating_sub(6).max(1);
    let mut chunks = data.chunks(chunk).peekable();
    if data.is_empty() {
        let mch = u8::from(is_command) | 0x02;
        crate::ul::pdu::put_pdata_header(out, pc, mch, 0);
        return;
    }
    while let Some(c) = chunks.next() {
        let mch = u8::from(is_command) | if chunks.peek().is_none() { 0x02 } else { 0 };
        crate::ul::pdu::put_pdata_header(out, pc, mch, c.len() as u32);
        out.extend_from_slice(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dimse::command::{command_field, encode};
    use crate::ul::{decode, Pdu};

    fn store_rq() -> Vec<u8> {
        let mut b = Vec::new();
        encode(
            &CommandSet {
                command_field: command_field::C_STORE_RQ,
                message_id: Some(1),
                affected_sop_class_uid: Some(b"1.2.840.10008.5.1.4.1.1.2".to_vec()),
                affected_sop_instance_uid: Some(b"1.2.3".to_vec()),
                command_data_set_type: 0,
                priority: Some(0),
                ..Default::default()
            },
            &mut b,
        );
        b
    }

    fn pdv(pc: u8, mch: u8, data: &[u8]) -> Pdv<'_> {
        Pdv {
            presentation_context_id: pc,
            message_control_header: mch,
            data,
        }
    }

    #[test]
    fn command_then_fragmented_data_set() {
        let cmd = store_rq();
        let mut a = Assembler::new(1 << 20);
        let ok = |_| true;
        assert!(a.push(pdv(1, 0x01, &cmd[..10]), ok).unwrap().is_none());
        assert!(a.push(pdv(1, 0x03, &cmd[10..]), ok).unwrap().is_none());
        assert!(a.in_progress());
        assert!(a.push(pdv(1, 0x00, b"abcd"), ok).unwrap().is_none());
        let m = a.push(pdv(1, 0x02, b"ef"), ok).unwrap().unwrap();
        assert_eq!(m.data_set.as_deref(), Some(&b"abcdef"[..]));
        assert_eq!(m.command.command_field, command_field::C_STORE_RQ);
        assert!(!a.in_progress());
    }

    #[test]
    fn violations_are_refused() {
        let cmd = store_rq();
        let ok = |_| true;
        let mut a = Assembler::new(4);
        assert!(matches!(
            a.push(pdv(1, 0x02, b"x"), ok),
            Err(AssemblyError::UnexpectedFragment(_))
        ));
        let mut a = Assembler::new(4);
        a.push(pdv(1, 0x03, &cmd), ok).unwrap();
        assert_eq!(
            a.push(pdv(3, 0x02, b"x"), ok).unwrap_err(),
            AssemblyError::ContextChanged
        );
        let mut a = Assembler::new(4);
        a.push(pdv(1, 0x03, &cmd), ok).unwrap();
        assert!(matches!(
            a.push(pdv(1, 0x03, &cmd), ok),
            Err(AssemblyError::UnexpectedFragment(_))
        ));
        let mut a = Assembler::new(4);
        a.push(pdv(1, 0x03, &cmd), ok).unwrap();
        assert_eq!(
            a.push(pdv(1, 0x02, b"12345"), ok).unwrap_err(),
            AssemblyError::DataSetTooLong { max: 4 }
        );
        let mut a = Assembler::new(4);
        assert_eq!(
            a.push(pdv(5, 0x03, &cmd), |id| id == 1).unwrap_err(),
            AssemblyError::UnknownContext(5)
        );
    }

    #[test]
    fn fragment_respects_max_pdu_and_marks_last() {
        let data = vec![7u8; 100];
        let mut out = Vec::new();
        fragment(&mut out, 3, false, &data, 46);
        let mut pos = 0;
        let mut total = 0;
        let mut lasts = 0;
        while pos < out.len() {
            let len = u32::from_be_bytes(out[pos + 2..pos + 6].try_into().unwrap()) as usize;
            assert!(len <= 46);
            let Pdu::PDataTf(p) = decode(&out[pos..pos + 6 + len]).unwrap() else {
                panic!()
            };
            for v in p.pdvs() {
                total += v.data.len();
                lasts += usize::from(v.is_last());
                assert!(!v.is_command());
            }
            pos += 6 + len;
        }
        assert_eq!((total, lasts), (100, 1));
    }
}
