//! End-of-run totals: polls seen, stalls, the longest one, lost data, and
//! poll-duration percentiles from the kernel's log2 histogram.

use loopguard_common::{Counter, HISTOGRAM_SLOTS};

use crate::attribute::{RequestTracker, RouteStalls};
use crate::detect::{Finding, Stall};

/// Kernel counters summed over CPUs, indexed by [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; loopguard_common::COUNTER_SLOTS as usize]);

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }
}

/// Log2 histogram of worker poll durations: slot `i` counts polls of
/// `[2^i, 2^(i+1))` ns (slot 0 also counts 0 ns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram(pub Vec<u64>);

impl Default for Histogram {
    fn default() -> Self {
        Self(vec![0; HISTOGRAM_SLOTS as usize])
    }
}

impl Histogram {
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The upper edge (ns) of the slot holding the `q`-quantile (0..=1), or
    /// `None` when empty: a value at most twice the true quantile.
    pub fn quantile_upper_ns(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (slot, &count) in self.0.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(slot_upper_ns(slot));
            }
        }
        None
    }
}

/// Exclusive upper edge of histogram slot `slot`, in ns.
pub fn slot_upper_ns(slot: usize) -> u64 {
    1u64.checked_shl(slot as u32 + 1).unwrap_or(u64::MAX)
}

/// Log2 slot of a duration, as the kernel computes it.
pub fn slot_of(ns: u64) -> usize {
    if ns == 0 {
        0
    } else {
        63 - ns.leading_zeros() as usize
    }
}

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
    pub requests: RequestSummary,
}

/// What the middleware's probes told, for the summary.
#[derive(Clone, Debug, Default)]
pub struct RequestSummary {
    pub started: u64,
    pub ended: u64,
    pub in_flight: usize,
    pub peak_in_flight: usize,
    pub capacity: usize,
    pub evicted: u64,
    pub unmatched_ends: u64,
    pub unattributable_starts: u64,
    pub layout_mismatches: u64,
    /// `(METHOD route, totals)`, worst total stall time first.
    pub routes: Vec<(String, RouteStalls)>,
}

impl RequestSummary {
    pub fn from_tracker(tracker: &RequestTracker, layout_mismatches: u64) -> Self {
        Self {
            started: tracker.started,
            ended: tracker.ended,
            in_flight: tracker.in_flight(),
            peak_in_flight: tracker.peak_in_flight,
            capacity: tracker.capacity(),
            evicted: tracker.evicted,
            unmatched_ends: tracker.unmatched_ends,
            unattributable_starts: tracker.unattributable_starts,
            layout_mismatches,
            routes: tracker
                .ranked_routes()
                .into_iter()
                .map(|(route, totals)| (route.to_owned(), totals.clone()))
                .collect(),
        }
    }
}

impl Summary {
    pub fn record(&mut self, finding: &Finding) {
        if let Finding::Finished { stall, .. } = finding {
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
    fn slot_edges() {
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(1), 0);
        assert_eq!(slot_of(2), 1);
        assert_eq!(slot_of(3), 1);
        assert_eq!(slot_of(1023), 9);
        assert_eq!(slot_of(1024), 10);
        assert_eq!(slot_of(u64::MAX), 63);
        assert_eq!(slot_upper_ns(0), 2);
        assert_eq!(slot_upper_ns(10), 2048);
        assert_eq!(slot_upper_ns(63), u64::MAX);
    }

    #[test]
    fn quantiles_come_from_the_slot_edges() {
        let mut histogram = Histogram::default();
        assert_eq!(histogram.quantile_upper_ns(0.5), None);
        histogram.0[slot_of(1_000)] = 98; // ~1 us
        histogram.0[slot_of(100_000_000)] = 2; // ~100 ms
        assert_eq!(histogram.total(), 100);
        assert_eq!(histogram.quantile_upper_ns(0.5), Some(1024));
        assert_eq!(histogram.quantile_upper_ns(0.98), Some(1024));
        assert_eq!(
            histogram.quantile_upper_ns(0.99),
            Some(slot_upper_ns(slot_of(100_000_000)))
        );
        assert_eq!(histogram.quantile_upper_ns(1.0), Some(slot_upper_ns(26)));
    }

    #[test]
    fn summary_keeps_the_longest_stall() {
        let stall = |duration_ns| Stall {
            tid: 1,
            task_id: None,
            header: 0,
            start_ns: 0,
            duration_ns,
            copy_index: 0,
            return_addr: 0,
        };
        let mut summary = Summary::default();
        summary.record(&Finding::InProgress(stall(900)));
        for duration in [100, 300, 200] {
            summary.record(&Finding::Finished {
                stall: stall(duration),
                seen_in_progress: false,
            });
        }
        assert_eq!(summary.stalls, 3);
        assert_eq!(summary.total_stall_ns, 600);
        assert_eq!(summary.longest.unwrap().duration_ns, 300);
    }
}
