//! Report: renders events ([`crate::events`]) as text lines: stalls, alerts
//! and the final summary. JSON is the events themselves. The text comes
//! from the records alone, so `loopguard report` replays a recording to
//! what the live run printed. Stdout carries reports; diagnostics go to
//! stderr.

use crate::collect::lost::Lost;
use crate::detect::Rule;
use crate::detect::adaptive::AdaptiveThreshold;
use crate::detect::cumulative::CumulativeDetector;
use crate::detect::loops::LoopDetector;
use crate::detect::rule::stall_line;
use crate::detect::stall::StallDetector;
use crate::events::{Event, StallEvent, SummaryEvent};
use crate::present::alerts;
use crate::term::printable;

/// Output format chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One human-readable line per stall.
    Text,
    /// One JSON object per line (`type`: stall, `stall_in_progress`, ...).
    Json,
}

/// The text line of an event on stdout (`None` for `attached` and
/// `followed`, which are said on stderr: [`crate::present::attached`]
/// renders the banner, which `loopguard report --lines` replays).
pub fn event_text(event: &Event) -> Option<String> {
    Some(match event {
        Event::Attached(_) | Event::Followed(_) => return None,
        Event::StallInProgress(stall) => stall_text(stall, true),
        Event::Stall(stall) => stall_text(stall, false),
        Event::Cumulative(alert) => alerts::cumulative_text(alert),
        Event::Threshold(change) => alerts::threshold_text(change),
        Event::Summary(summary) => summary_text(summary),
    })
}

/// The text line of a stall, with its cause and frames under it.
pub fn stall_text(stall: &StallEvent, in_progress: bool) -> String {
    format!(
        "{head}{from}{stack}",
        head = stall_line(&stall.shown(in_progress)),
        from = request_text(stall),
        stack = stall
            .stack
            .as_ref()
            .map(crate::present::stacks::stall_lines)
            .unwrap_or_default(),
    )
}

/// `: POST /login (/login, request 8812); 4 other requests waited`, or where
/// it was polled from when no request is known.
fn request_text(stall: &StallEvent) -> String {
    let waited = match stall.victim_count {
        0 => String::new(),
        1 => "; 1 other request waited".to_owned(),
        n => format!("; {n} other requests waited"),
    };
    if let Some(request) = &stall.request {
        let route = request.route.as_deref().unwrap_or(&request.path);
        return format!(
            ": {} {} ({}, request {}){waited}",
            printable(&request.method),
            printable(route),
            printable(&request.path),
            request.id
        );
    }
    let from = stall
        .polled_from
        .as_deref()
        .map(|f| format!("; polled from {}", printable(f)))
        .unwrap_or_default();
    format!("{from}{waited}")
}

/// The summary as text lines: the rules' own lines between the headline
/// and the totals.
pub fn summary_text(summary: &SummaryEvent) -> String {
    let mut lines = vec![headline(summary)];
    lines.extend(AdaptiveThreshold::summary(&summary.adaptive_totals()));
    lines.extend(CumulativeDetector::summary(&summary.cumulative_totals()));
    lines.extend(StallDetector::summary(&summary.stall_totals()));
    lines.extend(LoopDetector::summary(&summary.loop_threads_shown()));
    if let (Some(p50), Some(p99)) = (summary.poll_p50_ms_upper, summary.poll_p99_ms_upper) {
        lines.push(format!(
            "  poll duration: p50 < {p50:.3} ms, p99 < {p99:.3} ms"
        ));
    }
    lines.extend(request_lines(summary));
    lines.push(lost_line(summary));
    lines.extend(crate::present::stacks::summary_lines(&summary.stacks));
    lines.join("\n")
}

/// The summary's first line: why it stopped, how long, polls and stalls.
fn headline(summary: &SummaryEvent) -> String {
    format!(
        "loopguard summary ({}): {:.1} s, {} worker polls ({} blocking-pool polls ignored), {} stall(s) over {} ms",
        if summary.stop_reason.is_empty() {
            "stopped"
        } else {
            &summary.stop_reason
        },
        summary.elapsed_s,
        summary.polls,
        summary.blocking_pool_polls,
        summary.stalls,
        summary.threshold_ms,
    )
}

/// The middleware's request totals and the ten worst routes, when it
/// reported any request (requests named from the in-flight table are not
/// counted: then the routes alone, when a stall named one).
fn request_lines(summary: &SummaryEvent) -> Vec<String> {
    let requests = &summary.requests;
    let named = requests.routes.iter().any(|r| r.route != "(no request)");
    let mut lines = if requests.started > 0 {
        vec![format!(
            "  requests: {} started, {} ended, {} in flight at exit (peak {}, capacity {})",
            requests.started,
            requests.ended,
            requests.in_flight,
            requests.peak_in_flight,
            requests.capacity
        )]
    } else if named {
        vec!["  requests (not counted without the request probes):".to_owned()]
    } else {
        return Vec::new();
    };
    for route in requests.routes.iter().take(10) {
        lines.push(format!(
            "    {}: {} stall(s), {:.1} ms in all, longest {:.1} ms",
            printable(&route.route),
            route.stalls,
            route.total_stall_ms,
            route.longest_stall_ms
        ));
    }
    lines
}

