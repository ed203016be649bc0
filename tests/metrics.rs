//! Issue 12, HTTP: `/metrics` parsed by Prometheus's own text parser (PyPI `prometheus_client`)
//! with counters equal to what was sent, and `/healthz` / `/readyz`, against the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use common::*;
use dicomgate::net::scu::Client;

use common::http_get as get;

/// Every sample of `/metrics` as the Prometheus parser read it.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let out = python()
        .arg(py_script("metrics.py"))
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the page: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.lines()
            .next()
            .unwrap_or_default()
            .contains("openmetrics-text"),
        "{text}"
    );
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Five instances stored by storescu, one refused (its data set names another SOP instance
/// than its command: 0xA900) by our own requestor: the counters say exactly that, parsed by
/// Prometheus's parser; `/healthz` and `/readyz` answer 200, an unknown path 404.
#[test]
fn metrics_parse_and_count_what_was_sent() {
    let node = Node::start("[http]\nlisten = \"127.0.0.1:0\"\n");
    let addr = http_addr(&node);
    let src = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..5)
        .map(|i| {
            write_instance(
                src.path(),
                "METRICS",
                "1.2.826.0.1.3680043.10.30",
                "1.2.826.0.1.3680043.10.30.1",
                &format!("1.2.826.0.1.3680043.10.30.1.{i}"),
                i + 1,
            )
        })
        .collect();
    let st = storescu_status(&node, &files);
    assert!(st.success());
    let mut c = Client::connect(
        node.addr,
        &scu_options("METRICS"),
        &[ct_proposal_in(EXPLICIT_LE)],
    )
    .unwrap();
    let ds = dataset("METRICS", "1.2.3", "1.2.3.4", "1.2.3.4.99", 16);
    let (status, _) = c
        .store(CT_IMAGE_STORAGE, "1.2.3.4.100", EXPLICIT_LE, &ds)
        .unwrap();
    assert_eq!(status, 0xA900);
    c.release().unwrap();
    let want = [
        ("dicomgate_instances_stored_total{}", 5.0),
        ("dicomgate_associations_total{outcome=released}", 2.0),
        ("dicomgate_request_failures_total{status=0xA900}", 1.0),
        ("dicomgate_reactors_running{}", 2.0),
        // The five stores, each timed from storage to durable; the refused one never reached
        // storage. All five were small: records of the segment log, made durable by its rounds.
        ("dicomgate_store_seconds_count{}", 5.0),
        ("dicomgate_log_flushed_records_total{}", 5.0),
        ("dicomgate_batches_now{place=batches}", 0.0),
    ];
    let mut got = BTreeMap::new();
    let matched = wait_until(10, || {
        got = scrape(&addr);
        want.iter().all(|(k, v)| got.get(*k) == Some(v))
    });
    assert!(matched, "{got:#?}");
    assert!(
        got["dicomgate_stored_bytes_total{}"] > 5.0 * 128.0,
        "{got:#?}"
    );
    assert_eq!(got["dicomgate_buffered_bytes_limit{}"], 33_554_432.0);
    assert!(got["dicomgate_log_flush_rounds_total{}"] >= 1.0, "{got:#?}");
    // Each round in the round histograms: as many rounds, records summing to the five.
    assert_eq!(
        got["dicomgate_log_flush_round_records_count{}"], got["dicomgate_log_flush_rounds_total{}"],
        "{got:#?}"
    );
    assert_eq!(
        got["dicomgate_log_flush_round_records_sum{}"], 5.0,
        "{got:#?}"
    );
    assert!(
        got["dicomgate_log_flush_round_seconds_sum{}"] > 0.0,
        "{got:#?}"
    );
    assert_eq!(got["dicomgate_retries_waiting{}"], 0.0, "{got:#?}");
    assert!(got["dicomgate_store_seconds_sum{}"] > 0.0, "{got:#?}");
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".into()));
    assert_eq!(get(&addr, "/nowhere").0, 404);
}

