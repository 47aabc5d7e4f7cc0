//! The threshold engine: the stall, adaptive, cumulative and loop rules
//! run together on one stream of polls and loop stretches.
//!
//! Input: finished worker polls at least [`DetectSettings::report_floor_ns`]
//! long (the kernel ships nothing shorter), snapshots of in-flight polls,
//! and reads of the kernel's poll histogram every update interval. Output:
//! [`Finding`]s. A poll over the threshold in force is a stall; one between
//! the cumulative floor and the threshold is a cut for the cumulative rule.
//! With `--adaptive`, a cut must also be longer than the baseline's
//! percentile: polls that are normal for this process are not cuts, and
//! there are no cuts until the baseline exists.
//!
//! The loop rule ([`LoopDetector`]) runs here too: every check is given
//! the threshold in force, and every poll stall is held against the
//! stretch around it, so nothing is passed on to it by hand.

use loopguard_common::{LoopEvent, LoopState, PollEvent, ThreadPolls};

use super::adaptive::{AdaptiveSettings, AdaptiveThreshold, Baseline, HistogramRead};
use super::cumulative::{Culprit, CumulativeDetector, CumulativeSettings, Cut, CutInput};
use super::loops::{LoopDetector, LoopInput, LoopSeen};
use super::rule::Rule;
use super::stall::{PollInput, StallDetector, held_ns, is_task_poll, task_id};
use super::{Finding, ThresholdChange};
use crate::collect::totals::Histogram;

/// Which rules run, with what settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectSettings {
    /// ns, the fixed threshold (the adaptive rule's starting point).
    pub threshold_ns: u64,
    pub adaptive: Option<AdaptiveSettings>,
    pub cumulative: Option<CumulativeSettings>,
    /// Name patterns of the threads that count as event loops
    /// (`--loop-threads`); every thread that waits for events when empty.
    pub loop_threads: Vec<String>,
}

/// A move of the threshold smaller than this share of the last announced
/// value is applied without a `threshold` event.
const ANNOUNCE_SHARE: f64 = 0.10;

impl DetectSettings {
    /// The shortest poll the kernel must ship: the lowest threshold any rule
    /// can pick, and the cumulative floor.
    pub fn report_floor_ns(&self) -> u64 {
        let mut floor = self.threshold_ns;
        if let Some(adaptive) = &self.adaptive {
            floor = floor.min(adaptive.floor_ns);
        }
        if let Some(cumulative) = &self.cumulative {
            floor = floor.min(cumulative.floor_ns);
        }
        floor
    }

    /// How often the adaptive rule reads the histogram: a tenth of its
    /// window, between 100 ms and 1 s.
    pub fn update_interval_ns(&self) -> Option<u64> {
        self.adaptive
            .as_ref()
            .map(|a| (a.window_ns / 10).clamp(100_000_000, 1_000_000_000))
    }
}

/// The thresholds in force over a watch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThresholdRange {
    pub min_ns: u64,
    pub max_ns: u64,
    pub current_ns: u64,
}

impl ThresholdRange {
    fn new(ns: u64) -> Self {
        Self {
            min_ns: ns,
            max_ns: ns,
            current_ns: ns,
        }
    }

    fn set(&mut self, ns: u64) {
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
        self.current_ns = ns;
    }
}

/// The three rules and the threshold they share.
#[derive(Debug)]
pub struct ThresholdEngine {
    settings: DetectSettings,
    stall: StallDetector,
    adaptive: Option<AdaptiveThreshold>,
    cumulative: Option<CumulativeDetector>,
    loops: LoopDetector,
    baseline: Option<Baseline>,
    announced_ns: u64,
    range: ThresholdRange,
    /// Polls as long as a cut by the clock, but not once the time their
    /// thread spent preempted is left out.
    pub preempted_cuts: u64,
}

