//! DICOM over TLS (issue 13 item 1, PS3.15 B.12): the node's `[tls]` listener against DCMTK's
//! echoscu and storescu `+tls` (Debian's build, with OpenSSL), client certificates required by
//! `client_ca`, plain DICOM and silence on the TLS port, and start-up refusal of bad files.
//! Certificates are made per test with the `openssl` command (a CA, a server certificate for
//! 127.0.0.1/localhost, a client certificate, and a second, unrelated CA with its own client).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tls_port(node: &Node) -> String {
    node.tls_addr
        .expect("node has a TLS listener")
        .port()
        .to_string()
}

/// DCMTK `tool` over TLS to the node's TLS port: `client` = Some((key, cert)) presents that
/// client certificate (`+tls`), None is anonymous (`+tla`); the server is verified against
/// our CA (`+cf`).
fn dcmtk_tls(
    tool: &str,
    pki: &Pki,
    node: &Node,
    client: Option<(&str, &str)>,
    files: &[PathBuf],
) -> std::process::Output {
    let mut c = dcmtk(tool);
    match client {
        Some((key, cert)) => c.args(["+tls", &pki.s(key), &pki.s(cert), "-pw"]),
        None => c.arg("+tla"),
    };
    c.args([
        "+cf",
        &pki.s("ca.pem"),
        "-aec",
        "DICOMGATE",
        "127.0.0.1",
        &tls_port(node),
    ])
    .args(files)
    .output()
    .unwrap()
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn write_part10(dir: &Path, ds: &[u8], sop: &str) -> PathBuf {
    let meta = dicomgate::storage::FileMeta {
        sop_class_uid: CT_IMAGE_STORAGE.into(),
        sop_instance_uid: sop.into(),
        transfer_syntax_uid: EXPLICIT_LE.into(),
        source_ae_title: "TEST".into(),
        ..Default::default()
    };
    let mut bytes = dicomgate::dicom::part10::header(&meta);
    bytes.extend_from_slice(ds);
    let p = dir.join(format!("{sop}.dcm"));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// (a) echoscu and storescu `+tls` into the TLS listener; the plain listener serves beside it;
/// every stored data set is the one sent (three small ones and a 0.5 MB one: many records).
#[test]
fn echoscu_and_storescu_over_tls_store_what_was_sent() {
    let pki = Pki::new();
    let node = Node::start(&pki.tls_toml(false));
    let echo = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &[],
    );
    assert!(echo.status.success(), "{}\n{}", text(&echo), node.log());
    let work = tempfile::tempdir().unwrap();
    let mut sent = Vec::new();
    for (i, pixels) in [(1, 64), (2, 4096), (3, 100), (4, 512 * 512 * 2)] {
        let sop = format!("1.2.826.0.1.3680043.2.1143.{i}");
        let ds = dataset("TLSPAT", "1.2.3.9", "1.2.3.9.1", &sop, pixels);
        sent.push((write_part10(work.path(), &ds, &sop), sop, ds));
    }
    let files: Vec<PathBuf> = sent.iter().map(|s| s.0.clone()).collect();
    let store = dcmtk_tls(
        "storescu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &files,
    );
    assert!(store.status.success(), "{}\n{}", text(&store), node.log());
    for (_, sop, ds) in &sent {
        let f = stored_instance(&node, sop).unwrap_or_else(|| panic!("{sop} not stored"));
        assert!(data_set_of(&f) == *ds, "{sop}: stored data set differs");
    }
    // The profile: TLS 1.2 or 1.3 with an AEAD suite (what DCMTK's BCP 195 profile and ours
    // share).
    let log = node.log();
    let established: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS established"))
        .collect();
    assert_eq!(established.len(), 2, "{log}");
    assert!(
        established
            .iter()
            .all(|l| (l.contains("TLSv1_3") || l.contains("TLSv1_2"))
                && (l.contains("GCM") || l.contains("CHACHA20"))),
        "{established:#?}"
    );
    // The plain listener still serves beside the TLS one.
    storescu_still_stores(&node);
    assert!(
        !node.log().contains("TLS handshake failed"),
        "{}",
        node.log()
    );
}

/// (b) With `client_ca`: a client certificate signed by it is accepted; none, or one from
/// another CA, is refused by an alert, logged once each with the peer, and the node serves on.
#[test]
fn client_ca_requires_a_certificate_signed_by_it() {
    let pki = Pki::new();
    let node = Node::start(&pki.tls_toml(true));
    let ok = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &[],
    );
    assert!(ok.status.success(), "{}\n{}", text(&ok), node.log());
    let anonymous = dcmtk_tls("echoscu", &pki, &node, None, &[]);
    assert!(
        !anonymous.status.success(),
        "no client certificate was accepted"
    );
    assert!(
        wait_until(5, || node.log().contains("NoCertificatesPresented")
            || node.log().contains("peer sent no certificates")),
        "{}",
        node.log()
    );
    let other = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("other-client.key", "other-client.pem")),
        &[],
    );
    assert!(
        !other.status.success(),
        "a certificate of another CA was accepted"
    );
    assert!(
        wait_until(5, || node.log().matches("TLS handshake failed").count()
            >= 2),
        "{}",
        node.log()
    );
    let log = node.log();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS handshake failed"))
        .collect();
    assert_eq!(failures.len(), 2, "each failure logged once: {failures:#?}");
    assert!(
        failures.iter().all(|l| l.contains("peer=127.0.0.1:")),
        "{failures:#?}"
    );
    assert!(
        failures.iter().any(|l| l.contains("UnknownIssuer")),
        "{failures:#?}"
    );
    // Still serving, over TLS and plain.
    let again = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &[],
    );
    assert!(again.status.success(), "{}\n{}", text(&again), node.log());
    storescu_still_stores(&node);
}