/// Clients that connect and send nothing, or send an endless request head, hold the endpoint
/// for its I/O timeout at most, one at a time: a health probe behind them is still answered,
/// and an oversized head gets 431 (the first version, tiny_http, gave each client a thread and
/// froze when one stopped reading).
#[test]
fn http_clients_that_stall_or_flood_do_not_hold_the_endpoint() {
    let node = Node::start("[http]\nlisten = \"127.0.0.1:0\"\n");
    let addr = http_addr(&node);
    let idle: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let mut flood = std::net::TcpStream::connect(&addr).unwrap();
    let _ = flood.write_all(b"GET /metrics HTTP/1.1\r\n");
    let _ = flood.write_all(&vec![b'x'; 64 << 10]);
    let mut answered = false;
    for _ in 0..30 {
        if get(&addr, "/healthz") == (200, "ok\n".into()) {
            answered = true;
            break;
        }
    }
    assert!(answered, "a probe behind stalled clients was not answered");
    let mut resp = String::new();
    let _ = flood.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");
    drop(idle);
}

/// Two nodes on one host with the default HTTP address: the second refuses to start, naming
/// `[http] listen` and what to do.
#[test]
fn a_busy_http_address_is_refused_naming_the_field() {
    let node = Node::start("[http]\nlisten = \"127.0.0.1:0\"\n");
    let addr = http_addr(&node);
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            &addr,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[http] listen") && err.contains("another address"),
        "{err}"
    );
}

/// The pipeline's side: one processing run that succeeds, then an export to a dead port that
/// fails its two attempts and moves the batch to failed/; the counters say exactly that.
#[test]
fn processing_and_export_failures_are_counted() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead); // nothing listens there now
    let node = Node::start(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [trigger]\non_association_close = true\nquiet_seconds = 0\n\
         [processing]\ncommand = [\"sh\", \"-c\", \"cp -R \\\"$DICOMGATE_INPUT_DIR\\\"/. \\\"$DICOMGATE_OUTPUT_DIR\\\"/\"]\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{dead_port}\"\nae_title = \"PACS\"\n\
         [outbox]\nattempts = 2\nfirst_delay_seconds = 2\nmax_delay_seconds = 2\n"
    ));
    let addr = http_addr(&node);
    let src = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..2)
        .map(|i| {
            write_instance(
                src.path(),
                "PIPEMETRICS",
                "1.2.826.0.1.3680043.10.31",
                "1.2.826.0.1.3680043.10.31.1",
                &format!("1.2.826.0.1.3680043.10.31.1.{i}"),
                i + 1,
            )
        })
        .collect();
    let st = storescu_status(&node, &files);
    assert!(st.success());
    // Between the two attempts (2 s apart) the batch waits in the outbox.
    assert!(
        wait_until(30, || scrape(&addr).get("dicomgate_retries_waiting{}")
            == Some(&1.0)),
        "{}",
        node.log()
    );
    assert!(
        wait_until(30, || node.log().contains("batch moved to failed/")),
        "{}",
        node.log()
    );
    let want = [
        ("dicomgate_processing_runs_total{}", 1.0),
        ("dicomgate_processing_failures_total{kind=exit_status}", 0.0),
        ("dicomgate_processing_failures_total{kind=timeout}", 0.0),
        ("dicomgate_processing_failures_total{kind=no_output}", 0.0),
        // One observation per run in the duration histogram.
        ("dicomgate_processing_duration_seconds_count{}", 1.0),
        ("dicomgate_export_failures_total{destination=export-0}", 2.0),
        ("dicomgate_batches_total{stage=failed}", 1.0),
        ("dicomgate_batches_total{stage=processed}", 1.0),
        ("dicomgate_batches_now{place=failed}", 1.0),
        ("dicomgate_batches_now{place=batches}", 0.0),
    ];
    let got = scrape(&addr);
    for (k, v) in want {
        assert_eq!(got.get(k), Some(&v), "{k}: {got:#?}");
    }
    // Nothing waits for a retry once the batch is in failed/ (two attempts, both done).
    assert_eq!(got["dicomgate_retries_waiting{}"], 0.0, "{got:#?}");
    assert!(
        got["dicomgate_processing_seconds_total{}"] > 0.0,
        "{got:#?}"
    );
}

