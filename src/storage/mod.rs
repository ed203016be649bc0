//! Durable storage of received instances (design rule 6, "acknowledged means durable").
//!
//! Owns: the data directory layout, the segment log ([`log`]: small instances, one append and
//! one shared flush per group-commit round), the Part-10 files (their bytes are
//! [`crate::dicom::part10`]'s), group commit and the start-up
//! recovery scan. Instances above `inline_max_bytes` are written to an anonymous file (O_TMPFILE; a temporary name where the file
//! system has none) in its series directory — or, for a data set streamed as it arrived
//! ([`StreamFile`], [`Job::Write`]), in `incoming/` — flushed, linked under its final name (the same SOP
//! Instance UID received again replaces the stored copy atomically), and the directory is
//! flushed; only then is the store reported done, and only then does the reactor send the
//! C-STORE success. Workers take every job queued while they were flushing and make the whole
//! batch durable together (group commit), pipelined so that one flush carries one batch's data
//! and the previous batch's names: durability costs one flush round per batch, not per instance
//! (see `Committer::round`).
//!
//! Paths never hold peer text unchecked (design rule 9): a patient's directory is named by a
//! SHA-256 digest of its Patient ID (the ID itself is kept in the file and in `patient-id` inside
//! the directory); study, series and instance names are UIDs validated per PS3.5 §9.1, which
//! cannot be `.`, `..` or hold a separator. Must never run on a reactor thread, and knows no
//! pipeline type: what the pipeline is told of a durable instance is the reactor's business.

pub mod inventory;
pub mod log;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use sha2::{Digest, Sha256};

use crate::doorbell::Doorbell;

use crate::dicom::part10;

// Storage's jobs carry it (`StoreJob::meta`): re-exported so that the reactor and library
// users name storage's job types from one place.
pub use crate::dicom::part10::FileMeta;

pub use crate::config::Durability;

/// The largest data set a reactor appends to the log itself ([`Storage::append_here`]): a
/// pwrite of this much into the page cache takes some microseconds; larger ones go to the
/// storage workers, so a reactor never spends long on one connection's copy.
pub const APPEND_HERE_MAX: usize = 64 * 1024;

/// Where a finished store must be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyTo {
    pub reactor: usize,
    pub connection: usize,
    pub generation: u64,
}

/// One instance to store.
#[derive(Debug)]
pub struct StoreJob {
    pub reply: ReplyTo,
    /// Opaque to storage: the reactor's context for the response (message ID etc).
    pub token: u64,
    pub meta: FileMeta,
    pub patient_id: Vec<u8>,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub data_set: Vec<u8>,
    /// A data set already written to its (anonymous) file as it arrived, and its length;
    /// `data_set` is then empty.
    pub streamed: Option<(Arc<StreamFile>, u64)>,
}

/// Work for the storage workers.
#[derive(Debug)]
// A store is the common job: boxing it would cost an allocation per instance to save bytes in
// a queue of `queue_depth` slots.
#[allow(clippy::large_enum_variant)]
pub enum Job {
    Store(StoreJob),
    /// Write bytes of a streamed data set; reported through the `written` callback.
    Write(WriteJob),
    /// A streamed data set that will not be stored: its file goes when the last holder drops it
    /// (a worker, so that freeing a large file never runs on a reactor).
    Discard(Arc<StreamFile>),
}

impl From<StoreJob> for Job {
    fn from(j: StoreJob) -> Job {
        Job::Store(j)
    }
}

/// Bytes of a streamed data set, to be written at `offset` of its data set.
#[derive(Debug)]
pub struct WriteJob {
    pub reply: ReplyTo,
    pub token: u64,
    pub file: Arc<StreamFile>,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// A write of a streamed data set was done (or failed: the failure is reported when the store
/// is asked for).
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub reply: ReplyTo,
    pub token: u64,
    pub bytes: usize,
}

/// The file of a data set streamed to storage as its PDVs arrive (PS3.10 file: the meta
/// information header, then the data set). Born anonymous (O_TMPFILE) in the data directory's
/// `incoming/`, opened by the first write, written at explicit offsets by whichever worker takes
/// a write, and given its name by the store once the data set is complete and scanned: a crash
/// or a discarded stream leaves nothing behind.
pub struct StreamFile {
    dir: Arc<Path>,
    header: Vec<u8>,
    state: std::sync::Mutex<StreamState>,
}

enum StreamState {
    Unopened,
    Open(File),
    Failed(String),
    Taken,
}

impl std::fmt::Debug for StreamFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamFile")
            .field("header_len", &self.header.len())
            .finish_non_exhaustive()
    }
}

impl StreamFile {
    /// Writes `bytes` at `offset` of the data set; the first failure is kept and every later
    /// write skipped.
    fn write_at(&self, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let StreamState::Unopened = *state {
            *state = match open_anonymous(&self.dir).and_then(|f| {
                f.write_all_at(&self.header, 0)?;
                Ok(f)
            }) {
                Ok(f) => StreamState::Open(f),
                Err(e) => StreamState::Failed(format!("create failed: {e}")),
            };
        }
        if let StreamState::Open(f) = &*state {
            if let Err(e) = f.write_all_at(bytes, self.header.len() as u64 + offset) {
                *state = StreamState::Failed(format!("write failed: {e}"));
            }
        }
    }

