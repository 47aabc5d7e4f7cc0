//! Following a command's descendants across fork and exec (see
//! `loopguard_common::follow`). Three raw tracepoints, none of which reads a
//! kernel structure: a task is known by its `task_struct` address, which
//! the fork tracepoint passes and `bpf_get_current_task` returns, so no
//! field offset (BTF, CO-RE) is needed.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::RawTracePointContext,
};
use loopguard_common::follow::{
    ExecEvent, FOLLOW_COUNTER_SLOTS, FOLLOW_RING_BYTES, FollowConfig, FollowCounter,
    MAX_FOLLOW_PIDS, MAX_FOLLOW_TASKS, SIGSTOP,
};

/// Set by the agent before load.
#[unsafe(no_mangle)]
static FOLLOW_CONFIG: FollowConfig = FollowConfig::zeroed();

#[map]
static FOLLOW_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_FOLLOW_PIDS, 0);

#[map]
static FOLLOW_TASKS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_FOLLOW_TASKS, 0);

#[map]
static FOLLOW_STOPPED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_FOLLOW_PIDS, 0);

#[map]
static FOLLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FOLLOW_RING_BYTES, 0);

#[map]
static FOLLOW_COUNTERS: Array<u64> = Array::with_max_entries(FOLLOW_COUNTER_SLOTS, 0);

fn bump(counter: FollowCounter) {
    if let Some(slot) = FOLLOW_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a valid, aligned map value pointer.
        unsafe {
            core::intrinsics::atomic_xadd::<_, _, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, 1u64,
            )
        };
    }
}

/// Whether the current task belongs to a followed process.
fn current_followed(task: u64) -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: lookups of plain values, only tested for presence.
    unsafe { FOLLOW_PIDS.get(tgid).is_some() || FOLLOW_TASKS.get(task).is_some() }
}

/// `sched_process_fork(parent, child)`, run as the parent: a child of a
/// followed task is followed (threads too: a thread may fork or exec later).
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn follow_fork(ctx: RawTracePointContext) -> i32 {
    // SAFETY: a helper with no arguments.
    let task = unsafe { bpf_get_current_task() };
    if !current_followed(task) {
        return 0;
    }
    // SAFETY: raw tracepoint argument 1 is the child's task pointer.
    let child = unsafe { *(ctx.as_ptr() as *const u64).add(1) };
    if FOLLOW_TASKS.insert(child, 1, 0).is_err() {
        bump(FollowCounter::TasksFull);
    }
    0
}

/// `sched_process_exec`, run as the process after the exec: a followed one
/// is stopped before its new program runs and announced.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn follow_exec(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: a helper with no arguments.
    let task = unsafe { bpf_get_current_task() };
    // SAFETY: a plain read of the config global.
    let all = unsafe { core::ptr::read_volatile(&raw const FOLLOW_CONFIG.all_processes) } != 0;
    if !all && !current_followed(task) {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(mut entry) = FOLLOW_EVENTS.reserve::<ExecEvent>(0) else {
        // Nobody would hear of it, so it is not stopped either.
        bump(FollowCounter::EventsLost);
        return 0;
    };
    // SAFETY: a plain read of the config global.
    let stop = unsafe { core::ptr::read_volatile(&raw const FOLLOW_CONFIG.stop_on_exec) } != 0;
    // Recorded before the signal: whoever resumes (the agent, or its
    // watchdog if the agent dies) finds every stop in the map.
    let stopped = stop
        && FOLLOW_STOPPED.insert(tgid, 1, 0).is_ok()
        // SAFETY: signals the current process, which is not exiting.
        && (unsafe { bpf_send_signal(SIGSTOP) } == 0 || {
            let _ = FOLLOW_STOPPED.remove(tgid);
            false
        });
    entry.write(ExecEvent {
        tgid,
        stopped: u32::from(stopped),
        // SAFETY: a helper with no arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    });
    entry.submit(0);
    0
}

/// `sched_process_exit`, run as the exiting thread: forget it. A process
/// stopped at exec has one thread, its leader: when that exits (killed
/// while stopped), its stop is forgotten too, so its pid, once reused, is
/// never sent the `SIGCONT` meant for it.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn follow_exit(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: a helper with no arguments.
    let task = unsafe { bpf_get_current_task() };
    let _ = FOLLOW_TASKS.remove(task);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if pid == tgid {
        let _ = FOLLOW_STOPPED.remove(tgid);
    }
    0
}
