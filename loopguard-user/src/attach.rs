//! Attach: loads the embedded eBPF object and attaches it to a
//! [`ProbeTarget`]: a uretprobe and a uprobe on every `raw::poll` copy
//! (returns first, so no entry is ever recorded without its return), and the
//! thread-exit raw tracepoint. Dropping [`AttachedProbes`] detaches everything;
//! so does the agent dying, since the kernel drops links with their fds.

use std::num::NonZeroU32;

use aya::maps::Array;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope};
use aya::programs::{RawTracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use loopguard_common::{
    Config, MAX_BLOCKING_RANGES, MAX_USDT_SITES, PollCookie, UsdtArg, UsdtSpec, arg_kind, names,
    usdt,
};

use crate::discover::elf::PollCopy;
use crate::discover::usdt::{ArgLocation, ArgSpec, ArgSpecError};
use crate::discover::vtable::PollClass;
use crate::discover::waits::{WaitKind, WaitSite};
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
    #[error(
        "this loopguard was built without its eBPF programs (bpf-linker was not on PATH when it was built); run `cargo xtask build-ebpf` once, then rebuild loopguard"
    )]
    NoEbpfObject,
    #[error("process {pid} exited while loopguard was attaching")]
    ProcessExited { pid: u32 },
    #[error("the eBPF object lacks `{0}`; rebuild loopguard (`cargo xtask build`)")]
    Missing(&'static str),
    #[error(
        "`loopguard:{name}` in {path} has {found} arguments, but this loopguard reads probe layout {version} with {expected}: the app's loopguard-middleware and this agent do not match; use the loopguard release made with that middleware version"
    )]
    UsdtLayout {
        name: String,
        path: String,
        found: usize,
        expected: usize,
        version: u64,
    },
    #[error("cannot read the arguments of `loopguard:{name}` in {path}")]
    UsdtArgs {
        name: String,
        path: String,
        #[source]
        source: ArgSpecError,
    },
    #[error(
        "`loopguard:{name}` in {path} is guarded by a semaphore, which loopguard cannot raise, so it would never fire; build the app with loopguard-middleware (the `probe` crate), not the `usdt` crate"
    )]
    UsdtSemaphore { name: String, path: String },
    #[error("more than {max} loopguard USDT sites in {path}")]
    TooManyUsdtSites { path: String, max: u32 },
    #[error("failed to store the USDT argument specs")]
    UsdtSpecs(#[source] aya::maps::MapError),
}

/// The loaded programs and their links; detaches on drop.
pub struct AttachedProbes {
    /// Declared first so it drops first: the uprobes go before the programs.
    links: UProbeLinks,
    pub ebpf: Ebpf,
    /// How event-loop waits are seen.
    pub wait_path: WaitPath,
    /// uprobes + uretprobes attached.
    pub probe_count: usize,
    /// The stack capture programs are loaded and attached.
    pub stacks: bool,
}

/// uprobe links, owned so that detaching can report progress.
struct UProbeLinks(Vec<UProbeLink>);

impl AttachedProbes {
    /// Removes every probe. The kernel removes perf-event uprobes one at a
    /// time under a global lock, waiting for an RCU grace period for each
    /// (about 100 ms on the test VM; closing links from several threads was
    /// measured no faster), so `progress(done, total)` is called about once
    /// a second while it takes long, and always once at the end, when
    /// everything, the programs included, is gone.
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
        progress(total, total);
    }
}

/// The number of arguments a known probe has, `None` for probes of ours
/// this agent does not know (a newer middleware may add some).
fn expected_args(name: &str) -> Option<usize> {
    match name {
        usdt::REQUEST_START => Some(usdt::REQUEST_START_ARGS),
        usdt::REQUEST_END => Some(usdt::REQUEST_END_ARGS),
        _ => None,
    }
}

/// The kernel-side form of a site's argument specs.
fn usdt_spec(args: &[ArgSpec]) -> UsdtSpec {
    let mut spec = UsdtSpec::default();
    for (slot, arg) in spec.args.iter_mut().zip(args) {
        let (kind, reg_offset, value) = match arg.location {
            ArgLocation::Register { offset } => (arg_kind::REGISTER, offset, 0),
            ArgLocation::Memory {
                offset,
                displacement,
            } => (arg_kind::MEMORY, offset, displacement),
            ArgLocation::Immediate(value) => (arg_kind::IMMEDIATE, 0, value),
        };
        *slot = UsdtArg {
            kind,
            size: arg.size,
            signed: u8::from(arg.signed),
            reg_offset,
            value,
            ..UsdtArg::default()
        };
    }
    spec
}

