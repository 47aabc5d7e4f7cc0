//! End-to-end tests of following across fork and exec (root, real BPF):
//! `run` attached to the Tokio test binary `cargo test` starts, `run`
//! following an entrypoint that execs, `attach` re-attaching across an
//! exec and stopping at an exec into a program it cannot watch.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{
    Agent, Line, assert_detached, next_line, of_type, process_state, require_root, server_binary,
    spawn_piped, stall_a_worker,
};

/// The workspace's target directory (the example server lives in `release/`).
fn target_dir() -> PathBuf {
    let server = server_binary("LOOPGUARD_SERVER");
    server
        .parent()
        .and_then(Path::parent)
        .expect("LOOPGUARD_SERVER is TARGET/release/stall-server")
        .to_path_buf()
}

/// The real cargo (not rustup's proxy, itself a Tokio program).
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Builds guarded-app's test binary and bin in the workspace's target
/// directory (a no-op after `cargo xtask test` built them), so the
/// `cargo test` under loopguard only runs.
fn prebuild_guarded_app() {
    for args in [
        &["test", "--release", "-p", "guarded-app", "--no-run"][..],
        &["build", "--release", "-p", "guarded-app"][..],
    ] {
        let status = Command::new(cargo())
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", target_dir())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo {args:?}");
    }
}

fn followed(lines: &[Line]) -> Value {
    match of_type(lines, "followed").first() {
        Some(line) => (*line).clone(),
        None => panic!("no `followed` line in {lines:#?}"),
    }
}

