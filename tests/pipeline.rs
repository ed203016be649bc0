//! Issue 3 end to end, with real peers: Dicomnode's own scenarios (many associations, patients
//! interleaved; one series over six associations; a patient split over two associations),
//! export to a real DCMTK storescp (file by file, and a downstream that comes up late), and
//! kill -9 during ingest and processing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

/// A processing command that logs "PATIENT COUNT" per run to `log` and copies its input to its
/// output (so the batch is exported).
fn processing(dir: &Path, log: &Path, sleep: f64) -> String {
    let script = dir.join("process.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nsleep {sleep}\nn=$(find \"$DICOMGATE_INPUT_DIR\" -name '*.dcm' | wc -l)\n\
             echo \"$DICOMGATE_PATIENT_ID $n\" >> {log:?}\ncp -R \"$DICOMGATE_INPUT_DIR\"/. \"$DICOMGATE_OUTPUT_DIR\"/\n"
        ),
    )
    .unwrap();
    format!(
        "[processing]\ncommand = [\"sh\", {:?}]\ntimeout_seconds = 60\n",
        script.display().to_string()
    )
}

/// Processing runs logged: (patient, instance count).
fn runs(log: &Path) -> Vec<(String, usize)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (p, n) = l.rsplit_once(' ')?;
            Some((p.to_string(), n.parse().ok()?))
        })
        .collect()
}

fn dcm_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect()
}

