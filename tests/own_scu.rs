//! The node against its own requestor (`dicomgate store`, `dicomgate echo`, and the `Client`
//! API): byte-exact storage, concurrency, aborts mid-data-set, and a store that cannot be written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dicomgate::dicom::part10;
use dicomgate::net::scu::{Client, Proposal, ScuOptions};
use std::process::Command;

fn opts() -> ScuOptions {
    scu_options("DICOMGATE-SCU")
}

fn ct_proposal() -> Proposal {
    ct_proposal_in(EXPLICIT_LE)
}

#[test]
fn dicomgate_store_and_echo_are_byte_exact_and_readable_by_dicom_object() {
    let node = Node::start("");
    let t = pydicom_test_files();
    let names = [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "JPEG2000.dcm",
        "SC_rgb_rle.dcm",
        "JPEGLSNearLossless_08.dcm",
        "reportsi.dcm",
        "rtdose.dcm",
    ];
    let files: Vec<_> = names.iter().map(|n| t.join(n)).collect();
    // Distinct instances, so that no store replaces another.
    let uids: std::collections::BTreeSet<String> = files
        .iter()
        .map(|f| {
            let b = std::fs::read(f).unwrap();
            part10::parse(&b).unwrap().data_set_sop_uids(&b).1
        })
        .collect();
    assert_eq!(uids.len(), files.len());
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["store", &node.addr.to_string(), "--called", "DICOMGATE"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "stored 8, failed 0"
    );
    for f in &files {
        let orig = std::fs::read(f).unwrap();
        let om = part10::parse(&orig).unwrap();
        let (_, instance) = om.data_set_sop_uids(&orig);
        let stored_path = stored_instance(&node, &instance).unwrap();
        let stored = std::fs::read(&stored_path).unwrap();
        let sm = part10::parse(&stored).unwrap();
        assert_eq!(
            &stored[sm.data_set_offset..],
            &orig[om.data_set_offset..],
            "{}",
            f.display()
        );
        assert_eq!(sm.transfer_syntax_uid, om.transfer_syntax_uid);
        // dicom-rs reads the file back (trusted bytes, our own output).
        let obj = dicom_object::open_file(&stored_path).unwrap();
        assert_eq!(obj.meta().transfer_syntax(), om.transfer_syntax_uid);
        let sop = obj
            .element_by_name("SOPInstanceUID")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(sop.trim_end_matches('\0'), instance);
    }
    let echo = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["echo", &node.addr.to_string(), "--called", "DICOMGATE"])
        .output()
        .unwrap();
    assert!(echo.status.success());
    assert_eq!(
        String::from_utf8_lossy(&echo.stdout).trim(),
        "C-ECHO status 0x0000"
    );
}

/// `dicomgate store` and the `dicom` export share one sending routine (issue 11): the CLI still
/// counts each file's answer, says why a file failed or was skipped, and goes on after a
/// refused one.
#[test]
fn dicomgate_store_counts_a_refused_file_and_goes_on() {
    let node = Node::start("[[input]]\nname = \"mr\"\nmatch = { Modality = \"MR\" }\n");
    let t = pydicom_test_files();
    let dir = tempfile::tempdir().unwrap();
    let not_dicom = dir.path().join("notes.txt");
    std::fs::write(&not_dicom, b"not a Part-10 file").unwrap();
    let (ct, mr) = (t.join("CT_small.dcm"), t.join("MR_small_bigendian.dcm"));
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["store", &node.addr.to_string()])
        .args([&ct, &not_dicom, &mr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "stored 1, failed 1",
        "{stderr}"
    );
    // No input accepts a CT: the node answers 0x0124 (refused: not authorized).
    assert!(
        stderr.contains(&format!("{}: status 0x0124", ct.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "skipping {}: not a Part-10 file",
            not_dicom.display()
        )),
        "{stderr}"
    );
    let mr_bytes = std::fs::read(&mr).unwrap();
    let (_, mr_uid) = part10::parse(&mr_bytes)
        .unwrap()
        .data_set_sop_uids(&mr_bytes);
    assert!(stored_instance(&node, &mr_uid).is_some(), "{}", node.log());
    assert_eq!(node.stored().len(), 1);
}

