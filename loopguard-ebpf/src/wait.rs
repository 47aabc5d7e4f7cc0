//! The wait path: when each event-loop thread of the target waits for
//! events, and how long it stays away in between.
//!
//! `wait_enter` / `wait_exit` sit on every function a loop thread waits in
//! (the C library's epoll wrappers, Tokio's park functions); where no
//! wrapper can be probed, `wait_syscall_enter` / `wait_syscall_exit` see
//! the epoll syscalls themselves on the `sys_enter` / `sys_exit` raw
//! tracepoints, which every process's syscalls pass through. Waits nest (a
//! Tokio worker's park calls `epoll_wait`), so only the outermost one
//! counts. A busy stretch runs from a wait's return to the next wait's
//! entry; one of at least the report floor is sent as a `LoopEvent`. On a
//! Tokio worker, a task poll's return ends the stretch too, at the poll's
//! start ([`task_poll_returned`]): the time inside task polls is the poll
//! detector's, and a thread back in its scheduler after each short poll is
//! a loop that turns, whether or not it reaches a wait site (a `yield_now`
//! makes the worker park with a zero timeout, which reaches `epoll_wait`
//! only when no other worker holds the driver). The wait state lives in
//! the thread's slot ([`crate::slots`]), where the agent reads it to see a
//! stretch that is still running.
//!
//! On a Tokio target the default wait path is `sched_switch`
//! ([`switch_out`] / [`switch_in`]), which runs on every context switch
//! anyway: a thread switched out asleep in an epoll wait (its syscall
//! number in its saved registers) is waiting until it is switched back in,
//! with no probe per wait. An epoll wait that does not sleep is not seen,
//! which the task polls make up for: each one's return ends the stretch.
//! Tokio's parks that sleep in a futex (which a lock sleeps in too) keep
//! their uprobes.
//!
//! An event loop without task polls (uvicorn, Node) has nothing else to end
//! a stretch when its `epoll_wait` finds events ready and does not sleep.
//! By default it gets a uprobe on each epoll wrapper's entry and no return
//! probe (`config_flags::WAIT_CALLS`, cookie [`WAIT_SITE_CALL`]): each call
//! ends the busy stretch and starts the next at once, as if the wait
//! returned at once; a call that sleeps is seen on `sched_switch`, which
//! ends the wait at the switch back in. One trap per wait instead of two.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{self, bpf_get_attach_cookie},
    },
    macros::{map, raw_tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use loopguard_common::{
    EventKind, LoopEvent, LoopState, WAIT_SITE_CALL, WAIT_SITE_EPOLL, pt_regs,
    slots::MAX_THREAD_SLOTS, syscalls::is_epoll_wait, task_filter, wait_fd,
};

use crate::{
    Counter, EVENTS, bump, last_switch_ns, report_floor_ns,
    slots::{self, Writing},
    target_tgid,
};

/// Waits deeper than this are not tracked (a runaway nesting count).
const MAX_WAIT_DEPTH: u32 = 8;

/// 1 once the agent has attached every probe (`names::WAITS_ARMED`). The
/// tracepoints run from before the first probe is attached: a wait path
/// on them would start busy stretches on Tokio workers that no task poll
/// return could end until the poll probes exist (a false loop stall of a
/// busy worker during attach, issue #23).
#[map]
static WAITS_ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// Whether the wait paths on tracepoints may start and end waits.
#[inline(always)]
pub(crate) fn armed() -> bool {
    WAITS_ARMED.get(0).is_some_and(|armed| *armed != 0)
}

/// Threads the agent found asleep in a wait when it attached (filled by
/// the agent, emptied here). The return probe of a wait entered before
/// attaching never fires, so without this a thread that sleeps in its park
/// until the first event (a `block_on` body waiting for stdin) would start
/// no busy stretch at its first wakeup, and its first block would be
/// missed. Its first switch-out, or its next wait, tells when it woke.
#[map]
static UNSEEN_WAITS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// [`UNSEEN_WAITS`] entries per bucket of tids (`names::UNSEEN_FILTER`,
/// counted up by the agent as it files them): every context switch of a
/// target thread asks [`take_unseen`], nearly always about a thread that
/// is not there.
#[map]
static UNSEEN_FILTER: Array<u64> = Array::with_max_entries(task_filter::BUCKETS, 0);

/// Whether `tid` was asleep in a wait at attach and has not been seen
/// since; forgets it.
#[inline(always)]
fn take_unseen(tid: u32) -> bool {
    let key = u64::from(tid);
    if !crate::task_filter::may_hold(&UNSEEN_FILTER, key) {
        return false;
    }
    // SAFETY: only the presence of the key is used.
    if unsafe { UNSEEN_WAITS.get(tid) }.is_none() {
        return false;
    }
    if UNSEEN_WAITS.remove(tid).is_ok() {
        crate::task_filter::removed(&UNSEEN_FILTER, key);
    }
    true
}

/// `sched_switch` of `tid` (of the target) leaving its CPU, which it had
/// since `switched_in_ns`: when the agent found it asleep in a wait at
/// attach, it has come back from that wait (it ran), at `switched_in_ns`.
/// Its busy stretch begins then, unless a wait was already seen since.
#[inline(always)]
pub fn note_unseen_return(tid: u32, switched_in_ns: u64) {
    if !take_unseen(tid) {
        return;
    }
    let Some(slot) = slots::claim_slot(tid) else {
        return;
    };
    let Some(mut state) = slots::loops_mut(slot, tid, true) else {
        return;
    };
    let state = &mut *state;
    if state.depth == 0 && state.busy_start_ns == 0 {
        start_stretch(state, switched_in_ns);
    }
}

/// A busy stretch begins at `at` (after a wait's return).
#[inline(always)]
fn start_stretch(state: &mut LoopState, at: u64) {
    start_stretch_counted(state, at, true);
}

/// A busy stretch begins at `at`; `counted` when the wait it comes back
/// from was not counted at its call ([`WAIT_SITE_CALL`]).
#[inline(always)]
fn start_stretch_counted(state: &mut LoopState, at: u64, counted: bool) {
    if counted {
        state.waits += 1;
    }
    state.busy_start_ns = at;
    settle(state);
    state.preempted_at_start_ns = state.preempted_ns;
}

/// A write section on this thread's wait state, created on first use;
/// `None` for another process or when no thread slot is free (counted).
#[inline(always)]
fn this_thread() -> Option<(u32, u32, Writing<LoopState>)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != target_tgid() {
        return None;
    }
    let tid = pid_tgid as u32;
    let slot = slots::claim_slot(tid)?;
    Some((tgid, tid, slots::loops_mut(slot, tid, true)?))
}

