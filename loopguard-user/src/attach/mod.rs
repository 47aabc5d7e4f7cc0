//! Attach: loads the embedded eBPF object and attaches it to a
//! [`ProbeTarget`]: a uretprobe and a uprobe on every `raw::poll` copy
//! (returns first, so no entry is ever recorded without its return), and the
//! thread-exit raw tracepoint. Dropping [`AttachedProbes`] detaches everything;
//! so does the agent dying, since the kernel drops links with their fds.
//!
//! The uprobes go in as one `uprobe_multi` link per program and file where
//! the kernel has them ([`uprobe_multi`]), as one perf-event link per probe
//! otherwise ([`LinkKind`]): the same programs, cookies and pid filter
//! either way.

pub mod stacks;
mod uprobe_multi;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, Stack};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope};
use aya::programs::{RawTracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use loopguard_common::{
    Config, MAX_BLOCKING_RANGES, MAX_USDT_SITES, PollCookie, UsdtArg, UsdtSpec, arg_kind,
    config_flags, names, slots, usdt,
};

use crate::discover::elf::{PollCopy, UsdtSite};
use crate::discover::usdt::{ArgLocation, ArgSpec, ArgSpecError};
use crate::discover::vtable::PollClass;
use crate::discover::waits::{WaitKind, WaitSite};
use crate::discover::{ProbeTarget, proc};

/// The eBPF object built from `loopguard-ebpf` by this crate's build script.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopguard"));

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
    #[error("failed to hand the kernel its free thread slots")]
    FreeSlots(#[source] aya::maps::MapError),
    #[error("failed to arm the wait path")]
    ArmWaits(#[source] aya::maps::MapError),
    #[error(
        "this kernel has no uprobe_multi links with a process filter (Linux 6.10+, or a stable release with the fix); use `--probe-links auto` or `perf`"
    )]
    MultiUnsupported,
    #[error("failed to prepare the uprobe_multi programs; `--probe-links perf` avoids them")]
    Multi(#[source] uprobe_multi::MultiError),
    #[error("failed to attach `{program}` to {probes} offsets of {path} in one uprobe_multi link")]
    MultiLink {
        program: &'static str,
        path: String,
        probes: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded programs and their links; detaches on drop.
pub struct AttachedProbes {
    /// Declared first so it drops first: the uprobes go before the programs.
    links: UprobeLinks,
    pub ebpf: Ebpf,
    /// How event-loop waits are seen.
    pub wait_path: WaitPath,
    /// uprobes + uretprobes attached.
    pub probe_count: usize,
    /// How they are attached, in how many links, and how long it took.
    pub links_summary: LinkSummary,
    /// The stack capture programs are loaded and attached.
    pub stacks: bool,
}

/// How uprobes are attached (`--probe-links`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeLinks {
    /// `uprobe_multi` links where the kernel has them, perf events otherwise.
    #[default]
    Auto,
    /// `uprobe_multi` links (Linux 6.10+), or fail.
    Multi,
    /// One perf-event link per probe (any kernel loopguard runs on; slow to
    /// detach from a service with many poll functions).
    Perf,
}

/// The kind of link the uprobes are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// One `uprobe_multi` link per program and file.
    UprobeMulti,
    /// One perf-event link per probe.
    PerfEvent,
}

impl LinkKind {
    /// How the `attached` line names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UprobeMulti => "uprobe_multi",
            Self::PerfEvent => "perf_event",
        }
    }

    /// What attaching and detaching `probes` probes in `links` links is
    /// expected to take, from measurements on the test VM (Linux 6.18, 2
    /// vCPUs, 1224 probes): removing a perf-event uprobe waits for a grace
    /// period of its own (0.1 to 0.25 s, one after another), a
    /// `uprobe_multi` link one for all its probes (about 0.08 s); creating
    /// either costs well under a millisecond per probe.
    pub fn expected(self, probes: usize, links: usize) -> Expected {
        let probes = probes as f64;
        match self {
            Self::UprobeMulti => Expected {
                attach: Duration::from_secs_f64(0.05 + probes * 0.000_1),
                detach: Duration::from_secs_f64(links as f64 * 0.1),
            },
            Self::PerfEvent => Expected {
                attach: Duration::from_secs_f64(0.05 + probes * 0.000_3),
                detach: Duration::from_secs_f64(probes * 0.15),
            },
        }
    }
}

/// Expected durations, for the progress lines.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Expected {
    pub attach: Duration,
    pub detach: Duration,
}

/// How the uprobes were attached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSummary {
    pub kind: LinkKind,
    /// Links holding the uprobes.
    pub links: usize,
    /// From loading the object until everything was attached.
    pub attach_time: Duration,
}

/// What attaching reports while it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttachProgress {
    /// About to attach `probes` uprobes in `links` links of `kind`.
    Starting {
        kind: LinkKind,
        probes: usize,
        links: usize,
    },
    /// `done` of `total` uprobes attached (about once a second when slow).
    Attached { done: usize, total: usize },
}

