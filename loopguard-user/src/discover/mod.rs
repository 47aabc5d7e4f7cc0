//! Discover: from a pid to a [`ProbeTarget`], everything needed to attach.
//!
//! Reads the executable through `/proc/PID/exe` ([`files`]), finds every
//! copy of Tokio's task poll function and the task-id offset its vtable
//! gives ([`elf`]), where the file is mapped in the process ([`proc`]), and
//! the Tokio version it was built with, when that can be told
//! ([`version`]).
//!
//! The parsers of the bytes read ([`elf`], [`usdt`], [`vtable`],
//! [`symbols`], [`version`], and the symbol half of [`waits`]) are the
//! `loopguard-parse` crate, which has no kernel, aya or system call in it;
//! they are re-exported here, the stage that hands them the target's
//! files, so the stages above name them through `discover`.

pub mod files;
pub mod glob;
pub mod identity;
pub mod preflight;
pub mod proc;
pub mod steal;
pub mod tick;
pub mod waits;

pub use loopguard_parse::{elf, interpreter, symbols, usdt, version, vtable};

use std::io;
use std::ops::Range;

use loopguard_common::MAX_BLOCKING_RANGES;

use self::elf::{BinaryInfo, ElfError};
use self::proc::{Executable, FileMappings};
use self::waits::WaitSite;

/// Why a process cannot be profiled. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("no process with pid {pid}; check the pid with `pgrep -a NAME` or `ps -e`")]
    NoSuchProcess { pid: u32 },
    #[error(
        "cannot read the executable of pid {pid}: permission denied; run loopguard as root (sudo), or with CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_KILL"
    )]
    Permission { pid: u32 },
    #[error(
        "cannot read the executable of pid {pid}: the kernel refused even with CAP_SYS_PTRACE; the process is out of reach (another user namespace, or a security module such as Yama, SELinux or AppArmor denies it); run loopguard inside its namespace or container"
    )]
    Unreachable { pid: u32 },
    #[error(
        "pid {pid} ({name}) is a kernel thread, not a program: it has no executable to probe; point --pid at a process running a Tokio runtime or an event loop (`pgrep -a NAME`)"
    )]
    KernelThread { pid: u32, name: String },
    #[error(
        "pid {pid} exited while loopguard was reading it (its executable was already gone); nothing was attached"
    )]
    Exiting { pid: u32 },
    #[error("failed to read the executable of pid {pid} ({path})")]
    ReadExe {
        pid: u32,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} (pid {pid}) has no symbol table: the binary is stripped; rebuild without stripping (Cargo profile `strip = \"none\"` or `\"debuginfo\"`, not `true` or `\"symbols\"`)"
    )]
    Stripped { pid: u32, path: String },
    #[error(
        "{path} (pid {pid}) uses Tokio, but no copy of `tokio::runtime::task::raw::poll` was found; loopguard supports tokio 1.38 and later"
    )]
    NoTaskPoll { pid: u32, path: String },
    #[error("cannot profile {path} (pid {pid})")]
    Binary {
        pid: u32,
        path: String,
        #[source]
        source: ElfError,
    },
    #[error("{path} is not mapped in pid {pid}; the process may be exiting")]
    NotMapped { pid: u32, path: String },
    #[error(
        "{path} (pid {pid}) has nothing loopguard can watch: {why}; point --pid at the process that runs a Tokio runtime or an event loop (asyncio, Node.js, ...)"
    )]
    NoEventLoop { pid: u32, path: String, why: String },
}

/// How loopguard watches a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMode {
    /// Tokio task polls (and the wait path, when its sites were found).
    Tokio,
    /// The wait path only: the program is not Tokio (Python, Node, ...) or
    /// its symbols cannot be read; `why` says which.
    LoopOnly { why: String },
}

/// A process and what loopguard knows about its executable.
#[derive(Debug)]
pub struct ProbeTarget {
    pub pid: u32,
    pub exe: Executable,
    pub binary: BinaryInfo,
    pub mappings: FileMappings,
    /// The Tokio version the binary was built with, when its paths tell.
    pub tokio_version: Option<String>,
    pub mode: WatchMode,
    /// Where event-loop threads wait: the wait probes' sites.
    pub wait_sites: Vec<WaitSite>,
}

