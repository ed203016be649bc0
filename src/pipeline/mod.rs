//! From stored instances to exported results: hand-off, triggers, claims, processing, export,
//! the retry outbox, expiry and restart recovery.
//!
//! Owns: the threads behind the reactors — ingest (queues → patient map), the checker (triggers
//! and sufficiency, claims each batch exactly once), the workers (move a claimed batch aside,
//! process, export, clean up) and the outbox scheduler (timed retries). Must never run on a
//! reactor thread, never block a reactor (reactors only push onto bounded lock-free queues), and
//! never delete data that was not exported: a batch leaves the data directory only after every
//! export succeeded, or moves to `failed/` (with `reason.txt`) or `expired/`.
//!
//! Flow of one patient:
//! 1. A reactor pushes [`Event::Stored`] per durable instance and [`Event::Closed`] per finished
//!    association onto its own bounded `ArrayQueue`; a full queue pauses that reactor's reading.
//! 2. Ingest inserts into [`PatientMap`], counts the open associations per patient, and flags a
//!    patient for evaluation when its last one closes (trigger a).
//! 3. The checker sweeps the map every `check_interval_ms` (or at once when rung): a flagged
//!    patient, one quiet for `quiet_seconds` (trigger b), or one recovered at start-up (trigger c)
//!    is evaluated against the rules; a sufficient batch is claimed by one CAS and handed to the
//!    workers. A patient idle past `expire_after`, with no open association that sent it
//!    something, is expired instead (never one still receiving: `claim_expired`).
//! 4. A worker moves the batch's files to `batches/<id>/files/` (same relative paths) and links
//!    them into `input/<input name>/`, runs processing, exports, and deletes the batch.
//!    Each stage is recorded in `batches/<id>/state` so a restart resumes where it stopped.
//!
//! With `[cluster]` (`owner`), step 2 publishes instead (the storing node's outbox), and the
//! partition's owner feeds the published rows into its map; its checker decides as in step 3;
//! the claim is also made in the cluster database under the partition's fencing token; step 4
//! copies the instances from the storing nodes' folders (read-only), asks the database before
//! processing and before exporting whether the batch is still this node's, and marks it done
//! there; the storing nodes then release their own copies.

pub mod batch;
pub mod export;
pub mod foreign;
mod owner;
pub mod priors;
pub mod process;
pub mod rules;

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::Config;
use crate::dicom::scan::Scanned;
use crate::dicom::tags;
use crate::doorbell::Doorbell;
use crate::patients::{
    Claimed, InstanceRecord, MapGuard, Patient, PatientMap, PatientView, Snapshot,
};
pub use batch::{held_records, on_disk as batches_on_disk, records_of, BatchOnDisk};
pub use process::{
    kill_running as kill_running_processing, BatchInfo, CommandProcessor, ProcessingError,
    ProcessingFailures, Processor,
};
use rules::Rules;

/// The input folder of instances kept although no `[[input]]` accepts them.
pub use crate::config::UNMATCHED_INPUT;

pub use crate::handoff::{
    at_the_door, now_ms, Arrival, AtTheDoor, Event, Handoff, INGEST_SWEEP, QUEUE_DEPTH, RING_AT,
};

/// How a pipeline log line names a patient: `patient` is always the digest of its grouping key
/// (its folder under `patients/`, the middle of its batch ids, what the status page and
/// `dicomgate ls` show beside the Patient ID), `patient_id` the key itself (the Patient ID by
/// default) only with `[log] phi = true`.
#[derive(Debug)]
pub(crate) struct Who {
    pub digest: String,
    pub id: Option<String>,
}

impl Who {
    pub(crate) fn new(key: &[u8], phi: bool) -> Who {
        Who {
            digest: crate::storage::patient_dir_name(key),
            id: phi.then(|| String::from_utf8_lossy(key).into_owned()),
        }
    }
}

/// Counters, logged at shutdown and readable by tests and library users.
#[derive(Debug, Default)]
pub struct Stats {
    pub claimed: AtomicU64,
    pub processed: AtomicU64,
    pub exported: AtomicU64,
    pub failed: AtomicU64,
    pub expired: AtomicU64,
    pub export_retries: AtomicU64,
    /// Jobs waiting in the outbox for their retry time.
    pub retries_waiting: AtomicU64,
    /// Instances that reached a patient within `[trigger] late_arrival_seconds` after one of
    /// its batches was claimed for processing (each starts or joins a new batch that waits for
    /// the rules again).
    pub late_arrivals: AtomicU64,
    /// Processing runs that ended (not those cut by a stop), those that failed (by kind), and
    /// the microseconds they took in all.
    pub processing_runs: AtomicU64,
    pub processing_failures: ProcessingFailures,
    pub processing_micros: AtomicU64,
    /// The same runs' durations, one observation each (`/metrics`'
    /// `dicomgate_processing_duration_seconds`).
    pub processing_seconds: ProcessingSeconds,
    /// Failed export attempts, by destination (the `[[export]]` index; one default folder
    /// export when there is none).
    pub export_failures: Vec<AtomicU64>,
}

/// Histogram of processing run durations: 0.1 s to ~55 min, doubling (a CT reconstruction or
/// an AI model takes seconds to minutes; a timeout is at most `[processing] timeout_seconds`).
#[derive(Debug, Clone)]
pub struct ProcessingSeconds(pub prometheus_client::metrics::histogram::Histogram);

impl Default for ProcessingSeconds {
    fn default() -> Self {
        ProcessingSeconds(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.1, 2.0, 16),
        ))
    }
}

impl Stats {
    fn new(destinations: usize) -> Stats {
        Stats {
            export_failures: (0..destinations).map(|_| AtomicU64::new(0)).collect(),
            ..Stats::default()
        }
    }
}