/// A program on a set of sites of one file: one `uprobe_multi` link, or
/// one perf-event link per site.
#[derive(Clone, Debug, PartialEq)]
struct ProbeGroup {
    program: &'static str,
    probe_path: PathBuf,
    display_path: String,
    /// File offset and attach cookie of each site.
    sites: Vec<(u64, u64)>,
}

/// The uprobe links, owned so that detaching can report progress.
enum UprobeLinks {
    Perf(Vec<UProbeLink>),
    Multi {
        /// Before the programs: links go first.
        links: Vec<uprobe_multi::MultiLink>,
        /// The programs they run (aya holds the others).
        programs: Vec<std::os::fd::OwnedFd>,
    },
}

impl UprobeLinks {
    /// Closes every link, calling `removed(probes)` after each.
    fn close(self, mut removed: impl FnMut(usize)) {
        match self {
            Self::Perf(links) => {
                for link in links {
                    drop(link);
                    removed(1);
                }
            }
            Self::Multi { links, programs } => {
                for link in links {
                    let probes = link.probes;
                    drop(link);
                    removed(probes);
                }
                drop(programs);
            }
        }
    }
}

impl AttachedProbes {
    /// Removes every probe. The kernel removes a perf-event uprobe under a
    /// global lock, waiting for an RCU grace period for each (about 140 ms
    /// on the test VM; closing links from several threads was measured no
    /// faster), a `uprobe_multi` link waits once for all its probes. So
    /// `progress(done, total)` is called about once a second while it takes
    /// long, and always once at the end, when everything, the programs
    /// included, is gone.
    pub fn detach(mut self, mut progress: impl FnMut(usize, usize)) {
        let links = std::mem::replace(&mut self.links, UprobeLinks::Perf(Vec::new()));
        let total = self.probe_count;
        let mut done = 0;
        let mut last_report = Instant::now();
        links.close(|removed| {
            done += removed;
            // The last report comes once everything is gone, below.
            if done < total && last_report.elapsed() >= Duration::from_secs(1) {
                progress(done.min(total), total);
                last_report = Instant::now();
            }
        });
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

/// The middleware's USDT sites this agent reads, with their argument
/// specs; an error for a site whose arguments or semaphore do not fit (an
/// unknown probe is skipped, with a warning).
fn checked_usdt_sites(target: &ProbeTarget) -> Result<Vec<(&UsdtSite, UsdtSpec)>, AttachError> {
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
    Ok(known)
}

/// Checks the middleware's USDT sites and stores their argument specs;
/// returns their probes (none: nothing to do).
fn usdt_groups(ebpf: &mut Ebpf, target: &ProbeTarget) -> Result<Vec<ProbeGroup>, AttachError> {
    let path = &target.exe.display_path;
    let known = checked_usdt_sites(target)?;
    if known.is_empty() {
        return Ok(Vec::new());
    }
    if known.len() > MAX_USDT_SITES as usize {
        return Err(AttachError::TooManyUsdtSites {
            path: path.clone(),
            max: MAX_USDT_SITES,
        });
    }
    let map = ebpf
        .map_mut(names::USDT_SPECS)
        .ok_or(AttachError::Missing(names::USDT_SPECS))?;
    let mut specs: Array<_, UsdtSpec> = Array::try_from(map).map_err(AttachError::UsdtSpecs)?;
    for (index, (_, spec)) in known.iter().enumerate() {
        specs
            .set(index as u32, spec, 0)
            .map_err(AttachError::UsdtSpecs)?;
    }
    // The cookie is the site's index in USDT_SPECS.
    let sites = |probe: &str| -> Vec<(u64, u64)> {
        known
            .iter()
            .enumerate()
            .filter(|(_, (site, _))| site.name == probe)
            .map(|(index, (site, _))| (site.file_offset, index as u64))
            .collect()
    };
    Ok([
        (names::REQUEST_START, usdt::REQUEST_START),
        (names::REQUEST_END, usdt::REQUEST_END),
    ]
    .into_iter()
    .map(|(program, probe)| ProbeGroup {
        program,
        probe_path: target.exe.probe_path.clone(),
        display_path: target.exe.display_path.clone(),
        sites: sites(probe),
    })
    .filter(|group| !group.sites.is_empty())
    .collect())
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
    match uprobe.load() {
        // Attached to an earlier file already (wait sites span several).
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(uprobe),
        Err(error) => Err(program_error(name)(error)),
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

/// Where a stall's request comes from (`--requests`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestSource {
    /// The middleware's in-flight table, read from the target's memory when
    /// a stall is seen in progress and when it ends: no probe per request.
    /// Names the culprit and the victims the table shows (a lower bound
    /// under heavy load); no request counters.
    #[default]
    Table,
    /// The middleware's USDT probes (`request_start`, `request_end`): two
    /// kernel entries per request; victims counted exactly, requests
    /// counted per route (`loopguard_requests_started_total`).
    Probes,
    /// No request at all: stalls are reported with their thread and task.
    Off,
}

impl RequestSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Table => "table",
            Self::Probes => "probes",
            Self::Off => "off",
        }
    }
}

