//! `thread_runtime` (raw tracepoint `sched_stat_runtime`): time the host
//! took from the vCPU while a thread of the target ran inside a poll or a
//! busy stretch, as far as the steal clock tells, counted with its
//! preemptions so the poll is judged by the time it really held its thread
//! (issue #23, `loopguard_common::steal`).
//!
//! `sched_stat_runtime(task, runtime)` fires whenever the scheduler updates
//! the running task's clock (every tick, every switch out, wakeup checks),
//! with the task clock it ran since the previous update; that clock leaves
//! steal time out. The wall time since that previous update, less the
//! runtime, is what the host took. The previous update may have been made
//! from another CPU (a wakeup checks the remote CPU's running task), so
//! every update of a target thread, wherever it runs, moves its mark.
//!
//! `cpu_timer` (raw tracepoint `local_timer_entry`, every local APIC timer
//! interrupt): a pause the steal clock never heard of (nested
//! virtualisation), seen as timer interrupts that did not come
//! (`loopguard_common::steal::paused_ns`). Runtime updates cannot tell:
//! a thread's own system calls update its clock too, and CI saw a vCPU
//! that took no interrupt for 23 ms still make one every few ms. Whichever
//! of the two programs counts a pause first moves the other's mark, so it
//! is not counted twice.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_current_task},
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use loopguard_common::{
    MAX_POLL_DEPTH,
    slots::MAX_THREAD_SLOTS,
    steal::{paused_ns, stolen_ns},
    task_filter,
};

use crate::{frame_index, last_switch_ns, slots, target_tgid, tick_ns};

/// `task_struct` address of each target thread seen running → ns of its
/// last runtime update. Entries are made by the thread itself (a pointer
/// the program reads as current), and removed when it exits.
#[map]
static RUNTIME_MARKS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_THREAD_SLOTS, 0);

/// Entries of [`RUNTIME_MARKS`] per bucket of task pointers
/// ([`crate::task_filter`]): every runtime update of every task on the host
/// runs [`thread_runtime`], and only a target thread's needs the hash map.
#[map]
static RUNTIME_FILTER: Array<u64> = Array::with_max_entries(task_filter::BUCKETS, 0);

