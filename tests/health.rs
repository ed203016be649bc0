//! Issue 12 item 3, the HTTP endpoint's health and its concurrency: `/healthz` answers 503 once
//! a pipeline thread has really died (a library user's `Processor` that panics takes its
//! pipeline worker thread with it) or a reactor has (ended by a debug-build-only switch), and a client that connects and stalls no longer keeps a
//! `/healthz` probe waiting (connections are served concurrently, a few threads).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::sync::Arc;

use common::*;
use dicomgate::pipeline::{BatchInfo, ProcessingError, Processor};

/// A library user's processing that panics: the pipeline worker thread that runs it dies
/// (nothing catches the unwind), which is the real way a pipeline thread ends early today.
struct Panics;

impl Processor for Panics {
    fn process(&self, _batch: &BatchInfo) -> Result<(), ProcessingError> {
        panic!("test processor panics (tests/health.rs): its pipeline worker thread dies");
    }
}

/// `/healthz` is 200 while every thread lives; once a pipeline worker has died it is 503 and
/// names the thread. No fault switch in the node: the panic is the user's code's, on the
/// real worker thread, and the instance that triggers it comes from DCMTK's storescu.
fn pipeline_thread_death_is_503(library_waits: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = dicomgate::config::Config::from_toml(&format!(
        "[node]\nae_title = \"DICOMGATE\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nreactors = 2\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [trigger]\non_association_close = true\nquiet_seconds = 0\n\
         [outbox]\nworkers = 2\n",
        dir.path().join("data").display().to_string()
    ))
    .unwrap();
    let node = dicomgate::net::start_with(config, Some(Arc::new(Panics))).unwrap();
    let http = node.http_addr.unwrap().to_string();
    let port = node.local_addr.unwrap().port().to_string();
    // As examples/rust_processor.rs does: the library user's thread waits on the node (it
    // ends with the test process).
    let node = if library_waits {
        std::thread::spawn(move || node.wait());
        None
    } else {
        Some(node)
    };
    assert_eq!(http_get(&http, "/healthz"), (200, "ok\n".into()));

    let src = tempfile::tempdir().unwrap();
    let file = write_instance(
        src.path(),
        "HEALTH",
        "1.2.826.0.1.3680043.10.40",
        "1.2.826.0.1.3680043.10.40.1",
        "1.2.826.0.1.3680043.10.40.1.1",
        1,
    );
    let st = dcmtk("storescu")
        .args(["-aec", "DICOMGATE", "127.0.0.1", &port])
        .arg(&file)
        .status()
        .unwrap();
    assert!(st.success());
    // The association's close claims the batch; a worker runs the processor and dies.
    let mut last = (0, String::new());
    let dead = wait_until(60, || {
        last = http_get(&http, "/healthz");
        last.0 == 503
    });
    assert!(dead, "/healthz still {last:?} after a pipeline worker died");
    assert!(
        last.1
            .starts_with("unhealthy: storage or pipeline thread(s) ended: worker-"),
        "{last:?}"
    );
    if let Some(node) = node {
        node.shutdown();
    }
}

#[test]
fn healthz_is_503_once_a_pipeline_thread_has_died() {
    pipeline_thread_death_is_503(false);
}

/// Review of issue 12: `NodeHandle::wait` took the watched threads out of `/healthz`'s sight
/// before it blocked, so a library user waiting on the node (as examples/rust_processor.rs
/// does) got 200 for a dead pipeline worker for the rest of the run.
#[test]
fn healthz_is_503_for_a_dead_pipeline_thread_while_the_library_waits() {
    pipeline_thread_death_is_503(true);
}

/// A reactor that has died: `/healthz` is 503 and says how many reactors run. The reactor is
/// ended by the debug-build-only switch `DICOMGATE_TEST_END_REACTOR` (src/net/mod.rs): no
/// peer's bytes can end a reactor, so the test needs a switch, and release builds have none.
#[cfg(debug_assertions)]
#[test]
fn healthz_is_503_once_a_reactor_has_died() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("dicomgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nreactors = 2\n[http]\nlisten = {http:?}\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("DICOMGATE_TEST_END_REACTOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");
    let mut last = (0, String::new());
    let dead = wait_until(30, || {
        last = http_get(&http, "/healthz");
        last.0 == 503
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(dead, "/healthz still {last:?} with a reactor gone");
    assert_eq!(last.1, "unhealthy: 1 of 2 reactor threads running\n");
}

/// Found in review (issue 12): the endpoint served one connection at a time, so a client that
/// connected and sent nothing held `/healthz` up to the 5 s deadline (a client opening such
/// connections back to back held it for good). With connections served concurrently, a probe
/// gets its answer while the stalled connection is still open: that connection has not been
/// answered or closed when the probe's answer arrives.
#[test]
fn a_stalled_http_connection_does_not_delay_healthz() {
    let node = Node::start("[http]\nlisten = \"127.0.0.1:0\"\n");
    let addr = http_addr(&node);
    // Wait until the endpoint answers at all, then stall one connection.
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    // Connected first, so accepted first: before the change the only thread then waited on it.
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    // One thread at a time answered the stalled connection first (431 after its read timeout)
    // and closed it, and only then the probe: the stalled connection then has bytes or EOF.
    stalled.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    match stalled.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "the stalled connection was answered or closed before the probe was: {other:?} {:?}",
            String::from_utf8_lossy(&buf)
        ),
    }
}
