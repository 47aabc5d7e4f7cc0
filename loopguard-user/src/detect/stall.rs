//! The stall rule: one poll that kept its worker thread at least the
//! threshold (fixed, or moved by the adaptive rule between calls).
//!
//! Input: [`PollEvent`]s from the ring buffer (worker polls that lasted at
//! least the report floor) and periodic snapshots of every thread's poll
//! stack. Output: [`Finding`]s: a stall still in progress (reported once, as
//! soon as a snapshot shows it past the threshold) and a finished stall (its
//! final duration, when the poll returns).

use std::collections::HashMap;

use loopguard_common::{PollEvent, ThreadPolls, frame_flags};

use super::Finding;
use super::rule::{Rule, StallShown, StallTotals, stall_head, task_label};

/// What kept the thread from its event loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StallKind {
    /// One task poll.
    #[default]
    Poll,
    /// A busy stretch between two waits for events that holds no poll stall
    /// (a `block_on` body, driver work, a non-Tokio event loop).
    Loop,
}

impl StallKind {
    /// How JSON names it (`kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poll => "poll",
            Self::Loop => "loop",
        }
    }

    /// The kind JSON names (`loop`, else a task poll).
    pub fn from_name(name: &str) -> Self {
        if name == "loop" {
            Self::Loop
        } else {
            Self::Poll
        }
    }
}

/// A task poll (or a loop's busy stretch) that blocked its thread for at
/// least the threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub kind: StallKind,
    pub tid: u32,
    /// Tokio task id, when the vtable layout could be verified.
    pub task_id: Option<u64>,
    /// Task header address.
    pub header: u64,
    /// ns, `CLOCK_MONOTONIC`, when the poll started.
    pub start_ns: u64,
    /// ns the poll has lasted (so far, for one in progress).
    pub duration_ns: u64,
    /// ns of `duration_ns` its thread waited for a CPU (preempted, or its
    /// vCPU not run by the host): what the detector left out of the held
    /// time. 0 where the stall was not judged by held time.
    pub preempted_ns: u64,
    /// Index of the `raw::poll` copy (names the future type in v0 builds).
    pub copy_index: u32,
    /// Return address of the poll: the scheduler that polled it.
    pub return_addr: u64,
    /// ns, the threshold in force when the stall was detected.
    pub threshold_ns: u64,
    /// The kernel's request totals around the poll: requests ended when it
    /// began, and started when it returned (`None` while in progress: read
    /// them now). The requests counted between them overlapped it.
    pub requests_window: Option<(u64, Option<u64>)>,
}

/// How long an in-progress report is remembered after its poll vanished from
/// the snapshots without an event (lost event, thread exit).
const FORGET_AFTER_NS: u64 = 10_000_000_000;

/// Pairs in-flight observations with finished polls for one threshold.
#[derive(Debug)]
pub struct StallDetector {
    threshold_ns: u64,
    /// `(tid, start_ns)` of polls reported in progress → (when last seen,
    /// the threshold they crossed).
    in_progress: HashMap<(u32, u64), (u64, u64)>,
}

impl StallDetector {
    pub fn new(threshold_ns: u64) -> Self {
        Self {
            threshold_ns,
            in_progress: HashMap::new(),
        }
    }

    pub fn threshold_ns(&self) -> u64 {
        self.threshold_ns
    }

    /// Moves the threshold (the adaptive rule). A poll already reported in
    /// progress is still reported when it finishes, against the threshold
    /// it crossed.
    pub fn set_threshold(&mut self, threshold_ns: u64) {
        self.threshold_ns = threshold_ns;
    }

    /// A worker poll returned.
    pub fn on_poll_end(&mut self, event: &PollEvent) -> Option<Finding> {
        let crossed = self
            .in_progress
            .remove(&(event.tid, event.start_ns))
            .map(|(_, threshold_ns)| threshold_ns);
        let seen_in_progress = crossed.is_some();
        let threshold_ns = crossed.unwrap_or(self.threshold_ns);
        // Time spent preempted is the scheduler's, not the poll's.
        if held_ns(event) < threshold_ns || !is_task_poll(event.flags) {
            return None;
        }
        let stall = Stall {
            kind: StallKind::Poll,
            tid: event.tid,
            task_id: task_id(event.task_id, event.flags),
            header: event.header,
            start_ns: event.start_ns,
            duration_ns: event.duration_ns,
            preempted_ns: event.preempted_ns.min(event.duration_ns),
            copy_index: event.copy_index,
            return_addr: event.return_addr,
            threshold_ns,
            requests_window: Some((
                event.requests_ended_at_entry,
                Some(event.requests_started_at_exit),
            )),
        };
        Some(Finding::Finished {
            stall,
            seen_in_progress,
        })
    }

