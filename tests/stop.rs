//! Issue 12, stopping: a graceful stop on SIGTERM (open associations finish, running processing
//! may finish until `[node] drain_seconds`, then it is cut and resumes at the next start, run
//! once), a second signal that stops at once, and one node per data directory. Real peers
//! (DCMTK storescu) and the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rustix::process::Signal;

/// A processing command: sleeps (a unique, findable duration) while `flag` exists and the
/// patient is SLOW, then logs the patient to `runs` and copies its input to its output.
fn processing(dir: &Path, flag: &Path, runs: &Path, sleep: &str) -> (String, PathBuf) {
    let script = dir.join("process.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nif [ \"$DICOMGATE_PATIENT_ID\" = SLOW ] && [ -e {flag:?} ]; then sleep {sleep}; fi\n\
             echo \"$DICOMGATE_PATIENT_ID\" >> {runs:?}\ncp -R \"$DICOMGATE_INPUT_DIR\"/. \"$DICOMGATE_OUTPUT_DIR\"/\n"
        ),
    )
    .unwrap();
    (
        format!(
            "[processing]\ncommand = [\"sh\", {:?}]\ntimeout_seconds = 300\n",
            script.display().to_string()
        ),
        script,
    )
}

/// Processes whose command line contains `needle` (an orphan would).
fn processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

/// Part-10 files of one patient and series, `pixels` bytes of pixel data each.
fn instances(dir: &Path, patient: &str, n: usize, pixels: usize) -> Vec<PathBuf> {
    let study = format!("1.2.826.0.1.3680043.10.20.{}", patient.len());
    let series = format!("{study}.1");
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let sop = format!("{series}.{i}");
            let meta = dicomgate::storage::FileMeta {
                sop_class_uid: CT_IMAGE_STORAGE.into(),
                sop_instance_uid: sop.clone(),
                transfer_syntax_uid: EXPLICIT_LE.into(),
                source_ae_title: String::new(),
                ..Default::default()
            };
            let mut f = dicomgate::dicom::part10::header(&meta);
            f.extend_from_slice(&dataset(patient, &study, &series, &sop, pixels));
            let p = dir.join(format!("{patient}-{i}.dcm"));
            std::fs::write(&p, f).unwrap();
            p
        })
        .collect()
}

