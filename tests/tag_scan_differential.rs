//! The differential body of `fuzz/fuzz_targets/tag_scan_differential.rs` (our routing scan vs
//! dicom-rs's reader) over its seeds, plus proof that it compares and can fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../fuzz/dicom_rs_reference.rs"]
mod dicom_rs_reference;
use dicom_rs_reference::dicom_rs;

fn seeds() -> Vec<Vec<u8>> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/tag_scan_differential"
    );
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn seeds_agree_with_dicom_rs() {
    for s in seeds() {
        // Nine routing values are text in these seeds; all must have been compared.
        assert_eq!(dicomgate::fuzzing::tag_scan_differential(&s, dicom_rs), 9);
    }
}

#[test]
fn a_disagreement_fails() {
    let s = &seeds()[0];
    let lying = |d: &[u8], t: &[u32]| {
        let mut v = dicom_rs(d, t)?;
        v[0] = Some("something else".into());
        Some(v)
    };
    let r = std::panic::catch_unwind(|| dicomgate::fuzzing::tag_scan_differential(s, lying));
    assert!(r.is_err());
}

#[test]
fn unsafe_inputs_never_reach_the_reference() {
    // A 1 GiB declared length (the dicom-rs allocation hazard) and a sequence: not compared.
    let mut big = seeds()[0].clone();
    big.extend_from_slice(&[0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0, 0, 0, 0x40]);
    let mut seq = seeds()[0].clone();
    seq.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0, 0, 0, 0]);
    for d in [big, seq] {
        let n = dicomgate::fuzzing::tag_scan_differential(&d, |_, _| {
            panic!("the reference must not see this input")
        });
        assert_eq!(n, 0);
    }
}

/// The differential fuzzer's first finding (not in our scan: in the reference). An UL element
/// with a 26-byte value desynchronises dicom-rs 0.10.1, which then reads a length from value
/// bytes and allocates 775 MB for this 294-byte input. Our scan reads it within bounds; the
/// differential must keep such inputs away from the reference.
#[test]
fn odd_binary_length_never_reaches_the_reference() {
    let d = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/diff_ul_value_26_bytes.bin"
    ))
    .unwrap();
    assert!(dicomgate::dicom::scan::scan(
        &d,
        dicomgate::dicom::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian,
        dicomgate::dicom::tags::ROUTING
    )
    .is_ok());
    let n = dicomgate::fuzzing::tag_scan_differential(&d, |_, _| {
        panic!("the reference must not see this input")
    });
    assert_eq!(n, 0);
}
