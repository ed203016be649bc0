//! Issue 14 end to end, with real peers (DCMTK storescu sending with TCP_NODELAY, DCMTK storescp
//! as export targets): `[patients] unmatched = "discard"` with a scout sent before a CT series,
//! sender rules on the Calling AE Title, exports per input in router mode, and alternative
//! inputs (`one_of`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::*;

const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";

/// One instance as a Part-10 file in `dir`, named `<sop>.dcm`.
struct Instance<'a> {
    modality: &'a str,
    description: &'a str,
    patient: &'a str,
    study: &'a str,
    series: &'a str,
    sop: String,
    number: u32,
}

impl Instance<'_> {
    fn write(&self, dir: &Path) -> PathBuf {
        let class = if self.modality == "MR" {
            MR_IMAGE_STORAGE
        } else {
            CT_IMAGE_STORAGE
        };
        let mut d = Vec::new();
        el(&mut d, 0x0008, 0x0016, b"UI", class.as_bytes());
        el(&mut d, 0x0008, 0x0018, b"UI", self.sop.as_bytes());
        el(&mut d, 0x0008, 0x0020, b"DA", b"20260101");
        el(&mut d, 0x0008, 0x0060, b"CS", self.modality.as_bytes());
        el(&mut d, 0x0008, 0x103E, b"LO", self.description.as_bytes());
        el(&mut d, 0x0010, 0x0010, b"PN", b"Test^Patient");
        el(&mut d, 0x0010, 0x0020, b"LO", self.patient.as_bytes());
        el(&mut d, 0x0020, 0x000D, b"UI", self.study.as_bytes());
        el(&mut d, 0x0020, 0x000E, b"UI", self.series.as_bytes());
        el(
            &mut d,
            0x0020,
            0x0013,
            b"IS",
            self.number.to_string().as_bytes(),
        );
        let px: Vec<u8> = (0..64).map(|i| (i * 7 % 251) as u8).collect();
        el(&mut d, 0x7FE0, 0x0010, b"OW", &px);
        let meta = dicomgate::storage::FileMeta {
            sop_class_uid: class.into(),
            sop_instance_uid: self.sop.clone(),
            transfer_syntax_uid: EXPLICIT_LE.into(),
            source_ae_title: String::new(),
            ..Default::default()
        };
        let mut f = dicomgate::dicom::part10::header(&meta);
        f.extend_from_slice(&d);
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{}.dcm", self.sop));
        std::fs::write(&path, f).unwrap();
        path
    }
}

/// `n` instances of one series (`<series>.<i>`), Instance Numbers from 1.
fn series(
    dir: &Path,
    modality: &str,
    description: &str,
    patient: &str,
    series: &str,
    n: usize,
) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            Instance {
                modality,
                description,
                patient,
                study: "1.2.826.0.1.3680043.10.14",
                series,
                sop: format!("{series}.{}", i + 1),
                number: i as u32 + 1,
            }
            .write(dir)
        })
        .collect()
}

/// DCMTK storescu (verbose) sends `files` in one association as `calling`; its output.
fn storescu(node: &Node, calling: &str, files: &[PathBuf]) -> std::process::Output {
    dcmtk("storescu")
        .args(["-v", "-aet", calling, "-aec", "DICOMGATE", "127.0.0.1"])
        .arg(node.port())
        .args(files)
        .output()
        .unwrap()
}

/// The C-STORE responses storescu reports: (successes, all).
fn responses(out: &std::process::Output) -> (usize, usize) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        text.matches("Received Store Response (Success)").count(),
        text.matches("Received Store Response").count(),
    )
}

fn dcm_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect()
}

fn sops(files: &[PathBuf]) -> BTreeSet<String> {
    files.iter().map(|p| sop_uid_of(p)).collect()
}

