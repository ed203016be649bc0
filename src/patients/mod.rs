//! The concurrent patient map: patient → batch of instances (studies → series → instances),
//! the only shared mutable state in the node (design rule 7).
//!
//! Owns: which stored instances belong to which patient's current batch, the per-batch summary
//! the sufficiency checker reads, and the one compare-and-swap that claims a batch for processing.
//! Must never: block a writer on another writer, hold a lock, do I/O, or lose or double-count an
//! instance. Files, rules and processing belong to `pipeline/`.
//!
//! # Structure
//!
//! - [`PatientMap`]: a fixed table of buckets; each bucket is an immutable vector of
//!   `Arc<Patient>` replaced by compare-and-swap (copy-on-write). A new patient costs one bucket
//!   copy (buckets hold a handful of patients); old vectors are retired through crossbeam-epoch.
//!   Keys are hashed with SipHash under a per-map random key, so peers cannot flood one bucket.
//! - [`Patient`]: its current batch (an epoch-managed pointer), the number of open associations
//!   that sent it something, and the time of its last arrival.
//! - A batch: a lock-free stack of instance records (Treiber push) and a cached summary, its
//!   [`Snapshot`] (counts per series and input, study dates, completeness hints). Each node
//!   holds its depth: 1 + the depth of the node below it, so the number of pushes up to and
//!   including it. A node's depth and `next` are written before its push publishes it and never
//!   after, so a head names exactly one prefix of the batch's pushes (the first `depth`), and
//!   every head the batch ever had lies on one chain.
//! - The summary is a cache the readers (checker, status page, priors) advance, not something
//!   writers maintain: an arc-swap holding a depth `d` and `Snapshot::of` the first `d` pushes.
//!   An insert is the push alone (one CAS; it reads nothing but the depth of the node it pushes
//!   over), whatever the patient holds: the copy of every series per insert is gone (issue 11
//!   (3)).
//!
//! Why a depth-stamped stack rather than per-series atomic counters: counters need a concurrent
//! series → counter map inside each patient (grown by writers, with its own reclamation), the
//! per-input counts and study dates are sets as much as counts, and a reader adding up several
//! counters sees no prefix of the pushes without a version scheme of its own. Here the summary
//! of a prefix is the only thing there is, so a reader cannot see anything else.
//!
//! # The protocol (what the loom models in `loom_models.rs` check)
//!
//! - Insert: push onto the current batch's stack with one CAS on its head. The head's tag says
//!   whether the batch is open (0), claimed (`CLOSED`) or the patient retired (`RETIRED`). A
//!   writer that meets `CLOSED` installs (or sees installed) the patient's next batch and pushes
//!   there; one that meets `RETIRED` goes back to the map, which unlinks the patient, and inserts
//!   into a fresh one. A successful push is the instant the instance belongs to a batch.
//! - View: load the cached summary (depth `d`), then the head. A head of depth `d` (or a closed
//!   one) is covered: the cached `Arc` is handed out, no copy. Otherwise the reader registers in
//!   the batch's `readers` count, loads the head again, walks down from it collecting the nodes
//!   of depth above `d` (the cache holds a depth, never a pointer: nothing cached is ever
//!   dereferenced, so no ABA), folds them oldest first into a copy of the cached summary,
//!   deregisters, and offers the result back by compare-and-swap against the summary it
//!   started from. A loser (another reader advanced it first) hands out its own result, which
//!   is as much a prefix summary as the winner's, and offers it again against what it found
//!   while that covers a shorter prefix than its own: when a view returns, the cache covers at
//!   least what it counted, so a later view (one that starts after it returned; a view that
//!   overlaps it may count less) never counts fewer, even once the batch is closed and views
//!   hand out the cache. The CAS only ever replaces a summary by one of a longer prefix. Cost
//!   per view: O(1) when nothing arrived, else O(new instances + the summary's size) (one copy
//!   of the summary per view that finds news, not one per insert).
//! - Claim: one CAS of the batch state `COLLECTING → CLAIMED` picks the single winner; the winner
//!   swaps the head to `CLOSED`, which hands it the whole stack (every instance pushed before the
//!   swap, and none after), then installs the next batch. Later arrivals start the next batch,
//!   never join the claimed one. The records are moved out of the stack in one walk (not
//!   copied) unless a reader is registered, and the chain of nodes goes to the collector in one
//!   deferred destruction (not one per node): pinned threads may still hold pointers into it (a
//!   writer reading the depth it pushes over, a reader the depth or `next`). A reader that is
//!   registered may be reading records, so then the claimer copies them instead and the
//!   originals are dropped with the nodes.
//! - Retire: a patient with an empty open batch is retired by one CAS of its head from
//!   `null` to `null|RETIRED`, then unlinked from its bucket; a writer racing with it either
//!   pushed first (the CAS fails, nothing is removed) or sees `RETIRED` and retries on the map.
//!
//! # Guards
//!
//! Every method that reads shared memory takes a [`MapGuard`], and [`PatientMap::pin`] is the
//! only way to make one: a pin of the current thread on crossbeam-epoch's default collector,
//! which every map uses for every retirement (under loom that collector is per model
//! execution, through `loom::lazy_static`). So every guard a map is given is on the collector
//! its frees go to and its readers are pinned on, by construction: there is nothing to check
//! at run time, and a guard from any other `Collector` does not type-check (issue 11 (2); the
//! map used to take any `&crossbeam_epoch::Guard`). papaya instead lets each map own a
//! collector and verifies `guard.collector()` on every call; one collector for all maps makes
//! that check, and its panic, unnecessary.
//!
//! Why a caller-held guard rather than pinning inside each call: the hot path is ingest's
//! insert, and ingest pins once per drain round of up to 1,024 instances. A pin costs a
//! `SeqCst` fence, and every 128th pin of a thread runs a collection; a caller-held guard pays
//! that once per round instead of once per instance (or per nested pin). A guard cannot
//! outlive its thread (`MapGuard` is not `Send`) nor lend anything
//! out: what the methods return is owned (`Arc<Patient>`, `PatientView`, `Claimed`). The cost
//! of holding one is the caller's to bound: keep a pin short (the checker pins per patient),
//! as no memory any thread retires meanwhile is freed until it goes.
//!
//! # Memory orderings
//!
//! - Pushes publish with `Release` and heads are read with `Acquire`, so whoever acquires a head
//!   (a reader, the claimer, the next writer) sees every node below it whole; bucket and batch
//!   pointers likewise.
//! - The cached summary: arc-swap's load and compare-and-swap (acquire and release). A reader
//!   that loads a summary of depth `d` and then the head gets a head of depth `d` or more: the
//!   summary's publisher read a head of depth `d` before publishing, and the head only grows
//!   while the batch is open (a closed head is covered anyway).
//! - Readers against the claimer's move (Dekker's pattern, the one place `SeqCst` is needed): a
//!   reader does `readers += 1` (`Relaxed`), `fence(SeqCst)`, loads the head (`Acquire`), reads
//!   records, `readers -= 1` (`Release`); the claimer swaps the head to `CLOSED` (`AcqRel`),
//!   `fence(SeqCst)`, loads `readers` (`Acquire`), and moves the records out only if it reads 0.
//!   The two fences are ordered in the single total order of `SeqCst` operations. Claimer's
//!   first: the reader's head load sees `CLOSED` (nothing writes a closed head again) and it
//!   reads no record. Reader's first: the claimer's load sees the reader's `+1` or a later value;
//!   while that reader is registered the count is at least 1, so a 0 is its `-1` or a later
//!   change, and every change is a read-modify-write, in the release sequence of its `-1`: the
//!   reader's reads happen before the claimer's move. (loom models this, `view_vs_claim`: under
//!   loom each record sits in loom's `UnsafeCell`, which reports a read not ordered with the
//!   take.)
//! - Counters that only feed triggers (`last_arrival_ms`, `open_associations`) use
//!   `AcqRel`/`Acquire` too: they are off the hot path's critical section and the stronger order
//!   keeps the reasoning simple.
#![allow(unsafe_code)] // the crate's only unsafe code; every block says why it is sound

