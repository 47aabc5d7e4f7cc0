//! The HTML page of a recording (`loopguard report --html`): one file, no
//! network, its data inline as JSON and drawn by inline script into SVG.
//!
//! However long the recording, the page holds a bounded amount: stalls
//! binned per thread over [`BINS`] columns, the [`KEPT_STALLS`] longest in
//! full (request, cause, stack), routes ranked by stall time, the
//! cumulative alerts as a running count and the first ones in full, and the
//! poll-duration histogram of the summary.

use serde::Serialize;

use crate::events::HistogramSlot;
use crate::present::replay::{Aggregate, KEPT_STALLS, StallLine};
use crate::present::stacks::{cause_text, frame_text};

/// Columns of the timeline.
pub const BINS: usize = 800;
/// Routes listed.
const ROUTES: usize = 50;
/// Frames shown per stall.
const FRAMES: usize = 16;

#[derive(Serialize)]
struct Page<'a> {
    source: &'a str,
    exe: Option<&'a str>,
    pid: Option<u32>,
    attached_at: Option<&'a str>,
    threshold_ms: Option<f64>,
    span_ms: f64,
    bin_ms: f64,
    events: u64,
    stalls: u64,
    in_progress: u64,
    total_stall_ms: f64,
    alerts: u64,
    summary_text: Option<String>,
    threads: Vec<Thread<'a>>,
    longest: Vec<Stall>,
    kept: usize,
    routes: Vec<Route<'a>>,
    histogram: Vec<Bucket>,
    alert_curve: Vec<(f64, u64)>,
    alert_list: Vec<Alert>,
    thresholds: Vec<(f64, f64)>,
}

#[derive(Serialize)]
struct Thread<'a> {
    tid: u32,
    name: &'a str,
    /// `[bin, stalled ms, stalls]` of the bins with a stall.
    bins: Vec<(usize, f64, u32)>,
    stalls: u64,
    stalled_ms: f64,
}

#[derive(Serialize)]
struct Stall {
    lane: usize,
    at_ms: f64,
    ms: f64,
    tid: u32,
    thread: String,
    task_id: Option<u64>,
    time: Option<String>,
    request: Option<String>,
    request_id: Option<u64>,
    victims: usize,
    cause: Option<String>,
    frames: Vec<String>,
}

#[derive(Serialize)]
struct Route<'a> {
    name: &'a str,
    stalls: u64,
    total_ms: f64,
    longest_ms: f64,
}

#[derive(Serialize)]
struct Bucket {
    /// Lower edge, ns (a power of two).
    lower_ns: u64,
    count: u64,
}

#[derive(Serialize)]
struct Alert {
    at_ms: f64,
    scope: String,
    total_ms: f64,
    polls: u64,
    window_ms: f64,
    budget_ms: f64,
    by: String,
}

fn rel_ms(ns: u64, first: u64) -> f64 {
    ns.saturating_sub(first) as f64 / 1e6
}

/// Stalled ms per bin and thread: each stall spread over the bins it covers.
fn bin_threads(aggregate: &Aggregate, first: u64, bin_ns: f64) -> Vec<Thread<'_>> {
    let mut dense: Vec<Vec<(f64, u32)>> = vec![Vec::new(); aggregate.threads.len()];
    let mut totals = vec![(0_u64, 0.0_f64); aggregate.threads.len()];
    for span in &aggregate.spans {
        let lane = &mut dense[span.thread as usize];
        if lane.is_empty() {
            lane.resize(BINS, (0.0, 0));
        }
        let start = span.start_ns.saturating_sub(first) as f64;
        let end = start + span.duration_ns as f64;
        let first_bin = ((start / bin_ns) as usize).min(BINS - 1);
        let last_bin = ((end / bin_ns) as usize).min(BINS - 1);
        for (bin, slot) in lane
            .iter_mut()
            .enumerate()
            .take(last_bin + 1)
            .skip(first_bin)
        {
            let lo = (bin as f64 * bin_ns).max(start);
            let hi = ((bin + 1) as f64 * bin_ns).min(end);
            slot.0 += (hi - lo).max(0.0) / 1e6;
        }
        lane[first_bin].1 += 1;
        let total = &mut totals[span.thread as usize];
        total.0 += 1;
        total.1 += span.duration_ns as f64 / 1e6;
    }
    aggregate
        .threads
        .iter()
        .zip(dense)
        .zip(totals)
        .map(|(((tid, name), lane), (stalls, stalled_ms))| Thread {
            tid: *tid,
            name,
            bins: lane
                .into_iter()
                .enumerate()
                .filter(|(_, (ms, count))| *ms > 0.0 || *count > 0)
                .map(|(bin, (ms, count))| (bin, (ms * 1000.0).round() / 1000.0, count))
                .collect(),
            stalls,
            stalled_ms: (stalled_ms * 1000.0).round() / 1000.0,
        })
        .collect()
}

