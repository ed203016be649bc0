//! Processing a claimed batch: the [`Processor`] trait for library users and the
//! [`CommandProcessor`] behind `[processing] command`.
//!
//! Owns: running one batch's processing with a timeout, off the reactor threads. Must never
//! touch the batch's `files/` (the data of record): processors read `input/` (hard links) and
//! write `output/`.

use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ProcessingConfig;

/// What a processor is given.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    /// The batch's directory name under `batches/`.
    pub id: String,
    /// The grouping key (Patient ID by default), as text.
    pub patient_id: String,
    /// One subfolder per input name holding the batch's Part-10 files (read-only by contract).
    pub input_dir: PathBuf,
    /// Every DICOM file left here, recursively, is exported. Empty at the start.
    pub output_dir: PathBuf,
    /// The files per input: (input name, files).
    pub inputs: Vec<(String, Vec<PathBuf>)>,
}

/// Processing for library users: runs on a pipeline worker thread, once per batch (again after
/// a crash that interrupted it, or on retry when `[processing] attempts` > 1).
pub trait Processor: Send + Sync {
    /// Reads `batch.input_dir`, writes results to `batch.output_dir`. An `Err` keeps the data
    /// and counts as a failed attempt; so does an `Ok` that leaves no DICOM file in
    /// `output_dir`, unless `[processing] empty_output = "ok"`. A library processor's own
    /// failure is [`ProcessingError::Failed`] (a `String` or `&str` converts to it with `?`).
    fn process(&self, batch: &BatchInfo) -> Result<(), ProcessingError>;
}

/// Why a processing run failed. Its [`Display`](std::fmt::Display) is the reason the log and
/// `failed/<batch>/reason.txt` give; [`ProcessingError::kind`] is the `kind` label of
/// `/metrics`' `dicomgate_processing_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessingError {
    /// Still running after `[processing] timeout_seconds`: its process group was killed.
    TimedOut { after: Duration },
    /// The command exited with this non-zero code.
    Exited { code: i32 },
    /// The command was ended by this signal (not by the node: that is [`Self::TimedOut`] or
    /// [`Self::Stopping`]).
    KilledBySignal { signal: i32, core_dumped: bool },
    /// The command could not be started (not found, not executable, ...).
    CouldNotStart {
        program: String,
        kind: io::ErrorKind,
        /// The operating system's words.
        detail: String,
    },
    /// Waiting for the command failed.
    WaitFailed { kind: io::ErrorKind, detail: String },
    /// The run succeeded but `output/` could not be listed.
    OutputUnreadable { kind: io::ErrorKind, detail: String },
    /// The run succeeded but left no DICOM file in `output/`, and `[processing] empty_output`
    /// is `"fail"` (the default).
    NoOutput,
    /// The node is stopping: the run was not started, or was killed (the batch resumes at the
    /// next start; not counted as a failure).
    Stopping,
    /// A library [`Processor`] failed, in its own words.
    Failed(String),
}

impl ProcessingError {
    /// The error of a command that ended with `status` (`None`: it succeeded).
    pub fn of_status(status: ExitStatus) -> Option<ProcessingError> {
        use std::os::unix::process::ExitStatusExt;
        if status.success() {
            return None;
        }
        Some(match (status.code(), status.signal()) {
            (Some(code), _) => ProcessingError::Exited { code },
            (None, Some(signal)) => ProcessingError::KilledBySignal {
                signal,
                core_dumped: status.core_dumped(),
            },
            // Neither: a stopped or continued child (never reported by a plain wait).
            (None, None) => ProcessingError::WaitFailed {
                kind: io::ErrorKind::Other,
                detail: status.to_string(),
            },
        })
    }