/// Whether any file under `dir` (segment log, batches, exports, anything) holds `needle`.
fn anywhere_in(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// `GET /metrics`: the body.
fn metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// storescu sends a scout, then 30 CT slices, to a node whose one input takes CT but no scout
/// and `unmatched = "discard"`: every one of the 31 is answered success (with `refuse` storescu
/// would stop at the scout), the 30 slices are exported, the scout is stored nowhere under the
/// data directory, counted once in `/metrics` and logged once for the association.
#[test]
fn discarded_scout_does_not_stop_the_ct_series_behind_it() {
    let src = tempfile::tempdir().unwrap();
    let scout = Instance {
        modality: "CT",
        description: "SCOUT",
        patient: "DISCARD",
        study: "1.2.826.0.1.3680043.10.14",
        series: "1.2.826.0.1.3680043.10.14.1",
        sop: "1.2.826.0.1.3680043.10.14.1.1".into(),
        number: 1,
    }
    .write(src.path());
    let slices = series(
        src.path(),
        "CT",
        "AX 3mm",
        "DISCARD",
        "1.2.826.0.1.3680043.10.14.2",
        30,
    );
    let http = format!("127.0.0.1:{}", free_port());
    let node = Node::start(&format!(
        "[patients]\nunmatched = \"discard\"\n\
         [[input]]\nname = \"ct\"\nmatch = {{ Modality = \"CT\", SeriesDescription = \"!*SCOUT*\" }}\nmin_instances = 30\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [http]\nlisten = \"{http}\"\n"
    ));
    let mut files = vec![scout.clone()];
    files.extend(slices.iter().cloned());
    let out = storescu(&node, "SCANNER", &files);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert_eq!(
        responses(&out),
        (31, 31),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = node.data_dir.join("export");
    assert!(
        wait_until(30, || dcm_files(&export).len() == 30
            && node.log().contains("batch done")),
        "exported {}\n{}",
        dcm_files(&export).len(),
        node.log()
    );
    assert_eq!(sops(&dcm_files(&export)), sops(&slices));
    let scout_uid = sop_uid_of(&scout);
    let found = anywhere_in(&node.data_dir, scout_uid.as_bytes());
    assert!(found.is_empty(), "the scout is stored in {found:?}");
    let m = metrics(&http);
    assert!(
        m.lines()
            .any(|l| l.trim() == "dicomgate_instances_discarded_total 1"),
        "{m}"
    );
    assert!(m
        .lines()
        .any(|l| l.trim() == "dicomgate_instances_stored_total 30"));
    let log = node.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("answered success and discarded"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("discarded=1") && lines[0].contains("calling_ae=\"SCANNER\""),
        "{}",
        lines[0]
    );
}

/// Two storescu with different Calling AE Titles send CT instances of one patient to two inputs
/// whose rules differ only in `calling_ae`: the batch's `input/site_a/` holds exactly what
/// SITE_A sent and `input/site_b/` what SITE_B sent; a third sender matches neither and is
/// refused (0x0124, the default `unmatched`).
#[test]
fn calling_ae_title_rules_put_each_senders_instances_in_its_input() {
    let src = tempfile::tempdir().unwrap();
    let a = series(
        &src.path().join("a"),
        "CT",
        "AX",
        "SENDERS",
        "1.2.826.0.1.3680043.10.14.3",
        4,
    );
    let b = series(
        &src.path().join("b"),
        "CT",
        "AX",
        "SENDERS",
        "1.2.826.0.1.3680043.10.14.4",
        3,
    );
    let tmp = tempfile::tempdir().unwrap();
    let listing = tmp.path().join("inputs.txt");
    let script = tmp.path().join("list.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\ncd \"$DICOMGATE_INPUT_DIR\"\nfind . -name '*.dcm' | sort >> {listing:?}\n\
             cp -R \"$DICOMGATE_INPUT_DIR\"/. \"$DICOMGATE_OUTPUT_DIR\"/\n"
        ),
    )
    .unwrap();
    let node = Node::start(&format!(
        "[[input]]\nname = \"site_a\"\ncalling_ae = \"SITE_A\"\nmin_instances = 4\n\
         [[input]]\nname = \"site_b\"\ncalling_ae = [\"SITE_*\", \"!SITE_A\"]\nmin_instances = 3\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [processing]\ncommand = [\"sh\", {:?}]\n",
        script.display().to_string()
    ));
    let out = storescu(&node, "SITE_A", &a);
    assert!(out.status.success(), "{}", node.log());
    // A sender no input names: refused (0x0124), not stored. An instance of its own, so that
    // "not stored" can be checked; exactly one response, so a storescu that never associated
    // does not pass.
    let refused = series(
        &src.path().join("other"),
        "CT",
        "AX",
        "SENDERS",
        "1.2.826.0.1.3680043.10.14.9",
        1,
    );
    let other = storescu(&node, "OTHER", &refused);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&other.stdout),
        String::from_utf8_lossy(&other.stderr)
    );
    assert_eq!(responses(&other), (0, 1), "{said}");
    // DCMTK names no status for 0x0124 (Refused: Not Authorized): "Unknown Status: 0x124".
    assert!(
        said.contains("Store Response (Unknown Status: 0x124)"),
        "{said}"
    );
    let refused_uid = sop_uid_of(&refused[0]);
    assert!(
        anywhere_in(&node.data_dir, refused_uid.as_bytes()).is_empty(),
        "the refused instance is stored"
    );
    let out = storescu(&node, "SITE_B", &b);
    assert!(out.status.success(), "{}", node.log());
    assert!(
        wait_until(30, || std::fs::read_to_string(&listing)
            .is_ok_and(|t| !t.is_empty())),
        "{}",
        node.log()
    );
    let text = std::fs::read_to_string(&listing).unwrap();
    let in_input = |name: &str| -> BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("./{name}/")))
            .map(|f| f.trim_end_matches(".dcm").to_string())
            .collect()
    };
    assert_eq!(in_input("site_a"), sops(&a), "{text}");
    assert_eq!(in_input("site_b"), sops(&b), "{text}");
    assert_eq!(text.lines().count(), 7, "{text}");
}

