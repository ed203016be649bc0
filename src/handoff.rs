//! The hand-off from the reactors to ingest: what a reactor tells the pipeline about a stored
//! instance or an ended association, the bounded lock-free queues it travels on (one per
//! reactor), and the door's decision for an instance no input accepts.
//!
//! Owns: the event types ([`Event`], [`Arrival`], [`Sender`]), the queues and their wake-ups
//! ([`Handoff`]: a reactor pushes, its ingest thread pops; a full queue tells the reactor when
//! it has room again), whether each queue's reactor has ended and whether a stopping reactor
//! gave events up (so a stop knows when ingest has seen everything), and [`Door`], the one
//! question a reactor asks the rules (which inputs accept this instance, under which grouping
//! key). Must never block a reactor (pushing is a
//! lock-free `ArrayQueue` push; a full queue gives the event back), never drop an event, and
//! never know the rules themselves: `pipeline/` implements [`Door`].
//!
//! Why a module of its own: `net/` (the reactors) pushes and `pipeline/` (ingest) pops. Kept in
//! either, the other would import it, and `pipeline/` already imports `net/` (its exports and
//! prior-study retrievals use the requestor, `net::scu`): this module is below both, so neither
//! imports the other's internals and there is no `net` ↔ `pipeline` circle (issue 10 item 4).
//!
//! Order: a reactor pushes an association's events in the order they happened (each
//! `Stored` when its instance is durable, the `Closed` after its last store completed), on its
//! own queue, which one ingest thread drains in order; so a close never overtakes an instance
//! of its association.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

use crate::config::Unmatched;
use crate::dicom::scan::Scanned;
use crate::doorbell::Doorbell;
use crate::patients::InstanceRecord;

/// Events per reactor queue. A full queue pauses the reactor's reading (never a drop).
pub const QUEUE_DEPTH: usize = 4096;

/// A reactor rings its ingest thread for a `Stored` event only once this many events wait;
/// below that the ingest thread takes them at its next sweep (every [`INGEST_SWEEP`]). A close
/// always rings. Patient bookkeeping needs no microsecond latency, and a wake-up per instance
/// cost ~15 % of the node's CPU per instance at low load (perf/RESULTS.md).
pub const RING_AT: usize = QUEUE_DEPTH / 8;
/// Reactor queues one ingest thread drains.
pub const REACTORS_PER_INGEST: usize = 4;
/// The ingest thread's sweep period when nobody rings.
pub const INGEST_SWEEP: Duration = Duration::from_millis(20);

/// Who sent an instance: the association requestor's Calling AE Title, the Called AE Title it
/// asked for, and its network address. `None`: not known (an instance recovered from disk that
/// an older build stored without them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sender<'a> {
    pub calling_ae_title: Option<&'a str>,
    pub called_ae_title: Option<&'a str>,
    pub address: Option<IpAddr>,
}

/// A stored instance on its way to the patient map.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The association that sent it (0 = recovered from disk).
    pub association: u64,
    /// The grouping key (Patient ID by default).
    pub key: Vec<u8>,
    pub record: InstanceRecord,
    /// When storage took it (`storage::StoredInstance::received_ms`; set once it is durable).
    pub received_ms: u64,
}

/// What reactors tell the pipeline.
#[derive(Debug)]
pub enum Event {
    /// A durable instance; `new` is false when it replaced the same SOP Instance UID.
    Stored { arrival: Box<Arrival>, new: bool },
    /// An association that stored something has ended (release or abort).
    Closed { association: u64 },
}

/// What the node does with an instance at the door, once the rules have seen its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtTheDoor {
    /// Stored (an input accepts it, or `unmatched = "keep"`: it goes to `_unmatched`).
    Store,
    /// Answered 0x0124, stored nowhere (`unmatched = "refuse"`).
    Refuse,
    /// Answered success, stored nowhere (`unmatched = "discard"`).
    Discard,
}

/// The door's decision for an instance that joined `inputs` under `[patients] unmatched`.
/// `incomplete`: its values come from a partial scan ([`Scanned::is_incomplete`]: a streamed
/// deflated data set, scanned on what its first bytes inflate to), so a tag that could have
/// routed it may lie beyond what was scanned. Such an instance is never discarded: it is kept
/// as `keep` would (in `_unmatched`, and matched again from the whole file after a restart),
/// since keeping never loses data. `refuse` still refuses it: the sender keeps its copy.
pub fn at_the_door(inputs: u64, unmatched: Unmatched, incomplete: bool) -> AtTheDoor {
    match (inputs, unmatched) {
        (1.., _) | (0, Unmatched::Keep) => AtTheDoor::Store,
        (0, Unmatched::Refuse) => AtTheDoor::Refuse,
        (0, Unmatched::Discard) if incomplete => AtTheDoor::Store,
        (0, Unmatched::Discard) => AtTheDoor::Discard,
    }
}