/// (c) Plain DICOM to the TLS port is closed after an alert (logged once) and the node serves
/// on; a TCP peer that connects and sends nothing is dropped by ARTIM, as on the plain port.
#[test]
fn plain_dicom_and_silence_on_the_tls_port_are_dropped() {
    use std::io::Read;
    let pki = Pki::new();
    let node = Node::start(&format!(
        "[limits]\nartim_seconds = 2\n{}",
        pki.tls_toml(false)
    ));
    let plain = dcmtk("echoscu")
        .args([
            "-to",
            "5",
            "-aec",
            "DICOMGATE",
            "127.0.0.1",
            &tls_port(&node),
        ])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plain DICOM accepted on the TLS port"
    );
    assert!(
        wait_until(5, || node.log().contains("TLS handshake failed")),
        "{}",
        node.log()
    );
    assert_eq!(
        node.log().matches("TLS handshake failed").count(),
        1,
        "{}",
        node.log()
    );
    // Silence: connected, never a ClientHello.
    let mut silent = std::net::TcpStream::connect(node.tls_addr.unwrap()).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 16];
    let n = silent.read(&mut b).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "the node sent something to a silent peer");
    assert!(
        waited >= std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(8),
        "dropped after {waited:?}, ARTIM is 2 s"
    );
    let ok = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &[],
    );
    assert!(ok.status.success(), "{}\n{}", text(&ok), node.log());
    storescu_still_stores(&node);
}

/// Bad `[tls]` files are refused at start-up, naming the field: unreadable, not PEM, a key that
/// is not the certificate's, an unreadable client CA; and `listen` without a certificate.
#[test]
fn bad_tls_files_are_refused_at_start_up_naming_the_field() {
    let pki = Pki::new();
    let check = |cert: &str, key: &str, ca: Option<&str>| -> String {
        let mut t = format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ncertificate = {cert:?}\nprivate_key = {key:?}\n"
        );
        if let Some(ca) = ca {
            t += &format!("client_ca = {ca:?}\n");
        }
        match dicomgate::config::Config::from_toml(&t) {
            Err(e) => e.0,
            // What node::start checks: the environment, then the TLS files.
            Ok(c) => c
                .check_environment()
                .map_err(|e| e.0)
                .and_then(|()| dicomgate::net::tls::check_files(&c))
                .map_or_else(|e| e, |()| "ok".into()),
        }
    };
    let (cert, key) = (pki.s("server.pem"), pki.s("server.key"));
    assert_eq!(check(&cert, &key, None), "ok");
    assert_eq!(check(&cert, &key, Some(&pki.s("ca.pem"))), "ok");
    let e = check("/nonexistent/server.pem", &key, None);
    assert!(
        e.contains("tls.certificate") && e.contains("cannot be read"),
        "{e}"
    );
    let e = check(&pki.s("server.ext"), &key, None);
    assert!(
        e.contains("tls.certificate") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = check(&cert, &pki.s("server.pem"), None);
    assert!(
        e.contains("tls.private_key") && e.contains("no PEM private key"),
        "{e}"
    );
    let e = check(&cert, &pki.s("client.key"), None);
    assert!(
        e.contains("tls.private_key") && e.contains("does not go with tls.certificate"),
        "{e}"
    );
    let e = check(&cert, &key, Some("/nonexistent/ca.pem"));
    assert!(
        e.contains("tls.client_ca") && e.contains("cannot be read"),
        "{e}"
    );
    let e = match dicomgate::config::Config::from_toml("[tls]\nlisten = \"127.0.0.1:2762\"\n") {
        Err(e) => e.0,
        Ok(_) => panic!("listen without certificate accepted"),
    };
    assert!(e.contains("tls.certificate is not set"), "{e}");
    // The real binary refuses to start, with the message.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n[http]\nlisten = \"\"\n\
             [tls]\nlisten = \"127.0.0.1:0\"\ncertificate = \"/nonexistent/server.pem\"\nprivate_key = {key:?}\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let err = refused_at_start_up(&cfg);
    assert!(
        err.contains("tls.certificate /nonexistent/server.pem: cannot be read"),
        "{err}"
    );
}