    /// The written file, once: for the store that names it.
    fn take(&self) -> Result<File, String> {
        let Ok(mut state) = self.state.lock() else {
            return Err("stream state poisoned".into());
        };
        match std::mem::replace(&mut *state, StreamState::Taken) {
            StreamState::Open(f) => Ok(f),
            StreamState::Failed(e) => Err(e),
            StreamState::Unopened => Err("nothing was written".into()),
            StreamState::Taken => Err("stored twice".into()),
        }
    }

    fn header_len(&self) -> u64 {
        self.header.len() as u64
    }
}

/// The result of one store.
#[derive(Debug)]
pub struct StoreDone {
    pub reply: ReplyTo,
    pub token: u64,
    pub result: Result<StoredInstance, StoreError>,
}

/// Why an instance was not stored (answered 0xA700): what failed, and the kind of failure,
/// counted and logged apart (a full disk is not a failing one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    pub kind: StoreErrorKind,
    /// What failed and the system's words, e.g. "log write failed: No space left on device".
    pub message: String,
}

/// The kinds of [`StoreError`], from the I/O error's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreErrorKind {
    /// ENOSPC: the file system is full.
    NoSpace,
    /// EDQUOT: a quota is exhausted.
    Quota,
    /// EIO: the device failed.
    Io,
    /// EROFS: the file system became read-only (ext4 does so after an error).
    ReadOnly,
    /// The instance cannot be given a path (an invalid UID).
    Invalid,
    /// Durable, but the node may not acknowledge it (a cluster node taken over while cut off
    /// from the cluster database: `cluster::fence`).
    Fenced,
    /// Any other I/O error.
    Other,
}

impl StoreErrorKind {
    /// The `kind` label of `dicomgate_store_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            StoreErrorKind::NoSpace => "no_space",
            StoreErrorKind::Quota => "quota",
            StoreErrorKind::Io => "io",
            StoreErrorKind::ReadOnly => "read_only",
            StoreErrorKind::Invalid => "invalid",
            StoreErrorKind::Fenced => "fenced",
            StoreErrorKind::Other => "other",
        }
    }
}

impl StoreError {
    /// `what` failed with `e`.
    pub fn io(what: &str, e: &io::Error) -> StoreError {
        use rustix::io::Errno;
        let kind = match Errno::from_io_error(e) {
            Some(Errno::NOSPC) => StoreErrorKind::NoSpace,
            Some(Errno::DQUOT) => StoreErrorKind::Quota,
            Some(Errno::IO) => StoreErrorKind::Io,
            Some(Errno::ROFS) => StoreErrorKind::ReadOnly,
            _ => StoreErrorKind::Other,
        };
        StoreError {
            kind,
            message: format!("{what}: {e}"),
        }
    }