/// How the wait path is probed (`--wait-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitProbes {
    /// `switch` for a Tokio program (its task polls split a busy worker's
    /// time); for an event loop without task polls, `calls` where the
    /// target has the C library's epoll wrappers, the syscall tracepoints
    /// otherwise.
    #[default]
    Auto,
    /// The `sched_switch` tracepoint that already runs: a thread switched
    /// out asleep in an epoll wait is waiting until it is switched back in.
    /// No probe per epoll wait; uprobes only on the Tokio parks that sleep
    /// in a futex (the `block_on` thread's, a worker's condvar). A wait
    /// that does not sleep (`epoll_wait` with events ready) is not seen:
    /// a task poll's return ends a busy stretch instead.
    Switch,
    /// A uprobe on each epoll wrapper's entry and none on its return, with
    /// `sched_switch` for the calls that sleep: one kernel entry per wait
    /// of the target's own, where `uprobe` costs two. A call ends the busy
    /// stretch and the next begins at once, unless the call sleeps; then it
    /// begins when the thread is switched back in.
    Calls,
    /// A uprobe and a return probe on each epoll wrapper: the wait's
    /// return is seen where it happens, at two kernel entries per wait.
    /// Both miss a program that makes the syscall itself.
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
    /// `sched_switch` (plus uprobes on Tokio's futex parks).
    Switch,
    /// Entry uprobes on this many epoll wrappers, and `sched_switch` (plus
    /// uprobes on Tokio's futex parks).
    Calls { epoll_sites: usize },
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
            Self::Switch => "sched_switch",
            Self::Calls { .. } => "epoll entries + sched_switch",
            Self::Uprobes { .. } => "uprobes",
            Self::Tracepoints => "syscall tracepoints",
            Self::Off => "off",
        }
    }

    /// The sites that get a wait probe on this path.
    fn probed(self, sites: &[WaitSite]) -> Vec<&WaitSite> {
        if self == Self::Off {
            return Vec::new();
        }
        crate::discover::waits::and_park_calls(sites, self.probed_functions(sites))
    }

    /// The wait functions (not the park calls) probed on this path.
    fn probed_functions(self, sites: &[WaitSite]) -> Vec<&WaitSite> {
        match self {
            Self::Off => Vec::new(),
            Self::Switch => crate::discover::waits::probed_on_switch(sites),
            Self::Calls { .. } => {
                let mut probed: Vec<_> = sites
                    .iter()
                    .filter(|site| site.kind == WaitKind::Epoll)
                    .collect();
                probed.extend(crate::discover::waits::probed_on_switch(sites));
                probed
            }
            Self::Tracepoints => sites
                .iter()
                .filter(|site| site.kind == WaitKind::TokioPark)
                .collect(),
            Self::Uprobes { .. } => sites
                .iter()
                .filter(|site| matches!(site.kind, WaitKind::Epoll | WaitKind::TokioPark))
                .collect(),
        }
    }
}

/// Chooses how to see waits: on `sched_switch` for a program with task
/// polls (`tokio`), else entry uprobes where the epoll wrappers exist.
pub fn choose_wait_path(wanted: WaitProbes, epoll_sites: usize, tokio: bool) -> WaitPath {
    match wanted {
        WaitProbes::Off => WaitPath::Off,
        WaitProbes::Switch => WaitPath::Switch,
        WaitProbes::Auto if tokio => WaitPath::Switch,
        WaitProbes::Uprobe => WaitPath::Uprobes { epoll_sites },
        WaitProbes::Calls => WaitPath::Calls { epoll_sites },
        WaitProbes::Auto if epoll_sites > 0 => WaitPath::Calls { epoll_sites },
        WaitProbes::Auto | WaitProbes::Tracepoint => WaitPath::Tracepoints,
    }
}

/// The wait path `wanted` gives `target`.
fn wait_path_for(target: &ProbeTarget, wanted: WaitProbes) -> WaitPath {
    let epoll_sites = target
        .wait_sites
        .iter()
        .filter(|site| site.kind == WaitKind::Epoll)
        .count();
    let tokio = !target.is_loop_only()
        && crate::discover::waits::switch_sees_every_park(&target.wait_sites);
    choose_wait_path(wanted, epoll_sites, tokio)
}

