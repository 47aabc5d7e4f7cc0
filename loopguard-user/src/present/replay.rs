//! Replay: `loopguard report FILE.jsonl` reads a recording back, one line
//! at a time (a recording of a million events is never held whole), and
//! prints its summary as the live run did, its lines (`--lines`), or an
//! HTML page of it (`--html`, [`crate::present::html`]).
//!
//! [`Aggregate`] folds the events into what the page shows: stalls binned
//! per thread over time, the longest stalls in full, routes by stall time,
//! cumulative alerts. It is pure: the tests feed it synthetic lines.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::events::{
    Attached, CauseRecord, CumulativeEvent, Event, FrameRecord, RequestRecord, SummaryEvent,
};

/// The recording cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("failed to read the recording {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} line {line} is not a loopguard event ({reason}); pass a file written by `--record` or `--format json`",
        path.display()
    )]
    NotAnEvent {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{} holds no loopguard events; pass a file written by `--record` or `--format json`", path.display())]
    Empty { path: PathBuf },
    #[error("failed to write the page {}; check the directory exists and is writable", path.display())]
    WriteHtml {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the timeline and the tables need of a stall: read without the
/// fields they do not show, so a large recording parses fast.
#[derive(Clone, Debug, Deserialize)]
pub struct StallLine {
    #[serde(rename = "type")]
    pub event: String,
    pub kind: String,
    pub tid: u32,
    pub thread: String,
    pub task_id: Option<u64>,
    pub duration_ms: f64,
    pub start_ns: u64,
    #[serde(default)]
    pub start_time: Option<String>,
    pub request: Option<RequestRecord>,
    #[serde(default)]
    pub victim_count: usize,
    #[serde(default)]
    pub stack: Option<Vec<FrameRecord>>,
    #[serde(default)]
    pub cause: Option<CauseRecord>,
}

/// Only the tag, to route a line.
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    event: Cow<'a, str>,
}

/// The part of a stall every stall is read for; the rest (its stack) only
/// when it is among the longest.
#[derive(Deserialize)]
struct StallHead<'a> {
    #[serde(rename = "type", borrow)]
    event: Cow<'a, str>,
    tid: u32,
    #[serde(borrow)]
    thread: Cow<'a, str>,
    duration_ms: f64,
    start_ns: u64,
    #[serde(borrow)]
    request: Option<RequestHead<'a>>,
}

#[derive(Deserialize)]
struct RequestHead<'a> {
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    route: Option<Cow<'a, str>>,
    #[serde(borrow)]
    path: Cow<'a, str>,
}

/// The `type` of a line without parsing it: loopguard writes the tag
/// first, and no event has a nested `type` key (a quote inside a string is
/// escaped, so the pattern cannot come from a value). `None` when absent.
fn quick_tag(line: &str) -> Option<&str> {
    const KEY: &str = "\"type\":\"";
    let at = if line.starts_with("{\"type\":\"") {
        1
    } else {
        line.find(KEY)?
    };
    let rest = &line[at + KEY.len()..];
    rest.get(..rest.find('"')?)
}

/// Stalls kept in full for the page (the longest).
pub const KEPT_STALLS: usize = 200;
/// Cumulative alerts kept in full (the first ones; all are counted and binned).
pub const KEPT_ALERTS: usize = 200;

/// A stall reduced to what binning needs.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub thread: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
}

/// Totals of one route.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTotals {
    pub stalls: u64,
    pub total_ms: f64,
    pub longest_ms: f64,
}

/// Everything read from a recording.
#[derive(Debug, Default)]
pub struct Aggregate {
    pub attached: Option<Attached>,
    pub summary: Option<SummaryEvent>,
    pub lines: u64,
    pub stalls: u64,
    pub in_progress: u64,
    pub total_stall_ms: f64,
    /// Threads by tid, in order of appearance: (tid, name).
    pub threads: Vec<(u32, String)>,
    thread_index: HashMap<u32, u32>,
    /// Every finished stall, reduced.
    pub spans: Vec<Span>,
    /// The longest finished stalls, in full (at most [`KEPT_STALLS`]).
    pub longest: Vec<StallLine>,
    /// `METHOD route` → totals, of finished stalls.
    pub routes: HashMap<String, RouteTotals>,
    pub alerts: u64,
    /// Every alert's (window end, blocked ms).
    pub alert_points: Vec<(u64, f64)>,
    pub kept_alerts: Vec<CumulativeEvent>,
    pub thresholds: Vec<(u64, f64)>,
    pub first_ns: Option<u64>,
    pub last_ns: Option<u64>,
    /// The shortest of `longest` and where it is, once it is full.
    shortest_kept: Option<(f64, usize)>,
    key: String,
}