/// `loopguard run --fail-on-stall -- cargo test -p guarded-app`, the
/// handler blocking or not; returns (exit code, lines, programs seen held).
fn guard_cargo_test(block_ms: Option<&str>) -> (i32, Vec<Line>, Vec<u64>) {
    let cargo = cargo();
    let mut command = Command::new(support::LOOPGUARD);
    command
        .args([
            "run",
            "--fail-on-stall",
            "--no-stacks",
            "--format",
            "json",
            "--",
            &cargo,
            "test",
            "--release",
            "-p",
            "guarded-app",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("GUARDED_APP_BLOCK_MS");
    if let Some(ms) = block_ms {
        command.env("GUARDED_APP_BLOCK_MS", ms);
    }
    let agent = Agent::spawn(command);
    let attached = agent.wait_for("the test binary attached", Duration::from_mins(1), |v| {
        v["type"] == "attached" && v["exe"].as_str().is_some_and(|e| e.contains("/deps/api-"))
    });
    let programs = agent.programs();
    assert!(attached.value["probes"].as_u64().unwrap() > 0);
    let (status, lines) = agent.wait(Duration::from_mins(2));
    (status.code().unwrap_or(-1), lines, programs)
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_guards_the_tokio_test_binaries_cargo_starts() {
    require_root();
    prebuild_guarded_app();

    let (code, lines, programs) = guard_cargo_test(Some("200"));
    assert_eq!(
        code, 3,
        "a handler blocked: --fail-on-stall fails; {lines:#?}"
    );
    let stalls = of_type(&lines, "stall");
    assert_eq!(stalls.len(), 1, "{lines:#?}");
    let stall = stalls[0];
    assert!(
        stall["exe"]
            .as_str()
            .is_some_and(|e| e.contains("/deps/api-")),
        "the stall names the test binary: {stall}"
    );
    assert!(stall["duration_ms"].as_f64().unwrap() >= 190.0, "{stall}");
    let followed = followed(&lines);
    let attached = followed["attached"].as_array().unwrap();
    let test_binary = attached
        .iter()
        .find(|a| a["exe"].as_str().is_some_and(|e| e.contains("/deps/api-")))
        .unwrap_or_else(|| panic!("{followed}"));
    assert_eq!(test_binary["pid"], stall["pid"]);
    let held = test_binary["stopped_ms"].as_f64().unwrap();
    assert!(held > 0.0 && held < 5000.0, "{test_binary}");
    assert!(
        followed["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["exe"].as_str().is_some_and(|e| e.ends_with("/cargo"))
                && s["reason"] == "not_tokio"),
        "cargo itself is skipped as not Tokio: {followed}"
    );
    assert_detached(&programs);

    let (code, lines, programs) = guard_cargo_test(None);
    assert_eq!(code, 0, "nothing blocked: {lines:#?}");
    assert!(of_type(&lines, "stall").is_empty(), "{lines:#?}");
    assert_detached(&programs);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_follows_an_entrypoint_that_execs() {
    require_root();
    let server = server_binary("LOOPGUARD_SERVER");
    let script = format!("exec {} --addr 127.0.0.1:0", server.display());
    let agent = Agent::start(&[
        "run",
        "--fail-on-stall",
        "--format",
        "json",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let attached = agent.wait_for("the server attached", Duration::from_secs(20), |v| {
        v["type"] == "attached"
    });
    assert!(
        attached.value["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("stall-server")),
        "the exec'd server is watched, not sh: {}",
        attached.value
    );
    let (listening, addr) = agent.wait_for_listening(Duration::from_secs(20));
    // Attached while stopped at exec: before the server printed anything.
    assert!(attached.at <= listening.at);
    let ours = agent.programs();
    let (_, stall) = stall_a_worker(&agent, addr, Duration::from_secs(5));
    assert_eq!(stall.value["pid"], attached.value["pid"]);
    agent.signal("TERM");
    let (status, lines) = agent.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{lines:#?}");
    let followed = followed(&lines);
    assert_eq!(
        followed["attached"].as_array().unwrap().len(),
        1,
        "{followed}"
    );
    assert!(
        followed["skipped"][0]["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("sh") || e.ends_with("dash") || e.ends_with("bash")),
        "{followed}"
    );
    assert_detached(&ours);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn attach_follows_its_target_across_exec() {
    require_root();
    prebuild_guarded_app();
    let app = target_dir().join("release/guarded-app");
    let server = server_binary("LOOPGUARD_SERVER");
    // A Tokio program that execs the example server after 2 s.
    let (mut target, mut reader) = spawn_piped(
        Command::new(&app)
            .args(["--exec-after-ms", "2000"])
            .arg(&server)
            .args(["--addr", "127.0.0.1:0"]),
    );
    let line = next_line(&mut reader);
    assert!(line.starts_with("running pid"), "{line}");
    let pid = target.id();
    let agent = Agent::attach(pid, &[]);
    let before = agent.programs();
    let line = next_line(&mut reader);
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    let reattached = agent.wait_for("the re-attach", Duration::from_secs(10), |v| {
        v["type"] == "attached"
            && v["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("stall-server"))
    });
    assert_eq!(reattached.value["pid"], pid);
    let after = agent.programs();
    // The stall after the exec.
    stall_a_worker(&agent, addr, Duration::from_secs(5));
    let (status, lines) = agent.interrupt();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    let summaries = of_type(&lines, "summary");
    assert_eq!(summaries.len(), 2, "one per program watched: {lines:#?}");
    assert_eq!(summaries[0]["stop_reason"], "target exec'd another program");
    let _ = target.kill();
    let _ = target.wait();
    assert_detached(&before);
    assert_detached(&after);

    // An exec into something loopguard cannot watch ends the watch, loudly.
    let (mut target, mut reader) =
        spawn_piped(Command::new(&app).args(["--exec-after-ms", "1500", "sleep", "30"]));
    next_line(&mut reader);
    let pid = target.id();
    let agent = Agent::attach(pid, &[]);
    let ours = agent.programs();
    let (status, lines) = agent.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(4), "{lines:#?}");
    // The target was resumed, not left stopped: it is sleeping, not stopped.
    assert_eq!(process_state(pid), "S", "pid {pid}");
    let _ = target.kill();
    let _ = target.wait();
    assert_detached(&ours);
}
