//! A claimed batch on disk: `batches/<id>/` with `batch.toml` (manifest), `state` (stage and
//! attempts), `files/` (the instances, moved from `patients/` keeping their relative paths),
//! `input/<input name>/` (hard links for processing), `output/`, and `exports/<export name>.exported`
//! markers. This directory is the persistent outbox: a restart resumes each batch at its stage.
//!
//! Owns: moving a batch aside, running its stages, retry bookkeeping, `failed/` and `expired/`.
//! Must never delete a batch's files before every export succeeded.
//!
//! Crash safety: a batch is assembled in `batches/<id>.tmp/` and renamed into place; a
//! `.tmp` batch found at start-up is moved back into `patients/` (its instances were never
//! processed), so a crash at any point leaves each acknowledged instance either pending under
//! `patients/`, or in exactly one batch.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{export, now_ms, BatchInfo, Context, Job, ProcessingError, Who, UNMATCHED_INPUT};
use crate::config::{EmptyOutput, ExpireAction, ExportConfig, ExportKind};
use crate::patients::InstanceRecord;
use crate::storage::inventory::walk_files;
use crate::storage::log::Loc;

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// The grouping key as text (lossy) and as hex (exact).
    patient_id: String,
    key_hex: String,
    created_ms: u64,
    /// The `[[input]]` names when the batch was claimed, in bit order: what each file's
    /// `inputs` bits mean. A batch resumed after the config's inputs were inserted, reordered
    /// or removed reads its bits by these names ([`current_inputs`]), never by today's order.
    /// Empty in manifests written before names were kept (read against today's order, with a
    /// warning).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    input_names: Vec<String>,
    /// With `[cluster]`: the batch was claimed in the cluster database, in this partition under
    /// this token; its files are copies of instances other nodes (or this one) still hold,
    /// released by them once the batch is marked done there ([`super::owner::finish`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cluster: Option<ClusterBatch>,
    files: Vec<ManifestFile>,
}

/// Where a cluster batch was claimed (see [`Manifest::cluster`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ClusterBatch {
    pub partition: u32,
    pub fencing: i64,
}

impl ClusterBatch {
    pub(super) fn owned(self) -> crate::cluster::Owned {
        crate::cluster::Owned {
            partition: self.partition,
            fencing: self.fencing,
        }
    }
}

/// In a cluster batch being assembled: its files are copies (an unfinished one is deleted,
/// never moved into `patients/`). Written first.
const COPIES: &str = "copies";

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    /// Relative to `files/` (and to `patients/` before the move).
    path: String,
    /// Accepting inputs, as in [`InstanceRecord::inputs`]: bit `i` is
    /// [`Manifest::input_names`]`[i]`.
    inputs: u64,
    /// The segment log records (segment, offset) this file was made from, released once the
    /// batch is durable; a restart releases them again if that release was cut short.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    log: Vec<(u64, u64)>,
    /// Router mode: the instance is this segment log record, never copied into `files/`. It
    /// stays unreleased (and out of the log's index) until the batch is exported, or is copied
    /// into the batch when it fails; not in `log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<(u64, u64)>,
}

impl Manifest {
    /// The manifest of a new batch of `key` holding `files`.
    fn new(
        ctx: &Context,
        key: &[u8],
        cluster: Option<ClusterBatch>,
        files: Vec<ManifestFile>,
    ) -> Manifest {
        Manifest {
            patient_id: String::from_utf8_lossy(key).into_owned(),
            key_hex: hex(key),
            created_ms: now_ms(),
            input_names: ctx.pipeline.rules.input_names().map(String::from).collect(),
            cluster,
            files,
        }
    }

    /// Writes `batch.toml` and the first state (processing, no attempts) into the batch
    /// folder being made, `tmp`.
    fn write_new(&self, tmp: &Path) -> io::Result<()> {
        let text = toml::to_string(self).map_err(io::Error::other)?;
        write_atomic(&tmp.join("batch.toml"), text.as_bytes())?;
        write_state(
            tmp,
            &State {
                stage: Stage::Processing,
                processing_attempts: 0,
                export_attempts: 0,
            },
        )
    }
}