fn stall(aggregate: &Aggregate, stall: &StallLine, first: u64) -> Stall {
    let lane = aggregate
        .threads
        .iter()
        .position(|(tid, _)| *tid == stall.tid)
        .unwrap_or(0);
    Stall {
        lane,
        at_ms: rel_ms(stall.start_ns, first),
        ms: stall.duration_ms,
        tid: stall.tid,
        thread: stall.thread.clone(),
        task_id: stall.task_id,
        time: stall.start_time.clone(),
        request: stall.request.as_ref().map(|r| {
            format!(
                "{} {} ({})",
                r.method,
                r.route.as_deref().unwrap_or(&r.path),
                r.path
            )
        }),
        request_id: stall.request.as_ref().map(|r| r.id),
        victims: stall.victim_count,
        cause: stall.cause.as_ref().map(cause_text),
        frames: stall
            .stack
            .iter()
            .flatten()
            .take(FRAMES)
            .map(frame_text)
            .collect(),
    }
}

/// The summary's slots folded into powers of two, every power from the
/// shortest poll's to the longest's (empty ones too: the axis is even).
fn buckets(slots: &[HistogramSlot]) -> Vec<Bucket> {
    let power = |ns: u64| ns.checked_ilog2().unwrap_or(0);
    // Whatever order the slots come in.
    let (Some(low), Some(high)) = (
        slots.iter().map(|s| power(s.lower_ns)).min(),
        slots.iter().map(|s| power(s.lower_ns)).max(),
    ) else {
        return Vec::new();
    };
    let mut buckets: Vec<Bucket> = (low..=high)
        .map(|p| Bucket {
            lower_ns: 1_u64 << p,
            count: 0,
        })
        .collect();
    for slot in slots {
        let bucket = &mut buckets[(power(slot.lower_ns) - low) as usize];
        // Counts come from a recording, which may say anything.
        bucket.count = bucket.count.saturating_add(slot.count);
    }
    buckets
}

/// The running count of alerts, at most [`BINS`] points.
fn alert_curve(points: &[(u64, f64)], first: u64) -> Vec<(f64, u64)> {
    let step = points.len().div_ceil(BINS).max(1);
    let mut curve: Vec<(f64, u64)> = points
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % step == 0)
        .map(|(i, (at, _))| (rel_ms(*at, first), i as u64 + 1))
        .collect();
    if let Some((at, _)) = points.last()
        && curve.last().is_none_or(|(_, n)| *n != points.len() as u64)
    {
        curve.push((rel_ms(*at, first), points.len() as u64));
    }
    curve
}

