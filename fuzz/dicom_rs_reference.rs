//! The reference side of `tag_scan_differential`: dicom-rs's full reader on an explicit VR
//! little endian data set, giving each asked tag's value as text (`None` when absent or not
//! text). Shared by `fuzz/fuzz_targets/tag_scan_differential.rs` and
//! `tests/tag_scan_differential.rs` (both include this file), so the fuzzer and the test compare
//! against the same reference.

use dicom_core::Tag;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

/// `None` when dicom-rs cannot read the data set at all.
pub fn dicom_rs(d: &[u8], tags: &[u32]) -> Option<Vec<Option<String>>> {
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
}