impl ThresholdEngine {
    pub fn new(settings: DetectSettings) -> Self {
        let threshold_ns = settings.threshold_ns;
        Self {
            stall: StallDetector::new(threshold_ns),
            adaptive: settings.adaptive.clone().map(AdaptiveThreshold::new),
            cumulative: settings.cumulative.clone().map(CumulativeDetector::new),
            loops: LoopDetector::new(settings.loop_threads.clone()),
            baseline: None,
            announced_ns: threshold_ns,
            range: ThresholdRange::new(threshold_ns),
            preempted_cuts: 0,
            settings,
        }
    }

    pub fn settings(&self) -> &DetectSettings {
        &self.settings
    }

    /// A loop thread came back to wait after a busy stretch: a loop stall
    /// when it held the thread past the threshold in force, and held no
    /// poll stall. `name` names a thread (asked under `--loop-threads`).
    pub fn on_loop_stretch(
        &mut self,
        stretch: &LoopEvent,
        mut name: impl FnMut(u32) -> String,
    ) -> Option<Finding> {
        let threshold_ns = self.threshold_ns();
        self.loops
            .check(LoopInput {
                threshold_ns,
                seen: LoopSeen::Busy(stretch),
                name: &mut name,
            })
            .pop()
    }

    /// Snapshots of every loop thread's wait state and every thread's
    /// polls, taken at `now_ns`: loop stalls in progress.
    pub fn on_loop_snapshot(
        &mut self,
        now_ns: u64,
        loops: &[(u32, LoopState)],
        polls: &[(u32, ThreadPolls)],
        mut name: impl FnMut(u32) -> String,
    ) -> Vec<Finding> {
        let threshold_ns = self.threshold_ns();
        self.loops.check(LoopInput {
            threshold_ns,
            seen: LoopSeen::Snapshot {
                now_ns,
                loops,
                polls,
            },
            name: &mut name,
        })
    }

    /// Whether thread `tid` of process `pid` is taken for an event-loop
    /// thread before it was seen waiting (see
    /// [`LoopDetector::presumed_loop_thread`]).
    pub fn presumed_loop_thread(
        &mut self,
        pid: u32,
        tid: u32,
        name: impl FnMut(u32) -> String,
    ) -> bool {
        self.loops.presumed_loop_thread(pid, tid, name)
    }

    /// Loop stalls reported in progress whose end has not been seen (yet).
    pub fn unfinished_loops(&self) -> usize {
        self.loops.unfinished()
    }

    /// Tells the loop rule of a poll stall, so the stretch that holds it
    /// is not reported again.
    fn noted(&mut self, finding: Finding) -> Finding {
        if let Some(stall) = finding.stall()
            && stall.kind == super::StallKind::Poll
        {
            self.loops.note_poll_stall(stall.tid, stall.start_ns);
        }
        finding
    }

    pub fn threshold_ns(&self) -> u64 {
        self.stall.threshold_ns()
    }

    pub fn range(&self) -> ThresholdRange {
        self.range
    }

    pub fn baseline(&self) -> Option<Baseline> {
        self.baseline
    }

    /// Stalls reported in progress whose end has not been seen (yet).
    pub fn unfinished(&self) -> usize {
        self.stall.unfinished()
    }

    /// `(polls, ns)` of cuts on excluded routes: counted, not alerted on.
    pub fn excluded_cuts(&self) -> (u64, u64) {
        self.cumulative
            .as_ref()
            .map_or((0, 0), |c| (c.excluded_polls, c.excluded_ns))
    }

    /// The shortest poll that is a cut now; `None` while the adaptive rule
    /// has no baseline yet (what is normal for this process is unknown, and
    /// a service whose every poll is over the floor would alert at once).
    fn cut_floor_ns(&self, cumulative: &CumulativeSettings) -> Option<u64> {
        if self.adaptive.is_none() {
            return Some(cumulative.floor_ns);
        }
        self.baseline
            .map(|b| cumulative.floor_ns.max(b.quantile_upper_ns))
    }