/// What reactors share with the pipeline.
pub struct Pipeline {
    /// The reactors' queues to ingest.
    pub handoff: Arc<Handoff>,
    checker_bell: Sender<()>,
    pub map: Arc<PatientMap>,
    pub rules: Rules,
    /// Tags the reactors scan: routing tags, the grouping tag, and every tag the rules read.
    pub wanted_tags: Vec<u32>,
    pub group_tag: u32,
    pub stats: Arc<Stats>,
    /// Jobs handed to the workers and not yet finished (due retries included once they are
    /// due): with empty queues, zero means the pipeline is idle ([`Pipeline::is_idle`]).
    active: AtomicUsize,
    /// The workers' queue (operator retries are handed to it from the HTTP thread).
    jobs: Sender<Job>,
    data_dir: PathBuf,
    shutdown: Arc<AtomicBool>,
    /// Grouping keys an operator forced ([`Pipeline::force`]), each with the batch it forced:
    /// the checker claims that batch at its next look, sufficient or not. A force holds for
    /// that batch only: whatever claims or expires it, or a later batch, drops it.
    forced: std::sync::Mutex<HashMap<Vec<u8>, u64>>,
    /// `[log] phi`: whether log lines show a patient's grouping key (see [`Who`]).
    phi: bool,
    /// The `kind = "priors"` input's retrievals, when the config has one.
    pub priors: Option<Arc<priors::Priors>>,
    /// With `[cluster]`: where every acknowledged instance goes to be published, and this
    /// node's id.
    outbox: Option<(Arc<crate::cluster::outbox::Outbox>, String)>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("handoff", &self.handoff)
            .field("rules", &self.rules)
            .field("wanted_tags", &self.wanted_tags)
            .field("group_tag", &self.group_tag)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Hands `job` to the workers, counted in [`Pipeline::is_idle`] until it is done.
    fn send_job(&self, job: Job) {
        self.active.fetch_add(1, Ordering::AcqRel);
        if self.jobs.send(job).is_err() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// An operator's retry (`POST /api/retry/{batch}`, `dicomgate retry`): moves failed batch
    /// `id` from `failed/` back into `batches/` with its attempts counted afresh, and hands it
    /// to the workers, which run it from the stage it failed in (processing, or export to the
    /// destinations without an `exports/<n>.done` marker). Refused while the node stops; a
    /// stop before the workers take it leaves it in `batches/`, resumed at the next start.
    pub fn retry_failed(&self, id: &str) -> Result<(), String> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err("the node is stopping".into());
        }
        batch::unfail(&self.data_dir, id)?;
        tracing::info!(batch = %id, "failed batch moved back to batches/ by an operator: running it again");
        self.send_job(Job::Process { id: id.to_string() });
        Ok(())
    }

    /// An operator's force (`POST /api/force/{patient}`, `dicomgate force`; mercure's "force
    /// complete"): the pending patient whose grouping key is `patient`, or whose folder name
    /// (the digest the status page shows) it is, has its batch claimed at the checker's next
    /// look whether or not the rules hold, and processed and exported as any batch. Returns
    /// the grouping key. Refused while the node stops, and for a patient with nothing pending.
    pub fn force(&self, patient: &str) -> Result<String, String> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err("the node is stopping".into());
        }
        if patient.is_empty() {
            // Instances without a Patient ID group under "": an unset variable must not force
            // them (name that patient by its folder name).
            return Err("no patient named (an empty key); give its folder name".into());
        }
        let g = self.map.pin();
        let found = self.map.get(patient.as_bytes(), &g).or_else(|| {
            self.map
                .patients(&g)
                .into_iter()
                .find(|p| crate::storage::patient_dir_name(p.key()) == patient)
        });
        let Some((p, v)) = found
            .map(|p| {
                let v = p.view(&g);
                (p, v)
            })
            .filter(|(_, v)| v.snapshot.instances > 0)
        else {
            return Err(format!("no pending patient {patient:?}"));
        };
        if v.open_associations > 0 {
            // What they send after the claim would start a batch of its own that may never be
            // sufficient, and expire: force once they are done.
            return Err(format!(
                "{} open association(s) still send to patient {patient:?}: force it once they end",
                v.open_associations
            ));
        }
        let key = p.key().to_vec();
        self.forced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), v.batch_seq);
        p.request_evaluation();
        let _ = self.checker_bell.try_send(());
        let key = String::from_utf8_lossy(&key).into_owned();
        let who = Who::new(key.as_bytes(), self.phi);
        tracing::info!(patient = %who.digest, patient_id = who.id, "forced by an operator: its batch is claimed now, sufficient or not");
        Ok(key)
    }

    /// Whether an operator forced batch `seq` of `key` (taken: a force claims one batch; a
    /// force for another batch of the patient, already claimed or expired, is dropped).
    fn take_forced(&self, key: &[u8], seq: u64) -> bool {
        let mut f = self
            .forced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !f.is_empty() && f.remove(key) == Some(seq)
    }

    /// The ids of the batches in `failed/`, oldest first.
    pub fn failed_ids(&self) -> Vec<String> {
        batch::failed_ids(&self.data_dir)
    }

    /// Nothing to ingest from the reactors and no job running or waiting for a worker (retries
    /// scheduled for later do not count): what a draining node waits for.
    pub fn is_idle(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0 && self.handoff.is_empty()
    }

    /// The grouping key and record draft (no path yet) for an instance with these values,
    /// sent by `from`.
    pub fn describe(
        &self,
        values: &Scanned,
        from: &rules::Sender<'_>,
    ) -> (Vec<u8>, InstanceRecord) {
        let (key, mut record) = describe(values, from, &self.rules, self.group_tag);
        if let Some(bit) = self
            .priors
            .as_ref()
            .and_then(|p| p.route(&key, record.study_uid.as_deref()))
        {
            record.inputs = bit; // a study retrieved as a prior: the priors input's alone
        }
        (key, record)
    }

    /// Wakes the ingest thread that owns reactor `reactor`'s queue (coalesced).
    pub fn ring(&self, reactor: usize) {
        self.handoff.ring(reactor);
    }

    /// The patient's batch may go as far as its priors are concerned (always, without a priors
    /// input).
    fn priors_gate(&self, key: &[u8], s: &Snapshot) -> Result<(), String> {
        let Some(p) = &self.priors else {
            return Ok(());
        };
        let i = p.bit.trailing_zeros() as usize;
        let have: u32 = s
            .series
            .iter()
            .map(|x| x.per_input.get(i).copied().unwrap_or(0))
            .sum();
        p.gate(key, have)
    }

    /// With `[cluster]`: the publication outbox.
    pub fn outbox(&self) -> Option<&Arc<crate::cluster::outbox::Outbox>> {
        self.outbox.as_ref().map(|(o, _)| o)
    }

    /// With `[cluster]`: queues an acknowledged (or recovered) instance for publication to
    /// the cluster database (issue 15 item 2; `cluster::outbox`). Its location is its path
    /// relative to the node's folder (its file, or the identity its log record has there).
    fn publish(&self, key: &[u8], record: &InstanceRecord, received_ms: u64) {
        let Some((outbox, node_id)) = &self.outbox else {
            return;
        };
        let location = record
            .path
            .strip_prefix(&self.data_dir)
            .unwrap_or(&record.path)
            .to_string_lossy()
            .into_owned();
        outbox.push(published(node_id, key, record, location, received_ms));
    }

    /// Asks for `key`'s priors when an arrival of `study_uid` joined `inputs` other than the
    /// priors input (after it is in the map, so the retrieval sees it as the batch's own).
    fn note_for_priors(&self, key: &[u8], inputs: u64, study_uid: Option<&str>) {
        if let Some(p) = &self.priors {
            if inputs != p.bit {
                p.note_patient(key, study_uid);
            }
        }
    }
}

