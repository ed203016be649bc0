//! Storage on a failing device: a real EIO from a FUSE file system (tests/py/eio_fs.py, a
//! passthrough that answers EIO to fsync, or to writes, while a switch file exists; fusepy over
//! libfuse2, which .ci/run installs), under a real node fed by DCMTK's storescu. ENOSPC's test
//! (a full tmpfs) is in tests/own_scu.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Only the segment log's numbered segments fail (not the spare the preparer zero-fills).
const SEGMENTS: &str = "only=[0-9a-f]*.seg";

/// The FUSE file system mounted on a temporary folder; unmounted (and its process ended) on
/// drop.
struct EioFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    switch: PathBuf,
    fs: Child,
}

impl EioFs {
    /// `None` (the test is skipped, saying why) only where the kernel has no FUSE.
    fn mount() -> Option<EioFs> {
        EioFs::mount_with(&[])
    }

    /// [`EioFs::mount`] with eio_fs.py's options after the switch (`no-fallocate`).
    fn mount_with(options: &[&str]) -> Option<EioFs> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: /dev/fuse is missing: this kernel has no FUSE, so no file system here can return EIO on demand");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (root, mnt) = (dir.path().join("root"), dir.path().join("mnt"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let switch = dir.path().join("switch");
        let fs = python()
            .arg(py_script("eio_fs.py"))
            .args([&root, &mnt, &switch])
            .args(options)
            .stderr(std::fs::File::create(dir.path().join("fs.log")).unwrap())
            .spawn()
            .unwrap();
        let fs = EioFs {
            mnt,
            switch,
            fs,
            _dir: dir,
        };
        let mounted = || {
            Command::new("mountpoint")
                .arg("-q")
                .arg(&fs.mnt)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(
            wait_until(20, mounted),
            "eio_fs.py did not mount (fusepy and libfuse2: bash .ci/run installs them): {}",
            std::fs::read_to_string(fs._dir.path().join("fs.log")).unwrap_or_default()
        );
        Some(fs)
    }

    fn set(&self, words: &str) {
        std::fs::write(&self.switch, words).unwrap();
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(&self.switch);
    }
}

impl Drop for EioFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = self.fs.kill();
        let _ = self.fs.wait();
    }
}

/// A node with its data directory on the FUSE file system (small segments: the preparer
/// zero-fills them through Python), its HTTP endpoint on, and an input no test fills, so that
/// what is stored stays pending (not even the evaluation at start-up claims it).
fn node_on(fs: &EioFs) -> Node {
    Node::start_with_data_dir(
        &fs.mnt.join("data"),
        "[storage]\nsegment_bytes = 1048576\ninline_max_bytes = 262144\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[[input]]\nname = \"ct\"\nmin_instances = 1000\n",
    )
}

/// storescu (verbose) of one file to the node: (the status it reports, its output).
fn storescu(node: &Node, file: &Path) -> (Option<u16>, String) {
    let out = storescu_cmd(node, file).output().unwrap();
    parse_storescu(&out)
}