/// `data lost: ...` with every cause that lost something, or
/// `dropped events: 0`.
fn lost_line(summary: &SummaryEvent) -> String {
    let lost: Vec<String> = Lost::ALL
        .into_iter()
        .map(|cause| (summary.lost(cause), cause.text()))
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if lost.is_empty() {
        "  dropped events: 0".to_owned()
    } else {
        format!("  data lost: {}", lost.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::Request;
    use crate::detect::{Finding, Stall};
    use crate::events::summary::Summary;
    use crate::events::{StallContext, build};

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
            preempted_ns: 0,
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

    fn event(finding: &Finding, context: &StallContext) -> Event {
        build::finding(finding, 7, context, &build::CumulativeContext::default())
    }

    fn json(finding: &Finding, context: &StallContext) -> serde_json::Value {
        serde_json::to_value(event(finding, context)).unwrap()
    }

    fn text(finding: &Finding, context: &StallContext) -> String {
        event_text(&event(finding, context)).unwrap()
    }

    #[test]
    fn json_carries_the_contract_fields() {
        let finding = Finding::Finished {
            stall: stall(),
            seen_in_progress: true,
        };
        let value = json(&finding, &context());
        assert_eq!(value["type"], "stall");
        assert_eq!(value["kind"], "poll");
        assert_eq!(value["pid"], 7);
        assert_eq!(value["tid"], 42);
        assert_eq!(value["task_id"], 8812);
        assert_eq!(value["duration_ms"], 340.123);
        assert_eq!(value["threshold_ms"], 50.0);
        assert_eq!(value["seen_in_progress"], true);
        assert!(value["request"].is_null());
        assert!(value.get("stack").is_none() && value.get("task_header").is_none());
        let in_progress = json(&Finding::InProgress(stall()), &context());
        assert_eq!(in_progress["type"], "stall_in_progress");
        assert!(in_progress.get("seen_in_progress").is_none());
        let back: Event = serde_json::from_value(in_progress.clone()).unwrap();
        assert_eq!(serde_json::to_value(back).unwrap(), in_progress);
    }

    #[test]
    fn text_names_thread_task_and_duration() {
        let line = text(
            &Finding::Finished {
                stall: stall(),
                seen_in_progress: false,
            },
            &context(),
        );
        assert!(line.starts_with("STALL "), "{line}");
        assert!(
            line.contains("tid 42 (tokio-rt-worker) task 8812 blocked 340.1 ms"),
            "{line}"
        );
        let mut unknown = stall();
        unknown.task_id = None;
        let line = text(&Finding::InProgress(unknown), &context());
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
        let line = text(&finding, &context);
        assert!(
            line.ends_with(": POST /login (/login, request 8812); 4 other requests waited"),
            "{line}"
        );
        let value = json(&finding, &context);
        assert_eq!(value["request"]["id"], 8812);
        assert_eq!(value["request"]["route"], "/login");
        assert_eq!(value["victim_count"], 4);
        assert_eq!(value["victims"][0]["path"], "/health");
        assert!(value["victims"][0]["route"].is_null());
    }

    #[test]
    fn summary_mentions_lost_data_only_when_there_is_some() {
        let mut summary = Summary::default();
        assert!(summary_text(&build::summary(&summary, 1)).contains("dropped events: 0"));
        summary.counters.0[loopguard_common::Counter::DroppedEvents as usize] = 3;
        let event = build::summary(&summary, 1);
        assert!(summary_text(&event).contains("3 events dropped"));
        assert_eq!(serde_json::to_value(&event).unwrap()["dropped_events"], 3);
    }

    #[test]
    fn a_full_request_map_is_its_own_loss_not_the_ring_buffers() {
        let mut summary = Summary::default();
        summary.counters.0[loopguard_common::Counter::RequestMapFull as usize] = 2;
        let event = build::summary(&summary, 1);
        let text = summary_text(&event);
        assert!(
            text.contains("data lost: 2 requests untracked (request map full)"),
            "{text}"
        );
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["request_map_full"], 2);
        assert_eq!(value["dropped_events"], 0);
        // A recording from before the field existed still reads.
        let mut old = value;
        old.as_object_mut().unwrap().remove("request_map_full");
        let back: crate::events::SummaryEvent = serde_json::from_value(old).unwrap();
        assert_eq!(back.request_map_full, 0);
    }

    #[test]
    fn every_lost_data_cause_reaches_the_text_and_the_json_summary() {
        for cause in crate::collect::lost::Lost::ALL {
            let mut summary = Summary::default();
            summary.counters.0[cause.counter() as usize] = 5;
            let event = build::summary(&summary, 1);
            assert_eq!(event.lost(cause), 5, "{cause:?}");
            let text = summary_text(&event);
            assert!(
                text.contains(&format!("data lost: 5 {}", cause.text())),
                "{text}"
            );
            let value = serde_json::to_value(&event).unwrap();
            let field = value
                .as_object()
                .unwrap()
                .iter()
                .find(|(_, v)| **v == 5)
                .map(|(k, _)| k.clone());
            assert!(field.is_some(), "{cause:?} has no JSON field: {value}");
        }
        // SlotLeaked is the one the summary used to leave out.
        let mut old = serde_json::to_value(build::summary(&Summary::default(), 1)).unwrap();
        old.as_object_mut().unwrap().remove("thread_slot_leaked");
        let back: crate::events::SummaryEvent = serde_json::from_value(old).unwrap();
        assert_eq!(back.thread_slot_leaked, 0);
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
        let event = build::summary(&summary, 1);
        let value = serde_json::to_value(Event::Summary(Box::new(event.clone()))).unwrap();
        assert_eq!(value["type"], "summary");
        assert_eq!(value["threshold_ms"], 20.0);
        assert_eq!(value["threshold"]["min_ms"], 12.0);
        assert_eq!(value["threshold"]["max_ms"], 50.0);
        assert!(summary_text(&event).contains("adaptive threshold: 20.0 ms now, 12.0 to 50.0 ms"));
    }
}