/// One association sending `files`: DCMTK storescu, or pynetdicom (which prints "STATUS FILE"
/// per instance on stdout).
fn send(dcmtk_peer: bool, port: &str, files: &[PathBuf]) -> std::process::Child {
    let mut c = if dcmtk_peer {
        let mut c = dcmtk("storescu");
        c.args(["-aec", "DICOMGATE", "127.0.0.1", port]);
        c
    } else {
        let mut c = python();
        c.arg(py_script("send.py")).args([port, "DICOMGATE"]);
        c
    };
    c.args(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a sender; it must succeed, and a pynetdicom one must report success for each file.
/// On failure the node's log is shown too.
fn sent_ok(node: &Node, c: std::process::Child) {
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().all(|l| l.starts_with("0 ")),
        "{text}\nnode log:\n{}",
        node.log()
    );
}

/// `n` instances of one series, SOP Instance UIDs `<series>.<first + i>`, Instance Numbers from
/// `first + 1`.
fn series(
    dir: &Path,
    patient: &str,
    study: &str,
    series: &str,
    first: usize,
    n: usize,
) -> Vec<PathBuf> {
    (first..first + n)
        .map(|i| {
            write_instance(
                dir,
                patient,
                study,
                series,
                &format!("{series}.{i}"),
                i as u32 + 1,
            )
        })
        .collect()
}

/// SOP Instance UIDs of the files in the node's default folder export.
fn exported_sops(node: &Node) -> BTreeSet<String> {
    dcm_files(&node.data_dir.join("export"))
        .iter()
        .map(|p| sop_uid_of(p))
        .collect()
}

/// Instances waiting for their batch: own files under `patients/` and segment log records.
fn pending_instances(node: &Node) -> usize {
    dicomgate::storage::inventory::pending_except(
        &node.data_dir,
        &dicomgate::pipeline::held_records(&node.data_dir).unwrap(),
    )
    .unwrap()
    .0
    .len()
}

/// 20 concurrent associations × 3 series × 50 instances; each association sends series of
/// three different patients (10 patients, 6 series each), interleaved instance by instance.
/// Half the associations are DCMTK storescu, half pynetdicom. Every patient must be processed
/// exactly once, with all 300 of its instances.
#[test]
fn twenty_associations_interleaved_patients_processed_exactly_once() {
    let src = tempfile::tempdir().unwrap();
    let (associations, series_per, per_series, patients) = (20, 3, 50, 10);
    let mut per_assoc: Vec<Vec<PathBuf>> = Vec::new();
    for a in 0..associations {
        let mut series_files: Vec<Vec<PathBuf>> = Vec::new();
        for s in 0..series_per {
            let patient = (a * series_per + s) % patients;
            let dir = src.path().join(format!("a{a}"));
            series_files.push(
                (0..per_series)
                    .map(|i| {
                        write_instance(
                            &dir,
                            &format!("PAT{patient}"),
                            &format!("1.2.826.0.1.3680043.10.1.{patient}"),
                            &format!("1.2.826.0.1.3680043.10.2.{a}.{s}"),
                            &format!("1.2.826.0.1.3680043.10.3.{a}.{s}.{i}"),
                            i as u32 + 1,
                        )
                    })
                    .collect(),
            );
        }
        // Interleave: s0 i0, s1 i0, s2 i0, s0 i1, ...
        let mut files = Vec::new();
        for i in 0..per_series {
            for s in &series_files {
                files.push(s[i].clone());
            }
        }
        per_assoc.push(files);
    }
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runs.log");
    let node = Node::start(&format!(
        "[[input]]\nname = \"ct\"\nmatch = {{ Modality = \"CT\" }}\nmin_instances = {}\n\
         [trigger]\nquiet_seconds = 0\n{}",
        series_per * per_series * associations / patients,
        processing(tmp.path(), &log, 0.0)
    ));
    let port = node.port();
    let children: Vec<_> = per_assoc
        .iter()
        .enumerate()
        .map(|(a, files)| send(a % 2 == 0, &port, files))
        .collect();
    children.into_iter().for_each(|c| sent_ok(&node, c));
    let total = associations * series_per * per_series;
    let export = node.data_dir.join("export");
    assert!(
        wait_until(120, || dcm_files(&export).len() == total
            && runs(&log).len() == patients),
        "exported {} of {total}, runs {:?}\n{}",
        dcm_files(&export).len(),
        runs(&log),
        node.log()
    );
    // Settle, then check nothing ran twice.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let r = runs(&log);
    let by_patient: BTreeMap<_, _> = r.iter().cloned().collect();
    assert_eq!(r.len(), patients, "one run per patient: {r:?}");
    assert_eq!(by_patient.len(), patients, "{r:?}");
    assert!(by_patient.values().all(|&n| n == total / patients), "{r:?}");
    // Every instance exported exactly once, byte-exact.
    let sent: BTreeSet<String> = per_assoc.iter().flatten().map(|p| sop_uid_of(p)).collect();
    let got: BTreeSet<String> = dcm_files(&export).iter().map(|p| sop_uid_of(p)).collect();
    assert_eq!(sent, got);
    for f in per_assoc.iter().flatten().step_by(97) {
        let uid = sop_uid_of(f);
        let out = dcm_files(&export)
            .into_iter()
            .find(|p| p.file_name().unwrap().to_string_lossy() == format!("{uid}.dcm"))
            .unwrap();
        assert_eq!(data_set_of(f), data_set_of(&out));
    }
    assert_eq!(pending_instances(&node), 0);
    assert!(dcm_files(&node.data_dir.join("batches")).is_empty());
    assert!(!node.data_dir.join("failed").exists());
}

/// 6 associations × 5 instances of one series → one processing run with 30 instances and one
/// outgoing association to a real DCMTK storescp, whose files match what was sent.
#[test]
fn six_associations_one_series_one_run_one_outgoing_association() {
    let src = tempfile::tempdir().unwrap();
    let files: Vec<Vec<PathBuf>> = (0..6)
        .map(|a| {
            let (study, uid) = ("1.2.826.0.1.3680043.10.9", "1.2.826.0.1.3680043.10.9.1");
            series(src.path(), "SIXPACK", study, uid, a * 5, 5)
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runs.log");
    let pacs_port = free_port();
    let pacs_dir = tmp.path().join("pacs");
    let mut pacs = storescp(&pacs_dir, pacs_port, "PACS");
    let node = Node::start(&format!(
        "[[input]]\nname = \"series\"\nmin_instances = 30\nsingle_series = true\n\
         [trigger]\nquiet_seconds = 0\n{}\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n",
        processing(tmp.path(), &log, 0.0)
    ));
    let port = node.port();
    let children: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(a, f)| send(a % 2 == 0, &port, f))
        .collect();
    children.into_iter().for_each(|c| sent_ok(&node, c));
    let received = || files_under(&pacs_dir); // storescp names files CT.<uid>
    assert!(
        wait_until(60, || received().len() == 30),
        "storescp got {}\n{}",
        received().len(),
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(runs(&log), vec![("SIXPACK".to_string(), 30)]);
    let _ = pacs.kill();
    let _ = pacs.wait();
    let pacs_log = std::fs::read_to_string(pacs_dir.with_extension("log")).unwrap();
    assert_eq!(
        pacs_log.matches("Association Received").count(),
        1,
        "{pacs_log}"
    );
    // File by file: storescp's data set equals the one sent.
    let by_uid: BTreeMap<String, PathBuf> = received()
        .into_iter()
        .map(|p| (sop_uid_of(&p), p))
        .collect();
    for f in files.iter().flatten() {
        let got = by_uid.get(&sop_uid_of(f)).expect("instance delivered");
        assert_eq!(data_set_of(f), data_set_of(got), "{}", f.display());
    }
}

/// A patient split over two associations: the one that closes first does not trigger (the
/// other is still open); the patient is processed once, when the second closes, with all.
#[test]
fn split_patient_processed_once_when_the_last_association_closes() {
    let src = tempfile::tempdir().unwrap();
    let (study, prefix) = ("1.2.826.0.1.3680043.10.7", "1.2.826.0.1.3680043.10.7");
    let mk = |tag: &str, n| series(src.path(), "SPLIT", study, &format!("{prefix}.{tag}"), 0, n);
    let long = mk("1", 10);
    let short = mk("2", 5);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runs.log");
    let node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0\n{}",
        processing(tmp.path(), &log, 0.0)
    ));
    let go = tmp.path().join("go");
    // pynetdicom holds its association open after 5 instances.
    let mut hold = python()
        .arg(py_script("hold.py"))
        .args([node.port().as_str(), "DICOMGATE"])
        .arg(&go)
        .arg("5")
        .args(&long)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(hold.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "SENT");
    // DCMTK storescu sends its 5 and closes.
    let st = storescu_status(&node, &short);
    assert!(st.success());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        runs(&log).is_empty(),
        "processed while an association was open"
    );
    assert_eq!(pending_instances(&node), 10);
    std::fs::write(&go, b"").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.split_whitespace().all(|s| s == "0x0000"), "{line}");
    assert!(hold.wait().unwrap().success());
    assert!(wait_until(30, || !runs(&log).is_empty()), "{}", node.log());
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(runs(&log), vec![("SPLIT".to_string(), 15)]);
    assert!(wait_until(10, || dcm_files(&node.data_dir.join("export"))
        .len()
        == 15));
}