impl ManifestFile {
    fn record(&self) -> Option<Loc> {
        self.record.map(|(seq, offset)| Loc { seq, offset })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stage {
    Processing,
    Exporting,
    /// A cluster batch exported to every destination whose mark as done in the cluster
    /// database is still to be made (never exported again).
    Exported,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    stage: Stage,
    processing_attempts: u32,
    export_attempts: u32,
}

fn batches(ctx: &Context) -> PathBuf {
    ctx.data_dir.join("batches")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("new");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    fs::rename(&tmp, path)
}

fn write_state(dir: &Path, s: &State) -> io::Result<()> {
    let text = toml::to_string(s).map_err(io::Error::other)?;
    write_atomic(&dir.join("state"), text.as_bytes())
}

fn read_state(dir: &Path) -> io::Result<State> {
    let text = fs::read_to_string(dir.join("state"))?;
    toml::from_str(&text).map_err(io::Error::other)
}

fn read_manifest(dir: &Path) -> io::Result<Manifest> {
    let text = fs::read_to_string(dir.join("batch.toml"))?;
    toml::from_str(&text).map_err(io::Error::other)
}

/// The grouping key of a manifest (`key_hex`; its lossy text if that is not hex).
fn manifest_key(m: &Manifest) -> Vec<u8> {
    let h = m.key_hex.as_bytes();
    let nibble = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let key: Option<Vec<u8>> = h
        .len()
        .is_multiple_of(2)
        .then(|| {
            h.chunks(2)
                .map(|c| Some(nibble(c[0])? << 4 | nibble(c[1])?))
                .collect()
        })
        .flatten();
    key.unwrap_or_else(|| m.patient_id.as_bytes().to_vec())
}

/// Who and what a batch is, for its log lines: the patient ([`Who`]) and its instances per
/// input ("ct:40,mr:2", no spaces so that a text log line stays one `key=value` per field;
/// `_unmatched` for kept ones no input accepted).
struct BatchLog {
    who: Who,
    inputs: String,
}

impl BatchLog {
    fn of(ctx: &Context, m: &Manifest) -> BatchLog {
        let today: Vec<String>;
        let names: &[String] = if m.input_names.is_empty() {
            today = ctx.pipeline.rules.input_names().map(String::from).collect();
            &today
        } else {
            &m.input_names
        };
        fn count<'a>(counts: &mut Vec<(&'a str, usize)>, name: &'a str) {
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => counts.push((name, 1)),
            }
        }
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for f in &m.files {
            if f.inputs == 0 {
                count(&mut counts, UNMATCHED_INPUT);
            }
            for (i, n) in names.iter().enumerate().take(64) {
                if f.inputs & (1 << i) != 0 {
                    count(&mut counts, n);
                }
            }
        }
        BatchLog {
            who: Who::new(&manifest_key(m), ctx.config.log.phi),
            inputs: counts
                .iter()
                .map(|(n, c)| format!("{n}:{c}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// From the manifest in `dir` (a batch that cannot be read: "unknown").
    fn read(ctx: &Context, dir: &Path) -> BatchLog {
        match read_manifest(dir) {
            Ok(m) => BatchLog::of(ctx, &m),
            Err(_) => BatchLog {
                who: Who {
                    digest: "unknown (unreadable batch.toml)".into(),
                    id: None,
                },
                inputs: String::new(),
            },
        }
    }
}

fn sync_data_dir(ctx: &Context) {
    let _ = sync_data_dir_checked(ctx);
}

/// syncfs of the data directory's file system, for the steps whose next step depends on it
/// (releasing log records once their copies are durable).
fn sync_data_dir_checked(ctx: &Context) -> io::Result<()> {
    let f = fs::File::open(&ctx.data_dir)?;
    rustix::fs::syncfs(&f).map_err(io::Error::from)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

static BATCH_SEQ: AtomicU64 = AtomicU64::new(0);

/// In a batch being assembled: the instances copied out of the segment log (one relative path
/// a line), written before the copies are.
const FROM_LOG: &str = "from-log";

/// Moves a claimed batch from `patients/` into `batches/<id>/`; returns the id. On an error
/// every instance is where it was (under `patients/` or in the log), and the caller still has
/// `records` to put back in the patient map. Instances in the segment log are copied into the
/// batch for processing; in router mode (no processing) they are not: the batch names their
/// records, which a `dicom` or `folder` export reads directly.
pub(super) fn create(ctx: &Context, key: &[u8], records: &[InstanceRecord]) -> io::Result<String> {
    let patients = ctx.data_dir.join("patients");
    let id = new_id(key);
    let tmp = batches(ctx).join(format!("{id}.tmp"));
    fs::create_dir_all(tmp.join("files"))?;
    let mut files = Vec::with_capacity(records.len());
    // Log records the batch consumes: released once the batch is durable.
    let mut taken: Vec<(PathBuf, crate::storage::log::Taken)> = Vec::new();
    let give_back = |taken: Vec<(PathBuf, crate::storage::log::Taken)>| {
        for (rel, t) in taken {
            ctx.log.untake(rel, t);
        }
    };
    let locs = |t: &crate::storage::log::Taken| t.all().map(|l| (l.seq, l.offset)).collect();
    // Pass 1: files are moved in; instances in the log are taken out of its index, to copy.
    // (taken index, destination in files/, manifest index)
    let mut copies: Vec<(usize, PathBuf, usize)> = Vec::new();
    for r in records {
        let Ok(rel) = r.path.strip_prefix(&patients) else {
            tracing::error!(path = %r.path.display(), "instance outside patients/ left in place");
            continue;
        };
        let dest = tmp.join("files").join(rel);
        let moved = dest
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::rename(&r.path, &dest));
        let log = match moved {
            // A log record of the same instance too (re-sent with a size on the other side of
            // inline_max_bytes): the newer of the two is what the batch gets; the record goes
            // with it either way.
            Ok(()) => ctx.log.take(rel).map_or_else(Vec::new, |t| {
                let l = locs(&t);
                if log_is_newer(ctx, &t, &dest) {
                    copies.push((taken.len(), dest.clone(), files.len()));
                }
                taken.push((rel.to_path_buf(), t));
                l
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match ctx.log.take(rel) {
                Some(t) => {
                    let l = locs(&t);
                    copies.push((taken.len(), dest, files.len()));
                    taken.push((rel.to_path_buf(), t));
                    l
                }
                None => {
                    tracing::error!(path = %r.path.display(), "claimed instance missing from disk");
                    continue;
                }
            },
            Err(e) => {
                // Put back what moved, so the instances stay pending, and give up.
                give_back(taken);
                restore_tmp(ctx, &tmp);
                return Err(e);
            }
        };
        files.push(ManifestFile {
            path: rel.to_string_lossy().into_owned(),
            inputs: r.inputs,
            log,
            record: None,
        });
    }
    // Router mode: each instance whose newest copy is a log record stays that record.
    let mut kept: std::collections::HashSet<Loc> = Default::default();
    if ctx.processor.is_none() {
        for (ti, _, fi) in copies.drain(..) {
            if let (Some((_, t)), Some(f)) = (taken.get(ti), files.get_mut(fi)) {
                f.record = Some((t.latest.seq, t.latest.offset));
                f.log = t.superseded.iter().map(|l| (l.seq, l.offset)).collect();
                kept.insert(t.latest);
            }
        }
    }
    // Pass 2: the copies. Their names are made durable first (`from-log`), so that a batch
    // interrupted now is put back by deleting the copies (the records stay the instances),
    // never by turning them into files beside their records.
    if !copies.is_empty() {
        let list: String = copies
            .iter()
            .filter_map(|(i, _, _)| taken.get(*i))
            .map(|(rel, _)| format!("{}\n", rel.display()))
            .collect();
        let copied = write_atomic(&tmp.join(FROM_LOG), list.as_bytes()).and_then(|()| {
            fs::File::open(&tmp)?.sync_all()?; // the name too, before any copy exists
            for (i, dest, _) in &copies {
                if let Some((_, t)) = taken.get(*i) {
                    ctx.log.read(t.latest)?.write_file(dest)?;
                }
            }
            Ok(())
        });
        if let Err(e) = copied {
            give_back(taken);
            restore_tmp(ctx, &tmp);
            return Err(e);
        }
    }
    let manifest = Manifest::new(ctx, key, None, files);
    let write = || -> io::Result<()> {
        manifest.write_new(&tmp)?;
        sync_data_dir_checked(ctx)?;
        fs::rename(&tmp, batches(ctx).join(&id))
    };
    if let Err(e) = write() {
        give_back(taken);
        restore_tmp(ctx, &tmp);
        return Err(e);
    }
    // The batch is in place. Once that is durable, the log records it was made from are done
    // (if not, they stay taken and are released before the batch is deleted, or at a restart
    // from its manifest; a batch that did not survive a crash leaves them pending).
    let released: Vec<Loc> = taken
        .iter()
        .flat_map(|(_, t)| t.all())
        .filter(|l| !kept.contains(l))
        .collect();
    if let Err(e) = sync_data_dir_checked(ctx).and_then(|()| ctx.log.release(&released)) {
        tracing::warn!(batch = %id, error = %e, "could not release log records yet: they go when the batch does");
    }
    let bl = BatchLog::of(ctx, &manifest);
    tracing::info!(
        batch = %id,
        patient = %bl.who.digest,
        patient_id = bl.who.id,
        inputs = %bl.inputs,
        instances = manifest.files.len(),
        read_from_log = kept.len(),
        "batch claimed"
    );
    Ok(id)
}

/// A new batch id for `key`: `<ms>-<patient digest, 12 hex>-<pid>-<n>`.
pub(super) fn new_id(key: &[u8]) -> String {
    format!(
        "{}-{}-{}-{}",
        now_ms(),
        &crate::storage::patient_dir_name(key)[..12],
        std::process::id(),
        BATCH_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where a cluster batch is put once assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// `batches/<id>/`, to be processed and exported.
    Batches,
    /// `expired/<id>/` (`[patients] expire_action = "move"`).
    Expired,
}

/// Assembles cluster batch `id` of `key` (claimed in the cluster database under `cluster`) from
/// `rows`: a copy of each instance, read from the folder of the node that stored it
/// (`node_dir`), read-only. On an error nothing is left of it (the claim stays in the
/// database, and the caller tries again later).
pub(super) fn create_cluster(
    ctx: &Context,
    id: &str,
    key: &[u8],
    cluster: ClusterBatch,
    rows: &[crate::cluster::Published],
    node_dir: &dyn Fn(&str) -> PathBuf,
    place: Place,
) -> io::Result<()> {
    let root = match place {
        Place::Batches => batches(ctx),
        Place::Expired => ctx.data_dir.join("expired"),
    };
    fs::create_dir_all(&root)?;
    let tmp = batches(ctx).join(format!("{id}.tmp"));
    let _ = fs::remove_dir_all(&tmp); // an earlier attempt's
    fs::create_dir_all(tmp.join("files"))?;
    let made = (|| -> io::Result<Vec<ManifestFile>> {
        write_atomic(&tmp.join(COPIES), b"")?;
        fs::File::open(&tmp)?.sync_all()?;
        let mut files = Vec::with_capacity(rows.len());
        // One listing per node holding part of the batch (its log's records by identity).
        let mut by_node: std::collections::BTreeMap<&str, Vec<&crate::cluster::Published>> =
            Default::default();
        for r in rows {
            by_node.entry(r.node_id.as_str()).or_default().push(r);
        }
        for (node, rows) in by_node {
            let dir = node_dir(node);
            let (entries, _) = crate::storage::inventory::pending(&dir)?;
            let mut listed: std::collections::HashMap<&Path, &crate::storage::inventory::Entry> =
                Default::default();
            for e in &entries {
                listed.insert(e.rel.as_path(), e);
            }
            for r in rows {
                // Locations are "patients/<rel>" (`Pipeline::publish`); never anything else
                // (a row is this cluster's own writing, but a path is checked all the same).
                let rel = crate::storage::inventory::rel_of(&r.location).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "node {node}: location {:?} is not under patients/",
                            r.location
                        ),
                    )
                })?;
                let entry = listed.get(rel).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("node {node} does not hold {} (yet)", r.location),
                    )
                })?;
                crate::storage::inventory::extract(&dir, entry, &tmp.join("files"))?;
                files.push(ManifestFile {
                    path: rel.to_string_lossy().into_owned(),
                    inputs: r.inputs,
                    log: Vec::new(),
                    record: None,
                });
            }
        }
        Ok(files)
    })();
    let files = match made {
        Ok(f) => f,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let manifest = Manifest::new(ctx, key, Some(cluster), files);
    let write = || -> io::Result<()> {
        manifest.write_new(&tmp)?;
        // Every copy durable before the batch is in place. The mark goes only once it is:
        // a `.tmp` left by a crash is always known for copies (deleted, never restored).
        sync_tree(&tmp.join("files"))?;
        sync_data_dir_checked(ctx)?;
        fs::rename(&tmp, root.join(id))?;
        sync_data_dir_checked(ctx)?;
        fs::File::open(&root)?.sync_all()?;
        let _ = fs::remove_file(root.join(id).join(COPIES));
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let bl = BatchLog::of(ctx, &manifest);
    tracing::info!(
        batch = %id,
        patient = %bl.who.digest,
        patient_id = bl.who.id,
        inputs = %bl.inputs,
        instances = manifest.files.len(),
        partition = cluster.partition,
        place = ?place,
        "cluster batch claimed: its instances copied from the nodes that stored them"
    );
    Ok(())
}

/// Flushes every file under `root` and every folder (copies made by `extract`).
fn sync_tree(root: &Path) -> io::Result<()> {
    let mut files = Vec::new();
    walk_files(root, &mut files)?;
    let mut dirs: std::collections::BTreeSet<PathBuf> = Default::default();
    for f in &files {
        fs::File::open(f)?.sync_all()?;
        let mut d = f.parent();
        while let Some(p) = d {
            if !p.starts_with(root) {
                break;
            }
            dirs.insert(p.to_path_buf());
            d = p.parent();
        }
    }
    dirs.insert(root.to_path_buf());
    for d in dirs {
        fs::File::open(&d)?.sync_all()?;
    }
    Ok(())
}

/// Whether batch `id` is in `batches/` (being processed or exported, or resumed at start-up).
pub(super) fn in_batches(ctx: &Context, id: &str) -> bool {
    batches(ctx).join(id).exists()
}

/// Whether this node holds batch `id` (in `batches/`, `failed/` or `expired/`).
pub(super) fn held_here(ctx: &Context, id: &str) -> bool {
    ["batches", "failed", "expired"]
        .iter()
        .any(|d| ctx.data_dir.join(d).join(id).exists())
}

/// Whether the log's newest record of an instance arrived after its file was written.
pub(super) fn log_is_newer(ctx: &Context, t: &crate::storage::log::Taken, file: &Path) -> bool {
    let mtime_ms = fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    ctx.log
        .read(t.latest)
        .is_ok_and(|i| i.meta.received_ms > mtime_ms)
}

/// Moves an unfinished `batches/<id>.tmp/` back into `patients/`.
fn restore_tmp(ctx: &Context, tmp: &Path) {
    if tmp.join(COPIES).exists() || read_manifest(tmp).is_ok_and(|m| m.cluster.is_some()) {
        // A cluster batch: its instances are where their nodes stored them; the claim in the
        // cluster database is resumed by adoption (`owner`), not from here.
        if let Err(e) = fs::remove_dir_all(tmp) {
            tracing::error!(path = %tmp.display(), error = %e, "could not remove an unfinished cluster batch");
        }
        sync_data_dir(ctx);
        return;
    }
    let patients = ctx.data_dir.join("patients");
    let files_root = tmp.join("files");
    let copied: std::collections::HashSet<PathBuf> = fs::read_to_string(tmp.join(FROM_LOG))
        .unwrap_or_default()
        .lines()
        .map(PathBuf::from)
        .collect();
    let mut files = Vec::new();
    let _ = walk_files(&files_root, &mut files);
    let mut ok = true;
    for f in files {
        let Ok(rel) = f.strip_prefix(&files_root) else {
            continue;
        };
        if copied.contains(rel) {
            // A copy of a segment log record: the record stays the instance.
            let _ = fs::remove_file(&f);
            continue;
        }
        let dest = patients.join(rel);
        let r = dest
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::rename(&f, &dest));
        if let Err(e) = r {
            ok = false;
            tracing::error!(path = %f.display(), error = %e, "could not restore an instance");
        }
    }
    if ok {
        let _ = fs::remove_dir_all(tmp);
    }
    sync_data_dir(ctx);
}

