//! Makes [`Event`]s from what the watch found: findings with their context,
//! and the summary.

use loopguard_common::requests::RequestTotals;
use loopguard_common::{Counter, hist};

use super::clock;
use super::{
    CauseRecord, CumulativeEvent, Event, ExcludedSummary, FrameRecord, HistogramSlot, LongestStall,
    LoopThreadSummary, RequestRecord, RequestsSummary, RouteShareRecord, RouteSummary, StackFields,
    StackSummary, StallEvent, SummaryEvent, TaskShareRecord, ThresholdEvent, ThresholdSummary, ms,
};
use crate::attribute::{Request, RouteTable};
use crate::collect::lost::Lost;
use crate::detect::cumulative::{RouteShare, TaskShare};
use crate::detect::{Culprit, CumulativeAlert, Finding, Scope, Stall, ThresholdChange};
use crate::events::StallContext;
use crate::events::summary::Summary;
use crate::stacks::StallStack;
use crate::stacks::fold::{Frame, StackStalls};
use crate::stacks::profile::Cause;

/// How many stacks the summary lists.
pub const SUMMARY_STACKS: usize = 5;

pub fn request(request: &Request) -> RequestRecord {
    RequestRecord {
        id: request.id,
        method: request.method.clone(),
        route: request.route.clone(),
        path: request.path.clone(),
    }
}

fn culprit(culprit: &Culprit) -> RequestRecord {
    RequestRecord {
        id: culprit.id,
        method: culprit.method.clone(),
        route: Some(culprit.route.clone()),
        path: culprit.path.clone(),
    }
}

fn frame(frame: &Frame) -> FrameRecord {
    FrameRecord {
        function: frame.function.clone(),
        file: frame.file.clone(),
        line: frame.line,
        module: frame.module.clone(),
    }
}

fn cause(cause: &Cause) -> CauseRecord {
    CauseRecord {
        kind: cause.kind.as_str().to_owned(),
        syscall: cause
            .syscall
            .map(|(nr, name)| name.map_or_else(|| nr.to_string(), str::to_owned)),
        on_cpu_ms: ms(cause.on_cpu_ns),
        off_cpu_ms: ms(cause.off_cpu_ns),
        cpu_wait_ms: ms(cause.wait_ns),
    }
}

fn stack(stack: &StallStack) -> StackFields {
    StackFields {
        stack: stack.frames.iter().map(frame).collect(),
        stack_samples: stack.samples,
        cause: stack.cause.as_ref().map(cause),
        started_before_attach: stack.before_attach,
    }
}

/// The record of a stall.
pub fn stall(
    stall: &Stall,
    seen_in_progress: Option<bool>,
    pid: u32,
    context: &StallContext,
) -> StallEvent {
    StallEvent {
        kind: stall.kind.as_str().to_owned(),
        pid,
        tid: stall.tid,
        thread: context.thread.clone(),
        task_id: stall.task_id,
        duration_ms: ms(stall.duration_ns),
        threshold_ms: ms(stall.threshold_ns),
        request: context.request.as_ref().map(request),
        victim_count: context.victim_count,
        victims: context.victims.iter().map(request).collect(),
        start_ns: stall.start_ns,
        poll_fn: context.poll_fn.clone(),
        polled_from: context.polled_from.clone(),
        seen_in_progress,
        stack: context.stack.as_ref().map(stack),
        task_header: (stall.task_id.is_none() && stall.header != 0).then_some(stall.header),
        start_time: clock::from_monotonic(stall.start_ns),
        time: clock::now(),
    }
}

fn task_share(task: &TaskShare) -> TaskShareRecord {
    TaskShareRecord {
        task_id: task.task_id,
        tid: task.tid,
        polls: task.polls,
        total_ms: ms(task.blocked_ns),
        request: task.request.as_ref().map(culprit),
    }
}

