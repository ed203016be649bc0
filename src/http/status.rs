//! The node's status for operators (issue 12 items 3 and 4): one [`Status`] snapshot, served by
//! the HTTP thread as JSON (`GET /api/status`) and as a self-contained HTML page (`GET /`), and
//! fetched and printed by `dicomgate status` ([`fetch`], [`render_text`]); and the client side
//! of `dicomgate retry` ([`retry`]; the endpoint is in [`crate::http`]).
//!
//! Owns: gathering the snapshot (node, associations, pending patients with each input's
//! progress from [`Rules::explain`](crate::pipeline::rules::Rules::explain), batches on disk,
//! throughput), and the three renderings. Everything listed is bounded ([`MAX_PATIENTS_LISTED`],
//! [`MAX_BATCHES_LISTED`], the counters' rings), and every text that came from a peer (Patient
//! ID, AE titles, reasons) is escaped for where it goes: HTML-escaped on the page, control
//! characters escaped on the terminal. Runs on the HTTP thread only: reads the patient map
//! (one pin per patient) and small files, never blocks a reactor, writes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::Shared;
pub use crate::net::counters::RecentAssociation;
use crate::pipeline::rules::InputProgress;
use crate::pipeline::BatchOnDisk;

/// Pending patients listed at most (the most recently active first); the rest are counted.
pub const MAX_PATIENTS_LISTED: usize = 1000;
/// Batches listed at most in each of `batches/` and `failed/`; the rest are counted.
pub const MAX_BATCHES_LISTED: usize = 200;

/// What `GET /api/status` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeStatus,
    pub associations: Associations,
    pub patients: Patients,
    pub batches: Batches,
    pub throughput: Throughput,
    /// With `[cluster]`: this node's side of the cluster database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// This node's side of the cluster (issue 15): its lease, its partitions, and how far
