//! `stall-server`: a demo axum service that blocks Tokio worker threads on
//! purpose, so that loopguard's end-to-end tests have something to detect.
//!
//! | endpoint                     | what it does (wrong)                                             |
//! |------------------------------|------------------------------------------------------------------|
//! | `GET /`                      | lists these endpoints as JSON                                    |
//! | `GET /fast`                  | nothing: answers at once (the control)                           |
//! | `GET /block/spin?ms=N`       | busy-loops on the worker for N ms (`&clock=cpu`: N ms of CPU)    |
//! | `GET /block/sleep?ms=N`      | `std::thread::sleep` on the worker for N ms                      |
//! | `GET /block/mutex?ms=N`      | waits on the worker N ms for a `std::sync::Mutex` a helper holds |
//! | `GET /block/file?ms=N`       | write 64 KiB + `sync_data` + read back on the worker, ≈ N ms (`&clock=held`: N ms less its waits for a CPU) |
//! | `GET /users/{id}/block?ms=N` | like `/block/sleep`, under a route template (answer adds `user`) |
//! | `GET /block/repeat?ms=N&times=K&gap_ms=G` | K blocking sleeps of N ms, each its own poll, G ms of `.await` apart |
//! | `GET /spawn_blocking?ms=N`   | sleeps N ms in `spawn_blocking` (correct: worker stays free)     |
//! | `GET /spawn_blocking/burst?n=K&ms=N` | K `spawn_blocking` sleeps of N ms at once: thread churn  |
//! | `GET /block/main?ms=N`       | the `block_on` body (not a task) sleeps N ms: a loop stall       |
//! | `GET /work?ms=N`             | N ms of CPU work (hashing) on the worker: a handler doing work   |
//! | `GET /json?kb=N`             | builds and serializes a JSON document of about N KiB (default 4) |
//! | `GET /work/yield?ms=N`       | N ms of CPU work in 1 ms slices, `yield_now().await` between: healthy |
//! | `GET /fs?kb=N`               | writes, reads back and removes N KiB with `tokio::fs`: healthy   |
//! | `GET /timer?ms=N`            | `tokio::time::sleep(N ms).await`: healthy                        |
//!
//! Each `/block/*` handler blocks in one synchronous stretch (no `.await`
//! inside) and answers `{"kind","requested_ms","blocked_ms","tid","pid"}`,
//! where `tid` is the OS thread id (`gettid`) of the worker that blocked,
//! read right before blocking, and `blocked_ms` the measured length of the
//! stretch. `cpu_ms` is the CPU time the thread used during the stretch
//! (`CLOCK_THREAD_CPUTIME_ID`): for a spin, the time it held its thread
//! (what loopguard measures: the stretch less the time it sat preempted),
//! which on a loaded machine is less than the wall-clock `blocked_ms`.
//! `run_delay_ms` is the time the thread waited runnable for a CPU during
//! the stretch (`/proc/thread-self/schedstat`): preempted, or woken from
//! its sleep and not yet run; `blocked_ms - run_delay_ms` is the time the
//! stretch held its thread, what loopguard judges. `/spawn_blocking` answers the same plus `blocking_tid`, with
//! `tid` the worker that ran the handler. `ms` must be in `0..=60000`,
//! otherwise the answer is a 400 with `{"error": "..."}`.
//!
//! `/users/{id}/block` answers the `/block/sleep` JSON plus `"user": "<id>"`.
//!
//! `/spawn_blocking/burst` starts `n` (`1..=256`) blocking-pool threads at
//! once (with `--blocking-keep-alive-ms`, they exit soon after): it answers
//! `{"kind":"burst","n","threads"}`, `threads` the distinct thread ids used.
//!
//! `/block/repeat` is death by a thousand cuts: each block alone is short
//! (under a stall threshold), together they hold the worker. It answers
//! `{"kind":"repeat","requested_ms","times","gap_ms","blocked_ms":[...],"tids":[...]}`,
//! one entry per block; `times` in `1..=1000`, `gap_ms` at most 60000.
//!
//! `/work` and `/json` are ordinary request work for the overhead benchmark
//! (`cargo xtask bench`), not stalls at the sizes it uses. `/work` answers
//! `{"kind","requested_ms","worked_ms","rounds","digest","tid"}`, with `ms`
//! in `0..=1000`. `/json` answers `{"kind","requested_kb","count","users"}`,
//! `users` being `count` small user records whose serialized size adds up to
//! about `kb` KiB, with `kb` in `0..=1024`. Out of range is a 400 as above.
//!
//! Every route runs under `loopguard_middleware::LoopguardLayer`, which fires
//! the `loopguard:request_start`/`request_end` USDT probes (method, route
//! template such as `/users/{id}/block`, path). With the environment variable
//! `LOOPGUARD_NO_MIDDLEWARE=1` the layer is left out: that is for the
//! middleware overhead benchmark (same server, with and without it).
//!
//! After binding, the server prints one line `listening on ADDR` to stdout;
//! SIGTERM or SIGINT shut it down gracefully (exit code 0).
//!
//! With `--stdin`, the HTTP server runs as a spawned task instead, and the
//! `block_on` body is a command loop: it `select!`s over the lines of
//! `tokio::io::stdin()` (read by a blocking-pool thread that sits in `read`)
//! and a SIGUSR1 stream. A line `N` blocks the `block_on` thread N ms with
//! `std::thread::sleep` and prints `blocked N ms in Xms on tid T`; SIGUSR1
//! prints `usr1`; end of input or SIGTERM/SIGINT stops the server.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

