//! Stack records as the kernel side sends them, decoded: a [`Sample`] (user
//! registers and a slice of the user stack) and an [`OffCpuSpan`] (a thread
//! back on a CPU after sleeping or waiting inside a stuck poll).

use loopguard_common::stacks::{
    NO_SYSCALL, OffCpuEnd, STACK_BYTES, StackSample, record_kind, sample_cause,
};

/// Why a sample was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleCause {
    /// The thread went to sleep (a system call, a page fault).
    OffCpu,
    /// The thread was preempted while running this code.
    Preempted,
    /// The cpu-clock timer fired while the thread ran this code.
    OnCpu,
}

impl SampleCause {
    fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            sample_cause::OFF_CPU => Some(Self::OffCpu),
            sample_cause::PREEMPTED => Some(Self::Preempted),
            sample_cause::ON_CPU => Some(Self::OnCpu),
            _ => None,
        }
    }

    /// Whether the thread was running (or runnable) the sampled code.
    pub fn on_cpu(self) -> bool {
        self != Self::OffCpu
    }
}

/// User registers the unwinder starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// One copy of a thread's user stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub tid: u32,
    pub cause: SampleCause,
    /// ns, `CLOCK_MONOTONIC`; for an off-CPU sample, when the thread left the CPU.
    pub ts_ns: u64,
    /// Start of the poll it was taken in.
    pub poll_start_ns: u64,
    pub regs: Regs,
    /// The system call the thread sleeps in, when it does.
    pub syscall: Option<i64>,
    /// User address of `stack[0]`.
    pub stack_base: u64,
    pub stack: Vec<u8>,
}

impl Sample {
    /// The 8 bytes of user stack at `addr`, if the copy holds them.
    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let offset = usize::try_from(addr.checked_sub(self.stack_base)?).ok()?;
        let bytes = self.stack.get(offset..offset.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

/// A thread came back on a CPU inside an armed poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuSpan {
    pub tid: u32,
    /// It slept (true) or waited for a CPU after a preemption (false).
    pub slept: bool,
    pub poll_start_ns: u64,
    pub out_ns: u64,
    pub in_ns: u64,
    pub syscall: Option<i64>,
    /// Totals for the poll so far, this span included.
    pub off_ns: u64,
    pub wait_ns: u64,
}

/// A decoded stack ring buffer record.
#[derive(Clone, Debug)]
pub enum StackRecord {
    Sample(Sample),
    OffCpuEnd(OffCpuSpan),
}

pub fn syscall_of(raw: i64) -> Option<i64> {
    (raw != NO_SYSCALL && raw >= 0).then_some(raw)
}

fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    // SAFETY: the length is checked; the records are plain integers and
    // byte arrays, and read_unaligned copes with any alignment.
    (bytes.len() >= size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// Decodes one record; `None` for a short record or an unknown kind.
pub fn decode(bytes: &[u8]) -> Option<StackRecord> {
    let kind = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        record_kind::SAMPLE => {
            let header = size_of::<StackSample>() - STACK_BYTES;
            let raw: StackSample = read_record(bytes)?;
            let len = (raw.stack_len as usize).min(STACK_BYTES);
            Some(StackRecord::Sample(Sample {
                tid: raw.tid,
                cause: SampleCause::from_raw(raw.cause)?,
                ts_ns: raw.ts_ns,
                poll_start_ns: raw.poll_start_ns,
                regs: Regs {
                    ip: raw.ip,
                    sp: raw.sp,
                    bp: raw.bp,
                },
                syscall: syscall_of(raw.syscall),
                stack_base: raw.stack_base,
                stack: bytes[header..header + len].to_vec(),
            }))
        }
        record_kind::OFF_CPU_END => {
            let raw: OffCpuEnd = read_record(bytes)?;
            Some(StackRecord::OffCpuEnd(OffCpuSpan {
                tid: raw.tid,
                slept: raw.cause == sample_cause::OFF_CPU,
                poll_start_ns: raw.poll_start_ns,
                out_ns: raw.out_ns,
                in_ns: raw.in_ns,
                syscall: syscall_of(raw.syscall),
                off_ns: raw.off_ns,
                wait_ns: raw.wait_ns,
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: plain integers and byte arrays.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    #[expect(
        clippy::large_stack_arrays,
        reason = "the record as the kernel sends it"
    )]
    fn a_sample_keeps_only_the_bytes_copied() {
        let mut raw = StackSample {
            kind: record_kind::SAMPLE,
            pid: 1,
            tid: 2,
            cause: sample_cause::OFF_CPU,
            ts_ns: 3,
            poll_start_ns: 1,
            ip: 0x1000,
            sp: 0x7000_0008,
            bp: 0,
            syscall: 230,
            stack_base: 0x7000_0000,
            stack_len: 1024,
            pad: 0,
            stack: [0; STACK_BYTES],
        };
        raw.stack[8..16].copy_from_slice(&0xdead_u64.to_le_bytes());
        let Some(StackRecord::Sample(sample)) = decode(&bytes_of(&raw)) else {
            panic!("not a sample");
        };
        assert_eq!(sample.stack.len(), 1024);
        assert_eq!(sample.syscall, Some(230));
        assert_eq!(sample.read_u64(0x7000_0008), Some(0xdead));
        assert_eq!(sample.read_u64(0x7000_0000 + 1020), None, "past the copy");
        assert_eq!(sample.read_u64(0x6fff_fff8), None, "below the copy");
        raw.syscall = NO_SYSCALL;
        raw.cause = 99;
        assert!(decode(&bytes_of(&raw)).is_none(), "unknown cause");
    }

    #[test]
    fn an_off_cpu_end_decodes() {
        let raw = OffCpuEnd {
            kind: record_kind::OFF_CPU_END,
            tid: 5,
            cause: sample_cause::OFF_CPU,
            out_ns: 10,
            in_ns: 30,
            syscall: 202,
            off_ns: 20,
            ..Default::default()
        };
        let Some(StackRecord::OffCpuEnd(span)) = decode(&bytes_of(&raw)) else {
            panic!("not a span");
        };
        assert!(span.slept);
        assert_eq!((span.syscall, span.off_ns), (Some(202), 20));
        assert!(decode(&[0; 3]).is_none());
    }
}