/// The downstream is down at first: the export fails, is retried from the outbox with backoff,
/// and delivered once the downstream comes up; processing ran once.
#[test]
fn export_retries_until_a_late_downstream_comes_up() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "LATE",
        "1.2.826.0.1.3680043.10.8",
        "1.2.826.0.1.3680043.10.8.1",
        0,
        5,
    );
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runs.log");
    let pacs_port = free_port();
    let node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0\n{}\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n\
         [outbox]\nattempts = 50\nfirst_delay_seconds = 0.2\nmax_delay_seconds = 0.5\n",
        processing(tmp.path(), &log, 0.0)
    ));
    let st = storescu_status(&node, &files);
    assert!(st.success());
    assert!(
        wait_until(30, || node
            .log()
            .matches("export failed; will retry")
            .count()
            >= 2),
        "{}",
        node.log()
    );
    assert_eq!(runs(&log).len(), 1);
    let pacs_dir = tmp.path().join("pacs");
    let mut pacs = storescp(&pacs_dir, pacs_port, "PACS");
    assert!(
        wait_until(30, || files_under(&pacs_dir).len() == 5),
        "{}",
        node.log()
    );
    assert!(wait_until(10, || node.log().contains("batch done")));
    let _ = pacs.kill();
    let _ = pacs.wait();
    assert_eq!(runs(&log), vec![("LATE".to_string(), 5)], "processed once");
    assert!(dcm_files(&node.data_dir.join("batches")).is_empty());
    assert!(!node.data_dir.join("failed").exists());
}

/// A processing command that keeps failing: after its attempts the batch moves to failed/ with
/// a reason, the data kept.
#[test]
fn failed_processing_moves_the_batch_to_failed_with_a_reason() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "BROKEN",
        "1.2.826.0.1.3680043.10.6",
        "1.2.826.0.1.3680043.10.6.1",
        0,
        3,
    );
    let node = Node::start(
        "[trigger]\nquiet_seconds = 0\n\
         [processing]\ncommand = [\"sh\", \"-c\", \"echo bad input >&2; exit 7\"]\nattempts = 2\n\
         [outbox]\nfirst_delay_seconds = 0.1\n",
    );
    let st = storescu_status(&node, &files);
    assert!(st.success());
    let failed = node.data_dir.join("failed");
    let kept = || {
        dcm_files(&failed)
            .into_iter()
            .filter(|p| p.components().any(|c| c.as_os_str() == "files"))
            .count()
    };
    assert!(wait_until(30, || kept() == 3), "{}", node.log());
    let reason = files_under(&failed)
        .into_iter()
        .find(|p| p.ends_with("reason.txt"))
        .unwrap();
    assert!(std::fs::read_to_string(reason)
        .unwrap()
        .contains("exit status: 7"));
    assert!(node.log().contains("bad input"), "stderr goes to the log");
    assert_eq!(
        node.log().matches("processing failed; will retry").count(),
        1
    );
}