#[cfg(all(test, dicomgate_loom))]
mod loom_models;
mod sync;

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_epoch::{Atomic, Guard, Owned, Shared};

use sync::{
    fence, ArcSwap, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering, UnsafeCell,
};

/// One durable instance as the map knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceRecord {
    pub sop_instance_uid: Arc<str>,
    pub study_uid: Option<Arc<str>>,
    pub series_uid: Option<Arc<str>>,
    pub study_date: Option<Arc<str>>,
    /// The Part-10 file in the data directory.
    pub path: PathBuf,
    pub bytes: u64,
    /// Bit i set: `[[input]]` number i accepts the instance. 0 = kept although no input did.
    pub inputs: u64,
    /// Instance Number (0020,0013), Images in Acquisition (0020,1002), Number of Slices
    /// (0054,0081): completeness hints, 0 when absent.
    pub instance_number: u32,
    pub images_in_acquisition: u32,
    pub number_of_slices: u32,
}

/// Counts for one series of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeriesSummary {
    pub study_uid: Option<Arc<str>>,
    pub series_uid: Option<Arc<str>>,
    /// Instances per input (index = input number); instances kept by no input are not counted.
    pub per_input: Vec<u32>,
    pub instances: u32,
    pub max_instance_number: u32,
    pub images_in_acquisition: u32,
    pub number_of_slices: u32,
}

/// What the checker reads about a batch: a consistent summary of some prefix of its pushes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub instances: u32,
    pub bytes: u64,
    pub series: Vec<SeriesSummary>,
    /// Study dates seen, per input (index = input number).
    pub study_dates: Vec<Vec<Arc<str>>>,
}

impl Snapshot {
    /// Counts one more record, finding its series and study dates by a linear search: the
    /// reference [`Snapshot::extend`] agrees with (`extend_counts_as_add_one_by_one`).
    fn add(&mut self, r: &InstanceRecord) {
        let i = match self.series.iter().position(|s| same_series(s, r)) {
            Some(i) => i,
            None => self.new_series(r),
        };
        self.count(i, r, |_, d, listed| listed.contains(d));
    }

    /// Adds `records` in order, as [`Snapshot::add`] on each would, in O(records + series +
    /// study dates) (hashing) rather than O(records × (series + dates)): a view folds thousands
    /// of new instances into a summary of a thousand series, and a claim is recounted whole.
    fn extend(&mut self, records: &[&InstanceRecord]) {
        const LINEAR: usize = 16; // below this, building the indexes costs more than it saves
        if records.len() <= LINEAR {
            for r in records {
                self.add(r);
            }
            return;
        }
        type SeriesKey<'k> = (Option<&'k str>, Option<&'k str>);
        fn key<'k>(study: &'k Option<Arc<str>>, series: &'k Option<Arc<str>>) -> SeriesKey<'k> {
            (study.as_deref(), series.as_deref())
        }
        const NEW: usize = usize::MAX; // a series not in the summary yet
                                       // The records' series → its index in `self.series`, and (input, study date) → listed.
        let mut series: HashMap<SeriesKey<'_>, Cell<usize>> = HashMap::new();
        let mut dates: HashMap<(usize, &str), Cell<bool>> = HashMap::new();
        for r in records {
            series
                .entry(key(&r.study_uid, &r.series_uid))
                .or_insert(Cell::new(NEW));
            if let Some(d) = &r.study_date {
                for i in input_numbers(r.inputs) {
                    dates.entry((i, d)).or_insert(Cell::new(false));
                }
            }
        }
        for (i, s) in self.series.iter().enumerate() {
            if let Some(c) = series.get(&key(&s.study_uid, &s.series_uid)) {
                if c.get() == NEW {
                    c.set(i);
                }
            }
        }
        for (i, listed) in self.study_dates.iter().enumerate() {
            for d in listed {
                if let Some(c) = dates.get(&(i, &**d)) {
                    c.set(true);
                }
            }
        }
        for r in records {
            let Some(c) = series.get(&key(&r.study_uid, &r.series_uid)) else {
                self.add(r); // every record's series was entered above: never taken
                continue;
            };
            let i = match c.get() {
                NEW => {
                    let i = self.new_series(r);
                    c.set(i);
                    i
                }
                i => i,
            };
            self.count(i, r, |i, d, listed| match dates.get(&(i, &**d)) {
                Some(c) => c.replace(true),
                None => listed.contains(d), // entered above: never taken
            });
        }
    }

    fn new_series(&mut self, r: &InstanceRecord) -> usize {
        self.series.push(SeriesSummary {
            study_uid: r.study_uid.clone(),
            series_uid: r.series_uid.clone(),
            ..Default::default()
        });
        self.series.len() - 1
    }

    /// Counts `r` in series `i`; `listed(input, date, dates listed for that input)` says
    /// whether the date is listed already.
    fn count(
        &mut self,
        i: usize,
        r: &InstanceRecord,
        mut listed: impl FnMut(usize, &Arc<str>, &[Arc<str>]) -> bool,
    ) {
        self.instances += 1;
        self.bytes += r.bytes;
        let Some(s) = self.series.get_mut(i) else {
            return; // `i` is always one of ours
        };
        s.instances += 1;
        s.max_instance_number = s.max_instance_number.max(r.instance_number);
        s.images_in_acquisition = s.images_in_acquisition.max(r.images_in_acquisition);
        s.number_of_slices = s.number_of_slices.max(r.number_of_slices);
        for i in input_numbers(r.inputs) {
            if s.per_input.len() <= i {
                s.per_input.resize(i + 1, 0);
            }
            s.per_input[i] += 1;
            if self.study_dates.len() <= i {
                self.study_dates.resize(i + 1, Vec::new());
            }
            if let Some(d) = &r.study_date {
                if !listed(i, d, &self.study_dates[i]) {
                    self.study_dates[i].push(d.clone());
                }
            }
        }
    }

    /// The summary of a set of records (a claimed batch, or a recount in tests), in order.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a InstanceRecord>) -> Snapshot {
        let records: Vec<&InstanceRecord> = records.into_iter().collect();
        let mut s = Snapshot::default();
        s.extend(&records);
        s
    }
}

fn same_series(s: &SeriesSummary, r: &InstanceRecord) -> bool {
    s.series_uid == r.series_uid && s.study_uid == r.study_uid
}

