//! End-to-end tests of the `loopguard-asgi` middleware with real uvicorn
//! and `FastAPI` from `PyPI` (`examples/loop-servers/fastapi_app.py`): every
//! asyncio loop stall names the request whose step blocked the loop, never
//! a request suspended on `await`, and counts the others as victims.
//!
//! Root and the Python environment `cargo xtask test` makes (uvicorn,
//! `FastAPI`, `python/loopguard-asgi`) are needed, so the tests are `#[ignore]`d
//! in a plain `cargo test`.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::prometheus::free_port;
use support::{Agent, FastTraffic, Line, assert_detached, http_get, require_root};

/// The `FastAPI` app under uvicorn, killed on drop.
struct App {
    child: Child,
    addr: SocketAddr,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> PathBuf {
    std::env::var_os("LOOPGUARD_PYTHON")
        .expect("LOOPGUARD_PYTHON is not set; run the end-to-end tests through `cargo xtask test`")
        .into()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/loop-servers")
}

impl App {
    /// uvicorn serving `fastapi_app:app`, answering `/fast`, each blocking
    /// endpoint called once so that a test's blocks time only the block
    /// (`FastAPI` builds an endpoint's validators on its first call).
    fn start() -> Self {
        let port = free_port();
        let child = Command::new(python())
            .args(["-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--log-level", "warning"])
            .arg("--app-dir")
            .arg(examples())
            .stdout(Stdio::null())
            .spawn()
            .expect("start uvicorn");
        let app = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(app.addr, "/fast").is_ok_and(|r| r.status == 200) {
            assert!(Instant::now() < deadline, "{} never answered", app.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
        for kind in ["sleep", "spin", "socket", "child", "suspended", "sync"] {
            for _ in 0..2 {
                let warm = app.get(&format!("/{kind}/warm?ms=1"));
                assert_eq!(warm.status, 200, "{kind}: {warm:?}");
            }
        }
        app
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn get(&self, path: &str) -> support::Response {
        http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET `path` on a thread.
    fn get_later(&self, path: String) -> std::thread::JoinHandle<support::Response> {
        let addr = self.addr;
        std::thread::spawn(move || http_get(addr, &path).unwrap())
    }
}

fn stalls(lines: &[Line]) -> Vec<&Value> {
    support::of_type(lines, "stall")
}

fn path_of(stall: &Value) -> &str {
    stall["request"]["path"].as_str().unwrap_or_default()
}

/// No stall, in progress or finished, names a request that never held the
/// loop: suspended on `await`, run in the thread pool, or `/fast`.
fn assert_no_bystander_blamed(lines: &[Line]) {
    for line in lines {
        let v = &line.value;
        if v["type"] != "stall" && v["type"] != "stall_in_progress" {
            continue;
        }
        let path = path_of(v);
        assert!(
            !path.starts_with("/suspended") && !path.starts_with("/sync") && path != "/fast",
            "a request that never held the loop was blamed: {v}"
        );
    }
}

/// The stall's duration against the block the endpoint timed itself: at
/// least the block, at most max(5 %, 2 ms) longer.
fn assert_duration(stall: &Value, blocked_ms: f64) {
    let measured = stall["duration_ms"].as_f64().unwrap();
    let slack = (blocked_ms * 0.05).max(2.0);
    assert!(
        measured >= blocked_ms - 0.5 && measured <= blocked_ms + slack,
        "stall of {measured} ms for a block of {blocked_ms} ms (allowed up to {}): {stall}",
        blocked_ms + slack
    );
}

/// `GET path` on a fresh connection, the raw body (Prometheus text).
fn get_text(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    raw
}

#[test]
#[ignore = "end-to-end: needs root and the Python environment; run `cargo xtask test`"]
fn every_block_names_its_request_and_no_suspended_one() {
    require_root();
    let app = App::start();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let agent = Agent::attach(
        app.pid(),
        // 20 ms: a CPU block preempted on a busy machine still holds the
        // loop past it (time spent preempted is not counted).
        &["--threshold-ms", "20", "--metrics-addr", &metrics_addr],
    );
    let programs = agent.programs();
    let traffic = FastTraffic::start(app.addr);
    std::thread::sleep(Duration::from_millis(300));
    // (path, the endpoint's own timing, the suspended request around it)
    let mut blocks: Vec<(String, f64, String)> = Vec::new();
    for round in 0..2 {
        for (kind, ms) in [
            ("sleep", 150),
            ("spin", 120),
            ("socket", 100),
            ("child", 130),
        ] {
            let tag = format!("{kind}{round}");
            let waiting = format!("/suspended/{tag}?ms=400");
            let suspended = app.get_later(waiting);
            let pooled = app.get_later(format!("/sync/{tag}?ms=150"));
            std::thread::sleep(Duration::from_millis(60));
            let path = format!("/{kind}/{tag}");
            let response = app.get(&format!("{path}?ms={ms}"));
            assert_eq!(response.status, 200, "{path}: {response:?}");
            let blocked = response.body["blocked_ms"].as_f64().unwrap();
            assert_eq!(suspended.join().unwrap().status, 200);
            assert_eq!(pooled.join().unwrap().status, 200);
            blocks.push((path, blocked, format!("/suspended/{tag}")));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let fast = traffic.stop();
    assert!(fast > 20, "only {fast} fast requests went through");
    std::thread::sleep(Duration::from_millis(300));
    let scraped = get_text(metrics_port_addr(metrics_port), "/metrics");
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    support::schema::assert_events_follow_schema(lines.iter().map(|l| &l.value));
    let stalls = stalls(&lines);
    assert_eq!(
        stalls.len(),
        blocks.len(),
        "one loop stall per block ({blocks:?}), none for the rest: {stalls:#?}"
    );
    for (path, blocked_ms, waiting) in &blocks {
        let stall = stalls
            .iter()
            .find(|s| path_of(s) == path)
            .unwrap_or_else(|| panic!("no stall names {path}: {stalls:#?}"));
        assert_eq!(stall["kind"], "loop", "{stall}");
        assert_duration(stall, *blocked_ms);
        let kind = path.split('/').nth(1).unwrap();
        assert_eq!(
            stall["request"]["route"],
            format!("/{kind}/{{tag}}"),
            "{stall}"
        );
        assert_eq!(stall["request"]["method"], "GET", "{stall}");
        let victims = stall["victims"].as_array().unwrap();
        assert!(
            victims.iter().any(|v| v["path"] == waiting.as_str()),
            "{waiting} waited through {path}'s block: {stall}"
        );
        assert!(
            stall["victim_count"].as_u64().unwrap() >= 2,
            "the suspended and the pooled request at least: {stall}"
        );
    }
    assert_no_bystander_blamed(&lines);
    assert!(
        support::of_type(&lines, "cumulative").is_empty(),
        "{:#?}",
        support::of_type(&lines, "cumulative")
    );
    for kind in ["sleep", "spin", "socket", "child"] {
        let series = format!(
            r#"loopguard_blocking_total{{kind="loop",method="GET",route="/{kind}/{{tag}}"}} 2"#
        );
        assert!(scraped.contains(&series), "{series} not in {scraped}");
    }
    assert_detached(&programs);
}

fn metrics_port_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
#[ignore = "end-to-end: needs root and the Python environment; run `cargo xtask test`"]
fn a_request_stuck_before_attach_is_named() {
    require_root();
    let app = App::start();
    let suspended = app.get_later("/suspended/early?ms=4000".to_owned());
    std::thread::sleep(Duration::from_millis(100));
    let blocker = app.get_later("/sleep/stuck?ms=3500".to_owned());
    std::thread::sleep(Duration::from_millis(1500));
    let agent = Agent::attach(app.pid(), &["--threshold-ms", "50"]);
    let attached = Instant::now();
    let stuck = agent.wait_for_stuck_before_attach("the stuck request", attached, |_| true);
    let stall = &stuck.value;
    assert_eq!(stall["kind"], "loop", "{stall}");
    assert_eq!(path_of(stall), "/sleep/stuck", "{stall}");
    assert_eq!(stall["request"]["route"], "/sleep/{tag}", "{stall}");
    assert!(
        stall["victims"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["path"] == "/suspended/early")),
        "{stall}"
    );
    let programs = agent.programs();
    assert_eq!(blocker.join().unwrap().status, 200);
    assert_eq!(suspended.join().unwrap().status, 200);
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    assert_no_bystander_blamed(&lines);
    assert_detached(&programs);
}

#[test]
#[ignore = "end-to-end: needs root, wrk and the Python environment; run `cargo xtask test`"]
fn saturated_fast_traffic_raises_nothing() {
    require_root();
    let app = App::start();
    let agent = Agent::attach(app.pid(), &[]);
    let programs = agent.programs();
    let out = Command::new("wrk")
        .args(["-t2", "-c64", "-d5s"])
        .arg(format!("http://{}/fast", app.addr))
        .output()
        .expect("run wrk (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk: {report}");
    assert!(report.contains("Requests/sec"), "{report}");
    std::thread::sleep(Duration::from_millis(300));
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    for kind in ["stall", "stall_in_progress", "cumulative"] {
        let found = support::of_type(&lines, kind);
        assert!(
            found.is_empty(),
            "false alarms at saturation ({report}): {found:#?}"
        );
    }
    assert_detached(&programs);
}

/// `loopguard run --fail-on stall -- python -m pytest SUITE` on one of
/// `examples/loop-servers/guard-suites`; returns the exit code and lines.
fn guard_pytest(suite: &str) -> (i32, Vec<Line>, Vec<u64>) {
    let file = examples().join(format!("guard-suites/test_{suite}.py"));
    let mut command = Command::new(support::LOOPGUARD);
    command
        .args(["run", "--fail-on", "stall", "--format", "json", "--"])
        .arg(python())
        // pytest's progress dots share stdout with the JSON lines: off.
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:terminal",
        ])
        .arg(&file)
        .current_dir(examples());
    let agent = Agent::spawn(command);
    let attached = agent.wait_for("python attached", Duration::from_secs(30), |v| {
        v["type"] == "attached"
    });
    assert_eq!(attached.value["mode"], "loop", "{}", attached.value);
    let programs = agent.programs();
    let (status, lines) = agent.wait(Duration::from_mins(2));
    (status.code().unwrap_or(-1), lines, programs)
}

/// A blocking suite fails and names its request; the clean one passes
/// with no stall at all (pytest's own work on the loop thread between and
/// after tests is no request's step).
fn guards_a_pytest_suite(client: &str) {
    require_root();
    let (code, lines, programs) = guard_pytest(&format!("{client}_blocking"));
    assert_ne!(
        code, 0,
        "a test blocked the loop: the guard fails; {lines:#?}"
    );
    let blocked = lines.iter().map(|l| &l.value).find(|v| {
        (v["type"] == "stall" || v["type"] == "stall_in_progress") && path_of(v) == "/sleep/ci"
    });
    assert!(
        blocked.is_some(),
        "the blocking request is named: {lines:#?}"
    );
    assert_no_bystander_blamed(&lines);
    assert_detached(&programs);

    let (code, lines, programs) = guard_pytest(&format!("{client}_clean"));
    let stalls: Vec<_> = lines
        .iter()
        .map(|l| &l.value)
        .filter(|v| v["type"] == "stall" || v["type"] == "stall_in_progress")
        .collect();
    assert_eq!(code, 0, "a clean suite passes: {stalls:#?}");
    assert!(stalls.is_empty(), "{stalls:#?}");
    assert_detached(&programs);
}

#[test]
#[ignore = "end-to-end: needs root and the Python environment; run `cargo xtask test`"]
fn run_guards_a_pytest_suite_with_httpx_async_client() {
    guards_a_pytest_suite("asyncclient");
}

#[test]
#[ignore = "end-to-end: needs root and the Python environment; run `cargo xtask test`"]
fn run_guards_a_pytest_suite_with_starlette_test_client() {
    // TestClient runs the app's loop on another thread: the table names it.
    guards_a_pytest_suite("testclient");
}
