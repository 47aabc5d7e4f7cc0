//! Where the kernel's BTF says where the run queue keeps its copy of the
//! steal clock (`RqSteal`, the usual case), that clock is read: at a
//! target thread's ticks (`cpu_timer`), and at its switch out when a tick
//! read it during the run that ends ([`on_switch`]); `thread_runtime` is
//! then not attached, or only to stand in for the ticks. Elsewhere:
//!
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
//! every update of a target thread, wherever it runs, moves its mark: its
//! own updates in its CPU's [`CPU_MARK`], the others in its entry of
//! [`TASK_MARKS`] (both updates take the run queue's lock, so they never
//! race). No hash lookup and no clock read is made for a task of another
//! process.
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
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated::bpf_get_current_task,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use loopguard_common::{
    MAX_POLL_DEPTH,
    slots::MAX_THREAD_SLOTS,
    steal::{RqSteal, paused_ns, steal_since, stolen_ns},
    task_filter,
};

use crate::{frame_index, last_switch_ns, slots, target_tgid, tick_ns};

/// A task's runtime update: a target thread's entry in [`TASK_MARKS`], or
/// a CPU's last one ([`CPU_MARK`]).
#[derive(Clone, Copy)]
#[repr(C)]
struct TaskMark {
    /// Its `task_struct` address (0: the entry is free).
    task: u64,
    /// ns of the update: in [`TASK_MARKS`], of the last one made from
    /// another CPU (a wake-up checks the remote CPU's running task), 0
    /// until one.
    ns: u64,
}

/// Entries of [`TASK_MARKS`]: a power of two, far above the thread count
/// of most services, so two of its threads seldom share one.
const TASK_MARK_ENTRIES: u32 = 4096;

/// Target threads by bucket of their task pointer
/// ([`task_mark_index`]): claimed by the thread at its first runtime
/// update, freed at its exit. A runtime update made from another CPU is
/// noted here (one array read for every task on the host, one write for a
/// target thread); the thread's own updates keep their mark per CPU
/// ([`CPU_MARK`]). A thread whose bucket another target thread holds
/// falls back to [`RUNTIME_MARKS`]. Every update of a thread of dufs (30
/// or more on one CPU, 40 updates per request) took a hash lookup before.
#[map]
static TASK_MARKS: Array<TaskMark> = Array::with_max_entries(TASK_MARK_ENTRIES, 0);

/// `log2(TASK_MARK_ENTRIES)`.
const TASK_MARK_BITS: u32 = 12;

const _: () = assert!(TASK_MARK_ENTRIES == 1 << TASK_MARK_BITS);

/// The [`TASK_MARKS`] index of a task pointer.
#[inline(always)]
fn task_mark_index(task: u64) -> u32 {
    task_filter::index_of(task, TASK_MARK_BITS)
}

/// Per CPU, the task whose runtime update (or counted pause) it saw last
/// and when: that thread's own mark while it stays on this CPU.
#[map]
static CPU_MARK: PerCpuArray<TaskMark> = PerCpuArray::with_max_entries(1, 0);

/// `task_struct` address of a target thread whose [`TASK_MARKS`] entry
/// another target thread holds → ns of its last runtime update. Entries
/// are made by the thread itself (a pointer the program reads as current),
/// and removed when it exits.
#[map]
static RUNTIME_MARKS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_THREAD_SLOTS, 0);

/// Entries of [`RUNTIME_MARKS`] per bucket of task pointers
/// ([`crate::task_filter`]): a remote update looks the hash map up only
/// where the filter says there may be one.
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
/// Attached to `local_timer_exit` where the run queue's steal clock is
/// read ([`rq_steal`]): the tick has updated it by then. Elsewhere to
/// `local_timer_entry`.
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
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    on_tick(pid_tgid, now);
    let paused = if previous == 0 {
        0
    } else {
        paused_ns(previous.max(last_switch_ns()), now, tick_ns())
    };
    // Both see a host pause the steal clock knew of, over the same
    // stretch (since the previous tick or the switch-in): the larger one.
    let stolen = if rq_steal().known() {
        tick_steal(now)
    } else {
        0
    };
    let lost_ns = paused.max(stolen);
    if lost_ns != 0 {
        lost(pid_tgid as u32, lost_ns, now);
        // The runtime update of this same tick would find the pause again
        // as a shortfall when the steal clock knew of it.
        // SAFETY: the helper has no preconditions.
        let task = unsafe { bpf_get_current_task() };
        swap_cpu_mark(task, now);
    }
    0
}

/// Byte offsets to the run queue's steal clock, set by the agent.
#[inline(always)]
fn rq_steal() -> RqSteal {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const crate::CONFIG.rq_steal) }
}

/// The steal clock's reading at a moment of a target thread's run on this
/// CPU (a tick's, or its switch-in's without steady ticks), and when (0:
/// none yet). A reading older than the running thread's switch-in is
/// another run's, and counts nothing ([`steal_since`]).
#[derive(Clone, Copy)]
#[repr(C)]
struct StealMark {
    steal: u64,
    ns: u64,
}

