//! Shared helpers for integration tests: start the real node binary, find the real peers, build
//! small data sets. Peers are real programs (DCMTK, pynetdicom); a missing one fails the test with
//! an install hint rather than skipping it (`bash .ci/run` installs them).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Node {
    pub addr: SocketAddr,
    /// The TLS listener's address, when the config has `[tls] listen`.
    pub tls_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

fn spawn(
    cfg: &Path,
    log: &Path,
    listen: Option<SocketAddr>,
) -> (Child, SocketAddr, Option<SocketAddr>) {
    let tls = std::fs::read_to_string(cfg)
        .unwrap()
        .contains("\n[tls]\nlisten");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dicomgate"));
    cmd.args(["serve", "--config"]).arg(cfg);
    // `KEY=VALUE` lines of `node.env` beside the config, if a test wrote one (a debug build's
    // fault-injection switch for this node only: see `Node::restart_with_env`).
    if let Ok(text) = std::fs::read_to_string(cfg.with_file_name("node.env")) {
        for (k, v) in text.lines().filter_map(|l| l.split_once('=')) {
            cmd.env(k, v);
        }
    }
    if let Some(a) = listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    let mut child = cmd
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    let parse = |line: &str, prefix: &str| -> SocketAddr {
        line.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("node did not start: {line:?}"))
            .parse()
            .unwrap()
    };
    if line.starts_with("tls listening on ") {
        // TLS only ([node] listen = ""): `addr` is the TLS listener's too.
        let a = parse(&line, "tls listening on ");
        return (child, a, Some(a));
    }
    let addr = parse(&line, "listening on ");
    let tls_addr = tls.then(|| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        parse(&line, "tls listening on ")
    });
    (child, addr, tls_addr)
}

impl Node {
    /// Starts `dicomgate serve` on an ephemeral loopback port with AE title DICOMGATE and the
    /// given extra TOML (sections other than [node]).
    pub fn start(extra_toml: &str) -> Node {
        Self::start_with_node("", extra_toml)
    }

    /// Without a `[trigger]` section in `extra_toml`, the node runs as a plain store (no
    /// trigger fires, so nothing leaves `patients/`): the receiver tests read what was stored.
    pub fn start_with_node(node_toml: &str, extra_toml: &str) -> Node {
        Self::start_in(None, node_toml, extra_toml)
    }

    /// [`Node::start`] with the data directory at `data_dir` (a test's own mount, say).
    pub fn start_with_data_dir(data_dir: &Path, extra_toml: &str) -> Node {
        Self::start_in(Some(data_dir), "", extra_toml)
    }

    /// As [`Node::start_with_data_dir`], with `node_toml` added to `[node]`.
    pub fn start_with_data_dir_and_node(
        data_dir: &Path,
        node_toml: &str,
        extra_toml: &str,
    ) -> Node {
        Self::start_in(Some(data_dir), node_toml, extra_toml)
    }

    fn start_in(data_dir: Option<&Path>, node_toml: &str, extra_toml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let cfg = dir.path().join("dicomgate.toml");
        // No HTTP endpoint unless a test asks (tests run in parallel: one port each).
        let http = if extra_toml.contains("[http]") {
            ""
        } else {
            "[http]\nlisten = \"\"\n"
        };
        let trigger = if extra_toml.contains("[trigger]") {
            ""
        } else {
            "[trigger]\non_association_close = false\nquiet_seconds = 0\n"
        };
        std::fs::write(
            &cfg,
            format!(
                "[node]\nae_title = \"DICOMGATE\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nreactors = 2\n{node_toml}\n{http}{trigger}{extra_toml}\n",
                data_dir.display().to_string()
            ),
        )
        .unwrap();
        let (child, addr, tls_addr) = spawn(&cfg, &dir.path().join("node.log"), None);
        Node {
            addr,
            tls_addr,
            data_dir,
            child,
            _dir: dir,
        }
    }