/// Start-up: restores unfinished claims and returns a job per batch to resume.
pub(super) fn recover(ctx: &Context) -> io::Result<Vec<Job>> {
    fs::create_dir_all(batches(ctx))?;
    let mut jobs = Vec::new();
    let mut names: Vec<_> = fs::read_dir(batches(ctx))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let dir = batches(ctx).join(&name);
        if name.ends_with(".tmp") {
            tracing::warn!(batch = %name, "restoring a batch interrupted while being claimed");
            restore_tmp(ctx, &dir);
        } else if dir.join("state").is_file() {
            // A processing run of this batch that outlived its node (kill -9, a crash) must not
            // run beside the resumed one.
            let killed = super::process::kill_leftovers(&name);
            if killed > 0 {
                tracing::warn!(batch = %name, processes = killed, "killed a processing run left over from a previous node");
            }
            tracing::info!(batch = %name, "resuming a batch");
            jobs.push(Job::Process { id: name });
        }
    }
    // Log records that made a batch which still exists (in batches/ or failed/) are done, even
    // if their release was cut short by a crash. The records a router-mode batch is made of
    // are held (out of the index, not released) until it is exported; a failed batch names
    // only those it could not copy out.
    let mut consumed = Vec::new();
    let mut held: Vec<(PathBuf, Loc)> = Vec::new();
    for root in [batches(ctx), ctx.data_dir.join("failed")] {
        let Ok(rd) = fs::read_dir(&root) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                continue; // restored above: its records were never released or held
            }
            if let Ok(m) = read_manifest(&e.path()) {
                for f in m.files {
                    consumed.extend(f.log.iter().map(|&(seq, offset)| Loc { seq, offset }));
                    if let Some(r) = f.record() {
                        held.push((PathBuf::from(&f.path), r));
                    }
                }
            }
        }
    }
    let (released, missing) = ctx.log.recover_batches(&consumed, &held)?;
    if released > 0 {
        tracing::info!(
            records = released,
            "released log records that made batches before a crash"
        );
    }
    if missing > 0 {
        tracing::warn!(
            missing,
            "records a batch is made of are no longer in the log: that batch cannot export them and will be moved to failed/"
        );
    }
    remove_empty_dirs(&ctx.data_dir.join("patients"));
    Ok(jobs)
}

