//! Stacks: where a stuck poll spends its time, and why (issue #14).
//!
//! In: the kernel's stack samples and off-CPU intervals of polls past the
//! arm delay ([`capture`]), snapshots of the in-flight polls. Out: for each
//! stall, its dominant stack (unwound from `.eh_frame` by [`unwind`],
//! named by [`symbolize`], runtime frames trimmed by [`fold`]) and its
//! [`profile::Cause`]; over the run, identical stacks folded together.

pub mod capture;
pub mod census;
mod debug_files;
pub mod fold;
pub mod profile;
pub mod python;
pub mod sample;
pub mod symbolize;
pub mod syscalls;
pub mod unwind;

use std::collections::HashMap;

use aya::Ebpf;
use loopguard_common::stacks::{STACK_CHUNK_BYTES, sample_cause};
use loopguard_common::{LoopState, ThreadPolls};

use crate::detect::{Stall, StallKind};
use capture::Capture;
use fold::{Frame, StackStalls, StackTable};
use profile::{Cause, PollProfile, WeightedStack, classify};
use sample::{Regs, Sample, SampleCause, StackRecord, syscall_of};
use symbolize::Symbols;
use unwind::StackUnwinder;

pub use crate::attach::stacks::StackError;

/// How stacks are captured and shown.
#[derive(Clone, Copy, Debug)]
pub struct StackOptions {
    /// ns a poll must have run before its stack is sampled (half the threshold).
    pub arm_delay_ns: u64,
    /// Keep the runtime's frames below the task (`--all-frames`).
    pub all_frames: bool,
}

/// A stall's stack and cause, ready to print.
#[derive(Clone, Debug, Default)]
pub struct StallStack {
    /// Innermost first.
    pub frames: Vec<Frame>,
    pub cause: Option<Cause>,
    /// Stack samples the stack was chosen from.
    pub samples: usize,
    /// The poll began before loopguard attached (found from the thread's
    /// stack); its duration is a lower bound.
    pub before_attach: bool,
}

impl StallStack {
    /// The poll is now known to have begun `extra_ns` earlier than
    /// counted: that time goes to the side the thread is found on (a stall
    /// found stuck before attach is all one side).
    pub fn extend_back(&mut self, extra_ns: u64) {
        if let Some(cause) = &mut self.cause {
            if cause.kind == profile::CauseKind::Cpu {
                cause.on_cpu_ns += extra_ns;
            } else {
                cause.off_cpu_ns += extra_ns;
            }
        }
    }
}

/// How long a profile is kept after its poll was last seen stuck.
const PROFILE_TTL_NS: u64 = 2_000_000_000;

/// What turns samples into named frames for one process: its modules'
/// unwind tables and a symbolizer, both loaded and warmed up front.
pub struct StackTools {
    pid: u32,
    unwinder: StackUnwinder,
    symbols: Symbols,
}

impl StackTools {
    /// Reads the process's modules and symbolizes one address in each, so
    /// the first stall does not pay for parsing them.
    pub fn prepare(pid: u32) -> Self {
        let unwinder = StackUnwinder::for_process(pid);
        let mut symbols = Symbols::new(pid);
        let _ = symbols.frames(&unwinder.module_starts());
        Self {
            pid,
            unwinder,
            symbols,
        }
    }

    /// For one target of many (`watch --all`): the unwind tables only (a
    /// few MiB), nothing symbolized up front, and a symbolizer that lets go
    /// of what it parsed once idle ([`Symbols::transient`]). A host's
    /// memory then grows by a few MiB a target, not tens; a stall after an
    /// idle spell is named more slowly (it parses the modules its frames
    /// are in again).
    pub fn prepare_lean(pid: u32) -> Self {
        Self {
            pid,
            unwinder: StackUnwinder::for_process(pid),
            symbols: Symbols::transient(pid),
        }
    }
}