/// The PS3.15 B.12 / BCP 195 profile, probed with `openssl s_client`: TLS 1.3 and TLS 1.2
/// with ECDHE and AES-GCM are accepted; TLS 1.1, a CBC suite, TLS 1.2's ChaCha20 and RSA key
/// exchange are refused.
#[test]
fn the_profile_is_tls_1_2_and_1_3_with_ecdhe_and_aead_only() {
    let pki = Pki::new();
    let node = Node::start(&pki.tls_toml(false));
    let connect = format!("127.0.0.1:{}", tls_port(&node));
    let probe = |args: &[&str]| -> (bool, String) {
        let out = Command::new("/usr/bin/openssl")
            .args([
                "s_client",
                "-connect",
                &connect,
                "-CAfile",
                &pki.s("ca.pem"),
            ])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let t = text(&out);
        (
            out.status.success() && t.contains("Verify return code: 0 (ok)"),
            t,
        )
    };
    for ok in [
        &["-tls1_3"][..],
        &["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
        &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
        &["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"],
    ] {
        let (accepted, t) = probe(ok);
        assert!(accepted, "{ok:?} refused:\n{t}");
    }
    for bad in [
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
        &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"],
        &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"],
        &["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"],
        &["-tls1_2", "-cipher", "AES128-GCM-SHA256"],
    ] {
        let (accepted, t) = probe(bad);
        assert!(!accepted, "{bad:?} accepted:\n{t}");
    }
    let ok = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &[],
    );
    assert!(ok.status.success(), "{}\n{}", text(&ok), node.log());
}

/// DCMTK storescp over TLS (`+tls`), requiring a client certificate (its default `-rc`),
/// verified against our CA; its log is `dir.log`.
fn storescp_tls(pki: &Pki, dir: &Path, port: u16) -> KillOnDrop {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let child = dcmtk("storescp")
        .args([
            "-v",
            "+tls",
            &pki.s("server.key"),
            &pki.s("server.pem"),
            "-pw",
        ])
        .args(["+cf", &pki.s("ca.pem"), "-aet", "TLS_PACS", "-od"])
        .arg(dir)
        .arg(port.to_string())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    // Listening once a TLS handshake can be had (a TCP connect alone would do, but it leaves
    // storescp a failed handshake to log).
    assert!(
        wait_until(10, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()),
        "storescp +tls did not start"
    );
    child
}

