//! Issue 12 item 7: every example configuration in `examples/` is accepted by the node's own
//! start-up validation (`serve --print-config`), and the node really starts on each (with its
//! listen address, HTTP endpoint and data directory overridden for the test; the TLS one with
//! certificates made by `openssl`) and listens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

/// `serve --config FILE` with the test's own addresses and data directory; the lines it
/// printed on stdout once listening (then it is stopped with SIGTERM and must exit 0).
fn start_and_stop(config: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let tls = std::fs::read_to_string(config)
        .unwrap()
        .contains("\n[tls]\n");
    for _ in 0..(1 + usize::from(tls)) {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        lines.push(line.trim().to_string());
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let st = child.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("listening on ")),
        "{}: {lines:?}\n{err}",
        config.display()
    );
    assert!(st.success(), "{}: {st}\n{err}", config.display());
    lines
}

/// Every example is refused by nothing the start-up checks in the file itself.
#[test]
fn every_example_config_passes_validation() {
    let all = examples();
    let names: Vec<String> = all
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "router.toml",
        "ct-processing.toml",
        "export-to-pacs.toml",
        "tls.toml",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for p in &all {
        let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
            .args(["serve", "--print-config", "--config"])
            .arg(p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The node starts on each example that names no file outside itself, and listens.
#[test]
fn the_node_starts_on_each_example() {
    for p in examples() {
        let text = std::fs::read_to_string(&p).unwrap();
        if text.contains("\n[tls]\n") {
            continue; // its certificate files: the next test
        }
        start_and_stop(&p);
    }
}

/// The TLS example, its `/etc/dicomgate/` files replaced by certificates `openssl` makes (as
/// README's "TLS" section shows): the node listens on both listeners.
#[test]
fn the_node_starts_on_the_tls_example_with_real_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (Debian's openssl package)");
        assert!(st.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=dicomgate",
    ]);
    std::fs::write(
        d.join("node.ext"),
        "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "node.ext",
        "-out",
        "node.pem",
    ]);
    std::fs::copy(d.join("ca.pem"), d.join("clients-ca.pem")).unwrap();
    std::fs::copy(d.join("ca.pem"), d.join("pacs-ca.pem")).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tls.toml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("/etc/dicomgate/", &format!("{}/", d.display()))
        .replace("0.0.0.0:2762", "127.0.0.1:0")
        // The example's PACS is a placeholder name (RFC 2606 `.example`), which the start-up
        // check refuses as a name that does not exist.
        .replace("pacs.example:", "localhost:");
    let cfg = d.join("tls.toml");
    std::fs::write(&cfg, text).unwrap();
    let lines = start_and_stop(&cfg);
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.starts_with("tls listening on ")),
        "{lines:?}"
    );
}
