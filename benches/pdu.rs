//! PDU layer benches on PDUs captured from DCMTK (tests/vectors): deframe + decode of an
//! A-ASSOCIATE-RQ and of a 16 KiB P-DATA-TF with PDV iteration, and encoding an A-ASSOCIATE-AC.
//! Run: cargo bench --bench pdu
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dicomgate::ul::{self, Pdu};

fn vector(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/vectors/{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("pdu_decode");
    for name in [
        "dcmtk_associate_rq",
        "pynetdicom_associate_rq",
        "dcmtk_p_data_tf_2",
    ] {
        let b = vector(name);
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let Ok(ul::Status::Complete(n)) = ul::deframe(black_box(&b), u32::MAX) else {
                    panic!()
                };
                let pdu = ul::decode(&b[..n]).unwrap();
                if let Pdu::PDataTf(p) = &pdu {
                    let total: usize = p.pdvs().map(|v| v.data.len()).sum();
                    black_box(total);
                }
                black_box(pdu);
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let rq = vector("dcmtk_associate_rq");
    let Pdu::AssociateRq(rq) = ul::decode(&rq).unwrap() else {
        panic!()
    };
    let cfg = dicomgate::config::Config::default();
    let policy = cfg.acceptor_policy();
    let mut policy = policy;
    policy.accept_any_called_ae = true;
    let mut g = c.benchmark_group("negotiate");
    g.throughput(Throughput::Elements(1));
    let now = std::time::Instant::now();
    g.bench_function("dcmtk_associate_rq_to_ac", |b| {
        b.iter(|| {
            black_box(dicomgate::assoc::negotiate_from(
                black_box(&rq),
                &policy,
                None,
                now,
                &true,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