/// An instance no input accepts is refused (0x0124) and not stored; `unmatched = "keep"`
/// stores it.
#[test]
fn unmatched_instances_are_refused_not_dropped() {
    let src = tempfile::tempdir().unwrap();
    let f = write_instance(
        src.path(),
        "MRONLY",
        "1.2.826.0.1.3680043.10.5",
        "1.2.826.0.1.3680043.10.5.1",
        "1.2.826.0.1.3680043.10.5.1.1",
        1,
    );
    let node = Node::start("[[input]]\nname = \"mr\"\nmatch = { Modality = \"MR\" }\n");
    let out = python()
        .arg(py_script("send.py"))
        .args([node.port().as_str(), "DICOMGATE"])
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("292 "), "0x0124 = 292: {text}");
    assert_eq!(pending_instances(&node), 0);
    drop(node);
    let node = Node::start(
        "[patients]\nunmatched = \"keep\"\n[[input]]\nname = \"mr\"\nmatch = { Modality = \"MR\" }\n",
    );
    let out = python()
        .arg(py_script("send.py"))
        .args([node.port().as_str(), "DICOMGATE"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 "));
    assert_eq!(pending_instances(&node), 1);
}

/// kill -9 while associations are storing and batches are being processed, then restart:
/// every instance the node acknowledged ends up exported (or is still pending); none is lost.
#[test]
fn kill9_during_ingest_and_processing_loses_nothing_acknowledged() {
    let src = tempfile::tempdir().unwrap();
    let senders = 4;
    let per_sender = 120;
    let groups: Vec<Vec<PathBuf>> = (0..senders)
        .map(|s| {
            (0..per_sender)
                .map(|i| {
                    let patient = (s * per_sender + i) / 20; // a new patient every 20
                    write_instance(
                        &src.path().join(format!("s{s}")),
                        &format!("KILL{patient}"),
                        &format!("1.2.826.0.1.3680043.10.4.{patient}"),
                        &format!("1.2.826.0.1.3680043.10.4.{patient}.1"),
                        &format!("1.2.826.0.1.3680043.10.4.{patient}.1.{s}.{i}"),
                        i as u32 + 1,
                    )
                })
                .collect()
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runs.log");
    // Quiet trigger at 0.2 s: batches are processed (slowly) while ingest goes on.
    let mut node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0.2\n{}",
        processing(tmp.path(), &log, 0.3)
    ));
    let port = node.port();
    let children: Vec<_> = groups
        .iter()
        .map(|g| {
            python()
                .arg(py_script("send.py"))
                .args([port.as_str(), "DICOMGATE"])
                .args(g)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Kill once some batches were claimed and ingest is still going.
    assert!(
        wait_until(60, || node.log().contains("batch claimed")),
        "{}",
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    node.kill9();
    let mut acked = BTreeSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(f) = l.strip_prefix("0 ") {
                acked.insert(sop_uid_of(Path::new(f)));
            }
        }
    }
    let total = senders * per_sender;
    assert!(
        !acked.is_empty() && acked.len() < total,
        "kill landed mid-ingest: {} acked",
        acked.len()
    );
    node.restart();
    let exported = || exported_sops(&node);
    assert!(
        wait_until(90, || acked.is_subset(&exported())),
        "missing after restart: {:?}\n{}",
        acked.difference(&exported()).take(5).collect::<Vec<_>>(),
        node.log()
    );
    assert!(!node.data_dir.join("failed").exists());
}

/// Library users' processing: a Rust `Processor` given to `node::start_with` sees the batch
/// split by input (an instance two inputs accept is in both folders).
#[test]
fn rust_processor_gets_the_batch_by_input() {
    use dicomgate::pipeline::{BatchInfo, ProcessingError, Processor};
    use std::sync::{Arc, Mutex};
    type Seen = Arc<Mutex<Vec<(String, Vec<(String, usize)>)>>>;
    struct Record(Seen);
    impl Processor for Record {
        fn process(&self, b: &BatchInfo) -> Result<(), ProcessingError> {
            self.0.lock().unwrap().push((
                b.patient_id.clone(),
                b.inputs.iter().map(|(n, f)| (n.clone(), f.len())).collect(),
            ));
            for (_, files) in &b.inputs {
                for f in files {
                    std::fs::copy(f, b.output_dir.join(f.file_name().unwrap()))
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dicomgate::config::Config::from_toml(&format!(
        "[node]\nae_title = \"DICOMGATE\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nreactors = 1\n\
         [[input]]\nname = \"ct\"\nmatch = {{ Modality = \"CT\" }}\nmin_instances = 3\n\
         [[input]]\nname = \"first\"\nmatch = {{ InstanceNumber = \"1\" }}\n[http]\nlisten = \"\"\n",
        dir.path().join("data").display().to_string()
    ))
    .unwrap();
    let seen: Seen = Default::default();
    let node = dicomgate::node::start_with(config, Some(Arc::new(Record(seen.clone())))).unwrap();
    let src = tempfile::tempdir().unwrap();
    let mut client = dicomgate::net::scu::Client::connect(
        node.local_addr.unwrap(),
        &scu_options("LIBRARY"),
        &[ct_proposal_in(EXPLICIT_LE)],
    )
    .unwrap();
    for i in 1..=3 {
        let sop = format!("1.2.826.0.1.3680043.10.11.{i}");
        let f = write_instance(
            src.path(),
            "LIB",
            "1.2.826.0.1.3680043.10.11",
            "1.2.826.0.1.3680043.10.11.0",
            &sop,
            i,
        );
        let (st, _) = client
            .store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &data_set_of(&f))
            .unwrap();
        assert_eq!(st, 0);
    }
    client.release().unwrap();
    let export = dir.path().join("data/export");
    assert!(wait_until(30, || dcm_files(&export).len() == 3));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(
            "LIB".to_string(),
            vec![("ct".to_string(), 3), ("first".to_string(), 1)]
        )]
    );
    assert_eq!(
        node.stats()
            .processed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    node.shutdown();
}

/// A patient that never becomes sufficient is expired after `expire_after`: here moved aside.
#[test]
fn insufficient_patient_expires_and_is_moved_aside() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "NEVERENOUGH",
        "1.2.826.0.1.3680043.10.12",
        "1.2.826.0.1.3680043.10.12.1",
        0,
        2,
    );
    let node = Node::start(
        "[patients]\nexpire_after = \"1s\"\nexpire_action = \"move\"\n\
         [[input]]\nname = \"ct\"\nmin_instances = 100\n\
         [trigger]\nquiet_seconds = 0.3\ncheck_interval_ms = 100\n",
    );
    let st = storescu_status(&node, &files);
    assert!(st.success());
    let expired = node.data_dir.join("expired");
    assert!(
        wait_until(20, || dcm_files(&expired).len() == 2),
        "{}",
        node.log()
    );
    assert_eq!(pending_instances(&node), 0);
    assert!(node.log().contains("patient expired"));
    assert!(!node.data_dir.join("export").exists(), "never processed");
}

/// Issue 10: three kill -9 during load (four associations with operations windows, small
/// instances going to the segment log, batches claimed and processed meanwhile), a restart
/// after each: every instance any sender saw acknowledged is exported in the end.
#[test]
fn several_kills_during_load_lose_no_acknowledged_instance() {
    use dicomgate::net::scu::{Client, ScuOptions};
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runs.log");
    let mut node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0.2\n{}",
        processing(tmp.path(), &log, 0.1)
    ));
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    for round in 0..3 {
        let before = acked.lock().unwrap().len();
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let (addr, acked) = (node.addr, acked.clone());
                std::thread::spawn(move || {
                    let opts = ScuOptions {
                        timeout: std::time::Duration::from_secs(10),
                        ..scu_options(&format!("KILL{s}"))
                    };
                    let Ok(mut c) =
                        Client::connect_windowed(addr, &opts, &[ct_proposal_in(EXPLICIT_LE)], 4)
                    else {
                        return;
                    };
                    let mut out: std::collections::HashMap<u16, String> = Default::default();
                    for i in 0..2000 {
                        let patient = format!("KR{round}P{}", i / 25);
                        let study = format!("1.2.826.0.1.3680043.10.6.{round}.{}", i / 25);
                        let series = format!("{study}.{s}");
                        let sop = format!("{series}.{i}");
                        let ds = dataset(&patient, &study, &series, &sop, 64);
                        match c.send_store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &ds) {
                            Ok(id) => drop(out.insert(id, sop)),
                            Err(_) => return,
                        }
                        while out.len() >= usize::from(c.operations_window) {
                            match c.receive_response() {
                                Ok((id, 0, _)) => {
                                    if let Some(sop) = out.remove(&id) {
                                        acked.lock().unwrap().insert(sop);
                                    }
                                }
                                Ok((id, _, _)) => drop(out.remove(&id)),
                                Err(_) => return,
                            }
                        }
                    }
                })
            })
            .collect();
        // Kill once this round has stored a good part, while senders are still sending.
        assert!(wait_until(60, || acked.lock().unwrap().len() >= before + 300));
        node.kill9();
        for s in senders {
            s.join().unwrap();
        }
        let now = acked.lock().unwrap().len();
        assert!(
            now < before + 8000,
            "round {round}: the kill landed mid-load"
        );
        node.restart();
    }
    let acked = acked.lock().unwrap().clone();
    let exported = || exported_sops(&node);
    assert!(
        wait_until(120, || acked.is_subset(&exported())),
        "{} acknowledged, missing after the last restart: {:?}\n{}",
        acked.len(),
        acked.difference(&exported()).take(5).collect::<Vec<_>>(),
        node.log()
    );
    assert!(!node.data_dir.join("failed").exists());
}