/// The input numbers whose bits are set in `inputs`, lowest first.
fn input_numbers(mut inputs: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let i = inputs.trailing_zeros() as usize;
        inputs &= inputs.checked_sub(1)?;
        Some(i)
    })
}

/// Batch states kept in the map. Later states (processing, exporting, done, failed) belong to
/// the claimed batch's directory on disk, owned by `pipeline/`.
pub const COLLECTING: u8 = 0;
pub const CLAIMED: u8 = 1;

/// Head tags.
const OPEN: usize = 0;
const CLOSED: usize = 1;
const RETIRED: usize = 2;

struct Node {
    // Invariant: written only before the push publishes the node. After that it is read
    // (`with`) only by a thread registered in its batch's `readers` count (`Batch::summary`), or
    // by the claimer that closed the batch; it is taken (`with_mut`) at most once, by that
    // claimer, and only if it found no reader registered after closing (`Patient::claim`).
    // `ManuallyDrop`: whoever frees the node says whether the record is still in it.
    record: UnsafeCell<ManuallyDrop<InstanceRecord>>,
    // Invariant: 1 + the depth of `next` (1 at the bottom of a stack): the number of pushes up
    // to and including this one. Like `next`, written only before the push publishes the node.
    depth: u64,
    // Invariant: written only before the node is published by the CAS on the head.
    next: Atomic<Node>,
}

// SAFETY: nodes are shared between threads through their batch's stack. `depth` and `next` are
// never written once the node is published; the record is read through shared accesses only,
// and taken only when no other thread reads it (the `record` invariant; the module doc,
// "Memory orderings", says why that holds). `InstanceRecord` is `Send` and `Sync`.
unsafe impl Sync for Node {}

impl Node {
    fn new(record: InstanceRecord) -> Owned<Node> {
        Owned::new(Node {
            record: UnsafeCell::new(ManuallyDrop::new(record)),
            depth: 1,
            next: Atomic::null(),
        })
    }

    /// The record of a node nobody else can reach.
    fn into_record(self) -> InstanceRecord {
        ManuallyDrop::into_inner(self.record.into_inner())
    }
}

/// The depth of an open stack's head (0 when empty); `None` for a closed or retired one.
fn open_depth(head: Shared<'_, Node>) -> Option<u64> {
    if head.tag() != OPEN {
        return None;
    }
    // SAFETY: `head` was loaded from a batch's head under a pin; a node is freed only through
    // the collector, after the claim that made it unreachable and after every thread pinned
    // then unpins (`Patient::claim`), or by its batch's drop, when no thread can reach the
    // batch.
    Some(unsafe { head.as_ref() }.map_or(0, |n| n.depth))
}

/// Frees the chain of nodes from `top` down, dropping the records still in them if `records`
/// (else they were taken out, and are not dropped twice).
///
/// # Safety
///
/// No other thread can reach any node of the chain any more, and each was made by `Node::new`
/// and is freed by no one else; if `!records`, every record of the chain was taken out.
unsafe fn free_chain(top: *const Node, records: bool) {
    // SAFETY: the chain is ours alone (the caller's promise), so no pin is needed to walk it.
    let g = unsafe { crossbeam_epoch::unprotected() };
    let mut cur = Shared::from(top);
    while !cur.is_null() {
        // SAFETY: ours alone, made by `Owned::new`; each node is visited once, so freed once.
        let node = unsafe { cur.into_owned() }.into_box();
        cur = node.next.load(Ordering::Relaxed, g);
        if records {
            drop((*node).into_record());
        } // else the record's bytes were moved out; the `ManuallyDrop` leaves them be
    }
}

/// The cached summary of a batch.
struct Summary {
    // Invariant: `snapshot` is `Snapshot::of` the first `depth` pushes of its batch, oldest
    // first (the nodes of depth 1 to `depth` of its one chain).
    depth: u64,
    snapshot: Arc<Snapshot>,
}

struct Batch {
    // Invariant: untagged, this is the newest node of a stack only this batch owns; tagged
    // CLOSED or RETIRED, it is null, never written again, and the stack (if any) was handed to
    // the claimer.
    head: Atomic<Node>,
    // Invariant: only ever replaced by a summary of a longer prefix (compare-and-swap against
    // one of a shorter prefix: the one it was folded from, or one found since).
    summary: ArcSwap<Summary>,
    /// Readers that may be reading records of the stack (module doc, "Memory orderings").
    readers: AtomicUsize,
    state: AtomicU8,
    seq: u64,
}

impl Batch {
    fn new(seq: u64) -> Batch {
        Batch {
            head: Atomic::null(),
            summary: ArcSwap::from_pointee(Summary {
                depth: 0,
                snapshot: Arc::new(Snapshot::default()),
            }),
            readers: AtomicUsize::new(0),
            state: AtomicU8::new(COLLECTING),
            seq,
        }
    }

    /// The summary of every push up to the head now (or, once the batch is closed, of the
    /// prefix the cache reached): the cached one if it covers the head, else the cache advanced
    /// to it (module doc, "View").
    fn summary(&self, guard: &Guard) -> Arc<Snapshot> {
        let cached = self.summary.load_full();
        let covered = |head: Shared<'_, Node>| open_depth(head).is_none_or(|d| d <= cached.depth);
        if covered(self.head.load(Ordering::Acquire, guard)) {
            return cached.snapshot.clone();
        }
        // Registered before the head is read again, so the claimer leaves the records in place
        // while we read them (module doc, "Memory orderings").
        self.readers.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let head = self.head.load(Ordering::Acquire, guard);
        let folded = match covered(head) {
            true => None,
            false => Some(self.fold(&cached, head, guard)),
        };
        self.readers.fetch_sub(1, Ordering::Release);
        let Some((depth, snapshot)) = folded else {
            return cached.snapshot.clone(); // closed meanwhile
        };
        let snapshot = Arc::new(snapshot);
        let mine = Arc::new(Summary {
            depth,
            snapshot: snapshot.clone(),
        });
        // Offered until the cache covers our depth: a loser whose winner folded a shorter
        // prefix offers its own again, or a later view that finds the batch closed would hand
        // out the winner's shorter summary, and the same batch would count fewer instances
        // than this view did (loom model `a_later_view_of_a_batch_never_counts_fewer_instances`).
        let mut expected = cached;
        loop {
            let found = self.summary.compare_and_swap(&expected, mine.clone());
            let found: &Arc<Summary> = &found;
            if Arc::ptr_eq(found, &expected) || found.depth >= depth {
                break;
            }
            expected = found.clone();
        }
        snapshot
    }

