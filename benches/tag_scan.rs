//! The bounded top-level tag scan on real data sets: pydicom's CT_small as DCMTK's storescu sent
//! it (reassembled from the captured P-DATA-TF PDUs in tests/vectors), and a 512 x 512 x 16-bit CT
//! slice whose pixel data the scan must skip in one hop.
//! Run: cargo bench --bench tag_scan
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dicomgate::dicom::transfer_syntax::DatasetEncoding;
use dicomgate::dicom::{scan::scan, tags};
use dicomgate::ul::{self, Pdu};

fn captured_ct() -> (Vec<u8>, DatasetEncoding) {
    let mut ds = Vec::new();
    for i in 2..=4 {
        let b = std::fs::read(format!(
            "{}/tests/vectors/dcmtk_p_data_tf_{i}.bin",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let Pdu::PDataTf(p) = ul::decode(&b).unwrap() else {
            panic!()
        };
        for v in p.pdvs() {
            ds.extend_from_slice(v.data);
        }
    }
    for enc in [
        DatasetEncoding::ExplicitVrLittleEndian,
        DatasetEncoding::ImplicitVrLittleEndian,
    ] {
        if scan(&ds, enc, tags::ROUTING).is_ok_and(|s| s.uid(tags::SOP_INSTANCE_UID).is_some()) {
            return (ds, enc);
        }
    }
    panic!("captured data set does not scan")
}

fn ct_512(header: &[u8]) -> Vec<u8> {
    // The captured CT's elements before its pixel data, then 512 x 512 x 2 bytes of pixels.
    let mut d = header.to_vec();
    d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    d.extend_from_slice(&(512u32 * 512 * 2).to_le_bytes());
    d.resize(d.len() + 512 * 512 * 2, 0x11);
    d
}

fn bench(c: &mut Criterion) {
    let (ds, enc) = captured_ct();
    let mut g = c.benchmark_group("tag_scan");
    g.throughput(Throughput::Bytes(ds.len() as u64));
    g.bench_function("ct_small_routing_tags", |b| {
        b.iter(|| black_box(scan(black_box(&ds), enc, tags::ROUTING).unwrap()))
    });
    if enc == DatasetEncoding::ExplicitVrLittleEndian {
        // Header = everything before (7FE0,0010) in the captured data set.
        let cut = ds
            .windows(4)
            .position(|w| w == [0xE0, 0x7F, 0x10, 0x00])
            .unwrap();
        let big = ct_512(&ds[..cut]);
        g.throughput(Throughput::Bytes(big.len() as u64));
        g.bench_function("ct_512x512_routing_tags", |b| {
            b.iter(|| black_box(scan(black_box(&big), enc, tags::ROUTING).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