const MAX_MS: u64 = 60_000;
/// `/work` is request work, not a stall: keep it short.
const MAX_WORK_MS: u64 = 1_000;
/// `/json` documents stay under 1 MiB.
const MAX_JSON_KB: u64 = 1_024;
const DEFAULT_JSON_KB: u64 = 4;
/// Hash rounds between two clock reads in `/work`: about a microsecond.
const WORK_CHUNK: u32 = 256;
const FILE_CHUNK: usize = 64 * 1024;

/// The lock `/block/mutex` contends on.
static CONTENDED: Mutex<()> = Mutex::new(());
/// Makes the temp file names of `/block/file` unique per request.
static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Leaves out the loopguard middleware when set to `1`.
const NO_MIDDLEWARE_ENV: &str = "LOOPGUARD_NO_MIDDLEWARE";

#[derive(Parser)]
#[command(
    version,
    about,
    after_help = "Environment:\n  LOOPGUARD_NO_MIDDLEWARE=1  serve without the loopguard-middleware layer \
                  (for the middleware overhead benchmark)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// Tokio runtime flavor.
    #[arg(long, value_enum, default_value_t = Flavor::MultiThread)]
    flavor: Flavor,
    /// Number of worker threads (multi-thread flavor only).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Install no SIGTERM/SIGINT handlers: die of the signal, as many servers do.
    #[arg(long)]
    no_signal_handlers: bool,
    /// How long an idle blocking-pool thread lives (Tokio's default: 10 s).
    #[arg(long, value_name = "MS")]
    blocking_keep_alive_ms: Option<u64>,
    /// Serve HTTP from a spawned task; the `block_on` body reads commands
    /// from stdin (a line `N` blocks it N ms) and SIGUSR1.
    #[arg(long)]
    stdin: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Flavor {
    MultiThread,
    CurrentThread,
}

#[derive(Deserialize)]
struct MsParam {
    ms: u64,
}

#[derive(Deserialize)]
struct RepeatParam {
    ms: u64,
    times: u64,
    gap_ms: u64,
}

#[derive(Deserialize)]
struct KbParam {
    kb: Option<u64>,
}

#[derive(Serialize)]
struct WorkReport {
    kind: &'static str,
    requested_ms: u64,
    worked_ms: f64,
    /// Chunks of `WORK_CHUNK` hash rounds done.
    rounds: u64,
    /// The hash state at the end, so the loop cannot be optimised away.
    digest: String,
    tid: i32,
}

/// One record of the `/json` document.
#[derive(Serialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    active: bool,
    score: f64,
    roles: Vec<&'static str>,
    created_at: String,
}

