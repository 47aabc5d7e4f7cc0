//! Stack capture for stuck polls, and for loop-only targets stuck busy
//! stretches of their event loop (issue #14).
//!
//! - On `sched_switch` (run by `thread_switch`, [`on_switch_out`] and
//!   [`on_switch_in`]): when a target
//!   thread leaves its CPU inside a task poll asleep (or preempted, once
//!   the poll has run past the arm delay), records when, why, its user
//!   registers and the system call it sleeps in; when it comes back, adds
//!   the interval to the poll's off-CPU totals. A poll that has run past
//!   the arm delay also gets a copy of its user stack.
//! - `stack_on_cpu` (perf event, cpu-clock, opened by the agent only on a
//!   thread whose poll is stuck): copies the registers and user stack.
//!
//! Nothing here runs on a poll's entry or return: healthy polls pay nothing.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated,
    },
    macros::{map, perf_event},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::PerfEventContext,
};
use loopguard_common::{
    Counter, MAX_POLL_DEPTH, frame_flags,
    stacks::{
        MAX_CENSUS_THREADS, MAX_OFFCPU_THREADS, NO_SYSCALL, OffCpuEnd, STACK_BYTES,
        STACK_CHUNK_BYTES, STACK_RING_BYTES, StackConfig, StackSample, ThreadOffCpu, record_kind,
        sample_cause,
    },
    wakeup::split_sleep,
};

use crate::{add, bump, frame_index, slots, target_tgid};

/// Set by the agent before load (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static STACK_CONFIG: StackConfig = StackConfig::zeroed();

#[map]
static STACK_EVENTS: RingBuf = RingBuf::with_byte_size(STACK_RING_BYTES, 0);

#[map]
static THREAD_OFFCPU: LruHashMap<u32, ThreadOffCpu> =
    LruHashMap::with_max_entries(MAX_OFFCPU_THREADS, 0);

/// Kernel task pointer of a thread switched out inside a poll → its tid, so
/// the switch back in (where only the task pointer is at hand) finds it.
#[map]
static OFFCPU_TASKS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_OFFCPU_THREADS, 0);

/// Threads the agent samples while attaching, whether or not a poll is
/// known on them (a poll already stuck before attaching has no entry).
#[map]
static CENSUS_TIDS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_CENSUS_THREADS, 0);

/// Entries in `OFFCPU_TASKS` (an upper bound): while 0, a switch-in costs no lookup.
#[map]
static OFFCPU_WATCHED: Array<u64> = Array::with_max_entries(1, 0);

/// The `syscall` instruction (`0f 05`): the bytes before a sleeping
/// thread's user `rip` when it entered the kernel by a system call.
const SYSCALL_INSN: u16 = 0x050f;

#[inline(always)]
fn config_u32(field: *const u32) -> u32 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn config_u64(field: *const u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(field) }
}

/// The start of the task poll `tid` is inside now (the innermost poll, when
/// it is neither a scheduler loop nor blocking-pool work).
#[inline(always)]
fn current_task_poll(slot: u32, tid: u32) -> Option<u64> {
    // `None` too when the thread was switched out in the middle of writing
    // its stack (a preempted probe): the stack is not whole then.
    let stack = slots::polls_in(slot, tid)?;
    let depth = stack.depth as usize;
    if depth == 0 || depth > MAX_POLL_DEPTH {
        return None;
    }
    let frame = stack.frames.get(frame_index(depth - 1))?;
    if frame.flags & (frame_flags::CONTAINER | frame_flags::BLOCKING) != 0 {
        return None;
    }
    Some(frame.start_ns)
}

/// The start of what `tid` is stuck in, if anything: its task poll, or for
/// loop-only targets its event loop's busy stretch.
#[inline(always)]
fn current_stretch(tid: u32) -> Option<u64> {
    current_stretch_in(slots::slot_of(tid)?, tid)
}

/// [`current_stretch`] where the slot is known already.
#[inline(always)]
fn current_stretch_in(slot: u32, tid: u32) -> Option<u64> {
    current_task_poll(slot, tid).or_else(|| {
        if config_u32(&raw const STACK_CONFIG.loop_stretches) != 0 {
            crate::wait::busy_since(slot, tid)
        } else {
            None
        }
    })
}

/// `stolen` ns the host took from `tid` while it ran (steal time, found
/// by `steal::thread_runtime` at `now`): a wait for a CPU as much as a
/// preemption, so it joins the preempted total of the poll (or busy
/// stretch) it ran in, at most the time that poll has run. Without it a
/// stall's `cpu_wait_ms` left steal in the held time that the detector
/// had already left out (issue #23).
#[inline(always)]
pub(crate) fn add_stolen(tid: u32, stolen: u64, now: u64) {
    if config_u32(&raw const STACK_CONFIG.enabled) == 0 {
        return;
    }
    let Some(poll_start) = current_stretch(tid) else {
        return;
    };
    let state = match THREAD_OFFCPU.get_ptr_mut(tid) {
        Some(state) => state,
        None => {
            if THREAD_OFFCPU
                .insert(tid, ThreadOffCpu::default(), 0)
                .is_err()
            {
                return;
            }
            let Some(state) = THREAD_OFFCPU.get_ptr_mut(tid) else {
                return;
            };
            state
        }
    };
    // SAFETY: map value pointer, valid for this run; the thread runs this
    // itself, so neither its switch-out nor its switch-in writes it now.
    let state = unsafe { &mut *state };
    if state.poll_start_ns != poll_start {
        *state = ThreadOffCpu {
            poll_start_ns: poll_start,
            ..ThreadOffCpu::default()
        };
    }
    state.wait_ns += stolen.min(now.saturating_sub(poll_start));
}

