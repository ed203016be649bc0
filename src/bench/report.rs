//! `dicomgate bench --report FILE.html`: one self-contained page (no script, nothing loaded from
//! elsewhere) with what was run, the results, the throughput over time and the latency
//! distribution, both drawn as inline SVG. Text from the command line (addresses, AE titles) is
//! HTML-escaped.

use std::fmt::Write as _;

use super::{LoadArgs, Summary};
use crate::http::status::html_escape;

const W: f64 = 720.0;
const H: f64 = 220.0;
const PAD: f64 = 48.0;

/// The report page.
pub fn html(a: &LoadArgs, s: &Summary, started: &str) -> String {
    let e = |t: &str| html_escape(t);
    let source = match &a.from_dir {
        Some(d) => format!("the Part-10 files of {}", e(&d.display().to_string())),
        None => format!(
            "synthetic CT instances, {} pixel bytes, {} frame(s), {} patients × {} series",
            a.pixel_bytes, a.frames, a.patients, a.series
        ),
    };
    let mut out = String::with_capacity(16 << 10);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>dicomgate bench {addr}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:820px}}\
         table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}}\
         th{{text-align:left}}svg{{background:#fafafa;border:1px solid #ddd}}\
         .bar{{fill:#4a7bb7}}.line{{fill:none;stroke:#4a7bb7;stroke-width:2}}\
         .axis{{stroke:#888}}text{{font-size:11px;fill:#444}}.failed{{color:#a00}}</style></head><body>\
         <h1>dicomgate bench</h1>\
         <p>C-STORE to <b>{addr}</b> (called AE {called}, calling AE {calling}), {assoc} \
         association(s), window {window} (granted {granted}), {source}; started {started}.</p>",
        addr = e(&a.address),
        called = e(&a.called),
        calling = e(&a.calling),
        assoc = s.associations,
        window = a.window,
        granted = s.window,
        started = e(started),
    );
    let _ = write!(
        out,
        "<table><tr><th>instances</th><td>{}</td></tr><tr><th>seconds</th><td>{:.3}</td></tr>\
         <tr><th>instances/s</th><td>{:.0}</td></tr><tr><th>MB/s</th><td>{:.1}</td></tr>\
         <tr><th>latency p50</th><td>{}</td></tr><tr><th>latency p99</th><td>{}</td></tr>\
         <tr><th>latency p99.9</th><td>{}</td></tr><tr><th>latency max</th><td>{}</td></tr></table>",
        s.instances,
        s.seconds,
        s.instances_per_s(),
        s.mb_per_s(),
        ms(s.quantile(0.5)),
        ms(s.quantile(0.99)),
        ms(s.quantile(0.999)),
        ms(s.latency.max()),
    );
    for err in &s.errors {
        let _ = write!(
            out,
            "<p class=\"failed\">association failed: {}</p>",
            e(err)
        );
    }
    out += "<h2>Throughput over time</h2>";
    out += &throughput_svg(s);
    out += "<h2>C-STORE latency</h2>";
    out += &latency_svg(s);
    out += "<p>Latency: C-STORE request sent until its response received, per instance. \
            Made by <code>dicomgate bench</code>.</p></body></html>\n";
    out
}

/// µs as milliseconds, for people.
fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// Instances per second, one point per second of the run.
fn throughput_svg(s: &Summary) -> String {
    let n = s.per_second.len().max(1);
    let top = s.per_second.iter().map(|(i, _)| *i).fold(1.0, f64::max);
    let x = |k: usize| PAD + (W - 2.0 * PAD) * (k as f64 + 0.5) / n as f64;
    let y = |v: f64| H - PAD + (2.0 * PAD - H) * v / top;
    let points: Vec<String> = s
        .per_second
        .iter()
        .enumerate()
        .map(|(k, (i, _))| format!("{:.1},{:.1}", x(k), y(*i)))
        .collect();
    let mut svg = frame("instances per second, by second of the run");
    let _ = write!(
        svg,
        "<text x=\"4\" y=\"{:.0}\">{top:.0}</text><text x=\"4\" y=\"{:.0}\">0</text>\
         <text x=\"{:.0}\" y=\"{:.0}\">{n} s</text>",
        y(top) + 4.0,
        y(0.0),
        W - PAD,
        H - PAD + 16.0
    );
    if points.len() == 1 {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" class=\"bar\"/>",
            x(0),
            y(s.per_second.first().map_or(0.0, |p| p.0))
        );
    } else {
        let _ = write!(
            svg,
            "<polyline class=\"line\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    svg + "</svg>"
}

/// A histogram of latencies on a logarithmic axis: 30 buckets from the fastest to the slowest.
fn latency_svg(s: &Summary) -> String {
    const BUCKETS: usize = 30;
    let (lo, hi) = (s.latency.min().max(1) as f64, s.latency.max().max(2) as f64);
    let (llo, lhi) = (lo.ln(), hi.ln().max(lo.ln() + 1e-9));
    let mut counts = [0u64; BUCKETS];
    for v in s.latency.iter_recorded() {
        let l = (v.value_iterated_to().max(1) as f64).ln();
        let b = (((l - llo) / (lhi - llo)) * BUCKETS as f64) as usize;
        counts[b.min(BUCKETS - 1)] += v.count_at_value();
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bw = (W - 2.0 * PAD) / BUCKETS as f64;
    let mut svg = frame("instances per latency bucket (log scale)");
    for (k, c) in counts.iter().enumerate() {
        let h = (H - 2.0 * PAD) * *c as f64 / top;
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\"><title>{c}</title></rect>",
            PAD + bw * k as f64 + 1.0,
            H - PAD - h,
            (bw - 2.0).max(1.0)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{PAD:.0}\" y=\"{:.0}\">{}</text><text x=\"{:.0}\" y=\"{:.0}\">{}</text>\
         <text x=\"4\" y=\"{:.0}\">{top:.0}</text>",
        H - PAD + 16.0,
        ms(lo as u64),
        W - PAD - 50.0,
        H - PAD + 16.0,
        ms(hi as u64),
        PAD + 4.0
    );
    svg + "</svg>"
}

/// An SVG element with its axes and caption (left open for the content).
fn frame(caption: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">\
         <line class=\"axis\" x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>\
         <line class=\"axis\" x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\"/>\
         <text x=\"{PAD}\" y=\"20\">{caption}</text>",
        b = H - PAD,
        r = W - PAD,
        caption = html_escape(caption)
    )
}
