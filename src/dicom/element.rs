//! The one data element writer (PS3.5 §7.1): tag, VR (explicit VR only), Value Length, value
//! padded to even length (PS3.5 §7.1.1, padding per [`Vr::padding`]), in any of the data set
//! encodings of [`DatasetEncoding`]. The Part-10 meta group, DIMSE command sets (implicit VR
//! little endian, PS3.7 §6.3.1), Query/Retrieve identifiers, the load generator's synthetic
//! instances, the fuzz bodies and the tests all write elements through it.
//!
//! Owns the element's byte layout and nothing else; no I/O; never panics. It never re-encodes
//! a peer's data set (those are kept as received): it writes what we build.
#![forbid(unsafe_code)]

use super::transfer_syntax::DatasetEncoding;
use super::vr::Vr;

/// The Value Length that means "undefined" (PS3.5 §7.1.1): a sequence or item ended by a
/// delimitation item.
pub const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;

/// The longest value an element can hold (PS3.5 §7.1.1: an even 32-bit length other than
/// [`UNDEFINED_LENGTH`]).
pub const MAX_VALUE_LENGTH: u32 = 0xFFFF_FFFE;

/// Appends an element header for a value of `len` bytes (the caller appends the value; `len`
/// must be even, or [`UNDEFINED_LENGTH`] for a sequence). In explicit VR, a VR with a 16-bit
/// length field whose `len` does not fit it is written as UN with a 32-bit length, as PS3.5
/// §6.2.2 says (CP-1066).
pub fn put_header(out: &mut Vec<u8>, enc: DatasetEncoding, tag: u32, vr: Vr, len: u32) {
    let be = enc == DatasetEncoding::ExplicitVrBigEndian;
    let u16b = |x: u16| if be { x.to_be_bytes() } else { x.to_le_bytes() };
    let u32b = |x: u32| if be { x.to_be_bytes() } else { x.to_le_bytes() };
    out.extend_from_slice(&u16b((tag >> 16) as u16));
    out.extend_from_slice(&u16b(tag as u16));
    if enc == DatasetEncoding::ImplicitVrLittleEndian {
        out.extend_from_slice(&u32b(len));
        return;
    }
    match u16::try_from(len) {
        Ok(short) if !vr.has_4_byte_length() => {
            out.extend_from_slice(&vr.0);
            out.extend_from_slice(&u16b(short));
        }
        _ => {
            let vr = if vr.has_4_byte_length() { vr } else { Vr::UN };
            out.extend_from_slice(&vr.0);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&u32b(len));
        }
    }
}

