//! Records and constants shared by loopguard's eBPF programs (`loopguard-ebpf`)
//! and its agent (`loopguard-user`).
//!
//! Only plain `#[repr(C)]` types and constants live here, so both sides agree
//! on every byte. The agent decodes event kinds with `TryFrom<u32>`, so an
//! unknown kind is an error rather than a misread.
#![no_std]

pub mod follow;
pub mod hist;
pub mod requests;
pub mod slots;
pub mod stacks;
pub mod steal;
pub mod syscalls;
pub mod task_filter;
pub mod wakeup;

/// Program names, so the `#[uprobe]` fns and `program_mut(NAME)` cannot drift.
pub mod names {
    /// uprobe on the first instruction of every `tokio::runtime::task::raw::poll` copy.
    pub const POLL_ENTER: &str = "poll_enter";
    /// uretprobe on every `raw::poll` copy.
    pub const POLL_EXIT: &str = "poll_exit";
    /// Raw tracepoint `sched_process_exit`: forgets a thread's poll stack.
    pub const THREAD_EXIT: &str = "thread_exit";
    /// Raw tracepoint `sched_switch`: times how long a thread in a poll waits
    /// runnable but switched out (preempted), so that wait is not blamed on
    /// the poll.
    pub const THREAD_SWITCH: &str = "thread_switch";
    /// Raw tracepoint `sched_stat_runtime`: time the host did not run the
    /// vCPU of a thread inside a poll (steal time, [`crate::steal`]), so
    /// that pause is not blamed on the poll either.
    pub const THREAD_RUNTIME: &str = "thread_runtime";
    /// Raw tracepoint `local_timer_entry`: a pause the steal clock never
    /// heard of, seen as timer interrupts that did not come
    /// ([`crate::steal::paused_ns`]).
    pub const CPU_TIMER: &str = "cpu_timer";
    /// Per-CPU `u64`: ns of the CPU's last local timer interrupt.
    pub const CPU_TIMER_MAP: &str = "CPU_TIMER";
    /// Raw tracepoint `sched_wakeup`: when a thread of the target asleep
    /// inside a poll or a busy stretch was woken, so its wait for a CPU
    /// after that is not blamed on the poll ([`crate::wakeup`]).
    pub const THREAD_WAKEUP: &str = "thread_wakeup";
    /// uprobe on every `loopguard:request_start` USDT site.
    pub const REQUEST_START: &str = "request_start";
    /// uprobe on every `loopguard:request_end` USDT site.
    pub const REQUEST_END: &str = "request_end";
    /// Argument specs of each USDT site, indexed by the site's cookie.
    pub const USDT_SPECS: &str = "USDT_SPECS";
    /// uprobe on every function an event-loop thread waits in: the C
    /// library's `epoll_wait` / `epoll_pwait` / `epoll_pwait2`, and Tokio's
    /// park functions (a parked worker or `block_on` thread waits on a
    /// futex, not in epoll).
    pub const WAIT_ENTER: &str = "wait_enter";
    /// uretprobe on the same functions.
    pub const WAIT_EXIT: &str = "wait_exit";
    /// uprobe on the instruction a call returns to, where a build inlined
    /// a Tokio park and only its call to the condition variable's wait is
    /// left to probe (`wait_enter` goes on the call itself).
    pub const WAIT_RETURN: &str = "wait_return";
    /// Raw tracepoint `sys_enter`: epoll waits as syscalls, for programs
    /// whose wrappers cannot be probed.
    pub const WAIT_SYSCALL_ENTER: &str = "wait_syscall_enter";
    /// Raw tracepoint `sys_exit`, the other half.
    pub const WAIT_SYSCALL_EXIT: &str = "wait_syscall_exit";
    /// Per-thread wait state of event-loop threads ([`super::LoopState`]),
    /// one per thread slot ([`super::slots`]).
    pub const THREAD_LOOPS: &str = "THREAD_LOOPS";
    /// Hash, tid → 0: threads the agent found asleep in a wait when it
    /// attached. That wait's return probe never fires (it was entered
    /// before the probe existed), so the kernel dates the thread's first
    /// busy stretch from when it next ran, and removes the entry.
    pub const UNSEEN_WAITS: &str = "UNSEEN_WAITS";
    /// Array of one `u32`, set to 1 by the agent once every probe is
    /// attached: until then the wait paths that run on tracepoints
    /// (`sched_switch`, `sys_enter`/`sys_exit`) start no busy stretch,
    /// since no task poll return could end one yet.
    pub const WAITS_ARMED: &str = "WAITS_ARMED";
    /// Array of [`super::task_filter::BUCKETS`] counts: the entries of
    /// `UNSEEN_WAITS` per bucket of tids ([`super::task_filter::bucket_of`]),
    /// so a context switch looks the hash up only for a tid that may be in
    /// it. The agent adds to a bucket before it files a tid there; the
    /// kernel takes 1 away after removing one.
    pub const UNSEEN_FILTER: &str = "UNSEEN_FILTER";

