//! `tokio-matrix`: the smallest HTTP/1 service on plain Tokio that loopguard
//! can watch, built against each Tokio version loopguard checks.
//!
//! `tokio-matrix [--flavor multi-thread|current-thread] [--addr ADDR]`
//! prints `listening on ADDR`, then answers, one request per connection:
//!
//! - `GET /fast`: `{"ok":true}`
//! - `GET /block/sleep?ms=N`: sleeps N ms (at most 10000) on the worker
//!   thread, then `{"tid":T,"blocked_ms":M}` (`tid` the OS thread id).
//! - `GET /mixed`: healthy work of every kind: 20 slices of 1 ms of CPU with
//!   `yield_now().await` between, a 20 ms sleep in `spawn_blocking`, 10 ms on
//!   Tokio's timer; then `{"ok":true}`. Never a stall.
//!
//! Every request is named with `loopguard_middleware::RequestGuard`, inside
//! the task that serves it, route `/block/sleep` or `/fast`.

use std::io::Write as _;
use std::time::{Duration, Instant};

use loopguard_middleware::RequestGuard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut flavor = "multi-thread".to_owned();
    let mut addr = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--flavor" => flavor = args.next().unwrap_or_default(),
            "--addr" => addr = args.next().unwrap_or_default(),
            other => {
                eprintln!("tokio-matrix: unknown argument `{other}`");
                std::process::exit(2);
            }
        }
    }
    let runtime = match flavor.as_str() {
        "multi-thread" => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        "current-thread" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        other => {
            eprintln!("tokio-matrix: unknown flavor `{other}`");
            std::process::exit(2);
        }
    };
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {}", listener.local_addr()?)?;
        stdout.flush()?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(serve(stream));
        }
    })
}

/// The OS thread id of the calling thread.
fn tid() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// `/mixed`: cooperative CPU work, blocking-pool work and a timer.
async fn mixed() {
    for _ in 0..20 {
        let slice = Instant::now();
        while slice.elapsed() < Duration::from_millis(1) {
            std::hint::spin_loop();
        }
        tokio::task::yield_now().await;
    }
    let _ = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(20))).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn serve(mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (status, body) = match path {
        "/fast" => {
            let guard = RequestGuard::start("GET", Some("/fast"), path);
            guard.finish(200);
            (200, "{\"ok\":true}".to_owned())
        }
        "/mixed" => {
            let guard = RequestGuard::start("GET", Some("/mixed"), path);
            mixed().await;
            guard.finish(200);
            (200, "{\"ok\":true}".to_owned())
        }
        "/block/sleep" => {
            let guard = RequestGuard::start("GET", Some("/block/sleep"), path);
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0)
                .min(10_000);
            let tid = tid();
            let started = Instant::now();
            std::thread::sleep(Duration::from_millis(ms));
            let blocked_ms = started.elapsed().as_secs_f64() * 1e3;
            guard.finish(200);
            (
                200,
                format!("{{\"tid\":{tid},\"blocked_ms\":{blocked_ms}}}"),
            )
        }
        _ => (404, "{\"error\":\"not found\"}".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}