impl Aggregate {
    fn see(&mut self, start_ns: u64, end_ns: u64) {
        self.first_ns = Some(self.first_ns.map_or(start_ns, |f| f.min(start_ns)));
        self.last_ns = Some(self.last_ns.map_or(end_ns, |l| l.max(end_ns)));
    }

    fn thread(&mut self, tid: u32, name: &str) -> u32 {
        if let Some(&index) = self.thread_index.get(&tid) {
            return index;
        }
        let index = self.threads.len() as u32;
        self.threads.push((tid, name.to_owned()));
        self.thread_index.insert(tid, index);
        index
    }

    /// Folds one line in; `Err` says why it is not an event.
    pub fn add_line(&mut self, line: &str) -> Result<(), String> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let tag = match quick_tag(line) {
            Some(tag) => Cow::Borrowed(tag),
            None => {
                serde_json::from_str::<Tag>(line)
                    .map_err(|e| e.to_string())?
                    .event
            }
        };
        self.lines += 1;
        match tag.as_ref() {
            "stall" | "stall_in_progress" => self.add_stall(line)?,
            "cumulative" => {
                let alert: CumulativeEvent =
                    serde_json::from_str(line).map_err(|e| e.to_string())?;
                if alert.window_end_ns < alert.window_start_ns {
                    return Err(format!(
                        "a cumulative alert whose window ends (window_end_ns {}) before it starts (window_start_ns {})",
                        alert.window_end_ns, alert.window_start_ns
                    ));
                }
                self.alerts += 1;
                self.see(alert.window_start_ns, alert.window_end_ns);
                self.alert_points
                    .push((alert.window_end_ns, alert.total_ms));
                if self.kept_alerts.len() < KEPT_ALERTS {
                    self.kept_alerts.push(alert);
                }
            }
            "threshold" | "attached" | "summary" => match serde_json::from_str(line) {
                Ok(Event::Attached(attached)) => {
                    self.see(attached.at_ns, attached.at_ns);
                    self.attached = Some(attached);
                }
                Ok(Event::Summary(summary)) => {
                    check_histogram(&summary.poll_histogram)?;
                    if summary.at_ns > 0 {
                        self.see(summary.at_ns, summary.at_ns);
                    }
                    self.summary = Some(*summary);
                }
                Ok(Event::Threshold(change)) => {
                    self.thresholds.push((change.at_ns, change.threshold_ms));
                }
                Ok(_) => {}
                Err(error) => return Err(error.to_string()),
            },
            // A newer loopguard's event: skipped, not fatal.
            _ => {}
        }
        Ok(())
    }

    fn add_stall(&mut self, line: &str) -> Result<(), String> {
        let stall: StallHead = serde_json::from_str(line).map_err(|e| e.to_string())?;
        if stall.event == "stall_in_progress" {
            self.in_progress += 1;
            return Ok(());
        }
        let duration_ns = stall_duration_ns(stall.duration_ms)?;
        let end_ns = stall.start_ns.checked_add(duration_ns).ok_or_else(|| {
            format!(
                "a stall that ends past the end of time (start_ns {} + duration_ms {})",
                stall.start_ns, stall.duration_ms
            )
        })?;
        self.stalls += 1;
        self.total_stall_ms += stall.duration_ms;
        self.see(stall.start_ns, end_ns);
        let thread = self.thread(stall.tid, &stall.thread);
        self.spans.push(Span {
            thread,
            start_ns: stall.start_ns,
            duration_ns,
        });
        if let Some(request) = &stall.request {
            self.key.clear();
            self.key.push_str(&request.method);
            self.key.push(' ');
            self.key
                .push_str(request.route.as_deref().unwrap_or(&request.path));
            let totals = match self.routes.get_mut(&self.key) {
                Some(totals) => totals,
                None => self.routes.entry(self.key.clone()).or_default(),
            };
            totals.stalls += 1;
            totals.total_ms += stall.duration_ms;
            totals.longest_ms = totals.longest_ms.max(stall.duration_ms);
        }
        let longer = self
            .shortest_kept
            .is_none_or(|(shortest, _)| stall.duration_ms > shortest);
        if longer {
            let full: StallLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
            self.keep(full);
        }
        Ok(())
    }

    /// Keeps one of the [`KEPT_STALLS`] longest, in place of the shortest
    /// kept once they are that many.
    fn keep(&mut self, stall: StallLine) {
        match self.shortest_kept {
            None => self.longest.push(stall),
            Some((_, at)) => self.longest[at] = stall,
        }
        if self.longest.len() >= KEPT_STALLS {
            self.shortest_kept = self
                .longest
                .iter()
                .enumerate()
                .map(|(i, s)| (s.duration_ms, i))
                .min_by(|a, b| a.0.total_cmp(&b.0));
        }
    }

    /// Routes by total stall time, worst first.
    pub fn ranked_routes(&self) -> Vec<(&str, &RouteTotals)> {
        let mut routes: Vec<(&str, &RouteTotals)> =
            self.routes.iter().map(|(k, v)| (k.as_str(), v)).collect();
        routes.sort_by(|a, b| b.1.total_ms.total_cmp(&a.1.total_ms).then(a.0.cmp(b.0)));
        routes
    }
}