/// Removes empty study/series directories and patient directories holding only `patient-id`
/// (only at start-up, when no store can be creating them).
fn remove_empty_dirs(patients: &Path) {
    let Ok(rd) = fs::read_dir(patients) else {
        return;
    };
    for p in rd.flatten().map(|e| e.path()) {
        let mut files = Vec::new();
        if walk_files(&p, &mut files).is_ok()
            && files
                .iter()
                .all(|f| f.file_name().is_some_and(|n| n == "patient-id"))
        {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

fn input_files(
    dir: &Path,
    manifest: &Manifest,
    names: &[String],
) -> io::Result<Vec<(String, Vec<PathBuf>)>> {
    let input = dir.join("input");
    if input.exists() {
        fs::remove_dir_all(&input)?;
    }
    let mut out: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for f in &manifest.files {
        let src = dir.join("files").join(&f.path);
        let mut targets: Vec<&str> = (0..names.len())
            .filter(|i| f.inputs & (1 << i) != 0)
            .map(|i| names[i].as_str())
            .collect();
        if targets.is_empty() {
            targets.push(UNMATCHED_INPUT);
        }
        for name in targets {
            let folder = input.join(name);
            fs::create_dir_all(&folder)?;
            let file_name = src
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let mut dest = folder.join(&file_name);
            let mut n = 1;
            while dest.exists() {
                dest = folder.join(format!("{n}-{}", file_name.to_string_lossy()));
                n += 1;
            }
            fs::hard_link(&src, &dest)?;
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(dest),
                None => out.push((name.to_string(), vec![dest])),
            }
        }
    }
    Ok(out)
}

/// Runs processing (or skips it in router mode), then export.
pub(super) fn process(ctx: &Context, id: &str) {
    let dir = batches(ctx).join(id);
    let (mut state, manifest) = match (read_state(&dir), read_manifest(&dir)) {
        (Ok(s), Ok(m)) => (s, m),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(batch = %id, error = %e, "unreadable batch state: moving it to failed/");
            fail(ctx, id, &format!("unreadable batch state: {e}"));
            return;
        }
    };
    if state.stage == Stage::Exported {
        if let Some(c) = manifest.cluster {
            finish_exported(ctx, id, c, &BatchLog::of(ctx, &manifest));
        }
        return;
    }
    if !still_held(ctx, id, &manifest) {
        return;
    }
    if state.stage == Stage::Processing {
        if let Some(processor) = &ctx.processor {
            // A batch made in router mode, resumed with processing configured since: its
            // records become files first (processing reads files).
            let manifest = if manifest.files.iter().any(|f| f.record.is_some()) {
                match copy_records_out(ctx, &dir) {
                    Ok((copied, problems)) if problems.is_empty() => {
                        if let Err(e) = ctx.log.release(&copied) {
                            tracing::warn!(batch = %id, error = %e, "could not release copied records yet");
                        }
                        match read_manifest(&dir) {
                            Ok(m) => m,
                            Err(e) => {
                                fail(ctx, id, &format!("unreadable batch state: {e}"));
                                return;
                            }
                        }
                    }
                    Ok((_, problems)) => {
                        fail(
                            ctx,
                            id,
                            &format!(
                                "instances missing from the segment log: {}",
                                problems.join("; ")
                            ),
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::error!(batch = %id, error = %e, "cannot copy the batch's records out for processing");
                        ctx.retry_later(ctx.backoff(1), Job::Process { id: id.into() });
                        return;
                    }
                }
            } else {
                manifest
            };
            let mut manifest = manifest;
            if let Err(why) = current_inputs(ctx, id, &mut manifest) {
                fail(ctx, id, &why);
                return;
            }
            let names: Vec<String> = ctx.pipeline.rules.input_names().map(String::from).collect();
            let prepared = input_files(&dir, &manifest, &names).and_then(|inputs| {
                let out = dir.join("output");
                if out.exists() {
                    fs::remove_dir_all(&out)?;
                }
                fs::create_dir_all(&out)?;
                Ok(inputs)
            });
            let inputs = match prepared {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(batch = %id, error = %e, "cannot prepare processing input");
                    ctx.retry_later(ctx.backoff(1), Job::Process { id: id.into() });
                    return;
                }
            };
            let info = BatchInfo {
                id: id.to_string(),
                patient_id: manifest.patient_id.clone(),
                input_dir: dir.join("input"),
                output_dir: dir.join("output"),
                inputs,
            };
            let bl = BatchLog::of(ctx, &manifest);
            tracing::info!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, "processing");
            let started = std::time::Instant::now();
            let result = processor.process(&info).and_then(|()| {
                // A run that wrote nothing to send keeps the batch unless the config says
                // that is a success (issue 11: it was deleted and counted as exported).
                match dicom_files(&info.output_dir) {
                    Ok(f) if f.is_empty() && empty_output(ctx) == EmptyOutput::Fail => {
                        Err(ProcessingError::NoOutput)
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(ProcessingError::OutputUnreadable {
                        kind: e.kind(),
                        detail: e.to_string(),
                    }),
                }
            });
            if (ctx.shutdown.load(Ordering::Acquire) || super::process::stopping())
                && result.is_err()
            {
                tracing::warn!(
                    batch = %id,
                    patient = %bl.who.digest,
                    patient_id = bl.who.id,
                    inputs = %bl.inputs,
                    reason = "the node is stopping",
                    "processing interrupted by the stop: the batch resumes at the next start"
                );
                return;
            }
            let stats = &ctx.pipeline.stats;
            stats.processing_runs.fetch_add(1, Ordering::Relaxed);
            let took = started.elapsed();
            stats
                .processing_micros
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            stats.processing_seconds.0.observe(took.as_secs_f64());
            if let Err(why) = result {
                stats.processing_failures.count(&why);
                state.processing_attempts += 1;
                let allowed = ctx.config.processing.as_ref().map_or(1, |p| p.attempts);
                if state.processing_attempts >= allowed {
                    // failed/<id>/state counts the last attempt too (the status page shows it).
                    let _ = write_state(&dir, &state);
                    fail(ctx, id, &format!("processing failed: {why}"));
                } else {
                    tracing::warn!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, reason = %why, kind = why.kind(), attempt = state.processing_attempts, "processing failed; will retry");
                    let _ = write_state(&dir, &state);
                    ctx.retry_later(
                        ctx.backoff(state.processing_attempts),
                        Job::Process { id: id.into() },
                    );
                }
                return;
            }
            ctx.pipeline.stats.processed.fetch_add(1, Ordering::Relaxed);
        }
        state.stage = Stage::Exporting;
        if let Err(e) = write_state(&dir, &state) {
            tracing::error!(batch = %id, error = %e, "cannot record the export stage");
            ctx.retry_later(ctx.backoff(1), Job::Process { id: id.into() });
            return;
        }
    }
    export(ctx, id);
}