/// Stack capture for one watched process.
pub struct Stacks {
    pid: u32,
    options: StackOptions,
    capture: Capture,
    unwinder: StackUnwinder,
    symbols: Symbols,
    /// `(tid, poll start)` → its profile and when it was last seen stuck.
    profiles: HashMap<(u32, u64), (PollProfile, u64)>,
    table: StackTable,
    records: Vec<StackRecord>,
    /// The look for polls stuck since before attaching, while it runs.
    census: Option<census::Census>,
    /// Python frames of a `CPython` target's stuck loop threads.
    python: python::PythonStacks,
}

impl Stacks {
    pub fn new(
        ebpf: &mut Ebpf,
        tools: StackTools,
        options: StackOptions,
    ) -> Result<Self, StackError> {
        Ok(Self {
            pid: tools.pid,
            options,
            capture: Capture::new(ebpf)?,
            unwinder: tools.unwinder,
            symbols: tools.symbols,
            profiles: HashMap::new(),
            table: StackTable::default(),
            records: Vec::new(),
            census: None,
            python: python::PythonStacks::new(tools.pid),
        })
    }

    /// Takes in every record the kernel queued.
    pub fn collect(&mut self, now_ns: u64) {
        self.capture.drain(&mut self.records);
        let records = std::mem::take(&mut self.records);
        for record in &records {
            match record {
                // Sampled by the census whatever it runs.
                StackRecord::Sample(sample) if sample.poll_start_ns == 0 => {
                    if let Some(census) = &mut self.census
                        && census.samples.len() < census::MAX_CENSUS_SAMPLES
                    {
                        census.samples.push(sample.clone());
                    }
                }
                StackRecord::Sample(sample) => self.add_sample(sample, now_ns),
                StackRecord::OffCpuEnd(span) => {
                    self.profile(span.tid, span.poll_start_ns, now_ns)
                        .add_span(span);
                }
            }
        }
        self.records = records;
        self.records.clear();
    }

    fn profile(&mut self, tid: u32, start: u64, now_ns: u64) -> &mut PollProfile {
        let entry = self
            .profiles
            .entry((tid, start))
            .or_insert_with(|| (PollProfile::default(), now_ns));
        entry.1 = now_ns;
        &mut entry.0
    }

    fn add_sample(&mut self, sample: &Sample, now_ns: u64) {
        let addrs = self
            .unwinder
            .unwind(sample.regs, |addr| sample.read_u64(addr));
        tracing::debug!(tid = sample.tid, cause = ?sample.cause, regs = ?sample.regs, base = sample.stack_base, len = sample.stack.len(), addrs = ?addrs.iter().map(|a| format!("{a:#x}")).collect::<Vec<_>>(), "unwound");
        let weight_ns = if sample.cause.on_cpu() {
            1_000_000_000 / capture::ON_CPU_HZ
        } else {
            0
        };
        self.profile(sample.tid, sample.poll_start_ns, now_ns)
            .add_stack(WeightedStack {
                addrs,
                cause: sample.cause,
                syscall: sample.syscall,
                ts_ns: sample.ts_ns,
                weight_ns,
            });
    }

    /// Every scan: samples the threads whose poll is past the arm delay on
    /// CPU, copies the stack of those asleep since before they were armed.
    /// `loops`: the wait state of a loop-only target's threads (empty for
    /// Tokio targets), whose long busy stretches are sampled like polls.
    pub fn scan(
        &mut self,
        now_ns: u64,
        threads: &[(u32, ThreadPolls)],
        loops: &[(u32, LoopState)],
    ) {
        self.collect(now_ns);
        let mut stuck = stuck_polls(now_ns, self.options.arm_delay_ns, threads);
        let stretches = stuck_stretches(now_ns, self.options.arm_delay_ns, loops);
        // A stuck loop thread of a Python target: its Python stack now.
        for &(tid, start) in &stretches {
            self.python.sample(tid, start, now_ns);
        }
        self.python.expire(now_ns);
        self.symbols.release_if_idle();
        stuck.extend(stretches);
        self.capture.sample_on_cpu(&stuck);
        for &(tid, start) in &stuck {
            self.look_off_cpu(tid, start, now_ns);
        }
        self.profiles
            .retain(|_, (_, seen)| now_ns.saturating_sub(*seen) < PROFILE_TTL_NS);
    }