    /// Sends `sig` to the node (SIGTERM: a graceful stop).
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits up to `secs` for the node to exit; its exit status, or `None` if it is still
    /// running.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if std::time::Instant::now() >= end {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The node's config file.
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("dicomgate.toml")
    }

    /// SIGKILL, no shutdown: what a crash or power loss leaves behind.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again on the same config, data directory and port.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, addr, tls_addr) = spawn(
            &self._dir.path().join("dicomgate.toml"),
            &self._dir.path().join("node.log"),
            Some(self.addr),
        );
        self.child = child;
        self.addr = addr;
        self.tls_addr = tls_addr;
    }

    /// Starts the node again (as [`Node::restart`]) with `vars` in its environment, and in that
    /// of its later restarts.
    pub fn restart_with_env(&mut self, vars: &[(&str, &str)]) {
        let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(self._dir.path().join("node.env"), text).unwrap();
        self.restart();
    }

    /// The directory holding the config and log (for test-side files such as a processing log).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("node.log")).unwrap_or_default()
    }

    /// The node's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the node process, from /proc (KiB).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The node's process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Every stored (pending) instance as a Part-10 file: its own file under `patients/`, or a
    /// copy of its segment log record made by `storage::inventory::extract` (the node's
    /// `dicomgate extract`) under this test's directory, with the same file name.
    pub fn stored(&self) -> Vec<PathBuf> {
        let (entries, _) = dicomgate::storage::inventory::pending_except(
            &self.data_dir,
            &dicomgate::pipeline::held_records(&self.data_dir).unwrap(),
        )
        .unwrap();
        let out = self._dir.path().join("extracted");
        entries
            .iter()
            .filter_map(|e| match &e.source {
                dicomgate::storage::inventory::Source::File(f) => Some(f.clone()),
                dicomgate::storage::inventory::Source::Log(_) => {
                    // The record may be released (claimed) meanwhile: then it is not pending.
                    dicomgate::storage::inventory::extract(&self.data_dir, e, &out).ok()
                }
            })
            .collect()
    }

    /// Every file under the data directory, temporary ones included.
    pub fn all_files(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// DCMTK's tool, by full path (pynetdicom installs commands with the same names).
pub fn dcmtk(tool: &str) -> Command {
    let path = format!("/usr/bin/{tool}");
    assert!(
        Path::new(&path).exists(),
        "{path} missing: install Debian's dcmtk (bash .ci/run does)"
    );
    let mut c = Command::new(path);
    // Debian's DCMTK keeps Nagle's algorithm on unless told otherwise.
    c.env("TCP_NODELAY", "1");
    c
}

pub fn python() -> Command {
    let mut c = Command::new("python3");
    c.env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// pydicom's bundled test files.
pub fn pydicom_test_files() -> PathBuf {
    let out = python()
        .args([
            "-c",
            "import os, pydicom; print(os.path.join(os.path.dirname(pydicom.__file__), 'data', 'test_files'))",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pydicom missing: pip install pynetdicom (bash .ci/run does)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs a Python helper and returns its stdout; fails the test on a non-zero exit.
pub fn run_py(script: &str, args: &[&str]) -> String {
    let out = python().arg(py_script(script)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The stored file of a SOP Instance UID, if any.
pub fn stored_instance(node: &Node, sop_instance_uid: &str) -> Option<PathBuf> {
    node.stored()
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy() == format!("{sop_instance_uid}.dcm"))
}

/// One explicit VR little endian element, by the crate's one element writer.
pub fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
    use dicomgate::dicom::{element, transfer_syntax::DatasetEncoding, vr::Vr};
    let tag = u32::from(g) << 16 | u32::from(e);
    element::put(
        out,
        DatasetEncoding::ExplicitVrLittleEndian,
        tag,
        Vr(*vr),
        v,
    )
}

pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// A small explicit VR little endian CT data set.
pub fn dataset(patient: &str, study: &str, series: &str, sop: &str, pixels: usize) -> Vec<u8> {
    let mut d = Vec::new();
    el(&mut d, 0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.as_bytes());
    el(&mut d, 0x0008, 0x0018, b"UI", sop.as_bytes());
    el(&mut d, 0x0008, 0x0060, b"CS", b"CT");
    el(&mut d, 0x0010, 0x0010, b"PN", b"Test^Patient");
    el(&mut d, 0x0010, 0x0020, b"LO", patient.as_bytes());
    el(&mut d, 0x0020, 0x000D, b"UI", study.as_bytes());
    el(&mut d, 0x0020, 0x000E, b"UI", series.as_bytes());
    el(&mut d, 0x0020, 0x0013, b"IS", b"1");
    let px: Vec<u8> = (0..pixels).map(|i| (i * 7 % 251) as u8).collect();
    el(&mut d, 0x7FE0, 0x0010, b"OW", &px);
    d
}

/// Requestor options calling our node (AE DICOMGATE) as `calling`.
pub fn scu_options(calling: &str) -> dicomgate::net::scu::ScuOptions {
    dicomgate::net::scu::ScuOptions {
        called_ae: "DICOMGATE".into(),
        calling_ae: calling.into(),
        ..Default::default()
    }
}

/// A CT Image Storage presentation context in one transfer syntax.
pub fn ct_proposal_in(ts: &str) -> dicomgate::net::scu::Proposal {
    dicomgate::net::scu::Proposal {
        abstract_syntax: CT_IMAGE_STORAGE.into(),
        transfer_syntaxes: vec![ts.into()],
    }
}

/// DCMTK's storescu stores pydicom's CT_small.dcm on the node: a normal sender is served.
/// DCMTK storescu sends `files` to `node` in one association (called AE DICOMGATE); its exit
/// status.
pub fn storescu_status(node: &Node, files: &[PathBuf]) -> std::process::ExitStatus {
    dcmtk("storescu")
        .args(["-aec", "DICOMGATE", "127.0.0.1", &node.port()])
        .args(files)
        .status()
        .unwrap()
}

pub fn storescu_still_stores(node: &Node) {
    let out = dcmtk("storescu")
        .args(["-aec", "DICOMGATE", "127.0.0.1", &node.port()])
        .arg(pydicom_test_files().join("CT_small.dcm"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
}

/// Writes a small explicit VR little endian CT Part-10 file; returns its path.
pub fn write_instance(
    dir: &Path,
    patient: &str,
    study: &str,
    series: &str,
    sop: &str,
    number: u32,
) -> PathBuf {
    let mut d = dataset(patient, study, series, sop, 64);
    // Replace the fixed Instance Number by `number` (rebuild: elements must stay sorted).
    d.clear();
    el(&mut d, 0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.as_bytes());
    el(&mut d, 0x0008, 0x0018, b"UI", sop.as_bytes());
    el(&mut d, 0x0008, 0x0020, b"DA", b"20260101");
    el(&mut d, 0x0008, 0x0060, b"CS", b"CT");
    el(&mut d, 0x0010, 0x0010, b"PN", b"Test^Patient");
    el(&mut d, 0x0010, 0x0020, b"LO", patient.as_bytes());
    el(&mut d, 0x0020, 0x000D, b"UI", study.as_bytes());
    el(&mut d, 0x0020, 0x000E, b"UI", series.as_bytes());
    el(&mut d, 0x0020, 0x0013, b"IS", number.to_string().as_bytes());
    let px: Vec<u8> = (0..64).map(|i| (i * 7 % 251) as u8).collect();
    el(&mut d, 0x7FE0, 0x0010, b"OW", &px);
    let meta = dicomgate::storage::FileMeta {
        sop_class_uid: CT_IMAGE_STORAGE.into(),
        sop_instance_uid: sop.into(),
        transfer_syntax_uid: EXPLICIT_LE.into(),
        source_ae_title: String::new(),
        ..Default::default()
    };
    let mut f = dicomgate::dicom::part10::header(&meta);
    f.extend_from_slice(&d);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{sop}.dcm"));
    std::fs::write(&path, f).unwrap();
    path
}

/// The data set bytes of a Part-10 file.
pub fn data_set_of(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let p = dicomgate::dicom::part10::parse(&b).unwrap();
    b[p.data_set_offset..].to_vec()
}

/// The SOP Instance UID in a Part-10 file's meta.
pub fn sop_uid_of(path: &Path) -> String {
    let b = std::fs::read(path).unwrap();
    dicomgate::dicom::part10::parse(&b)
        .unwrap()
        .sop_instance_uid
}

/// The HTTP address the node logged ("http serving ... listen=ADDR").
pub fn http_addr(node: &Node) -> String {
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.contains("http serving"))
        .unwrap_or_else(|| panic!("no http line\n{log}"));
    line.rsplit("listen=")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `GET path` over HTTP/1.0: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Polls `cond` every 100 ms until it holds or `secs` pass; returns whether it held.
/// `dicomgate serve --config cfg`, which must refuse to start: its stderr.
pub fn refused_at_start_up(cfg: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cond()
}

/// A TCP port nothing listens on right now.
/// A free loopback port for a peer a test starts (often later: a downstream that comes up
/// late). It is taken below the kernel's ephemeral range (ip_local_port_range, read here; 32768
/// and up by default), from which the node's own `127.0.0.1:0` listener and every client socket
/// draw: a port from the ephemeral range, free when probed, could be given to the node under
/// test meanwhile, which then exported to itself (a flake seen in
/// router_export_reads_the_segment_log_and_survives_a_kill). Spread by process id and a counter
/// so that concurrent tests do not probe the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_start.clamp(10_001, 65_535));
    let span = high - low;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// DCMTK storescp receiving into `dir` on `port` as `ae`, verbose (one "Association Received"
/// line per association in `dir/../storescp-<port>.log`).
pub fn storescp(dir: &Path, port: u16, ae: &str) -> KillOnDrop {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    dcmtk("storescp")
        .args(["-v", "-aet", ae, "-od"])
        .arg(dir)
        .arg(port.to_string())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(KillOnDrop)
        .unwrap()
}

/// A child process killed when the test ends, whether it passed or panicked.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()
    }
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rewrites a byte stream of PDUs so that each run of consecutive P-DATA-TF PDUs becomes as few
/// PDUs as fit in `max_pdu` (their PDV items concatenated, in order): what a requestor that packs
/// several messages into one PDU sends. Other PDUs and a trailing partial PDU pass unchanged.
pub fn coalesce_pdata(bytes: &[u8], max_pdu: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut body: Vec<u8> = Vec::new();
    let flush = |out: &mut Vec<u8>, body: &mut Vec<u8>| {
        if !body.is_empty() {
            out.extend_from_slice(&[0x04, 0]);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.append(body);
        }
    };
    let mut pos = 0;
    while pos + 6 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos + 2..pos + 6].try_into().unwrap()) as usize;
        if pos + 6 + len > bytes.len() {
            break;
        }
        let pdu = &bytes[pos..pos + 6 + len];
        if pdu[0] == 0x04 {
            if body.len() + len > max_pdu as usize {
                flush(&mut out, &mut body);
            }
            body.extend_from_slice(&pdu[6..]);
        } else {
            flush(&mut out, &mut body);
            out.extend_from_slice(pdu);
        }
        pos += 6 + len;
    }
    flush(&mut out, &mut body);
    out.extend_from_slice(&bytes[pos..]);
    out
}

/// The DOM Debian's chromium builds from `url`, headless, as `--dump-dom` prints it.
pub fn chromium_dom(url: &str) -> String {
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.exists(),
        "/usr/bin/chromium missing: install Debian's chromium (apt-get install -y chromium; \
         bash .ci/run does) — pages are checked in a real browser"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}\n{dom}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// A test PKI made by `openssl`: CAs `ca` and `other-ca`; certificates `server`, `client`
/// (signed by `ca`; the server's names 127.0.0.1 and localhost), `other-client`,
/// `other-server` (signed by `other-ca`) and `expired-server`; each `<name>.pem` with its
/// `<name>.key`.
pub struct Pki {
    dir: tempfile::TempDir,
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("/usr/bin/openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("/usr/bin/openssl missing: apt-get install openssl (bash .ci/run does)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            d.join("client.ext"),
            "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\n\
             extendedKeyUsage = clientAuth\n",
        )
        .unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=dicomgate test {ca}"),
                ],
            );
        }
        // (name, signing CA, extensions, validity in days: -1 = expired yesterday)
        for (name, ca, ext, days) in [
            ("server", "ca", "server.ext", "2"),
            ("client", "ca", "client.ext", "2"),
            ("other-client", "other-ca", "client.ext", "2"),
            ("other-server", "other-ca", "server.ext", "2"),
            ("expired-server", "ca", "server.ext", "-1"),
        ] {
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    days,
                    "-extfile",
                    ext,
                ],
            );
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// The `[tls]` section for the node, with `client_ca` when asked.
    pub fn tls_toml(&self, client_ca: bool) -> String {
        let mut t = format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ncertificate = {:?}\nprivate_key = {:?}\n",
            self.s("server.pem"),
            self.s("server.key")
        );
        if client_ca {
            t += &format!("client_ca = {:?}\n", self.s("ca.pem"));
        }
        t
    }
}
