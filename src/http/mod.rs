//! The node's HTTP endpoint (`[http] listen`), on its own pool of threads, off the reactors:
//! `/metrics` in the OpenMetrics text format (encoded by prometheus-client), `/healthz` (200
//! while every reactor runs and the node is not stopping, else 503), `/readyz` (200 while
//! not draining, not fenced (`[cluster]`, `cluster::fence`) and the data directory is
//! writable, else 503), the status page `/` and its JSON `/api/status` (built by
//! [`status`]), and the operator's `POST /api/retry` and `/api/force`.
//!
//! Owns: serving those paths and building each scrape from what the reactors count
//! ([`crate::net::counters`], read, never reset) and what the pipeline knows. Must never block
//! a reactor or touch the data path beyond reading counters; a slow scraper holds only one of
//! its threads. Its sockets are the only ones outside `net/`: an operator's plain blocking
//! HTTP/1.1, with nothing of the DICOM data path (architecture.md lists it as its own module).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::pipeline::Pipeline;

pub mod status;

/// What the endpoint reads: the network side's shared state (its counters included) and the
/// pipeline (patients, batches, operator actions).
#[derive(Debug)]
pub struct Shared {
    pub net: Arc<crate::net::Shared>,
    pub pipeline: Arc<Pipeline>,
    /// `[cluster]`: this node's fence; `/readyz` answers 503 while it refuses acknowledgements.
    pub fence: Option<Arc<crate::cluster::fence::Fence>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReactorLabel {
    reactor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    result: String,
    source: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabel {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaceLabel {
    place: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

/// One scrape: the node's counters as OpenMetrics text.
pub fn render(shared: &Shared) -> String {
    let mut r = Registry::with_prefix("dicomgate");
    let c = &shared.net.counters;
    r.register(
        "instances_stored",
        "C-STORE successes (an instance sent again counts again)",
        ConstCounter::new(c.instances.load(Ordering::Relaxed)),
    );
    r.register(
        "stored_bytes",
        "Bytes of the instances stored (Part-10 files or log records)",
        ConstCounter::new(c.bytes.load(Ordering::Relaxed)),
    );
    r.register(
        "instances_discarded",
        "C-STORE requests no input accepts, answered success and not stored ([patients] unmatched = \"discard\")",
        ConstCounter::new(c.discarded.load(Ordering::Relaxed)),
    );
    r.register(
        "store_seconds",
        "Seconds from a C-STORE handed to storage until it was durable (or failed)",
        c.store_seconds.clone(),
    );
    let (rounds, records, nanos) = shared.net.storage.log().flush_stats();
    r.register(
        "log_flush_rounds",
        "Group-commit flush rounds of the segment log",
        ConstCounter::new(rounds),
    );
    r.register(
        "log_flushed_records",
        "Records made durable by those rounds",
        ConstCounter::new(records),
    );
    r.register(
        "log_flush_seconds",
        "Seconds spent in those rounds (fdatasync and acknowledgements)",
        ConstCounter::new(nanos as f64 / 1e9),
    );
    let (round_seconds, round_records) = shared.net.storage.log().round_histograms();
    r.register(
        "log_flush_round_seconds",
        "Seconds each flush round took (fdatasync and acknowledgements)",
        round_seconds,
    );
    r.register(
        "log_flush_round_records",
        "Records each flush round made durable (the group commit's batch size)",
        round_records,
    );
    r.register(
        "retries_waiting",
        "Batches waiting for a retry (the outbox's backoff)",
        prometheus_client::metrics::gauge::ConstGauge::new(
            shared
                .pipeline
                .stats
                .retries_waiting
                .load(Ordering::Relaxed) as i64,
        ),
    );
    let places = Family::<PlaceLabel, prometheus_client::metrics::gauge::Gauge>::default();
    for place in ["batches", "failed"] {
        let n = std::fs::read_dir(shared.net.config.node.data_dir.join(place))
            .map_or(0, |rd| rd.flatten().filter(|e| e.path().is_dir()).count());
        places
            .get_or_create(&PlaceLabel {
                place: place.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "batches_now",
        "Batches in batches/ (being processed or exported) and in failed/",
        places,
    );
    let assoc = Family::<OutcomeLabel, Counter>::default();
    if let Ok(m) = c.associations.lock() {
        for (k, v) in m.iter() {
            assoc
                .get_or_create(&OutcomeLabel {
                    outcome: (*k).to_string(),
                })
                .inc_by(*v);
        }
    }
    r.register("associations", "Associations ended, by outcome", assoc);
    let rejections = Family::<RejectLabel, Counter>::default();
    if let Ok(m) = c.rejections.lock() {
        for (&(result, source, reason), v) in m.iter() {
            rejections
                .get_or_create(&RejectLabel {
                    result: result.to_string(),
                    source: source.to_string(),
                    reason: reason.to_string(),
                })
                .inc_by(*v);
        }
    }
    let store_errors = Family::<KindLabel, Counter>::default();
    if let Ok(m) = c.store_errors.lock() {
        for (k, v) in m.iter() {
            store_errors
                .get_or_create(&KindLabel {
                    kind: (*k).to_string(),
                })
                .inc_by(*v);
        }
    }
    r.register(
        "store_errors",
        "Stores that failed in storage (answered 0xA700), by kind: no_space, quota, io, read_only, invalid, fenced, other",
        store_errors,
    );
    r.register(
        "associations_rejected",
        "A-ASSOCIATE-RJ sent, by result, source and reason (PS3.8 Table 9-21)",
        rejections,
    );
    let failures = Family::<StatusLabel, Counter>::default();
    if let Ok(m) = c.failures.lock() {
        for (k, v) in m.iter() {
            failures
                .get_or_create(&StatusLabel {
                    status: format!("0x{k:04X}"),
                })
                .inc_by(*v);
        }
    }
    r.register(
        "request_failures",
        "Requests answered with a failure status, by status",
        failures,
    );
    let gauge = |v: usize| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    r.register(
        "connections_open",
        "TCP connections open (associated or not)",
        gauge(shared.net.connections.load(Ordering::Relaxed)),
    );
    let per_reactor = Family::<ReactorLabel, prometheus_client::metrics::gauge::Gauge>::default();
    for (i, m) in shared.net.mailboxes.iter().enumerate() {
        per_reactor
            .get_or_create(&ReactorLabel {
                reactor: i.to_string(),
            })
            .set(i64::try_from(m.live.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }
    r.register(
        "reactor_connections",
        "TCP connections each reactor serves",
        per_reactor,
    );
    r.register(
        "buffered_bytes",
        "Data set bytes held in memory node-wide ([limits] max_buffered_bytes bounds it)",
        gauge(shared.net.budget.used()),
    );
    r.register(
        "buffered_bytes_limit",
        "[limits] max_buffered_bytes",
        gauge(shared.net.config.limits.max_buffered_bytes),
    );
    r.register(
        "pending_patients",
        "Patients with instances waiting for their batch",
        gauge(shared.pipeline.map.len()),
    );
    if let Some(o) = shared.pipeline.outbox() {
        let s = &o.stats;
        let count = |v: &std::sync::atomic::AtomicU64| {
            let c = Counter::<u64>::default();
            c.inc_by(v.load(Ordering::Relaxed));
            c
        };
        let g64 = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        r.register(
            "cluster_connected",
            "1 while the node holds a working connection to the cluster database",
            g64(u64::from(s.connected.load(Ordering::Relaxed))),
        );
        r.register(
            "cluster_tls",
            "1 while that connection is TLS ([cluster] tls_ca), as the database reports it",
            g64(u64::from(
                s.connected.load(Ordering::Relaxed) && s.tls.load(Ordering::Relaxed),
            )),
        );
        r.register(
            "cluster_published",
            "Instance records published to the cluster database",
            count(&s.published),
        );
        r.register(
            "cluster_unpublished",
            "Acknowledged instance records not yet published",
            gauge(o.pending()),
        );
        r.register(
            "cluster_publication_lag_seconds",
            "Age of the oldest acknowledged record not yet published (0 when none)",
            ConstGauge::new(o.lag_ms() as f64 / 1000.0),
        );
        r.register(
            "cluster_left_out",
            "Records not queued for publication (queue full): found by a rescan of the folder",
            count(&s.left_out),
        );
        r.register(
            "cluster_rewinds",
            "Times the cluster database was found to have lost publication rounds this node saw \
             committed (failover to a standby that lacked them, restore): each is followed by a \
             rescan that publishes the node's pending records again",
            count(&s.rewinds),
        );
        r.register(
            "cluster_rows_forgotten_after_rewind",
            "Rows of this node the database had again after losing commits, though their copies \
             were released (processed and exported before the loss): forgotten by the rescan",
            count(&s.reconciled),
        );
        r.register(
            "cluster_taken_over",
            "Instance records of dead nodes this node published from their folders (takeover)",
            count(&s.taken_over),
        );
        r.register(
            "cluster_failures",
            "Connection attempts and statements to the cluster database that failed",
            count(&s.failures),
        );
        r.register(
            "cluster_owned_partitions",
            "Patient partitions this node owns (as of its last lease renewal)",
            g64(s.owned_partitions.load(Ordering::Relaxed)),
        );
        r.register(
            "cluster_live_nodes",
            "Live nodes of the cluster (as of the last lease renewal)",
            g64(s.live_nodes.load(Ordering::Relaxed)),
        );
    }
    r.register(
        "reactors_running",
        "Reactor threads running",
        gauge(shared.net.reactors_running.load(Ordering::Relaxed)),
    );
    let s = &shared.pipeline.stats;
    let batches = Family::<StageLabel, Counter>::default();
    for (stage, v) in [
        ("claimed", &s.claimed),
        ("processed", &s.processed),
        ("exported", &s.exported),
        ("failed", &s.failed),
        ("expired", &s.expired),
    ] {
        batches
            .get_or_create(&StageLabel {
                stage: stage.to_string(),
            })
            .inc_by(v.load(Ordering::Relaxed));
    }
    r.register("batches", "Batches that reached each stage", batches);
    r.register(
        "export_retries",
        "Export attempts that failed and were scheduled again",
        ConstCounter::new(s.export_retries.load(Ordering::Relaxed)),
    );
    r.register(
        "processing_runs",
        "Processing runs that ended (not those cut by a stop)",
        ConstCounter::new(s.processing_runs.load(Ordering::Relaxed)),
    );
    let processing_failures = Family::<KindLabel, Counter>::default();
    for (kind, n) in s.processing_failures.by_kind() {
        processing_failures
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc_by(n);
    }
    r.register(
        "processing_failures",
        "Processing runs that failed, by kind: timeout, exit_status, signal, not_started, \
         wait_failed, output_unreadable, no_output, failed (a library processor's error)",
        processing_failures,
    );
    r.register(
        "processing_seconds",
        "Seconds the processing runs took in all",
        ConstCounter::new(s.processing_micros.load(Ordering::Relaxed) as f64 / 1e6),
    );
    r.register(
        "processing_duration_seconds",
        "Seconds each processing run took (runs cut by a stop are not counted)",
        s.processing_seconds.0.clone(),
    );
    let export_failures = Family::<DestinationLabel, Counter>::default();
    for (i, n) in s.export_failures.iter().enumerate() {
        export_failures
            .get_or_create(&DestinationLabel {
                destination: shared.net.config.export_name(i),
            })
            .inc_by(n.load(Ordering::Relaxed));
    }
    r.register(
        "export_failures",
        "Failed export attempts, by destination (its [[export]] name)",
        export_failures,
    );
    r.register(
        "late_arrivals",
        "Instances that reached a patient soon after its batch was claimed",
        ConstCounter::new(s.late_arrivals.load(Ordering::Relaxed)),
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

/// Sent with every answer. The status page needs nothing but its own inline CSS, so a policy
/// that allows nothing else means text a peer sent (a Patient ID, an AE title) could not run
/// script or load anything even if it escaped the page's HTML escaping.
const SAFETY_HEADERS: &str =
    "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
     X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n";

/// Longest request head we read; a longer one gets 431 and the connection closed.
const MAX_REQUEST: usize = 8 << 10;
/// The most one connection may take from its accept, reading its request and writing the
/// answer: a client that sends or reads one byte at a time is cut at this point.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Failed batches one `POST /api/retry` moves back at most (each is flushed to disk): the rest
/// wait for the next request, and the answer says how many.
const RETRY_AT_ONCE: usize = 100;

/// Threads that answer requests whose head has arrived (besides the `http` thread, which
/// accepts and reads heads).
pub const HTTP_THREADS: usize = 4;
/// Connections whose request head is still awaited, at most. One more evicts the oldest of
/// them (the one nearest its deadline), so a flood of silent connections costs a bounded
/// number of descriptors and never keeps a prompt client, such as a liveness probe, out.
pub const MAX_PENDING_HEADS: usize = 256;
/// Heads read, waiting for a free answering thread.
const ANSWER_QUEUE: usize = 64;
/// After an accept failed for want of descriptors, how soon it is tried again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// The time a connection whose head never completed gets for its 431 (its own deadline has
/// passed by then).
const LATE_ANSWER: std::time::Duration = std::time::Duration::from_millis(500);

/// A connection whose request head is being read (by the `http` thread, non-blocking).
struct Reading {
    stream: mio::net::TcpStream,
    peer: std::net::SocketAddr,
    head: Vec<u8>,
    accepted: std::time::Instant,
}

/// A request head read whole (or the connection's reason to get 431), for an answering thread.
struct Request {
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    head: Vec<u8>,
    complete: bool,
    accepted: std::time::Instant,
}

/// Serves the endpoint until `shared.net.shutdown` is set (the stopper connects once to wake
/// the accept). One thread (this one) accepts and reads request heads without blocking, for
/// any number of connections up to [`MAX_PENDING_HEADS`], each within [`DEADLINE`] of its
/// accept; [`HTTP_THREADS`] threads answer the requests whose head has arrived. So a client
/// that connects and sends nothing (a port scanner, a load balancer's TCP check) holds no
/// answering thread, and a `/healthz` probe behind any number of them is answered at once.
/// Deliberately small: a few GET paths, `Connection: close`, bounded request size and time, a
/// fixed number of threads (never one per client).
pub fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, reactors: usize) {
    let (tx, rx) = crossbeam_channel::bounded::<Request>(ANSWER_QUEUE);
    std::thread::scope(|scope| {
        for i in 0..HTTP_THREADS {
            let rx = rx.clone();
            let shared = &shared;
            let started = std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn_scoped(scope, move || {
                    while let Ok(r) = rx.recv() {
                        answer(r, shared, reactors);
                    }
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "http: fewer answering threads");
            }
        }
        drop(rx);
        if let Err(e) = read_heads(listener, &shared, &tx) {
            tracing::error!(error = %e, "http endpoint stopped");
        }
        drop(tx); // the answering threads end once the queue is empty
    });
}

/// The `http` thread: accepts, reads each request head without blocking, and hands complete
/// heads (and overdue or oversized ones, to be answered 431) to the answering threads.
fn read_heads(
    listener: std::net::TcpListener,
    shared: &Shared,
    tx: &crossbeam_channel::Sender<Request>,
) -> std::io::Result<()> {
    use mio::{Events, Interest, Poll, Token};
    use std::io::Read;
    const LISTENER: Token = Token(usize::MAX);
    listener.set_nonblocking(true)?;
    let mut listener = mio::net::TcpListener::from_std(listener);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(256);
    let mut conns: Vec<Option<Reading>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    // Slots in accept order, so deadline order: the front is the oldest (stale entries, whose
    // slot was emptied or reused, are skipped by their accept time).
    let mut order: std::collections::VecDeque<(std::time::Instant, usize)> =
        std::collections::VecDeque::new();
    let mut pending = 0usize;
    let mut accept_again = false;
    loop {
        let mut timeout = order
            .front()
            .map(|(t, _)| DEADLINE.saturating_sub(t.elapsed()));
        if accept_again {
            // An accept failed for want of descriptors (EMFILE, ENFILE): the edge-triggered
            // listener would not tell of the backlog again until a new connection came.
            timeout = Some(timeout.map_or(ACCEPT_RETRY, |t| t.min(ACCEPT_RETRY)));
        }
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        if shared.net.shutdown.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut ready: Vec<usize> = Vec::new();
        let listener_ready = std::mem::take(&mut accept_again);
        let mut accepting = listener_ready;
        for ev in events.iter() {
            if ev.token() != LISTENER {
                ready.push(ev.token().0);
            } else {
                accepting = true;
            }
        }
        if accepting {
            loop {
                let (mut stream, peer) = match listener.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        // EMFILE and friends: retried after ACCEPT_RETRY (above).
                        tracing::warn!(error = %e, "http accept failed");
                        accept_again = true;
                        break;
                    }
                };
                if pending >= MAX_PENDING_HEADS {
                    // Evict the oldest pending connection (closed unanswered).
                    while let Some((t, idx)) = order.pop_front() {
                        if conns.get(idx).and_then(Option::as_ref).map(|c| c.accepted) == Some(t) {
                            if let Some(mut c) = conns[idx].take() {
                                let _ = poll.registry().deregister(&mut c.stream);
                            }
                            free.push(idx);
                            pending -= 1;
                            break;
                        }
                    }
                }
                let idx = free.pop().unwrap_or_else(|| {
                    conns.push(None);
                    conns.len() - 1
                });
                if poll
                    .registry()
                    .register(&mut stream, Token(idx), Interest::READABLE)
                    .is_err()
                {
                    free.push(idx);
                    continue;
                }
                let accepted = std::time::Instant::now();
                conns[idx] = Some(Reading {
                    stream,
                    peer,
                    head: Vec::with_capacity(512),
                    accepted,
                });
                order.push_back((accepted, idx));
                pending += 1;
                ready.push(idx); // its head may already be there
            }
        }
        // Read what arrived; a head that is complete, too long, or whose peer closed goes on.
        for idx in ready {
            let Some(c) = conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            let mut buf = [0u8; 2048];
            let done = loop {
                if c.head.windows(4).any(|w| w == b"\r\n\r\n") {
                    break Some(true);
                }
                if c.head.len() > MAX_REQUEST {
                    break Some(false);
                }
                match c.stream.read(&mut buf) {
                    Ok(0) => break Some(false),
                    Ok(n) => c.head.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break Some(false),
                }
            };
            if let Some(complete) = done {
                if let Some(c) = conns[idx].take() {
                    free.push(idx);
                    pending -= 1;
                    hand_over(&poll, c, complete, tx);
                }
            }
        }
        // Past their deadline: answered 431 ("incomplete").
        while let Some(&(t, idx)) = order.front() {
            let live = conns.get(idx).and_then(Option::as_ref).map(|c| c.accepted) == Some(t);
            if live && t.elapsed() < DEADLINE {
                break;
            }
            order.pop_front();
            if live {
                if let Some(c) = conns[idx].take() {
                    free.push(idx);
                    pending -= 1;
                    hand_over(&poll, c, false, tx);
                }
            }
        }
    }
}

/// Hands a connection whose head reading ended to an answering thread (blocking again, with
/// timeouts); with every thread busy and the queue full, the connection is closed.
fn hand_over(
    poll: &mio::Poll,
    mut c: Reading,
    complete: bool,
    tx: &crossbeam_channel::Sender<Request>,
) {
    let _ = poll.registry().deregister(&mut c.stream);
    // mio's stream is a std stream underneath (Unix): back to blocking for the answer.
    let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(c.stream));
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = tx.try_send(Request {
        stream,
        peer: c.peer,
        head: c.head,
        complete,
        accepted: c.accepted,
    });
}

/// Answers one request on an answering thread, within the connection's [`DEADLINE`] (counted
/// from its accept).
fn answer(r: Request, shared: &Shared, reactors: usize) {
    use std::io::Write;
    let Request {
        mut stream,
        peer,
        head,
        complete,
        accepted: started,
    } = r;
    // A head that never completed is past its deadline by now: its 431 gets a short time of
    // its own (else it would be closed unanswered).
    let budget = if complete {
        DEADLINE
    } else {
        started.elapsed() + LATE_ANSWER
    };
    let (code, body, ctype) = if !complete {
        (
            431,
            "request head too large or incomplete\n".to_string(),
            "text/plain",
        )
    } else {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let shows_patients = path == "/" || path == "/index.html" || path.starts_with("/api/");
        if shows_patients && !host_allowed(&head, &shared.net.config.http) {
            (
                403,
                "refused: the Host header names no address of this node; add the name to \
                     [http] allowed_hosts\n"
                    .into(),
                "text/plain",
            )
        } else if method == "POST" {
            match may_mutate(&head, peer, &shared.net.config.http) {
                Ok(()) => mutate(path, shared),
                Err(why) => (403, format!("{why}\n"), "text/plain"),
            }
        } else if method != "GET" && method != "HEAD" {
            (
                405,
                "only GET, and POST to /api/retry and /api/force\n".into(),
                "text/plain",
            )
        } else {
            respond(path, shared, reactors)
        }
    };
    let reason = match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    // The head too is written within the connection's deadline.
    let left = budget.saturating_sub(started.elapsed());
    if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
        return;
    }
    if write!(
            stream,
            "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{SAFETY_HEADERS}Connection: close\r\n\r\n",
            body.len()
        )
        .is_err()
        {
            return;
        }
    // Write by write, each given the time left, so that a client reading slowly is cut at
    // the deadline.
    let mut rest = body.as_bytes();
    while !rest.is_empty() {
        let left = budget.saturating_sub(started.elapsed());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            break;
        }
        match stream.write(rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest = &rest[n..],
        }
    }
}

/// The answer for `path`: (status, body, content type).
fn respond(path: &str, shared: &Shared, reactors: usize) -> (u16, String, &'static str) {
    match path {
        "/metrics" => (
            200,
            render(shared),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/" | "/index.html" => (
            200,
            status::render_html(&status::collect(shared)),
            "text/html; charset=utf-8",
        ),
        "/api/status" => match status::render_json(&status::collect(shared)) {
            Ok(json) => (200, json, "application/json"),
            Err(e) => (500, format!("{e}\n"), "text/plain"),
        },
        "/healthz" => match health(shared, reactors) {
            Ok(()) => (200, "ok\n".into(), "text/plain"),
            Err(why) => (503, format!("unhealthy: {why}\n"), "text/plain"),
        },
        "/readyz" => {
            let why = if shared.net.draining.load(Ordering::Acquire) {
                Some("draining".to_string())
            // Fenced (taken over while cut off from the cluster database): every store would
            // fail, so the load balancer should send its senders to another node.
            } else if let Some(m) = shared.fence.as_ref().and_then(|f| f.check().err()) {
                Some(format!("fenced: {m}"))
            } else {
                data_dir_problem(&shared.net.config)
            };
            match why {
                None => (200, "ready\n".into(), "text/plain"),
                Some(w) => (503, format!("{w}\n"), "text/plain"),
            }
        }
        _ => (404, "not found\n".into(), "text/plain"),
    }
}

/// Why the node is not healthy, if it is not: it is stopping, a reactor has ended, or one of
/// the storage or pipeline threads or (while not draining) an acceptor
/// ([`crate::net::Shared::watched`]) has ended (a panic, say: its work is
/// no longer done; restart the node).
fn health(shared: &Shared, reactors: usize) -> Result<(), String> {
    if shared.net.shutdown.load(Ordering::Acquire) {
        return Err("stopping".into());
    }
    let running = shared.net.reactors_running.load(Ordering::Acquire);
    if running != reactors {
        return Err(format!("{running} of {reactors} reactor threads running"));
    }
    let ended: Vec<String> = match shared.net.watched.lock() {
        Ok(w) => w
            .iter()
            .filter(|t| t.is_finished())
            .map(|t| t.thread().name().unwrap_or("unnamed").to_string())
            .collect(),
        Err(_) => vec!["(a thread panicked holding the list)".into()],
    };
    // A draining node's acceptors end by design (no new associations).
    let draining = shared.net.draining.load(Ordering::Acquire);
    let (acceptors, others): (Vec<String>, Vec<String>) =
        ended.into_iter().partition(|n| n.starts_with("acceptor"));
    if !others.is_empty() {
        Err(format!(
            "storage or pipeline thread(s) ended: {}",
            others.join(", ")
        ))
    } else if !acceptors.is_empty() && !draining {
        Err(format!(
            "acceptor thread(s) ended (no new associations are accepted): {}",
            acceptors.join(", ")
        ))
    } else {
        Ok(())
    }
}

/// The value of request header `name` (case-insensitive) in a request head, if present.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        // The blank line ends the head; what follows is a body.
        .take_while(|line| !line.is_empty());
    lines.find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (k, v) = line.split_at(colon);
        k.eq_ignore_ascii_case(name.as_bytes())
            .then(|| v.get(1..).unwrap_or_default().trim_ascii())
    })
}

/// Whether the request's `Host` names this node: no `Host` (an HTTP/1.0 client; browsers always
/// send one), an IP literal, `localhost`, or a name in `[http] allowed_hosts`. A page whose own
/// name was pointed at this address (DNS rebinding) sends its name, and is refused.
fn host_allowed(head: &[u8], http: &crate::config::HttpConfig) -> bool {
    if headers_named(head, "host") > 1 {
        return false; // RFC 9112 3.2: a request with more than one Host is refused
    }
    let Some(h) = header(head, "host") else {
        return true;
    };
    let h = String::from_utf8_lossy(h);
    let host = host_part(&h);
    host.parse::<std::net::IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || http
            .allowed_hosts
            .iter()
            .any(|a| host_part(a.trim()).eq_ignore_ascii_case(host))
}

/// The host of `host[:port]` or `[v6][:port]`.
fn host_part(h: &str) -> &str {
    match h.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => match h.rsplit_once(':') {
            // One colon: a port. More: a bare IPv6 address.
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => h,
        },
    }
}

