//! `many-futures`: a Tokio service whose tasks are of [`KINDS`] distinct
//! future types. Tokio monomorphises `tokio::runtime::task::raw::poll` per
//! future type, so the binary holds that many copies of it, as a large real
//! service does; loopguard probes every copy, which makes this the target
//! for measuring attach and detach time at scale.
//!
//! Every [`ROUND_MS`] ms it spawns one task of each kind (each does a little
//! arithmetic that depends on its kind and yields once). A tiny HTTP/1.1
//! server answers:
//!
//! | request               | answer                                                     |
//! |-----------------------|------------------------------------------------------------|
//! | `GET /kinds`          | `{"kinds":N,"rounds":R}`: task kinds, rounds spawned so far |
//! | `GET /block?ms=N&kind=K` | the next task of kind `K` (default 0) blocks its worker in `std::thread::sleep` for N ms; answers `{"ok":true,"kind":K,"ms":N}` at once |
//! | anything else         | 404                                                        |
//!
//! `--addr ADDR` (default `127.0.0.1:0`); after binding it prints one line
//! `listening on ADDR` to stdout. SIGTERM or SIGINT stop it (exit code 0).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

/// Distinct task types (and so `raw::poll` copies) spawned by [`spawn_round`].
const KINDS: u64 = 300;
/// Time between two rounds of spawns.
const ROUND_MS: u64 = 100;
/// No block longer than a minute.
const MAX_MS: u64 = 60_000;

/// The kind whose next task blocks, plus one (0: none).
static BLOCK_KIND: AtomicU64 = AtomicU64::new(0);
/// How long that task blocks, in ms.
static BLOCK_MS: AtomicU64 = AtomicU64::new(0);
/// Rounds spawned so far.
static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// The body of a task of kind `K`: a little work of its own (so no two
/// kinds compile to the same code and get merged), one yield, and the
/// requested block if this is the kind asked for.
async fn task<const K: u64>() -> u64 {
    let mut value = K.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for round in 0..=(K % 7) {
        value = value.rotate_left(5) ^ round.wrapping_add(K);
    }
    tokio::task::yield_now().await;
    if BLOCK_KIND.load(Ordering::Relaxed) == K + 1
        && BLOCK_KIND
            .compare_exchange(K + 1, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let ms = BLOCK_MS.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(ms));
    }
    std::hint::black_box(value)
}

/// Spawns one task of kind `K`, a future type of its own.
fn spawn_kind<const K: u64>() {
    tokio::spawn(task::<K>());
}

/// Expands to one `spawn_kind::<K>()` per `K` in `100 * H + 10 * T + U`
/// for the digits given, so each call site names its own const.
macro_rules! spawn_units {
    ($h:literal, $t:literal; $($u:literal)*) => {
        $( spawn_kind::<{ 100 * $h + 10 * $t + $u }>(); )*
    };
}
macro_rules! spawn_tens {
    ($h:literal; $($t:literal)*) => {
        $( spawn_units!($h, $t; 0 1 2 3 4 5 6 7 8 9); )*
    };
}
macro_rules! spawn_hundreds {
    ($($h:literal)*) => {
        $( spawn_tens!($h; 0 1 2 3 4 5 6 7 8 9); )*
    };
}

/// One task of every kind.
fn spawn_round() {
    spawn_hundreds!(0 1 2);
    ROUNDS.fetch_add(1, Ordering::Relaxed);
}

/// The value of `name` in a query string.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// Status line and body for a request line's path.
fn answer(target: &str) -> (&'static str, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/kinds" => (
            "200 OK",
            format!(
                r#"{{"kinds":{KINDS},"rounds":{}}}"#,
                ROUNDS.load(Ordering::Relaxed)
            ),
        ),
        "/block" => {
            let ms = query_value(query, "ms").and_then(|ms| ms.parse::<u64>().ok());
            let kind = query_value(query, "kind").map_or(Some(0), |kind| kind.parse::<u64>().ok());
            match (ms, kind) {
                (Some(ms), Some(kind)) if ms <= MAX_MS && kind < KINDS => {
                    BLOCK_MS.store(ms, Ordering::Relaxed);
                    BLOCK_KIND.store(kind + 1, Ordering::Relaxed);
                    (
                        "200 OK",
                        format!(r#"{{"ok":true,"kind":{kind},"ms":{ms}}}"#),
                    )
                }
                _ => (
                    "400 Bad Request",
                    format!(r#"{{"error":"want ms in 0..={MAX_MS} and kind in 0..{KINDS}"}}"#),
                ),
            }
        }
        _ => ("404 Not Found", r#"{"error":"no such path"}"#.to_owned()),
    }
}

async fn serve_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() > 16 * 1024 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&request);
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = answer(target);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn address() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:0".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().ok_or("--addr needs a value")?,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: many-futures [--addr ADDR]"
                ));
            }
        }
    }
    addr.parse()
        .map_err(|error| format!("bad --addr {addr:?}: {error}"))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = match address() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("many-futures: {error}");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    tokio::spawn(async {
        let mut rounds = tokio::time::interval(Duration::from_millis(ROUND_MS));
        loop {
            rounds.tick().await;
            spawn_round();
        }
    });
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream));
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}
