//! The node against pynetdicom sending compressed and unusual transfer syntaxes from pydicom's
//! test files, each proposed in its own transfer syntax and stored byte-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dicomgate::dicom::part10;

/// pydicom test files: JPEG baseline/extended, JPEG-LS, JPEG 2000, RLE, deflated, big endian,
/// RT dose, SR.
const FILES: &[&str] = &[
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "image_dfl.dcm",
    "MR_small_bigendian.dcm",
    "rtdose.dcm",
    "rtdose_rle.dcm",
    "reportsi.dcm",
    "SC_rgb_rle.dcm",
];

fn data_set(path: &std::path::Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let p = part10::parse(&bytes).unwrap();
    bytes[p.data_set_offset..].to_vec()
}

#[test]
fn pynetdicom_stores_every_transfer_syntax_byte_exact() {
    let node = Node::start("");
    let t = pydicom_test_files();
    let work = tempfile::tempdir().unwrap();
    let mut files: Vec<std::path::PathBuf> = FILES.iter().map(|f| t.join(f)).collect();
    // HTJ2K and HEVC, which pydicom ships no file for: relabelled JPEG 2000 / JPEG files (the node
    // never decodes pixel data, so only negotiation and storage are exercised, as with real ones).
    for (src, ts, uid) in [
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.201", "1.2.3.4.201"),
        ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.107", "1.2.3.4.107"),
    ] {
        let dst = work.path().join(format!("{uid}.dcm"));
        run_py(
            "relabel.py",
            &[
                t.join(src).to_str().unwrap(),
                dst.to_str().unwrap(),
                ts,
                uid,
            ],
        );
        files.push(dst);
    }
    let args: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    let mut all = vec![node.port(), "DICOMGATE".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run_py("send.py", &refs);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), files.len(), "{out}");
    for l in &lines {
        assert!(
            l.starts_with("0 "),
            "C-STORE not successful: {l}\n{}",
            node.log()
        );
    }
    // Some pydicom files share a SOP Instance UID (JPEG-lossy and JPGExtended; MR_small in three
    // encodings): the last one sent replaces the others, and is the one to compare.
    let mut last = std::collections::BTreeMap::new();
    for f in &files {
        let info = run_py("sop_uid.py", &[f.to_str().unwrap()]);
        let mut w = info.split_whitespace();
        let (uid, ts) = (w.next().unwrap().to_string(), w.next().unwrap().to_string());
        last.insert(uid, (f.clone(), ts));
    }
    assert_eq!(node.stored().len(), last.len());
    for (uid, (f, ts)) in &last {
        let stored =
            stored_instance(&node, uid).unwrap_or_else(|| panic!("{} not stored", f.display()));
        // pynetdicom sends a file's bytes as read, except where pydicom re-encodes it: it
        // re-deflates deflated data and gives explicit UN elements their known VR. Those two are
        // compared element by element only; tests/own_scu.rs checks them byte-exact through our
        // own SCU, which sends raw bytes.
        let reencoded = ["image_dfl.dcm", "rtdose_rle.dcm"];
        if !reencoded.iter().any(|r| f.ends_with(r)) {
            assert_eq!(
                data_set(&stored),
                data_set(f),
                "{} not byte-exact",
                f.display()
            );
        }
        run_py(
            "compare.py",
            &[f.to_str().unwrap(), stored.to_str().unwrap(), ts],
        );
    }
}

#[test]
fn pynetdicom_with_a_wrong_called_ae_is_rejected() {
    let node = Node::start("");
    let t = pydicom_test_files();
    let out = run_py(
        "send.py",
        &[
            &node.port(),
            "SOMEONE-ELSE",
            t.join("CT_small.dcm").to_str().unwrap(),
        ],
    );
    // Result 1 (permanent), source 1 (service user), reason 7 (called AE title not recognized).
    assert_eq!(out.trim(), "REJECTED 1 1 7");
    assert!(node.stored().is_empty());
}
