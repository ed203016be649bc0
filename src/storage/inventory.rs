//! What a data directory holds, for operators (`dicomgate ls`, `dicomgate extract`) and tests:
//! pending instances, whether each is its own file under `patients/` or a record in the segment
//! log, and the log's segments. Read-only and safe beside a running node (only whole,
//! checksummed records are reported). Must never modify the data directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::log::{self, Loc};

/// Where a pending instance's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Its own Part-10 file.
    File(PathBuf),
    /// A record of the segment log.
    Log(Loc),
}

/// One pending instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to `patients/`: `<patient digest>/<study>/<series>/<SOP Instance UID>.dcm`.
    pub rel: PathBuf,
    pub patient_id: Vec<u8>,
    pub sop_instance_uid: String,
    pub source: Source,
    pub bytes: u64,
}

pub use super::log::SegmentInfo;

/// Every pending instance of `data_dir` (files and log records) and the log's segments.
pub fn pending(data_dir: &Path) -> io::Result<(Vec<Entry>, Vec<SegmentInfo>)> {
    pending_except(data_dir, &std::collections::HashSet::new())
}

/// [`pending`], leaving out the log records in `held` (those that batches are made of: the
/// pipeline knows which, `pipeline::held_records`).
pub fn pending_except(
    data_dir: &Path,
    held: &std::collections::HashSet<Loc>,
) -> io::Result<(Vec<Entry>, Vec<SegmentInfo>)> {
    let patients = data_dir.join("patients");
    let mut out = Vec::new();
    let mut files = Vec::new();
    walk_files(&patients, &mut files)?;
    for f in files {
        if f.extension().is_none_or(|e| e != "dcm") {
            continue;
        }
        let Ok(rel) = f.strip_prefix(&patients).map(Path::to_path_buf) else {
            continue;
        };
        let patient_id = rel
            .components()
            .next()
            .and_then(|c| fs::read(patients.join(c.as_os_str()).join("patient-id")).ok())
            .unwrap_or_default();
        let sop_instance_uid = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = fs::metadata(&f).map_or(0, |m| m.len());
        out.push(Entry {
            rel,
            patient_id,
            sop_instance_uid,
            source: Source::File(f),
            bytes,
        });
    }
    let (segments, records) = log::inspect(&data_dir.join("log"))?;
    let files_at: std::collections::HashMap<PathBuf, usize> = out
        .iter()
        .enumerate()
        .map(|(i, e)| (e.rel.clone(), i))
        .collect();
    for r in records {
        if held.contains(&r.loc) {
            continue;
        }
        let entry = Entry {
            rel: r.rel,
            patient_id: r.meta.patient_id,
            sop_instance_uid: r.meta.sop_instance_uid,
            source: Source::Log(r.loc),
            bytes: r.bytes,
        };
        match files_at.get(&entry.rel) {
            // Both copies of an instance re-sent across `inline_max_bytes`: the newer stays,
            // as the start-up recovery decides (the record's time against the file's).
            Some(&i) => {
                if let Source::File(f) = &out[i].source {
                    if r.meta.received_ms > file_mtime_ms(f) {
                        out[i] = entry;
                    }
                }
            }
            None => out.push(entry),
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, segments))
}

/// A file's modification time in ms since the epoch, 0 when unreadable (as recovery compares
/// it with a log record's time: `pipeline::batch::log_is_newer`).
fn file_mtime_ms(f: &Path) -> u64 {
    fs::metadata(f)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// How the cluster database names the instance at `rel` under a node's `patients/` (a row's
/// `location`).
pub fn location_of(rel: &Path) -> String {
    Path::new("patients")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

/// The path under `patients/` that a row's `location` names; `None` when it is not
/// `patients/<normal components>` (never one this cluster writes, but checked all the same).
pub fn rel_of(location: &str) -> Option<&Path> {
    Path::new(location)
        .strip_prefix("patients")
        .ok()
        .filter(|rel| {
            rel.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
}

/// Writes `entry` as a Part-10 file at `out_dir/<entry.rel>` (and, as under `patients/`, the
/// raw Patient ID in `<patient digest>/patient-id`); returns its path.
pub fn extract(data_dir: &Path, entry: &Entry, out_dir: &Path) -> io::Result<PathBuf> {
    let dest = out_dir.join(&entry.rel);
    if let Some(p) = dest.parent() {
        fs::create_dir_all(p)?;
    }
    if let Some(first) = entry.rel.components().next() {
        let id = out_dir.join(first.as_os_str()).join("patient-id");
        if !id.exists() {
            fs::write(&id, &entry.patient_id)?;
        }
    }
    match &entry.source {
        Source::File(f) => {
            fs::copy(f, &dest)?;
        }
        Source::Log(loc) => {
            log::read_record(&data_dir.join("log"), *loc)?.write_file(&dest)?;
        }
    }
    Ok(dest)
}

/// Every regular file under `root` (none when it does not exist), iteratively, sorted.
pub fn walk_files(root: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in rd.flatten() {
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(())
}
