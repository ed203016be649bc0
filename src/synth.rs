//! Synthetic instances for the load generator, the benchmarks and the tests: explicit VR little
//! endian data sets built element by element (PS3.5 §7.1.2). Owns nothing shared; never used on
//! a path a peer's bytes reach.

/// CT Image Storage (PS3.4 B.5).
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Explicit VR Little Endian (PS3.5 A.2).
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

/// Appends one explicit VR little endian element, padded to even length (PS3.5 §7.1.2: UI with
/// NUL, other text with a space). The value must fit the VR's length field.
pub fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
    let pad = value.len() % 2;
    let len = value.len() + pad;
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(len as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(len as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    if pad == 1 {
        out.push(if vr == b"UI" { 0 } else { b' ' });
    }
}

/// Identity of one synthetic CT instance.
#[derive(Debug, Clone)]
pub struct CtInstance<'a> {
    pub patient_id: &'a str,
    pub study_uid: &'a str,
    pub series_uid: &'a str,
    pub sop_instance_uid: &'a str,
    pub instance_number: usize,
    /// Frames in the pixel data (Number of Frames is written when > 1).
    pub frames: usize,
}

/// A CT data set carrying `pixels` as its Pixel Data (OW).
pub fn ct_data_set(i: &CtInstance<'_>, pixels: &[u8]) -> Vec<u8> {
    let mut d = ct_header(i, pixels.len());
    d.reserve_exact(pixels.len() + 1);
    d.extend_from_slice(pixels);
    if pixels.len() % 2 == 1 {
        d.push(0);
    }
    d
}

/// Everything of [`ct_data_set`] before the pixel values: the elements and the Pixel Data
/// element's header. The load generator rewrites only this part between instances.
pub fn ct_header(i: &CtInstance<'_>, pixel_bytes: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(512);
    element(&mut d, 0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.as_bytes());
    element(&mut d, 0x0008, 0x0018, b"UI", i.sop_instance_uid.as_bytes());
    element(&mut d, 0x0008, 0x0020, b"DA", b"20260101");
    element(&mut d, 0x0008, 0x0060, b"CS", b"CT");
    element(&mut d, 0x0010, 0x0010, b"PN", b"Load^Test");
    element(&mut d, 0x0010, 0x0020, b"LO", i.patient_id.as_bytes());
    element(&mut d, 0x0020, 0x000D, b"UI", i.study_uid.as_bytes());
    element(&mut d, 0x0020, 0x000E, b"UI", i.series_uid.as_bytes());
    element(
        &mut d,
        0x0020,
        0x0013,
        b"IS",
        i.instance_number.to_string().as_bytes(),
    );
    if i.frames > 1 {
        element(
            &mut d,
            0x0028,
            0x0008,
            b"IS",
            i.frames.to_string().as_bytes(),
        );
    }
    // Pixel Data header; the values follow (PS3.5 §7.1.2, 32-bit length for OW).
    let len = (pixel_bytes + pixel_bytes % 2) as u32;
    d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    d.extend_from_slice(&len.to_le_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_padded_to_even_length() {
        let mut d = Vec::new();
        element(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3");
        assert_eq!(d, b"\x08\x00\x18\x00UI\x06\x001.2.3\0");
        let mut d = Vec::new();
        element(&mut d, 0x7FE0, 0x0010, b"OW", &[1, 2]);
        assert_eq!(d, b"\xE0\x7F\x10\x00OW\0\0\x02\0\0\0\x01\x02");
    }

    #[test]
    fn ct_data_set_is_read_back_by_the_routing_scan() {
        use crate::assoc::transfer_syntax::by_uid;
        use crate::dimse::{scan, tags};
        let i = CtInstance {
            patient_id: "P1",
            study_uid: "1.2.3",
            series_uid: "1.2.3.4",
            sop_instance_uid: "1.2.3.4.5",
            instance_number: 7,
            frames: 1,
        };
        let ds = ct_data_set(&i, &[0; 8]);
        let enc = by_uid(EXPLICIT_VR_LITTLE_ENDIAN.as_bytes())
            .unwrap()
            .encoding;
        let s = scan::scan(
            &ds,
            enc,
            &[tags::SOP_INSTANCE_UID, tags::SERIES_INSTANCE_UID],
        )
        .unwrap();
        assert_eq!(s.uid(tags::SOP_INSTANCE_UID), Some(&b"1.2.3.4.5"[..]));
        assert_eq!(s.uid(tags::SERIES_INSTANCE_UID), Some(&b"1.2.3.4"[..]));
    }
}
