//! What one stuck poll did while stuck: its stack samples (unwound to
//! addresses, weighted by the time they stand for), its off-CPU intervals,
//! and from them the stall's cause: CPU-bound, blocked in a system call, or
//! both.

use std::collections::HashMap;

use super::sample::{OffCpuSpan, SampleCause};
use super::syscalls::syscall_name;

/// Samples kept per poll; later identical stacks still add their weight.
const MAX_SAMPLES: usize = 64;

/// One unwound stack and the time it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedStack {
    /// Lookup addresses, innermost first.
    pub addrs: Vec<u64>,
    pub cause: SampleCause,
    pub syscall: Option<i64>,
    /// When the sample was taken (an off-CPU one: when the thread left the CPU).
    pub ts_ns: u64,
    /// ns this stack stands for; 0 for an off-CPU sample until its end is known.
    pub weight_ns: u64,
}

/// Everything known about one poll `(tid, start)` past the arm delay.
#[derive(Clone, Debug, Default)]
pub struct PollProfile {
    pub stacks: Vec<WeightedStack>,
    /// ns asleep and ns preempted, totals for the poll (from the kernel).
    pub off_ns: u64,
    pub wait_ns: u64,
    /// ns asleep per system call, from finished intervals.
    pub syscall_ns: HashMap<i64, u64>,
    /// The interval in progress (`out_ns`, system call) when last looked at.
    pub asleep_since: Option<(u64, Option<i64>)>,
}

impl PollProfile {
    pub fn add_stack(&mut self, stack: WeightedStack) {
        // On CPU, the instruction moves from sample to sample inside one
        // loop: samples with the same callers are the same stack.
        if stack.cause.on_cpu()
            && let Some(same) = self
                .stacks
                .iter_mut()
                .find(|s| s.cause.on_cpu() && callers(&s.addrs) == callers(&stack.addrs))
        {
            same.weight_ns += stack.weight_ns;
            same.addrs = stack.addrs;
            same.ts_ns = stack.ts_ns;
            return;
        }
        if self.stacks.len() < MAX_SAMPLES {
            self.stacks.push(stack);
        }
    }

    /// Whether an off-CPU sample for the interval that began at `out_ns` is here.
    pub fn has_sample_at(&self, out_ns: u64) -> bool {
        self.stacks
            .iter()
            .any(|s| s.ts_ns == out_ns && !s.cause.on_cpu())
    }

    /// A thread came back: weigh the sample of that interval, count its time.
    pub fn add_span(&mut self, span: &OffCpuSpan) {
        let length = span.in_ns.saturating_sub(span.out_ns);
        for stack in &mut self.stacks {
            if stack.ts_ns == span.out_ns {
                stack.weight_ns = length;
            }
        }
        if span.slept
            && let Some(syscall) = span.syscall
        {
            *self.syscall_ns.entry(syscall).or_default() += length;
        }
        self.off_ns = self.off_ns.max(span.off_ns);
        self.wait_ns = self.wait_ns.max(span.wait_ns);
        // A record of this interval or a later one closes it: the
        // kernel's totals count every interval up to the record's.
        if self.asleep_since.is_some_and(|(out, _)| out <= span.out_ns) {
            self.asleep_since = None;
        }
    }

    /// Closes the profile at `end_ns`: an interval still open counts up to it.
    pub fn settle(&mut self, end_ns: u64) {
        if let Some((out_ns, syscall)) = self.asleep_since {
            let length = end_ns.saturating_sub(out_ns);
            for stack in &mut self.stacks {
                if stack.ts_ns == out_ns && stack.weight_ns == 0 {
                    stack.weight_ns = length;
                }
            }
            if let Some(syscall) = syscall {
                *self.syscall_ns.entry(syscall).or_default() += length;
            }
            self.off_ns += length;
        }
    }

    /// The stack that stands for the most time (the latest one among equals).
    pub fn dominant(&self) -> Option<&WeightedStack> {
        self.stacks
            .iter()
            .rev()
            .max_by_key(|stack| stack.weight_ns.max(1))
    }

    /// The system call slept in longest.
    pub fn main_syscall(&self) -> Option<i64> {
        self.syscall_ns
            .iter()
            .max_by_key(|(nr, ns)| (**ns, -**nr))
            .map(|(nr, _)| *nr)
            .or(self.asleep_since.and_then(|(_, syscall)| syscall))
            .or_else(|| self.stacks.iter().rev().find_map(|s| s.syscall))
    }
}

fn callers(addrs: &[u64]) -> &[u64] {
    addrs.get(1..).unwrap_or_default()
}

/// What kept a stalled poll's thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CauseKind {
    /// Running (or runnable) nearly all the time.
    Cpu,
    /// Asleep in a system call nearly all the time.
    Syscall,
    /// Asleep outside a system call (page faults) nearly all the time.
    OffCpu,
    /// Both, in comparable shares.
    Mixed,
}

impl CauseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Syscall => "syscall",
            Self::OffCpu => "off_cpu",
            Self::Mixed => "mixed",
        }
    }
}

/// A stall's cause with its on/off-CPU split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub kind: CauseKind,
    /// The system call slept in longest (number, name when known).
    pub syscall: Option<(i64, Option<&'static str>)>,
    /// ns running user or kernel code (or runnable, waiting for a CPU).
    pub on_cpu_ns: u64,
    /// ns asleep.
    pub off_cpu_ns: u64,
    /// ns of `on_cpu_ns` spent runnable but waiting for a CPU.
    pub wait_ns: u64,
}

/// Share (in %) of the poll one side must reach to name the cause alone.
const DOMINANT_PERCENT: u64 = 80;