/// Issue 12: `dicomgate echo` defaulted to called AE `ANY-SCP`, which the node's own default
/// rejects; rejections printed as bare codes; a rejected association was logged twice, the
/// second time with empty AE titles. Now: echo works with its defaults, a rejection reads as
/// words (CLI and node log), and the node logs it once with the AE titles that were asked.
#[test]
fn echo_defaults_work_and_a_rejection_is_logged_once_in_words() {
    let node = Node::start("");
    let echo = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dicomgate"))
            .args(["echo", &node.addr.to_string()])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = echo(&[]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = echo(&["--called", "NOT-HERE", "--calling", "REJECTME"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("called AE title not recognized"), "{err}");
    assert!(
        wait_until(10, || node.log().contains("REJECTME")),
        "{}",
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = node.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("REJECTME")).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("called_ae=\"NOT-HERE\"")
            && lines[0].contains("called AE title not recognized"),
        "{}",
        lines[0]
    );
    let help = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--listen", "--data-dir", "--ae-title", "--http", "--config"] {
        let line = help.lines().find(|l| l.contains(flag)).unwrap_or_default();
        assert!(
            line.trim().len() > flag.len() + 12,
            "no help for {flag}: {help}"
        );
    }
}

#[test]
fn eight_associations_storing_at_once() {
    let node = Node::start("");
    let addr = node.addr;
    let threads: Vec<_> = (0..8)
        .map(|a| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, &opts(), &[ct_proposal()]).unwrap();
                for i in 0..40 {
                    let sop = format!("1.2.8.{a}.{i}");
                    // Patients interleaved across associations.
                    let ds = dataset(
                        &format!("P{}", i % 5),
                        "1.2.8",
                        &format!("1.2.8.{a}"),
                        &sop,
                        4096,
                    );
                    let (st, _) = c.store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &ds).unwrap();
                    assert_eq!(st, 0);
                }
                c.release().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(node.stored().len(), 320);
}

#[test]
fn data_set_that_disagrees_with_its_command_is_refused_with_a900_and_bad_bytes_with_c000() {
    let node = Node::start("");
    let mut c = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    let ds = dataset("P", "1.2.5", "1.2.5.1", "1.2.5.1.1", 16);
    // Command names another instance than the data set.
    let (st, comment) = c
        .store(CT_IMAGE_STORAGE, "1.2.5.1.2", EXPLICIT_LE, &ds)
        .unwrap();
    assert_eq!(st, 0xA900, "{comment:?}");
    // An element longer than what remains.
    let mut bad = dataset("P", "1.2.5", "1.2.5.1", "1.2.5.1.3", 16);
    let n = bad.len();
    bad[n - 16 - 4..n - 16].copy_from_slice(&1000u32.to_le_bytes());
    let (st, comment) = c
        .store(CT_IMAGE_STORAGE, "1.2.5.1.3", EXPLICIT_LE, &bad)
        .unwrap();
    assert_eq!(st, 0xC000, "{comment:?}");
    assert!(comment.unwrap().contains("longer than what remains"));
    // A UID that is not a UID (would be a path component): refused, nothing written.
    let evil = dataset("P", "1.2.5", "..", "1.2.5.1.4", 16);
    let (st, _) = c
        .store(CT_IMAGE_STORAGE, "1.2.5.1.4", EXPLICIT_LE, &evil)
        .unwrap();
    assert_eq!(st, 0xC000);
    // The association goes on: a good store still succeeds.
    let ok = dataset("P", "1.2.5", "1.2.5.1", "1.2.5.1.5", 16);
    assert_eq!(
        c.store(CT_IMAGE_STORAGE, "1.2.5.1.5", EXPLICIT_LE, &ok)
            .unwrap()
            .0,
        0
    );
    c.release().unwrap();
    assert_eq!(node.stored().len(), 1);
}

