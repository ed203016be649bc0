//! Our bounded routing scan against dicom-rs's full reader, on inputs where both may safely and
//! fairly read (see `dicomgate::fuzzing::tag_scan_differential`): the values must agree.
#![no_main]

#[path = "../dicom_rs_reference.rs"]
mod dicom_rs_reference;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dicomgate::fuzzing::tag_scan_differential(data, dicom_rs_reference::dicom_rs);
});