/// Checks and attaches the middleware's USDT sites (none: nothing to do).
fn attach_usdt(
    ebpf: &mut Ebpf,
    target: &ProbeTarget,
    scope: UProbeScope,
    links: &mut UProbeLinks,
) -> Result<(), AttachError> {
    let path = &target.exe.display_path;
    let mut known = Vec::new();
    for site in &target.binary.usdt_sites {
        let Some(expected) = expected_args(&site.name) else {
            tracing::warn!(probe = %site.name, "unknown loopguard USDT probe ignored (a newer middleware?)");
            continue;
        };
        let name = site.name.clone();
        let args = site.args.as_ref().map_err(|source| AttachError::UsdtArgs {
            name: name.clone(),
            path: path.clone(),
            source: source.clone(),
        })?;
        if args.len() != expected {
            let version = usdt::LAYOUT_VERSION;
            return Err(AttachError::UsdtLayout {
                name,
                path: path.clone(),
                found: args.len(),
                expected,
                version,
            });
        }
        if site.semaphore != 0 {
            return Err(AttachError::UsdtSemaphore {
                name,
                path: path.clone(),
            });
        }
        known.push((site, usdt_spec(args)));
    }
    if known.is_empty() {
        return Ok(());
    }
    if known.len() > MAX_USDT_SITES as usize {
        return Err(AttachError::TooManyUsdtSites {
            path: path.clone(),
            max: MAX_USDT_SITES,
        });
    }
    {
        let map = ebpf
            .map_mut(names::USDT_SPECS)
            .ok_or(AttachError::Missing(names::USDT_SPECS))?;
        let mut specs: Array<_, UsdtSpec> = Array::try_from(map).map_err(AttachError::UsdtSpecs)?;
        for (index, (_, spec)) in known.iter().enumerate() {
            specs
                .set(index as u32, spec, 0)
                .map_err(AttachError::UsdtSpecs)?;
        }
    }
    for (program, probe) in [
        (names::REQUEST_START, usdt::REQUEST_START),
        (names::REQUEST_END, usdt::REQUEST_END),
    ] {
        let uprobe = loaded_uprobe(ebpf, program)?;
        for (index, (site, _)) in known
            .iter()
            .enumerate()
            .filter(|(_, (site, _))| site.name == probe)
        {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(site.file_offset),
                cookie: Some(index as u64),
            };
            let link = uprobe
                .attach(point, &target.exe.probe_path, scope)
                .and_then(|id| uprobe.take_link(id))
                .map_err(program_error(program))?;
            links.0.push(link);
        }
    }
    Ok(())
}

/// Program `name` as a uprobe, loaded into the kernel.
fn loaded_uprobe<'e>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
) -> Result<&'e mut UProbe, AttachError> {
    let uprobe: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(AttachError::Missing(name))?
        .try_into()
        .map_err(program_error(name))?;
    uprobe.load().map_err(program_error(name))?;
    Ok(uprobe)
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
    PollCookie {
        copy_index: index as u32,
        id_offset: copy
            .id_offset()
            .and_then(|offset| u16::try_from(offset).ok())
            .unwrap_or(0),
        verified: copy.class() == PollClass::EventLoop,
    }
    .pack()
}

/// How the wait path is probed (`--wait-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitProbes {
    /// uprobes on the C library's epoll wrappers where the target has them,
    /// the syscall tracepoints otherwise.
    #[default]
    Auto,
    /// uprobes on the epoll wrappers: cost only the target's own waits, but
    /// miss a program that makes the syscall itself.
    Uprobe,
    /// The `sys_enter`/`sys_exit` raw tracepoints: see every epoll wait,
    /// but run (and return at once) for every syscall of every process.
    Tracepoint,
    /// No wait path: task polls only.
    Off,
}

/// What the wait path ended up as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPath {
    /// uprobes on this many epoll wrappers (plus Tokio's parks).
    Uprobes { epoll_sites: usize },
    /// The syscall tracepoints (plus uprobes on Tokio's parks).
    Tracepoints,
    /// Not watched.
    Off,
}

impl WaitPath {
    /// How the `attached` line names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uprobes { .. } => "uprobes",
            Self::Tracepoints => "syscall tracepoints",
            Self::Off => "off",
        }
    }
}

/// Chooses how to see epoll waits: uprobes where the wrappers exist.
pub fn choose_wait_path(wanted: WaitProbes, epoll_sites: usize) -> WaitPath {
    match wanted {
        WaitProbes::Off => WaitPath::Off,
        WaitProbes::Uprobe => WaitPath::Uprobes { epoll_sites },
        WaitProbes::Auto if epoll_sites > 0 => WaitPath::Uprobes { epoll_sites },
        WaitProbes::Auto | WaitProbes::Tracepoint => WaitPath::Tracepoints,
    }
}