/// Issue 11 (6): with `expire_after = "1s"`, a sender that pauses 2.5 s inside one association
/// had the instances it sent before the pause expired (deleted) while the association was still
/// open, and the rest too once it closed: all acknowledged, none processed. A patient with an
/// open association is never expired; here it is exported whole when the association closes.
#[test]
fn expiry_never_deletes_a_patient_with_an_open_association() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        "[patients]\nexpire_after = \"1s\"\n\
         [[input]]\nname = \"ct\"\nmin_instances = 40\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\ncheck_interval_ms = 100\n",
    );
    let mut client = dicomgate::net::scu::Client::connect(
        node.addr,
        &scu_options("PAUSING"),
        &[ct_proposal_in(EXPLICIT_LE)],
    )
    .unwrap();
    let study = "1.2.826.0.1.3680043.10.13";
    let series_uid = "1.2.826.0.1.3680043.10.13.1";
    let mut sent = BTreeSet::new();
    for i in 0..40u32 {
        if i == 20 {
            // Longer than expire_after, inside the association.
            std::thread::sleep(std::time::Duration::from_millis(2500));
        }
        let sop = format!("{series_uid}.{i}");
        let f = write_instance(dir.path(), "PAUSED", study, series_uid, &sop, i + 1);
        let (st, _) = client
            .store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &data_set_of(&f))
            .unwrap();
        assert_eq!(st, 0);
        sent.insert(sop);
    }
    client.release().unwrap();
    assert!(
        wait_until(30, || exported_sops(&node) == sent),
        "exported {} of 40, expired {}\n{}",
        exported_sops(&node).len(),
        node.log().matches("patient expired").count(),
        node.log()
    );
    assert!(!node.log().contains("patient expired"), "{}", node.log());
}

