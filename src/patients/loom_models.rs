//! loom models of the patient map's protocol (patients/ module doc): insert vs claim, insert vs
//! retire, two writers vs a claim, and two writers publishing snapshots under a reader (through
//! `sync::ArcSwap`, a loom-visible stand-in for arc-swap's), every interleaving up to
//! `LOOM_MAX_PREEMPTIONS`.
//!
//! Run (not part of `cargo test`; `.ci/run` runs it with a small preemption bound):
//! `LOOM_MAX_PREEMPTIONS=3 RUSTFLAGS="--cfg dicomgate_loom --cfg crossbeam_loom" \
//!  CARGO_TARGET_DIR=target/loom cargo test --release --features loom --lib`
//! Only patients/ is built under loom (the rest of the crate uses crossbeam-channel, which does
//! not build with crossbeam_loom), so the models live in the library, not in `tests/`.

use std::path::PathBuf;
use std::sync::Arc;

use super::{InstanceRecord, PatientMap, Snapshot};
use loom::thread;

fn rec(sop: &str) -> InstanceRecord {
    InstanceRecord {
        sop_instance_uid: sop.into(),
        study_uid: None,
        // A series per instance, so a snapshot says which instances it counts.
        series_uid: Some(sop.into()),
        study_date: None,
        path: PathBuf::new(),
        bytes: 1,
        inputs: 1,
        instance_number: 0,
        images_in_acquisition: 0,
        number_of_slices: 0,
    }
}

/// Claims whatever every patient still holds.
fn drain(map: &PatientMap) -> Vec<String> {
    let g = map.pin();
    let mut out = Vec::new();
    for p in map.patients(&g) {
        let v = p.view(&g);
        if let Some(c) = p.claim(v.batch_seq, &g) {
            out.extend(c.records.iter().map(|r| r.sop_instance_uid.to_string()));
        }
    }
    out
}

#[test]
fn insert_vs_claim() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        {
            let g = map.pin();
            map.insert(b"P", rec("a"), 0, &g);
        }
        let m = map.clone();
        let w = thread::spawn(move || {
            let g = m.pin();
            m.insert(b"P", rec("b"), 1, &g);
        });
        let g = map.pin();
        let p = map.get(b"P", &g).unwrap();
        let v = p.view(&g);
        let first = p.claim(v.batch_seq, &g).unwrap();
        // The snapshot read before the claim summarises exactly the first k records of the
        // claim, k >= 1: "a" was inserted (and its snapshot update published) by this thread
        // before the view, and the one racing writer pushes and publishes in one order. (It was
        // `records.len() >= snapshot.instances`, which a snapshot that is never updated passes.)
        assert!(
            (1..=first.records.len()).any(|k| Snapshot::of(&first.records[..k]) == *v.snapshot),
            "snapshot {:?} is no prefix of the claim {:?}",
            v.snapshot,
            first.records
        );
        drop(g);
        w.join().unwrap();
        let mut all: Vec<String> = first
            .records
            .iter()
            .map(|r| r.sop_instance_uid.to_string())
            .collect();
        all.extend(drain(&map));
        all.sort();
        assert_eq!(all, ["a", "b"], "each instance claimed exactly once");
    });
}

#[test]
fn insert_vs_retire() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        let p = {
            let g = map.pin();
            map.get_or_insert(b"P", 0, &g)
        };
        let m = map.clone();
        let w = thread::spawn(move || {
            let g = m.pin();
            m.insert(b"P", rec("a"), 1, &g);
        });
        {
            let g = map.pin();
            map.remove_if_empty(&p, &g);
        }
        w.join().unwrap();
        assert_eq!(drain(&map), ["a"], "a racing retire never loses the insert");
    });
}

#[test]
fn two_writers_vs_claim() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        let ws: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|s| {
                let m = map.clone();
                thread::spawn(move || {
                    let g = m.pin();
                    m.insert(b"P", rec(s), 1, &g);
                })
            })
            .collect();
        let claimed = {
            let g = map.pin();
            map.get(b"P", &g)
                .and_then(|p| p.claim(p.view(&g).batch_seq, &g))
                .map(|c| c.records.len())
                .unwrap_or(0)
        };
        for w in ws {
            w.join().unwrap();
        }
        let rest = drain(&map).len();
        assert_eq!(claimed + rest, 2);
    });
}

/// Snapshot publication (issue 11: the models explored the integer atomics only; the snapshot's
/// `ArcSwap` was invisible to loom, see `sync::ArcSwap`). Two writers insert into one patient
/// while a reader views it: the view summarises a subset of what was inserted (as the checker
/// relies on), and once both writers are done the snapshot counts both (no publication lost
/// to the other's).
#[test]
fn snapshot_publication() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        {
            let g = map.pin();
            map.get_or_insert(b"P", 0, &g);
        }
        let ws: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|s| {
                let m = map.clone();
                thread::spawn(move || {
                    let g = m.pin();
                    m.insert(b"P", rec(s), 1, &g);
                })
            })
            .collect();
        let (a, b) = (rec("a"), rec("b"));
        let subsets: [Vec<&InstanceRecord>; 5] =
            [vec![], vec![&a], vec![&b], vec![&a, &b], vec![&b, &a]];
        let seen = {
            let g = map.pin();
            map.get(b"P", &g).unwrap().view(&g).snapshot
        };
        assert!(
            subsets
                .iter()
                .any(|s| Snapshot::of(s.iter().copied()) == *seen),
            "a snapshot of no subset of the inserts: {seen:?}"
        );
        for w in ws {
            w.join().unwrap();
        }
        let last = {
            let g = map.pin();
            map.get(b"P", &g).unwrap().view(&g).snapshot
        };
        assert!(
            subsets[3..]
                .iter()
                .any(|s| Snapshot::of(s.iter().copied()) == *last),
            "a publication was lost: {last:?}"
        );
    });
}