/// publication lags behind acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: String,
    /// Whether the node holds a working connection to the cluster database.
    pub connected: bool,
    /// Whether that connection is TLS (as the database reports it, `pg_stat_ssl`); false
    /// while not connected.
    #[serde(default)]
    pub tls: bool,
    /// Live nodes and the partitions this node owns, as of its last lease renewal.
    pub live_nodes: u64,
    pub owned_partitions: u64,
    pub partitions: u32,
    /// Records published, and acknowledged ones not yet published.
    pub published: u64,
    pub unpublished: usize,
    /// Milliseconds since the oldest unpublished record was acknowledged.
    pub lag_ms: u64,
    /// Records not queued (the queue was full), and how many of them a rescan of the node's
    /// folder has published since.
    pub left_out: u64,
    #[serde(default)]
    pub rescanned: u64,
    /// Records of dead nodes this node published from their folders (takeover).
    #[serde(default)]
    pub taken_over: u64,
    /// Records a rescan of this node's folder sent again (most were published before).
    #[serde(default)]
    pub republished: u64,
    /// Times the database was found to have lost commits this node saw, and how many of
    /// those a finished rescan covered.
    #[serde(default)]
    pub rewinds: u64,
    #[serde(default)]
    pub rewinds_rescanned: u64,
    /// Every node of the cluster, as of this node's last lease renewal.
    #[serde(default)]
    pub nodes: Vec<crate::cluster::NodeRow>,
    pub failures: u64,
    pub last_error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: String,
    pub ae_title: String,
    /// The address the DICOM listener is bound to (`[node] listen`, its port resolved); ""
    /// when TLS only.
    pub listen: String,
    /// The address the DICOM TLS listener is bound to (`[tls] listen`); "" = none.
    #[serde(default)]
    pub tls_listen: String,
    pub uptime_seconds: u64,
    /// A graceful stop is under way: no new associations.
    pub draining: bool,
    /// The node's clock when the snapshot was taken (ms since the Unix epoch).
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Associations {
    /// Associations holding a slot now (`[limits] max_associations` bounds them).
    pub open: usize,
    /// TCP connections open (associated or not).
    pub connections: usize,
    /// The last associations that ended, newest first (at most
    /// [`RECENT_ASSOCIATIONS`](crate::net::counters::RECENT_ASSOCIATIONS)).
    pub recent: Vec<RecentAssociation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patients {
    /// Patients with instances waiting for their batch.
    pub pending: usize,
    /// The grouping tag's keyword (`[patients] group_by`).
    pub group_by: String,
    /// The most recently active pending patients, at most [`MAX_PATIENTS_LISTED`].
    pub listed: Vec<PendingPatient>,
    /// Pending patients not listed.
    pub more: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPatient {
    /// The grouping key's digest: the patient's folder under `patients/` when grouping by
    /// Patient ID (the default), and the digest in its batch ids.
    pub digest: String,
    /// The grouping key as text (invalid UTF-8 replaced).
    pub key: String,
    /// The Patient ID, when the grouping tag is PatientID.
    pub patient_id: Option<String>,
    pub instances: u32,
    pub bytes: u64,
    pub series: usize,
    pub last_arrival_ms: u64,
    pub seconds_since_last_arrival: u64,
    /// Open associations that sent this patient something.
    pub open_associations: u32,
    /// Every input's rules hold, or for a `one_of` group one input's (the batch is claimed at
    /// the next trigger): [`Rules::sufficient`](crate::pipeline::rules::Rules::sufficient).
    pub sufficient: bool,
    /// Why not, as the checker logs it ("input ct: 40 of 100 instances").
    pub not_sufficient_because: Option<String>,
    /// Each input's progress in words ("ct: 40 of 100 instances; single_series: ok").
    pub progress: Vec<String>,
    /// The same, rule by rule.
    pub inputs: Vec<InputProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batches {
    /// Batches in `batches/` (being claimed, processed or exported).
    pub in_flight: usize,
    /// The listed ones by stage (`batches/<id>/state`).
    pub by_stage: BTreeMap<String, usize>,
    /// The oldest first, at most [`MAX_BATCHES_LISTED`].
    pub listed: Vec<BatchOnDisk>,
    /// Batches in `failed/`.
    pub failed: usize,
    /// The newest first, at most [`MAX_BATCHES_LISTED`], each with the head of its reason.
    pub failed_listed: Vec<BatchOnDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throughput {
    pub instances_total: u64,
    pub bytes_total: u64,
    /// Instances and bytes stored in each of the last seconds, oldest first (at most
    /// [`THROUGHPUT_SECONDS`](crate::net::counters::THROUGHPUT_SECONDS)).
    pub instances_per_second: Vec<u64>,
    pub bytes_per_second: Vec<u64>,
}

/// Takes the snapshot. Cost: one pass over the patient map (a pin per patient), the rules
/// explained for the listed patients, and a directory listing of `batches/` and `failed/`.
pub fn collect(shared: &Shared) -> Status {
    let now = crate::pipeline::now_ms();
    let c = &shared.net.counters;
    let p = &shared.pipeline;
    let mut recent: Vec<RecentAssociation> = c
        .recent
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    recent.reverse();

    let mut views = Vec::new();
    p.map.for_each_patient(|patient, g| {
        let v = patient.view(g);
        if v.snapshot.instances > 0 {
            views.push((patient.key().to_vec(), v));
        }
    });
    let pending = views.len();
    views.sort_by_key(|v| std::cmp::Reverse(v.1.last_arrival_ms));
    views.truncate(MAX_PATIENTS_LISTED);
    let by_patient_id = shared.net.config.patients.group_by == "PatientID";
    let listed: Vec<PendingPatient> = views
        .iter()
        .map(|(key, v)| {
            let s = &v.snapshot;
            let inputs = p.rules.explain(s);
            let why_not = p.rules.sufficient(s).err();
            let text = String::from_utf8_lossy(key).into_owned();
            PendingPatient {
                digest: crate::storage::patient_dir_name(key),
                patient_id: by_patient_id.then(|| text.clone()),
                key: text,
                instances: s.instances,
                bytes: s.bytes,
                series: s.series.len(),
                last_arrival_ms: v.last_arrival_ms,
                seconds_since_last_arrival: now.saturating_sub(v.last_arrival_ms) / 1000,
                open_associations: v.open_associations,
                sufficient: why_not.is_none(),
                not_sufficient_because: why_not,
                progress: inputs.iter().map(InputProgress::summary).collect(),
                inputs,
            }
        })
        .collect();

    let (in_flight_listed, in_flight, failed_listed, failed) =
        crate::pipeline::batches_on_disk(&shared.net.config.node.data_dir, MAX_BATCHES_LISTED);
    let mut by_stage = BTreeMap::new();
    for b in &in_flight_listed {
        *by_stage.entry(b.stage.clone()).or_insert(0) += 1;
    }
    let (instances_per_second, bytes_per_second) = c.throughput().into_iter().unzip();
    Status {
        node: NodeStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            ae_title: shared.net.config.node.ae_title.clone(),
            listen: shared
                .net
                .local_addr
                .map_or_else(String::new, |a| a.to_string()),
            tls_listen: shared
                .net
                .tls_addr
                .map_or_else(String::new, |a| a.to_string()),
            uptime_seconds: c.started.elapsed().as_secs(),
            draining: shared.net.draining.load(Ordering::Acquire),
            now_ms: now,
        },
        associations: Associations {
            open: shared.net.associations.active(),
            connections: shared.net.connections.load(Ordering::Relaxed),
            recent,
        },
        patients: Patients {
            pending,
            group_by: shared.net.config.patients.group_by.clone(),
            more: pending - listed.len(),
            listed,
        },
        batches: Batches {
            in_flight,
            by_stage,
            listed: in_flight_listed,
            failed,
            failed_listed,
        },
        throughput: Throughput {
            instances_total: c.instances.load(Ordering::Relaxed),
            bytes_total: c.bytes.load(Ordering::Relaxed),
            instances_per_second,
            bytes_per_second,
        },
        cluster: cluster_status(shared),
    }
}

fn cluster_status(shared: &Shared) -> Option<ClusterStatus> {
    let (o, c) = (
        shared.pipeline.outbox()?,
        shared.net.config.cluster.as_ref()?,
    );
    let s = &o.stats;
    Some(ClusterStatus {
        node_id: c.node_id.clone(),
        connected: s.connected.load(Ordering::Relaxed),
        tls: s.connected.load(Ordering::Relaxed) && s.tls.load(Ordering::Relaxed),
        live_nodes: s.live_nodes.load(Ordering::Relaxed),
        owned_partitions: s.owned_partitions.load(Ordering::Relaxed),
        partitions: c.partitions,
        published: s.published.load(Ordering::Relaxed),
        unpublished: o.pending(),
        lag_ms: o.lag_ms(),
        left_out: s.left_out.load(Ordering::Relaxed),
        rescanned: s.rescanned.load(Ordering::Relaxed),
        taken_over: s.taken_over.load(Ordering::Relaxed),
        republished: s.republished.load(Ordering::Relaxed),
        rewinds: s.rewinds.load(Ordering::Relaxed),
        rewinds_rescanned: s.rewinds_rescanned.load(Ordering::Relaxed),
        nodes: s.nodes(),
        failures: s.failures.load(Ordering::Relaxed),
        last_error: s.last_error(),
    })
}

/// A node's lease, in words: live for how long yet, or dead since when (as of the renewal
/// that read it).
fn lease_text(n: &crate::cluster::NodeRow) -> String {
    if n.live {
        format!("live (lease {:.1} s left)", n.lease_left_ms as f64 / 1000.0)
    } else {
        format!(
            "dead (lease ran out {:.1} s ago)",
            -n.lease_left_ms as f64 / 1000.0
        )
    }
}

/// The cluster line of `dicomgate status`.
fn cluster_line(c: &ClusterStatus) -> String {
    format!(
        "cluster: node {} {}, {} live nodes, owns {} of {} partitions; published {}, {} waiting \
         (lag {} ms){}{}{}{}",
        printable(&c.node_id),
        if c.connected && c.tls {
            "connected (TLS)"
        } else if c.connected {
            "connected"
        } else {
            "NOT CONNECTED to the database"
        },
        c.live_nodes,
        c.owned_partitions,
        c.partitions,
        c.published,
        c.unpublished,
        c.lag_ms,
        if c.left_out > c.rescanned {
            format!(
                ", {} left out of the queue (a rescan publishes them)",
                c.left_out - c.rescanned
            )
        } else {
            String::new()
        },
        if c.taken_over > 0 {
            format!(", {} of dead nodes published", c.taken_over)
        } else {
            String::new()
        },
        if c.rewinds > c.rewinds_rescanned {
            ", THE DATABASE LOST COMMITS: republishing from the folder".to_string()
        } else if c.rewinds > 0 {
            format!(
                ", the database lost commits {} times (republished)",
                c.rewinds
            )
        } else {
            String::new()
        },
        if c.last_error.is_empty() {
            String::new()
        } else {
            format!("; last error: {}", printable(&c.last_error))
        }
    )
}

/// `GET /api/status`'s body.
pub fn render_json(s: &Status) -> Result<String, String> {
    serde_json::to_string_pretty(s).map_err(|e| e.to_string())
}

/// `text` escaped for HTML element content and attribute values (OWASP's five characters).
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` safe for a terminal: control characters (escape sequences included) written as
/// `\u{..}`, so a Patient ID cannot move the cursor or retitle the window.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if reorders_or_hides(ch) {
            let _ = write!(out, "\\u{{{:x}}}", ch as u32);
        } else {
            out.push(ch);
        }
    }
    out
}

fn ago(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

fn more_line(n: usize, what: &str) -> String {
    format!("and {n} more {what}")
}

/// The page's seconds between reloads (`<meta http-equiv="refresh">`).
pub const PAGE_REFRESH_SECONDS: u32 = 5;

/// `GET /`'s body: server-rendered HTML with inline CSS and an inline SVG, nothing fetched
/// from elsewhere (works offline), no script.
pub fn render_html(s: &Status) -> String {
    let e = html_escape;
    let mut h = String::with_capacity(16 << 10);
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECONDS}\">\
         <title>dicomgate {ae}</title><style>\
         body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}}\
         h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}\
         table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}}\
         th{{background:#f2f2f2}} .no{{color:#a40}} .ok{{color:#070}} pre{{margin:0;white-space:pre-wrap}}\
         .muted{{color:#777}} svg{{border:1px solid #ccc;background:#fcfcfc}}\
         </style></head><body>",
        ae = e(&s.node.ae_title)
    );
    let n = &s.node;
    let _ = writeln!(
        h,
        "<h1>dicomgate {} &middot; {}</h1>\n<p>version {} &middot; listening on {} &middot; up {} s &middot; {} &middot; \
         {} open associations, {} connections &middot; {} instances, {} bytes stored</p>",
        e(&n.ae_title),
        if n.draining { "<span class=\"no\">draining</span>" } else { "<span class=\"ok\">running</span>" },
        e(&n.version),
        e(&n.listen),
        n.uptime_seconds,
        if n.draining { "no new associations" } else { "accepting" },
        s.associations.open,
        s.associations.connections,
        s.throughput.instances_total,
        s.throughput.bytes_total,
    );
    if let Some(c) = &s.cluster {
        let _ = writeln!(
            h,
            "<h2>Cluster</h2>\n<p id=\"cluster\" class=\"{}\">{}</p>",
            if c.connected { "ok" } else { "no" },
            e(&cluster_line(c))
        );
        if !c.nodes.is_empty() {
            h.push_str(
                "<table id=\"cluster-nodes\"><tr><th>Node</th><th>Lease</th><th>Partitions</th>\
                 <th>Published</th><th>Waiting</th><th>Lag</th></tr>\n",
            );
            for n in &c.nodes {
                let _ = writeln!(
                    h,
                    "<tr><td class=\"node\">{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td></tr>",
                    e(&n.node_id),
                    if n.live { "ok" } else { "no" },
                    e(&lease_text(n)),
                    n.partitions,
                    n.published,
                    n.unpublished,
                    n.lag_ms
                );
            }
            h.push_str("</table>\n");
        }
    }

    // Pending patients.
    let p = &s.patients;
    let _ = writeln!(
        h,
        "<h2>Pending patients ({}, grouped by {})</h2>",
        p.pending,
        e(&p.group_by)
    );
    if p.listed.is_empty() {
        h.push_str("<p class=\"muted\">none</p>\n");
    } else {
        h.push_str(
            "<table><tr><th>Patient</th><th>Folder (digest)</th><th>Instances</th><th>Series</th>\
             <th>Last arrival</th><th>Open associations</th><th>Progress</th><th>Not sufficient because</th></tr>\n",
        );
        for pt in &p.listed {
            let _ = write!(
                h,
                "<tr><td class=\"patient\">{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>",
                e(pt.patient_id.as_deref().unwrap_or(&pt.key)),
                e(&pt.digest),
                pt.instances,
                pt.series,
                ago(pt.seconds_since_last_arrival),
                pt.open_associations,
            );
            for (i, line) in pt.progress.iter().enumerate() {
                let ok = pt.inputs.get(i).is_some_and(|x| x.sufficient);
                let _ = write!(
                    h,
                    "<div class=\"{}\">{}</div>",
                    if ok { "ok" } else { "no" },
                    e(line)
                );
            }
            let _ = writeln!(
                h,
                "</td><td>{}</td></tr>",
                match &pt.not_sufficient_because {
                    Some(w) => e(w),
                    None =>
                        "<span class=\"ok\">sufficient: claimed at the next trigger</span>".into(),
                }
            );
        }
        h.push_str("</table>\n");
        if p.more > 0 {
            let _ = writeln!(h, "<p>{}</p>", more_line(p.more, "patients"));
        }
    }

    // Batches.
    let b = &s.batches;
    let _ = writeln!(h, "<h2>Batches in progress ({})</h2>", b.in_flight);
    if b.listed.is_empty() {
        h.push_str("<p class=\"muted\">none</p>\n");
    } else {
        let stages: Vec<String> = b
            .by_stage
            .iter()
            .map(|(k, v)| format!("{}: {v}", e(k)))
            .collect();
        let _ = writeln!(h, "<p>{}</p>", stages.join(" &middot; "));
        h.push_str("<table><tr><th>Batch</th><th>Stage</th><th>Processing attempts</th><th>Export attempts</th></tr>\n");
        for x in &b.listed {
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e(&x.id),
                e(&x.stage),
                x.processing_attempts,
                x.export_attempts
            );
        }
        h.push_str("</table>\n");
        if b.in_flight > b.listed.len() {
            let _ = writeln!(
                h,
                "<p>{}</p>",
                more_line(b.in_flight - b.listed.len(), "batches")
            );
        }
    }
    let _ = writeln!(h, "<h2>Failed batches ({})</h2>", b.failed);
    if b.failed_listed.is_empty() {
        h.push_str("<p class=\"muted\">none</p>\n");
    } else {
        h.push_str("<table><tr><th>Batch</th><th>Export attempts</th><th>Reason</th></tr>\n");
        for x in &b.failed_listed {
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td><pre>{}</pre></td></tr>",
                e(&x.id),
                x.export_attempts,
                e(x.reason.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>\n");
        if b.failed > b.failed_listed.len() {
            let _ = writeln!(
                h,
                "<p>{}</p>",
                more_line(b.failed - b.failed_listed.len(), "failed batches")
            );
        }
    }

    // Throughput.
    h.push_str("<h2>Throughput</h2>\n");
    h.push_str(&throughput_svg(&s.throughput));

    // Recent associations.
    let a = &s.associations;
    let _ = writeln!(
        h,
        "<h2>Recent associations ({} listed)</h2>",
        a.recent.len()
    );
    if a.recent.is_empty() {
        h.push_str("<p class=\"muted\">none yet</p>\n");
    } else {
        h.push_str(
            "<table><tr><th>Ended</th><th>Peer</th><th>Calling AE</th><th>Called AE</th><th>Instances</th>\
             <th>Failures</th><th>Bytes</th><th>Duration</th><th>Outcome</th></tr>\n",
        );
        for r in &a.recent {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
                ago(n.now_ms.saturating_sub(r.ended_ms) / 1000),
                e(&r.peer),
                e(&r.calling_ae),
                e(&r.called_ae),
                r.instances,
                r.failures,
                r.bytes,
                r.duration_ms,
                e(&r.outcome)
            );
        }
        h.push_str("</table>\n");
    }
    let _ = writeln!(
        h,
        "<p class=\"muted\">Reloads every {PAGE_REFRESH_SECONDS} s. The same data as JSON: <a href=\"/api/status\">/api/status</a>; \
         counters for Prometheus: <a href=\"/metrics\">/metrics</a>.</p>\n</body></html>"
    );
    h
}

/// Instances/s and MB/s over the last minutes as an inline SVG (two polylines, each on its
/// own scale, peaks labelled).
fn throughput_svg(t: &Throughput) -> String {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    let n = t.instances_per_second.len();
    let line = |v: &[u64]| -> (String, u64) {
        let max = v.iter().copied().max().unwrap_or(0).max(1);
        let mut pts = String::with_capacity(v.len() * 12);
        for (i, x) in v.iter().enumerate() {
            // One point (the node's first second) is drawn as a flat line.
            let px = if n > 1 {
                i as f64 * W / (n - 1) as f64
            } else {
                0.0
            };
            let py = H - 5.0 - (*x as f64 / max as f64) * (H - 20.0);
            let _ = write!(pts, "{px:.1},{py:.1} ");
            if n == 1 {
                let _ = write!(pts, "{W:.1},{py:.1} ");
            }
        }
        (pts, max)
    };
    let (ipts, imax) = line(&t.instances_per_second);
    let (bpts, bmax) = line(&t.bytes_per_second);
    let last = |v: &[u64]| v.last().copied().unwrap_or(0);
    format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"throughput\">\
         <polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\" points=\"{ipts}\"/>\
         <polyline fill=\"none\" stroke=\"#e65100\" stroke-width=\"1\" stroke-dasharray=\"3 2\" points=\"{bpts}\"/>\
         <text x=\"4\" y=\"12\" font-size=\"11\" fill=\"#1565c0\">instances/s (peak {imax})</text>\
         <text x=\"200\" y=\"12\" font-size=\"11\" fill=\"#e65100\">MB/s (peak {:.2})</text>\
         </svg>\n<p class=\"muted\">last {n} s, one point per second; now {} instances/s, {:.2} MB/s</p>\n",
        bmax as f64 / 1e6,
        last(&t.instances_per_second),
        last(&t.bytes_per_second) as f64 / 1e6,
    )
}

/// `dicomgate status`'s output: the page's content as terminal text.
pub fn render_text(s: &Status) -> String {
    let t = printable;
    let mut o = String::new();
    let n = &s.node;
    let _ = writeln!(
        o,
        "dicomgate {} (version {}) on {}: {}, up {} s",
        t(&n.ae_title),
        t(&n.version),
        t(&n.listen),
        if n.draining { "DRAINING" } else { "running" },
        n.uptime_seconds
    );
    let _ = writeln!(
        o,
        "associations: {} open, {} connections; stored {} instances, {} bytes",
        s.associations.open,
        s.associations.connections,
        s.throughput.instances_total,
        s.throughput.bytes_total
    );
    if let Some(c) = &s.cluster {
        let _ = writeln!(o, "{}", cluster_line(c));
        for n in &c.nodes {
            let _ = writeln!(
                o,
                "  node {}: {}, {} partitions, published {}, {} waiting (lag {} ms)",
                printable(&n.node_id),
                lease_text(n),
                n.partitions,
                n.published,
                n.unpublished,
                n.lag_ms
            );
        }
    }
    let p = &s.patients;
    let _ = writeln!(
        o,
        "\npending patients: {} (grouped by {})",
        p.pending,
        t(&p.group_by)
    );
    for pt in &p.listed {
        let _ = writeln!(
            o,
            "  {} [{}]: {} instances in {} series, last arrival {}, {} open associations",
            t(pt.patient_id.as_deref().unwrap_or(&pt.key)),
            pt.digest,
            pt.instances,
            pt.series,
            ago(pt.seconds_since_last_arrival),
            pt.open_associations
        );
        for line in &pt.progress {
            let _ = writeln!(o, "      {}", t(line));
        }
        match &pt.not_sufficient_because {
            Some(w) => {
                let _ = writeln!(o, "      not sufficient: {}", t(w));
            }
            None => {
                let _ = writeln!(o, "      sufficient: claimed at the next trigger");
            }
        }
    }
    if p.more > 0 {
        let _ = writeln!(o, "  {}", more_line(p.more, "patients"));
    }
    let b = &s.batches;
    let stages: Vec<String> = b
        .by_stage
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(
        o,
        "\nbatches in progress: {}{}",
        b.in_flight,
        if stages.is_empty() {
            String::new()
        } else {
            format!(" ({})", stages.join(", "))
        }
    );
    for x in &b.listed {
        let _ = writeln!(
            o,
            "  {}  {}  processing attempts {}, export attempts {}",
            t(&x.id),
            t(&x.stage),
            x.processing_attempts,
            x.export_attempts
        );
    }
    if b.in_flight > b.listed.len() {
        let _ = writeln!(
            o,
            "  {}",
            more_line(b.in_flight - b.listed.len(), "batches")
        );
    }
    let _ = writeln!(o, "failed batches: {}", b.failed);
    for x in &b.failed_listed {
        let _ = writeln!(o, "  {}  export attempts {}", t(&x.id), x.export_attempts);
        for line in x.reason.as_deref().unwrap_or("").lines() {
            let _ = writeln!(o, "      {}", t(line));
        }
    }
    if b.failed > b.failed_listed.len() {
        let _ = writeln!(
            o,
            "  {}",
            more_line(b.failed - b.failed_listed.len(), "failed batches")
        );
    }
    let a = &s.associations;
    let _ = writeln!(o, "\nrecent associations: {}", a.recent.len());
    for r in &a.recent {
        let _ = writeln!(
            o,
            "  {}  {} {} -> {}: {} instances, {} failures, {} bytes, {} ms, {}",
            ago(n.now_ms.saturating_sub(r.ended_ms) / 1000),
            t(&r.peer),
            t(&r.calling_ae),
            t(&r.called_ae),
            r.instances,
            r.failures,
            r.bytes,
            r.duration_ms,
            t(&r.outcome)
        );
    }
    let recent: Vec<u64> = s
        .throughput
        .instances_per_second
        .iter()
        .rev()
        .take(60)
        .copied()
        .collect();
    if !recent.is_empty() {
        let _ = writeln!(
            o,
            "\nthroughput: {:.1} instances/s over the last {} s",
            recent.iter().sum::<u64>() as f64 / recent.len() as f64,
            recent.len()
        );
    }
    o
}

/// How long `dicomgate status` waits for the node (connect, and each read or write).
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /api/status` from the node's HTTP endpoint at `addr` (HOST:PORT). Errors name the
/// address and what went wrong.
pub fn fetch(addr: &str) -> Result<Status, String> {
    let fail = |what: &str| format!("cannot get the status from {addr}: {what}");
    let (code, first, body) = request(addr, "GET", "/api/status", None).map_err(|e| fail(&e))?;
    if code != 200 {
        let body: String = body.trim().chars().take(200).collect();
        return Err(fail(&format!(
            "it answered {} ({}): is it a dicomgate with a status page?",
            printable(&first),
            printable(&body)
        )));
    }
    serde_json::from_str(&body).map_err(|e| fail(&format!("not a dicomgate status: {e}")))
}

/// What `POST /api/retry...` answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryAnswer {
    pub retried: Vec<String>,
    pub errors: Vec<RetryError>,
    /// Failed batches not moved by this request (one moves a bounded number): ask again.
    #[serde(default)]
    pub left: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryError {
    pub batch: String,
    pub error: String,
}

/// `dicomgate retry`: `POST /api/retry/{batch}` (or `/api/retry` for every failed batch) to
/// the node at `addr`, with `token` as a bearer token if given.
pub fn retry(addr: &str, batch: Option<&str>, token: Option<&str>) -> Result<RetryAnswer, String> {
    let fail = |what: &str| format!("cannot ask {addr} to retry: {what}");
    let path = match batch {
        // Checked here too: an empty id (a script's unset variable) must never become the
        // request for every failed batch, nor `a b` batch `a`.
        Some(b) if !crate::pipeline::batch::is_batch_id(b) => {
            return Err(fail(&format!(
                "{} is not a batch id (a directory name under failed/)",
                printable(&format!("{b:?}"))
            )))
        }
        Some(b) => format!("/api/retry/{b}"),
        None => "/api/retry".to_string(),
    };
    let (code, first, body) = request(addr, "POST", &path, token).map_err(|e| fail(&e))?;
    match serde_json::from_str::<RetryAnswer>(&body) {
        Ok(a) => Ok(a),
        Err(_) => {
            let body: String = body.trim().chars().take(300).collect();
            Err(fail(&format!(
                "it answered {} ({}){}",
                printable(&first),
                printable(&body),
                if code == 404 {
                    ": is it a dicomgate with /api/retry?"
                } else {
                    ""
                }
            )))
        }
    }
}

/// `dicomgate force`: `POST /api/force/{patient}` to the node at `addr`; the grouping key
/// the node forced.
pub fn force(addr: &str, patient: &str, token: Option<&str>) -> Result<String, String> {
    let fail = |what: &str| format!("cannot ask {addr} to force {}: {what}", printable(patient));
    let encoded: String = patient
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (_, first, body) =
        request(addr, "POST", &format!("/api/force/{encoded}"), token).map_err(|e| fail(&e))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| {
        let body: String = body.trim().chars().take(300).collect();
        fail(&format!(
            "it answered {} ({}): is it a dicomgate with /api/force?",
            printable(&first),
            printable(&body)
        ))
    })?;
    match (v.get("forced"), v.get("error")) {
        (Some(k), _) => Ok(k.as_str().unwrap_or_default().to_string()),
        (_, Some(e)) => Err(fail(e.as_str().unwrap_or("refused"))),
        _ => Err(fail(&printable(&first))),
    }
}

/// A character a terminal acts on rather than shows: controls (C0, DEL, C1 such as U+009B, a
/// CSI to some terminals), and the invisible ones that reorder or hide text (bidi embeddings,
/// overrides and isolates, zero-width characters, the BOM): a Patient ID could otherwise make
/// a line read as something else.
fn reorders_or_hides(ch: char) -> bool {
    ch.is_control()
        || matches!(ch,
            '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}' | '\u{00AD}')
}

/// JSON for a terminal (`dicomgate status --json`): what [`printable`] would escape, written as
/// a JSON `\uXXXX` escape instead (those characters are only ever inside strings, so the JSON
/// stays valid and means the same).
pub fn terminal_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if ch != '\n' && reorders_or_hides(ch) {
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// One HTTP/1.0 request to `addr`: (status code, status line, body). The error says what
/// failed, with a hint when nothing listens.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String, String), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let targets: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{e} (give --http HOST:PORT)"))?
        .collect();
    let mut last = String::from("no address");
    let mut stream = None;
    for t in &targets {
        match std::net::TcpStream::connect_timeout(t, FETCH_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut s = stream
        .ok_or_else(|| format!("{last}: is the node running, with [http] listen = \"{addr}\"?"))?;
    let _ = s.set_read_timeout(Some(FETCH_TIMEOUT));
    let _ = s.set_write_timeout(Some(FETCH_TIMEOUT));
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // A status of 1000 patients is a few MB at most; more is not a dicomgate answering.
    s.take(64 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let first = head.lines().next().unwrap_or("").to_string();
    let code = first
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, first, body.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn escapes_what_peers_send() {
        assert_eq!(
            html_escape("<script>alert('1')</script>&\""),
            "&lt;script&gt;alert(&#39;1&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
        // Found in review: text that reorders or hides itself, and C1 controls.
        assert_eq!(
            printable("ab\u{202e}cd\u{200b}\u{9b}"),
            "ab\\u{202e}cd\\u{200b}\\u{9b}"
        );
        let json = terminal_json("{\"id\":\"x\u{202e}y\u{9b}\"}\n");
        assert_eq!(json, "{\"id\":\"x\\u202ey\\u009b\"}\n");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["id"], "x\u{202e}y\u{9b}");
    }

    fn status() -> Status {
        Status {
            node: NodeStatus {
                version: "0.1.0".into(),
                ae_title: "DICOMGATE".into(),
                listen: "127.0.0.1:11112".into(),
                tls_listen: String::new(),
                uptime_seconds: 3,
                draining: false,
                now_ms: 10_000,
            },
            associations: Associations {
                open: 0,
                connections: 0,
                recent: vec![RecentAssociation {
                    ended_ms: 9_000,
                    peer: "127.0.0.1:5000".into(),
                    calling_ae: "<b>EVIL</b>".into(),
                    called_ae: "DICOMGATE".into(),
                    instances: 1,
                    failures: 0,
                    bytes: 10,
                    duration_ms: 4,
                    outcome: "released".into(),
                }],
            },
            patients: Patients {
                pending: 1,
                group_by: "PatientID".into(),
                listed: vec![PendingPatient {
                    digest: "ab".into(),
                    key: "<script>x</script>".into(),
                    patient_id: Some("<script>x</script>".into()),
                    instances: 1,
                    bytes: 10,
                    series: 1,
                    last_arrival_ms: 9_000,
                    seconds_since_last_arrival: 1,
                    open_associations: 0,
                    sufficient: false,
                    not_sufficient_because: Some("input ct: 1 of 2 instances".into()),
                    progress: vec!["ct: 1 of 2 instances".into()],
                    inputs: Vec::new(),
                }],
                more: 0,
            },
            batches: Batches {
                in_flight: 0,
                by_stage: BTreeMap::new(),
                listed: Vec::new(),
                failed: 1,
                failed_listed: vec![BatchOnDisk {
                    id: "1-ab-2-3".into(),
                    stage: "failed".into(),
                    processing_attempts: 0,
                    export_attempts: 2,
                    reason: Some("export failed: <img src=x>".into()),
                }],
            },
            throughput: Throughput {
                instances_total: 1,
                bytes_total: 10,
                instances_per_second: vec![0, 1, 0],
                bytes_per_second: vec![0, 10, 0],
            },
            cluster: Some(ClusterStatus {
                node_id: "gw-1".into(),
                connected: false,
                tls: false,
                live_nodes: 2,
                owned_partitions: 128,
                partitions: 256,
                published: 5,
                unpublished: 3,
                lag_ms: 1500,
                left_out: 0,
                rescanned: 0,
                taken_over: 7,
                republished: 0,
                rewinds: 0,
                rewinds_rescanned: 0,
                nodes: vec![
                    crate::cluster::NodeRow {
                        node_id: "gw-1".into(),
                        live: true,
                        lease_left_ms: 6500,
                        partitions: 128,
                        published: 5,
                        unpublished: 3,
                        lag_ms: 1500,
                    },
                    crate::cluster::NodeRow {
                        // Node ids are checked where they are made, but the table is another
                        // node's word.
                        node_id: "<b>gw-2".into(),
                        live: false,
                        lease_left_ms: -12_000,
                        partitions: 0,
                        published: 40,
                        unpublished: 0,
                        lag_ms: 0,
                    },
                ],
                failures: 1,
                // A database error can quote what a peer sent.
                last_error: "<img src=x> \u{1b}[2J".into(),
            }),
        }
    }

    /// What was not listed is counted, on the page and in the terminal.
    #[test]
    fn what_is_not_listed_is_said() {
        let mut s = status();
        s.patients.pending = 1004;
        s.patients.more = 1003;
        s.batches.failed = 205;
        for out in [render_html(&s), render_text(&s)] {
            assert!(out.contains("and 1003 more patients"), "{out}");
            assert!(out.contains("and 204 more failed batches"), "{out}");
        }
    }

    #[test]
    fn the_page_escapes_every_peer_text_and_json_round_trips() {
        let s = status();
        let page = render_html(&s);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<b>EVIL"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(page.contains("ct: 1 of 2 instances"));
        assert!(page.contains("<svg"));
        let json = render_json(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
        let text = render_text(&s);
        assert!(text.contains("ct: 1 of 2 instances"), "{text}");
        assert!(text.contains("export failed"), "{text}");
        // The cluster's nodes: a row each, on the page and in the terminal.
        assert!(page.contains("<table id=\"cluster-nodes\">"), "{page}");
        assert!(page.contains("&lt;b&gt;gw-2"), "{page}");
        assert!(!page.contains("<b>gw-2"), "{page}");
        assert!(page.contains("dead (lease ran out 12.0 s ago)"), "{page}");
        assert!(
            text.contains("node gw-1: live (lease 6.5 s left), 128 partitions, published 5, 3 waiting (lag 1500 ms)"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
    }
}