/// A cluster batch found here that another node holds (its partition moved while this node
/// was away or paused, and the new owner adopted it: it runs it, or ran it): false, and its
/// folder (copies of instances the storing nodes keep until that node is done) is deleted,
/// never processed or exported here again. Also false when the cluster database cannot be
/// asked: tried again later. True for a batch of this node's (and every single-node batch).
fn still_held(ctx: &Context, id: &str, manifest: &Manifest) -> bool {
    use super::owner::Holder;
    if manifest.cluster.is_none() {
        return true;
    }
    match super::owner::holder(ctx, id) {
        Holder::Here | Holder::Done => true,
        Holder::Elsewhere => {
            let dir = batches(ctx).join(id);
            match fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::warn!(batch = %id, "a cluster batch another node adopted: its copies are deleted here, not run again");
                }
                Err(e) => {
                    tracing::error!(batch = %id, error = %e, "cannot delete the copies of a cluster batch this node no longer holds");
                }
            }
            sync_data_dir(ctx);
            false
        }
        Holder::Unknown => {
            ctx.retry_later(ctx.backoff(1), Job::Process { id: id.into() });
            false
        }
    }
}

/// A cluster batch exported to every destination: marked done in the cluster database, then
/// its folder goes; the mark is tried again later while it cannot be made.
fn finish_exported(ctx: &Context, id: &str, c: ClusterBatch, bl: &BatchLog) {
    if !super::owner::finish(ctx, id, c) {
        ctx.retry_later(ctx.backoff(1), Job::Process { id: id.into() });
        return;
    }
    let dir = batches(ctx).join(id);
    if let Err(e) = fs::remove_dir_all(&dir) {
        tracing::error!(batch = %id, error = %e, "exported, but could not remove the batch");
    } else {
        tracing::info!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, "batch done: exported to every destination");
    }
}

/// `[processing] empty_output`; `fail` for a library user's `Processor` without a
/// `[processing]` section.
fn empty_output(ctx: &Context) -> EmptyOutput {
    ctx.config
        .processing
        .as_ref()
        .map_or(EmptyOutput::Fail, |p| p.empty_output)
}

/// The Part-10 files under `root`, recursively.
fn dicom_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    walk_files(root, &mut files)?;
    files.retain(|f| is_dicom(f));
    Ok(files)
}

fn is_dicom(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[128..] == b"DICM"
}

/// The destinations: `[[export]]`, or the default folder under the data directory.
fn destinations(ctx: &Context) -> Vec<ExportConfig> {
    if ctx.config.exports.is_empty() {
        vec![ExportConfig {
            kind: ExportKind::Folder,
            name: None,
            peer: None,
            reply_to_sender: false,
            address: None,
            ae_title: None,
            calling_ae_title: None,
            path: Some(ctx.data_dir.join("export")),
            inputs: Vec::new(),
            tls: false,
            tls_ca: None,
            tls_certificate: None,
            tls_private_key: None,
        }]
    } else {
        ctx.config.exports.clone()
    }
}

