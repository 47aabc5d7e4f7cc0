//! Loop stalls: an event-loop thread that stays away from its wait for
//! events (epoll, or Tokio's park) for longer than the threshold.
//!
//! Input: busy stretches the kernel reports when a thread comes back to
//! wait ([`LoopEvent`]), snapshots of every loop thread's wait state and
//! poll stack, and the poll stalls the poll detector found. Output: loop
//! [`Finding`]s, in progress (once, as soon as a snapshot shows the stretch
//! past the threshold) and finished.
//!
//! On a Tokio worker the kernel also ends a stretch where each task poll
//! begins and starts the next at its return, so a stretch is time outside
//! both waits and task polls (scheduler, driver, `block_on` body).
//!
//! A stretch that holds a poll stall is that poll's stall, reported once by
//! the poll detector: the loop view only adds what task polls cannot see (a
//! `block_on` body, driver work, an event loop that is not Tokio). While a
//! thread is inside a task poll, whether it is stuck is the poll detector's
//! call.

use std::collections::{HashMap, HashSet, VecDeque};

use loopguard_common::{LoopEvent, LoopState, ThreadPolls};

use super::rule::{Rule, StallShown, stall_head};
use crate::detect::{Finding, Stall, StallKind};
use crate::term::printable;

/// Poll stalls remembered per thread, to tell a loop stretch that holds one.
const POLL_STALLS_KEPT: usize = 64;
/// How long an in-progress loop stall is remembered without news.
const FORGET_AFTER_NS: u64 = 10_000_000_000;

/// Finds loop stalls against the threshold in force, which every check is
/// given (the engine's: the loop rule keeps no threshold of its own).
#[derive(Debug)]
pub struct LoopDetector {
    /// `(tid, busy start)` reported in progress → when last seen.
    in_progress: HashMap<(u32, u64), u64>,
    /// Start times of poll stalls (finished or in progress), per thread.
    poll_stalls: HashMap<u32, VecDeque<u64>>,
    /// Threads allowed to be loop threads (`--loop-threads`); all when empty.
    only: Vec<String>,
    /// Threads whose names were checked against `only`, and the verdict.
    allowed: HashMap<u32, bool>,
}

/// Whether `name` matches a `--loop-threads` pattern: exact, or a prefix
/// ending in `*`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

impl LoopDetector {
    pub fn new(only: Vec<String>) -> Self {
        Self {
            in_progress: HashMap::new(),
            poll_stalls: HashMap::new(),
            only,
            allowed: HashMap::new(),
        }
    }

    /// Whether thread `tid` (named by `name`) may be reported.
    fn is_loop_thread(&mut self, tid: u32, name: &mut impl FnMut(u32) -> String) -> bool {
        if self.only.is_empty() {
            return true;
        }
        let only = &self.only;
        *self.allowed.entry(tid).or_insert_with(|| {
            let name = name(tid);
            only.iter().any(|pattern| name_matches(pattern, &name))
        })
    }

    /// Whether thread `tid` of process `pid` is taken for an event-loop
    /// thread before it was seen waiting (the attach census of loop-only
    /// targets): a thread `--loop-threads` names; without that option, the
    /// main thread, where Node, uvicorn and asyncio's `run` keep their loop.
    pub fn presumed_loop_thread(
        &mut self,
        pid: u32,
        tid: u32,
        mut name: impl FnMut(u32) -> String,
    ) -> bool {
        if self.only.is_empty() {
            tid == pid
        } else {
            self.is_loop_thread(tid, &mut name)
        }
    }

    /// The poll detector reported a stall (in progress or finished) on `tid`
    /// whose poll began at `start_ns`.
    pub fn note_poll_stall(&mut self, tid: u32, start_ns: u64) {
        let starts = self.poll_stalls.entry(tid).or_default();
        if !starts.contains(&start_ns) {
            if starts.len() >= POLL_STALLS_KEPT {
                starts.pop_front();
            }
            starts.push_back(start_ns);
        }
    }

