//! Issue 12 item 5, logs: `[log] format = "json"` writes one JSON object per line (each parsed
//! by Python's `json`), and the pipeline's lines name the patient (its digest; the Patient ID
//! only with `[log] phi = true`), the input, the destination by its `[[export]] name`, and the
//! reason; duplicate export names are refused at start-up naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use common::*;

/// Every line of `log` parsed by Python's `json` module (the test fails if one does not
/// parse), handed back as serde_json values.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    let mut py = python()
        .args([
            "-c",
            "import json, sys\n\
             out = []\n\
             for n, line in enumerate(sys.stdin, 1):\n\
             \x20   try:\n\
             \x20       out.append(json.loads(line))\n\
             \x20   except ValueError as e:\n\
             \x20       sys.exit('line %d is not JSON: %s: %r' % (n, e, line))\n\
             print(json.dumps(out))\n",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(log.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ct_files(dir: &std::path::Path, patient: &str, n: u32) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            write_instance(
                dir,
                patient,
                "1.2.826.0.1.3680043.10.50",
                "1.2.826.0.1.3680043.10.50.1",
                &format!("1.2.826.0.1.3680043.10.50.1.{i}"),
                i + 1,
            )
        })
        .collect()
}

fn router(out: &std::path::Path, log: &str) -> String {
    format!(
        "[log]\n{log}\n\
         [trigger]\non_association_close = true\nquiet_seconds = 0\n\
         [[input]]\nname = \"ct\"\nmatch = {{ Modality = \"CT\" }}\nmin_instances = 2\n\
         [[export]]\nname = \"archive\"\nkind = \"folder\"\npath = {:?}\n",
        out.display().to_string()
    )
}

/// `[log] format = "json"`: every line the node writes (at RUST_LOG=debug, start-up, the
/// association, the pipeline) parses as JSON; the "exported" line names the patient by its
/// digest, the input with its instance count and the destination by its name; with the default
/// `phi = false` the Patient ID appears nowhere in the log.
#[test]
fn json_log_lines_parse_and_name_patient_input_and_destination() {
    let out = tempfile::tempdir().unwrap();
    let node = Node::start(&router(out.path(), "format = \"json\""));
    let src = tempfile::tempdir().unwrap();
    assert!(storescu_status(&node, &ct_files(src.path(), "LOGPATIENT7", 2)).success());
    assert!(
        wait_until(30, || node.log().contains("batch done")),
        "{}",
        node.log()
    );
    let log = node.log();
    let lines = json_lines(&log);
    assert!(lines.len() > 5, "{log}");
    let digest = dicomgate::storage::patient_dir_name(b"LOGPATIENT7");
    let exported = lines
        .iter()
        .find(|l| l["message"] == "exported")
        .unwrap_or_else(|| panic!("no exported line: {log}"));
    assert_eq!(exported["patient"], digest.as_str(), "{exported}");
    assert_eq!(exported["inputs"], "ct:2", "{exported}");
    assert_eq!(exported["destination"], "archive", "{exported}");
    assert_eq!(exported["level"], "INFO", "{exported}");
    assert!(exported.get("patient_id").is_none(), "{exported}");
    let claimed = lines
        .iter()
        .find(|l| l["message"] == "batch claimed")
        .unwrap_or_else(|| panic!("no claim line: {log}"));
    assert_eq!(claimed["patient"], digest.as_str(), "{claimed}");
    assert_eq!(claimed["instances"], 2, "{claimed}");
    assert!(
        !log.contains("LOGPATIENT7"),
        "the Patient ID is in the log with phi = false: {log}"
    );
}

/// `[log] phi = true`: the Patient ID is shown beside the digest; an export failure's line
/// names the destination and gives its reason in words.
#[test]
fn phi_shows_the_patient_id_and_export_failures_name_destination_and_reason() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead); // nothing listens there now
    let node = Node::start(&format!(
        "[log]\nphi = true\n\
         [trigger]\non_association_close = true\nquiet_seconds = 0\n\
         [[export]]\nname = \"pacs-main\"\nkind = \"dicom\"\naddress = \"127.0.0.1:{dead_port}\"\nae_title = \"PACS\"\n\
         [outbox]\nattempts = 5\nfirst_delay_seconds = 30\n"
    ));
    let src = tempfile::tempdir().unwrap();
    assert!(storescu_status(&node, &ct_files(src.path(), "LOGPATIENT8", 1)).success());
    let failed_line = || {
        node.log()
            .lines()
            .find(|l| l.contains("export failed; will retry"))
            .map(str::to_string)
    };
    assert!(wait_until(30, || failed_line().is_some()), "{}", node.log());
    let line = failed_line().unwrap();
    let digest = dicomgate::storage::patient_dir_name(b"LOGPATIENT8");
    assert!(line.contains(&format!("patient={digest}")), "{line}");
    assert!(line.contains("patient_id=\"LOGPATIENT8\""), "{line}");
    assert!(line.contains(" inputs=all:1 "), "{line}");
    assert!(line.contains(" reason=pacs-main: "), "{line}");
    assert!(line.to_lowercase().contains("refused"), "{line}");
}

/// Two `[[export]]` sections with one name (here an explicit name equal to the other's
/// default) stop the start-up with a message naming the field.
#[test]
fn duplicate_export_names_are_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dicomgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n[http]\nlisten = \"\"\n\
             [[export]]\nkind = \"folder\"\npath = {:?}\n\
             [[export]]\nname = \"export-0\"\nkind = \"folder\"\npath = {:?}\n",
            dir.path().join("data").display().to_string(),
            dir.path().join("a").display().to_string(),
            dir.path().join("b").display().to_string(),
        ),
    )
    .unwrap();
    // `--print-config` runs the same validation as the start-up and then exits, so the test
    // ends whether or not the config is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--print-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("export 1: name \"export-0\" is export 0's too"),
        "{err}"
    );
}