impl User {
    /// A deterministic record; ids from 100000 up keep the size steady.
    fn new(id: u64) -> Self {
        const ROLES: [&str; 4] = ["reader", "writer", "admin", "billing"];
        Self {
            id,
            name: format!("User {id}"),
            email: format!("user{id}@example.com"),
            active: !id.is_multiple_of(7),
            score: (id % 1000) as f64 / 10.0,
            roles: ROLES[..=(id % 3) as usize].to_vec(),
            created_at: format!("2024-{:02}-{:02}T12:00:00Z", 1 + id % 12, 1 + id % 28),
        }
    }
}

#[derive(Serialize)]
struct UserList {
    kind: &'static str,
    requested_kb: u64,
    count: usize,
    users: Vec<User>,
}

#[derive(Serialize)]
struct BlockReport {
    kind: &'static str,
    requested_ms: u64,
    blocked_ms: f64,
    /// CPU time the thread used during the section.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ms: Option<f64>,
    /// Time the thread waited runnable for a CPU during the section
    /// (preempted, or woken and not yet run), by the kernel's own count.
    #[serde(skip_serializing_if = "Option::is_none")]
    run_delay_ms: Option<f64>,
    tid: i32,
    pid: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    blocking_tid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

impl BlockReport {
    fn new(kind: &'static str, requested_ms: u64, blocked: Duration, tid: i32) -> Self {
        let blocked_ms = blocked.as_secs_f64() * 1e3;
        Self {
            kind,
            requested_ms,
            blocked_ms,
            cpu_ms: None,
            run_delay_ms: None,
            tid,
            pid: getpid(),
            blocking_tid: None,
            user: None,
        }
    }
}

/// An error answered as `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl ApiError {
    fn internal(msg: impl std::fmt::Display) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, msg.to_string())
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        Self::internal(format_args!("I/O error: {e}"))
    }
}

type BlockResult = Result<Json<BlockReport>, ApiError>;

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

fn parse_ms(q: Result<Query<MsParam>, QueryRejection>) -> Result<u64, ApiError> {
    let Query(MsParam { ms }) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    at_most("ms", ms, MAX_MS)
}

fn at_most(name: &str, value: u64, max: u64) -> Result<u64, ApiError> {
    if value > max {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{name} must be at most {max}"),
        ));
    }
    Ok(value)
}

/// Runs `section` synchronously on the current thread and reports how long
/// it took and which OS thread ran it. Must not be called across an `.await`.
fn blocking_section(
    kind: &'static str,
    ms: u64,
    section: impl FnOnce(Instant, Duration) -> std::io::Result<()>,
) -> BlockResult {
    let tid = gettid();
    let delay_before = thread_run_delay();
    let cpu_before = thread_cpu_time();
    let start = Instant::now();
    section(start, Duration::from_millis(ms))?;
    let blocked = start.elapsed();
    let cpu = thread_cpu_time().saturating_sub(cpu_before);
    let delay_after = thread_run_delay();
    let mut report = BlockReport::new(kind, ms, blocked, tid);
    report.cpu_ms = Some(cpu.as_secs_f64() * 1e3);
    report.run_delay_ms = delay_before
        .zip(delay_after)
        .map(|(before, after)| after.saturating_sub(before).as_secs_f64() * 1e3);
    Ok(Json(report))
}

/// The time this thread has waited runnable for a CPU, in all: the second
/// field of `/proc/thread-self/schedstat` (ns). `None` without schedstats.
fn thread_run_delay() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `(path, blocks the worker, what it does)`, served by `GET /`.
#[rustfmt::skip]
const ENDPOINTS: &[(&str, bool, &str)] = &[
    ("/",                      false, "this listing"),
    ("/fast",                  false, "answers at once (control)"),
    ("/block/spin?ms=N",       true,  "busy-loops on the worker thread for N ms"),
    ("/block/sleep?ms=N",      true,  "std::thread::sleep on the worker thread for N ms"),
    ("/block/main?ms=N",       true,  "std::thread::sleep in the block_on body (not a task) for N ms"),
    ("/block/mutex?ms=N",      true,  "waits on the worker for a std Mutex another thread holds N ms"),
    ("/block/file?ms=N",       true,  "sync write(64 KiB)+sync_data+read on the worker for ~N ms"),
    ("/users/{id}/block?ms=N", true,  "std::thread::sleep on the worker thread for N ms (route template)"),
    ("/block/repeat?ms=N&times=K&gap_ms=G", true, "K blocking sleeps of N ms on the worker, G ms of .await apart"),
    ("/spawn_blocking?ms=N",   false, "sleeps N ms in spawn_blocking (correct: the worker stays free)"),
    ("/spawn_blocking/burst?n=K&ms=N", false, "K spawn_blocking sleeps of N ms at once: blocking-pool thread churn"),
    ("/work?ms=N",             false, "N ms (at most 1000) of CPU work on the worker: ordinary request work"),
    ("/json?kb=N",             false, "builds and serializes a JSON list of users of about N KiB (default 4)"),
    ("/work/yield?ms=N",       false, "N ms of CPU work in 1 ms slices with yield_now().await between them (healthy)"),
    ("/fs?kb=N",               false, "writes, reads back and removes N KiB (at most 1024) with tokio::fs (healthy)"),
    ("/timer?ms=N",            false, "tokio::time::sleep for N ms (healthy)"),
];