    /// Ring buffer of [`super::PollEvent`]s.
    pub const EVENTS: &str = "EVENTS";
    /// Per-thread stack of in-flight polls ([`super::ThreadPolls`]), one per
    /// thread slot ([`super::slots`]).
    pub const THREAD_POLLS: &str = "THREAD_POLLS";
    /// Per-CPU log-linear histogram of worker poll durations ([`super::hist`]).
    pub const POLL_HISTOGRAM: &str = "POLL_HISTOGRAM";
    /// Per-CPU counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU: ns of the last context switch on the CPU (the moment the
    /// thread running there now was switched in).
    pub const LAST_SWITCH: &str = "LAST_SWITCH";
    /// Global the agent sets before load: [`super::Config`].
    pub const CONFIG: &str = "CONFIG";
}

/// How many nested polls one thread's stack records. Deeper polls are counted
/// ([`Counter::StackOverflow`]) but not timed.
pub const MAX_POLL_DEPTH: usize = 8;

/// Address ranges of blocking-pool code the agent hands the kernel side.
pub const MAX_BLOCKING_RANGES: usize = 16;

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// The attach cookie of a `raw::poll` copy (a `u64`, see [`PollCookie`]):
/// bits 0..16 hold the byte offset of the task id from the task header (0
/// when it could not be verified), bit 17 [`COOKIE_LAYOUT_VERIFIED`], bits
/// 32..64 the index of the copy in the agent's discovery list.
pub const COOKIE_ID_OFFSET_MASK: u64 = 0xffff;
/// Cookie bit: the copy's vtable was verified. Verified copies that only the
/// blocking pool polls are never attached, so a verified copy runs on an event
/// loop and the return-address ranges need not be consulted.
pub const COOKIE_LAYOUT_VERIFIED: u64 = 1 << 17;
/// Cookie bits 32..64: the copy's index.
pub const COOKIE_INDEX_SHIFT: u32 = 32;

/// The attach cookie of a `raw::poll` copy, packed by the agent and unpacked
/// by the poll probe: one definition of the bit layout for both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollCookie {
    /// Index of the copy in the agent's discovery list.
    pub copy_index: u32,
    /// Byte offset of the task id from the task header; 0 when unknown.
    /// Offsets that do not fit in 16 bits are packed as 0 (unknown).
    pub id_offset: u16,
    /// The copy's vtable was verified (it runs on an event loop).
    pub verified: bool,
}

impl PollCookie {
    /// The cookie's `u64` form.
    pub const fn pack(self) -> u64 {
        let verified = if self.verified {
            COOKIE_LAYOUT_VERIFIED
        } else {
            0
        };
        ((self.copy_index as u64) << COOKIE_INDEX_SHIFT)
            | verified
            | (self.id_offset as u64 & COOKIE_ID_OFFSET_MASK)
    }

    /// Reads a cookie packed by [`PollCookie::pack`].
    pub const fn unpack(cookie: u64) -> Self {
        Self {
            copy_index: (cookie >> COOKIE_INDEX_SHIFT) as u32,
            id_offset: (cookie & COOKIE_ID_OFFSET_MASK) as u16,
            verified: cookie & COOKIE_LAYOUT_VERIFIED != 0,
        }
    }
}

