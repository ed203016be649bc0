//! The publication outbox (issue 15 item 2): what this node acknowledged, on its way to the
//! cluster database.
//!
//! Owns: the queue of acknowledged instances not yet published, this node's open associations
//! per patient and what the database has of them (`dicomgate_associations`, written in the
//! rounds: [`Outbox::association_closed`]), the `cluster` thread that
//! publishes them ([`Outbox::run`]: one transaction per round, at most [`ROUND_RECORDS`]
//! records each) and renews the node's lease, and the counts the status page and `/metrics`
//! show. Must never delay an acknowledgement (a store is answered after the node's own group
//! commit, as on a single node: [`Outbox::push`] only queues), never lose a record to a
//! database outage (a round that fails is sent again, whole, once the database answers), and
//! never hold more than [`Outbox::new`]'s bound in memory.
//!
//! Why a crash loses nothing: the outbox itself is the node's storage. Every instance still
//! pending there is published again at the next start (the pipeline's recovery pushes each
//! one), and publication is idempotent by (node, SOP Instance UID) (`Coordinator::publish`
//! writes nothing for a row that is already there unchanged), so what the database already had
//! costs one statement and what it lacked is added. A queue that reached its bound during a
//! long outage (or a start-up recovery that found more pending than it holds) is covered the
//! same way while running: the records left out are counted and logged, and once the queue
//! has been published the thread rescans the node's own folder and publishes all that is
//! pending there (the acknowledged records left out among it).
//!
//! **Takeover** (a node lost for good): between its own rounds, the `cluster` thread looks for
//! a node whose lease ran out more than a lease ago and whose records nobody published since
//! ([`Coordinator::next_takeover`]), reads that node's pending instances from its folder under
//! the shared folder (read-only, through [`Foreign`], which the pipeline implements: it knows
//! how a stored instance is described), and publishes them under that node's id, a round at a
//! time, renewing its hold between rounds. Those rows are what the dead node's own restart
//! would have published (same location, same `received_ms`), so the dead node coming back
//! later, or two takers, change nothing.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{ClusterError, Coordinator, Published, Takeover};
use crate::doorbell::Doorbell;
use crate::storage::inventory::Entry;

/// Records per publication round (one statement: `Coordinator::publish`).
pub const ROUND_RECORDS: usize = 1000;

/// How long a stopping node goes on publishing what is queued (the node's stop waits 5 s for
/// its threads); what is left is published at the next start.
pub const STOP_PUBLISHING: Duration = Duration::from_secs(3);

/// The cluster database's side of the node, as `/metrics` and the status page show it.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Records published (rows sent in committed rounds).
    pub published: AtomicU64,
    /// Committed publication rounds.
    pub rounds: AtomicU64,
    /// Records not queued because the queue was full (found by a rescan of the folder).
    pub left_out: AtomicU64,
    /// How many of `left_out` a finished rescan covered (it started after they were left
    /// out, so it found them on disk).
    pub rescanned: AtomicU64,
    /// Whether the `cluster` thread holds a working connection, and whether it is TLS.
    pub connected: AtomicBool,
    pub tls: AtomicBool,
    /// Connection attempts or statements that failed.
    pub failures: AtomicU64,
    /// Partitions this node owns, as of its last lease renewal.
    pub owned_partitions: AtomicU64,
    /// Live nodes, as of the last lease renewal.
    pub live_nodes: AtomicU64,
    /// Records of dead nodes this node published (takeover), and takeovers it finished.
    pub taken_over: AtomicU64,
    pub takeovers: AtomicU64,
    /// Records a rescan of this node's folder sent (everything pending there, most of it
    /// published before).
    pub republished: AtomicU64,
    /// Times the database was found to have lost commits this node saw (`cluster::Rewind`: a
    /// failover to a standby that lacked them, a restore), and how many of those a finished
    /// rescan of the node's folder covered (it started after they were found).
    pub rewinds: AtomicU64,
    pub rewinds_rescanned: AtomicU64,
    /// Rows of this node forgotten after a rewind because its folder no longer held their
    /// copies ([`Reconcile`]).
    pub reconciled: AtomicU64,
    /// Every node of the cluster, as of this node's last lease renewal.
    nodes: Mutex<Vec<super::NodeRow>>,
    /// The partitions this node owns, with their tokens, as of its last lease renewal (the
    /// owner side's claims and stage changes are made under these; the database checks them).
    owned: Mutex<Vec<super::Owned>>,
    last_error: Mutex<String>,
}

impl OutboxStats {
    /// The last error talking to the database ("" when none yet).
    pub fn last_error(&self) -> String {
        lock(&self.last_error).clone()
    }

    /// Every node of the cluster, as of this node's last lease renewal (empty before it).
    pub fn nodes(&self) -> Vec<super::NodeRow> {
        lock(&self.nodes).clone()
    }

    /// The partitions this node owns, as of its last lease renewal (empty before it).
    pub fn owned(&self) -> Vec<super::Owned> {
        lock(&self.owned).clone()
    }
}

struct Queued {
    record: Published,
    acked_ms: u64,
}

/// How the `cluster` thread reaches the database.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: super::Database,
    /// This node's fence (`cluster::fence`): told of every renewal.
    pub fence: Option<Arc<super::fence::Fence>>,
    pub node_id: String,
    pub partitions: u32,
    pub lease: Duration,
    /// `[cluster] shared_dir`: every node's folder is `shared_dir/nodes/<node_id>`.
    pub shared_dir: PathBuf,
}