    /// A worker poll returned. `request` is asked, only for a cut, for the
    /// request it served and whether that request's route is excluded.
    pub fn on_poll_end(
        &mut self,
        event: &PollEvent,
        request: impl FnOnce(Option<u64>, u64) -> (Option<Culprit>, bool),
    ) -> Option<Finding> {
        if let Some(finding) = self.stall.check(PollInput::Ended(event)).pop() {
            return Some(self.noted(finding));
        }
        let cumulative = self.cumulative.as_ref()?;
        let floor_ns = self.cut_floor_ns(cumulative.settings())?;
        let held_ns = held_ns(event);
        if !is_task_poll(event.flags) || held_ns >= self.threshold_ns() {
            return None;
        }
        if held_ns < floor_ns {
            if event.duration_ns >= floor_ns {
                self.preempted_cuts += 1;
            }
            return None;
        }
        let task_id = task_id(event.task_id, event.flags);
        let (culprit, excluded) = request(task_id, event.start_ns);
        let cut = Cut {
            tid: event.tid,
            task_id,
            start_ns: event.start_ns,
            duration_ns: held_ns,
            request: culprit,
        };
        self.cumulative
            .as_mut()?
            .check(CutInput { cut, excluded })
            .map(Finding::Cumulative)
    }

    /// A busy stretch of an event-loop thread that polls no task (a
    /// non-Tokio loop, a `block_on` thread) ended, and was no stall: it is a
    /// cut like a poll between the floor and the threshold. (A thread that
    /// polls tasks gives its polls as cuts instead: its stretches hold them.)
    pub fn on_loop_busy(
        &mut self,
        tid: u32,
        start_ns: u64,
        held_ns: u64,
        request: Option<Culprit>,
    ) -> Option<Finding> {
        let cumulative = self.cumulative.as_ref()?;
        let floor_ns = self.cut_floor_ns(cumulative.settings())?;
        if held_ns < floor_ns || held_ns >= self.threshold_ns() {
            return None;
        }
        let cut = Cut {
            tid,
            task_id: None,
            start_ns,
            duration_ns: held_ns,
            request,
        };
        self.cumulative
            .as_mut()?
            .check(CutInput {
                cut,
                excluded: false,
            })
            .map(Finding::Cumulative)
    }

    /// A snapshot of every thread's poll stack, taken at `now_ns`.
    pub fn on_snapshot(&mut self, now_ns: u64, threads: &[(u32, ThreadPolls)]) -> Vec<Finding> {
        let findings = self.stall.check(PollInput::Snapshot { now_ns, threads });
        findings.into_iter().map(|f| self.noted(f)).collect()
    }

    /// A read of the kernel's poll histogram at `now_ns` (every update
    /// interval); moves the adaptive threshold, and says so when it moved by
    /// more than a tenth.
    pub fn on_histogram(&mut self, now_ns: u64, read: &Histogram) -> Option<Finding> {
        let adaptive = self.adaptive.as_mut()?;
        let baseline = adaptive.check(HistogramRead {
            now_ns,
            read,
            threshold_ns: self.stall.threshold_ns(),
        })?;
        self.baseline = Some(baseline);
        let to_ns = baseline.threshold_ns;
        // The threshold in force, for the stall rule and (through
        // `threshold_ns`) the loop rule.
        self.stall.set_threshold(to_ns);
        self.range.set(to_ns);
        let from_ns = self.announced_ns;
        if (to_ns.abs_diff(from_ns) as f64) <= from_ns as f64 * ANNOUNCE_SHARE {
            return None;
        }
        self.announced_ns = to_ns;
        let settings = adaptive.settings();
        Some(Finding::ThresholdChanged(ThresholdChange {
            at_ns: now_ns,
            from_ns,
            to_ns,
            baseline,
            percentile: settings.percentile,
            multiplier: settings.multiplier,
        }))
    }
}

#[cfg(test)]
mod tests {
    use loopguard_common::{EventKind, hist};