    fn holds_poll_stall(&self, tid: u32, start_ns: u64, end_ns: u64) -> bool {
        self.poll_stalls
            .get(&tid)
            .is_some_and(|starts| starts.iter().any(|&poll| poll >= start_ns && poll < end_ns))
    }

    /// A loop thread came back to wait after a busy stretch.
    pub fn on_busy(
        &mut self,
        threshold_ns: u64,
        event: &LoopEvent,
        mut name: impl FnMut(u32) -> String,
    ) -> Option<Finding> {
        let seen_in_progress = self
            .in_progress
            .remove(&(event.tid, event.start_ns))
            .is_some();
        let end_ns = event.start_ns + event.duration_ns;
        // Time spent preempted is the scheduler's, not the loop's.
        let held_ns = event.duration_ns.saturating_sub(event.preempted_ns);
        if held_ns < threshold_ns
            || self.holds_poll_stall(event.tid, event.start_ns, end_ns)
            || !self.is_loop_thread(event.tid, &mut name)
        {
            return None;
        }
        Some(Finding::Finished {
            stall: loop_stall(event.tid, event.start_ns, event.duration_ns, threshold_ns),
            seen_in_progress,
        })
    }

    /// Snapshots of every loop thread's wait state and every thread's polls,
    /// taken at `now_ns`.
    pub fn on_snapshot(
        &mut self,
        threshold_ns: u64,
        now_ns: u64,
        loops: &[(u32, LoopState)],
        polls: &[(u32, ThreadPolls)],
        mut name: impl FnMut(u32) -> String,
    ) -> Vec<Finding> {
        let in_task_poll: HashSet<u32> = polls
            .iter()
            .filter(|(_, stack)| stack.innermost_task_poll().is_some())
            .map(|(tid, _)| *tid)
            .collect();
        let mut findings = Vec::new();
        for (tid, state) in loops {
            if state.depth > 0 || state.busy_start_ns == 0 {
                continue;
            }
            if held_so_far_ns(now_ns, state) < threshold_ns
                || in_task_poll.contains(tid)
                || self.holds_poll_stall(*tid, state.busy_start_ns, now_ns)
                || !self.is_loop_thread(*tid, &mut name)
            {
                continue;
            }
            if self
                .in_progress
                .insert((*tid, state.busy_start_ns), now_ns)
                .is_none()
            {
                findings.push(Finding::InProgress(loop_stall(
                    *tid,
                    state.busy_start_ns,
                    now_ns.saturating_sub(state.busy_start_ns),
                    threshold_ns,
                )));
            }
        }
        self.in_progress
            .retain(|_, last_seen| now_ns.saturating_sub(*last_seen) < FORGET_AFTER_NS);
        let alive: HashSet<u32> = loops.iter().map(|(tid, _)| *tid).collect();
        self.poll_stalls.retain(|tid, _| alive.contains(tid));
        self.allowed.retain(|tid, _| alive.contains(tid));
        findings
    }

    /// Loop stalls reported in progress whose end has not been seen (yet).
    pub fn unfinished(&self) -> usize {
        self.in_progress.len()
    }
}

/// What the loop rule looks at, against the threshold in force.
pub struct LoopInput<'a, 'n> {
    pub threshold_ns: u64,
    pub seen: LoopSeen<'a>,
    /// A thread's name, asked only under `--loop-threads`.
    pub name: &'n mut dyn FnMut(u32) -> String,
}

/// A busy stretch that ended, or the wait states and poll stacks at `now_ns`.
#[derive(Clone, Copy, Debug)]
pub enum LoopSeen<'a> {
    Busy(&'a LoopEvent),
    Snapshot {
        now_ns: u64,
        loops: &'a [(u32, LoopState)],
        polls: &'a [(u32, ThreadPolls)],
    },
}

/// An event-loop thread's time over the run, as the summary says it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopThreadShown<'a> {
    pub tid: u32,
    pub thread: &'a str,
    pub busy_ms: f64,
    pub wait_ms: f64,
    pub waits: u64,
}

