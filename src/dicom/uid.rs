//! The one UID rule, PS3.5 §9.1: components of digits separated by single dots, no leading zero
//! in a multi-digit component, at most 64 characters. A valid UID can be used as a file name: it
//! cannot be empty, `.`, `..`, or hold `/`, `\` or NUL. Owns nothing else; no I/O.
#![forbid(unsafe_code)]

/// Maximum length of a UID, PS3.5 §9.1.
pub const MAX_UID_LEN: usize = 64;

/// The root of the UIDs the DICOM standard defines (PS3.5 §9.1, Annex A).
pub const DICOM_UID_ROOT: &[u8] = b"1.2.840.10008.";

/// A UID without the single trailing NUL that pads it to even length (PS3.5 §9.1; in a PDU
/// item, PS3.8 §9.3.2.2, UIDs are not padded but some peers pad them anyway).
pub fn without_nul_pad(raw: &[u8]) -> &[u8] {
    match raw.split_last() {
        Some((0, rest)) => rest,
        _ => raw,
    }
}

/// Whether `uid` is a UID by PS3.5 §9.1 (no padding: see [`without_nul_pad`]).
pub fn is_valid_uid(uid: &[u8]) -> bool {
    if uid.is_empty() || uid.len() > MAX_UID_LEN {
        return false;
    }
    uid.split(|&b| b == b'.').all(|c| {
        !c.is_empty() && c.iter().all(u8::is_ascii_digit) && (c.len() == 1 || c[0] != b'0')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_per_ps3_5_9_1() {
        assert!(is_valid_uid(b"1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_valid_uid(b"0"));
        assert!(is_valid_uid(b"2.25.0.1"));
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"1..2",
            b"1.2.",
            b".1",
            b"1.02",
            b"1/2",
            b"../../etc/passwd",
            b"1.2\0",
            b"1.2 ",
            b"/1.2",
        ] {
            assert!(!is_valid_uid(bad), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!is_valid_uid(&[b'1'; 65]));
        assert!(is_valid_uid(&[b'1'; 64]));
        assert_eq!(without_nul_pad(b"1.2\0"), b"1.2");
        assert_eq!(without_nul_pad(b"1.2"), b"1.2");
        assert_eq!(without_nul_pad(b""), b"");
    }
}