    pub fn invalid(what: &str) -> StoreError {
        StoreError {
            kind: StoreErrorKind::Invalid,
            message: what.to_string(),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A durable instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInstance {
    pub path: PathBuf,
    pub bytes: u64,
    /// False when the same SOP Instance UID was already stored for the patient and this copy
    /// replaced it: the pipeline must not count it twice.
    pub new: bool,
    /// When storage took it, in ms since the epoch, as a restart will read it back (its log
    /// record's time, or its file's modification time): the version of this copy that
    /// publication compares (`cluster::Published::received_ms`).
    pub received_ms: u64,
}

/// A file's modification time in ms since the epoch (now, should it not be readable).
pub fn modified_ms(path: &Path) -> u64 {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(now, |d| d.as_millis() as u64)
}

/// Hex SHA-256 prefix (128 bits) of a Patient ID: the patient's directory name.
pub fn patient_dir_name(patient_id: &[u8]) -> String {
    let d = Sha256::digest(patient_id);
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Placeholder directory names for objects without a study or series (not valid UIDs, so they
/// cannot collide with one).
pub(crate) const NO_STUDY: &str = "no-study";
pub(crate) const NO_SERIES: &str = "no-series";

/// The final path of an instance. `None` if a UID is not valid (the caller answers 0xC000).
pub fn instance_path(root: &Path, job: &StoreJob) -> Option<PathBuf> {
    let valid = |u: &str| crate::dicom::uid::is_valid_uid(u.as_bytes());
    if !valid(&job.meta.sop_instance_uid) {
        return None;
    }
    let study = job.study_uid.as_deref().unwrap_or(NO_STUDY);
    let series = job.series_uid.as_deref().unwrap_or(NO_SERIES);
    if job.study_uid.as_deref().is_some_and(|u| !valid(u))
        || job.series_uid.as_deref().is_some_and(|u| !valid(u))
    {
        return None;
    }
    let mut p = root.join("patients");
    p.push(patient_dir_name(&job.patient_id));
    p.push(study);
    p.push(series);
    p.push(format!("{}.dcm", job.meta.sop_instance_uid));
    Some(p)
}

/// The storage service: worker threads fed by a bounded queue, the segment log for small
/// instances and files for large ones.
#[derive(Debug, Clone)]
pub struct Storage {
    queue: Arc<JobQueue>,
    log: Arc<log::Log>,
    root: PathBuf,
    /// Data sets up to this many bytes go to the log (0: none do).
    inline_max: usize,
    /// Where streamed data sets are born; `None` when this file system has no anonymous files
    /// (data sets are then held whole until stored).
    incoming: Option<Arc<Path>>,
}

/// The bounded job queue the reactors fill and the workers drain.
struct JobQueue {
    jobs: ArrayQueue<Job>,
    bell: Doorbell,
    /// Bit `r % 64` set: reactor `r` found the queue full and waits to be told of room.
    space_wanted: AtomicU64,
    /// Called by a worker with the bits it cleared, after it took jobs off the queue.
    space: Arc<dyn Fn(u64) + Send + Sync>,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue")
            .field("len", &self.jobs.len())
            .field("space_wanted", &self.space_wanted)
            .finish_non_exhaustive()
    }
}

impl JobQueue {
    /// After taking jobs: tells the reactors that wait for room. Pairs with
    /// [`Storage::submit_or_notify`]: the pop, a SeqCst fence, then the load here; the reactor's
    /// fetch_or, then its second push attempt. Either the reactor's retry sees the room, or this
    /// load sees its bit (store-fence-load, as in the doorbell).
    fn room_made(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.space_wanted.load(Ordering::SeqCst) != 0 {
            let bits = self.space_wanted.swap(0, Ordering::SeqCst);
            if bits != 0 {
                (self.space)(bits);
            }
        }
    }
}

impl Storage {
    /// Starts `workers` threads writing under `data_dir`; `done` is called on a worker thread
    /// for every job, and `space` with a mask of the reactor bits (`reactor % 64`) that asked,
    /// through [`Storage::submit_or_notify`], to hear of room in the queue.
    pub fn start(
        data_dir: PathBuf,
        config: &crate::config::StorageConfig,
        done: OnDone,
        written: OnWritten,
        space: OnSpace,
        stop: Arc<AtomicBool>,
    ) -> io::Result<(Storage, Vec<std::thread::JoinHandle<()>>)> {
        let (workers, queue_depth, durability) =
            (config.workers, config.queue_depth, config.durability);
        let inline_max = config.inline_max_bytes;
        fs::create_dir_all(data_dir.join("patients"))?;
        recover(&data_dir)?;
        let (log, recovered, log_threads) = log::Log::open(
            data_dir.join("log"),
            config.segment_bytes,
            durability,
            done.clone(),
            stop.clone(),
        )?;
        if recovered.records > 0 || recovered.torn_bytes > 0 {
            tracing::info!(
                segments = recovered.segments,
                records = recovered.records,
                released = recovered.released,
                torn_bytes = recovered.torn_bytes,
                "segment log recovered"
            );
        }
        let anonymous =
            anonymous_files_work(&data_dir.join("patients"), &data_dir.join("patients"));
        if !anonymous {
            tracing::info!(
                "O_TMPFILE + linkat unavailable here: writing named temporary files, and holding \
                 each data set whole until it is stored (no streaming)"
            );
        }
        let incoming = data_dir.join("incoming");
        fs::create_dir_all(&incoming)?;
        // Streamed files are born in incoming/ and linked into patients/: both on one file
        // system (else every streamed store would fail at its link, EXDEV).
        let streams = anonymous && anonymous_files_work(&incoming, &data_dir.join("patients"));
        if anonymous && !streams {
            tracing::warn!(
                incoming = %incoming.display(),
                "incoming/ cannot link into patients/ (another file system?): data sets are held whole until stored (no streaming)"
            );
        }
        let incoming: Option<Arc<Path>> = streams.then(|| Arc::from(incoming.as_path()));
        let queue = Arc::new(JobQueue {
            jobs: ArrayQueue::new(queue_depth.max(1)),
            bell: Doorbell::new(),
            space_wanted: AtomicU64::new(0),
            space,
        });
        let seq = Arc::new(AtomicU64::new(0));
        let mut handles = log_threads;
        // fsync mode: flush threads, so that one round's fdatasync calls run at once.
        let flush_jobs = if durability == Durability::Fsync {
            let (tx, rx) = crossbeam_channel::unbounded::<FlushJob>();
            for i in 0..FLUSH_THREADS {
                let rx = rx.clone();
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("flush-{i}"))
                        .spawn(move || flusher(rx))?,
                );
            }
            Some(tx)
        } else {
            None
        };
        for i in 0..workers.max(1) {
            let ctx = WorkerContext {
                root: data_dir.clone(),
                rx: queue.clone(),
                durability,
                anonymous,
                done: done.clone(),
                written: written.clone(),
                seq: seq.clone(),
                stop: stop.clone(),
                flush_jobs: flush_jobs.clone(),
                log: log.clone(),
                inline_max,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("storage-{i}"))
                    .spawn(move || worker(ctx))?,
            );
        }
        drop(flush_jobs); // the flush threads end when the last worker does
        Ok((
            Storage {
                queue,
                log,
                root: data_dir,
                inline_max,
                incoming,
            },
            handles,
        ))
    }

    /// A new streamed data set's file (nothing is created until its first write), or `None`
    /// when data sets cannot be streamed here.
    pub fn stream(&self, meta: &FileMeta) -> Option<Arc<StreamFile>> {
        let dir = self.incoming.clone()?;
        Some(Arc::new(StreamFile {
            dir,
            header: part10::header(meta),
            state: std::sync::Mutex::new(StreamState::Unopened),
        }))
    }

    /// Whether data sets can be streamed to their files ([`Storage::stream`]).
    pub fn streams(&self) -> bool {
        self.incoming.is_some()
    }

    /// The segment log, for the pipeline (claims, expiry, recovery) and operators.
    pub fn log(&self) -> &Arc<log::Log> {
        &self.log
    }

    /// Appends a small store's record to the segment log on the calling (reactor) thread, to be
    /// acknowledged by the log's next flush round, which its flusher thread runs: no hand-off
    /// to a storage worker per instance (a thread wake-up each, the costliest step of a tiny
    /// store after the flush itself). The pwrite goes to the page cache; data sets above
    /// [`APPEND_HERE_MAX`] (or the log's `inline_max_bytes`), streamed ones and those for a
    /// file of their own come back, for [`Storage::try_submit`].
    #[allow(clippy::result_large_err)] // the job comes back to be queued
    pub fn append_here(&self, job: StoreJob) -> Result<(), StoreJob> {
        if job.data_set.len() > APPEND_HERE_MAX {
            return Err(job);
        }
        let entry = log_entry(&self.root, self.inline_max, job)?;
        match self.log.append_for_flusher(vec![entry]) {
            Ok(()) => Ok(()),
            // The log's lock was busy: the one job comes back, for a worker.
            Err(mut back) => match back.pop() {
                Some((job, _, _)) => Err(job),
                None => Ok(()), // one in, one back: not reached
            },
        }
    }

    /// Queues a job without blocking. A full queue hands the job back: the caller stops reading
    /// that peer until it can queue it (backpressure), it is never dropped.
    #[allow(clippy::result_large_err)] // the job comes back to be retried, not as an error value
    pub fn try_submit(&self, job: impl Into<Job>) -> Result<(), Job> {
        self.queue.jobs.push(job.into())?;
        self.queue.bell.ring();
        Ok(())
    }

    /// After `try_submit` found the queue full: asks to be told (the `space` callback, with bit
    /// `reactor % 64`) when a worker next takes jobs, then tries once more. A job that goes in
    /// here needs no wake-up; one that comes back will get one, so the caller can sleep
    /// without polling.
    #[allow(clippy::result_large_err)] // as try_submit
    pub fn submit_or_notify(&self, reactor: usize, job: Job) -> Result<(), Job> {
        self.queue
            .space_wanted
            .fetch_or(1 << (reactor % 64), Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.try_submit(job)
    }
}

/// One node per data directory: an exclusive `flock` on the data directory itself, held while
/// the node runs (the kernel lets go when the process ends, however it ends; deleting a file
/// cannot undo it). `<data_dir>/LOCK` holds the holder's PID, for the message a second node
/// gets. A local file system: over NFS, flock is only as good as the server's lock manager.
#[derive(Debug)]
pub struct DataDirLock {
    _dir: File,
}

/// Takes the data directory's lock, creating the directory; refused (naming the holder's PID)
/// while another process holds it.
pub fn lock_data_dir(data_dir: &Path) -> io::Result<DataDirLock> {
    use rustix::fs::{flock, FlockOperation};
    fs::create_dir_all(data_dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "data directory {} ([node] data_dir): {e}",
                data_dir.display()
            ),
        )
    })?;
    let path = data_dir.join("LOCK");
    let dir = File::open(data_dir)?;
    match flock(&dir, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // Written whole under a temporary name, so a reader never sees it half written.
            let tmp = data_dir.join("LOCK.tmp");
            fs::write(&tmp, format!("{}\n", std::process::id()))?;
            fs::rename(&tmp, &path)?;
            Ok(DataDirLock { _dir: dir })
        }
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = if holder.trim().is_empty() {
                "unknown".to_string()
            } else {
                holder.trim().to_string()
            };
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "data directory {} is in use by another dicomgate (pid {holder}): stop it, or \
                     give this node another [node] data_dir",
                    data_dir.display(),
                ),
            ))
        }
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot lock data directory {}: {e}", data_dir.display()),
        )),
    }
}