/// `tid`, asleep and now being switched back in, was woken at `woken_ns`
/// (`wakeup::switch_in`, which runs on the same switch just before
/// [`switch_in`] here): its sleep is split there.
#[inline(always)]
pub(crate) fn note_woken(tid: u32, woken_ns: u64) {
    if config_u32(&raw const STACK_CONFIG.enabled) == 0 {
        return;
    }
    let Some(state) = THREAD_OFFCPU.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: map value pointer, valid for this run; the thread is not on
    // a CPU, and its switch-in is this same switch.
    let state = unsafe { &mut *state };
    if state.out_ns != 0 {
        state.woken_ns = woken_ns;
    }
}

#[inline(always)]
fn watched() -> Option<*mut u64> {
    OFFCPU_WATCHED.get_ptr_mut(0)
}

/// Registers and the bottom of the user stack, into the stack ring buffer.
/// Runs in the sampled thread's context (its memory is the current one).
#[inline(always)]
fn send_sample(cause: u32, tid: u32, poll_start_ns: u64, now: u64, regs: &pt_regs, syscall: i64) {
    let Some(mut entry) = STACK_EVENTS.reserve::<StackSample>(0) else {
        bump(Counter::DroppedEvents);
        return;
    };
    let sample = entry.as_mut_ptr();
    let base = regs.rsp & !(STACK_CHUNK_BYTES as u64 - 1);
    // SAFETY: `sample` points at the reserved record, written field by field;
    // every copy stays inside `stack` (chunk index < STACK_BYTES / chunk).
    unsafe {
        (*sample).kind = record_kind::SAMPLE;
        (*sample).pid = target_tgid();
        (*sample).tid = tid;
        (*sample).cause = cause;
        (*sample).ts_ns = now;
        (*sample).poll_start_ns = poll_start_ns;
        (*sample).ip = regs.rip;
        (*sample).sp = regs.rsp;
        (*sample).bp = regs.rbp;
        (*sample).syscall = syscall;
        (*sample).stack_base = base;
        (*sample).pad = 0;
        let mut copied = 0u32;
        let mut chunk = 0usize;
        while chunk < STACK_BYTES / STACK_CHUNK_BYTES {
            let offset = chunk * STACK_CHUNK_BYTES;
            let dst = (&raw mut (*sample).stack).cast::<u8>().add(offset);
            let read = generated::bpf_probe_read_user(
                dst.cast(),
                STACK_CHUNK_BYTES as u32,
                (base + offset as u64) as *const core::ffi::c_void,
            );
            if read != 0 {
                break;
            }
            copied += STACK_CHUNK_BYTES as u32;
            chunk += 1;
        }
        (*sample).stack_len = copied;
    }
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}

/// Run by `thread_switch` as thread `tid` of the target (slot `slot`)
/// leaves its CPU (`preempted`: still runnable), after its own
/// bookkeeping: the poll and stretch are as it left them. Folded into that program, not a second
/// one on `sched_switch`: each program run on every context switch of the
/// host costs its entry and checks again (issue #24).
#[inline(always)]
pub(crate) fn on_switch_out(slot: u32, tid: u32, preempted: bool) {
    if config_u32(&raw const STACK_CONFIG.enabled) != 0 {
        let _ = switch_out(slot, tid, preempted);
    }
}

/// Run by `thread_switch` for every context switch: task `next` comes
/// back on a CPU. One array read while no target thread is off CPU inside
/// a poll.
#[inline(always)]
pub(crate) fn on_switch_in(next: u64) {
    // SAFETY: a valid, aligned map value pointer.
    if config_u32(&raw const STACK_CONFIG.enabled) != 0
        && watched().is_some_and(|count| unsafe { core::ptr::read_volatile(count) } > 0)
    {
        switch_in(next);
    }
}

