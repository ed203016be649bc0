//! Issue 14 item 6, first part: the Query/Retrieve requestor (`net::scu::Client::find_studies`
//! and `move_study`, Patient Root, STUDY level) against real peers: DCMTK's `dcmqrscp` with an
//! index of prior studies loaded by `storescu`, moving a study into dicomgate's own listener;
//! and a hostile C-FIND SCP (pynetdicom) whose answers are endless, malformed or huge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use common::*;
use dicomgate::dicom::sop_class::{PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE};
use dicomgate::dimse::query::StudyQuery;
use dicomgate::net::scu::{Client, Proposal, ScuError, ScuOptions};

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

fn qr_proposals() -> Vec<Proposal> {
    [PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE]
        .iter()
        .map(|a| Proposal {
            abstract_syntax: (*a).into(),
            transfer_syntaxes: vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
        })
        .collect()
}

fn qr_options() -> ScuOptions {
    ScuOptions {
        calling_ae: "DICOMGATE".into(),
        called_ae: "QRSCP".into(),
        timeout: std::time::Duration::from_secs(20),
        ..Default::default()
    }
}

/// DCMTK dcmqrscp as QRSCP on `port`, its storage area under `dir`, knowing `DICOMGATE` at
/// `dest_port` on localhost as a move destination.
fn dcmqrscp(dir: &Path, port: u16, dest_port: u16) -> KillOnDrop {
    dcmqrscp_knowing(dir, port, &[("DICOMGATE", dest_port)])
}