fn route_share(route: &RouteShare) -> RouteShareRecord {
    RouteShareRecord {
        method: route.method.clone(),
        route: route.route.clone(),
        requests: route.requests,
        polls: route.polls,
        total_ms: ms(route.blocked_ns),
    }
}

/// The record of a cumulative alert; `thread`: the name of its thread.
pub fn cumulative(
    alert: &CumulativeAlert,
    pid: u32,
    threshold_ns: u64,
    floor_ns: u64,
    thread: Option<String>,
) -> CumulativeEvent {
    let (scope, tid) = match alert.scope {
        Scope::Thread(tid) => ("thread", Some(tid)),
        Scope::Process => ("process", None),
    };
    CumulativeEvent {
        pid,
        scope: scope.to_owned(),
        tid,
        window_start_ns: alert.window_start_ns,
        window_end_ns: alert.window_end_ns,
        window_ms: ms(alert.window_end_ns - alert.window_start_ns),
        total_ms: ms(alert.blocked_ns),
        polls: alert.polls,
        budget_ms: ms(alert.budget_ns),
        floor_ms: ms(floor_ns),
        threshold_ms: ms(threshold_ns),
        repeat: alert.repeat,
        tasks: alert.tasks.iter().map(task_share).collect(),
        requests: alert.routes.iter().map(route_share).collect(),
        thread,
        window_start_time: clock::from_monotonic(alert.window_start_ns),
        window_end_time: clock::from_monotonic(alert.window_end_ns),
        time: clock::now(),
    }
}

/// The record of a threshold move.
pub fn threshold(change: &ThresholdChange, pid: u32) -> ThresholdEvent {
    ThresholdEvent {
        pid,
        threshold_ms: ms(change.to_ns),
        previous_ms: ms(change.from_ns),
        percentile: change.percentile,
        percentile_ms: ms(change.baseline.quantile_ns),
        multiplier: change.multiplier,
        samples: change.baseline.samples,
        at_ns: change.at_ns,
        at_time: clock::from_monotonic(change.at_ns),
        time: clock::now(),
    }
}

/// What the cumulative rule needs besides the alert.
#[derive(Clone, Debug, Default)]
pub struct CumulativeContext {
    pub threshold_ns: u64,
    pub floor_ns: u64,
    pub thread: Option<String>,
}

/// The event of a finding.
pub fn finding(
    finding: &Finding,
    pid: u32,
    context: &StallContext,
    cumulative_context: &CumulativeContext,
) -> Event {
    match finding {
        Finding::InProgress(s) => Event::StallInProgress(stall(s, None, pid, context)),
        Finding::Finished {
            stall: s,
            seen_in_progress,
        } => Event::Stall(stall(s, Some(*seen_in_progress), pid, context)),
        Finding::Cumulative(alert) => Event::Cumulative(cumulative(
            alert,
            pid,
            cumulative_context.threshold_ns,
            cumulative_context.floor_ns,
            cumulative_context.thread.clone(),
        )),
        Finding::ThresholdChanged(change) => Event::Threshold(threshold(change, pid)),
    }
}

impl RequestsSummary {
    /// From the kernel's request totals (`None`: requests not tracked) and
    /// the stalls counted per route.
    pub fn new(totals: Option<RequestTotals>, routes: &RouteTable) -> Self {
        let totals = totals.unwrap_or_default();
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            started: totals.started,
            ended: totals.ended,
            in_flight: count(totals.started.saturating_sub(totals.ended)),
            peak_in_flight: count(totals.peak_in_flight),
            capacity: loopguard_common::requests::MAX_REQUESTS as usize,
            evicted: totals.replaced,
            unmatched_ends: totals.unmatched_ends,
            unattributable_starts: totals.outside_poll,
            layout_mismatches: totals.layout_mismatches,
            routes: routes
                .ranked_routes()
                .into_iter()
                .map(|(route, totals)| RouteSummary {
                    route: route.to_owned(),
                    stalls: totals.stalls,
                    total_stall_ms: ms(totals.total_ns),
                    longest_stall_ms: ms(totals.longest_ns),
                })
                .collect(),
        }
    }
}