fn runs_of(runs: &Path) -> Vec<String> {
    std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn storescu(port: &str, files: &[PathBuf]) -> std::process::Child {
    dcmtk("storescu")
        .args(["-aec", "DICOMGATE", "127.0.0.1", port])
        .args(files)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A node (with `node_toml` in its [node] section) whose processing of patient SLOW sleeps
/// `sleep` seconds while `flag` exists; SLOW's one instance has been sent and its processing is
/// running when this returns.
struct Slow {
    node: Node,
    src: tempfile::TempDir,
    _tmp: tempfile::TempDir,
    flag: PathBuf,
    runs: PathBuf,
    script: PathBuf,
}

fn slow_node(node_toml: &str, sleep: &str) -> Slow {
    let src = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let flag = tmp.path().join("slow");
    std::fs::write(&flag, b"").unwrap();
    let runs = tmp.path().join("runs.log");
    let (processing, script) = processing(tmp.path(), &flag, &runs, sleep);
    let node = Node::start_with_node(
        node_toml,
        &format!("[trigger]\non_association_close = true\nquiet_seconds = 0\n{processing}"),
    );
    let slow = instances(&src.path().join("slow"), "SLOW", 1, 64);
    assert!(storescu(&node.port(), &slow).wait().unwrap().success());
    assert!(
        wait_until(30, || !processes_with(sleep).is_empty()),
        "the slow processing never started\n{}",
        node.log()
    );
    Slow {
        node,
        src,
        _tmp: tmp,
        flag,
        runs,
        script,
    }
}

/// SIGTERM while four storescu associations send 100 files each and a processing command
/// runs: every storescu completes all its files with success, the node exits 0 once its
/// drain is over (the long processing is cut at `drain_seconds`), no process of the cut
/// command remains, and after a restart every patient's batch has been processed exactly once.
#[test]
fn sigterm_lets_open_associations_finish_and_processing_resume_once() {
    let sleep = "61.25";
    let Slow {
        mut node,
        src,
        _tmp,
        flag,
        runs,
        script,
    } = slow_node("drain_seconds = 3", sleep);
    let patients = ["PA", "PBB", "PCCC", "PDDDD"];
    let senders: Vec<_> = patients
        .iter()
        .map(|p| {
            let files = instances(&src.path().join(p), p, 100, 256 << 10);
            storescu(&node.port(), &files)
        })
        .collect();
    // While they send (checked below from the node's drain line).
    std::thread::sleep(std::time::Duration::from_millis(300));
    node.signal(Signal::TERM);
    // The listener is closed at once: a new association is refused while the drain goes on.
    assert!(
        wait_until(10, || node.log().contains("draining")),
        "{}",
        node.log()
    );
    let echo = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args([
            "echo",
            &format!("127.0.0.1:{}", node.port()),
            "--called",
            "DICOMGATE",
        ])
        .output()
        .unwrap();
    assert!(
        !echo.status.success(),
        "a new association during the drain was accepted"
    );
    for s in senders {
        let out = s.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "storescu: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
    }
    let status = node.wait_exit(60).expect("the node stops after its drain");
    assert!(status.success(), "exit status {status:?}\n{}", node.log());
    let log = node.log();
    let drain = log
        .lines()
        .find(|l| l.contains("draining"))
        .expect("the drain is logged")
        .to_string();
    assert!(
        !drain.contains("open_associations=0"),
        "SIGTERM came after the senders were done: the test proves nothing\n{drain}"
    );
    assert!(log.contains("pipeline_interrupted=true"), "{log}");
    assert!(
        processes_with(sleep).is_empty()
            && processes_with(&script.display().to_string()).is_empty(),
        "the cut processing left processes behind"
    );
    assert!(
        !runs_of(&runs).contains(&"SLOW".to_string()),
        "cut, not finished"
    );
    // Restart: the cut batch resumes and runs to the end, once; nothing runs twice.
    std::fs::remove_file(&flag).unwrap();
    node.restart();
    let all: Vec<String> = std::iter::once("SLOW")
        .chain(patients)
        .map(String::from)
        .collect();
    assert!(
        wait_until(60, || {
            let mut r = runs_of(&runs);
            r.sort();
            let mut want = all.clone();
            want.sort();
            r == want
        }),
        "runs {:?}\n{}",
        runs_of(&runs),
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut r = runs_of(&runs);
    r.sort();
    let mut want = all;
    want.sort();
    assert_eq!(
        r, want,
        "each patient processed exactly once across the restart"
    );
}

/// A second SIGTERM while draining stops at once (exit status 1), and the running processing
/// command's process group goes with it.
#[test]
fn second_signal_stops_at_once_and_leaves_no_processing_behind() {
    let sleep = "62.75";
    let Slow {
        mut node,
        flag,
        runs,
        _tmp,
        ..
    } = slow_node("drain_seconds = 600", sleep);
    node.signal(Signal::TERM);
    assert!(
        wait_until(30, || node.log().contains("draining")),
        "{}",
        node.log()
    );
    node.signal(Signal::TERM);
    let status = node.wait_exit(30).expect("a second signal stops the node");
    assert_eq!(status.code(), Some(1), "{}", node.log());
    assert!(
        wait_until(10, || processes_with(sleep).is_empty()),
        "processing outlived the node"
    );
    // Stopped, not failed: the batch resumes and runs to its end once.
    std::fs::remove_file(&flag).unwrap();
    node.restart();
    assert!(
        wait_until(30, || runs_of(&runs) == vec!["SLOW".to_string()]),
        "runs {:?}\n{}",
        runs_of(&runs),
        node.log()
    );
    assert!(!node.data_dir.join("failed").exists(), "{}", node.log());
}

/// With nothing left to wait for, a drain ends by itself long before its deadline: the
/// senders finish, their instances are exported (router mode, to the default folder), and the
/// node exits 0 (with `drain_seconds = 600` the test would time out otherwise).
#[test]
fn drain_ends_once_associations_and_pipeline_are_done() {
    let src = tempfile::tempdir().unwrap();
    let mut node = Node::start_with_node(
        "drain_seconds = 600",
        "[trigger]\non_association_close = true\nquiet_seconds = 0\n",
    );
    let mut sent = 0;
    let senders: Vec<_> = ["QA", "QBB"]
        .iter()
        .map(|p| {
            let files = instances(&src.path().join(p), p, 100, 128 << 10);
            sent += files.len();
            storescu(&node.port(), &files)
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    node.signal(Signal::TERM);
    for s in senders {
        assert!(
            s.wait_with_output().unwrap().status.success(),
            "{}",
            node.log()
        );
    }
    let status = node
        .wait_exit(60)
        .unwrap_or_else(|| panic!("the drain did not end once idle\n{}", node.log()));
    assert!(status.success(), "{}", node.log());
    let exported = files_under(&node.data_dir.join("export")).len();
    assert_eq!(
        exported, sent,
        "everything acknowledged was exported before the exit"
    );
}

/// An export waiting on a downstream that accepts and never answers does not hold the stop
/// until its 60 s I/O timeout, and the cut export is not counted as a failed attempt (with
/// `attempts = 1` the batch would have gone to failed/).
#[test]
fn an_export_to_a_silent_peer_does_not_hold_the_stop() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(std::time::Duration::from_secs(120));
    });
    let src = tempfile::tempdir().unwrap();
    let mut node = Node::start_with_node(
        "drain_seconds = 1",
        &format!(
            "[trigger]\non_association_close = true\nquiet_seconds = 0\n\
             [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{port}\"\nae_title = \"SILENT\"\n\
             [outbox]\nattempts = 1\n"
        ),
    );
    let files = instances(&src.path().join("x"), "SILENTPEER", 3, 64);
    assert!(storescu(&node.port(), &files).wait().unwrap().success());
    assert!(
        wait_until(30, || node.log().contains("batch claimed")),
        "{}",
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    node.signal(Signal::TERM);
    let status = node
        .wait_exit(30)
        .unwrap_or_else(|| panic!("the stop waited for the silent peer\n{}", node.log()));
    assert!(status.success(), "{}", node.log());
    assert!(!node.data_dir.join("failed").exists(), "{}", node.log());
    assert_eq!(
        std::fs::read_dir(node.data_dir.join("batches"))
            .unwrap()
            .count(),
        1,
        "the batch waits for the next start"
    );
    drop(held);
}

/// A kill -9 leaves the processing command running (its own process group). At the next start
/// it is killed before its batch resumes, so the batch never runs twice at once, and the
/// resumed run is the only one that finishes.
#[test]
fn a_processing_run_left_by_a_killed_node_is_killed_before_its_batch_resumes() {
    let sleep = "63.5";
    let Slow {
        mut node,
        flag,
        runs,
        _tmp,
        ..
    } = slow_node("", sleep);
    node.kill9();
    assert!(
        !processes_with(sleep).is_empty(),
        "kill -9 leaves the command running"
    );
    std::fs::remove_file(&flag).unwrap();
    node.restart();
    assert!(
        wait_until(20, || processes_with(sleep).is_empty()),
        "the left-over run still runs beside the resumed batch\n{}",
        node.log()
    );
    assert!(
        wait_until(30, || runs_of(&runs) == vec!["SLOW".to_string()]),
        "runs {:?}\n{}",
        runs_of(&runs),
        node.log()
    );
}

/// A second node on the same data directory refuses to start, naming the first one's PID
/// (it took over the first one's in-flight batches).
#[test]
fn second_node_on_the_same_data_directory_refuses_to_start() {
    let mut node = Node::start("");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--config"])
        .arg(node.config_path())
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let refused = wait_until(30, || second.try_wait().unwrap().is_some());
    if !refused {
        let _ = second.kill();
    }
    let out = second.wait_with_output().unwrap();
    assert!(refused, "a second node started on the same data directory");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another dicomgate") && err.contains(&format!("pid {}", node.pid())),
        "{err}"
    );
    assert!(node.is_running());
}
