//! The owner side of a cluster node (issue 15 part 3): the partitions this node owns are
//! grouped, decided, claimed, processed and exported here, whichever node stored their
//! instances; and this node's own copies of instances whose batch is done (by whichever node
//! owned it) are released from its storage.
//!
//! Owns: the `owner` thread ([`run`]) and its connection to the cluster database, the feed of
//! the owned partitions' pending records into the patient map (what the checker and the rules
//! read, exactly as on a single node), cluster claims ([`claimed`], [`expire`]: a transaction
//! that checks the partition's fencing token, `Coordinator::claim`), the assembly of a claimed
//! batch from copies read out of the storing nodes' folders (`batch::create_cluster`), its mark
//! as done ([`finish`]), the adoption of batches a previous owner left unfinished, and the
//! release of this node's copies of finished batches ([`release_finished`]).
//!
//! Must never write into another node's folder (it reads through `storage::inventory`, which
//! only reads), never release a copy of this node's before its batch is done in the cluster
//! database (processed and exported, expired, or moved aside to `failed/` with its reason on
//! the owner), and never release a copy newer than the one the batch took (a re-send since).
//!
//! With `[cluster]`, what this node acknowledges does not enter its own patient map: it is
//! published (`cluster::outbox`) and reaches the map of its partition's owner through the feed
//! (this node's too, when it owns the partition). Triggers: a patient is evaluated once it has
//! been quiet for `[trigger] quiet_seconds` at its owner (the "last association closed"
//! trigger needs open associations reported across nodes, not built yet) or when forced.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::batch::{self, ClusterBatch, Place};
use super::{now_ms, Context, Job, Who};
use crate::cluster::outbox::{Outbox, Settings};
use crate::cluster::{partition_of, ClusterError, Coordinator, Owned, Published};
use crate::config::ExpireAction;
use crate::patients::InstanceRecord;

/// Records read per feed statement.
const FEED_ROWS: i64 = 1000;
/// How often the feed reads every pending record of the owned partitions again (a
/// publication that took a smaller number may commit after one that took a larger).
const FULL_READ: Duration = Duration::from_secs(5);
/// How often this node looks for its copies of finished batches.
const RELEASE_EVERY: Duration = Duration::from_secs(1);