/// Exports to every destination not yet done; deletes the batch when all succeeded.
pub(super) fn export(ctx: &Context, id: &str) {
    let dir = batches(ctx).join(id);
    let mut state = match read_state(&dir) {
        Ok(s) => s,
        Err(e) => {
            fail(ctx, id, &format!("unreadable batch state: {e}"));
            return;
        }
    };
    if let Ok(m) = read_manifest(&dir) {
        if !still_held(ctx, id, &m) {
            return;
        }
    }
    let bl = BatchLog::read(ctx, &dir);
    // Each instance with the inputs it joined (router mode; processing output joined none).
    let files: Vec<(u64, export::Source)> = if ctx.processor.is_some() {
        match dicom_files(&dir.join("output")) {
            Ok(f) => f
                .into_iter()
                .map(|p| (0, export::Source::File(p)))
                .collect(),
            Err(e) => {
                fail(ctx, id, &format!("cannot list output/: {e}"));
                return;
            }
        }
    } else {
        // Router mode: the batch itself, each instance from its file or its log record, with
        // the inputs it joined by today's bits.
        let mut m = match read_manifest(&dir) {
            Ok(m) => m,
            Err(e) => {
                fail(ctx, id, &format!("unreadable manifest: {e}"));
                return;
            }
        };
        if let Err(why) = current_inputs(ctx, id, &mut m) {
            fail(ctx, id, &why);
            return;
        }
        m.files
            .iter()
            .filter_map(|f| match f.record() {
                Some(r) => Some((f.inputs, export::Source::Log(r))),
                None => {
                    let p = dir.join("files").join(&f.path);
                    is_dicom(&p).then_some((f.inputs, export::Source::File(p)))
                }
            })
            .collect()
    };
    // Router mode with exports per input: an instance no destination's part holds would be
    // deleted with the batch unexported. Start-up refuses such a config; a batch claimed under
    // another config (`unmatched` changed, exports edited) can still hold one, and an instance
    // kept in `_unmatched` because its scan was partial (`unmatched = "discard"`) too. The other
    // instances are exported as usual; then the batch goes to failed/ with the reason, never
    // deleted.
    let unexported = if ctx.processor.is_none() {
        for_no_destination(ctx, &files)
    } else {
        Vec::new()
    };
    if files.is_empty() {
        if ctx.processor.is_none() {
            // Router mode: files/ is the batch itself, so there is nothing to lose either.
            tracing::warn!(batch = %id, "the batch holds no instance: nothing to export");
        } else if empty_output(ctx) == EmptyOutput::Fail {
            // Processing checks this before the export stage; here after a restart, or if
            // output/ lost its files meanwhile. Nothing is deleted that was not exported.
            fail(
                ctx,
                id,
                "nothing to export: no DICOM file in output/ ([processing] empty_output = \"fail\")",
            );
            return;
        } else {
            tracing::info!(
                batch = %id,
                "processing left no DICOM output and [processing] empty_output = \"ok\": nothing to export, the batch is done"
            );
        }
    }
    // Where a reply goes for an instance that keeps no Calling AE Title (a processing result):
    // to the sender of the batch's first instance, from the manifest.
    let batch_sender = if ctx.config.exports.iter().any(|e| e.reply_to_sender) {
        read_manifest(&dir).ok().and_then(|m| {
            let f = m.files.first()?;
            let src = match f.record() {
                Some(r) => export::Source::Log(r),
                None => export::Source::File(dir.join("files").join(&f.path)),
            };
            export::sender_of(&src, &ctx.log).ok().flatten()
        })
    } else {
        None
    };
    let mut errors = Vec::new();
    for (i, dest) in destinations(ctx).iter().enumerate() {
        // Named by the destination's name (issue 14: by its position, a config whose exports
        // were reordered across a restart took one destination's marker for another's: that one
        // never got the batch). A batch of an older build has positional `<n>.done` markers
        // (another suffix, so no name can be taken for one): taken as they were meant.
        let marker = dir
            .join("exports")
            .join(format!("{}.exported", ctx.config.export_name(i)));
        let legacy = dir.join("exports").join(format!("{i}.done"));
        if marker.exists() || legacy.exists() || files.is_empty() {
            continue;
        }
        let mine = for_destination(ctx, dest, &files);
        if mine.is_empty() {
            // Nothing of this batch is for it: done, as a destination that got everything.
            tracing::debug!(batch = %id, destination = %ctx.config.export_name(i), "no instance of the batch is for this destination");
            continue;
        }
        match export::run(
            dest,
            &mine,
            ctx.config.node.ae_title.trim(),
            &ctx.log,
            &ctx.config.peers,
            batch_sender.as_deref(),
            &ctx.shutdown,
        ) {
            Ok(()) => {
                let _ = fs::create_dir_all(dir.join("exports"))
                    .and_then(|()| write_atomic(&marker, b""));
                tracing::info!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, destination = %ctx.config.export_name(i), files = mine.len(), "exported");
            }
            Err(e) => {
                if !ctx.shutdown.load(Ordering::Acquire) {
                    if let Some(n) = ctx.pipeline.stats.export_failures.get(i) {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
                errors.push(format!("{}: {e}", ctx.config.export_name(i)))
            }
        }
    }
    if errors.is_empty() && !unexported.is_empty() {
        let _ = write_state(&dir, &state);
        fail(
            ctx,
            id,
            &format!(
                "exported to every destination, but {} instance(s) are for none ([[export]] \
                 inputs lists none of the inputs they joined): kept here, not deleted; add their \
                 input to an export's inputs (or an [[export]] without inputs) and run \
                 dicomgate retry {id}: {}",
                unexported.len(),
                unexported.join("; ")
            ),
        );
        return;
    }
    if errors.is_empty() {
        if !files.is_empty() {
            ctx.pipeline.stats.exported.fetch_add(1, Ordering::Relaxed);
        }
        // The log records the batch was made from (and, in router mode, is made of) must be
        // released before its manifest goes (if releasing failed at creation, nothing else
        // names them): else a restart would bring them back and export them again. Releasing
        // is idempotent.
        // The markers durable first: a restart must not export a released record again.
        if let Err(e) = sync_data_dir_checked(ctx)
            .and_then(|()| read_manifest(&dir))
            .and_then(|m| ctx.log.release(&manifest_locs(&m)))
        {
            tracing::error!(batch = %id, error = %e, "exported, but its log records could not be released: the batch stays until they are (restart retries)");
            return;
        }
        // A cluster batch is done in the cluster database before its copies go: the nodes
        // that stored its instances release them then. Its exports are recorded first, so
        // that a mark tried again (or after a restart) never exports it again.
        if let Some(c) = read_manifest(&dir).ok().and_then(|m| m.cluster) {
            state.stage = Stage::Exported;
            if let Err(e) = write_state(&dir, &state) {
                tracing::error!(batch = %id, error = %e, "cannot record the exported stage");
            }
            finish_exported(ctx, id, c, &bl);
            return;
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::error!(batch = %id, error = %e, "exported, but could not remove the batch");
        } else {
            tracing::info!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, "batch done: exported to every destination");
        }
        return;
    }
    if ctx.shutdown.load(Ordering::Acquire) {
        // Cut by the stop, not a failure of the destination: not an attempt.
        tracing::warn!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, reason = "the node is stopping", "export interrupted by the stop: it resumes at the next start");
        return;
    }
    state.export_attempts += 1;
    let reason = errors.join("; ");
    if state.export_attempts >= ctx.config.outbox.attempts {
        // failed/<id>/state counts the last attempt too (the status page shows it).
        let _ = write_state(&dir, &state);
        fail(
            ctx,
            id,
            &format!(
                "export failed after {} attempts: {reason}",
                state.export_attempts
            ),
        );
        return;
    }
    let delay = ctx.backoff(state.export_attempts);
    tracing::warn!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, attempt = state.export_attempts, retry_in_s = delay.as_secs_f64(), reason = %reason, "export failed; will retry");
    ctx.pipeline
        .stats
        .export_retries
        .fetch_add(1, Ordering::Relaxed);
    if let Err(e) = write_state(&dir, &state) {
        tracing::error!(batch = %id, error = %e, "cannot record the export attempt");
    }
    ctx.retry_later(delay, Job::Export { id: id.into() });
}

/// What of a batch's `files` (each with the inputs it joined) goes to `dest`: all of them, or,
/// when it lists `inputs` (router mode), those that joined one of them (`_unmatched`: those
/// that joined none). Processing output joined no input: with a processor every destination
/// gets all of it (`inputs` is refused beside `[processing]` by the config, beside a library
/// `Processor` by [`super::start`]).
fn for_destination(
    ctx: &Context,
    dest: &ExportConfig,
    files: &[(u64, export::Source)],
) -> Vec<export::Source> {
    if ctx.processor.is_some() {
        return files.iter().map(|(_, f)| f.clone()).collect();
    }
    files
        .iter()
        .filter(|(inputs, _)| is_for(&ctx.pipeline.rules, dest, *inputs))
        .map(|(_, f)| f.clone())
        .collect()
}

/// Whether an instance that joined `inputs` (today's bits) is in `dest`'s part of a batch.
fn is_for(rules: &super::Rules, dest: &ExportConfig, inputs: u64) -> bool {
    if dest.inputs.is_empty() {
        return true;
    }
    let mask = dest
        .inputs
        .iter()
        .filter_map(|n| rules.input_bit(n))
        .fold(0u64, |m, b| m | b);
    inputs & mask != 0 || (inputs == 0 && dest.inputs.iter().any(|n| n == UNMATCHED_INPUT))
}

