//! The wait for a CPU after a wake-up (issue #23): a thread of the target
//! that went to sleep inside a task poll (a `std::thread::sleep`, a lock,
//! a disk read) or inside a busy stretch of its event loop is woken, then
//! sits on the run queue until a CPU is free. That wait is the scheduler's,
//! like a preemption: the poll's own code had finished waiting. On a
//! loaded machine it is tens of milliseconds (measured: a 100 ms sleep
//! held its worker 114.7 ms at load 11, 14 ms of it runnable but not
//! running), so it is left out of the held time the rules judge.
//!
//! The kernel side notes such a sleep when `sched_switch` takes the thread
//! off its CPU asleep ([`counts_sleep`]), dates its wake-up on
//! `sched_wakeup`, and at the switch back in adds [`run_queue_wait_ns`] to
//! the thread's `preempted_ns`. The stack capture splits the same sleep
//! into time asleep and time waiting ([`split_sleep`]), so a stall's
//! `cause.cpu_wait_ms` holds that wait and `off_cpu_ms` does not.

use crate::frame_flags;

/// Whether a thread going to sleep has a wait after its wake-up that
/// counts: its innermost poll in flight is a task poll (`depth` polls in
/// flight, the innermost with `innermost_flags`; not a scheduler loop
/// that contains task polls, which sleeps when its worker parks, nor
/// blocking-pool work), or its event loop is in a busy stretch
/// (`loop_busy`).
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every context switch of the target"
)]
#[inline(always)]
pub fn counts_sleep(depth: u32, innermost_flags: u32, loop_busy: bool) -> bool {
    (depth > 0 && frame_flags::is_task_poll(innermost_flags)) || loop_busy
}

/// ns a thread woken at `woken_ns` (0: its wake-up was not seen) waited
/// for a CPU before it was switched back in at `switched_in_ns`.
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every switch in of a sleeper"
)]
#[inline(always)]
pub fn run_queue_wait_ns(woken_ns: u64, switched_in_ns: u64) -> u64 {
    if woken_ns == 0 {
        return 0;
    }
    switched_in_ns.saturating_sub(woken_ns)
}

/// A sleep that began at `out_ns` and ended with the switch back in at
/// `in_ns`, its wake-up seen at `woken_ns` (0: not seen): `(asleep,
/// waited)`, the ns asleep and the ns runnable waiting for a CPU after the
/// wake-up. A wake-up outside the interval (a stale one) is not used.
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every switch in of a sleeper"
)]
#[inline(always)]
pub fn split_sleep(out_ns: u64, woken_ns: u64, in_ns: u64) -> (u64, u64) {
    let interval = in_ns.saturating_sub(out_ns);
    if woken_ns <= out_ns || woken_ns > in_ns {
        return (interval, 0);
    }
    (woken_ns - out_ns, in_ns - woken_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_sleep_inside_a_task_poll_counts() {
        assert!(counts_sleep(1, 0, false));
        assert!(counts_sleep(2, frame_flags::NO_TASK_ID, false));
    }

    #[test]
    fn a_parked_worker_or_blocking_pool_work_does_not() {
        // The worker loop (a poll that contains task polls) parks asleep.
        assert!(!counts_sleep(1, frame_flags::CONTAINER, false));
        assert!(!counts_sleep(1, frame_flags::BLOCKING, false));
        // No poll and no busy stretch: the thread waits for events.
        assert!(!counts_sleep(0, 0, false));
    }

    #[test]
    fn a_sleep_inside_a_busy_stretch_counts() {
        // A `block_on` body or a Python loop blocking outside any task poll.
        assert!(counts_sleep(0, 0, true));
        assert!(counts_sleep(1, frame_flags::CONTAINER, true));
    }

    #[test]
    fn the_wait_runs_from_the_wake_up_to_the_switch_in() {
        assert_eq!(run_queue_wait_ns(100 * MS, 114 * MS), 14 * MS);
        assert_eq!(run_queue_wait_ns(100 * MS, 100 * MS), 0);
    }

    #[test]
    fn a_sleep_splits_at_its_wake_up() {
        assert_eq!(
            split_sleep(10 * MS, 110 * MS, 124 * MS),
            (100 * MS, 14 * MS)
        );
        assert_eq!(split_sleep(10 * MS, 124 * MS, 124 * MS), (114 * MS, 0));
    }

    #[test]
    fn a_wake_up_outside_the_sleep_is_not_used() {
        // Not seen, or left from an earlier sleep.
        assert_eq!(split_sleep(10 * MS, 0, 124 * MS), (114 * MS, 0));
        assert_eq!(split_sleep(10 * MS, 5 * MS, 124 * MS), (114 * MS, 0));
        assert_eq!(split_sleep(10 * MS, 10 * MS, 124 * MS), (114 * MS, 0));
        // From another CPU's clock, a little after the switch in.
        assert_eq!(split_sleep(10 * MS, 125 * MS, 124 * MS), (114 * MS, 0));
    }

    #[test]
    fn an_unseen_or_later_wake_up_is_no_wait() {
        assert_eq!(run_queue_wait_ns(0, 114 * MS), 0);
        // Another CPU's clock a little ahead.
        assert_eq!(run_queue_wait_ns(115 * MS, 114 * MS), 0);
    }
}
