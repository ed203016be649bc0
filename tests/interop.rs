//! The interoperability matrix (issue 16): one corpus of pydicom's test files, one file per kind
//! of encoding (`tests/py/interop_corpus.py`), sent into the node by every Storage SCU we can
//! run, and exported by the node to every Storage SCP we can run; C-ECHO both ways with each.
//! Each received file is compared with what was sent (`tests/py/interop_check.py`): "exact"
//! (the same data set bytes in the same transfer syntax), or what changed, element by element.
//!
//! What a peer changes is written below as an explicit expectation with the reason, so that a
//! new peer version that behaves differently shows up as a failing cell with its verdict, not as
//! a mystery. The node itself never changes a data set: every cell whose sender or receiver is
//! pynetdicom (which sends and writes the bytes it has) is "exact".
//!
//! Each test prints its half of the matrix as a Markdown table (README's table is made from
//! them: `cargo test --test interop -- --nocapture`) and writes it to
//! `target/tmp/interop-{into,from}.md`. A peer that is not installed is a skipped row with the
//! reason; `.ci/run` installs every one of them (dicom-rs's tools with `cargo install`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The corpus's kinds, in the order of `interop_corpus.py`.
const KINDS: [&str; 10] = [
    "explicit-le",
    "implicit-le",
    "deflated",
    "big-endian",
    "rle",
    "jpeg-baseline",
    "jpeg-ls",
    "jpeg-2000",
    "rt-plan",
    "sr",
];

const DROPS_PADDING: &str = "(FFFC,FFFC) dropped";
const OB_FIX: &str = "(7FE0,0010) VR OW->OB";
const OB_FIX_AND_PADDING: &str = "(7FE0,0010) VR OW->OB; (FFFC,FFFC) dropped";
const AS_EXPLICIT: &str = "as 1.2.840.10008.1.2.1";
const NOT_INSTALLED: &str = "not installed (cargo install --locked dicom-echoscu; .ci/run does)";
/// A kind the receiver does not accept, so it is left out of what it is sent.
const NOT_ACCEPTED: &str = "not accepted";

/// What each peer is expected to do to each kind (every other cell: "exact").
fn expected(peer: &str, kind: &str) -> &'static str {
    match (peer, kind) {
        // DCMTK (storescu, dcmsend, storescp, and Orthanc as a sender, which uses DCMTK's
        // network code) re-encodes every data set it reads from a file: it drops Data Set
        // Trailing Padding (PS3.10 7.2 lets anyone), and writes the encapsulated Pixel Data of
        // pydicom's JPEG-LS and JPEG 2000 files, which say OW, as OB (PS3.5 A.4 requires OB).
        ("storescu" | "dcmsend" | "storescp" | "orthanc", "explicit-le") => DROPS_PADDING,
        ("storescu" | "dcmsend" | "storescp" | "orthanc", "jpeg-ls" | "jpeg-2000") => {
            OB_FIX_AND_PADDING
        }
        // dcmsend proposes every uncompressed transfer syntax beside the file's own and
        // converts to the one accepted; the node's preference (explicit VR little endian) picks
        // among uncompressed ones, so implicit VR and big endian files arrive transcoded (values
        // equal; big endian pixel data byte-swapped). storescu does the same to big endian only
        // (it proposes implicit VR little endian in a context of its own).
        ("dcmsend", "implicit-le" | "big-endian" | "rt-plan") => AS_EXPLICIT,
        ("storescu", "big-endian") => AS_EXPLICIT,
        // GDCM fixes the same VR, keeps the padding, and deflates again (same elements,
        // other compressed bytes).
        ("gdcmscu", "jpeg-ls" | "jpeg-2000") => OB_FIX,
        ("gdcmscu", "deflated") => "re-encoded",
        // Orthanc as a receiver keeps the padding but inflates and deflates again, and fixes
        // the VR.
        ("orthanc (SCP)", "deflated") => "re-encoded",
        ("orthanc (SCP)", "jpeg-ls" | "jpeg-2000") => OB_FIX,
        // dicom-rs parses and writes again every data set it sends or stores: values equal,
        // bytes not (explicit lengths where the file had undefined ones, and the reverse), the
        // same VR fix; implicit VR, big endian and RLE files come through as they were.
        ("dicom-storescu" | "dicom-storescp", "jpeg-ls" | "jpeg-2000") => OB_FIX,
        (
            "dicom-storescu" | "dicom-storescp",
            "explicit-le" | "jpeg-baseline" | "rt-plan" | "sr",
        ) => "re-encoded",
        ("dicom-storescu", "deflated") => "re-encoded",
        // dicom-storescp 0.10 accepts no deflated syntax (the node's export of a batch with one
        // fails: "no accepted presentation context"), so that file is not sent to it.
        ("dicom-storescp", "deflated") => NOT_ACCEPTED,
        _ => "exact",
    }
}

