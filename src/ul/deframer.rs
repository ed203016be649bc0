//! Splits a byte stream into PDUs (httparse style): `Complete(n)`, `Partial` or an error.
//!
//! Owns: the decision, from the 6-byte header alone, whether a PDU may be awaited at all. A
//! declared length above the caller's maximum is refused before its body arrives, so a peer cannot
//! make us buffer more than the configured maximum (design rule 2). Must never copy or allocate.

use super::codes::PduType;
use super::pdu::{PduError, PDU_HEADER_LEN};

/// Outcome of looking for one PDU at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A whole PDU of this many bytes (header included) starts the buffer.
    Complete(usize),
    /// More bytes are needed; `needed` is the total PDU size when the header is known.
    Partial { needed: Option<usize> },
}

/// Looks for one PDU at the start of `buf`. `max_len` bounds the PDU length field (the body).
pub fn deframe(buf: &[u8], max_len: u32) -> Result<Status, PduError> {
    let Some(&t) = buf.first() else {
        return Ok(Status::Partial { needed: None });
    };
    if !(PduType::A_ASSOCIATE_RQ.0..=PduType::A_ABORT.0).contains(&t) {
        return Err(PduError::UnrecognizedPdu(t));
    }
    let Some(len) = buf.get(2..6) else {
        return Ok(Status::Partial { needed: None });
    };
    let declared = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    if declared > max_len {
        return Err(PduError::TooLong {
            declared,
            max: max_len,
        });
    }
    let total = PDU_HEADER_LEN + declared as usize;
    if buf.len() >= total {
        Ok(Status::Complete(total))
    } else {
        Ok(Status::Partial {
            needed: Some(total),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_until_header_then_until_body() {
        let pdu = [0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(deframe(&[], 100), Ok(Status::Partial { needed: None }));
        assert_eq!(
            deframe(&pdu[..3], 100),
            Ok(Status::Partial { needed: None })
        );
        assert_eq!(
            deframe(&pdu[..7], 100),
            Ok(Status::Partial { needed: Some(10) })
        );
        assert_eq!(deframe(&pdu, 100), Ok(Status::Complete(10)));
    }

    #[test]
    fn refuses_length_above_max_from_header_alone() {
        let hdr = [0x04, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(
            deframe(&hdr, 16384),
            Err(PduError::TooLong {
                declared: u32::MAX,
                max: 16384
            })
        );
    }

    #[test]
    fn unknown_type_is_refused_from_first_byte() {
        assert_eq!(deframe(&[0x08], 100), Err(PduError::UnrecognizedPdu(8)));
        assert_eq!(
            deframe(&[0x00, 0, 0], 100),
            Err(PduError::UnrecognizedPdu(0))
        );
    }
}