#[map]
static STEAL_MARK: PerCpuArray<StealMark> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's `struct rq` (0: not found yet): it never moves.
#[map]
static CPU_RQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's run queue, found from the current task (`se.cfs_rq->rq`)
/// and kept only if it says it is this CPU's.
#[inline(always)]
fn find_rq(offsets: &RqSteal) -> Option<u64> {
    // SAFETY: the helper has no preconditions; the reads tolerate any
    // address and fail cleanly.
    let task = unsafe { bpf_get_current_task() };
    let cfs_rq =
        unsafe { bpf_probe_read_kernel((task + u64::from(offsets.task_cfs_rq)) as *const u64) }
            .ok()?;
    if cfs_rq == 0 {
        return None;
    }
    let rq =
        unsafe { bpf_probe_read_kernel((cfs_rq + u64::from(offsets.cfs_rq_rq)) as *const u64) }
            .ok()?;
    if rq == 0 {
        return None;
    }
    let cpu =
        unsafe { bpf_probe_read_kernel((rq + u64::from(offsets.rq_cpu)) as *const u32) }.ok()?;
    // SAFETY: the helper has no preconditions.
    (cpu == unsafe { bpf_get_smp_processor_id() }).then_some(rq)
}

/// The steal clock as this CPU's run queue last read it.
#[inline(always)]
fn steal_clock(offsets: &RqSteal) -> Option<u64> {
    let cached = CPU_RQ.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value pointer; only this CPU writes it.
    let mut rq = unsafe { core::ptr::read_volatile(cached) };
    if rq == 0 {
        rq = find_rq(offsets)?;
        unsafe { core::ptr::write_volatile(cached, rq) };
    }
    // SAFETY: the helper tolerates any address.
    unsafe { bpf_probe_read_kernel((rq + u64::from(offsets.rq_steal)) as *const u64) }.ok()
}