/// Router mode, two inputs (CT, MR) and two DCMTK storescp, each `[[export]]` listing one input:
/// each destination receives exactly its input's instances of the one batch, and the batch is
/// done only once both have.
#[test]
fn exports_per_input_send_each_input_to_its_own_destination() {
    let src = tempfile::tempdir().unwrap();
    let ct = series(
        src.path(),
        "CT",
        "AX",
        "PERINPUT",
        "1.2.826.0.1.3680043.10.14.5",
        4,
    );
    let mr = series(
        src.path(),
        "MR",
        "T1",
        "PERINPUT",
        "1.2.826.0.1.3680043.10.14.6",
        3,
    );
    let tmp = tempfile::tempdir().unwrap();
    let (ct_port, mr_port) = (free_port(), free_port());
    let (ct_dir, mr_dir) = (tmp.path().join("ct_pacs"), tmp.path().join("mr_pacs"));
    let _ct_pacs = storescp(&ct_dir, ct_port, "CT_PACS");
    let _mr_pacs = storescp(&mr_dir, mr_port, "MR_PACS");
    let node = Node::start(&format!(
        "[[input]]\nname = \"ct\"\nmatch = {{ Modality = \"CT\" }}\nmin_instances = 4\n\
         [[input]]\nname = \"mr\"\nmatch = {{ Modality = \"MR\" }}\nmin_instances = 3\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{ct_port}\"\nae_title = \"CT_PACS\"\ninputs = [\"ct\"]\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{mr_port}\"\nae_title = \"MR_PACS\"\ninputs = [\"mr\"]\n"
    ));
    let mut files = ct.clone();
    files.extend(mr.iter().cloned());
    let out = storescu(&node, "SCANNER", &files);
    assert!(out.status.success(), "{}", node.log());
    assert_eq!(responses(&out), (7, 7));
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    assert_eq!(sops(&files_under(&ct_dir)), sops(&ct), "CT_PACS");
    assert_eq!(sops(&files_under(&mr_dir)), sops(&mr), "MR_PACS");
    // Router mode keeps instances as log records, so no .dcm under batches/ proves nothing:
    // the batch directory itself is gone.
    let left: Vec<_> = std::fs::read_dir(node.data_dir.join("batches"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "batches left: {left:?}");
    assert!(!node.data_dir.join("failed").exists());
}

/// Alternative inputs: `ct` and `mr` form the group `anatomy`; a patient with only MR
/// instances is sufficient (either series kind suffices), and its batch is exported.
#[test]
fn one_of_group_is_satisfied_by_either_input() {
    let src = tempfile::tempdir().unwrap();
    let mr = series(
        src.path(),
        "MR",
        "T1",
        "EITHER",
        "1.2.826.0.1.3680043.10.14.7",
        3,
    );
    let node = Node::start(
        "[[input]]\nname = \"ct\"\nmatch = { Modality = \"CT\" }\none_of = \"anatomy\"\n\
         [[input]]\nname = \"mr\"\nmatch = { Modality = \"MR\" }\nmin_instances = 3\none_of = \"anatomy\"\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\n",
    );
    let out = storescu(&node, "SCANNER", &mr);
    assert!(out.status.success(), "{}", node.log());
    let export = node.data_dir.join("export");
    assert!(
        wait_until(30, || dcm_files(&export).len() == 3),
        "{}",
        node.log()
    );
    assert_eq!(sops(&dcm_files(&export)), sops(&mr));
}

/// After a kill -9, instances pending on disk are matched again with the sender they were
/// stored from, kept with them (Source and Receiving AE Titles and the requestor's address, in a
/// segment log record or in a Part-10 file of its own with `inline_max_bytes = 0`): SITE_A's
/// instances, sent from 127.0.0.1 to GATE_B before the crash, still join the input whose rules
/// are `calling_ae = "SITE_A"`, `called_ae = "GATE_B"` and `peer = ["127.0.0.0/8"]`, and the
/// recovered patient is processed (trigger c). Found in review: the address was not kept, so a
/// `peer` rule (and a `called_ae` rule on a node that accepts any Called AE Title) never held
/// after a restart, and the acknowledged instances waited in no input until they expired.
#[test]
fn sender_rules_hold_for_instances_recovered_after_a_kill() {
    for (case, storage) in [("log", ""), ("files", "[storage]\ninline_max_bytes = 0\n")] {
        let src = tempfile::tempdir().unwrap();
        let a = series(
            src.path(),
            "CT",
            "AX",
            "RECOVERED",
            "1.2.826.0.1.3680043.10.14.8",
            3,
        );
        // Nothing triggers before the kill: a quiet time far away, no trigger on close.
        let mut node = Node::start_with_node(
            "accept_any_called_ae = true",
            &format!(
                "[[input]]\nname = \"site_a\"\ncalling_ae = \"SITE_A\"\ncalled_ae = \"GATE_B\"\n\
                 peer = [\"127.0.0.0/8\"]\nmin_instances = 3\n\
                 [trigger]\nquiet_seconds = 3600\non_association_close = false\n{storage}"
            ),
        );
        let out = dcmtk("storescu")
            .args(["-v", "-aet", "SITE_A", "-aec", "GATE_B", "127.0.0.1"])
            .arg(node.port())
            .args(&a)
            .output()
            .unwrap();
        assert!(out.status.success(), "{case}: {}", node.log());
        assert_eq!(responses(&out), (3, 3), "{case}");
        if case == "files" {
            assert_eq!(dcm_files(&node.data_dir.join("patients")).len(), 3);
        }
        node.kill9();
        node.restart();
        let export = node.data_dir.join("export");
        assert!(
            wait_until(30, || dcm_files(&export).len() == 3),
            "{case}: {}",
            node.log()
        );
        assert_eq!(sops(&dcm_files(&export)), sops(&a), "{case}");
    }
}

/// A batch of `files` claimed under `before` (which exports to `dead`, a port nothing listens
/// on, and retries in an hour), with the node killed once its export failed and started again
/// on `after` (the text of `before` replaced in the config file).
fn claimed_then_restarted_on(before: &str, after: &str, files: &[PathBuf]) -> Node {
    let mut node = Node::start(before);
    let out = storescu(&node, "SCANNER", files);
    assert!(out.status.success(), "{}", node.log());
    assert_eq!(responses(&out), (files.len(), files.len()));
    assert!(
        wait_until(30, || node.log().contains("export failed; will retry")),
        "{}",
        node.log()
    );
    node.kill9();
    let cfg = std::fs::read_to_string(node.config_path()).unwrap();
    assert!(cfg.contains(before));
    std::fs::write(node.config_path(), cfg.replace(before, after)).unwrap();
    node.restart();
    node
}

/// `[trigger]` and `[outbox]` of the restart tests, and a dicom export nobody answers.
fn export_that_fails() -> String {
    format!(
        "[trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [outbox]\nfirst_delay_seconds = 3600\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{}\"\nae_title = \"PACS\"\n",
        free_port()
    )
}

/// `[[export]]` to folder `dir` with `inputs`.
fn folder_export(dir: &Path, inputs: &str) -> String {
    format!(
        "[[export]]\nkind = \"folder\"\npath = {:?}\ninputs = [{inputs}]\n",
        dir.display().to_string()
    )
}

/// The reason.txt of the one batch in failed/, once there is one.
fn failed_reason(node: &Node) -> String {
    let failed = node.data_dir.join("failed");
    assert!(
        wait_until(30, || files_under(&failed)
            .iter()
            .any(|p| p.ends_with("reason.txt"))),
        "{}",
        node.log()
    );
    let reasons: Vec<_> = files_under(&failed)
        .into_iter()
        .filter(|p| p.ends_with("reason.txt"))
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    std::fs::read_to_string(&reasons[0]).unwrap()
}

/// Review of issue 14, defect D3: a batch's manifest kept its instances' inputs as bit
/// positions in `[[input]]` order. Claimed before the inputs were reordered and resumed after
/// a restart, its CT instances were read as MR ones and sent to the MR destination (and the MR
/// ones to the CT destination). Now the manifest names its inputs: each goes where its input
/// says. And a batch naming an input the config no longer has is not guessed at: it moves to
/// failed/ with a reason naming that input, nothing exported.
#[test]
fn batch_claimed_before_inputs_were_reordered_keeps_its_inputs_by_name() {
    let src = tempfile::tempdir().unwrap();
    let ct = series(
        src.path(),
        "CT",
        "AX",
        "REORDER",
        "1.2.826.0.1.3680043.10.14.10",
        2,
    );
    let mr = series(
        src.path(),
        "MR",
        "T1",
        "REORDER",
        "1.2.826.0.1.3680043.10.14.11",
        1,
    );
    let mut files = ct.clone();
    files.extend(mr.iter().cloned());
    let (ct_in, mr_in) = (
        "[[input]]\nname = \"ct\"\nmatch = { Modality = \"CT\" }\nmin_instances = 2\n",
        "[[input]]\nname = \"mr\"\nmatch = { Modality = \"MR\" }\n",
    );
    let before = format!("{ct_in}{mr_in}{}", export_that_fails());
    let out = tempfile::tempdir().unwrap();
    let (ct_dir, mr_dir) = (out.path().join("ct"), out.path().join("mr"));
    let trigger = "[trigger]\nquiet_seconds = 0\non_association_close = true\n";
    // Reordered: mr is bit 0 now.
    let after = format!(
        "{mr_in}{ct_in}{trigger}{}{}",
        folder_export(&ct_dir, "\"ct\""),
        folder_export(&mr_dir, "\"mr\"")
    );
    let node = claimed_then_restarted_on(&before, &after, &files);
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    assert_eq!(sops(&dcm_files(&ct_dir)), sops(&ct), "{}", node.log());
    assert_eq!(sops(&dcm_files(&mr_dir)), sops(&mr), "{}", node.log());

    // Removed: mr is gone from the config.
    let ct_dir = out.path().join("ct2");
    let after = format!("{ct_in}{trigger}{}", folder_export(&ct_dir, "\"ct\""));
    let node = claimed_then_restarted_on(&before, &after, &files);
    let reason = failed_reason(&node);
    assert!(
        reason.contains("\"mr\"") && reason.contains("no longer has"),
        "{reason}"
    );
    assert!(dcm_files(&ct_dir).is_empty(), "exported by guess");
    let kept = sops(&dcm_files(&node.data_dir.join("failed")));
    assert_eq!(kept, sops(&files));
}

/// Review of issue 14, defect D2: with exports per input, an instance no destination lists
/// was deleted unexported when its batch completed. Start-up refuses such a config now
/// (config tests), but a batch claimed under another config can still hold one: here an MR
/// instance kept in `_unmatched` (`unmatched = "keep"`), resumed after a restart with
/// `unmatched = "refuse"` and one export listing only `ct`. The CT instances are exported;
/// the batch then goes to failed/ with a reason naming the MR instance's input, and the MR
/// instance is kept there.
#[test]
fn instance_for_no_destination_is_kept_in_failed_not_deleted() {
    let src = tempfile::tempdir().unwrap();
    let ct = series(
        src.path(),
        "CT",
        "AX",
        "NODEST",
        "1.2.826.0.1.3680043.10.14.12",
        2,
    );
    let mr = series(
        src.path(),
        "MR",
        "T1",
        "NODEST",
        "1.2.826.0.1.3680043.10.14.13",
        1,
    );
    let mut files = ct.clone();
    files.extend(mr.iter().cloned());
    let ct_in = "[[input]]\nname = \"ct\"\nmatch = { Modality = \"CT\" }\nmin_instances = 2\n";
    let before = format!(
        "[patients]\nunmatched = \"keep\"\n{ct_in}{}",
        export_that_fails()
    );
    let out = tempfile::tempdir().unwrap();
    let ct_dir = out.path().join("ct");
    let after = format!(
        "{ct_in}[trigger]\nquiet_seconds = 0\non_association_close = true\n{}",
        folder_export(&ct_dir, "\"ct\"")
    );
    let node = claimed_then_restarted_on(&before, &after, &files);
    let reason = failed_reason(&node);
    assert!(
        reason.contains("for none") && reason.contains("_unmatched"),
        "{reason}"
    );
    assert_eq!(sops(&dcm_files(&ct_dir)), sops(&ct), "{}", node.log());
    let kept = sops(&dcm_files(&node.data_dir.join("failed")));
    assert!(kept.is_superset(&sops(&mr)), "{kept:?}\n{}", node.log());
}

/// Review of issue 14, defect D4: a library `Processor` with `[[export]] inputs` was accepted,
/// and `inputs` then ignored (every destination got all of the output). Refused at start.
#[test]
fn export_inputs_beside_a_library_processor_are_refused() {
    use dicomgate::pipeline::{BatchInfo, ProcessingError, Processor};
    struct Nothing;
    impl Processor for Nothing {
        fn process(&self, _: &BatchInfo) -> Result<(), ProcessingError> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dicomgate::config::Config::from_toml(&format!(
        "[node]\nae_title = \"DICOMGATE\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nreactors = 1\n\
         [[input]]\nname = \"ct\"\n[http]\nlisten = \"\"\n{}",
        dir.path().join("data").display().to_string(),
        folder_export(&dir.path().join("out"), "\"ct\"")
    ))
    .unwrap();
    let e = match dicomgate::node::start_with(config, Some(std::sync::Arc::new(Nothing))) {
        Ok(_) => panic!("started with [[export]] inputs beside a Rust Processor"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("export 0") && e.contains("inputs") && e.contains("Processor"),
        "{e}"
    );
}

/// Issue 14 item 4: an export with `reply_to_sender = true` sends each batch to the `[[peer]]`
/// whose AE title is the Calling AE Title that sent it (never the ephemeral source port): two
/// modalities, each registered as a peer with its own DCMTK storescp, each get back only the
/// patient they sent; a sender no `[[peer]]` names gets nothing, and its batch waits for a
/// retry, with the reason, instead of going elsewhere.
#[test]
fn reply_to_sender_reaches_the_peer_registered_for_the_calling_ae() {
    let src = tempfile::tempdir().unwrap();
    let a = series(
        src.path(),
        "CT",
        "AX",
        "REPLY-A",
        "1.2.826.0.1.3680043.10.14.21",
        3,
    );
    let b = series(
        src.path(),
        "CT",
        "AX",
        "REPLY-B",
        "1.2.826.0.1.3680043.10.14.22",
        2,
    );
    let c = series(
        src.path(),
        "CT",
        "AX",
        "REPLY-C",
        "1.2.826.0.1.3680043.10.14.23",
        1,
    );
    let tmp = tempfile::tempdir().unwrap();
    let (a_port, b_port) = (free_port(), free_port());
    let (a_dir, b_dir) = (tmp.path().join("mod_a"), tmp.path().join("mod_b"));
    let _a = storescp(&a_dir, a_port, "MOD_A");
    let _b = storescp(&b_dir, b_port, "MOD_B");
    let node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 2\non_association_close = false\n\
         [[peer]]\nname = \"a\"\nae_title = \"MOD_A\"\naddress = \"127.0.0.1:{a_port}\"\n\
         [[peer]]\nname = \"b\"\nae_title = \"MOD_B\"\naddress = \"127.0.0.1:{b_port}\"\n\
         [[export]]\nkind = \"dicom\"\nreply_to_sender = true\n\
         [outbox]\nattempts = 3\nfirst_delay_seconds = 30\n"
    ));
    // One patient's instances from both modalities, in one batch (quiet time, no trigger at
    // close): each goes back to its own sender only (found in review: the sender of the
    // batch's first instance got the whole batch).
    let m_a = series(
        src.path(),
        "CT",
        "AX",
        "REPLY-M",
        "1.2.826.0.1.3680043.10.14.24",
        2,
    );
    let m_b = series(
        src.path(),
        "MR",
        "T1",
        "REPLY-M",
        "1.2.826.0.1.3680043.10.14.25",
        1,
    );
    let mut from_a = a.clone();
    from_a.extend(m_a.iter().cloned());
    let mut from_b = b.clone();
    from_b.extend(m_b.iter().cloned());
    assert!(storescu(&node, "MOD_A", &from_a).status.success());
    assert!(storescu(&node, "MOD_B", &from_b).status.success());
    assert!(storescu(&node, "STRANGER", &c).status.success());
    assert!(
        wait_until(30, || files_under(&a_dir).len() == 5
            && files_under(&b_dir).len() == 3),
        "{}",
        node.log()
    );
    assert_eq!(sops(&files_under(&a_dir)), sops(&from_a), "MOD_A");
    assert_eq!(sops(&files_under(&b_dir)), sops(&from_b), "MOD_B");
    // Log lines name the patient by its digest (`[log] phi = false`, the default).
    let claimed = format!(
        "patient={}",
        dicomgate::storage::patient_dir_name(b"REPLY-M")
    );
    assert!(
        node.log().lines().any(|l| l.contains("batch claimed")
            && l.contains(&claimed)
            && l.contains("instances=3")),
        "the mixed batch was not one batch: {}",
        node.log()
    );
    assert!(
        wait_until(30, || node
            .log()
            .contains("calling AE title \"STRANGER\", which no [[peer]] has")),
        "{}",
        node.log()
    );
}

/// Found in review of reply to sender: processing results keep no Calling AE Title (their file
/// meta is the processing's own), so a reply could not find its sender and every batch failed;
/// a result goes back to the sender of the batch's first instance.
#[test]
fn reply_to_sender_sends_processing_results_to_the_batchs_sender() {
    let src = tempfile::tempdir().unwrap();
    let a = series(
        src.path(),
        "CT",
        "AX",
        "REPLY-P",
        "1.2.826.0.1.3680043.10.14.26",
        2,
    );
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = tmp.path().join("mod_a");
    let _a = storescp(&dir, port, "MOD_A");
    let script = py_script("strip_source_ae.py");
    let node = Node::start(&format!(
        "[trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [processing]\ncommand = [\"python3\", {:?}]\n\
         [[peer]]\nname = \"a\"\nae_title = \"MOD_A\"\naddress = \"127.0.0.1:{port}\"\n\
         [[export]]\nkind = \"dicom\"\nreply_to_sender = true\n\
         [outbox]\nattempts = 3\nfirst_delay_seconds = 30\n",
        script.display().to_string()
    ));
    assert!(storescu(&node, "MOD_A", &a).status.success());
    assert!(
        wait_until(30, || files_under(&dir).len() == 2),
        "{}",
        node.log()
    );
    for f in files_under(&dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        assert!(
            text.contains("RESULT"),
            "not a processing result: {}",
            f.display()
        );
    }
}

/// Review of issue 14 (the same flaw as D3, in the export markers): a batch remembered which
/// destinations had it by their position in `[[export]]` order. Exported to the first of two
/// destinations, the second one down, then resumed after a restart with the two reordered, it
/// took the first one's marker for the second's: the second never got the batch. Markers are
/// named by the export's `name` now: the destination that had the batch is not sent it again
/// and the other one gets it.
#[test]
fn export_markers_follow_export_names_across_a_reorder() {
    let src = tempfile::tempdir().unwrap();
    let ct = series(
        src.path(),
        "CT",
        "AX",
        "MARKERS",
        "1.2.826.0.1.3680043.10.14.20",
        2,
    );
    let out = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (out.path().join("first"), out.path().join("second"));
    let first = format!(
        "[[export]]\nname = \"first\"\nkind = \"folder\"\npath = {:?}\n",
        first_dir.display().to_string()
    );
    let before = format!(
        "{first}[[export]]\nname = \"second\"\nkind = \"dicom\"\naddress = \"127.0.0.1:{}\"\nae_title = \"PACS\"\n\
         [trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [outbox]\nfirst_delay_seconds = 3600\n",
        free_port()
    );
    let second_now = format!(
        "[[export]]\nname = \"second\"\nkind = \"folder\"\npath = {:?}\n",
        second_dir.display().to_string()
    );
    let trigger = "[trigger]\nquiet_seconds = 0\non_association_close = true\n";
    let after = format!("{second_now}{first}{trigger}");
    let node = claimed_then_restarted_on(&before, &after, &ct);
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    assert_eq!(sops(&dcm_files(&second_dir)), sops(&ct), "{}", node.log());
    let exported_to_first = node
        .log()
        .lines()
        .filter(|l| l.contains("exported") && l.contains("destination=first"))
        .count();
    assert_eq!(
        exported_to_first,
        1,
        "sent to first once, before the restart\n{}",
        node.log()
    );
}