async fn index() -> Json<Value> {
    let endpoints: Vec<Value> = ENDPOINTS
        .iter()
        .map(|(path, blocks, what)| json!({ "path": path, "blocks_worker": blocks, "description": what }))
        .collect();
    Json(json!({ "service": "stall-server", "endpoints": endpoints }))
}

async fn fast() -> Json<Value> {
    Json(json!({ "ok": true, "tid": gettid() }))
}

#[derive(Deserialize)]
struct SpinParam {
    ms: u64,
    /// `cpu`: spin until the thread has used `ms` of CPU time, so that the
    /// spin holds its thread that long however often it is preempted.
    clock: Option<String>,
}

async fn block_spin(q: Result<Query<SpinParam>, QueryRejection>) -> BlockResult {
    let Query(SpinParam { ms, clock }) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ms = at_most("ms", ms, MAX_MS)?;
    let by_cpu = clock.as_deref() == Some("cpu");
    blocking_section("spin", ms, |start, d| {
        let cpu_start = thread_cpu_time();
        let spun = || {
            if by_cpu {
                thread_cpu_time().saturating_sub(cpu_start)
            } else {
                start.elapsed()
            }
        };
        while spun() < d {
            std::hint::spin_loop();
        }
        Ok(())
    })
}

async fn block_sleep(q: Result<Query<MsParam>, QueryRejection>) -> BlockResult {
    let ms = parse_ms(q)?;
    blocking_section("sleep", ms, |_, d| {
        std::thread::sleep(d);
        Ok(())
    })
}

async fn block_repeat(
    q: Result<Query<RepeatParam>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(RepeatParam { ms, times, gap_ms }) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ms = at_most("ms", ms, MAX_MS)?;
    let gap_ms = at_most("gap_ms", gap_ms, MAX_MS)?;
    let times = at_most("times", times, 1000)?.max(1);
    let mut blocked_ms = Vec::new();
    let mut tids = Vec::new();
    for i in 0..times {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        }
        // Each block is one synchronous stretch: one poll of this task.
        tids.push(gettid());
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        blocked_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Json(json!({
        "kind": "repeat",
        "requested_ms": ms,
        "times": times,
        "gap_ms": gap_ms,
        "blocked_ms": blocked_ms,
        "tids": tids,
        "pid": getpid(),
    })))
}

async fn user_block(
    Path(user): Path<String>,
    q: Result<Query<MsParam>, QueryRejection>,
) -> BlockResult {
    let Json(report) = block_sleep(q).await?;
    Ok(Json(BlockReport {
        user: Some(user),
        ..report
    }))
}

async fn block_mutex(q: Result<Query<MsParam>, QueryRejection>) -> BlockResult {
    let ms = parse_ms(q)?;
    // The section is all the worker waits for: the helper starting and
    // taking the lock, the lock, and the helper's exit. On a busy machine
    // the helper waits for a CPU at its start and its end, and the worker
    // with it.
    blocking_section("mutex", ms, |_, _| {
        let (locked_tx, locked_rx) = mpsc::sync_channel::<()>(0);
        let holder = std::thread::spawn(move || {
            let guard = CONTENDED.lock().unwrap_or_else(PoisonError::into_inner);
            // The handler waits for this before it contends for the lock.
            let _ = locked_tx.send(());
            std::thread::sleep(Duration::from_millis(ms));
            drop(guard);
        });
        // Quick handshake: returns as soon as the holder has the lock.
        // (Requests that overlap queue on the one lock, so they block for
        // longer.)
        locked_rx
            .recv()
            .map_err(|_| std::io::Error::other("lock holder died"))?;
        drop(CONTENDED.lock().unwrap_or_else(PoisonError::into_inner));
        let _ = holder.join();
        Ok(())
    })
}

