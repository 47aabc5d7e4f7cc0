//! What `/proc` says about the target process: its executable, where that
//! executable is mapped, its threads' names.
//!
//! The executable is read through `/proc/PID/exe`, which the kernel resolves
//! inside the target's own mount namespace, so a process in a container is
//! read (and probed) as the file it really runs, even one deleted since.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    /// File offset the mapping starts at.
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

/// Parses the text of `/proc/PID/maps`; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
    })
}

/// Where one file's bytes sit in a process: the mappings of that inode.
#[derive(Clone, Debug, Default)]
pub struct FileMappings(Vec<Mapping>);

impl FileMappings {
    pub fn new(maps: &[Mapping], inode: u64) -> Self {
        Self(maps.iter().filter(|m| m.inode == inode).cloned().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runtime address of a file offset, if that part of the file is mapped.
    pub fn runtime_addr(&self, file_offset: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|m| file_offset >= m.offset && file_offset - m.offset < m.end - m.start)
            .map(|m| m.start + (file_offset - m.offset))
    }

    /// File offset of a runtime address inside one of the mappings.
    pub fn file_offset(&self, addr: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|m| (m.start..m.end).contains(&addr))
            .map(|m| m.offset + (addr - m.start))
    }
}

/// The target's executable as loopguard reads and probes it.
#[derive(Clone, Debug)]
pub struct Executable {
    /// `/proc/PID/exe`: opened and probed through the magic link.
    pub probe_path: PathBuf,
    /// What the link points to, for messages.
    pub display_path: String,
    pub inode: u64,
}

pub fn executable(pid: u32) -> io::Result<Executable> {
    let probe_path = PathBuf::from(format!("/proc/{pid}/exe"));
    let display_path = fs::read_link(&probe_path)?.display().to_string();
    let inode = fs::metadata(&probe_path)?.ino();
    Ok(Executable {
        probe_path,
        display_path,
        inode,
    })
}

/// Up to `len` bytes of process `pid`'s memory at `addr` (fewer where the
/// range leaves its mappings; none when it cannot be read).
pub fn read_memory(pid: u32, addr: u64, len: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buffer.len(),
    };
    // SAFETY: one local buffer of the stated length; the kernel checks the
    // remote side.
    let read = unsafe {
        libc::process_vm_readv(
            pid as libc::pid_t,
            &raw const local,
            1,
            &raw const remote,
            1,
            0,
        )
    };
    buffer.truncate(usize::try_from(read).unwrap_or(0));
    buffer
}

/// The innermost thread id on an `NSpid:` line of
/// `/proc/PID/task/TID/status`: the number the thread has in its own pid
/// namespace.
pub fn innermost_nspid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// For a process in another pid namespace (a container): its threads' ids
/// as that namespace numbers them (what `gettid` returned to it, and what
/// the in-flight tables hold) → as ours does (what the kernel programs
/// see). `None` when it shares our pid namespace, or is gone.
pub fn namespace_tids(pid: u32) -> Option<std::collections::HashMap<u32, u32>> {
    let ours = fs::read_link("/proc/self/ns/pid").ok()?;
    let theirs = fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    if ours == theirs {
        return None;
    }
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(Result::ok)
            .filter_map(|task| {
                let host: u32 = task.file_name().to_str()?.parse().ok()?;
                let status = fs::read_to_string(task.path().join("status")).ok()?;
                Some((innermost_nspid(&status)?, host))
            })
            .collect(),
    )
}

pub fn read_maps(pid: u32) -> io::Result<Vec<Mapping>> {
    fs::read_to_string(format!("/proc/{pid}/maps")).map(|text| parse_maps(&text))
}

/// Thread `tid`'s scheduler state and the CPU it last ran on, from
/// `/proc/<pid>/task/<tid>/stat`; `None` when it is gone.
pub fn thread_state_cpu(pid: u32, tid: u32) -> Option<(char, usize)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    parse_state_cpu(&stat)
}

/// The state (field 3) and processor (field 39) of a `stat` line.
fn parse_state_cpu(stat: &str) -> Option<(char, usize)> {
    let mut rest = fields_after_command(stat)?;
    let state = rest.next()?.chars().next()?;
    // Fields 4 to 38 come between.
    let cpu = rest.nth(35)?.parse().ok()?;
    Some((state, cpu))
}

/// The fields of a `stat` line from the third (the state) on. The command
/// name (the second) may hold spaces and parentheses: they are counted
/// from after its last `)`.
fn fields_after_command(stat: &str) -> Option<std::str::SplitAsciiWhitespace<'_>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_ascii_whitespace())
}

/// The thread's name (`comm`), or `?` once it has gone.
pub fn thread_name(pid: u32, tid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map_or_else(|_| "?".to_owned(), |name| name.trim_end().to_owned())
}

/// Whether an fd's link target (`/proc/PID/fd/N`) is an epoll instance.
fn is_eventpoll(target: &std::path::Path) -> bool {
    target.as_os_str() == "anon_inode:[eventpoll]"
}

/// Whether process `pid` has an epoll instance open (an event loop waits
/// on one).
pub fn has_epoll_fd(pid: u32) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| is_eventpoll(&target)))
}

/// Whether thread `tid` of process `pid` still has epoll fd `fd` open:
/// `Some(false)` once the fd is closed (or now names something else), so
/// the event loop that waited on it is closed; `None` when that cannot be
/// told (the thread has exited, whose fd table went with it, or /proc
/// refuses), which callers take as "still open".
pub fn epoll_fd_open(pid: u32, tid: u32, fd: u32) -> Option<bool> {
    let fds = format!("/proc/{pid}/task/{tid}/fd");
    match fs::read_link(format!("{fds}/{fd}")) {
        Ok(target) => Some(is_eventpoll(&target)),
        // No such fd, in a table that is still there: closed.
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::read_dir(&fds).ok().map(|_| false)
        }
        Err(_) => None,
    }
}

