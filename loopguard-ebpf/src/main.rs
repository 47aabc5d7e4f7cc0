//! loopguard's kernel side: times every Tokio task poll of one process.
//!
//! - `poll_enter` (uprobe on each `tokio::runtime::task::raw::poll` copy)
//!   pushes a frame on the calling thread's poll stack: start time, task id,
//!   header, return address, and whether the caller is blocking-pool code.
//! - `poll_exit` (uretprobe on the same copies) pops it, counts the poll in a
//!   per-CPU log-linear histogram, adds a task poll's time to the thread's
//!   busy total and, only when a worker poll lasted at least the report
//!   floor, sends one `PollEvent` through the ring buffer.
//! - `request_start` / `request_end` (uprobes on the `loopguard:*` USDT
//!   sites the middleware leaves) read the probe arguments as the agent
//!   decoded them (`USDT_SPECS`) and send the request, with the task being
//!   polled when it started, through the ring buffer.
//! - `wait_enter` / `wait_exit` ([`wait`]) time each event-loop thread's
//!   waits for events and the busy stretches between them.
//! - `thread_exit` (raw tracepoint `sched_process_exit`, which needs no
//!   tracefs) drops a dead thread's stack and wait state.
//! - `stack_sched_switch` / `stack_on_cpu` ([`stacks`]): the user stacks of
//!   stuck polls, on and off CPU, and their off-CPU time (issue #14).
//!
//! The agent reads `THREAD_POLLS` directly to see polls that are still stuck.
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
        generated::{self, bpf_get_attach_cookie},
    },
    macros::{map, raw_tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

mod stacks;
mod wait;

use loopguard_common::{
    COUNTER_SLOTS, Config, Counter, EVENTS_RING_BYTES, EventKind, MAX_BLOCKING_RANGES,
    MAX_POLL_DEPTH, MAX_THREADS, MAX_USDT_SITES, PollCookie, PollEvent, PollFrame, RequestEndEvent,
    RequestStartEvent, ThreadPolls, UsdtArg, UsdtSpec, arg_kind, frame_flags,
    hist::{self, PollHistogram},
};

/// Set by the agent before load (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::zeroed();

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static THREAD_POLLS: HashMap<u32, ThreadPolls> = HashMap::with_max_entries(MAX_THREADS, 0);

/// One entry per CPU holding every slot, so the agent reads it in one lookup.
#[map]
static POLL_HISTOGRAM: PerCpuArray<PollHistogram> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Submit flags for request records: no wakeup (the agent drains the ring
/// every scan interval), unless the ring is filling up. Waking the reader
/// costs an irq_work (a self-IPI, a VM exit under virtualisation) and was
/// most of `request_start`'s cost when every record woke the agent.
#[inline(always)]
fn quiet_submit_flags() -> u64 {
    let pending = EVENTS.query(u64::from(aya_ebpf::bindings::BPF_RB_AVAIL_DATA));
    if pending > u64::from(EVENTS_RING_BYTES / 4) {
        u64::from(aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(aya_ebpf::bindings::BPF_RB_NO_WAKEUP)
    }
}

/// Polls and busy stretches at least this long (ns) are sent to the agent.
#[inline(always)]
fn report_floor_ns() -> u64 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const CONFIG.report_floor_ns) }
}

#[inline(always)]
fn target_tgid() -> u32 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const CONFIG.target_tgid) }
}

/// Adds `n` to a per-CPU slot atomically: a program can be preempted by
/// another on the same CPU, and a plain `+=` would lose one of the two.
#[inline(always)]
fn add(slot: *mut u64, n: u64) {
    // SAFETY: `slot` is a valid, aligned map value pointer for this run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n) };
}

#[inline(always)]
fn add_one(slot: *mut u64) {
    add(slot, 1);
}

/// Closes a preempted wait still open on `stack`: the thread runs again, so
/// it was switched back in at this CPU's last context switch.
#[inline(always)]
fn settle_preemption(stack: &mut ThreadPolls, switched_in_ns: u64) {
    if stack.preempted_since_ns != 0 {
        stack.preempted_ns += switched_in_ns.saturating_sub(stack.preempted_since_ns);
        stack.preempted_since_ns = 0;
    }
}

