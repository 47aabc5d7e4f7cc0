//! End-to-end: loopguard's `/metrics` scraped by a real Prometheus server
//! (Debian's package, started here on loopback, scraping every second)
//! while the example gets fast traffic and blocking requests; the numbers
//! are read back with `PromQL` through Prometheus's HTTP API, and the
//! exposition, the alert rules and the dashboard are checked with promtool
//! and against each other.
//!
//! Root and the example build are needed, so the test is `#[ignore]`d in a
//! plain `cargo test`; `cargo xtask test` runs it as root.
#![expect(
    clippy::float_cmp,
    reason = "Prometheus returns counts and configured values as floats; integral ones are exact"
)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use loopguard::export::metrics::names_used;
use support::prometheus::{Prometheus, free_port, now_s};
use support::{Agent, FastTraffic, Server, assert_detached, require_root, scrape, server_binary};

/// Blocks of `/block/sleep` sent one after another.
const BLOCKS: u64 = 4;
const BLOCK_MS: u64 = 150;
/// The hang the stuck-poll gauge must show while it lasts.
const HANG_MS: u64 = 3000;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Runs `promtool ARGS` with `stdin`; panics with its output unless it succeeds.
fn promtool(args: &[&str], stdin: &str) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian's prometheus package has it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The body of `/metrics` at `addr`.
#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn prometheus_scrapes_what_loopguard_saw() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // The probes count every request per route (the table does not).
    let agent = Agent::attach(
        server.pid,
        &["--metrics-addr", &metrics_addr, "--requests", "probes"],
    );
    let programs = agent.programs();
    let prometheus = Prometheus::start(metrics_addr.parse().unwrap());
    prometheus.wait_for_scrape_after(now_s());

    let traffic = FastTraffic::start(server.addr);
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..BLOCKS {
        server.get(&format!("/block/sleep?ms={BLOCK_MS}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let hang_start = now_s();
    server.get(&format!("/users/42/block?ms={HANG_MS}"));
    let hang_end = now_s();
    std::thread::sleep(Duration::from_millis(500));
    let fast = traffic.stop();
    let sent = fast + BLOCKS + 1;
    // Live values are refreshed every 200 ms: a scrape that starts later
    // than that after the last request sees every count.
    let settled = now_s() + 0.3;
    std::thread::sleep(Duration::from_millis(300));
    prometheus.wait_for_scrape_after(settled);

    let blocks = prometheus
        .scalar(r#"sum(loopguard_blocking_total{kind="stall",route="/block/sleep",method="GET"})"#);
    assert_eq!(blocks, BLOCKS as f64, "stalls counted for /block/sleep");
    let hangs = prometheus.scalar(r#"sum(loopguard_blocking_total{route="/users/{id}/block"})"#);
    assert_eq!(hangs, 1.0, "the hang, under its route template");
    let fast_stalls =
        prometheus.scalar(r#"sum(loopguard_blocking_total{route="/fast"}) or vector(0)"#);
    assert_eq!(fast_stalls, 0.0, "no stall on the fast route");
    assert_eq!(prometheus.scalar("loopguard_threshold_seconds"), 0.05);
    let monitored = prometheus.scalar("sum(loopguard_requests_monitored_total)");
    assert!(
        (monitored - sent as f64).abs() <= sent as f64 * 0.01,
        "requests monitored {monitored}, sent {sent}"
    );
    let longest_lag =
        prometheus.scalar(r#"sum(loopguard_lag_seconds_sum{route="/users/{id}/block"})"#);
    assert!(
        (longest_lag - HANG_MS as f64 / 1000.0).abs() < 0.15,
        "lag of the hang: {longest_lag} s"
    );
    assert!(prometheus.scalar("loopguard_polls_total") > fast as f64);
    assert!(prometheus.scalar("loopguard_probes_attached") > 0.0);

    // The stuck-poll gauge: 1 through the hang, 0 once it is over.
    let stuck = prometheus.range(
        "loopguard_poll_stuck",
        hang_start + 0.5,
        hang_end - 0.2,
        0.5,
    );
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    let during = &stuck[0];
    let ones = during.iter().filter(|&&v| v == 1.0).count();
    assert!(
        ones + 2 >= during.len() && ones >= 3,
        "loopguard_poll_stuck during the {HANG_MS} ms hang: {during:?}"
    );
    assert_eq!(
        prometheus.scalar("loopguard_poll_stuck"),
        0.0,
        "after the hang"
    );

    // The exposition passes promtool's lint, and everything the dashboard
    // and the alert rules use is exported.
    let text = scrape(&metrics_addr);
    promtool(&["check", "metrics"], &text);
    let rules = examples().join("prometheus/loopguard-rules.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()], "");
    let mut used = names_used(&std::fs::read_to_string(&rules).unwrap());
    used.extend(names_used(
        &std::fs::read_to_string(examples().join("grafana/loopguard-dashboard.json")).unwrap(),
    ));
    // `watch --all`'s own families (`loopguard_host_*`) are not served by
    // one attach: the unit test of export::fleet checks those.
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !name.starts_with("loopguard_host_"))
        .filter(|name| {
            !text.lines().any(|line| {
                line.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the rules but not exported: {missing:?}"
    );

    let (status, _) = agent.interrupt();
    assert!(status.success());
    assert_detached(&programs);
    drop(prometheus);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn a_metrics_port_in_use_fails_before_attaching() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // Exit code and stderr of an attach with this metrics address.
    let pid = server.pid.to_string();
    let attach = |metrics_addr: &str| {
        support::loopguard(&["attach", "--pid", &pid, "--metrics-addr", metrics_addr])
    };
    let (code, stderr) = attach(&addr);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("already in use") && stderr.contains("--metrics-addr"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("watching pid"),
        "it attached before checking the port: {stderr}"
    );
    let (code, stderr) = attach("nonsense");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not an address"), "{stderr}");
    server.get("/fast");
}
