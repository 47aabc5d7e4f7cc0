//! Output: the report lines on stdout, written by a thread of their own, so
//! a reader that is slow or stopped reading never blocks the watch loop, its
//! stop or its detach.
//!
//! Lines wait in a bounded queue; when it is full a line is dropped and
//! counted (said on stderr at exit). When the reader is gone (`| head -1`),
//! writing stops and [`reader_gone`] tells the watch loop to stop too. A
//! reader can also go while there is nothing to write (`2>&1 | head -1`
//! after the attach line, and no stall follows): [`reader_gone`] then asks
//! the kernel whether stdout's or stderr's other end is still open, as
//! `tail -f` does.
//! The same thread draws the status line on a terminal ([`crate::term`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Lines that may wait for a slow reader.
const QUEUED_LINES: usize = 16_384;

/// What the output thread is asked to do.
enum Out {
    Line(String),
    Status(Option<String>),
}

static QUEUE: OnceLock<SyncSender<Out>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
static GONE: AtomicBool = AtomicBool::new(false);
static PENDING: AtomicU64 = AtomicU64::new(0);

fn write_lines(lines: &Receiver<Out>) {
    for out in lines {
        let line = match out {
            Out::Line(line) => line,
            Out::Status(status) => {
                crate::term::draw_status(status);
                continue;
            }
        };
        let mut stdout = std::io::stdout().lock();
        let written = crate::term::write_stdout_line(&mut stdout, &line);
        PENDING.fetch_sub(1, Ordering::Relaxed);
        if written.is_err() {
            // EPIPE or any other failure: nobody reads any more.
            GONE.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// The queue, and the thread that empties it, started on first use.
fn queue() -> &'static SyncSender<Out> {
    QUEUE.get_or_init(|| {
        let (queue, lines) = sync_channel(QUEUED_LINES);
        if std::thread::Builder::new()
            .name("loopguard-out".to_owned())
            .spawn(move || write_lines(&lines))
            .is_err()
        {
            // No writer: every line is dropped, and counted.
            GONE.store(true, Ordering::Relaxed);
        }
        queue
    })
}

/// Queues one line for stdout; never blocks.
pub fn line(text: String) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    PENDING.fetch_add(1, Ordering::Relaxed);
    match queue().try_send(Out::Line(text)) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            PENDING.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Shows `status` on the status line (`None` takes it down); never blocks,
/// and is dropped when the queue is full (the next one comes soon).
pub fn status(status: Option<String>) {
    if !crate::term::status_enabled() || GONE.load(Ordering::Relaxed) {
        return;
    }
    let _ = queue().try_send(Out::Status(status));
}

/// Whether stdout's reader has gone away: a write failed, or stdout or
/// stderr is a pipe or socket whose reading end is closed. One `poll(2)`
/// with no timeout; the watch loop asks on its liveness tick.
pub fn reader_gone() -> bool {
    if GONE.load(Ordering::Relaxed) {
        return true;
    }
    if let Some(fd) = closed_output() {
        tracing::debug!("the reader of fd {fd} is gone; stopping");
        GONE.store(true, Ordering::Relaxed);
        return true;
    }
    false
}

/// The first of stdout and stderr whose reader is gone: `poll` reports
/// `POLLERR` on a pipe's write end with no reader left, `POLLHUP` on a
/// socket shut down by its peer. Terminals, files and `/dev/null` never
/// report either; a closed fd (`POLLNVAL`) is not a reader that left.
fn closed_output() -> Option<i32> {
    let mut fds = [1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: `fds` is a valid array of `pollfd` for the call's duration.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if ready <= 0 {
        return None;
    }
    fds.iter()
        .find(|pfd| is_gone(pfd.revents))
        .map(|pfd| pfd.fd)
}

/// Whether `poll`'s `revents` for an output fd say its reader is gone.
fn is_gone(revents: libc::c_short) -> bool {
    revents & libc::POLLNVAL == 0 && revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Lets the queued lines (the `attached` one) out before a stopped program
/// is resumed, so they come before its own first line: a few ms; a reader
/// that does not read costs it at most 100 ms.
pub fn before_resume() {
    finish(Duration::from_millis(100));
}

/// Waits up to `limit` for the queued lines to be written; returns how many
/// lines were lost in all (queue full, reader gone, or still queued).
pub fn finish(limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    while PENDING.load(Ordering::Relaxed) > 0
        && !GONE.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    DROPPED.load(Ordering::Relaxed) + PENDING.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds `pipe` writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created and are owned here only.
        unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    fn revents(fd: &std::os::fd::OwnedFd) -> libc::c_short {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid `pollfd`.
        unsafe { libc::poll(&raw mut pfd, 1, 0) };
        pfd.revents
    }

    #[test]
    fn a_pipe_whose_reader_closed_is_gone_with_nothing_written() {
        let (reader, writer) = pipe();
        assert!(!is_gone(revents(&writer)), "reader still open");
        drop(reader);
        assert!(is_gone(revents(&writer)), "reader closed");
    }

    #[test]
    fn a_closed_fd_is_not_a_reader_that_left() {
        assert!(!is_gone(libc::POLLNVAL));
        assert!(!is_gone(libc::POLLOUT));
        assert!(is_gone(libc::POLLERR));
        assert!(is_gone(libc::POLLHUP | libc::POLLOUT));
    }
}