/// `record` of `key` as node `node_id` publishes it, its bytes at `location` under the node's
/// folder.
pub(crate) fn published(
    node_id: &str,
    key: &[u8],
    record: &InstanceRecord,
    location: String,
    received_ms: u64,
) -> crate::cluster::Published {
    let text = |s: &Option<Arc<str>>| s.as_deref().map(str::to_string);
    crate::cluster::Published {
        node_id: node_id.to_string(),
        sop_instance_uid: record.sop_instance_uid.to_string(),
        grouping_key: key.to_vec(),
        study_uid: text(&record.study_uid),
        series_uid: text(&record.series_uid),
        location,
        bytes: record.bytes,
        inputs: record.inputs,
        received_ms,
        study_date: text(&record.study_date),
        instance_number: record.instance_number,
        images_in_acquisition: record.images_in_acquisition,
        number_of_slices: record.number_of_slices,
    }
}

impl crate::handoff::Door for Pipeline {
    fn describe(&self, values: &Scanned, from: &rules::Sender<'_>) -> (Vec<u8>, InstanceRecord) {
        Pipeline::describe(self, values, from)
    }
}

fn text_arc(values: &Scanned, tag: u32) -> Option<Arc<str>> {
    values.text(tag).filter(|s| !s.is_empty()).map(Arc::from)
}

fn number(values: &Scanned, tag: u32) -> u32 {
    // IS/US values: IS is text, US binary (Number of Slices is US).
    if tag == tags::NUMBER_OF_SLICES {
        return values.us(tag).map_or(0, u32::from);
    }
    values
        .text(tag)
        .and_then(|s| s.trim().parse::<i64>().ok())
        .map_or(0, |n| n.clamp(0, u32::MAX as i64) as u32)
}

fn describe(
    values: &Scanned,
    from: &rules::Sender<'_>,
    rules: &Rules,
    group_tag: u32,
) -> (Vec<u8>, InstanceRecord) {
    let key = values
        .raw(group_tag)
        .map(|v| {
            crate::dicom::vr::trim_padding(v)
                .trim_ascii_start()
                .to_vec()
        })
        .unwrap_or_default();
    let record = InstanceRecord {
        sop_instance_uid: text_arc(values, tags::SOP_INSTANCE_UID).unwrap_or_else(|| "".into()),
        study_uid: text_arc(values, tags::STUDY_INSTANCE_UID),
        series_uid: text_arc(values, tags::SERIES_INSTANCE_UID),
        study_date: text_arc(values, tags::STUDY_DATE),
        path: PathBuf::new(),
        bytes: 0,
        inputs: rules.accepting(values, from),
        instance_number: number(values, tags::INSTANCE_NUMBER),
        images_in_acquisition: number(values, tags::IMAGES_IN_ACQUISITION),
        number_of_slices: number(values, tags::NUMBER_OF_SLICES),
    };
    (key, record)
}

/// A unit of work for the workers.
#[derive(Debug)]
enum Job {
    /// A freshly claimed batch: move it aside, then process.
    Claimed {
        key: Vec<u8>,
        records: Vec<InstanceRecord>,
    },
    Process {
        id: String,
    },
    Export {
        id: String,
    },
    Expire {
        key: Vec<u8>,
        records: Vec<InstanceRecord>,
    },
    /// Asks the checker to evaluate a patient again (after a batch could not be created).
    Evaluate {
        key: Vec<u8>,
    },
    /// With `[cluster]`: a batch claimed (or adopted) in the cluster database, to assemble
    /// from the storing nodes' folders and run (`owner::build`).
    Build {
        id: String,
        key: Vec<u8>,
        cluster: batch::ClusterBatch,
        rows: Vec<crate::cluster::Published>,
        place: batch::Place,
    },
    /// With `[cluster]`: marks a batch done in the cluster database (`owner::finish`).
    Finish {
        id: String,
        cluster: batch::ClusterBatch,
    },
}