const _: () = assert!(core::mem::size_of::<u64>() * 8 >= COOKIE_INDEX_SHIFT as usize + 32);
const _: () = assert!(COOKIE_LAYOUT_VERIFIED & COOKIE_ID_OFFSET_MASK == 0);
const _: () = assert!(COOKIE_LAYOUT_VERIFIED < 1 << COOKIE_INDEX_SHIFT);

/// Agent → kernel configuration, set as a global before load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Process (tgid) the probes report on; others are ignored.
    pub target_tgid: u32,
    /// Number of valid entries in `blocking_ranges`.
    pub blocking_range_count: u32,
    /// Polls lasting at least this long (ns) produce a ring buffer event.
    pub report_floor_ns: u64,
    /// `[start, end)` runtime addresses of blocking-pool code: a poll whose
    /// return address falls inside one ran on the blocking pool, not a worker.
    pub blocking_ranges: [[u64; 2]; MAX_BLOCKING_RANGES],
    /// [`config_flags`].
    pub flags: u64,
    /// ns: the kernel's timer tick, when a running thread's CPU ticks
    /// every tick (`steal::paused_ns`); 0 when a CPU may stop its tick
    /// while a task runs (`nohz_full`), which turns that rule off.
    pub tick_ns: u64,
    /// ns: a task poll or busy stretch that has run this long, or that
    /// goes to sleep, sends the agent one [`NudgeEvent`], so the agent
    /// reads the poll stacks often only while something may be stuck
    /// (0: no nudges; the agent then reads them at a fixed pace).
    pub nudge_ns: u64,
    /// Where this kernel keeps the run queue's steal clock
    /// ([`steal::RqSteal`]); all 0 where it is not known.
    pub rq_steal: steal::RqSteal,
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// Every program returns at its first instruction: the benchmark's
    /// floor, what the kernel's probe entries cost with none of our work.
    pub const EMPTY_PROGRAMS: u64 = 1;
    /// The request probes are attached: poll frames note the request
    /// totals, so a stall's victims can be counted ([`crate::requests`]).
    pub const REQUESTS: u64 = 1 << 1;
    /// The wait path rides on `sched_switch` (`--wait-probes switch`): a
    /// thread switched out asleep in an epoll wait is waiting until it is
    /// switched back in. No probe per epoll wait.
    pub const WAIT_SWITCH: u64 = 1 << 2;
    /// With [`WAIT_SWITCH`]: the epoll wrappers have an entry probe and no
    /// return probe (`--wait-probes calls`). Each call ends the busy
    /// stretch and counts as a wait that returned at once; a call that
    /// sleeps is seen on `sched_switch`, whose switch back in starts the
    /// next stretch without counting the wait again.
    pub const WAIT_CALLS: u64 = 1 << 3;
}

const _: () = assert!(core::mem::size_of::<Config>() == 56 + 16 * MAX_BLOCKING_RANGES);

impl Config {
    pub const fn zeroed() -> Self {
        Self {
            target_tgid: 0,
            blocking_range_count: 0,
            report_floor_ns: u64::MAX,
            blocking_ranges: [[0; 2]; MAX_BLOCKING_RANGES],
            flags: 0,
            tick_ns: 0,
            nudge_ns: 0,
            rq_steal: steal::RqSteal::UNKNOWN,
        }
    }
}

/// The USDT probes the `loopguard-middleware` crate fires (their own crate,
/// so the middleware never depends on this one).
pub use loopguard_usdt as usdt;

/// Most arguments a USDT site may have.
pub const MAX_USDT_ARGS: usize = 8;
/// Most USDT sites loopguard attaches to.
pub const MAX_USDT_SITES: u32 = 256;
/// Bytes of the method / route / path kept per request.
pub const METHOD_BYTES: usize = 16;
pub const ROUTE_BYTES: usize = 128;
pub const PATH_BYTES: usize = 128;

/// Where a USDT argument is ([`UsdtArg::kind`]).
pub mod arg_kind {
    pub const NONE: u8 = 0;
    pub const REGISTER: u8 = 1;
    pub const MEMORY: u8 = 2;
    pub const IMMEDIATE: u8 = 3;
}