#[derive(Deserialize)]
struct FileParam {
    ms: u64,
    /// `held`: write and read until the section has held its thread `ms`
    /// (its time less its wait for a CPU), so that it blocks that long
    /// however long a loaded machine makes it wait after each write.
    clock: Option<String>,
}

async fn block_file(q: Result<Query<FileParam>, QueryRejection>) -> BlockResult {
    let Query(FileParam { ms, clock }) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ms = at_most("ms", ms, MAX_MS)?;
    let by_held = clock.as_deref() == Some("held");
    let seq = FILE_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("stall-server-{}-{seq}.tmp", getpid()));
    // Everything the handler does to the disk is timed, clean-up included:
    // the test compares loopguard's figure with this one.
    blocking_section("file", ms, |start, d| {
        let delay_start = thread_run_delay().unwrap_or_default();
        let elapsed = || {
            if by_held {
                let delay = thread_run_delay().unwrap_or_default();
                start
                    .elapsed()
                    .saturating_sub(delay.saturating_sub(delay_start))
            } else {
                start.elapsed()
            }
        };
        let result = write_and_read_back(&path, elapsed, d);
        let _ = std::fs::remove_file(&path);
        result
    })
}

/// `/block/file`'s loop: write 64 KiB, `sync_data`, read it back, until
/// `elapsed()` reaches `d`.
fn write_and_read_back(
    path: &std::path::Path,
    elapsed: impl Fn() -> Duration,
    d: Duration,
) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut buf = vec![0xa5_u8; FILE_CHUNK];
    while elapsed() < d {
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&buf)?;
        file.sync_data()?;
        if elapsed() >= d {
            break;
        }
        file.seek(SeekFrom::Start(0))?;
        file.read_exact(&mut buf)?;
    }
    Ok(())
}

/// A request to block the `block_on` body: how long, and where to answer.
type MainBlock = (u64, tokio::sync::oneshot::Sender<(Duration, i32)>);

/// Hands `/block/main` requests to the `block_on` body ([`serve`]).
static MAIN_BLOCKS: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<MainBlock>> =
    std::sync::OnceLock::new();

async fn block_main(q: Result<Query<MsParam>, QueryRejection>) -> BlockResult {
    let ms = parse_ms(q)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    MAIN_BLOCKS
        .get()
        .ok_or_else(|| ApiError::internal("the block_on body is not listening"))?
        .send((ms, reply))
        .map_err(|_| ApiError::internal("the block_on body is gone"))?;
    let (blocked, tid) = answer
        .await
        .map_err(|_| ApiError::internal("the block_on body did not answer"))?;
    Ok(Json(BlockReport::new("main", ms, blocked, tid)))
}

/// The `block_on` body's side of `/block/main`: blocks its own thread, which
/// runs no task, for as long as each request asks.
async fn main_blocks(mut requests: tokio::sync::mpsc::UnboundedReceiver<MainBlock>) {
    while let Some((ms, reply)) = requests.recv().await {
        let tid = gettid();
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        let _ = reply.send((start.elapsed(), tid));
    }
}

async fn offload(q: Result<Query<MsParam>, QueryRejection>) -> BlockResult {
    let ms = parse_ms(q)?;
    let tid = gettid();
    let (blocking_tid, blocked) = tokio::task::spawn_blocking(move || {
        let blocking_tid = gettid();
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        (blocking_tid, start.elapsed())
    })
    .await
    .map_err(|e| ApiError::internal(format_args!("blocking task failed: {e}")))?;
    let report = BlockReport::new("spawn_blocking", ms, blocked, tid);
    Ok(Json(BlockReport {
        blocking_tid: Some(blocking_tid),
        ..report
    }))
}

#[derive(Deserialize)]
struct BurstParam {
    n: usize,
    ms: u64,
}