/// One row of the matrix: a peer, its version, and a verdict per kind (or why it was skipped).
struct Row {
    peer: &'static str,
    version: String,
    cells: Result<BTreeMap<String, String>, String>,
    echo: Result<(), String>,
}

fn corpus(dir: &Path) -> Vec<PathBuf> {
    let out = run_py("interop_corpus.py", &[dir.to_str().unwrap()]);
    let files: Vec<PathBuf> = out
        .lines()
        .map(|l| PathBuf::from(l.split_whitespace().nth(3).unwrap()))
        .collect();
    assert_eq!(files.len(), KINDS.len(), "{out}");
    files
}

fn file_of<'a>(files: &'a [PathBuf], kind: &str) -> &'a PathBuf {
    files
        .iter()
        .find(|f| f.to_string_lossy().ends_with(&format!("-{kind}.dcm")))
        .unwrap()
}

/// The verdict per kind for what arrived under `received`.
fn check(corpus_dir: &Path, received: &[&Path]) -> BTreeMap<String, String> {
    let mut args = vec![corpus_dir.to_str().unwrap()];
    args.extend(received.iter().map(|p| p.to_str().unwrap()));
    run_py("interop_check.py", &args)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The verdict per kind for what `node` stored (its pending instances, as Part-10 files).
fn check_stored(node: &Node, corpus_dir: &Path) -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap();
    for f in node.stored() {
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    check(corpus_dir, &[dir.path()])
}

/// Starts a Storage SCP (`cmd`, its output to null) and waits until it listens on `port`.
fn start_scp(mut cmd: Command, port: u16) -> KillOnDrop {
    let scp = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    wait_until(20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    scp
}

fn run(cmd: &mut Command) -> Result<std::process::Output, String> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn ok(out: std::process::Output) -> Result<(), String> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", out.status, text(&out)))
    }
}

/// The first line a `--version` prints, without RCS keywords (`$dcmtk: storescu v3.6.7 $`).
fn first_line(cmd: &mut Command) -> String {
    let line = cmd
        .output()
        .map(|o| text(&o).lines().next().unwrap_or("").to_string())
        .unwrap_or_else(|e| format!("? ({e})"));
    line.replace("$Date$", "")
        .replace('$', "")
        .replace("dcmtk: ", "")
        .trim()
        .to_string()
}

fn dicom_rs(tool: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let p = home.join(".cargo/bin").join(tool);
    p.exists().then_some(p)
}

/// An Orthanc process (Debian's `orthanc`) in its own folder, REST on loopback.
struct Orthanc {
    _child: KillOnDrop,
    http: u16,
    dicom: u16,
}

