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
use dicomgate::dimse::query::{StudyQuery, PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE};
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
    let area = dir.join("QRSCP");
    std::fs::create_dir_all(&area).unwrap();
    let cfg = dir.join("dcmqrscp.cfg");
    std::fs::write(
        &cfg,
        format!(
            "NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\
             HostTable BEGIN\ngate = (DICOMGATE, localhost, {dest_port})\nHostTable END\n\
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
    let st = dcmtk("storescu")
        .args(["-aec", "QRSCP", "localhost", &port.to_string()])
        .args(&files)
        .status()
        .unwrap();
    assert!(st.success(), "priors loaded into dcmqrscp");
    let mut c = Client::connect(("127.0.0.1", port), &qr_options(), &qr_proposals()).unwrap();
    let q = StudyQuery {
        patient_id: "PRIOR1".into(),
        since: None,
    };
    let found = c.find_studies(&q, 100).unwrap();
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
    let moved = c.move_study("DICOMGATE", "PRIOR1", &study(1)).unwrap();
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
    let unknown = c.move_study("NOBODY", "PRIOR1", &study(2)).unwrap();
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
    match c.find_studies(&pat1(), 50) {
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
    let found = c.find_studies(&pat1(), 50).unwrap();
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
    let r = c.find_studies(&pat1(), 50);
    assert!(matches!(r, Err(ScuError::Protocol(_))), "{r:?}");
}
