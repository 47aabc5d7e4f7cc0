//! x86-64 Linux system call numbers the kernel side tests for: the epoll
//! waits, which are an event loop's waits for events (the `sys_enter` /
//! `sys_exit` wait path, and a thread switched out asleep in one on the
//! `sched_switch` wait path). The agent names and classifies the same
//! calls in a thread's registers with these numbers too; its unit tests
//! hold them against `libc`.

/// `epoll_wait(2)`.
pub const EPOLL_WAIT: u64 = 232;
/// `epoll_pwait(2)`.
pub const EPOLL_PWAIT: u64 = 281;
/// `epoll_pwait2(2)`.
pub const EPOLL_PWAIT2: u64 = 441;

/// Whether system call `nr` is one of the epoll waits.
#[expect(
    clippy::inline_always,
    reason = "the eBPF programs call it on their hot path and must not call out of line"
)]
#[inline(always)]
pub const fn is_epoll_wait(nr: u64) -> bool {
    nr == EPOLL_WAIT || nr == EPOLL_PWAIT || nr == EPOLL_PWAIT2
}
