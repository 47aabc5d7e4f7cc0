//! Live values for the metrics, from the kernel's per-thread poll stacks:
//! which polls are stuck past the threshold right now, and how busy each
//! worker thread was since the last refresh.

use std::collections::HashMap;

use loopguard_common::ThreadPolls;

use super::metrics::ThreadBusy;

/// How many task polls have held their thread at least `threshold_ns` at
/// `now_ns` without returning (held time, as the stall detector counts it:
/// preempted waits left out), and the longest such hold.
pub fn stuck_polls(now_ns: u64, threshold_ns: u64, threads: &[(u32, ThreadPolls)]) -> (u32, u64) {
    threads
        .iter()
        .filter_map(|(_, polls)| {
            polls
                .innermost_task_poll()
                .map(|frame| polls.held_so_far_ns(now_ns, frame))
        })
        .filter(|&elapsed| elapsed >= threshold_ns)
        .fold((0, 0), |(count, longest), elapsed| {
            (count + 1, longest.max(elapsed))
        })
}

/// Busy ratios are measured over at least this long (ns): shorter windows
/// swing between 0 and 1 with every poll.
pub const BUSY_WINDOW_NS: u64 = 1_000_000_000;

/// Busy time per worker thread, as a ratio over the last window.
#[derive(Debug, Default)]
pub struct BusyTracker {
    /// tid → (busy ns including the poll in flight, when it was read) at
    /// the start of the current window.
    window_start: HashMap<u32, (u64, u64)>,
    /// The ratios of the last full window.
    last: Vec<ThreadBusy>,
}

impl BusyTracker {
    /// The share of the last window (at least [`BUSY_WINDOW_NS`]) each
    /// thread that has run task polls spent inside them; between windows,
    /// the last one's figures. The poll in flight counts up to now, so a
    /// thread stuck in one poll reads as fully busy while it is stuck.
    /// `name` gives a thread's name.
    pub fn update(
        &mut self,
        now_ns: u64,
        threads: &[(u32, ThreadPolls)],
        name: impl FnMut(u32) -> String,
    ) -> Vec<ThreadBusy> {
        let totals = threads.iter().filter_map(|(tid, polls)| {
            let in_flight = polls
                .innermost_task_poll()
                .map_or(0, |frame| now_ns.saturating_sub(frame.start_ns));
            (polls.task_polls > 0 || in_flight > 0).then_some((*tid, polls.busy_ns + in_flight))
        });
        self.update_totals(now_ns, totals, name)
    }