async fn burst(q: Result<Query<BurstParam>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let Query(BurstParam { n, ms }) =
        q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ms = at_most("ms", ms, MAX_MS)?;
    if !(1..=256).contains(&n) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "n must be in 1..=256".to_owned(),
        ));
    }
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(ms));
                gettid()
            })
        })
        .collect();
    let mut threads = Vec::with_capacity(n);
    for task in tasks {
        threads.push(
            task.await
                .map_err(|e| ApiError::internal(format_args!("blocking task failed: {e}")))?,
        );
    }
    threads.sort_unstable();
    threads.dedup();
    Ok(Json(
        json!({ "kind": "burst", "n": n, "threads": threads.len() }),
    ))
}

/// One round of a 64-bit mixer (splitmix64's finaliser): cheap, not foldable.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

async fn work(q: Result<Query<MsParam>, QueryRejection>) -> Result<Json<WorkReport>, ApiError> {
    let Query(MsParam { ms }) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ms = at_most("ms", ms, MAX_WORK_MS)?;
    let tid = gettid();
    let budget = Duration::from_millis(ms);
    let start = Instant::now();
    let mut state = u64::from(tid.unsigned_abs());
    let mut rounds = 0_u64;
    while start.elapsed() < budget {
        for _ in 0..WORK_CHUNK {
            state = mix(state);
        }
        rounds += 1;
    }
    Ok(Json(WorkReport {
        kind: "work",
        requested_ms: ms,
        worked_ms: start.elapsed().as_secs_f64() * 1e3,
        rounds,
        digest: format!("{state:016x}"),
        tid,
    }))
}

/// `/work/yield`: `ms` milliseconds of hashing in 1 ms slices, each slice one
/// poll, `tokio::task::yield_now().await` between them. Cooperative, so never
/// a stall, however long the whole request takes. Answers
/// `{"kind":"yield","requested_ms","worked_ms","slices","longest_slice_ms","tids"}`.
async fn work_yield(q: Result<Query<MsParam>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let ms = parse_ms(q)?;
    let budget = Duration::from_millis(ms);
    let slice = Duration::from_millis(1);
    let start = Instant::now();
    let mut state = u64::from(gettid().unsigned_abs());
    let mut slices = 0_u64;
    let mut longest = Duration::ZERO;
    let mut tids = Vec::new();
    while start.elapsed() < budget {
        let tid = gettid();
        if tids.last() != Some(&tid) {
            tids.push(tid);
        }
        let slice_start = Instant::now();
        while slice_start.elapsed() < slice {
            for _ in 0..WORK_CHUNK {
                state = mix(state);
            }
        }
        longest = longest.max(slice_start.elapsed());
        slices += 1;
        tokio::task::yield_now().await;
    }
    Ok(Json(json!({
        "kind": "yield",
        "requested_ms": ms,
        "worked_ms": start.elapsed().as_secs_f64() * 1e3,
        "slices": slices,
        "longest_slice_ms": longest.as_secs_f64() * 1e3,
        "digest": format!("{state:016x}"),
        "tids": tids,
    })))
}

/// `/fs`: `kb` KiB written, read back and removed with `tokio::fs` (the
/// blocking pool does the I/O). Answers `{"kind":"fs","kb","read"}`.
async fn fs_round_trip(q: Result<Query<KbParam>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let Query(KbParam { kb }) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let kb = at_most("kb", kb.unwrap_or(DEFAULT_JSON_KB), MAX_JSON_KB)?;
    let seq = FILE_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("stall-server-fs-{}-{seq}.tmp", getpid()));
    let data = vec![0x5a_u8; kb as usize * 1024];
    tokio::fs::write(&path, &data).await?;
    let read = tokio::fs::read(&path).await;
    let _ = tokio::fs::remove_file(&path).await;
    Ok(Json(json!({ "kind": "fs", "kb": kb, "read": read?.len() })))
}

/// `/timer`: waits `ms` on Tokio's timer. Answers `{"kind":"timer","requested_ms"}`.
async fn timer(q: Result<Query<MsParam>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let ms = parse_ms(q)?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(Json(json!({ "kind": "timer", "requested_ms": ms })))
}

