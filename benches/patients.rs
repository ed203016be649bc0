//! The patient map (issue 3): insert throughput from 1, 2 and 4 threads; insert cost against
//! the size of the series it joins (5 vs 5,000 instances); insert cost against the size of the
//! patient it joins (1,000 series, 5,000 instances; issue 11 (3)) and the cost of the view that
//! then reads it; one checker scan of 10,000 patients (view + sufficiency rules, a pin per
//! patient as the checker takes) while a writer keeps inserting.
//!
//! `cargo bench --bench patients`
//!
//! Instruction counts (stable on a noisy machine): with `DICOMGATE_CALLGRIND` set to
//! `insert:1000_series` (or `view:`, or `:5000_instances`) the binary runs a fixed piece of work
//! instead of criterion (1,000 inserts into, or 1,000 views of, that patient), to run under
//! `valgrind --tool=callgrind --toggle-collect='*callgrind_measured*'` (benches/README.md has the
//! command).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use dicomgate::patients::{InstanceRecord, MapGuard, Patient, PatientMap};
use dicomgate::pipeline::rules::Rules;

fn record(n: usize, series: &str) -> InstanceRecord {
    InstanceRecord {
        sop_instance_uid: format!("1.2.826.0.1.3680043.10.99.{n}").into(),
        study_uid: Some("1.2.826.0.1.3680043.10.99".into()),
        series_uid: Some(series.into()),
        study_date: Some("20260101".into()),
        path: PathBuf::from(format!("/data/patients/x/{n}.dcm")),
        bytes: 500_000,
        inputs: 1,
        instance_number: n as u32,
        images_in_acquisition: 0,
        number_of_slices: 0,
    }
}

fn insert_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_insert");
    let per_thread = 10_000;
    for threads in [1usize, 2, 4] {
        g.throughput(Throughput::Elements((threads * per_thread) as u64));
        g.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let map = Arc::new(PatientMap::new(4096));
                        let barrier = Arc::new(Barrier::new(threads + 1));
                        let handles: Vec<_> = (0..threads)
                            .map(|t| {
                                let map = map.clone();
                                let barrier = barrier.clone();
                                // 200 patients per thread, a series each, interleaved.
                                let recs: Vec<_> = (0..per_thread)
                                    .map(|i| (format!("P{t}-{}", i % 200), record(i, "1.2.3")))
                                    .collect();
                                std::thread::spawn(move || {
                                    barrier.wait();
                                    let g = map.pin();
                                    for (k, r) in recs {
                                        black_box(map.insert(k.as_bytes(), r, 0, &g));
                                    }
                                })
                            })
                            .collect();
                        barrier.wait();
                        let t0 = Instant::now();
                        for h in handles {
                            h.join().unwrap();
                        }
                        total += t0.elapsed();
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

fn insert_vs_series_size(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert_vs_series_size");
    g.throughput(Throughput::Elements(1));
    for size in [5usize, 5_000] {
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_custom(|iters| {
                // Chunks of 100 timed inserts, each after refilling a patient to `size`.
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let n = left.min(100);
                    left -= n;
                    let map = PatientMap::new(64);
                    let guard = map.pin();
                    for i in 0..size {
                        map.insert(b"P", record(i, "1.2.3"), 0, &guard);
                    }
                    let recs: Vec<_> = (0..n).map(|i| record(size + i, "1.2.3")).collect();
                    total += timed_inserts(&map, recs, &guard);
                }
                total
            })
        });
    }
    g.finish();
}

/// The two patients of issue 11 (3), as (name, instances, series): 1,000 series of one instance
/// each, and 5,000 instances in 5 series. Every record a bench adds joins an existing series.
const PATIENTS: [(&str, usize, usize); 2] =
    [("1000_series", 1_000, 1_000), ("5000_instances", 5_000, 5)];

fn series_uid(s: usize) -> String {
    format!("1.2.826.0.1.3680043.10.99.1.{s}")
}

/// Fills a fresh patient "P" of `map` with `instances` records spread over `series` series
/// (numbered from `first`), and views it once (so a reader's summary covers them).
fn fill(map: &PatientMap, instances: usize, series: usize, first: usize) {
    let g = map.pin();
    for i in 0..instances {
        map.insert(b"P", record(first + i, &series_uid(i % series)), 0, &g);
    }
    let p = map.get(b"P", &g).unwrap();
    black_box(p.view(&g));
}