/// How many header lines of the request head are named `name`.
fn headers_named(head: &[u8], name: &str) -> usize {
    head.split(|&b| b == b'\n')
        .skip(1)
        .map(<[u8]>::trim_ascii)
        .take_while(|line| !line.is_empty())
        .filter(|line| {
            line.iter()
                .position(|&b| b == b':')
                .is_some_and(|c| line[..c].eq_ignore_ascii_case(name.as_bytes()))
        })
        .count()
}

/// The bearer token of `[http] token_file` (its first 4 KiB, trimmed), if one is set and
/// readable.
fn token(http: &crate::config::HttpConfig) -> Option<Vec<u8>> {
    use std::io::Read;
    let path = http.token_file.trim();
    if path.is_empty() {
        return None;
    }
    let mut t = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut t))
        .ok()?;
    Some(t.trim_ascii().to_vec()).filter(|t| !t.is_empty())
}

/// Whether a mutating request may run: with the bearer token of `[http] token_file` when one
/// is set (from every peer: behind a reverse proxy or a port forward every peer is loopback),
/// else from a loopback peer; never one a browser sent on a page's behalf (it carries
/// `Origin`: a page elsewhere, or one reached by DNS rebinding, cannot make the node act).
fn may_mutate(
    head: &[u8],
    peer: std::net::SocketAddr,
    http: &crate::config::HttpConfig,
) -> Result<(), &'static str> {
    if header(head, "origin").is_some() {
        return Err(
            "refused: a request from a web page (Origin header); use dicomgate retry or curl",
        );
    }
    let configured = !http.token_file.trim().is_empty();
    if let Some(auth) = header(head, "authorization") {
        // The scheme is case-insensitive (RFC 9110 11.1).
        let sent = (auth.len() > 7 && auth[..7].eq_ignore_ascii_case(b"bearer "))
            .then(|| auth[7..].trim_ascii());
        return match (token(http), sent) {
            (Some(t), Some(s)) if constant_time_eq(&t, s) => Ok(()),
            _ => Err("refused: the bearer token is not the one in [http] token_file"),
        };
    }
    if configured {
        return Err("refused: [http] token_file is set, so every mutating request must send its bearer token (dicomgate retry/force --token-file)");
    }
    if peer.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err("refused: mutating requests are answered for loopback peers only, or with the bearer token of [http] token_file")
    }
}