/// One decoded USDT argument spec.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UsdtArg {
    /// [`arg_kind`].
    pub kind: u8,
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// 1 when the value is sign-extended.
    pub signed: u8,
    pub pad: u8,
    /// Byte offset of the register in `struct pt_regs`.
    pub reg_offset: u16,
    pub pad2: u16,
    pub pad3: u32,
    /// Displacement (memory) or value (immediate).
    pub value: i64,
}

/// The arguments of one USDT site (value of [`names::USDT_SPECS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UsdtSpec {
    pub args: [UsdtArg; MAX_USDT_ARGS],
}

const _: () = assert!(core::mem::size_of::<UsdtArg>() == 24);
const _: () = assert!(core::mem::size_of::<UsdtSpec>() == 24 * MAX_USDT_ARGS);

/// x86-64 `struct pt_regs`, the saved registers a uprobe or a syscall
/// sees: byte offsets of its fields, the one copy every reader uses (USDT
/// argument specs, the wait probes' syscall number, the request probes'
/// copy of the registers).
pub mod pt_regs {
    /// Size of the struct in 64-bit words.
    pub const WORDS: usize = 21;
    pub const R15: u16 = 0;
    pub const R14: u16 = 8;
    pub const R13: u16 = 16;
    pub const R12: u16 = 24;
    pub const RBP: u16 = 32;
    pub const RBX: u16 = 40;
    pub const R11: u16 = 48;
    pub const R10: u16 = 56;
    pub const R9: u16 = 64;
    pub const R8: u16 = 72;
    pub const RAX: u16 = 80;
    pub const RCX: u16 = 88;
    pub const RDX: u16 = 96;
    pub const RSI: u16 = 104;
    pub const RDI: u16 = 112;
    /// The syscall number, kept apart from `rax` (which the return overwrites).
    pub const ORIG_AX: u16 = 120;
    pub const RIP: u16 = 128;
    pub const RSP: u16 = 152;
    /// The general-purpose registers by name, as USDT argument specs name them.
    pub const BY_NAME: [(&str, u16); 17] = [
        ("r15", R15),
        ("r14", R14),
        ("r13", R13),
        ("r12", R12),
        ("rbp", RBP),
        ("rbx", RBX),
        ("r11", R11),
        ("r10", R10),
        ("r9", R9),
        ("r8", R8),
        ("rax", RAX),
        ("rcx", RCX),
        ("rdx", RDX),
        ("rsi", RSI),
        ("rdi", RDI),
        ("rip", RIP),
        ("rsp", RSP),
    ];
}

/// Flags on a [`PollFrame`] and a [`PollEvent`].
pub mod frame_flags {
    /// The poll returned into blocking-pool code (a `spawn_blocking` closure,
    /// or the worker loop itself): never an event-loop stall.
    pub const BLOCKING: u32 = 1 << 0;
    /// Another poll started on this thread while this one was in flight: this
    /// poll is a scheduler loop (a worker, a `LocalSet`), not a task.
    pub const CONTAINER: u32 = 1 << 1;
    /// The task id could not be read (unverified vtable layout or a failed
    /// read): `task_id` holds 0.
    pub const NO_TASK_ID: u32 = 1 << 2;
    /// On a [`super::requests::RequestEntry`]: the probe fired outside any poll
    /// loopguard saw (the poll began before attaching, or the middleware runs
    /// outside a task).
    pub const NO_POLL: u32 = 1 << 3;

    /// On a [`super::PollFrame`]: `task_id` holds the address of the task
    /// id in the target (the header plus the copy's id offset), not the id.
    /// The id is read from there only once the poll has run into a clock
    /// tick or a context switch (by `thread_runtime` or `thread_switch`,
    /// run as the polling thread), or at its return when the poll is
    /// shipped; most polls end before either, and never pay the read.
    /// Set only while no request probe is attached (they key requests by
    /// the id of the poll they run in, so the id is read at entry then).
    /// Never on a [`super::PollEvent`].
    pub const TASK_ID_ADDRESS: u32 = 1 << 4;

