//! Our bounded routing scan against dicom-rs's full reader, on inputs where both may safely and
//! fairly read (see `dicomgate::fuzzing::tag_scan_differential`): the values must agree.
#![no_main]
use dicom_core::Tag;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dicomgate::fuzzing::tag_scan_differential(data, |d, tags| {
        let ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj = InMemDicomObject::read_dataset_with_ts(d, &ts).ok()?;
        Some(
            tags.iter()
                .map(|&t| {
                    obj.element(Tag((t >> 16) as u16, t as u16))
                        .ok()
                        .and_then(|e| e.value().to_str().ok().map(|s| s.into_owned()))
                })
                .collect(),
        )
    });
});