    use super::super::cumulative::Scope;
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    /// The kernel and the agent, simulated: every poll is counted in the
    /// histogram; those over the report floor reach the engine; the
    /// histogram is read every update interval.
    struct Sim {
        engine: ThresholdEngine,
        read: Histogram,
        next_read_ns: u64,
        findings: Vec<Finding>,
        /// Per thread: when its next poll may start.
        clock: [u64; 4],
    }

    impl Sim {
        fn new(settings: DetectSettings) -> Self {
            Self {
                engine: ThresholdEngine::new(settings),
                read: Histogram::default(),
                next_read_ns: 0,
                findings: Vec::new(),
                clock: [0; 4],
            }
        }

        fn read_until(&mut self, ns: u64) {
            let Some(interval) = self.engine.settings().update_interval_ns() else {
                return;
            };
            while self.next_read_ns <= ns {
                let at = self.next_read_ns;
                self.findings
                    .extend(self.engine.on_histogram(at, &self.read));
                self.next_read_ns += interval;
            }
        }

        /// One poll of `task` on `tid` starting at `start_ns`, serving `route`.
        fn poll_at(&mut self, tid: u32, task: u64, start_ns: u64, duration_ns: u64, route: &str) {
            let end_ns = start_ns + duration_ns;
            self.read_until(end_ns);
            self.read.0[hist::slot_of(duration_ns) as usize] += 1;
            let clock = &mut self.clock[tid as usize % 4];
            *clock = (*clock).max(end_ns);
            if duration_ns < self.engine.settings().report_floor_ns() {
                return;
            }
            let event = PollEvent {
                kind: EventKind::PollEnd as u32,
                pid: 1,
                tid,
                start_ns,
                duration_ns,
                task_id: task,
                depth: 1,
                ..PollEvent::default()
            };
            let route = route.to_owned();
            let finding = self.engine.on_poll_end(&event, |task_id, _| {
                let culprit = task_id.map(|id| Culprit {
                    id,
                    method: "GET".into(),
                    route: route.clone(),
                    path: route.clone(),
                });
                (culprit, route == "/health")
            });
            self.findings.extend(finding);
        }

        /// Back-to-back healthy polls on `tid` for `for_ns`: mostly a
        /// quarter of `base_ns`, one in fifty `base_ns` (so p99 = base).
        fn healthy(&mut self, tid: u32, base_ns: u64, for_ns: u64) {
            let until = self.clock[tid as usize % 4] + for_ns;
            let mut i = 0_u64;
            while self.clock[tid as usize % 4] < until {
                let duration = if i.is_multiple_of(50) {
                    base_ns
                } else {
                    base_ns / 4
                };
                let start = self.clock[tid as usize % 4] + 20_000;
                self.poll_at(tid, 1000 + i % 7, start, duration, "/fast");
                i += 1;
            }
        }

        fn stalls(&self) -> Vec<&super::super::Stall> {
            self.findings
                .iter()
                .filter_map(|f| match f {
                    Finding::Finished { stall, .. } => Some(stall),
                    _ => None,
                })
                .collect()
        }

        fn cumulative(&self) -> Vec<&super::super::CumulativeAlert> {
            self.findings
                .iter()
                .filter_map(|f| match f {
                    Finding::Cumulative(alert) => Some(alert),
                    _ => None,
                })
                .collect()
        }
    }

    fn fixed() -> DetectSettings {
        DetectSettings {
            threshold_ns: 50 * MS,
            adaptive: None,
            cumulative: Some(CumulativeSettings::default()),
            loop_threads: Vec::new(),
        }
    }

    fn adaptive() -> DetectSettings {
        DetectSettings {
            adaptive: Some(AdaptiveSettings {
                window_ns: 5 * S,
                min_samples: 500,
                floor_ns: 5 * MS,
                ceiling_ns: 100 * MS,
                ..AdaptiveSettings::default()
            }),
            ..fixed()
        }
    }

    fn near(ns: u64, want: u64) -> bool {
        ns.abs_diff(want) * 16 <= want
    }