fn storescu_cmd(node: &Node, file: &Path) -> Command {
    let mut c = dcmtk("storescu");
    c.args(["-v", "-aec", "DICOMGATE", "127.0.0.1", &node.port()])
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// The C-STORE-RSP status storescu reports ("Received Store Response (Success)", "(Refused:
/// OutOfResources)", DCMTK's name for 0xA700, or a status in hex), and all it printed.
fn parse_storescu(out: &std::process::Output) -> (Option<u16>, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = text.lines().find_map(|l| {
        if !l.contains("Received Store Response") {
            return None;
        }
        if l.contains("(Success)") {
            return Some(0);
        }
        if l.contains("(Refused: OutOfResources)") {
            return Some(0xA700);
        }
        let hex = l.split("0x").nth(1)?;
        u16::from_str_radix(hex.get(..4)?, 16).ok()
    });
    (status, text)
}

fn instance(dir: &Path, i: usize) -> (String, PathBuf) {
    let sop = format!("1.2.826.0.1.3680043.10.40.1.{i}");
    let f = write_instance(
        dir,
        "EIO",
        "1.2.826.0.1.3680043.10.40",
        "1.2.826.0.1.3680043.10.40.1",
        &sop,
        i as u32 + 1,
    );
    (sop, f)
}

/// A node on the FUSE file system, instances to send it, and the SOP Instance UIDs it answered
/// success.
struct Scene {
    fs: EioFs,
    node: Node,
    _src: tempfile::TempDir,
    files: Vec<(String, PathBuf)>,
    acknowledged: Vec<String>,
}

impl Scene {
    /// `None` where the test is skipped ([`EioFs::mount`]).
    fn new(instances: std::ops::Range<usize>) -> Option<Scene> {
        let fs = EioFs::mount()?;
        let node = node_on(&fs);
        let src = tempfile::tempdir().unwrap();
        let files = instances.map(|i| instance(src.path(), i)).collect();
        Some(Scene {
            fs,
            node,
            _src: src,
            files,
            acknowledged: Vec::new(),
        })
    }

    /// storescu sends instance `i`; it must be answered `want` (0x0000 or 0xA700).
    fn send(&mut self, i: usize, want: u16) {
        let (st, out) = storescu(&self.node, &self.files[i].1);
        assert_eq!(st, Some(want), "{out}\n{}", self.node.log());
        if want == 0 {
            self.acknowledged.push(self.files[i].0.clone());
        }
    }

    /// After a restart, every instance answered success is there.
    fn restart_and_check(&mut self) {
        self.node.restart();
        for sop in &self.acknowledged {
            assert!(
                stored_instance(&self.node, sop).is_some(),
                "{sop} acknowledged but not on disk\n{}",
                self.node.log()
            );
        }
    }
}

fn metric(node: &Node, line_start: &str) -> Option<f64> {
    let (_, m) = http_get(&http_addr(node), "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

/// Issue 11: EIO answers C-STORE 0xA700 like ENOSPC, but is counted and logged as what it is.
/// An fdatasync that fails with EIO, then a write that does: storescu is answered 0xA700 each
/// time, the node logs the I/O error (not "no space"), `/metrics` counts `kind="io"` and no
/// `no_space`, and once the device works again the node stores again. Nothing answered success
/// is missing after a restart.
#[test]
fn eio_answers_a700_is_counted_as_io_and_the_node_keeps_serving() {
    let Some(mut s) = Scene::new(0..5) else {
        return;
    };
    s.send(0, 0);
    // fdatasync fails.
    s.fs.set(&format!("fsync {SEGMENTS}"));
    s.send(1, 0xA700);
    // The write fails.
    s.fs.set(&format!("fsync write {SEGMENTS}"));
    s.send(2, 0xA700);
    s.fs.clear();

    let log = s.node.log();
    assert!(
        log.contains("log flush failed: Input/output error"),
        "{log}"
    );
    assert!(
        log.contains("log write failed: Input/output error"),
        "{log}"
    );
    assert!(log.contains("kind=\"io\""), "{log}");
    assert!(!log.contains("kind=\"no_space\""), "{log}");
    assert!(!log.contains("No space left"), "{log}");
    assert_eq!(
        metric(&s.node, "dicomgate_store_errors_total{kind=\"io\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&s.node, "dicomgate_store_errors_total{kind=\"no_space\"}"),
        None
    );

    // The device works again: the node stores (the failed instance re-sent, and new ones).
    for i in [1, 3, 4] {
        s.send(i, 0);
    }
    assert!(s.node.is_running());
    s.restart_and_check();
    assert!(stored_instance(&s.node, &s.files[2].0).is_none());
}

/// Issue 11, PostgreSQL's "fsyncgate": after a failed fdatasync Linux marks the pages it could
/// not write clean and reports the error once; a later fdatasync succeeds without writing them
/// (eio_fs.py does the same: what was written since the last good fsync is set back to zero).
/// The segment log acknowledged a record written before a failed flush when the next round's
/// flush of the same segment succeeded: a store answered success, and gone. Here the first
/// flush fails after 2 s, and a second association's record is written into the same segment
/// meanwhile: both are answered 0xA700 (the segment is sealed; the next record goes to a new
/// one, and is stored), and after a restart every instance answered success is there.
#[test]
fn a_failed_log_flush_fails_the_records_written_before_it() {
    let Some(mut s) = Scene::new(10..14) else {
        return;
    };
    s.send(0, 0);
    s.fs.set(&format!("fsync once delay=2 {SEGMENTS}"));
    let first = storescu_cmd(&s.node, &s.files[1].1).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let second_sent = Instant::now();
    let (second, out2) = storescu(&s.node, &s.files[2].1);
    let (first, out1) = parse_storescu(&first.wait_with_output().unwrap());
    // The second record was written while the first flush was still failing (2 s).
    assert!(
        second_sent.elapsed() > Duration::from_millis(800),
        "the second store was answered before the first flush failed: {out2}"
    );
    assert_eq!(first, Some(0xA700), "{out1}\n{}", s.node.log());
    assert_eq!(
        second,
        Some(0xA700),
        "a record written before the failed flush was acknowledged: {out2}\n{}",
        s.node.log()
    );
    s.send(2, 0);
    s.send(3, 0);
    s.restart_and_check();
}

/// Issue 10 ("the segment log requires fallocate"): on a file system whose fallocate answers
/// EOPNOTSUPP (here the FUSE file system with `no-fallocate`; NFS before 4.2 and ext3's
/// block-mapped files do the same), the node could not make a segment: it refused every store
/// (0xA700, "log write failed: Operation not supported"). Now it says so once, fills several segments (sparse, or zero-filled ahead), and
/// every instance it acknowledged is there after a kill -9 and a restart.
#[test]
fn a_file_system_without_fallocate_stores_into_the_segment_log_and_recovers() {
    let Some(fs) = EioFs::mount_with(&["no-fallocate"]) else {
        return;
    };
    let mut node = node_on(&fs);
    let src = tempfile::tempdir().unwrap();
    // 12 instances of ~200 KB, each a log record (inline_max_bytes 256 KiB): more than one
    // 1 MiB segment holds.
    let sops: Vec<String> = (0..12)
        .map(|i| format!("1.2.826.0.1.3680043.10.40.2.{i}"))
        .collect();
    let files: Vec<PathBuf> = sops
        .iter()
        .map(|sop| {
            let meta = dicomgate::storage::FileMeta {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: sop.clone(),
                transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
                ..Default::default()
            };
            let mut f = dicomgate::dicom::part10::header(&meta);
            f.extend_from_slice(&dataset(
                "NOFALLOC",
                "1.2.826.0.1.3680043.10.40",
                "1.2.826.0.1.3680043.10.40.2",
                sop,
                200_000,
            ));
            let path = src.path().join(format!("{sop}.dcm"));
            std::fs::write(&path, f).unwrap();
            path
        })
        .collect();
    assert!(storescu_status(&node, &files).success(), "{}", node.log());
    let log = node.log();
    assert!(log.contains("does not support fallocate"), "{log}");
    let segments = std::fs::read_dir(fs.mnt.join("data").join("log"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".seg") && n != "spare.seg"
        })
        .count();
    assert!(segments >= 2, "{segments} segments\n{log}");
    node.kill9();
    node.restart();
    for sop in &sops {
        assert!(
            stored_instance(&node, sop).is_some(),
            "{sop} acknowledged but not there after the restart\n{}",
            node.log()
        );
    }
}