/// Removes temporary files a crash left behind: they were never acknowledged.
pub fn recover(data_dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let mut stack = vec![data_dir.join("patients")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "tmp") {
                fs::remove_file(&p)?;
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::warn!(
            removed,
            "removed unacknowledged temporary files left by a crash"
        );
    }
    Ok(removed)
}

struct Pending {
    job: StoreJob,
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
    bytes: u64,
    error: Option<StoreError>,
    new: bool,
}

/// Largest batch one worker writes in one round.
const MAX_BATCH: usize = 256;

/// A storage worker's whole context, moved into its thread once.
struct WorkerContext {
    root: PathBuf,
    rx: Arc<JobQueue>,
    durability: Durability,
    anonymous: bool,
    done: Arc<dyn Fn(StoreDone) + Send + Sync>,
    written: Arc<dyn Fn(Written) + Send + Sync>,
    seq: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    flush_jobs: Option<crossbeam_channel::Sender<FlushJob>>,
    log: Arc<log::Log>,
    inline_max: usize,
}

fn worker(ctx: WorkerContext) {
    let WorkerContext {
        root,
        rx,
        durability,
        anonymous,
        done,
        written,
        seq,
        stop,
        flush_jobs,
        log,
        inline_max,
    } = ctx;
    let pool = flush_jobs.map(FlushPool::new);
    let mut batch: Vec<StoreJob> = Vec::with_capacity(MAX_BATCH);
    let files = FileMode {
        pid: std::process::id(),
        anonymous,
    };
    let committer = Committer {
        root: &root,
        durability,
        files,
        seq: &seq,
        done: &*done,
        pool: pool.as_ref(),
    };
    // The batch whose files are named but whose names are not yet durable.
    let mut named = Named::default();
    loop {
        let mut popped = false;
        while batch.len() < MAX_BATCH {
            let job = rx.jobs.pop();
            popped |= job.is_some();
            match job {
                Some(Job::Store(j)) => batch.push(j),
                Some(Job::Write(w)) => {
                    // Streamed bytes go to the page cache at once; the store's flush makes
                    // them durable with the rest of its round.
                    w.file.write_at(w.offset, &w.bytes);
                    written(Written {
                        reply: w.reply,
                        token: w.token,
                        bytes: w.bytes.len(),
                    });
                }
                Some(Job::Discard(f)) => drop(f),
                None => break,
            }
        }
        if popped {
            // Any job taken (a write too) is room a waiting reactor may need.
            rx.room_made();
        }
        if batch.is_empty() && named.pending.is_empty() {
            // Exits once stopped and drained.
            if stop.load(Ordering::Acquire) {
                return;
            }
            rx.bell.wait(std::time::Duration::from_millis(100), || {
                !rx.jobs.is_empty()
            });
            continue;
        }
        if !rx.jobs.is_empty() {
            rx.bell.ring(); // more than one batch waiting: another worker takes the rest
        }
        // Small instances go to the log (acknowledged by its flusher), large ones to files.
        let mut small = Vec::new();
        let mut large = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            match log_entry(&root, inline_max, job) {
                Ok(entry) => small.push(entry),
                Err(job) => large.push(job),
            }
        }
        if !small.is_empty() {
            // The flusher leads every round of the log (and gathers it): a worker leading one
            // took the records at hand, a partial round, and the next ones waited for the next.
            log.append_for_flusher_blocking(small);
        }
        if !large.is_empty() || !named.pending.is_empty() {
            named = committer.round(large.into_iter(), named);
        }
    }
}