    /// Records what the off-CPU probe saw of thread `tid`, stuck in the
    /// poll or stretch that started at `start`; copies its stack if it has
    /// been asleep since before it was armed.
    fn look_off_cpu(&mut self, tid: u32, start: u64, now_ns: u64) {
        let Some(state) = self
            .capture
            .offcpu(tid)
            .filter(|s| s.poll_start_ns == start)
        else {
            self.profile(tid, start, now_ns);
            return;
        };
        let asleep = state.out_ns != 0 && state.cause == sample_cause::OFF_CPU;
        let profile = self.profile(tid, start, now_ns);
        profile.off_ns = profile.off_ns.max(state.off_ns);
        profile.wait_ns = profile.wait_ns.max(state.wait_ns);
        if !asleep {
            return;
        }
        let syscall = syscall_of(state.syscall);
        profile.asleep_since = Some((state.out_ns, syscall));
        if profile.has_sample_at(state.out_ns) {
            return;
        }
        // Asleep since before it was armed: its stack cannot change
        // until it wakes, so read it from here.
        let base = state.sp & !(STACK_CHUNK_BYTES as u64 - 1);
        let copied = capture::read_remote_stack(self.pid, base);
        let unchanged = self
            .capture
            .offcpu(tid)
            .is_some_and(|now| now.out_ns == state.out_ns);
        if unchanged && !copied.is_empty() {
            let sample = Sample {
                tid,
                cause: SampleCause::OffCpu,
                ts_ns: state.out_ns,
                poll_start_ns: start,
                regs: Regs {
                    ip: state.ip,
                    sp: state.sp,
                    bp: state.bp,
                },
                syscall,
                stack_base: base,
                stack: copied,
            };
            self.add_sample(&sample, now_ns);
        }
    }

    /// The stack and cause of `stall`; a finished stall's profile is used up
    /// and its stack counted in the run's table.
    pub fn describe(&mut self, stall: &Stall, finished: bool) -> StallStack {
        let key = (stall.tid, stall.start_ns);
        let end_ns = stall.start_ns + stall.duration_ns;
        self.collect(end_ns);
        let mut profile = if finished {
            self.profiles.remove(&key).map(|(profile, _)| profile)
        } else {
            self.profiles.get(&key).map(|(profile, _)| profile.clone())
        }
        .unwrap_or_default();
        if let Some(state) = self
            .capture
            .offcpu(stall.tid)
            .filter(|s| s.poll_start_ns == stall.start_ns)
        {
            profile.off_ns = profile.off_ns.max(state.off_ns);
            profile.wait_ns = profile.wait_ns.max(state.wait_ns);
            if state.out_ns != 0 && state.cause == sample_cause::OFF_CPU {
                profile.asleep_since = Some((state.out_ns, syscall_of(state.syscall)));
            }
        }
        // A finished stall's interval still open is one whose end the
        // kernel's totals do not count (its switch back in was not seen,
        // or its record was lost): `settle` counts it up to the end, since
        // a thread cannot end a stall asleep, rather than as CPU time.
        if finished && profile.asleep_since.is_some() {
            tracing::debug!(
                tid = stall.tid,
                asleep_since = ?profile.asleep_since,
                "an off-CPU interval of a finished stall had no end; counted to the stall's end"
            );
        }
        // The detector's own count of the poll's wait for a CPU (its
        // `sched_switch` preemptions and the host's steal time) is what it
        // left out of the held time; the cause says no less.
        profile.wait_ns = profile.wait_ns.max(stall.preempted_ns);
        profile.settle(end_ns);
        let cause = classify(stall.duration_ns, &profile);
        let frames = self.frames_of(stall, finished, &profile);
        if finished && !frames.is_empty() {
            self.table.record(&frames, stall.duration_ns);
        }
        StallStack {
            frames,
            cause: Some(cause),
            samples: profile.stacks.len(),
            before_attach: false,
        }
    }