/// [`dcmqrscp`] knowing each (AE title, port) on localhost as a move destination.
fn dcmqrscp_knowing(dir: &Path, port: u16, hosts: &[(&str, u16)]) -> KillOnDrop {
    let table: String = hosts
        .iter()
        .enumerate()
        .map(|(i, (ae, p))| format!("dest{i} = ({ae}, localhost, {p})\n"))
        .collect();
    let area = dir.join("QRSCP");
    std::fs::create_dir_all(&area).unwrap();
    let cfg = dir.join("dcmqrscp.cfg");
    std::fs::write(
        &cfg,
        format!(
            "NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\
             HostTable BEGIN\n{table}HostTable END\n\
             VendorTable BEGIN\nVendorTable END\n\
             AETable BEGIN\nQRSCP {} RW (200, 1024mb) ANY\nAETable END\n",
            area.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("dcmqrscp.log")).unwrap();
    let child = dcmtk("dcmqrscp")
        .args(["-v", "-c"])
        .arg(&cfg)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    assert!(
        wait_until(10, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()),
        "dcmqrscp did not listen"
    );
    child
}

fn study(i: u32) -> String {
    format!("1.2.826.0.1.3680043.10.60.{i}")
}

/// Two prior studies of PRIOR1 (3 and 2 instances) and one of another patient, stored into
/// dcmqrscp by DCMTK storescu. A C-FIND for PRIOR1 names exactly its two studies with their
/// dates; a C-MOVE of the first to DICOMGATE (our own node's listener, as dcmqrscp's
/// host table has it) completes 3 sub-operations and the node stores those 3 instances; a
/// move to an AE title dcmqrscp does not know fails with 0xA801.
#[test]
fn find_and_move_prior_studies_from_dcmqrscp() {
    let node = Node::start("");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _qr = dcmqrscp(dir.path(), port, node.addr.port());
    let src = dir.path().join("src");
    let mut files = Vec::new();
    for (s, patient, n) in [(1, "PRIOR1", 3), (2, "PRIOR1", 2), (3, "OTHER", 1)] {
        for i in 0..n {
            files.push(write_instance(
                &src,
                patient,
                &study(s),
                &format!("{}.1", study(s)),
                &format!("{}.1.{i}", study(s)),
                i + 1,
            ));
        }
    }
    load_into_dcmqrscp(port, &files);
    let mut c = Client::connect(("127.0.0.1", port), &qr_options(), &qr_proposals()).unwrap();
    let q = StudyQuery {
        patient_id: "PRIOR1".into(),
        since: None,
    };
    let found = c.find_studies(&q, 100, None).unwrap();
    assert_eq!(found.status, 0x0000, "{found:?}");
    assert!(found.refused.is_empty(), "{found:?}");
    let mut uids: Vec<_> = found
        .matches
        .iter()
        .map(|m| (m.study_instance_uid.clone(), m.study_date.clone()))
        .collect();
    uids.sort();
    // (dcmqrscp returns no Number of Study Related Instances: an optional key it lacks.)
    assert_eq!(
        uids,
        vec![(study(1), "20260101".into()), (study(2), "20260101".into())]
    );
    let moved = c
        .move_study("DICOMGATE", "PRIOR1", &study(1), None)
        .unwrap();
    assert_eq!(
        (moved.status, moved.completed, moved.failed),
        (0x0000, 3, 0),
        "{moved:?}"
    );
    let mut stored: Vec<String> = node.stored().iter().map(|p| sop_uid_of(p)).collect();
    stored.sort();
    assert_eq!(
        stored,
        (0..3)
            .map(|i| format!("{}.1.{i}", study(1)))
            .collect::<Vec<_>>(),
        "the moved study arrived at the node's own listener"
    );
    let unknown = c.move_study("NOBODY", "PRIOR1", &study(2), None).unwrap();
    assert_eq!(
        unknown.status, 0xA801,
        "move destination unknown: {unknown:?}"
    );
    c.release().unwrap();
}

/// The hostile C-FIND SCP of `tests/py/qr_scp.py` in `mode`, listening.
fn hostile_scp(mode: &str) -> (KillOnDrop, u16) {
    let port = free_port();
    let mut child = python()
        .arg(py_script("qr_scp.py"))
        .args([&port.to_string(), mode])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "LISTENING");
    let child = KillOnDrop(child);
    assert!(wait_until(10, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    (child, port)
}

fn find_proposal() -> Vec<Proposal> {
    vec![Proposal {
        abstract_syntax: PATIENT_ROOT_FIND.into(),
        transfer_syntaxes: vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
    }]
}

fn pat1() -> StudyQuery {
    StudyQuery {
        patient_id: "PAT1".into(),
        since: Some("20100101".into()),
    }
}

/// A peer that answers a C-FIND with pending responses without end is cut off after
/// `max_matches`: the association is aborted and the query fails, it does not run forever.
#[test]
fn endless_pending_c_find_responses_are_cut_off() {
    let (_scp, port) = hostile_scp("endless");
    let mut c = Client::connect(("127.0.0.1", port), &qr_options(), &find_proposal()).unwrap();
    match c.find_studies(&pat1(), 50, None) {
        Err(ScuError::Refused(why)) => assert!(why.contains("more than 50"), "{why}"),
        other => panic!("not cut off: {other:?}"),
    }
}

/// Matches for another patient, without a Study Instance UID or with an invalid one are
/// left out, each with its reason; the good one is kept.
#[test]
fn malformed_c_find_matches_are_left_out_with_a_reason() {
    let (_scp, port) = hostile_scp("bad");
    let mut c = Client::connect(("127.0.0.1", port), &qr_options(), &find_proposal()).unwrap();
    let found = c.find_studies(&pat1(), 50, None).unwrap();
    assert_eq!(found.status, 0x0000);
    let uids: Vec<_> = found
        .matches
        .iter()
        .map(|m| &m.study_instance_uid)
        .collect();
    assert_eq!(uids, vec!["1.2.826.0.1.3680043.10.88.1"]);
    assert_eq!(found.refused.len(), 3, "{:?}", found.refused);
    assert!(
        found.refused[0].contains("another patient"),
        "{:?}",
        found.refused
    );
    assert!(found.refused[1..]
        .iter()
        .all(|r| r.contains("Study Instance UID")));
}

/// A response identifier larger than the requestor's bound (1 MiB) aborts the association
/// and fails the query, without holding the whole of it.
#[test]
fn a_huge_c_find_identifier_fails_the_query() {
    let (_scp, port) = hostile_scp("huge");
    let mut c = Client::connect(("127.0.0.1", port), &qr_options(), &find_proposal()).unwrap();
    let r = c.find_studies(&pat1(), 50, None);
    assert!(matches!(r, Err(ScuError::Protocol(_))), "{r:?}");
}

/// A node whose `priors` input asks `pacs` (at `qr_port`) and whose processing lists its
/// input folders into `listing`.
fn priors_node(qr_port: u16, timeout_seconds: u64, listing: &Path, script: &Path) -> Node {
    priors_node_moving_to(qr_port, timeout_seconds, listing, script, "")
}

/// [`priors_node`] with extra lines for the priors input (a `move_destination`, say).
fn priors_node_moving_to(
    qr_port: u16,
    timeout_seconds: u64,
    listing: &Path,
    script: &Path,
    extra: &str,
) -> Node {
    std::fs::write(
        script,
        format!(
            "#!/bin/sh\nset -e\ncd \"$DICOMGATE_INPUT_DIR\"\nfind . -name '*.dcm' | sort >> {listing:?}\n\
             cp -R \"$DICOMGATE_INPUT_DIR\"/. \"$DICOMGATE_OUTPUT_DIR\"/\n"
        ),
    )
    .unwrap();
    Node::start(&format!(
        "[[peer]]\nname = \"pacs\"\nae_title = \"QRSCP\"\naddress = \"127.0.0.1:{qr_port}\"\n\
         [[input]]\nname = \"current\"\nmin_instances = 3\n\
         [[input]]\nname = \"priors\"\nkind = \"priors\"\nqr_peer = \"pacs\"\n\
         timeout_seconds = {timeout_seconds}\n{extra}\
         [trigger]\nquiet_seconds = 0\non_association_close = true\n\
         [processing]\ncommand = [\"sh\", {:?}]\n",
        script.display().to_string()
    ))
}

/// DCMTK storescu stores `files` into the dcmqrscp on `port` (its index of prior studies).
fn load_into_dcmqrscp(port: u16, files: &[std::path::PathBuf]) {
    let st = dcmtk("storescu")
        .args(["-aec", "QRSCP", "localhost", &port.to_string()])
        .args(files)
        .status()
        .unwrap();
    assert!(st.success(), "priors loaded into dcmqrscp");
}

/// DCMTK storescu sends `current` to `node`; waits for the processing command to write its
/// `listing` of the batch's input folders (`why` says what it means if it never does) and
/// returns it.
fn processed(node: &Node, current: &[std::path::PathBuf], listing: &Path, why: &str) -> String {
    assert!(storescu_status(node, current).success(), "{}", node.log());
    assert!(
        wait_until(60, || std::fs::read_to_string(listing)
            .is_ok_and(|t| !t.is_empty())),
        "{why}\n{}",
        node.log()
    );
    std::fs::read_to_string(listing).unwrap()
}

/// What the processing listing holds under `./{input}/`, as SOP Instance UIDs.
fn in_input(listing: &str, input: &str) -> Vec<String> {
    let mut v: Vec<String> = listing
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("./{input}/")))
        .map(|f| {
            f.rsplit('/')
                .next()
                .unwrap_or(f)
                .trim_end_matches(".dcm")
                .to_string()
        })
        .collect();
    v.sort();
    v
}