/// Reads another node's folder for a takeover (implemented by the pipeline, which knows how a
/// stored instance is described). Must only read.
pub trait Foreign: Send + Sync {
    /// The instances pending in `node_dir` (those its node would publish at its own restart:
    /// not those its batches hold); an error when `node_dir` is not a node's folder (a shared
    /// folder not mounted must not look like a node with nothing pending).
    fn pending(&self, node_dir: &Path) -> std::io::Result<Vec<Entry>>;
    /// `entry`'s record as node `node_id` would publish it; an error when its bytes cannot be
    /// read (the listing is then given up, never finished on a partial read).
    fn describe(&self, node_id: &str, node_dir: &Path, entry: &Entry)
        -> std::io::Result<Described>;
    /// Whether this node itself (the running process, not a listing of its folder) still holds
    /// the instance at `location` (`patients/<rel>`): in its log's index or as a file. An error
    /// when that cannot be told (the caller then keeps what depends on it).
    fn own_holds(&self, location: &str) -> std::io::Result<bool>;
}

/// What [`Foreign::describe`] made of a listed instance.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per listed instance, moved at once
pub enum Described {
    Record(Published),
    /// No longer there (its node, alive after all, processed it since the listing, or freed
    /// its segment): nothing pending to publish.
    Gone,
    /// Its bytes cannot be parsed: skipped (its node's recovery leaves it in place too).
    Unparsed,
}

/// A takeover under way, or a rescan of this node's own folder.
///
/// The folder is read by a thread of its own (`cluster-takeover`): the listing reads every
/// segment of that node's log and each instance is read whole to be described, which on a
/// shared file system may take longer than a lease, and the `cluster` thread must go on
/// renewing this node's lease (and the hold) meanwhile. The reader sends rounds through a
/// channel of two, so it stays at most two rounds ahead; it ends when the job is dropped.
struct Job {
    /// None: this node's own folder, rescanned for records left out of the queue or lost by
    /// the database (a rewind).
    takeover: Option<Takeover>,
    node_id: String,
    /// The `left_out` and `rewinds` counts a rescan covers once finished.
    covers: Owed,
    /// A rescan holds off the release of this node's copies while it lasts.
    _rescanning: Option<Rescanning>,
    /// A rescan after a rewind: what it found, to forget at its end the rows the database
    /// has of this node that its folder no longer holds ([`Reconcile`]).
    reconcile: Option<Reconcile>,
    from_reader: std::sync::mpsc::Receiver<Read>,
    /// A round read and not yet committed (sent again after a failure).
    round: Option<Vec<Published>>,
    /// The reader sent everything: only the finish is left (tried again after a failure).
    done: bool,
    renewed: Instant,
    published: u64,
    unreadable: u64,
}

/// A rescan after a rewind also forgets the rows of this node that the database has again
/// though their copies were released (the lost commits held the claim, the stage "done" and
/// the deletion; the release deleted the copies): left, they would be pending instances with
/// no bytes behind them, and a batch that claimed one would wait for it for ever. Forgotten:
/// the rows this node published before the listing began (`seq` at most `through_seq`: only
/// this thread publishes this node's rows, and it read that number before the listing) whose
/// location the listing does not hold. No release runs during a rescan
/// ([`Outbox::release_gate`]), so what the listing holds stays until the end.
struct Reconcile {
    through_seq: i64,
    /// The locations the listing found (every instance it listed: one that then could not
    /// be parsed, or was moved by the log's compaction, keeps its row).
    found: std::collections::HashSet<String>,
    /// The listing arrived.
    listed: bool,
}

/// What the reader of a folder sends.
enum Read {
    /// Every instance the listing found (its location, as rows name it: `patients/<rel>`),
    /// first, whatever describing it then makes of it.
    Listed(Vec<String>),
    /// A round of records, and how many instances of it could not be parsed (skipped, as a
    /// restart of their node leaves them in place).
    Round(Vec<Published>, u64),
    /// All is read.
    Done,
    /// The folder could not be read (not there, or an I/O error): the job is abandoned and
    /// tried again later, never finished on a partial read.
    Failed(std::io::Error),
}

/// The `cluster-takeover` thread: lists `node_dir` and sends its records in rounds.
fn read_folder(
    foreign: &dyn Foreign,
    node_id: &str,
    node_dir: &Path,
    to: &std::sync::mpsc::SyncSender<Read>,
) {
    let entries = match foreign.pending(node_dir) {
        Ok(e) => e,
        Err(e) => {
            let _ = to.send(Read::Failed(e));
            return;
        }
    };
    let listed = entries
        .iter()
        .map(|e| crate::storage::inventory::location_of(&e.rel))
        .collect();
    if to.send(Read::Listed(listed)).is_err() {
        return; // the job was dropped
    }
    for chunk in entries.chunks(ROUND_RECORDS) {
        let (mut round, mut unparsed) = (Vec::with_capacity(chunk.len()), 0);
        for e in chunk {
            match foreign.describe(node_id, node_dir, e) {
                Ok(Described::Record(r)) => round.push(r),
                Ok(Described::Gone) => {}
                Ok(Described::Unparsed) => unparsed += 1,
                Err(e) => {
                    let _ = to.send(Read::Failed(e));
                    return;
                }
            }
        }
        if to.send(Read::Round(round, unparsed)).is_err() {
            return; // the job was dropped
        }
    }
    let _ = to.send(Read::Done);
}

/// Test-only, debug builds only: with `DICOMGATE_TEST_OUTBOX_HOLD_MS=N` the `cluster` thread
/// publishes nothing from the queue for N ms after its first round (it connects, renews and
/// writes associations meanwhile), so that tests/cluster.rs can make the owner side's release
/// come before the recovery's records are published. A release build has no such switch.
#[cfg(debug_assertions)]
fn test_hold() -> bool {
    static UNTIL: OnceLock<Option<Instant>> = OnceLock::new();
    UNTIL
        .get_or_init(|| {
            let ms = std::env::var("DICOMGATE_TEST_OUTBOX_HOLD_MS").ok()?;
            let ms = ms.parse::<u64>().ok()?;
            tracing::warn!(
                ms,
                "DICOMGATE_TEST_OUTBOX_HOLD_MS: publication held back (test-only fault injection)"
            );
            Some(Instant::now() + Duration::from_millis(ms))
        })
        .is_some_and(|until| Instant::now() < until)
}