/// An association aborted in the middle of a data set leaves no file, temporary or final.
#[test]
fn abort_mid_data_set_leaves_no_file() {
    use dicomgate::dimse::command::{self, command_field, CommandSet};
    use dicomgate::ul::pdu::put_pdata_header;
    use std::io::Write;
    let node = Node::start("");
    let mut c = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    let pc = c.contexts[0].id;
    let sop = "1.2.6.1.1";
    let ds = dataset("P", "1.2.6", "1.2.6.1", sop, 100_000);
    let mut cmd = Vec::new();
    command::encode(
        &CommandSet {
            command_field: command_field::C_STORE_RQ,
            message_id: Some(1),
            affected_sop_class_uid: Some(CT_IMAGE_STORAGE.as_bytes().to_vec()),
            affected_sop_instance_uid: Some(sop.as_bytes().to_vec()),
            priority: Some(0),
            command_data_set_type: 0,
            ..Default::default()
        },
        &mut cmd,
    );
    let mut wire = Vec::new();
    put_pdata_header(&mut wire, pc, 0x03, cmd.len() as u32);
    wire.extend_from_slice(&cmd);
    // Half the data set, not marked last.
    let half = &ds[..50_000];
    put_pdata_header(&mut wire, pc, 0x00, half.len() as u32);
    wire.extend_from_slice(half);
    c.stream().write_all(&wire).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    c.abort().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        node.all_files()
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".dcm")
                && !p.to_string_lossy().ends_with(".tmp")),
        "{:?}",
        node.all_files()
    );
    assert!(node.log().contains("aborted by peer"), "{}", node.log());
    // The node keeps serving.
    let mut c = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    assert_eq!(
        c.store(CT_IMAGE_STORAGE, sop, EXPLICIT_LE, &ds).unwrap().0,
        0
    );
    c.release().unwrap();
}

/// Where the data directory cannot be written the store is answered 0xA700 (out of resources)
/// and the node keeps serving. We are root in CI, so permissions cannot make a directory
/// unwritable; a regular file where the patient's directory must go makes every write for that
/// patient fail with ENOTDIR, a real error from the file system.
#[test]
fn unwritable_data_directory_answers_a700_and_the_node_keeps_serving() {
    // Every instance its own file here (the segment log's failure is the next test's).
    let mut node = Node::start("[storage]\ninline_max_bytes = 0\n");
    let blocked = node
        .data_dir
        .join("patients")
        .join(dicomgate::storage::patient_dir_name(b"BLOCKED"));
    std::fs::write(&blocked, b"not a directory").unwrap();
    let mut c = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    let ds = dataset("BLOCKED", "1.2.7", "1.2.7.1", "1.2.7.1.1", 64);
    let (st, comment) = c
        .store(CT_IMAGE_STORAGE, "1.2.7.1.1", EXPLICIT_LE, &ds)
        .unwrap();
    assert_eq!(st, 0xA700, "{comment:?}");
    assert!(comment.unwrap_or_default().contains("failed"));
    let ds = dataset("FINE", "1.2.7", "1.2.7.1", "1.2.7.1.2", 64);
    assert_eq!(
        c.store(CT_IMAGE_STORAGE, "1.2.7.1.2", EXPLICIT_LE, &ds)
            .unwrap()
            .0,
        0
    );
    c.release().unwrap();
    assert!(node.is_running());
    assert_eq!(node.stored().len(), 1);
}

/// The segment log on a full file system (a 6 MiB tmpfs, 1 MiB segments): once no segment can
/// be made, stores are answered 0xA700, never success; every instance answered success is
/// stored; the association and the node go on; the failures are counted and logged as
/// `no_space`.
#[test]
fn full_file_system_answers_a700_and_acknowledges_only_what_is_stored() {
    let mnt = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs (needs root, as in CI)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.path().to_path_buf());
    let data = mnt.path().join("data");
    let mut node = Node::start_with_data_dir(
        &data,
        "[storage]\nsegment_bytes = 1048576\ninline_max_bytes = 262144\n\
         [http]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut c = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    let (mut ok, mut full) = (Vec::new(), 0);
    for i in 0..200 {
        let sop = format!("1.2.826.0.1.3680043.10.5.{i}");
        let ds = dataset("FULL", "1.2.5", "1.2.5.1", &sop, 100_000);
        let (st, comment) = c.store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &ds).unwrap();
        match st {
            0 => ok.push(sop),
            0xA700 => full += 1,
            other => panic!("status 0x{other:04X} {comment:?}"),
        }
    }
    c.release().unwrap();
    assert!(node.is_running());
    assert!(full > 0, "the file system never filled");
    assert!(ok.len() > 10, "{} stored before it filled", ok.len());
    // Issue 11: counted as what they are (ENOSPC), not as just "failed".
    let (_, metrics) = http_get(&http_addr(&node), "/metrics");
    assert!(
        metrics.contains(&format!(
            "dicomgate_store_errors_total{{kind=\"no_space\"}} {full}\n"
        )),
        "{metrics}"
    );
    assert!(node.log().contains("kind=\"no_space\""), "{}", node.log());
    for sop in &ok {
        assert!(
            stored_instance(&node, sop).is_some(),
            "{sop} acknowledged but not stored"
        );
    }
}

