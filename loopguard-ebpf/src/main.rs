//! loopguard's kernel side: times every Tokio task poll of one process.
//!
//! - `poll_enter` (uprobe on each `tokio::runtime::task::raw::poll` copy)
//!   pushes a frame on the calling thread's poll stack: start time, task id,
//!   header, return address, and whether the caller is blocking-pool code.
//! - `poll_exit` (uretprobe on the same copies) pops it, counts the poll in a
//!   per-CPU log-linear histogram, adds a task poll's time to the thread's
//!   busy total and, only when a worker poll lasted at least the report
//!   floor, sends one `PollEvent` through the ring buffer.
//! - `request_start` / `request_end` ([`requests`], uprobes on the
//!   `loopguard:*` USDT sites the middleware leaves) keep in-flight requests
//!   in maps by task and count them; a poll frame notes the request totals
//!   at entry and a slow poll's event at exit, so a stall's victims are
//!   counted without a record per request.
//! - `wait_enter` / `wait_exit` ([`wait`]) time each event-loop thread's
//!   waits for events and the busy stretches between them.
//! - `thread_exit` (raw tracepoint `sched_process_exit`, which needs no
//!   tracefs) drops a dead thread's stack and wait state.
//! - `thread_runtime` ([`steal`], raw tracepoint `sched_stat_runtime`):
//!   time the host did not run the vCPU of a thread inside a poll (steal
//!   time) counts as a wait for the CPU, like a preemption.
//! - [`nudge`]: a poll or busy stretch that runs past the nudge delay,
//!   or sleeps, tells the agent once, which then reads the poll stacks at
//!   its fast pace until it is over (issue #24).
//! - `thread_wakeup` ([`wakeup`], raw tracepoint `sched_wakeup`): a
//!   thread woken from a sleep inside a poll waits for a CPU until
//!   `sched_switch` runs it; that wait counts like a preemption.
//! - [`stacks`] (on `thread_switch`, and `stack_on_cpu`): the user stacks
//!   of stuck polls, on and off CPU, and their off-CPU time (issue #14).
//!
//! Each thread's poll stack and wait state live in a thread slot
//! ([`slots`]); the agent maps those arrays and reads them in place to see
//! polls that are still stuck.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write types, but LLVM lowers
// this intrinsic to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, raw_tracepoint, uprobe, uretprobe},
    maps::{PerCpuArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

mod follow;
mod nudge;
mod requests;
mod slots;
mod stacks;
mod steal;
mod task_filter;
mod task_ids;
mod wait;
mod wakeup;

use loopguard_common::{
    COUNTER_SLOTS, Config, Counter, EVENTS_RING_BYTES, EventKind, MAX_BLOCKING_RANGES,
    MAX_POLL_DEPTH, PollCookie, PollEvent, PollFrame, ThreadPolls, config_flags, frame_flags,
    hist::{self, PollHistogram},
};

/// Set by the agent before load (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::zeroed();

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// One entry per CPU holding every slot, so the agent reads it in one lookup.
#[map]
static POLL_HISTOGRAM: PerCpuArray<PollHistogram> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Polls and busy stretches at least this long (ns) are sent to the agent.
#[inline(always)]
pub(crate) fn report_floor_ns() -> u64 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const CONFIG.report_floor_ns) }
}

/// Whether the loader set `flag` ([`config_flags`]) in the configuration.
#[inline(always)]
fn config_has(flag: u64) -> bool {
    // SAFETY: a plain read of a global the loader patched before load.
    let flags = unsafe { core::ptr::read_volatile(&raw const CONFIG.flags) };
    flags & flag != 0
}

/// The benchmark's floor ([`config_flags::EMPTY_PROGRAMS`]): every program
/// returns before doing anything, so only the kernel's probe entry is paid.
#[inline(always)]
pub(crate) fn empty_programs() -> bool {
    config_has(config_flags::EMPTY_PROGRAMS)
}

/// The wait path rides on `sched_switch` ([`config_flags::WAIT_SWITCH`]).
#[inline(always)]
pub(crate) fn waits_on_switch() -> bool {
    config_has(config_flags::WAIT_SWITCH) && wait::armed()
}