/// The wait probes on every wait site (returns first: an entry recorded
/// without its return would look like a thread waiting forever, which is
/// harmless, but the other order would miss the first return).
fn attach_waits(
    ebpf: &mut Ebpf,
    target: &ProbeTarget,
    scope: UProbeScope,
    links: &mut UProbeLinks,
    wanted: WaitProbes,
) -> Result<WaitPath, AttachError> {
    let epoll_sites = target
        .wait_sites
        .iter()
        .filter(|site| site.kind == WaitKind::Epoll)
        .count();
    let path = choose_wait_path(wanted, epoll_sites);
    let sites: Vec<&WaitSite> = target
        .wait_sites
        .iter()
        .filter(|site| match path {
            WaitPath::Off => false,
            WaitPath::Tracepoints => site.kind == WaitKind::TokioPark,
            WaitPath::Uprobes { .. } => true,
        })
        .collect();
    if path == WaitPath::Tracepoints {
        for (program, tracepoint) in [
            (names::WAIT_SYSCALL_EXIT, "sys_exit"),
            (names::WAIT_SYSCALL_ENTER, "sys_enter"),
        ] {
            attach_raw_tracepoint(ebpf, program, tracepoint)?;
        }
    }
    let pid = target.pid;
    for program in [names::WAIT_EXIT, names::WAIT_ENTER] {
        if sites.is_empty() {
            break;
        }
        let uprobe = loaded_uprobe(ebpf, program)?;
        for site in &sites {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(site.file_offset),
                cookie: None,
            };
            let link = uprobe
                .attach(point, &site.probe_path, scope)
                .and_then(|id| uprobe.take_link(id))
                .map_err(|source| {
                    if proc::is_alive(pid) {
                        AttachError::Probe {
                            program,
                            path: site.display_path.clone(),
                            offset: site.file_offset,
                            source: Box::new(source),
                        }
                    } else {
                        AttachError::ProcessExited { pid }
                    }
                })?;
            links.0.push(link);
        }
    }
    Ok(path)
}

fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoint: &str,
) -> Result<(), AttachError> {
    let raw: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(program_error(program))?;
    raw.load().map_err(program_error(program))?;
    raw.attach(tracepoint).map_err(program_error(program))?;
    Ok(())
}

