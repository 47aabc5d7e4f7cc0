//! Time the host took from the virtual machine (steal time) while a thread
//! of the target ran (issue #23).
//!
//! When the hypervisor does not run a vCPU, the guest sees no context
//! switch: the thread that was running simply resumes later, so a task
//! poll in flight looks that much longer, on CPU, and no `sched_switch`
//! told us to subtract anything. On a shared host this happens for tens
//! of milliseconds at a time (measured on these machines: `SCHED_FIFO` 99
//! watchers on both vCPUs woken 68-72 ms late at the same instant, with
//! steal ticks in `/proc/stat`), and it made the false-alarm soak report
//! 55-120 ms "on CPU" poll stalls of 1 ms polls.
//!
//! The guest kernel knows: with paravirtual steal time, the scheduler's
//! task clock leaves steal out, so `sched_stat_runtime`'s runtime (the
//! task clock between two updates of the running task) falls short of the
//! wall time between them by what the host took. The raw tracepoint
//! program adds that shortfall to the thread's `preempted_ns`, where it is
//! subtracted from the poll's (or busy stretch's) held time like any other
//! wait for a CPU.

/// A shortfall of runtime against wall time below this (ns) is not counted:
/// the scheduler's clock and `bpf_ktime_get_ns` are read a few µs apart,
/// and a real stall must never lose time to that skew. Host pauses that
/// matter last milliseconds.
pub const STEAL_FLOOR_NS: u64 = 1_000_000;

/// ns the host took from a thread that ran without a context switch from
/// `since_ns` (its last runtime update or its switch-in, whichever is later)
/// to `now_ns` and was given `runtime_ns` of task clock for it: the
/// shortfall, when at least [`STEAL_FLOOR_NS`], else 0.
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every scheduler clock update"
)]
#[inline(always)]
pub fn stolen_ns(since_ns: u64, now_ns: u64, runtime_ns: u64) -> u64 {
    let wall = now_ns.saturating_sub(since_ns);
    let shortfall = wall.saturating_sub(runtime_ns);
    if shortfall >= STEAL_FLOOR_NS {
        shortfall
    } else {
        0
    }
}

/// ns a CPU did not run from `since_ns` to `now_ns`, judged by its timer
/// interrupts: a CPU that runs a task takes one at least every `tick_ns`
/// (`NO_HZ_IDLE` stops the tick only when idle), so when its last one (or
/// the switch-in of the thread it runs, whichever is later) is more than a
/// tick and [`PAUSE_SLACK_NS`] back, the vCPU was not run on time, and all
/// but one tick of the gap is counted. This sees what steal time misses:
/// with nested virtualisation the outer host's pauses never reach the
/// guest's steal clock, so the task clock counts them as running.
/// Measured on these machines: in a 23 ms freeze of both vCPUs (`SCHED_FIFO`
/// 99 witnesses late on both) a spinning thread still made a system call
/// every 2-9 ms, each one a runtime update, yet took no timer interrupt;
/// and the host does not only stop a vCPU, it also runs it in slivers, its
/// timer interrupts 10-16 ms apart for 30 ms, each gap too short to look
/// like a stop. Every late interrupt is counted, so a crawl counts as
/// much as a stop. On a CPU that runs a task the tick is late by more
/// than 1 ms about once in a thousand ticks (measured with `perf` on a
/// spinning thread), so a real 300 ms spin loses well under a millisecond.
/// `tick_ns` 0 (`nohz_full`, where a CPU running one task stops its tick)
/// counts nothing.
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every timer interrupt"
)]
#[inline(always)]
pub fn paused_ns(since_ns: u64, now_ns: u64, tick_ns: u64) -> u64 {
    if tick_ns == 0 {
        return 0;
    }
    let gap = now_ns.saturating_sub(since_ns);
    if gap > tick_ns + PAUSE_SLACK_NS {
        gap - tick_ns
    } else {
        0
    }
}

/// How late (ns) a timer interrupt may come before the lateness counts as
/// a pause: ticks on a busy CPU come within this of their time, but for
/// about one in a thousand.
pub const PAUSE_SLACK_NS: u64 = 1_000_000;