    /// The `kind` label of `dicomgate_processing_failures_total`: one of [`FAILURE_KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            ProcessingError::TimedOut { .. } => "timeout",
            ProcessingError::Exited { .. } => "exit_status",
            ProcessingError::KilledBySignal { .. } => "signal",
            ProcessingError::CouldNotStart { .. } => "not_started",
            ProcessingError::WaitFailed { .. } => "wait_failed",
            ProcessingError::OutputUnreadable { .. } => "output_unreadable",
            ProcessingError::NoOutput => "no_output",
            ProcessingError::Stopping => "stopping",
            ProcessingError::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for ProcessingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::unix::process::ExitStatusExt;
        match self {
            ProcessingError::TimedOut { after } => write!(
                f,
                "processing command killed after {:.1} s (timeout_seconds)",
                after.as_secs_f64()
            ),
            // Worded as the standard library words the status (wait(2)'s encoding).
            ProcessingError::Exited { code } => write!(
                f,
                "processing command failed: {}",
                ExitStatus::from_raw((code & 0xff) << 8)
            ),
            ProcessingError::KilledBySignal {
                signal,
                core_dumped,
            } => write!(
                f,
                "processing command failed: {}",
                ExitStatus::from_raw((signal & 0x7f) | if *core_dumped { 0x80 } else { 0 })
            ),
            ProcessingError::CouldNotStart {
                program, detail, ..
            } => write!(f, "cannot start {program}: {detail}"),
            ProcessingError::WaitFailed { detail, .. } => {
                write!(f, "waiting for the processing command: {detail}")
            }
            ProcessingError::OutputUnreadable { detail, .. } => {
                write!(f, "cannot list output/: {detail}")
            }
            ProcessingError::NoOutput => f.write_str(
                "the run exited successfully but left no DICOM output in output/ \
                 ([processing] empty_output = \"fail\")",
            ),
            ProcessingError::Stopping => f.write_str("node shutting down"),
            ProcessingError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ProcessingError {}

impl From<String> for ProcessingError {
    fn from(why: String) -> Self {
        ProcessingError::Failed(why)
    }
}

impl From<&str> for ProcessingError {
    fn from(why: &str) -> Self {
        ProcessingError::Failed(why.to_string())
    }
}

/// Every [`ProcessingError::kind`] a failed run is counted under ([`Self::Stopping`] is not a
/// failure: a run cut by a stop is not counted).
///
/// [`Self::Stopping`]: ProcessingError::Stopping
pub const FAILURE_KINDS: [&str; 8] = [
    "timeout",
    "exit_status",
    "signal",
    "not_started",
    "wait_failed",
    "output_unreadable",
    "no_output",
    "failed",
];

/// Processing runs that failed, by [`ProcessingError::kind`] (`/metrics`'
/// `dicomgate_processing_failures_total{kind}`, every kind of [`FAILURE_KINDS`] shown from 0).
#[derive(Debug, Default)]
pub struct ProcessingFailures([AtomicU64; FAILURE_KINDS.len()]);

impl ProcessingFailures {
    /// Counts one failed run.
    pub fn count(&self, e: &ProcessingError) {
        let kind = e.kind();
        if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == kind) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (kind, failed runs) for every kind of [`FAILURE_KINDS`].
    pub fn by_kind(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FAILURE_KINDS
            .iter()
            .zip(&self.0)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
    }
}

/// Runs `[processing] command` with `DICOMGATE_PATIENT_ID`, `DICOMGATE_INPUT_DIR`,
/// `DICOMGATE_OUTPUT_DIR` and `DICOMGATE_BATCH_ID` in its environment; its stdout and stderr go
/// to the log line by line. Past `timeout_seconds` (or at node shutdown) its whole process
/// group is killed.
#[derive(Debug)]
pub struct CommandProcessor {
    config: ProcessingConfig,
    shutdown: Arc<AtomicBool>,
}

impl CommandProcessor {
    pub fn new(config: ProcessingConfig, shutdown: Arc<AtomicBool>) -> Self {
        CommandProcessor { config, shutdown }
    }
}

/// Process groups of the processing commands running now, so that a node told to stop at once
/// (a second SIGTERM) leaves none behind; and whether it is stopping so (then no command
/// starts, and one killed is not a failure).
static RUNNING: std::sync::Mutex<(bool, Vec<u32>)> = std::sync::Mutex::new((false, Vec::new()));

/// Stops every processing command running now (their process groups killed; their batches
/// resume at the next start) and lets no new one start.
pub fn kill_running() {
    let pids = match RUNNING.lock() {
        Ok(mut r) => {
            r.0 = true;
            r.1.clone()
        }
        Err(p) => p.into_inner().1.clone(),
    };
    for pid in pids {
        kill_group(pid);
    }
}

/// True once [`kill_running`] was called.
pub fn stopping() -> bool {
    RUNNING.lock().map(|r| r.0).unwrap_or(true)
}

/// Kills the processes that still run batch `id`'s processing (they carry
/// `DICOMGATE_BATCH_ID=<id>` in their environment) from a node that died, and waits until they
/// are gone; returns how many there were.
pub fn kill_leftovers(id: &str) -> usize {
    let needle = format!("DICOMGATE_BATCH_ID={id}");
    let find = || -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != std::process::id() as i32)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
            })
            .collect()
    };
    let found = find();
    for &pid in &found {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            match rustix::process::getpgid(Some(p)) {
                Ok(g) => {
                    let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
                }
                Err(_) => {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
    }
    for _ in 0..250 {
        if find().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    found.len()
}

fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

impl Processor for CommandProcessor {
    fn process(&self, batch: &BatchInfo) -> Result<(), ProcessingError> {
        use std::os::unix::process::CommandExt;
        let Some((program, args)) = self.config.command.split_first() else {
            return Err("processing.command is empty".into());
        };
        // Spawned and registered under the lock that kill_running takes: none escapes it.
        let mut running = RUNNING
            .lock()
            .map_err(|_| ProcessingError::from("processing registry poisoned"))?;
        if running.0 {
            return Err(ProcessingError::Stopping);
        }
        let mut child = Command::new(program)
            .args(args)
            .env("DICOMGATE_PATIENT_ID", &batch.patient_id)
            .env("DICOMGATE_INPUT_DIR", &batch.input_dir)
            .env("DICOMGATE_OUTPUT_DIR", &batch.output_dir)
            .env("DICOMGATE_BATCH_ID", &batch.id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| ProcessingError::CouldNotStart {
                program: program.clone(),
                kind: e.kind(),
                detail: e.to_string(),
            })?;
        let pid = child.id();
        running.1.push(pid);
        drop(running);
        let mut readers = Vec::new();
        for (stream, name) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                "stdout",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                "stderr",
            ),
        ] {
            let Some(stream) = stream else { continue };
            let id = batch.id.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    tracing::info!(batch = %id, stream = name, "processing: {line}");
                }
            }));
        }
        let timeout = Duration::from_secs_f64(self.config.timeout_seconds);
        let started = Instant::now();
        let result = loop {
            match child.try_wait() {
                Ok(Some(status)) => match ProcessingError::of_status(status) {
                    None => break Ok(()),
                    Some(e) => break Err(e),
                },
                Ok(None) => {}
                Err(e) => {
                    break Err(ProcessingError::WaitFailed {
                        kind: e.kind(),
                        detail: e.to_string(),
                    })
                }
            }
            if started.elapsed() >= timeout {
                kill_group(child.id());
                let _ = child.wait();
                break Err(ProcessingError::TimedOut { after: timeout });
            }
            if self.shutdown.load(Ordering::Acquire) || stopping() {
                kill_group(child.id());
                let _ = child.wait();
                break Err(ProcessingError::Stopping);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Ok(mut r) = RUNNING.lock() {
            r.1.retain(|&p| p != pid);
        }
        // The group is gone or finished; the readers end at EOF. (A grandchild that left the
        // group and kept the pipes open would hold them: we do not wait for it.)
        for r in readers {
            if r.is_finished() || result.is_ok() {
                let _ = r.join();
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &[&str], timeout: f64) -> Result<(), ProcessingError> {
        let dir = tempfile::tempdir().unwrap();
        let p = CommandProcessor::new(
            ProcessingConfig {
                command: cmd.iter().map(|s| s.to_string()).collect(),
                timeout_seconds: timeout,
                attempts: 1,
                empty_output: Default::default(),
            },
            Arc::new(AtomicBool::new(false)),
        );
        p.process(&BatchInfo {
            id: "b".into(),
            patient_id: "P".into(),
            input_dir: dir.path().join("in"),
            output_dir: dir.path().to_path_buf(),
            inputs: vec![],
        })
    }

    /// What the log said before the error was typed: "processing command failed: " and the
    /// standard library's words for the exit status.
    fn old_text(script: &str) -> String {
        let status = Command::new("sh").args(["-c", script]).status().unwrap();
        format!("processing command failed: {status}")
    }

    #[test]
    fn exit_status_and_environment() {
        assert!(run(&["sh", "-c", "test \"$DICOMGATE_PATIENT_ID\" = P"], 10.0).is_ok());
        let e = run(&["sh", "-c", "exit 3"], 10.0).unwrap_err();
        assert_eq!(e, ProcessingError::Exited { code: 3 });
        assert_eq!(e.kind(), "exit_status");
        assert_eq!(e.to_string(), old_text("exit 3"));
        let e = run(&["/nonexistent/tool"], 10.0).unwrap_err();
        assert!(
            matches!(&e, ProcessingError::CouldNotStart { program, kind: io::ErrorKind::NotFound, .. } if program == "/nonexistent/tool"),
            "{e:?}"
        );
        assert_eq!(e.kind(), "not_started");
        assert!(
            e.to_string()
                .starts_with("cannot start /nonexistent/tool: "),
            "{e}"
        );
    }

    #[test]
    fn a_command_killed_by_a_signal_is_told_apart_from_an_exit() {
        let e = run(&["sh", "-c", "kill -9 $$"], 10.0).unwrap_err();
        assert_eq!(
            e,
            ProcessingError::KilledBySignal {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(e.kind(), "signal");
        assert_eq!(e.to_string(), old_text("kill -9 $$"));
        assert_eq!(
            e.to_string(),
            "processing command failed: signal: 9 (SIGKILL)"
        );
    }

    #[test]
    fn every_counted_kind_is_a_failure_kind() {
        let errors = [
            ProcessingError::TimedOut {
                after: Duration::from_secs(1),
            },
            ProcessingError::Exited { code: 1 },
            ProcessingError::KilledBySignal {
                signal: 15,
                core_dumped: false,
            },
            ProcessingError::CouldNotStart {
                program: "x".into(),
                kind: io::ErrorKind::NotFound,
                detail: "not found".into(),
            },
            ProcessingError::WaitFailed {
                kind: io::ErrorKind::Other,
                detail: "x".into(),
            },
            ProcessingError::OutputUnreadable {
                kind: io::ErrorKind::PermissionDenied,
                detail: "x".into(),
            },
            ProcessingError::NoOutput,
            ProcessingError::from("model crashed"),
        ];
        let counted = ProcessingFailures::default();
        for e in &errors {
            counted.count(e);
        }
        let by_kind: Vec<_> = counted.by_kind().collect();
        assert_eq!(by_kind.len(), FAILURE_KINDS.len());
        assert!(by_kind.iter().all(|(_, n)| *n == 1), "{by_kind:?}");
        assert!(!FAILURE_KINDS.contains(&ProcessingError::Stopping.kind()));
        assert_eq!(
            ProcessingError::from("model crashed").to_string(),
            "model crashed"
        );
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let err = run(&["sh", "-c", &script], 0.3).unwrap_err();
        assert!(matches!(err, ProcessingError::TimedOut { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "processing command killed after 0.3 s (timeout_seconds)"
        );
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "a child of the command outlived the kill");
    }
}
