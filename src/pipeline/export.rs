//! Export of a batch's results: C-STORE to a downstream node (`kind = "dicom"`) or a folder
//! (`kind = "folder"`).
//!
//! Owns: delivering a list of instances (Part-10 files, or segment log records that a
//! router-mode batch never copied out) to one destination, all or nothing from the caller's
//! point of view (an `Err` means "retry the whole destination later"; a downstream
//! receiving an instance twice replaces it, as C-STORE allows). Must never build a path from
//! file contents without validating it (UIDs checked per PS3.5 §9.1).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{ExportConfig, ExportKind, PeerConfig};
use crate::dicom::part10::{self, InstanceFile};
use crate::dicom::{scan, tags, uid::is_valid_uid};
use crate::net::scu::{store_files, ScuError, ScuOptions, StoreFilesError, StoreOutcome};
use crate::storage::log::{Loc, Log};

/// The error of an export cut short because the node is stopping.
pub const STOPPING: &str = "node stopping";

/// Where an instance to export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A Part-10 file.
    File(PathBuf),
    /// A segment log record, read as the Part-10 file it stands for.
    Log(Loc),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Log(l) => format!("log record {}:{}", l.seq, l.offset),
        }
    }
}

fn read(src: &Source, log: &Log) -> Result<InstanceFile, String> {
    let bytes = match src {
        Source::File(path) => fs::read(path),
        Source::Log(loc) => log.read(*loc).map(|i| i.part10()),
    }
    .map_err(|e| format!("{}: {e}", src.name()))?;
    InstanceFile::parse(bytes).ok_or_else(|| format!("{}: not a Part-10 file", src.name()))
}

/// Delivers `files` to `dest`; `node_ae` is the default calling AE title; log records are read
/// from `log`; `peers`: the known peers a `reply_to_sender` export chooses from, by each
/// instance's own Calling AE Title, or `batch_sender`'s for an instance that keeps none (a
/// processing result).
/// `stop`: the node is stopping; checked before each instance (an export cut short is
/// retried at the next start).
pub fn run(
    dest: &ExportConfig,
    files: &[Source],
    node_ae: &str,
    log: &Log,
    peers: &[PeerConfig],
    batch_sender: Option<&str>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    match dest.kind {
        ExportKind::Dicom if dest.reply_to_sender => {
            // Each instance back to its own sender (a patient's batch may hold instances from
            // several modalities: none goes to another sender's peer).
            let mut groups: Vec<(&PeerConfig, Vec<Source>)> = Vec::new();
            for f in files {
                let sender = sender_of(f, log)?;
                let sender = sender.as_deref().or(batch_sender).ok_or_else(|| {
                    format!(
                        "reply to sender: {} keeps no Calling AE Title, nor does the batch",
                        f.name()
                    )
                })?;
                let peer = peers
                    .iter()
                    .find(|p| p.ae_title.trim() == sender)
                    .ok_or_else(|| {
                        format!(
                            "reply to sender: the batch came from calling AE title {sender:?}, \
                             which no [[peer]] has: add one with its address"
                        )
                    })?;
                match groups.iter_mut().find(|(p, _)| std::ptr::eq(*p, peer)) {
                    Some((_, g)) => g.push(f.clone()),
                    None => groups.push((peer, vec![f.clone()])),
                }
            }
            let calling = dest.calling_ae_title.as_deref().unwrap_or(node_ae);
            for (peer, group) in groups {
                let tls = crate::net::tls::export_client_config(dest, "export ")?;
                to_dicom(
                    &peer.address,
                    peer.ae_title.trim(),
                    calling,
                    tls,
                    &group,
                    log,
                    stop,
                )?;
            }
            Ok(())
        }
        ExportKind::Folder => {
            let root = dest.path.as_deref().ok_or("folder export without path")?;
            to_folder(root, files, log, stop)
        }
        ExportKind::Dicom => {
            let address = dest
                .address
                .as_deref()
                .ok_or("dicom export without address")?;
            let called = dest
                .ae_title
                .as_deref()
                .ok_or("dicom export without ae_title")?;
            let calling = dest.calling_ae_title.as_deref().unwrap_or(node_ae);
            // Read at each export: renewed certificate files are used without a restart.
            let tls = crate::net::tls::export_client_config(dest, "export ")?;
            to_dicom(address, called, calling, tls, files, log, stop)
        }
    }
}