/// Router mode: the instances of `files` that no destination's part holds, in words (what
/// it is and the inputs it joined), at most 20 named.
fn for_no_destination(ctx: &Context, files: &[(u64, export::Source)]) -> Vec<String> {
    let rules = &ctx.pipeline.rules;
    let dests = destinations(ctx);
    let names: Vec<&str> = rules.input_names().collect();
    let lost: Vec<String> = files
        .iter()
        .filter(|(inputs, _)| !dests.iter().any(|d| is_for(rules, d, *inputs)))
        .map(|(inputs, f)| {
            let joined: Vec<&str> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| inputs & (1u64 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            let what = match f {
                export::Source::File(p) => p.display().to_string(),
                export::Source::Log(l) => format!("segment log record {}:{}", l.seq, l.offset),
            };
            if joined.is_empty() {
                format!("{what} (input {UNMATCHED_INPUT})")
            } else {
                format!("{what} (inputs {})", joined.join(", "))
            }
        })
        .collect();
    let n = lost.len();
    let mut out: Vec<String> = lost.into_iter().take(20).collect();
    if n > 20 {
        out.push(format!("{} more", n - 20));
    }
    out
}

/// Translates each file's `inputs` bits from the names the batch was claimed with
/// ([`Manifest::input_names`]) to today's `[[input]]` order, in place. `Err` (the reason to
/// move the batch to failed/) names an input one of its instances joined that the config no
/// longer has: routing it anywhere would be a guess. A manifest without names (an older
/// build's) is read against today's order, with a warning.
fn current_inputs(ctx: &Context, id: &str, m: &mut Manifest) -> Result<(), String> {
    let rules = &ctx.pipeline.rules;
    if m.input_names.is_empty() {
        if m.files.iter().any(|f| f.inputs != 0) {
            let today: Vec<&str> = rules.input_names().collect();
            tracing::warn!(
                batch = %id,
                inputs = ?today,
                "the batch's manifest (an older build's) does not name its inputs: its instances' inputs are read in today's [[input]] order, which is wrong if inputs were inserted, reordered or removed since it was claimed"
            );
        }
        return Ok(());
    }
    let to: Vec<Option<u64>> = m.input_names.iter().map(|n| rules.input_bit(n)).collect();
    let mut gone: Vec<&str> = Vec::new();
    for f in &mut m.files {
        let mut bits = 0u64;
        for i in 0..64u32 {
            if f.inputs & (1u64 << i) == 0 {
                continue;
            }
            match (to.get(i as usize), m.input_names.get(i as usize)) {
                (Some(Some(b)), _) => bits |= b,
                (Some(None), Some(name)) => {
                    if !gone.contains(&name.as_str()) {
                        gone.push(name);
                    }
                }
                _ => {
                    return Err(format!(
                        "the batch's manifest names {} inputs, but {} joined input number {}: \
                         the manifest is damaged; nothing was exported",
                        m.input_names.len(),
                        f.path,
                        i + 1
                    ))
                }
            }
        }
        f.inputs = bits;
    }
    if gone.is_empty() {
        return Ok(());
    }
    let today: Vec<&str> = rules.input_names().collect();
    Err(format!(
        "the batch was claimed with input(s) {} that the config no longer has (its [[input]] \
         names now: {}): its instances are not routed by guess; nothing was exported. Restore \
         the input, or move the instances on by hand (dicomgate extract --batch {id})",
        gone.iter()
            .map(|g| format!("{g:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        today.join(", ")
    ))
}

/// Every log record a batch's manifest names (those it was made from, and those it is made of).
fn manifest_locs(m: &Manifest) -> Vec<Loc> {
    m.files
        .iter()
        .flat_map(|f| {
            f.log
                .iter()
                .map(|&(seq, offset)| Loc { seq, offset })
                .chain(f.record())
        })
        .collect()
}

/// The log records a batch in `dir` is made of (router mode): (path relative to `files/`,
/// record).
pub fn records_of(dir: &Path) -> io::Result<Vec<(PathBuf, Loc)>> {
    Ok(read_manifest(dir)?
        .files
        .iter()
        .filter_map(|f| Some((PathBuf::from(&f.path), f.record()?)))
        .collect())
}

/// The log records that are not pending though still in the log, as the start-up recovery
/// counts them (read-only): those the batches under `data_dir/batches/` and `failed/` are
/// made of (held until exported) or were made from (released, unless a crash cut that short).
/// A batch interrupted while being claimed (`<id>.tmp`) holds none: recovery puts its
/// instances back.
pub fn held_records(data_dir: &Path) -> io::Result<std::collections::HashSet<Loc>> {
    let mut out = std::collections::HashSet::new();
    for root in [data_dir.join("batches"), data_dir.join("failed")] {
        let rd = match fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                continue;
            }
            // As recovery: a folder without a readable manifest holds nothing.
            if let Ok(m) = read_manifest(&e.path()) {
                for f in m.files {
                    out.extend(f.log.iter().map(|&(seq, offset)| Loc { seq, offset }));
                    out.extend(f.record());
                }
            }
        }
    }
    Ok(out)
}

/// Writes each instance the batch in `dir` holds as a log record (router mode) into `files/`,
/// durably, then rewrites the manifest so that those records are only what the batch was made
/// from (`log`, released at a restart if not before). Returns the records copied, for the
/// caller to release once the batch is where it stays, and what could not be copied (those
/// stay named as `record`, held and never released).
fn copy_records_out(ctx: &Context, dir: &Path) -> io::Result<(Vec<Loc>, Vec<String>)> {
    let mut m = read_manifest(dir)?;
    let mut copied = Vec::new();
    let mut problems = Vec::new();
    for f in &mut m.files {
        let Some(r) = f.record() else {
            continue;
        };
        let dest = dir.join("files").join(&f.path);
        let w = dest
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| ctx.log.read(r))
            .and_then(|i| i.write_file(&dest));
        match w {
            Ok(_) => {
                f.log.push((r.seq, r.offset));
                f.record = None;
                copied.push(r);
            }
            Err(e) => problems.push(format!("{}: {e}", f.path)),
        }
    }
    if !copied.is_empty() {
        // The copies' names first, then the manifest that stops naming their records.
        sync_data_dir_checked(ctx)?;
        let text = toml::to_string(&m).map_err(io::Error::other)?;
        write_atomic(&dir.join("batch.toml"), text.as_bytes())?;
        sync_data_dir_checked(ctx)?;
    }
    Ok((copied, problems))
}

/// Moves a batch to `failed/<id>/` with `reason.txt`.
fn fail(ctx: &Context, id: &str, reason: &str) {
    let bl = BatchLog::read(ctx, &batches(ctx).join(id));
    let failed = ctx.data_dir.join("failed");
    let dest = failed.join(id);
    // Its instances that are log records become files first. Whatever happens there, the
    // batch is moved aside with its reason (what could not be copied stays held in the log).
    let (copied, problems) = match copy_records_out(ctx, &batches(ctx).join(id)) {
        Ok(c) => c,
        Err(e) => (
            Vec::new(),
            vec![format!("its log records could not be copied out: {e}")],
        ),
    };
    let reason = if problems.is_empty() {
        reason.to_string()
    } else {
        format!(
            "{reason}\nnot copied out of the segment log: {}",
            problems.join("; ")
        )
    };
    let reason = reason.as_str();
    let r = fs::create_dir_all(&failed)
        .and_then(|()| fs::rename(batches(ctx).join(id), &dest))
        .and_then(|()| write_atomic(&dest.join("reason.txt"), format!("{reason}\n").as_bytes()));
    ctx.pipeline.stats.failed.fetch_add(1, Ordering::Relaxed);
    if r.is_ok() && !copied.is_empty() {
        // Its instances are files in failed/ now (a restart releases these too if this is cut
        // short).
        sync_data_dir(ctx);
        if let Err(e) = ctx.log.release(&copied) {
            tracing::warn!(batch = %id, error = %e, "could not release the failed batch's log records yet: released at the next start");
        }
    }
    if r.is_ok() {
        // A cluster batch's copies are aside with their reason now: it is done in the cluster
        // database, so that the nodes that stored its instances release them (an operator's
        // retry runs these copies).
        if let Some(c) = read_manifest(&dest).ok().and_then(|m| m.cluster) {
            sync_data_dir(ctx);
            super::owner::finish_or_later(ctx, id, c);
        }
    }
    match r {
        Ok(()) => {
            tracing::error!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, %reason, "batch moved to failed/")
        }
        Err(e) => {
            tracing::error!(batch = %id, patient = %bl.who.digest, patient_id = bl.who.id, inputs = %bl.inputs, %reason, error = %e, "batch failed and could not be moved to failed/; left in batches/")
        }
    }
    sync_data_dir(ctx);
}

