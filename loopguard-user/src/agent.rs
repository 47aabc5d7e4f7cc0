//! The watch loop: collect → detect → report, until told to stop.
//!
//! Ring buffer events are handled as they arrive; every scan interval the
//! in-flight poll stacks are read so a poll that is still stuck is reported
//! while it is stuck. On stop the ring buffer is drained one last time and
//! the summary printed.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::collect::{CollectError, Collector, monotonic_ns};
use crate::detect::{Finding, Stall, StallDetector};
use crate::discover::{ProbeTarget, proc};
use crate::report::{self, Format, StallContext};
use crate::summary::Summary;

/// How the watch loop runs.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub threshold_ns: u64,
    pub format: Format,
    pub scan_interval: Duration,
}

/// Why watching stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Interrupted,
    DurationElapsed,
    TargetExited,
}

impl StopReason {
    /// How the summary names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interrupted => "interrupted",
            Self::DurationElapsed => "duration elapsed",
            Self::TargetExited => "target exited",
        }
    }
}

/// What a watch produced.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub reason: StopReason,
}

/// Prints findings in the chosen format, with names resolved from the target.
struct Printer<'t> {
    target: &'t ProbeTarget,
    format: Format,
    threshold_ns: u64,
    callers: HashMap<u64, Option<String>>,
}

impl Printer<'_> {
    fn context(&mut self, stall: &Stall) -> StallContext {
        let target = self.target;
        let polled_from = self
            .callers
            .entry(stall.return_addr)
            .or_insert_with(|| target.function_at(stall.return_addr).map(str::to_owned))
            .clone();
        StallContext {
            thread: proc::thread_name(target.pid, stall.tid),
            poll_fn: target
                .binary
                .poll_copies
                .get(stall.copy_index as usize)
                .map(|copy| copy.name.clone())
                .unwrap_or_default(),
            polled_from,
        }
    }

    fn finding(&mut self, finding: &Finding) {
        let stall = match finding {
            Finding::InProgress(stall) | Finding::Finished { stall, .. } => stall,
        };
        let context = self.context(stall);
        let line = match self.format {
            Format::Json => {
                report::finding_json(finding, self.target.pid, self.threshold_ns, &context)
                    .to_string()
            }
            Format::Text => report::finding_text(finding, self.threshold_ns, &context),
        };
        print_line(&line);
    }
}

fn print_line(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (a pipe whose reader left) must not stop the detach.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Announces the attachment: JSON on stdout, text on stderr.
pub fn print_attached(target: &ProbeTarget, probe_count: usize, options: &WatchOptions) {
    let copies = &target.binary.poll_copies;
    let verified = copies.iter().filter(|copy| copy.layout.is_some()).count();
    match options.format {
        Format::Json => print_line(
            &json!({
                "type": "attached",
                "pid": target.pid,
                "exe": target.exe.display_path,
                "poll_functions": copies.len(),
                "task_ids_verified": verified,
                "probes": probe_count,
                "threshold_ms": options.threshold_ns as f64 / 1e6,
            })
            .to_string(),
        ),
        Format::Text => eprintln!(
            "loopguard: watching pid {} ({}): {} poll functions probed, task ids for {}; threshold {} ms; Ctrl+C to stop",
            target.pid,
            target.exe.display_path,
            copies.len(),
            verified,
            options.threshold_ns / 1_000_000,
        ),
    }
    if verified < copies.len() {
        tracing::warn!(
            unverified = copies.len() - verified,
            "task vtable layout not recognised for some poll functions; their stalls are reported without a task id"
        );
    }
}

/// Watches until `stop` resolves (or the target exits).
pub async fn watch(
    target: &ProbeTarget,
    collector: &mut Collector,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<Outcome, CollectError> {
    let started = Instant::now();
    let mut detector = StallDetector::new(options.threshold_ns);
    let mut printer = Printer {
        target,
        format: options.format,
        threshold_ns: options.threshold_ns,
        callers: HashMap::new(),
    };
    let mut summary = Summary::default();
    let mut events = Vec::new();
    let mut scan = tokio::time::interval(options.scan_interval);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut liveness = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(stop);

    let reason = loop {
        tokio::select! {
            reason = &mut stop => break reason,
            ready = collector.readable() => {
                ready?;
                handle_events(collector, &mut events, &mut detector, &mut printer, &mut summary);
            }
            _ = scan.tick() => {
                // Events first, so a poll that just ended is not reported as in progress.
                handle_events(collector, &mut events, &mut detector, &mut printer, &mut summary);
                for finding in detector.on_snapshot(monotonic_ns(), &collector.snapshot()) {
                    summary.record(&finding);
                    printer.finding(&finding);
                }
            }
            _ = liveness.tick() => {
                if !proc::is_alive(target.pid) {
                    break StopReason::TargetExited;
                }
            }
        }
    };
    handle_events(
        collector,
        &mut events,
        &mut detector,
        &mut printer,
        &mut summary,
    );
    summary.unfinished = detector.unfinished();
    summary.counters = collector.counters();
    summary.histogram = collector.histogram();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.stop_reason = reason.as_str();
    if collector.malformed > 0 {
        tracing::warn!(
            records = collector.malformed,
            "ring buffer records that did not decode were skipped"
        );
    }
    Ok(Outcome { summary, reason })
}

fn handle_events(
    collector: &mut Collector,
    events: &mut Vec<crate::PollEvent>,
    detector: &mut StallDetector,
    printer: &mut Printer<'_>,
    summary: &mut Summary,
) {
    collector.drain(events);
    for event in events.drain(..) {
        if let Some(finding) = detector.on_poll_end(&event) {
            summary.record(&finding);
            printer.finding(&finding);
        }
    }
}

/// Prints the summary: JSON on stdout, or text on stdout.
pub fn print_summary(outcome: &Outcome, pid: u32, options: &WatchOptions) {
    let line = match options.format {
        Format::Json => {
            report::summary_json(&outcome.summary, pid, options.threshold_ns).to_string()
        }
        Format::Text => report::summary_text(&outcome.summary, options.threshold_ns),
    };
    print_line(&line);
}