/// (d) `[[export]] tls = true` with our client certificate: the batch reaches DCMTK
/// `storescp +tls`, each data set as it was sent; a `tls_ca` that did not sign storescp's
/// certificate fails the export (the batch is kept, retried), with the reason in the log.
#[test]
fn export_over_tls_to_storescp_delivers_the_batch() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let recv = work.path().join("pacs");
    let port = free_port();
    let _pacs = storescp_tls(&pki, &recv, port);
    let export = |ca: &str| {
        format!(
            "[trigger]\nquiet_seconds = 0\non_association_close = true\n\
             [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{port}\"\nae_title = \"TLS_PACS\"\n\
             tls = true\ntls_ca = {:?}\ntls_certificate = {:?}\ntls_private_key = {:?}\n\
             [outbox]\nfirst_delay_seconds = 0.2\nmax_delay_seconds = 0.5\nattempts = 100\n",
            pki.s(ca),
            pki.s("client.pem"),
            pki.s("client.key")
        )
    };
    let node = Node::start(&export("ca.pem"));
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut sent = Vec::new();
    for i in 1..=3 {
        let sop = format!("1.2.826.0.1.3680043.2.1143.7.{i}");
        let ds = dataset("EXPPAT", "1.2.3.7", "1.2.3.7.1", &sop, 2048 * i);
        sent.push((write_part10(&src, &ds, &sop), sop, ds));
    }
    let files: Vec<PathBuf> = sent.iter().map(|s| s.0.clone()).collect();
    assert!(storescu_status(&node, &files).success(), "{}", node.log());
    assert!(
        wait_until(20, || files_under(&recv).len() >= sent.len()),
        "storescp got {:?}\nnode:\n{}\nstorescp:\n{}",
        files_under(&recv),
        node.log(),
        std::fs::read_to_string(recv.with_extension("log")).unwrap_or_default()
    );
    for (_, sop, ds) in &sent {
        let f = files_under(&recv)
            .into_iter()
            .find(|p| sop_uid_of(p) == *sop)
            .unwrap_or_else(|| panic!("{sop} not received"));
        assert!(data_set_of(&f) == *ds, "{sop}: received data set differs");
    }
    let pacs_log = std::fs::read_to_string(recv.with_extension("log")).unwrap_or_default();
    assert!(pacs_log.contains("Association Received"), "{pacs_log}");

    // The wrong CA: storescp's certificate is refused by our requestor; nothing delivered.
    let recv2 = work.path().join("pacs2");
    let port2 = free_port();
    let _pacs2 = storescp_tls(&pki, &recv2, port2);
    let node2 = Node::start(&export("other-ca.pem").replace(&port.to_string(), &port2.to_string()));
    assert!(
        storescu_status(&node2, &files[..1]).success(),
        "{}",
        node2.log()
    );
    assert!(
        wait_until(20, || node2.log().contains("UnknownIssuer")),
        "{}",
        node2.log()
    );
    assert!(
        files_under(&recv2).is_empty(),
        "delivered despite the wrong CA"
    );
}

/// `dicomgate echo` and `store` over TLS against the node's own listener (with `client_ca`):
/// our requestor's client certificate is accepted and the data stored; a server certificate
/// from a CA it was not told to trust is refused before any DICOM is sent.
#[test]
fn dicomgate_echo_and_store_over_tls() {
    let pki = Pki::new();
    let node = Node::start(&pki.tls_toml(true));
    let addr = node.tls_addr.unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_dicomgate");
    let client = [
        "--tls-certificate",
        &pki.s("client.pem"),
        "--tls-private-key",
        &pki.s("client.key"),
    ];
    let echo = Command::new(bin)
        .args(["echo", &addr, "--tls-ca", &pki.s("ca.pem")])
        .args(client)
        .output()
        .unwrap();
    assert!(echo.status.success(), "{}\n{}", text(&echo), node.log());
    let work = tempfile::tempdir().unwrap();
    let sop = "1.2.826.0.1.3680043.2.1143.8.1";
    let ds = dataset("SCUPAT", "1.2.3.8", "1.2.3.8.1", sop, 300_000);
    write_part10(work.path(), &ds, sop);
    let store = Command::new(bin)
        .args(["store", &addr])
        .arg(work.path())
        .args(["--tls-ca", &pki.s("ca.pem")])
        .args(client)
        .output()
        .unwrap();
    assert!(store.status.success(), "{}\n{}", text(&store), node.log());
    let f = stored_instance(&node, sop).expect("stored");
    assert!(data_set_of(&f) == ds, "stored data set differs");
    // Trusting the other CA only: the node's certificate is refused by our requestor.
    let wrong = Command::new(bin)
        .args(["echo", &addr, "--tls-ca", &pki.s("other-ca.pem")])
        .args(client)
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("TLS: handshake with") && text(&wrong).contains("UnknownIssuer"),
        "{}",
        text(&wrong)
    );
    // No client certificate: the node refuses it.
    let anonymous = Command::new(bin)
        .args(["echo", &addr, "--tls-ca", &pki.s("ca.pem")])
        .output()
        .unwrap();
    assert!(!anonymous.status.success(), "{}", text(&anonymous));
}

