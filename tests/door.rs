//! Issue 13 items 2-4 at the door, with real peers: user identity (DCMTK storescu `--user`,
//! `--password`, `--pos-response`; pynetdicom's User Identity negotiation), known peers and
//! their addresses (pynetdicom bound to 127.0.0.2), and a vendor SOP class (Siemens CSA
//! Non-Image Storage) refused, stored byte-exact and exported byte-exact to DCMTK storescp
//! `--promiscuous`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

const CSA_NON_IMAGE: &str = "1.3.12.2.1107.5.9.1";

/// `dicomgate passwd USER` fed PASSWORD on stdin: the users-file line it prints.
fn passwd_line(user: &str, password: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["passwd", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with(&format!("{user}:$argon2id$")), "{line}");
    assert!(!line.contains(password));
    line
}

/// A node with `[auth]` over a users file holding alice (passcode "s3cret") and scanner
/// (username only).
fn auth_node(required: bool) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "# test users\n{}scanner:-\n",
            passwd_line("alice", "s3cret")
        ),
    )
    .unwrap();
    let node = Node::start(&format!(
        "[auth]\nusers_file = {:?}\nrequired = {required}\n",
        users.display().to_string()
    ));
    (node, dir)
}

fn storescu_with(node: &Node, extra: &[&str], file: &Path) -> (bool, String) {
    let out = dcmtk("storescu")
        .args(["-v", "-aec", "DICOMGATE"])
        .args(extra)
        .args(["127.0.0.1", &node.port()])
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && text.contains("Received Store Response (Success)"),
        text,
    )
}

fn ct_small() -> PathBuf {
    pydicom_test_files().join("CT_small.dcm")
}

/// DCMTK storescu with `--user/--password`: the right password stores, a wrong one is
/// refused with A-ASSOCIATE-RJ (permanent, service user, no reason given), no identity is
/// refused when required; `--pos-response` gets its positive response; a username-only user
/// listed with `-` is accepted, one with a passcode is not. The refusals are logged with the
/// user, never the passcode.
#[test]
fn user_identity_with_dcmtk_storescu() {
    let (node, _dir) = auth_node(true);
    let f = ct_small();
    let (ok, text) = storescu_with(&node, &["--user", "alice", "--password", "s3cret"], &f);
    assert!(ok, "{text}\n{}", node.log());
    let (ok, text) = storescu_with(
        &node,
        &["--user", "alice", "--password", "s3cret", "--pos-response"],
        &f,
    );
    assert!(ok, "positive response expected and received: {text}");
    let (ok, text) = storescu_with(&node, &["--user", "alice", "--password", "wrongpw"], &f);
    assert!(!ok, "{text}");
    assert!(
        text.contains("Association Rejected")
            && text.contains("Rejected Permanent")
            && text.contains("Service User")
            && text.contains("No Reason"),
        "{text}"
    );
    let (ok, text) = storescu_with(&node, &[], &f);
    assert!(!ok && text.contains("Association Rejected"), "{text}");
    let (ok, text) = storescu_with(&node, &["--user", "scanner"], &f);
    assert!(ok, "username-only user: {text}");
    let (ok, text) = storescu_with(&node, &["--user", "alice"], &f);
    assert!(!ok && text.contains("Association Rejected"), "{text}");
    let log = node.log();
    assert_eq!(
        log.matches("user identity: wrong passcode for user \\\"alice\\\"")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("no user identity"), "{log}");
    assert!(!log.contains("wrongpw") && !log.contains("s3cret"), "{log}");
    assert!(
        log.contains("user=\"alice\""),
        "the accepted user is logged: {log}"
    );
    assert_eq!(
        node.stored().len(),
        1,
        "one SOP instance, stored three times"
    );
}

