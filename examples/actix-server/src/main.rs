//! `actix-server`: an actix-web service whose handlers name their request
//! with `loopguard_middleware::RequestGuard` (the plain functions, as any
//! framework without a tower layer would), for loopguard's version matrix.
//!
//! `actix-server [--addr ADDR]` prints `listening on ADDR` and answers
//! `GET /fast` (`{"ok":true}`) and `GET /block/sleep?ms=N` (sleeps N ms, at
//! most 10000, on the worker: `{"tid":T,"blocked_ms":M}`).

use std::io::Write as _;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use loopguard_middleware::RequestGuard;

fn tid() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

async fn fast(request: HttpRequest) -> HttpResponse {
    let guard = RequestGuard::start("GET", Some("/fast"), request.path());
    guard.finish(200);
    HttpResponse::Ok()
        .content_type("application/json")
        .body("{\"ok\":true}")
}

async fn block_sleep(request: HttpRequest) -> HttpResponse {
    let guard = RequestGuard::start("GET", Some("/block/sleep"), request.path());
    let ms: u64 = request
        .query_string()
        .strip_prefix("ms=")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
        .min(10_000);
    let tid = tid();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(ms));
    let blocked_ms = started.elapsed().as_secs_f64() * 1e3;
    guard.finish(200);
    HttpResponse::Ok()
        .content_type("application/json")
        .body(format!("{{\"tid\":{tid},\"blocked_ms\":{blocked_ms}}}"))
}

fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().unwrap_or_default(),
            other => {
                eprintln!("actix-server: unknown argument `{other}`");
                std::process::exit(2);
            }
        }
    }
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(|| {
            App::new()
                .route("/fast", web::get().to(fast))
                .route("/block/sleep", web::get().to(block_sleep))
        })
        .workers(2)
        .disable_signals()
        .bind(addr)?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {}", server.addrs()[0])?;
        stdout.flush()?;
        server.run().await
    })
}