/// ns of this CPU's last context switch (0 when unknown).
#[inline(always)]
fn last_switch_ns() -> u64 {
    LAST_SWITCH.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn bump(counter: Counter) {
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
fn frame_index(i: usize) -> usize {
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
    };

    let stack = match THREAD_POLLS.get_ptr_mut(tid) {
        Some(stack) => stack,
        None => {
            let empty = ThreadPolls::default();
            if THREAD_POLLS.insert(tid, empty, 0).is_err() {
                bump(Counter::ThreadMapFull);
                return Ok(());
            }
            THREAD_POLLS.get_ptr_mut(tid).ok_or(1i64)?
        }
    };
    // SAFETY: map value pointer, valid for this program run.
    let stack = unsafe { &mut *stack };
    settle_preemption(stack, last_switch_ns());
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
    let Some(stack) = THREAD_POLLS.get_ptr_mut(tid) else {
        bump(Counter::UnmatchedReturns);
        return Ok(());
    };
    // SAFETY: map value pointer, valid for this program run.
    let stack = unsafe { &mut *stack };
    if stack.depth == 0 {
        bump(Counter::UnmatchedReturns);
        return Ok(());
    }
    stack.depth -= 1;
    let depth = stack.depth as usize;
    if depth >= MAX_POLL_DEPTH {
        return Ok(());
    }
    let Some(&frame) = stack.frames.get(frame_index(depth)) else {
        return Ok(());
    };
    let duration_ns = end_ns.saturating_sub(frame.start_ns);
    settle_preemption(stack, last_switch_ns());
    let preempted_ns = stack.preempted_ns.saturating_sub(frame.preempted_at_entry);

    if frame.flags & frame_flags::BLOCKING != 0 {
        bump(Counter::BlockingPolls);
        return Ok(());
    }
    // A scheduler loop's poll spans all the task polls inside it: it is
    // neither a task poll nor busy time of its own.
    if frame.flags & frame_flags::CONTAINER != 0 {
        return Ok(());
    }
    // The histogram holds the time each poll held its thread: a preempted
    // stretch is the scheduler's, and would inflate the adaptive baseline.
    count_poll(duration_ns - preempted_ns.min(duration_ns));
    // Only this thread writes its stack: plain adds are exact here.
    stack.busy_ns += duration_ns;
    stack.task_polls += 1;
    // Shipped by the time the poll held its thread, as the agent judges it.
    if duration_ns - preempted_ns.min(duration_ns) < report_floor_ns() {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<PollEvent>(0) else {
        bump(Counter::DroppedEvents);
        return Ok(());
    };
    entry.write(PollEvent {
        kind: EventKind::PollEnd as u32,
        pid: tgid,
        tid,
        flags: frame.flags,
        start_ns: frame.start_ns,
        duration_ns,
        task_id: frame.task_id,
        header: frame.header,
        // The kernel points `rip` back at the caller before a return probe runs.
        // SAFETY: `regs` points at the saved registers of the probed thread.
        return_addr: unsafe { (*ctx.regs).rip },
        copy_index: frame.copy_index,
        depth: depth as u32 + 1,
        preempted_ns: preempted_ns.min(duration_ns),
    });
    entry.submit(0);
    Ok(())
}

#[map]
static USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_USDT_SITES, 0);

/// The probed thread's saved registers (`struct pt_regs`, 21 words on
/// x86-64), copied once per USDT hit with constant-offset context loads: one
/// copy instead of a helper call per argument.
type SavedRegs = [u64; 21];

/// Reads one USDT argument as its spec says, truncated and sign-extended.
#[inline(always)]
fn usdt_arg(regs: &SavedRegs, arg: &UsdtArg) -> u64 {
    let register = || {
        regs.get(usize::from(arg.reg_offset & 0xff) / 8)
            .copied()
            .unwrap_or(0)
    };
    let raw = match arg.kind {
        arg_kind::REGISTER => register(),
        arg_kind::MEMORY => {
            let address = (register() as i64).wrapping_add(arg.value) as u64;
            // SAFETY: bpf_probe_read_user tolerates any address.
            unsafe { bpf_probe_read_user(address as *const u64) }.unwrap_or(0)
        }
        arg_kind::IMMEDIATE => arg.value as u64,
        _ => 0,
    };
    match (arg.size, arg.signed != 0) {
        (1, false) => raw & 0xff,
        (1, true) => i64::from(raw as u8 as i8) as u64,
        (2, false) => raw & 0xffff,
        (2, true) => i64::from(raw as u16 as i16) as u64,
        (4, false) => raw & 0xffff_ffff,
        (4, true) => i64::from(raw as u32 as i32) as u64,
        _ => raw,
    }
}

/// Copies at most `N` bytes of a user string into `buf`.
#[inline(always)]
fn read_user_str<const N: usize>(ptr: u64, len: u64, buf: *mut [u8; N]) {
    let n = if len > N as u64 { N as u64 } else { len };
    if ptr == 0 || n == 0 {
        return;
    }
    // SAFETY: `buf` has room for N >= n bytes; the helper tolerates any source.
    unsafe {
        generated::bpf_probe_read_user(buf.cast(), n as u32, ptr as *const core::ffi::c_void)
    };
}

/// The task id, header and flags of the poll on top of `tid`'s stack.
#[inline(always)]
fn current_poll(tid: u32) -> (u64, u64, u32) {
    // SAFETY: a read-only look at the map value.
    let Some(stack) = (unsafe { THREAD_POLLS.get(tid) }) else {
        return (0, 0, frame_flags::NO_POLL);
    };
    let depth = stack.depth as usize;
    if depth == 0 || depth > MAX_POLL_DEPTH {
        return (0, 0, frame_flags::NO_POLL);
    }
    match stack.frames.get(frame_index(depth - 1)) {
        Some(frame) => (frame.task_id, frame.header, frame.flags),
        None => (0, 0, frame_flags::NO_POLL),
    }
}

#[uprobe]
pub fn request_start(ctx: ProbeContext) -> u32 {
    let _ = try_request_start(&ctx);
    0
}

/// The firing thread (tgid, tid) and the argument specs of the USDT site
/// that fired, or `None` for another process.
#[inline(always)]
fn usdt_site(ctx: &ProbeContext) -> Option<(u32, u32, &'static UsdtSpec)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != target_tgid() {
        return None;
    }
    // SAFETY: the helper only reads the cookie of the link that fired.
    let site = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    Some((tgid, pid_tgid as u32, USDT_SPECS.get(site)?))
}