/// A job due at a time (the outbox's retry schedule).
#[derive(Debug)]
struct Timed {
    due: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Earliest first in a max-heap.
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// Everything the pipeline's threads share.
pub(crate) struct Context {
    pub config: Config,
    pub data_dir: PathBuf,
    pub pipeline: Arc<Pipeline>,
    pub processor: Option<Arc<dyn Processor>>,
    /// Where small instances wait until their batch is claimed (storage's segment log).
    pub log: Arc<crate::storage::log::Log>,
    later: Sender<(Duration, Job)>,
    /// Claimed batches that could not be set aside, back to the checker (which alone puts
    /// them in the map again, so it does not count them as late arrivals).
    given_back: Sender<(Vec<u8>, Vec<InstanceRecord>)>,
    pub shutdown: Arc<AtomicBool>,
    /// With `[cluster]`: the owner side (`owner`): this node's map holds the patients of the
    /// partitions it owns, whichever node stored them, not what it acknowledged itself.
    owner: Option<Arc<owner::Owner>>,
}

/// Starts the pipeline behind the reactors' `handoff` queues: recovers the data directory,
/// then starts ingest (one thread per [`Handoff::ingest_share`]), checker, scheduler and worker
/// threads. `processor` overrides `[processing]` (library users' Rust processing); `log` is
/// storage's segment log.
pub fn start(
    config: &Config,
    handoff: Arc<Handoff>,
    processor: Option<Arc<dyn Processor>>,
    log: Arc<crate::storage::log::Log>,
    cluster: Option<(
        Arc<crate::cluster::outbox::Outbox>,
        crate::cluster::outbox::Settings,
    )>,
    shutdown: Arc<AtomicBool>,
) -> io::Result<(Arc<Pipeline>, Vec<JoinHandle<()>>)> {
    let (outbox, owner) = match cluster {
        Some((o, settings)) => (
            Some(o.clone()),
            Some(Arc::new(owner::Owner::new(settings, o))),
        ),
        None => (None, None),
    };
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
    // `[[export]] inputs` routes the instances of router mode; processing output belongs to no
    // input. The config refuses it beside `[processing]`; a library `Processor` is only known
    // here (before, it was accepted and then ignored: every destination got everything).
    if processor.is_some() {
        if let Some(i) = config.exports.iter().position(|e| !e.inputs.is_empty()) {
            return Err(invalid(format!(
                "export {i}: inputs applies in router mode only, and this node is started with \
                 a Rust Processor, whose output belongs to no input: remove inputs from \
                 [[export]] (every destination gets the whole output)"
            )));
        }
    }
    config.check_rules().map_err(invalid)?;
    let rules = Rules::compile(&config.inputs).map_err(invalid)?;
    let group_tag = config.group_by_tag().map_err(invalid)?;
    let priors = priors::Priors::load(config, &rules)?.map(Arc::new);
    if priors.is_some() && group_tag != tags::PATIENT_ID {
        return Err(invalid(
            "a kind = \"priors\" input queries by Patient ID: [patients] group_by must be \
             PatientID"
                .into(),
        ));
    }
    let mut wanted: Vec<u32> = tags::ROUTING.to_vec();
    wanted.extend_from_slice(&rules.tags);
    wanted.push(group_tag);
    wanted.sort_unstable();
    wanted.dedup();
    let (checker_bell, checker_rx) = crossbeam_channel::bounded(1);
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
    let pipeline = Arc::new(Pipeline {
        handoff: handoff.clone(),
        checker_bell,
        map: Arc::new(PatientMap::new(config.patients.map_buckets)),
        rules,
        wanted_tags: wanted,
        group_tag,
        stats: Arc::new(Stats::new(config.exports.len().max(1))),
        active: AtomicUsize::new(0),
        jobs: jobs_tx,
        data_dir: config.node.data_dir.clone(),
        shutdown: shutdown.clone(),
        forced: Default::default(),
        phi: config.log.phi,
        priors,
        outbox: outbox.zip(config.cluster.as_ref().map(|c| c.node_id.clone())),
    });
    let processor: Option<Arc<dyn Processor>> = processor.or_else(|| {
        config
            .processing
            .as_ref()
            .map(|p| Arc::new(CommandProcessor::new(p.clone(), shutdown.clone())) as _)
    });
    let (later_tx, later_rx) = crossbeam_channel::unbounded();
    let (given_back_tx, given_back_rx) = crossbeam_channel::unbounded();
    let ctx = Arc::new(Context {
        config: config.clone(),
        data_dir: config.node.data_dir.clone(),
        pipeline: pipeline.clone(),
        processor,
        log,
        later: later_tx,
        given_back: given_back_tx,
        shutdown: shutdown.clone(),
        owner,
    });
    // Restart (trigger c): batches in flight resume (log records they consumed are released if
    // that had not become durable), pending instances re-enter the map.
    let resumed = batch::recover(&ctx)?;
    for j in resumed {
        ctx.send_job(j);
    }
    recover_patients(&ctx)?;
    if let Some(pr) = &ctx.pipeline.priors {
        let map = &ctx.pipeline.map;
        pr.prune(|key| map.get(key, &map.pin()).is_some());
    }
    // Locations in manifests are matched: the log may move records from now on.
    ctx.log.enable_compaction();

    let mut threads = Vec::new();
    for i in 0..handoff.ingest_threads() {
        let Some((rx, owned)) = handoff.ingest_share(i) else {
            continue;
        };
        let ctx = ctx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("{INGEST_THREAD}{i}"))
                .spawn(move || ingest(&ctx, &owned, rx))?,
        );
    }
    {
        let ctx = ctx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("checker".into())
                .spawn(move || checker(&ctx, checker_rx, given_back_rx))?,
        );
    }
    {
        let ctx = ctx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("outbox".into())
                .spawn(move || scheduler(&ctx, later_rx))?,
        );
    }
    if let Some(pr) = ctx.pipeline.priors.clone() {
        let ctx = ctx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("priors".into())
                .spawn(move || {
                    let map = ctx.pipeline.map.clone();
                    let i = pr.bit.trailing_zeros() as usize;
                    // The studies the patient's batch holds that are not priors.
                    let current = move |key: &[u8]| -> Vec<String> {
                        let g = map.pin();
                        let Some(patient) = map.get(key, &g) else {
                            return Vec::new();
                        };
                        let v = patient.view(&g);
                        let mut out: Vec<String> = v
                            .snapshot
                            .series
                            .iter()
                            .filter(|x| {
                                x.per_input
                                    .iter()
                                    .enumerate()
                                    .any(|(j, n)| j != i && *n > 0)
                                    || x.per_input.iter().all(|n| *n == 0)
                            })
                            .filter_map(|x| x.study_uid.as_deref().map(str::to_string))
                            .collect();
                        out.sort();
                        out.dedup();
                        out
                    };
                    let evaluate = |key: Vec<u8>| ctx.send_job(Job::Evaluate { key });
                    priors::run(&pr, &current, &evaluate, &ctx.shutdown)
                })?,
        );
    }
    if let Some(o) = ctx.owner.clone() {
        let ctx = ctx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("owner".into())
                .spawn(move || owner::run(&ctx, &o))?,
        );
    }
    for i in 0..config.outbox.workers.max(1) {
        let ctx = ctx.clone();
        let rx = jobs_rx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || worker(&ctx, rx))?,
        );
    }
    Ok((pipeline, threads))
}