/// Classifies a poll of `duration_ns` from its profile.
pub fn classify(duration_ns: u64, profile: &PollProfile) -> Cause {
    let off = profile.off_ns.min(duration_ns);
    let on = duration_ns - off;
    let syscall = profile.main_syscall().map(|nr| (nr, syscall_name(nr)));
    let kind = if off * 100 >= duration_ns * DOMINANT_PERCENT && duration_ns > 0 {
        if syscall.is_some() {
            CauseKind::Syscall
        } else {
            CauseKind::OffCpu
        }
    } else if on * 100 >= duration_ns * DOMINANT_PERCENT {
        CauseKind::Cpu
    } else {
        CauseKind::Mixed
    };
    Cause {
        kind,
        syscall: if kind == CauseKind::Cpu {
            None
        } else {
            syscall
        },
        on_cpu_ns: on,
        off_cpu_ns: off,
        wait_ns: profile.wait_ns.min(on),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn stack(addrs: &[u64], cause: SampleCause, ts_ms: u64, syscall: Option<i64>) -> WeightedStack {
        WeightedStack {
            addrs: addrs.to_vec(),
            cause,
            syscall,
            ts_ns: ts_ms * MS,
            weight_ns: if cause.on_cpu() { 2 * MS } else { 0 },
        }
    }

    fn span(out_ms: u64, in_ms: u64, syscall: i64, off_total_ms: u64) -> OffCpuSpan {
        OffCpuSpan {
            tid: 1,
            slept: true,
            poll_start_ns: 0,
            out_ns: out_ms * MS,
            in_ns: in_ms * MS,
            syscall: Some(syscall),
            off_ns: off_total_ms * MS,
            wait_ns: 0,
        }
    }

    #[test]
    fn a_spin_is_cpu_bound_with_its_samples_folded() {
        let mut profile = PollProfile::default();
        for ts in 0..10 {
            profile.add_stack(stack(&[100 + ts, 2], SampleCause::OnCpu, ts, None));
        }
        assert_eq!(profile.stacks.len(), 1);
        assert_eq!(profile.dominant().unwrap().weight_ns, 20 * MS);
        let cause = classify(200 * MS, &profile);
        assert_eq!(cause.kind, CauseKind::Cpu);
        assert_eq!(
            (cause.on_cpu_ns, cause.off_cpu_ns, cause.syscall),
            (200 * MS, 0, None)
        );
    }

    #[test]
    fn a_sleep_is_its_syscall_weighted_by_its_interval() {
        let mut profile = PollProfile::default();
        profile.add_stack(stack(&[7, 8], SampleCause::OffCpu, 1, Some(230)));
        profile.add_stack(stack(&[1, 2], SampleCause::OnCpu, 0, None));
        profile.add_span(&span(1, 200, 230, 199));
        let dominant = profile.dominant().unwrap();
        assert_eq!(
            (dominant.addrs.as_slice(), dominant.weight_ns),
            (&[7, 8][..], 199 * MS)
        );
        let cause = classify(200 * MS, &profile);
        assert_eq!(cause.kind, CauseKind::Syscall);
        assert_eq!(cause.syscall, Some((230, Some("clock_nanosleep"))));
        assert_eq!(cause.off_cpu_ns, 199 * MS);
    }

    #[test]
    fn a_sleep_still_going_counts_up_to_the_end() {
        let mut profile = PollProfile::default();
        profile.add_stack(stack(&[7], SampleCause::OffCpu, 5, Some(202)));
        profile.asleep_since = Some((5 * MS, Some(202)));
        profile.settle(105 * MS);
        let cause = classify(106 * MS, &profile);
        assert_eq!(cause.kind, CauseKind::Syscall);
        assert_eq!(cause.syscall, Some((202, Some("futex"))));
        assert_eq!(profile.dominant().unwrap().weight_ns, 100 * MS);
    }

    #[test]
    fn a_finished_sleep_whose_end_was_never_reported_counts_to_the_end() {
        // Seen asleep by a scan at 1 ms; no record of its switch back in.
        let mut profile = PollProfile::default();
        profile.add_stack(stack(&[7, 8], SampleCause::OffCpu, 1, Some(230)));
        profile.asleep_since = Some((MS, Some(230)));
        profile.settle(301 * MS);
        let cause = classify(301 * MS, &profile);
        assert_eq!(cause.kind, CauseKind::Syscall);
        assert_eq!(cause.syscall, Some((230, Some("clock_nanosleep"))));
        assert_eq!(cause.off_cpu_ns, 300 * MS);
    }

    #[test]
    fn a_finished_sleep_the_kernel_closed_is_not_counted_twice() {
        let mut profile = PollProfile {
            asleep_since: Some((MS, Some(230))),
            ..PollProfile::default()
        };
        // A later interval's record: the kernel's totals include the first.
        profile.add_span(&span(120, 200, 230, 280));
        assert_eq!(profile.asleep_since, None);
        profile.settle(301 * MS);
        assert_eq!(classify(301 * MS, &profile).off_cpu_ns, 280 * MS);
    }

    #[test]
    fn half_and_half_is_mixed() {
        let mut profile = PollProfile::default();
        profile.add_span(&span(0, 50, 75, 50));
        let cause = classify(100 * MS, &profile);
        assert_eq!(cause.kind, CauseKind::Mixed);
        assert_eq!(cause.syscall, Some((75, Some("fdatasync"))));
        assert_eq!((cause.on_cpu_ns, cause.off_cpu_ns), (50 * MS, 50 * MS));
    }

    #[test]
    fn asleep_without_a_syscall_is_off_cpu() {
        let profile = PollProfile {
            off_ns: 90 * MS,
            ..PollProfile::default()
        };
        assert_eq!(classify(100 * MS, &profile).kind, CauseKind::OffCpu);
    }
}