/// The epoll wrappers have entry probes only ([`config_flags::WAIT_CALLS`]).
#[inline(always)]
pub(crate) fn waits_on_calls() -> bool {
    config_has(config_flags::WAIT_CALLS)
}

/// The request probes are attached ([`config_flags::REQUESTS`]).
#[inline(always)]
fn tracks_requests() -> bool {
    config_has(config_flags::REQUESTS)
}

/// The timer tick, when CPUs that run a task tick steadily (0: not known).
#[inline(always)]
pub(crate) fn tick_ns() -> u64 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const CONFIG.tick_ns) }
}

/// The process whose threads the programs watch.
#[inline(always)]
pub(crate) fn target_tgid() -> u32 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const CONFIG.target_tgid) }
}

/// Adds `n` to a per-CPU slot atomically: a program can be preempted by
/// another on the same CPU, and a plain `+=` would lose one of the two.
#[inline(always)]
pub(crate) fn add(slot: *mut u64, n: u64) {
    // SAFETY: `slot` is a valid, aligned map value pointer for this run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n) };
}

#[inline(always)]
pub(crate) fn add_one(slot: *mut u64) {
    add(slot, 1);
}

/// Closes a preempted wait still open on `stack`: the thread runs again, so
/// it was switched back in at this CPU's last context switch.
#[inline(always)]
fn settle_preemption(stack: &mut ThreadPolls) {
    if stack.preempted_since_ns != 0 {
        settle_preemption_at(stack, last_switch_ns());
    }
}

/// Closes a preempted wait still open on `stack` at `switched_in_ns`.
#[inline(always)]
fn settle_preemption_at(stack: &mut ThreadPolls, switched_in_ns: u64) {
    if stack.preempted_since_ns != 0 {
        stack.preempted_ns += switched_in_ns.saturating_sub(stack.preempted_since_ns);
        stack.preempted_since_ns = 0;
    }
}

/// ns of this CPU's last context switch (0 when unknown).
#[inline(always)]
pub(crate) fn last_switch_ns() -> u64 {
    LAST_SWITCH.get(0).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        add_one(slot);
    }
}

/// Counts one worker poll of `duration_ns` in this CPU's histogram.
#[inline(always)]
fn count_poll(duration_ns: u64) {
    let Some(histogram) = POLL_HISTOGRAM.get_ptr_mut(0) else {
        return;
    };
    let slot = hist::slot_of(duration_ns) & (hist::SLOTS - 1);
    // SAFETY: a map value pointer; the mask keeps the index inside `slots`.
    if let Some(count) = unsafe { (*histogram).slots.get_mut(slot as usize) } {
        add_one(count);
    }
    // SAFETY: as above.
    add(unsafe { &raw mut (*histogram).sum_ns }, duration_ns);
}

/// `i & (MAX_POLL_DEPTH - 1)`, opaque to LLVM: left to itself, LLVM drops
/// the mask where a branch already bounds `i`, computes the address before
/// that branch, and the verifier then rejects the unbounded access.
#[inline(always)]
pub(crate) fn frame_index(i: usize) -> usize {
    let masked = i & (MAX_POLL_DEPTH - 1);
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&raw const masked) }
}

#[inline(always)]
fn is_blocking_pool(return_addr: u64) -> bool {
    // SAFETY: plain reads of globals the loader patched before load.
    let count =
        unsafe { core::ptr::read_volatile(&raw const CONFIG.blocking_range_count) } as usize;
    let mut i = 0;
    while i < MAX_BLOCKING_RANGES {
        if i >= count {
            return false;
        }
        let [start, end] =
            unsafe { core::ptr::read_volatile(&raw const CONFIG.blocking_ranges[i]) };
        if return_addr >= start && return_addr < end {
            return true;
        }
        i += 1;
    }
    false
}

#[uprobe]
pub fn poll_enter(ctx: ProbeContext) -> u32 {
    if empty_programs() {
        return 0;
    }
    let _ = try_poll_enter(&ctx);
    0
}