impl Rule for LoopDetector {
    type Input<'a> = LoopInput<'a, 'a>;
    type Found = Vec<Finding>;
    type Shown<'a> = StallShown<'a>;
    type Totals<'a> = [LoopThreadShown<'a>];

    fn check(&mut self, input: LoopInput<'_, '_>) -> Vec<Finding> {
        let LoopInput {
            threshold_ns,
            seen,
            name,
        } = input;
        match seen {
            LoopSeen::Busy(event) => self
                .on_busy(threshold_ns, event, name)
                .into_iter()
                .collect(),
            LoopSeen::Snapshot {
                now_ns,
                loops,
                polls,
            } => self.on_snapshot(threshold_ns, now_ns, loops, polls, name),
        }
    }

    fn describe(shown: &StallShown<'_>) -> String {
        stall_head(["LOOP STALL IN PROGRESS", "LOOP STALL"], shown)
    }

    /// Each event-loop thread's busy and waiting time.
    fn summary(threads: &[LoopThreadShown<'_>]) -> Vec<String> {
        threads
            .iter()
            .map(|thread| {
                let watched = thread.busy_ms + thread.wait_ms;
                let busy = if watched > 0.0 {
                    thread.busy_ms / watched
                } else {
                    0.0
                };
                format!(
                    "  event loop tid {} ({}): busy {:.1} ms, waiting {:.1} ms ({:.0} % busy), {} waits",
                    thread.tid,
                    printable(thread.thread),
                    thread.busy_ms,
                    thread.wait_ms,
                    busy * 100.0,
                    thread.waits,
                )
            })
            .collect()
    }
}

/// ns a running busy stretch has held its thread by `now_ns`: time since
/// it began, less the time the thread spent preempted since (counted, and a
/// preemption still open).
fn held_so_far_ns(now_ns: u64, state: &LoopState) -> u64 {
    let counted = state
        .preempted_ns
        .saturating_sub(state.preempted_at_start_ns);
    let open = if state.preempted_since_ns != 0 {
        now_ns.saturating_sub(state.preempted_since_ns)
    } else {
        0
    };
    now_ns
        .saturating_sub(state.busy_start_ns)
        .saturating_sub(counted + open)
}

fn loop_stall(tid: u32, start_ns: u64, duration_ns: u64, threshold_ns: u64) -> Stall {
    Stall {
        kind: StallKind::Loop,
        tid,
        task_id: None,
        header: 0,
        start_ns,
        duration_ns,
        preempted_ns: 0,
        copy_index: u32::MAX,
        return_addr: 0,
        threshold_ns,
        requests_window: None,
    }
}

#[cfg(test)]
mod tests {
    use loopguard_common::frame_flags;
    use loopguard_common::{EventKind, PollFrame};

    use super::*;

    const MS: u64 = 1_000_000;

    fn busy(tid: u32, start_ms: u64, duration_ms: u64) -> LoopEvent {
        LoopEvent {
            kind: EventKind::LoopBusy as u32,
            pid: 1,
            tid,
            wait_fd: 0,
            start_ns: start_ms * MS,
            duration_ns: duration_ms * MS,
            preempted_ns: 0,
        }
    }

    fn busy_since(start_ms: u64) -> LoopState {
        LoopState {
            busy_start_ns: start_ms * MS,
            ..LoopState::default()
        }
    }

    fn waiting() -> LoopState {
        LoopState {
            depth: 1,
            wait_start_ns: MS,
            ..LoopState::default()
        }
    }

    fn in_poll(start_ms: u64, flags: u32) -> ThreadPolls {
        let mut stack = ThreadPolls {
            depth: 1,
            ..ThreadPolls::default()
        };
        stack.frames[0] = PollFrame {
            start_ns: start_ms * MS,
            flags,
            ..PollFrame::default()
        };
        stack
    }

    fn anyone(_: u32) -> String {
        "main".to_owned()
    }

    #[test]
    fn before_any_wait_the_main_thread_or_the_named_ones_are_loop_threads() {
        let mut any = LoopDetector::new(Vec::new());
        assert!(any.presumed_loop_thread(100, 100, anyone));
        assert!(!any.presumed_loop_thread(100, 101, anyone));
        let mut named = LoopDetector::new(vec!["loop-*".into()]);
        let name = |tid: u32| {
            if tid == 101 {
                "loop-1".into()
            } else {
                "main".into()
            }
        };
        assert!(named.presumed_loop_thread(100, 101, name));
        assert!(!named.presumed_loop_thread(100, 100, name));
    }