/// A context switch at `now` where the run queue's steal clock is read:
/// a target thread `prev` (running since `switched_in_ns`) leaving is
/// credited the steal since the last reading made during its run.
///
/// Where CPUs tick steadily that reading is a tick's ([`tick_steal`]), and
/// a switch reads the clock only when one was made: most runs of a thread
/// end before the first tick (dufs: 40 switches a request, each of which
/// read the clock, a third of `thread_switch`'s time). What a run loses
/// that way is the steal before its first tick, at most a tick and the
/// slack of [`paused_ns`] (5 ms here); a longer pause there delays the
/// tick, which counts it as a pause. Without steady ticks (`nohz_full`,
/// or no timer interrupt to watch) a switch to `next`, when it may be a
/// target thread with a slot, makes the reading its run counts from, as
/// before.
#[inline(always)]
pub(crate) fn on_switch(prev: Option<u32>, switched_in_ns: u64, next: u64, now: u64) {
    let offsets = rq_steal();
    if !offsets.known() {
        return;
    }
    // No tick reads the clock here: a tick-less CPU (`nohz_full`), or no
    // timer interrupt seen on this CPU (none can be watched).
    let eager = tick_ns() == 0 || !ticks_seen();
    let next_counts = eager && slots::may_have_slot(next);
    if prev.is_none() && !next_counts {
        return;
    }
    let Some(mark) = STEAL_MARK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU map value pointer; only this CPU writes it (a
    // nested program on this CPU would write a reading of the same clock).
    let last = unsafe { core::ptr::read_volatile(mark) };
    // A reading from before `prev`'s run (another thread's, or none) counts
    // nothing: skip the read.
    let prev = prev.filter(|_| last.ns != 0 && last.ns >= switched_in_ns);
    if prev.is_none() && !next_counts {
        return;
    }
    let Some(steal) = steal_clock(&offsets) else {
        return;
    };
    if let Some(tid) = prev {
        let stolen = steal_since(last.steal, last.ns, switched_in_ns, steal);
        if stolen != 0 {
            lost(tid, stolen, now);
        }
    }
    // A reading left from before this switch needs no clearing: it is older
    // than the next run's switch-in, so it counts nothing for it.
    if next_counts {
        unsafe { core::ptr::write_volatile(mark, StealMark { steal, ns: now }) };
    }
}

/// A tick at `now` on a target thread: the steal since the last reading
/// made while it ran (none: counting starts here).
#[inline(always)]
fn tick_steal(now: u64) -> u64 {
    let offsets = rq_steal();
    let Some(mark) = STEAL_MARK.get_ptr_mut(0) else {
        return 0;
    };
    let Some(steal) = steal_clock(&offsets) else {
        return 0;
    };
    // SAFETY: as in `on_switch`.
    let last = unsafe { core::ptr::replace(mark, StealMark { steal, ns: now }) };
    steal_since(last.steal, last.ns, last_switch_ns(), steal)
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
        remote_update(task);
        return 0;
    }
    let runtime_ns: u64 = ctx.arg(1);
    let now = unsafe { bpf_ktime_get_ns() };
    let tid = pid_tgid as u32;
    if !ticks_seen() {
        // No timer interrupt on this CPU yet (or none can be seen here):
        // the clock updates stand in for the ticks.
        on_tick(pid_tgid, now);
    }
    if rq_steal().known() {
        // Attached only to stand in for the ticks: the context switches
        // count steal from the run queue.
        return 0;
    }
    let Some(mark) = own_update(task, now) else {
        return 0;
    };
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

/// Marks `task`'s update on this CPU at `now`; returns the mark it had
/// here (0: another task's was the last one here).
#[inline(always)]
fn swap_cpu_mark(task: u64, now: u64) -> u64 {
    let Some(cpu) = CPU_MARK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU map value pointer; only this CPU writes it (a
    // nested program on this CPU writes a mark of the same kind).
    unsafe {
        let last = core::ptr::replace(cpu, TaskMark { task, ns: now });
        if last.task == task { last.ns } else { 0 }
    }
}

/// A runtime update of target thread `task` (current) at `now`: its
/// previous update, made here or from another CPU; `None` for its first
/// one, from which counting starts (an update made elsewhere may be
/// missing from the interval before it).
#[inline(always)]
fn own_update(task: u64, now: u64) -> Option<u64> {
    let here = swap_cpu_mark(task, now);
    let entry = TASK_MARKS.get_ptr_mut(task_mark_index(task))?;
    // SAFETY: a valid map value pointer; other CPUs write `ns` of
    // an entry they find held by `task`, each a time of an update of it.
    unsafe {
        let holder = core::ptr::read_volatile(&raw const (*entry).task);
        if holder == task {
            let remote = core::ptr::read_volatile(&raw const (*entry).ns);
            return Some(here.max(remote));
        }
        if holder == 0 {
            // Claimed with plain stores: two threads of a bucket that both
            // claim it find at their next update which one holds it, and
            // the other starts over in the hash map. A thread that was in
            // the hash map leaves its entry there until it exits: remote
            // updates look here first.
            core::ptr::write_volatile(&raw mut (*entry).ns, 0);
            core::ptr::write_volatile(&raw mut (*entry).task, task);
            return None;
        }
    }
    // Moved in place: an update of the hash map would take its bucket lock
    // and swap in a new element on every tick of every such thread.
    let Some(mark) = RUNTIME_MARKS.get_ptr_mut(task) else {
        // Counted in the filter first, so no remote update passes it by.
        crate::task_filter::added(&RUNTIME_FILTER, task);
        if RUNTIME_MARKS
            .insert(task, now, u64::from(BPF_NOEXIST))
            .is_err()
        {
            crate::task_filter::removed(&RUNTIME_FILTER, task);
        }
        return None;
    };
    // SAFETY: a valid map value pointer; a remote update may race with
    // this one, and either time is a runtime update of this task.
    Some(here.max(unsafe { core::ptr::replace(mark, now) }))
}

/// A runtime update of `task`, running on another CPU, made from this
/// one: only a target thread's is noted (one array read, no insert).
#[inline(always)]
fn remote_update(task: u64) {
    if let Some(entry) = TASK_MARKS.get_ptr_mut(task_mark_index(task)) {
        // SAFETY: a valid map value pointer.
        unsafe {
            if core::ptr::read_volatile(&raw const (*entry).task) == task {
                core::ptr::write_volatile(&raw mut (*entry).ns, bpf_ktime_get_ns());
                return;
            }
        }
    }
    if crate::task_filter::may_hold(&RUNTIME_FILTER, task)
        && let Some(mark) = RUNTIME_MARKS.get_ptr_mut(task)
    {
        // SAFETY: a valid map value pointer.
        unsafe { core::ptr::write_volatile(mark, bpf_ktime_get_ns()) };
    }
}

/// A clock tick on a thread of the target (`pid_tgid`) at `now`: inside a
/// poll, a long one perhaps; its task id is read and the agent nudged
/// once the poll has run long enough. Done per tick by [`cpu_timer`], not
/// per runtime update: a service that switches threads often (dufs: 40
/// updates per request) paid a slot lookup on each.
#[inline(always)]
fn on_tick(pid_tgid: u64, now: u64) {
    let tid = pid_tgid as u32;
    if let Some(slot) = slots::slot_of(tid) {
        crate::task_ids::read_current(slot, tid, u64::MAX);
        crate::nudge::on_cpu((pid_tgid >> 32) as u32, slot, tid, now);
    }
}

/// Whether [`cpu_timer`] has run on this CPU, and so does the per-tick work.
#[inline(always)]
fn ticks_seen() -> bool {
    // SAFETY: a per-CPU map value pointer; an aligned 8-byte load.
    CPU_TIMER
        .get_ptr_mut(0)
        .is_some_and(|mark| unsafe { core::ptr::read_volatile(mark) } != 0)
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
    if let Some(entry) = TASK_MARKS.get_ptr_mut(task_mark_index(task)) {
        // SAFETY: a valid map value pointer.
        unsafe {
            if core::ptr::read_volatile(&raw const (*entry).task) == task {
                core::ptr::write_volatile(&raw mut (*entry).task, 0);
            }
        }
    }
    if RUNTIME_MARKS.remove(task).is_ok() {
        crate::task_filter::removed(&RUNTIME_FILTER, task);
    }
}
