//! End-of-run totals: polls seen, stalls, the longest one, lost data, and
//! poll-duration percentiles from the kernel's log-linear histogram.

use crate::collect::totals::{Counters, Histogram, LoopThread};
use crate::detect::{Finding, Stall, ThresholdRange};

/// Everything the final summary reports.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub stalls: u64,
    pub total_stall_ns: u64,
    pub longest: Option<Stall>,
    /// Stalls still in progress when loopguard stopped.
    pub unfinished: usize,
    pub counters: Counters,
    pub histogram: Histogram,
    pub elapsed_s: f64,
    /// Why watching stopped ("interrupted", "duration elapsed", "target exited").
    pub stop_reason: &'static str,
    /// What the middleware's probes told (as the summary event carries it).
    pub requests: crate::events::RequestsSummary,
    /// The thresholds in force over the run.
    pub thresholds: ThresholdRange,
    pub adaptive: bool,
    pub cumulative_alerts: u64,
    /// Stalls of excluded routes: counted, not reported.
    pub excluded_stalls: u64,
    /// `(polls, ns)` of short polls on excluded routes.
    pub excluded_cuts: (u64, u64),
    /// Polls over the cumulative floor only because their thread was preempted.
    pub preempted_cuts: u64,
    /// Busy and waiting time of every event-loop thread (the wait path).
    pub loop_threads: Vec<LoopThread>,
    /// Stalls folded by stack, longest total first (stack capture on).
    pub stacks: Vec<crate::stacks::fold::StackStalls>,
    /// ns, `CLOCK_MONOTONIC`, when watching stopped.
    pub at_ns: u64,
}

impl Summary {
    /// Counts a finding; `excluded`: it belongs to an excluded route.
    pub fn record(&mut self, finding: &Finding, excluded: bool) {
        if let Finding::Cumulative(_) = finding {
            self.cumulative_alerts += 1;
        }
        if let Finding::Finished { stall, .. } = finding {
            if excluded {
                self.excluded_stalls += 1;
                return;
            }
            self.stalls += 1;
            self.total_stall_ns += stall.duration_ns;
            if self
                .longest
                .as_ref()
                .is_none_or(|longest| stall.duration_ns > longest.duration_ns)
            {
                self.longest = Some(stall.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_keeps_the_longest_stall() {
        let stall = |duration_ns| Stall {
            kind: crate::detect::StallKind::Poll,
            tid: 1,
            task_id: None,
            header: 0,
            start_ns: 0,
            duration_ns,
            preempted_ns: 0,
            copy_index: 0,
            return_addr: 0,
            threshold_ns: 1,
            requests_window: None,
        };
        let mut summary = Summary::default();
        summary.record(&Finding::InProgress(stall(900)), false);
        for duration in [100, 300, 200] {
            summary.record(
                &Finding::Finished {
                    stall: stall(duration),
                    seen_in_progress: false,
                },
                false,
            );
        }
        assert_eq!(summary.stalls, 3);
        assert_eq!(summary.total_stall_ns, 600);
        assert_eq!(summary.longest.unwrap().duration_ns, 300);
    }
}
