//! Issue 12 item 6: `dicomgate bench` against a Storage SCP we did not write (DCMTK's storescp):
//! every instance it reports arrived, the JSON carries the keys scripts read, the HTML report
//! draws both plots and renders in a real browser; `dicomgate-loadgen` keeps its output; an SCP
//! that is not there is a failure naming why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn json_of(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn bench_against_dcmtk_storescp_reports_what_arrived() {
    let work = tempfile::tempdir().unwrap();
    let received = work.path().join("scp");
    let port = free_port();
    let _scp = storescp(&received, port, "STORESCP");
    assert!(wait_until(10, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    let report = work.path().join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args([
            "bench",
            &format!("127.0.0.1:{port}"),
            "--called",
            "STORESCP",
        ])
        .args([
            "--associations",
            "3",
            "--instances",
            "20",
            "--pixel-bytes",
            "4096",
        ])
        .arg("--json")
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out.stdout);
    assert_eq!(j["instances"], 60, "{j}");
    assert_eq!(j["associations"], 3, "{j}");
    assert_eq!(j["failed"], false, "{j}");
    assert!(j["instances_per_s"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["mb_per_s"].as_f64().is_some(), "{j}");
    assert!(j["latency_us"]["p50"].as_u64().unwrap() > 0, "{j}");
    assert!(j["latency_us"]["p99"].as_u64().unwrap() >= j["latency_us"]["p50"].as_u64().unwrap());
    // What the bench counted is what storescp wrote.
    assert!(
        wait_until(10, || files_under(&received).len() == 60),
        "{} files",
        files_under(&received).len()
    );

    let html = std::fs::read_to_string(&report).unwrap();
    assert_eq!(html.matches("<svg").count(), 2, "{html}");
    assert!(html.contains("<td>60</td>"), "{html}");
    assert!(html.contains("class=\"bar\""), "no latency bars: {html}");
    // A real browser parses it into a page with both plots.
    let dom = chromium_dom(&format!("file://{}", report.display()));
    assert!(dom.contains("Throughput over time"), "{dom}");
    assert_eq!(dom.matches("<svg").count(), 2, "{dom}");
}

/// Scripts (perf/compare.py, perf/scaling.py) read dicomgate-loadgen's JSON keys; the line
/// form keeps its fields too.
#[test]
fn loadgen_keeps_its_output() {
    let node = Node::start("");
    let gen = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dicomgate-loadgen"))
            .args([
                &node.addr.to_string(),
                "--associations",
                "2",
                "--instances",
                "10",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = gen(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out.stdout);
    let mut got: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = [
        "associations",
        "window",
        "instances",
        "bytes",
        "seconds",
        "instances_per_s",
        "mb_per_s",
        "latency_us",
        "failed",
    ];
    want.sort_unstable();
    assert_eq!(got, want, "{j}");
    let mut lat: Vec<&str> = j["latency_us"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    lat.sort_unstable();
    assert_eq!(lat, ["max", "p50", "p99", "p999"], "{j}");
    assert_eq!(j["failed"], false);
    assert_eq!(j["instances"], 20);
    assert!(j["latency_us"]["p50"].is_u64() && j["latency_us"]["p99"].is_u64());
    let out = gen(&[]);
    let line = String::from_utf8_lossy(&out.stdout);
    for field in [
        "instances=20 ",
        "instances_per_s=",
        "MB_per_s=",
        "latency_us_p50=",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }
    assert!(wait_until(10, || node.stored().len() == 40));
}

#[test]
fn bench_names_why_an_scp_cannot_be_reached() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["bench", &format!("127.0.0.1:{port}"), "--instances", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("association failed") && err.contains("refused"),
        "{err}"
    );
}