/// Beyond `max_associations` (and per calling AE) the node answers A-ASSOCIATE-RJ 2/3/2
/// (transient, presentation-related provider, local limit exceeded), and takes new associations
/// again once one ends.
#[test]
fn association_limits_reject_with_local_limit_exceeded() {
    use dicomgate::net::scu::ScuError;
    let node = Node::start("[limits]\nmax_associations = 2\nmax_associations_per_calling_ae = 1\n");
    let first = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    // Same calling AE: over the per-AE limit.
    let Err(ScuError::Rejected(rj)) = Client::connect(node.addr, &opts(), &[ct_proposal()]) else {
        panic!("second association from the same AE was not rejected")
    };
    assert_eq!((rj.result.0, rj.source.0, rj.reason), (2, 3, 2));
    let other = ScuOptions {
        calling_ae: "OTHER".into(),
        ..opts()
    };
    let second = Client::connect(node.addr, &other, &[ct_proposal()]).unwrap();
    let third = ScuOptions {
        calling_ae: "THIRD".into(),
        ..opts()
    };
    // Over the node-wide limit.
    let Err(ScuError::Rejected(rj)) = Client::connect(node.addr, &third, &[ct_proposal()]) else {
        panic!("third association was not rejected")
    };
    assert_eq!((rj.result.0, rj.source.0, rj.reason), (2, 3, 2));
    first.release().unwrap();
    second.release().unwrap();
    // The slots free once the node sees the transports close; retry for up to 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Client::connect(node.addr, &third, &[ct_proposal()]) {
            Ok(c) => break c.release().unwrap(),
            Err(ScuError::Rejected(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("slots were not freed: {e}"),
        }
    }
}