/// A store for the segment log, with its identity under `patients/` and its would-be path, or
/// the job back when it goes to a file of its own: a data set above `inline_max`, a streamed
/// one, or one whose UIDs make no valid path (the file path answers it "invalid UID").
#[allow(clippy::result_large_err)] // the job comes back to take the other path
fn log_entry(
    root: &Path,
    inline_max: usize,
    job: StoreJob,
) -> Result<(StoreJob, PathBuf, PathBuf), StoreJob> {
    if inline_max == 0 || job.data_set.len() > inline_max || job.streamed.is_some() {
        return Err(job);
    }
    match instance_path(root, &job) {
        Some(dest) => {
            let rel = dest
                .strip_prefix(root.join("patients"))
                .map(Path::to_path_buf)
                .unwrap_or_default();
            Ok((job, rel, dest))
        }
        None => Err(job),
    }
}

/// Files named by the previous round, waiting for their directory entries to be flushed.
#[derive(Default)]
struct Named {
    pending: Vec<Pending>,
    dirs: BTreeSet<PathBuf>,
}

/// What a worker's rounds need: where files go, how durable, how files are made, whom to
/// tell.
struct Committer<'a> {
    root: &'a Path,
    durability: Durability,
    files: FileMode,
    seq: &'a AtomicU64,
    done: &'a (dyn Fn(StoreDone) + Send + Sync),
    /// The flush threads (`fsync` mode); `None` flushes on the worker itself.
    pool: Option<&'a FlushPool>,
}

impl Committer<'_> {
    /// One group-commit round (design rule 6). A store needs two flushes: its data before its name
    /// appears, then its name. A round writes the new jobs, then makes durable in one flush both the
    /// new jobs' data and the previous round's names, acknowledges the previous round, and names
    /// the new jobs. Under load every round carries both halves, so durability costs one flush
    /// round per batch; when nothing new arrives the next round flushes the names alone at once.
    fn round(&self, jobs: impl Iterator<Item = StoreJob>, named: Named) -> Named {
        let Committer {
            root,
            durability,
            files,
            seq,
            done,
            pool,
        } = *self;
        let mut next = Named::default();
        next.pending = jobs
            .map(|job| write_temp(root, job, seq, files, &mut next.dirs))
            .collect();
        // The flush: new data (and entries of directories created for it), previous names.
        let (data_err, dir_err) = match durability {
            Durability::Fsync => {
                sync_data_all(&mut next.pending, pool);
                let dir_err = named
                    .dirs
                    .iter()
                    .map(|d| File::open(d).and_then(|f| f.sync_all()))
                    .find_map(Result::err);
                (None, dir_err)
            }
            Durability::Syncfs => match syncfs(root) {
                Ok(()) => (None, None),
                Err(e) => (Some(StoreError::io("syncfs failed", &e)), Some(e)),
            },
            Durability::None => (None, None),
        };
        acknowledge(named.pending, dir_err.as_ref(), done);
        for p in next.pending.iter_mut().filter(|p| p.error.is_none()) {
            let file = p.file.take();
            if let Some(e) = &data_err {
                p.error = Some(e.clone());
            } else {
                let placed = match &file {
                    Some(f) if files.anonymous => place_anonymous(f, &p.tmp, &p.dest),
                    _ => place(&p.tmp, &p.dest),
                };
                drop(file);
                match placed {
                    Err(e) => p.error = Some(StoreError::io("rename failed", &e)),
                    Ok(new) => {
                        p.new = new;
                        if let Some(d) = p.dest.parent() {
                            next.dirs.insert(d.to_path_buf());
                        }
                    }
                }
            }
        }
        next
    }

    /// Stores `jobs` completely: one round to write and name them, one to make the names
    /// durable.
    #[cfg(test)]
    fn commit(&self, jobs: impl Iterator<Item = StoreJob>) {
        let named = self.round(jobs, Named::default());
        let rest = self.round(std::iter::empty(), named);
        debug_assert!(rest.pending.is_empty());
    }
}

/// Threads that run fdatasync for the workers in `fsync` mode.
const FLUSH_THREADS: usize = 8;

type FlushResult = (usize, File, io::Result<()>);