/// Our requestor's TLS configuration trusting `ca`, with the test client certificate.
fn client_tls(pki: &Pki, ca: &str) -> std::sync::Arc<rustls::ClientConfig> {
    dicomgate::net::tls::client_config(
        ["ca", "cert", "key"],
        &pki.path(ca),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    )
    .unwrap()
}

/// A TLS connection is counted like a plain one: `max_connections` (shared by both listeners)
/// closes the connection past it at once, `max_associations` rejects an association over TLS
/// with A-ASSOCIATE-RJ (2, 3, 2); once they are gone, the node serves again.
#[test]
fn tls_connections_obey_the_connection_and_association_limits() {
    use dicomgate::net::scu::{Client, ScuError};
    use std::io::Read;
    let pki = Pki::new();
    let node = Node::start(&format!(
        "[limits]\nmax_connections = 3\nmax_associations = 1\n{}",
        pki.tls_toml(true)
    ));
    let tls = node.tls_addr.unwrap();
    let closed_at_once = |addr: std::net::SocketAddr| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let t0 = std::time::Instant::now();
        let n = s.read(&mut [0u8; 8]);
        matches!(n, Ok(0))
            || matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
                && t0.elapsed() < std::time::Duration::from_secs(3)
    };
    let opts = dicomgate::net::scu::ScuOptions {
        tls: Some(client_tls(&pki, "ca.pem")),
        ..scu_options("TLSLIMIT")
    };
    let proposal = dicomgate::net::scu::Proposal {
        abstract_syntax: dicomgate::dicom::sop_class::VERIFICATION.into(),
        transfer_syntaxes: vec![dicomgate::dicom::transfer_syntax::IMPLICIT_VR_LITTLE_ENDIAN.into()],
    };
    let mut first = Client::open(&tls.to_string(), &opts, std::slice::from_ref(&proposal)).unwrap();
    assert_eq!(first.echo().unwrap(), 0);
    match Client::open(&tls.to_string(), &opts, std::slice::from_ref(&proposal)) {
        Err(ScuError::Rejected(rj)) => assert_eq!((rj.result.0, rj.source.0, rj.reason), (2, 3, 2)),
        other => panic!("second association over TLS not rejected: {other:?}"),
    }
    // The rejected association's connection is counted until the node has seen it close.
    assert!(
        wait_until(5, || node.log().contains("local limit exceeded")),
        "{}",
        node.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(200)); // the count follows the log line
                                                               // Two silent TLS connections beside the association: three, the limit.
    let silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(tls).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(closed_at_once(tls), "a fourth TLS connection was kept");
    assert!(
        closed_at_once(node.addr),
        "a fourth (plain) connection was kept"
    );
    assert!(
        node.log().contains("max_connections reached"),
        "{}",
        node.log()
    );
    drop(silent);
    first.release().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut again = Client::open(&tls.to_string(), &opts, &[proposal]).unwrap();
    assert_eq!(again.echo().unwrap(), 0);
    again.release().unwrap();
}

/// Hostile bytes on the TLS port: a record header declaring 64 KiB (more than TLS allows) is
/// refused from the header; garbage records after a completed handshake get an alert; each is
/// logged once, and the node serves on.
#[test]
fn garbage_before_and_after_the_handshake_is_an_alert_not_a_crash() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let mut node = Node::start(&pki.tls_toml(false));
    let tls = node.tls_addr.unwrap();
    // Before: a handshake record of 65535 bytes, then silence. rustls refuses the header.
    let mut s = std::net::TcpStream::connect(tls).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0xFF, 0xFF, 0x01, 0x00])
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.first() == Some(&0x15),
        "expected an alert record, got {got:02X?}"
    );
    assert!(
        wait_until(5, || node.log().contains("TLS handshake failed")),
        "{}",
        node.log()
    );
    // After: a real handshake (rustls client), then a record that does not decrypt.
    let conn = rustls::ClientConnection::new(
        client_tls(&pki, "ca.pem"),
        rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let sock = std::net::TcpStream::connect(tls).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    let mut bogus = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    bogus.extend((0..0x40u8).map(|i| i.wrapping_mul(37)));
    stream.sock.write_all(&bogus).unwrap();
    let mut buf = [0u8; 64];
    let r = stream.read(&mut buf);
    assert!(r.is_err() || matches!(r, Ok(0)), "{r:?}");
    assert!(
        wait_until(5, || node.log().contains("TLS error: closing")),
        "{}",
        node.log()
    );
    assert_eq!(
        node.log().matches("TLS error: closing").count(),
        1,
        "{}",
        node.log()
    );
    assert!(node.is_running());
    let ok = dcmtk_tls(
        "echoscu",
        &pki,
        &node,
        Some(("client.key", "client.pem")),
        &[],
    );
    assert!(ok.status.success(), "{}\n{}", text(&ok), node.log());
}