impl Orthanc {
    /// `modality`: the node as Orthanc's modality "dicomgate" (for C-STORE / C-ECHO SCU).
    fn start(dir: &Path, aet: &str, modality: Option<u16>) -> Result<Orthanc, String> {
        if !Path::new("/usr/sbin/Orthanc").exists() {
            return Err("/usr/sbin/Orthanc missing: install Debian's orthanc".into());
        }
        let (http, dicom) = (free_port(), free_port());
        let db = dir.join("db");
        std::fs::create_dir_all(&db).unwrap();
        let modalities = modality.map_or(String::new(), |p| {
            format!(r#","DicomModalities":{{"dicomgate":["DICOMGATE","127.0.0.1",{p}]}}"#)
        });
        let cfg = dir.join("orthanc.json");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"Name":"interop","StorageDirectory":{db:?},"IndexDirectory":{db:?},"DicomAet":"{aet}","DicomPort":{dicom},"HttpPort":{http},"RemoteAccessAllowed":false,"AuthenticationEnabled":false,"Plugins":[],"DicomScpTimeout":30{modalities}}}"#
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
        let child = Command::new("/usr/sbin/Orthanc")
            .arg(&cfg)
            .env("TCP_NODELAY", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(KillOnDrop)
            .map_err(|e| e.to_string())?;
        let o = Orthanc {
            _child: child,
            http,
            dicom,
        };
        if !wait_until(30, || o.get("/system").is_ok()) {
            return Err("Orthanc did not answer on its REST port".into());
        }
        Ok(o)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    fn get(&self, path: &str) -> Result<Vec<u8>, String> {
        let out = run(Command::new("curl").args(["-sf", &self.url(path)]))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!("GET {path}: {}", out.status))
        }
    }

    fn post(&self, path: &str, body: &[&str]) -> Result<Vec<u8>, String> {
        let out = run(Command::new("curl")
            .args(["-sf", "-X", "POST"])
            .args(body)
            .arg(self.url(path)))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!("POST {path}: {} {}", out.status, text(&out)))
        }
    }

    /// The ids of every instance Orthanc holds.
    fn instances(&self) -> Result<Vec<String>, String> {
        let body = String::from_utf8(self.get("/instances")?).unwrap();
        Ok(body
            .split('"')
            .filter(|s| s.len() > 20 && s.contains('-'))
            .map(str::to_string)
            .collect())
    }
}

fn version_of_python(module: &str) -> String {
    let out = python()
        .args([
            "-c",
            &format!("import {module}; print({module}.__version__)"),
        ])
        .output()
        .unwrap();
    format!("{module} {}", String::from_utf8_lossy(&out.stdout).trim())
}

/// Sends the corpus into a fresh node with one Storage SCU, and checks what the node stored.
fn into_node(
    files: &[PathBuf],
    send: impl Fn(&Node, &[PathBuf]) -> Result<(), String>,
    echo: impl Fn(&Node) -> Result<(), String>,
) -> BTreeMap<String, String> {
    let node = Node::start("");
    let sent = send(&node, files);
    let mut cells = check_stored(&node, files[0].parent().unwrap());
    if let Err(e) = sent {
        cells.insert("_send".into(), e);
    }
    if let Err(e) = echo(&node) {
        cells.insert("_echo".into(), e);
    }
    cells
}