/// Removes (or moves to `expired/<id>/`) a patient's batch that never became sufficient.
pub(super) fn expire(ctx: &Context, key: &[u8], records: Vec<InstanceRecord>) {
    let patients = ctx.data_dir.join("patients");
    let id = format!(
        "{}-{}",
        now_ms(),
        &crate::storage::patient_dir_name(key)[..12]
    );
    let mut done = 0usize;
    for r in &records {
        let rel = r.path.strip_prefix(&patients).unwrap_or(&r.path);
        if !r.path.is_file() {
            if let Some(t) = ctx.log.take(rel) {
                // A small instance in the log: copied out when it is to be kept, then released.
                let res = match ctx.config.patients.expire_action {
                    ExpireAction::Delete => Ok(()),
                    ExpireAction::Move => {
                        let dest = ctx.data_dir.join("expired").join(&id).join(rel);
                        dest.parent()
                            .map_or(Ok(()), fs::create_dir_all)
                            .and_then(|()| ctx.log.read(t.latest))
                            .and_then(|i| i.write_file(&dest))
                            .and_then(|_| sync_data_dir_checked(ctx)) // durably aside, then released
                    }
                };
                let all: Vec<_> = t.all().collect();
                match res {
                    Ok(()) => {
                        // Expired (deleted, or durably aside): a release that fails now is
                        // retried by the log itself, so the records are not given back.
                        if let Err(e) = ctx.log.release(&all) {
                            tracing::warn!(path = %r.path.display(), error = %e, "an expired instance's release failed: the log retries it");
                        }
                        done += 1;
                    }
                    Err(e) => {
                        ctx.log.untake(rel.to_path_buf(), t);
                        tracing::error!(path = %r.path.display(), error = %e, "could not expire an instance");
                    }
                }
                continue;
            }
        }
        let res = match ctx.config.patients.expire_action {
            ExpireAction::Delete => fs::remove_file(&r.path),
            ExpireAction::Move => {
                let rel = r.path.strip_prefix(&patients).unwrap_or(&r.path);
                let dest = ctx.data_dir.join("expired").join(&id).join(rel);
                dest.parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| fs::rename(&r.path, &dest))
            }
        };
        match res {
            Ok(()) => done += 1,
            Err(e) => {
                tracing::error!(path = %r.path.display(), error = %e, "could not expire an instance")
            }
        }
    }
    ctx.pipeline.stats.expired.fetch_add(1, Ordering::Relaxed);
    let who = Who::new(key, ctx.config.log.phi);
    tracing::warn!(
        patient = %who.digest,
        patient_id = who.id,
        instances = done,
        action = ?ctx.config.patients.expire_action,
        "patient expired"
    );
}

/// A batch as the status page shows it: its directory under `batches/` or `failed/`, and what
/// its `state` (or `reason.txt`) says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOnDisk {
    /// The directory name (`<ms>-<patient digest, 12 hex>-<pid>-<n>`).
    pub id: String,
    /// `processing`, `exporting` (from `state`), `claiming` (a `.tmp` batch being set aside),
    /// `failed`, or `unknown` (no readable state).
    pub stage: String,
    pub processing_attempts: u32,
    pub export_attempts: u32,
    /// The first lines of `reason.txt` (failed batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Lines and bytes of `reason.txt` shown per failed batch.
pub const REASON_LINES: usize = 5;
pub const REASON_BYTES: usize = 1024;

/// The batches under `data_dir`'s `batches/` (oldest first) and `failed/` (newest first),
/// at most `cap` of each, with how many each folder holds. Reads only small files (`state`,
/// the head of `reason.txt`), never a manifest; safe beside the workers (a batch that moves
/// meanwhile is shown where it was, or not at all).
pub fn on_disk(data_dir: &Path, cap: usize) -> (Vec<BatchOnDisk>, usize, Vec<BatchOnDisk>, usize) {
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let in_flight_dir = data_dir.join("batches");
    let in_flight_names = names(&in_flight_dir);
    let in_flight = in_flight_names
        .iter()
        .take(cap)
        .map(|id| {
            let dir = in_flight_dir.join(id);
            let (stage, p, e) = if id.ends_with(".tmp") {
                ("claiming".to_string(), 0, 0)
            } else {
                match read_state(&dir) {
                    Ok(s) => (
                        match s.stage {
                            Stage::Processing => "processing",
                            Stage::Exporting => "exporting",
                            Stage::Exported => "exported",
                        }
                        .to_string(),
                        s.processing_attempts,
                        s.export_attempts,
                    ),
                    Err(_) => ("unknown".to_string(), 0, 0),
                }
            };
            BatchOnDisk {
                id: id.clone(),
                stage,
                processing_attempts: p,
                export_attempts: e,
                reason: None,
            }
        })
        .collect();
    let failed_dir = data_dir.join("failed");
    let failed_names = names(&failed_dir);
    let failed = failed_names
        .iter()
        .rev()
        .take(cap)
        .map(|id| {
            let dir = failed_dir.join(id);
            let state = read_state(&dir).ok();
            BatchOnDisk {
                id: id.clone(),
                stage: "failed".into(),
                processing_attempts: state.as_ref().map_or(0, |s| s.processing_attempts),
                export_attempts: state.as_ref().map_or(0, |s| s.export_attempts),
                reason: Some(reason_head(&dir.join("reason.txt"))),
            }
        })
        .collect();
    (in_flight, in_flight_names.len(), failed, failed_names.len())
}

/// The first [`REASON_LINES`] lines (at most [`REASON_BYTES`] bytes) of a `reason.txt`.
fn reason_head(path: &Path) -> String {
    use std::io::Read;
    let mut buf = Vec::with_capacity(REASON_BYTES);
    match fs::File::open(path).and_then(|f| f.take(REASON_BYTES as u64).read_to_end(&mut buf)) {
        Ok(_) => {
            let text = String::from_utf8_lossy(&buf);
            let lines: Vec<&str> = text.lines().take(REASON_LINES).collect();
            lines.join("\n")
        }
        Err(e) => format!("(no reason.txt: {e})"),
    }
}

/// Whether `id` can name a batch directory: what `create` makes (digits, hex, `-`), so a
/// name from an HTTP request or a command line can never leave `failed/` (design rule 9).
pub fn is_batch_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The ids of the batches in `failed/`, oldest first.
pub(super) fn failed_ids(data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(data_dir.join("failed"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_batch_id(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Moves failed batch `id` back to `batches/<id>/`, its attempts reset (in its `state`,
/// written before the move, so a crash leaves it either still failed or resumable) and its
/// `reason.txt` kept as `previous-failure.txt`.
pub(super) fn unfail(data_dir: &Path, id: &str) -> Result<(), String> {
    if !is_batch_id(id) {
        return Err(format!("{id:?} is not a batch id"));
    }
    let from = data_dir.join("failed").join(id);
    if !from.is_dir() {
        return Err(format!("no failed batch {id}"));
    }
    let to = data_dir.join("batches").join(id);
    if to.exists() {
        return Err(format!("batches/{id} exists already"));
    }
    let mut state = read_state(&from).map_err(|e| {
        format!("{id} has no readable state ({e}): it cannot run again; dicomgate extract --batch {id} copies its instances out")
    })?;
    state.processing_attempts = 0;
    state.export_attempts = 0;
    let step = |what: &str, e: io::Error| format!("{id}: {what}: {e}");
    write_state(&from, &state).map_err(|e| step("cannot reset its state", e))?;
    let reason = from.join("reason.txt");
    if reason.exists() {
        fs::rename(&reason, from.join("previous-failure.txt"))
            .map_err(|e| step("cannot keep its reason", e))?;
    }
    fs::create_dir_all(data_dir.join("batches")).map_err(|e| step("batches/", e))?;
    fs::rename(&from, &to).map_err(|e| step("cannot move it back to batches/", e))?;
    if let Ok(f) = fs::File::open(data_dir) {
        let _ = rustix::fs::syncfs(&f);
    }
    Ok(())
}
