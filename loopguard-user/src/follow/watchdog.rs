//! The watchdog: a process forked from loopguard that outlives it only to
//! resume what loopguard stopped.
//!
//! The kernel records every process it stops at exec in the
//! `FOLLOW_STOPPED` map before it sends the `SIGSTOP`, and loopguard
//! deletes the entry when it resumes the process. The watchdog holds that
//! map (and no program: loopguard's probes go with loopguard) and the read
//! end of a pipe whose write end only loopguard has. When the pipe reaches
//! end of file, loopguard has exited, however it died (SIGKILL included):
//! the watchdog sends `SIGCONT` to every pid left in the map and exits. So a
//! process is never left stopped by a dead loopguard.
//!
//! It is forked from a process that may have threads, so it only makes raw
//! system calls (no allocation, no locks) until it exits. It ignores the
//! signals a terminal or `kill` sends a whole group, and has a process
//! group of its own.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Signals `loopguard run` passes on to its command.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Most pids the watchdog resumes (the map holds at most this many).
const MAX_STOPPED: usize = loopguard_common::follow::MAX_FOLLOW_PIDS as usize;

/// The running watchdog; closing it (drop) lets it exit.
pub struct Watchdog {
    pipe: Option<OwnedFd>,
    pid: libc::pid_t,
}

impl Watchdog {
    /// Forks the watchdog, giving it `stopped_map`.
    pub fn spawn(stopped_map: RawFd) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: a plain pipe, close-on-exec so no child of ours inherits it.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child only makes async-signal-safe system calls.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => watchdog_main(stopped_map, read.as_raw_fd()),
            pid => {
                drop(read);
                Ok(Self {
                    pipe: Some(write),
                    pid,
                })
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.pipe.take());
        let mut status = 0;
        // SAFETY: reaping our own child, which exits as soon as it reads EOF.
        unsafe { libc::waitpid(self.pid, &raw mut status, 0) };
    }
}

/// The watchdog's life: wait for loopguard to go, resume, exit.
fn watchdog_main(map: RawFd, pipe: RawFd) -> ! {
    // SAFETY: raw system calls only, on fds this process owns.
    unsafe {
        libc::setpgid(0, 0);
        // SIGCONT is all it sends (without CAP_SETPCAP, the bounding set stays).
        let keep = crate::privilege::WATCHDOG;
        if crate::privilege::restrict_this_thread(keep, true).is_err() {
            let _ = crate::privilege::restrict_this_thread(keep, false);
        }
        // Deaf to what `run` forwards to its command (Ctrl+C, a
        // supervisor's TERM): the watchdog must outlive loopguard; nor may
        // a closed pipe kill it.
        for signo in FORWARDED.into_iter().chain([libc::SIGPIPE]) {
            libc::signal(signo, libc::SIG_IGN);
        }
        // Above the standard streams (any free number: a low
        // RLIMIT_NOFILE must not matter), or as they are.
        let map = match libc::fcntl(map, libc::F_DUPFD, 3) {
            -1 => map,
            fd => fd,
        };
        let pipe = match libc::fcntl(pipe, libc::F_DUPFD, 3) {
            -1 => pipe,
            fd => fd,
        };
        if map < 3 || pipe < 3 {
            let message = b"loopguard: error: the watchdog cannot keep its descriptors; a process loopguard stops stays stopped if loopguard is killed\n";
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(1);
        }
        // Nothing of loopguard's output stays open through us.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        // Every other fd goes: the programs, loopguard's write end of the pipe.
        let (low, high) = (map.min(pipe) as u32, map.max(pipe) as u32);
        libc::syscall(libc::SYS_close_range, 3u32, low - 1, 0u32);
        if high > low + 1 {
            libc::syscall(libc::SYS_close_range, low + 1, high - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, high + 1, u32::MAX, 0u32);
        let mut byte = 0u8;
        loop {
            let n = libc::read(pipe, (&raw mut byte).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        let mut pids = [0u32; MAX_STOPPED];
        let count = stopped_pids(map, &mut pids);
        for &pid in &pids[..count] {
            resume(map, pid);
        }
        libc::_exit(0)
    }
}

/// Sends `SIGCONT` to `pid` through a pidfd, if its stop is still in the
/// map once the pidfd is open (the kernel forgets the stop of a process
/// that exits, so the pidfd names the stopped process, never a later one
/// with its number). Raw system calls only.
fn resume(map: RawFd, pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return;
    }
    let mut value = 0u32;
    let attr = NextKeyAttr {
        map_fd: map as u32,
        _pad: 0,
        key: (&raw const pid) as u64,
        next_key: (&raw mut value) as u64,
    };
    // SAFETY: BPF_MAP_LOOKUP_ELEM reads the same layout (map, key, value);
    // the pointers are to our locals. Then a signal through our own pidfd.
    unsafe {
        let stopped = libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &raw const attr,
            size_of::<NextKeyAttr>() as u32,
        ) == 0;
        if stopped {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd as libc::c_int,
                libc::SIGCONT,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
        libc::close(pidfd as libc::c_int);
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// `union bpf_attr` as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The keys of the stopped map, without allocating.
fn stopped_pids(map: RawFd, out: &mut [u32]) -> usize {
    let mut count = 0;
    let mut key = 0u32;
    let mut next = 0u32;
    let mut first = true;
    while count < out.len() {
        let attr = NextKeyAttr {
            map_fd: map as u32,
            _pad: 0,
            key: if first { 0 } else { (&raw const key) as u64 },
            next_key: (&raw mut next) as u64,
        };
        // SAFETY: the attr points at our own locals for the call's duration.
        let done = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const attr,
                size_of::<NextKeyAttr>() as u32,
            )
        } != 0;
        if done {
            break;
        }
        out[count] = next;
        count += 1;
        key = next;
        first = false;
    }
    count
}
