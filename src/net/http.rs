//! The node's HTTP endpoint (`[http] listen`), on its own thread, off the reactors:
//! `/metrics` in the OpenMetrics text format (encoded by prometheus-client), `/healthz` (200
//! while every reactor runs and the node is not stopping, else 503) and `/readyz` (200 while
//! not draining and the data directory is writable, else 503).
//!
//! Owns: serving those three paths, and building each scrape from the node's counters (read,
//! never reset). Must never block a reactor or touch the data path beyond reading counters;
//! a slow scraper holds only this thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Shared;

/// Counters the reactors keep for the endpoint (all monotonic).
#[derive(Debug, Default)]
pub struct Counters {
    /// Instances stored (C-STORE success answered or answerable) and their bytes.
    pub instances: AtomicU64,
    pub bytes: AtomicU64,
    /// Associations ended, by outcome (released, aborted, aborted_by_peer, rejected,
    /// protocol_error, closed).
    pub associations: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests answered with a failure status, by status.
    pub failures: Mutex<BTreeMap<u16, u64>>,
}

impl Counters {
    /// An association ended with this outcome text (the service's).
    pub fn association_ended(&self, outcome: &str) {
        let kind = if outcome.starts_with("released") {
            "released"
        } else if outcome.starts_with("aborted by peer") {
            "aborted_by_peer"
        } else if outcome.starts_with("aborted") {
            "aborted"
        } else if outcome.starts_with("rejected") {
            "rejected"
        } else if outcome.starts_with("protocol error") {
            "protocol_error"
        } else {
            "closed"
        };
        if let Ok(mut m) = self.associations.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    pub fn failure(&self, status: u16) {
        if let Ok(mut m) = self.failures.lock() {
            *m.entry(status).or_default() += 1;
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

/// One scrape: the node's counters as OpenMetrics text.
pub fn render(shared: &Shared) -> String {
    let mut r = Registry::with_prefix("dicomgate");
    let c = &shared.counters;
    r.register(
        "instances_stored",
        "Instances stored (a C-STORE success answered)",
        ConstCounter::new(c.instances.load(Ordering::Relaxed)),
    );
    r.register(
        "stored_bytes",
        "Bytes of the instances stored (Part-10 files or log records)",
        ConstCounter::new(c.bytes.load(Ordering::Relaxed)),
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
        gauge(shared.connections.load(Ordering::Relaxed)),
    );
    r.register(
        "buffered_bytes",
        "Data set bytes held in memory node-wide ([limits] max_buffered_bytes bounds it)",
        gauge(shared.budget.used()),
    );
    r.register(
        "buffered_bytes_limit",
        "[limits] max_buffered_bytes",
        gauge(shared.config.limits.max_buffered_bytes),
    );
    r.register(
        "pending_patients",
        "Patients with instances waiting for their batch",
        gauge(shared.pipeline.map.len()),
    );
    r.register(
        "reactors_running",
        "Reactor threads running",
        gauge(shared.reactors_running.load(Ordering::Relaxed)),
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

/// Serves requests until the server is unblocked (the node stops).
pub fn serve(server: Arc<tiny_http::Server>, shared: Arc<Shared>, reactors: usize) {
    use tiny_http::{Header, Response};
    let text = |s: &str| Header::from_bytes("Content-Type", s).ok();
    for req in server.incoming_requests() {
        let (code, body, ctype) = match req.url() {
            "/metrics" => (
                200,
                render(&shared),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            "/healthz" => {
                let ok = shared.reactors_running.load(Ordering::Acquire) == reactors
                    && !shared.shutdown.load(Ordering::Acquire);
                (
                    if ok { 200 } else { 503 },
                    if ok { "ok\n" } else { "unhealthy\n" }.into(),
                    "text/plain",
                )
            }
            "/readyz" => {
                let draining = shared.draining.load(Ordering::Acquire);
                let probe = shared
                    .config
                    .node
                    .data_dir
                    .join(format!(".readyz.{}", std::process::id()));
                let writable = std::fs::write(&probe, b"")
                    .and_then(|()| std::fs::remove_file(&probe))
                    .is_ok();
                let ok = !draining && writable;
                let why = if draining {
                    "draining\n"
                } else if !writable {
                    "data directory not writable\n"
                } else {
                    "ready\n"
                };
                (if ok { 200 } else { 503 }, why.into(), "text/plain")
            }
            _ => (404, "not found\n".into(), "text/plain"),
        };
        let mut resp = Response::from_string(body).with_status_code(code);
        if let Some(h) = text(ctype) {
            resp = resp.with_header(h);
        }
        let _ = req.respond(resp);
    }
}