/// Attaches the wait path's tracepoints if it has them, and returns its
/// uprobes: on every wait site, returns first (an entry recorded without
/// its return would look like a thread waiting forever, which is harmless,
/// but the other order would miss the first return).
fn wait_groups(
    ebpf: &mut Ebpf,
    target: &ProbeTarget,
    path: WaitPath,
) -> Result<Vec<ProbeGroup>, AttachError> {
    let sites = path.probed(&target.wait_sites);
    if path == WaitPath::Tracepoints {
        for (program, tracepoint) in [
            (names::WAIT_SYSCALL_EXIT, "sys_exit"),
            (names::WAIT_SYSCALL_ENTER, "sys_enter"),
        ] {
            attach_raw_tracepoint(ebpf, program, tracepoint)?;
        }
    }
    let calls_only = matches!(path, WaitPath::Calls { .. });
    Ok(group_wait_sites(&sites, calls_only))
}

/// One group per program and file (the C library and the executable are
/// two files), exits first. With `calls_only`, the epoll wrappers get no
/// return probe.
fn group_wait_sites(sites: &[&WaitSite], calls_only: bool) -> Vec<ProbeGroup> {
    let mut groups: Vec<ProbeGroup> = Vec::new();
    for program in [names::WAIT_EXIT, names::WAIT_RETURN, names::WAIT_ENTER] {
        for site in sites {
            if !wait_programs(site.kind, calls_only).contains(&program) {
                continue;
            }
            let epoll = site.kind == WaitKind::Epoll;
            // An epoll wrapper's entry reads its epoll fd (the loop it waits
            // for); a park has none.
            let cookie = match (epoll, calls_only) {
                (true, true) => {
                    loopguard_common::WAIT_SITE_EPOLL | loopguard_common::WAIT_SITE_CALL
                }
                (true, false) => loopguard_common::WAIT_SITE_EPOLL,
                (false, _) => 0,
            };
            let site_probe = (site.file_offset, cookie);
            match groups
                .iter_mut()
                .find(|group| group.program == program && group.probe_path == site.probe_path)
            {
                Some(group) => group.sites.push(site_probe),
                None => groups.push(ProbeGroup {
                    program,
                    probe_path: site.probe_path.clone(),
                    display_path: site.display_path.clone(),
                    sites: vec![site_probe],
                }),
            }
        }
    }
    groups
}

/// The programs a wait site of `kind` gets: a function its entry and
/// return probes (an epoll wrapper only its entry with `calls_only`), a
/// park call its entry probe on the call, and the instruction the call
/// returns to a plain uprobe that ends the wait.
fn wait_programs(kind: WaitKind, calls_only: bool) -> &'static [&'static str] {
    match kind {
        WaitKind::Epoll if calls_only => &[names::WAIT_ENTER],
        WaitKind::Epoll | WaitKind::TokioPark => &[names::WAIT_EXIT, names::WAIT_ENTER],
        WaitKind::TokioParkCall => &[names::WAIT_ENTER],
        WaitKind::TokioParkReturn => &[names::WAIT_RETURN],
    }
}

/// The poll probes: a uretprobe and a uprobe on every copy (returns
/// first: an entry recorded without its return would look like a poll
/// stuck forever).
fn poll_groups(target: &ProbeTarget) -> Vec<ProbeGroup> {
    [(names::POLL_EXIT, false), (names::POLL_ENTER, true)]
        .into_iter()
        .map(|(program, is_entry)| ProbeGroup {
            program,
            probe_path: target.exe.probe_path.clone(),
            display_path: target.exe.display_path.clone(),
            sites: target
                .binary
                .poll_copies
                .iter()
                .enumerate()
                // Its vtable says only the blocking pool polls it: blocking
                // there is the point, so a probe would cost every
                // `spawn_blocking` (and every `tokio::fs` call) two traps
                // for nothing.
                .filter(|(_, copy)| !copy.is_blocking_pool())
                .map(|(index, copy)| {
                    let cookie = if is_entry {
                        poll_cookie(index, copy)
                    } else {
                        0
                    };
                    (copy.file_offset, cookie)
                })
                .collect(),
        })
        .filter(|group| !group.sites.is_empty())
        .collect()
}

/// Decides the link kind: `uprobe_multi` where wanted and the kernel has
/// it (with the programs prepared for it), perf events otherwise.
fn choose_links(
    wanted: ProbeLinks,
    ebpf: &Ebpf,
) -> Result<Option<uprobe_multi::MultiPrograms>, AttachError> {
    if wanted == ProbeLinks::Perf {
        return Ok(None);
    }
    if !uprobe_multi::supported() {
        if wanted == ProbeLinks::Multi {
            return Err(AttachError::MultiUnsupported);
        }
        tracing::info!(
            "no uprobe_multi links with a process filter on this kernel; using perf-event uprobes"
        );
        return Ok(None);
    }
    match uprobe_multi::MultiPrograms::new(EBPF_OBJECT, ebpf) {
        Ok(programs) => Ok(Some(programs)),
        Err(error) if wanted == ProbeLinks::Auto => {
            tracing::warn!(%error, "using perf-event uprobes");
            Ok(None)
        }
        Err(error) => Err(AttachError::Multi(error)),
    }
}

