//! loom models of the patient map's protocol (patients/ module doc): insert vs claim, insert vs
//! retire, two writers vs a claim, two readers advancing a batch's cached summary while a writer
//! pushes (through `sync::ArcSwap`, a loom-visible stand-in for arc-swap's), and a reader folding
//! records while the claimer moves them out (each record in loom's `UnsafeCell`, so a read not
//! ordered with the take is reported), every interleaving up to `LOOM_MAX_PREEMPTIONS`.
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
        // claim, k >= 1: "a" was pushed by this thread before the view, and a view folds a
        // prefix of the pushes up to the head it reads. (It was `records.len() >=
        // snapshot.instances`, which a snapshot that is never updated passes.)
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

/// The summary of a patient's current batch that its cache holds now is `Snapshot::of` the first
/// `depth` of `pushed` (the batch's pushes, oldest first).
fn assert_cache_is_a_prefix(map: &PatientMap, pushed: &[InstanceRecord]) {
    let g = map.pin();
    let p = map.get(b"P", &g).unwrap();
    let cached = p.batch(g.epoch()).summary.load_full();
    let depth = cached.depth as usize;
    assert!(depth <= pushed.len(), "cache of depth {depth}");
    assert_eq!(*cached.snapshot, Snapshot::of(&pushed[..depth]), "cache");
}

/// Summary publication (issue 11 (3): readers advance the cached summary, writers only push).
/// A writer pushes "b" over "a" while two readers view the patient, each folding what its
/// cache lacks and offering the result back by compare-and-swap: each view summarises a prefix
/// of the pushes that contains everything pushed before the view began ("a"), the cache stays a
/// prefix summary whichever reader wins, and a view once both are done counts both.
#[test]
fn snapshot_publication() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        {
            let g = map.pin();
            map.insert(b"P", rec("a"), 0, &g);
        }
        let pushed = [rec("a"), rec("b")];
        let w = {
            let m = map.clone();
            thread::spawn(move || {
                let g = m.pin();
                m.insert(b"P", rec("b"), 1, &g);
            })
        };
        let view = |m: &PatientMap| {
            let g = m.pin();
            m.get(b"P", &g).unwrap().view(&g).snapshot
        };
        let r = {
            let m = map.clone();
            thread::spawn(move || view(&m))
        };
        let prefixes = [Snapshot::of(&pushed[..1]), Snapshot::of(&pushed)];
        let mine = view(&map);
        assert!(prefixes.contains(&*mine), "no prefix: {mine:?}");
        let theirs = r.join().unwrap();
        assert!(prefixes.contains(&*theirs), "no prefix: {theirs:?}");
        w.join().unwrap();
        assert_cache_is_a_prefix(&map, &pushed);
        assert_eq!(*view(&map), prefixes[1], "a view after both pushes");
        assert_cache_is_a_prefix(&map, &pushed);
    });
}

/// A reader folds the batch's records while the claimer takes them (issue 11 (3): the claim
/// moves records out instead of copying them). The reader either registered before the
/// claimer looked (and the claimer copies) or finds the head closed (and reads none): loom's
/// `UnsafeCell` around each record reports a fold not ordered with the take. The view
/// summarises a prefix, and the claim hands over both records, oldest first.
#[test]
fn view_vs_claim() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        let pushed = [rec("a"), rec("b")];
        {
            let g = map.pin();
            for s in ["a", "b"] {
                map.insert(b"P", rec(s), 0, &g); // strings of its own, freed with the claim
            }
        }
        let r = {
            let m = map.clone();
            thread::spawn(move || {
                let g = m.pin();
                m.get(b"P", &g).unwrap().view(&g).snapshot
            })
        };
        let claimed = {
            let g = map.pin();
            let p = map.get(b"P", &g).unwrap();
            let seq = p.batch(g.epoch()).seq;
            p.claim(seq, &g).unwrap().records
        };
        assert_eq!(claimed, pushed, "the claim");
        drop(claimed); // what a reader still read after the take would be freed now
        let seen = r.join().unwrap();
        assert!(
            (0..=2).any(|k| *seen == Snapshot::of(&pushed[..k])),
            "no prefix: {seen:?}"
        );
    });
}

/// A later view of a batch never counts fewer instances than an earlier one (the stress test
/// `no_instance_lost_or_counted_twice` caught it once in CI, on 035ae1d). The checker's view
/// folds "a" while this thread pushes "b" and folds both from the same cached summary; the
/// checker's compare-and-swap wins with the shorter prefix, ours loses and hands out its own,
/// longer one. Once the checker closes the batch, a view covers the closed head with the
/// cache, and the cache held the shorter prefix: the same batch counted one instance after two.
/// The loser now offers its summary again until the cache covers it.
#[test]
fn a_later_view_of_a_batch_never_counts_fewer_instances() {
    loom::model(|| {
        let map = Arc::new(PatientMap::new(1));
        {
            let g = map.pin();
            map.insert(b"P", rec("a"), 0, &g);
        }
        let checker = {
            let m = map.clone();
            thread::spawn(move || {
                let g = m.pin();
                let p = m.get(b"P", &g).unwrap();
                let v = p.view(&g);
                p.claim(v.batch_seq, &g).map(|c| c.records.len())
            })
        };
        {
            let g = map.pin();
            map.insert(b"P", rec("b"), 1, &g);
        }
        let g = map.pin();
        let p = map.get(b"P", &g).unwrap();
        let first = p.view(&g);
        let later = p.view(&g);
        if later.batch_seq == first.batch_seq {
            assert!(
                later.snapshot.instances >= first.snapshot.instances,
                "batch {} counted {} and later {}",
                first.batch_seq,
                first.snapshot.instances,
                later.snapshot.instances
            );
        }
        drop(g);
        let claimed = checker.join().unwrap().unwrap_or(0);
        assert_eq!(claimed + drain(&map).len(), 2, "each instance claimed once");
    });
}