/// When `tid`'s current busy stretch began, while it runs (the thread is
/// in no wait and came back from one since attaching).
#[inline(always)]
pub(crate) fn busy_since(slot: u32, tid: u32) -> Option<u64> {
    // Read by a program of that same thread: its own last writes.
    let state = slots::peek_loops(slot, tid)?;
    (!loopguard_common::slots::is_writing(state.seq)
        && state.depth == 0
        && state.busy_start_ns != 0)
        .then_some(state.busy_start_ns)
}

#[uprobe]
pub fn wait_enter(ctx: ProbeContext) -> u32 {
    if crate::empty_programs() {
        return 0;
    }
    if let Some((tgid, tid, mut state)) = this_thread() {
        // SAFETY: the helper reads this probe's own cookie.
        let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
        // An epoll wrapper's first argument is the epoll fd; a park's is not.
        let fd = if cookie & WAIT_SITE_EPOLL != 0 {
            wait_fd::encode(ctx.arg::<u64>(0).unwrap_or(u64::MAX))
        } else {
            0
        };
        let now = unsafe { bpf_ktime_get_ns() };
        enter(tgid, tid, &mut state, fd, now);
        // No return probe here: the call returns at once unless it sleeps,
        // and `switch_out` takes over if it does. Before the agent arms the
        // switch path, a sleep would go unseen and a stretch started now
        // would run through it: the thread's stretch stays unknown instead.
        if cookie & WAIT_SITE_CALL != 0 {
            if armed() {
                exit_at(&mut state, now, true);
            } else {
                returned_unarmed(&mut state);
            }
        }
    }
    0
}

#[uretprobe]
pub fn wait_exit(_ctx: RetProbeContext) -> u32 {
    returned();
    0
}