/// Attaches every group, one `uprobe_multi` link each.
fn attach_multi(
    programs: &mut uprobe_multi::MultiPrograms,
    groups: &[ProbeGroup],
    pid: u32,
    progress: &mut dyn FnMut(AttachProgress),
) -> Result<Vec<uprobe_multi::MultiLink>, AttachError> {
    let total = groups.iter().map(|group| group.sites.len()).sum();
    let mut links = Vec::with_capacity(groups.len());
    let mut done = 0;
    let mut last_report = Instant::now();
    for group in groups {
        let returns = programs
            .is_return(group.program)
            .map_err(AttachError::Multi)?;
        let program = programs
            .program(group.program)
            .map_err(AttachError::Multi)?;
        let link = uprobe_multi::attach(program, &group.probe_path, &group.sites, pid, returns)
            .map_err(|source| {
                if proc::is_alive(pid) {
                    AttachError::MultiLink {
                        program: group.program,
                        path: group.display_path.clone(),
                        probes: group.sites.len(),
                        source,
                    }
                } else {
                    AttachError::ProcessExited { pid }
                }
            })?;
        links.push(link);
        done += group.sites.len();
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(AttachProgress::Attached { done, total });
            last_report = Instant::now();
        }
    }
    progress(AttachProgress::Attached { done, total });
    Ok(links)
}

/// Attaches every site of every group, one perf-event link each.
fn attach_perf(
    ebpf: &mut Ebpf,
    groups: &[ProbeGroup],
    pid: u32,
    progress: &mut dyn FnMut(AttachProgress),
) -> Result<Vec<UProbeLink>, AttachError> {
    let scope =
        UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(AttachError::ProcessExited { pid })?);
    let total = groups.iter().map(|group| group.sites.len()).sum();
    let mut links = Vec::with_capacity(total);
    let mut last_report = Instant::now();
    for group in groups {
        let program = group.program;
        let uprobe = loaded_uprobe(ebpf, program)?;
        for &(offset, cookie) in &group.sites {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: (cookie != 0).then_some(cookie),
            };
            let link = uprobe
                .attach(point, &group.probe_path, scope)
                .and_then(|id| uprobe.take_link(id))
                .map_err(|source| {
                    if proc::is_alive(pid) {
                        AttachError::Probe {
                            program,
                            path: group.display_path.clone(),
                            offset,
                            source: Box::new(source),
                        }
                    } else {
                        AttachError::ProcessExited { pid }
                    }
                })?;
            links.push(link);
            if last_report.elapsed() >= Duration::from_secs(1) {
                progress(AttachProgress::Attached {
                    done: links.len(),
                    total,
                });
                last_report = Instant::now();
            }
        }
    }
    progress(AttachProgress::Attached {
        done: links.len(),
        total,
    });
    Ok(links)
}

pub(crate) fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoint: &str,
) -> Result<(), AttachError> {
    attach_raw_tracepoint_first(ebpf, program, &[tracepoint])
}

/// Loads `program` and attaches it to the first of `tracepoints` that
/// takes it.
fn attach_raw_tracepoint_first(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoints: &[&str],
) -> Result<(), AttachError> {
    let raw: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(program_error(program))?;
    raw.load().map_err(program_error(program))?;
    let mut last = None;
    for tracepoint in tracepoints {
        match raw.attach(tracepoint) {
            Ok(_) => return Ok(()),
            Err(error) => last = Some(error),
        }
    }
    Err(last.map_or(AttachError::Missing(program), |error| {
        program_error(program)(error)
    }))
}

/// The benchmark's floor variants (`cargo xtask bench`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bench {
    /// Every program returns at once.
    pub empty_programs: bool,
    /// No poll return probes.
    pub entry_only: bool,
}

/// What [`attach`] is asked to do besides the poll probes.
#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    /// Kernel report floor (ns).
    pub report_floor_ns: u64,
    /// Also attach to the middleware's USDT sites.
    pub requests: bool,
    pub wait_probes: WaitProbes,
    /// Also capture the stacks of stuck polls (armed at half the report
    /// floor).
    pub stacks: bool,
    pub probe_links: ProbeLinks,
    /// The benchmark's floor variants.
    pub bench: Bench,
}

/// Puts every thread slot on the kernel's free stack, the highest first, so
/// threads take the lowest: the slots in use stay few pages apart.
fn fill_free_slots(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let map = ebpf
        .map_mut(slots::names::FREE_SLOTS)
        .ok_or(AttachError::Missing(slots::names::FREE_SLOTS))?;
    let mut free: Stack<&mut MapData, u32> =
        Stack::try_from(map).map_err(AttachError::FreeSlots)?;
    for slot in (0..slots::MAX_THREAD_SLOTS).rev() {
        free.push(slot, 0).map_err(AttachError::FreeSlots)?;
    }
    Ok(())
}