/// Issue 11 (7): processing that exited 0 and wrote no DICOM file had its batch, input
/// included, deleted and counted as exported. By default (`empty_output = "fail"`) it is a
/// failed processing run: the batch moves to failed/ with a reason, its instances kept.
#[test]
fn processing_with_no_dicom_output_keeps_the_batch() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "NOOUTPUT",
        "1.2.826.0.1.3680043.10.14",
        "1.2.826.0.1.3680043.10.14.1",
        0,
        3,
    );
    let node = Node::start(
        "[trigger]\nquiet_seconds = 0\n\
         [processing]\ncommand = [\"sh\", \"-c\", \"echo wrote nothing\"]\n",
    );
    let st = storescu_status(&node, &files);
    assert!(st.success());
    let failed = node.data_dir.join("failed");
    let kept = || {
        dcm_files(&failed)
            .into_iter()
            .filter(|p| p.components().any(|c| c.as_os_str() == "files"))
            .count()
    };
    assert!(
        wait_until(30, || kept() == 3),
        "kept {} of 3 in failed/, batch done: {}\n{}",
        kept(),
        node.log().contains("batch done"),
        node.log()
    );
    let reason = files_under(&failed)
        .into_iter()
        .find(|p| p.ends_with("reason.txt"))
        .unwrap();
    let reason = std::fs::read_to_string(reason).unwrap();
    assert!(reason.contains("no DICOM output"), "{reason}");
    assert!(reason.contains("empty_output"), "{reason}");
    assert!(!node.log().contains("batch done"), "{}", node.log());
}