    /// `cached` with the pushes above its depth up to `head` (open, non-null) added, and the
    /// depth it reaches. The caller is registered in `readers`.
    fn fold(&self, cached: &Summary, head: Shared<'_, Node>, guard: &Guard) -> (u64, Snapshot) {
        let top = open_depth(head).unwrap_or(0);
        let mut new: Vec<&InstanceRecord> =
            Vec::with_capacity(usize::try_from(top.saturating_sub(cached.depth)).unwrap_or(0));
        let mut cur = head;
        // SAFETY: as in `open_depth`: every node of the chain lives until we unpin.
        while let Some(node) = unsafe { cur.as_ref() } {
            if node.depth <= cached.depth {
                break; // the rest is what the cache covers
            }
            // SAFETY: the record is in the node: the claimer takes records only after it closed
            // the head and then found no reader registered, and we registered and then found
            // the head open (module doc, "Memory orderings"); the reference is used before we
            // deregister (the caller does, after this returns).
            new.push(node.record.with(|r| unsafe { &**r }));
            cur = node.next.load(Ordering::Relaxed, guard);
        }
        new.reverse();
        let mut snapshot = Snapshot::clone(&cached.snapshot);
        snapshot.extend(&new);
        (top, snapshot)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: we are the batch's last user (&mut self, reached only through an epoch-retired
        // or exclusively owned pointer), so nobody else can reach its stack (an open one: a
        // claimed stack left the batch); its nodes were made by `Node::new`, their records are
        // still in them (only a claim takes records), and nothing else frees them.
        unsafe {
            let g = crossbeam_epoch::unprotected();
            let head = self.head.load(Ordering::Relaxed, g);
            free_chain(head.with_tag(0).as_raw(), true);
        }
    }
}

/// A batch handed to its claimer: every record pushed before the claim, oldest first.
#[derive(Debug)]
pub struct Claimed {
    pub seq: u64,
    pub records: Vec<InstanceRecord>,
}

/// A point-in-time view of a patient for the checker.
#[derive(Debug, Clone)]
pub struct PatientView {
    pub batch_seq: u64,
    pub state: u8,
    pub snapshot: Arc<Snapshot>,
    pub open_associations: u32,
    pub last_arrival_ms: u64,
}

/// The insert found the patient retired: the record comes back to be inserted again.
#[derive(Debug)]
pub struct Retired(pub InstanceRecord);

/// One patient (or whatever the grouping tag names).
pub struct Patient {
    key: Box<[u8]>,
    // Invariant: never null while the patient is reachable; replaced only by CAS, the old batch
    // retired through the epoch collector.
    current: Atomic<Batch>,
    next_seq: AtomicU64,
    open_associations: AtomicU32,
    last_arrival_ms: AtomicU64,
    /// Set by triggers (last association closed, recovered at start-up); taken by the checker.
    evaluate: AtomicBool,
    /// The checker's own memo: the last arrival time it evaluated on the quiet trigger.
    pub quiet_evaluated_ms: AtomicU64,
}