/// Whether a thread in state `state` (`/proc/<pid>/task/<tid>/stat`'s
/// third field) on a CPU whose last timer interrupt came at `timer_ns`
/// (0: none seen) may have a pause not yet counted at `now_ns`: it is
/// runnable, and its CPU has not taken a timer interrupt for longer than
/// [`paused_ns`] allows. The interrupt that ends the pause counts it; a
/// judgement made before it would blame the pause on the thread.
pub fn pause_pending(state: char, timer_ns: u64, now_ns: u64, tick_ns: u64) -> bool {
    state == 'R' && timer_ns != 0 && paused_ns(timer_ns, now_ns, tick_ns) != 0
}

/// Where this kernel keeps the steal clock's last reading on each CPU's
/// run queue: byte offsets (from the kernel's BTF) of
/// `task_struct.se.cfs_rq`, `cfs_rq.rq`, `rq.prev_steal_time_rq` and
/// `rq.cpu`. The scheduler reads the paravirtual steal clock into
/// `prev_steal_time_rq` at every run-queue clock update (each context
/// switch, tick and wake-up), so at a context switch or after a timer
/// interrupt it is current: the steal a thread suffered while it ran is
/// its change from the switch-in to the switch-out. That is two reads
/// where the runtime updates (`sched_stat_runtime`, 40-50 runs a request
/// on dufs, each with its own clock read) were one program run each.
/// All 0: not known (no BTF, or a kernel without paravirtual steal time
/// accounting), and steal is found from the runtime updates instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RqSteal {
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub rq_steal: u32,
    pub rq_cpu: u32,
}

impl RqSteal {
    pub const UNKNOWN: Self = Self {
        task_cfs_rq: 0,
        cfs_rq_rq: 0,
        rq_steal: 0,
        rq_cpu: 0,
    };

    /// Whether the run queue's steal clock can be read (no member a
    /// struct's first: none of these is).
    #[expect(
        clippy::inline_always,
        reason = "the eBPF program asks on every context switch"
    )]
    #[inline(always)]
    pub const fn known(&self) -> bool {
        self.task_cfs_rq != 0 && self.cfs_rq_rq != 0 && self.rq_steal != 0
    }
}

/// Steal below this (ns) over one stretch on a CPU is left out: crediting
/// it costs a slot lookup, and a stall is judged in milliseconds. Unlike
/// [`STEAL_FLOOR_NS`] there is no clock skew to cover: both readings are
/// of the same clock.
pub const RQ_STEAL_FLOOR_NS: u64 = 50_000;

