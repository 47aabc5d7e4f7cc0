//! The wait for a CPU after a wake-up (`loopguard_common::wakeup`): a
//! thread of the target that `sched_switch` takes off its CPU asleep inside
//! a task poll or a busy stretch is noted by task pointer ([`note_sleep`]);
//! `thread_wakeup` (raw tracepoint `sched_wakeup`, run by the waker) dates
//! its wake-up; the switch that puts it back on a CPU ([`switch_in`]) adds
//! the time in between to its `preempted_ns`, where it is subtracted from
//! the poll's (and the stretch's) held time like a preemption.
//!
//! Every wake-up on the host runs `thread_wakeup`; it reads one array
//! value and returns unless a sleeper of the target falls in the woken
//! task's bucket, as [`crate::wait`]'s switch-in does.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_current_task},
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap},
    programs::RawTracePointContext,
};
use loopguard_common::{
    MAX_POLL_DEPTH,
    slots::MAX_THREAD_SLOTS,
    task_filter,
    wakeup::{counts_sleep, run_queue_wait_ns},
};

use crate::{frame_index, slots};

/// A thread asleep inside a poll or a busy stretch.
#[derive(Clone, Copy)]
#[repr(C)]
struct Sleeper {
    /// ns of its wake-up (`sched_wakeup`), 0 until then.
    woken_ns: u64,
    tid: u32,
    slot: u32,
}

/// Sleepers by task pointer ([`note_sleep`]), until switched back in.
#[map]
static SLEEPERS: HashMap<u64, Sleeper> = HashMap::with_max_entries(MAX_THREAD_SLOTS, 0);

/// How many [`SLEEPERS`] fall in each bucket of task pointers
/// ([`crate::task_filter`]): a wake-up or a switch in looks the hash map
/// up only when its bucket is not empty.
#[map]
static SLEEPER_FILTER: Array<u64> = Array::with_max_entries(task_filter::BUCKETS, 0);

/// Run as thread `tid` of the target (slot `slot`), which `sched_switch`
/// takes off its CPU asleep: noted when it sleeps inside a task poll or a
/// busy stretch, so its wake-up and the wait after it are seen.
#[inline(always)]
pub(crate) fn note_sleep(slot: u32, tid: u32) {
    let (depth, innermost_flags) = match slots::peek_polls(slot, tid) {
        Some(polls) if polls.depth > 0 && polls.depth as usize <= MAX_POLL_DEPTH => {
            let flags = polls
                .frames
                .get(frame_index(polls.depth as usize - 1))
                .map_or(0, |frame| frame.flags);
            (polls.depth, flags)
        }
        _ => (0, 0),
    };
    let loop_busy = slots::peek_loops(slot, tid)
        .is_some_and(|state| state.depth == 0 && state.busy_start_ns != 0);
    if !counts_sleep(depth, innermost_flags, loop_busy) {
        return;
    }
    // SAFETY: the helper returns the current task's address.
    let task = unsafe { bpf_get_current_task() };
    let sleeper = Sleeper {
        woken_ns: 0,
        tid,
        slot,
    };
    if SLEEPERS
        .insert(task, sleeper, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        crate::task_filter::added(&SLEEPER_FILTER, task);
    }
}

/// `sched_wakeup(p)`, run by the waker: a sleeper's wake-up is dated.
#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn thread_wakeup(ctx: RawTracePointContext) -> i32 {
    if crate::empty_programs() {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    if !crate::task_filter::may_hold(&SLEEPER_FILTER, task) {
        return 0;
    }
    if let Some(sleeper) = SLEEPERS.get_ptr_mut(task) {
        // SAFETY: a valid map value pointer; only the first wake-up counts.
        unsafe {
            if core::ptr::read_volatile(&raw const (*sleeper).woken_ns) == 0 {
                core::ptr::write_volatile(&raw mut (*sleeper).woken_ns, bpf_ktime_get_ns());
            }
        }
    }
    0
}

/// `sched_switch` puts task `next` on this CPU at `now`: a sleeper's wait
/// since its wake-up is added to its `preempted_ns`, of its innermost poll
/// and of its busy stretch (at most the time each has run).
#[inline(always)]
pub(crate) fn switch_in(next: u64, now: u64) {
    if !crate::task_filter::may_hold(&SLEEPER_FILTER, next) {
        return;
    }
    // SAFETY: a read-only look at the map value.
    let Some(&sleeper) = (unsafe { SLEEPERS.get(next) }) else {
        return;
    };
    if SLEEPERS.remove(next).is_err() {
        return;
    }
    crate::task_filter::removed(&SLEEPER_FILTER, next);
    let wait = run_queue_wait_ns(sleeper.woken_ns, now);
    if wait == 0 {
        return;
    }
    let Sleeper { tid, slot, .. } = sleeper;
    crate::stacks::note_woken(tid, sleeper.woken_ns);
    // `next` runs nowhere now: no program of its own writes its slot
    // meanwhile, so these write sections are the only ones.
    if slots::peek_polls(slot, tid).is_some_and(|polls| polls.depth > 0)
        && let Some(mut polls) = slots::polls_mut(slot, tid, false)
    {
        let depth = polls.depth as usize;
        if depth > 0
            && depth <= MAX_POLL_DEPTH
            && let Some(frame) = polls.frames.get(frame_index(depth - 1))
        {
            let since_start = now.saturating_sub(frame.start_ns);
            polls.preempted_ns += wait.min(since_start);
        }
    }
    if slots::peek_loops(slot, tid)
        .is_some_and(|state| state.depth == 0 && state.busy_start_ns != 0)
        && let Some(mut state) = slots::loops_mut(slot, tid, false)
    {
        let since_start = now.saturating_sub(state.busy_start_ns);
        state.preempted_ns += wait.min(since_start);
    }
}
