//! Report: renders findings and the final summary as text lines or JSON
//! objects (one per line). Stdout carries reports; diagnostics go to stderr.

use serde_json::{Value, json};

use crate::alerts;
use crate::attribute::Request;
use crate::detect::{Finding, Stall, StallKind};
use crate::summary::{RequestSummary, Summary};

/// Output format chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One human-readable line per stall.
    Text,
    /// One JSON object per line (`type`: stall, `stall_in_progress`, ...).
    Json,
}

/// What a stall is shown with besides its numbers.
#[derive(Clone, Debug, Default)]
pub struct StallContext {
    /// The thread's name (`comm`).
    pub thread: String,
    /// The `raw::poll` copy's name (v0 builds name the future type in it).
    pub poll_fn: String,
    /// The function the poll returns into: the scheduler that polled.
    pub polled_from: Option<String>,
    /// The request the stalled task was serving (needs the middleware).
    pub request: Option<Request>,
    /// Other requests in flight while the thread was blocked (at most 20).
    pub victims: Vec<Request>,
    /// How many there were in all.
    pub victim_count: usize,
    /// Where the poll spent its time and why (stack capture on).
    pub stack: Option<crate::stacks::StallStack>,
}

fn request_json(request: &Request) -> Value {
    json!({ "id": request.id, "method": request.method, "route": request.route, "path": request.path })
}

const NS_PER_MS: f64 = 1_000_000.0;

fn ms(ns: u64) -> f64 {
    (ns as f64 / NS_PER_MS * 1000.0).round() / 1000.0
}

/// The JSON object for a finding.
pub fn finding_json(
    finding: &Finding,
    pid: u32,
    threshold_ns: u64,
    context: &StallContext,
) -> Value {
    let (kind, stall) = match finding {
        Finding::InProgress(stall) => ("stall_in_progress", stall),
        Finding::Finished { stall, .. } => ("stall", stall),
        Finding::Cumulative(alert) => {
            return alerts::cumulative_json(alert, pid, threshold_ns, 0);
        }
        Finding::ThresholdChanged(change) => return alerts::threshold_json(change, pid),
    };
    let mut object = json!({
        "type": kind,
        "kind": stall.kind.as_str(),
        "pid": pid,
        "tid": stall.tid,
        "thread": context.thread,
        "task_id": stall.task_id,
        "duration_ms": ms(stall.duration_ns),
        "threshold_ms": ms(threshold_ns),
        "request": context.request.as_ref().map_or(Value::Null, request_json),
        "victim_count": context.victim_count,
        "victims": context.victims.iter().map(request_json).collect::<Vec<_>>(),
        "start_ns": stall.start_ns,
        "poll_fn": context.poll_fn,
        "polled_from": context.polled_from,
    });
    if let Finding::Finished {
        seen_in_progress, ..
    } = finding
    {
        object["seen_in_progress"] = json!(seen_in_progress);
    }
    if let Some(stack) = &context.stack {
        crate::stacks::render::add_json(&mut object, stack);
    }
    object
}

/// `text` with every control character escaped (`\r`, `\n`, `\u{1b}`):
/// thread names, routes and paths come from the target, and must not be
/// able to forge a line or drive the terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// The text line for a finding.
pub fn finding_text(finding: &Finding, threshold_ns: u64, context: &StallContext) -> String {
    let (label, stall, verb) = match finding {
        Finding::InProgress(stall) if stall.kind == StallKind::Loop => {
            ("LOOP STALL IN PROGRESS", stall, "blocked for")
        }
        Finding::Finished { stall, .. } if stall.kind == StallKind::Loop => {
            ("LOOP STALL", stall, "blocked")
        }
        Finding::InProgress(stall) => ("STALL IN PROGRESS", stall, "blocked for"),
        Finding::Finished { stall, .. } => ("STALL", stall, "blocked"),
        Finding::Cumulative(alert) => return alerts::cumulative_text(alert, None),
        Finding::ThresholdChanged(change) => return alerts::threshold_text(change),
    };
    format!(
        "{label:<17} tid {tid} ({thread}) {task} {verb} {duration:.1} ms (threshold {threshold} ms){from}{stack}",
        tid = stall.tid,
        thread = printable(&context.thread),
        task = task_label(stall),
        duration = ms(stall.duration_ns),
        threshold = ms(threshold_ns),
        from = request_text(context),
        stack = context
            .stack
            .as_ref()
            .map(crate::stacks::render::stall_lines)
            .unwrap_or_default(),
    )
}