/// Re-inserts every instance found under `patients/` and flags each patient for evaluation.
fn recover_patients(ctx: &Context) -> io::Result<()> {
    let root = ctx.data_dir.join("patients");
    let mut files = Vec::new();
    crate::storage::inventory::walk_files(&root, &mut files)?;
    let map = &ctx.pipeline.map;
    // A pin per instance, not around the file reads: a pin held across the whole recovery
    // would keep every bucket copy it retires until the end.
    let mut instances = 0usize;
    for path in &files {
        if path.extension().is_none_or(|x| x != "dcm") {
            continue;
        }
        let Some((arrival, mtime)) = read_arrival(ctx, path) else {
            tracing::warn!(path = %path.display(), "unreadable instance left in place");
            continue;
        };
        let (inputs, study) = (arrival.record.inputs, arrival.record.study_uid.clone());
        ctx.pipeline
            .publish(&arrival.key, &arrival.record, arrival.received_ms);
        if ctx.owner.is_some() {
            // Its partition's owner reads it from the cluster database.
            instances += 1;
            continue;
        }
        map.insert(&arrival.key, arrival.record, mtime, &map.pin())
            .request_evaluation();
        ctx.pipeline
            .note_for_priors(&arrival.key, inputs, study.as_deref());
        instances += 1;
    }
    // Small instances waiting in the segment log.
    for (rel, loc) in ctx.log.live() {
        let path = root.join(&rel);
        // The file of the same instance stands for it in the map, but this newer copy is what
        // publication must name (as it did at ingest).
        let mut publish_only = false;
        if path.is_file() {
            // A file of the same instance is there too (re-sent with a size on the other side
            // of inline_max_bytes): the newer copy stays, the older goes.
            let Some(t) = ctx.log.take(&rel) else {
                continue;
            };
            if !batch::log_is_newer(ctx, &t, &path) {
                let all: Vec<_> = t.all().collect();
                if let Err(e) = ctx.log.release(&all) {
                    tracing::warn!(error = %e, "could not release a replaced log record");
                }
                continue; // the file was recovered above
            }
            ctx.log.untake(rel.clone(), t);
            // The file was recovered above too: that map record stands for the instance, and
            // the claim takes the newer log copy (batch::create).
            if ctx.pipeline.outbox.is_none() {
                continue;
            }
            publish_only = true;
        }
        let inst = match ctx.log.read(loc) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(path = %rel.display(), error = %e, "unreadable log record left in place");
                continue;
            }
        };
        let Some((key, mut record)) = describe_log_record(&ctx.pipeline, &ctx.config.node, &inst)
        else {
            tracing::warn!(path = %rel.display(), "log record that cannot be scanned left in place");
            continue;
        };
        record.path = path;
        let (inputs, study) = (record.inputs, record.study_uid.clone());
        ctx.pipeline.publish(&key, &record, inst.meta.received_ms);
        if publish_only || ctx.owner.is_some() {
            continue;
        }
        map.insert(&key, record, inst.meta.received_ms, &map.pin())
            .request_evaluation();
        ctx.pipeline.note_for_priors(&key, inputs, study.as_deref());
        instances += 1;
    }
    if instances > 0 {
        tracing::info!(
            instances,
            patients = map.len(),
            "recovered pending instances from the data directory"
        );
    }
    Ok(())
}

/// The sender of an instance recovered from disk, as storage kept it: its Calling AE Title
/// (the Source AE Title), its Called AE Title (the Receiving AE Title) and the requestor's
/// address, so that sender rules decide as they did when it was stored. An instance stored by
/// an older build kept only the Calling AE Title: its Called AE Title is then the node's own
/// when the node accepts no other, and it has no address (a `peer` rule does not hold for it).
fn recovered_sender<'a>(
    node: &'a crate::config::NodeConfig,
    source_ae_title: &'a str,
    receiving_ae_title: &'a str,
    requestor_address: &str,
) -> rules::Sender<'a> {
    let kept = |s: &'a str| Some(s.trim()).filter(|s| !s.is_empty());
    rules::Sender {
        calling_ae_title: kept(source_ae_title),
        called_ae_title: kept(receiving_ae_title)
            .or_else(|| (!node.accept_any_called_ae).then(|| node.ae_title.trim())),
        address: requestor_address.parse().ok(),
    }
}

/// The grouping key and record of a stored Part-10 file's bytes, as at its arrival (`bytes`
/// set; `path` left to the caller).
pub(crate) fn describe_part10(
    pipeline: &Pipeline,
    node: &crate::config::NodeConfig,
    bytes: &[u8],
) -> Option<(Vec<u8>, InstanceRecord)> {
    let parsed = crate::dicom::part10::parse(bytes)?;
    let ts = crate::dicom::transfer_syntax::by_uid(parsed.transfer_syntax_uid.as_bytes())?;
    let ds = bytes.get(parsed.data_set_offset..)?;
    let values = crate::dicom::scan::scan(ds, ts.encoding, &pipeline.wanted_tags).ok()?;
    let from = recovered_sender(
        node,
        &parsed.source_ae_title,
        &parsed.receiving_ae_title,
        &parsed.requestor_address,
    );
    let (key, mut record) = pipeline.describe(&values, &from);
    record.bytes = bytes.len() as u64;
    Some((key, record))
}

/// The grouping key and record of a segment-log record, as at its arrival (`bytes` set to
/// the size of the file it becomes; `path` left to the caller).
pub(crate) fn describe_log_record(
    pipeline: &Pipeline,
    node: &crate::config::NodeConfig,
    inst: &crate::storage::log::LogInstance,
) -> Option<(Vec<u8>, InstanceRecord)> {
    let ts = crate::dicom::transfer_syntax::by_uid(inst.meta.transfer_syntax_uid.as_bytes())?;
    let values =
        crate::dicom::scan::scan(&inst.data_set, ts.encoding, &pipeline.wanted_tags).ok()?;
    let m = &inst.meta;
    let from = recovered_sender(
        node,
        &m.source_ae_title,
        &m.receiving_ae_title,
        &m.requestor_address,
    );
    let (key, mut record) = pipeline.describe(&values, &from);
    record.bytes = crate::dicom::part10::file_len(&inst.file_meta(), inst.data_set.len());
    Some((key, record))
}

/// The arrival for a stored Part-10 file and its modification time in ms.
fn read_arrival(ctx: &Context, path: &Path) -> Option<(Arrival, u64)> {
    let bytes = std::fs::read(path).ok()?;
    let mtime = crate::storage::modified_ms(path);
    let (key, mut record) = describe_part10(&ctx.pipeline, &ctx.config.node, &bytes)?;
    record.path = path.to_path_buf();
    Some((
        Arrival {
            association: 0,
            key,
            record,
            received_ms: mtime,
        },
        mtime,
    ))
}

/// The name of an ingest thread, before its number (the node's stop joins them first).
pub const INGEST_THREAD: &str = "ingest-";