/// The page of `aggregate`, read from `source`.
pub fn page(aggregate: &Aggregate, source: &str) -> String {
    let first = aggregate.first_ns.unwrap_or(0);
    let span_ns = aggregate
        .last_ns
        .unwrap_or(first)
        .saturating_sub(first)
        .max(1);
    let bin_ns = span_ns as f64 / BINS as f64;
    let mut alert_points = aggregate.alert_points.clone();
    alert_points.sort_unstable_by_key(|(at, _)| *at);
    let data = Page {
        source,
        exe: aggregate.attached.as_ref().map(|a| a.exe.as_str()),
        pid: aggregate.attached.as_ref().map(|a| a.pid),
        attached_at: aggregate.attached.as_ref().map(|a| a.time.as_str()),
        threshold_ms: aggregate.attached.as_ref().map(|a| a.threshold_ms),
        span_ms: span_ns as f64 / 1e6,
        bin_ms: bin_ns / 1e6,
        events: aggregate.lines,
        stalls: aggregate.stalls,
        in_progress: aggregate.in_progress,
        total_stall_ms: (aggregate.total_stall_ms * 1000.0).round() / 1000.0,
        alerts: aggregate.alerts,
        summary_text: aggregate
            .summary
            .as_ref()
            .map(crate::present::text::summary_text),
        threads: bin_threads(aggregate, first, bin_ns),
        longest: longest_stalls(aggregate, first),
        kept: KEPT_STALLS,
        routes: routes(aggregate),
        histogram: aggregate
            .summary
            .as_ref()
            .map(|s| buckets(&s.poll_histogram))
            .unwrap_or_default(),
        alert_curve: alert_curve(&alert_points, first),
        alert_list: alert_list(aggregate, first),
        thresholds: aggregate
            .thresholds
            .iter()
            .map(|(at, ms)| (rel_ms(*at, first), *ms))
            .collect(),
    };
    let json = script_safe_json(&serde_json::to_string(&data).unwrap_or_else(|_| "{}".to_owned()));
    TEMPLATE
        .replace("/*STYLE*/", STYLE)
        .replace("/*SCRIPT*/", SCRIPT)
        .replace("{{DATA}}", &json)
}

/// The longest stalls kept, longest first.
fn longest_stalls(aggregate: &Aggregate, first: u64) -> Vec<Stall> {
    let mut longest: Vec<Stall> = aggregate
        .longest
        .iter()
        .map(|s| stall(aggregate, s, first))
        .collect();
    longest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    longest
}

/// The routes with the most stall time, worst first.
fn routes(aggregate: &Aggregate) -> Vec<Route<'_>> {
    aggregate
        .ranked_routes()
        .into_iter()
        .take(ROUTES)
        .map(|(name, totals)| Route {
            name,
            stalls: totals.stalls,
            total_ms: (totals.total_ms * 1000.0).round() / 1000.0,
            longest_ms: totals.longest_ms,
        })
        .collect()
}

/// The cumulative alerts kept, as the page lists them.
fn alert_list(aggregate: &Aggregate, first: u64) -> Vec<Alert> {
    aggregate
        .kept_alerts
        .iter()
        .map(|a| Alert {
            at_ms: rel_ms(a.window_end_ns, first),
            scope: match (&a.thread, a.tid) {
                (Some(name), Some(tid)) => format!("tid {tid} ({name})"),
                (None, Some(tid)) => format!("tid {tid}"),
                _ => "process".to_owned(),
            },
            total_ms: a.total_ms,
            polls: a.polls,
            window_ms: a.window_ms,
            budget_ms: a.budget_ms,
            by: a
                .requests
                .iter()
                .take(3)
                .map(|r| format!("{} {} {:.1} ms", r.method, r.route, r.total_ms))
                .collect::<Vec<_>>()
                .join(", "),
        })
        .collect()
}