/// Lets the wait paths on tracepoints start busy stretches, now that every
/// task poll return can end one (`names::WAITS_ARMED`).
fn arm_waits(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let map = ebpf
        .map_mut(names::WAITS_ARMED)
        .ok_or(AttachError::Missing(names::WAITS_ARMED))?;
    let mut armed: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(AttachError::ArmWaits)?;
    armed.set(0, 1, 0).map_err(AttachError::ArmWaits)
}

/// Loads and attaches everything for `target`, telling `progress` what it
/// is about to do and how far it got.
pub fn attach(
    target: &ProbeTarget,
    options: AttachOptions,
    progress: &mut dyn FnMut(AttachProgress),
) -> Result<AttachedProbes, AttachError> {
    let started = Instant::now();
    let pid = target.pid;
    let wait_path = wait_path_for(target, options.wait_probes);
    let mut ebpf = load(target, &options, wait_path)?;
    fill_free_slots(&mut ebpf)?;
    let stacks = attach_tracepoints(&mut ebpf, options.stacks)?;

    let mut groups = poll_groups(target);
    if options.bench.entry_only {
        groups.retain(|group| group.program != names::POLL_EXIT);
    }
    if options.requests {
        groups.extend(usdt_groups(&mut ebpf, target)?);
    }
    groups.extend(wait_groups(&mut ebpf, target, wait_path)?);
    let probe_count = groups.iter().map(|group| group.sites.len()).sum();
    let (links, kind) = link_groups(&mut ebpf, &groups, options.probe_links, pid, progress)?;
    arm_waits(&mut ebpf)?;
    let link_count = match &links {
        UprobeLinks::Perf(links) => links.len(),
        UprobeLinks::Multi { links, .. } => links.len(),
    };

    if !proc::is_alive(pid) {
        return Err(AttachError::ProcessExited { pid });
    }
    Ok(AttachedProbes {
        links,
        ebpf,
        wait_path,
        probe_count,
        links_summary: LinkSummary {
            kind,
            links: link_count,
            attach_time: started.elapsed(),
        },
        stacks,
    })
}

/// How long a poll or stretch runs before it nudges the agent: half the
/// report floor, as the stack capture's arm delay (at least 1 µs, since 0
/// turns nudges off).
pub fn nudge_ns(report_floor_ns: u64) -> u64 {
    (report_floor_ns / 2).max(1_000)
}

/// The kernel side's configuration for `target`: its tgid, the report
/// floor, the blocking pool's code ranges and the paths switched on.
fn kernel_config(target: &ProbeTarget, options: &AttachOptions, wait_path: WaitPath) -> Config {
    let mut config = Config::zeroed();
    config.target_tgid = target.pid;
    if options.bench.empty_programs {
        config.flags |= config_flags::EMPTY_PROGRAMS;
    }
    if options.requests && !target.binary.usdt_sites.is_empty() {
        config.flags |= config_flags::REQUESTS;
    }
    match wait_path {
        WaitPath::Switch => config.flags |= config_flags::WAIT_SWITCH,
        WaitPath::Calls { .. } => {
            config.flags |= config_flags::WAIT_SWITCH | config_flags::WAIT_CALLS;
        }
        WaitPath::Uprobes { .. } | WaitPath::Tracepoints | WaitPath::Off => {}
    }
    config.report_floor_ns = options.report_floor_ns;
    // When the stack capture arms: the earliest a scan has anything to do
    // with a poll or stretch still running.
    config.nudge_ns = nudge_ns(options.report_floor_ns);
    config.tick_ns = crate::discover::tick::steady_tick_ns();
    config.rq_steal = crate::discover::steal::rq_steal();
    let ranges = target.blocking_runtime_ranges();
    for (slot, range) in config.blocking_ranges.iter_mut().zip(&ranges) {
        *slot = [range.start, range.end];
    }
    config.blocking_range_count = ranges.len().min(MAX_BLOCKING_RANGES) as u32;
    config
}

/// Loads the embedded object with its configuration globals set for
/// `target`.
fn load(
    target: &ProbeTarget,
    options: &AttachOptions,
    wait_path: WaitPath,
) -> Result<Ebpf, AttachError> {
    let config = kernel_config(target, options, wait_path);
    if EBPF_OBJECT.is_empty() {
        return Err(AttachError::NoEbpfObject);
    }
    let stack_config = stacks::kernel_config(
        options.report_floor_ns / 2,
        options.stacks,
        target.is_loop_only(),
    );
    EbpfLoader::new()
        .override_global(names::CONFIG, &config, true)
        .override_global(
            loopguard_common::stacks::names::STACK_CONFIG,
            &stack_config,
            true,
        )
        .load(EBPF_OBJECT)
        .map_err(|error| AttachError::Load(Box::new(error)))
}

