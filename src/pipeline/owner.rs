//! The owner side of a cluster node (issue 15 part 3): the partitions this node owns are
//! grouped, decided, claimed, processed and exported here, whichever node stored their
//! instances; and this node's own copies of instances whose batch is done (by whichever node
//! owned it) are released from its storage.
//!
//! Owns: the `owner` thread ([`run`]) and its connection to the cluster database, the feed of
//! the owned partitions' pending records into the patient map (what the checker and the rules
//! read, exactly as on a single node), cluster claims ([`claimed`], batches and expiries: a
//! transaction that checks the partition's fencing token, `Coordinator::claim_instances`), the
//! assembly of a claimed
//! batch from copies read out of the storing nodes' folders (`batch::create_cluster`), its mark
//! as done ([`finish`]), the sweep that adopts what a previous owner left unfinished and runs
//! every unfinished batch of the owned partitions that is not running here ([`sweep`]), the
//! question whether a batch found here is still this node's ([`holder`]), and the release of
//! this node's copies of finished batches ([`release_finished`]).
//!
//! Must never write into another node's folder (it reads through `storage::inventory`, which
//! only reads), never release a copy of this node's before its batch is done in the cluster
//! database (processed and exported, expired, or moved aside to `failed/` with its reason on
//! the owner), never release a copy newer than the one the batch took (a re-send since), and
//! never claim an instance the patient map did not count.
//!
//! With `[cluster]`, what this node acknowledges does not enter its own patient map: it is
//! published (`cluster::outbox`) and reaches the map of its partition's owner through the feed
//! (this node's too, when it owns the partition). Triggers: a patient is evaluated once its
//! last association closed, at whichever nodes it was sent to (each node reports its open
//! associations per patient: [`Owner::association_opened`]; the owner follows them,
//! `follow_associations`), once it has been quiet for `[trigger] quiet_seconds` at its owner,
//! or when forced.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::batch::{self, ClusterBatch, Place};
use super::{now_ms, Context, Job, Who};
use crate::cluster::outbox::{Outbox, Settings};
use crate::cluster::{partition_of, BatchKind, ClusterError, Coordinator, Owned, Published};
use crate::config::ExpireAction;
use crate::patients::{InstanceRecord, Patient};