    /// Like [`Self::update`], from each thread's busy total (ns) now.
    pub fn update_totals(
        &mut self,
        now_ns: u64,
        totals: impl Iterator<Item = (u32, u64)>,
        mut name: impl FnMut(u32) -> String,
    ) -> Vec<ThreadBusy> {
        let window_over = self
            .window_start
            .values()
            .next()
            .is_none_or(|&(_, then)| now_ns.saturating_sub(then) >= BUSY_WINDOW_NS);
        if !window_over {
            return self.last.clone();
        }
        let mut busy = Vec::new();
        let mut seen = HashMap::new();
        for (tid, total) in totals {
            seen.insert(tid, (total, now_ns));
            let Some(&(before, then)) = self.window_start.get(&tid) else {
                continue;
            };
            let wall = now_ns.saturating_sub(then);
            if wall == 0 {
                continue;
            }
            let ratio = (total.saturating_sub(before) as f64 / wall as f64).clamp(0.0, 1.0);
            busy.push(ThreadBusy {
                tid,
                name: name(tid),
                ratio,
            });
        }
        // Threads gone from the map have exited: they drop out of the metric.
        self.window_start = seen;
        busy.sort_by_key(|thread| thread.tid);
        self.last.clone_from(&busy);
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopguard_common::{PollFrame, frame_flags};

    const MS: u64 = 1_000_000;

    fn thread(busy_ms: u64, polls: u64, in_flight_from_ms: Option<(u64, u32)>) -> ThreadPolls {
        let mut stack = ThreadPolls {
            busy_ns: busy_ms * MS,
            task_polls: polls,
            ..ThreadPolls::default()
        };
        if let Some((start_ms, flags)) = in_flight_from_ms {
            stack.depth = 1;
            stack.frames[0] = PollFrame {
                start_ns: start_ms * MS,
                flags,
                ..PollFrame::default()
            };
        }
        stack
    }

    #[test]
    fn only_task_polls_past_the_threshold_are_stuck() {
        let threads = [
            (1, thread(0, 1, Some((0, 0)))),
            (2, thread(0, 1, Some((900, 0)))),
            (3, thread(0, 1, Some((0, frame_flags::CONTAINER)))),
            (4, thread(0, 1, Some((0, frame_flags::BLOCKING)))),
            (5, thread(0, 1, None)),
        ];
        assert_eq!(stuck_polls(1000 * MS, 200 * MS, &threads), (1, 1000 * MS));
        assert_eq!(stuck_polls(1000 * MS, 50 * MS, &threads), (2, 1000 * MS));
        assert_eq!(stuck_polls(1000 * MS, 2000 * MS, &threads), (0, 0));
    }

    #[test]
    fn a_stuck_poll_is_held_time_as_the_detector_counts_it() {
        // In flight for 1000 ms, 700 of them switched out runnable: held 300.
        let mut preempted = thread(0, 1, Some((0, 0)));
        preempted.preempted_ns = 700 * MS;
        let threads = [(1, preempted)];
        assert_eq!(stuck_polls(1000 * MS, 200 * MS, &threads), (1, 300 * MS));
        assert_eq!(stuck_polls(1000 * MS, 500 * MS, &threads), (0, 0));
        let mut detector = crate::detect::stall::StallDetector::new(500 * MS);
        assert!(detector.on_snapshot(1000 * MS, &threads).is_empty());
    }

    #[test]
    fn busy_is_the_share_of_the_interval_in_task_polls() {
        let mut tracker = BusyTracker::default();
        let name = |tid: u32| format!("worker-{tid}");
        assert!(
            tracker
                .update(1000 * MS, &[(1, thread(100, 10, None))], name)
                .is_empty(),
            "the first read has no interval"
        );
        assert!(
            tracker
                .update(1500 * MS, &[(1, thread(200, 15, None))], name)
                .is_empty(),
            "no window has ended yet"
        );
        let busy = tracker.update(2000 * MS, &[(1, thread(350, 20, None))], name);
        assert_eq!(busy.len(), 1);
        assert!((busy[0].ratio - 0.25).abs() < 1e-9, "{busy:?}");
        assert_eq!(busy[0].name, "worker-1");
    }

    #[test]
    fn a_thread_stuck_in_one_poll_is_fully_busy() {
        let mut tracker = BusyTracker::default();
        let name = |_| String::new();
        tracker.update(1000 * MS, &[(1, thread(0, 5, Some((900, 0))))], name);
        let busy = tracker.update(2000 * MS, &[(1, thread(0, 5, Some((900, 0))))], name);
        assert!((busy[0].ratio - 1.0).abs() < 1e-9, "{busy:?}");
        // The poll returns: its time moves into busy_ns, nothing is counted twice.
        let busy = tracker.update(3000 * MS, &[(1, thread(2100, 6, None))], name);
        assert!((busy[0].ratio - 1.0).abs() < 1e-9, "{busy:?}");
        let busy = tracker.update(4000 * MS, &[(1, thread(2100, 6, None))], name);
        assert!(busy[0].ratio.abs() < 1e-9, "{busy:?}");
    }

    #[test]
    fn threads_that_never_polled_a_task_are_left_out() {
        let mut tracker = BusyTracker::default();
        tracker.update(0, &[(1, thread(0, 0, None))], |_| String::new());
        assert!(
            tracker
                .update(MS, &[(1, thread(0, 0, None))], |_| String::new())
                .is_empty()
        );
    }
}