/// An asynchronous operations window (PS3.7 D.3.3.3): the node grants what was asked up to its
/// `max_operations_performed`, answers every outstanding C-STORE, and each answer names its
/// request. DCMTK's storescp grants no window; the requestor then falls back to one at a time.
#[test]
fn operations_window_is_granted_and_pipelined_stores_are_all_answered() {
    let node = Node::start("[limits]\nmax_operations_performed = 4\n");
    let mut c =
        Client::connect_windowed(node.addr.to_string(), &opts(), &[ct_proposal()], 8).unwrap();
    assert_eq!(c.operations_window, 4, "granted min(asked 8, node's 4)");
    let sets: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let sop = format!("1.2.826.0.1.3680043.10.1.{i}");
            let ds = dataset("WIN", "1.2.3", "1.2.3.4", &sop, 64);
            (sop, ds)
        })
        .collect();
    let mut ids = Vec::new();
    for (sop, ds) in &sets {
        ids.push(
            c.send_store(CT_IMAGE_STORAGE, sop, EXPLICIT_LE, ds)
                .unwrap(),
        );
    }
    let mut answered = Vec::new();
    for _ in 0..4 {
        let (id, status, comment) = c.receive_response().unwrap();
        assert_eq!(status, 0, "{comment:?}");
        answered.push(id);
    }
    answered.sort_unstable();
    assert_eq!(answered, ids);
    c.release().unwrap();
    for (sop, ds) in &sets {
        let f = stored_instance(&node, sop).expect("stored");
        assert_eq!(&data_set_of(&f), ds);
    }

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _scp = storescp(dir.path(), port, "DICOMGATE");
    assert!(wait_until(10, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    let c = Client::connect_windowed(("127.0.0.1", port), &opts(), &[ct_proposal()], 8).unwrap();
    assert_eq!(c.operations_window, 1, "storescp ignores the proposal");
    c.release().unwrap();
}

/// Issue 10's reproduced defect, end to end: an association granted an operations window of
/// 20 sends one P-DATA-TF holding 20 complete C-STOREs while storage's queue (depth 1) is full.
/// The reactor used to park the store it could not queue in a single slot that the next one
/// overwrote: 2 responses and 2 files, 18 requests never answered, the association hung until
/// the idle timer. Every request must be answered and stored.
#[test]
fn several_messages_per_pdu_under_full_storage_queue() {
    use dicomgate::dimse::command::{self, command_field, CommandSet};
    use dicomgate::dimse::message;
    use std::io::Write;
    let node = Node::start(
        "[limits]\nmax_operations_performed = 20\n\
         [storage]\nqueue_depth = 1\nworkers = 1\ndurability = \"fsync\"\n",
    );
    let o = ScuOptions {
        timeout: std::time::Duration::from_secs(10),
        ..opts()
    };
    let mut c = Client::connect_windowed(node.addr.to_string(), &o, &[ct_proposal()], 20).unwrap();
    assert_eq!(c.operations_window, 20);
    let pc = c.contexts[0].id;
    let mut bytes = Vec::new();
    let mut sops = Vec::new();
    for i in 0..20u16 {
        let sop = format!("1.2.826.0.1.3680043.10.7.{i}");
        let rq = CommandSet {
            command_field: command_field::C_STORE_RQ,
            message_id: Some(i + 1),
            affected_sop_class_uid: Some(CT_IMAGE_STORAGE.as_bytes().to_vec()),
            affected_sop_instance_uid: Some(sop.clone().into_bytes()),
            priority: Some(0),
            command_data_set_type: 0,
            ..Default::default()
        };
        let mut cmd = Vec::new();
        command::encode(&rq, &mut cmd);
        message::fragment(&mut bytes, pc, true, &cmd, c.peer_max_pdu);
        let ds = dataset("MANY", "1.2.3", "1.2.3.4", &sop, 32);
        message::fragment(&mut bytes, pc, false, &ds, c.peer_max_pdu);
        sops.push(sop);
    }
    let one_pdu = coalesce_pdata(&bytes, c.peer_max_pdu);
    assert_eq!(
        u32::from_be_bytes(one_pdu[2..6].try_into().unwrap()) as usize + 6,
        one_pdu.len(),
        "all 20 messages in one P-DATA-TF"
    );
    c.stream().write_all(&one_pdu).unwrap();
    let mut answered = Vec::new();
    for n in 0..20 {
        let (id, status, comment) = c
            .receive_response()
            .unwrap_or_else(|e| panic!("after {n} responses: {e}\n{}", node.log()));
        assert_eq!(status, 0, "{comment:?}");
        answered.push(id);
    }
    answered.sort_unstable();
    assert_eq!(answered, (1..=20).collect::<Vec<u16>>());
    c.release().unwrap();
    for sop in &sops {
        assert!(stored_instance(&node, sop).is_some(), "{sop} stored");
    }
}

/// Found in review: with window 1, a C-STORE that no input accepts (answered 0x0124 by the
/// reactor) followed at once by A-RELEASE-RQ left the release unread in the buffer (the
/// refusal freed the window but nothing offered the buffered bytes again): the requestor waited
/// for the idle timer's A-ABORT. The same with a window of 4.
#[test]
fn refused_store_then_pipelined_release_is_answered() {
    let o = ScuOptions {
        timeout: std::time::Duration::from_secs(8),
        ..opts()
    };
    for window in [1u16, 4] {
        let node = Node::start(&format!(
            "[limits]\nmax_operations_performed = {window}\n\
             [[input]]\nname = \"mr\"\nmatch = {{ Modality = \"MR\" }}\n"
        ));
        let mut c =
            Client::connect_windowed(node.addr.to_string(), &o, &[ct_proposal()], window).unwrap();
        for i in 0..window {
            let sop = format!("1.2.826.0.1.3680043.10.9.{i}");
            let ds = dataset("REF", "1.2.3", "1.2.3.4", &sop, 32);
            c.send_store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &ds)
                .unwrap();
        }
        c.release()
            .unwrap_or_else(|e| panic!("window {window}: release: {e}\n{}", node.log()));
        assert!(node.stored().is_empty());
    }
}