    #[test]
    fn a_long_busy_stretch_is_a_loop_stall() {
        let mut detector = LoopDetector::new(Vec::new());
        assert_eq!(detector.on_busy(50 * MS, &busy(7, 100, 49), anyone), None);
        let Some(Finding::Finished { stall, .. }) =
            detector.on_busy(50 * MS, &busy(7, 200, 200), anyone)
        else {
            panic!("no loop stall");
        };
        assert_eq!(
            (stall.kind, stall.tid, stall.duration_ns),
            (StallKind::Loop, 7, 200 * MS)
        );
    }

    #[test]
    fn a_stretch_holding_a_poll_stall_is_reported_once_as_the_poll() {
        let mut detector = LoopDetector::new(Vec::new());
        detector.note_poll_stall(7, 210 * MS);
        assert_eq!(detector.on_busy(50 * MS, &busy(7, 200, 300), anyone), None);
        // The same thread later blocks outside any poll: that one is a loop stall.
        assert!(
            detector
                .on_busy(50 * MS, &busy(7, 600, 100), anyone)
                .is_some()
        );
        // Another thread's poll stall does not hide this one.
        detector.note_poll_stall(8, 1000 * MS);
        assert!(
            detector
                .on_busy(50 * MS, &busy(7, 990, 100), anyone)
                .is_some()
        );
    }

    #[test]
    fn in_progress_once_then_finished() {
        let mut detector = LoopDetector::new(Vec::new());
        let loops = [
            (7, busy_since(100)),
            (8, waiting()),
            (9, LoopState::default()),
        ];
        assert!(
            detector
                .on_snapshot(50 * MS, 140 * MS, &loops, &[], anyone)
                .is_empty()
        );
        let found = detector.on_snapshot(50 * MS, 160 * MS, &loops, &[], anyone);
        assert!(
            matches!(&found[..], [Finding::InProgress(stall)] if stall.tid == 7 && stall.duration_ns == 60 * MS),
            "{found:?}"
        );
        assert!(
            detector
                .on_snapshot(50 * MS, 170 * MS, &loops, &[], anyone)
                .is_empty()
        );
        let Some(Finding::Finished {
            seen_in_progress, ..
        }) = detector.on_busy(50 * MS, &busy(7, 100, 200), anyone)
        else {
            panic!("not finished");
        };
        assert!(seen_in_progress);
        assert_eq!(detector.unfinished(), 0);
    }

    #[test]
    fn inside_a_task_poll_the_poll_detector_decides() {
        let mut detector = LoopDetector::new(Vec::new());
        let loops = [(7, busy_since(100))];
        let polls = [(7, in_poll(140, 0))];
        assert!(
            detector
                .on_snapshot(50 * MS, 200 * MS, &loops, &polls, anyone)
                .is_empty()
        );
        // A scheduler loop's poll (container) is not a task poll.
        let polls = [(7, in_poll(0, frame_flags::CONTAINER))];
        assert_eq!(
            detector
                .on_snapshot(50 * MS, 200 * MS, &loops, &polls, anyone)
                .len(),
            1
        );
    }

    #[test]
    fn a_wait_in_progress_at_attach_and_an_unknown_start_raise_nothing() {
        let mut detector = LoopDetector::new(Vec::new());
        // Attached mid-wait: depth 0 until the wait returns; the kernel
        // then starts a stretch. Attached mid-stretch: start unknown (0).
        let loops = [(7, LoopState::default()), (8, waiting())];
        assert!(
            detector
                .on_snapshot(50 * MS, 10_000 * MS, &loops, &[], anyone)
                .is_empty()
        );
    }