impl ProbeTarget {
    /// Watched through its wait path only: its stalls are busy stretches
    /// of its event loop, not task polls.
    pub fn is_loop_only(&self) -> bool {
        matches!(self.mode, WatchMode::LoopOnly { .. })
    }
}

/// Finds what to probe in process `pid`.
pub fn discover(pid: u32) -> Result<ProbeTarget, DiscoverError> {
    let exe =
        proc::executable(pid).map_err(|error| io_error(pid, &format!("/proc/{pid}/exe"), error))?;
    let data = files::read_through_proc(&exe.probe_path, files::MAX_EXECUTABLE_BYTES)
        .map_err(|error| io_error(pid, &exe.display_path, error))?;
    let tokio_version = version::tokio_version(&data);
    let (binary, mode) = analyze(pid, &exe, &data, tokio_version.is_some())?;
    // Every C library exports epoll_wait: only a process that has an epoll
    // instance open runs an event loop.
    if let WatchMode::LoopOnly { why } = &mode
        && !proc::has_epoll_fd(pid)
        && !opens_its_loop_later(&exe.display_path)
    {
        return Err(DiscoverError::NoEventLoop {
            pid,
            path: exe.display_path,
            why: format!("{why}, and it has no epoll instance open"),
        });
    }
    let maps =
        proc::read_maps(pid).map_err(|error| io_error(pid, &format!("/proc/{pid}/maps"), error))?;
    let mappings = FileMappings::new(&maps, exe.inode);
    if mappings.is_empty() {
        return Err(DiscoverError::NotMapped {
            pid,
            path: exe.display_path,
        });
    }
    let wait_sites = find_wait_sites(pid, &exe, &data, &maps, mode == WatchMode::Tokio);
    Ok(ProbeTarget {
        pid,
        exe,
        binary,
        mappings,
        tokio_version,
        mode,
        wait_sites,
    })
}

/// What the executable `data` of process `pid` holds, and so how it is
/// watched: Tokio's task polls, or its event loop only.
fn analyze(
    pid: u32,
    exe: &Executable,
    data: &[u8],
    has_tokio_version: bool,
) -> Result<(BinaryInfo, WatchMode), DiscoverError> {
    match elf::analyze(data) {
        Ok(binary) => {
            for layout in &binary.foreign_inflight_tables {
                tracing::warn!(
                    layout = %layout,
                    "the app's loopguard-middleware keeps an in-flight table of a layout this loopguard does not read; it is ignored, so stalls are not tied to requests by it (use a loopguard that matches the middleware, or --requests probes)"
                );
            }
            Ok((binary, WatchMode::Tokio))
        }
        // A Tokio program whose task polls cannot be found: loop mode would
        // take its parked workers (a futex, not epoll, and no park symbol to
        // tell) for busy ones. Refuse, with the fix.
        Err(ElfError::Stripped) if has_tokio_version || version::mentions_tokio(data) => {
            Err(DiscoverError::Stripped {
                pid,
                path: exe.display_path.clone(),
            })
        }
        Err(ElfError::NoTaskPoll) => Err(DiscoverError::NoTaskPoll {
            pid,
            path: exe.display_path.clone(),
        }),
        // Not Tokio, or unreadable as such: the wait path may still watch it.
        Err(error @ (ElfError::Stripped | ElfError::NotTokio)) => Ok((
            BinaryInfo::default(),
            WatchMode::LoopOnly {
                why: loop_only_reason(&error, version::looks_like_rust(data)),
            },
        )),
        Err(source) => Err(DiscoverError::Binary {
            pid,
            path: exe.display_path.clone(),
            source,
        }),
    }
}

/// Whether `path` is an interpreter that opens its event loop after it
/// starts (Python, Node): `loopguard run -- pytest` meets it at exec, before
/// any loop exists, and must watch it from there.
fn opens_its_loop_later(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("python") || name.starts_with("node")
}

fn loop_only_reason(error: &ElfError, rust: bool) -> String {
    match error {
        // A C program, a shell, an interpreter: no rebuild advice fits.
        _ if !rust => "not a Rust program".to_owned(),
        ElfError::Stripped => "no symbol table (stripped), and no sign of Tokio".to_owned(),
        _ => "no Tokio symbols".to_owned(),
    }
}