/// Ingest: drains its reactors' queues into the map. Keeps, per association, the patients it
/// touched (by identity), so each (association, patient) pair counts once as open. With
/// `[cluster]` it only publishes, and reports each (association, patient) pair as open until
/// the association closes (`owner::Owner::association_opened`).
fn ingest(ctx: &Context, owned: &[usize], bell: Arc<Doorbell>) {
    let p = &ctx.pipeline;
    let mut touched: HashMap<u64, Vec<Arc<Patient>>> = HashMap::new();
    // With `[cluster]`: the grouping keys each open association sent (`owner` reports them).
    let mut touched_keys: HashMap<u64, HashSet<Vec<u8>>> = HashMap::new();
    let on_close = ctx.config.trigger.on_association_close;
    // Test-only, debug builds only: with DICOMGATE_TEST_INGEST_STALL_UNTIL_STOP_MS=N, ingest
    // stops taking events at its first one until the node stops, then N ms more, so that the
    // reactors' queues fill and overflow (tests/cluster.rs). A release build has no such switch.
    #[cfg(debug_assertions)]
    let mut stall = std::env::var("DICOMGATE_TEST_INGEST_STALL_UNTIL_STOP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    loop {
        #[cfg(debug_assertions)]
        if let Some(ms) = stall.filter(|_| owned.iter().any(|&r| p.handoff.backlog(r) > 0)) {
            while !ctx.shutdown.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(ms));
            stall = None;
        }
        let mut any = false;
        let g = p.map.pin();
        for &r in owned {
            // Bounded drain per queue per round, so one busy reactor cannot starve another.
            let mut popped = false;
            for _ in 0..1024 {
                let Some(ev) = p.handoff.pop(r) else { break };
                popped = true;
                any = true;
                match ev {
                    Event::Stored { arrival, new } => {
                        let Arrival {
                            association,
                            key,
                            record,
                            received_ms,
                        } = *arrival;
                        if let Some(owner) = &ctx.owner {
                            // With `[cluster]`: published only; its partition's owner reads
                            // it into its map (`owner`), and counts this node's association
                            // as open on the patient (counted before the record is queued,
                            // so never published after it).
                            if association != 0 {
                                let keys = touched_keys.entry(association).or_default();
                                if !keys.contains(&key) {
                                    owner.association_opened(&key);
                                    keys.insert(key.clone());
                                }
                            }
                            p.publish(&key, &record, received_ms);
                            continue;
                        }
                        p.publish(&key, &record, received_ms);
                        // The arrival and the association are noted on the patient before the
                        // record is pushed, so a claim that takes the record sees both (expiry
                        // relies on it: `claim_expired`).
                        let now = now_ms();
                        let found = p.map.get_or_insert(&key, now, &g);
                        found.touch(now);
                        let mut opened = |pt: &Arc<Patient>| {
                            if association != 0 {
                                let list = touched.entry(association).or_default();
                                if !list.iter().any(|x| Arc::ptr_eq(x, pt)) {
                                    pt.association_opened();
                                    list.push(pt.clone());
                                }
                            }
                        };
                        opened(&found);
                        if new {
                            let (inputs, study) = (record.inputs, record.study_uid.clone());
                            let took = p.map.insert(&key, record, now, &g);
                            p.note_for_priors(&key, inputs, study.as_deref());
                            if !Arc::ptr_eq(&took, &found) {
                                // `found` was retired meanwhile (it was empty, so nothing of
                                // it can expire); the patient that took the record counts
                                // the association too.
                                opened(&took);
                            }
                        }
                    }
                    Event::Closed { association } => {
                        if let Some(owner) = &ctx.owner {
                            for key in touched_keys.remove(&association).unwrap_or_default() {
                                owner.association_closed(&key);
                            }
                            continue;
                        }
                        let mut rung = false;
                        for patient in touched.remove(&association).unwrap_or_default() {
                            if patient.association_closed() && on_close {
                                patient.request_evaluation();
                                rung = true;
                            }
                        }
                        if rung {
                            let _ = p.checker_bell.try_send(());
                        }
                    }
                }
            }
            if popped {
                // After the whole drain, so a reactor that found the queue full during it is
                // told too (store-fence-load with `push_or_notify`).
                p.handoff.room_made(r);
            }
        }
        drop(g);
        if !any {
            // Only once its reactors have ended too: an acknowledgement a reactor makes while
            // the node stops still reaches the map and (with `[cluster]`) the outbox, whose
            // clean leave says nothing acknowledged is left unpublished.
            if ctx.shutdown.load(Ordering::Acquire) && owned.iter().all(|&r| p.handoff.finished(r))
            {
                return;
            }
            let pending = || owned.iter().any(|&r| p.handoff.backlog(r) > 0);
            bell.wait(INGEST_SWEEP, pending);
        }
    }
}

/// The checker's memory of a patient whose batch it claimed for processing, kept for
/// `[trigger] late_arrival_seconds`: what arrives for that key meanwhile is a late arrival.
#[derive(Debug)]
struct RecentClaim {
    claimed_ms: u64,
    /// Instances of the patient's current batch already counted as late.
    counted: u32,
}

