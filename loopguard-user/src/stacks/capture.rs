//! The kernel-facing half of stack capture (the programs are loaded by
//! [`crate::attach::stacks`]): reading their ring buffer and off-CPU map, opening a
//! cpu-clock perf event on a thread only while its poll is stuck, and
//! copying the stack of a thread that is asleep right now.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::ProgramFd;
use loopguard_common::stacks::{MAX_CENSUS_THREADS, STACK_BYTES, ThreadOffCpu, names};

use super::StackError;
use super::sample::{StackRecord, decode};

/// cpu-clock samples per second of a stuck thread's CPU time.
pub const ON_CPU_HZ: u64 = 499;

/// Perf events open at once (one per stuck thread).
const MAX_PERF_EVENTS: usize = 64;

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5`.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_freq: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

const _: () = assert!(size_of::<PerfEventAttr>() == 112);
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
const ATTR_FREQ: u64 = 1 << 10;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// A cpu-clock event on thread `tid`, running `program` on each sample
/// taken in user mode. Closing the fd detaches it.
fn open_cpu_clock(tid: u32, program: &ProgramFd) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: size_of::<PerfEventAttr>() as u32,
        config: PERF_COUNT_SW_CPU_CLOCK,
        sample_freq: ON_CPU_HZ,
        flags: ATTR_FREQ | ATTR_EXCLUDE_KERNEL | ATTR_EXCLUDE_HV,
        ..PerfEventAttr::default()
    };
    // SAFETY: a valid attr; the kernel reads `size` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            tid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let prog = program.as_fd().as_raw_fd();
    // SAFETY: ioctls on our own perf event fd with documented arguments.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog) < 0
            || libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// Copies up to [`STACK_BYTES`] of `pid`'s memory from `base` (less at the
/// end of the mapping). Empty when it cannot be read.
pub fn read_remote_stack(pid: u32, base: u64) -> Vec<u8> {
    crate::discover::proc::read_memory(pid, base, STACK_BYTES)
}

/// Handles on the stack capture maps and the perf events opened so far.
pub struct Capture {
    ring: RingBuf<MapData>,
    offcpu: BpfHashMap<MapData, u32, ThreadOffCpu>,
    census: BpfHashMap<MapData, u32, u32>,
    program: Option<ProgramFd>,
    /// tid → (poll start, its cpu-clock event).
    perf: HashMap<u32, (u64, OwnedFd)>,
    perf_failures: u64,
    pub malformed: u64,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, StackError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(StackError::Missing(name))?;
    T::try_from(map).map_err(|source| StackError::Map { name, source })
}

impl Capture {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, StackError> {
        let program = match ebpf.program(names::ON_CPU) {
            Some(aya::programs::Program::PerfEvent(program)) => {
                program.fd().ok().and_then(|fd| fd.try_clone().ok())
            }
            _ => None,
        };
        Ok(Self {
            ring: take(ebpf, names::STACK_EVENTS)?,
            offcpu: take(ebpf, names::THREAD_OFFCPU)?,
            census: take(ebpf, names::CENSUS_TIDS)?,
            program,
            perf: HashMap::new(),
            perf_failures: 0,
            malformed: 0,
        })
    }

    /// Every record queued, in order.
    pub fn drain(&mut self, out: &mut Vec<StackRecord>) {
        while let Some(item) = self.ring.next() {
            match decode(&item) {
                Some(record) => out.push(record),
                None => self.malformed += 1,
            }
        }
    }

    /// The thread's off-CPU bookkeeping, as the kernel has it now.
    pub fn offcpu(&self, tid: u32) -> Option<ThreadOffCpu> {
        self.offcpu.get(&tid, 0).ok()
    }

    /// Samples exactly the threads of `stuck` (tid, poll start) on CPU:
    /// opens events for new ones, closes those no longer stuck.
    pub fn sample_on_cpu(&mut self, stuck: &[(u32, u64)]) {
        self.perf
            .retain(|tid, (start, _)| stuck.contains(&(*tid, *start)));
        let Some(program) = &self.program else {
            return;
        };
        for &(tid, start) in stuck {
            if self.perf.contains_key(&tid) || self.perf.len() >= MAX_PERF_EVENTS {
                continue;
            }
            match open_cpu_clock(tid, program) {
                Ok(fd) => {
                    self.perf.insert(tid, (start, fd));
                }
                Err(error) => {
                    if self.perf_failures == 0 {
                        tracing::warn!(%error, tid, "cannot sample a stuck thread on CPU (perf_event_open)");
                    }
                    self.perf_failures += 1;
                }
            }
        }
    }

    /// Threads sampled on CPU right now.
    pub fn sampled_threads(&self) -> usize {
        self.perf.len()
    }

    /// Starts sampling `tids` on CPU whatever they run (a poll that began
    /// before attaching is not on the kernel's poll stacks); their samples
    /// come through the ring with a poll start of 0 until the returned
    /// events are handed to [`Self::stop_census`].
    pub fn start_census(&mut self, tids: &[u32]) -> Vec<OwnedFd> {
        let Some(program) = &self.program else {
            return Vec::new();
        };
        let mut events = Vec::new();
        for &tid in tids.iter().take(MAX_CENSUS_THREADS as usize) {
            if self.census.insert(tid, 1, 0).is_ok()
                && let Ok(fd) = open_cpu_clock(tid, program)
            {
                events.push(fd);
            }
        }
        events
    }

    /// Closes the census events and forgets their threads.
    pub fn stop_census(&mut self, tids: &[u32], events: Vec<OwnedFd>) {
        drop(events);
        for tid in tids {
            let _ = self.census.remove(tid);
        }
    }
}