/// Per CPU, ns of its last local timer interrupt (0: none seen); the agent
/// reads it too, to hold back a verdict on a thread whose CPU has not yet
/// taken the interrupt that would count its pause.
#[map]
static CPU_TIMER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A local timer interrupt on this CPU: when a target thread was running
/// and the CPU's previous interrupt (or the thread's switch-in) is
/// [`paused_ns`] back, the vCPU was not run meanwhile; that time is a wait
/// for a CPU of the thread's poll and busy stretch.
#[raw_tracepoint(tracepoint = "local_timer_entry")]
pub fn cpu_timer(_ctx: RawTracePointContext) -> i32 {
    if crate::empty_programs() {
        return 0;
    }
    let Some(mark) = CPU_TIMER.get_ptr_mut(0) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU map value pointer; only this CPU writes it.
    let previous = unsafe { core::ptr::replace(mark, now) };
    let pid_tgid = bpf_get_current_pid_tgid();
    if previous == 0 || (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    let paused = paused_ns(previous.max(last_switch_ns()), now, tick_ns());
    if paused != 0 {
        lost(pid_tgid as u32, paused, now);
        // The runtime update of this same tick would find the pause again
        // as a shortfall when the steal clock knew of it.
        // SAFETY: the helper has no preconditions.
        let task = unsafe { bpf_get_current_task() };
        if let Some(runtime_mark) = RUNTIME_MARKS.get_ptr_mut(task) {
            // SAFETY: a valid map value pointer.
            unsafe { core::ptr::write_volatile(runtime_mark, now) };
        }
    }
    0
}

#[raw_tracepoint(tracepoint = "sched_stat_runtime")]
pub fn thread_runtime(ctx: RawTracePointContext) -> i32 {
    if crate::empty_programs() {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    // SAFETY: the helper has no preconditions.
    let current = unsafe { bpf_get_current_task() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let ours = (pid_tgid >> 32) as u32 == target_tgid();
    if task == current && !ours {
        // A thread of another process updating its own clock: it has no
        // mark (only a target thread makes one, for itself). Every other
        // process on the host comes here on every tick and switch, once
        // per target watched: no clock read, no lookup.
        return 0;
    }
    if task != current {
        // Another CPU's running task: only move the mark of a target
        // thread (one lookup, no insert), and only look for one where the
        // filter says there may be one.
        if crate::task_filter::may_hold(&RUNTIME_FILTER, task)
            && let Some(mark) = RUNTIME_MARKS.get_ptr_mut(task)
        {
            // SAFETY: a valid map value pointer.
            unsafe { core::ptr::write_volatile(mark, bpf_ktime_get_ns()) };
        }
        return 0;
    }
    let runtime_ns: u64 = ctx.arg(1);
    let now = unsafe { bpf_ktime_get_ns() };
    let tid = pid_tgid as u32;
    // A clock tick (or another update) inside a poll: a long one, perhaps.
    if let Some(slot) = slots::slot_of(tid) {
        crate::task_ids::read_current(slot, tid);
        crate::nudge::on_cpu((pid_tgid >> 32) as u32, slot, tid, now);
    }
    // Moved in place: an update of the hash map would take its bucket lock
    // and swap in a new element on every tick of every target thread.
    let Some(mark) = RUNTIME_MARKS.get_ptr_mut(task) else {
        // Without a mark of its own, a runtime update made elsewhere may be
        // missing from the interval: start counting from this one. Counted
        // in the filter first, so no remote update passes the mark by.
        crate::task_filter::added(&RUNTIME_FILTER, task);
        if RUNTIME_MARKS
            .insert(task, now, u64::from(BPF_NOEXIST))
            .is_err()
        {
            crate::task_filter::removed(&RUNTIME_FILTER, task);
        }
        return 0;
    };
    // SAFETY: a valid map value pointer; a remote update may race with
    // this one, and either time is a runtime update of this task.
    let mark = unsafe { core::ptr::replace(mark, now) };
    // It has run without a switch since its mark or since it came back to
    // this CPU, whichever is later: what the steal clock knew the host
    // took.
    let stolen = stolen_ns(mark.max(last_switch_ns()), now, runtime_ns);
    if stolen != 0 {
        lost(tid, stolen, now);
        // Counted: the timer interrupt that ends the pause must not count
        // it again.
        if let Some(timer) = CPU_TIMER.get_ptr_mut(0) {
            // SAFETY: a per-CPU map value pointer; only this CPU writes it.
            unsafe { core::ptr::write_volatile(timer, now) };
        }
    }
    0
}

/// `ns` the host took from running thread `tid` before `now`: a wait for a
/// CPU of its poll and busy stretch ([`credit`]) and of the poll the stack
/// capture follows.
#[inline(always)]
fn lost(tid: u32, ns: u64, now: u64) {
    credit(tid, ns, now);
    crate::stacks::add_stolen(tid, ns, now);
}

/// Counts `stolen` ns (taken at some point before `now`) as a wait for the
/// CPU of `tid`'s innermost poll in flight, and of its busy stretch; at
/// most the time each has run, so a pause before either began is never
/// taken from it.
#[inline(always)]
fn credit(tid: u32, stolen: u64, now: u64) {
    let Some(slot) = slots::slot_of(tid) else {
        return;
    };
    if slots::peek_polls(slot, tid).is_some_and(|polls| polls.depth > 0)
        && let Some(mut polls) = slots::polls_mut(slot, tid, false)
    {
        let depth = polls.depth as usize;
        if depth <= MAX_POLL_DEPTH
            && let Some(frame) = polls.frames.get(frame_index(depth - 1))
        {
            let since_start = now.saturating_sub(frame.start_ns);
            polls.preempted_ns += stolen.min(since_start);
        }
    }
    if slots::peek_loops(slot, tid)
        .is_some_and(|state| state.depth == 0 && state.busy_start_ns != 0)
        && let Some(mut state) = slots::loops_mut(slot, tid, false)
    {
        let since_start = now.saturating_sub(state.busy_start_ns);
        state.preempted_ns += stolen.min(since_start);
    }
}

/// The calling thread exits: forget its mark.
#[inline(always)]
pub(crate) fn forget() {
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    if RUNTIME_MARKS.remove(task).is_ok() {
        crate::task_filter::removed(&RUNTIME_FILTER, task);
    }
}
