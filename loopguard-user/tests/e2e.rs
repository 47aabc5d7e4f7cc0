//! End-to-end tests: real BPF programs, a real example server, real HTTP.
//!
//! They need root and the example built four ways, so they are `#[ignore]`d
//! in a plain `cargo test`; `cargo xtask test` builds everything and runs
//! them with `--ignored`, as root. Without root they fail, never skip.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Agent, FastTraffic, Server, assert_detached, http_get, of_type, require_root, server_binary,
    stall_a_worker,
};

const THRESHOLD_MS: f64 = 50.0;
/// Blocks injected one after another while fast traffic flows: (kind, ms).
const BLOCKS: &[(&str, u64)] = &[
    ("sleep", 100),
    ("sleep", 250),
    ("sleep", 1000),
    ("spin", 250),
    ("mutex", 250),
    ("file", 250),
];
/// The long block that must be seen while it is still in progress.
const HANG_MS: u64 = 3000;

/// The poll loopguard measured against the blocking section the server timed
/// itself (`blocked_ms` in its response): the poll contains the section, so it
/// is at least as long (less clock granularity), and at most max(5 %, 2 ms)
/// longer. The server's own figure is the reference rather than the requested
/// length, because a block overshoots what was asked on a slow disk or a busy
/// machine (a CI run's `sync_data` took 18 ms longer than requested).
fn assert_close(measured_ms: f64, blocked_ms: f64, what: &str) {
    let tolerance = (blocked_ms * 0.05).max(2.0);
    assert!(
        measured_ms >= blocked_ms - 0.5 && measured_ms <= blocked_ms + tolerance,
        "{what}: measured {measured_ms} ms, the server blocked {blocked_ms} ms (tolerance +{tolerance} ms)"
    );
}

/// Whether the example serves through loopguard-middleware in a scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Middleware {
    On,
    /// `LOOPGUARD_NO_MIDDLEWARE=1`: stalls must still be reported, without a request.
    Off,
}