/// Where storage sends a store's outcome (to the reactor that asked).
pub type OnDone = Arc<dyn Fn(StoreDone) + Send + Sync>;
/// Where storage sends a streamed write's completion.
pub type OnWritten = Arc<dyn Fn(Written) + Send + Sync>;
/// Called with the bits (`reactor % 64`) of the reactors that asked to hear of room in
/// storage's queue.
pub type OnSpace = Arc<dyn Fn(u64) + Send + Sync>;

struct FlushJob {
    file: File,
    index: usize,
    reply: crossbeam_channel::Sender<FlushResult>,
}

/// A worker's handle on the flush threads: where to send files, and its own reply channel.
struct FlushPool {
    jobs: crossbeam_channel::Sender<FlushJob>,
    reply_tx: crossbeam_channel::Sender<FlushResult>,
    reply_rx: crossbeam_channel::Receiver<FlushResult>,
}

impl FlushPool {
    fn new(jobs: crossbeam_channel::Sender<FlushJob>) -> FlushPool {
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        FlushPool {
            jobs,
            reply_tx,
            reply_rx,
        }
    }
}

/// A flush thread: runs until every worker (every job sender) is gone.
fn flusher(jobs: crossbeam_channel::Receiver<FlushJob>) {
    for job in jobs {
        let r = job.file.sync_data();
        let _ = job.reply.send((job.index, job.file, r));
    }
}

/// fdatasync of every written file. On ext4 each fdatasync ends with its own device cache flush,
/// so one after the other they cost one flush each; issued at once from the flush threads, the
/// journal commit and the block layer's flush sequence merge them (perf/RESULTS.md).
fn sync_data_all(pending: &mut [Pending], pool: Option<&FlushPool>) {
    let flush = |p: &mut Pending| {
        if let Some(Err(e)) = p.file.as_ref().map(File::sync_data) {
            p.error = Some(StoreError::io("flush failed", &e));
        }
    };
    let todo: Vec<usize> = (0..pending.len())
        .filter(|&i| pending[i].error.is_none() && pending[i].file.is_some())
        .collect();
    let pool = match pool {
        Some(pool) if todo.len() >= 2 => pool,
        _ => {
            for i in todo {
                flush(&mut pending[i]);
            }
            return;
        }
    };
    let mut sent = 0;
    for i in todo {
        let Some(file) = pending[i].file.take() else {
            continue;
        };
        let job = FlushJob {
            file,
            index: i,
            reply: pool.reply_tx.clone(),
        };
        match pool.jobs.send(job) {
            Ok(()) => sent += 1,
            Err(crossbeam_channel::SendError(job)) => {
                pending[i].file = Some(job.file);
                flush(&mut pending[i]);
            }
        }
    }
    for _ in 0..sent {
        let Ok((i, file, r)) = pool.reply_rx.recv() else {
            break;
        };
        if let Some(p) = pending.get_mut(i) {
            p.file = Some(file);
            if let Err(e) = r {
                p.error = Some(StoreError::io("flush failed", &e));
            }
        }
    }
}

/// Reports a batch whose names were just flushed (or failed to be).
fn acknowledge(
    pending: Vec<Pending>,
    dir_err: Option<&io::Error>,
    done: &(dyn Fn(StoreDone) + Send + Sync),
) {
    for p in pending {
        let result = match (p.error, dir_err) {
            (Some(e), _) => {
                let _ = fs::remove_file(&p.tmp);
                Err(e)
            }
            // The file is in place but its directory entry may not be durable: not acknowledged.
            // It is left where it is; a retry of the same instance replaces it atomically.
            (None, Some(e)) => Err(StoreError::io("directory flush failed", e)),
            (None, None) => Ok(StoredInstance {
                received_ms: modified_ms(&p.dest),
                path: p.dest,
                bytes: p.bytes,
                new: p.new,
            }),
        };
        done(StoreDone {
            reply: p.job.reply,
            token: p.job.token,
            result,
        });
    }
}

/// Renames `tmp` over `dest` atomically and says whether `dest` is new. An existing `dest` (the
/// same instance received again) is swapped out with RENAME_EXCHANGE rather than overwritten,
/// so "replaced" is decided by the same atomic step that replaces it: the pipeline may move
/// `dest` into a claimed batch at any moment, and then this store must count as new.
fn place(tmp: &Path, dest: &Path) -> io::Result<bool> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    for _ in 0..16 {
        match renameat_with(CWD, tmp, CWD, dest, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::EXIST) => {}
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                // A file system without renameat2 flags: plain rename, counted as new.
                fs::rename(tmp, dest)?;
                return Ok(true);
            }
            Err(e) => return Err(e.into()),
        }
        match renameat_with(CWD, tmp, CWD, dest, RenameFlags::EXCHANGE) {
            Ok(()) => {
                // `tmp` now holds the replaced copy.
                fs::remove_file(tmp)?;
                return Ok(false);
            }
            Err(rustix::io::Errno::NOENT) => continue, // moved away meanwhile: try again
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("destination kept appearing and vanishing"))
}

fn syncfs(root: &Path) -> io::Result<()> {
    let f = File::open(root)?;
    rustix::fs::syncfs(&f).map_err(io::Error::from)
}