    #[test]
    fn the_kernel_floor_is_the_lowest_threshold_or_cut() {
        assert_eq!(fixed().report_floor_ns(), 10 * MS);
        let only_stalls = DetectSettings {
            cumulative: None,
            ..fixed()
        };
        assert_eq!(only_stalls.report_floor_ns(), 50 * MS);
        let adaptive_only = DetectSettings {
            cumulative: None,
            ..adaptive()
        };
        assert_eq!(adaptive_only.report_floor_ns(), 5 * MS);
    }

    #[test]
    fn a_baseline_that_shifts_moves_the_threshold_without_an_alarm() {
        let mut sim = Sim::new(adaptive());
        for base_ms in [2, 3, 4, 5, 6] {
            sim.healthy(1, base_ms * MS, 6 * S);
            sim.healthy(2, base_ms * MS, 6 * S);
        }
        assert!(sim.stalls().is_empty(), "{:#?}", sim.stalls());
        assert!(sim.cumulative().is_empty(), "{:#?}", sim.cumulative());
        // p99 = 6 ms, times 4.
        assert!(
            near(sim.engine.threshold_ns(), 24 * MS),
            "{}",
            sim.engine.threshold_ns()
        );
        let moves = sim
            .findings
            .iter()
            .filter(|f| matches!(f, Finding::ThresholdChanged(_)))
            .count();
        assert!(moves >= 3, "the threshold moves are announced: {moves}");
        let range = sim.engine.range();
        assert!(range.min_ns < range.max_ns && range.max_ns == 50 * MS);
    }

    #[test]
    fn steady_five_ms_work_raises_nothing_with_adaptive_and_a_block_is_caught() {
        let mut sim = Sim::new(adaptive());
        for tid in [1, 2] {
            let mut start = 0;
            for i in 0..1500_u64 {
                let duration = 5 * MS + (i % 10) * 30_000;
                sim.poll_at(tid, i, start, duration, "/work");
                start += duration + 50_000;
            }
        }
        assert!(sim.cumulative().is_empty(), "{:#?}", sim.cumulative());
        assert!(sim.stalls().is_empty());
        let threshold = sim.engine.threshold_ns();
        assert!((20 * MS..25 * MS).contains(&threshold), "{threshold}");
        let start = sim.clock[1] + MS;
        sim.poll_at(1, 7, start, 100 * MS, "/block/sleep");
        let stalls = sim.stalls();
        assert_eq!(stalls.len(), 1);
        assert_eq!(stalls[0].threshold_ns, threshold);
    }

    #[test]
    fn short_busy_stretches_of_a_loop_add_up_to_one_cumulative_alert() {
        let mut engine = ThresholdEngine::new(fixed());
        // 20 ms away from the wait every 60 ms for a second: under the
        // stall threshold each time, 220 ms within 1000 ms in all.
        let findings: Vec<Finding> = (0..17_u64)
            .filter_map(|i| engine.on_loop_busy(7, i * 60 * MS, 20 * MS, None))
            .collect();
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(matches!(&findings[0], Finding::Cumulative(_)));
        // Under the floor or over the threshold: no cut.
        assert!(engine.on_loop_busy(8, 0, 5 * MS, None).is_none());
        assert!(engine.on_loop_busy(8, 0, 80 * MS, None).is_none());
    }

    #[test]
    fn polls_long_only_by_preemption_are_no_cuts() {
        let mut engine = ThresholdEngine::new(fixed());
        let mut alerts = 0;
        for i in 0..40_u64 {
            let event = PollEvent {
                kind: EventKind::PollEnd as u32,
                tid: 1 + (i % 2) as u32,
                start_ns: i * 25 * MS,
                duration_ns: 12 * MS,
                preempted_ns: 11_900_000,
                task_id: i,
                depth: 1,
                ..PollEvent::default()
            };
            alerts += usize::from(engine.on_poll_end(&event, |_, _| (None, false)).is_some());
        }
        assert_eq!(alerts, 0);
        assert_eq!(engine.preempted_cuts, 40);
    }

