//! Records for following a command's descendants across fork and exec
//! (`loopguard run`) and a target across its own exec (`loopguard attach`).
//!
//! The kernel side keeps the set of followed processes: tgids the agent
//! seeds ([`names::FOLLOW_PIDS`]) and the kernel task pointers of every
//! thread and process forked from a followed one ([`names::FOLLOW_TASKS`],
//! filled at `sched_process_fork`, emptied at `sched_process_exit`). When a
//! followed process execs, it is stopped (`SIGSTOP`, delivered before the
//! new program's first instruction), recorded in [`names::FOLLOW_STOPPED`]
//! and announced with a [`ExecEvent`]; the agent attaches if it can and
//! resumes it (`SIGCONT`) either way.

/// Program and map names.
pub mod names {
    /// Raw tracepoint `sched_process_fork`: follows children.
    pub const FOLLOW_FORK: &str = "follow_fork";
    /// Raw tracepoint `sched_process_exec`: stops and announces an exec.
    pub const FOLLOW_EXEC: &str = "follow_exec";
    /// Raw tracepoint `sched_process_exit`: forgets a task.
    pub const FOLLOW_EXIT: &str = "follow_exit";
    /// Seeded tgids, tgid → 1.
    pub const FOLLOW_PIDS: &str = "FOLLOW_PIDS";
    /// Followed tasks, kernel task pointer → 1.
    pub const FOLLOW_TASKS: &str = "FOLLOW_TASKS";
    /// Processes stopped at exec and not resumed yet, tgid → 1.
    pub const FOLLOW_STOPPED: &str = "FOLLOW_STOPPED";
    /// Ring buffer of [`super::ExecEvent`]s.
    pub const FOLLOW_EVENTS: &str = "FOLLOW_EVENTS";
    /// Counters: [`super::FollowCounter`].
    pub const FOLLOW_COUNTERS: &str = "FOLLOW_COUNTERS";
    /// Global the agent sets before load: [`super::FollowConfig`].
    pub const FOLLOW_CONFIG: &str = "FOLLOW_CONFIG";
}

/// Seeded tgids at once.
pub const MAX_FOLLOW_PIDS: u32 = 1024;
/// Followed tasks (threads included) alive at once.
pub const MAX_FOLLOW_TASKS: u32 = 8192;
/// Ring buffer for exec events (a power of two, a multiple of the page size).
pub const FOLLOW_RING_BYTES: u32 = 1 << 16;

/// `SIGSTOP` on x86-64 Linux: what the kernel side sends a followed
/// process at exec (`bpf_send_signal`). Here, and not in the eBPF crate,
/// so the agent's unit tests can hold it against `libc::SIGSTOP`.
pub const SIGSTOP: u32 = 19;

/// Set by the agent before load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FollowConfig {
    /// 1: stop a followed process at exec until the agent resumes it.
    pub stop_on_exec: u32,
    /// 1: every exec on the host is announced, followed or not
    /// (`loopguard watch --all`; used with `stop_on_exec` 0).
    pub all_processes: u32,
}

impl FollowConfig {
    pub const fn zeroed() -> Self {
        Self {
            stop_on_exec: 0,
            all_processes: 0,
        }
    }
}

/// A followed process called `exec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecEvent {
    pub tgid: u32,
    /// 1 when the kernel stopped it (`SIGSTOP` queued and recorded in
    /// [`names::FOLLOW_STOPPED`]).
    pub stopped: u32,
    /// `bpf_ktime_get_ns` at the exec.
    pub ts_ns: u64,
}

const _: () = assert!(core::mem::size_of::<ExecEvent>() == 16);
const _: () = assert!(core::mem::size_of::<FollowConfig>() == 8);

/// Indices into [`names::FOLLOW_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowCounter {
    /// Children not followed because [`names::FOLLOW_TASKS`] was full.
    TasksFull = 0,
    /// Exec events lost because the ring buffer was full (the process was
    /// not stopped either). Keep it last: [`FOLLOW_COUNTER_SLOTS`] is
    /// counted from it.
    EventsLost = 1,
}

/// Slots in [`names::FOLLOW_COUNTERS`]: one per [`FollowCounter`], tied
/// to its last variant so a new counter cannot be left out.
pub const FOLLOW_COUNTER_SLOTS: u32 = FollowCounter::EventsLost as u32 + 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, `Copy`, integers only, no padding.
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::FollowConfig {}
}
