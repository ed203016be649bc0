//! The fence in a node's folder (issue 15, "Takeover limits"): how a node cut off from the
//! cluster database learns that another node has taken it over, so that it stops
//! acknowledging what nobody would publish.
//!
//! The gap it closes: a node that cannot reach the database (but still its senders and the
//! shared folder) goes on acknowledging, durably, as it must. Two leases after its last
//! renewal another node takes it over: it lists the node's folder and publishes what is
//! pending there. What the cut-off node acknowledged *after* that listing was published by
//! nobody if it then died before reaching the database again (only its own restart would).
//!
//! The rule: before the taker lists the folder, it writes `cluster-fence` there (durably)
//! holding the `lease_until` of the death it takes over ([`write_fence`]). A node acknowledges
//! a store only once the store is durable *and* either its lease is fresh (its last
//! successful renewal was sent less than a lease ago, by its own monotonic clock: no takeover
//! can list its folder before a lease past the end of that lease) or, past that, the fence
//! does not name its current lease or a later one ([`Fence::check`], read after the store is
//! durable, before the acknowledgement). A taker's listing starts after its fence is durable,
//! so a store acknowledged past a fence-free read was durable before the fence, and so is in
//! the listing; a store made durable after the fence is not acknowledged (it stays on disk,
//! pending, as a store whose acknowledgement was lost: its sender sends it again, to another
//! node behind the load balancer). A fence of an older death (the node renewed since) names
//! an older lease and is ignored (it is never removed: see [`Fence::renewed`]).
//!
//! Where no other node would take this one over, the node refuses until it has reached the
//! database: a node the database may not know (a new folder, or one made by a build before
//! this rule) and one that left the cluster cleanly (its row then covers its last lease, so
//! nobody lists its folder). The mark is `cluster-live` in its folder ([`LIVE_FILE`]): made
//! after a process's first renewal ([`Fence::mark_live`]), removed durably at a clean leave
//! before the row is marked ([`Fence::mark_left`]). A process that has not renewed yet
//! acknowledges only while it is there: after a crash (its row not marked, so another node
//! takes it over, with a fence, should it stay cut off), not after a clean leave or in a new
//! folder.
//!
//! Costs: nothing while the lease is fresh; past it (cut off from the database), one read of
//! a small file per acknowledgement (a few microseconds locally, a round trip to the file
//! server on NFS). On NFS, close-to-open consistency makes a taker's closed write visible to
//! the node's next open of a file it already saw, but not a file its client last saw absent:
//! by default (`lookupcache=all`) the client trusts that negative lookup until it revalidates
//! the folder's attributes (its attribute cache time, `acdirmin` to `acdirmax`: 30 to 60 s by
//! default), and meanwhile the node still acknowledges.
//! So the shared folder must be mounted with `lookupcache=positive` (or `none`), as
//! docs/cluster.md says; not enforced here (a mount option is not visible to a portable check).
//!
//! Owns: the fence file's format, its check, and its writing by a taker (the one write a node
//! makes into another node's folder); the node's own `cluster-live` mark. Must never: block
//! on the database, or let a store be acknowledged when the fence cannot be read (a read
//! error refuses, as a full disk does).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The fence's name in a node's folder (`shared_dir/nodes/<node_id>/`).
pub const FENCE_FILE: &str = "cluster-fence";

/// This node's mark in its folder: a process of it renewed its lease, and it has not left the
/// cluster cleanly since (so other nodes would take it over).
pub const LIVE_FILE: &str = "cluster-live";