    #[test]
    fn the_loop_rule_follows_the_engine_without_being_told() {
        let mut sim = Sim::new(adaptive());
        // A baseline well above the floor moves the threshold...
        sim.healthy(1, 20 * MS, 3 * S);
        let moved = sim.engine.threshold_ns();
        assert_ne!(moved, adaptive().threshold_ns);
        // ...and a loop stretch just under it is no stall, just over it is.
        let stretch = |start_ns: u64, duration_ns: u64| loopguard_common::LoopEvent {
            tid: 2,
            start_ns,
            duration_ns,
            ..Default::default()
        };
        let at = 10 * S;
        let names = |_| String::new();
        assert!(
            sim.engine
                .on_loop_stretch(&stretch(at, moved - 1), names)
                .is_none()
        );
        assert!(
            sim.engine
                .on_loop_stretch(&stretch(at, moved + 1), names)
                .is_some()
        );
        // A poll stall the engine found is held against the stretch around it.
        sim.poll_at(3, 9, 20 * S, 2 * moved, "/slow");
        assert!(sim.findings.iter().any(|f| f.stall().is_some()));
        let around = loopguard_common::LoopEvent {
            tid: 3,
            ..stretch(20 * S - MS, 3 * moved)
        };
        assert!(sim.engine.on_loop_stretch(&around, names).is_none());
    }

    #[test]
    fn one_long_block_is_caught() {
        let mut sim = Sim::new(fixed());
        sim.healthy(1, MS / 2, S);
        let start = sim.clock[1] + 1000;
        sim.poll_at(1, 77, start, 120 * MS, "/block");
        sim.healthy(1, MS / 2, S);
        let stalls = sim.stalls();
        assert_eq!(stalls.len(), 1);
        assert_eq!(
            (
                stalls[0].task_id,
                stalls[0].duration_ns,
                stalls[0].threshold_ns
            ),
            (Some(77), 120 * MS, 50 * MS)
        );
        assert!(sim.cumulative().is_empty());
    }

    #[test]
    fn twenty_ms_blocks_every_sixty_ms_for_a_second_alert_once() {
        let mut sim = Sim::new(fixed());
        for i in 0..17 {
            let start = S + i * 60 * MS;
            sim.healthy(2, MS / 2, 10 * MS);
            sim.poll_at(1, 5, start, 20 * MS, "/block/repeat");
        }
        assert!(sim.stalls().is_empty());
        let alerts = sim.cumulative();
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        let alert = alerts[0];
        assert_eq!(alert.scope, Scope::Thread(1));
        assert_eq!(
            (alert.polls, alert.blocked_ns, alert.repeat),
            (11, 220 * MS, 1)
        );
        assert_eq!(alert.routes[0].route, "/block/repeat");
        assert_eq!(alert.tasks[0].task_id, Some(5));
        assert_eq!(alert.window_end_ns - alert.window_start_ns, S);
    }

    #[test]
    fn a_poll_straddling_the_window_edge_counts_for_its_part_inside() {
        for (first_ms, alerts) in [(40, 0), (42, 1)] {
            let mut sim = Sim::new(fixed());
            let t0 = 10 * S;
            sim.poll_at(1, 5, t0, first_ms * MS, "/a");
            for i in 0..8 {
                sim.poll_at(1, 5, t0 + (200 + i * 100) * MS, 20 * MS, "/a");
            }
            // Ends at t0 + 1020 ms: the window starts at t0 + 20 ms, so the
            // first poll counts 20 ms (or 22): 200 ms in all, not over; 202, over.
            sim.poll_at(1, 5, t0 + 1000 * MS, 20 * MS, "/a");
            assert_eq!(sim.cumulative().len(), alerts, "first poll {first_ms} ms");
        }
    }