/// Appends one element: its header and `value`, padded to even length with the VR's padding
/// byte (PS3.5 §6.2: a space for character strings, NUL for UI, OB and other binary VRs).
/// `value` is in the encoding's byte order already. A value longer than
/// [`MAX_VALUE_LENGTH`] cannot be an element: only its first `MAX_VALUE_LENGTH` bytes are
/// written (no caller comes near: every value written here is a few kilobytes at most).
pub fn put(out: &mut Vec<u8>, enc: DatasetEncoding, tag: u32, vr: Vr, value: &[u8]) {
    let value = value.get(..MAX_VALUE_LENGTH as usize).unwrap_or(value);
    let pad = value.len() % 2;
    // At most MAX_VALUE_LENGTH (even) after padding: fits a u32.
    let len = u32::try_from(value.len() + pad).unwrap_or(MAX_VALUE_LENGTH);
    put_header(out, enc, tag, vr, len);
    out.extend_from_slice(value);
    if pad == 1 {
        out.push(vr.padding());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DatasetEncoding::*;

    fn one(enc: DatasetEncoding, tag: u32, vr: Vr, v: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        put(&mut d, enc, tag, vr, v);
        d
    }

    #[test]
    fn elements_are_padded_to_even_length() {
        type Case = (DatasetEncoding, u32, Vr, &'static [u8], &'static [u8]);
        let cases: [Case; 5] = [
            (
                ExplicitVrLittleEndian,
                0x0008_0018,
                Vr::UI,
                b"1.2.3",
                b"\x08\x00\x18\x00UI\x06\x001.2.3\0",
            ),
            (
                ExplicitVrLittleEndian,
                0x0010_0020,
                Vr::LO,
                b"P",
                b"\x10\x00\x20\x00LO\x02\x00P ",
            ),
            (
                ExplicitVrLittleEndian,
                0x7FE0_0010,
                Vr::OW,
                &[1, 2],
                b"\xE0\x7F\x10\x00OW\0\0\x02\0\0\0\x01\x02",
            ),
            (
                ImplicitVrLittleEndian,
                0x0000_0002,
                Vr::UI,
                b"1.2",
                b"\x00\x00\x02\x00\x04\0\0\x001.2\0",
            ),
            (
                ExplicitVrBigEndian,
                0x0054_0081,
                Vr::US,
                &[0x01, 0x02],
                b"\x00\x54\x00\x81US\x00\x02\x01\x02",
            ),
        ];
        for (enc, tag, vr, value, want) in cases {
            assert_eq!(one(enc, tag, vr, value), want, "{enc:?} {vr:?}");
        }
    }

    /// Issue 11: OD, OF, OL, OV, SV, UC, UR and UV have two reserved bytes and a 32-bit length
    /// in explicit VR (PS3.5 §7.1.2); the writers wrote a 16-bit length for them.
    #[test]
    fn od_of_ol_ov_sv_uc_ur_uv_get_a_4_byte_length() {
        for name in ["OD", "OF", "OL", "OV", "SV", "UC", "UR", "UV"] {
            let vr = Vr::by_name(name).unwrap();
            let d = one(ExplicitVrLittleEndian, 0x0008_0119, vr, &[b'x'; 8]);
            assert_eq!(
                &d[4..12],
                [name.as_bytes(), &[0, 0, 8, 0, 0, 0]].concat(),
                "{name}"
            );
            assert_eq!(d.len(), 12 + 8);
        }
    }

    /// PS3.5 §6.2.2 (CP-1066): a value too long for a 16-bit length is written as UN.
    #[test]
    fn a_value_too_long_for_a_16_bit_length_is_written_as_un() {
        let v = vec![b'1'; 70_000];
        let d = one(ExplicitVrLittleEndian, 0x3006_0050, Vr::DS, &v);
        assert_eq!(&d[4..12], b"UN\0\0\x70\x11\x01\x00");
        assert_eq!(d.len(), 12 + 70_000);
        let d = one(ImplicitVrLittleEndian, 0x3006_0050, Vr::DS, &v);
        assert_eq!(&d[4..8], 70_000u32.to_le_bytes());
    }

    /// Issue 11 (regression): the synthetic instances' element writer (`synth::element`) wrote
    /// a 16-bit length for every VR but OB, OW, SQ, UN and UT, so an element of VR UC or UR
    /// came out in a form no reader takes: the routing scan read value bytes as the length and
    /// refused the data set (with other values it would misread the Patient ID after it).
    #[test]
    fn uc_and_ur_elements_before_the_patient_id_keep_the_routing_scan_on_the_patient_id() {
        use crate::dicom::{scan, tags};
        let mut d = Vec::new();
        let e = ExplicitVrLittleEndian;
        put(&mut d, e, tags::SOP_INSTANCE_UID, Vr::UI, b"1.2.3");
        put(&mut d, e, 0x0008_0119, Vr::UC, b"A long code value"); // Long Code Value
        put(&mut d, e, 0x0008_0120, Vr::UR, b"urn:oid:1.2.3"); // URN Code Value
        put(&mut d, e, tags::PATIENT_ID, Vr::LO, b"PAT1");
        let s = scan::scan(&d, e, &[tags::PATIENT_ID]).unwrap();
        assert_eq!(s.text(tags::PATIENT_ID), Some("PAT1"));
    }
}
