//! Issue 11 (4), in its own test binary: whether the checker's sweep holds reclamation back
//! is judged by when crossbeam-epoch frees a retired record, and epoch advancement waits for
//! every pinned thread of the process. Among the library's unit tests, which run in parallel
//! threads of one process, any other test's pinned thread that the scheduler left waiting held
//! it back too (it failed in about half of the full runs on a busy 2-core machine, and passed
//! alone). Here it is the only test in its process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use dicomgate::patients::{InstanceRecord, PatientMap};

fn rec(sop: &str, series: &str, inputs: u64) -> InstanceRecord {
    InstanceRecord {
        sop_instance_uid: sop.into(),
        series_uid: Some(series.into()),
        inputs,
        ..InstanceRecord::default()
    }
}

/// Issue 11 (4): the checker held one pin for a whole sweep (claims, rollbacks and
/// snapshots included), so nothing any thread retired during the sweep could be freed
/// before it ended. Here a writer retires a claimed record while a sweep over 1,000
/// patients is under way, then collects once per patient the sweep visits; the record must
/// be freed before the sweep ends. No clock: the writer gets a bounded number of rounds.
#[test]
fn checker_sweep_does_not_hold_back_reclamation() {
    let map = Arc::new(PatientMap::new(64));
    {
        let g = map.pin();
        for i in 0..1000 {
            map.insert(format!("P{i}").as_bytes(), rec("1", "2", 1), 0, &g);
        }
    }
    // A rendezvous: each round of the writer waits for the sweep to take its result.
    let (tx, rx) = std::sync::mpsc::sync_channel::<bool>(0);
    let mut writer = None;
    let mut seen = 0usize;
    let mut freed_at = None;
    map.for_each_patient(|_, _| {
        seen += 1;
        if seen == 10 {
            let (m, tx) = (map.clone(), tx.clone());
            writer = Some(std::thread::spawn(move || retire_then_collect(&m, &tx)));
        } else if seen > 10 && freed_at.is_none() {
            // One collection round of the writer per patient swept.
            if rx.recv() == Ok(true) {
                freed_at = Some(seen);
            }
        }
    });
    drop((tx, rx)); // the writer's next send fails: it stops
    writer.unwrap().join().unwrap();
    assert!(seen >= 1000, "the sweep saw {seen} patients");
    assert!(
        freed_at.is_some(),
        "a record retired during the sweep was still not freed when it ended"
    );
    // Within a few patients of the retirement, not at the end of a 256-patient chunk: a
    // pin held per chunk would also hold reclamation back.
    assert!(
        freed_at.is_some_and(|n| n <= 10 + 64),
        "freed only after {freed_at:?} patients"
    );
}

/// Inserts a record and claims it (its node goes to the collector), then runs a collection
/// per round and reports whether the record is freed yet, until it is or the sweep ends.
fn retire_then_collect(map: &PatientMap, tx: &std::sync::mpsc::SyncSender<bool>) {
    let r = rec("retired-by-the-writer", "2", 1);
    let alive = Arc::downgrade(&r.sop_instance_uid);
    {
        let g = map.pin();
        let p = map.insert(b"W", r, 0, &g);
        let c = p.claim(p.view(&g).batch_seq, &g);
        assert_eq!(c.map(|c| c.records.len()), Some(1));
    } // the claimed copy is gone; the node's record is the last strong reference
    loop {
        crossbeam_epoch::pin().flush(); // the collector every map uses
        let freed = alive.upgrade().is_none();
        if tx.send(freed).is_err() || freed {
            return;
        }
    }
}