/// The owner side's shared state (in the pipeline's `Context` with `[cluster]`).
pub(crate) struct Owner {
    settings: Settings,
    outbox: Arc<Outbox>,
    /// Its own connection (the `cluster` thread's publishes and renews): the `owner` thread's
    /// feed and the workers' claims and stage changes, one at a time.
    coordinator: Mutex<Option<Coordinator>>,
    /// The SOP Instance UIDs in the patient map per grouping key, so that the feed's repeated
    /// reads add each instance once. An instance leaves it when a claim took it.
    seen: Mutex<HashMap<Vec<u8>, HashSet<String>>>,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("node_id", &self.settings.node_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Owner {
    pub(crate) fn new(settings: Settings, outbox: Arc<Outbox>) -> Owner {
        Owner {
            settings,
            outbox,
            coordinator: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on the connection, connecting first if there is none; a connection that
    /// failed is dropped (the next call connects again).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Coordinator) -> Result<T, ClusterError>,
    ) -> Result<T, ClusterError> {
        let mut c = lock(&self.coordinator);
        if c.is_none() {
            *c = Some(Coordinator::connect_to(
                &self.settings.database,
                &self.settings.node_id,
                self.settings.partitions,
                self.settings.lease,
            )?);
        }
        let Some(co) = c.as_mut() else {
            return Err(ClusterError::Invalid("no connection".into())); // not reached
        };
        let r = f(co);
        if let Err(ClusterError::Database(_)) = &r {
            *c = None;
        }
        r
    }

    /// The token this node owns `key`'s partition under, as of its last renewal.
    fn owned_of(&self, key: &[u8]) -> Option<Owned> {
        self.owned_partition(partition_of(key, self.settings.partitions))
    }

    fn owned_partition(&self, partition: u32) -> Option<Owned> {
        self.outbox
            .stats
            .owned()
            .into_iter()
            .find(|o| o.partition == partition)
    }

    /// Node `node_id`'s folder under the shared folder.
    fn node_dir(&self, node_id: &str) -> PathBuf {
        self.settings.shared_dir.join("nodes").join(node_id)
    }

    /// A claim took (or found taken) these instances of `key`: the feed may add them again
    /// once they are pending again (a re-send).
    fn forget_seen<'a>(&self, key: &[u8], uids: impl Iterator<Item = &'a str>) {
        let mut seen = lock(&self.seen);
        if let Some(s) = seen.get_mut(key) {
            for u in uids {
                s.remove(u);
            }
            if s.is_empty() {
                seen.remove(key);
            }
        }
    }
}

/// The map's record of a published instance (its path: where the storing node holds it).
fn record_of(owner: &Owner, p: &Published) -> InstanceRecord {
    let text = |s: &Option<String>| s.as_deref().map(Arc::from);
    InstanceRecord {
        sop_instance_uid: Arc::from(p.sop_instance_uid.as_str()),
        study_uid: text(&p.study_uid),
        series_uid: text(&p.series_uid),
        study_date: text(&p.study_date),
        path: owner.node_dir(&p.node_id).join(&p.location),
        bytes: p.bytes,
        inputs: p.inputs,
        instance_number: p.instance_number,
        images_in_acquisition: p.images_in_acquisition,
        number_of_slices: p.number_of_slices,
    }
}

/// The `owner` thread: follows the partitions this node owns (adopting what a previous owner
/// left unfinished, dropping the patients of partitions it lost), feeds their pending records
/// into the patient map, and releases this node's copies of finished batches.
pub(super) fn run(ctx: &Context, owner: &Owner) {
    let mut last: Vec<Owned> = Vec::new();
    let mut cursor = 0i64;
    let mut next_full = Instant::now();
    let mut next_release = Instant::now();
    let mut failing = false;
    while !ctx.shutdown.load(Ordering::Acquire) {
        let turn = (|| -> Result<(), ClusterError> {
            let owned = owner.outbox.stats.owned();
            if owned != last {
                follow(ctx, owner, &last, &owned)?;
                last = owned;
                cursor = 0;
            }
            if Instant::now() >= next_full {
                cursor = 0;
                next_full = Instant::now() + FULL_READ;
            }
            if !last.is_empty() {
                cursor = feed(ctx, owner, &last, cursor)?;
            }
            if Instant::now() >= next_release {
                release_finished(ctx, owner)?;
                next_release = Instant::now() + RELEASE_EVERY;
            }
            Ok(())
        })();
        match turn {
            Ok(()) => {
                if failing {
                    tracing::info!("cluster owner side: the cluster database answers again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cluster owner side: cannot reach the cluster database; retrying");
                }
                failing = true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The owned partitions changed (a rebalance, this process's join): adopt the unfinished
/// batches of each partition held under a newer token than they were claimed with, and drop
/// the patients of partitions no longer owned (their new owner reads them from the database).
fn follow(
    ctx: &Context,
    owner: &Owner,
    before: &[Owned],
    now: &[Owned],
) -> Result<(), ClusterError> {
    for o in now.iter().filter(|o| !before.contains(o)) {
        for id in owner.with(|c| c.adopt(*o))? {
            if batch::held_here(ctx, &id) {
                // This node's own batch (a restart resumed it from batches/, or it is in
                // failed/ or expired/): its finish uses the new token.
                tracing::info!(batch = %id, partition = o.partition, "cluster batch adopted under the new token");
                continue;
            }
            let rows = owner.with(|c| c.batch_records(&id))?;
            let Some(key) = rows.first().map(|r| r.grouping_key.clone()) else {
                continue;
            };
            tracing::warn!(batch = %id, partition = o.partition, instances = rows.len(), "adopting a cluster batch its previous owner left unfinished: it runs here again");
            ctx.send_job(Job::Build {
                id,
                key,
                cluster: ClusterBatch {
                    partition: o.partition,
                    fencing: o.fencing,
                },
                rows,
                place: Place::Batches,
            });
        }
    }
    let kept: HashSet<u32> = now.iter().map(|o| o.partition).collect();
    let parts = owner.settings.partitions;
    let p = &ctx.pipeline;
    let mut dropped = 0usize;
    p.map.for_each_patient(|patient, g| {
        if kept.contains(&partition_of(patient.key(), parts)) {
            return;
        }
        let v = patient.view(g);
        if let Some(c) = patient.claim(v.batch_seq, g) {
            dropped += c.records.len();
        }
    });
    lock(&owner.seen).retain(|key, _| kept.contains(&partition_of(key, parts)));
    if dropped > 0 {
        tracing::info!(
            instances = dropped,
            "partitions moved to another node: their pending instances are its to decide"
        );
    }
    Ok(())
}

/// Reads the pending records of the owned partitions published after `cursor` into the patient
/// map (each instance once); returns the new cursor.
fn feed(
    ctx: &Context,
    owner: &Owner,
    owned: &[Owned],
    mut cursor: i64,
) -> Result<i64, ClusterError> {
    let parts: Vec<u32> = owned.iter().map(|o| o.partition).collect();
    let map = &ctx.pipeline.map;
    loop {
        let rows = owner.with(|c| c.pending_records(&parts, cursor, FEED_ROWS))?;
        let n = rows.len() as i64;
        let now = now_ms();
        for (seq, p) in rows {
            cursor = cursor.max(seq);
            let new = lock(&owner.seen)
                .entry(p.grouping_key.clone())
                .or_default()
                .insert(p.sop_instance_uid.clone());
            if new {
                let record = record_of(owner, &p);
                map.insert(&p.grouping_key, record, now, &map.pin());
            }
        }
        if n < FEED_ROWS {
            return Ok(cursor);
        }
    }
}

/// A batch the checker claimed from the map (for processing, or `expire`): claimed in the
/// cluster database under this node's token, then assembled from the records that claim took
/// (the database's, which may hold more than the map showed) and run.
pub(super) fn claimed(
    ctx: &Context,
    owner: &Owner,
    key: Vec<u8>,
    records: Vec<InstanceRecord>,
    expire: bool,
) {
    let who = Who::new(&key, ctx.config.log.phi);
    let local: Vec<String> = records
        .iter()
        .map(|r| r.sop_instance_uid.to_string())
        .collect();
    let Some(owned) = owner.owned_of(&key) else {
        owner.forget_seen(&key, local.iter().map(String::as_str));
        tracing::info!(patient = %who.digest, patient_id = who.id, "the patient's partition moved to another node before its claim: that node decides it");
        return;
    };
    let id = batch::new_id(&key);
    match owner.with(|c| c.claim(owned, &key, &id)) {
        Ok(None) => owner.forget_seen(&key, local.iter().map(String::as_str)),
        Ok(Some(rows)) => {
            owner.forget_seen(
                &key,
                local
                    .iter()
                    .map(String::as_str)
                    .chain(rows.iter().map(|r| r.sop_instance_uid.as_str())),
            );
            let place = match (expire, ctx.config.patients.expire_action) {
                (false, _) => Place::Batches,
                (true, ExpireAction::Move) => Place::Expired,
                (true, ExpireAction::Delete) => {
                    // Nothing to keep: done at once, and the storing nodes delete theirs.
                    ctx.pipeline.stats.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(patient = %who.digest, patient_id = who.id, instances = rows.len(), batch = %id, "patient expired (cluster): its instances are deleted by the nodes that stored them");
                    finish_or_later(
                        ctx,
                        &id,
                        ClusterBatch {
                            partition: owned.partition,
                            fencing: owned.fencing,
                        },
                    );
                    return;
                }
            };
            build(
                ctx,
                owner,
                id,
                key,
                ClusterBatch {
                    partition: owned.partition,
                    fencing: owned.fencing,
                },
                rows,
                place,
            );
        }
        Err(e @ (ClusterError::Fenced { .. } | ClusterError::LeaseExpired)) => {
            owner.forget_seen(&key, local.iter().map(String::as_str));
            tracing::warn!(patient = %who.digest, patient_id = who.id, error = %e, "cluster claim refused: this node no longer owns the patient's partition (its new owner decides it)");
        }
        Err(e) => {
            let retry = ctx.backoff(1);
            tracing::warn!(patient = %who.digest, patient_id = who.id, error = %e, retry_in_s = retry.as_secs_f64(), "cluster claim failed; the patient goes back to collecting");
            let _ = ctx.given_back.send((key, records));
        }
    }
}

/// Assembles a claimed (or adopted) cluster batch and runs it; tried again later while the
/// storing nodes' folders cannot be read (the claim holds meanwhile).
pub(super) fn build(
    ctx: &Context,
    owner: &Owner,
    id: String,
    key: Vec<u8>,
    cluster: ClusterBatch,
    rows: Vec<Published>,
    place: Place,
) {
    let node_dir = |n: &str| owner.node_dir(n);
    match batch::create_cluster(ctx, &id, &key, cluster, &rows, &node_dir, place) {
        Ok(()) => match place {
            Place::Batches => {
                ctx.pipeline.stats.claimed.fetch_add(1, Ordering::Relaxed);
                batch::process(ctx, &id);
            }
            Place::Expired => {
                ctx.pipeline.stats.expired.fetch_add(1, Ordering::Relaxed);
                let who = Who::new(&key, ctx.config.log.phi);
                tracing::warn!(patient = %who.digest, patient_id = who.id, instances = rows.len(), batch = %id, "patient expired (cluster): its instances moved to expired/ here");
                finish_or_later(ctx, &id, cluster);
            }
        },
        Err(e) => {
            let retry = ctx.backoff(1);
            tracing::error!(batch = %id, error = %e, retry_in_s = retry.as_secs_f64(), "could not assemble a cluster batch from the nodes' folders; it stays claimed and is tried again");
            ctx.retry_later(
                retry,
                Job::Build {
                    id,
                    key,
                    cluster,
                    rows,
                    place,
                },
            );
        }
    }
}

/// Marks cluster batch `id` done in the cluster database (its nodes then release their copies
/// of its instances). True once that is so, or once the batch is another node's (deposed:
/// its new owner adopted it and runs it again: at least once across a change of owner); false
/// when the database could not be asked (try again).
pub(super) fn finish(ctx: &Context, id: &str, c: ClusterBatch) -> bool {
    let Some(owner) = &ctx.owner else {
        return true;
    };
    // The token this node holds the partition under now: a restart's join raised it, and the
    // adoption moved the batch to it.
    let owned = owner.owned_partition(c.partition).unwrap_or(c.owned());
    let mut r = owner.with(|co| co.set_stage(owned, id, "done"));
    if let (Err(ClusterError::Invalid(_)), true) = (&r, owned.fencing != c.fencing) {
        // Not adopted under the new token yet (the `owner` thread does it): do it now.
        r = owner.with(|co| {
            co.adopt(owned)
                .and_then(|_| co.set_stage(owned, id, "done"))
        });
    }
    match r {
        Ok(()) => {
            tracing::info!(batch = %id, partition = c.partition, "cluster batch done: the nodes that stored its instances release them");
            true
        }
        Err(e @ (ClusterError::Fenced { .. } | ClusterError::Invalid(_))) => {
            tracing::warn!(batch = %id, error = %e, "this node no longer holds the cluster batch: its new owner runs it again");
            true
        }
        Err(e) => {
            tracing::warn!(batch = %id, error = %e, "cannot mark the cluster batch done yet; tried again");
            false
        }
    }
}

/// [`finish`], or again after the outbox's first delay until it is done.
pub(super) fn finish_or_later(ctx: &Context, id: &str, c: ClusterBatch) {
    if !finish(ctx, id, c) {
        ctx.retry_later(
            ctx.backoff(1),
            Job::Finish {
                id: id.to_string(),
                cluster: c,
            },
        );
    }
}

/// Releases this node's copies of instances whose batch is done, then forgets their rows. A
/// copy newer than the batch's (a re-send stored since) stays, and so does its row until the
/// re-send's publication makes it pending again.
pub(super) fn release_finished(ctx: &Context, owner: &Owner) -> Result<(), ClusterError> {
    loop {
        let rows = owner.with(|c| c.finished_here(FEED_ROWS))?;
        let n = rows.len() as i64;
        let mut released = Vec::with_capacity(rows.len());
        for (p, batch_id) in rows {
            match release_local(ctx, &p) {
                Ok(true) => released.push((p.sop_instance_uid, batch_id, p.received_ms)),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(location = %p.location, error = %e, "cannot release a processed instance yet; tried again");
                }
            }
        }
        if released.is_empty() {
            return Ok(());
        }
        let forgot = owner.with(|c| c.forget(&released))?;
        tracing::debug!(
            released = released.len(),
            forgot,
            "released this node's copies of finished cluster batches"
        );
        if n < FEED_ROWS {
            return Ok(());
        }
    }
}

/// Releases this node's copy of `p` (its log record, or its file); `Ok(false)`: a newer copy
/// of the instance is stored here (kept).
fn release_local(ctx: &Context, p: &Published) -> std::io::Result<bool> {
    let Some(rel) = Path::new(&p.location)
        .strip_prefix("patients")
        .ok()
        .filter(|rel| {
            rel.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
    else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("location {:?} is not under patients/", p.location),
        ));
    };
    let mut newer = false;
    if let Some(t) = ctx.log.take(rel) {
        match ctx.log.read(t.latest) {
            Ok(i) if i.meta.received_ms <= p.received_ms => {
                let all: Vec<_> = t.all().collect();
                ctx.log.release(&all)?;
            }
            Ok(_) => {
                newer = true;
                ctx.log.untake(rel.to_path_buf(), t);
            }
            Err(e) => {
                ctx.log.untake(rel.to_path_buf(), t);
                return Err(e);
            }
        }
    }
    let file = ctx.data_dir.join("patients").join(rel);
    if file.is_file() {
        if crate::storage::modified_ms(&file) <= p.received_ms {
            std::fs::remove_file(&file)?;
            if let Some(dir) = file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        } else {
            newer = true;
        }
    }
    Ok(!newer)
}