/// The Calling AE Title an instance was received from (its Source AE Title), if it keeps one.
/// A file's meta is read from its first 64 KiB only.
pub fn sender_of(src: &Source, log: &Log) -> Result<Option<String>, String> {
    let head = match src {
        Source::File(path) => {
            use std::io::Read;
            let mut head = Vec::with_capacity(4096);
            File::open(path)
                .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
                .map(|_| head)
        }
        Source::Log(loc) => log.read(*loc).map(|i| part10::header(&i.file_meta())),
    }
    .map_err(|e| format!("{}: {e}", src.name()))?;
    Ok(part10::parse(&head)
        .map(|p| p.source_ae_title)
        .filter(|s| !s.is_empty()))
}

/// `<root>/<Study UID>/<Series UID>/<SOP Instance UID>.dcm`, each written to a temporary name,
/// flushed and renamed, then the directories flushed.
pub fn to_folder(
    root: &Path,
    files: &[Source],
    log: &Log,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return Err(STOPPING.into());
        }
        let p = read(f, log)?;
        if !is_valid_uid(p.sop_instance_uid.as_bytes()) {
            return Err(format!("{}: invalid SOP Instance UID", f.name()));
        }
        let enc = crate::dicom::transfer_syntax::by_uid(p.transfer_syntax_uid.as_bytes())
            .map(|t| t.encoding);
        let values = enc.and_then(|enc| {
            scan::scan(
                p.data_set(),
                enc,
                &[tags::STUDY_INSTANCE_UID, tags::SERIES_INSTANCE_UID],
            )
            .ok()
        });
        let name = |tag, fallback: &str| {
            values
                .as_ref()
                .and_then(|v| v.uid(tag))
                .filter(|u| is_valid_uid(u))
                .map_or_else(
                    || fallback.to_string(),
                    |u| String::from_utf8_lossy(u).into_owned(),
                )
        };
        let dir = root
            .join(name(tags::STUDY_INSTANCE_UID, "no-study"))
            .join(name(tags::SERIES_INSTANCE_UID, "no-series"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dest = dir.join(format!("{}.dcm", p.sop_instance_uid));
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            p.sop_instance_uid,
            std::process::id()
        ));
        let w = (|| -> std::io::Result<()> {
            let mut out = File::create(&tmp)?;
            out.write_all(&p.bytes)?;
            out.sync_data()?;
            fs::rename(&tmp, &dest)
        })();
        if let Err(e) = w {
            let _ = fs::remove_file(&tmp);
            return Err(format!("{}: {e}", dest.display()));
        }
        dirs.insert(dir);
    }
    for d in dirs.iter().chain(std::iter::once(&root.to_path_buf())) {
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(())
}

/// One association per batch (more only if it needs over 128 presentation contexts), each file
/// sent in its own transfer syntax ([`store_files`]). Success, or a warning status (0xB000,
/// 0xB006, 0xB007), counts as delivered; anything else fails the export.
pub fn to_dicom(
    address: &str,
    called: &str,
    calling: &str,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    files: &[Source],
    log: &Log,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let opts = ScuOptions {
        calling_ae: calling.to_string(),
        called_ae: called.to_string(),
        max_pdu_length: 65_536,
        timeout: Duration::from_secs(60),
        tls,
    };
    let read = |f: &Source| {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return Err(STOPPING.to_string());
        }
        read(f, log).map(Some)
    };
    store_files(address, &opts, files, read, |_, p, outcome| match outcome {
        StoreOutcome::Answered {
            status: 0x0000 | 0xB000 | 0xB006 | 0xB007,
            ..
        } => Ok(()),
        StoreOutcome::Answered { status, comment } => Err(format!(
            "{called}@{address} answered 0x{status:04X} for {} ({})",
            p.sop_instance_uid,
            comment.unwrap_or_default()
        )),
        StoreOutcome::NotAccepted(w) => {
            Err(format!("{called}@{address}: {}", ScuError::NoContext(w)))
        }
    })
    .map_err(|e| match e {
        StoreFilesError::Scu(e) => format!("{called}@{address}: {e}"),
        StoreFilesError::Release(e) => format!("{called}@{address}: release: {e}"),
        StoreFilesError::Caller(e) => e,
    })
}