/// A database time as microseconds since the epoch (the precision of `timestamptz`, so two
/// values read from one column compare exactly).
pub fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// This node's side: its last renewal, and the check of its own fence.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    /// [`LIVE_FILE`] in the node's folder.
    live: PathBuf,
    /// This process made [`LIVE_FILE`] (once, after its first renewal).
    marked_live: AtomicBool,
    lease: Duration,
    /// The last successful renewal: when it was sent, and the lease it set (µs, database
    /// time). `None` before the first (a node started while the database is away may have
    /// been taken over in its previous life: its fence counts whatever it names).
    renewed: Mutex<Option<(Instant, i64)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fence {
    /// The fence of the node whose folder is `node_dir`, with leases of `lease`.
    pub fn new(node_dir: &Path, lease: Duration) -> Fence {
        Fence {
            path: node_dir.join(FENCE_FILE),
            live: node_dir.join(LIVE_FILE),
            marked_live: AtomicBool::new(false),
            lease,
            renewed: Mutex::new(None),
        }
    }

    /// A renewal sent at `sent` committed, setting the lease to `lease_until`. A fence left
    /// by an earlier takeover stays where it is: it names an older lease, so it no longer
    /// counts. (It is not removed: a renewal that committed and was then delayed past two
    /// leases before this call may find a fence naming the very lease it set, written by a
    /// taker that has already listed the folder; removing it would reopen the gap.)
    pub fn renewed(&self, sent: Instant, lease_until: SystemTime) {
        *lock(&self.renewed) = Some((sent, micros(lease_until)));
    }

    /// Whether a store made durable before this call may be acknowledged now; `Err` says why
    /// not (the store's answer).
    pub fn check(&self) -> Result<(), String> {
        let renewed = *lock(&self.renewed);
        if let Some((sent, _)) = renewed {
            if sent.elapsed() < self.lease {
                return Ok(());
            }
        }
        if renewed.is_none() {
            match self.live.try_exists() {
                Ok(true) => {} // restarted after a crash: taken over, if need be, with a fence
                Ok(false) => {
                    return Err(
                        "not acknowledged: this cluster node has not reached the cluster \
                         database since it started, and no other node would publish what it \
                         stored (it is new to the cluster, or left it cleanly); it stores once \
                         it reaches the database"
                            .into(),
                    )
                }
                Err(e) => {
                    return Err(format!(
                        "not acknowledged: this cluster node has not reached the cluster \
                         database since it started and cannot read {} ({e})",
                        self.live.display()
                    ))
                }
            }
        }
        let fenced = match read_fence(&self.path) {
            Ok(None) => return Ok(()),
            Ok(Some(until)) => until,
            Err(e) => {
                return Err(format!(
                    "not acknowledged: this cluster node cannot reach the cluster database and \
                     cannot read its fence {} ({e})",
                    self.path.display()
                ))
            }
        };
        match renewed {
            Some((_, mine)) if fenced < mine => Ok(()), // an older death's fence
            _ => Err(
                "not acknowledged: another cluster node took this one over while it could not \
                 reach the cluster database; it stores again once it reconnects"
                    .into(),
            ),
        }
    }

    /// After a renewal: makes [`LIVE_FILE`], once per process (again after a failure). Not
    /// flushed: lost in a crash, the next process only refuses until its first renewal.
    pub fn mark_live(&self) -> io::Result<()> {
        if self.marked_live.load(Ordering::Acquire) {
            return Ok(());
        }
        fs::write(
            &self.live,
            "a process of this node renewed its lease; removed when it leaves the cluster \
             cleanly\n",
        )?;
        self.marked_live.store(true, Ordering::Release);
        Ok(())
    }

    /// At a clean leave, before the row says nobody needs to take this node over: removes
    /// [`LIVE_FILE`] durably (the folder flushed), so that its next process, should it start
    /// cut off from the database, refuses until it has renewed.
    pub fn mark_left(&self) -> io::Result<()> {
        match fs::remove_file(&self.live) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.marked_live.store(false, Ordering::Release);
        let dir = self.live.parent().unwrap_or(Path::new("."));
        fs::File::open(dir)?.sync_all()
    }
}

