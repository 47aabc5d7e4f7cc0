//! The adaptive rule: the stall threshold follows this process's own poll
//! durations.
//!
//! Input: reads of the kernel's cumulative poll-duration histogram (every
//! worker poll, log-linear slots, [`loopguard_common::hist`]), taken every
//! update interval. Output: a [`Baseline`]: a high percentile of the polls
//! seen in the last window, and the threshold it implies,
//! `clamp(multiplier × percentile, floor, ceiling)`.
//!
//! Censoring: the kernel counts every poll, stalls included. Each delta
//! between two reads drops the slots that may hold polls at or over the
//! threshold in force, so a storm of stalls cannot raise the threshold that
//! should catch it.

use std::collections::VecDeque;

use loopguard_common::hist;

use super::rule::Rule;
use crate::collect::totals::Histogram;

/// The adaptive rule's settings (validated by `config`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveSettings {
    /// 0.5..=0.999: which percentile of recent polls is "normal".
    pub percentile: f64,
    /// > 1: how far above normal a poll must be to stall.
    pub multiplier: f64,
    /// ns of history the percentile is taken over.
    pub window_ns: u64,
    /// Polls the window must hold before the rule takes over from the fixed threshold.
    pub min_samples: u64,
    /// ns, the lowest threshold the rule picks.
    pub floor_ns: u64,
    /// ns, the highest threshold the rule picks.
    pub ceiling_ns: u64,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        Self {
            percentile: DEFAULT_PERCENTILE,
            multiplier: DEFAULT_MULTIPLIER,
            window_ns: DEFAULT_WINDOW_S * 1_000_000_000,
            min_samples: DEFAULT_MIN_SAMPLES,
            floor_ns: DEFAULT_FLOOR_MS * 1_000_000,
            ceiling_ns: DEFAULT_CEILING_MS * 1_000_000,
        }
    }
}

pub const DEFAULT_PERCENTILE: f64 = 0.99;
pub const DEFAULT_MULTIPLIER: f64 = 4.0;
pub const DEFAULT_WINDOW_S: u64 = 60;
pub const DEFAULT_MIN_SAMPLES: u64 = 1000;
pub const DEFAULT_FLOOR_MS: u64 = 20;
pub const DEFAULT_CEILING_MS: u64 = 250;

/// What the window says about normal polls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baseline {
    /// Polls in the window (after censoring).
    pub samples: u64,
    /// ns, the percentile of those polls (middle of its slot: within 1/16).
    pub quantile_ns: u64,
    /// ns, the upper edge of the percentile's slot: every poll at least
    /// this long is longer than the percentile.
    pub quantile_upper_ns: u64,
    /// ns, the threshold it implies, clamped to the floor and the ceiling.
    pub threshold_ns: u64,
}

/// A censored delta: `(slot, polls)` of the slots that changed.
type Slice = (u64, Vec<(u32, u64)>);

/// The rule's state: the last read and the censored deltas in the window.
#[derive(Debug)]
pub struct AdaptiveThreshold {
    settings: AdaptiveSettings,
    last_read: Option<Histogram>,
    /// `(ns at the read, censored delta)`, oldest first.
    slices: VecDeque<Slice>,
    /// The sum of `slices`.
    window: Histogram,
}

impl AdaptiveThreshold {
    pub fn new(settings: AdaptiveSettings) -> Self {
        Self {
            settings,
            last_read: None,
            slices: VecDeque::new(),
            window: Histogram::default(),
        }
    }

    pub fn settings(&self) -> &AdaptiveSettings {
        &self.settings
    }

    /// Takes a read of the kernel histogram at `now_ns` while `threshold_ns`
    /// is in force; returns the baseline once the window holds enough polls.
    pub fn observe(
        &mut self,
        now_ns: u64,
        read: &Histogram,
        threshold_ns: u64,
    ) -> Option<Baseline> {
        if let Some(last) = &self.last_read {
            let delta = read.since(last);
            let kept: Vec<(u32, u64)> = delta
                .0
                .iter()
                .enumerate()
                .filter(|&(slot, &count)| count > 0 && hist::upper_ns(slot as u32) <= threshold_ns)
                .map(|(slot, &count)| (slot as u32, count))
                .collect();
            for &(slot, count) in &kept {
                self.window.0[slot as usize] += count;
            }
            self.slices.push_back((now_ns, kept));
        }
        self.last_read = Some(read.clone());
        let oldest = now_ns.saturating_sub(self.settings.window_ns);
        while self.slices.front().is_some_and(|(at, _)| *at <= oldest) {
            if let Some((_, expired)) = self.slices.pop_front() {
                for (slot, count) in expired {
                    self.window.0[slot as usize] -= count;
                }
            }
        }
        self.baseline()
    }

    /// The baseline of the current window, if it holds enough polls.
    pub fn baseline(&self) -> Option<Baseline> {
        let samples = self.window.total();
        if samples < self.settings.min_samples.max(1) {
            return None;
        }
        let quantile_ns = self.window.quantile_ns(self.settings.percentile)?;
        Some(Baseline {
            samples,
            quantile_ns,
            quantile_upper_ns: self.window.quantile_upper_ns(self.settings.percentile)?,
            threshold_ns: self.threshold_for(quantile_ns),
        })
    }