/// The tracepoints every probe relies on, attached before any probe, and
/// the stack capture's programs when `stacks` is asked; returns whether
/// stacks are captured.
fn attach_tracepoints(ebpf: &mut Ebpf, stacks: bool) -> Result<bool, AttachError> {
    // Before any probe, so every thread that takes a slot gives it back.
    attach_raw_tracepoint(ebpf, names::THREAD_EXIT, "sched_process_exit")?;
    // The context-switch programs before any probe, too: a poll (or busy
    // stretch) that began while they were missing would have its
    // preemption counted as held time, and under load that is a false
    // stall of a poll that only waited for a CPU during the attach.
    // The wake-up program first: `thread_switch` notes the sleepers whose
    // wake-up it dates, and a sleeper it misses only loses that one wait.
    // `thread_switch` also does the stack capture's switch bookkeeping
    // when `STACK_CONFIG.enabled` (set at load from `stacks`).
    attach_raw_tracepoint(ebpf, names::THREAD_WAKEUP, "sched_wakeup")?;
    attach_raw_tracepoint(ebpf, names::THREAD_SWITCH, "sched_switch")?;
    attach_steal_programs(ebpf, crate::discover::steal::rq_steal().known())?;
    Ok(stacks
        && stacks::attach_programs(ebpf)
            .inspect_err(|error| {
                tracing::warn!(error = %error, "stalls are reported without stacks");
            })
            .is_ok())
}

/// The programs that find the time the host took from a thread (steal),
/// attached before any probe for the same reason as the context-switch
/// program: a vCPU the host did not run would make the poll in flight
/// look that much longer. `from_run_queue`: `thread_switch` reads the
/// steal clock from the run queue, and the timer program, after the tick
/// has updated it, counts it for a thread that runs on; otherwise every
/// scheduler clock update is watched (`sched_stat_runtime`).
fn attach_steal_programs(ebpf: &mut Ebpf, from_run_queue: bool) -> Result<(), AttachError> {
    if !from_run_queue {
        attach_raw_tracepoint(ebpf, names::THREAD_RUNTIME, "sched_stat_runtime")?;
    }
    // Pauses the steal clock never hears of are seen by the timer
    // interrupts that did not come; x86 names those tracepoints. Elsewhere
    // (or where neither can be attached) those pauses count as held time.
    let points: &[&str] = if from_run_queue {
        &["local_timer_exit", "local_timer_entry"]
    } else {
        &["local_timer_entry"]
    };
    if let Err(error) = attach_raw_tracepoint_first(ebpf, names::CPU_TIMER, points) {
        tracing::warn!(
            %error,
            "no local timer interrupts to watch: a pause of the virtual machine that its steal clock does not report counts as held time"
        );
        if from_run_queue {
            // Its runtime updates stand in for the ticks (the steal it
            // would count is the run queue's here).
            attach_raw_tracepoint(ebpf, names::THREAD_RUNTIME, "sched_stat_runtime")?;
        }
    }
    Ok(())
}

