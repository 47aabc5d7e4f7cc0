//! The watch loop: ring buffer readiness, the scan every scan interval,
//! liveness of the target and of stdout's reader, and the stop; then the
//! last drain and the summary of the run.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::collect::totals::LoopThread;
use crate::collect::{CollectError, Collector, RequestMaps, monotonic_ns};
use crate::discover::{ProbeTarget, proc};
use crate::events::{self, summary::Summary};
use crate::stacks::Stacks;

use super::session::Session;
use super::{Outcome, StopReason, WatchOptions};

/// How long threads are watched at attach for polls stuck since before:
/// the threshold, within these bounds, and on to the longer one while a
/// thread on a CPU has too few samples to judge (a loaded machine).
const CENSUS_MIN: Duration = Duration::from_millis(50);
const CENSUS_MAX: Duration = Duration::from_millis(500);

/// How long a stop may take to explain a target's exit.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Watches until `stop` resolves (or the target exits).
pub async fn watch(
    target: &ProbeTarget,
    collector: &mut Collector,
    stacks: Option<Stacks>,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<Outcome, CollectError> {
    let started = Instant::now();
    let mut stacks = stacks;
    if let Some(stacks) = &mut stacks {
        start_census(stacks, collector, options);
    }
    let mut session = Session::new(target, collector, stacks, options, started);
    let reason = watch_until(&mut session, collector, options, stop).await?;
    session.handle_events(collector);
    crate::present::output::status(None);
    // The endpoint stays up until loopguard exits: a last scrape sees the totals.
    session.refresh_metrics(collector, monotonic_ns(), &collector.snapshot());
    let summary = summarize(&mut session, collector, options, reason, started);
    if collector.malformed > 0 {
        tracing::warn!(
            records = collector.malformed,
            "ring buffer records that did not decode were skipped"
        );
    }
    Ok(Outcome {
        summary,
        reason,
        offending: std::mem::take(&mut session.findings.offending),
    })
}

/// Starts looking for threads stuck since before attach, and hands the
/// threads asleep in a wait to the kernel, whose returns it cannot see.
fn start_census(stacks: &mut Stacks, collector: &mut Collector, options: &WatchOptions) {
    let window = Duration::from_nanos(options.detect.threshold_ns).clamp(CENSUS_MIN, CENSUS_MAX);
    stacks.start_census(window, CENSUS_MAX.max(window));
    // Their waits' returns cannot be seen: the kernel watches for them.
    // Not without a wait path: no wait would ever end the stretch that
    // starts, and a worker's idle time would read as a loop stall.
    if !matches!(options.wait_probes, crate::attach::WaitProbes::Off) {
        let waiting = stacks.asleep_in_waits();
        let filed = collector.mark_unseen_waits(&waiting);
        tracing::debug!(?waiting, filed, "threads asleep in a wait at attach");
    }
}

/// Handles events and scans until `stop`, the target's exit or stdout's
/// reader's; returns why it stopped.
async fn watch_until(
    session: &mut Session<'_>,
    collector: &mut Collector,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<StopReason, CollectError> {
    let pid = session.printer.target.pid;
    // The first scan at once; then as the session's cadence says: fast
    // while something may be stuck, slow otherwise.
    let scan = tokio::time::sleep(Duration::ZERO);
    let mut last_scan = tokio::time::Instant::now();
    let mut liveness = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(stop, scan);
    Ok(loop {
        tokio::select! {
            reason = &mut stop => break reason,
            ready = collector.readable(), if !options.bench.empty_programs => {
                ready?;
                session.handle_events(collector);
                // A poll or stretch may be stuck: scan at the fast pace from
                // the last scan, not at the idle one.
                if session.cadence.take_new_nudge() {
                    let soon = last_scan + session.cadence.fast();
                    if soon < scan.deadline() {
                        scan.as_mut().reset(soon);
                    }
                }
            }
            () = &mut scan, if !options.bench.empty_programs => {
                // Events first, so a poll that just ended is not reported as in progress.
                session.handle_events(collector);
                last_scan = tokio::time::Instant::now();
                let next = session.scan(collector);
                scan.as_mut().reset(last_scan + next);
            }
            _ = liveness.tick() => {
                if crate::present::output::reader_gone() {
                    break StopReason::OutputClosed;
                }
                if !proc::is_alive(pid) {
                    // The caller may know better why it ended (`run`'s
                    // --duration kills it): give its stop a moment to say so.
                    let known = tokio::time::timeout(STOP_GRACE, &mut stop).await;
                    break known.unwrap_or(StopReason::TargetExited);
                }
            }
        }
    })
}

/// The run's summary: what the router counted, with the engine's and the
/// kernel's totals and the folded stacks.
fn summarize(
    session: &mut Session<'_>,
    collector: &Collector,
    options: &WatchOptions,
    reason: StopReason,
    started: Instant,
) -> Summary {
    let target = session.printer.target;
    let engine = &session.engine;
    let mut summary = std::mem::take(&mut session.findings.summary);
    summary.unfinished = engine.unfinished() + engine.unfinished_loops();
    summary.thresholds = engine.range();
    summary.adaptive = options.detect.adaptive.is_some();
    summary.excluded_cuts = engine.excluded_cuts();
    summary.preempted_cuts = engine.preempted_cuts;
    let now_ns = monotonic_ns();
    summary.loop_threads = collector
        .loop_snapshot()
        .iter()
        .filter(|(_, state)| state.waits > 0)
        .map(|(tid, state)| {
            LoopThread::from_state(*tid, proc::thread_name(target.pid, *tid), state, now_ns)
        })
        .collect();
    summary.loop_threads.sort_by_key(|thread| thread.tid);
    summary.counters = collector.counters();
    summary.histogram = collector.histogram();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.at_ns = now_ns;
    summary.stop_reason = reason.as_str();
    summary.requests = events::RequestsSummary::new(
        session.live.request_maps.as_ref().map(RequestMaps::totals),
        &session.findings.route_stalls,
    );
    // Several processes (`run` following) share the file: each line says whose.
    let root_frame = options.label.then(|| {
        crate::stacks::fold::folded_frame(&format!(
            "[pid {} {}]",
            target.pid, target.exe.display_path
        ))
    });
    summary.stacks = finish_stacks(
        session.stacks.as_ref(),
        options.folded.as_deref(),
        root_frame.as_deref(),
    );
    summary
}

/// The run's stalls folded by stack, written to `folded` too when asked.
fn finish_stacks(
    stacks: Option<&Stacks>,
    folded: Option<&std::path::Path>,
    root_frame: Option<&str>,
) -> Vec<crate::stacks::fold::StackStalls> {
    let Some(stacks) = stacks else {
        return Vec::new();
    };
    if let Some(path) = folded {
        let text = stacks.folded_text();
        let text = match root_frame {
            Some(root) => text.lines().fold(String::new(), |mut out, line| {
                use std::fmt::Write as _;
                let _ = writeln!(out, "{root};{line}");
                out
            }),
            None => text,
        };
        write_folded(path, &text);
    }
    stacks.ranked()
}

/// Appends the folded stacks to the file `start_watch` emptied (every
/// watched process adds its own); a failure is reported, not fatal (the
/// summary still prints).
fn write_folded(path: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let written =
        crate::present::outfile::append(path).and_then(|mut file| file.write_all(text.as_bytes()));
    if let Err(error) = written {
        crate::diag!(
            "loopguard: error: cannot write the folded stacks to {}: {error}; check the directory exists and is writable",
            path.display()
        );
    }
}