    /// Whether a frame with these flags is a worker task poll: not
    /// blocking-pool work, not a scheduler loop's own poll around the task
    /// polls.
    pub const fn is_task_poll(flags: u32) -> bool {
        flags & (BLOCKING | CONTAINER) == 0
    }

    /// The task id a frame or event with these flags holds in `task_id`:
    /// `None` when it is unknown, or not read yet ([`TASK_ID_ADDRESS`]).
    pub const fn task_id(task_id: u64, flags: u32) -> Option<u64> {
        if flags & (NO_TASK_ID | TASK_ID_ADDRESS) != 0 || task_id == 0 {
            None
        } else {
            Some(task_id)
        }
    }
}

/// One in-flight poll on a thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PollFrame {
    /// ns, from `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) at poll entry.
    pub start_ns: u64,
    /// Tokio task id, read from the task header (0: unknown); while
    /// [`frame_flags::TASK_ID_ADDRESS`] is set, the address to read it from.
    pub task_id: u64,
    /// Task header address (first argument of `raw::poll`).
    pub header: u64,
    /// Return address of the poll call (who polled), read at entry only for
    /// copies whose vtable could not be verified (0 otherwise: the return
    /// event carries it).
    pub return_addr: u64,
    /// Index of the `raw::poll` copy in the agent's discovery list.
    pub copy_index: u32,
    /// [`frame_flags`].
    pub flags: u32,
    /// The thread's [`ThreadPolls::preempted_ns`] at poll entry.
    pub preempted_at_entry: u64,
    /// [`requests::RequestTotals::ended`] at poll entry (0 when requests are
    /// not tracked).
    pub requests_ended_at_entry: u64,
}

/// A thread's stack of in-flight polls (a slot of [`names::THREAD_POLLS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadPolls {
    /// Write sequence ([`slots`]): odd while the owning thread is writing
    /// this slot, bumped twice per write; never reset, not even when the
    /// slot passes to another thread.
    pub seq: u32,
    /// Thread id of the owner (0: the slot holds no thread's polls).
    pub tid: u32,
    /// Polls in flight, including those deeper than [`MAX_POLL_DEPTH`].
    pub depth: u32,
    /// Explicit padding, always 0.
    pub pad: u32,
    /// ns this thread spent inside finished worker task polls (scheduler
    /// loops and blocking-pool polls not counted): its busy time.
    pub busy_ns: u64,
    /// Worker task polls this thread finished.
    pub task_polls: u64,
    /// ns this thread waited switched out while runnable (preempted) during
    /// polls, in all: from `sched_switch`.
    pub preempted_ns: u64,
    /// ns when it was last switched out while runnable inside a poll (0: it
    /// was not, or that wait is already counted).
    pub preempted_since_ns: u64,
    pub frames: [PollFrame; MAX_POLL_DEPTH],
}

impl PollFrame {
    pub const fn zeroed() -> Self {
        Self {
            start_ns: 0,
            task_id: 0,
            header: 0,
            return_addr: 0,
            copy_index: 0,
            flags: 0,
            preempted_at_entry: 0,
            requests_ended_at_entry: 0,
        }
    }
}

impl ThreadPolls {
    pub const fn zeroed() -> Self {
        Self {
            seq: 0,
            tid: 0,
            depth: 0,
            pad: 0,
            busy_ns: 0,
            task_polls: 0,
            preempted_ns: 0,
            preempted_since_ns: 0,
            frames: [PollFrame::zeroed(); MAX_POLL_DEPTH],
        }
    }

    /// The innermost poll in flight, the only one that can be holding the
    /// thread (`None` when there is none, or it is deeper than was kept).
    pub fn innermost(&self) -> Option<&PollFrame> {
        let depth = self.depth as usize;
        if depth == 0 || depth > MAX_POLL_DEPTH {
            return None;
        }
        self.frames.get(depth - 1)
    }