    /// A snapshot of every thread's poll stack, taken at `now_ns`.
    pub fn on_snapshot(&mut self, now_ns: u64, threads: &[(u32, ThreadPolls)]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for (tid, polls) in threads {
            // Only the innermost poll can be the one blocking the thread.
            let Some(frame) = polls.innermost_task_poll() else {
                continue;
            };
            let elapsed = now_ns.saturating_sub(frame.start_ns);
            let held_ns = polls.held_so_far_ns(now_ns, frame);
            if held_ns < self.threshold_ns {
                continue;
            }
            let key = (*tid, frame.start_ns);
            let crossed = self.in_progress.get(&key).map(|&(_, t)| t);
            let threshold_ns = crossed.unwrap_or(self.threshold_ns);
            self.in_progress.insert(key, (now_ns, threshold_ns));
            if crossed.is_none() {
                findings.push(Finding::InProgress(Stall {
                    kind: StallKind::Poll,
                    tid: *tid,
                    task_id: task_id(frame.task_id, frame.flags),
                    header: frame.header,
                    start_ns: frame.start_ns,
                    duration_ns: elapsed,
                    preempted_ns: elapsed.saturating_sub(held_ns),
                    copy_index: frame.copy_index,
                    return_addr: frame.return_addr,
                    threshold_ns,
                    requests_window: Some((frame.requests_ended_at_entry, None)),
                }));
            }
        }
        self.in_progress
            .retain(|_, (last_seen, _)| now_ns.saturating_sub(*last_seen) < FORGET_AFTER_NS);
        findings
    }

    /// Stalls reported in progress whose end has not been seen (yet).
    pub fn unfinished(&self) -> usize {
        self.in_progress.len()
    }
}

/// What the stall rule looks at.
#[derive(Clone, Copy, Debug)]
pub enum PollInput<'a> {
    /// A worker poll returned.
    Ended(&'a PollEvent),
    /// Every thread's poll stack, read at `now_ns`.
    Snapshot {
        now_ns: u64,
        threads: &'a [(u32, ThreadPolls)],
    },
}

impl Rule for StallDetector {
    type Input<'a> = PollInput<'a>;
    type Found = Vec<Finding>;
    type Shown<'a> = StallShown<'a>;
    type Totals<'a> = StallTotals;

    fn check(&mut self, input: PollInput<'_>) -> Vec<Finding> {
        match input {
            PollInput::Ended(event) => self.on_poll_end(event).into_iter().collect(),
            PollInput::Snapshot { now_ns, threads } => self.on_snapshot(now_ns, threads),
        }
    }

    fn describe(shown: &StallShown<'_>) -> String {
        stall_head(["STALL IN PROGRESS", "STALL"], shown)
    }

    /// The longest stall (of either kind), and those still in progress at exit.
    fn summary(totals: &StallTotals) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(longest) = &totals.longest {
            lines.push(format!(
                "  longest stall: {:.1} ms, tid {} {}; total stalled {:.1} ms",
                longest.duration_ms,
                longest.tid,
                task_label(longest.kind, longest.task_id, longest.header),
                totals.total_ms,
            ));
        }
        if totals.unfinished > 0 {
            lines.push(format!(
                "  {} stall(s) were still in progress at exit",
                totals.unfinished
            ));
        }
        lines
    }
}

/// ns a finished poll held its thread: its duration less the time the
/// thread waited preempted (runnable but switched out) during it.
pub fn held_ns(event: &PollEvent) -> u64 {
    event.duration_ns.saturating_sub(event.preempted_ns)
}

/// A poll of a task on a worker: not blocking-pool work, not a scheduler
/// loop's own poll around the task polls.
pub fn is_task_poll(flags: u32) -> bool {
    frame_flags::is_task_poll(flags)
}

pub fn task_id(id: u64, flags: u32) -> Option<u64> {
    frame_flags::task_id(id, flags)
}

