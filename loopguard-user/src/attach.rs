//! Attach: loads the embedded eBPF object and attaches it to a
//! [`ProbeTarget`]: a uretprobe and a uprobe on every `raw::poll` copy
//! (returns first, so no entry is ever recorded without its return), and the
//! thread-exit raw tracepoint. Dropping [`AttachedProbes`] detaches everything;
//! so does the agent dying, since the kernel drops links with their fds.

use std::num::NonZeroU32;

use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope};
use aya::programs::{RawTracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use loopguard_common::{
    COOKIE_BLOCKING_POOL, COOKIE_ID_OFFSET_MASK, COOKIE_LAYOUT_VERIFIED, Config,
    MAX_BLOCKING_RANGES, names,
};

use crate::discover::elf::PollCopy;
use crate::discover::{ProbeTarget, proc};

/// The eBPF object built from `loopguard-ebpf` by this crate's build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopguard"));

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "failed to load the eBPF programs; the kernel must support BPF ring buffers and uprobe cookies (Linux 5.15+); run with RUST_LOG=debug for the verifier log"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error("failed to load program `{program}`")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("failed to attach `{program}` to {path} at file offset {offset:#x}")]
    Probe {
        program: &'static str,
        path: String,
        offset: u64,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("process {pid} exited while loopguard was attaching")]
    ProcessExited { pid: u32 },
    #[error("the eBPF object lacks `{0}`; rebuild loopguard (`cargo xtask build`)")]
    Missing(&'static str),
}

/// The loaded programs and their links; detaches on drop.
pub struct AttachedProbes {
    /// Declared first so it drops first: the uprobes go before the programs.
    links: UProbeLinks,
    pub ebpf: Ebpf,
    /// uprobes + uretprobes attached.
    pub probe_count: usize,
}

/// uprobe links, owned so that detaching can report progress.
struct UProbeLinks(Vec<UProbeLink>);

impl AttachedProbes {
    /// Removes every probe. The kernel waits for an RCU grace period under a
    /// global lock for each uprobe it removes (about 100 ms each on the test
    /// VM), so this reports progress once a second when it takes long.
    pub fn detach(mut self, mut progress: impl FnMut(usize, usize)) {
        let links = std::mem::take(&mut self.links.0);
        let total = links.len();
        let mut last_report = std::time::Instant::now();
        for (done, link) in links.into_iter().enumerate() {
            drop(link);
            if last_report.elapsed() >= std::time::Duration::from_secs(1) {
                progress(done + 1, total);
                last_report = std::time::Instant::now();
            }
        }
        drop(self);
    }
}

/// Maps a failure of `program` to [`AttachError::Program`].
fn program_error(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> AttachError {
    move |source| AttachError::Program {
        program,
        source: Box::new(source),
    }
}

/// The attach cookie of one copy (layout in `loopguard_common`).
fn poll_cookie(index: usize, copy: &PollCopy) -> u64 {
    let verified = if copy.layout.is_some() {
        COOKIE_LAYOUT_VERIFIED
    } else {
        0
    };
    let blocking = if copy.is_blocking_pool() {
        COOKIE_BLOCKING_POOL
    } else {
        0
    };
    ((index as u64) << 32)
        | verified
        | blocking
        | (copy.id_offset().unwrap_or(0) & COOKIE_ID_OFFSET_MASK)
}

/// Loads and attaches everything for `target`.
pub fn attach(target: &ProbeTarget, report_floor_ns: u64) -> Result<AttachedProbes, AttachError> {
    let pid = target.pid;
    let mut config = Config::zeroed();
    config.target_tgid = pid;
    config.report_floor_ns = report_floor_ns;
    let ranges = target.blocking_runtime_ranges();
    for (slot, range) in config.blocking_ranges.iter_mut().zip(&ranges) {
        *slot = [range.start, range.end];
    }
    config.blocking_range_count = ranges.len().min(MAX_BLOCKING_RANGES) as u32;

    let mut ebpf = EbpfLoader::new()
        .override_global(names::CONFIG, &config, true)
        .load(EBPF_OBJECT)
        .map_err(|error| AttachError::Load(Box::new(error)))?;

    let scope =
        UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(AttachError::ProcessExited { pid })?);
    let mut links = UProbeLinks(Vec::new());
    // Returns before entries: an entry recorded without its return would
    // look like a poll stuck forever.
    for (program, is_entry) in [(names::POLL_EXIT, false), (names::POLL_ENTER, true)] {
        let uprobe: &mut UProbe = ebpf
            .program_mut(program)
            .ok_or(AttachError::Missing(program))?
            .try_into()
            .map_err(program_error(program))?;
        uprobe.load().map_err(program_error(program))?;
        for (index, copy) in target.binary.poll_copies.iter().enumerate() {
            let cookie = is_entry.then(|| poll_cookie(index, copy));
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(copy.file_offset),
                cookie,
            };
            let link = uprobe
                .attach(point, &target.exe.probe_path, scope)
                .and_then(|id| uprobe.take_link(id))
                .map_err(|source| {
                    if proc::is_alive(pid) {
                        AttachError::Probe {
                            program,
                            path: target.exe.display_path.clone(),
                            offset: copy.file_offset,
                            source: Box::new(source),
                        }
                    } else {
                        AttachError::ProcessExited { pid }
                    }
                })?;
            links.0.push(link);
        }
    }

    let program = names::THREAD_EXIT;
    let tracepoint: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(program_error(program))?;
    tracepoint.load().map_err(program_error(program))?;
    tracepoint
        .attach("sched_process_exit")
        .map_err(program_error(program))?;

    if !proc::is_alive(pid) {
        return Err(AttachError::ProcessExited { pid });
    }
    let probe_count = links.0.len();
    Ok(AttachedProbes {
        links,
        ebpf,
        probe_count,
    })
}