/// `empty_output = "ok"`: a run that writes nothing is a success; the batch is done, nothing is
/// exported, and the log says so.
#[test]
fn processing_with_no_dicom_output_is_done_when_empty_output_is_ok() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "NOOUTPUTOK",
        "1.2.826.0.1.3680043.10.15",
        "1.2.826.0.1.3680043.10.15.1",
        0,
        2,
    );
    let node = Node::start(
        "[trigger]\nquiet_seconds = 0\n\
         [processing]\ncommand = [\"true\"]\nempty_output = \"ok\"\n",
    );
    let st = storescu_status(&node, &files);
    assert!(st.success());
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    assert!(
        node.log().contains("empty_output = \"ok\""),
        "{}",
        node.log()
    );
    assert_eq!(pending_instances(&node), 0);
    assert!(!node.data_dir.join("failed").exists());
    assert!(dcm_files(&node.data_dir.join("export")).is_empty());
}

/// Issue 11 (8): when setting a claimed batch aside failed (`batch::create`), its files went
/// back to the pending area but its records left the patient map, so no trigger or expiry saw
/// them again until a restart. Here `batches/` is made a file so creation fails; once it can be
/// created again the batch is claimed again and exported, without a restart or a new arrival.
#[test]
fn failed_batch_creation_puts_the_records_back_in_the_map() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "NOBATCHDIR",
        "1.2.826.0.1.3680043.10.16",
        "1.2.826.0.1.3680043.10.16.1",
        0,
        3,
    );
    let node = Node::start(
        "[trigger]\nquiet_seconds = 0\non_association_close = true\ncheck_interval_ms = 50\n\
         [outbox]\nfirst_delay_seconds = 0.2\nmax_delay_seconds = 0.5\n",
    );
    let batches = node.data_dir.join("batches");
    std::fs::remove_dir_all(&batches).unwrap();
    std::fs::write(&batches, b"not a directory").unwrap();
    let st = storescu_status(&node, &files);
    assert!(st.success());
    assert!(
        wait_until(30, || node
            .log()
            .contains("could not set a claimed batch aside")),
        "{}",
        node.log()
    );
    assert_eq!(pending_instances(&node), 3, "the files stay pending");
    std::fs::remove_file(&batches).unwrap();
    let sent: BTreeSet<String> = files.iter().map(|f| sop_uid_of(f)).collect();
    assert!(
        wait_until(30, || exported_sops(&node) == sent),
        "exported {} of 3, pending {}\n{}",
        exported_sops(&node).len(),
        pending_instances(&node),
        node.log()
    );
}

/// Issue 11 (9): an instance arriving after its patient's batch was claimed starts a new batch
/// that waits for the rules again; that was logged only at debug level ("not sufficient yet").
/// It is logged at info and counted.
#[test]
fn late_arrivals_are_logged_at_info_and_counted() {
    let src = tempfile::tempdir().unwrap();
    let (study, series_uid) = ("1.2.826.0.1.3680043.10.17", "1.2.826.0.1.3680043.10.17.1");
    let first = series(src.path(), "LATE", study, series_uid, 0, 3);
    let late = series(src.path(), "LATE", study, series_uid, 3, 1);
    let node = Node::start(
        "[[input]]\nname = \"ct\"\nmin_instances = 3\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\ncheck_interval_ms = 50\n",
    );
    let store = |files: &[PathBuf]| {
        let st = storescu_status(&node, files);
        assert!(st.success());
    };
    store(&first);
    assert!(
        wait_until(30, || exported_sops(&node).len() == 3),
        "{}",
        node.log()
    );
    store(&late);
    let late_line = || {
        node.log()
            .lines()
            .find(|l| l.contains(" INFO ") && l.contains("late arrival"))
            .map(str::to_string)
    };
    assert!(wait_until(30, || late_line().is_some()), "{}", node.log());
    let line = late_line().unwrap();
    assert!(line.contains("late_arrivals_total=1"), "{line}");
    // The patient's digest (`[log] phi = false`, the default), never its Patient ID.
    let digest = dicomgate::storage::patient_dir_name(b"LATE");
    assert!(line.contains(&format!("patient={digest}")), "{line}");
    assert!(!line.contains("LATE"), "{line}");
    // It waits for the rules (one instance of three): nothing more is exported.
    assert_eq!(exported_sops(&node).len(), 3);
    assert_eq!(pending_instances(&node), 1);
}

/// The data set of a Part-10 file (after its meta information).
fn data_set_of(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let p = dicomgate::dicom::part10::parse(&b).unwrap();
    b[p.data_set_offset..].to_vec()
}

/// Segment log records not yet released, read from disk.
fn live_log_records(node: &Node) -> usize {
    dicomgate::storage::log::inspect(&node.data_dir.join("log"))
        .unwrap()
        .1
        .len()
}