/// Creates `dir` and any missing parents below `root`, recording the parents whose entries
/// changed so they are flushed with the batch.
fn ensure_dir(root: &Path, dir: &Path, dirty: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.is_dir() && d != root {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for m in missing.iter().rev() {
        match fs::create_dir(m) {
            Ok(()) => {
                if let Some(p) = m.parent() {
                    dirty.insert(p.to_path_buf());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a worker creates its files.
#[derive(Debug, Clone, Copy)]
struct FileMode {
    /// Part of every temporary name, so two nodes on one directory cannot collide.
    pid: u32,
    /// Files are born anonymous (O_TMPFILE) and linked under their final name.
    anonymous: bool,
}

/// Whether this file system gives us anonymous files (O_TMPFILE, Linux ≥ 3.11 on ext4, xfs,
/// btrfs, tmpfs) in `dir` that `linkat` through /proc/self/fd can name in `link_into`: one directory entry per instance
/// instead of a temporary entry renamed over the final one, and nothing left behind by a crash.
fn anonymous_files_work(dir: &Path, link_into: &Path) -> bool {
    let probe = link_into.join(format!(".probe.{}.tmp", std::process::id()));
    let ok = open_anonymous(dir)
        .and_then(|f| {
            link_fd(&f, &probe)?;
            Ok(())
        })
        .is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

fn open_anonymous(dir: &Path) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        dir,
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    )?;
    Ok(File::from(fd))
}

/// Gives an anonymous file the name `dest`; fails with `AlreadyExists` if it is taken.
fn link_fd(f: &File, dest: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        rustix::fs::CWD,
        dest,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// [`place`] for an anonymous file: linked straight under `dest` when that is free (the usual
/// case, decided atomically by `linkat`); otherwise linked as `tmp` and swapped in by `place`.
fn place_anonymous(f: &File, tmp: &Path, dest: &Path) -> io::Result<bool> {
    match link_fd(f, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            link_fd(f, tmp)?;
            place(tmp, dest)
        }
        Err(e) => Err(e),
    }
}

fn write_temp(
    root: &Path,
    job: StoreJob,
    seq: &AtomicU64,
    files: FileMode,
    dirty: &mut BTreeSet<PathBuf>,
) -> Pending {
    let pid = files.pid;
    let mut p = Pending {
        tmp: PathBuf::new(),
        dest: PathBuf::new(),
        file: None,
        bytes: 0,
        error: None,
        new: true,
        job,
    };
    let Some(dest) = instance_path(root, &p.job) else {
        p.error = Some(StoreError::invalid("invalid UID"));
        return p;
    };
    let (Some(series_dir), Some(patient_dir)) = (
        dest.parent().map(Path::to_path_buf),
        dest.parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .map(Path::to_path_buf),
    ) else {
        p.error = Some(StoreError::invalid("bad path"));
        return p;
    };
    let n = seq.fetch_add(1, Ordering::Relaxed);
    p.tmp = series_dir.join(format!(".{}.{pid}.{n}.tmp", p.job.meta.sop_instance_uid));
    p.dest = dest;
    let streamed = p.job.streamed.take();
    let r = (|| -> io::Result<(File, u64)> {
        if let Some((sf, data_set_len)) = &streamed {
            // Written already: only its directories may be missing.
            let f = sf.take().map_err(io::Error::other)?;
            let len = f.metadata()?.len();
            if len != sf.header_len() + data_set_len {
                return Err(io::Error::other(format!(
                    "streamed file holds {len} bytes, not {} + {data_set_len}",
                    sf.header_len()
                )));
            }
            if !series_dir.is_dir() {
                let new_patient = !patient_dir.is_dir();
                ensure_dir(root, &patient_dir, dirty)?;
                if new_patient || !patient_dir.join("patient-id").exists() {
                    write_patient_index(&patient_dir, &p.job.patient_id, n, pid, dirty)?;
                }
                ensure_dir(root, &series_dir, dirty)?;
            }
            return Ok((f, len));
        }
        let create = || {
            if files.anonymous {
                open_anonymous(&series_dir)
            } else {
                OpenOptions::new().write(true).create_new(true).open(&p.tmp)
            }
        };
        // Optimistic: the series directory usually exists (no stat per instance). A missing one
        // is created, patient directory and its `patient-id` first, so an existing series
        // directory implies an existing `patient-id`.
        let mut f = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let new_patient = !patient_dir.is_dir();
                ensure_dir(root, &patient_dir, dirty)?;
                if new_patient || !patient_dir.join("patient-id").exists() {
                    write_patient_index(&patient_dir, &p.job.patient_id, n, pid, dirty)?;
                }
                ensure_dir(root, &series_dir, dirty)?;
                create()?
            }
            r => r?,
        };
        let header = part10::header(&p.job.meta);
        write_all_vectored(&mut f, &header, &p.job.data_set)?;
        Ok((f, (header.len() + p.job.data_set.len()) as u64))
    })();
    match r {
        Ok((f, bytes)) => {
            p.file = Some(f);
            p.bytes = bytes;
        }
        Err(e) => {
            p.error = Some(StoreError::io("write failed", &e));
            let _ = fs::remove_file(&p.tmp);
        }
    }
    p
}

/// Writes the Part-10 header and the data set with as few `writev` calls as the kernel allows
/// (one, for a regular file), instead of one write each.
fn write_all_vectored(f: &mut File, header: &[u8], data_set: &[u8]) -> io::Result<()> {
    let mut bufs = [io::IoSlice::new(header), io::IoSlice::new(data_set)];
    let mut slices: &mut [io::IoSlice<'_>] = &mut bufs;
    while !slices.is_empty() {
        match f.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `patient-id` holds the raw Patient ID, so the digest directory can be mapped back. Two workers
/// may write it at once for a new patient: each uses its own temporary name (`seq` is unique per
/// write) and the renames replace each other with identical content.
fn write_patient_index(
    dir: &Path,
    id: &[u8],
    seq: u64,
    pid: u32,
    dirty: &mut BTreeSet<PathBuf>,
) -> io::Result<()> {
    let tmp = dir.join(format!(".patient-id.{pid}.{seq}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(id)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join("patient-id"))?;
    dirty.insert(dir.to_path_buf());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(uid: &str, pid: &[u8]) -> StoreJob {
        StoreJob {
            reply: ReplyTo {
                reactor: 0,
                connection: 0,
                generation: 0,
            },
            token: 1,
            meta: FileMeta {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: uid.into(),
                transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
                source_ae_title: "T".into(),
                ..FileMeta::default()
            },
            patient_id: pid.to_vec(),
            study_uid: Some("1.2".into()),
            series_uid: Some("1.2.3".into()),
            data_set: vec![0x10, 0, 0x20, 0, b'L', b'O', 2, 0, b'A', b'B'],
            streamed: None,
        }
    }

    #[test]
    fn paths_never_come_from_peer_text() {
        let root = Path::new("/data");
        let p = instance_path(root, &job("1.2.3.4", b"../../etc/passwd")).unwrap();
        assert!(p.starts_with("/data/patients/"));
        assert_eq!(p.components().count(), 7);
        assert!(!p.to_string_lossy().contains("etc"));
        assert!(instance_path(root, &job("../x", b"p")).is_none());
        let mut j = job("1.2", b"p");
        j.series_uid = Some("..".into());
        assert!(instance_path(root, &j).is_none());
    }

    #[test]
    fn commit_writes_part10_and_replaces_atomically() {
        let dir = std::env::temp_dir().join(format!("dicomgate-st-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("patients")).unwrap();
        // Where the test runs on a file system with O_TMPFILE, both ways of creating files.
        let anonymous = anonymous_files_work(&dir.join("patients"), &dir.join("patients"));
        fs::remove_dir_all(&dir).unwrap();
        for mode in [false, anonymous] {
            commit_round(
                &dir,
                FileMode {
                    pid: 1,
                    anonymous: mode,
                },
            );
        }
    }

    fn commit_round(dir: &Path, files: FileMode) {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir.join("patients")).unwrap();
        let results = std::sync::Mutex::new(Vec::new());
        let done = |d: StoreDone| results.lock().unwrap().push(d);
        let seq = AtomicU64::new(0);
        for d in [Durability::Fsync, Durability::Syncfs, Durability::None] {
            let committer = Committer {
                root: dir,
                durability: d,
                files,
                seq: &seq,
                done: &done,
                pool: None,
            };
            committer.commit(vec![job("1.2.3.4", b"PAT"), job("1.2.3.5", b"PAT")].into_iter());
        }
        let r = results.lock().unwrap();
        assert_eq!(r.len(), 6);
        // The first round is new; the same instances stored again replace, and say so.
        let new: Vec<bool> = r.iter().map(|d| d.result.as_ref().unwrap().new).collect();
        assert_eq!(new, [true, true, false, false, false, false]);
        let stored = r[0].result.as_ref().unwrap();
        let bytes = fs::read(&stored.path).unwrap();
        let parsed = part10::parse(&bytes).unwrap();
        assert_eq!(
            &bytes[parsed.data_set_offset..],
            &job("x", b"").data_set[..]
        );
        let pdir = stored
            .path
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap();
        assert_eq!(fs::read(pdir.join("patient-id")).unwrap(), b"PAT");
        let leftovers: Vec<_> = fs::read_dir(stored.path.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    /// A reactor waiting for room in the queue (`submit_or_notify`) is told when a worker takes
    /// jobs off it, whatever they are: a worker that took only writes of streamed data sets
    /// told no one, so a store waiting on another reactor stalled until some store came by.
    #[test]
    fn a_reactor_waiting_for_room_is_told_when_a_worker_takes_only_writes() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::StorageConfig {
            workers: 1,
            queue_depth: 1,
            ..Default::default()
        };
        let spaces = Arc::new(AtomicUsize::new(0));
        let sp = spaces.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (storage, handles) = Storage::start(
            dir.path().to_path_buf(),
            &cfg,
            Arc::new(|_| {}),
            Arc::new(|_| {}),
            Arc::new(move |_| {
                sp.fetch_add(1, Ordering::SeqCst);
            }),
            stop.clone(),
        )
        .unwrap();
        let meta = job("1.2.3.4", b"P").meta;
        let Some(f) = storage.stream(&meta) else {
            eprintln!("no O_TMPFILE here: nothing streams, nothing to test");
            return;
        };
        let reply = ReplyTo {
            reactor: 1,
            connection: 0,
            generation: 1,
        };
        let mut blocked = None;
        let mut offset = 0;
        for _ in 0..1000 {
            // The queue kept full of writes; a store from reactor 1 then finds no room.
            let _ = storage.try_submit(Job::Write(WriteJob {
                reply,
                token: 0,
                file: f.clone(),
                offset,
                bytes: vec![7u8; 4 << 20],
            }));
            offset += 4 << 20;
            if let Err(j) = storage.submit_or_notify(1, Job::Store(job("1.2.3.5", b"P"))) {
                blocked = Some(j);
                break;
            }
        }
        let before = spaces.load(Ordering::SeqCst);
        assert!(blocked.is_some(), "the queue was never full");
        let told = (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            spaces.load(Ordering::SeqCst) > before
        });
        stop.store(true, Ordering::SeqCst);
        drop(storage);
        for h in handles {
            h.join().unwrap();
        }
        assert!(
            told,
            "the worker took the write but never said there was room"
        );
    }
}