/// SIGHUP reads the certificate and key files again: new connections get the new certificate
/// (here one signed by the other CA); a bad file at reload keeps the old ones, with a warning.
#[test]
fn sighup_reloads_the_certificate() {
    let pki = Pki::new();
    let live = |n: &str| pki.path(&format!("live-{n}"));
    std::fs::copy(pki.path("server.pem"), live("cert")).unwrap();
    std::fs::copy(pki.path("server.key"), live("key")).unwrap();
    let node = Node::start(&format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncertificate = {:?}\nprivate_key = {:?}\n",
        live("cert").display().to_string(),
        live("key").display().to_string()
    ));
    let echo = |ca: &str| {
        dcmtk("echoscu")
            .args([
                "+tla",
                "+cf",
                &pki.s(ca),
                "-aec",
                "DICOMGATE",
                "127.0.0.1",
                &tls_port(&node),
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(echo("ca.pem") && !echo("other-ca.pem"));
    std::fs::copy(pki.path("other-server.pem"), live("cert")).unwrap();
    std::fs::copy(pki.path("other-server.key"), live("key")).unwrap();
    node.signal(rustix::process::Signal::HUP);
    assert!(
        wait_until(5, || node
            .log()
            .contains("TLS certificate, key and CA reloaded")),
        "{}",
        node.log()
    );
    assert!(echo("other-ca.pem") && !echo("ca.pem"), "{}", node.log());
    // A key that does not match: refused, the certificate in use stays.
    std::fs::copy(pki.path("client.key"), live("key")).unwrap();
    node.signal(rustix::process::Signal::HUP);
    assert!(
        wait_until(5, || node.log().contains("TLS files not reloaded")),
        "{}",
        node.log()
    );
    assert!(
        node.log().contains("does not go with tls.certificate"),
        "{}",
        node.log()
    );
    assert!(echo("other-ca.pem"), "{}", node.log());
}

/// Memory: 200 idle associations over TLS (handshake done, A-ASSOCIATE accepted, a C-ECHO
/// each) grow the node by a bounded amount each (printed with --nocapture); tests/flood.rs
/// measures plain ones (17.5 KiB each).
#[test]
fn idle_tls_associations_cost_bounded_memory() {
    use dicomgate::net::scu::Client;
    let pki = Pki::new();
    // 200 from one address: above the per-address default (32).
    let node = Node::start(&format!(
        "{}[limits]\nmax_associations_per_address = 256\n",
        pki.tls_toml(false)
    ));
    let tls = node.tls_addr.unwrap().to_string();
    let proposal = dicomgate::net::scu::Proposal {
        abstract_syntax: dicomgate::dicom::sop_class::VERIFICATION.into(),
        transfer_syntaxes: vec![dicomgate::dicom::transfer_syntax::IMPLICIT_VR_LITTLE_ENDIAN.into()],
    };
    let config = client_tls(&pki, "ca.pem");
    // Warm up (first allocations of each reactor), then measure.
    let opts = |i: usize| dicomgate::net::scu::ScuOptions {
        tls: Some(config.clone()),
        ..scu_options(&format!("MEM{}", i % 8))
    };
    let mut warm = Client::open(&tls, &opts(0), std::slice::from_ref(&proposal)).unwrap();
    assert_eq!(warm.echo().unwrap(), 0);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = node.rss_kib();
    let n = 200;
    let mut clients: Vec<_> = (0..n)
        .map(|i| Client::open(&tls, &opts(i), std::slice::from_ref(&proposal)).unwrap())
        .collect();
    for c in &mut clients {
        assert_eq!(c.echo().unwrap(), 0);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = node.rss_kib();
    let each = (after.saturating_sub(before)) as f64 / n as f64;
    println!("{n} idle TLS associations: RSS {before} KiB -> {after} KiB, {each:.1} KiB each");
    assert!(each < 64.0, "{each:.1} KiB per idle TLS association");
    for c in clients {
        c.release().unwrap();
    }
    warm.release().unwrap();
}

/// TLS only: `[node] listen = ""` binds no plain listener (the node says so) and serves DICOM
/// over TLS; with no `[tls] listen` either, start-up is refused, naming both.
#[test]
fn tls_only_with_an_empty_plain_listen() {
    use std::io::BufRead;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let data = dir.path().join("data").display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"\"\ndata_dir = {data:?}\nreactors = 1\n[http]\nlisten = \"\"\n{}",
            pki.tls_toml(false)
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_dicomgate"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("tls listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    let echo = dcmtk("echoscu")
        .args([
            "+tla",
            "+cf",
            &pki.s("ca.pem"),
            "-aec",
            "DICOMGATE",
            "127.0.0.1",
            &port,
        ])
        .output()
        .unwrap();
    let node_log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert!(echo.status.success(), "{}\n{node_log}", text(&echo));
    assert!(
        node_log.contains("listen=none (TLS only)")
            || node_log.contains("listen=\"none (TLS only)\""),
        "{node_log}"
    );
    let _ = child.kill();
    let e = match dicomgate::config::Config::from_toml("[node]\nlisten = \"\"\n") {
        Err(e) => e.0,
        Ok(_) => panic!("no listener at all was accepted"),
    };
    assert!(
        e.contains("node.listen") && e.contains("[tls] listen"),
        "{e}"
    );
    let e = match dicomgate::config::Config::from_toml("[node]\nlisten = \"11112\"\n") {
        Err(e) => e.0,
        Ok(_) => panic!("a port without an address was accepted"),
    };
    assert!(e.contains("listen") && e.contains("IP:PORT"), "{e}");
}

/// pynetdicom with an `ssl.SSLContext` (Python's ssl module): with `client_ca`, a client
/// certificate signed by it echoes and stores (data sets as sent); without one, no association.
#[test]
fn pynetdicom_over_tls_with_and_without_a_client_certificate() {
    let pki = Pki::new();
    let node = Node::start(&pki.tls_toml(true));
    let work = tempfile::tempdir().unwrap();
    let sop = "1.2.826.0.1.3680043.2.1143.9.1";
    let ds = dataset("PYPAT", "1.2.3.10", "1.2.3.10.1", sop, 70_000);
    let f = write_part10(work.path(), &ds, sop);
    let port = tls_port(&node);
    let (ca, cert, key) = (pki.s("ca.pem"), pki.s("client.pem"), pki.s("client.key"));
    let f = f.display().to_string();
    let out = run_py("tls_send.py", &[&port, &ca, &cert, &key, &f]);
    assert!(out.contains("ECHO 0"), "{out}\n{}", node.log());
    assert!(out.contains(&format!("0 {f}")), "{out}\n{}", node.log());
    let stored = stored_instance(&node, sop).expect("stored");
    assert!(data_set_of(&stored) == ds, "stored data set differs");
    let out = run_py("tls_send.py", &[&port, &ca, "-", "-", &f]);
    assert!(out.trim() == "ABORTED", "{out}\n{}", node.log());
    assert!(
        wait_until(5, || node.log().contains("peer sent no certificates")),
        "{}",
        node.log()
    );
}

/// A server certificate that has expired is refused by our own requestor (and by DCMTK), before
/// any DICOM is sent; the node logs the client's alert once each.
#[test]
fn an_expired_server_certificate_is_refused_by_our_requestor() {
    let pki = Pki::new();
    let node = Node::start(&format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncertificate = {:?}\nprivate_key = {:?}\n",
        pki.s("expired-server.pem"),
        pki.s("expired-server.key")
    ));
    let addr = node.tls_addr.unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["echo", &addr, "--tls-ca", &pki.s("ca.pem")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("TLS: handshake with") && text(&out).contains("Expired"),
        "{}",
        text(&out)
    );
    let dcmtk = dcmtk_tls("echoscu", &pki, &node, None, &[]);
    assert!(
        !dcmtk.status.success(),
        "DCMTK accepted an expired certificate"
    );
    assert!(
        wait_until(5, || node.log().matches("TLS handshake failed").count()
            >= 2),
        "{}",
        node.log()
    );
    assert!(
        !node.log().contains("calling_ae=\"ECHOSCU\""),
        "{}",
        node.log()
    );
}