/// `%XX` escapes decoded (RFC 3986 2.1); `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None; // from_str_radix alone would take "+1"
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Compares without stopping at the first difference (a token's prefix cannot be timed).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a permitted mutating request: `POST /api/retry/{batch}` (one failed batch) or
/// `POST /api/retry` (every failed batch). The answer is JSON: `{"retried": [ids],
/// "errors": [{"batch", "error"}]}`, 200 when nothing failed, 404 for an unknown batch, else
/// 409.
fn mutate(path: &str, shared: &Shared) -> (u16, String, &'static str) {
    let p = &shared.pipeline;
    if let Some(patient) = path.strip_prefix("/api/force/") {
        // `POST /api/force/{patient}`: a percent-encoded grouping key or patient folder name.
        let Some(patient) = percent_decode(patient) else {
            return (
                404,
                "not a percent-encoded UTF-8 patient\n".into(),
                "text/plain",
            );
        };
        return match p.force(&patient) {
            Ok(key) => (
                200,
                format!("{}\n", serde_json::json!({ "forced": key })),
                "application/json",
            ),
            Err(e) => (
                if e.contains("stopping") {
                    503
                } else if e.contains("open association") {
                    409
                } else {
                    404
                },
                format!("{}\n", serde_json::json!({ "error": e })),
                "application/json",
            ),
        };
    }
    let mut ids: Vec<String> = match path.strip_prefix("/api/retry") {
        // Only the bare path means "all": `/api/retry/` is an empty id (a script's unset
        // variable), not a request to retry everything.
        Some("") => p.failed_ids(),
        Some(rest) => match rest.strip_prefix('/') {
            Some(id) => vec![id.to_string()],
            None => return (404, "not found\n".into(), "text/plain"),
        },
        None => return (404, "not found\n".into(), "text/plain"),
    };
    let left = ids.len().saturating_sub(RETRY_AT_ONCE);
    ids.truncate(RETRY_AT_ONCE);
    let (mut retried, mut errors) = (Vec::new(), Vec::new());
    let mut unknown = false;
    for id in ids {
        if !crate::pipeline::batch::is_batch_id(&id) {
            unknown = true;
            errors.push(serde_json::json!({"batch": id, "error": "not a batch id"}));
            continue;
        }
        if !shared
            .net
            .config
            .node
            .data_dir
            .join("failed")
            .join(&id)
            .is_dir()
        {
            unknown = true;
        }
        match p.retry_failed(&id) {
            Ok(()) => retried.push(id),
            Err(e) => errors.push(serde_json::json!({"batch": id, "error": e})),
        }
    }
    let code = match (errors.is_empty(), unknown) {
        (true, _) => 200,
        (false, true) => 404,
        (false, false) => 409,
    };
    let body = serde_json::json!({"retried": retried, "errors": errors, "left": left});
    (code, format!("{body}\n"), "application/json")
}

/// Why the data directory cannot take instances now, if it cannot: not writable by us, or
/// less free space than two log segments (a full disk answers every store 0xA700).
fn data_dir_problem(config: &crate::config::Config) -> Option<String> {
    let dir = &config.node.data_dir;
    if rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_err() {
        return Some("data directory not writable".into());
    }
    match rustix::fs::statvfs(dir) {
        Ok(st) => {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let want = 2 * config.storage.segment_bytes;
            (free < want).then(|| format!("data directory has {free} bytes free, under {want}"))
        }
        Err(e) => Some(format!("data directory: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn http(token_file: &str) -> crate::config::HttpConfig {
        crate::config::HttpConfig {
            listen: String::new(),
            token_file: token_file.into(),
            allowed_hosts: Vec::new(),
        }
    }

    const LOOPBACK: &str = "127.0.0.1:5000";
    const REMOTE: &str = "192.0.2.7:5000";

    #[test]
    fn headers_are_found_case_insensitively() {
        let head = b"POST /api/retry HTTP/1.1\r\nHost: x\r\nAUTHORIZATION:  Bearer abc \r\n\r\n";
        assert_eq!(header(head, "authorization"), Some(&b"Bearer abc"[..]));
        assert_eq!(header(head, "origin"), None);
        // The request line is not a header.
        assert_eq!(
            header(b"POST /origin: x HTTP/1.1\r\n\r\n", "post /origin"),
            None
        );
        // Nor is a body line.
        assert_eq!(
            header(b"POST / HTTP/1.1\r\n\r\nOrigin: x\r\n", "origin"),
            None
        );
    }

    /// Mutations: loopback peers by default, any peer with the token, never a web page's.
    #[test]
    fn who_may_mutate() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let token = token.display().to_string();
        let plain = b"POST /api/retry HTTP/1.1\r\n\r\n";
        let with = |h: &str| format!("POST /api/retry HTTP/1.1\r\n{h}\r\n\r\n").into_bytes();
        assert!(may_mutate(plain, LOOPBACK.parse().unwrap(), &http("")).is_ok());
        assert!(may_mutate(plain, REMOTE.parse().unwrap(), &http("")).is_err());
        assert!(may_mutate(plain, REMOTE.parse().unwrap(), &http(&token)).is_err());
        let good = with("Authorization: Bearer s3cret");
        assert!(may_mutate(&good, REMOTE.parse().unwrap(), &http(&token)).is_ok());
        assert!(may_mutate(&good, REMOTE.parse().unwrap(), &http("")).is_err());
        let bad = with("Authorization: Bearer s3cre");
        assert!(may_mutate(&bad, LOOPBACK.parse().unwrap(), &http(&token)).is_err());
        let page = with("Origin: http://127.0.0.1:8104");
        assert!(may_mutate(&page, LOOPBACK.parse().unwrap(), &http("")).is_err());
        // An empty token file allows no one by token.
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = dir.path().join("empty").display().to_string();
        let blank = with("Authorization: Bearer ");
        assert!(may_mutate(&blank, REMOTE.parse().unwrap(), &http(&empty)).is_err());
        // Found in review: with a token set, a loopback peer without it was let through (behind
        // a reverse proxy or a port forward every peer is loopback).
        assert!(may_mutate(plain, LOOPBACK.parse().unwrap(), &http(&token)).is_err());
        assert!(may_mutate(&good, LOOPBACK.parse().unwrap(), &http(&token)).is_ok());
        let lower = with("authorization: bearer s3cret");
        assert!(may_mutate(&lower, REMOTE.parse().unwrap(), &http(&token)).is_ok());
        // A loopback client on a dual-stack listener.
        assert!(may_mutate(plain, "[::ffff:127.0.0.1]:5000".parse().unwrap(), &http("")).is_ok());
    }

    /// Found in review: a page whose own name was pointed at 127.0.0.1 (DNS rebinding) could
    /// read the status page; only IP literals, localhost and `allowed_hosts` are answered.
    #[test]
    fn host_header_must_name_this_node() {
        let req = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
        let mut cfg = http("");
        for ok in [
            "127.0.0.1:8104",
            "127.0.0.1",
            "[::1]:8104",
            "localhost:8104",
            "LOCALHOST",
            "10.1.2.3",
        ] {
            assert!(host_allowed(&req(ok), &cfg), "{ok}");
        }
        for bad in [
            "evil.example:8104",
            "evil.example",
            "127.0.0.1.evil.example",
            "gate:80",
        ] {
            assert!(!host_allowed(&req(bad), &cfg), "{bad}");
        }
        assert!(
            host_allowed(b"GET / HTTP/1.0\r\n\r\n", &cfg),
            "no Host: not a browser"
        );
        cfg.allowed_hosts = vec!["gate".into(), "pacs-gw:8104".into()];
        assert!(host_allowed(&req("gate:80"), &cfg));
        assert!(host_allowed(&req("GATE"), &cfg));
        // Found in review: a listed name with a port never matched; two Host headers.
        assert!(host_allowed(&req("pacs-gw:8104"), &cfg));
        assert!(host_allowed(&req("::1"), &cfg), "a bare IPv6 literal");
        let two = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n";
        assert!(!host_allowed(two, &cfg));
    }

    /// Found in review: `%+1` was decoded as 0x01 (from_str_radix takes a sign).
    #[test]
    fn percent_decoding_takes_two_hex_digits() {
        assert_eq!(percent_decode("A%20B%2Fc").as_deref(), Some("A B/c"));
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%FF"), None, "not UTF-8");
    }
}