/// A stall's `duration_ms` in ns: finite, not negative, and at most a
/// year (a recording says more only if it was edited).
fn stall_duration_ns(duration_ms: f64) -> Result<u64, String> {
    const YEAR_MS: f64 = 365.0 * 86_400_000.0;
    if !(0.0..=YEAR_MS).contains(&duration_ms) {
        return Err(format!(
            "a stall with duration_ms {duration_ms}: durations are between 0 and a year"
        ));
    }
    Ok((duration_ms * 1e6) as u64)
}

/// A summary's `poll_histogram`: slots in ascending order of `lower_ns`,
/// each no wider than it is long (as loopguard writes them).
fn check_histogram(slots: &[crate::events::HistogramSlot]) -> Result<(), String> {
    if let Some(pair) = slots
        .windows(2)
        .find(|pair| pair[0].lower_ns >= pair[1].lower_ns)
    {
        return Err(format!(
            "a summary whose poll_histogram is not in ascending order (lower_ns {} then {})",
            pair[0].lower_ns, pair[1].lower_ns
        ));
    }
    if let Some(slot) = slots.iter().find(|slot| slot.upper_ns < slot.lower_ns) {
        return Err(format!(
            "a summary whose poll_histogram has a slot ending before it starts (lower_ns {}, upper_ns {})",
            slot.lower_ns, slot.upper_ns
        ));
    }
    Ok(())
}