/// The process (thread group) `id` belongs to: itself for a process, its
/// process for a thread id (`/proc/TID` exists for threads too); `None`
/// when there is no such task.
pub fn process_of(id: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|tgid| tgid.trim().parse().ok())
}

/// `PF_KTHREAD`, in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether `pid` is a kernel thread (no executable, no user memory).
pub fn is_kernel_thread(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command: state, ppid, pgrp, session, tty_nr,
            // tpgid, flags.
            fields_after_command(&stat)?.nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Capability number of `CAP_SYS_PTRACE`.
pub const CAP_SYS_PTRACE: u32 = 19;

/// Whether this process holds capability `cap` in its effective set.
pub fn has_effective_cap(cap: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

/// Whether the process still exists (and is not a zombie).
///
/// Only the target's absence says it has gone: when loopguard itself
/// cannot read `/proc` (out of file descriptors, out of memory), it asks
/// the kernel with a null signal, which needs no descriptor.
pub fn is_alive(pid: u32) -> bool {
    alive_from_stat(pid, fs::read_to_string(format!("/proc/{pid}/stat")))
}

fn alive_from_stat(pid: u32, stat: io::Result<String>) -> bool {
    match stat {
        Ok(stat) => fields_after_command(&stat)
            .and_then(|mut fields| fields.next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => false,
        Err(_) => exists_by_signal(pid),
    }
}

/// Whether a process `pid` exists, asked with `kill(pid, 0)` (a zombie
/// counts as existing).
pub fn exists_by_signal(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only checks that pid exists.
    let sent = unsafe { libc::kill(pid, 0) } == 0;
    sent || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_cpu_come_after_the_command_name_whatever_it_holds() {
        let stat = "4242 (tokio) rt (w)) R 1 4242 4242 0 -1 4194560 150 0 0 0 \
                    12 3 0 0 20 0 9 0 1234 123456 789 18446744073709551615 1 1 0 0 0 0 \
                    0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        assert_eq!(parse_state_cpu(stat), Some(('R', 1)));
        assert_eq!(parse_state_cpu("4242 (cut"), None);
        assert_eq!(parse_state_cpu("4242 (x) S 1 2"), None);
    }

    #[test]
    fn a_thread_id_resolves_to_its_process() {
        let pid = std::process::id();
        assert_eq!(process_of(pid), Some(pid));
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        assert_ne!(tid, pid);
        assert_eq!(process_of(tid), Some(pid));
        worker.join().unwrap();
        assert_eq!(process_of(u32::MAX - 1), None);
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0a80000 r--p 00000000 fe:01 1234                       /srv/app (deleted)
55d0c0a80000-55d0c0f00000 r-xp 00080000 fe:01 1234                       /srv/app (deleted)
55d0c0f00000-55d0c0f40000 rw-p 00500000 fe:01 1234                       /srv/app (deleted)
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
garbage line
";

    #[test]
    fn maps_lines_are_parsed() {
        let maps = parse_maps(MAPS);
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[1].start, 0x55d0_c0a8_0000);
        assert!(maps[1].executable);
        assert!(!maps[0].executable);
        assert_eq!(maps[1].offset, 0x80000);
        assert_eq!(maps[1].inode, 1234);
        assert_eq!(maps[1].path, "/srv/app (deleted)");
        assert_eq!(maps[4].path, "[stack]");
    }

    #[test]
    fn file_offsets_translate_both_ways() {
        let file = FileMappings::new(&parse_maps(MAPS), 1234);
        assert_eq!(file.runtime_addr(0x80010), Some(0x55d0_c0a8_0010));
        assert_eq!(file.file_offset(0x55d0_c0a8_0010), Some(0x80010));
        assert_eq!(file.runtime_addr(0x10_0000_0000), None);
        assert_eq!(file.file_offset(0x7f00_0000_0000), None);
        assert!(FileMappings::new(&parse_maps(MAPS), 99).is_empty());
    }

    #[test]
    fn kernel_threads_are_told_from_programs() {
        assert!(!is_kernel_thread(std::process::id()));
        assert!(!is_kernel_thread(u32::MAX - 1));
        // kthreadd, where the kernel shows it (pid 2).
        if fs::read_to_string("/proc/2/comm").is_ok_and(|comm| comm.trim() == "kthreadd") {
            assert!(is_kernel_thread(2));
        }
    }

    #[test]
    fn running_out_of_descriptors_is_not_the_target_exiting() {
        let pid = std::process::id();
        let emfile = || Err(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(
            alive_from_stat(pid, emfile()),
            "our own EMFILE is not its death"
        );
        assert!(!alive_from_stat(u32::MAX - 1, emfile()));
        let enoent = Err(io::Error::from_raw_os_error(libc::ENOENT));
        assert!(!alive_from_stat(pid, enoent));
        assert!(!alive_from_stat(pid, Ok("1 (x) Z 0".to_owned())));
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX - 1));
    }

    #[test]
    fn the_innermost_pid_namespace_number_is_read() {
        let status = "Name:\tpython\nTgid:\t4100\nNSpid:\t4107\t12\nNStgid:\t4100\t1\n";
        assert_eq!(innermost_nspid(status), Some(12));
        assert_eq!(innermost_nspid("NSpid:\t4107\n"), Some(4107));
        assert_eq!(innermost_nspid("Name:\tx\n"), None);
    }
}