    /// The frames of `stall`'s dominant stack in `profile`, symbolized and
    /// trimmed; a loop stall's with its Python frames merged in.
    fn frames_of(&mut self, stall: &Stall, finished: bool, profile: &PollProfile) -> Vec<Frame> {
        let frames = match profile.dominant() {
            Some(stack) => {
                let frames = if stall.kind == StallKind::Loop {
                    self.python.native_frames(&mut self.symbols, &stack.addrs)
                } else {
                    self.symbols.frames(&stack.addrs)
                };
                if self.options.all_frames {
                    frames
                } else {
                    fold::trim_runtime(&frames).to_vec()
                }
            }
            None => Vec::new(),
        };
        if stall.kind == StallKind::Loop {
            self.python
                .merge(stall.tid, stall.start_ns, finished, &frames)
        } else {
            frames
        }
    }

    fn shown(&self, frames: &[Frame]) -> Vec<Frame> {
        if self.options.all_frames {
            frames.to_vec()
        } else {
            fold::trim_runtime(frames).to_vec()
        }
    }

    /// Stacks of the run's stalls, longest total first.
    pub fn ranked(&self) -> Vec<StackStalls> {
        self.table.ranked()
    }

    pub fn folded_text(&self) -> String {
        self.table.folded_text()
    }

    /// Threads sampled on CPU right now.
    pub fn sampled_threads(&self) -> usize {
        self.capture.sampled_threads()
    }
}

/// `(tid, poll start)` of every thread whose innermost task poll has run
/// for at least `arm_delay_ns`.
pub fn stuck_polls(
    now_ns: u64,
    arm_delay_ns: u64,
    threads: &[(u32, ThreadPolls)],
) -> Vec<(u32, u64)> {
    threads
        .iter()
        .filter_map(|(tid, polls)| {
            // Wall time, as the kernel arms capture (`arm_delay_ns`).
            let frame = polls.innermost_task_poll()?;
            (now_ns.saturating_sub(frame.start_ns) >= arm_delay_ns)
                .then_some((*tid, frame.start_ns))
        })
        .collect()
}

/// `(tid, stretch start)` of every loop thread busy (out of any wait) for
/// at least `arm_delay_ns`.
pub fn stuck_stretches(
    now_ns: u64,
    arm_delay_ns: u64,
    loops: &[(u32, LoopState)],
) -> Vec<(u32, u64)> {
    loops
        .iter()
        .filter(|(_, state)| {
            state.depth == 0
                && state.busy_start_ns != 0
                && now_ns.saturating_sub(state.busy_start_ns) >= arm_delay_ns
        })
        .map(|(tid, state)| (*tid, state.busy_start_ns))
        .collect()
}

#[cfg(test)]
mod tests {
    use loopguard_common::PollFrame;
    use loopguard_common::frame_flags;

    use super::*;

    #[test]
    fn only_busy_stretches_past_the_arm_delay_are_stuck() {
        let busy = |depth: u32, start: u64| LoopState {
            depth,
            busy_start_ns: start,
            ..LoopState::default()
        };
        let loops = [
            (1, busy(0, 100)),
            // Waiting: not busy, whatever its last stretch.
            (2, busy(1, 100)),
            // Busy since before attach: the start is not known.
            (3, busy(0, 0)),
            // Not long enough yet.
            (4, busy(0, 900)),
        ];
        assert_eq!(stuck_stretches(1_000, 500, &loops), [(1, 100)]);
    }

    #[test]
    fn only_task_polls_past_the_arm_delay_are_stuck() {
        let mut polls = ThreadPolls {
            depth: 2,
            ..ThreadPolls::default()
        };
        polls.frames[0] = PollFrame {
            start_ns: 0,
            flags: frame_flags::CONTAINER,
            ..PollFrame::default()
        };
        polls.frames[1] = PollFrame {
            start_ns: 100,
            ..PollFrame::default()
        };
        let mut container_only = polls;
        container_only.depth = 1;
        let threads = [(1, polls), (2, container_only)];
        assert_eq!(stuck_polls(125, 25, &threads), [(1, 100)]);
        assert!(stuck_polls(124, 25, &threads).is_empty());
    }
}