/// `: POST /login (/login, request 8812); 4 other requests waited`, or where
/// it was polled from when no request is known.
fn request_text(context: &StallContext) -> String {
    let waited = match context.victim_count {
        0 => String::new(),
        1 => "; 1 other request waited".to_owned(),
        n => format!("; {n} other requests waited"),
    };
    if let Some(request) = &context.request {
        let route = request.route.as_deref().unwrap_or(&request.path);
        return format!(
            ": {} {} ({}, request {}){waited}",
            printable(&request.method),
            printable(route),
            printable(&request.path),
            request.id
        );
    }
    let from = context
        .polled_from
        .as_deref()
        .map(|f| format!("; polled from {}", printable(f)))
        .unwrap_or_default();
    format!("{from}{waited}")
}

fn task_label(stall: &Stall) -> String {
    if stall.kind == StallKind::Loop {
        return "its event loop (outside any task poll)".to_owned();
    }
    match stall.task_id {
        Some(id) => format!("task {id}"),
        None if stall.header == 0 => "task ?".to_owned(),
        None => format!("task@{:#x}", stall.header),
    }
}

/// The JSON object for the summary.
pub fn summary_json(summary: &Summary, pid: u32) -> Value {
    use loopguard_common::Counter;
    let counters = &summary.counters;
    let thresholds = &summary.thresholds;
    json!({
        "type": "summary",
        "pid": pid,
        "threshold_ms": ms(thresholds.current_ns),
        "threshold": {
            "adaptive": summary.adaptive,
            "min_ms": ms(thresholds.min_ns),
            "max_ms": ms(thresholds.max_ns),
            "current_ms": ms(thresholds.current_ns),
        },
        "cumulative_alerts": summary.cumulative_alerts,
        "preempted_polls_not_counted": summary.preempted_cuts,
        "excluded": {
            "stalls": summary.excluded_stalls,
            "cumulative_polls": summary.excluded_cuts.0,
            "cumulative_ms": ms(summary.excluded_cuts.1),
        },
        "elapsed_s": (summary.elapsed_s * 1000.0).round() / 1000.0,
        "stop_reason": summary.stop_reason,
        "polls": summary.histogram.total(),
        "blocking_pool_polls": counters.get(Counter::BlockingPolls),
        "stalls": summary.stalls,
        "stalls_unfinished": summary.unfinished,
        "total_stall_ms": ms(summary.total_stall_ns),
        "longest_stall_ms": summary.longest.as_ref().map(|s| ms(s.duration_ns)),
        "longest_stall_task_id": summary.longest.as_ref().and_then(|s| s.task_id),
        "poll_p50_ms_upper": summary.histogram.quantile_upper_ns(0.5).map(ms),
        "poll_p99_ms_upper": summary.histogram.quantile_upper_ns(0.99).map(ms),
        "dropped_events": counters.get(Counter::DroppedEvents),
        "unmatched_returns": counters.get(Counter::UnmatchedReturns),
        "stack_overflows": counters.get(Counter::StackOverflow),
        "thread_map_full": counters.get(Counter::ThreadMapFull),
        "requests": requests_json(&summary.requests),
        "stacks": crate::stacks::render::summary_json(&summary.stacks),
        "loop_threads": summary.loop_threads.iter().map(|thread| json!({
            "tid": thread.tid,
            "thread": thread.name,
            "busy_ms": ms(thread.busy_ns),
            "wait_ms": ms(thread.wait_ns),
            "waits": thread.waits,
        })).collect::<Vec<_>>(),
    })
}

fn requests_json(requests: &RequestSummary) -> Value {
    json!({
        "started": requests.started,
        "ended": requests.ended,
        "in_flight": requests.in_flight,
        "peak_in_flight": requests.peak_in_flight,
        "capacity": requests.capacity,
        "evicted": requests.evicted,
        "unmatched_ends": requests.unmatched_ends,
        "unattributable_starts": requests.unattributable_starts,
        "layout_mismatches": requests.layout_mismatches,
        "routes": requests.routes.iter().map(|(route, totals)| json!({
            "route": route,
            "stalls": totals.stalls,
            "total_stall_ms": ms(totals.total_ns),
            "longest_stall_ms": ms(totals.longest_ns),
        })).collect::<Vec<_>>(),
    })
}