/// Records read per feed statement.
const FEED_ROWS: i64 = 1000;
/// How often the feed reads every pending record of the owned partitions again (a
/// publication that took a smaller number may commit after one that took a larger), and the
/// owner looks for batches of its partitions it should be running ([`sweep`]).
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
    /// The SOP Instance UIDs in the patient map per grouping key, each with the newest
    /// `received_ms` of a copy the feed read, so that the feed's repeated reads add each
    /// instance once and an expiry takes no copy its owner did not see. An instance leaves it when a claim
    /// took it.
    seen: Mutex<HashMap<Vec<u8>, HashMap<String, u64>>>,
    /// Cluster batches being assembled, or waiting to be tried again ([`build`]): neither a
    /// claim nor [`sweep`] starts a second assembly of one.
    building: Mutex<HashSet<String>>,
    /// Cluster batches whose mark as done waits for a retry ([`finish_or_later`]): one retry
    /// chain per batch, whoever asks again (the sweep, a failure, an expiry).
    finishing: Mutex<HashSet<String>>,
    /// Since when [`release_finished`] has been held back (`Outbox::release_gate`, or another
    /// node's takeover of this one), and whether that was logged.
    release_held: Mutex<Option<(Instant, bool)>>,
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
            building: Mutex::new(HashSet::new()),
            finishing: Mutex::new(HashSet::new()),
            release_held: Mutex::new(None),
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

    /// An association open at this node sent it its first instance of patient `key` (call it
    /// before that instance is queued for publication: `Pipeline::publish`); reported to the
    /// cluster database for the patient's owner ([`Outbox::association_opened`]).
    pub(crate) fn association_opened(&self, key: &[u8]) {
        self.outbox.association_opened(key);
    }

    /// That association closed ([`Outbox::association_closed`]).
    pub(crate) fn association_closed(&self, key: &[u8]) {
        self.outbox.association_closed(key);
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

/// The `owner` thread: follows the partitions this node owns (dropping the patients of
/// partitions it lost; the [`sweep`] adopts and runs what is left unfinished), feeds their
/// pending records into the patient map, and releases this node's copies of finished batches.
/// A failed step is logged and the others go on.
pub(super) fn run(ctx: &Context, owner: &Owner) {
    let mut last: Vec<Owned> = Vec::new();
    let mut cursor = 0i64;
    let mut next_full = Instant::now();
    let mut next_release = Instant::now();
    let mut failing = false;
    let mut sweep_failing = false;
    let mut associations = Associations::default();
    while !ctx.shutdown.load(Ordering::Acquire) {
        let turn = (|| -> Result<(), ClusterError> {
            let owned = owner.outbox.stats.owned();
            if owned != last {
                follow(ctx, owner, &owned);
                last = owned;
                cursor = 0;
                next_full = Instant::now();
            }
            if Instant::now() >= next_full {
                cursor = 0;
                next_full = Instant::now() + FULL_READ;
                // Its failure (the database away, the lease lapsed) stops neither the feed nor
                // the release; the next one tries again.
                match sweep(ctx, owner, &last) {
                    Ok(()) => sweep_failing = false,
                    Err(e) => {
                        if !sweep_failing {
                            tracing::warn!(error = %e, "cluster owner side: could not look for unfinished batches; tried again");
                        }
                        sweep_failing = true;
                    }
                }
            }
            if !last.is_empty() {
                cursor = feed(ctx, owner, &last, cursor, &mut associations.arrived)?;
            }
            if !last.is_empty() || !associations.open.is_empty() {
                follow_associations(ctx, owner, &last, &mut associations)?;
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

/// The owned partitions changed (a rebalance, this process's join): drops the patients of
/// partitions no longer owned (their new owner reads them from the database). What the new
/// ones hold is taken up by the [`sweep`] that follows at once.
fn follow(ctx: &Context, owner: &Owner, now: &[Owned]) {
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
}

/// Makes sure every batch of the owned partitions that is not done runs here: adopts those a
/// previous owner (or this node's previous process) claimed under an older token, then, for
/// each batch this node holds under its current token, assembles it again from its rows
/// unless it is here already (in `batches/`, or being assembled), finishes it if it is in
/// `failed/` or `expired/`, and marks it done if nothing is left to run (an expiry that
/// deletes; a batch whose every instance was re-sent since). Idempotent: run whenever the
/// owned partitions change and every [`FULL_READ`], so that nothing a crash, a lost job or a
/// failed statement left behind stays claimed.
fn sweep(ctx: &Context, owner: &Owner, owned: &[Owned]) -> Result<(), ClusterError> {
    for o in owned {
        let adopted = owner.with(|c| c.adopt(*o))?;
        for id in owner.with(|c| c.unfinished(*o))? {
            let (id, kind) = id;
            let was_adopted = adopted.contains(&id);
            let cluster = ClusterBatch {
                partition: o.partition,
                fencing: o.fencing,
            };
            if lock(&owner.building).contains(&id)
                || lock(&owner.finishing).contains(&id)
                || batch::in_batches(ctx, &id)
            {
                if was_adopted {
                    tracing::info!(batch = %id, partition = o.partition, "cluster batch adopted under the new token");
                }
                continue;
            }
            if batch::held_here(ctx, &id) {
                // In failed/ (with its reason) or expired/: only its mark is left.
                finish_or_later(ctx, &id, cluster);
                continue;
            }
            let place = match kind {
                BatchKind::Process => Place::Batches,
                BatchKind::ExpireMove => Place::Expired,
                BatchKind::ExpireDelete => {
                    tracing::info!(batch = %id, partition = o.partition, "an expiry left unfinished: done now (the nodes that stored its instances delete them)");
                    finish_or_later(ctx, &id, cluster);
                    continue;
                }
            };
            let rows = owner.with(|c| c.batch_records(&id))?;
            let Some(key) = rows.first().map(|r| r.grouping_key.clone()) else {
                tracing::info!(batch = %id, partition = o.partition, "a cluster batch whose instances were all re-sent since: nothing left to run, done");
                finish_or_later(ctx, &id, cluster);
                continue;
            };
            tracing::warn!(batch = %id, partition = o.partition, instances = rows.len(), adopted = was_adopted, "running a cluster batch claimed before and not running here: it is assembled again");
            lock(&owner.building).insert(id.clone());
            ctx.send_job(Job::Build {
                id,
                key,
                cluster,
                rows,
                place,
            });
        }
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
    arrived: &mut HashSet<Vec<u8>>,
) -> Result<i64, ClusterError> {
    let parts: Vec<u32> = owned.iter().map(|o| o.partition).collect();
    loop {
        // The rows go into the map under the connection's lock, which claims take too: a
        // claim commits before this read (which then does not return its rows) or after
        // they are in the map, never between (its rows would come back as pending ghosts).
        let n = owner.with(|c| {
            let rows = c.pending_records(&parts, cursor, FEED_ROWS)?;
            cursor = cursor.max(take_in(ctx, owner, &rows, arrived));
            Ok(rows.len() as i64)
        })?;
        if n < FEED_ROWS {
            return Ok(cursor);
        }
    }
}

/// Puts the pending records `rows` into the patient map, each instance once (call it under
/// the connection's lock: [`feed`]), noting the keys of those added in `arrived`; returns the
/// highest publication number among them.
fn take_in(
    ctx: &Context,
    owner: &Owner,
    rows: &[(i64, Published)],
    arrived: &mut HashSet<Vec<u8>>,
) -> i64 {
    let map = &ctx.pipeline.map;
    let now = now_ms();
    let mut seen = lock(&owner.seen);
    let mut highest = 0;
    for (seq, p) in rows {
        highest = highest.max(*seq);
        let uids = seen.entry(p.grouping_key.clone()).or_default();
        // A newer copy of an instance in the map (a re-send) is not added again: a batch
        // takes the newest copy, an expiry every copy read so far.
        match uids.get_mut(&p.sop_instance_uid) {
            Some(newest) => *newest = (*newest).max(p.received_ms),
            None => {
                uids.insert(p.sop_instance_uid.clone(), p.received_ms);
                let record = record_of(owner, p);
                map.insert(&p.grouping_key, record, now, &map.pin());
                if !arrived.contains(&p.grouping_key) {
                    arrived.insert(p.grouping_key.clone());
                }
            }
        }
    }
    highest
}

/// What the `owner` thread knows of the open associations of its patients across nodes.
#[derive(Default)]
struct Associations {
    /// Patients with an association open at a node that is live or not yet taken over
    /// (`Coordinator::open_keys`), each counted as one open association on the patient it was
    /// counted on (so that expiry and retirement wait).
    open: HashMap<Vec<u8>, Arc<Patient>>,
    /// Patients the feed added instances to since the last look (all of a partition just
    /// taken over: those with no association open are evaluated, as a single node evaluates
    /// what it recovers at start-up).
    arrived: HashSet<Vec<u8>>,
    /// Patients whose last association closed (or that got instances with none open), to be
    /// read again and evaluated (kept until that worked).
    closed: HashSet<Vec<u8>>,
}

/// Follows which patients of the owned partitions have an association open at a node that is
/// live or not yet taken over (`Coordinator::open_keys`: each node reports its own). A
/// patient newly open counts one open association in the map; one whose last association
/// closed, at whichever node (or whose dead node was taken over), or that got instances while
/// none was open, has its pending records read again, which the storing node
/// published before it reported the close, and is evaluated (`[trigger]
/// on_association_close`): the "last association closed" trigger across nodes.
fn follow_associations(
    ctx: &Context,
    owner: &Owner,
    owned: &[Owned],
    a: &mut Associations,
) -> Result<(), ClusterError> {
    let parts: HashSet<u32> = owned.iter().map(|o| o.partition).collect();
    let open: HashSet<Vec<u8>> = match parts.is_empty() {
        true => HashSet::new(),
        false => {
            let list: Vec<u32> = parts.iter().copied().collect();
            owner.with(|c| c.open_keys(&list))?.into_iter().collect()
        }
    };
    let map = &ctx.pipeline.map;
    let of = |key: &[u8]| partition_of(key, owner.settings.partitions);
    let on_close = ctx.config.trigger.on_association_close;
    let mut rung = false;
    {
        let g = map.pin();
        for key in &open {
            // A patient retired while it was counted (it was empty) is counted again on the
            // one that stands for its key now.
            if a.open.get(key).is_some_and(|p| !p.is_retired(&g)) {
                continue;
            }
            let patient = map.get_or_insert(key, now_ms(), &g);
            patient.association_opened();
            if let Some(old) = a.open.insert(key.clone(), patient) {
                old.association_closed();
            }
        }
        let closed: Vec<Vec<u8>> = a
            .open
            .keys()
            .filter(|k| !open.contains(*k))
            .cloned()
            .collect();
        for key in closed {
            let Some(patient) = a.open.remove(&key) else {
                continue;
            };
            if patient.association_closed() && on_close {
                a.closed.insert(key);
            }
        }
        // Instances whose associations closed before this look saw them open (a short one):
        // closed as well. (An association is reported open before its first instance.)
        for key in std::mem::take(&mut a.arrived) {
            if on_close && !open.contains(&key) {
                a.closed.insert(key);
            }
        }
    }
    // A partition lost meanwhile: its patients are its new owner's to evaluate.
    a.closed
        .retain(|k| parts.contains(&of(k)) && !open.contains(k));
    if !a.closed.is_empty() {
        let keys: Vec<Vec<u8>> = a.closed.iter().cloned().collect();
        // In slices, so that claims waiting for the connection are not held up by a partition
        // just taken over (all its patients are here).
        for slice in keys.chunks(FEED_ROWS as usize) {
            owner.with(|c| {
                let rows = c.pending_of(slice)?;
                take_in(ctx, owner, &rows, &mut HashSet::new());
                Ok(())
            })?;
        }
        let g = map.pin();
        for key in a.closed.drain() {
            if let Some(patient) = map.get(&key, &g) {
                patient.request_evaluation();
                rung = true;
            }
        }
    }
    if rung {
        let _ = ctx.pipeline.checker_bell.try_send(());
    }
    Ok(())
}

/// A batch the checker claimed from the map (for processing, or `expire`): claimed in the
/// cluster database under this node's token, exactly the instances the map claimed (their
/// newest copies; for an expiry, only the copies the map counted), then assembled from the
/// records that claim took and run.
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
    let kind = match (expire, ctx.config.patients.expire_action) {
        (false, _) => BatchKind::Process,
        (true, ExpireAction::Move) => BatchKind::ExpireMove,
        (true, ExpireAction::Delete) => BatchKind::ExpireDelete,
    };
    let instances: Vec<(String, u64)> = {
        let seen = lock(&owner.seen);
        let of_key = seen.get(&key);
        local
            .iter()
            .map(|u| {
                let counted = of_key.and_then(|s| s.get(u)).copied().unwrap_or(0);
                (u.clone(), if expire { counted } else { u64::MAX })
            })
            .collect()
    };
    let list: Vec<(&str, u64)> = instances.iter().map(|(u, t)| (u.as_str(), *t)).collect();
    let id = batch::new_id(&key);
    // In flight before it can exist in the database: the sweep must not assemble it too.
    lock(&owner.building).insert(id.clone());
    let cluster = ClusterBatch {
        partition: owned.partition,
        fencing: owned.fencing,
    };
    match owner.with(|c| c.claim_instances(owned, &key, &id, kind, &list)) {
        Ok(None) => {
            lock(&owner.building).remove(&id);
            owner.forget_seen(&key, local.iter().map(String::as_str));
        }
        Ok(Some(rows)) => {
            owner.forget_seen(&key, local.iter().map(String::as_str));
            if rows.len() != local.len() {
                tracing::warn!(patient = %who.digest, patient_id = who.id, batch = %id, claimed = rows.len(), counted = local.len(), "the cluster claim took fewer instances than the patient map counted (some were claimed before)");
            }
            let place = match kind {
                BatchKind::Process => Place::Batches,
                BatchKind::ExpireMove => Place::Expired,
                BatchKind::ExpireDelete => {
                    // Nothing to keep: done at once, and the storing nodes delete theirs.
                    lock(&owner.building).remove(&id);
                    ctx.pipeline.stats.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(patient = %who.digest, patient_id = who.id, instances = rows.len(), batch = %id, "patient expired (cluster): its instances are deleted by the nodes that stored them");
                    finish_or_later(ctx, &id, cluster);
                    return;
                }
            };
            build(ctx, owner, id, key, cluster, rows, place);
        }
        Err(e @ (ClusterError::Fenced { .. } | ClusterError::LeaseExpired)) => {
            lock(&owner.building).remove(&id);
            owner.forget_seen(&key, local.iter().map(String::as_str));
            tracing::warn!(patient = %who.digest, patient_id = who.id, error = %e, "cluster claim refused: this node no longer owns the patient's partition (its new owner decides it)");
        }
        Err(e) => {
            // The commit may have happened (its answer lost): then the sweep finds the batch
            // and runs it, and the map's next claim of these instances takes nothing.
            lock(&owner.building).remove(&id);
            let retry = ctx.backoff(1);
            tracing::warn!(patient = %who.digest, patient_id = who.id, error = %e, retry_in_s = retry.as_secs_f64(), "cluster claim failed; the patient goes back to collecting");
            let _ = ctx.given_back.send((key, records));
        }
    }
}

/// Assembles a claimed (or adopted) cluster batch and runs it; tried again later while the
/// storing nodes' folders cannot be read (the claim holds meanwhile). Dropped once this node
/// no longer owns the batch's partition (its new owner adopts and runs it).
pub(super) fn build(
    ctx: &Context,
    owner: &Owner,
    id: String,
    key: Vec<u8>,
    cluster: ClusterBatch,
    rows: Vec<Published>,
    place: Place,
) {
    let Some(now) = owner.owned_partition(cluster.partition) else {
        lock(&owner.building).remove(&id);
        tracing::warn!(batch = %id, partition = cluster.partition, "the batch's partition moved to another node before it was assembled: that node runs it");
        return;
    };
    let retry = |rows: Vec<Published>| {
        ctx.retry_later(
            ctx.backoff(1),
            Job::Build {
                id: id.clone(),
                key: key.clone(),
                cluster,
                rows,
                place,
            },
        );
    };
    // Asked again at every try: the batch may be done meanwhile (by this node: a sweep that
    // listed it before it finished; or by another, the partition having moved away and back),
    // and its rows may have changed (a re-send since makes its row pending again).
    match holder(ctx, &id) {
        Holder::Here => {}
        Holder::Unknown => {
            retry(rows);
            return;
        }
        h @ (Holder::Done | Holder::Elsewhere) => {
            lock(&owner.building).remove(&id);
            tracing::info!(batch = %id, holder = ?h, "a cluster batch to assemble is done or another node's: not run here");
            return;
        }
    }
    let rows = match owner.with(|c| c.batch_records(&id)) {
        Ok(r) if r.is_empty() => {
            lock(&owner.building).remove(&id);
            tracing::info!(batch = %id, "a cluster batch whose instances were all re-sent since: nothing left to run, done");
            finish_or_later(ctx, &id, cluster);
            return;
        }
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(batch = %id, error = %e, "cannot read the cluster batch's rows yet; tried again");
            retry(rows);
            return;
        }
    };
    // The token held now (a rejoin raised it; the sweep adopts the batch under it).
    let cluster = ClusterBatch {
        partition: now.partition,
        fencing: now.fencing,
    };
    let node_dir = |n: &str| owner.node_dir(n);
    let made = batch::create_cluster(ctx, &id, &key, cluster, &rows, &node_dir, place);
    if made.is_ok() {
        // In batches/ or expired/ now: the sweep sees it there.
        lock(&owner.building).remove(&id);
    }
    match made {
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

/// Who holds a cluster batch, as the cluster database says ([`holder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holder {
    /// This node, and it is not done.
    Here,
    /// Done by this node (exported, or moved to `failed/` with its reason; such a batch is
    /// back in `batches/` when `dicomgate retry` runs it again: its copies here are the only
    /// ones left), or forgotten (done, and every copy released).
    Done,
    /// Another node: it adopted the batch while this node was away or paused (and runs it,
    /// or ran it), or owns its partition now and will adopt it. This node's copies must not
    /// be processed or exported again.
    Elsewhere,
    /// The database cannot be asked now.
    Unknown,
}

/// Who holds cluster batch `id` ([`Holder`]); [`Holder::Here`] without `[cluster]` (a batch
/// made before `[cluster]` was removed from the config is this node's).
pub(super) fn holder(ctx: &Context, id: &str) -> Holder {
    let Some(owner) = &ctx.owner else {
        return Holder::Here;
    };
    let me = owner.settings.node_id.as_str();
    match owner.with(|c| c.batch_holder(id)) {
        Ok(Some((_, node, _))) if node != me => Holder::Elsewhere,
        // Its partition moved on (the new owner has not adopted it yet, and will): not this
        // node's to run any more; the storing nodes keep their copies until it is done.
        Ok(Some((stage, _, part))) if stage != "done" && part.as_deref() != Some(me) => {
            Holder::Elsewhere
        }
        Ok(Some((stage, _, _))) if stage != "done" => Holder::Here,
        Ok(_) => Holder::Done,
        Err(e) => {
            tracing::warn!(batch = %id, error = %e, "cannot ask the cluster database who holds the batch; tried again");
            Holder::Unknown
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
            // Refused under the token at hand. Still this node's in the database (its view
            // of its partitions is behind a rebalance it made, or the batch waits for its
            // adoption): try again later, never drop it and have it run once more.
            match holder(ctx, id) {
                Holder::Elsewhere | Holder::Done => {
                    tracing::warn!(batch = %id, error = %e, "this node no longer holds the cluster batch: its new owner runs it again");
                    true
                }
                Holder::Here | Holder::Unknown => {
                    tracing::warn!(batch = %id, error = %e, "cannot mark the cluster batch done under the token at hand yet; tried again");
                    false
                }
            }
        }
        Err(e) => {
            tracing::warn!(batch = %id, error = %e, "cannot mark the cluster batch done yet; tried again");
            false
        }
    }
}

/// [`finish`], or again after the outbox's first delay until it is done (one retry chain per
/// batch: none is added while one waits).
pub(super) fn finish_or_later(ctx: &Context, id: &str, c: ClusterBatch) {
    if finish(ctx, id, c) {
        return;
    }
    if let Some(o) = &ctx.owner {
        if !lock(&o.finishing).insert(id.to_string()) {
            return; // a retry waits already
        }
    }
    ctx.retry_later(
        ctx.backoff(1),
        Job::Finish {
            id: id.to_string(),
            cluster: c,
        },
    );
}

/// A [`Job::Finish`] retry: [`finish_or_later`] again, as the batch's retry chain.
pub(super) fn finish_again(ctx: &Context, id: &str, c: ClusterBatch) {
    if let Some(o) = &ctx.owner {
        lock(&o.finishing).remove(id);
    }
    finish_or_later(ctx, id, c);
}

/// Releases this node's copies of instances whose batch is done, then forgets their rows. A
/// copy newer than the batch's (a re-send stored since) stays, and so does its row until the
/// re-send's publication makes it pending again.
pub(super) fn release_finished(ctx: &Context, owner: &Owner) -> Result<(), ClusterError> {
    // Not while what the recovery or a rescan read from the folder may still be published
    // (`Outbox::release_gate`), nor while another node that took this one over may (its hold
    // runs): either would bring back the rows forgotten here.
    let gate = owner.outbox.release_gate();
    let held = match &gate {
        None => Some("its recovery's records to be published or a rescan of its folder to end"),
        Some(_) if owner.with(|c| c.being_taken_over())? => {
            Some("another node's takeover of it to end")
        }
        Some(_) => None,
    };
    if let Some(why) = held {
        let mut h = lock(&owner.release_held);
        let (since, told) = h.get_or_insert((Instant::now(), false));
        // Past a takeover's whole hold (three leases), which a node back from the dead may
        // wait out.
        if !*told && since.elapsed() >= owner.settings.lease * 4 {
            *told = true;
            tracing::warn!(
                waited_s = since.elapsed().as_secs(),
                "cluster: this node releases no processed copies until {why} (its disk fills \
                 meanwhile)"
            );
        }
        return Ok(());
    }
    *lock(&owner.release_held) = None;
    let mut after = (String::new(), String::new());
    loop {
        let rows = owner.with(|c| c.finished_here((&after.0, &after.1), FEED_ROWS))?;
        let n = rows.len() as i64;
        if let Some((p, b)) = rows.last() {
            after = (b.clone(), p.sop_instance_uid.clone());
        }
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
        if !released.is_empty() {
            let forgot = owner.with(|c| c.forget(&released))?;
            tracing::debug!(
                released = released.len(),
                forgot,
                "released this node's copies of finished cluster batches"
            );
        }
        if n < FEED_ROWS {
            return Ok(());
        }
    }
}

/// Releases this node's copy of `p` (its log record, or its file); `Ok(false)`: a newer copy
/// of the instance is stored here (kept).
fn release_local(ctx: &Context, p: &Published) -> std::io::Result<bool> {
    let Some(rel) = crate::storage::inventory::rel_of(&p.location) else {
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