fn identity(
    node: &Node,
    calling: &str,
    bind: &str,
    ty: u8,
    user: &str,
    pw: &str,
    pos: u8,
) -> String {
    let out = run_py(
        "identity.py",
        &[
            &node.port(),
            "DICOMGATE",
            calling,
            bind,
            &ty.to_string(),
            user,
            pw,
            &pos.to_string(),
            ct_small().to_str().unwrap(),
        ],
    );
    if out == "ABORTED\n" {
        // Seen rarely under heavy load where a rejection was expected: the node's side of it.
        eprintln!("pynetdicom saw ABORTED; the node's log:\n{}", node.log());
    }
    out
}

/// pynetdicom's User Identity negotiation: the positive response (an empty server response,
/// PS3.7 D.3.3.7.2, for type 2) comes back only when asked; a wrong passcode, no identity and
/// a Kerberos (type 3) identity are refused (1, 1, 1) when required; not required, no identity
/// and type 3 pass, a wrong passcode still does not.
#[test]
fn user_identity_with_pynetdicom() {
    let (node, _dir) = auth_node(true);
    let id = |ty, user, pw, pos| identity(&node, "PYNETDICOM", "127.0.0.1", ty, user, pw, pos);
    assert_eq!(
        id(2, "alice", "s3cret", 1),
        "ACCEPTED RESPONSE=\nSTATUS 0x0000\n"
    );
    assert_eq!(
        id(2, "alice", "s3cret", 0),
        "ACCEPTED RESPONSE=NONE\nSTATUS 0x0000\n"
    );
    assert_eq!(id(2, "alice", "nope", 1), "REJECTED 1 1 1\n");
    assert_eq!(id(0, "", "", 0), "REJECTED 1 1 1\n");
    assert_eq!(id(3, "ticket", "", 1), "REJECTED 1 1 1\n");
    assert_eq!(
        id(1, "scanner", "", 1),
        "ACCEPTED RESPONSE=\nSTATUS 0x0000\n"
    );
    drop(node);
    let (open, _dir) = auth_node(false);
    let id = |ty, user, pw, pos| identity(&open, "PYNETDICOM", "127.0.0.1", ty, user, pw, pos);
    assert_eq!(id(0, "", "", 0), "ACCEPTED RESPONSE=NONE\nSTATUS 0x0000\n");
    assert_eq!(
        id(3, "ticket", "", 1),
        "ACCEPTED RESPONSE=NONE\nSTATUS 0x0000\n"
    );
    assert_eq!(id(2, "alice", "nope", 0), "REJECTED 1 1 1\n");
}

/// `[node] check_peer_address`: a known peer's calling AE title from 127.0.0.2 while its host
/// is 127.0.0.1 is refused (1, 1, 3), logged with the AE title and the address; from
/// 127.0.0.1 it stores; an AE title no peer has is not checked.
#[test]
fn check_peer_address_refuses_a_known_ae_from_another_host() {
    let node = Node::start_with_node(
        "check_peer_address = true\n",
        "[[peer]]\nname = \"ct\"\nae_title = \"CT1\"\naddress = \"127.0.0.1:104\"\n",
    );
    let id = |calling, bind| identity(&node, calling, bind, 0, "", "", 0);
    assert_eq!(id("CT1", "127.0.0.2"), "REJECTED 1 1 3\n");
    assert_eq!(
        id("CT1", "127.0.0.1"),
        "ACCEPTED RESPONSE=NONE\nSTATUS 0x0000\n"
    );
    assert_eq!(
        id("MR1", "127.0.0.2"),
        "ACCEPTED RESPONSE=NONE\nSTATUS 0x0000\n"
    );
    let log = node.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("check_peer_address"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains("127.0.0.2") && refused[0].contains("CT1"),
        "{}",
        refused[0]
    );
    drop(node);
    let only = Node::start_with_node(
        "known_peers_only = true\n",
        "[[peer]]\nname = \"ct\"\nae_title = \"CT1\"\naddress = \"127.0.0.1:104\"\n",
    );
    let id = |calling, bind| identity(&only, calling, bind, 0, "", "", 0);
    assert_eq!(id("MR1", "127.0.0.1"), "REJECTED 1 1 3\n");
    assert_eq!(
        id("CT1", "127.0.0.2"),
        "ACCEPTED RESPONSE=NONE\nSTATUS 0x0000\n"
    );
}