/// The checker: triggers, sufficiency, claims, expiry, retiring empty patients, and noticing
/// late arrivals.
fn checker(
    ctx: &Context,
    bell: Receiver<()>,
    given_back: Receiver<(Vec<u8>, Vec<InstanceRecord>)>,
) {
    let p = &ctx.pipeline;
    let t = &ctx.config.trigger;
    let quiet_ms = (t.quiet_seconds * 1000.0) as u64;
    let expire_ms = ctx.config.expire_after().as_millis() as u64;
    let late_ms = t.late_arrival_seconds.saturating_mul(1000);
    let interval = Duration::from_millis(t.check_interval_ms.max(10));
    // Only this thread reads or writes it (design rule 7: the map is the only shared state).
    let mut recent: HashMap<Vec<u8>, RecentClaim> = HashMap::new();
    while !ctx.shutdown.load(Ordering::Acquire) {
        let _ = bell.recv_timeout(interval);
        let now = now_ms();
        // Batches that could not be set aside (batch::create failed): back to collecting, as
        // arriving now, and evaluated again after the outbox's first delay.
        while let Ok((key, records)) = given_back.try_recv() {
            recent.remove(&key);
            {
                let g = p.map.pin();
                for r in records {
                    p.map.insert(&key, r, now, &g);
                }
            }
            ctx.retry_later(ctx.backoff(1), Job::Evaluate { key });
        }
        recent.retain(|_, r| now.saturating_sub(r.claimed_ms) < late_ms);
        // One pin per patient (issue 11 (4)): a sweep over many patients, with its claims and
        // rollbacks, never holds back the reclamation of what ingest retires meanwhile.
        p.map.for_each_patient(|patient, g| {
            let v = patient.view(g);
            if let Some(r) = recent.get_mut(patient.key()) {
                if v.snapshot.instances > r.counted {
                    let new = v.snapshot.instances - r.counted;
                    let total = p
                        .stats
                        .late_arrivals
                        .fetch_add(u64::from(new), Ordering::Relaxed)
                        + u64::from(new);
                    let since_claim_s = now.saturating_sub(r.claimed_ms) as f64 / 1000.0;
                    let who = Who::new(patient.key(), p.phi);
                    let msg = "late arrival: instances for a patient whose batch was already \
                               claimed; they start a new batch that waits for the rules again";
                    if r.counted == 0 {
                        tracing::info!(patient = %who.digest, patient_id = who.id, instances = new, since_claim_s, late_arrivals_total = total, "{msg}");
                    } else {
                        tracing::debug!(patient = %who.digest, patient_id = who.id, instances = new, since_claim_s, late_arrivals_total = total, "{msg}");
                    }
                    r.counted = v.snapshot.instances;
                }
            }
            if v.snapshot.instances == 0 {
                if v.open_associations == 0 {
                    patient.take_evaluation_request();
                    p.take_forced(patient.key(), v.batch_seq); // a force for a batch now gone
                    p.map.remove_if_empty(patient, g);
                }
                return;
            }
            let requested = patient.take_evaluation_request();
            let quiet = quiet_ms > 0
                && now.saturating_sub(v.last_arrival_ms) >= quiet_ms
                && patient.quiet_evaluated_ms.load(Ordering::Acquire) != v.last_arrival_ms;
            if quiet {
                patient
                    .quiet_evaluated_ms
                    .store(v.last_arrival_ms, Ordering::Release);
            }
            let who = Who::new(patient.key(), p.phi);
            let forced = requested && p.take_forced(patient.key(), v.batch_seq);
            if requested || quiet {
                let verdict = match forced {
                    true => Ok(()),
                    false => p
                        .rules
                        .sufficient(&v.snapshot)
                        .and_then(|()| p.priors_gate(patient.key(), &v.snapshot)),
                };
                match verdict {
                    Ok(()) => {
                        if claim(ctx, patient, v.batch_seq, forced, g) {
                            if let Some(pr) = &p.priors {
                                pr.claimed(patient.key());
                            }
                            let late = recent
                                .insert(
                                    patient.key().to_vec(),
                                    RecentClaim {
                                        claimed_ms: now,
                                        counted: 0,
                                    },
                                )
                                .map_or(0, |r| r.counted);
                            if late > 0 {
                                tracing::info!(patient = %who.digest, patient_id = who.id, late_instances = late, "a batch of late arrivals was claimed (a follow-up batch)");
                            }
                        }
                    }
                    Err(why) => tracing::debug!(patient = %who.digest, patient_id = who.id, reason = %why, "not sufficient yet"),
                }
            } else if let Some(c) = claim_expired(&p.map, patient, &v, now, expire_ms, g) {
                tracing::warn!(
                    patient = %who.digest,
                    patient_id = who.id,
                    instances = c.records.len(),
                    reason = "never sufficient, nothing new for [patients] expire_after, no open association",
                    "expiring a patient that never became sufficient"
                );
                if let Some(r) = recent.get_mut(patient.key()) {
                    r.counted = 0; // what comes next is counted afresh
                }
                if let Some(pr) = &p.priors {
                    pr.claimed(patient.key());
                }
                ctx.send_job(Job::Expire {
                    key: patient.key().to_vec(),
                    records: c.records,
                });
            }
        });
    }
}

/// Claims `patient`'s batch for expiry, if it may expire: no association that sent it
/// something is open, and nothing arrived for it for `expire_ms`, by `v` (the checker's view
/// this sweep) and again after the claim. A claim that took more than `v` showed, or that
/// raced an arrival or a new association, is undone: its records go back to collecting, with
/// their arrival time left as it was.
///
/// Why checking after the claim is enough: ingest notes an arrival (`touch`) and a new
/// association (`association_opened`) on the patient *before* it pushes the record (see
/// [`ingest`]), and the claim's CAS on the batch's head acquires every push it takes. So for
/// each record this claim took, its arrival time and its association are visible here. An
/// instance pushed after the claim goes to the patient's next batch and is not touched. (An
/// association is known to the pipeline from its first ingested instance on; one still sending
/// its first instance for a patient cannot be seen, and whatever it stores starts a new batch.)
fn claim_expired(
    map: &PatientMap,
    patient: &Arc<Patient>,
    v: &PatientView,
    now: u64,
    expire_ms: u64,
    g: &MapGuard,
) -> Option<Claimed> {
    let idle = |v: &PatientView| {
        v.open_associations == 0 && now.saturating_sub(v.last_arrival_ms) >= expire_ms
    };
    if !idle(v) {
        return None;
    }
    let c = patient.claim(v.batch_seq, g)?;
    let after = patient.view(g);
    if idle(&after)
        && after.last_arrival_ms == v.last_arrival_ms
        && c.records.len() == v.snapshot.instances as usize
    {
        return Some(c);
    }
    // Digest only: this helper has no config (and its unit tests none to give).
    let who = Who::new(patient.key(), false);
    tracing::info!(
        patient = %who.digest,
        patient_id = who.id,
        instances = c.records.len(),
        "an instance or association arrived while the patient was being expired; collecting again"
    );
    for r in c.records {
        // Its own arrival time, so the give-back does not restart the quiet or expiry clock.
        map.insert(patient.key(), r, v.last_arrival_ms, g);
    }
    None
}

/// Claims batch `seq` of `patient` for processing (`forced`: by an operator, whatever the
/// rules say); returns whether it was handed to the workers.
fn claim(ctx: &Context, patient: &Arc<Patient>, seq: u64, forced: bool, g: &MapGuard) -> bool {
    let p = &ctx.pipeline;
    let Some(c) = patient.claim(seq, g) else {
        return false;
    };
    // Instances pushed between the snapshot and the claim belong to the batch; if they broke
    // a rule (max_series, single_series, single study date), give the batch back to collecting.
    let verdict = match forced {
        true => Ok(()),
        false => p.rules.sufficient(&Snapshot::of(&c.records)),
    };
    if let Err(why) = verdict {
        let who = Who::new(patient.key(), p.phi);
        tracing::info!(
            patient = %who.digest,
            patient_id = who.id,
            reason = %why,
            "batch changed while being claimed; collecting again"
        );
        for r in c.records {
            p.map.insert(patient.key(), r, now_ms(), g);
        }
        return false;
    }
    p.stats.claimed.fetch_add(1, Ordering::Relaxed);
    ctx.send_job(Job::Claimed {
        key: patient.key().to_vec(),
        records: c.records,
    });
    true
}

