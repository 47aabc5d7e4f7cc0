//! Discover: from a pid to a [`ProbeTarget`], everything needed to attach.
//!
//! Reads the executable through `/proc/PID/exe`, finds every copy of Tokio's
//! task poll function and the task-id offset its vtable gives
//! ([`elf`]), where the file is mapped in the process ([`proc`]), and the
//! Tokio version it was built with, when that can be told ([`version`]).

pub mod elf;
pub mod proc;
pub mod symbols;
pub mod usdt;
pub mod version;
pub mod vtable;

use std::io;
use std::ops::Range;

use loopguard_common::MAX_BLOCKING_RANGES;

use self::elf::{BinaryInfo, ElfError};
use self::proc::{Executable, FileMappings};

/// Why a process cannot be profiled. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("no process with pid {pid}; check the pid with `pgrep -a NAME` or `ps -e`")]
    NoSuchProcess { pid: u32 },
    #[error(
        "cannot read the executable of pid {pid}: permission denied; run loopguard as root (sudo) or with CAP_SYS_PTRACE, CAP_BPF and CAP_PERFMON"
    )]
    Permission { pid: u32 },
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
        "{path} (pid {pid}) is not a Tokio program: no Tokio symbols in it; point --pid at the process that runs the Tokio runtime"
    )]
    NotTokio { pid: u32, path: String },
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
}

/// Finds what to probe in process `pid`.
pub fn discover(pid: u32) -> Result<ProbeTarget, DiscoverError> {
    let exe = proc::executable(pid).map_err(|error| io_error(pid, "/proc/PID/exe", error))?;
    let data =
        std::fs::read(&exe.probe_path).map_err(|error| io_error(pid, &exe.display_path, error))?;
    let binary = elf::analyze(&data).map_err(|source| {
        let (pid, path) = (pid, exe.display_path.clone());
        match source {
            ElfError::Stripped => DiscoverError::Stripped { pid, path },
            ElfError::NotTokio => DiscoverError::NotTokio { pid, path },
            ElfError::NoTaskPoll => DiscoverError::NoTaskPoll { pid, path },
            source => DiscoverError::Binary { pid, path, source },
        }
    })?;
    let maps = proc::read_maps(pid).map_err(|error| io_error(pid, "/proc/PID/maps", error))?;
    let mappings = FileMappings::new(&maps, exe.inode);
    if mappings.is_empty() {
        return Err(DiscoverError::NotMapped {
            pid,
            path: exe.display_path,
        });
    }
    Ok(ProbeTarget {
        pid,
        exe,
        binary,
        mappings,
        tokio_version: version::tokio_version(&data),
    })
}

fn io_error(pid: u32, path: &str, source: io::Error) -> DiscoverError {
    match source.kind() {
        io::ErrorKind::NotFound if !proc::is_alive(pid) => DiscoverError::NoSuchProcess { pid },
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
    fn a_non_tokio_process_is_named() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let err = discover(child.id()).unwrap_err();
        child.kill().unwrap();
        child.wait().unwrap();
        // Debian's coreutils are stripped; either verdict names the problem.
        assert!(
            matches!(
                err,
                DiscoverError::NotTokio { .. } | DiscoverError::Stripped { .. }
            ),
            "{err:?}"
        );
    }
}