fn try_poll_enter(ctx: &ProbeContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return Ok(());
    }
    let tid = pid_tgid as u32;
    let start_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the helper only reads the cookie of the link that fired.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let header: u64 = ctx.arg(0).ok_or(1i64)?;

    let mut flags = 0;
    let cookie = PollCookie::unpack(cookie);
    let id_offset = u64::from(cookie.id_offset);
    let task_id = if id_offset == 0 {
        flags |= frame_flags::NO_TASK_ID;
        0
    } else if !tracks_requests() {
        // Read only if the poll turns out long ([`task_ids`]); the request
        // probes, when attached, need it at once.
        flags |= frame_flags::TASK_ID_ADDRESS;
        header + id_offset
    } else {
        // SAFETY: bpf_probe_read_user tolerates any address.
        unsafe { bpf_probe_read_user((header + id_offset) as *const u64) }.unwrap_or_else(|_| {
            flags |= frame_flags::NO_TASK_ID;
            0
        })
    };
    // A verified copy's vtable already said it runs on an event loop (the
    // agent attaches no verified blocking-pool copy); the return address (what
    // the report shows as the caller) is then taken for free from the return
    // probe's registers. Only unverified copies read it here, to classify the
    // caller by address.
    let (return_addr, blocking) = if cookie.verified {
        (0, false)
    } else {
        // SAFETY: `regs` points at the saved registers of the probed thread.
        let rsp = unsafe { (*ctx.regs).rsp };
        // At the first instruction of the function, the return address is on top of the stack.
        let return_addr = unsafe { bpf_probe_read_user(rsp as *const u64) }.unwrap_or(0);
        (return_addr, is_blocking_pool(return_addr))
    };
    if blocking {
        flags |= frame_flags::BLOCKING;
    }

    let mut frame = PollFrame {
        start_ns,
        task_id,
        header,
        return_addr,
        copy_index: cookie.copy_index,
        flags,
        preempted_at_entry: 0,
        requests_ended_at_entry: if tracks_requests() {
            requests::totals().1
        } else {
            0
        },
    };

    let slot = slots::claim_slot(tid).ok_or(1i64)?;
    let mut stack = slots::polls_mut(slot, tid, true).ok_or(1i64)?;
    let stack = &mut *stack;
    settle_preemption(stack);
    frame.preempted_at_entry = stack.preempted_ns;
    let depth = stack.depth as usize;
    // The poll below this one on the thread is a scheduler loop, not a task.
    if depth > 0
        && depth <= MAX_POLL_DEPTH
        && let Some(parent) = stack.frames.get_mut(frame_index(depth - 1))
    {
        parent.flags |= frame_flags::CONTAINER;
    }
    match stack.frames.get_mut(frame_index(depth)) {
        Some(slot) if depth < MAX_POLL_DEPTH => *slot = frame,
        _ => bump(Counter::StackOverflow),
    }
    stack.depth += 1;
    Ok(())
}

#[uretprobe]
pub fn poll_exit(ctx: RetProbeContext) -> u32 {
    if empty_programs() {
        return 0;
    }
    let _ = try_poll_exit(&ctx);
    0
}

fn try_poll_exit(ctx: &RetProbeContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != target_tgid() {
        return Ok(());
    }
    let tid = pid_tgid as u32;
    let end_ns = unsafe { bpf_ktime_get_ns() };
    let Some(popped) = pop_frame(tid, end_ns) else {
        return Ok(());
    };
    // SAFETY: the popped frame stays in the slot, above the depth: only
    // this thread writes it, at its next poll entry.
    let frame = unsafe { &*popped.frame };
    let (duration_ns, preempted_ns) = (popped.duration_ns, popped.preempted_ns);

    if frame.flags & frame_flags::BLOCKING != 0 {
        bump(Counter::BlockingPolls);
        return Ok(());
    }
    // A scheduler loop's poll spans all the task polls inside it: it is
    // neither a task poll nor busy time of its own.
    if frame.flags & frame_flags::CONTAINER != 0 {
        return Ok(());
    }
    // Back in the scheduler: the loop view's busy stretch ends at this
    // poll's start and restarts now (a loop that turns is not stuck).
    wait::task_poll_returned(tgid, tid, popped.slot, frame.start_ns, preempted_ns, end_ns);
    // The histogram holds the time each poll held its thread: a preempted
    // stretch is the scheduler's, and would inflate the adaptive baseline.
    let held_ns = duration_ns - preempted_ns.min(duration_ns);
    count_poll(held_ns);
    // Shipped by the time the poll held its thread, as the agent judges it.
    if held_ns < report_floor_ns() {
        return Ok(());
    }
    let (task_id, flags) = task_ids::read_at_return(frame);
    let Some(mut entry) = EVENTS.reserve::<PollEvent>(0) else {
        bump(Counter::DroppedEvents);
        return Ok(());
    };
    entry.write(PollEvent {
        kind: EventKind::PollEnd as u32,
        pid: tgid,
        tid,
        flags,
        start_ns: frame.start_ns,
        duration_ns,
        task_id,
        header: frame.header,
        // The kernel points `rip` back at the caller before a return probe runs.
        // SAFETY: `regs` points at the saved registers of the probed thread.
        return_addr: unsafe { (*ctx.regs).rip },
        copy_index: frame.copy_index,
        depth: popped.depth as u32 + 1,
        preempted_ns: preempted_ns.min(duration_ns),
        requests_ended_at_entry: frame.requests_ended_at_entry,
        requests_started_at_exit: if tracks_requests() {
            requests::totals().0
        } else {
            0
        },
    });
    entry.submit(0);
    Ok(())
}

