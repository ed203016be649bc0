//! End-to-end store on loopback (issue 5): our requestor sends C-STOREs to a node started in
//! this process, one association, one at a time; each iteration is a whole store: request sent,
//! data set framed and parsed, file written (and flushed, for `fsync`), response back.
//!
//! - `store/tiny_{none,fsync}`: a 16×16×16-bit CT (~800 B data set): the per-instance cost.
//! - `store/ct_512x512_{none,fsync}`: a 512×512×16-bit CT slice (512 KiB): the per-byte cost.
//!
//! The data directory is under $BENCH_DIR if set (use a journaled file system: see
//! perf/RESULTS.md), else the system's temporary folder. `cargo bench --bench loopback`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dicomgate::bench::synthetic::{ct_data_set, ct_header, CtInstance};
use dicomgate::config::Config;
use dicomgate::dicom::sop_class::CT_IMAGE_STORAGE;
use dicomgate::dicom::transfer_syntax::EXPLICIT_VR_LITTLE_ENDIAN;
use dicomgate::net::scu::{Client, Proposal, ScuOptions};
use dicomgate::storage::Durability;

fn instance(sop: &str) -> CtInstance<'_> {
    CtInstance {
        patient_id: "BENCH",
        study_uid: "1.2.826.0.1.3680043.10.7",
        series_uid: "1.2.826.0.1.3680043.10.7.1",
        sop_instance_uid: sop,
        instance_number: 1,
        frames: 1,
    }
}

fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    let base = std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    for (name, pixels) in [("tiny", 16 * 16 * 2), ("ct_512x512", 512 * 512 * 2)] {
        for (dname, durability) in [("none", Durability::None), ("fsync", Durability::Fsync)] {
            let dir = tempfile::tempdir_in(&base).unwrap();
            let mut config = Config::default();
            config.node.listen = Some("127.0.0.1:0".parse().unwrap());
            config.node.data_dir = dir.path().to_path_buf();
            config.node.reactors = 1;
            config.http.listen = String::new();
            config.storage.durability = durability;
            // Ingest only: no trigger fires.
            config.trigger.on_association_close = false;
            config.trigger.quiet_seconds = 0.0;
            let node = dicomgate::node::start(config).unwrap();
            let opts = ScuOptions {
                timeout: Duration::from_secs(30),
                ..ScuOptions::default()
            };
            let proposal = Proposal {
                abstract_syntax: CT_IMAGE_STORAGE.into(),
                transfer_syntaxes: vec![EXPLICIT_VR_LITTLE_ENDIAN.into()],
            };
            let mut client = Client::connect(node.local_addr.unwrap(), &opts, &[proposal]).unwrap();
            let px: Vec<u8> = (0..pixels).map(|i| (i * 7 % 251) as u8).collect();
            let mut n = 0u64;
            // Built once; each store rewrites only the header (same-length UIDs).
            let mut ds = ct_data_set(&instance("1.2.826.0.1.3680043.10.7.1.1000000000"), &px);
            g.throughput(Throughput::Bytes(ds.len() as u64));
            g.bench_function(format!("{name}_{dname}"), |b| {
                b.iter(|| {
                    n += 1;
                    let sop = format!("1.2.826.0.1.3680043.10.7.1.{}", 1_000_000_000 + n);
                    let header = ct_header(&instance(&sop), px.len());
                    ds[..header.len()].copy_from_slice(&header);
                    let (status, _) = client
                        .store(CT_IMAGE_STORAGE, &sop, EXPLICIT_VR_LITTLE_ENDIAN, &ds)
                        .unwrap();
                    assert_eq!(status, 0);
                })
            });
            client.release().unwrap();
            node.shutdown();
        }
    }
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
