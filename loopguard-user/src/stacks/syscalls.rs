//! Names of the x86-64 system calls a blocked poll is likely to sleep in.

use loopguard_common::syscalls;

/// Whether `nr` is a call an event loop waits for events in (epoll, and
/// `poll`/`select` for loops built on those): a loop thread asleep there is
/// idle, not stuck.
pub fn is_event_wait(nr: i64) -> bool {
    u64::try_from(nr).is_ok_and(syscalls::is_epoll_wait)
        || [
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_select,
            libc::SYS_pselect6,
        ]
        .contains(&nr)
}

/// The system calls a stuck thread plausibly sleeps in, by number.
const NAMES: [(i64, &str); 70] = [
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_close, "close"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_select, "select"),
    (libc::SYS_pselect6, "pselect6"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_preadv2, "preadv2"),
    (libc::SYS_pwritev2, "pwritev2"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_msync, "msync"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_waitid, "waitid"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_sync_file_range, "sync_file_range"),
    (libc::SYS_sync, "sync"),
    (libc::SYS_syncfs, "syncfs"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_futex_waitv, "futex_waitv"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_getevents, "io_getevents"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_pause, "pause"),
    (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
    (libc::SYS_rt_sigsuspend, "rt_sigsuspend"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_splice, "splice"),
    (libc::SYS_sendfile, "sendfile"),
    (libc::SYS_copy_file_range, "copy_file_range"),
    (libc::SYS_ioctl, "ioctl"),
];

/// The name of system call `nr`, for the ones a stuck thread plausibly
/// sleeps in; `None` for the rest (reported by number).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(number, _)| *number == nr)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocking_calls_of_the_example_have_names() {
        assert_eq!(syscall_name(35), Some("nanosleep"));
        assert_eq!(syscall_name(230), Some("clock_nanosleep"));
        assert_eq!(syscall_name(202), Some("futex"));
        assert_eq!(syscall_name(75), Some("fdatasync"));
        assert_eq!(syscall_name(1), Some("write"));
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn the_kernel_sides_epoll_numbers_are_the_c_librarys() {
        assert_eq!(syscalls::EPOLL_WAIT as i64, libc::SYS_epoll_wait);
        assert_eq!(syscalls::EPOLL_PWAIT as i64, libc::SYS_epoll_pwait);
        assert_eq!(syscalls::EPOLL_PWAIT2 as i64, libc::SYS_epoll_pwait2);
        for nr in [libc::SYS_epoll_wait, libc::SYS_epoll_pwait2, libc::SYS_poll] {
            assert!(is_event_wait(nr), "{nr}");
        }
        assert!(!is_event_wait(libc::SYS_futex));
        assert!(!is_event_wait(-1));
    }
}