fn sops(study_no: u32, n: u32) -> Vec<String> {
    (0..n)
        .map(|i| format!("{}.1.{i}", study(study_no)))
        .collect()
}

fn write_study(dir: &Path, patient: &str, study_no: u32, n: u32) -> Vec<std::path::PathBuf> {
    (0..n)
        .map(|i| {
            write_instance(
                dir,
                patient,
                &study(study_no),
                &format!("{}.1", study(study_no)),
                &format!("{}.1.{i}", study(study_no)),
                i + 1,
            )
        })
        .collect()
}

/// Issue 14 item 6 with DCMTK's dcmqrscp: a patient's new CT (3 slices) arrives; its two prior
/// studies (3 and 2 instances, loaded into dcmqrscp by storescu beside another patient's) are
/// found and moved into the node, which holds the batch until they are in: processing sees
/// `input/current/` with the 3 new slices and `input/priors/` with the 5 prior instances, and
/// nothing of the other patient. The PACS holds the new CT as well (review of issue 14: the
/// retrieval could look before the new study was in the batch and fetch it as a prior).
#[test]
fn priors_are_retrieved_from_dcmqrscp_before_processing() {
    let dir = tempfile::tempdir().unwrap();
    let qr_port = free_port();
    let listing = dir.path().join("inputs.txt");
    let node = priors_node(qr_port, 120, &listing, &dir.path().join("list.sh"));
    let _qr = dcmqrscp(dir.path(), qr_port, node.addr.port());
    let src = dir.path().join("src");
    let mut priors = write_study(&src.join("p"), "PRIOR1", 1, 3);
    priors.extend(write_study(&src.join("p"), "PRIOR1", 2, 2));
    priors.extend(write_study(&src.join("p"), "OTHER", 3, 1));
    // The PACS has the new CT too (the modality sent it there as well): it is the newest
    // study, and it must not be taken for a prior.
    let current = write_study(&src.join("c"), "PRIOR1", 4, 3);
    priors.extend(current.iter().cloned());
    load_into_dcmqrscp(qr_port, &priors);
    let text = processed(&node, &current, &listing, "not processed");
    assert_eq!(in_input(&text, "current"), sops(4, 3), "{text}");
    let mut want = sops(1, 3);
    want.extend(sops(2, 2));
    assert_eq!(in_input(&text, "priors"), want, "{text}");
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(node.log().contains("priors: retrieved"), "{}", node.log());
}