/// The queue of acknowledged records not yet published.
pub struct Outbox {
    queue: Mutex<VecDeque<Queued>>,
    bell: Doorbell,
    max_queued: usize,
    foreign: OnceLock<Arc<dyn Foreign>>,
    /// Set by the node's stop once every thread that queues records (ingest, recovery) has
    /// ended: only then can a clean leave say that everything was published.
    producers_ended: AtomicBool,
    /// Records ever queued, and ever published from the queue: a close is written once the
    /// records queued before it are published ([`Outbox::association_closed`]).
    queued: AtomicU64,
    drained: AtomicU64,
    associations: Mutex<Associations>,
    /// Held by a pass of the owner side's release of this node's finished copies
    /// ([`Outbox::release_gate`]), and taken by a rescan of this node's folder before it
    /// lists it, so that no copy released after the listing is published again.
    release: Mutex<()>,
    /// A rescan of this node's folder is under way (set under `release`, cleared when its job
    /// is dropped).
    rescanning: Arc<AtomicBool>,
    pub stats: OutboxStats,
}

/// Clears [`Outbox::rescanning`] when the rescan's job is dropped (finished, abandoned, or
/// dropped for a rewind).
struct Rescanning(Arc<AtomicBool>);

impl Drop for Rescanning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Open associations at this node per grouping key, and what the cluster database has of them
/// (`dicomgate_associations`).
#[derive(Debug, Default)]
struct Associations {
    /// Associations open now that sent an instance of the key (no zeros).
    open: HashMap<Vec<u8>, u32>,
    /// What the database has (no zeros).
    written: HashMap<Vec<u8>, u32>,
    /// Keys whose count changed since it was written.
    changed: HashMap<Vec<u8>, Change>,
    /// The mark when the pipeline's recovery had queued what it found
    /// ([`Outbox::recovery_queued`]), or when the database was found to have lost commits
    /// ([`Outbox::rewound`]): once what it covers is published, the rows a previous process
    /// of this node left (or that the lost commits had deleted) are deleted.
    recovered: Option<Mark>,
    /// Those rows are deleted.
    cleared: bool,
}

/// What has to be published before a change can be written: the records queued, left out of
/// the queue, and lost by the database (rewinds), as counted at the change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mark {
    queued: u64,
    owed: Owed,
}

/// What a rescan of this node's folder owes: the records left out of the queue, and the
/// rewinds found, as counted when the rescan is started (it covers those once finished).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Owed {
    left_out: u64,
    rewinds: u64,
}

