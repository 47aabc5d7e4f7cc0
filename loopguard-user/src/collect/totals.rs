//! Totals the kernel keeps: its counters, the log-linear histogram of
//! poll durations and its percentiles, and each event-loop thread's busy
//! and waiting time.

use loopguard_common::Counter;
use loopguard_common::hist;

/// Kernel counters summed over CPUs, indexed by [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; loopguard_common::COUNTER_SLOTS as usize]);

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }
}

/// Histogram of worker poll durations, in the kernel's slots
/// ([`loopguard_common::hist`]: each power of two split in eight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram(pub Vec<u64>, pub SumNs);

/// ns, the sum of every counted poll's duration.
pub type SumNs = u64;

impl Default for Histogram {
    fn default() -> Self {
        Self(vec![0; hist::SLOTS as usize], 0)
    }
}

impl Histogram {
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The slot holding the `q`-quantile (0..=1), or `None` when empty.
    fn quantile_slot(&self, q: f64) -> Option<u32> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (slot, &count) in self.0.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(slot as u32);
            }
        }
        None
    }

    /// The upper edge (ns) of the slot holding the `q`-quantile, or `None`
    /// when empty: at most 1/8 above the true quantile.
    pub fn quantile_upper_ns(&self, q: f64) -> Option<u64> {
        self.quantile_slot(q).map(hist::upper_ns)
    }

    /// The `q`-quantile (ns) estimated as the middle of its slot, or `None`
    /// when empty: within 1/16 of the true quantile.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        self.quantile_slot(q).map(|slot| {
            let (lower, upper) = (hist::lower_ns(slot), hist::upper_ns(slot));
            lower + (upper - lower) / 2
        })
    }

    /// Counts added since `earlier` (a previous read of the same histogram).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .zip(earlier.0.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
            self.1.saturating_sub(earlier.1),
        )
    }
}

/// One event-loop thread's time, from the wait probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoopThread {
    pub tid: u32,
    pub name: String,
    /// ns away from its wait (finished stretches, and the one running).
    pub busy_ns: u64,
    /// ns waiting for events.
    pub wait_ns: u64,
    pub waits: u64,
}

impl LoopThread {
    /// From the kernel's record, at `now_ns`.
    pub fn from_state(
        tid: u32,
        name: String,
        state: &loopguard_common::LoopState,
        now_ns: u64,
    ) -> Self {
        let running = if state.depth == 0 && state.busy_start_ns != 0 {
            now_ns.saturating_sub(state.busy_start_ns)
        } else {
            0
        };
        let waiting = if state.depth > 0 && state.wait_start_ns != 0 {
            now_ns.saturating_sub(state.wait_start_ns)
        } else {
            0
        };
        Self {
            tid,
            name,
            busy_ns: state.busy_ns + running,
            wait_ns: state.wait_ns + waiting,
            waits: state.waits,
        }
    }

    /// Share of its watched time the thread was busy (0 when unknown).
    pub fn busy_ratio(&self) -> f64 {
        let total = self.busy_ns + self.wait_ns;
        if total == 0 {
            0.0
        } else {
            self.busy_ns as f64 / total as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(ns: u64) -> usize {
        hist::slot_of(ns) as usize
    }

    #[test]
    fn quantiles_come_from_the_slot_edges() {
        let mut histogram = Histogram::default();
        assert_eq!(histogram.quantile_upper_ns(0.5), None);
        histogram.0[slot(1_000)] = 98; // ~1 us
        histogram.0[slot(100_000_000)] = 2; // ~100 ms
        assert_eq!(histogram.total(), 100);
        // 1000 ns is in [960, 1024).
        assert_eq!(histogram.quantile_upper_ns(0.5), Some(1024));
        assert_eq!(histogram.quantile_upper_ns(0.98), Some(1024));
        assert_eq!(histogram.quantile_ns(0.5), Some(992));
        let p99 = histogram.quantile_ns(0.99).unwrap();
        assert!(p99.abs_diff(100_000_000) * 16 <= 100_000_000, "{p99}");
    }

    #[test]
    fn quantiles_are_within_a_sixteenth_everywhere() {
        for ns in [
            5_u64,
            17,
            999,
            4_321,
            65_537,
            5_000_000,
            123_456_789,
            3 << 40,
        ] {
            let mut histogram = Histogram::default();
            histogram.0[slot(ns)] = 1;
            let estimate = histogram.quantile_ns(0.99).unwrap();
            assert!(estimate.abs_diff(ns) * 16 <= ns.max(16), "{ns}: {estimate}");
        }
    }

    #[test]
    fn loop_threads_count_the_stretch_or_wait_in_progress() {
        let busy = loopguard_common::LoopState {
            busy_start_ns: 900,
            busy_ns: 100,
            wait_ns: 800,
            waits: 3,
            ..Default::default()
        };
        let thread = LoopThread::from_state(7, "node".into(), &busy, 1000);
        assert_eq!(
            (thread.busy_ns, thread.wait_ns, thread.waits),
            (200, 800, 3)
        );
        assert!((thread.busy_ratio() - 0.2).abs() < 1e-9);
        let waiting = loopguard_common::LoopState {
            depth: 1,
            wait_start_ns: 950,
            busy_ns: 100,
            wait_ns: 800,
            ..Default::default()
        };
        let thread = LoopThread::from_state(7, "node".into(), &waiting, 1000);
        assert_eq!((thread.busy_ns, thread.wait_ns), (100, 850));
    }

    #[test]
    fn since_subtracts_an_earlier_read() {
        let mut earlier = Histogram::default();
        earlier.0[3] = 2;
        let mut now = earlier.clone();
        now.0[3] = 5;
        now.0[9] = 1;
        let delta = now.since(&earlier);
        assert_eq!((delta.0[3], delta.0[9], delta.total()), (3, 1, 4));
    }
}