/// A wait function (or a park call) returned on this thread.
#[inline(always)]
fn returned() {
    if crate::empty_programs() {
        return;
    }
    if let Some((_, _, mut state)) = this_thread() {
        exit(&mut state);
    }
}

/// A plain uprobe on the instruction a park call returns to (a park the
/// build inlined, seen at its call: `wait_enter` is on the call): the
/// wait ends, as at [`wait_exit`].
#[uprobe]
pub fn wait_return(_ctx: ProbeContext) -> u32 {
    returned();
    0
}

/// Raw tracepoint `sys_enter` (every syscall of every process): the wait
/// path for programs whose epoll waits no uprobe can catch (statically
/// linked without symbols, or making the syscall directly).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn wait_syscall_enter(ctx: RawTracePointContext) -> i32 {
    if crate::empty_programs() {
        return 0;
    }
    if (bpf_get_current_pid_tgid() >> 32) as u32 != target_tgid() || !armed() {
        return 0;
    }
    let id: u64 = ctx.arg(1);
    if is_epoll_wait(id)
        && let Some((tgid, tid, mut state)) = this_thread()
    {
        let regs: u64 = ctx.arg(0);
        let now = unsafe { bpf_ktime_get_ns() };
        enter(tgid, tid, &mut state, epoll_fd_of(regs), now);
    }
    0
}