/// The rules as a reactor sees them: the grouping key and the record draft (no path yet, its
/// `inputs` the inputs that accept it) of an instance with these routing values, sent by
/// `from`. Implemented by the pipeline (`pipeline::Pipeline`).
pub trait Door: Send + Sync + std::fmt::Debug {
    fn describe(&self, values: &Scanned, from: &Sender<'_>) -> (Vec<u8>, InstanceRecord);
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): arrival times, association
/// end times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The queues from the reactors to the ingest threads: one bounded queue per reactor; reactor
/// `r`'s queue is drained by ingest thread `r % ingest_threads`.
pub struct Handoff {
    queues: Vec<ArrayQueue<Event>>,
    /// Per reactor queue: set when the reactor found it full and waits to hear of room.
    room_wanted: Vec<AtomicBool>,
    /// Tells reactor `r` that its queue has room (wakes it).
    room: Arc<dyn Fn(usize) + Send + Sync>,
    doorbells: Vec<Arc<Doorbell>>,
    /// Per reactor queue: its reactor has ended (nothing more is pushed on it).
    ended: Vec<AtomicBool>,
    /// A stopping reactor left events that it could not push ([`Handoff::gave_up`]).
    gave_up: AtomicBool,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("queues", &self.queues.len())
            .field("ingest_threads", &self.doorbells.len())
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// Queues for `reactors` reactors, drained by one ingest thread per
    /// [`REACTORS_PER_INGEST`] reactors; `room(r)` wakes reactor `r` when its full queue has
    /// room again.
    pub fn new(reactors: usize, room: Arc<dyn Fn(usize) + Send + Sync>) -> Handoff {
        let reactors = reactors.max(1);
        let ingest_threads = reactors.div_ceil(REACTORS_PER_INGEST);
        Handoff {
            queues: (0..reactors)
                .map(|_| ArrayQueue::new(QUEUE_DEPTH))
                .collect(),
            room_wanted: (0..reactors).map(|_| AtomicBool::new(false)).collect(),
            room,
            doorbells: (0..ingest_threads.max(1))
                .map(|_| Arc::new(Doorbell::new()))
                .collect(),
            ended: (0..reactors).map(|_| AtomicBool::new(false)).collect(),
            gave_up: AtomicBool::new(false),
        }
    }

    /// A stopping reactor could not push every event it held (its queue stayed full): they
    /// are lost to this run (a store it acknowledged is found on disk at the next start).
    pub fn gave_up(&self) {
        self.gave_up.store(true, Ordering::Release);
    }

    /// Whether every event pushed was taken and no reactor gave any up: at a stop, once the
    /// ingest threads have ended, ingest saw every acknowledged store of this run.
    pub fn all_taken(&self) -> bool {
        !self.gave_up.load(Ordering::Acquire) && self.is_empty()
    }

    /// Reactor `reactor` has ended: it pushes nothing more (its ingest thread may end once it
    /// has drained the queue). Rings that ingest thread.
    pub fn reactor_ended(&self, reactor: usize) {
        if let Some(e) = self.ended.get(reactor) {
            e.store(true, Ordering::Release);
        }
        self.ring(reactor);
    }

    /// Whether reactor `reactor` has ended and everything it pushed has been taken: an event
    /// taken after this says true cannot exist.
    pub fn finished(&self, reactor: usize) -> bool {
        // The flag first: a push made before the reactor ended is then in the queue.
        self.ended
            .get(reactor)
            .is_none_or(|e| e.load(Ordering::Acquire))
            && self.backlog(reactor) == 0
    }

    /// Number of reactor queues.
    pub fn reactors(&self) -> usize {
        self.queues.len()
    }

    /// Number of ingest threads (doorbells).
    pub fn ingest_threads(&self) -> usize {
        self.doorbells.len()
    }

    /// Ingest thread `i`'s doorbell, and the reactor queues it drains.
    pub fn ingest_share(&self, i: usize) -> Option<(Arc<Doorbell>, Vec<usize>)> {
        let bell = self.doorbells.get(i)?.clone();
        let n = self.doorbells.len();
        Some((
            bell,
            (0..self.queues.len()).filter(|r| r % n == i).collect(),
        ))
    }

    /// Pushes an event from reactor `reactor`; gives it back when the queue is full.
    #[allow(clippy::result_large_err)] // the event comes back to be retried, not as an error
    pub fn push(&self, reactor: usize, ev: Event) -> Result<(), Event> {
        match self.queues.get(reactor) {
            Some(q) => q.push(ev),
            None => Err(ev),
        }
    }

