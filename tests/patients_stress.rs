//! Stress test of the patient map (design rule 7): writer threads insert unique instances into
//! a few shared patients while a checker views snapshots, claims batches and retires empty
//! patients, and a second reader (as the status page) views them all the while, so that views
//! fold records while claims move them out. At the end every instance was claimed exactly once,
//! and every snapshot the checker saw summarised a prefix of the batch it claimed. The checker
//! drops what it claims at once, so a record a reader still read after its claimer took it
//! would be a use of freed memory (the ASan run, `.ci/run`, reports it).
//!
//! Short form in `cargo test`; the long form runs `DICOMGATE_STRESS_SECONDS` seconds:
//! `DICOMGATE_STRESS_SECONDS=600 cargo test --release --test patients_stress`.

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicomgate::patients::{InstanceRecord, Patient, PatientMap, Snapshot};

fn rec(writer: usize, n: usize, series: usize) -> InstanceRecord {
    InstanceRecord {
        sop_instance_uid: format!("{writer}.{n}").into(),
        study_uid: Some("1.2".into()),
        series_uid: Some(format!("1.2.{series}").into()),
        study_date: None,
        path: PathBuf::new(),
        bytes: 1,
        inputs: 1,
        instance_number: n as u32,
        images_in_acquisition: 0,
        number_of_slices: 0,
    }
}

#[test]
fn no_instance_lost_or_counted_twice() {
    let long: u64 = std::env::var("DICOMGATE_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let writers = 4;
    let per_writer = if long > 0 { usize::MAX } else { 20_000 };
    // The short form stops at its count; the deadline only bounds it on a very slow machine.
    let deadline = Instant::now() + Duration::from_secs(if long > 0 { long } else { 120 });
    let patients = 8;
    let map = Arc::new(PatientMap::new(4)); // few buckets: patients share them
    let stop = Arc::new(AtomicBool::new(false));

    let mut handles = Vec::new();
    for w in 0..writers {
        let map = map.clone();
        handles.push(std::thread::spawn(move || {
            let mut n = 0;
            while n < per_writer && Instant::now() < deadline {
                let g = map.pin();
                let key = format!("P{}", (n * 7 + w) % patients);
                let p = map.insert(key.as_bytes(), rec(w, n, n % 3), n as u64, &g);
                if n % 64 == 0 {
                    p.association_opened();
                    p.association_closed();
                    // Writers that never yield outrun the readers' folds (a view after
                    // thousands of pushes) and the run sees a handful of claims.
                    std::thread::yield_now();
                }
                n += 1;
            }
            n
        }));
    }
    let reader = {
        let (map, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            // Per patient key: the patient (a retired one is replaced under the same key, and
            // its batches are numbered afresh), the batch number and instances of its last view.
            let mut last: HashMap<Vec<u8>, (Arc<Patient>, u64, u32)> = HashMap::new();
            let mut views = 0u64;
            while !stop.load(Ordering::Acquire) {
                map.for_each_patient(|p, g| {
                    let v = p.view(g);
                    assert_consistent(&v.snapshot);
                    if let Some((q, seq, instances)) = last.get(p.key()) {
                        if Arc::ptr_eq(p, q) && *seq == v.batch_seq {
                            assert!(
                                v.snapshot.instances >= *instances,
                                "a later view of batch {seq} counts fewer instances"
                            );
                        }
                    }
                    last.insert(
                        p.key().to_vec(),
                        (p.clone(), v.batch_seq, v.snapshot.instances),
                    );
                    views += 1;
                });
            }
            views
        })
    };
    let checker = {
        let map = map.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut claimed: Vec<Arc<str>> = Vec::new();
            let mut claims = 0u64;
            let mut retired = 0u64;
            while !stop.load(Ordering::Acquire) {
                let g = map.pin();
                for p in map.patients(&g) {
                    let v = p.view(&g);
                    if v.snapshot.instances >= 50 {
                        if let Some(c) = p.claim(v.batch_seq, &g) {
                            // The snapshot seen before the claim summarises exactly a prefix of
                            // the batch, in push order (the records come oldest first). It was
                            // a subset while writers published their own snapshot updates in
                            // any order, and before that `records >= snapshot.instances`.
                            assert_summarises_a_prefix(&v.snapshot, &c.records);
                            claims += 1;
                            claimed.extend(take_uids(c.records));
                        }
                    } else if v.snapshot.instances == 0 && map.remove_if_empty(&p, &g) {
                        retired += 1;
                    }
                }
            }
            // Drain what is left.
            let g = map.pin();
            for p in map.patients(&g) {
                let v = p.view(&g);
                if let Some(c) = p.claim(v.batch_seq, &g) {
                    // Writers have stopped: the snapshot summarises exactly the batch.
                    assert_eq!(Snapshot::of(&c.records), *v.snapshot, "quiescent snapshot");
                    claimed.extend(take_uids(c.records));
                }
            }
            (claimed, claims, retired)
        })
    };
    let inserted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    stop.store(true, Ordering::Release);
    let (claimed, claims, retired) = checker.join().unwrap();
    let views = reader.join().unwrap();
    let unique: HashSet<_> = claimed.iter().cloned().collect();
    assert_eq!(unique.len(), claimed.len(), "an instance was claimed twice");
    assert_eq!(claimed.len(), inserted, "an instance was lost");
    eprintln!(
        "inserted {inserted}, claims {claims}, retired patients {retired}, reader's views {views}"
    );
    assert!(claims > 0 && views > 0);
}

/// The claimed records' SOP Instance UIDs, copied; the records (every other string of theirs)
/// are dropped here, at once.
fn take_uids(records: Vec<InstanceRecord>) -> Vec<Arc<str>> {
    records
        .into_iter()
        .map(|r| Arc::from(&*r.sop_instance_uid))
        .collect()
}

/// `seen` is the summary of the first `seen.instances` records of the claim.
fn assert_summarises_a_prefix(seen: &Snapshot, records: &[InstanceRecord]) {
    let k = seen.instances as usize;
    assert!(
        k <= records.len(),
        "{k} instances seen, {} claimed",
        records.len()
    );
    assert_eq!(*seen, Snapshot::of(&records[..k]), "no prefix of the claim");
}

/// What any view must be, whatever it raced with: its series add up to its total, and every
/// record is 1 byte.
fn assert_consistent(seen: &Snapshot) {
    assert_eq!(
        seen.series.iter().map(|s| s.instances).sum::<u32>(),
        seen.instances,
        "series counts add up to the total"
    );
    assert_eq!(seen.bytes, seen.instances as u64, "every record is 1 byte");
}