/// The fence's lease, or `None` when there is no fence. An unreadable value counts as the
/// latest lease (fenced): a torn write must not reopen the gap.
fn read_fence(path: &Path) -> io::Result<Option<i64>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            text.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MAX),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The taker's side, before it lists `node_dir`: the fence naming the dead node's
/// `lease_until`, written and flushed (file and folder) under a temporary name, then renamed.
pub fn write_fence(node_dir: &Path, lease_until: SystemTime, taker: &str) -> io::Result<()> {
    let tmp = node_dir.join(format!("{FENCE_FILE}.{taker}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{} {taker}", micros(lease_until))?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, node_dir.join(FENCE_FILE))?;
    fs::File::open(node_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_of_the_current_lease_refuses_and_one_of_an_older_lease_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let t = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        // A lease long enough to stay fresh however slow the flushes, and one that is stale.
        let fresh = Fence::new(dir.path(), Duration::from_secs(3600));
        let stale = Fence::new(dir.path(), Duration::ZERO);
        // Never renewed, no fence, restarted after a crash (marked live): acknowledged.
        fs::write(dir.path().join(LIVE_FILE), "").unwrap();
        assert!(stale.check().is_ok());
        write_fence(dir.path(), t(1_000), "b").unwrap();
        // Never renewed and fenced: refused (a restart while the database is away).
        assert!(stale.check().is_err());
        // Renewed with a later lease: the old fence no longer counts.
        stale.renewed(Instant::now(), t(2_000));
        assert!(stale.check().is_ok());
        // A fence of the lease just set: refused once the lease is not fresh...
        write_fence(dir.path(), t(2_000), "b").unwrap();
        assert!(stale.check().unwrap_err().contains("took this one over"));
        // ... and renewing that same lease again does not lift it (nor remove it).
        stale.renewed(Instant::now(), t(2_000));
        assert!(stale.check().is_err());
        assert!(dir.path().join(FENCE_FILE).exists());
        // Fresh: the fence is not even read.
        fresh.renewed(Instant::now(), t(2_000));
        assert!(fresh.check().is_ok());
        // An older death's fence: acknowledged.
        write_fence(dir.path(), t(1_500), "b").unwrap();
        assert!(stale.check().is_ok());
        // A torn fence counts as fenced.
        fs::write(dir.path().join(FENCE_FILE), "12").unwrap();
        assert!(stale.check().is_ok(), "12 µs is an older lease");
        fs::write(dir.path().join(FENCE_FILE), "garbage").unwrap();
        assert!(stale.check().is_err());
    }

    #[test]
    fn a_node_not_marked_live_refuses_until_its_first_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let t = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        // A new folder (or one of an earlier build): no mark, refused before the first
        // renewal, even with no fence.
        let first = Fence::new(dir.path(), Duration::ZERO);
        let refused = first.check().unwrap_err();
        assert!(
            refused.contains("has not reached the cluster database"),
            "{refused}"
        );
        first.renewed(Instant::now(), t(1_000));
        assert!(first.check().is_ok());
        first.mark_live().unwrap();
        assert!(dir.path().join(LIVE_FILE).is_file());
        // A restart after a crash: marked, acknowledged before its renewal.
        let after_crash = Fence::new(dir.path(), Duration::ZERO);
        assert!(after_crash.check().is_ok());
        // A clean leave removes the mark: the next process refuses until it renews, and marks
        // itself again (once: the mark removed behind its back stays removed).
        first.mark_left().unwrap();
        assert!(!dir.path().join(LIVE_FILE).exists());
        let next = Fence::new(dir.path(), Duration::ZERO);
        assert!(next.check().is_err());
        next.renewed(Instant::now(), t(2_000));
        next.mark_live().unwrap();
        assert!(next.check().is_ok());
        assert!(dir.path().join(LIVE_FILE).is_file());
        fs::remove_file(dir.path().join(LIVE_FILE)).unwrap();
        next.mark_live().unwrap();
        assert!(!dir.path().join(LIVE_FILE).exists());
    }
}
