//! Synthetic CT instances for the load generator (`dicomgate bench`, `dicomgate-loadgen`), the
//! benchmarks and the tests: explicit VR little endian data sets (PS3.5 §7.1.2) made with the
//! one element writer ([`crate::dicom::element`]). Owns nothing shared; never used on a path a
//! peer's bytes reach.

use crate::dicom::element::{put, put_header};
use crate::dicom::sop_class::CT_IMAGE_STORAGE;
use crate::dicom::tags;
use crate::dicom::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian as EXPLICIT;
use crate::dicom::vr::Vr;

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
/// `pixel_bytes` is at most 4 GiB (a u32 length, PS3.5 §7.1.1).
pub fn ct_header(i: &CtInstance<'_>, pixel_bytes: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(512);
    put(
        &mut d,
        EXPLICIT,
        tags::SOP_CLASS_UID,
        Vr::UI,
        CT_IMAGE_STORAGE.as_bytes(),
    );
    let sop = i.sop_instance_uid.as_bytes();
    put(&mut d, EXPLICIT, tags::SOP_INSTANCE_UID, Vr::UI, sop);
    put(&mut d, EXPLICIT, tags::STUDY_DATE, Vr::DA, b"20260101");
    put(&mut d, EXPLICIT, tags::MODALITY, Vr::CS, b"CT");
    put(&mut d, EXPLICIT, tags::PATIENT_NAME, Vr::PN, b"Load^Test");
    put(
        &mut d,
        EXPLICIT,
        tags::PATIENT_ID,
        Vr::LO,
        i.patient_id.as_bytes(),
    );
    put(
        &mut d,
        EXPLICIT,
        tags::STUDY_INSTANCE_UID,
        Vr::UI,
        i.study_uid.as_bytes(),
    );
    put(
        &mut d,
        EXPLICIT,
        tags::SERIES_INSTANCE_UID,
        Vr::UI,
        i.series_uid.as_bytes(),
    );
    let number = i.instance_number.to_string();
    put(
        &mut d,
        EXPLICIT,
        tags::INSTANCE_NUMBER,
        Vr::IS,
        number.as_bytes(),
    );
    if i.frames > 1 {
        let frames = i.frames.to_string();
        put(
            &mut d,
            EXPLICIT,
            tags::NUMBER_OF_FRAMES,
            Vr::IS,
            frames.as_bytes(),
        );
    }
    // Pixel Data header; the values follow (PS3.5 §7.1.2, 32-bit length for OW).
    let len = u32::try_from(pixel_bytes + pixel_bytes % 2).unwrap_or(u32::MAX - 1);
    put_header(&mut d, EXPLICIT, tags::PIXEL_DATA, Vr::OW, len);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_data_set_is_read_back_by_the_routing_scan() {
        use crate::dicom::scan;
        use crate::dicom::transfer_syntax::{by_uid, EXPLICIT_VR_LITTLE_ENDIAN};
        let i = CtInstance {
            patient_id: "P1",
            study_uid: "1.2.3",
            series_uid: "1.2.3.4",
            sop_instance_uid: "1.2.3.4.5",
            instance_number: 7,
            frames: 2,
        };
        let ds = ct_data_set(&i, &[0; 8]);
        let enc = by_uid(EXPLICIT_VR_LITTLE_ENDIAN.as_bytes())
            .unwrap()
            .encoding;
        let s = scan::scan(
            &ds,
            enc,
            &[
                tags::SOP_INSTANCE_UID,
                tags::PATIENT_ID,
                tags::SERIES_INSTANCE_UID,
                tags::NUMBER_OF_FRAMES,
            ],
        )
        .unwrap();
        assert_eq!(s.uid(tags::SOP_INSTANCE_UID), Some(&b"1.2.3.4.5"[..]));
        assert_eq!(s.text(tags::PATIENT_ID), Some("P1"));
        assert_eq!(s.uid(tags::SERIES_INSTANCE_UID), Some(&b"1.2.3.4"[..]));
        assert_eq!(s.text(tags::NUMBER_OF_FRAMES), Some("2"));
        assert!(ds.ends_with(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]));
    }
}
