//! Output: the report lines on stdout, written by a thread of their own, so
//! a reader that is slow or stopped reading never blocks the watch loop, its
//! stop or its detach.
//!
//! Lines wait in a bounded queue; when it is full a line is dropped and
//! counted (said on stderr at exit). When the reader is gone (`| head -1`),
//! writing stops and [`reader_gone`] tells the watch loop to stop too.
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

/// Whether stdout's reader has gone away.
pub fn reader_gone() -> bool {
    GONE.load(Ordering::Relaxed)
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
