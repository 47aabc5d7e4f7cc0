//! Record: `--record FILE.jsonl` keeps every event as a JSON line in a
//! file, whatever `--format` shows, for `loopguard report`.
//!
//! Like stdout ([`crate::present::output`]), the file is written by a thread of its own
//! through a bounded queue: a slow disk never holds up the watch loop or its
//! detach. A line that finds the queue full is dropped and counted, and the
//! count said at exit.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

/// Lines that may wait for the disk.
const QUEUED_LINES: usize = 65_536;

struct Recorder {
    queue: SyncSender<String>,
    path: PathBuf,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();
static PENDING: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);

/// The recording cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("failed to create the recording {}; check the directory exists and is writable", path.display())]
pub struct RecordError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn write_lines(file: File, lines: &Receiver<String>) {
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let mut batch = 0;
    loop {
        let line = match lines.try_recv() {
            Ok(line) => line,
            Err(TryRecvError::Empty) => {
                // Nothing more for now: make what was written durable enough
                // for a reader, then wait.
                if out.flush().is_err() {
                    FAILED.store(true, Ordering::Relaxed);
                }
                PENDING.fetch_sub(batch, Ordering::Relaxed);
                batch = 0;
                match lines.recv() {
                    Ok(line) => line,
                    Err(_) => return,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        if writeln!(out, "{line}").is_err() {
            FAILED.store(true, Ordering::Relaxed);
        }
        batch += 1;
    }
    let _ = out.flush();
    PENDING.fetch_sub(batch, Ordering::Relaxed);
}

/// Creates (or truncates) `path` and starts recording into it: before
/// anything is attached, so a bad path fails first.
pub fn open(path: &Path) -> Result<(), RecordError> {
    let fail = |source| RecordError {
        path: path.to_owned(),
        source,
    };
    let file = crate::present::outfile::create(path).map_err(fail)?;
    let (queue, lines) = sync_channel(QUEUED_LINES);
    std::thread::Builder::new()
        .name("loopguard-record".to_owned())
        .spawn(move || write_lines(file, &lines))
        .map_err(fail)?;
    let _ = RECORDER.set(Recorder {
        queue,
        path: path.to_owned(),
    });
    Ok(())
}

/// Whether a recording is being made.
pub fn active() -> bool {
    RECORDER.get().is_some()
}

/// Queues one JSON line for the recording; never blocks.
pub fn line(json: String) {
    let Some(recorder) = RECORDER.get() else {
        return;
    };
    PENDING.fetch_add(1, Ordering::Relaxed);
    if recorder.queue.try_send(json).is_err() {
        PENDING.fetch_sub(1, Ordering::Relaxed);
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits up to `limit` for the queued lines to reach the file; says on
/// stderr where the recording is, and what it lacks.
pub fn finish(limit: Duration) {
    let Some(recorder) = RECORDER.get() else {
        return;
    };
    let deadline = Instant::now() + limit;
    while PENDING.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let lost = DROPPED.load(Ordering::Relaxed) + PENDING.load(Ordering::Relaxed);
    let path = recorder.path.display();
    if FAILED.load(Ordering::Relaxed) {
        crate::diag!(
            "loopguard: error: writing the recording {path} failed (disk full?); it is incomplete"
        );
    } else if lost > 0 {
        crate::diag!(
            "loopguard: {lost} event(s) left out of the recording {path}: the disk did not keep up"
        );
    } else {
        crate::diag!("loopguard: recorded to {path}; `loopguard report {path}` shows it again");
    }
}