    #[test]
    fn a_stall_storm_does_not_raise_the_adaptive_threshold() {
        let mut sim = Sim::new(adaptive());
        sim.healthy(1, 2 * MS, 6 * S);
        sim.healthy(2, 2 * MS, 6 * S);
        let calm = sim.engine.threshold_ns();
        assert!(near(calm, 8 * MS), "{calm}");
        for i in 0..60_u32 {
            let start = sim.clock[1] + 1000;
            sim.poll_at(1, 99, start, 100 * MS, "/storm");
            sim.healthy(2, 2 * MS, 100 * MS);
            if i.is_multiple_of(3) {
                sim.healthy(1, 2 * MS, 50 * MS);
            }
        }
        assert_eq!(sim.stalls().len(), 60);
        assert!(
            sim.engine.range().max_ns <= 50 * MS && sim.engine.threshold_ns() <= calm + calm / 8,
            "{:?}",
            sim.engine.range()
        );
    }

    #[test]
    fn the_adaptive_threshold_stays_between_floor_and_ceiling() {
        let mut sim = Sim::new(adaptive());
        sim.healthy(1, MS / 10, 6 * S);
        assert_eq!(sim.engine.threshold_ns(), 5 * MS, "floor");
        let mut low_ceiling = adaptive();
        if let Some(a) = low_ceiling.adaptive.as_mut() {
            a.ceiling_ns = 30 * MS;
        }
        let mut sim = Sim::new(low_ceiling);
        sim.healthy(1, 10 * MS, 12 * S);
        // p99 = 10 ms, times 4 = 40 ms: held at the ceiling.
        assert_eq!(sim.engine.threshold_ns(), 30 * MS, "ceiling");
        assert!(sim.stalls().is_empty());
    }

    #[test]
    fn excluded_routes_raise_no_cumulative_alert() {
        let mut sim = Sim::new(fixed());
        for i in 0..30 {
            sim.poll_at(1, 5, S + i * 40 * MS, 20 * MS, "/health");
        }
        assert!(sim.cumulative().is_empty());
        assert_eq!(sim.engine.excluded_cuts(), (30, 600 * MS));
    }

    #[test]
    fn a_persisting_condition_repeats_once_per_window_with_a_count() {
        let mut sim = Sim::new(fixed());
        for i in 0..125 {
            sim.poll_at(1, 5, S + i * 40 * MS, 20 * MS, "/block/repeat");
        }
        let repeats: Vec<u64> = sim.cumulative().iter().map(|a| a.repeat).collect();
        assert_eq!(repeats, [1, 2, 3, 4, 5]);
    }

    /// xorshift64*: a small, seeded, reproducible source for the property test.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    #[test]
    fn never_more_than_one_alert_per_scope_per_window() {
        for seed in 1..=200_u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let settings = CumulativeSettings {
                floor_ns: (1 + rng.below(10)) * MS,
                window_ns: (100 + rng.below(1900)) * MS,
                budget_ns: 0,
            };
            let settings = CumulativeSettings {
                budget_ns: (settings.window_ns / 20) * (1 + rng.below(15)),
                ..settings
            };
            let mut sim = Sim::new(DetectSettings {
                threshold_ns: 50 * MS,
                adaptive: None,
                cumulative: Some(settings.clone()),
                loop_threads: Vec::new(),
            });
            for _ in 0..2000 {
                // Threads run side by side: polls end (and reach the agent)
                // in time order, as through the ring buffer.
                let tid = (1..=3_u32)
                    .min_by_key(|&t| sim.clock[t as usize] + rng.below(10 * MS))
                    .unwrap_or(1);
                let start = sim.clock[tid as usize] + rng.below(30 * MS);
                let duration = settings.floor_ns + rng.below(60 * MS);
                sim.poll_at(tid, rng.below(20), start, duration, "/r");
            }
            let mut last = std::collections::HashMap::<Scope, u64>::new();
            for alert in sim.cumulative() {
                if let Some(previous) = last.insert(alert.scope, alert.window_end_ns) {
                    assert!(
                        alert.window_end_ns >= previous + settings.window_ns,
                        "seed {seed}: {:?} alerted at {previous} and {}",
                        alert.scope,
                        alert.window_end_ns
                    );
                }
                assert!(alert.blocked_ns > settings.budget_ns);
            }
        }
    }
}