    /// The innermost poll in flight when it is a worker task poll
    /// ([`frame_flags::is_task_poll`]): the one every rule about a stuck
    /// poll judges.
    pub fn innermost_task_poll(&self) -> Option<&PollFrame> {
        self.innermost()
            .filter(|frame| frame_flags::is_task_poll(frame.flags))
    }

    /// ns `frame`, a poll of this thread still in flight, has held the
    /// thread by `now_ns`: time since entry, less the preempted waits
    /// counted since, less a wait still open (the thread switched out
    /// runnable and not seen running since).
    pub fn held_so_far_ns(&self, now_ns: u64, frame: &PollFrame) -> u64 {
        let counted = self.preempted_ns.saturating_sub(frame.preempted_at_entry);
        let open = if self.preempted_since_ns >= frame.start_ns && self.preempted_since_ns != 0 {
            now_ns.saturating_sub(self.preempted_since_ns)
        } else {
            0
        };
        now_ns
            .saturating_sub(frame.start_ns)
            .saturating_sub(counted + open)
    }
}

/// The attach cookie of a wait uprobe on an epoll wrapper (whose first
/// argument is the epoll fd); a park's is 0.
pub const WAIT_SITE_EPOLL: u64 = 1;

/// Added to a wait uprobe's cookie when the site has no return probe
/// ([`config_flags::WAIT_CALLS`]): the wait returns at once unless it
/// sleeps, which `sched_switch` sees.
pub const WAIT_SITE_CALL: u64 = 2;

/// The epoll fd of a loop thread's wait, as [`LoopState::wait_fd`] and
/// [`LoopEvent::wait_fd`] hold it: the fd plus one, so that 0 means "not
/// known" (a park that sleeps in a futex, or a wait entered before attach).
pub mod wait_fd {
    /// In [`super::LoopEvent::wait_fd`]: the stretch ended in a wait on
    /// another epoll fd than the one it came back from.
    pub const ENDED_ELSEWHERE: u32 = 1 << 31;

    /// The encoding of epoll fd `register`, the low 32 bits of the
    /// register that held the `int` (a negative one is unknown).
    pub const fn encode(register: u64) -> u32 {
        let fd = register as u32;
        if fd < ENDED_ELSEWHERE - 1 { fd + 1 } else { 0 }
    }

    /// The epoll fd an encoded value names, if known.
    pub const fn decode(encoded: u32) -> Option<u32> {
        match encoded & !ENDED_ELSEWHERE {
            0 => None,
            fd => Some(fd - 1),
        }
    }

    /// Whether an event's stretch ended in a wait on another epoll fd.
    pub const fn ended_elsewhere(encoded: u32) -> bool {
        encoded & ENDED_ELSEWHERE != 0
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn an_fd_survives_the_round_trip_and_garbage_is_unknown() {
            assert_eq!(decode(encode(0)), Some(0));
            assert_eq!(decode(encode(7)), Some(7));
            // Only the low half of the register holds the `int`.
            assert_eq!(decode(encode(0xdead_0000_0000_0005)), Some(5));
            assert_eq!(decode(encode(u64::MAX)), None);
            assert_eq!(decode(0), None);
            assert_eq!(decode(encode(9) | ENDED_ELSEWHERE), Some(9));
            assert!(ended_elsewhere(encode(9) | ENDED_ELSEWHERE));
            assert!(!ended_elsewhere(encode(9)));
        }
    }
}