/// ns the steal clock moved from `mark_steal` (read at `mark_ns`, 0: no
/// reading) to `steal_now`, for the thread running on this CPU since
/// `since_ns`: 0 when the reading was made before that (it was another
/// thread's, or from before a switch), or the move is below
/// [`RQ_STEAL_FLOOR_NS`].
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on target threads' switches and ticks"
)]
#[inline(always)]
pub fn steal_since(mark_steal: u64, mark_ns: u64, since_ns: u64, steal_now: u64) -> u64 {
    if mark_ns == 0 || mark_ns < since_ns {
        return 0;
    }
    let stolen = steal_now.saturating_sub(mark_steal);
    if stolen >= RQ_STEAL_FLOOR_NS {
        stolen
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_counts_from_a_reading_made_while_the_thread_ran() {
        // Read at its switch-in (10 ms), 5 ms of steal since.
        assert_eq!(steal_since(7 * MS, 10 * MS, 10 * MS, 12 * MS), 5 * MS);
        // Read at a tick during its run.
        assert_eq!(steal_since(7 * MS, 14 * MS, 10 * MS, 9 * MS), 2 * MS);
    }

    #[test]
    fn a_reading_from_before_the_thread_ran_counts_nothing() {
        // Another thread's, or none at all.
        assert_eq!(steal_since(7 * MS, 9 * MS, 10 * MS, 20 * MS), 0);
        assert_eq!(steal_since(0, 0, 10 * MS, 20 * MS), 0);
    }

    #[test]
    fn specks_of_steal_are_left_out() {
        assert_eq!(steal_since(MS, 10 * MS, 10 * MS, MS + 49_999), 0);
        assert_eq!(steal_since(MS, 10 * MS, 10 * MS, MS + 50_000), 50_000);
        // A clock that went back (it does not) counts nothing.
        assert_eq!(steal_since(5 * MS, 10 * MS, 10 * MS, MS), 0);
    }

    #[test]
    fn offsets_are_known_only_when_all_were_found() {
        assert!(!RqSteal::UNKNOWN.known());
        let found = RqSteal {
            task_cfs_rq: 200,
            cfs_rq_rq: 304,
            rq_steal: 3000,
            rq_cpu: 2900,
        };
        assert!(found.known());
        assert!(
            !RqSteal {
                rq_steal: 0,
                ..found
            }
            .known()
        );
    }

    const TICK: u64 = 4 * MS;

    #[test]
    fn ticks_that_stop_while_a_thread_runs_are_a_pause() {
        // 70 ms without a tick, all of it given as runtime (the steal
        // clock was not told): all but one tick was a pause.
        assert_eq!(paused_ns(100 * MS, 170 * MS, TICK), 66 * MS);
    }

    #[test]
    fn a_tick_on_time_is_not_a_pause() {
        // On time, or late by up to the slack: a real spin loses nothing.
        assert_eq!(paused_ns(100 * MS, 104 * MS, TICK), 0);
        assert_eq!(paused_ns(100 * MS, 105 * MS, TICK), 0);
        // At HZ=1000 the same slack.
        assert_eq!(paused_ns(100 * MS, 102 * MS, MS), 0);
        assert_eq!(paused_ns(100 * MS, 120 * MS, MS), 19 * MS);
    }

    #[test]
    fn a_crawl_counts_as_much_as_a_stop() {
        // Interrupts 10 and 16 ms apart (the host ran the vCPU in slivers):
        // each gap less one tick.
        assert_eq!(paused_ns(100 * MS, 110 * MS, TICK), 6 * MS);
        assert_eq!(paused_ns(110 * MS, 126 * MS, TICK), 12 * MS);
    }

    #[test]
    fn without_a_steady_tick_nothing_is_judged_a_pause() {
        assert_eq!(paused_ns(100 * MS, 900 * MS, 0), 0);
    }

    #[test]
    fn a_running_thread_whose_cpu_missed_its_interrupts_has_a_pause_pending() {
        // Its CPU's last timer interrupt 20 ms ago: the pause is not
        // counted yet.
        assert!(pause_pending('R', 100 * MS, 120 * MS, TICK));
        // 4 ms ago: a healthy CPU.
        assert!(!pause_pending('R', 116 * MS, 120 * MS, TICK));
        assert!(pause_pending('R', 114 * MS, 120 * MS, TICK));
        // Asleep: its CPU may well be idle, without a tick.
        assert!(!pause_pending('S', 100 * MS, 120 * MS, TICK));
        // No interrupt seen yet, or no steady tick: nothing is judged.
        assert!(!pause_pending('R', 0, 120 * MS, TICK));
        assert!(!pause_pending('R', 100 * MS, 120 * MS, 0));
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_host_pause_is_the_shortfall_of_runtime() {
        // Ran 4 ms of wall time between two ticks, 70 ms more while the
        // vCPU was not run: the task clock gave it 4 ms.
        assert_eq!(stolen_ns(100 * MS, 174 * MS, 4 * MS), 70 * MS);
    }

    #[test]
    fn clock_skew_under_the_floor_is_not_stolen_time() {
        assert_eq!(stolen_ns(100 * MS, 104 * MS, 4 * MS - 20_000), 0);
        assert_eq!(stolen_ns(100 * MS, 104 * MS, 4 * MS - (MS - 1)), 0);
        assert_eq!(stolen_ns(100 * MS, 105 * MS, 4 * MS), MS);
    }

    #[test]
    fn more_runtime_than_wall_time_is_nothing_stolen() {
        // The task clock was read before our own clock at switch-in.
        assert_eq!(stolen_ns(100 * MS, 104 * MS, 4 * MS + 30_000), 0);
        // A mark from the future (another CPU's clock) is harmless too.
        assert_eq!(stolen_ns(105 * MS, 104 * MS, 0), 0);
    }
}