/// Loads and attaches everything for `target`.
/// `requests`: also attach to the middleware's USDT sites.
/// `stacks`: also capture the stacks of stuck polls (armed at half the
/// report floor).
pub fn attach(
    target: &ProbeTarget,
    report_floor_ns: u64,
    requests: bool,
    wait_probes: WaitProbes,
    stacks: bool,
) -> Result<AttachedProbes, AttachError> {
    let pid = target.pid;
    let mut config = Config::zeroed();
    config.target_tgid = pid;
    config.report_floor_ns = report_floor_ns;
    let ranges = target.blocking_runtime_ranges();
    for (slot, range) in config.blocking_ranges.iter_mut().zip(&ranges) {
        *slot = [range.start, range.end];
    }
    config.blocking_range_count = ranges.len().min(MAX_BLOCKING_RANGES) as u32;

    if EBPF_OBJECT.is_empty() {
        return Err(AttachError::NoEbpfObject);
    }
    let stack_config = crate::stacks::capture::kernel_config(pid, report_floor_ns / 2, stacks);
    let mut ebpf = EbpfLoader::new()
        .override_global(names::CONFIG, &config, true)
        .override_global(
            loopguard_common::stacks::names::STACK_CONFIG,
            &stack_config,
            true,
        )
        .load(EBPF_OBJECT)
        .map_err(|error| AttachError::Load(Box::new(error)))?;

    let scope =
        UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(AttachError::ProcessExited { pid })?);
    let mut links = UProbeLinks(Vec::new());
    // Returns before entries: an entry recorded without its return would
    // look like a poll stuck forever.
    for (program, is_entry) in [(names::POLL_EXIT, false), (names::POLL_ENTER, true)] {
        let uprobe = loaded_uprobe(&mut ebpf, program)?;
        for (index, copy) in target.binary.poll_copies.iter().enumerate() {
            // Its vtable says only the blocking pool polls it: blocking there is
            // the point, so a probe would cost every `spawn_blocking` (and every
            // `tokio::fs` call) two traps for nothing.
            if copy.is_blocking_pool() {
                continue;
            }
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

    if requests {
        attach_usdt(&mut ebpf, target, scope, &mut links)?;
    }
    let wait_path = attach_waits(&mut ebpf, target, scope, &mut links, wait_probes)?;
    attach_raw_tracepoint(&mut ebpf, names::THREAD_EXIT, "sched_process_exit")?;
    attach_raw_tracepoint(&mut ebpf, names::THREAD_SWITCH, "sched_switch")?;
    let stacks = stacks
        && crate::stacks::capture::attach_programs(&mut ebpf)
            .inspect_err(|error| {
                tracing::warn!(error = %error, "stalls are reported without stacks");
            })
            .is_ok();

    if !proc::is_alive(pid) {
        return Err(AttachError::ProcessExited { pid });
    }
    let probe_count = links.0.len();
    Ok(AttachedProbes {
        links,
        ebpf,
        wait_path,
        probe_count,
        stacks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::usdt::parse_args;

    #[test]
    fn the_wait_path_prefers_uprobes_where_wrappers_exist() {
        assert_eq!(
            choose_wait_path(WaitProbes::Auto, 3),
            WaitPath::Uprobes { epoll_sites: 3 }
        );
        assert_eq!(choose_wait_path(WaitProbes::Auto, 0), WaitPath::Tracepoints);
        assert_eq!(
            choose_wait_path(WaitProbes::Tracepoint, 3),
            WaitPath::Tracepoints
        );
        assert_eq!(choose_wait_path(WaitProbes::Off, 3), WaitPath::Off);
    }

    #[test]
    fn every_class_of_copy_but_the_blocking_pool_is_probed_and_only_event_loops_get_ids() {
        use crate::discover::vtable::TaskLayout;
        let copy = |scheduler_bytes: Option<u64>| PollCopy {
            vaddr: 0x1000,
            file_offset: 0x1000,
            name: "tokio::runtime::task::raw::poll".into(),
            layout: scheduler_bytes.map(|bytes| TaskLayout {
                id_offset: 0x20 + bytes,
                scheduler_bytes: bytes,
            }),
        };
        let event_loop = PollCookie::unpack(poll_cookie(1, &copy(Some(8))));
        assert_eq!(
            event_loop,
            PollCookie {
                copy_index: 1,
                id_offset: 0x28,
                verified: true
            }
        );
        assert!(copy(Some(16)).is_blocking_pool());
        // A layout no known Tokio has, and no verified vtable at all: probed
        // (not the blocking pool), sorted by return address in the kernel
        // (not verified), no task id.
        for unknown in [copy(Some(24)), copy(None)] {
            assert_eq!(unknown.class(), PollClass::Unknown);
            assert!(!unknown.is_blocking_pool());
            assert_eq!(
                PollCookie::unpack(poll_cookie(2, &unknown)),
                PollCookie {
                    copy_index: 2,
                    id_offset: 0,
                    verified: false
                }
            );
        }
    }

    #[test]
    fn only_known_probes_have_an_expected_layout() {
        assert_eq!(
            expected_args("request_start"),
            Some(usdt::REQUEST_START_ARGS)
        );
        assert_eq!(expected_args("request_end"), Some(usdt::REQUEST_END_ARGS));
        assert_eq!(expected_args("request_poll"), None);
    }

    #[test]
    fn argument_specs_become_kernel_records() {
        let spec = usdt_spec(&parse_args("-8@%r10 4@-16(%rbp) 2@$7").unwrap());
        let [register, memory, immediate, unused, ..] = spec.args;
        assert_eq!(
            (
                register.kind,
                register.size,
                register.signed,
                register.reg_offset
            ),
            (arg_kind::REGISTER, 8, 1, 56)
        );
        assert_eq!(
            (memory.kind, memory.size, memory.reg_offset, memory.value),
            (arg_kind::MEMORY, 4, 32, -16)
        );
        assert_eq!(
            (immediate.kind, immediate.size, immediate.value),
            (arg_kind::IMMEDIATE, 2, 7)
        );
        assert_eq!(unused.kind, arg_kind::NONE);
    }

    #[test]
    fn a_layout_mismatch_names_both_sides_and_the_fix() {
        let error = AttachError::UsdtLayout {
            name: "request_start".into(),
            path: "/srv/app".into(),
            found: 9,
            expected: 8,
            version: 1,
        };
        let text = error.to_string();
        assert!(
            text.contains("has 9 arguments") && text.contains("layout 1 with 8"),
            "{text}"
        );
        assert!(
            text.contains("loopguard release made with that middleware version"),
            "{text}"
        );
    }
}