impl std::fmt::Debug for Patient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patient")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field(
                "open_associations",
                &self.open_associations.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Patient {
    fn new(key: &[u8], now_ms: u64) -> Patient {
        Patient {
            key: key.into(),
            current: Atomic::new(Batch::new(0)),
            next_seq: AtomicU64::new(1),
            open_associations: AtomicU32::new(0),
            last_arrival_ms: AtomicU64::new(now_ms),
            evaluate: AtomicBool::new(false),
            quiet_evaluated_ms: AtomicU64::new(0),
        }
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    fn batch<'a>(&'a self, guard: &'a Guard) -> &'a Batch {
        let b = self.current.load(Ordering::Acquire, guard);
        // SAFETY: `current` is never null (invariant); a batch is retired through `guard`'s
        // collector only after it was replaced, so it outlives this pin, and the current one
        // is freed by `Patient::drop` only, which cannot run while `&self` is borrowed.
        unsafe { b.deref() }
    }

    /// Adds a durable instance to the current batch: one push, O(1) whatever the batch holds
    /// (the summary is the readers' to advance).
    pub fn insert(
        &self,
        record: InstanceRecord,
        now_ms: u64,
        guard: &MapGuard,
    ) -> Result<(), Retired> {
        let guard = guard.epoch();
        let mut node = Node::new(record);
        loop {
            let shared_batch = self.current.load(Ordering::Acquire, guard);
            // SAFETY: as in `batch()`.
            let b = unsafe { shared_batch.deref() };
            let head = b.head.load(Ordering::Acquire, guard);
            match head.tag() {
                OPEN => {
                    // The node we push over lives until we unpin (`open_depth`), and its depth
                    // is immutable; we never read a node after pushing it.
                    node.depth = open_depth(head).unwrap_or(0) + 1;
                    node.next.store(head, Ordering::Relaxed);
                    match b.head.compare_exchange(
                        head,
                        node,
                        Ordering::Release,
                        Ordering::Relaxed,
                        guard,
                    ) {
                        Ok(_) => {
                            self.last_arrival_ms.fetch_max(now_ms, Ordering::AcqRel);
                            return Ok(());
                        }
                        Err(e) => node = e.new,
                    }
                }
                CLOSED => self.install_next(shared_batch, guard),
                _ => return Err(Retired((*node.into_box()).into_record())),
            }
        }
    }

    /// Replaces a claimed batch by a fresh one (whoever gets there first; losers drop theirs).
    fn install_next<'g>(&self, old: Shared<'g, Batch>, guard: &'g Guard) {
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        let fresh = Owned::new(Batch::new(seq));
        if self
            .current
            .compare_exchange(old, fresh, Ordering::AcqRel, Ordering::Acquire, guard)
            .is_ok()
        {
            // SAFETY: `old` is unreachable from `current` now; threads still holding it are
            // pinned, and the collector frees it only after they unpin.
            unsafe { guard.defer_destroy(old) };
        }
    }

    /// Notes an arrival that added nothing (the same SOP Instance UID stored again).
    pub fn touch(&self, now_ms: u64) {
        self.last_arrival_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    pub fn view(&self, guard: &MapGuard) -> PatientView {
        let b = self.batch(guard.epoch());
        PatientView {
            batch_seq: b.seq,
            state: b.state.load(Ordering::Acquire),
            snapshot: b.summary(guard.epoch()),
            open_associations: self.open_associations.load(Ordering::Acquire),
            last_arrival_ms: self.last_arrival_ms.load(Ordering::Acquire),
        }
    }

    /// Claims batch `seq` if it is still the current, collecting batch: exactly one caller
    /// wins. The winner gets every record pushed before its claim, moved out of the stack
    /// (copied only if a reader is folding them at that moment).
    pub fn claim(&self, seq: u64, guard: &MapGuard) -> Option<Claimed> {
        let guard = guard.epoch();
        let shared_batch = self.current.load(Ordering::Acquire, guard);
        // SAFETY: as in `batch()`.
        let b = unsafe { shared_batch.deref() };
        if b.seq != seq
            || b.state
                .compare_exchange(COLLECTING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        let mut head = b.head.load(Ordering::Acquire, guard);
        loop {
            if head.tag() == RETIRED {
                // Retired while we claimed: the batch was empty and stays so.
                return Some(Claimed {
                    seq,
                    records: Vec::new(),
                });
            }
            match b.head.compare_exchange(
                head,
                Shared::null().with_tag(CLOSED),
                Ordering::AcqRel,
                Ordering::Acquire,
                guard,
            ) {
                Ok(_) => break,
                Err(e) => head = e.current,
            }
        }
        // Whether a reader may be reading the records (module doc, "Memory orderings").
        fence(Ordering::SeqCst);
        let take = b.readers.load(Ordering::Acquire) == 0;
        let depth = open_depth(head).unwrap_or(0);
        let mut records = Vec::with_capacity(usize::try_from(depth).unwrap_or(0));
        let mut cur = head;
        // SAFETY: the swap above made the stack unreachable from the batch, so no new reference
        // to its nodes can be taken, and nothing frees them but the deferred destruction below,
        // after every thread now pinned unpins.
        while let Some(node) = unsafe { cur.as_ref() } {
            records.push(match take {
                // SAFETY: no reader reads this record now or later: one whose fence came
                // before ours has deregistered (we read 0 after its +1), and one whose fence
                // comes after finds the head closed (module doc, "Memory orderings"); writers
                // read nothing of a record. Taken once: each node is visited once, and this
                // claim is the batch's only one.
                true => node
                    .record
                    .with_mut(|r| unsafe { ManuallyDrop::take(&mut *r) }),
                // SAFETY: a shared read, like the registered readers'; the record stays.
                false => node.record.with(|r| InstanceRecord::clone(unsafe { &*r })),
            });
            cur = node.next.load(Ordering::Relaxed, guard);
        }
        if !head.is_null() {
            let top = head.as_raw();
            // SAFETY: the chain is unreachable (above) and ours: this claim is the batch's only
            // one, and the batch's drop frees only an open stack. Threads pinned now may still
            // hold pointers into it (a writer reads the depth of the node it pushes over, a
            // reader depths, `next` and, if `!take`, records), so it is freed through the
            // collector, after they unpin: one deferred destruction for the whole chain, which
            // drops the records only if they were not taken.
            unsafe { guard.defer_unchecked(move || free_chain(top, !take)) };
        }
        records.reverse();
        self.install_next(shared_batch, guard);
        Some(Claimed { seq, records })
    }

    /// Marks the patient retired if its current batch is open and empty. A retired patient
    /// takes no more instances; the map unlinks it.
    fn retire(&self, guard: &Guard) -> bool {
        let b = self.batch(guard);
        b.state.load(Ordering::Acquire) == COLLECTING
            && b.head
                .compare_exchange(
                    Shared::null(),
                    Shared::null().with_tag(RETIRED),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                    guard,
                )
                .is_ok()
    }

    pub fn is_retired(&self, guard: &MapGuard) -> bool {
        let guard = guard.epoch();
        self.batch(guard).head.load(Ordering::Acquire, guard).tag() == RETIRED
    }

    /// An association sent this patient its first instance.
    pub fn association_opened(&self) {
        self.open_associations.fetch_add(1, Ordering::AcqRel);
    }

    /// An association that sent to this patient closed. Returns true when it was the last one
    /// (trigger (a); the caller flags the patient for evaluation if that trigger is on).
    pub fn association_closed(&self) -> bool {
        self.open_associations
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            == Ok(1)
    }

    pub fn request_evaluation(&self) {
        self.evaluate.store(true, Ordering::Release);
    }

    /// Takes the evaluation request, if any.
    pub fn take_evaluation_request(&self) -> bool {
        self.evaluate.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Patient {
    /// Frees the current batch at once, without the epoch collector: a patient is often dropped
    /// by the collector itself (its last `Arc` sits in a retired bucket), and a drop that pinned
    /// a participant there ran a collection that dropped the next patient, and so on, until the
    /// stack overflowed (issue 11 (1), `mass_retirement_does_not_overflow_the_stack`).
    fn drop(&mut self) {
        // SAFETY: `&mut self` on the last `Arc`: no thread holds a reference to this patient,
        // so none is inside one of its methods, and those are the only code that loads
        // `current` or reads the batch and its nodes (every reference to a batch is confined
        // to the patient method that loaded it; nothing public borrows from a batch). Batches
        // this patient replaced were retired through the collector when replaced and are not
        // reachable from `current`. So the batch is exclusively ours: made by `Owned::new`,
        // freed once here (its drop frees the nodes still on its stack).
        unsafe {
            let g = crossbeam_epoch::unprotected();
            let b = self.current.load(Ordering::Relaxed, g);
            if !b.is_null() {
                drop(b.into_owned());
            }
        }
    }
}

struct Bucket {
    // Invariant: immutable once published; replaced as a whole by CAS.
    patients: Vec<Arc<Patient>>,
}

/// The current thread pinned on the epoch collector every [`PatientMap`] shares (module doc,
/// "Guards"). Made only by [`PatientMap::pin`]; every map and patient method that reads shared
/// memory takes one. Not `Send`: it pins the thread that made it.
pub struct MapGuard {
    // Invariant: pinned on crossbeam-epoch's default collector (made only by `PatientMap::pin`,
    // the field is private), and never unpinned or repinned while the `MapGuard` lives: that
    // takes `&mut Guard` (`repin`, `repin_after`), which this module never makes; `epoch()`
    // lends `&Guard` to this module's code only.
    guard: Guard,
}

impl MapGuard {
    /// The pin, for this module's raw code.
    fn epoch(&self) -> &Guard {
        &self.guard
    }
}

impl std::fmt::Debug for MapGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapGuard").finish_non_exhaustive()
    }
}

/// The concurrent map from grouping key (Patient ID by default) to patient.
pub struct PatientMap {
    // Invariant: every slot is non-null from construction to drop.
    buckets: Box<[Atomic<Bucket>]>,
    hasher: RandomState,
    len: AtomicUsize,
}

impl std::fmt::Debug for PatientMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatientMap")
            .field("buckets", &self.buckets.len())
            .field("len", &self.len())
            .finish()
    }
}