fn stacks(stacks: &[StackStalls]) -> Vec<StackSummary> {
    stacks
        .iter()
        .take(SUMMARY_STACKS)
        .map(|entry| StackSummary {
            label: entry.label.clone(),
            folded: entry.folded.clone(),
            stalls: entry.stalls,
            total_stall_ms: ms(entry.total_ns),
        })
        .collect()
}

fn histogram(histogram: &crate::collect::totals::Histogram) -> Vec<HistogramSlot> {
    histogram
        .0
        .iter()
        .enumerate()
        .filter(|(_, count)| **count > 0)
        .map(|(slot, &count)| HistogramSlot {
            lower_ns: hist::lower_ns(slot as u32),
            upper_ns: hist::upper_ns(slot as u32),
            count,
        })
        .collect()
}

/// The event loop threads of `summary`, as the summary event lists them.
fn loop_threads(summary: &Summary) -> Vec<LoopThreadSummary> {
    summary
        .loop_threads
        .iter()
        .map(|thread| LoopThreadSummary {
            tid: thread.tid,
            thread: thread.name.clone(),
            busy_ms: ms(thread.busy_ns),
            wait_ms: ms(thread.wait_ns),
            waits: thread.waits,
        })
        .collect()
}

/// The longest stall of `summary`, as the summary event shows it.
fn longest_stall(summary: &Summary) -> Option<LongestStall> {
    summary.longest.as_ref().map(|s| LongestStall {
        kind: s.kind.as_str().to_owned(),
        tid: s.tid,
        task_id: s.task_id,
        task_header: (s.task_id.is_none() && s.header != 0).then_some(s.header),
        duration_ms: ms(s.duration_ns),
        start_ns: s.start_ns,
    })
}

/// The summary's record.
pub fn summary(summary: &Summary, pid: u32) -> SummaryEvent {
    let counters = &summary.counters;
    let thresholds = &summary.thresholds;
    let mut event = SummaryEvent {
        pid,
        threshold_ms: ms(thresholds.current_ns),
        threshold: ThresholdSummary {
            adaptive: summary.adaptive,
            min_ms: ms(thresholds.min_ns),
            max_ms: ms(thresholds.max_ns),
            current_ms: ms(thresholds.current_ns),
        },
        cumulative_alerts: summary.cumulative_alerts,
        preempted_polls_not_counted: summary.preempted_cuts,
        excluded: ExcludedSummary {
            stalls: summary.excluded_stalls,
            cumulative_polls: summary.excluded_cuts.0,
            cumulative_ms: ms(summary.excluded_cuts.1),
        },
        elapsed_s: (summary.elapsed_s * 1000.0).round() / 1000.0,
        stop_reason: summary.stop_reason.to_owned(),
        polls: summary.histogram.total(),
        blocking_pool_polls: counters.get(Counter::BlockingPolls),
        stalls: summary.stalls,
        stalls_unfinished: summary.unfinished,
        total_stall_ms: ms(summary.total_stall_ns),
        longest_stall_ms: summary.longest.as_ref().map(|s| ms(s.duration_ns)),
        longest_stall_task_id: summary.longest.as_ref().and_then(|s| s.task_id),
        poll_p50_ms_upper: summary.histogram.quantile_upper_ns(0.5).map(ms),
        poll_p99_ms_upper: summary.histogram.quantile_upper_ns(0.99).map(ms),
        requests: summary.requests.clone(),
        stacks: stacks(&summary.stacks),
        loop_threads: loop_threads(summary),
        longest_stall: longest_stall(summary),
        poll_histogram: histogram(&summary.histogram),
        at_ns: summary.at_ns,
        time: clock::from_monotonic(summary.at_ns),
        ..SummaryEvent::default()
    };
    for cause in Lost::ALL {
        *event.lost_mut(cause) = counters.get(cause.counter());
    }
    event
}
