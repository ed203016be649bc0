//! What the reactors count for the node's HTTP endpoint (`/metrics`, the status page):
//! instances and bytes stored, associations by outcome, rejections, store errors, failure
//! statuses, store latency, a ring of recent associations and one of per-second throughput.
//!
//! Owns: the counters and their update rules (monotonic, lock-free on the store path; a short
//! mutex only per association end or failure). Must never block a reactor for longer than
//! one of those mutexes, nor reset a counter: the HTTP endpoint (`crate::http`) reads them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::{Deserialize, Serialize};

/// Counters the reactors keep for the endpoint (all monotonic).
#[derive(Debug)]
pub struct Counters {
    /// Instances stored (C-STORE success answered or answerable) and their bytes.
    pub instances: AtomicU64,
    pub bytes: AtomicU64,
    /// Instances no input accepts, answered success and stored nowhere
    /// (`[patients] unmatched = "discard"`).
    pub discarded: AtomicU64,
    /// Associations ended, by outcome (released, aborted, aborted_too_slow, aborted_by_peer,
    /// rejected, protocol_error, closed).
    pub associations: Mutex<BTreeMap<&'static str, u64>>,
    /// Stores that failed in storage (answered 0xA700), by kind (`StoreErrorKind::label`).
    pub store_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// A-ASSOCIATE-RJs sent, by (result, source, reason) of PS3.8 Table 9-21.
    pub rejections: Mutex<BTreeMap<(u8, u8, u8), u64>>,
    /// Requests answered with a failure status, by status.
    pub failures: Mutex<BTreeMap<u16, u64>>,
    /// Seconds from a store handed to storage to its outcome (durable, or failed).
    pub store_seconds: Histogram,
    /// When the node started (the status page's uptime and throughput clock).
    pub started: std::time::Instant,
    /// The last [`RECENT_ASSOCIATIONS`] associations that ended, oldest first.
    pub recent: Mutex<std::collections::VecDeque<RecentAssociation>>,
    /// Instances and bytes stored per second over the last [`THROUGHPUT_SECONDS`] seconds,
    /// a ring indexed by the second since `started`.
    per_second: Box<[SecondSlot]>,
}

/// Associations kept for the status page's "recent associations".
pub const RECENT_ASSOCIATIONS: usize = 50;
/// Seconds of per-second throughput kept for the status page's plot.
pub const THROUGHPUT_SECONDS: usize = 300;

/// One second of the throughput ring.
#[derive(Debug, Default)]
struct SecondSlot {
    /// 1 + the second since `started` this slot counts; 0 = never used.
    second: AtomicU64,
    instances: AtomicU64,
    bytes: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            instances: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            associations: Mutex::default(),
            rejections: Mutex::default(),
            store_errors: Mutex::default(),
            failures: Mutex::default(),
            // 50 µs to ~1.6 s.
            store_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            started: std::time::Instant::now(),
            recent: Mutex::default(),
            per_second: (0..THROUGHPUT_SECONDS)
                .map(|_| SecondSlot::default())
                .collect(),
        }
    }
}

impl Counters {
    /// An instance of `bytes` became durable at `now` (a reactor's clock).
    ///
    /// The throughput ring is approximate by design: the reactor that first stores in a new
    /// second resets that slot, and an instance counted by another reactor in the same
    /// nanoseconds may be lost to the reset. Three relaxed atomics, no lock, no clock read.
    pub fn stored(&self, now: std::time::Instant, bytes: u64) {
        self.instances.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let sec = now.saturating_duration_since(self.started).as_secs();
        let Some(slot) = self
            .per_second
            .get((sec % THROUGHPUT_SECONDS as u64) as usize)
        else {
            return;
        };
        let mark = sec + 1;
        if slot.second.load(Ordering::Relaxed) != mark
            && slot.second.swap(mark, Ordering::Relaxed) != mark
        {
            slot.instances.store(0, Ordering::Relaxed);
            slot.bytes.store(0, Ordering::Relaxed);
        }
        slot.instances.fetch_add(1, Ordering::Relaxed);
        slot.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (instances, bytes) stored in each of the last `THROUGHPUT_SECONDS` seconds, oldest
    /// first, the current (partial) second last; seconds before the node started are left
    /// out.
    pub fn throughput(&self) -> Vec<(u64, u64)> {
        let now = self.started.elapsed().as_secs();
        let first = (now + 1).saturating_sub(THROUGHPUT_SECONDS as u64);
        (first..=now)
            .map(|sec| {
                self.per_second
                    .get((sec % THROUGHPUT_SECONDS as u64) as usize)
                    .filter(|s| s.second.load(Ordering::Relaxed) == sec + 1)
                    .map_or((0, 0), |s| {
                        (
                            s.instances.load(Ordering::Relaxed),
                            s.bytes.load(Ordering::Relaxed),
                        )
                    })
            })
            .collect()
    }

    /// Keeps an ended association for the status page (the last [`RECENT_ASSOCIATIONS`]).
    pub fn remember(&self, a: RecentAssociation) {
        if let Ok(mut r) = self.recent.lock() {
            if r.len() >= RECENT_ASSOCIATIONS {
                r.pop_front();
            }
            r.push_back(a);
        }
    }

    /// An association ended with this outcome text (the service's).
    pub fn association_ended(&self, outcome: &str) {
        let kind = if outcome.starts_with("released") {
            "released"
        } else if outcome.starts_with("aborted by peer") {
            "aborted_by_peer"
        } else if outcome.starts_with("aborted: sender too slow") {
            "aborted_too_slow"
        } else if outcome.starts_with("aborted") {
            "aborted"
        } else if outcome.starts_with("rejected") {
            "rejected"
        } else if outcome.starts_with("protocol error") {
            "protocol_error"
        } else {
            "closed"
        };
        if let Ok(mut m) = self.associations.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    /// A store failed in storage with an error of `kind`.
    pub fn store_error(&self, kind: &'static str) {
        if let Ok(mut m) = self.store_errors.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    /// An A-ASSOCIATE-RJ was sent.
    pub fn rejected(&self, result: u8, source: u8, reason: u8) {
        if let Ok(mut m) = self.rejections.lock() {
            *m.entry((result, source, reason)).or_default() += 1;
        }
    }

    pub fn failure(&self, status: u16) {
        if let Ok(mut m) = self.failures.lock() {
            *m.entry(status).or_default() += 1;
        }
    }
}

/// An association that ended, as its log line tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentAssociation {
    pub ended_ms: u64,
    pub peer: String,
    pub calling_ae: String,
    pub called_ae: String,
    pub instances: u64,
    pub failures: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    pub outcome: String,
}