/// A Q/R peer that is down: the retrieval is retried (5 s, then the timeout comes first), and
/// when `timeout_seconds` has passed the patient goes on without priors: processing sees the
/// current instances only, and the log says so.
#[test]
fn a_qr_peer_that_is_down_is_retried_then_the_patient_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let listing = dir.path().join("inputs.txt");
    let down = free_port(); // nobody listens there
    let node = priors_node(down, 8, &listing, &dir.path().join("list.sh"));
    let current = write_study(&dir.path().join("c"), "PRIOR2", 5, 3);
    let text = processed(&node, &current, &listing, "not processed");
    assert_eq!(in_input(&text, "current"), sops(5, 3), "{text}");
    assert!(in_input(&text, "priors").is_empty(), "{text}");
    let log = node.log();
    assert!(
        log.matches("priors: retrieval failed; retrying").count() >= 2,
        "retried\n{log}"
    );
    assert!(log.contains("priors: timed out"), "{log}");
}

/// Review of issue 14: a C-MOVE that reports its instances completed, but to somewhere else
/// (`move_destination` names another AE, here a DCMTK storescp), left the batch waiting for
/// them for ever (the timeout held only while retrieving). It goes on at `timeout_seconds`:
/// processing sees the current instances, and the log says the priors timed out.
#[test]
fn priors_reported_but_never_received_do_not_hold_the_batch_past_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let qr_port = free_port();
    let scp_port = free_port();
    let _scp = storescp(&dir.path().join("elsewhere"), scp_port, "ELSEWHERE");
    let listing = dir.path().join("inputs.txt");
    let node = priors_node_moving_to(
        qr_port,
        6,
        &listing,
        &dir.path().join("list.sh"),
        "move_destination = \"ELSEWHERE\"\n",
    );
    let _qr = dcmqrscp_knowing(
        dir.path(),
        qr_port,
        &[("DICOMGATE", node.addr.port()), ("ELSEWHERE", scp_port)],
    );
    let priors = write_study(&dir.path().join("p"), "PRIOR3", 6, 2);
    load_into_dcmqrscp(qr_port, &priors);
    let current = write_study(&dir.path().join("c"), "PRIOR3", 7, 3);
    let text = processed(&node, &current, &listing, "held past the timeout");
    assert_eq!(in_input(&text, "current"), sops(7, 3), "{text}");
    assert!(in_input(&text, "priors").is_empty(), "{text}");
    let log = node.log();
    assert!(
        log.contains("priors: retrieved"),
        "the C-MOVE completed\n{log}"
    );
    assert!(log.contains("priors: timed out"), "{log}");
}

/// Review of issue 12 item 5: with `[log] phi = false` (the default) the priors' messages put
/// the Patient ID in the log (an ID C-FIND would take for a pattern was quoted in the
/// warning). Such an ID is not queried, and the warning names the patient by digest only.
#[test]
fn an_unqueryable_patient_id_is_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let listing = dir.path().join("inputs.txt");
    let node = priors_node(free_port(), 60, &listing, &dir.path().join("list.sh"));
    let id = "SECRET*42";
    let current = write_study(&dir.path().join("c"), id, 8, 3);
    processed(&node, &current, &listing, "not processed");
    let log = node.log();
    assert!(
        log.contains("priors: the Patient ID is empty or holds"),
        "{log}"
    );
    assert!(
        !log.contains("SECRET"),
        "the Patient ID is in the log:\n{log}"
    );
}