/// The wait sites of process `pid`: in the executable (a statically linked
/// epoll wrapper, Tokio's park functions) and in every C library it maps.
fn find_wait_sites(
    pid: u32,
    exe: &Executable,
    data: &[u8],
    maps: &[proc::Mapping],
    tokio: bool,
) -> Vec<WaitSite> {
    let mut sites: Vec<WaitSite> = waits::sites_in(data, tokio)
        .into_iter()
        .map(|(file_offset, name, kind)| WaitSite {
            probe_path: exe.probe_path.clone(),
            display_path: exe.display_path.clone(),
            file_offset,
            name,
            kind,
        })
        .collect();
    if tokio {
        sites.extend(park_call_sites(exe, data));
    }
    // A mapped library is read and probed through its mapping, so the
    // inode really mapped is the one used, whatever the target has since
    // put under its name.
    for (probe_path, bytes, library) in c_libraries(pid, data, maps) {
        let library = crate::term::printable(&library).into_owned();
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(
                    library,
                    %error,
                    "cannot read a C library the target maps; its epoll waits are not watched"
                );
                continue;
            }
        };
        sites.extend(waits::sites_in(&bytes, false).into_iter().map(
            |(file_offset, name, kind)| WaitSite {
                probe_path: probe_path.clone(),
                display_path: library.clone(),
                file_offset,
                name,
                kind,
            },
        ));
    }
    sites
}

/// The calls Tokio parks through where the build inlined a park
/// (`loopguard_parse::park_calls`): each one a site at the call and one at
/// its return, both named after the function they are in.
fn park_call_sites(exe: &Executable, data: &[u8]) -> Vec<WaitSite> {
    loopguard_parse::park_calls::park_calls_in(data)
        .into_iter()
        .flat_map(|call| {
            [
                (call.call_offset, waits::WaitKind::TokioParkCall),
                (call.return_offset, waits::WaitKind::TokioParkReturn),
            ]
            .map(|(file_offset, kind)| WaitSite {
                probe_path: exe.probe_path.clone(),
                display_path: exe.display_path.clone(),
                file_offset,
                name: call.caller.clone(),
                kind,
            })
        })
        .collect()
}

/// The C libraries process `pid` maps (or, stopped before its loader ran,
/// the one it will map): `(path to probe, its bytes, its name)`.
fn c_libraries(
    pid: u32,
    data: &[u8],
    maps: &[proc::Mapping],
) -> Vec<(std::path::PathBuf, io::Result<Vec<u8>>, String)> {
    let mut libraries: Vec<_> = waits::c_libraries(maps)
        .into_iter()
        .map(|mapping| {
            (
                files::mapping_path(pid, &mapping),
                files::read_mapping(pid, &mapping, files::MAX_C_LIBRARY_BYTES),
                mapping.path,
            )
        })
        .collect();
    if libraries.is_empty() && waits::is_dynamically_linked(data) {
        // Stopped right after exec (`loopguard run`): the dynamic loader
        // has not mapped the C library yet. A uprobe goes on the file, so
        // one set on the library it will load fires once it is mapped.
        libraries.extend(waits::default_c_library(pid).map(|library| {
            (
                std::path::PathBuf::from(format!("/proc/{pid}/root{library}")),
                files::read_in_root(pid, &library, files::MAX_C_LIBRARY_BYTES),
                library,
            )
        }));
    }
    libraries
}

fn io_error(pid: u32, path: &str, source: io::Error) -> DiscoverError {
    match source.kind() {
        io::ErrorKind::NotFound if !proc::is_alive(pid) => DiscoverError::NoSuchProcess { pid },
        io::ErrorKind::NotFound if proc::is_kernel_thread(pid) => DiscoverError::KernelThread {
            pid,
            name: crate::term::printable(&proc::thread_name(pid, pid)).into_owned(),
        },
        // A user process has an executable until it lets go of its memory
        // on the way out, a moment before it becomes a zombie.
        io::ErrorKind::NotFound => DiscoverError::Exiting { pid },
        io::ErrorKind::PermissionDenied if proc::has_effective_cap(proc::CAP_SYS_PTRACE) => {
            DiscoverError::Unreachable { pid }
        }
        io::ErrorKind::PermissionDenied => DiscoverError::Permission { pid },
        _ => DiscoverError::ReadExe {
            pid,
            path: path.to_owned(),
            source,
        },
    }
}

