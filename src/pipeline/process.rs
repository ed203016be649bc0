//! Processing a claimed batch: the [`Processor`] trait for library users and the
//! [`CommandProcessor`] behind `[processing] command`.
//!
//! Owns: running one batch's processing with a timeout, off the reactor threads. Must never
//! touch the batch's `files/` (the data of record): processors read `input/` (hard links) and
//! write `output/`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// `output_dir`, unless `[processing] empty_output = "ok"`.
    fn process(&self, batch: &BatchInfo) -> Result<(), String>;
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
    fn process(&self, batch: &BatchInfo) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let Some((program, args)) = self.config.command.split_first() else {
            return Err("processing.command is empty".into());
        };
        // Spawned and registered under the lock that kill_running takes: none escapes it.
        let mut running = RUNNING.lock().map_err(|_| "processing registry poisoned")?;
        if running.0 {
            return Err("node shutting down".into());
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
            .map_err(|e| format!("cannot start {program}: {e}"))?;
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
                Ok(Some(status)) if status.success() => break Ok(()),
                Ok(Some(status)) => break Err(format!("processing command failed: {status}")),
                Ok(None) => {}
                Err(e) => break Err(format!("waiting for the processing command: {e}")),
            }
            if started.elapsed() >= timeout {
                kill_group(child.id());
                let _ = child.wait();
                break Err(format!(
                    "processing command killed after {:.1} s (timeout_seconds)",
                    timeout.as_secs_f64()
                ));
            }
            if self.shutdown.load(Ordering::Acquire) || stopping() {
                kill_group(child.id());
                let _ = child.wait();
                break Err("node shutting down".into());
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

    fn run(cmd: &[&str], timeout: f64) -> Result<(), String> {
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

    #[test]
    fn exit_status_and_environment() {
        assert!(run(&["sh", "-c", "test \"$DICOMGATE_PATIENT_ID\" = P"], 10.0).is_ok());
        assert!(run(&["sh", "-c", "exit 3"], 10.0)
            .unwrap_err()
            .contains("failed"));
        assert!(run(&["/nonexistent/tool"], 10.0)
            .unwrap_err()
            .contains("cannot start"));
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let err = run(&["sh", "-c", &script], 0.3).unwrap_err();
        assert!(err.contains("killed"), "{err}");
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "a child of the command outlived the kill");
    }
}
