//! The publication outbox (issue 15 item 2): what this node acknowledged, on its way to the
//! cluster database.
//!
//! Owns: the queue of acknowledged instances not yet published, the `cluster` thread that
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
//! costs one statement and what it lacked is added. The same covers a queue that reached its
//! bound during a long outage: the records left out are counted, logged, and published at the
//! next start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{ClusterError, Coordinator, Published};
use crate::doorbell::Doorbell;

/// Records per publication round (one statement: `Coordinator::publish`).
pub const ROUND_RECORDS: usize = 1000;

/// How long a stopping node goes on publishing what is queued (the node's stop waits 5 s for
/// its threads); what is left is published at the next start.
pub const STOP_PUBLISHING: Duration = Duration::from_secs(3);

/// Unpublished records kept in memory by default (about 0.8 KiB each: some 160 MiB at most).
pub const DEFAULT_MAX_QUEUED: usize = 200_000;

/// The cluster database's side of the node, as `/metrics` and the status page show it.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Records published (rows sent in committed rounds).
    pub published: AtomicU64,
    /// Committed publication rounds.
    pub rounds: AtomicU64,
    /// Records not queued because the queue was full (published at the next start).
    pub left_out: AtomicU64,
    /// Whether the `cluster` thread holds a working connection.
    pub connected: AtomicBool,
    /// Connection attempts or statements that failed.
    pub failures: AtomicU64,
    /// Partitions this node owns, as of its last lease renewal.
    pub owned_partitions: AtomicU64,
    /// Live nodes, as of the last lease renewal.
    pub live_nodes: AtomicU64,
    last_error: Mutex<String>,
}

impl OutboxStats {
    /// The last error talking to the database ("" when none yet).
    pub fn last_error(&self) -> String {
        lock(&self.last_error).clone()
    }
}

struct Queued {
    record: Published,
    acked_ms: u64,
}

/// How the `cluster` thread reaches the database.
#[derive(Debug, Clone)]
pub struct Settings {
    pub conninfo: String,
    pub node_id: String,
    pub partitions: u32,
    pub lease: Duration,
}

/// The queue of acknowledged records not yet published.
pub struct Outbox {
    queue: Mutex<VecDeque<Queued>>,
    bell: Doorbell,
    max_queued: usize,
    pub stats: OutboxStats,
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
            stats: OutboxStats::default(),
        })
    }

    /// Queues an acknowledged record for publication (never blocks on the database). Beyond
    /// the bound it is left out, counted, and published at the next start.
    pub fn push(&self, record: Published) {
        let mut q = lock(&self.queue);
        if q.len() >= self.max_queued {
            drop(q);
            if self.stats.left_out.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    queued = self.max_queued,
                    "the cluster database has not taken this node's records for a while: \
                     further ones are published at the next start"
                );
            }
            return;
        }
        let ring = q.is_empty();
        q.push_back(Queued {
            record,
            acked_ms: now_ms(),
        });
        drop(q);
        if ring {
            self.bell.ring();
        }
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

    /// Wakes the `cluster` thread (to see `stop`).
    pub fn wake(&self) {
        self.bell.ring();
    }

    /// The `cluster` thread: connects (retrying with backoff while the database is away),
    /// renews the node's lease every third of it ([`Coordinator::rebalance`], which also keeps
    /// the partition shares even), and publishes the queue in rounds. On `stop` it publishes
    /// what is queued while the database answers (at most a lease), then leaves the cluster
    /// (its partitions move at once) and returns. A failed round waits a growing backoff too
    /// (reset once a round commits), so a database that accepts connections but refuses the
    /// statements is not hammered.
    pub fn run(&self, settings: &Settings, stop: &AtomicBool) {
        let mut coordinator: Option<Coordinator> = None;
        let mut next_beat = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Acquire) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                let out_of_time = since.elapsed() >= STOP_PUBLISHING.min(settings.lease);
                if self.pending() == 0 || coordinator.is_none() || out_of_time {
                    if let Some(mut c) = coordinator.take() {
                        if let Err(e) = c.leave() {
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
            let Some(c) = coordinator.as_mut() else {
                match Coordinator::connect(
                    &settings.conninfo,
                    &settings.node_id,
                    settings.partitions,
                    settings.lease,
                ) {
                    Ok(c) => {
                        if self.stats.failures.load(Ordering::Relaxed) > 0 {
                            tracing::info!("connected to the cluster database again");
                        }
                        coordinator = Some(c);
                        self.stats.connected.store(true, Ordering::Release);
                        next_beat = Instant::now();
                    }
                    Err(e) => {
                        self.failed(&e);
                        self.bell.wait(backoff, || stop.load(Ordering::Acquire));
                        backoff = (backoff * 2).min((settings.lease / 3).max(backoff));
                    }
                }
                continue;
            };
            match self.round(c, settings, &mut next_beat) {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    self.failed(&e);
                    coordinator = None;
                    self.stats.connected.store(false, Ordering::Release);
                    self.bell.wait(backoff, || stop.load(Ordering::Acquire));
                    backoff = (backoff * 2).min((settings.lease / 3).max(backoff));
                    continue;
                }
            }
            if self.pending() == 0 {
                let until_beat = next_beat.saturating_duration_since(Instant::now());
                self.bell
                    .wait(until_beat.min(Duration::from_millis(200)), || {
                        stop.load(Ordering::Acquire) || !lock(&self.queue).is_empty()
                    });
            }
        }
    }

    /// One turn: the lease renewal when due, then one round of at most [`ROUND_RECORDS`].
    fn round(
        &self,
        c: &mut Coordinator,
        settings: &Settings,
        next_beat: &mut Instant,
    ) -> Result<(), ClusterError> {
        if Instant::now() >= *next_beat {
            let owned = c.rebalance()?;
            self.stats
                .owned_partitions
                .store(owned.len() as u64, Ordering::Relaxed);
            let live = c.live_nodes()?;
            self.stats
                .live_nodes
                .store(live.len() as u64, Ordering::Relaxed);
            *next_beat = Instant::now() + settings.lease / 3;
        }
        // Only this thread takes from the front: the first `n` stay the same while the round
        // is out, and leave the queue once it committed.
        let batch: Vec<Published> = lock(&self.queue)
            .iter()
            .take(ROUND_RECORDS)
            .map(|q| q.record.clone())
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        c.publish(&batch)?;
        lock(&self.queue).drain(..batch.len());
        self.stats
            .published
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
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
    }

    /// Without a database the thread retries, keeps everything queued, and on stop returns
    /// within about a lease, leaving the records for the next start.
    #[test]
    fn without_a_database_nothing_leaves_the_queue_and_stop_returns() {
        let o = Outbox::new(10);
        o.push(record(1));
        let stop = AtomicBool::new(false);
        let settings = Settings {
            conninfo: "host=/nonexistent-dicomgate-socket-dir port=1 user=x dbname=x".into(),
            node_id: "a".into(),
            partitions: 4,
            lease: Duration::from_secs(1),
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