/// One reported stall against the block that was injected.
fn check_stall(stall: &Value, block: &Injected, pid: u32, middleware: Middleware) {
    let Injected {
        kind,
        ms,
        blocked_ms,
        tid,
        ..
    } = *block;
    let what = format!("{kind} {ms} ms");
    assert_eq!(
        stall["tid"].as_u64(),
        Some(tid),
        "{what}: wrong thread in {stall}"
    );
    let duration_ms = stall["duration_ms"].as_f64().unwrap();
    // On a loaded machine a poll waits for a CPU inside and around the
    // section alike (preempted, or woken from a sleep and not yet run):
    // the rules judge the time it held its thread, its duration less that
    // wait, and so does this check.
    let cpu_wait_ms = stall["cause"]["cpu_wait_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no cause.cpu_wait_ms in {stall}"));
    let held_ms = duration_ms - cpu_wait_ms;
    // The poll contains the section, waits and all.
    assert!(
        duration_ms >= blocked_ms - 0.5,
        "{what}: a poll of {duration_ms} ms for a section of {blocked_ms} ms: {stall}"
    );
    // What the section held its thread: a spin, the CPU time it used; any
    // other block, its length less its own wait for a CPU, by the kernel's
    // count (schedstat). loopguard counts those waits by other means
    // (context switches, wake-ups, steal), so either side may be the
    // larger: within max(5 %, 2 ms) of each other.
    let section_held_ms = if kind == "spin" {
        block.cpu_ms
    } else {
        blocked_ms - block.run_delay_ms
    };
    let tolerance = (section_held_ms * 0.05).max(2.0);
    if kind == "file" {
        // Disk work: the interrupts of its own I/O and the host's time for
        // the vCPU's exits run on its CPU while it is on it. schedstat
        // counts them as held, loopguard as a wait (the task clock leaves
        // them out, and steal time is found from it): 20-27 ms of 250 on
        // this VM, every run. So the poll's wall time is what is judged
        // here against the section's, and its held time may only fall
        // short of the section's, never pass it.
        let wall_tolerance = (blocked_ms * 0.05).max(2.0);
        assert!(
            duration_ms <= blocked_ms + wall_tolerance,
            "{what}: a poll of {duration_ms} ms for a section of {blocked_ms} ms (tolerance {wall_tolerance} ms): {stall}"
        );
        assert!(
            held_ms <= section_held_ms + tolerance,
            "{what}: held its thread {held_ms} ms (of {duration_ms}), more than the section's {section_held_ms} ms (of {blocked_ms}; tolerance {tolerance} ms): {stall}"
        );
    } else {
        // Known gap (issue #23, open): under this test's own load loopguard
        // sometimes counts 13-22 ms less run-queue wait than schedstat's
        // run_delay for the same section (80-130 ms of it), one spin in
        // three or four; the cause is not found (not the steal floor, not
        // recursion misses). Until it is, a tenth of the section's own
        // run-queue wait is allowed above the held time, never below.
        let tolerance_above = tolerance + block.run_delay_ms * 0.1;
        assert!(
            held_ms >= section_held_ms - tolerance && held_ms <= section_held_ms + tolerance_above,
            "{what}: held its thread {held_ms} ms (of {duration_ms}), the section {section_held_ms} ms (of {blocked_ms}, run delay {} ms; tolerance -{tolerance}/+{tolerance_above} ms): {stall}",
            block.run_delay_ms
        );
    }
    assert!(
        stall["task_id"].as_u64().is_some_and(|id| id > 0),
        "{what}: no task id in {stall}"
    );
    assert_eq!(stall["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(stall["threshold_ms"].as_f64(), Some(THRESHOLD_MS));
    let request = &stall["request"];
    if middleware == Middleware::Off {
        assert!(request.is_null(), "{what}: {stall}");
        return;
    }
    let path = if ms == HANG_MS {
        "/block/sleep".to_owned()
    } else {
        format!("/block/{kind}")
    };
    assert_eq!(request["path"], path.as_str(), "{what}: {stall}");
    assert_eq!(request["route"], path.as_str(), "{what}: {stall}");
    assert_eq!(request["method"], "GET", "{what}: {stall}");
    assert!(
        request["id"].as_u64().is_some_and(|id| id > 0),
        "{what}: {stall}"
    );
    let victims = stall["victims"].as_array().unwrap();
    assert!(
        victims.iter().all(|v| v["id"] != request["id"]),
        "{what}: culprit among victims"
    );
}

/// One block the test asked for, and what the server said it did.
#[derive(Debug)]
struct Injected {
    kind: &'static str,
    /// Requested length.
    ms: u64,
    /// The server's own timing of the blocking section.
    blocked_ms: f64,
    /// The CPU time the section used, by the server's thread clock.
    cpu_ms: f64,
    /// The time the section waited runnable for a CPU (schedstat).
    run_delay_ms: f64,
    /// The worker thread that blocked.
    tid: u64,
}

impl Injected {
    fn from_response(kind: &'static str, ms: u64, body: &Value) -> Self {
        Self {
            kind,
            ms,
            blocked_ms: body["blocked_ms"].as_f64().unwrap(),
            cpu_ms: body["cpu_ms"].as_f64().unwrap_or(f64::NAN),
            run_delay_ms: body["run_delay_ms"].as_f64().unwrap_or(f64::NAN),
            tid: body["tid"].as_u64().unwrap(),
        }
    }
}

/// The whole detection scenario against one build of the example.
fn detects_every_blocking_poll(binary: &Path, server_args: &[&str], middleware: Middleware) {
    require_root();
    let env: &[(&str, &str)] = match middleware {
        Middleware::On => &[],
        Middleware::Off => &[("LOOPGUARD_NO_MIDDLEWARE", "1")],
    };
    let server = Server::start_with_env(binary, server_args, env);
    let agent = Agent::attach(server.pid, &["--threshold-ms", "50"]);
    let ours = agent.programs();
    // The fat-LTO build (with Tokio's `parking_lot`) inlined the worker's
    // condvar park: its call to the condvar's wait gets `wait_return` too.
    let inlined_park = binary == server_binary("LOOPGUARD_SERVER_LTO");
    assert_eq!(
        ours.len(),
        10 + agent.steal_programs() + usize::from(inlined_park),
        "poll_enter, poll_exit, thread_exit, thread_switch (with the stack capture's switch bookkeeping), cpu_timer (and thread_runtime where steal is not read from the run queue), thread_wakeup, wait_enter, wait_exit, stack_on_cpu, and follow_exec, follow_exit (exec watch) should be loaded (and wait_return where the build inlined a park: {inlined_park}); no request program (requests come from the in-flight table)"
    );
    let traffic = FastTraffic::start(server.addr);
    std::thread::sleep(Duration::from_millis(300));

    let mut injected = Vec::new();
    for &(kind, ms) in BLOCKS {
        // A spin of 250 ms of CPU time, and file work until it has held
        // its thread 250 ms: on a loaded machine a wall-clock loop may
        // hold its thread less than the threshold, waiting for a CPU.
        let clock = match kind {
            "spin" => "&clock=cpu",
            "file" => "&clock=held",
            _ => "",
        };
        let response = server.get(&format!("/block/{kind}?ms={ms}{clock}"));
        injected.push(Injected::from_response(kind, ms, &response.body));
        std::thread::sleep(Duration::from_millis(100));
    }
    let offloaded = server.get("/spawn_blocking?ms=400");
    assert!(offloaded.body["blocking_tid"].is_u64());

    // A long hang must be reported while it is still going on.
    let hang_started = Instant::now();
    let addr = server.addr;
    let hang =
        std::thread::spawn(move || http_get(addr, &format!("/block/sleep?ms={HANG_MS}")).unwrap());
    let in_progress = agent.wait_for_since(
        Some(hang_started),
        "the hang in progress",
        Duration::from_secs(5),
        |v| v["type"] == "stall_in_progress",
    );
    let hang_response = hang.join().unwrap();
    let hang_ended = Instant::now();
    let hang = Injected::from_response("sleep", HANG_MS, &hang_response.body);
    let hang_tid = hang.tid;
    injected.push(hang);
    let fast_requests = traffic.stop();
    assert!(fast_requests > 0, "no fast request was served");

    let (status, lines) = agent.interrupt();
    assert!(status.success(), "loopguard exited with {status}");
    // Every line printed follows the published schema (docs/events.schema.json).
    support::schema::assert_events_follow_schema(lines.iter().map(|l| &l.value));
    assert_eq!(lines[0].value["schema_version"], 1);

    // The in-progress report came while the poll was stuck, soon after it crossed the threshold.
    assert!(
        in_progress.at + Duration::from_secs(1) < hang_ended,
        "in-progress report came too late"
    );
    assert!(in_progress.at > hang_started);
    assert_eq!(
        in_progress.value["tid"].as_u64(),
        Some(hang_tid),
        "{:?}",
        in_progress.value
    );
    let seen_at_ms = in_progress.value["duration_ms"].as_f64().unwrap();
    assert!(
        (THRESHOLD_MS..THRESHOLD_MS + 25.0).contains(&seen_at_ms),
        "reported in progress at {seen_at_ms} ms, want within ~20 ms of the threshold"
    );

    // Every blocking request exactly once, in order, on its thread, to within 5 % or 2 ms.
    // Nothing else: the fast traffic and the spawn_blocking work are not stalls.
    let stalls = of_type(&lines, "stall");
    assert_eq!(
        stalls.len(),
        injected.len(),
        "stalls reported: {stalls:#?}\ninjected: {injected:?}"
    );
    for (stall, block) in stalls.iter().zip(&injected) {
        check_stall(stall, block, server.pid, middleware);
    }
    let last = stalls.last().unwrap();
    assert_eq!(
        last["start_ns"], in_progress.value["start_ns"],
        "the hang's final report is not the one seen in progress"
    );
    assert_eq!(last["seen_in_progress"], Value::Bool(true));

    let summary = of_type(&lines, "summary");
    let summary = summary.first().expect("a summary line");
    assert_eq!(
        summary["stalls"].as_u64(),
        Some(injected.len() as u64),
        "{summary}"
    );
    assert_eq!(summary["dropped_events"].as_u64(), Some(0), "{summary}");
    assert!(
        summary["polls"].as_u64().unwrap() > fast_requests,
        "{summary}"
    );

    // Detached: the target serves on, and nothing of ours is left in the kernel.
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
    assert_detached(&ours);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn release_build_multi_thread() {
    detects_every_blocking_poll(
        &server_binary("LOOPGUARD_SERVER"),
        &["--flavor", "multi-thread", "--workers", "2"],
        Middleware::On,
    );
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn release_build_current_thread() {
    detects_every_blocking_poll(
        &server_binary("LOOPGUARD_SERVER"),
        &["--flavor", "current-thread"],
        Middleware::On,
    );
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn fat_lto_panic_abort_build() {
    detects_every_blocking_poll(
        &server_binary("LOOPGUARD_SERVER_LTO"),
        &["--flavor", "multi-thread"],
        Middleware::On,
    );
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn v0_mangled_build() {
    detects_every_blocking_poll(
        &server_binary("LOOPGUARD_SERVER_V0"),
        &["--flavor", "multi-thread"],
        Middleware::Off,
    );
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn non_pie_build() {
    detects_every_blocking_poll(
        &server_binary("LOOPGUARD_SERVER_NOPIE"),
        &["--flavor", "multi-thread"],
        Middleware::On,
    );
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn killing_the_agent_leaves_the_target_running_and_clean() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let agent = Agent::attach(server.pid, &[]);
    let ours = agent.programs();
    server.get("/fast");
    agent.signal("KILL");
    let _ = agent.wait(Duration::from_secs(10));
    assert_detached(&ours);
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
    server.get("/block/sleep?ms=10");
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn sigterm_detaches_with_a_summary_and_duration_stops_by_itself() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let agent = Agent::attach(server.pid, &[]);
    let first = agent.programs();
    agent.signal("TERM");
    let (status, lines) = agent.wait(Duration::from_secs(10));
    assert!(status.success());
    assert_eq!(of_type(&lines, "summary").len(), 1);
    assert_detached(&first);

    let started = Instant::now();
    let agent = Agent::attach(server.pid, &["--duration", "2"]);
    let second = agent.programs();
    let (status, lines) = agent.wait(Duration::from_secs(15));
    assert!(status.success());
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(of_type(&lines, "summary").len(), 1);
    assert_detached(&second);
    server.get("/fast");
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn no_requests_leaves_the_request_probes_alone() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let agent = Agent::attach(server.pid, &["--no-requests"]);
    let attached = agent.wait_for("attached", Duration::from_secs(5), |v| {
        v["type"] == "attached"
    });
    assert_eq!(
        attached.value["request_probes_attached"],
        Value::Bool(false)
    );
    assert!(attached.value["request_probe_sites"].as_u64().unwrap() > 0);
    let ours = agent.programs();
    assert_eq!(
        ours.len(),
        10 + agent.steal_programs(),
        "poll_enter, poll_exit, thread_exit, thread_switch, cpu_timer (and thread_runtime where steal is not read from the run queue), thread_wakeup, wait_enter, wait_exit, stack_on_cpu and the two exec-watch programs only"
    );
    let blocked = server.get("/block/sleep?ms=120");
    let stall = agent.wait_for("the stall", Duration::from_secs(5), |v| {
        v["type"] == "stall"
    });
    assert_eq!(stall.value["tid"], blocked.body["tid"]);
    // Without request probes the task id is read only once a poll is long.
    assert!(
        stall.value["task_id"].as_u64().is_some_and(|id| id > 0),
        "{}",
        stall.value
    );
    assert!(stall.value["request"].is_null(), "{}", stall.value);
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    let summary = of_type(&lines, "summary");
    assert_eq!(
        summary[0]["requests"]["started"].as_u64(),
        Some(0),
        "{}",
        summary[0]
    );
    assert_detached(&ours);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_never_leaks_its_command_when_loopguard_is_killed() {
    require_root();
    let binary = server_binary("LOOPGUARD_SERVER");
    let agent = Agent::start(&[
        "run",
        "--format",
        "json",
        "--",
        binary.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let attached = agent.wait_for("attached", Duration::from_secs(20), |v| {
        v["type"] == "attached"
    });
    agent.wait_for_listening(Duration::from_secs(20));
    let ours = agent.programs();
    let server_pid = attached.value["pid"].as_u64().unwrap();
    agent.signal("KILL");
    let _ = agent.wait(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{server_pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{server_pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < deadline,
            "the command (pid {server_pid}) outlived a killed loopguard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_detached(&ours);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_attaches_before_serving_forwards_signals_and_exit_codes() {
    require_root();
    let binary = server_binary("LOOPGUARD_SERVER");
    let binary = binary.to_str().unwrap();
    let agent = Agent::start(&[
        "run",
        "--format",
        "json",
        "--fail-on-stall",
        "--",
        binary,
        "--addr",
        "127.0.0.1:0",
    ]);
    // The probes are in place before the program prints its first line.
    let attached = agent.wait_for("attached", Duration::from_secs(20), |v| {
        v["type"] == "attached"
    });
    let (listening, addr) = agent.wait_for_listening(Duration::from_secs(20));
    assert!(attached.at <= listening.at);
    let ours = agent.programs();
    let (blocked, stall) = stall_a_worker(&agent, addr, Duration::from_secs(5));
    assert_close(
        stall.value["duration_ms"].as_f64().unwrap(),
        blocked.body["blocked_ms"].as_f64().unwrap(),
        "run: sleep 200 ms",
    );
    // SIGTERM goes to the program, which shuts down cleanly (0); a stall was seen: 3.
    agent.signal("TERM");
    let (status, lines) = agent.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(3), "{lines:#?}");
    assert_eq!(of_type(&lines, "summary").len(), 1);
    assert_detached(&ours);

    // The program's own exit code comes back (stall-server refuses 0 workers with 1).
    let agent = Agent::start(&["run", "--", binary, "--workers", "0"]);
    let (status, _) = agent.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_with_duration_fails_on_stall_even_when_the_command_dies_of_sigterm() {
    require_root();
    let binary = server_binary("LOOPGUARD_SERVER");
    let binary = binary.to_str().unwrap();
    let args = [
        "run",
        "--fail-on-stall",
        "--duration",
        "3",
        "--format",
        "json",
        "--",
    ];
    let agent = Agent::start(
        &[
            &args[..],
            &[binary, "--addr", "127.0.0.1:0", "--no-signal-handlers"],
        ]
        .concat(),
    );
    let (_, addr) = agent.wait_for_listening(Duration::from_secs(20));
    // A sleep, not a spin: a poll is judged by the time it held its thread,
    // and a spin on a CPU-starved CI machine may hold it less than it asked.
    http_get(addr, "/block/sleep?ms=100").unwrap();
    // --duration's SIGTERM kills it (143 in a shell): that is how it was asked
    // to end, so the stall decides the exit code.
    let (status, lines) = agent.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "{lines:#?}");
    let summary = of_type(&lines, "summary");
    assert_eq!(summary[0]["stop_reason"], "duration elapsed");

    // Without a stall the same run succeeds.
    let agent = Agent::start(
        &[
            &args[..],
            &[binary, "--addr", "127.0.0.1:0", "--no-signal-handlers"],
        ]
        .concat(),
    );
    let (status, lines) = agent.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn stalls_name_their_request_over_keep_alive_and_http2() {
    keep_alive_and_http2("probes");
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn stalls_name_their_request_over_keep_alive_and_http2_from_the_table() {
    keep_alive_and_http2("table");
}

/// Two blocks of a `/users/{id}/block` request, one over an HTTP/1.1
/// keep-alive connection and one among HTTP/2 streams, named with their
/// victims; with the probes (`--requests probes`) every request is counted.
fn keep_alive_and_http2(source: &str) {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let addr = server.addr;
    let agent = Agent::attach(server.pid, &["--threshold-ms", "50", "--requests", source]);
    // Bystanders: a request at a time on fresh connections, all along.
    let traffic = FastTraffic::start(addr);
    std::thread::sleep(Duration::from_millis(200));
    // A slow bystander (600 ms awaiting the blocking pool) is in flight
    // throughout each block: it must be listed as a victim. (Fast bystanders
    // may not even be accepted while a worker is blocked, so they cannot be
    // relied on to have started.)
    let slow_bystander = || {
        let handle = std::thread::spawn(move || http_get(addr, "/spawn_blocking?ms=600").unwrap());
        std::thread::sleep(Duration::from_millis(100));
        handle
    };
    // HTTP/1.1 keep-alive: one connection task serves three requests in turn.
    let bystander = slow_bystander();
    support::curl(addr, &["/fast", "/users/11/block?ms=150", "/fast"]);
    bystander.join().unwrap();
    // HTTP/2: one connection, the streams in parallel (each its own task).
    let bystander = slow_bystander();
    support::curl(
        addr,
        &[
            "--http2-prior-knowledge",
            "--parallel",
            "--parallel-immediate",
            "/users/22/block?ms=150",
            "/fast",
            "/fast",
        ],
    );
    bystander.join().unwrap();
    // 1000 more requests through the middleware, 100 per keep-alive connection.
    let hundred: Vec<&str> = std::iter::repeat_n("/fast", 100).collect();
    for _ in 0..10 {
        support::curl(addr, &hundred);
    }
    let bystanders = traffic.stop();
    let (status, lines) = agent.interrupt();
    assert!(status.success());

    let stalls = of_type(&lines, "stall");
    assert_eq!(stalls.len(), 2, "{stalls:#?}");
    for (stall, user) in stalls.iter().zip(["11", "22"]) {
        let request = &stall["request"];
        assert_eq!(request["method"], "GET", "{stall}");
        assert_eq!(request["route"], "/users/{id}/block", "{stall}");
        assert_eq!(
            request["path"],
            format!("/users/{user}/block").as_str(),
            "{stall}"
        );
        // curl does not hand back the body's timing; a sleep overshoots by microseconds.
        assert_close(stall["duration_ms"].as_f64().unwrap(), 150.0, "user block");
        // The bystanders that waited are victims, never the culprit.
        let victims = stall["victims"].as_array().unwrap();
        // Every request in flight while the worker was blocked; at most 20 listed.
        let victim_count = stall["victim_count"].as_u64().unwrap();
        assert!(
            victims.len() <= 20 && victim_count >= victims.len() as u64,
            "{stall}"
        );
        assert!(
            victims.iter().any(|v| v["path"] == "/spawn_blocking"),
            "the slow bystander is no victim: {stall}"
        );
        for victim in victims {
            assert_ne!(victim["id"], request["id"]);
            assert!(
                ["/fast", "/spawn_blocking"].contains(&victim["route"].as_str().unwrap_or("")),
                "{stall}"
            );
        }
    }

    let summary = of_type(&lines, "summary")[0];
    assert_eq!(summary["dropped_events"].as_u64(), Some(0), "{summary}");
    let requests = &summary["requests"];
    let top = &requests["routes"][0];
    assert_eq!(top["route"], "GET /users/{id}/block", "{requests}");
    assert_eq!(top["stalls"].as_u64(), Some(2), "{requests}");
    if source == "table" {
        // No probe counts requests.
        assert_eq!(requests["started"].as_u64(), Some(0), "{requests}");
        return;
    }
    let started = requests["started"].as_u64().unwrap();
    assert!(started >= 1000 + 6 + 2 + bystanders, "{requests}");
    assert_eq!(
        requests["ended"].as_u64(),
        Some(started),
        "a request_end was lost: {requests}"
    );
    assert_eq!(requests["in_flight"].as_u64(), Some(0), "{requests}");
    for counter in [
        "evicted",
        "unmatched_ends",
        "unattributable_starts",
        "layout_mismatches",
    ] {
        assert_eq!(requests[counter].as_u64(), Some(0), "{counter}: {requests}");
    }
    assert!(requests["capacity"].as_u64().unwrap() > 0);
}

#[test]
#[ignore = "end-to-end: needs root, the example builds and wrk; run `cargo xtask test`"]
fn the_table_names_a_culprit_that_ended_in_its_blocking_poll_under_traffic() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &["--workers", "2"]);
    let addr = server.addr;
    // The default: requests from the in-flight table, no request probe.
    let agent = Agent::attach(server.pid, &["--threshold-ms", "50"]);
    let attached = of_type(&agent.lines(), "attached")[0].clone();
    assert_eq!(attached["request_source"], "table", "{attached}");
    assert_eq!(attached["request_probes_attached"], false, "{attached}");
    assert_eq!(attached["inflight_table_version"], 2, "{attached}");
    // The same as `detects_every_blocking_poll`: no request program.
    assert_eq!(
        agent.programs().len(),
        10 + agent.steal_programs(),
        "no request programs loaded"
    );
    // wrk keeps the other worker serving /fast throughout: each block sees
    // far more than a table's worth of requests start and end, so the
    // culprit's slot is taken again before the stall's end is read.
    let url = format!("http://{addr}/fast");
    let mut wrk = std::process::Command::new("wrk")
        .args(["-t1", "-c4", "-d5s", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run wrk (cargo xtask setup installs it)");
    std::thread::sleep(Duration::from_millis(500));
    let mut blocks = Vec::new();
    for ms in [200, 300] {
        // A slow bystander in flight through the block: a victim.
        let bystander = std::thread::spawn(move || http_get(addr, "/spawn_blocking?ms=900"));
        std::thread::sleep(Duration::from_millis(150));
        // The handler sleeps and returns: the request ends inside the very
        // poll that blocked the worker.
        let blocked = server.get(&format!("/block/sleep?ms={ms}"));
        blocks.push(blocked);
        bystander.join().unwrap().unwrap();
    }
    let wrk = wrk.wait().unwrap();
    assert!(wrk.success());
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    let stalls: Vec<&Value> = of_type(&lines, "stall")
        .into_iter()
        .filter(|s| s["duration_ms"].as_f64().unwrap() >= 150.0)
        .collect();
    assert_eq!(stalls.len(), 2, "{stalls:#?}");
    for (stall, blocked) in stalls.iter().zip(&blocks) {
        assert_eq!(stall["tid"], blocked.body["tid"], "{stall}");
        assert_close(
            stall["duration_ms"].as_f64().unwrap(),
            blocked.body["blocked_ms"].as_f64().unwrap(),
            "table block",
        );
        let request = &stall["request"];
        assert_eq!(request["path"], "/block/sleep", "{stall}");
        assert_eq!(request["route"], "/block/sleep", "{stall}");
        assert_eq!(request["method"], "GET", "{stall}");
        let victims = stall["victims"].as_array().unwrap();
        assert!(
            victims.iter().any(|v| v["path"] == "/spawn_blocking"),
            "the slow bystander is no victim: {stall}"
        );
        assert!(
            victims.iter().all(|v| v["id"] != request["id"]),
            "culprit among victims: {stall}"
        );
        assert!(stall["victim_count"].as_u64().unwrap() >= victims.len() as u64);
    }
    // Each was named in progress too, with the same request.
    let in_progress = of_type(&lines, "stall_in_progress");
    for stall in &stalls {
        assert!(
            in_progress
                .iter()
                .any(|p| p["start_ns"] == stall["start_ns"] && p["request"] == stall["request"]),
            "{stall} not named in progress: {in_progress:#?}"
        );
    }
}

/// Runs `loopguard args`, expecting failure; returns (exit code, stderr).
fn loopguard_fails(args: &[&str]) -> (i32, String) {
    let (code, stderr) = support::loopguard(args);
    assert_ne!(code, Some(0), "loopguard {args:?} succeeded");
    (code.unwrap_or(-1), stderr)
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn bad_targets_get_errors_that_name_the_fix() {
    require_root();
    let (code, stderr) = loopguard_fails(&["attach", "--pid", "999999999"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("no process with pid 999999999"), "{stderr}");

    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let (code, stderr) = loopguard_fails(&["attach", "--pid", &sleeper.id().to_string()]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("nothing loopguard can watch") && stderr.contains("no epoll instance"),
        "{stderr}"
    );

    let stripped =
        std::env::temp_dir().join(format!("loopguard-e2e-stripped-{}", std::process::id()));
    std::fs::copy(server_binary("LOOPGUARD_SERVER"), &stripped).unwrap();
    assert!(
        std::process::Command::new("strip")
            .arg(&stripped)
            .status()
            .unwrap()
            .success()
    );
    let server = Server::start(&stripped, &[]);
    let (code, stderr) = loopguard_fails(&["attach", "--pid", &server.pid.to_string()]);
    drop(server);
    std::fs::remove_file(&stripped).unwrap();
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("stripped") && stderr.contains("strip = "),
        "{stderr}"
    );

    // Not root: told to use sudo, nothing loaded.
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            support::LOOPGUARD,
        ])
        .args(["attach", "--pid", &server.pid.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("sudo"), "{stderr}");

    let (code, stderr) = loopguard_fails(&["attach", "--pid", "1", "--threshold-ms", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("threshold-ms"), "{stderr}");
}