/// JSON text that cannot change how the HTML tokenizer reads the script
/// element holding it: `</script>` would end it, `<!--` followed by
/// `<script` would switch it to the double-escaped state (the page then
/// renders nothing). `<`, `>` and `&` occur only inside JSON strings, where
/// `\u003c`-style escapes mean the same characters.
fn script_safe_json(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

const TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>loopguard report</title>
<style>/*STYLE*/</style>
</head>
<body>
<header><h1>loopguard report</h1><p id="meta"></p></header>
<section><h2>Stalls per thread over time</h2>
<p class="hint">Each lane is a thread; red columns show how much of that moment it was stalled. Marks are the longest stalls: click one for its request and stack.</p>
<div id="timeline"></div><div id="detail" class="detail">Click a stall mark or a row below.</div></section>
<section><h2>Longest stalls</h2><table id="stalls"><thead><tr><th>at</th><th>thread</th><th>ms</th><th>request</th><th>cause</th><th>where</th></tr></thead><tbody></tbody></table></section>
<section><h2>Routes by stall time</h2><table id="routes"><thead><tr><th>route</th><th>stalls</th><th>total ms</th><th>longest ms</th></tr></thead><tbody></tbody></table></section>
<section><h2>Poll durations</h2><div id="histogram"></div></section>
<section><h2>Cumulative alerts</h2><div id="alerts-chart"></div><table id="alerts"><thead><tr><th>at</th><th>scope</th><th>blocked ms</th><th>polls</th><th>window ms</th><th>budget ms</th><th>by</th></tr></thead><tbody></tbody></table></section>
<section><h2>Summary</h2><pre id="summary"></pre></section>
<script type="application/json" id="data">{{DATA}}</script>
<script>/*SCRIPT*/</script>
</body>
</html>
"#;

const STYLE: &str = r"
body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 3em;color:#222;background:#fff}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}
.hint{color:#666;margin:.2em 0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.stall-row{cursor:pointer}tr.stall-row:hover{background:#fff3f0}
.detail{background:#fafafa;border:1px solid #ddd;padding:8px 12px;margin-top:8px;white-space:pre-wrap;font:12px/1.4 ui-monospace,monospace}
pre{background:#fafafa;border:1px solid #ddd;padding:8px 12px;overflow:auto}
svg text{font:11px system-ui,sans-serif;fill:#444}
.mark{cursor:pointer}.mark:hover{stroke:#000;stroke-width:1}
";

const SCRIPT: &str = r##"
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = tag === "svg" || ["rect","line","text","polyline","g","title","path"].includes(tag)
    ? document.createElementNS(NS, tag) : document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(1) + " ms"; }
function at(ms) { return "+" + (ms / 1000).toFixed(3) + " s"; }
function row(tbody, cells, cls) {
  const tr = el("tr", cls ? {class: cls} : {});
  for (const [text, num] of cells) tr.appendChild(el("td", num ? {class: "n"} : {}, text));
  tbody.appendChild(tr);
  return tr;
}
function meta() {
  const parts = [];
  if (D.exe) parts.push("pid " + D.pid + " (" + D.exe + ")");
  if (D.attached_at) parts.push("attached " + D.attached_at);
  parts.push(D.events + " events over " + fmtMs(D.span_ms));
  parts.push(D.stalls + " stalls (" + fmtMs(D.total_stall_ms) + " stalled)");
  if (D.threshold_ms !== null) parts.push("threshold " + D.threshold_ms + " ms");
  parts.push(D.alerts + " cumulative alerts");
  parts.push("from " + D.source);
  document.getElementById("meta").textContent = parts.join(" · ");
}
function detail(s) {
  const lines = [
    "stall of " + fmtMs(s.ms) + " at " + at(s.at_ms) + (s.time ? " (" + s.time + ")" : ""),
    "thread " + s.tid + " (" + s.thread + ")" + (s.task_id !== null ? ", task " + s.task_id : ""),
    "request: " + (s.request ? s.request + ", request " + s.request_id : "not known"),
    s.victims ? s.victims + " other requests waited" : "",
    s.cause ? "cause: " + s.cause : "",
  ].filter(Boolean);
  if (s.frames.length) lines.push("stack:", ...s.frames.map(f => "  " + f));
  document.getElementById("detail").textContent = lines.join("\n");
}
function timeline() {
  const W = 1000, left = 170, lane = 30, top = 20;
  const h = top + lane * Math.max(D.threads.length, 1) + 24;
  const svg = el("svg", {width: "100%", viewBox: "0 0 " + (left + W + 10) + " " + h, id: "timeline-svg"});
  const x = ms => left + (D.span_ms > 0 ? ms / D.span_ms * W : 0);
  for (let i = 0; i <= 4; i++) {
    const ms = D.span_ms * i / 4;
    svg.appendChild(el("line", {x1: x(ms), x2: x(ms), y1: top - 4, y2: h - 20, stroke: "#eee"}));
    svg.appendChild(el("text", {x: x(ms), y: h - 6, "text-anchor": "middle"}, at(ms)));
  }
  D.threads.forEach((t, i) => {
    const y = top + i * lane;
    svg.appendChild(el("text", {x: 4, y: y + lane / 2 + 4}, t.tid + " " + t.name));
    svg.appendChild(el("rect", {x: left, y: y + 2, width: W, height: lane - 4, fill: "#f7f7f7"}));
    const bw = Math.max(W / 800, 1);
    for (const [bin, ms, count] of t.bins) {
      const frac = Math.min(ms / D.bin_ms, 1);
      const bh = Math.max((lane - 4) * frac, 2);
      const r = el("rect", {class: "bin", x: left + bin * W / 800, y: y + lane - 2 - bh, width: bw, height: bh, fill: "#e4572e", opacity: 0.35 + 0.65 * frac});
      r.appendChild(el("title", {}, count + " stalls, " + fmtMs(ms) + " stalled"));
      svg.appendChild(r);
    }
  });
  for (const s of D.longest) {
    const y = top + s.lane * lane;
    const m = el("rect", {class: "mark", x: x(s.at_ms) - 2, y: y + 1, width: Math.max(s.ms / D.span_ms * W, 4), height: 6, fill: "#8b0000"});
    m.appendChild(el("title", {}, fmtMs(s.ms) + (s.request ? " " + s.request : "")));
    m.addEventListener("click", () => detail(s));
    svg.appendChild(m);
  }
  document.getElementById("timeline").appendChild(svg);
}
function stalls() {
  const tbody = document.querySelector("#stalls tbody");
  for (const s of D.longest) {
    const tr = row(tbody, [[at(s.at_ms)], [s.tid + " (" + s.thread + ")"], [s.ms.toFixed(1), true],
      [s.request || ""], [s.cause || ""], [s.frames[0] || ""]], "stall-row");
    tr.dataset.ms = s.ms;
    tr.addEventListener("click", () => detail(s));
  }
  if (D.stalls > D.longest.length) {
    row(tbody, [["… and " + (D.stalls - D.longest.length) + " shorter stalls (in the timeline above)"]]);
  }
}
function routes() {
  const tbody = document.querySelector("#routes tbody");
  for (const r of D.routes) row(tbody, [[r.name], [String(r.stalls), true], [r.total_ms.toFixed(1), true], [r.longest_ms.toFixed(1), true]], "route-row");
  if (!D.routes.length) row(tbody, [["no stall was tied to a request (no loopguard-middleware?)"]]);
}
function histogram() {
  const box = document.getElementById("histogram");
  if (!D.histogram.length) { box.textContent = "the recording has no summary, so no histogram"; return; }
  const W = 1000, H = 180, n = D.histogram.length, bw = W / n;
  const max = Math.max(...D.histogram.map(b => Math.log10(b.count + 1)));
  const svg = el("svg", {width: "100%", viewBox: "0 0 " + W + " " + (H + 30), id: "histogram-svg"});
  D.histogram.forEach((b, i) => {
    const bh = Math.log10(b.count + 1) / max * H;
    const r = el("rect", {x: i * bw + 1, y: H - bh, width: bw - 2, height: bh, fill: "#4a7fb5"});
    const ns = b.lower_ns;
    const label = ns >= 1e6 ? (ns / 1e6).toFixed(ns >= 1e7 ? 0 : 1) + " ms" : ns >= 1e3 ? (ns / 1e3).toFixed(0) + " µs" : ns + " ns";
    r.appendChild(el("title", {}, "≥ " + label + ": " + b.count + " polls"));
    svg.appendChild(r);
    if (i % Math.ceil(n / 12) === 0) svg.appendChild(el("text", {x: i * bw + bw / 2, y: H + 16, "text-anchor": "middle"}, label));
  });
  box.appendChild(svg);
  box.appendChild(el("p", {class: "hint"}, "Polls by duration (log scale of counts); bars start at a power of two."));
}
function alerts() {
  const chart = document.getElementById("alerts-chart");
  if (!D.alert_curve.length) { chart.textContent = "no cumulative alert"; return; }
  const W = 1000, H = 120;
  const n = D.alert_curve[D.alert_curve.length - 1][1];
  const x = ms => D.span_ms > 0 ? ms / D.span_ms * W : 0;
  let pts = "0," + H;
  for (const [ms, c] of D.alert_curve) pts += " " + x(ms) + "," + (H - c / n * H);
  const svg = el("svg", {width: "100%", viewBox: "0 0 " + W + " " + (H + 20)});
  svg.appendChild(el("polyline", {points: pts, fill: "none", stroke: "#8e44ad", "stroke-width": 2}));
  svg.appendChild(el("text", {x: 4, y: 12}, n + " alerts in all"));
  chart.appendChild(svg);
  const tbody = document.querySelector("#alerts tbody");
  for (const a of D.alert_list) row(tbody, [[at(a.at_ms)], [a.scope], [a.total_ms.toFixed(1), true], [String(a.polls), true], [a.window_ms.toFixed(0), true], [a.budget_ms.toFixed(0), true], [a.by]], "alert-row");
}
meta(); timeline(); stalls(); routes(); histogram(); alerts();
document.getElementById("summary").textContent = D.summary_text || "the recording ends without a summary (loopguard was killed?)";
document.body.dataset.rendered = "yes";
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fold_into_powers_of_two() {
        let slots = [
            HistogramSlot {
                lower_ns: 1024,
                upper_ns: 1152,
                count: 2,
            },
            HistogramSlot {
                lower_ns: 1920,
                upper_ns: 2048,
                count: 3,
            },
            HistogramSlot {
                lower_ns: 2048,
                upper_ns: 2304,
                count: 1,
            },
        ];
        let buckets = buckets(&slots);
        assert_eq!(buckets.len(), 2);
        assert_eq!((buckets[0].lower_ns, buckets[0].count), (1024, 5));
        let gap = [
            slots[0].clone(),
            HistogramSlot {
                lower_ns: 8192,
                upper_ns: 9216,
                count: 1,
            },
        ];
        let counts: Vec<u64> = super::buckets(&gap).iter().map(|b| b.count).collect();
        assert_eq!(counts, [2, 0, 0, 1]);
    }

    #[test]
    fn the_page_is_self_contained_and_data_cannot_close_its_script() {
        let mut aggregate = Aggregate::default();
        aggregate
            .add_line(r#"{"type":"stall","kind":"poll","pid":1,"tid":7,"thread":"</script><b>","task_id":3,"duration_ms":60.0,"threshold_ms":50.0,"request":null,"victim_count":0,"victims":[],"start_ns":5,"poll_fn":"p","polled_from":null}"#)
            .unwrap();
        let page = page(&aggregate, "x.jsonl");
        assert_eq!(
            page.matches("</script>").count(),
            2,
            "only the two real ones"
        );
        assert!(!page.contains("http://") || !page.contains("src=\"http"));
        assert!(!page.contains("<link") && !page.contains(" src="));
    }

    #[test]
    fn a_comment_opener_in_a_string_leaves_the_script_element_alone() {
        let mut aggregate = Aggregate::default();
        aggregate
            .add_line(r#"{"type":"stall","kind":"poll","pid":1,"tid":7,"thread":"<!--<script>&amp;","task_id":3,"duration_ms":60.0,"threshold_ms":50.0,"request":null,"victim_count":0,"victims":[],"start_ns":5,"poll_fn":"p","polled_from":null}"#)
            .unwrap();
        let page = page(&aggregate, "x.jsonl");
        assert!(!page.contains("<!--"), "a comment opener reached the page");
        let json = script_safe_json(r#"{"thread":"<!--<script>&amp;"}"#);
        assert_eq!(
            json,
            r#"{"thread":"\u003c!--\u003cscript\u003e\u0026amp;"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["thread"], "<!--<script>&amp;");
    }

    #[test]
    fn a_long_stall_spreads_over_the_bins_it_covers() {
        let mut aggregate = Aggregate::default();
        for (start, ms) in [(0_u64, 100.0), (900, 100.0)] {
            aggregate
                .add_line(&format!(r#"{{"type":"stall","kind":"poll","pid":1,"tid":7,"thread":"w","task_id":3,"duration_ms":{ms},"threshold_ms":50.0,"request":null,"victim_count":0,"victims":[],"start_ns":{},"poll_fn":"p","polled_from":null}}"#, start * 1_000_000))
                .unwrap();
        }
        let first = aggregate.first_ns.unwrap();
        let span = aggregate.last_ns.unwrap() - first;
        let threads = bin_threads(&aggregate, first, span as f64 / BINS as f64);
        let stalled: f64 = threads[0].bins.iter().map(|b| b.1).sum();
        assert!((stalled - 200.0).abs() < 0.01, "{stalled}");
        assert_eq!(threads[0].bins.iter().map(|b| b.2).sum::<u32>(), 2);
    }
}