fn csa_file(dir: &Path, sop: &str) -> PathBuf {
    let f = dir.join(format!("{sop}.dcm"));
    run_py("csa.py", &[f.to_str().unwrap(), sop]);
    f
}

/// storescu's arguments to propose the CSA Non-Image SOP class: DCMTK 3.6.7 refuses to send a
/// file of a SOP class it does not know unless an association profile (`--config-file`) names
/// it; the profile is written next to `file`.
fn csa_profile(file: &Path) -> [String; 3] {
    let cfg = file.with_extension("cfg");
    std::fs::write(
        &cfg,
        format!(
            "[[TransferSyntaxes]]\n[Explicit]\nTransferSyntax1 = LittleEndianExplicit\n\n\
             [[PresentationContexts]]\n[Csa]\nPresentationContext1 = {CSA_NON_IMAGE}\\Explicit\n\n\
             [[Profiles]]\n[Csa]\nPresentationContexts = Csa\n"
        ),
    )
    .unwrap();
    [
        "--config-file".into(),
        cfg.display().to_string(),
        "Csa".into(),
    ]
}

/// A Siemens CSA Non-Image instance (storescu proposes it from an association profile):
/// refused by default (storescu sees presentation context result 3 and stores nothing), stored byte-exact with `extra_sop_classes` (DCMTK storescu)
/// and with `accept_unknown_sop_classes` (pynetdicom).
#[test]
fn siemens_csa_non_image_is_refused_by_default_and_stored_when_allowed() {
    let src = tempfile::tempdir().unwrap();
    let f = csa_file(src.path(), "1.2.826.0.1.3680043.10.13.4.1");
    let sent = data_set_of(&f);

    let node = Node::start("");
    let p = csa_profile(&f);
    let profile: Vec<&str> = p.iter().map(String::as_str).collect();
    let (ok, text) = storescu_with(&node, &[&["-d"], &profile[..]].concat(), &f);
    assert!(!ok, "{text}");
    assert!(
        text.contains("Abstract Syntax Not Supported")
            || text.contains("abstract syntax not supported"),
        "{text}"
    );
    assert!(node.stored().is_empty());
    drop(node);

    let node = Node::start_with_node(&format!("extra_sop_classes = [{CSA_NON_IMAGE:?}]\n"), "");
    let (ok, text) = storescu_with(&node, &profile, &f);
    assert!(ok, "{text}\n{}", node.log());
    let stored = stored_instance(&node, "1.2.826.0.1.3680043.10.13.4.1").unwrap();
    assert_eq!(data_set_of(&stored), sent, "stored as received");
    drop(node);

    let node = Node::start_with_node("accept_unknown_sop_classes = true\n", "");
    let out = run_py("send.py", &[&node.port(), "DICOMGATE", f.to_str().unwrap()]);
    assert!(out.starts_with("0 "), "{out}\n{}", node.log());
    let stored = stored_instance(&node, "1.2.826.0.1.3680043.10.13.4.1").unwrap();
    assert_eq!(data_set_of(&stored), sent, "stored as received");
    let b = std::fs::read(&stored).unwrap();
    let meta = dicomgate::dicom::part10::parse(&b).unwrap();
    assert_eq!(meta.sop_class_uid, CSA_NON_IMAGE);
}

