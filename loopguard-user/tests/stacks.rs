//! End-to-end tests of stack capture (issue #14): each stall's stack and
//! cause, on the example built without and with debug info, and polls
//! already stuck when loopguard attaches. Root and `cargo xtask test`, as
//! the other end-to-end tests.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Agent, Server, assert_cause, assert_detached, http_get, of_type, require_root, server_binary,
    stack_functions,
};

/// The stall's stack holds every one of `functions` (each a list of
/// alternatives), the runtime's frames are trimmed, and its cause is one of
/// `kinds`, in one of `syscalls` when given, with a split that adds up.
fn check_cause(stall: &Value, functions: &[&[&str]], kinds: &[&str], syscalls: &[&str]) {
    let stack = stack_functions(stall);
    for alternatives in functions {
        assert!(
            stack
                .iter()
                .any(|f| alternatives.iter().any(|want| f.contains(want))),
            "none of {alternatives:?} in the stack {stack:#?}\n{stall}"
        );
    }
    assert!(
        !stack.iter().any(|f| f
            .trim_start_matches('<')
            .starts_with("tokio::runtime::scheduler")),
        "the runtime's frames were not trimmed: {stack:#?}"
    );
    assert_cause(stall, kinds, syscalls);
    let cause = &stall["cause"];
    let on = cause["on_cpu_ms"].as_f64().unwrap();
    let off = cause["off_cpu_ms"].as_f64().unwrap();
    let duration = stall["duration_ms"].as_f64().unwrap();
    assert!(
        (on + off - duration).abs() < 1.0,
        "split {cause} of {duration} ms"
    );
}