impl ProbeTarget {
    /// Blocking-pool code as runtime address ranges, at most
    /// [`MAX_BLOCKING_RANGES`] (the closest ones merged when there are more).
    pub fn blocking_runtime_ranges(&self) -> Vec<Range<u64>> {
        let ranges = self
            .binary
            .blocking_ranges
            .iter()
            .filter_map(|range| {
                let start = self.mappings.runtime_addr(range.start)?;
                Some(start..start + (range.end - range.start))
            })
            .collect();
        merge_ranges(ranges, MAX_BLOCKING_RANGES)
    }

    /// The function that contains runtime address `addr`, demangled.
    pub fn function_at(&self, addr: u64) -> Option<&str> {
        let offset = self.mappings.file_offset(addr)?;
        let functions = &self.binary.functions;
        let index = functions
            .partition_point(|&(start, _, _)| start <= offset)
            .checked_sub(1)?;
        let (start, size, name) = &functions[index];
        (offset < start + (*size).max(1)).then_some(name.as_str())
    }
}

/// Sorts and merges overlapping or touching ranges, then joins the closest
/// neighbours until at most `max` remain.
pub fn merge_ranges(mut ranges: Vec<Range<u64>>, max: usize) -> Vec<Range<u64>> {
    ranges.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    while merged.len() > max.max(1) {
        let closest = (1..merged.len())
            .min_by_key(|&i| merged[i].start - merged[i - 1].end)
            .expect("at least two ranges");
        let next = merged.remove(closest);
        merged[closest - 1].end = next.end;
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_touch() {
        assert_eq!(
            merge_ranges(vec![10..20, 0..5, 5..8, 19..30], 16),
            vec![0..8, 10..30]
        );
    }

    #[test]
    fn too_many_ranges_join_their_closest_neighbours() {
        let merged = merge_ranges(vec![0..1, 100..101, 103..104, 1000..1001], 3);
        assert_eq!(merged, vec![0..1, 100..104, 1000..1001]);
        assert_eq!(merge_ranges(vec![0..1, 5..6], 0), vec![0..6]);
    }

    #[test]
    fn this_test_binary_is_a_tokio_program_with_verified_vtables() {
        // A task spawned here makes sure this test binary holds raw::poll copies.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async { tokio::spawn(async {}).await.unwrap() });
        let data = std::fs::read("/proc/self/exe").unwrap();
        let info = elf::analyze(&data).unwrap();
        assert!(!info.poll_copies.is_empty());
        assert!(
            info.poll_copies.iter().any(|copy| copy.layout.is_some()),
            "no vtable verified: {:?}",
            info.poll_copies
        );
        for copy in &info.poll_copies {
            if let Some(offset) = copy.id_offset() {
                assert!((32..=64).contains(&offset), "{copy:?}");
            }
        }
        // The spawned task above runs on the event loop, not the blocking pool.
        assert!(
            info.poll_copies
                .iter()
                .any(|copy| copy.layout.is_some() && !copy.is_blocking_pool())
        );
    }

    #[test]
    fn a_missing_process_is_named() {
        let err = discover(u32::MAX - 1).unwrap_err();
        assert!(
            matches!(err, DiscoverError::NoSuchProcess { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("pgrep"));
    }

    #[test]
    fn a_kernel_thread_is_named_as_one() {
        // kthreadd is pid 2 wherever there is a kernel.
        if !proc::is_kernel_thread(2) {
            return;
        }
        let err = discover(2).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, DiscoverError::KernelThread { pid: 2, .. })
                && text.contains("kernel thread"),
            "{text}"
        );
        assert!(!text.contains("PID"), "{text}");
    }

    #[test]
    fn a_non_tokio_process_is_named() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Right after the spawn the child may not have mapped `sleep` yet.
        let mut err = discover(child.id()).unwrap_err();
        for _ in 0..100 {
            if !matches!(err, DiscoverError::NotMapped { .. }) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            err = discover(child.id()).unwrap_err();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Not Tokio, and no event loop either: nothing to watch.
        assert!(matches!(err, DiscoverError::NoEventLoop { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("no epoll instance open") && text.contains("--pid"),
            "{text}"
        );
        // sleep is C: neither "stripped" nor a rebuild is the advice.
        assert!(
            text.contains("not a Rust program")
                && !text.contains("strip")
                && !text.contains("rebuild"),
            "{text}"
        );
    }
}
