//! Records for stack capture (issue #14): what the kernel side copies of a
//! stuck poll's thread (registers and a slice of its user stack) and when
//! that thread left and came back to a CPU.
//!
//! A poll is *armed* once it has run for [`StackConfig::arm_delay_ns`]: only
//! armed polls cost a stack copy. The off-CPU bookkeeping
//! ([`ThreadOffCpu`]) is done for every switch-out inside a task poll that
//! sleeps (a well-behaved task poll never does, so these are rare), so that
//! a poll that went to sleep before it was armed still has its sleep
//! measured, and for every preemption of an armed one. A preemption of a
//! poll not yet armed is left alone: under load most switch-outs inside
//! polls are those, its wait for a CPU is the detector's own count too
//! (`ThreadPolls::preempted_ns`, which a stall's cause takes as its floor),
//! and it has no stack to copy yet.

/// Program and map names.
pub mod names {
    /// Perf event (software cpu-clock) opened per stuck thread: on-CPU samples.
    pub const ON_CPU: &str = "stack_on_cpu";
    /// Ring buffer of [`super::StackSample`]s and [`super::OffCpuEnd`]s.
    pub const STACK_EVENTS: &str = "STACK_EVENTS";
    /// Per-thread [`super::ThreadOffCpu`], keyed by tid.
    pub const THREAD_OFFCPU: &str = "THREAD_OFFCPU";
    /// Kernel task pointer → tid of a target thread switched out inside a poll.
    pub const OFFCPU_TASKS: &str = "OFFCPU_TASKS";
    /// Threads sampled on CPU while attaching, tid → 1.
    pub const CENSUS_TIDS: &str = "CENSUS_TIDS";
    /// Global the agent sets before load: [`super::StackConfig`].
    pub const STACK_CONFIG: &str = "STACK_CONFIG";
}

/// Bytes of user stack copied per sample, from the stack pointer up.
pub const STACK_BYTES: usize = 32 * 1024;
/// The copy goes in chunks of this many bytes, aligned to it, so that no
/// chunk straddles a page and the copy stops cleanly at the stack's top.
pub const STACK_CHUNK_BYTES: usize = 512;
/// Ring buffer for stack records (a power of two, a multiple of the page
/// size): 32 samples, drained every scan (5 ms); it is mapped twice into
/// the agent, so it counts double in its memory.
pub const STACK_RING_BYTES: u32 = 1 << 20;
/// Threads sampled at once while attaching ([`names::CENSUS_TIDS`]).
pub const MAX_CENSUS_THREADS: u32 = 1024;
/// Threads tracked at once in [`names::THREAD_OFFCPU`].
pub const MAX_OFFCPU_THREADS: u32 = 4096;

/// Agent → kernel configuration for stack capture, set before load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackConfig {
    /// 1 when capture is on. The process whose threads are captured is
    /// [`crate::Config::target_tgid`], the one every program filters on.
    pub enabled: u32,
    /// 1: a thread outside any task poll but in a busy stretch of its event
    /// loop (between two waits) is captured like a poll, its stretch's
    /// start standing for the poll's. Set for loop-only targets (Python,
    /// Node), whose stalls are stretches; a Tokio worker's stretches hold
    /// many polls and are not sampled.
    pub loop_stretches: u32,
    /// ns a task poll must have run before its thread's stack is copied.
    pub arm_delay_ns: u64,
    /// ns between two off-CPU samples of one thread (a poll that blocks a
    /// thousand times is sampled at this pace, not a thousand times).
    pub min_sample_gap_ns: u64,
}

impl StackConfig {
    pub const fn zeroed() -> Self {
        Self {
            enabled: 0,
            loop_stretches: 0,
            arm_delay_ns: u64::MAX,
            min_sample_gap_ns: 0,
        }
    }
}

/// Kinds of stack records (first `u32` of each), after the poll events' kinds.
pub mod record_kind {
    /// [`super::StackSample`].
    pub const SAMPLE: u32 = 16;
    /// [`super::OffCpuEnd`].
    pub const OFF_CPU_END: u32 = 17;
}

