//! The records as the rules' text needs them ([`crate::detect::rule`]):
//! each a borrowed view of a record, so a live finding and a replayed
//! recording are described by the same words.

use super::{CumulativeEvent, StallEvent, SummaryEvent, ThresholdEvent};
use crate::detect::StallKind;
use crate::detect::adaptive::{AdaptiveTotals, ThresholdShown};
use crate::detect::cumulative::{CumulativeShown, CumulativeTotals, RouteShown};
use crate::detect::loops::LoopThreadShown;
use crate::detect::rule::{LongestShown, StallShown, StallTotals};

impl StallEvent {
    /// The stall as its line says it (`in_progress`: `stall_in_progress`).
    pub fn shown(&self, in_progress: bool) -> StallShown<'_> {
        StallShown {
            kind: StallKind::from_name(&self.kind),
            in_progress,
            tid: self.tid,
            thread: &self.thread,
            task_id: self.task_id,
            header: self.task_header,
            duration_ms: self.duration_ms,
            threshold_ms: self.threshold_ms,
        }
    }
}

impl CumulativeEvent {
    pub fn shown(&self) -> CumulativeShown<'_> {
        let thread = match self.tid {
            Some(tid) if self.scope == "thread" => {
                Some((tid, self.thread.as_deref().unwrap_or("?")))
            }
            _ => None,
        };
        CumulativeShown {
            thread,
            total_ms: self.total_ms,
            polls: self.polls,
            window_ms: self.window_ms,
            budget_ms: self.budget_ms,
            repeat: self.repeat,
            routes: self
                .requests
                .iter()
                .map(|r| RouteShown {
                    method: &r.method,
                    route: &r.route,
                    total_ms: r.total_ms,
                    polls: r.polls,
                })
                .collect(),
            tasks: self.tasks.iter().map(|t| (t.task_id, t.total_ms)).collect(),
        }
    }
}

impl ThresholdEvent {
    pub fn shown(&self) -> ThresholdShown {
        ThresholdShown {
            threshold_ms: self.threshold_ms,
            previous_ms: self.previous_ms,
            percentile: self.percentile,
            samples: self.samples,
            percentile_ms: self.percentile_ms,
            multiplier: self.multiplier,
        }
    }
}

impl SummaryEvent {
    /// What the summary holds of stalls.
    pub fn stall_totals(&self) -> StallTotals {
        StallTotals {
            longest: self.longest_stall.as_ref().map(|longest| LongestShown {
                kind: StallKind::from_name(&longest.kind),
                tid: longest.tid,
                task_id: longest.task_id,
                header: longest.task_header,
                duration_ms: longest.duration_ms,
            }),
            total_ms: self.total_stall_ms,
            unfinished: self.stalls_unfinished,
        }
    }

    /// The thresholds in force over the run.
    pub fn adaptive_totals(&self) -> AdaptiveTotals {
        let t = &self.threshold;
        AdaptiveTotals {
            adaptive: t.adaptive,
            current_ms: t.current_ms,
            min_ms: t.min_ms,
            max_ms: t.max_ms,
        }
    }

    /// Cumulative alerts, and what excluded routes kept quiet.
    pub fn cumulative_totals(&self) -> CumulativeTotals {
        CumulativeTotals {
            alerts: self.cumulative_alerts,
            excluded_stalls: self.excluded.stalls,
            excluded_polls: self.excluded.cumulative_polls,
            excluded_ms: self.excluded.cumulative_ms,
        }
    }

    /// Every event-loop thread's time.
    pub fn loop_threads_shown(&self) -> Vec<LoopThreadShown<'_>> {
        self.loop_threads
            .iter()
            .map(|thread| LoopThreadShown {
                tid: thread.tid,
                thread: &thread.thread,
                busy_ms: thread.busy_ms,
                wait_ms: thread.wait_ms,
                waits: thread.waits,
            })
            .collect()
    }
}