fn switch_out(slot: u32, tid: u32, preempted: bool) -> Result<(), i64> {
    let poll_start = current_stretch_in(slot, tid).ok_or(0i64)?;
    // `thread_switch`, which runs this, dated the switch.
    let now = crate::last_switch_ns();
    let arm_delay = config_u64(&raw const STACK_CONFIG.arm_delay_ns);
    let armed = now.saturating_sub(poll_start) >= arm_delay;
    if preempted && !armed {
        // Nothing to copy yet, and the wait it begins is counted by
        // `thread_switch` as the poll's preempted time, which the stall's
        // cause takes as its floor: the common case under load costs no
        // register read and no map update (`loopguard_common::stacks`).
        return Ok(());
    }
    // SAFETY: helpers that take no pointer from us but the current task.
    let task = unsafe { generated::bpf_get_current_task_btf() };
    let regs_ptr = unsafe { generated::bpf_task_pt_regs(task) } as *const pt_regs;
    // SAFETY: the helper tolerates any address.
    let regs = unsafe { bpf_probe_read_kernel(regs_ptr) }?;
    let cause = if preempted {
        sample_cause::PREEMPTED
    } else {
        sample_cause::OFF_CPU
    };
    let in_syscall = !preempted
        && unsafe { bpf_probe_read_user(regs.rip.wrapping_sub(2) as *const u16) }
            .is_ok_and(|insn| insn == SYSCALL_INSN);
    let syscall = if in_syscall {
        regs.orig_rax as i64
    } else {
        NO_SYSCALL
    };

    let state = match THREAD_OFFCPU.get_ptr_mut(tid) {
        Some(state) => state,
        None => {
            THREAD_OFFCPU.insert(tid, ThreadOffCpu::default(), 0)?;
            THREAD_OFFCPU.get_ptr_mut(tid).ok_or(0i64)?
        }
    };
    // SAFETY: map value pointer, valid for this run; only this thread writes it
    // while it runs, and its switch-in cannot run before this switch-out ends.
    let state = unsafe { &mut *state };
    if state.poll_start_ns != poll_start {
        *state = ThreadOffCpu {
            poll_start_ns: poll_start,
            ..ThreadOffCpu::default()
        };
    }
    state.out_ns = now;
    state.ip = regs.rip;
    state.sp = regs.rsp;
    state.bp = regs.rbp;
    state.syscall = syscall;
    state.cause = cause;
    state.switches += 1;
    if OFFCPU_TASKS
        .insert(task as u64, tid, u64::from(BPF_NOEXIST))
        .is_ok()
        && let Some(count) = watched()
    {
        add(count, 1);
    }

    let gap = config_u64(&raw const STACK_CONFIG.min_sample_gap_ns);
    if armed && now.saturating_sub(state.last_sample_ns) >= gap {
        state.last_sample_ns = now;
        send_sample(cause, tid, poll_start, now, &regs, syscall);
    }
    Ok(())
}

fn switch_in(next: u64) {
    // SAFETY: a read-only look at the map value.
    let Some(&tid) = (unsafe { OFFCPU_TASKS.get(next) }) else {
        return;
    };
    // `thread_switch`, which runs this, dated the switch.
    let now = crate::last_switch_ns();
    if OFFCPU_TASKS.remove(next).is_ok()
        && let Some(count) = watched()
    {
        add(count, u64::MAX);
    }
    let Some(state) = THREAD_OFFCPU.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: map value pointer, valid for this run.
    let state = unsafe { &mut *state };
    if state.out_ns == 0 {
        return;
    }
    if state.cause == sample_cause::OFF_CPU {
        // Asleep until its wake-up, then waiting for a CPU.
        let (asleep, waited) = split_sleep(state.out_ns, state.woken_ns, now);
        state.off_ns += asleep;
        state.wait_ns += waited;
    } else {
        state.wait_ns += now.saturating_sub(state.out_ns);
    }
    state.woken_ns = 0;
    let out_ns = state.out_ns;
    state.out_ns = 0;
    if now.saturating_sub(state.poll_start_ns) < config_u64(&raw const STACK_CONFIG.arm_delay_ns) {
        return;
    }
    let end = OffCpuEnd {
        kind: record_kind::OFF_CPU_END,
        pid: target_tgid(),
        tid,
        cause: state.cause,
        poll_start_ns: state.poll_start_ns,
        out_ns,
        in_ns: now,
        syscall: state.syscall,
        off_ns: state.off_ns,
        wait_ns: state.wait_ns,
    };
    if STACK_EVENTS
        .output::<OffCpuEnd>(&end, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        bump(Counter::DroppedEvents);
    }
}

#[perf_event]
pub fn stack_on_cpu(ctx: PerfEventContext) -> u32 {
    if crate::empty_programs() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    let tid = pid_tgid as u32;
    // SAFETY: the context is the perf sample's `bpf_perf_event_data`.
    let regs = unsafe { (*ctx.ctx).regs };
    // Only samples taken in user mode carry user registers.
    if regs.cs & 3 != 3 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match current_stretch(tid) {
        Some(poll_start) => {
            let arm_delay = config_u64(&raw const STACK_CONFIG.arm_delay_ns);
            if now.saturating_sub(poll_start) >= arm_delay {
                send_sample(
                    sample_cause::ON_CPU,
                    tid,
                    poll_start,
                    now,
                    &regs,
                    NO_SYSCALL,
                );
            }
        }
        // A thread the agent looks at while attaching: whatever it runs.
        // SAFETY: a read-only look at the map value.
        None if unsafe { CENSUS_TIDS.get(tid) }.is_some() => {
            send_sample(sample_cause::ON_CPU, tid, 0, now, &regs, NO_SYSCALL);
        }
        None => {}
    }
    0
}