    /// After [`Handoff::push`] gave an event back: asks to be told (the `room` callback) when
    /// ingest next takes events off this reactor's queue, then tries once more, so the reactor
    /// can sleep without polling. Store-fence-load against [`Handoff::room_made`], as in the
    /// doorbell.
    #[allow(clippy::result_large_err)] // as push
    pub fn push_or_notify(&self, reactor: usize, ev: Event) -> Result<(), Event> {
        if let Some(w) = self.room_wanted.get(reactor) {
            w.store(true, Ordering::SeqCst);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.push(reactor, ev)
    }

    /// The next event from reactor `reactor`'s queue (for its ingest thread).
    pub fn pop(&self, reactor: usize) -> Option<Event> {
        self.queues.get(reactor)?.pop()
    }

    /// Ingest took events off reactor `reactor`'s queue: wakes the reactor if it waits for room.
    pub fn room_made(&self, reactor: usize) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(w) = self.room_wanted.get(reactor) {
            if w.load(Ordering::SeqCst) && w.swap(false, Ordering::SeqCst) {
                (self.room)(reactor);
            }
        }
    }

    /// Events waiting in reactor `reactor`'s queue.
    pub fn backlog(&self, reactor: usize) -> usize {
        self.queues.get(reactor).map_or(0, ArrayQueue::len)
    }

    /// Whether every queue is empty.
    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(ArrayQueue::is_empty)
    }

    /// Wakes the ingest thread that owns reactor `reactor`'s queue (coalesced).
    pub fn ring(&self, reactor: usize) {
        if let Some(d) = self.doorbells.get(reactor % self.doorbells.len().max(1)) {
            d.ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn closed(association: u64) -> Event {
        Event::Closed { association }
    }

    #[test]
    fn a_full_queue_gives_the_event_back_and_tells_the_reactor_of_room() {
        let woken = Arc::new(AtomicUsize::new(usize::MAX));
        let w = woken.clone();
        let h = Handoff::new(2, Arc::new(move |r| w.store(r, Ordering::SeqCst)));
        for i in 0..QUEUE_DEPTH as u64 {
            assert!(h.push(1, closed(i)).is_ok());
        }
        let back = h.push_or_notify(1, closed(9999));
        assert!(matches!(back, Err(Event::Closed { association: 9999 })));
        assert_eq!(h.backlog(1), QUEUE_DEPTH);
        // Nobody is told before ingest takes something.
        h.room_made(0);
        assert_eq!(woken.load(Ordering::SeqCst), usize::MAX);
        assert!(matches!(h.pop(1), Some(Event::Closed { association: 0 })));
        h.room_made(1);
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        // Told once per request.
        woken.store(usize::MAX, Ordering::SeqCst);
        h.room_made(1);
        assert_eq!(woken.load(Ordering::SeqCst), usize::MAX);
    }

    #[test]
    fn each_reactor_queue_belongs_to_one_ingest_thread() {
        let h = Handoff::new(9, Arc::new(|_| {}));
        assert_eq!(h.ingest_threads(), 3);
        let shares: Vec<Vec<usize>> = (0..3).map(|i| h.ingest_share(i).unwrap().1).collect();
        assert_eq!(shares, vec![vec![0, 3, 6], vec![1, 4, 7], vec![2, 5, 8]]);
        assert!(h.ingest_share(3).is_none());
        assert!(h.push(9, closed(1)).is_err());
        assert_eq!(Handoff::new(2, Arc::new(|_| {})).ingest_threads(), 1);
    }

    /// Found by reading (session 16): an ingest thread ended at the node's stop as soon as
    /// its queues were empty, while its reactor could still acknowledge a store and hand it
    /// off; that arrival never reached the map or the cluster outbox, whose clean leave then
    /// said nothing was left unpublished. A queue is finished only once its reactor has ended
    /// and everything it pushed was taken.
    #[test]
    fn a_queue_is_finished_only_once_its_reactor_ended_and_it_is_drained() {
        let h = Handoff::new(2, Arc::new(|_| {}));
        assert!(!h.finished(0), "empty, but its reactor still runs");
        assert!(h.push(0, closed(1)).is_ok());
        h.reactor_ended(0);
        assert!(
            !h.finished(0),
            "its reactor ended with an event still queued"
        );
        assert!(h.pop(0).is_some());
        assert!(h.finished(0));
        assert!(!h.finished(1), "each queue has its own reactor");
        assert!(h.finished(7), "no such queue: nothing to wait for");
    }

    /// Review of issue 14, defect D5: an instance whose values came from a partial scan (a
    /// streamed deflated data set) and that matched no input was discarded under
    /// `unmatched = "discard"`, though a tag beyond the scanned prefix might have matched. It
    /// is kept (to `_unmatched`) instead; complete scans are decided as before.
    #[test]
    fn partial_scan_is_never_discarded() {
        use crate::config::Unmatched::*;
        assert_eq!(at_the_door(0, Discard, true), AtTheDoor::Store);
        assert_eq!(at_the_door(0, Discard, false), AtTheDoor::Discard);
        assert_eq!(at_the_door(0, Refuse, true), AtTheDoor::Refuse);
        assert_eq!(at_the_door(0, Keep, false), AtTheDoor::Store);
        assert_eq!(at_the_door(0b10, Discard, false), AtTheDoor::Store);
        assert_eq!(at_the_door(1, Refuse, false), AtTheDoor::Store);
    }
}