/// Raw tracepoint `sys_exit`, the other half of [`wait_syscall_enter`].
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn wait_syscall_exit(ctx: RawTracePointContext) -> i32 {
    if crate::empty_programs() {
        return 0;
    }
    if (bpf_get_current_pid_tgid() >> 32) as u32 != target_tgid() || !armed() {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // SAFETY: the helper tolerates any address.
    let id = unsafe { bpf_probe_read_kernel((regs + u64::from(pt_regs::ORIG_AX)) as *const u64) }
        .unwrap_or(0);
    if is_epoll_wait(id)
        && let Some((_, _, mut state)) = this_thread()
    {
        exit(&mut state);
    }
    0
}

/// The epoll fd a thread in an epoll wait syscall passed, from its user
/// registers at `regs` (the first argument, in `rdi`), encoded.
#[inline(always)]
fn epoll_fd_of(regs: u64) -> u32 {
    // SAFETY: the helper tolerates any address.
    unsafe { bpf_probe_read_kernel((regs + u64::from(pt_regs::RDI)) as *const u64) }
        .map_or(0, wait_fd::encode)
}

/// A task poll of a worker (not a scheduler loop, not blocking-pool work)
/// that began at `poll_start_ns` returned at `now` after `poll_preempted_ns`
/// switched out while runnable: the busy stretch running on this thread
/// ends where the poll began (sent when it held the thread for at least the
/// report floor: scheduler or `block_on` work between polls), and a new one
/// starts now. Nothing to do for a thread that is not in a busy stretch
/// (never seen waiting, or inside a wait: a poll nested in a park).
#[inline(always)]
pub(crate) fn task_poll_returned(
    tgid: u32,
    tid: u32,
    slot: u32,
    poll_start_ns: u64,
    poll_preempted_ns: u64,
    now: u64,
) {
    let Some(peek) = slots::peek_loops(slot, tid) else {
        return;
    };
    if peek.depth != 0 || peek.busy_start_ns == 0 {
        return;
    }
    let Some(mut state) = slots::loops_mut(slot, tid, false) else {
        return;
    };
    let state = &mut *state;
    if state.depth != 0 || state.busy_start_ns == 0 {
        return;
    }
    settle(state);
    let start = state.busy_start_ns;
    let busy = poll_start_ns.max(start) - start;
    // Preemptions during the stretch, less those inside the poll.
    let preempted = state
        .preempted_ns
        .saturating_sub(state.preempted_at_start_ns)
        .saturating_sub(poll_preempted_ns)
        .min(busy);
    if busy - preempted >= report_floor_ns() {
        send_busy(tgid, tid, start, busy, preempted, state.wait_fd);
    }
    state.busy_ns += now.saturating_sub(start);
    state.busy_start_ns = now;
    state.preempted_at_start_ns = state.preempted_ns;
}

/// One `LoopEvent`: a stretch of `busy` ns from `start`, `preempted` of it
/// switched out, back from a wait on `wait_fd` (encoded).
#[inline(always)]
fn send_busy(tgid: u32, tid: u32, start: u64, busy: u64, preempted: u64, wait_fd: u32) {
    let event = LoopEvent {
        kind: EventKind::LoopBusy as u32,
        pid: tgid,
        tid,
        wait_fd,
        start_ns: start,
        duration_ns: busy,
        preempted_ns: preempted,
    };
    if EVENTS.output::<LoopEvent>(&event, 0).is_err() {
        bump(Counter::DroppedEvents);
    }
}

/// A wait begins at `now`: closes the busy stretch at the outermost one.
/// `fd` is the wait's epoll fd, encoded (0 for a park, or not known).
#[inline(always)]
fn enter(tgid: u32, tid: u32, state: &mut LoopState, fd: u32, now: u64) {
    if state.depth == 0 {
        // Back from a wait entered before attaching, not switched out since
        // (that would have told): it has run since this CPU's last switch.
        if state.busy_start_ns == 0 && take_unseen(tid) {
            start_stretch(state, last_switch_ns());
        }
        if state.busy_start_ns != 0 {
            settle(state);
            let preempted = state
                .preempted_ns
                .saturating_sub(state.preempted_at_start_ns);
            let busy = now.saturating_sub(state.busy_start_ns);
            let preempted = preempted.min(busy);
            state.busy_ns += busy;
            if busy - preempted >= report_floor_ns() {
                let elsewhere = fd != 0 && state.wait_fd != 0 && fd != state.wait_fd;
                let flag = if elsewhere {
                    wait_fd::ENDED_ELSEWHERE
                } else {
                    0
                };
                send_busy(
                    tgid,
                    tid,
                    state.busy_start_ns,
                    busy,
                    preempted,
                    state.wait_fd | flag,
                );
            }
        }
        state.busy_start_ns = 0;
        state.wait_start_ns = now;
    }
    // Nested or not: a park that sleeps in the driver's epoll names it.
    if fd != 0 {
        state.wait_fd = fd;
    }
    if state.depth < MAX_WAIT_DEPTH {
        state.depth += 1;
    }
}

/// A call returns before the switch path is armed: out of the wait, with
/// no busy stretch known (as for a wait entered before attaching).
#[inline(always)]
fn returned_unarmed(state: &mut LoopState) {
    state.depth = state.depth.saturating_sub(1);
    if state.depth == 0 {
        state.wait_start_ns = 0;
        state.busy_start_ns = 0;
    }
}

/// Closes a preemption still open on `state`: the thread runs again, so it
/// was switched back in at this CPU's last context switch.
#[inline(always)]
fn settle(state: &mut LoopState) {
    if state.preempted_since_ns != 0 {
        state.preempted_ns += last_switch_ns().saturating_sub(state.preempted_since_ns);
        state.preempted_since_ns = 0;
    }
}

/// Called from the context-switch tracepoint for a thread of the target
/// (with slot `slot`) being switched out: `runnable` when it goes back on
/// the run queue (preempted). Only time inside a busy stretch is counted.
#[inline(always)]
pub fn note_switch(slot: u32, tid: u32, switched_in_ns: u64, runnable: bool, now: u64) {
    let Some(state) = slots::peek_loops(slot, tid) else {
        return;
    };
    let mark = runnable && state.depth == 0 && state.busy_start_ns != 0;
    if state.preempted_since_ns == 0 && !mark {
        return;
    }
    let Some(mut state) = slots::loops_mut(slot, tid, false) else {
        return;
    };
    let state = &mut *state;
    if state.preempted_since_ns != 0 {
        state.preempted_ns += switched_in_ns.saturating_sub(state.preempted_since_ns);
        state.preempted_since_ns = 0;
    }
    if mark {
        state.preempted_since_ns = now;
    }
}

/// A wait returns: the outermost one starts a busy stretch.
#[inline(always)]
fn exit(state: &mut LoopState) {
    exit_at(state, unsafe { bpf_ktime_get_ns() }, true);
}

/// A wait returns at `now`: the outermost one starts a busy stretch, and
/// counts the wait when `counted` (not counted already at its call).
#[inline(always)]
fn exit_at(state: &mut LoopState, now: u64, counted: bool) {
    if state.depth > 1 {
        state.depth -= 1;
        return;
    }
    // The outermost wait returned, or one that began before loopguard
    // attached (depth 0): a busy stretch starts now either way.
    if state.depth == 1 && state.wait_start_ns != 0 {
        state.wait_ns += now.saturating_sub(state.wait_start_ns);
    }
    state.depth = 0;
    state.wait_start_ns = 0;
    start_stretch_counted(state, now, counted);
}

/// Threads switched out asleep in an epoll wait ([`switch_out`]), by task
/// pointer, to their tid (low half) and slot (high half): their wait ends
/// when they are switched back in.
#[map]
static WAITING_TASKS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_THREAD_SLOTS, 0);

