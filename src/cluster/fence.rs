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
//! Where no other node would take this one over, the node fences itself ([`Fence::own`]): at
//! a start with a new (absent or empty) folder, which the database may not know yet
//! ([`mark_new_node_dir`]), and at a clean leave that published everything (its row then
//! covers its last lease, so nobody lists its folder). Its own fence names the last lease it
//! set (none: the epoch), and refuses until the process's first renewal, which sets a later
//! one. A node that died without leaving is taken over, and needs no fence of its own.
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
//! makes into another node's folder) and by the node itself. Must never: block on the database, or let a store be
//! acknowledged when the fence cannot be read (a read error refuses, as a full disk does).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The fence's name in a node's folder (`shared_dir/nodes/<node_id>/`).
pub const FENCE_FILE: &str = "cluster-fence";

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
    /// This node's id: the writer named in a fence it wrote itself ([`Fence::own`]).
    node_id: String,
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
    /// The fence of node `node_id`, whose folder is `node_dir`, with leases of `lease`.
    pub fn new(node_dir: &Path, node_id: &str, lease: Duration) -> Fence {
        Fence {
            path: node_dir.join(FENCE_FILE),
            node_id: node_id.to_string(),
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
        let (fenced, writer) = match read_fence(&self.path) {
            Ok(None) => return Ok(()),
            Ok(Some(fence)) => fence,
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
            None if writer == self.node_id => Err(
                "not acknowledged: this cluster node has not reached the cluster database since \
                 it started, and no other node would publish what it stored (the database does \
                 not know it yet, or it left the cluster cleanly); it stores once it reaches \
                 the database"
                    .into(),
            ),
            _ => Err(
                "not acknowledged: another cluster node took this one over while it could not \
                 reach the cluster database; it stores again once it reconnects"
                    .into(),
            ),
        }
    }

    /// Writes this node's own fence, where no other node would take over what it acknowledges
    /// while cut off from the database: at its first start (the database has no row of it
    /// yet: [`mark_new_node_dir`]) and at a clean leave that published everything (its row
    /// then says "taken over", so nobody lists its folder until it has renewed again). Until
    /// this process's first renewal the node then refuses, as a node taken over in its
    /// previous life does. The fence names the last lease this process set (the epoch before
    /// any): every later renewal sets a later one, so from the first renewal on it no longer
    /// counts.
    pub fn own(&self, last_lease: Option<SystemTime>) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        write_fence(dir, last_lease.unwrap_or(UNIX_EPOCH), &self.node_id)
    }
}

/// At start-up, before the node's folder is locked or recovered: a folder that is absent or
/// empty is a node the database may not know (a first start, or its data lost), which no
/// other node would take over should it acknowledge while the database is away and then die.
/// Makes the folder and its own fence ([`Fence::own`]) naming no lease; true when it did.
pub fn mark_new_node_dir(node_dir: &Path, node_id: &str) -> io::Result<bool> {
    let empty = match fs::read_dir(node_dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(e),
    };
    if !empty {
        return Ok(false);
    }
    fs::create_dir_all(node_dir)?;
    write_fence(node_dir, UNIX_EPOCH, node_id)?;
    Ok(true)
}

/// The fence at `path`, or `None` when there is none: the lease it names (µs) and who wrote
/// it. An unreadable value counts as the latest lease (fenced): a torn write must not reopen
/// the gap.
fn read_fence(path: &Path) -> io::Result<Option<(i64, String)>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            let until = words.next().and_then(|v| v.parse().ok());
            let writer = words.next().unwrap_or_default().to_string();
            Ok(Some((until.unwrap_or(i64::MAX), writer)))
        }
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
        let fresh = Fence::new(dir.path(), "a", Duration::from_secs(3600));
        let stale = Fence::new(dir.path(), "a", Duration::ZERO);
        // Never renewed, no fence: acknowledged.
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
    fn a_node_refuses_until_its_first_renewal_after_its_own_fence() {
        let root = tempfile::tempdir().unwrap();
        let t = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        // A new folder gets the node's own fence; one holding anything does not.
        let dir = root.path().join("nodes").join("a");
        assert!(mark_new_node_dir(&dir, "a").unwrap());
        let stale = Fence::new(&dir, "a", Duration::ZERO);
        let refused = stale.check().unwrap_err();
        assert!(
            refused.contains("has not reached the cluster database"),
            "{refused}"
        );
        assert!(!mark_new_node_dir(&dir, "a").unwrap());
        let used = root.path().join("used");
        fs::create_dir_all(used.join("log")).unwrap();
        assert!(!mark_new_node_dir(&used, "a").unwrap());
        assert!(!used.join(FENCE_FILE).exists());
        // The first renewal lifts it, even with a lease that is not fresh.
        stale.renewed(Instant::now(), t(5_000));
        assert!(stale.check().is_ok());
        // A clean leave: its own fence names its last lease; the next process refuses until
        // it renews, and a renewal (a later lease) lifts it.
        stale.own(Some(t(5_000))).unwrap();
        let next = Fence::new(&dir, "a", Duration::ZERO);
        assert!(next.check().is_err());
        next.renewed(Instant::now(), t(9_000));
        assert!(next.check().is_ok());
        // Another node's fence of an earlier life is told apart in the answer.
        write_fence(&dir, t(9_000), "b").unwrap();
        let after = Fence::new(&dir, "a", Duration::ZERO);
        assert!(after.check().unwrap_err().contains("took this one over"));
    }
}