/// Serialized bytes of one user record, plus the comma between records.
fn user_record_len() -> usize {
    static LEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LEN.get_or_init(|| serde_json::to_vec(&User::new(100_000)).map_or(128, |v| v.len() + 1))
}

async fn json_doc(q: Result<Query<KbParam>, QueryRejection>) -> Result<Json<UserList>, ApiError> {
    let Query(KbParam { kb }) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let kb = at_most("kb", kb.unwrap_or(DEFAULT_JSON_KB), MAX_JSON_KB)?;
    let count = (kb as usize * 1024).div_ceil(user_record_len());
    let users = (0..count as u64).map(|i| User::new(100_000 + i)).collect();
    // axum's `Json` serializes it into the response body.
    Ok(Json(UserList {
        kind: "json",
        requested_kb: kb,
        count,
        users,
    }))
}

fn app(middleware: bool) -> Router {
    let router = Router::new()
        .route("/", get(index))
        .route("/fast", get(fast))
        .route("/block/spin", get(block_spin))
        .route("/block/sleep", get(block_sleep))
        .route("/block/mutex", get(block_mutex))
        .route("/block/file", get(block_file))
        .route("/block/repeat", get(block_repeat))
        .route("/spawn_blocking", get(offload))
        .route("/spawn_blocking/burst", get(burst))
        .route("/block/main", get(block_main))
        .route("/work", get(work))
        .route("/work/yield", get(work_yield))
        .route("/fs", get(fs_round_trip))
        .route("/timer", get(timer))
        .route("/json", get(json_doc))
        .route("/users/{id}/block", get(user_block));
    // After the routes: the layer then runs inside routing and sees the
    // route template (`MatchedPath`).
    if middleware {
        router.layer(loopguard_middleware::LoopguardLayer::new())
    } else {
        router
    }
}

async fn serve(addr: SocketAddr, signal_handlers: bool, middleware: bool) -> anyhow::Result<()> {
    // Install the handlers before announcing the port, so a harness that
    // signals right after reading it cannot kill us with the default action.
    let handlers = if signal_handlers {
        Some((
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        ))
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {local}")?;
    stdout.flush()?;
    drop(stdout);
    let shutdown = async move {
        let Some((mut term, mut int)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let (blocks, requests) = tokio::sync::mpsc::unbounded_channel();
    let _ = MAIN_BLOCKS.set(blocks);
    // Both run in this future, the `block_on` body: axum's accept loop and
    // the blocks `/block/main` asks for.
    tokio::select! {
        served = axum::serve(listener, app(middleware)).with_graceful_shutdown(shutdown) => served?,
        () = main_blocks(requests) => {}
    }
    Ok(())
}

/// `--stdin`: HTTP from a spawned task, while the `block_on` body (this
/// future) `select!`s over stdin's lines and SIGUSR1, and blocks its own
/// thread on each number it reads.
async fn serve_with_stdin(addr: SocketAddr, middleware: bool) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app(middleware)).await });
    say(&format!("listening on {local}"))?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.context("reading stdin")? else { break };
                let Ok(ms) = line.trim().parse::<u64>() else {
                    say(&format!("not a number: {:?}", line.trim()))?;
                    continue;
                };
                let ms = ms.min(MAX_MS);
                let start = Instant::now();
                std::thread::sleep(Duration::from_millis(ms));
                let took = start.elapsed().as_secs_f64() * 1e3;
                say(&format!("blocked {ms} ms in {took:.3}ms on tid {}", gettid()))?;
            }
            _ = usr1.recv() => say("usr1")?,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    server.abort();
    Ok(())
}

/// One line on stdout, flushed (a harness reads it through a pipe).
fn say(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = match args.flavor {
        Flavor::MultiThread => {
            anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(args.workers);
            b
        }
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    };
    if let Some(ms) = args.blocking_keep_alive_ms {
        builder.thread_keep_alive(Duration::from_millis(ms));
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("building the Tokio runtime")?;
    let middleware = std::env::var_os(NO_MIDDLEWARE_ENV).is_none_or(|v| v != "1");
    let result = if args.stdin {
        runtime.block_on(serve_with_stdin(args.addr, middleware))
    } else {
        runtime.block_on(serve(args.addr, !args.no_signal_handlers, middleware))
    };
    // Don't wait forever on a blocking task still sleeping.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