/// How many entries of [`WAITING_TASKS`] fall in each bucket of task
/// pointers ([`crate::task_filter`]): a switch in looks the hash map up
/// only when its bucket is not empty. Every context switch on the host runs
/// `thread_switch`, and a hash lookup on each one while any target thread
/// sleeps cost more than the wait uprobes it replaces on a busy host.
#[map]
static WAITING_FILTER: Array<u64> = Array::with_max_entries(task_filter::BUCKETS, 0);

/// Run as thread `tid` of the target, which `sched_switch` takes off its
/// CPU asleep: when it sleeps in an epoll wait, its wait begins at `now` (nested
/// inside a park probe's, if any). A futex is not a wait here, since a
/// lock sleeps in one too: the parks that sleep in one keep their uprobes.
#[inline(always)]
pub(crate) fn switch_out(tid: u32, now: u64) {
    // SAFETY: the helpers return the current task and its user registers.
    let task = unsafe { generated::bpf_get_current_task_btf() };
    let regs_ptr = unsafe { generated::bpf_task_pt_regs(task) } as *const u8;
    // A direct load through the typed pointer the helper returns (the
    // verifier makes it a fault-tolerant kernel read), not a helper call:
    // every sleep of every target thread comes here.
    // SAFETY: `orig_ax` is a u64 member of `pt_regs` at this offset.
    let id = unsafe {
        core::ptr::read_volatile(regs_ptr.add(usize::from(pt_regs::ORIG_AX)).cast::<u64>())
    };
    let regs = regs_ptr as u64;
    if !is_epoll_wait(id) {
        return;
    }
    let tgid = target_tgid();
    let Some(slot) = slots::claim_slot(tid) else {
        return;
    };
    let Some(mut state) = slots::loops_mut(slot, tid, true) else {
        return;
    };
    // The same task as a plain number (the verifier allows no arithmetic
    // on the BTF pointer), as `sched_switch` names `next`.
    // SAFETY: the helper returns the current task's address.
    let task = unsafe { generated::bpf_get_current_task() };
    // Recorded once per sleep: the switch back in closes what this opens.
    if WAITING_TASKS
        .insert(
            task,
            u64::from(tid) | u64::from(slot) << 32,
            u64::from(BPF_NOEXIST),
        )
        .is_err()
    {
        return;
    }
    crate::task_filter::added(&WAITING_FILTER, task);
    enter(tgid, tid, &mut state, epoll_fd_of(regs), now);
}

/// `sched_switch` puts task `next` on this CPU at `now`: if it was asleep
/// in an epoll wait ([`switch_out`]), that wait ends now. One array read
/// unless a thread of the target sleeps in one in `next`'s bucket.
#[inline(always)]
pub(crate) fn switch_in(next: u64, now: u64) {
    if !crate::task_filter::may_hold(&WAITING_FILTER, next) {
        return;
    }
    // SAFETY: a read-only look at the map value.
    let Some(&waiting) = (unsafe { WAITING_TASKS.get(next) }) else {
        return;
    };
    let (tid, slot) = (waiting as u32, (waiting >> 32) as u32);
    if WAITING_TASKS.remove(next).is_err() {
        return;
    }
    crate::task_filter::removed(&WAITING_FILTER, next);
    // `next` runs nowhere now: no program of its own writes its slot
    // meanwhile, so this write section is the only one.
    if let Some(mut state) = slots::loops_mut(slot, tid, false) {
        // On the entry-only path the call counted this wait already.
        exit_at(&mut state, now, !crate::waits_on_calls());
    }
}