/// Router mode (no processing) with a `dicom` export reads the batch's small instances from
/// the segment log instead of copying them into the batch: while the downstream is down the
/// batch's `files/` holds no copy, nothing is pending, and the records stay in the log; a
/// kill -9 then and a restart resume the same batch (not a second one); once the downstream
/// is up every instance arrives byte-exact, and the records are released.
#[test]
fn router_export_reads_the_segment_log_and_survives_a_kill() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "ROUTER",
        "1.2.826.0.1.3680043.10.11",
        "1.2.826.0.1.3680043.10.11.1",
        0,
        6,
    );
    let tmp = tempfile::tempdir().unwrap();
    let pacs_port = free_port();
    let mut node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n\
         [outbox]\nattempts = 100\nfirst_delay_seconds = 0.2\nmax_delay_seconds = 0.5\n"
    ));
    let st = storescu_status(&node, &files);
    assert!(st.success());
    assert!(
        wait_until(30, || node.log().contains("export failed; will retry")),
        "{}",
        node.log()
    );
    let batches_root = node.data_dir.join("batches");
    let batch_dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(&batches_root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let batches = batch_dirs();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert!(
        dcm_files(&batches[0].join("files")).is_empty(),
        "no copy out of the log"
    );
    assert_eq!(
        dicomgate::pipeline::records_of(&batches[0]).unwrap().len(),
        6
    );
    assert_eq!(pending_instances(&node), 0, "held, not pending");
    assert_eq!(live_log_records(&node), 6);
    node.kill9();
    node.restart();
    assert!(
        wait_until(30, || node.log().contains("resuming a batch")),
        "{}",
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(batch_dirs(), batches, "the same batch, no second one");
    assert_eq!(
        pending_instances(&node),
        0,
        "not pending again after the restart"
    );
    let pacs_dir = tmp.path().join("pacs");
    let _pacs = storescp(&pacs_dir, pacs_port, "PACS");
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    let received = files_under(&pacs_dir);
    assert_eq!(received.len(), 6);
    let mut sent: Vec<Vec<u8>> = files.iter().map(|f| data_set_of(f)).collect();
    let mut got: Vec<Vec<u8>> = received.iter().map(|f| data_set_of(f)).collect();
    sent.sort();
    got.sort();
    assert!(sent == got, "byte-exact data sets");
    assert!(batch_dirs().is_empty());
    assert_eq!(live_log_records(&node), 0, "released once exported");
}

/// A router-mode batch whose export keeps failing moves to failed/ with its instances as
/// files (copied out of the log first), and the log lets its records go; after a restart they
/// stay gone and `dicomgate extract --batch` gives the three instances (it failed on the
/// released records the failed manifest still named).
#[test]
fn failed_router_batch_keeps_its_log_instances_as_files() {
    let src = tempfile::tempdir().unwrap();
    let files = series(
        src.path(),
        "ROUTERFAIL",
        "1.2.826.0.1.3680043.10.12",
        "1.2.826.0.1.3680043.10.12.1",
        0,
        3,
    );
    let dead_port = free_port();
    let mut node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{dead_port}\"\nae_title = \"PACS\"\n\
         [outbox]\nattempts = 2\nfirst_delay_seconds = 0.1\nmax_delay_seconds = 0.2\n"
    ));
    let st = storescu_status(&node, &files);
    assert!(st.success());
    assert!(
        wait_until(30, || node.log().contains("batch moved to failed/")),
        "{}",
        node.log()
    );
    let failed: Vec<PathBuf> = std::fs::read_dir(node.data_dir.join("failed"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(failed.len(), 1);
    let kept = dcm_files(&failed[0].join("files"));
    assert_eq!(kept.len(), 3, "{kept:?}");
    let mut sent: Vec<Vec<u8>> = files.iter().map(|f| data_set_of(f)).collect();
    let mut got: Vec<Vec<u8>> = kept.iter().map(|f| data_set_of(f)).collect();
    sent.sort();
    got.sort();
    assert!(sent == got, "byte-exact");
    assert!(wait_until(10, || live_log_records(&node) == 0));
    node.kill9();
    node.restart();
    assert!(
        wait_until(30, || node.log().matches("dicomgate serving").count() >= 2),
        "{}",
        node.log()
    );
    assert_eq!(live_log_records(&node), 0, "not back after a restart");
    assert_eq!(pending_instances(&node), 0);
    let out = tempfile::tempdir().unwrap();
    let id = failed[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["extract", "--data-dir"])
        .arg(&node.data_dir)
        .args(["--batch", &id, "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_eq!(dcm_files(out.path()).len(), 3);
}