fn try_request_start(ctx: &ProbeContext) -> Result<(), i64> {
    let Some((tgid, tid, spec)) = usdt_site(ctx) else {
        return Ok(());
    };
    // SAFETY: a uprobe's context is the thread's `pt_regs`, readable in full.
    let regs: SavedRegs = unsafe { core::ptr::read(ctx.regs.cast::<SavedRegs>()) };
    let arg = |i: usize| spec.args.get(i).map_or(0, |arg| usdt_arg(&regs, arg));
    let Some(mut entry) = EVENTS.reserve::<RequestStartEvent>(0) else {
        bump(Counter::DroppedEvents);
        return Ok(());
    };
    let (task_id, header, flags) = current_poll(tid);
    let event = entry.as_mut_ptr();
    let (method_len, route_len, path_len) = (arg(3), arg(5), arg(7));
    // SAFETY: `event` points at the reserved record, written field by field.
    unsafe {
        (*event).kind = EventKind::RequestStart as u32;
        (*event).pid = tgid;
        (*event).tid = tid;
        (*event).flags = flags;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).task_id = task_id;
        (*event).header = header;
        (*event).request_id = arg(1);
        (*event).layout = arg(0);
        (*event).method_len = method_len as u32;
        (*event).route_len = route_len as u32;
        (*event).path_len = path_len as u32;
        (*event).pad = 0;
        read_user_str(arg(2), method_len, &raw mut (*event).method);
        read_user_str(arg(4), route_len, &raw mut (*event).route);
        read_user_str(arg(6), path_len, &raw mut (*event).path);
    }
    entry.submit(quiet_submit_flags());
    Ok(())
}

#[uprobe]
pub fn request_end(ctx: ProbeContext) -> u32 {
    let _ = try_request_end(&ctx);
    0
}

fn try_request_end(ctx: &ProbeContext) -> Result<(), i64> {
    let Some((tgid, tid, spec)) = usdt_site(ctx) else {
        return Ok(());
    };
    // SAFETY: a uprobe's context is the thread's `pt_regs`, readable in full.
    let regs: SavedRegs = unsafe { core::ptr::read(ctx.regs.cast::<SavedRegs>()) };
    let arg = |i: usize| spec.args.get(i).map_or(0, |arg| usdt_arg(&regs, arg));
    let event = RequestEndEvent {
        kind: EventKind::RequestEnd as u32,
        pid: tgid,
        tid,
        status: arg(2) as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        request_id: arg(1),
        layout: arg(0),
    };
    if EVENTS
        .output::<RequestEndEvent>(&event, quiet_submit_flags())
        .is_err()
    {
        bump(Counter::DroppedEvents);
    }
    Ok(())
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn thread_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == target_tgid() {
        let _ = THREAD_POLLS.remove(pid_tgid as u32);
        wait::forget_thread(pid_tgid as u32);
    }
    0
}

#[map]
static LAST_SWITCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `sched_switch(preempt, prev, next, prev_state)`, run as `prev`: notes the
/// CPU's switch time, and when a thread of the target leaves inside a poll
/// while still runnable, the start of its wait.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn thread_switch(ctx: RawTracePointContext) -> i32 {
    // SAFETY: plain reads of the tracepoint's arguments.
    let args = ctx.as_ptr() as *const u64;
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = LAST_SWITCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU map value pointer; only this CPU writes it.
    let switched_in_ns = unsafe { core::ptr::replace(last, now) };
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    // SAFETY: raw tracepoint arguments 0 (preempt) and 3 (prev_state).
    let (preempt, prev_state) = unsafe { (*args, *args.add(3)) };
    // Still on the run queue: preempted, or yielding (TASK_RUNNING is 0).
    let runnable = preempt & 1 != 0 || prev_state as u32 == 0;
    wait::note_switch(pid_tgid as u32, switched_in_ns, runnable, now);
    let Some(stack) = THREAD_POLLS.get_ptr_mut(pid_tgid as u32) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let stack = unsafe { &mut *stack };
    settle_preemption(stack, switched_in_ns);
    if runnable && stack.depth > 0 {
        stack.preempted_since_ns = now;
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