impl PatientMap {
    /// A map with `buckets` buckets (rounded up to a power of two). Buckets never split: size it
    /// for the patients that may be pending at once (4096 keeps 100,000 patients at ~25 each).
    pub fn new(buckets: usize) -> PatientMap {
        let n = buckets.clamp(1, 1 << 20).next_power_of_two();
        PatientMap {
            buckets: (0..n)
                .map(|_| {
                    Atomic::new(Bucket {
                        patients: Vec::new(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
        }
    }

    /// Pins the current thread for map and patient operations: the only way to get the guard
    /// they take. Hold it for a bounded piece of work (a drain round, one patient of a sweep):
    /// while any thread holds one, nothing retired since is freed, for every map.
    pub fn pin(&self) -> MapGuard {
        MapGuard {
            guard: crossbeam_epoch::pin(),
        }
    }

    /// Patients in the map (retired ones not yet unlinked included).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, key: &[u8]) -> &Atomic<Bucket> {
        let h = self.hasher.hash_one(key) as usize;
        &self.buckets[h & (self.buckets.len() - 1)]
    }

    fn bucket<'g>(slot: &Atomic<Bucket>, guard: &'g Guard) -> (Shared<'g, Bucket>, &'g Bucket) {
        let s = slot.load(Ordering::Acquire, guard);
        // SAFETY: slots are never null (invariant) and a replaced bucket is retired through the
        // collector, so it lives until `guard` unpins.
        (s, unsafe { s.deref() })
    }

    /// The patient for `key`, if present.
    pub fn get(&self, key: &[u8], guard: &MapGuard) -> Option<Arc<Patient>> {
        let (_, b) = Self::bucket(self.slot(key), guard.epoch());
        b.patients.iter().find(|p| &*p.key == key).cloned()
    }

    /// The patient for `key`, created if absent. Lock-free: a CAS on the key's bucket.
    pub fn get_or_insert(&self, key: &[u8], now_ms: u64, guard: &MapGuard) -> Arc<Patient> {
        let guard = guard.epoch();
        let slot = self.slot(key);
        let mut fresh: Option<Arc<Patient>> = None;
        loop {
            let (shared, b) = Self::bucket(slot, guard);
            if let Some(p) = b.patients.iter().find(|p| &*p.key == key) {
                return p.clone();
            }
            let p = fresh
                .get_or_insert_with(|| Arc::new(Patient::new(key, now_ms)))
                .clone();
            let mut v = Vec::with_capacity(b.patients.len() + 1);
            v.extend(b.patients.iter().cloned());
            v.push(p.clone());
            let next = Owned::new(Bucket { patients: v });
            // Counted before it is visible: an unlink that finds the new patient (and
            // subtracts) comes after this add, so `len` never goes below zero (it briefly
            // wrapped to usize::MAX, and `patients()` sized a vector by it: a panic).
            self.len.fetch_add(1, Ordering::AcqRel);
            if slot
                .compare_exchange(shared, next, Ordering::AcqRel, Ordering::Acquire, guard)
                .is_ok()
            {
                // SAFETY: the old bucket is unreachable from the slot; pinned readers keep it
                // alive until they unpin.
                unsafe { guard.defer_destroy(shared) };
                return p;
            }
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Inserts a record under `key`, retrying on a fresh patient if the one found was retired.
    /// Returns the patient that took it.
    pub fn insert(
        &self,
        key: &[u8],
        mut record: InstanceRecord,
        now_ms: u64,
        guard: &MapGuard,
    ) -> Arc<Patient> {
        loop {
            let p = self.get_or_insert(key, now_ms, guard);
            match p.insert(record, now_ms, guard) {
                Ok(()) => return p,
                Err(Retired(r)) => {
                    record = r;
                    self.unlink(&p, guard.epoch());
                }
            }
        }
    }

    /// Removes `patient` if its open batch is empty (nothing pending). Returns whether it did.
    pub fn remove_if_empty(&self, patient: &Arc<Patient>, guard: &MapGuard) -> bool {
        let guard = guard.epoch();
        if !patient.retire(guard) {
            return false;
        }
        self.unlink(patient, guard);
        true
    }

    /// Takes a retired patient out of its bucket (idempotent; writers that meet it help).
    fn unlink(&self, patient: &Arc<Patient>, guard: &Guard) {
        let slot = self.slot(&patient.key);
        loop {
            let (shared, b) = Self::bucket(slot, guard);
            if !b.patients.iter().any(|p| Arc::ptr_eq(p, patient)) {
                return;
            }
            let v: Vec<_> = b
                .patients
                .iter()
                .filter(|p| !Arc::ptr_eq(p, patient))
                .cloned()
                .collect();
            let next = Owned::new(Bucket { patients: v });
            if slot
                .compare_exchange(shared, next, Ordering::AcqRel, Ordering::Acquire, guard)
                .is_ok()
            {
                // SAFETY: as in `get_or_insert`.
                unsafe { guard.defer_destroy(shared) };
                self.len.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }

    /// Calls `f` on every patient in the map (each patient in it from the start to the end of
    /// the sweep is visited once; one inserted or removed meanwhile may or may not be), with a
    /// guard pinned for that patient alone. So a sweep, however many patients it visits and
    /// whatever `f` does (claims, rollbacks), holds back the reclamation of what other threads
    /// retire for at most one patient's work (issue 11 (4): the checker held one pin for its
    /// whole sweep). Patients are gathered a chunk of buckets at a time under a short pin of
    /// their own.
    pub fn for_each_patient(&self, mut f: impl FnMut(&Arc<Patient>, &MapGuard)) {
        // A caller already pinned would hold every per-patient pin back (they nest).
        debug_assert!(
            !crossbeam_epoch::is_pinned(),
            "for_each_patient called pinned"
        );
        const CHUNK: usize = 256; // patients gathered per pin, so a sparse map needs few pins
        let mut chunk: Vec<Arc<Patient>> = Vec::with_capacity(CHUNK);
        let mut next = 0;
        while next < self.buckets.len() {
            {
                let g = self.pin();
                while next < self.buckets.len() && chunk.len() < CHUNK {
                    let (_, b) = Self::bucket(&self.buckets[next], g.epoch());
                    chunk.extend(b.patients.iter().cloned());
                    next += 1;
                }
            }
            for p in chunk.drain(..) {
                let g = self.pin();
                f(&p, &g);
            }
        }
    }

    /// Every patient now in the map (a moment's view; writers go on meanwhile).
    pub fn patients(&self, guard: &MapGuard) -> Vec<Arc<Patient>> {
        let guard = guard.epoch();
        // A hint only (writers go on); never trusted for a size.
        let mut out = Vec::with_capacity(self.len().min(1 << 16));
        for slot in self.buckets.iter() {
            let (_, b) = Self::bucket(slot, guard);
            out.extend(b.patients.iter().cloned());
        }
        out
    }
}

impl Drop for PatientMap {
    fn drop(&mut self) {
        // SAFETY: &mut self: no thread can reach the buckets any more; each was made by
        // Owned::new and is freed once here.
        unsafe {
            let g = crossbeam_epoch::unprotected();
            for slot in self.buckets.iter() {
                let b = slot.load(Ordering::Relaxed, g);
                if !b.is_null() {
                    drop(b.into_owned());
                }
            }
        }
    }
}

/// Issue 11 (2), use-after-free from safe code: every map method took any
/// `&crossbeam_epoch::Guard` and deferred its frees through it, so a guard pinned on another
/// collector (safe to make) had the map free memory its readers, pinned on the map's collector,
/// still used. Such a guard does not compile as a map guard:
///
/// ```compile_fail,E0308
/// use dicomgate::patients::PatientMap;
/// let map = PatientMap::new(16);
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// let p = map.get_or_insert(b"P", 0, &foreign);
/// map.remove_if_empty(&p, &foreign);
/// ```
///
/// while the same calls with the map's own guard do (so the test above fails for that reason):
///
/// ```
/// use dicomgate::patients::PatientMap;
/// let map = PatientMap::new(16);
/// let _foreign = crossbeam_epoch::Collector::new().register().pin();
/// let own = map.pin();
/// let p = map.get_or_insert(b"P", 0, &own);
/// assert!(map.remove_if_empty(&p, &own));
/// ```
///
/// And each guard-taking method on its own, every other call made with the map's guard (the
/// same calls all compile with the map's own guard:
///
/// ```
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// let map = PatientMap::new(16);
/// let own = map.pin();
/// let p = map.get_or_insert(b"P", 0, &own);
/// let _ = map.get(b"P", &own);
/// map.insert(b"P", InstanceRecord::default(), 0, &own);
/// let _ = p.insert(InstanceRecord::default(), 0, &own);
/// let _ = (map.patients(&own), p.view(&own), p.is_retired(&own));
/// let _ = p.claim(0, &own);
/// let _ = map.remove_if_empty(&p, &own);
/// ```
///
/// so each of these fails for its foreign guard alone):
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// map.get(b"P", &foreign); // PatientMap::get
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// map.get_or_insert(b"P", 0, &foreign); // PatientMap::get_or_insert
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// map.insert(b"P", rec, 0, &foreign); // PatientMap::insert
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// map.remove_if_empty(&p, &foreign); // PatientMap::remove_if_empty
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// map.patients(&foreign); // PatientMap::patients
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// let _ = p.insert(rec, 0, &foreign); // Patient::insert
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// p.view(&foreign); // Patient::view
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// p.claim(0, &foreign); // Patient::claim
/// ```
///
/// ```compile_fail,E0308
/// # use dicomgate::patients::{InstanceRecord, PatientMap};
/// # let map = PatientMap::new(16);
/// # let own = map.pin();
/// # let p = map.get_or_insert(b"P", 0, &own);
/// # let rec = InstanceRecord::default();
/// let foreign = crossbeam_epoch::Collector::new().register().pin();
/// p.is_retired(&foreign); // Patient::is_retired
/// ```
#[cfg(doctest)]
pub fn foreign_guard_use_after_free_does_not_compile() {}

#[cfg(all(test, not(dicomgate_loom)))]
mod tests {
    use super::*;

    pub(crate) fn rec(sop: &str, series: &str, inputs: u64) -> InstanceRecord {
        InstanceRecord {
            sop_instance_uid: sop.into(),
            study_uid: Some("1.2.3".into()),
            series_uid: Some(series.into()),
            study_date: Some("20260101".into()),
            path: PathBuf::from(format!("/x/{sop}.dcm")),
            bytes: 10,
            inputs,
            instance_number: 0,
            images_in_acquisition: 0,
            number_of_slices: 0,
        }
    }

    #[test]
    fn insert_view_claim_next_batch() {
        let m = PatientMap::new(16);
        let g = m.pin();
        let p = m.insert(b"P1", rec("1.1", "9.1", 1), 5, &g);
        m.insert(b"P1", rec("1.2", "9.1", 1), 6, &g);
        m.insert(b"P1", rec("1.3", "9.2", 3), 7, &g);
        assert_eq!(m.len(), 1);
        let v = p.view(&g);
        assert_eq!(v.snapshot.instances, 3);
        assert_eq!(v.snapshot.series.len(), 2);
        assert_eq!(v.snapshot.series[0].per_input, vec![2]);
        assert_eq!(v.snapshot.series[1].per_input, vec![1, 1]);
        assert_eq!(v.last_arrival_ms, 7);
        let c = p.claim(v.batch_seq, &g).unwrap();
        assert_eq!(
            c.records
                .iter()
                .map(|r| &*r.sop_instance_uid)
                .collect::<Vec<_>>(),
            ["1.1", "1.2", "1.3"]
        );
        // A second claim of the same batch loses.
        assert!(p.claim(v.batch_seq, &g).is_none());
        // Later arrivals start the next batch.
        m.insert(b"P1", rec("1.4", "9.1", 1), 8, &g);
        let v2 = p.view(&g);
        assert_eq!(v2.batch_seq, v.batch_seq + 1);
        assert_eq!(v2.snapshot.instances, 1);
        let c2 = p.claim(v2.batch_seq, &g).unwrap();
        assert_eq!(c2.records.len(), 1);
    }

    #[test]
    fn retired_patient_is_replaced_not_lost() {
        let m = PatientMap::new(1);
        let g = m.pin();
        let p = m.get_or_insert(b"P", 0, &g);
        assert!(m.remove_if_empty(&p, &g));
        assert!(m.is_empty());
        assert!(p.is_retired(&g));
        // A writer that still holds the retired patient gets its record back.
        assert!(p.insert(rec("1", "2", 1), 1, &g).is_err());
        let p2 = m.insert(b"P", rec("1", "2", 1), 1, &g);
        assert!(!Arc::ptr_eq(&p, &p2));
        assert_eq!(p2.view(&g).snapshot.instances, 1);
        // Not empty: cannot be removed.
        assert!(!m.remove_if_empty(&p2, &g));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn association_counting_triggers_on_last_close() {
        let m = PatientMap::new(4);
        let g = m.pin();
        let p = m.get_or_insert(b"P", 0, &g);
        p.association_opened();
        p.association_opened();
        assert!(!p.association_closed());
        assert!(p.association_closed());
        assert!(!p.take_evaluation_request());
        p.request_evaluation();
        assert!(p.take_evaluation_request());
        assert!(!p.take_evaluation_request());
        // Never below zero.
        assert!(!p.association_closed());
    }

    #[test]
    fn many_patients_in_few_buckets() {
        let m = PatientMap::new(2);
        let g = m.pin();
        for i in 0..200 {
            m.insert(format!("P{i}").as_bytes(), rec("1", "2", 1), 0, &g);
        }
        assert_eq!(m.len(), 200);
        assert_eq!(m.patients(&g).len(), 200);
        assert!(m.get(b"P77", &g).is_some());
        assert!(m.get(b"nope", &g).is_none());
    }

    /// Issue 11 (1): `Patient::drop` registered an epoch participant and pinned it; its first
    /// pin ran a collection, which dropped the next retired patient, whose drop pinned and
    /// collected again: 100,000 empty patients retired before one collection overflowed a
    /// 2 MiB stack (the checker's and ingest's). The overflow aborts the process, so the work
    /// runs in a child process (this test binary again, filtered to this test).
    #[test]
    fn mass_retirement_does_not_overflow_the_stack() {
        const CHILD: &str = "DICOMGATE_MASS_RETIREMENT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(retire_many_then_collect)
                .unwrap()
                .join()
                .unwrap();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "patients::tests::mass_retirement_does_not_overflow_the_stack",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the child retiring 100,000 patients on a 2 MiB stack died ({}): {}",
            out.status,
            stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
        );
        // The child really ran the test (a filter that matched nothing would also succeed).
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("1 passed"), "child: {stdout}");
    }

    /// Retires 100,000 empty patients while one pin keeps every retired bucket (each holding
    /// the last `Arc` of its patient) queued, then lets the collector run.
    fn retire_many_then_collect() {
        let map = PatientMap::new(4096);
        let hold = map.pin();
        for i in 0..100_000u32 {
            let p = map.get_or_insert(&i.to_le_bytes(), 0, &hold);
            assert!(map.remove_if_empty(&p, &hold));
        }
        assert!(map.is_empty());
        drop(hold);
        for _ in 0..16 {
            map.pin().epoch().flush();
        }
    }

    /// Issue 11 (3): every insert cloned the patient's whole summary (every series, its
    /// per-input counts, the study dates) and published the copy, so an insert into a patient
    /// with 1,000 series copied 1,000 series. An insert is the push alone now: the summary a
    /// view handed out is still the one the batch holds (the batch's reference and the view's),
    /// where the copying insert had replaced it (the view's reference alone).
    #[test]
    fn insert_does_not_copy_the_patients_summary() {
        let m = PatientMap::new(4);
        let g = m.pin();
        let p = m.get_or_insert(b"P", 0, &g);
        for s in 0..1_000 {
            p.insert(rec(&format!("1.{s}"), &format!("9.{s}"), 1), 0, &g)
                .unwrap();
        }
        let v = p.view(&g);
        assert_eq!(v.snapshot.series.len(), 1_000);
        assert_eq!(
            Arc::strong_count(&v.snapshot),
            2,
            "the batch's and the view's"
        );
        p.insert(rec("2.0", "9.7", 1), 0, &g).unwrap();
        assert_eq!(
            Arc::strong_count(&v.snapshot),
            2,
            "the insert replaced the summary (it copied it)"
        );
        // The next view still counts it.
        let after = p.view(&g);
        assert_eq!(after.snapshot.instances, 1_001);
        assert_eq!(after.snapshot.series[7].instances, 2);
    }

    /// Issue 11 (3): a claim cloned every record of the batch and left the originals in the
    /// stack's nodes until the collector freed them, one deferred destruction per node. The
    /// records move out now: while this thread is still pinned (so nothing deferred can be
    /// freed), a claimed record's strings are held by the claim (and the test) alone.
    #[test]
    fn claim_moves_records_out_without_a_copy() {
        let m = PatientMap::new(4);
        let g = m.pin();
        let uids: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("1.{i}"))).collect();
        let p = m.get_or_insert(b"P", 0, &g);
        for u in &uids {
            let mut r = rec("", "9", 1);
            r.sop_instance_uid = u.clone();
            p.insert(r, 0, &g).unwrap();
        }
        let c = p.claim(p.view(&g).batch_seq, &g).unwrap();
        assert_eq!(c.records.len(), 100);
        for (u, r) in uids.iter().zip(&c.records) {
            assert!(Arc::ptr_eq(u, &r.sop_instance_uid), "oldest first");
            assert_eq!(
                Arc::strong_count(u),
                2,
                "a copy of {u} stays behind in the claimed stack"
            );
        }
    }

    /// Pseudo-random records over few studies, series, dates and inputs (so that series and
    /// dates repeat), from a linear congruential generator seeded with `seed`.
    fn random_records(seed: u64, n: usize) -> Vec<InstanceRecord> {
        let mut x = seed;
        let mut next = move |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        (0..n)
            .map(|i| InstanceRecord {
                sop_instance_uid: format!("1.{i}").into(),
                study_uid: (next(5) != 0).then(|| format!("2.{}", next(3)).into()),
                series_uid: (next(7) != 0).then(|| format!("3.{}", next(40)).into()),
                study_date: (next(3) != 0).then(|| format!("2026010{}", next(9)).into()),
                bytes: next(1000),
                inputs: next(1 << 6) | (next(2) << 63),
                instance_number: next(300) as u32,
                images_in_acquisition: next(4) as u32,
                number_of_slices: next(4) as u32,
                ..Default::default()
            })
            .collect()
    }

    /// The indexed fold (`Snapshot::extend`, which views and `Snapshot::of` use) gives exactly
    /// what counting the records one by one with the linear `Snapshot::add` gives: same series
    /// in the same order, same counts, same dates in the same order, whatever the chunks.
    #[test]
    fn extend_counts_as_add_one_by_one() {
        for seed in 0..40 {
            let records = random_records(seed, 400);
            let mut one_by_one = Snapshot::default();
            for r in &records {
                one_by_one.add(r);
            }
            assert_eq!(Snapshot::of(&records), one_by_one, "seed {seed}");
            let mut chunked = Snapshot::default();
            let mut rest: &[InstanceRecord] = &records;
            let mut len = seed as usize % 7;
            while !rest.is_empty() {
                len = (len * 5 + 3) % 90;
                let (chunk, tail) = rest.split_at(len.min(rest.len()));
                chunked.extend(&chunk.iter().collect::<Vec<_>>());
                rest = tail;
            }
            assert_eq!(chunked, one_by_one, "seed {seed}, chunked");
        }
    }

    /// Views between inserts summarise exactly the pushes so far (the cache advanced by a few
    /// and by many at a time), and a view with nothing new hands out the summary it has.
    #[test]
    fn each_view_summarises_the_pushes_so_far() {
        let m = PatientMap::new(4);
        let g = m.pin();
        let records = random_records(7, 600);
        let p = m.get_or_insert(b"P", 0, &g);
        let mut done = 0;
        for step in [1usize, 2, 17, 3, 100, 1, 250, 40, 186] {
            for r in &records[done..done + step] {
                p.insert(r.clone(), 0, &g).unwrap();
            }
            done += step;
            let v = p.view(&g);
            assert_eq!(*v.snapshot, Snapshot::of(&records[..done]), "after {done}");
            assert!(
                Arc::ptr_eq(&v.snapshot, &p.view(&g).snapshot),
                "a view with nothing new copied the summary"
            );
        }
        assert_eq!(done, records.len());
        let c = p.claim(p.view(&g).batch_seq, &g).unwrap();
        assert_eq!(c.records, records);
    }

    /// A claim that finds a reader registered (one may be folding the records) copies them and
    /// leaves the originals to the one deferred destruction of the chain, which frees them once
    /// every pin of the moment is gone.
    #[test]
    fn claim_copies_the_records_a_reader_may_be_reading() {
        let m = PatientMap::new(4);
        let records = random_records(3, 50);
        let alive: Vec<_> = records
            .iter()
            .map(|r| Arc::downgrade(&r.sop_instance_uid))
            .collect();
        let c = {
            let g = m.pin();
            let p = m.get_or_insert(b"P", 0, &g);
            for r in records.clone() {
                p.insert(r, 0, &g).unwrap();
            }
            let b = p.batch(g.epoch());
            b.readers.fetch_add(1, Ordering::Relaxed); // as a reader does before it reads
            let c = p.claim(p.view(&g).batch_seq, &g).unwrap();
            b.readers.fetch_sub(1, Ordering::Release);
            assert_eq!(c.records, records);
            for (r, w) in c.records.iter().zip(&alive) {
                // The test's, the claim's and the node's.
                assert_eq!(w.strong_count(), 3, "{} not copied", r.sop_instance_uid);
            }
            c
        };
        drop(records);
        // Other tests' threads pin too, and hold the epoch back meanwhile: collect until freed,
        // with a bound so that a chain never freed fails rather than hangs.
        for _ in 0..100_000 {
            if alive.iter().all(|w| w.strong_count() == 1) {
                break;
            }
            m.pin().epoch().flush();
            std::thread::yield_now();
        }
        assert!(
            alive.iter().all(|w| w.strong_count() == 1),
            "the chain's originals were never freed"
        );
        drop(c);
        assert!(alive.iter().all(|w| w.upgrade().is_none()));
    }

    /// `len` is a counter beside the buckets, so a reader may see it off by the inserts and
    /// removals in progress (it could even wrap below zero, fixed above); `patients()` sized
    /// its vector by it and panicked ("capacity overflow") when it had wrapped.
    #[test]
    fn patients_does_not_trust_a_wrapped_len() {
        let map = PatientMap::new(4);
        let g = map.pin();
        map.get_or_insert(b"P", 0, &g);
        map.len.store(usize::MAX, Ordering::Relaxed);
        assert_eq!(map.patients(&g).len(), 1);
    }
}