/// Reads `path` line by line into an [`Aggregate`]; `each` sees every line.
pub fn read(path: &Path, mut each: impl FnMut(&str)) -> Result<Aggregate, ReplayError> {
    let read_error = |source| ReplayError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut aggregate = Aggregate::default();
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(read_error)? == 0 {
            break;
        }
        number += 1;
        aggregate
            .add_line(&line)
            .map_err(|reason| ReplayError::NotAnEvent {
                path: path.to_owned(),
                line: number,
                reason,
            })?;
        each(&line);
    }
    if aggregate.lines == 0 {
        return Err(ReplayError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(aggregate)
}

/// The summary of a recording that ends without one (loopguard was killed):
/// what its stalls tell, and said so.
pub fn partial_summary(aggregate: &Aggregate) -> SummaryEvent {
    let longest = aggregate
        .longest
        .iter()
        .max_by(|a, b| a.duration_ms.total_cmp(&b.duration_ms));
    let pid = aggregate.attached.as_ref().map_or(0, |a| a.pid);
    let threshold_ms = aggregate.attached.as_ref().map_or(0.0, |a| a.threshold_ms);
    let span_s = match (aggregate.first_ns, aggregate.last_ns) {
        (Some(first), Some(last)) => last.saturating_sub(first) as f64 / 1e9,
        _ => 0.0,
    };
    SummaryEvent {
        pid,
        threshold_ms,
        threshold: crate::events::ThresholdSummary {
            adaptive: aggregate.attached.as_ref().is_some_and(|a| a.adaptive),
            min_ms: threshold_ms,
            max_ms: threshold_ms,
            current_ms: threshold_ms,
        },
        cumulative_alerts: aggregate.alerts,
        elapsed_s: (span_s * 1000.0).round() / 1000.0,
        stop_reason: "recording ends without a summary: loopguard was killed? totals from the recorded events".to_owned(),
        stalls: aggregate.stalls,
        total_stall_ms: (aggregate.total_stall_ms * 1000.0).round() / 1000.0,
        longest_stall_ms: longest.map(|s| s.duration_ms),
        longest_stall_task_id: longest.and_then(|s| s.task_id),
        requests: crate::events::RequestsSummary {
            routes: recorded_routes(aggregate),
            ..Default::default()
        },
        longest_stall: longest.map(|s| crate::events::LongestStall {
            kind: s.kind.clone(),
            tid: s.tid,
            task_id: s.task_id,
            task_header: None,
            duration_ms: s.duration_ms,
            start_ns: s.start_ns,
        }),
        at_ns: aggregate.last_ns.unwrap_or(0),
        // No counter, poll, exclusion or stack is known: those are 0 and
        // empty.
        ..SummaryEvent::default()
    }
}

/// The ten routes of the recorded stalls with the most stall time.
fn recorded_routes(aggregate: &Aggregate) -> Vec<crate::events::RouteSummary> {
    let mut routes: Vec<crate::events::RouteSummary> = aggregate
        .ranked_routes()
        .into_iter()
        .map(|(route, totals)| crate::events::RouteSummary {
            route: route.to_owned(),
            stalls: totals.stalls,
            total_stall_ms: (totals.total_ms * 1000.0).round() / 1000.0,
            longest_stall_ms: totals.longest_ms,
        })
        .collect();
    routes.truncate(10);
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::present::text as report;

    fn stall(tid: u32, start_ms: u64, ms: f64, route: Option<&str>) -> String {
        let request = route.map_or("null".to_owned(), |r| {
            format!(r#"{{"id":1,"method":"GET","route":"{r}","path":"{r}"}}"#)
        });
        format!(
            r#"{{"type":"stall","kind":"poll","pid":1,"tid":{tid},"thread":"w","task_id":3,"duration_ms":{ms},"threshold_ms":50.0,"request":{request},"victim_count":0,"victims":[],"start_ns":{},"poll_fn":"p","polled_from":null,"seen_in_progress":false,"start_time":"t","time":"t"}}"#,
            start_ms * 1_000_000
        )
    }

    #[test]
    fn stalls_are_counted_ranked_and_the_longest_kept() {
        let mut aggregate = Aggregate::default();
        aggregate.add_line(&stall(7, 0, 60.0, Some("/a"))).unwrap();
        aggregate
            .add_line(&stall(8, 100, 300.0, Some("/b")))
            .unwrap();
        aggregate.add_line(&stall(7, 500, 80.0, None)).unwrap();
        aggregate.add_line("").unwrap();
        assert_eq!(aggregate.stalls, 3);
        assert_eq!(aggregate.threads.len(), 2);
        assert_eq!(aggregate.first_ns, Some(0));
        assert_eq!(aggregate.last_ns, Some(580_000_000));
        let routes = aggregate.ranked_routes();
        assert_eq!(routes[0].0, "GET /b");
        assert_eq!(routes[1].1.stalls, 1);
        let summary = partial_summary(&aggregate);
        assert_eq!(summary.longest_stall_ms, Some(300.0));
        assert!(report::summary_text(&summary).contains("3 stall(s)"));
    }

    #[test]
    fn only_the_longest_stalls_are_kept_in_full() {
        let mut aggregate = Aggregate::default();
        for i in 0..(KEPT_STALLS as u64 * 3) {
            aggregate
                .add_line(&stall(1, i, 50.0 + i as f64, None))
                .unwrap();
        }
        assert_eq!(aggregate.longest.len(), KEPT_STALLS);
        let shortest = aggregate
            .longest
            .iter()
            .map(|s| s.duration_ms)
            .fold(f64::INFINITY, f64::min);
        assert!((shortest - (50.0 + KEPT_STALLS as f64 * 2.0)).abs() < 1e-9);
    }

    #[test]
    fn impossible_recordings_are_errors_not_panics() {
        let mut aggregate = Aggregate::default();
        let error = aggregate
            .add_line(r#"{"type":"cumulative","pid":1,"scope":"thread","tid":7,"window_start_ns":100,"window_end_ns":50,"window_ms":1000.0,"total_ms":60.0,"polls":3,"budget_ms":50.0,"floor_ms":1.0,"threshold_ms":50.0,"repeat":0,"tasks":[],"requests":[],"window_start_time":"t","window_end_time":"t","time":"t"}"#)
            .unwrap_err();
        assert!(error.contains("before it starts"), "{error}");
        let error = aggregate
            .add_line(&stall(7, u64::MAX / 1_000_000, 60.0, None))
            .unwrap_err();
        assert!(error.contains("past the end of time"), "{error}");
        let error = aggregate.add_line(&stall(7, 0, -1.0, None)).unwrap_err();
        assert!(error.contains("duration_ms -1"), "{error}");
        let slot = |lower_ns: u64| crate::events::HistogramSlot {
            lower_ns,
            upper_ns: lower_ns * 2,
            count: 1,
        };
        let error = check_histogram(&[slot(1024), slot(2)]).unwrap_err();
        assert!(error.contains("ascending"), "{error}");
        assert!(check_histogram(&[slot(2), slot(1024)]).is_ok());
    }

    /// What the fuzz target (`fuzz/fuzz_targets/report.rs`) does, on
    /// recordings made from the golden one by rewriting its numbers.
    fn report_in_memory(text: &str) {
        let mut aggregate = Aggregate::default();
        for line in text.lines() {
            if aggregate.add_line(line).is_err() {
                return;
            }
        }
        let summary = aggregate
            .summary
            .clone()
            .unwrap_or_else(|| partial_summary(&aggregate));
        let _ = report::summary_text(&summary);
        let page = crate::present::html::page(&aggregate, "x.jsonl");
        assert_eq!(page.matches("</script>").count(), 2);
    }

    #[test]
    fn rewritten_recordings_never_panic_the_report() {
        let golden = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/session.jsonl"
        ))
        .unwrap();
        report_in_memory(&golden);
        let numbers = [
            "0",
            "1",
            "-1",
            "18446744073709551615",
            "9223372036854775807",
            "1e300",
            "-1e300",
        ];
        for field in [
            "\"lower_ns\":",
            "\"upper_ns\":",
            "\"count\":",
            "\"start_ns\":",
            "\"at_ns\":",
            "\"duration_ms\":",
            "\"window_start_ns\":",
            "\"window_end_ns\":",
            "\"threshold_ms\":",
            "\"tid\":",
        ] {
            for number in numbers {
                let mut text = String::new();
                for line in golden.lines() {
                    let mut rest = line;
                    while let Some(at) = rest.find(field) {
                        let value_at = at + field.len();
                        text.push_str(&rest[..value_at]);
                        let end = rest[value_at..]
                            .find([',', '}', ']'])
                            .map_or(rest.len(), |e| value_at + e);
                        text.push_str(number);
                        rest = &rest[end..];
                    }
                    text.push_str(rest);
                    text.push('\n');
                }
                report_in_memory(&text);
            }
        }
        // The histogram reversed.
        let mut reversed = String::new();
        for line in golden.lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(mut value) => {
                    if let Some(slots) = value
                        .get_mut("poll_histogram")
                        .and_then(serde_json::Value::as_array_mut)
                    {
                        slots.reverse();
                    }
                    reversed.push_str(&value.to_string());
                }
                Err(_) => reversed.push_str(line),
            }
            reversed.push('\n');
        }
        report_in_memory(&reversed);
    }

    #[test]
    fn lines_that_are_not_events_say_so() {
        let mut aggregate = Aggregate::default();
        assert!(aggregate.add_line("STALL tid 1").is_err());
        assert!(aggregate.add_line(r#"{"type":"stall"}"#).is_err());
        // A newer loopguard's event type is skipped.
        aggregate.add_line(r#"{"type":"future_thing"}"#).unwrap();
        assert_eq!(quick_tag(r#"{"a":1,"type":"stall"}"#), Some("stall"));
        assert_eq!(quick_tag(r#"{"a":"\"type\":\"x"}"#), None);
    }
}
