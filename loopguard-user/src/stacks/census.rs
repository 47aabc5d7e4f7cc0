//! Attaching to a process that already hangs. A poll that began before
//! loopguard attached has no entry on its thread's poll stack, so the scan
//! cannot see it; its thread's own stack can: a `raw::poll` frame with the
//! task's code inside it, and no scheduler frame, means the thread is inside
//! a task poll right now.
//!
//! Threads asleep in a system call are read from `/proc` (their registers
//! from `/proc/PID/task/TID/syscall`, their stack from memory: it cannot
//! change until they wake); threads on a CPU are sampled with a short-lived
//! cpu-clock perf event.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::Duration;

use loopguard_common::stacks::STACK_CHUNK_BYTES;

use super::fold::Frame;
use super::profile::{Cause, CauseKind};
use super::sample::{Regs, Sample, SampleCause};
use super::symbolize::Symbols;
use super::unwind::{CallBefore, call_before};
use super::{Stacks, StallStack, capture, syscalls};
use crate::collect::monotonic_ns;
use crate::detect::{Stall, StallKind};
use crate::discover::proc::read_memory;

/// On-CPU samples a thread needs, all inside a task poll, to count as stuck.
const MIN_CENSUS_SAMPLES: usize = 3;

/// A census under way: what was seen when it started, the on-CPU samples
/// since.
pub(super) struct Census {
    started: u64,
    window_ns: u64,
    longest_ns: u64,
    asleep: Vec<(String, Sample)>,
    running: Vec<u32>,
    events: Vec<OwnedFd>,
    pub(super) samples: Vec<Sample>,
}

/// Samples kept per census (32 KiB of stack each; the rest are dropped:
/// enough to judge, and the agent's memory stays small).
pub(super) const MAX_CENSUS_SAMPLES: usize = 64;

/// Sleeping threads whose stack the census copies (32 KiB each, so 8 MiB
/// at most): a target with thousands of threads cannot make the root
/// agent's memory grow with them. The lowest thread ids go first (the main
/// thread and the runtime's first threads).
pub(super) const MAX_CENSUS_ASLEEP: usize = 256;

/// A thread found inside a task poll: since when (at least), the system
/// call it sleeps in (none: on a CPU), its frames as shown.
struct Found {
    tid: u32,
    kind: StallKind,
    since_ns: u64,
    syscall: Option<i64>,
    frames: Vec<Frame>,
    /// Python frames are in `frames` already (read while asleep).
    python_read: bool,
}

/// What `/proc/PID/task/TID/syscall` says: the system call a thread sleeps
/// in and its user stack and instruction pointers, or `None` while it runs
/// (`running`) or is in user mode (`-1 sp pc`).
pub fn parse_syscall(text: &str) -> Option<(i64, u64, u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let nr: i64 = fields.first()?.parse().ok()?;
    if nr < 0 || fields.len() < 3 {
        return None;
    }
    let hex = |field: &str| u64::from_str_radix(field.trim_start_matches("0x"), 16).ok();
    let sp = hex(fields[fields.len() - 2])?;
    let pc = hex(fields[fields.len() - 1])?;
    Some((nr, sp, pc))
}