    #[test]
    fn a_thread_that_exits_mid_stretch_is_forgotten() {
        let mut detector = LoopDetector::new(Vec::new());
        let loops = [(7, busy_since(100))];
        assert_eq!(
            detector
                .on_snapshot(50 * MS, 200 * MS, &loops, &[], anyone)
                .len(),
            1
        );
        // Its entry left the map (thread exit): no finish ever comes.
        assert!(
            detector
                .on_snapshot(50 * MS, 300 * MS, &[], &[], anyone)
                .is_empty()
        );
        assert!(
            detector
                .on_snapshot(50 * MS, 200 * MS + FORGET_AFTER_NS, &[], &[], anyone)
                .is_empty()
        );
        assert_eq!(detector.unfinished(), 0);
    }

    #[test]
    fn a_lost_end_does_not_hide_the_next_stretch() {
        let mut detector = LoopDetector::new(Vec::new());
        // In progress, then its LoopEvent is lost (ring buffer full): the
        // thread waits again and starts a new stretch.
        assert_eq!(
            detector
                .on_snapshot(50 * MS, 200 * MS, &[(7, busy_since(100))], &[], anyone)
                .len(),
            1
        );
        assert!(
            detector
                .on_snapshot(50 * MS, 300 * MS, &[(7, waiting())], &[], anyone)
                .is_empty()
        );
        let found = detector.on_snapshot(50 * MS, 500 * MS, &[(7, busy_since(400))], &[], anyone);
        assert!(
            matches!(&found[..], [Finding::InProgress(stall)] if stall.start_ns == 400 * MS),
            "{found:?}"
        );
        let Some(Finding::Finished {
            seen_in_progress, ..
        }) = detector.on_busy(50 * MS, &busy(7, 400, 150), anyone)
        else {
            panic!("the next stretch is reported");
        };
        assert!(seen_in_progress);
    }

    #[test]
    fn time_spent_preempted_does_not_make_a_loop_stall() {
        let mut detector = LoopDetector::new(Vec::new());
        // 70 ms since the stretch began, 30 of them switched out runnable
        // (20 counted, 10 still open): it held its thread 40 ms.
        let preempted = LoopState {
            busy_start_ns: 100 * MS,
            preempted_at_start_ns: 5 * MS,
            preempted_ns: 25 * MS,
            preempted_since_ns: 160 * MS,
            ..LoopState::default()
        };
        assert!(
            detector
                .on_snapshot(50 * MS, 170 * MS, &[(7, preempted)], &[], anyone)
                .is_empty()
        );
        // Back on CPU at 190 ms (50 ms preempted in all since the start):
        // at 230 ms it has held its thread 80 ms, and is reported with its
        // wall-clock duration, 130 ms.
        let running = LoopState {
            preempted_ns: 55 * MS,
            preempted_since_ns: 0,
            ..preempted
        };
        let found = detector.on_snapshot(50 * MS, 230 * MS, &[(7, running)], &[], anyone);
        assert!(
            matches!(&found[..], [Finding::InProgress(stall)] if stall.duration_ns == 130 * MS),
            "{found:?}"
        );
        // Finished: 60 of 100 ms preempted is no stall; 40 of 140 is.
        let mut event = busy(8, 0, 100);
        event.preempted_ns = 60 * MS;
        assert!(detector.on_busy(50 * MS, &event, anyone).is_none());
        let mut event = busy(8, 200, 140);
        event.preempted_ns = 40 * MS;
        let Some(Finding::Finished { stall, .. }) = detector.on_busy(50 * MS, &event, anyone)
        else {
            panic!("held 100 ms");
        };
        assert_eq!(stall.duration_ns, 140 * MS, "wall-clock duration");
    }

    #[test]
    fn loop_threads_can_be_named() {
        assert!(name_matches("node", "node"));
        assert!(name_matches("tokio-*", "tokio-rt-worker"));
        assert!(!name_matches("node", "node-worker"));
        let mut detector = LoopDetector::new(vec!["python*".to_owned()]);
        let name = |tid: u32| if tid == 7 { "python3" } else { "worker" }.to_owned();
        assert!(detector.on_busy(50 * MS, &busy(7, 0, 100), name).is_some());
        assert!(detector.on_busy(50 * MS, &busy(8, 0, 100), name).is_none());
    }
}