/// `[limits] max_buffered_bytes`: eight associations each sending 8 MB data sets at once hold
/// about the budget in memory (the data sets stream to their files), not eight messages; none is
/// refused and none deadlocks. Without the budget and streaming the same load holds up to every
/// data set whole (64 MB).
#[test]
fn memory_budget_bounds_what_concurrent_large_stores_hold() {
    let mut node = Node::start("[limits]\nmax_buffered_bytes = 1048576\n");
    let base = node.rss_kib();
    let sampler = PeakRss::start(node.pid());
    let senders: Vec<_> = (0..8)
        .map(|s| {
            let addr = node.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, &opts(), &[ct_proposal()]).unwrap();
                let mut sops = Vec::new();
                for i in 0..2 {
                    let sop = format!("1.2.826.0.1.3680043.10.8.{s}.{i}");
                    let ds = dataset("BIG", "1.2.8", &format!("1.2.8.{s}"), &sop, 8_000_000);
                    let (st, comment) = c.store(CT_IMAGE_STORAGE, &sop, EXPLICIT_LE, &ds).unwrap();
                    assert_eq!(st, 0, "{comment:?}");
                    sops.push(sop);
                }
                c.release().unwrap();
                sops
            })
        })
        .collect();
    let sops: Vec<String> = senders
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let peak = sampler.stop();
    assert_eq!(sops.len(), 16);
    for sop in &sops {
        assert!(stored_instance(&node, sop).is_some(), "{sop}");
    }
    let grew_mib = peak.saturating_sub(base) as f64 / 1024.0;
    eprintln!("node RSS {base} KiB before, peak {peak} KiB: +{grew_mib:.1} MiB");
    // Eight whole 8 MB messages would be +61 MiB; the budget, the stream windows and buffers
    // are far less (with the allocator's slack).
    assert!(grew_mib < 40.0, "+{grew_mib:.1} MiB");
    assert!(node.is_running());
}

/// Samples a process's peak resident set size every 2 ms until stopped.
struct PeakRss {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid_status = format!("/proc/{pid}/status");
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    if let Ok(s) = std::fs::read_to_string(&pid_status) {
                        if let Some(v) = s
                            .lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                        {
                            peak = peak.max(v);
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                peak
            })
        };
        PeakRss { stop, thread }
    }

    /// The peak in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap()
    }
}

/// One data set far larger than `[limits] max_buffered_bytes` streams to its file as its PDVs
/// arrive: the node's memory grows by about the budget and one stream window, not by the data
/// set (before streaming, the budget's one-message overdraft held it whole: +64 MiB), and the
/// stored file is byte-exact with no streamed file left open.
#[test]
fn one_data_set_larger_than_the_budget_streams_to_its_file() {
    let mut node = Node::start("[limits]\nmax_buffered_bytes = 1048576\n");
    let base = node.rss_kib();
    let sop = "1.2.826.0.1.3680043.10.9.1";
    let ds = dataset("HUGE", "1.2.9", "1.2.9.1", sop, 64_000_000);
    let sampler = PeakRss::start(node.pid());
    let mut c = Client::connect(node.addr, &opts(), &[ct_proposal()]).unwrap();
    let (st, comment) = c.store(CT_IMAGE_STORAGE, sop, EXPLICIT_LE, &ds).unwrap();
    assert_eq!(st, 0, "{comment:?}");
    c.release().unwrap();
    let peak = sampler.stop();
    let path = stored_instance(&node, sop).expect("stored");
    let file = std::fs::read(&path).unwrap();
    assert!(
        file.len() - ds.len() < 1024 && file.ends_with(&ds),
        "byte-exact"
    );
    // Streamed files are anonymous (never a name in incoming/): one left open would still hold
    // its disk space, and shows as an open descriptor.
    let open_streams = std::fs::read_dir(format!("/proc/{}/fd", node.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| l.to_string_lossy().contains("/incoming/"))
        .count();
    assert_eq!(open_streams, 0, "no streamed file left open");
    let grew_mib = peak.saturating_sub(base) as f64 / 1024.0;
    eprintln!("node RSS {base} KiB before, peak {peak} KiB: +{grew_mib:.1} MiB");
    assert!(grew_mib < 24.0, "+{grew_mib:.1} MiB for a 64 MB data set");
    assert!(node.is_running());
}

/// Issue 11: a peer that resets its connection (RST: SO_LINGER 0, then close) in the middle of
/// an association was logged like one that closed it ("transport connection closed"). The
/// reset is logged as a transport error, with the kernel's reason.
#[test]
fn a_connection_reset_is_logged_as_a_transport_error_not_a_close() {
    let node = Node::start("");
    let mut c = Client::connect(node.addr, &scu_options("RESETTER"), &[ct_proposal()]).unwrap();
    rustix::net::sockopt::set_socket_linger(&*c.stream(), Some(std::time::Duration::ZERO)).unwrap();
    drop(c);
    let line = |log: &str| {
        log.lines()
            .find(|l| l.contains("calling_ae=\"RESETTER\"") || l.contains("calling_ae=RESETTER"))
            .map(str::to_string)
    };
    assert!(
        wait_until(10, || line(&node.log()).is_some()),
        "{}",
        node.log()
    );
    let l = line(&node.log()).unwrap();
    assert!(l.contains("transport error") && l.contains("reset"), "{l}");
}