/// The runtime polling a task: `raw::poll` itself is often a lone `jmp`
/// to the harness (a tail call), so it may be missing from a stack.
fn is_task_poll(frame: &Frame) -> bool {
    let name = frame.function.trim_start_matches('<');
    [
        "tokio::runtime::task::raw::poll",
        "tokio::runtime::task::harness::Harness",
        "tokio::runtime::task::core::Core",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

/// Frames that mean the thread is in the runtime itself, not in a task:
/// parked, driving I/O or timers, or running blocking-pool work.
fn is_runtime_machinery(frame: &Frame) -> bool {
    let name = frame.function.trim_start_matches('<');
    [
        "tokio::runtime::scheduler::",
        "tokio::runtime::park",
        "tokio::runtime::driver",
        "tokio::runtime::io::",
        "tokio::runtime::time::",
        "tokio::runtime::blocking::",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

/// Whether a stack (innermost first) is inside a task poll: its innermost
/// task-polling frame has no runtime machinery inside it, and the poll is
/// not blocking-pool work ([`polled_by_blocking_pool`]).
pub fn in_task_poll(frames: &[Frame]) -> bool {
    frames.iter().position(is_task_poll).is_some_and(|poll| {
        !frames[..poll].iter().any(is_runtime_machinery)
            && !polled_by_blocking_pool(&frames[poll..])
    })
}

/// Whether the task poll at the top of `outward` (the innermost task-poll
/// frame and everything outside it) is run by the blocking pool.
/// `spawn_blocking` work (`tokio::io::stdin()`'s `read`, a `tokio::fs`
/// call) is such a poll, and never a stall. `BlockingTask::poll` is often
/// inlined into the poll, so the poll's surroundings tell:
///
/// - the nearest runtime frame outside it is the pool's thread loop
///   (`tokio::runtime::blocking::pool`), not a scheduler; or
/// - no runtime frame is outside it at all (the pool's loop inlined into
///   the thread's start, as in release builds), and it is not nested in
///   another task poll. A worker's task poll always is: the multi-thread
///   worker runs inside a blocking-pool task, and the current-thread
///   scheduler and `LocalSet` leave frames of their own.
fn polled_by_blocking_pool(outward: &[Frame]) -> bool {
    let nearest = outward
        .iter()
        .skip_while(|frame| is_task_poll(frame))
        .find_map(|frame| {
            let name = frame.function.trim_start_matches('<');
            if name.starts_with("tokio::runtime::blocking::") {
                Some(true)
            } else if name.starts_with("tokio::runtime::") || name.starts_with("tokio::task::") {
                Some(false)
            } else {
                None
            }
        });
    nearest.unwrap_or_else(|| poll_levels(outward) <= 1)
}

/// How many task polls a stack is nested in: each level leaves its
/// `raw::poll` (called through the task's vtable, so never inlined, though
/// it may tail-call the harness) or its `Harness::poll`, or both.
fn poll_levels(frames: &[Frame]) -> usize {
    let count = |prefix: &str| {
        frames
            .iter()
            .filter(|frame| frame.function.trim_start_matches('<').starts_with(prefix))
            .count()
    };
    count("tokio::runtime::task::raw::poll").max(count("tokio::runtime::task::harness::Harness"))
}

/// `Runtime::block_on`, `Handle::block_on` and the schedulers' own: the
/// runtime polling the future given to `block_on` (`#[tokio::main]`'s body).
fn is_block_on(frame: &Frame) -> bool {
    let name = frame.function.trim_start_matches('<');
    name.starts_with("tokio::runtime::")
        && name
            .split("::")
            .any(|part| part == "block_on" || part.starts_with("block_on<"))
}

/// Frames of a `block_on` waiting for its future or driving the runtime:
/// parking, the drivers, I/O and timers (the scheduler's plain wrappers,
/// such as `current_thread::Context::enter`, are not).
fn is_parked_or_driving(frame: &Frame) -> bool {
    let name = frame.function.trim_start_matches('<');
    name.contains("::park")
        || name.starts_with("mio::")
        || [
            "tokio::runtime::driver",
            "tokio::runtime::io::",
            "tokio::runtime::time::",
            "tokio::runtime::blocking::",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Whether a stack is inside a `block_on` body, outside any task poll: the
/// innermost `block_on` frame has no task poll, park or driver inside it.
pub fn in_block_on_body(frames: &[Frame]) -> bool {
    frames.iter().position(is_block_on).is_some_and(|at| {
        at > 0
            && !frames[..at]
                .iter()
                .any(|frame| is_parked_or_driving(frame) || is_task_poll(frame))
    })
}

/// A frame of an event wait the wait probes sit on: Tokio's park functions
/// (`tokio::runtime::park`, the multi-thread scheduler's `park`), or the C
/// library's epoll wrappers. A blocking-pool thread idle on its condition
/// variable has none.
fn is_event_wait(frame: &Frame) -> bool {
    let name = frame.function.trim_start_matches('<');
    name.starts_with("tokio::runtime::park::")
        || name.starts_with("tokio::runtime::scheduler::multi_thread::park::")
        || crate::discover::waits::EPOLL_WRAPPERS
            .iter()
            .any(|wrapper| name.trim_start_matches("__GI_").trim_start_matches("__") == *wrapper)
}

/// What a thread found in `frames` is stuck in, if anything: a task poll,
/// or a `block_on` body (a loop stall: no task poll holds it).
fn stuck_in(frames: &[Frame]) -> Option<StallKind> {
    if in_task_poll(frames) {
        Some(StallKind::Poll)
    } else if in_block_on_body(frames) {
        Some(StallKind::Loop)
    } else {
        None
    }
}

impl Census {
    /// Whether the census can conclude at `now` (its window has passed).
    fn done(&self, now: u64) -> bool {
        let sampled = |tid: &u32| self.samples.iter().filter(|s| s.tid == *tid).count();
        census_done(
            now.saturating_sub(self.started) >= self.longest_ns,
            self.samples.len() >= MAX_CENSUS_SAMPLES,
            self.running.iter().map(sampled),
        )
    }
}

/// Whether a census past its window concludes: at its longest, or with its
/// sample store full, or once every thread that was on a CPU when it began
/// has `samples` enough to judge ([`MIN_CENSUS_SAMPLES`]). A thread on a
/// CPU a tenth of the time (a loaded machine) gets 3 samples of 2 ms of CPU
/// in 60 ms, more than the window of a 50 ms threshold: the census waits
/// for them rather than miss a loop stuck before attach.
fn census_done(
    at_longest: bool,
    store_full: bool,
    mut samples: impl Iterator<Item = usize>,
) -> bool {
    at_longest || store_full || samples.all(|count| count >= MIN_CENSUS_SAMPLES)
}

impl Stacks {
    /// Starts looking for polls that were already stuck when loopguard
    /// attached: notes the threads asleep in a system call (and their
    /// stacks), samples the others on CPU for `window`, and on to
    /// `longest` while one of them has too few samples to judge. Does not
    /// block; [`Self::finish_census`] concludes once that has passed.
    pub fn start_census(&mut self, window: Duration, longest: Duration) {
        let started = monotonic_ns();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return;
        };
        let mut tids: Vec<u32> = tasks
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable();
        let (asleep, running) = self.asleep_threads(&tids, started);
        let events = self.capture.start_census(&running);
        self.census = Some(Census {
            started,
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            longest_ns: u64::try_from(longest.as_nanos()).unwrap_or(u64::MAX),
            asleep,
            running,
            events,
            samples: Vec::new(),
        });
    }

    /// Once the census window has passed: the threads inside a task poll
    /// then and still (asleep at the same place, or on a CPU in a task poll
    /// in every sample and with no poll begun or ended on it since
    /// attaching: `polls_seen` tells a busy worker polling many short tasks
    /// apart). `None` while the window runs or without a census.
    ///
    /// `loop_thread` says which threads of a loop-only target (Python,
    /// Node) count as event-loop threads before any was seen waiting
    /// (always `false` for Tokio targets, whose stacks tell): such a thread
    /// out of every event wait for the whole window is a loop stall.
    pub fn finish_census(
        &mut self,
        now: u64,
        polls_seen: impl FnOnce() -> Vec<u32>,
        mut loop_thread: impl FnMut(u32) -> bool,
    ) -> Option<Vec<(Stall, StallStack)>> {
        let census = self.census.as_ref()?;
        if now.saturating_sub(census.started) < census.window_ns {
            return None;
        }
        self.collect(now);
        if !self.census.as_ref().is_some_and(|census| census.done(now)) {
            return None;
        }
        let census = self.census.take()?;
        self.capture.stop_census(&census.running, census.events);
        let busy = polls_seen();
        let mut found = self.still_asleep_in_polls(census.asleep, census.started, &mut loop_thread);
        found.extend(
            self.on_cpu_in_polls(census.samples, census.started, &mut loop_thread)
                .into_iter()
                .filter(|found| !busy.contains(&found.tid)),
        );
        Some(
            found
                .into_iter()
                .map(|found| {
                    let python_read = found.python_read;
                    let (stall, mut stack) = found.into_stall(now);
                    // On a CPU: its Python stack now.
                    if stall.kind == StallKind::Loop && !python_read {
                        stack.frames = self.python.merge_now(stall.tid, &stack.frames);
                    }
                    (stall, stack)
                })
                .collect(),
        )
    }

    fn syscall_file(&self, tid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{}/task/{tid}/syscall", self.pid))
            .unwrap_or_default()
    }

    /// Threads asleep in a system call (with what `/proc` said and their
    /// stack), and the others.
    fn asleep_threads(&self, tids: &[u32], now: u64) -> (Vec<(String, Sample)>, Vec<u32>) {
        let mut asleep = Vec::new();
        let mut running = Vec::new();
        let mut skipped = 0usize;
        for &tid in tids {
            if asleep.len() >= MAX_CENSUS_ASLEEP {
                skipped += 1;
                continue;
            }
            let text = self.syscall_file(tid);
            let Some((nr, sp, pc)) = parse_syscall(&text) else {
                running.push(tid);
                continue;
            };
            let base = sp & !(STACK_CHUNK_BYTES as u64 - 1);
            let copied = capture::read_remote_stack(self.pid, base);
            // Still asleep at the same place: the copy is consistent.
            if self.syscall_file(tid) == text && !copied.is_empty() {
                let sample = Sample {
                    tid,
                    cause: SampleCause::OffCpu,
                    ts_ns: now,
                    poll_start_ns: 0,
                    regs: Regs { ip: pc, sp, bp: 0 },
                    syscall: Some(nr),
                    stack_base: base,
                    stack: copied,
                };
                asleep.push((text, sample));
            }
        }
        if skipped > 0 {
            tracing::info!(
                skipped,
                examined = MAX_CENSUS_ASLEEP,
                "census: too many threads; those past the limit are not checked for a poll stuck at attach"
            );
        }
        (asleep, running)
    }

    /// The threads asleep in an event wait (a Tokio park, an epoll wait)
    /// when the census began, not stuck in a poll or a `block_on` body:
    /// their wait began before the probes existed, so its return will not
    /// be seen ([`crate::collect::Collector::mark_unseen_waits`]).
    pub fn asleep_in_waits(&mut self) -> Vec<u32> {
        let Some(census) = self.census.take() else {
            return Vec::new();
        };
        let mut waiting = Vec::new();
        for (_, sample) in &census.asleep {
            let addrs = self.addrs_of_asleep(sample);
            let frames = self.symbols.frames(&addrs);
            if stuck_in(&frames).is_none() && frames.iter().any(is_event_wait) {
                waiting.push(sample.tid);
            }
        }
        self.census = Some(census);
        waiting
    }

    /// The return addresses of a thread asleep in a system call (its frame
    /// pointer guessed).
    fn addrs_of_asleep(&mut self, sample: &Sample) -> Vec<u64> {
        let top = sample.stack_base + sample.stack.len() as u64;
        let (pid, symbols) = (self.pid, &mut self.symbols);
        self.unwinder.unwind_guessing_bp(
            sample.regs,
            top,
            |addr| sample.read_u64(addr),
            |inside, next| calls_function_of(pid, symbols, inside, next),
        )
    }

    /// The sleeping threads still asleep at the same place, inside a task poll.
    fn still_asleep_in_polls(
        &mut self,
        asleep: Vec<(String, Sample)>,
        started: u64,
        loop_thread: &mut impl FnMut(u32) -> bool,
    ) -> Vec<Found> {
        let mut found = Vec::new();
        for (text, sample) in asleep {
            if self.syscall_file(sample.tid) != text {
                continue;
            }
            let addrs = self.addrs_of_asleep(&sample);
            let frames = self.symbols.frames(&addrs);
            let kind = stuck_in(&frames).or_else(|| {
                let waiting = sample.syscall.is_some_and(syscalls::is_event_wait);
                (!waiting && loop_thread(sample.tid)).then_some(StallKind::Loop)
            });
            tracing::debug!(tid = sample.tid, ?kind, frames = ?frames.iter().map(|f| f.function.as_str()).collect::<Vec<_>>(), "census: asleep");
            let Some(kind) = kind else {
                continue;
            };
            // Since attaching: the scheduler's own clock (`se.exec_start`)
            // drifts from the monotonic clock by hundreds of ms on some
            // machines, too much to date the sleep's start from it.
            let mut frames = self.shown(&frames);
            if kind == StallKind::Loop {
                // Read while the thread still sleeps where the census saw
                // it (checked again after): read later, the Python stack
                // could be from after it woke.
                let python = self.python.stack_now(sample.tid);
                if self.syscall_file(sample.tid) == text {
                    let native = self.python.native_frames(&mut self.symbols, &addrs);
                    frames = self.python.interleave(&self.shown(&native), &python);
                }
            }
            found.push(Found {
                tid: sample.tid,
                kind,
                since_ns: started,
                syscall: sample.syscall,
                frames,
                python_read: true,
            });
        }
        found
    }

    /// The threads on a CPU whose every sample was inside a task poll.
    fn on_cpu_in_polls(
        &mut self,
        samples: Vec<Sample>,
        started: u64,
        loop_thread: &mut impl FnMut(u32) -> bool,
    ) -> Vec<Found> {
        // Per thread: samples, the kind every sample was stuck in so far
        // (`None` once two disagree or one is not stuck), the last frames
        // and the last addresses.
        let mut by_thread: HashMap<u32, ThreadSamples> = HashMap::new();
        for sample in samples {
            let addrs = self
                .unwinder
                .unwind(sample.regs, |addr| sample.read_u64(addr));
            let frames = self.symbols.frames(&addrs);
            let kind =
                stuck_in(&frames).or_else(|| loop_thread(sample.tid).then_some(StallKind::Loop));
            let entry = by_thread
                .entry(sample.tid)
                .or_insert((0, kind, Vec::new(), Vec::new()));
            entry.0 += 1;
            if kind.is_some() && entry.1 == kind {
                entry.2 = frames;
                entry.3 = addrs;
            } else {
                entry.1 = None;
            }
        }
        let mut found = Vec::new();
        for (tid, (samples, kind, frames, addrs)) in by_thread {
            let Some(kind) = kind.filter(|_| samples >= MIN_CENSUS_SAMPLES) else {
                continue;
            };
            // A loop thread's builtin (`time.sleep`) named.
            let frames = if kind == StallKind::Loop {
                self.python.native_frames(&mut self.symbols, &addrs)
            } else {
                frames
            };
            found.push(Found {
                tid,
                kind,
                since_ns: started,
                syscall: None,
                frames: self.shown(&frames),
                python_read: false,
            });
        }
        found
    }
}

/// Of one thread's census samples: how many, the kind every one was stuck
/// in so far, the last frames and their addresses.
type ThreadSamples = (usize, Option<StallKind>, Vec<Frame>, Vec<u64>);

/// Whether the code before return address `next + 1` (the unwinder's
/// addresses are return addresses minus one) calls the function `inside` is
/// in: see [`super::unwind::StackUnwinder::unwind_guessing_bp`].
fn calls_function_of(pid: u32, symbols: &mut Symbols, inside: u64, next: u64) -> Option<bool> {
    let ret = next.wrapping_add(1);
    let bytes = read_memory(pid, ret.wrapping_sub(7), 7);
    let code: [u8; 7] = bytes.as_slice().try_into().ok()?;
    match call_before(ret, &code) {
        CallBefore::Direct(target) => {
            let function = |symbols: &mut Symbols, addr: u64| {
                symbols.frames(&[addr]).pop().map(|frame| frame.function)
            };
            let callee = function(symbols, target)?;
            let current = function(symbols, inside)?;
            Some(callee == current)
        }
        CallBefore::Indirect => None,
        CallBefore::None => Some(false),
    }
}

impl Found {
    fn into_stall(self, now: u64) -> (Stall, StallStack) {
        let duration_ns = now.saturating_sub(self.since_ns);
        let asleep = self.syscall.is_some();
        let stall = Stall {
            kind: self.kind,
            tid: self.tid,
            task_id: None,
            header: 0,
            start_ns: self.since_ns,
            duration_ns,
            preempted_ns: 0,
            copy_index: u32::MAX,
            return_addr: 0,
            // The agent sets the threshold in force.
            threshold_ns: 0,
            // Its poll began before loopguard counted requests.
            requests_window: None,
        };
        let cause = Cause {
            kind: if asleep {
                CauseKind::Syscall
            } else {
                CauseKind::Cpu
            },
            syscall: self.syscall.map(|nr| (nr, syscalls::syscall_name(nr))),
            on_cpu_ns: if asleep { 0 } else { duration_ns },
            off_cpu_ns: if asleep { duration_ns } else { 0 },
            wait_ns: 0,
        };
        let stack = StallStack {
            frames: self.frames,
            cause: Some(cause),
            samples: 1,
            before_attach: true,
        };
        (stall, stack)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_census_waits_for_every_running_thread_to_be_sampled_enough() {
        // Past the window, a starved thread with 1 sample holds it open.
        assert!(!census_done(false, false, [5, 1].into_iter()));
        assert!(census_done(false, false, [5, 3].into_iter()));
        // Nothing on a CPU: nothing to wait for.
        assert!(census_done(false, false, std::iter::empty()));
    }

    #[test]
    fn a_census_ends_at_its_longest_or_with_its_store_full() {
        assert!(census_done(true, false, [0].into_iter()));
        assert!(census_done(false, true, [0].into_iter()));
    }

    use super::*;

    fn frames(names: &[&str]) -> Vec<Frame> {
        names
            .iter()
            .map(|name| Frame {
                function: (*name).to_owned(),
                ..Frame::default()
            })
            .collect()
    }

    #[test]
    fn the_syscall_file_gives_registers_only_while_asleep() {
        assert_eq!(
            parse_syscall("230 0x1 0x0 0x7fce 0x7fce 0x0 0x0 0x7fcee677e440 0x7fcee6855545\n"),
            Some((230, 0x7fce_e677_e440, 0x7fce_e685_5545))
        );
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffd1000 0x401000\n"), None);
    }

    #[test]
    fn a_worker_in_a_task_is_in_a_poll_a_parked_one_is_not() {
        let stuck = frames(&[
            "clock_nanosleep",
            "std::thread::sleep",
            "app::handler::{{closure}}",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "tokio::runtime::task::raw::poll",
            "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
            "tokio::runtime::task::raw::poll",
        ]);
        assert!(in_task_poll(&stuck));
        let parked = frames(&[
            "epoll_wait",
            "tokio::runtime::io::driver::Driver::turn",
            "tokio::runtime::scheduler::multi_thread::park::Parker::park",
            "tokio::runtime::scheduler::multi_thread::worker::Context::run",
            "<tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll",
            "tokio::runtime::task::raw::poll",
        ]);
        assert!(!in_task_poll(&parked));
        let pool = frames(&[
            "std::thread::sleep",
            "app::offload::{{closure}}",
            "<tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll",
            "tokio::runtime::task::raw::poll",
        ]);
        assert!(!in_task_poll(&pool), "spawn_blocking work is not a stall");
        // `tokio::io::stdin()`'s reader in a fat-LTO build: `BlockingTask::poll`
        // inlined, so the pool's thread loop is the poll's only witness.
        let stdin = frames(&[
            "read",
            "<std::io::stdio::Stdin as std::io::Read>::read",
            "tokio::io::blocking::Buf::read_from",
            "tokio::runtime::task::core::Core<T,S>::poll",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "tokio::runtime::task::raw::poll",
            "tokio::runtime::blocking::pool::Inner::run",
            "std::sys::backtrace::__rust_begin_short_backtrace",
        ]);
        assert!(!in_task_poll(&stdin), "a blocking-pool read is not a stall");
        // As the release build of the example shows it: the pool's loop
        // inlined into the thread's start, `raw::poll` a tail call.
        let inlined = frames(&[
            "__GI___libc_read",
            "<std::io::stdio::Stdin as std::io::Read>::read",
            "tokio::io::blocking::Buf::read_from",
            "tokio::runtime::task::core::Core<T,S>::poll",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "std::sys::backtrace::__rust_begin_short_backtrace",
            "core::ops::function::FnOnce::call_once{{vtable.shim}}",
            "start_thread",
        ]);
        assert!(
            !in_task_poll(&inlined),
            "a blocking-pool read is not a stall"
        );
        // A worker whose scheduler frames are all inlined: two poll levels.
        let nested = frames(&[
            "app::spin",
            "tokio::runtime::task::core::Core<T,S>::poll",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "tokio::runtime::task::raw::poll",
            "tokio::runtime::task::core::Core<T,S>::poll",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "std::sys::backtrace::__rust_begin_short_backtrace",
        ]);
        assert!(in_task_poll(&nested), "a worker's task poll is nested");
        // A worker's task poll returns into the scheduler, though the worker
        // itself runs inside a blocking-pool task further out.
        let mut worker = stuck.clone();
        worker.extend(frames(&["tokio::runtime::blocking::pool::Inner::run"]));
        assert!(in_task_poll(&worker));
        assert!(!in_task_poll(&frames(&["main", "__libc_start_main"])));
        let tail_called = frames(&[
            "app::spin",
            "tokio::runtime::task::core::Core<T,S>::poll",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
        ]);
        assert!(
            in_task_poll(&tail_called),
            "raw::poll jumped to the harness"
        );
    }

    #[test]
    fn parked_and_epoll_waiting_threads_are_in_an_event_wait() {
        assert!(
            frames(&["syscall", "tokio::runtime::park::Inner::park"])
                .iter()
                .any(is_event_wait)
        );
        assert!(
            frames(&["epoll_wait", "mio::poll::Poll::poll"])
                .iter()
                .any(is_event_wait)
        );
        assert!(frames(&["__GI_epoll_pwait"]).iter().any(is_event_wait));
        let pool_idle = frames(&[
            "syscall",
            "<std::sys::sync::condvar::futex::Condvar>::wait_timeout",
            "tokio::runtime::blocking::pool::Inner::run",
        ]);
        assert!(!pool_idle.iter().any(is_event_wait));
    }

    #[test]
    fn a_blocking_block_on_body_is_stuck_a_parked_one_is_not() {
        // As gdb shows the example's main thread in `/block/main`.
        let body = frames(&[
            "__GI___clock_nanosleep",
            "std::thread::functions::sleep",
            "stall_server::serve::{{closure}}",
            "tokio::runtime::context::scoped::Scoped<T>::set",
            "tokio::runtime::runtime::Runtime::block_on",
            "stall_server::main",
        ]);
        assert!(!in_task_poll(&body));
        assert!(in_block_on_body(&body));
        assert_eq!(stuck_in(&body), Some(StallKind::Loop));
        let parked = frames(&[
            "epoll_wait",
            "mio::poll::Poll::poll",
            "tokio::runtime::io::driver::Driver::turn",
            "tokio::runtime::park::CachedParkThread::park",
            "tokio::runtime::park::CachedParkThread::block_on",
            "tokio::runtime::runtime::Runtime::block_on",
            "app::main",
        ]);
        assert!(!in_block_on_body(&parked));
        let running_a_task = frames(&[
            "app::handler::{{closure}}",
            "tokio::runtime::task::raw::poll",
            "tokio::runtime::scheduler::current_thread::CoreGuard::block_on::{{closure}}",
            "tokio::runtime::scheduler::current_thread::CoreGuard::block_on",
            "tokio::runtime::runtime::Runtime::block_on",
        ]);
        assert_eq!(stuck_in(&running_a_task), Some(StallKind::Poll));
        assert!(!in_block_on_body(&frames(&[
            "tokio::runtime::runtime::Runtime::block_on",
            "app::main"
        ])));
        // With debug info, inlined scheduler wrappers show between them.
        let inlined = frames(&[
            "std::thread::functions::sleep",
            "app::main::{{closure}}",
            "tokio::runtime::coop::budget",
            "tokio::runtime::scheduler::current_thread::Context::enter",
            "tokio::runtime::scheduler::current_thread::CoreGuard::block_on::{{closure}}",
            "tokio::runtime::scheduler::current_thread::CoreGuard::block_on",
            "tokio::runtime::runtime::Runtime::block_on",
        ]);
        assert_eq!(stuck_in(&inlined), Some(StallKind::Loop));
        let parked_current_thread = frames(&[
            "epoll_wait",
            "tokio::runtime::scheduler::current_thread::Context::park",
            "tokio::runtime::scheduler::current_thread::CoreGuard::block_on::{{closure}}",
            "tokio::runtime::runtime::Runtime::block_on",
        ]);
        assert_eq!(stuck_in(&parked_current_thread), None);
    }
}
