//! The host's clock tick, for the rule that tells a paused vCPU from a
//! running thread by its missing ticks (`loopguard_common::steal::paused_ns`).
//!
//! The rule holds only where a CPU that runs a task ticks steadily: true
//! with `NO_HZ_IDLE` (the default), false on `nohz_full` CPUs, which stop
//! the tick while one task runs. Where any CPU is `nohz_full` the rule is
//! off (tick 0), and a host pause there counts only as far as the steal
//! clock tells.

use std::fs;

/// Where the kernel lists its `nohz_full` CPUs (absent or empty: none).
const NOHZ_FULL: &str = "/sys/devices/system/cpu/nohz_full";

/// ns of the tick to judge pauses by, 0 when the rule must stay off.
pub fn steady_tick_ns() -> u64 {
    let nohz_full = fs::read_to_string(NOHZ_FULL).unwrap_or_default();
    if stops_tick_while_running(&nohz_full) {
        tracing::info!(
            nohz_full = nohz_full.trim(),
            "nohz_full CPUs stop their tick: host pauses count only as steal time"
        );
        return 0;
    }
    coarse_tick_ns()
}

/// The resolution of `CLOCK_MONOTONIC_COARSE` (one timer tick), how far
/// behind the monotonic clock the middleware's times may be.
pub fn coarse_tick_ns() -> u64 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) } == 0;
    if ok {
        u64::try_from(res.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(res.tv_nsec).unwrap_or(0)
    } else {
        // The longest tick Linux has (HZ=100).
        10_000_000
    }
}

/// Whether `/sys/devices/system/cpu/nohz_full` lists any CPU: "(null)"
/// or nothing means none.
pub fn stops_tick_while_running(nohz_full: &str) -> bool {
    let listed = nohz_full.trim();
    !(listed.is_empty() || listed == "(null)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_cpu_stops_the_tick() {
        assert!(!stops_tick_while_running(""));
        assert!(!stops_tick_while_running("(null)\n"));
        assert!(stops_tick_while_running("1-3\n"));
        assert!(stops_tick_while_running("2"));
    }
}