/// Router mode exports the CSA instance, proposing its own SOP class, to DCMTK storescp
/// `--promiscuous` named by `[[export]] peer`: what storescp wrote holds the data set sent.
#[test]
fn siemens_csa_non_image_is_exported_byte_exact_to_a_named_peer() {
    let src = tempfile::tempdir().unwrap();
    let sop = "1.2.826.0.1.3680043.10.13.4.2";
    let f = csa_file(src.path(), sop);
    let sent = data_set_of(&f);
    let p = csa_profile(&f);
    let profile: Vec<&str> = p.iter().map(String::as_str).collect();
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let out_dir = tmp.path().join("pacs");
    std::fs::create_dir_all(&out_dir).unwrap();
    let _pacs = KillOnDrop(
        dcmtk("storescp")
            .args(["-pm", "-aet", "PACS", "-od"])
            .arg(&out_dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let node = Node::start_with_node(
        &format!("extra_sop_classes = [{CSA_NON_IMAGE:?}]\n"),
        &format!(
            "[trigger]\nquiet_seconds = 0\non_association_close = true\n\
             [[peer]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"127.0.0.1:{port}\"\n\
             [[export]]\nkind = \"dicom\"\npeer = \"pacs\"\n"
        ),
    );
    let (ok, text) = storescu_with(&node, &profile, &f);
    assert!(ok, "{text}");
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    let got = files_under(&out_dir);
    assert_eq!(got.len(), 1, "{got:?}\n{}", node.log());
    assert_eq!(data_set_of(&got[0]), sent, "exported as received");
    let b = std::fs::read(&got[0]).unwrap();
    assert_eq!(
        dicomgate::dicom::part10::parse(&b).unwrap().sop_class_uid,
        CSA_NON_IMAGE
    );
}

/// A `[[peer]]` whose host does not resolve stops the start-up only when its address is
/// checked (`check_peer_address`); as an export target alone it may resolve later (exports
/// retry).
#[test]
fn an_unresolvable_peer_host_is_fatal_only_when_addresses_are_checked() {
    let peer =
        "[[peer]]\nname = \"far\"\nae_title = \"FAR\"\naddress = \"no-such-host.invalid:104\"\n";
    let node = Node::start(peer);
    storescu_still_stores(&node);
    drop(node);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\ncheck_peer_address = true\n[http]\nlisten = \"\"\n{peer}",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("peer \"far\"") && err.contains("does not resolve"),
        "{err}"
    );
}

/// Issue 13 item 5: `[limits] max_associations_per_address`. With two associations held from
/// 127.0.0.1 (the limit), a third from there is answered A-ASSOCIATE-RJ (2, 3, 2) (transient,
/// service provider (presentation), local limit exceeded), one from 127.0.0.2 is accepted and
/// stores, and once one of the two ends, 127.0.0.1 is accepted again.
#[test]
fn max_associations_per_address_rejects_with_local_limit_exceeded() {
    use dicomgate::net::scu::Client;
    let node = Node::start(
        "[limits]\nmax_associations_per_address = 2\n[http]\nlisten = \"127.0.0.1:0\"\n",
    );
    let held: Vec<Client> = ["HOLD1", "HOLD2"]
        .iter()
        .map(|ae| {
            Client::connect(node.addr, &scu_options(ae), &[ct_proposal_in(EXPLICIT_LE)]).unwrap()
        })
        .collect();
    let local = identity(&node, "PYSCU", "127.0.0.1", 0, "", "", 0);
    assert_eq!(local, "REJECTED 2 3 2\n", "over the limit from 127.0.0.1");
    let (_, metrics) = http_get(&http_addr(&node), "/metrics");
    assert!(
        metrics.contains(
            "dicomgate_associations_rejected_total{result=\"2\",source=\"3\",reason=\"2\"} 1\n"
        ),
        "{metrics}"
    );
    let other = identity(&node, "PYSCU", "127.0.0.2", 0, "", "", 0);
    assert!(
        other.starts_with("ACCEPTED") && other.contains("STATUS 0x0000"),
        "127.0.0.2 has its own count: {other}"
    );
    let mut held = held;
    held.pop().unwrap().release().unwrap();
    // The slot frees once the node sees the transport close.
    assert!(
        wait_until(10, || identity(&node, "PYSCU", "127.0.0.1", 0, "", "", 0)
            .contains("STATUS 0x0000")),
        "127.0.0.1 accepted again once one of its associations ended\n{}",
        node.log()
    );
}

/// Issue 13 item 5: 300 established associations each dripping one byte every 50 ms into a
/// C-STORE (its command sent whole, then its data set's P-DATA-TF one byte at a time) are all
/// aborted with A-ABORT by `[limits] min_bytes_per_second` (default 1024, judged over 10 s
/// windows), while DCMTK storescu keeps storing. The idle and DIMSE timers are set to an hour
/// here, so nothing else can abort them within the test's bound.
#[test]
fn three_hundred_dripping_senders_are_aborted_while_storescu_stores() {
    use dicomgate::dimse::command::{self, command_field, CommandSet};
    use dicomgate::dimse::message;
    use dicomgate::net::scu::Client;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    const N: usize = 300;
    let mut node = Node::start(
        "[limits]\nmax_associations = 512\nmax_associations_per_address = 512\n\
         max_associations_per_calling_ae = 512\nidle_seconds = 3600\ndimse_seconds = 3600\n\
         [http]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut clients: Vec<Client> = (0..N)
        .map(|_| {
            Client::connect(
                node.addr,
                &scu_options("DRIP"),
                &[ct_proposal_in(EXPLICIT_LE)],
            )
            .unwrap()
        })
        .collect();
    // Each sends a C-STORE command, then the header of a data set PDU it never finishes.
    for (i, c) in clients.iter_mut().enumerate() {
        let rq = CommandSet {
            command_field: command_field::C_STORE_RQ,
            message_id: Some(1),
            affected_sop_class_uid: Some(CT_IMAGE_STORAGE.as_bytes().to_vec()),
            affected_sop_instance_uid: Some(format!("1.2.826.0.1.3680043.10.9.{i}").into_bytes()),
            priority: Some(0),
            command_data_set_type: 0,
            ..Default::default()
        };
        let mut cmd = Vec::new();
        command::encode(&rq, &mut cmd);
        let mut bytes = Vec::new();
        message::fragment(&mut bytes, 1, true, &cmd, 16384);
        dicomgate::ul::pdu::put_pdata_header(&mut bytes, 1, 0x00, 60_000);
        let s = c.stream();
        s.write_all(&bytes).unwrap();
        s.set_nonblocking(true).unwrap();
    }
    // Drip on a thread; note how each one ended.
    let dripper = std::thread::spawn(move || {
        let mut ended: Vec<Option<&'static str>> = vec![None; N];
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut buf = [0u8; 64];
        while ended.iter().any(Option::is_none) && Instant::now() < deadline {
            for (c, end) in clients.iter_mut().zip(ended.iter_mut()) {
                if end.is_some() {
                    continue;
                }
                let s = c.stream();
                match s.read(&mut buf) {
                    Ok(0) => *end = Some("closed without A-ABORT"),
                    Ok(_) if buf[0] == 0x07 => *end = Some("A-ABORT"),
                    Ok(_) => *end = Some("unexpected PDU"),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if s.write(&[0]).is_err() {
                            *end = Some("write failed");
                        }
                    }
                    Err(_) => *end = Some("reset"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ended
    });
    // Meanwhile a normal sender is served (the drippers are still connected: the first rate
    // window is 10 s long).
    storescu_still_stores(&node);
    storescu_still_stores(&node);
    let ended = dripper.join().unwrap();
    let aborted = ended.iter().filter(|e| **e == Some("A-ABORT")).count();
    assert_eq!(
        aborted,
        N,
        "every dripping sender aborted with A-ABORT: {:?}",
        ended
            .iter()
            .filter(|e| **e != Some("A-ABORT"))
            .collect::<Vec<_>>()
    );
    assert!(node.is_running());
    // Each association is logged once its transport closes (the drippers' sockets closed
    // when their thread ended).
    let slow = |log: String| {
        log.lines()
            .filter(|l| l.contains("sender too slow inside a message"))
            .count()
    };
    wait_until(30, || slow(node.log()) >= N);
    assert_eq!(
        slow(node.log()),
        N,
        "each abort logged once with its reason"
    );
    let (_, metrics) = http_get(&http_addr(&node), "/metrics");
    assert!(
        metrics.contains(&format!(
            "dicomgate_associations_total{{outcome=\"aborted_too_slow\"}} {N}\n"
        )),
        "{metrics}"
    );
    storescu_still_stores(&node);
    assert_eq!(node.stored().len(), 1, "only storescu's instance stored");
}