/// Attaches `groups` for `pid`: one `uprobe_multi` link per group where
/// wanted and possible, one perf-event link per probe otherwise.
fn link_groups(
    ebpf: &mut Ebpf,
    groups: &[ProbeGroup],
    wanted: ProbeLinks,
    pid: u32,
    progress: &mut dyn FnMut(AttachProgress),
) -> Result<(UprobeLinks, LinkKind), AttachError> {
    let probe_count = groups.iter().map(|group| group.sites.len()).sum();
    let multi = choose_links(wanted, ebpf)?;
    let kind = if multi.is_some() {
        LinkKind::UprobeMulti
    } else {
        LinkKind::PerfEvent
    };
    progress(AttachProgress::Starting {
        kind,
        probes: probe_count,
        links: if multi.is_some() {
            groups.len()
        } else {
            probe_count
        },
    });
    let links = match multi {
        Some(mut programs) => UprobeLinks::Multi {
            links: attach_multi(&mut programs, groups, pid, progress)?,
            // The parsed object is no longer needed.
            programs: programs.into_loaded(),
        },
        None => UprobeLinks::Perf(attach_perf(ebpf, groups, pid, progress)?),
    };
    Ok((links, kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::usdt::parse_args;

    #[test]
    fn the_wait_path_prefers_entry_uprobes_where_wrappers_exist() {
        assert_eq!(
            choose_wait_path(WaitProbes::Auto, 3, false),
            WaitPath::Calls { epoll_sites: 3 }
        );
        assert_eq!(
            choose_wait_path(WaitProbes::Calls, 3, true),
            WaitPath::Calls { epoll_sites: 3 }
        );
        assert_eq!(
            choose_wait_path(WaitProbes::Auto, 0, false),
            WaitPath::Tracepoints
        );
        assert_eq!(
            choose_wait_path(WaitProbes::Tracepoint, 3, true),
            WaitPath::Tracepoints
        );
        assert_eq!(
            choose_wait_path(WaitProbes::Uprobe, 3, true),
            WaitPath::Uprobes { epoll_sites: 3 }
        );
        assert_eq!(choose_wait_path(WaitProbes::Off, 3, true), WaitPath::Off);
    }

    #[test]
    fn a_tokio_program_waits_on_sched_switch_by_default() {
        assert_eq!(
            choose_wait_path(WaitProbes::Auto, 3, true),
            WaitPath::Switch
        );
        assert_eq!(
            choose_wait_path(WaitProbes::Auto, 0, true),
            WaitPath::Switch
        );
        assert_eq!(
            choose_wait_path(WaitProbes::Switch, 3, false),
            WaitPath::Switch
        );
    }

    fn wait_site(path: &str, offset: u64) -> WaitSite {
        WaitSite {
            probe_path: PathBuf::from(path),
            display_path: path.to_owned(),
            file_offset: offset,
            name: "epoll_wait".into(),
            kind: WaitKind::Epoll,
        }
    }

    /// A probe group as the tests compare it: program, file, (offset,
    /// cookie) of each site.
    type Grouped = (&'static str, String, Vec<(u64, u64)>);

    /// `sites` grouped for attaching.
    fn grouped(sites: &[WaitSite], calls_only: bool) -> Vec<Grouped> {
        group_wait_sites(&sites.iter().collect::<Vec<_>>(), calls_only)
            .into_iter()
            .map(|g| (g.program, g.display_path, g.sites))
            .collect()
    }

    /// Returns first, and an epoll wrapper's probes carry the cookie that
    /// makes the entry read its epoll fd; a park's carry none.
    #[test]
    fn wait_sites_make_one_group_per_program_and_file_returns_first() {
        let (libc, exe) = ("/lib/libc.so.6", "/srv/app");
        let park = WaitSite {
            name: "park_timeout".into(),
            kind: WaitKind::TokioPark,
            ..wait_site(exe, 0x20)
        };
        let sites = [wait_site(libc, 0x10), park, wait_site(libc, 0x30)];
        assert_eq!(
            grouped(&sites, false),
            [
                (
                    names::WAIT_EXIT,
                    libc.to_owned(),
                    vec![(0x10, 1), (0x30, 1)]
                ),
                (names::WAIT_EXIT, exe.to_owned(), vec![(0x20, 0)]),
                (
                    names::WAIT_ENTER,
                    libc.to_owned(),
                    vec![(0x10, 1), (0x30, 1)]
                ),
                (names::WAIT_ENTER, exe.to_owned(), vec![(0x20, 0)]),
            ]
        );
        assert!(group_wait_sites(&[], false).is_empty());
    }

    /// On the entry-only path an epoll wrapper has an entry probe alone,
    /// whose cookie says so; a park keeps both.
    #[test]
    fn entry_only_epoll_wrappers_get_no_return_probe() {
        let (libc, exe) = ("/lib/libc.so.6", "/srv/app");
        let park = WaitSite {
            name: "park".into(),
            kind: WaitKind::TokioPark,
            ..wait_site(exe, 0x20)
        };
        let sites = [wait_site(libc, 0x10), park];
        assert_eq!(
            grouped(&sites, true),
            [
                (names::WAIT_EXIT, exe.to_owned(), vec![(0x20, 0)]),
                (names::WAIT_ENTER, libc.to_owned(), vec![(0x10, 3)]),
                (names::WAIT_ENTER, exe.to_owned(), vec![(0x20, 0)]),
            ]
        );
    }

    /// A park the build inlined: the entry probe on its call, a plain
    /// uprobe that ends the wait on the instruction the call returns to,
    /// returns first as for every wait site.
    #[test]
    fn a_park_call_gets_its_entry_on_the_call_and_a_return_uprobe_after_it() {
        let exe = "/srv/app";
        let at = |file_offset, kind| WaitSite {
            name: "tokio::runtime::scheduler::multi_thread::worker::Context::park_internal".into(),
            kind,
            ..wait_site(exe, file_offset)
        };
        let sites = [
            at(0x40, WaitKind::TokioParkCall),
            at(0x45, WaitKind::TokioParkReturn),
        ];
        for calls_only in [false, true] {
            assert_eq!(
                grouped(&sites, calls_only),
                [
                    (names::WAIT_RETURN, exe.to_owned(), vec![(0x45, 0)]),
                    (names::WAIT_ENTER, exe.to_owned(), vec![(0x40, 0)]),
                ]
            );
        }
    }

    #[test]
    fn multi_links_are_expected_to_detach_in_a_fraction_of_perf_links_time() {
        // The case: 300 probes, each under 3 s with multi links.
        let multi = LinkKind::UprobeMulti.expected(300, 4);
        assert!(multi.attach < Duration::from_secs(1) && multi.detach < Duration::from_secs(1));
        let perf = LinkKind::PerfEvent.expected(300, 300);
        assert!(perf.detach > Duration::from_secs(30), "{perf:?}");
        assert_eq!(LinkKind::UprobeMulti.as_str(), "uprobe_multi");
        assert_eq!(LinkKind::PerfEvent.as_str(), "perf_event");
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