    /// `clamp(multiplier × quantile, floor, ceiling)`.
    pub fn threshold_for(&self, quantile_ns: u64) -> u64 {
        let scaled = (quantile_ns as f64 * self.settings.multiplier).round() as u64;
        scaled.clamp(self.settings.floor_ns, self.settings.ceiling_ns)
    }
}

/// One read of the kernel's histogram, taken at `now_ns` while
/// `threshold_ns` was in force.
#[derive(Clone, Copy, Debug)]
pub struct HistogramRead<'a> {
    pub now_ns: u64,
    pub read: &'a Histogram,
    pub threshold_ns: u64,
}

/// A move of the threshold, as its line says it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThresholdShown {
    pub threshold_ms: f64,
    pub previous_ms: f64,
    /// 0.5..=0.999.
    pub percentile: f64,
    pub samples: u64,
    pub percentile_ms: f64,
    pub multiplier: f64,
}

/// The thresholds in force over a run, as the summary says them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdaptiveTotals {
    /// Whether the rule ran.
    pub adaptive: bool,
    pub current_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Rule for AdaptiveThreshold {
    type Input<'a> = HistogramRead<'a>;
    type Found = Option<Baseline>;
    type Shown<'a> = ThresholdShown;
    type Totals<'a> = AdaptiveTotals;

    fn check(&mut self, input: HistogramRead<'_>) -> Option<Baseline> {
        self.observe(input.now_ns, input.read, input.threshold_ns)
    }

    fn describe(change: &ThresholdShown) -> String {
        format!(
            "{:<17} {:.1} ms (was {:.1} ms): p{} of {} recent polls = {:.3} ms, x {}",
            "THRESHOLD",
            change.threshold_ms,
            change.previous_ms,
            change.percentile * 100.0,
            change.samples,
            change.percentile_ms,
            change.multiplier,
        )
    }

    fn summary(totals: &AdaptiveTotals) -> Vec<String> {
        if !totals.adaptive {
            return Vec::new();
        }
        vec![format!(
            "  adaptive threshold: {:.1} ms now, {:.1} to {:.1} ms over the run",
            totals.current_ms, totals.min_ms, totals.max_ms
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn settings() -> AdaptiveSettings {
        AdaptiveSettings {
            window_ns: 10 * S,
            min_samples: 100,
            ..AdaptiveSettings::default()
        }
    }

    /// A kernel histogram that has counted `polls` of each `(ns, n)` more.
    fn count(read: &mut Histogram, polls: &[(u64, u64)]) {
        for &(ns, n) in polls {
            read.0[hist::slot_of(ns) as usize] += n;
        }
    }

    #[test]
    fn it_waits_for_enough_polls() {
        let mut rule = AdaptiveThreshold::new(settings());
        let mut read = Histogram::default();
        assert_eq!(rule.observe(0, &read, 50 * MS), None);
        count(&mut read, &[(MS, 99)]);
        assert_eq!(rule.observe(S, &read, 50 * MS), None);
        count(&mut read, &[(MS, 1)]);
        let baseline = rule.observe(2 * S, &read, 50 * MS).unwrap();
        assert_eq!(baseline.samples, 100);
        assert!(baseline.quantile_ns.abs_diff(MS) * 16 <= MS);
    }

    #[test]
    fn polls_counted_before_the_first_read_are_not_in_the_window() {
        let mut rule = AdaptiveThreshold::new(settings());
        let mut read = Histogram::default();
        count(&mut read, &[(MS, 10_000)]);
        assert_eq!(rule.observe(0, &read, 50 * MS), None);
    }

    #[test]
    fn polls_at_or_over_the_threshold_are_censored() {
        let mut rule = AdaptiveThreshold::new(settings());
        let mut read = Histogram::default();
        rule.observe(0, &read, 20 * MS);
        count(
            &mut read,
            &[(5 * MS, 1000), (25 * MS, 500), (19_990_000, 10)],
        );
        let baseline = rule.observe(S, &read, 20 * MS).unwrap();
        // The 25 ms polls and the slot straddling 20 ms are left out.
        assert_eq!(baseline.samples, 1000);
    }

    #[test]
    fn old_slices_leave_the_window() {
        let mut rule = AdaptiveThreshold::new(settings());
        let mut read = Histogram::default();
        rule.observe(0, &read, 100 * MS);
        count(&mut read, &[(8 * MS, 1000)]);
        let early = rule.observe(S, &read, 100 * MS).unwrap();
        assert!(early.quantile_ns > 7 * MS);
        count(&mut read, &[(MS, 1000)]);
        rule.observe(2 * S, &read, 100 * MS);
        let late = rule.observe(11 * S + 1, &read, 100 * MS).unwrap();
        assert_eq!(late.samples, 1000, "the 8 ms polls expired");
        assert!(late.quantile_ns < 2 * MS);
    }

    #[test]
    fn floor_and_ceiling_bound_the_threshold() {
        let rule = AdaptiveThreshold::new(settings());
        assert_eq!(rule.threshold_for(MS), DEFAULT_FLOOR_MS * MS);
        assert_eq!(rule.threshold_for(10 * MS), 40 * MS);
        assert_eq!(rule.threshold_for(4 * MS), DEFAULT_FLOOR_MS * MS);
        assert_eq!(rule.threshold_for(100 * MS), DEFAULT_CEILING_MS * MS);
    }
}