/// Holds jobs until they are due (the outbox's backoff), then hands them to the workers.
fn scheduler(ctx: &Context, rx: Receiver<(Duration, Job)>) {
    let mut heap: BinaryHeap<Timed> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|t| t.due <= now) {
            if let Some(t) = heap.pop() {
                ctx.send_job(t.job);
            }
            ctx.pipeline
                .stats
                .retries_waiting
                .store(heap.len() as u64, Ordering::Relaxed);
        }
        let wait = heap
            .peek()
            .map_or(Duration::from_millis(200), |t| t.due - now)
            .min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok((delay, job)) => {
                seq += 1;
                heap.push(Timed {
                    due: Instant::now() + delay,
                    seq,
                    job,
                });
                ctx.pipeline
                    .stats
                    .retries_waiting
                    .store(heap.len() as u64, Ordering::Relaxed);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(_) => return,
        }
        if ctx.shutdown.load(Ordering::Acquire) {
            return;
        }
    }
}

fn worker(ctx: &Context, rx: Receiver<Job>) {
    loop {
        let job = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(j) => j,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if ctx.shutdown.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        if ctx.shutdown.load(Ordering::Acquire) {
            // Left on disk: a claimed batch not yet moved is still under patients/, others
            // are in batches/ with their state; the next start resumes them.
            ctx.pipeline.active.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        // Counted down however the job ends (a library Processor's panic included).
        struct Done<'a>(&'a AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _done = Done(&ctx.pipeline.active);
        run_job(ctx, job);
    }
}

fn run_job(ctx: &Context, job: Job) {
    {
        match job {
            Job::Claimed { key, records } if ctx.owner.is_some() => {
                if let Some(o) = &ctx.owner {
                    owner::claimed(ctx, o, key, records, false);
                }
            }
            Job::Expire { key, records } if ctx.owner.is_some() => {
                if let Some(o) = &ctx.owner {
                    owner::claimed(ctx, o, key, records, true);
                }
            }
            Job::Build {
                id,
                key,
                cluster,
                rows,
                place,
            } => {
                if let Some(o) = &ctx.owner {
                    owner::build(ctx, o, id, key, cluster, rows, place);
                }
            }
            Job::Finish { id, cluster } => owner::finish_again(ctx, &id, cluster),
            Job::Claimed { key, records } => match batch::create(ctx, &key, &records) {
                Ok(id) => batch::process(ctx, &id),
                Err(e) => {
                    let retry = ctx.backoff(1);
                    let who = Who::new(&key, ctx.config.log.phi);
                    tracing::error!(
                        patient = %who.digest,
                        patient_id = who.id,
                        instances = records.len(),
                        error = %e,
                        retry_in_s = retry.as_secs_f64(),
                        "could not set a claimed batch aside; its files stay pending and it goes back to collecting"
                    );
                    // The checker puts them back (and schedules the re-evaluation); if it has
                    // stopped, the node is stopping and a restart recovers them from disk.
                    let _ = ctx.given_back.send((key, records));
                }
            },
            Job::Evaluate { key } => {
                let p = &ctx.pipeline;
                let g = p.map.pin();
                if let Some(patient) = p.map.get(&key, &g) {
                    patient.request_evaluation();
                    let _ = p.checker_bell.try_send(());
                }
            }
            Job::Process { id } => batch::process(ctx, &id),
            Job::Export { id } => batch::export(ctx, &id),
            Job::Expire { key, records } => batch::expire(ctx, &key, records),
        }
    }
}

impl Context {
    /// Hands `job` to the workers, counted in [`Pipeline::is_idle`] until it is done.
    fn send_job(&self, job: Job) {
        self.pipeline.send_job(job);
    }

    /// Schedules `job` after `delay` (the outbox's backoff).
    fn retry_later(&self, delay: Duration, job: Job) {
        let _ = self.later.send((delay, job));
    }

    /// The backoff before retry number `attempt` (1-based).
    fn backoff(&self, attempt: u32) -> Duration {
        let o = &self.config.outbox;
        let d = o.first_delay_seconds * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        Duration::from_secs_f64(d.min(o.max_delay_seconds).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(sop: &str, series: &str, inputs: u64) -> InstanceRecord {
        InstanceRecord {
            sop_instance_uid: sop.into(),
            study_uid: Some("1.2.3".into()),
            series_uid: Some(series.into()),
            study_date: None,
            path: PathBuf::from(format!("/nonexistent/{sop}.dcm")),
            bytes: 10,
            inputs,
            instance_number: 0,
            images_in_acquisition: 0,
            number_of_slices: 0,
        }
    }

    const EXPIRE_MS: u64 = 1_000;

    /// Issue 11 (6): a sender paused longer than `expire_after` inside its association had the
    /// patient's batch expired under it. An open association keeps the patient, however old its
    /// last arrival.
    #[test]
    fn expiry_never_claims_a_patient_with_an_open_association() {
        let map = PatientMap::new(4);
        let g = map.pin();
        let patient = map.insert(b"P", rec("1", "s", 1), 0, &g);
        patient.association_opened();
        let v = patient.view(&g);
        assert!(claim_expired(&map, &patient, &v, 10 * EXPIRE_MS, EXPIRE_MS, &g).is_none());
        assert_eq!(
            patient.view(&g).snapshot.instances,
            1,
            "the batch was taken"
        );
        // Once it closes, the patient may expire.
        patient.association_closed();
        let v = patient.view(&g);
        let c = claim_expired(&map, &patient, &v, 10 * EXPIRE_MS, EXPIRE_MS, &g).unwrap();
        assert_eq!(c.records.len(), 1);
    }

    /// Issue 11 (6): an instance that reached the patient between the checker's view and its
    /// claim was expired with the rest although it had just arrived. The claim is undone: every
    /// record goes back to collecting.
    #[test]
    fn expiry_never_deletes_an_arrival_newer_than_expire_after() {
        let map = PatientMap::new(4);
        let g = map.pin();
        let patient = map.insert(b"P", rec("1", "s", 1), 0, &g);
        let v = patient.view(&g);
        // Arrives now, after the view was taken (as ingest does it: noted, then pushed).
        let now = 10 * EXPIRE_MS;
        patient.touch(now);
        map.insert(b"P", rec("2", "s", 1), now, &g);
        assert!(claim_expired(&map, &patient, &v, now, EXPIRE_MS, &g).is_none());
        let after = map.get(b"P", &g).unwrap().view(&g);
        assert_eq!(after.snapshot.instances, 2, "records lost: {after:?}");
        assert_eq!(after.last_arrival_ms, now);
    }
}