#[cfg(test)]
mod tests {
    use loopguard_common::MAX_POLL_DEPTH;
    use loopguard_common::{EventKind, PollFrame};

    use super::*;

    const MS: u64 = 1_000_000;

    fn end(tid: u32, start_ms: u64, duration_ms: u64, flags: u32) -> PollEvent {
        PollEvent {
            kind: EventKind::PollEnd as u32,
            pid: 1,
            tid,
            flags,
            start_ns: start_ms * MS,
            duration_ns: duration_ms * MS,
            task_id: 7,
            header: 0x1000,
            return_addr: 0x2000,
            copy_index: 0,
            depth: 1,
            preempted_ns: 0,
            requests_ended_at_entry: 0,
            requests_started_at_exit: 0,
        }
    }

    fn stack(frames: &[(u64, u32)]) -> ThreadPolls {
        let mut polls = ThreadPolls {
            depth: frames.len() as u32,
            ..Default::default()
        };
        for (i, &(start_ms, flags)) in frames.iter().enumerate() {
            polls.frames[i] = PollFrame {
                start_ns: start_ms * MS,
                task_id: 9,
                flags,
                ..Default::default()
            };
        }
        polls
    }

    #[test]
    fn a_short_poll_is_not_a_stall() {
        let mut detector = StallDetector::new(50 * MS);
        assert_eq!(detector.on_poll_end(&end(1, 0, 49, 0)), None);
    }

    #[test]
    fn a_long_poll_is_a_stall_once() {
        let mut detector = StallDetector::new(50 * MS);
        let Some(Finding::Finished {
            stall,
            seen_in_progress,
        }) = detector.on_poll_end(&end(1, 0, 340, 0))
        else {
            panic!("no stall");
        };
        assert_eq!(
            (stall.tid, stall.task_id, stall.duration_ns),
            (1, Some(7), 340 * MS)
        );
        assert!(!seen_in_progress);
    }

    #[test]
    fn blocking_pool_and_scheduler_loops_are_never_stalls() {
        let mut detector = StallDetector::new(50 * MS);
        assert_eq!(
            detector.on_poll_end(&end(1, 0, 500, frame_flags::BLOCKING)),
            None
        );
        assert_eq!(
            detector.on_poll_end(&end(1, 0, 500, frame_flags::CONTAINER)),
            None
        );
        let threads = [
            (1, stack(&[(0, frame_flags::BLOCKING)])),
            (2, stack(&[(0, frame_flags::CONTAINER)])),
        ];
        assert!(detector.on_snapshot(1000 * MS, &threads).is_empty());
    }

    #[test]
    fn a_stuck_poll_is_reported_in_progress_once_then_finished() {
        let mut detector = StallDetector::new(50 * MS);
        let threads = [(3, stack(&[(100, 0)]))];
        assert!(detector.on_snapshot(140 * MS, &threads).is_empty());
        let first = detector.on_snapshot(155 * MS, &threads);
        assert!(
            matches!(&first[..], [Finding::InProgress(s)] if s.duration_ns == 55 * MS && s.task_id == Some(9))
        );
        assert!(detector.on_snapshot(2000 * MS, &threads).is_empty());
        assert_eq!(detector.unfinished(), 1);
        let finished = detector.on_poll_end(&end(3, 100, 3000, 0));
        assert!(matches!(
            finished,
            Some(Finding::Finished {
                seen_in_progress: true,
                ..
            })
        ));
        assert_eq!(detector.unfinished(), 0);
    }

    #[test]
    fn only_the_innermost_poll_counts() {
        // An outer scheduler poll (container) with a stuck task inside it.
        let mut detector = StallDetector::new(50 * MS);
        let threads = [(4, stack(&[(0, frame_flags::CONTAINER), (900, 0)]))];
        let findings = detector.on_snapshot(1000 * MS, &threads);
        assert!(matches!(&findings[..], [Finding::InProgress(s)] if s.start_ns == 900 * MS));
    }

    #[test]
    fn a_stack_deeper_than_recorded_is_skipped() {
        let mut detector = StallDetector::new(50 * MS);
        let mut polls = stack(&[(0, 0)]);
        polls.depth = MAX_POLL_DEPTH as u32 + 1;
        assert!(detector.on_snapshot(1000 * MS, &[(5, polls)]).is_empty());
    }