/// Why a sample was taken ([`StackSample::cause`]).
pub mod sample_cause {
    /// The thread went to sleep (blocked in a system call, a page fault...).
    pub const OFF_CPU: u32 = 1;
    /// The thread was preempted while runnable: it was running this code.
    pub const PREEMPTED: u32 = 2;
    /// The cpu-clock perf event fired while the thread ran user code.
    pub const ON_CPU: u32 = 3;
}

/// `syscall` value when the thread was not inside a system call.
pub const NO_SYSCALL: i64 = -1;

/// A thread's saved user registers and the bottom of its user stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackSample {
    /// [`record_kind::SAMPLE`].
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// [`sample_cause`].
    pub cause: u32,
    /// ns, `CLOCK_MONOTONIC`, when the sample was taken.
    pub ts_ns: u64,
    /// ns, start of the poll the thread was in (its key with `tid`).
    pub poll_start_ns: u64,
    /// User registers: instruction, stack and frame pointer.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// System call number (`orig_ax`) when the thread slept inside one,
    /// [`NO_SYSCALL`] otherwise.
    pub syscall: i64,
    /// User address of `stack[0]` (`sp` rounded down to a chunk).
    pub stack_base: u64,
    /// Valid bytes in `stack`.
    pub stack_len: u32,
    pub pad: u32,
    pub stack: [u8; STACK_BYTES],
}

/// A thread came back on a CPU after sleeping inside an armed poll.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OffCpuEnd {
    /// [`record_kind::OFF_CPU_END`].
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// [`sample_cause::OFF_CPU`] (slept) or [`sample_cause::PREEMPTED`] (waited for a CPU).
    pub cause: u32,
    pub poll_start_ns: u64,
    /// ns, `CLOCK_MONOTONIC`: when it left the CPU and when it came back.
    pub out_ns: u64,
    pub in_ns: u64,
    /// System call it slept in, or [`NO_SYSCALL`].
    pub syscall: i64,
    /// Totals for the poll so far, this interval included: ns asleep and
    /// ns runnable but waiting for a CPU.
    pub off_ns: u64,
    pub wait_ns: u64,
}

/// Off-CPU bookkeeping of one thread (value of [`names::THREAD_OFFCPU`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadOffCpu {
    /// Start of the poll these totals belong to.
    pub poll_start_ns: u64,
    /// When the thread last left the CPU inside that poll; 0 while on a CPU.
    pub out_ns: u64,
    /// ns asleep (voluntary switches) inside the poll, finished intervals.
    pub off_ns: u64,
    /// ns preempted (runnable) inside the poll, finished intervals.
    pub wait_ns: u64,
    /// Registers when it last left the CPU.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// System call of the last switch-out, or [`NO_SYSCALL`].
    pub syscall: i64,
    /// When a sample of this thread was last sent.
    pub last_sample_ns: u64,
    /// [`sample_cause`] of the last switch-out.
    pub cause: u32,
    /// Switch-outs inside the poll that were recorded (every sleep, the
    /// preemptions once armed).
    pub switches: u32,
    /// When the thread, asleep since `out_ns`, was woken (0: not seen):
    /// from there to its switch-in it waited for a CPU
    /// ([`crate::wakeup::split_sleep`]).
    pub woken_ns: u64,
}

const _: () = assert!(core::mem::size_of::<StackSample>() == 80 + STACK_BYTES);
const _: () = assert!(core::mem::size_of::<OffCpuEnd>() == 64);
const _: () = assert!(core::mem::size_of::<ThreadOffCpu>() == 88);
const _: () = assert!(core::mem::size_of::<StackConfig>() == 24);
const _: () = assert!(STACK_BYTES.is_multiple_of(STACK_CHUNK_BYTES));

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `repr(C)`, `Copy`, made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::StackConfig {}
    unsafe impl aya::Pod for super::ThreadOffCpu {}
}