fn insert_vs_patient_size(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert_into_patient");
    g.throughput(Throughput::Elements(1));
    for (name, instances, series) in PATIENTS {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Rounds of at most `instances` timed inserts, each into a patient refilled to
                // its size (claimed and filled again, untimed), each joining an existing series.
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                let map = PatientMap::new(64);
                let mut n = 0;
                while left > 0 {
                    let round = left.min(instances);
                    left -= round;
                    {
                        let g = map.pin();
                        if let Some(p) = map.get(b"P", &g) {
                            black_box(p.claim(p.view(&g).batch_seq, &g));
                        }
                    }
                    fill(&map, instances, series, n);
                    n += instances;
                    let recs: Vec<_> = (0..round)
                        .map(|i| record(n + i, &series_uid(i % series)))
                        .collect();
                    n += round;
                    total += timed_inserts(&map, recs, &map.pin());
                }
                total
            })
        });
    }
    g.finish();
}

/// What a reader (the checker, the status page) pays for one view of those patients: with no
/// instance since its last view, and with one.
fn view_vs_patient_size(c: &mut Criterion) {
    let mut g = c.benchmark_group("view_of_patient");
    g.throughput(Throughput::Elements(1));
    for (name, instances, series) in PATIENTS {
        for new in [0usize, 1] {
            let id = format!("{name}/{new}_new");
            g.bench_function(&id, |b| {
                let map = PatientMap::new(64);
                fill(&map, instances, series, 0);
                let mut n = instances;
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let guard = map.pin();
                    let p = map.get(b"P", &guard).unwrap();
                    for _ in 0..iters {
                        for _ in 0..new {
                            map.insert(b"P", record(n, &series_uid(n % series)), 0, &guard);
                            n += 1;
                        }
                        let t0 = Instant::now();
                        black_box(p.view(&guard));
                        total += t0.elapsed();
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

/// The fixed work the callgrind runs measure (`DICOMGATE_CALLGRIND=WHAT:PATIENT`, WHAT `insert`
/// or `view`, PATIENT a name in `PATIENTS`): 1,000 inserts into the patient, or 1,000 views of it,
/// each after one insert (the insert not measured).
fn callgrind(what: &str) {
    let (what, patient) = what.split_once(':').unwrap_or((what, ""));
    for (_, instances, series) in PATIENTS.into_iter().filter(|p| p.0 == patient) {
        let map = PatientMap::new(64);
        fill(&map, instances, series, 0);
        let recs: Vec<_> = (0..1_000)
            .map(|i| record(instances + i, &series_uid(i % series)))
            .collect();
        let guard = map.pin();
        let p = map.get(b"P", &guard).unwrap();
        match what {
            "insert" => callgrind_measured_inserts(&map, recs, &guard),
            _ => {
                for r in recs {
                    map.insert(b"P", r, 0, &guard);
                    callgrind_measured_view(&p, &guard);
                }
            }
        }
    }
}

/// How long inserting `recs` into patient "P" takes.
fn timed_inserts(map: &PatientMap, recs: Vec<InstanceRecord>, guard: &MapGuard) -> Duration {
    let t0 = Instant::now();
    callgrind_measured_inserts(map, recs, guard);
    t0.elapsed()
}

#[inline(never)]
fn callgrind_measured_inserts(map: &PatientMap, recs: Vec<InstanceRecord>, guard: &MapGuard) {
    for r in recs {
        black_box(map.insert(b"P", r, 0, guard));
    }
}

#[inline(never)]
fn callgrind_measured_view(p: &Patient, guard: &MapGuard) {
    black_box(p.view(guard));
}

fn checker_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("checker_scan");
    let patients = 10_000;
    let map = Arc::new(PatientMap::new(4096));
    {
        let guard = map.pin();
        for p in 0..patients {
            for i in 0..3 {
                map.insert(
                    format!("P{p}").as_bytes(),
                    record(p * 3 + i, "1.2.3"),
                    0,
                    &guard,
                );
            }
        }
    }
    let rules = Rules::compile(&[]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (map, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let g = map.pin();
                map.insert(
                    format!("P{}", n % patients).as_bytes(),
                    record(n, "1.2.4"),
                    0,
                    &g,
                );
                n += 1;
            }
            n - 1_000_000
        })
    };
    g.throughput(Throughput::Elements(patients as u64));
    g.bench_function("10000_patients_while_inserting", |b| {
        // As the checker sweeps: one pin per patient (`for_each_patient`).
        b.iter(|| {
            let mut sufficient = 0;
            map.for_each_patient(|p, g| {
                let v = p.view(g);
                sufficient += rules.sufficient(&v.snapshot).is_ok() as usize;
            });
            black_box(sufficient)
        })
    });
    stop.store(true, Ordering::Relaxed);
    let inserted = writer.join().unwrap();
    eprintln!("writer inserted {inserted} instances during the scans");
    g.finish();
}

criterion_group!(
    benches,
    insert_threads,
    insert_vs_series_size,
    insert_vs_patient_size,
    view_vs_patient_size,
    checker_scan
);

fn main() {
    if let Ok(what) = std::env::var("DICOMGATE_CALLGRIND") {
        callgrind(&what);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
