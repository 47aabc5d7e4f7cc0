//! Verdicts held back while a pause of the virtual machine may still be
//! uncounted (issue #23).
//!
//! A pause the steal clock never hears of is counted by the timer
//! interrupt that ends it (`cpu_timer`, `loopguard_common::steal`). After
//! a whole-VM freeze the agent's CPU may resume and scan before the CPU of
//! a thread stuck in the same freeze takes that interrupt; its poll then
//! looks as long as the freeze, all of it held. CI saw that as a 24 ms
//! `stall_in_progress` of a 1 ms poll, whose finished poll (counted by
//! then) was no stall at all. So a thread whose poll or busy stretch is
//! as long as the threshold, which is runnable, and whose CPU has not
//! taken a timer interrupt for longer than a pause allows, is left out of
//! that scan's verdicts; the next scan, a few ms on, sees it counted.

use std::collections::HashSet;

use loopguard_common::steal::pause_pending;

use crate::collect::Collector;
use crate::discover::proc;

pub(super) struct Pauses {
    /// The steady tick (0: pauses are not judged by timer interrupts).
    tick_ns: u64,
}

impl Pauses {
    pub(super) fn new() -> Self {
        Self {
            tick_ns: crate::discover::tick::steady_tick_ns(),
        }
    }

    /// Of `candidates` (threads of `pid` in a poll or stretch as long as
    /// the threshold), those to leave out of this scan's
    /// verdicts. Reads the timer marks (one lookup) and each candidate's
    /// `/proc` stat only when there are candidates.
    pub(super) fn pending(
        &self,
        collector: &Collector,
        pid: u32,
        now_ns: u64,
        candidates: &[u32],
    ) -> HashSet<u32> {
        if self.tick_ns == 0 || candidates.is_empty() {
            return HashSet::new();
        }
        let timers = collector.timer_interrupts();
        let pending: HashSet<u32> = candidates
            .iter()
            .copied()
            .filter(|&tid| {
                proc::thread_state_cpu(pid, tid).is_some_and(|(state, cpu)| {
                    let timer_ns = timers.get(cpu).copied().unwrap_or(0);
                    pause_pending(state, timer_ns, now_ns, self.tick_ns)
                })
            })
            .collect();
        if !pending.is_empty() {
            tracing::debug!(
                threads = ?pending,
                "their CPU has not taken a timer interrupt for longer than a pause allows: verdicts wait for it"
            );
        }
        pending
    }
}
