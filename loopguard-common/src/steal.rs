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

/// ns the vCPU did not run while a thread ran on it without a context
/// switch from `since_ns` to `now_ns`, judged by the clock tick: a CPU
/// that runs a task ticks every `tick_ns` (`NO_HZ_IDLE` stops the tick only
/// when idle), and every tick updates the running task's runtime. Updates
/// [`PAUSE_TICKS`] ticks apart (and at least [`PAUSE_FLOOR_NS`]) mean the
/// CPU did not tick: the vCPU was not run. All but one tick of the gap is
/// counted. This sees what steal time misses: with nested virtualisation
/// the outer host's pauses never reach the guest's steal clock, so the
/// task clock counts them as running. `tick_ns` 0 (`nohz_full`, where a
/// CPU running one task stops its tick) counts nothing.
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every scheduler clock update"
)]
#[inline(always)]
pub fn paused_ns(since_ns: u64, now_ns: u64, tick_ns: u64) -> u64 {
    if tick_ns == 0 {
        return 0;
    }
    let gap = now_ns.saturating_sub(since_ns);
    // (No overflow check: eBPF has no 128-bit multiply, and a tick is
    // milliseconds.)
    let at_least = tick_ns.wrapping_mul(PAUSE_TICKS).max(PAUSE_FLOOR_NS);
    if gap >= at_least { gap - tick_ns } else { 0 }
}

/// Runtime updates this many ticks apart mean the vCPU was paused: a tick
/// may be late (on these VMs by a millisecond or two), never by two.
pub const PAUSE_TICKS: u64 = 3;

/// ...and at least this far apart (ns), whatever the tick: at `HZ=1000` a
/// late tick is not a pause.
pub const PAUSE_FLOOR_NS: u64 = 10_000_000;

/// ns a thread that ran without a context switch did not really run, at
/// `now_ns`: the larger of what the steal clock knew ([`stolen_ns`], over
/// the `runtime_ns` of task clock given since `updated_ns`, its last
/// runtime update from any CPU) and what the missing ticks tell
/// ([`paused_ns`], since `ticked_ns`, its last update made by its own
/// CPU). They overlap (a pause the guest was told of is both), so the
/// larger, not the sum.
///
/// Two marks, because another CPU updates a running thread's clock too (a
/// wakeup aimed at its run queue checks it): that update takes the
/// runtime so far, so the shortfall must be measured from it, yet it says
/// nothing of whether the thread's own CPU ticked. A vCPU paused while the
/// other vCPU sends it wakeups every few ms is still paused; measured from
/// the last remote update, its pause looked like a late tick (a 35 ms
/// freeze counted as 12 ms in CI).
#[expect(
    clippy::inline_always,
    reason = "the eBPF program calls it on every scheduler clock update"
)]
#[inline(always)]
pub fn lost_ns(updated_ns: u64, ticked_ns: u64, now_ns: u64, runtime_ns: u64, tick_ns: u64) -> u64 {
    stolen_ns(updated_ns, now_ns, runtime_ns).max(paused_ns(ticked_ns, now_ns, tick_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: u64 = 4 * MS;

    #[test]
    fn ticks_that_stop_while_a_thread_runs_are_a_pause() {
        // 70 ms without a tick, all of it given as runtime (the steal
        // clock was not told): all but one tick was a pause.
        assert_eq!(paused_ns(100 * MS, 170 * MS, TICK), 66 * MS);
        assert_eq!(
            lost_ns(100 * MS, 100 * MS, 170 * MS, 70 * MS, TICK),
            66 * MS
        );
    }

    #[test]
    fn late_ticks_are_not_a_pause() {
        // A tick on time, one a few ms late: a real 250 ms spin loses
        // nothing.
        assert_eq!(paused_ns(100 * MS, 104 * MS, TICK), 0);
        assert_eq!(paused_ns(100 * MS, 109 * MS, TICK), 0);
        // At HZ=1000, 3 ticks is 3 ms: the floor keeps 9 ms uncounted.
        assert_eq!(paused_ns(100 * MS, 109 * MS, MS), 0);
        assert_eq!(paused_ns(100 * MS, 120 * MS, MS), 19 * MS);
    }

    #[test]
    fn without_a_steady_tick_nothing_is_judged_a_pause() {
        assert_eq!(paused_ns(100 * MS, 900 * MS, 0), 0);
    }

    #[test]
    fn a_pause_the_steal_clock_knew_of_is_not_counted_twice() {
        // 70 ms gap, the guest was told of 66 ms of steal: 66, not 132.
        assert_eq!(lost_ns(100 * MS, 100 * MS, 170 * MS, 4 * MS, TICK), 66 * MS);
        // Told of more than the ticks show: the steal clock wins.
        assert_eq!(lost_ns(100 * MS, 100 * MS, 108 * MS, 2 * MS, TICK), 6 * MS);
    }

    #[test]
    fn updates_from_another_cpu_do_not_hide_a_pause() {
        // Ticked at 100 ms, then its vCPU stood still until 152 ms while
        // the other vCPU's wakeups updated its clock at 110, 120, 130 and
        // 140 ms (each taking the runtime so far): measured from the last
        // of them the gap is 12 ms, yet its own CPU has not ticked for 52.
        assert_eq!(
            lost_ns(140 * MS, 100 * MS, 152 * MS, 12 * MS, TICK),
            48 * MS
        );
        // A healthy spin: its CPU ticked 4 ms ago, another CPU looked 1 ms
        // ago, nothing is lost.
        assert_eq!(lost_ns(103 * MS, 100 * MS, 104 * MS, MS, TICK), 0);
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