/// A frame [`pop_frame`] took off a thread's poll stack.
struct Popped {
    /// The thread's slot.
    slot: u32,
    /// The frame, where it lies in the slot (above the depth now).
    frame: *const PollFrame,
    /// Its depth (0 = outermost).
    depth: usize,
    /// ns from its entry to `end_ns`.
    duration_ns: u64,
    /// ns of it the thread spent preempted.
    preempted_ns: u64,
}

/// Pops `tid`'s innermost frame in one write section, adding a task poll's
/// time to the thread's busy total. `None` when there is no frame to pop
/// (counted) or it was deeper than the stack records.
#[inline(always)]
fn pop_frame(tid: u32, end_ns: u64) -> Option<Popped> {
    let slot = slots::slot_of(tid);
    let Some(mut stack) = slot.and_then(|slot| slots::polls_mut(slot, tid, false)) else {
        bump(Counter::UnmatchedReturns);
        return None;
    };
    let stack = &mut *stack;
    if stack.depth == 0 {
        bump(Counter::UnmatchedReturns);
        return None;
    }
    stack.depth -= 1;
    let depth = stack.depth as usize;
    if depth >= MAX_POLL_DEPTH {
        return None;
    }
    let frame = stack.frames.get(frame_index(depth))?;
    let (start_ns, preempted_at_entry, flags) =
        (frame.start_ns, frame.preempted_at_entry, frame.flags);
    let frame = &raw const *frame;
    let duration_ns = end_ns.saturating_sub(start_ns);
    settle_preemption(stack);
    let preempted_ns = stack.preempted_ns.saturating_sub(preempted_at_entry);
    if flags & (frame_flags::BLOCKING | frame_flags::CONTAINER) == 0 {
        // Only this thread writes its slot: plain adds are exact here.
        stack.busy_ns += duration_ns;
        stack.task_polls += 1;
    }
    Some(Popped {
        slot: slot?,
        frame,
        depth,
        duration_ns,
        preempted_ns,
    })
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn thread_exit(_ctx: RawTracePointContext) -> i32 {
    if empty_programs() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == target_tgid() {
        slots::release(pid_tgid as u32);
        steal::forget();
    }
    0
}

#[map]
static LAST_SWITCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `sched_switch(preempt, prev, next, prev_state)`, run as `prev`: notes the
/// CPU's switch time, and when a thread of the target leaves inside a poll
/// while still runnable, the start of its wait. On the `sched_switch` wait
/// path it also ends the epoll wait of a `next` switched back in, and
/// begins one for a thread of the target going to sleep in an epoll wait.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn thread_switch(ctx: RawTracePointContext) -> i32 {
    if empty_programs() {
        return 0;
    }
    // SAFETY: plain reads of the tracepoint's arguments.
    let args = ctx.as_ptr() as *const u64;
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = LAST_SWITCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU map value pointer; only this CPU writes it.
    let switched_in_ns = unsafe { core::ptr::replace(last, now) };
    let waits_on_switch = waits_on_switch();
    // SAFETY: raw tracepoint argument 2 (next).
    let next = unsafe { *args.add(2) };
    if waits_on_switch {
        wait::switch_in(next, now);
    }
    wakeup::switch_in(next, now);
    stacks::on_switch_in(next);
    let pid_tgid = bpf_get_current_pid_tgid();
    let ours = (pid_tgid >> 32) as u32 == target_tgid();
    steal::on_switch(ours.then_some(pid_tgid as u32), switched_in_ns, next, now);
    if !ours {
        return 0;
    }
    // SAFETY: raw tracepoint arguments 0 (preempt) and 3 (prev_state).
    let (preempt, prev_state) = unsafe { (*args, *args.add(3)) };
    // Still on the run queue: preempted, or yielding (TASK_RUNNING is 0).
    let runnable = preempt & 1 != 0 || prev_state as u32 == 0;
    leaves_cpu(
        pid_tgid as u32,
        runnable,
        waits_on_switch,
        switched_in_ns,
        now,
    );
    0
}