/// What the wait probes keep per thread (a slot of [`names::THREAD_LOOPS`]).
/// A thread appears here once it has entered or left a wait.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopState {
    /// Write sequence, as [`ThreadPolls::seq`].
    pub seq: u32,
    /// Thread id of the owner (0: the slot holds no thread's wait state).
    pub tid: u32,
    /// Waits entered and not yet returned (epoll inside a park nests).
    pub depth: u32,
    /// The epoll fd of the thread's last epoll wait, as [`wait_fd`]
    /// encodes it (0: no epoll wait seen, or its fd is not known).
    pub wait_fd: u32,
    /// ns, `CLOCK_MONOTONIC`, when the thread last came back from its
    /// outermost wait: the start of the busy stretch now running (0: not
    /// known yet, the thread was busy when loopguard attached).
    pub busy_start_ns: u64,
    /// ns, when the current outermost wait began (valid while `depth > 0`).
    pub wait_start_ns: u64,
    /// ns spent waiting, over finished waits.
    pub wait_ns: u64,
    /// ns spent busy between waits, over finished busy stretches.
    pub busy_ns: u64,
    /// Outermost waits finished.
    pub waits: u64,
    /// ns the thread spent switched out while runnable (preempted) during
    /// busy stretches: a stretch, like a poll, is judged by the time it held
    /// its thread, not by time the machine gave to others.
    pub preempted_ns: u64,
    /// ns, when the thread was last switched out runnable during a busy
    /// stretch (0 while it runs, or waits).
    pub preempted_since_ns: u64,
    /// `preempted_ns` when the busy stretch now running began.
    pub preempted_at_start_ns: u64,
}

const _: () = assert!(core::mem::size_of::<LoopState>() == 80);

/// Sent when an event-loop thread enters a wait after a busy stretch of at
/// least the report floor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopEvent {
    /// [`EventKind::LoopBusy`].
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// The epoll fd of the wait the stretch came back from, as
    /// [`wait_fd`] encodes it (0: not known), with [`wait_fd::ENDED_ELSEWHERE`]
    /// set when the wait that ended the stretch was on another epoll fd.
    /// Then, once the first fd is no longer an epoll instance, that loop
    /// closed during the stretch, and the stretch is the thread's own work
    /// between loops, not a loop stall.
    pub wait_fd: u32,
    /// ns, `CLOCK_MONOTONIC`, when the busy stretch began (the wait's return).
    pub start_ns: u64,
    /// ns the thread stayed away from its wait (wall time).
    pub duration_ns: u64,
    /// ns of it the thread spent preempted (runnable but switched out):
    /// the stretch is judged by `duration_ns - preempted_ns`, the time it
    /// held its thread.
    pub preempted_ns: u64,
}

const _: () = assert!(core::mem::size_of::<LoopEvent>() == 40);

/// Sent once per task poll or busy stretch that has run
/// [`Config::nudge_ns`], or that goes to sleep, while it is still running:
/// it may be a stall in progress, so the agent reads the poll stacks at its
/// fast pace until it is over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NudgeEvent {
    /// [`EventKind::Nudge`].
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// Explicit padding, always 0.
    pub pad: u32,
    /// ns, `CLOCK_MONOTONIC`: the poll's start, or the stretch's.
    pub start_ns: u64,
}

const _: () = assert!(core::mem::size_of::<NudgeEvent>() == 24);

/// Kinds of [`PollEvent`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A worker poll that lasted at least the report floor has returned.
    PollEnd = 1,
    /// [`LoopEvent`].
    LoopBusy = 4,
    /// [`requests::RouteName`]: the first start of a route.
    RouteName = 5,
    /// [`NudgeEvent`].
    Nudge = 6,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            1 => Ok(Self::PollEnd),
            4 => Ok(Self::LoopBusy),
            5 => Ok(Self::RouteName),
            6 => Ok(Self::Nudge),
            other => Err(other),
        }
    }
}

/// Record sent through [`names::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PollEvent {
    /// [`EventKind`] as a plain `u32`.
    pub kind: u32,
    /// Process id (tgid) of the polling thread.
    pub pid: u32,
    /// Thread id of the polling thread.
    pub tid: u32,
    /// [`frame_flags`] of the finished frame.
    pub flags: u32,
    /// ns, `CLOCK_MONOTONIC`, poll entry.
    pub start_ns: u64,
    /// ns, poll duration.
    pub duration_ns: u64,
    /// Tokio task id (0: unknown, see [`frame_flags::NO_TASK_ID`]).
    pub task_id: u64,
    /// Task header address.
    pub header: u64,
    /// Return address of the poll call.
    pub return_addr: u64,
    /// Index of the `raw::poll` copy in the agent's discovery list.
    pub copy_index: u32,
    /// Stack depth of the finished poll on its thread (1 = outermost).
    pub depth: u32,
    /// ns of `duration_ns` the thread spent preempted (runnable, switched
    /// out): the scheduler's time, not the poll's.
    pub preempted_ns: u64,
    /// [`requests::RequestTotals::ended`] at poll entry and
    /// [`requests::RequestTotals::started`] at its return: the requests
    /// counted between them were in flight during the poll.
    pub requests_ended_at_entry: u64,
    pub requests_started_at_exit: u64,
}