#[test]
fn interop_matrix_into_dicomgate() {
    let work = tempfile::tempdir().unwrap();
    let files = corpus(&work.path().join("corpus"));
    let mut rows = Vec::new();

    // DCMTK storescu: one compressed syntax per run (its -x flags), so one run per file, with
    // the flag that proposes the file's own syntax; uncompressed files need none.
    let flag = |kind: &str| match kind {
        "deflated" => Some("-xd"),
        "rle" => Some("-xr"),
        "jpeg-baseline" => Some("-xy"),
        "jpeg-ls" => Some("-xt"),
        "jpeg-2000" => Some("-xv"),
        _ => None,
    };
    let cells = into_node(
        &files,
        |node, files| {
            for kind in KINDS {
                let mut c = dcmtk("storescu");
                c.args(["-aec", "DICOMGATE"]).args(flag(kind));
                c.args(["127.0.0.1", &node.port()])
                    .arg(file_of(files, kind));
                ok(run(&mut c)?)?;
            }
            Ok(())
        },
        |node| {
            ok(run(dcmtk("echoscu").args([
                "-aec",
                "DICOMGATE",
                "127.0.0.1",
                &node.port(),
            ]))?)
        },
    );
    rows.push(row(
        "storescu",
        first_line(dcmtk("storescu").arg("--version")),
        cells,
    ));

    let cells = into_node(
        &files,
        |node, files| {
            ok(run(dcmtk("dcmsend")
                .args(["-aec", "DICOMGATE", "127.0.0.1", &node.port()])
                .args(files))?)
        },
        |_| Err("dcmsend has no C-ECHO (echoscu is the storescu row's)".into()),
    );
    rows.push(row(
        "dcmsend",
        first_line(dcmtk("dcmsend").arg("--version")),
        cells,
    ));

    let cells = into_node(
        &files,
        |node, files| {
            let mut c = python();
            c.arg(py_script("send.py"))
                .args([&node.port(), "DICOMGATE"]);
            let out = run(c.args(files))?;
            let t = text(&out);
            match t.lines().all(|l| l.starts_with("0 ")) && out.status.success() {
                true => Ok(()),
                false => Err(t),
            }
        },
        |node| {
            ok(run(python().args([
                "-m",
                "pynetdicom",
                "echoscu",
                "-aec",
                "DICOMGATE",
                "127.0.0.1",
                &node.port(),
            ]))?)
        },
    );
    rows.push(row("pynetdicom", version_of_python("pynetdicom"), cells));

    if Path::new("/usr/bin/gdcmscu").exists() {
        let cells = into_node(
            &files,
            |node, files| {
                let out = run(Command::new("/usr/bin/gdcmscu")
                    .args(["--store", "--call", "DICOMGATE", "127.0.0.1", &node.port()])
                    .args(files))?;
                // gdcmscu 3.0.21 aborts (SIGABRT, "ProtocolStream as nullptr is invalid") as
                // it exits after a successful store: the stored files are what tells.
                use std::os::unix::process::ExitStatusExt;
                match out.status.signal() {
                    Some(6) if text(&out).contains("ProtocolStream as nullptr") => Ok(()),
                    _ => ok(out),
                }
            },
            |node| {
                // It aborts after the echo too; the node's log says whether the association
                // was released (after the C-ECHO-RSP) rather than aborted.
                let released = |log: String| {
                    log.lines()
                        .filter(|l| l.contains("calling_ae=\"GDCMSCU\"") && l.contains("released"))
                        .count()
                };
                let before = released(node.log());
                let out = run(Command::new("/usr/bin/gdcmscu").args([
                    "--echo",
                    "--call",
                    "DICOMGATE",
                    "127.0.0.1",
                    &node.port(),
                ]))?;
                match wait_until(5, || released(node.log()) > before) {
                    true => Ok(()),
                    false => Err(format!("{}: {}", out.status, text(&out))),
                }
            },
        );
        rows.push(row(
            "gdcmscu",
            first_line(Command::new("/usr/bin/gdcmscu").arg("--version")),
            cells,
        ));
    } else {
        rows.push(skipped(
            "gdcmscu",
            "/usr/bin/gdcmscu missing: install Debian's libgdcm-tools",
        ));
    }

    // Orthanc as a Storage SCU: the corpus uploaded over REST, then sent to its modality.
    let orthanc_dir = work.path().join("orthanc");
    let node = Node::start("");
    match Orthanc::start(&orthanc_dir, "ORTHANC", node.port().parse().ok()) {
        Ok(o) => {
            let sent = files
                .iter()
                .try_for_each(|f| {
                    o.post(
                        "/instances",
                        &["--data-binary", &format!("@{}", f.display())],
                    )
                    .map(drop)
                })
                .and_then(|()| o.instances())
                .and_then(|ids| {
                    let list = ids.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>();
                    let body =
                        format!(r#"{{"Resources":[{}],"Synchronous":true}}"#, list.join(","));
                    o.post("/modalities/dicomgate/store", &["-d", &body])
                        .map(drop)
                });
            let mut cells = check_stored(&node, &work.path().join("corpus"));
            if let Err(e) = sent {
                cells.insert("_send".into(), e);
            }
            if let Err(e) = o.post("/modalities/dicomgate/echo", &["-d", "{}"]) {
                cells.insert("_echo".into(), e);
            }
            rows.push(row(
                "orthanc",
                first_line(Command::new("/usr/sbin/Orthanc").arg("--version")),
                cells,
            ));
        }
        Err(e) => rows.push(skipped("orthanc", &e)),
    }
    drop(node);

    match dicom_rs("dicom-storescu") {
        Some(exe) => {
            let cells = into_node(
                &files,
                |node, files| {
                    ok(run(Command::new(&exe)
                        .args(["--called-ae-title", "DICOMGATE", "--fail-first"])
                        .arg(format!("127.0.0.1:{}", node.port()))
                        .args(files))?)
                },
                |node| match dicom_rs("dicom-echoscu") {
                    Some(echo) => ok(run(Command::new(echo)
                        .args(["--called-ae-title", "DICOMGATE"])
                        .arg(format!("127.0.0.1:{}", node.port())))?),
                    None => Err(format!("skipped: dicom-echoscu {NOT_INSTALLED}")),
                },
            );
            rows.push(row(
                "dicom-storescu",
                first_line(Command::new(&exe).arg("--version")),
                cells,
            ));
        }
        None => rows.push(skipped(
            "dicom-storescu",
            "not installed (cargo install --locked dicom-storescu; .ci/run does)",
        )),
    }

    report("into", "into dicomgate (Storage SCU → dicomgate)", &rows);
}

#[test]
fn interop_matrix_from_dicomgate_export() {
    let work = tempfile::tempdir().unwrap();
    let files = corpus(&work.path().join("corpus"));
    let mut rows = Vec::new();

    // Each receiver gets the whole corpus from one router-mode batch: pynetdicom sends it into
    // the node unchanged (see the matrix into the node), the node exports each file in its own
    // transfer syntax.
    let export =
        |port: u16, ae: &str, received: &[&Path], peer: &str| -> BTreeMap<String, String> {
            let files: Vec<&PathBuf> = KINDS
                .iter()
                .filter(|k| expected(peer, k) != NOT_ACCEPTED)
                .map(|k| file_of(&files, k))
                .collect();
            let node = Node::start(&format!(
                "[trigger]\non_association_close = true\nquiet_seconds = 0\n\
             [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{port}\"\nae_title = \"{ae}\"\n"
            ));
            let mut c = python();
            c.arg(py_script("send.py"))
                .args([&node.port(), "DICOMGATE"]);
            let out = c.args(&files).output().unwrap();
            assert!(
                text(&out).lines().all(|l| l.starts_with("0 ")),
                "{}",
                text(&out)
            );
            let mut cells = BTreeMap::new();
            if !wait_until(60, || node.log().contains("exported batch")) {
                cells.insert(
                    "_send".into(),
                    format!("no export in 60 s:\n{}", node.log()),
                );
            }
            let echo = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
                .args(["echo", "--called", ae, &format!("127.0.0.1:{port}")])
                .output()
                .unwrap();
            if let Err(e) = ok(echo) {
                cells.insert("_echo".into(), e);
            }
            std::thread::sleep(Duration::from_millis(500)); // receivers write after answering
            cells.extend(check(&work.path().join("corpus"), received));
            for k in KINDS {
                if expected(peer, k) == NOT_ACCEPTED && cells.get(k).is_some_and(|v| v == "missing")
                {
                    cells.insert(k.to_string(), NOT_ACCEPTED.into());
                }
            }
            cells
        };

    let dir = work.path().join("storescp");
    let port = free_port();
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = dcmtk("storescp");
    cmd.args(["+xa", "-aet", "STORESCP", "-od"])
        .arg(&dir)
        .arg(port.to_string());
    let scp = start_scp(cmd, port);
    let cells = export(port, "STORESCP", &[&dir], "storescp");
    drop(scp);
    rows.push(row(
        "storescp",
        first_line(dcmtk("storescp").arg("--version")),
        cells,
    ));

    let dir = work.path().join("pynetdicom");
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut cmd = python();
    cmd.args(["-m", "pynetdicom", "storescp", "-aet", "PYSCP", "-od"])
        .arg(&dir)
        .arg(port.to_string());
    let scp = start_scp(cmd, port);
    let cells = export(port, "PYSCP", &[&dir], "pynetdicom storescp");
    drop(scp);
    rows.push(row(
        "pynetdicom storescp",
        version_of_python("pynetdicom"),
        cells,
    ));

    match Orthanc::start(&work.path().join("orthanc"), "ORTHANC", None) {
        Ok(o) => {
            let dir = work.path().join("orthanc-files");
            std::fs::create_dir_all(&dir).unwrap();
            let mut cells = export(o.dicom, "ORTHANC", &[], "orthanc (SCP)");
            // What Orthanc keeps, read back over REST.
            for id in o.instances().unwrap_or_default() {
                if let Ok(bytes) = o.get(&format!("/instances/{id}/file")) {
                    std::fs::write(dir.join(format!("{id}.dcm")), bytes).unwrap();
                }
            }
            cells.extend(check(&work.path().join("corpus"), &[&dir]));
            rows.push(row(
                "orthanc (SCP)",
                first_line(Command::new("/usr/sbin/Orthanc").arg("--version")),
                cells,
            ));
        }
        Err(e) => rows.push(skipped("orthanc (SCP)", &e)),
    }

    match dicom_rs("dicom-storescp") {
        Some(exe) => {
            let dir = work.path().join("dicom-rs");
            std::fs::create_dir_all(&dir).unwrap();
            let port = free_port();
            // --promiscuous: dicom-storescp 0.10 does not list Secondary Capture, RT Plan or
            // SR among the SOP classes it accepts otherwise (the export then fails: "no
            // accepted presentation context").
            let mut cmd = Command::new(&exe);
            cmd.args(["--promiscuous", "-o"])
                .arg(&dir)
                .args(["-p", &port.to_string()]);
            let scp = start_scp(cmd, port);
            let cells = export(port, "STORE-SCP", &[&dir], "dicom-storescp");
            drop(scp);
            rows.push(row(
                "dicom-storescp",
                first_line(Command::new(&exe).arg("--version")),
                cells,
            ));
        }
        None => rows.push(skipped(
            "dicom-storescp",
            "not installed (cargo install --locked dicom-storescp; .ci/run does)",
        )),
    }

    report(
        "from",
        "from dicomgate's export (dicomgate → Storage SCP)",
        &rows,
    );
}

fn row(peer: &'static str, version: String, mut cells: BTreeMap<String, String>) -> Row {
    let echo = cells.remove("_echo").map_or(Ok(()), Err);
    let cells = match cells.remove("_send") {
        Some(e) if cells.values().all(|v| v == "missing") => Err(format!("send failed: {e}")),
        Some(e) => {
            cells.insert("_send".into(), e);
            Ok(cells)
        }
        None => Ok(cells),
    };
    Row {
        peer,
        version,
        cells,
        echo,
    }
}

fn skipped(peer: &'static str, why: &str) -> Row {
    Row {
        peer,
        version: "-".into(),
        cells: Err(format!("skipped: {why}")),
        echo: Err("skipped".into()),
    }
}

/// Prints and writes the table, then fails on every cell that is not what was expected.
fn report(name: &str, title: &str, rows: &[Row]) {
    let mut md = format!("#### {title}\n\n| peer | version | C-ECHO |");
    for k in KINDS {
        md += &format!(" {k} |");
    }
    md += "\n|---|---|---|";
    md += &"---|".repeat(KINDS.len());
    md += "\n";
    let mut failures = Vec::new();
    for r in rows {
        let echo = match &r.echo {
            Ok(()) => "✓".to_string(),
            Err(e) => e.lines().next().unwrap_or("").to_string(),
        };
        md += &format!("| {} | {} | {} |", r.peer, r.version, echo);
        match &r.cells {
            Ok(cells) => {
                for k in KINDS {
                    let got = cells.get(k).map_or("missing", String::as_str);
                    let want = expected(r.peer, k);
                    md += &format!(" {} |", if got == "exact" { "✓" } else { got });
                    if got != want {
                        failures.push(format!("{} {k}: got {got:?}, expected {want:?}", r.peer));
                    }
                }
                if let Some(e) = cells.get("_send") {
                    failures.push(format!("{}: the send reported {e}", r.peer));
                }
            }
            Err(e) => {
                md += &format!(" {} |", e.lines().next().unwrap_or(""));
                md += &" |".repeat(KINDS.len() - 1);
                if !e.starts_with("skipped") {
                    failures.push(format!("{}: {e}", r.peer));
                }
            }
        }
        if let Err(e) = &r.echo {
            let no_tool = e.contains("has no C-ECHO") || e.starts_with("skipped");
            if !no_tool {
                failures.push(format!("{} C-ECHO: {e}", r.peer));
            }
        }
        md += "\n";
    }
    println!("{md}");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("interop-{name}.md"));
    std::fs::write(out, &md).unwrap();
    assert!(failures.is_empty(), "{}\n\n{md}", failures.join("\n"));
}