/// A thread `tid` of the target leaves its CPU at `now` (`runnable`: still
/// on the run queue), which it had since `switched_in_ns`.
#[inline(always)]
fn leaves_cpu(tid: u32, runnable: bool, waits_on_switch: bool, switched_in_ns: u64, now: u64) {
    // First the return from a wait entered before attaching, then the wait
    // this switch may begin (which closes the stretch that return opened).
    wait::note_unseen_return(tid, switched_in_ns);
    if waits_on_switch && !runnable {
        wait::switch_out(tid, now);
    }
    let Some(slot) = slots::slot_of(tid) else {
        return;
    };
    if idle(slot, tid) {
        // Between polls and out of any busy stretch, with no preemption
        // open: each step below would find nothing to do (dufs: most of
        // its 35 switches a request are blocking-pool threads sleeping
        // between tasks). Two array reads instead of a dozen.
        return;
    }
    if !runnable {
        wakeup::note_sleep(slot, tid);
        nudge::asleep(target_tgid(), slot, tid);
    }
    // Leaving the CPU inside a poll: a long one, perhaps; its task is
    // alive. Asleep, it may not run again for long; preempted, it runs
    // the poll on, so only a poll already as long as a report is read.
    let started_by = if runnable {
        now.saturating_sub(report_floor_ns())
    } else {
        u64::MAX
    };
    task_ids::read_current(slot, tid, started_by);
    wait::note_switch(slot, tid, switched_in_ns, runnable, now);
    note_poll_switch(slot, tid, runnable, switched_in_ns, now);
    stacks::on_switch_out(slot, tid, runnable);
}

/// The preemption of `tid`'s poll stack: the one open since its last
/// switch out is settled, and a new one opens when it leaves runnable
/// inside a poll.
#[inline(always)]
fn note_poll_switch(slot: u32, tid: u32, runnable: bool, switched_in_ns: u64, now: u64) {
    // A write section (two atomic adds) is opened only when there is
    // something to write.
    let Some(stack) = slots::peek_polls(slot, tid) else {
        return;
    };
    if stack.preempted_since_ns == 0 && !(runnable && stack.depth > 0) {
        return;
    }
    let Some(mut stack) = slots::polls_mut(slot, tid, false) else {
        return;
    };
    let stack = &mut *stack;
    settle_preemption_at(stack, switched_in_ns);
    if runnable && stack.depth > 0 {
        stack.preempted_since_ns = now;
    }
}

/// Whether thread `tid` (slot `slot`) leaves its CPU with nothing open:
/// no poll in flight, no busy stretch of its event loop, no preemption
/// left to settle. What [`leaves_cpu`]'s steps and the off-CPU stack
/// check first, read once.
#[inline(always)]
fn idle(slot: u32, tid: u32) -> bool {
    let polls_idle = slots::peek_polls(slot, tid)
        .is_none_or(|polls| polls.depth == 0 && polls.preempted_since_ns == 0);
    polls_idle
        && slots::peek_loops(slot, tid).is_none_or(|state| {
            state.preempted_since_ns == 0 && !(state.depth == 0 && state.busy_start_ns != 0)
        })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
