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

#[cfg(test)]
mod tests {
    use super::*;

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