/// Blocks once of each kind (200 ms) with stack capture on; returns the
/// stalls, the summary and the folded stacks written at exit.
fn capture_each_block(binary: &Path) -> (Vec<Value>, Value, String) {
    require_root();
    let server = Server::start(binary, &["--flavor", "multi-thread", "--workers", "2"]);
    let folded = std::env::temp_dir().join(format!("loopguard-e2e-{}.folded", server.pid));
    let folded_arg = folded.display().to_string();
    let agent = Agent::attach(
        server.pid,
        &["--threshold-ms", "50", "--folded", &folded_arg],
    );
    let ours = agent.programs();
    for kind in ["spin", "sleep", "mutex", "file"] {
        // 200 ms of CPU for the spin: a wall-clock spin on a loaded machine
        // may hold its thread less than the threshold (no stall at all).
        let clock = if kind == "spin" { "&clock=cpu" } else { "" };
        server.get(&format!("/block/{kind}?ms=200{clock}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, lines) = agent.interrupt();
    assert!(status.success(), "loopguard exited with {status}");
    support::schema::assert_events_follow_schema(lines.iter().map(|l| &l.value));
    assert_detached(&ours);
    let text = std::fs::read_to_string(&folded).expect("the folded stacks were written");
    let _ = std::fs::remove_file(&folded);
    let stalls: Vec<Value> = of_type(&lines, "stall").into_iter().cloned().collect();
    assert_eq!(stalls.len(), 4, "{stalls:#?}");
    let summary = of_type(&lines, "summary")[0].clone();
    (stalls, summary, text)
}

const SLEEP_CALLS: &[&str] = &["clock_nanosleep", "nanosleep"];
const FILE_CALLS: &[&str] = &[
    "fdatasync",
    "fsync",
    "write",
    "pwrite64",
    "read",
    "openat",
    "close",
    "unlink",
];

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn stalls_show_the_blocking_code_and_why() {
    // Release, no debug info: inlined handlers show as the framework frame that polls them.
    let (stalls, summary, folded) = capture_each_block(&server_binary("LOOPGUARD_SERVER"));
    let handler: &[&str] = &["axum::handler::Handler", "stall_server::"];
    check_cause(&stalls[0], &[handler], &["cpu"], &[]);
    check_cause(
        &stalls[1],
        &[&["block_sleep"], &["sleep"]],
        &["syscall"],
        SLEEP_CALLS,
    );
    check_cause(&stalls[2], &[handler, &["Mutex"]], &["syscall"], &["futex"]);
    check_cause(
        &stalls[3],
        &[handler, &["sync_data", "write", "read"]],
        &["syscall", "mixed"],
        FILE_CALLS,
    );
    assert_eq!(summary["stacks"].as_array().unwrap().len(), 4, "{summary}");
    assert_eq!(folded.lines().count(), 4, "{folded}");
    assert!(
        folded
            .lines()
            .any(|l| l.contains("block_sleep") && l.contains("sleep")),
        "{folded}"
    );
}

/// The line range of `async fn name` in the example's source.
fn handler_lines(name: &str) -> std::ops::Range<u64> {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/stall-server/src/main.rs"
    ))
    .unwrap();
    let lines: Vec<&str> = source.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("async fn {name}(")))
        .unwrap();
    let end = start + lines[start..].iter().position(|l| *l == "}").unwrap();
    (start as u64 + 1)..(end as u64 + 2)
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn with_debug_info_stalls_name_their_handler_and_line() {
    let (stalls, _, _) = capture_each_block(&server_binary("LOOPGUARD_SERVER_DEBUGINFO"));
    check_cause(&stalls[0], &[&["block_spin"]], &["cpu"], &[]);
    check_cause(&stalls[1], &[&["block_sleep"]], &["syscall"], SLEEP_CALLS);
    check_cause(&stalls[2], &[&["block_mutex"]], &["syscall"], &["futex"]);
    check_cause(
        &stalls[3],
        &[&["block_file"]],
        &["syscall", "mixed"],
        FILE_CALLS,
    );
    for (stall, handler) in
        stalls
            .iter()
            .zip(["block_spin", "block_sleep", "block_mutex", "block_file"])
    {
        let range = handler_lines(handler);
        let frame = stall["stack"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["function"].as_str().unwrap_or_default().contains(handler))
            .unwrap();
        assert!(
            frame["file"]
                .as_str()
                .unwrap_or_default()
                .ends_with("stall-server/src/main.rs"),
            "{handler}: {frame}"
        );
        let line = frame["line"].as_u64().unwrap_or_default();
        assert!(
            range.contains(&line),
            "{handler}: line {line} not in {range:?}: {frame}"
        );
    }
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn attaching_to_a_hung_server_reports_the_polls_already_stuck() {
    require_root();
    let server = Server::start(
        &server_binary("LOOPGUARD_SERVER"),
        &["--flavor", "multi-thread", "--workers", "2"],
    );
    let addr = server.addr;
    let sent = Instant::now();
    let sleeper = std::thread::spawn(move || http_get(addr, "/block/sleep?ms=4000").unwrap());
    let spinner = std::thread::spawn(move || http_get(addr, "/block/spin?ms=4000").unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let agent = Agent::attach(server.pid, &["--threshold-ms", "50"]);
    let attached = Instant::now();
    let asleep = agent
        .wait_for_stuck_before_attach("the sleep", attached, |v| v["cause"]["kind"] == "syscall");
    let spinning =
        agent.wait_for_stuck_before_attach("the spin", attached, |v| v["cause"]["kind"] == "cpu");
    check_cause(
        &asleep.value,
        &[&["block_sleep"]],
        &["syscall"],
        SLEEP_CALLS,
    );
    // Their requests started before the probes: the middleware's in-flight
    // table names them, and dates the stuck poll from its first poll.
    for (line, route) in [(&asleep, "/block/sleep"), (&spinning, "/block/spin")] {
        let request = &line.value["request"];
        assert_eq!(request["route"], route, "{}", line.value);
        assert_eq!(request["path"], route, "{}", line.value);
        assert_eq!(request["method"], "GET", "{}", line.value);
        assert!(request["id"].as_u64().unwrap() > 0, "{}", line.value);
        let held_ms = line.value["duration_ms"].as_f64().unwrap();
        let most_ms = (line.at - sent).as_secs_f64() * 1e3;
        let least_ms = (attached - sent).as_secs_f64() * 1e3 - 500.0;
        assert!(
            least_ms <= held_ms && held_ms <= most_ms,
            "reported {held_ms} ms, {least_ms}..{most_ms} ms expected from when the request was sent"
        );
    }
    check_cause(
        &spinning.value,
        &[&["axum::handler::Handler", "stall_server::"]],
        &["cpu"],
        &[],
    );
    let ours = agent.programs();
    sleeper.join().unwrap();
    spinner.join().unwrap();
    let (status, _) = agent.interrupt();
    assert!(status.success());
    assert_detached(&ours);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn attaching_while_a_block_on_body_blocks_reports_a_loop_stall_in_progress() {
    require_root();
    for flavor in ["current-thread", "multi-thread"] {
        let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &["--flavor", flavor]);
        let addr = server.addr;
        // The main thread's `block_on` body sleeps: no task poll holds it.
        let blocker = std::thread::spawn(move || http_get(addr, "/block/main?ms=3500").unwrap());
        std::thread::sleep(Duration::from_secs(2));
        let agent = Agent::attach(server.pid, &["--threshold-ms", "50"]);
        let attached = Instant::now();
        let stuck = agent.wait_for_stuck_before_attach(
            &format!("{flavor}: the block_on body"),
            attached,
            |_| true,
        );
        assert_eq!(stuck.value["kind"], "loop", "{flavor}: {}", stuck.value);
        assert_eq!(
            stuck.value["tid"].as_u64(),
            Some(u64::from(server.pid)),
            "{flavor}: the main thread"
        );
        check_cause(
            &stuck.value,
            &[&["stall_server::serve"]],
            &["syscall"],
            SLEEP_CALLS,
        );
        let ours = agent.programs();
        blocker.join().unwrap();
        let (status, lines) = agent.interrupt();
        assert!(status.success());
        // The workers, idle all along, were not taken for stuck ones.
        let others: Vec<&Value> = of_type(&lines, "stall_in_progress")
            .into_iter()
            .filter(|v| v["tid"].as_u64() != Some(u64::from(server.pid)))
            .collect();
        assert!(others.is_empty(), "{flavor}: {others:#?}");
        assert_detached(&ours);
    }
}