const _: () = assert!(core::mem::size_of::<PollEvent>() == 88);
const _: () = assert!(core::mem::size_of::<PollFrame>() == 56);
const _: () = assert!(core::mem::size_of::<ThreadPolls>() == 48 + 56 * MAX_POLL_DEPTH);

/// Indices into [`names::COUNTERS`]. (Worker polls are not counted here:
/// the [`names::POLL_HISTOGRAM`] holds every one, its total is the count.)
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Blocking-pool polls completed.
    BlockingPolls = 0,
    /// Events lost because the ring buffer was full.
    DroppedEvents = 1,
    /// Polls nested deeper than [`MAX_POLL_DEPTH`].
    StackOverflow = 2,
    /// Returns seen with no matching entry on the thread's stack.
    UnmatchedReturns = 3,
    /// Threads left untracked because no thread slot was free
    /// ([`slots::MAX_THREAD_SLOTS`] in use).
    ThreadMapFull = 4,
    /// Request starts not tracked because the request map had no room
    /// (its insert failed): their stalls have no request.
    RequestMapFull = 5,
    /// Slots of exited threads that could not be put back on the free
    /// stack (never expected: the push failed), so never reused.
    /// Keep it last: [`COUNTER_SLOTS`] is counted from it.
    SlotLeaked = 6,
}

/// Number of slots in [`names::COUNTERS`]: one per [`Counter`], tied to
/// its last variant so a new counter cannot be left out.
pub const COUNTER_SLOTS: u32 = Counter::SlotLeaked as u32 + 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `repr(C)`, `Copy`, made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PollFrame {}
    unsafe impl aya::Pod for super::ThreadPolls {}
    unsafe impl aya::Pod for super::PollEvent {}
    unsafe impl aya::Pod for super::UsdtSpec {}
    unsafe impl aya::Pod for super::hist::PollHistogram {}
    unsafe impl aya::Pod for super::LoopState {}
    unsafe impl aya::Pod for super::LoopEvent {}
    unsafe impl aya::Pod for super::NudgeEvent {}
    unsafe impl aya::Pod for super::requests::RequestEntry {}
    unsafe impl aya::Pod for super::requests::RecentEnds {}
    unsafe impl aya::Pod for super::requests::RouteStats {}
    unsafe impl aya::Pod for super::requests::RequestTotals {}
}

#[cfg(test)]
mod tests {
    use super::{PollCookie, frame_flags};

    #[test]
    fn a_task_id_not_read_yet_is_no_task_id() {
        assert_eq!(frame_flags::task_id(77, 0), Some(77));
        assert_eq!(frame_flags::task_id(0, 0), None);
        assert_eq!(frame_flags::task_id(77, frame_flags::NO_TASK_ID), None);
        // An address, not an id.
        assert_eq!(
            frame_flags::task_id(0x7f00_0000_1048, frame_flags::TASK_ID_ADDRESS),
            None
        );
        assert_eq!(frame_flags::task_id(77, frame_flags::CONTAINER), Some(77));
    }

    #[test]
    fn poll_cookies_round_trip_at_the_edges() {
        for cookie in [
            PollCookie {
                copy_index: 0,
                id_offset: 0,
                verified: false,
            },
            PollCookie {
                copy_index: 7,
                id_offset: 72,
                verified: true,
            },
            PollCookie {
                copy_index: u32::MAX,
                id_offset: u16::MAX,
                verified: true,
            },
        ] {
            assert_eq!(PollCookie::unpack(cookie.pack()), cookie);
        }
        assert_eq!(
            PollCookie {
                copy_index: 3,
                id_offset: 72,
                verified: true
            }
            .pack(),
            (3 << 32) | (1 << 17) | 0x48
        );
    }
}