    #[test]
    fn a_vanished_in_progress_stall_is_forgotten() {
        let mut detector = StallDetector::new(50 * MS);
        detector.on_snapshot(100 * MS, &[(6, stack(&[(0, 0)]))]);
        assert_eq!(detector.unfinished(), 1);
        detector.on_snapshot(100 * MS + FORGET_AFTER_NS, &[]);
        assert_eq!(detector.unfinished(), 0);
    }

    #[test]
    fn a_poll_seen_in_progress_is_finished_against_the_threshold_it_crossed() {
        let mut detector = StallDetector::new(50 * MS);
        let threads = [(3, stack(&[(100, 0)]))];
        assert_eq!(detector.on_snapshot(160 * MS, &threads).len(), 1);
        detector.set_threshold(80 * MS);
        let Some(Finding::Finished { stall, .. }) = detector.on_poll_end(&end(3, 100, 70, 0))
        else {
            panic!("the stall seen in progress was dropped");
        };
        assert_eq!(stall.threshold_ns, 50 * MS);
        assert_eq!(detector.on_poll_end(&end(3, 500, 70, 0)), None);
    }

    #[test]
    fn time_spent_preempted_does_not_make_a_stall() {
        let mut detector = StallDetector::new(50 * MS);
        let mut preempted = end(1, 0, 60, 0);
        preempted.preempted_ns = 15 * MS;
        assert_eq!(detector.on_poll_end(&preempted), None);
        preempted.preempted_ns = 5 * MS;
        assert!(detector.on_poll_end(&preempted).is_some());
    }

    #[test]
    fn a_stall_carries_the_wait_left_out_of_its_held_time() {
        // The cause's `cpu_wait_ms` is this figure: duration less it is the
        // held time the stall was judged by (issue #23).
        let mut detector = StallDetector::new(50 * MS);
        let mut event = end(1, 0, 300, 0);
        event.preempted_ns = 40 * MS;
        let Some(Finding::Finished { stall, .. }) = detector.on_poll_end(&event) else {
            panic!("a poll that held its thread 260 ms is a stall");
        };
        assert_eq!((stall.duration_ns, stall.preempted_ns), (300 * MS, 40 * MS));
        // Never more than the poll lasted, whatever the kernel added up.
        event.preempted_ns = 400 * MS;
        event.duration_ns = 500 * MS;
        let Some(Finding::Finished { stall, .. }) = detector.on_poll_end(&event) else {
            panic!("a poll that held its thread 100 ms is a stall");
        };
        assert_eq!(stall.preempted_ns, 400 * MS);

        let mut polls = stack(&[(100, 0)]);
        polls.frames[0].preempted_at_entry = 4 * MS;
        polls.preempted_ns = 14 * MS;
        let found = detector.on_snapshot(170 * MS, &[(3, polls)]);
        let [Finding::InProgress(stall)] = &found[..] else {
            panic!("60 ms held of 70 ms is a stall in progress: {found:?}");
        };
        assert_eq!((stall.duration_ns, stall.preempted_ns), (70 * MS, 10 * MS));
    }

    #[test]
    fn a_poll_in_progress_is_judged_by_the_time_it_held_its_thread() {
        let mut detector = StallDetector::new(50 * MS);
        let mut polls = stack(&[(100, 0)]);
        polls.frames[0].preempted_at_entry = 4 * MS;
        polls.preempted_ns = 14 * MS; // 10 ms preempted, counted
        assert!(detector.on_snapshot(155 * MS, &[(3, polls)]).is_empty());
        polls.preempted_since_ns = 150 * MS; // switched out since 150 ms
        assert!(detector.on_snapshot(170 * MS, &[(3, polls)]).is_empty());
        polls.preempted_since_ns = 0;
        assert_eq!(detector.on_snapshot(161 * MS, &[(3, polls)]).len(), 1);
    }

    #[test]
    fn a_missing_task_id_stays_missing() {
        let mut detector = StallDetector::new(50 * MS);
        let Some(Finding::Finished { stall, .. }) =
            detector.on_poll_end(&end(1, 0, 60, frame_flags::NO_TASK_ID))
        else {
            panic!("no stall");
        };
        assert_eq!(stall.task_id, None);
    }
}