/// The summary's lines about the threshold rules.
fn threshold_lines(summary: &Summary) -> Vec<String> {
    let mut lines = Vec::new();
    let t = &summary.thresholds;
    if summary.adaptive {
        lines.push(format!(
            "  adaptive threshold: {:.1} ms now, {:.1} to {:.1} ms over the run",
            ms(t.current_ns),
            ms(t.min_ns),
            ms(t.max_ns)
        ));
    }
    if summary.cumulative_alerts > 0 {
        lines.push(format!(
            "  cumulative alerts: {}",
            summary.cumulative_alerts
        ));
    }
    if summary.excluded_stalls > 0 || summary.excluded_cuts.0 > 0 {
        lines.push(format!(
            "  excluded routes: {} stall(s) and {} short polls ({:.1} ms) not alerted on",
            summary.excluded_stalls,
            summary.excluded_cuts.0,
            ms(summary.excluded_cuts.1)
        ));
    }
    lines
}

/// The summary as text lines.
pub fn summary_text(summary: &Summary) -> String {
    use loopguard_common::Counter;
    let counters = &summary.counters;
    let threshold_ns = summary.thresholds.current_ns;
    let mut lines = vec![format!(
        "loopguard summary ({}): {:.1} s, {} worker polls ({} blocking-pool polls ignored), {} stall(s) over {} ms",
        if summary.stop_reason.is_empty() {
            "stopped"
        } else {
            summary.stop_reason
        },
        summary.elapsed_s,
        summary.histogram.total(),
        counters.get(Counter::BlockingPolls),
        summary.stalls,
        ms(threshold_ns),
    )];
    lines.extend(threshold_lines(summary));
    if let Some(longest) = &summary.longest {
        lines.push(format!(
            "  longest stall: {:.1} ms, tid {} {}; total stalled {:.1} ms",
            ms(longest.duration_ns),
            longest.tid,
            task_label(longest),
            ms(summary.total_stall_ns),
        ));
    }
    if summary.unfinished > 0 {
        lines.push(format!(
            "  {} stall(s) were still in progress at exit",
            summary.unfinished
        ));
    }
    for thread in &summary.loop_threads {
        lines.push(format!(
            "  event loop tid {} ({}): busy {:.1} ms, waiting {:.1} ms ({:.0} % busy), {} waits",
            thread.tid,
            printable(&thread.name),
            ms(thread.busy_ns),
            ms(thread.wait_ns),
            thread.busy_ratio() * 100.0,
            thread.waits,
        ));
    }
    if let (Some(p50), Some(p99)) = (
        summary.histogram.quantile_upper_ns(0.5),
        summary.histogram.quantile_upper_ns(0.99),
    ) {
        lines.push(format!(
            "  poll duration: p50 < {:.3} ms, p99 < {:.3} ms",
            ms(p50),
            ms(p99)
        ));
    }
    let dropped = counters.get(Counter::DroppedEvents);
    let lost = [
        (dropped, "events dropped (ring buffer full)"),
        (
            counters.get(Counter::UnmatchedReturns),
            "returns without a matching entry",
        ),
        (
            counters.get(Counter::StackOverflow),
            "polls nested too deep to time",
        ),
        (
            counters.get(Counter::ThreadMapFull),
            "polls untracked (thread map full)",
        ),
    ];
    let lost: Vec<String> = lost
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    let requests = &summary.requests;
    if requests.started > 0 {
        lines.push(format!(
            "  requests: {} started, {} ended, {} in flight at exit (peak {}, capacity {})",
            requests.started,
            requests.ended,
            requests.in_flight,
            requests.peak_in_flight,
            requests.capacity
        ));
        for (route, totals) in requests.routes.iter().take(10) {
            lines.push(format!(
                "    {}: {} stall(s), {:.1} ms in all, longest {:.1} ms",
                printable(route),
                totals.stalls,
                ms(totals.total_ns),
                ms(totals.longest_ns)
            ));
        }
    }
    lines.push(if lost.is_empty() {
        "  dropped events: 0".to_owned()
    } else {
        format!("  data lost: {}", lost.join(", "))
    });
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_strings_cannot_forge_lines_or_drive_the_terminal() {
        assert_eq!(printable("/users/{id}"), "/users/{id}");
        let forged = printable("/x\r\nSTALL tid 1 (\u{1b}]0;pwned\u{7})");
        assert!(!forged.chars().any(char::is_control), "{forged}");
        assert!(
            forged.contains("\\r\\n") && forged.contains("\\u{1b}"),
            "{forged}"
        );
    }

    fn stall() -> Stall {
        Stall {
            kind: crate::detect::StallKind::Poll,
            tid: 42,
            task_id: Some(8812),
            header: 0xdead_0000,
            start_ns: 5,
            duration_ns: 340_123_456,
            copy_index: 0,
            return_addr: 0,
            threshold_ns: 50_000_000,
            requests_window: None,
        }
    }

    fn context() -> StallContext {
        StallContext {
            thread: "tokio-rt-worker".into(),
            poll_fn: "tokio::runtime::task::raw::poll".into(),
            ..StallContext::default()
        }
    }

    #[test]
    fn json_carries_the_contract_fields() {
        let finding = Finding::Finished {
            stall: stall(),
            seen_in_progress: true,
        };
        let value = finding_json(&finding, 7, 50_000_000, &context());
        assert_eq!(value["type"], "stall");
        assert_eq!(value["pid"], 7);
        assert_eq!(value["tid"], 42);
        assert_eq!(value["task_id"], 8812);
        assert_eq!(value["duration_ms"], 340.123);
        assert_eq!(value["threshold_ms"], 50.0);
        assert!(value["request"].is_null());
        let in_progress = finding_json(&Finding::InProgress(stall()), 7, 50_000_000, &context());
        assert_eq!(in_progress["type"], "stall_in_progress");
    }

    #[test]
    fn text_names_thread_task_and_duration() {
        let line = finding_text(
            &Finding::Finished {
                stall: stall(),
                seen_in_progress: false,
            },
            50_000_000,
            &context(),
        );
        assert!(line.starts_with("STALL "), "{line}");
        assert!(
            line.contains("tid 42 (tokio-rt-worker) task 8812 blocked 340.1 ms"),
            "{line}"
        );
        let mut unknown = stall();
        unknown.task_id = None;
        let line = finding_text(&Finding::InProgress(unknown), 50_000_000, &context());
        assert!(line.contains("task@0xdead0000 blocked for"), "{line}");
    }

    #[test]
    fn a_stall_names_its_request_and_counts_the_victims() {
        let login = Request {
            id: 8812,
            method: "POST".into(),
            route: Some("/login".into()),
            path: "/login".into(),
            task_id: 1,
            start_ns: 0,
            end_ns: None,
            status: None,
        };
        let other = Request {
            id: 9,
            route: None,
            path: "/health".into(),
            ..login.clone()
        };
        let context = StallContext {
            request: Some(login),
            victims: vec![other],
            victim_count: 4,
            ..context()
        };
        let finding = Finding::Finished {
            stall: stall(),
            seen_in_progress: false,
        };
        let line = finding_text(&finding, 50_000_000, &context);
        assert!(
            line.ends_with(": POST /login (/login, request 8812); 4 other requests waited"),
            "{line}"
        );
        let value = finding_json(&finding, 7, 50_000_000, &context);
        assert_eq!(value["request"]["id"], 8812);
        assert_eq!(value["request"]["route"], "/login");
        assert_eq!(value["victim_count"], 4);
        assert_eq!(value["victims"][0]["path"], "/health");
        assert!(value["victims"][0]["route"].is_null());
    }

    #[test]
    fn summary_mentions_lost_data_only_when_there_is_some() {
        let mut summary = Summary::default();
        assert!(summary_text(&summary).contains("dropped events: 0"));
        summary.counters.0[loopguard_common::Counter::DroppedEvents as usize] = 3;
        assert!(summary_text(&summary).contains("3 events dropped"));
        assert_eq!(summary_json(&summary, 1)["dropped_events"], 3);
    }

    #[test]
    fn summary_shows_the_thresholds_in_force() {
        let summary = Summary {
            adaptive: true,
            thresholds: crate::detect::ThresholdRange {
                min_ns: 12_000_000,
                max_ns: 50_000_000,
                current_ns: 20_000_000,
            },
            ..Summary::default()
        };
        let value = summary_json(&summary, 1);
        assert_eq!(value["threshold_ms"], 20.0);
        assert_eq!(value["threshold"]["min_ms"], 12.0);
        assert_eq!(value["threshold"]["max_ms"], 50.0);
        assert!(
            summary_text(&summary).contains("adaptive threshold: 20.0 ms now, 12.0 to 50.0 ms")
        );
    }
}