/// A change of a key's count not yet written.
#[derive(Debug, Clone, Copy, Default)]
struct Change {
    /// What was to be published at the last change: a fall is written once all of it is.
    mark: Mark,
    /// The highest count since the last write: an association that opened and closed between
    /// two writes is written as open until its records are published.
    peak: u32,
    /// Counts the changes, so that a write only settles the change it read.
    version: u64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("pending", &self.pending())
            .field("max_queued", &self.max_queued)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Outbox {
    pub fn new(max_queued: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            queue: Mutex::new(VecDeque::new()),
            bell: Doorbell::new(),
            max_queued: max_queued.max(1),
            foreign: OnceLock::new(),
            producers_ended: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            associations: Mutex::new(Associations::default()),
            release: Mutex::new(()),
            rescanning: Arc::new(AtomicBool::new(false)),
            stats: OutboxStats::default(),
        })
    }

    /// Queues an acknowledged record for publication (never blocks on the database). Beyond
    /// the bound it is left out and counted; a rescan of the folder publishes it later.
    pub fn push(&self, record: Published) {
        let mut q = lock(&self.queue);
        if q.len() >= self.max_queued {
            drop(q);
            let n = self.stats.left_out.fetch_add(1, Ordering::AcqRel);
            if n == self.stats.rescanned.load(Ordering::Acquire) {
                tracing::warn!(
                    queued = self.max_queued,
                    "the cluster database has not taken this node's records for a while: \
                     further ones are found by a rescan of the node's folder once it has"
                );
            }
            return;
        }
        let ring = q.is_empty();
        q.push_back(Queued {
            record,
            acked_ms: now_ms(),
        });
        self.queued.fetch_add(1, Ordering::AcqRel);
        drop(q);
        if ring {
            self.bell.ring();
        }
    }

    /// An association that is open at this node sent it its first instance of patient `key`
    /// (call it before that instance is queued): the patient's owner counts it as open from
    /// the round that publishes the instance on.
    pub fn association_opened(&self, key: &[u8]) {
        let mut a = lock(&self.associations);
        let n = a.open.entry(key.to_vec()).or_default();
        *n += 1;
        let n = *n;
        self.changed(&mut a, key, n);
    }

    /// An association that sent this node an instance of patient `key` closed. Written (and
    /// the patient's owner told) only once every record queued before it is published, so an
    /// owner that sees the last association of a patient closed finds its instances in the
    /// database.
    pub fn association_closed(&self, key: &[u8]) {
        let mut a = lock(&self.associations);
        let mut n = 0;
        if let Some(c) = a.open.get_mut(key) {
            *c = c.saturating_sub(1);
            n = *c;
            if n == 0 {
                a.open.remove(key);
            }
        }
        self.changed(&mut a, key, n);
        drop(a);
        self.bell.ring();
    }

    fn changed(&self, a: &mut Associations, key: &[u8], now: u32) {
        let mark = self.mark();
        let c = a.changed.entry(key.to_vec()).or_default();
        c.mark = mark;
        c.peak = c.peak.max(now);
        c.version += 1;
    }

    /// What has been queued, left out and lost so far.
    fn mark(&self) -> Mark {
        Mark {
            queued: self.queued.load(Ordering::Acquire),
            owed: self.owed(),
        }
    }

    /// What a rescan started now would cover.
    fn owed(&self) -> Owed {
        Owed {
            left_out: self.stats.left_out.load(Ordering::Acquire),
            rewinds: self.stats.rewinds.load(Ordering::Acquire),
        }
    }

    /// What finished rescans have covered.
    fn covered(&self) -> Owed {
        Owed {
            left_out: self.stats.rescanned.load(Ordering::Acquire),
            rewinds: self.stats.rewinds_rescanned.load(Ordering::Acquire),
        }
    }

    /// Whether everything counted in `mark` is published: the records queued have left the
    /// queue, and a rescan covered those left out and those lost.
    fn published(&self, mark: Mark) -> bool {
        let covered = self.covered();
        mark.queued <= self.drained.load(Ordering::Acquire)
            && mark.owed.left_out <= covered.left_out
            && mark.owed.rewinds <= covered.rewinds
    }

    /// Takes a rewind the coordinator found (`Coordinator::take_rewind`; call it after each
    /// write, before the next [`Outbox::write_associations`]).
    fn check_rewind(&self, c: &mut Coordinator) {
        if let Some(r) = c.take_rewind() {
            self.rewound(r);
        }
    }

    /// The cluster database lost commits this node saw (`Coordinator::take_rewind`): the
    /// records those rounds published are owed to it (a rescan of this node's folder
    /// publishes again everything pending there, and only once it has is everything counted
    /// as published: a clean stop before that leaves as a node to take over; a takeover
    /// under way is dropped, to be done again from a new listing: [`Outbox::run`]), and what
    /// it has of this node's open associations is unknown: every count is written again (a
    /// rise at once, a fall, also one that was waiting, only once the rescan has published
    /// what it owes), and the rows the lost commits had deleted are deleted again then (as
    /// after a restart: [`Outbox::recovery_queued`]; before the recovery has queued, its own
    /// mark does it).
    fn rewound(&self, r: super::Rewind) {
        let n = self.stats.rewinds.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::error!(
            commits_seen = r.saw,
            commits_held = r.holds,
            rewinds = n,
            "the cluster database lost commits this node saw (a failover to a standby that \
             had not received them, or a restore from a backup): this node publishes again \
             everything pending in its folder and writes its open associations again"
        );
        let mark = self.mark();
        let mut guard = lock(&self.associations);
        let a = &mut *guard;
        a.written.clear();
        for key in a.open.keys() {
            a.changed.entry(key.clone()).or_default();
        }
        for (key, c) in a.changed.iter_mut() {
            c.mark = mark;
            c.peak = c.peak.max(a.open.get(key).copied().unwrap_or(0));
            c.version += 1;
        }
        if a.recovered.is_some() {
            a.recovered = Some(mark);
            a.cleared = false;
        }
        drop(guard);
        self.bell.ring();
    }

    /// Says that the pipeline's recovery has queued (or left out) every instance it found:
    /// once those are published, the open associations a previous process of this node
    /// reported are deleted (its associations died with it; its records are in the database
    /// by then, so an owner that then sees a patient closed finds them).
    pub fn recovery_queued(&self) {
        let mark = self.mark();
        lock(&self.associations).recovered = Some(mark);
        self.bell.ring();
    }

    /// Writes the open-association counts that may be written: a rise at once (also the
    /// highest count reached since the last write, when the association has closed again
    /// meanwhile), a fall once the records queued or left out before it are published. Then,
    /// once what the recovery queued is published, deletes the rows a previous process left.
    fn write_associations(&self, c: &mut Coordinator) -> Result<(), ClusterError> {
        self.check_rewind(c);
        let (writes, clear) = {
            let a = lock(&self.associations);
            let writes: Vec<(Vec<u8>, u32, u64)> = a
                .changed
                .iter()
                .filter_map(|(key, ch)| {
                    let now = a.open.get(key).copied().unwrap_or(0);
                    let had = a.written.get(key).copied().unwrap_or(0);
                    let rise = now.max(ch.peak);
                    let target = match self.published(ch.mark) {
                        true => now,
                        false if rise > had => rise,
                        false => return None,
                    };
                    Some((key.clone(), target, ch.version))
                })
                .collect();
            let clear = !a.cleared && a.recovered.is_some_and(|m| self.published(m));
            (writes, clear)
        };
        if !writes.is_empty() {
            let counts: Vec<(Vec<u8>, u32)> =
                writes.iter().map(|(k, n, _)| (k.clone(), *n)).collect();
            c.set_associations(&counts)?;
            let mut a = lock(&self.associations);
            for (key, n, version) in writes {
                if n == 0 {
                    a.written.remove(&key);
                } else {
                    a.written.insert(key.clone(), n);
                }
                let now = a.open.get(&key).copied().unwrap_or(0);
                if let Some(ch) = a.changed.get_mut(&key) {
                    if ch.version == version {
                        if now == n {
                            a.changed.remove(&key);
                        } else {
                            ch.peak = now;
                        }
                    }
                }
            }
        }
        if clear {
            // What this process wrote, as of now (this call's writes included): only this
            // thread writes, so nothing is added to it before the deletion.
            let keep: Vec<Vec<u8>> = lock(&self.associations).written.keys().cloned().collect();
            c.clear_associations_except(&keep)?;
            lock(&self.associations).cleared = true;
        }
        Ok(())
    }

    /// Whether the owner side may release this node's copies of finished batches now: the
    /// records its recovery queued are published (after a rewind: also what the rescan it
    /// owes publishes), and no rescan of its folder is under way. Both publish copies read
    /// from the folder earlier, and a row published after its copy was released and forgotten
    /// would come back as a pending instance with no bytes behind it (seen: a node restarted
    /// after its takeover released the copies the takeover had published, then published
    /// them again from its recovery). The pass holds the returned guard; a rescan does not
    /// start while it is held (it looks again 50 ms later).
    pub fn release_gate(&self) -> Option<MutexGuard<'_, ()>> {
        let gate = lock(&self.release);
        let recovered = lock(&self.associations).recovered;
        (recovered.is_some_and(|m| self.published(m)) && !self.rescanning.load(Ordering::Acquire))
            .then_some(gate)
    }

    /// Records waiting for publication.
    pub fn pending(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Milliseconds since the oldest unpublished record was acknowledged (0 when none).
    pub fn lag_ms(&self) -> u64 {
        lock(&self.queue)
            .front()
            .map_or(0, |q| now_ms().saturating_sub(q.acked_ms))
    }

    /// Lets the `cluster` thread take over dead nodes (set once the pipeline exists; until
    /// then it only publishes this node's records).
    pub fn set_foreign(&self, foreign: Arc<dyn Foreign>) {
        let _ = self.foreign.set(foreign);
    }

    /// Says that nothing will be queued any more (the node's stop, once ingest has ended).
    pub fn producers_ended(&self) {
        self.producers_ended.store(true, Ordering::Release);
        self.bell.ring();
    }

    /// Whether this node has published everything it holds: nothing queued, nothing left out
    /// that a rescan has not covered since (then a clean stop needs no takeover, provided
    /// nothing is queued after it: see [`Outbox::producers_ended`]).
    pub fn published_all(&self) -> bool {
        self.pending() == 0 && self.covered() == self.owed()
    }

    /// Wakes the `cluster` thread (to see `stop`).
    pub fn wake(&self) {
        self.bell.ring();
    }

    /// The `cluster` thread: connects (retrying with backoff while the database is away),
    /// renews the node's lease every third of it ([`Coordinator::rebalance`], which also keeps
    /// the partition shares even), and publishes the queue in rounds. On `stop` it publishes
    /// what is queued, and waits for ingest to end ([`Outbox::producers_ended`]), while the
    /// database answers, for at most [`STOP_PUBLISHING`] or a lease, whichever is shorter;
    /// then it leaves the cluster (its partitions move at once; "nothing to take over" only if
    /// ingest ended and everything was published) and returns. A failed round waits a growing
    /// backoff too (reset once a round commits), so a database that accepts connections but
    /// refuses the statements is not hammered.
    pub fn run(&self, settings: &Settings, stop: &AtomicBool) {
        let mut coordinator: Option<Coordinator> = None;
        // Its connection failed: reconnected before its next use, as the same incarnation
        // (`Coordinator::reconnect`: a reconnection must not fence this process's own work).
        let mut broken = false;
        let mut next_beat = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        let mut job: Option<Job> = None;
        let mut next_look = Instant::now();
        // When to look for other nodes' partition moves next (every 100 ms at most: a look
        // may wait a millisecond for the connection, which a busy round must not pay each
        // time).
        let mut next_listen = Instant::now();
        let mut rewinds_handled = 0;
        loop {
            if stop.load(Ordering::Acquire) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                let out_of_time = since.elapsed() >= STOP_PUBLISHING.min(settings.lease);
                // Told before ingest has ended (the node's stop tells it once only the time
                // it needs is left of the grace), it goes on publishing and renewing until
                // ingest has ended or its time is out: a leave before then could not say that
                // everything acknowledged is published, and another node would take this one
                // over for nothing.
                let ended = self.producers_ended.load(Ordering::Acquire);
                if (self.pending() == 0 && ended) || coordinator.is_none() || broken || out_of_time
                {
                    if let Some(mut c) = coordinator.take().filter(|_| !broken) {
                        let mut all = self.published_all() && ended;
                        // Left with everything published, nobody takes this node over: should
                        // it start again cut off from the database, it must not acknowledge
                        // what nobody would publish (`fence::LIVE_FILE`). Without its mark
                        // removed, it leaves as one to take over.
                        if let (true, Some(f)) = (all, &settings.fence) {
                            if let Err(e) = f.mark_left() {
                                tracing::warn!(error = %e, "cluster: cannot remove this node's live mark: it leaves as a node for another to take over");
                                all = false;
                            }
                        }
                        tracing::info!(
                            published_all = all,
                            "leaving the cluster (published_all: no other node needs to take \
                             this one over)"
                        );
                        if let Err(e) = c.leave(all) {
                            self.failed(&e);
                        }
                    }
                    let left = self.pending();
                    if left > 0 {
                        tracing::warn!(
                            records = left,
                            "stopping with records not yet published: they are published at \
                             the next start"
                        );
                    }
                    return;
                }
            }
            if coordinator.is_none() || broken {
                let connected = match coordinator.as_mut() {
                    Some(c) => c.reconnect(&settings.database),
                    None => Coordinator::connect_to(
                        &settings.database,
                        &settings.node_id,
                        settings.partitions,
                        settings.lease,
                    )
                    .map(|c| coordinator = Some(c)),
                };
                match (connected, coordinator.as_mut()) {
                    (Ok(()), Some(c)) => {
                        let tls = c.tls_in_use().unwrap_or(false);
                        self.stats.tls.store(tls, Ordering::Relaxed);
                        if self.stats.failures.load(Ordering::Relaxed) > 0 {
                            tracing::info!(tls, "connected to the cluster database again");
                        } else {
                            tracing::info!(tls, "connected to the cluster database");
                        }
                        broken = false;
                        self.stats.connected.store(true, Ordering::Release);
                        next_beat = Instant::now();
                    }
                    (Ok(()), None) => {} // not reached: connect_to put it there
                    (Err(e), _) => {
                        self.failed(&e);
                        self.bell.wait(backoff, || stop.load(Ordering::Acquire));
                        backoff = (backoff * 2).min((settings.lease / 3).max(backoff));
                    }
                }
                continue;
            }
            let Some(c) = coordinator.as_mut() else {
                continue; // not reached: connected above
            };
            // Another node joined, left or moved partitions: rebalance now, not at the next
            // renewal (what it freed is taken at once), unless this node is stopping (it would
            // take what it is about to give up). Best effort: a failure to listen only costs
            // the wait for the renewal (a broken connection fails the round below).
            if Instant::now() >= next_listen {
                next_listen = Instant::now() + Duration::from_millis(100);
                match c.partitions_moved() {
                    Ok(true) if !stop.load(Ordering::Acquire) => next_beat = Instant::now(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster: cannot listen for partition moves")
                    }
                }
            }
            let turn = self.round(c, settings, &mut next_beat).and_then(|()| {
                // This node's own records first: the others' (and a rescan) only while the
                // database keeps up with them (less than a round waits).
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                // (A bound below a round makes "busy" half the bound, so that a rescan after
                // an overflow waits until the queue has room again.)
                let busy = self.pending() >= ROUND_RECORDS.min(self.max_queued / 2).max(1);
                self.take_over(c, settings, &mut job, &mut next_look, busy)
            });
            // A write of this turn (even of one that failed after) found that the database
            // lost commits: a takeover or rescan under way may have had rounds among them, so
            // it is dropped (a takeover is then taken on again, by any node, from a new
            // listing once its hold has run out), and the rescan that publishes the lost
            // rounds again starts now.
            let rewinds = self.stats.rewinds.load(Ordering::Acquire);
            if rewinds != rewinds_handled {
                rewinds_handled = rewinds;
                job = None;
                next_look = Instant::now();
            }
            match turn {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    self.failed(&e);
                    broken = true;
                    self.stats.connected.store(false, Ordering::Release);
                    // Not known any more: an old table would show leases running.
                    lock(&self.stats.nodes).clear();
                    self.bell.wait(backoff, || stop.load(Ordering::Acquire));
                    backoff = (backoff * 2).min((settings.lease / 3).max(backoff));
                    continue;
                }
            }
            if self.pending() == 0 {
                let until_beat = next_beat.saturating_duration_since(Instant::now());
                // A takeover or rescan under way is stepped every 20 ms (a round per step).
                let step = if job.is_some() { 20 } else { 200 };
                self.bell
                    .wait(until_beat.min(Duration::from_millis(step)), || {
                        // Stopping, it waits only for ingest to end (`producers_ended`
                        // rings).
                        (stop.load(Ordering::Acquire)
                            && self.producers_ended.load(Ordering::Acquire))
                            || !lock(&self.queue).is_empty()
                    });
            }
        }
    }

    /// One turn: the lease renewal when due, then one round of at most [`ROUND_RECORDS`], with
    /// the open-association counts that may be written before and after it (rises before the
    /// records, falls after: [`Outbox::association_closed`]).
    fn round(
        &self,
        c: &mut Coordinator,
        settings: &Settings,
        next_beat: &mut Instant,
    ) -> Result<(), ClusterError> {
        if Instant::now() >= *next_beat {
            let sent = Instant::now();
            let owned = c.rebalance()?;
            self.check_rewind(c);
            if let (Some(f), Some(until)) = (&settings.fence, c.lease_until()) {
                f.renewed(sent, until);
                // Renewed: a restart after a crash acknowledges at once (`fence::LIVE_FILE`).
                if let Err(e) = f.mark_live() {
                    tracing::warn!(error = %e, "cluster: cannot mark this node live in its folder: after a crash it acknowledges again only once it reaches the database");
                }
            }
            self.stats
                .owned_partitions
                .store(owned.len() as u64, Ordering::Relaxed);
            *lock(&self.stats.owned) = owned;
            // For every node's status page; a failure here only costs the table (publication
            // goes on).
            let left = self.stats.left_out.load(Ordering::Acquire)
                - self.stats.rescanned.load(Ordering::Acquire);
            let status = c
                .report(
                    self.stats.published.load(Ordering::Relaxed),
                    self.pending() as u64 + left,
                    self.lag_ms(),
                )
                .and_then(|()| c.nodes());
            match status {
                Ok(nodes) => {
                    let live = nodes.iter().filter(|n| n.live).count();
                    self.stats.live_nodes.store(live as u64, Ordering::Relaxed);
                    *lock(&self.stats.nodes) = nodes;
                }
                Err(e) => {
                    self.failed(&e);
                    lock(&self.stats.nodes).clear();
                }
            }
            *next_beat = Instant::now() + settings.lease / 3;
        }
        // Only this thread takes from the front: the first `n` stay the same while the round
        // is out, and leave the queue once it committed.
        #[cfg(debug_assertions)]
        let take = if test_hold() { 0 } else { ROUND_RECORDS };
        #[cfg(not(debug_assertions))]
        let take = ROUND_RECORDS;
        let batch: Vec<Published> = lock(&self.queue)
            .iter()
            .take(take)
            .map(|q| q.record.clone())
            .collect();
        // Rises before the records (an owner that reads a record finds its association open,
        // since ingest counts an association before it queues the record), falls after.
        self.write_associations(c)?;
        if !batch.is_empty() {
            c.publish(&batch)?;
            lock(&self.queue).drain(..batch.len());
            self.drained.fetch_add(batch.len() as u64, Ordering::AcqRel);
            self.stats
                .published
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        }
        self.write_associations(c)
    }

    /// One step of a takeover or rescan. With none under way (and `busy` false): every third
    /// of a lease, start a rescan of this node's folder if records were left out of the queue,
    /// else look for a dead node to take over ([`Coordinator::next_takeover`]), and start its
    /// reader. With one under way: renew the hold every third of a lease (even when `busy`),
    /// and unless `busy` publish the next round the reader sent (one round per turn; a round is
    /// moved past only once it committed), and finish when all is read. A folder that cannot
    /// be read abandons the job (a takeover's hold then runs out) for a later look.
    fn take_over(
        &self,
        c: &mut Coordinator,
        settings: &Settings,
        job: &mut Option<Job>,
        next_look: &mut Instant,
        busy: bool,
    ) -> Result<(), ClusterError> {
        let Some(foreign) = self.foreign.get() else {
            return Ok(());
        };
        let Some(j) = job.as_mut() else {
            if busy || Instant::now() < *next_look {
                return Ok(());
            }
            *next_look = Instant::now() + settings.lease / 3;
            // Records left out of the queue were acknowledged, so on disk, before they were
            // left out, and so were those of rounds the database lost before the loss was
            // found: a listing started now finds every one counted so far.
            let (owed, covered) = (self.owed(), self.covered());
            let (takeover, node_id, covers) = if owed != covered {
                (None, settings.node_id.clone(), owed)
            } else {
                let Some(takeover) = c.next_takeover()? else {
                    return Ok(());
                };
                // The id comes from the database: it names a folder only if it is a node
                // id.
                if super::check_node_id(&takeover.node_id).is_err() {
                    tracing::error!(node_id = ?takeover.node_id, "the cluster database names a node that cannot be one: not taken over");
                    return Ok(());
                }
                let id = takeover.node_id.clone();
                (Some(takeover), id, Owed::default())
            };
            let node_dir = settings.shared_dir.join("nodes").join(&node_id);
            // A rescan lists this node's own folder: no release of its copies from now until
            // it is done ([`Outbox::release_gate`]). A release pass under way ends first:
            // looked at again shortly, not waited for (this thread renews the lease).
            let mut rescanning = None;
            let mut reconcile = None;
            if takeover.is_none() {
                if covers.rewinds > self.covered().rewinds {
                    reconcile = Some(Reconcile {
                        through_seq: c.own_max_seq()?,
                        found: Default::default(),
                        listed: false,
                    });
                }
                let _pass = match self.release.try_lock() {
                    Ok(g) => g,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        *next_look = Instant::now() + Duration::from_millis(50);
                        return Ok(());
                    }
                };
                self.rescanning.store(true, Ordering::Release);
                rescanning = Some(Rescanning(self.rescanning.clone()));
                tracing::info!(
                    left_out = covers.left_out - covered.left_out,
                    rewinds = covers.rewinds - covered.rewinds,
                    "cluster: rescanning this node's folder for the records left out of the \
                     queue or lost by the database"
                );
            }
            if let Some(t) = &takeover {
                // Before the listing: from now on the dead node, should it be alive but cut
                // off, acknowledges nothing more (`cluster::fence`), so nothing it
                // acknowledges is missed by the listing.
                if let Err(e) =
                    super::fence::write_fence(&node_dir, t.lease_until, &settings.node_id)
                {
                    tracing::warn!(node_id = %node_id, error = %e, "cluster: cannot write the fence into a dead node's folder: its takeover is retried later");
                    return Ok(());
                }
            }
            let (to, from_reader) = std::sync::mpsc::sync_channel(2);
            let (f, id) = (foreign.clone(), node_id.clone());
            std::thread::Builder::new()
                .name("cluster-takeover".into())
                .spawn(move || read_folder(f.as_ref(), &id, &node_dir, &to))
                .map_err(|e| ClusterError::Invalid(format!("no thread to read a folder: {e}")))?;
            *job = Some(Job {
                takeover,
                node_id,
                covers,
                _rescanning: rescanning,
                reconcile,
                from_reader,
                round: None,
                done: false,
                renewed: Instant::now(),
                published: 0,
                unreadable: 0,
            });
            return Ok(());
        };
        if j.renewed.elapsed() >= settings.lease / 3 {
            j.renewed = Instant::now();
            if let Some(t) = &j.takeover {
                if !c.renew_takeover(t)? {
                    // Another node took it on, or its node came back; the reader ends at its
                    // next round.
                    tracing::warn!(node_id = %j.node_id, "cluster: takeover given up: another node holds it, or the node is back");
                    *job = None;
                    return Ok(());
                }
            }
        }
        if j.done {
            return self.finish(c, job); // one statement, even while busy
        }
        if busy {
            return Ok(());
        }
        if j.round.is_none() {
            match j.from_reader.try_recv() {
                Ok(Read::Listed(listed)) => {
                    if let Some(r) = &mut j.reconcile {
                        r.found = listed.into_iter().collect();
                        r.listed = true;
                    }
                    return Ok(());
                }
                Ok(Read::Round(round, unparsed)) => {
                    j.unreadable += unparsed;
                    j.round = Some(round);
                }
                Ok(Read::Done) => {
                    j.done = true;
                    return self.finish(c, job);
                }
                Ok(Read::Failed(e)) => {
                    tracing::warn!(node_id = %j.node_id, error = %e, "cluster: cannot read a node's folder: retried later");
                    *job = None;
                    return Ok(());
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    tracing::warn!(node_id = %j.node_id, "cluster: the reader of a node's folder ended early: retried later");
                    *job = None;
                    return Ok(());
                }
            }
        }
        let Some(round) = &j.round else {
            return Ok(());
        };
        if !round.is_empty() {
            // A rescan lists what is on disk, which may include instances whose open
            // association ingest counted after this round's last write: rises first.
            self.write_associations(c)?;
            c.publish(round)?;
            self.check_rewind(c);
        }
        let n = round.len() as u64;
        j.round = None;
        j.published += n;
        let counter = match j.takeover {
            Some(_) => &self.stats.taken_over,
            None => &self.stats.republished,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// The job's reader has sent everything and all of it committed.
    fn finish(&self, c: &mut Coordinator, job: &mut Option<Job>) -> Result<(), ClusterError> {
        let Some(j) = job.as_ref() else {
            return Ok(());
        };
        match &j.takeover {
            Some(t) => {
                if c.finish_takeover(t)? {
                    self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::warn!(node_id = %j.node_id, "cluster: takeover not recorded: its node came back meanwhile (it publishes its own)");
                }
            }
            None => {
                // Not if the database lost commits again meanwhile: `through_seq` was read
                // from what it held before (the next rescan reconciles).
                let again = self.stats.rewinds.load(Ordering::Acquire) != j.covers.rewinds;
                if let Some(r) = j.reconcile.as_ref().filter(|r| r.listed && !again) {
                    // The listing only proposes: a row goes only if the running node itself
                    // holds nothing at its location (a listing made while the log's compaction
                    // moved records, or one that could not read a folder, misses some).
                    let found: Vec<&str> = r.found.iter().map(String::as_str).collect();
                    let gone: Vec<String> = c
                        .absent_rows(r.through_seq, &found)?
                        .into_iter()
                        .filter(|l| match self.foreign.get().map(|f| f.own_holds(l)) {
                            Some(Ok(held)) => !held,
                            Some(Err(e)) => {
                                tracing::warn!(location = %l, error = %e, "cluster: cannot tell whether this node holds an instance: its row is kept");
                                false
                            }
                            None => false,
                        })
                        .collect();
                    let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
                    let forgot = c.forget_rows_at(r.through_seq, &gone)?;
                    if forgot > 0 {
                        tracing::warn!(
                            rows = forgot,
                            "cluster: after the database lost commits, forgot rows of \
                             instances this node had already released (processed and exported \
                             before the loss)"
                        );
                    }
                    self.stats.reconciled.fetch_add(forgot, Ordering::Relaxed);
                }
                self.stats
                    .rescanned
                    .fetch_max(j.covers.left_out, Ordering::AcqRel);
                self.stats
                    .rewinds_rescanned
                    .fetch_max(j.covers.rewinds, Ordering::AcqRel);
            }
        }
        if j.unreadable > 0 {
            tracing::warn!(
                node_id = %j.node_id,
                unreadable = j.unreadable,
                "cluster: pending instances that cannot be parsed were not published"
            );
        }
        tracing::info!(
            node_id = %j.node_id,
            published = j.published,
            "cluster: published a folder's pending instances ({})",
            if j.takeover.is_some() { "took over a dead node" } else { "rescan" }
        );
        *job = None;
        Ok(())
    }

    fn failed(&self, e: &ClusterError) {
        let n = self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let msg = e.to_string();
        let mut last = lock(&self.stats.last_error);
        // One line per distinct failure, not one per retry.
        if n == 0 || *last != msg {
            tracing::warn!(error = %msg, "cluster database: retrying");
        }
        *last = msg;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> Published {
        Published {
            node_id: "a".into(),
            sop_instance_uid: format!("1.2.{i}"),
            grouping_key: b"P".to_vec(),
            study_uid: None,
            series_uid: None,
            location: format!("patients/x/{i}.dcm"),
            bytes: 1,
            inputs: 1,
            received_ms: 0,
            ..Published::default()
        }
    }

    /// The bound holds: records past it are counted, not queued.
    #[test]
    fn the_queue_stops_at_its_bound_and_counts_what_it_left_out() {
        let o = Outbox::new(3);
        for i in 0..5 {
            o.push(record(i));
        }
        assert_eq!(o.pending(), 3);
        assert_eq!(o.stats.left_out.load(Ordering::Relaxed), 2);
        // A clean stop now would need a takeover: two records are only on disk.
        assert!(!o.published_all());
    }

    /// Review of the rewind: a fall waiting for its records' round (the association closed, the
    /// round not yet committed) kept its mark, so once the round committed it was written,
    /// before the rescan had published again what the database lost: the owner could see the
    /// patient closed without those records. A rewind now marks every waiting change.
    #[test]
    fn after_a_rewind_a_waiting_fall_is_written_only_once_a_rescan_covered_it() {
        let o = Outbox::new(10);
        o.association_opened(b"P");
        o.push(record(1));
        o.association_closed(b"P");
        let fall = |o: &Outbox| o.published(lock(&o.associations).changed[&b"P".to_vec()].mark);
        assert!(!fall(&o), "its record is not published yet");
        // The round commits: the record leaves the queue.
        lock(&o.queue).clear();
        o.drained.fetch_add(1, Ordering::AcqRel);
        assert!(fall(&o), "without a rewind the fall may be written now");
        o.rewound(crate::cluster::Rewind { saw: 3, holds: 1 });
        assert!(!fall(&o), "not before a rescan has published what was lost");
        assert!(
            !o.published_all(),
            "a clean stop now leaves as a node to take over"
        );
        // A rescan started after the rewind finishes.
        o.stats.rewinds_rescanned.store(1, Ordering::Release);
        assert!(fall(&o));
        assert!(o.published_all());
    }

    /// Review of the rewind: one found before the pipeline's recovery had queued what it found
    /// set the clear of the previous process's rows going, so they were deleted before the
    /// recovered records were published. The recovery's own mark does that clear.
    #[test]
    fn a_rewind_before_the_recovery_has_queued_leaves_the_clear_to_the_recovery() {
        let o = Outbox::new(10);
        o.rewound(crate::cluster::Rewind { saw: 2, holds: 0 });
        assert_eq!(lock(&o.associations).recovered, None);
        o.push(record(1));
        o.recovery_queued();
        let mark = lock(&o.associations).recovered.unwrap();
        assert_eq!((mark.queued, mark.owed.rewinds), (1, 1));
        assert!(!o.published(mark));
    }

    /// Without a database the thread retries, keeps everything queued, and on stop returns
    /// within about a lease, leaving the records for the next start.
    #[test]
    fn without_a_database_nothing_leaves_the_queue_and_stop_returns() {
        let o = Outbox::new(10);
        o.push(record(1));
        let stop = AtomicBool::new(false);
        let settings = Settings {
            database: crate::cluster::Database::plain(
                "host=/nonexistent-dicomgate-socket-dir port=1 user=x dbname=x",
            ),
            fence: None,
            node_id: "a".into(),
            partitions: 4,
            lease: Duration::from_secs(1),
            shared_dir: PathBuf::from("/nonexistent"),
        };
        std::thread::scope(|s| {
            let t = s.spawn(|| o.run(&settings, &stop));
            while o.stats.failures.load(Ordering::Relaxed) < 2 {
                std::thread::sleep(Duration::from_millis(20));
            }
            stop.store(true, Ordering::Release);
            o.wake();
            t.join().unwrap();
        });
        assert_eq!(o.pending(), 1);
        assert!(!o.stats.last_error().is_empty());
    }
}