/// Issue 11: processing failures are counted by kind. A command that exits 7 on its first
/// attempt and outlives `timeout_seconds` on its second: `kind="exit_status"` and
/// `kind="timeout"` count one each, every other kind is shown at 0, and the retry's log line
/// names the kind.
#[test]
fn processing_failures_are_counted_by_kind() {
    let marks = tempfile::tempdir().unwrap();
    let first = marks.path().join("first-attempt-done");
    let script = format!(
        "if [ -e {f} ]; then sleep 30; else touch {f}; exit 7; fi",
        f = first.display()
    );
    let node = Node::start(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [trigger]\non_association_close = true\nquiet_seconds = 0\n\
         [processing]\ncommand = [\"sh\", \"-c\", {script:?}]\nattempts = 2\ntimeout_seconds = 1\n\
         [outbox]\nfirst_delay_seconds = 0.1\n"
    ));
    let addr = http_addr(&node);
    let src = tempfile::tempdir().unwrap();
    let file = write_instance(
        src.path(),
        "PROCKINDS",
        "1.2.826.0.1.3680043.10.32",
        "1.2.826.0.1.3680043.10.32.1",
        "1.2.826.0.1.3680043.10.32.1.1",
        1,
    );
    assert!(storescu_status(&node, &[file]).success());
    assert!(
        wait_until(30, || node.log().contains("batch moved to failed/")),
        "{}",
        node.log()
    );
    let got = scrape(&addr);
    let kinds: BTreeMap<&str, f64> = got
        .iter()
        .filter_map(|(k, v)| {
            let kind = k
                .strip_prefix("dicomgate_processing_failures_total{kind=")?
                .strip_suffix('}')?;
            Some((kind, *v))
        })
        .collect();
    let want: BTreeMap<&str, f64> = dicomgate::pipeline::process::FAILURE_KINDS
        .iter()
        .map(|k| {
            (
                *k,
                if matches!(*k, "exit_status" | "timeout") {
                    1.0
                } else {
                    0.0
                },
            )
        })
        .collect();
    assert_eq!(kinds, want, "{got:#?}");
    assert_eq!(got["dicomgate_processing_runs_total{}"], 2.0, "{got:#?}");
    let log = node.log();
    let retry = log
        .lines()
        .find(|l| l.contains("processing failed; will retry"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(retry.contains("kind=\"exit_status\""), "{retry}");
    assert!(
        log.contains("processing command killed after 1.0 s (timeout_seconds)"),
        "{log}"
    );
}

/// Issue 12 item 3: connections per reactor. Five idle associations on a node with two
/// reactors: the acceptor gives each new connection to the reactor with the fewest, so the
/// gauges read 3 and 2 (summing to `connections_open`), and both return to 0 once they close.
#[test]
fn connections_per_reactor_are_gauged() {
    // Test nodes run two reactors (tests/common).
    let node = Node::start("[http]\nlisten = \"127.0.0.1:0\"\n");
    let addr = http_addr(&node);
    let per_reactor = |m: &BTreeMap<String, f64>| -> Vec<f64> {
        (0..2)
            .map(|i| m[&format!("dicomgate_reactor_connections{{reactor={i}}}")])
            .collect()
    };
    let idle: Vec<Client> = (0..5)
        .map(|_| {
            Client::connect(
                node.addr,
                &scu_options("IDLE"),
                &[ct_proposal_in(EXPLICIT_LE)],
            )
            .unwrap()
        })
        .collect();
    let m = scrape(&addr);
    let mut counts = per_reactor(&m);
    counts.sort_by(f64::total_cmp);
    assert_eq!(counts, vec![2.0, 3.0], "{m:?}");
    assert_eq!(m["dicomgate_connections_open{}"], 5.0);
    for c in idle {
        c.release().unwrap();
    }
    assert!(
        wait_until(10, || per_reactor(&scrape(&addr)) == vec![0.0, 0.0]),
        "closed connections leave the gauges"
    );
}
