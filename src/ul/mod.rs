//! DICOM Upper Layer wire format (PS3.8 §9): PDUs, A-ASSOCIATE items and sub-items, the deframer.
//!
//! Owns: bytes ⇄ typed PDUs. Pure: no sockets, no clocks, no unsafe. Parsed PDUs borrow from the
//! caller's buffer; a P-DATA-TF is never copied or allocated for. Must never panic on any input,
//! and never allocate in proportion to a length a peer declares.
#![forbid(unsafe_code)]

pub mod codec;
pub mod codes;
pub mod deframer;
pub mod pdu;

pub use codes::*;
pub use deframer::{deframe, Status};
pub use pdu::{
    decode, Abort, Associate, AssociateReserved, AssociateRj, Item, PDataTf, Pdu, PduError, Pdv,
    PresentationContextAc, PresentationContextRq, Release, SubItem, PDU_HEADER_LEN,
};

/// An AE title as it travels in an A-ASSOCIATE PDU: 16 bytes, padded with spaces (PS3.8 §9.3.2).
/// Leading and trailing spaces are not significant (PS3.5 §6.2, VR AE); a value of only spaces is
/// not a valid AE title. Returns the significant part, or `None` if the title is empty or holds a
/// byte AE does not allow (control characters, backslash, non-ASCII). Trailing NULs, which some
/// peers send instead of spaces, are tolerated as padding.
pub fn ae_title_str(raw: &[u8; 16]) -> Option<&str> {
    let end = crate::dicom::vr::trim_padding(raw).len();
    let start = raw.iter().position(|&b| b != b' ').unwrap_or(end).min(end);
    let s = &raw[start..end];
    if s.is_empty() || s.iter().any(|&b| !(0x20..0x7F).contains(&b) || b == b'\\') {
        return None;
    }
    std::str::from_utf8(s).ok()
}

/// Pads an AE title to the 16-byte field of an A-ASSOCIATE PDU. Titles longer than 16 bytes are
/// cut (config validation refuses them earlier).
pub fn ae_title_field(title: &str) -> [u8; 16] {
    let mut f = [b' '; 16];
    for (d, s) in f.iter_mut().zip(title.trim().bytes()) {
        *d = s;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ae_titles_follow_ps3_5() {
        assert_eq!(ae_title_str(b"STORESCP        "), Some("STORESCP"));
        assert_eq!(ae_title_str(b"  PADDED AE     "), Some("PADDED AE"));
        assert_eq!(ae_title_str(b"ANY\0\0\0\0\0\0\0\0\0\0\0\0\0"), Some("ANY"));
        assert_eq!(ae_title_str(b"                "), None);
        assert_eq!(ae_title_str(b"BAD\\AE          "), None);
        assert_eq!(ae_title_str(b"TAB\tAE          "), None);
        assert_eq!(ae_title_field("GATE"), *b"GATE            ");
    }
}
