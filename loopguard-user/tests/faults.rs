//! Faults, end to end: loopguard killed, its target dying under it, two
//! agents on one process, a binary gone from disk, thread churn, and `run`
//! given commands that fail. Each checks that the target still serves (where
//! it lives on) and that no program or link of the agent is left behind.
//!
//! Root and the example build are needed, so they are `#[ignore]`d in a
//! plain `cargo test`; `cargo xtask test` runs them, as root.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Agent, FastTraffic, Server, assert_detached, listening_addr, of_type, programs_held_by,
    require_root, server_binary,
};

/// Waits for a stall of the thread `tid` to be reported.
fn wait_for_stall(agent: &Agent, since: Option<Instant>, tid: &Value) -> Value {
    agent
        .wait_for_since(since, "the stall", Duration::from_secs(10), |v| {
            v["type"] == "stall" && v["tid"] == *tid
        })
        .value
}

/// A copy of the example server at a path of its own, removed on drop.
struct Copied(PathBuf);

impl Copied {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("loopguard-faults-{tag}-{}", std::process::id()));
        std::fs::copy(server_binary("LOOPGUARD_SERVER"), &path).unwrap();
        Self(path)
    }
}

impl Drop for Copied {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn sigkill_under_traffic_in_the_middle_of_a_stall_leaves_the_target_serving_and_clean() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let agent = Agent::attach(server.pid, &[]);
    let ours = agent.programs();
    let traffic = FastTraffic::start(server.addr);
    // A poll is stuck (and seen stuck) when the agent dies.
    let addr = server.addr;
    let hang = std::thread::spawn(move || support::http_get(addr, "/block/sleep?ms=1500"));
    agent.wait_for("the stall in progress", Duration::from_secs(5), |v| {
        v["type"] == "stall_in_progress"
    });
    agent.signal("KILL");
    let _ = agent.wait(Duration::from_secs(10));
    assert_detached(&ours);
    let blocked = hang.join().unwrap().unwrap();
    assert_eq!(blocked.status, 200, "{blocked:?}");
    assert!(traffic.stop() > 0, "no request was served under the agent");
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn a_target_that_exits_while_attached_ends_the_watch_cleanly() {
    require_root();
    let mut server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let agent = Agent::attach(server.pid, &[]);
    let ours = agent.programs();
    server.get("/fast");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let (status, lines) = agent.wait(Duration::from_secs(15));
    assert!(status.success(), "{lines:#?}");
    let summary = of_type(&lines, "summary");
    assert_eq!(summary.len(), 1, "{lines:#?}");
    assert_eq!(summary[0]["stop_reason"], "target exited", "{}", summary[0]);
    assert_detached(&ours);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn a_target_that_exits_during_attach_leaves_nothing_behind() {
    require_root();
    // The target dies at several points of the attach: before discovery,
    // during it, while probes go in. Whatever the moment, loopguard ends
    // by itself with a clear message or a summary, and holds nothing after.
    for delay_ms in [0, 5, 20, 60, 150] {
        let mut server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
        let mut agent = Command::new(support::LOOPGUARD)
            .args([
                "attach",
                "--pid",
                &server.pid.to_string(),
                "--format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let agent_pid = agent.id();
        let started = Instant::now();
        let mut seen: Vec<u64> = Vec::new();
        let mut killed = false;
        let deadline = started + Duration::from_secs(20);
        let status = loop {
            if !killed && started.elapsed() >= Duration::from_millis(delay_ms) {
                server.child.kill().unwrap();
                server.child.wait().unwrap();
                killed = true;
            }
            seen.extend(programs_held_by(agent_pid));
            if let Some(status) = agent.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "loopguard did not stop after its target died ({delay_ms} ms in)"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        // Ended by the target's exit (0) or refused, naming the process (4).
        assert!(
            matches!(status.code(), Some(0 | 4)),
            "{delay_ms} ms: {status:?}: {stderr}"
        );
        if status.code() == Some(4) {
            assert!(
                stderr.contains("exited") || stderr.contains("no process with pid"),
                "{delay_ms} ms: {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
        seen.sort_unstable();
        seen.dedup();
        if !seen.is_empty() {
            assert_detached(&seen);
        }
    }
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn two_agents_on_one_process_each_detach_alone() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let first = Agent::attach(server.pid, &[]);
    let second = Agent::attach(server.pid, &[]);
    let first_programs = first.programs();
    let blocked = server.get("/block/sleep?ms=150");
    wait_for_stall(&first, None, &blocked.body["tid"]);
    wait_for_stall(&second, None, &blocked.body["tid"]);

    let (status, _) = first.interrupt();
    assert!(status.success());
    assert_detached(&first_programs);
    // The other agent is whole: its probes still fire, stalls still come.
    let since = Instant::now();
    let blocked = server.get("/block/sleep?ms=150");
    let stall = wait_for_stall(&second, Some(since), &blocked.body["tid"]);
    assert!(stall["duration_ms"].as_f64().unwrap() >= 140.0, "{stall}");
    assert!(!stall["task_id"].is_null(), "{stall}");
    let second_programs = second.programs();
    let (status, lines) = second.interrupt();
    assert!(status.success());
    assert_eq!(of_type(&lines, "summary")[0]["dropped_events"], 0);
    assert_detached(&second_programs);
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
}

/// Attaches to `server`, checks one stall is seen and the agent detaches
/// cleanly, and that the server still serves.
fn watch_one_stall(server: &Server) {
    let agent = Agent::attach(server.pid, &[]);
    let ours = agent.programs();
    let blocked = server.get("/block/sleep?ms=150");
    let stall = wait_for_stall(&agent, None, &blocked.body["tid"]);
    assert!(!stall["task_id"].is_null(), "{stall}");
    let (status, _) = agent.interrupt();
    assert!(status.success());
    assert_detached(&ours);
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn a_binary_deleted_or_replaced_on_disk_is_watched_as_it_runs() {
    require_root();
    // Deleted: the running image exists only through /proc/PID/exe.
    let deleted = Copied::new("deleted");
    let server = Server::start(&deleted.0, &[]);
    std::fs::remove_file(&deleted.0).unwrap();
    watch_one_stall(&server);
    drop(server);

    // Replaced by another file at the same path (a deploy): the probes go
    // on the inode that runs, not on the new file.
    let replaced = Copied::new("replaced");
    let server = Server::start(&replaced.0, &[]);
    let next = replaced.0.with_extension("next");
    std::fs::copy("/usr/bin/true", &next).unwrap();
    std::fs::rename(&next, &replaced.0).unwrap();
    watch_one_stall(&server);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn a_binary_that_only_exists_in_another_mount_namespace_is_watched() {
    require_root();
    let binary = server_binary("LOOPGUARD_SERVER");
    let dir = std::env::temp_dir().join(format!("loopguard-faults-ns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A private tmpfs over `dir`, seen by the server's namespace only.
    let script = format!(
        "mount -t tmpfs tmpfs {dir} && cp {binary} {dir}/server && exec {dir}/server --addr 127.0.0.1:0",
        dir = dir.display(),
        binary = binary.display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child);
    let server = Server {
        pid: child.id(),
        child,
        addr,
    };
    assert!(
        !Path::new(&dir.join("server")).exists(),
        "the binary is visible outside the server's mount namespace"
    );
    watch_one_stall(&server);
    drop(server);
    let _ = std::fs::remove_dir(&dir);
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn blocking_pool_thread_churn_is_no_stall_and_stalls_still_come() {
    require_root();
    // Idle blocking threads exit after 20 ms: every burst starts new ones.
    let server = Server::start(
        &server_binary("LOOPGUARD_SERVER"),
        &["--blocking-keep-alive-ms", "20"],
    );
    let agent = Agent::attach(server.pid, &[]);
    let ours = agent.programs();
    let mut threads = 0;
    for _ in 0..10 {
        let burst = server.get("/spawn_blocking/burst?n=64&ms=60");
        threads += burst.body["threads"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(60));
    }
    assert!(threads >= 100, "only {threads} blocking threads were used");
    let blocked = server.get("/block/sleep?ms=150");
    let stall = wait_for_stall(&agent, None, &blocked.body["tid"]);
    assert!(!stall["task_id"].is_null(), "{stall}");
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    // 60 ms sleeps on the blocking pool are not stalls; the one block is.
    let stalls = of_type(&lines, "stall");
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let summary = of_type(&lines, "summary");
    assert_eq!(summary[0]["dropped_events"], 0, "{}", summary[0]);
    assert_detached(&ours);
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
}

/// `loopguard run ARGS`: exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    support::loopguard(&[&["run"], args].concat())
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_tells_its_own_failures_from_the_commands_exit_codes() {
    require_root();
    let binary = server_binary("LOOPGUARD_SERVER");
    let binary = binary.to_str().unwrap();

    let (code, stderr) = run(&["--", "/nonexistent/loopguard-app"]);
    assert_eq!(code, Some(127), "{stderr}");
    assert!(stderr.contains("/nonexistent/loopguard-app"), "{stderr}");
    // A file that is not executable.
    let data = std::env::temp_dir().join(format!("loopguard-faults-data-{}", std::process::id()));
    std::fs::write(&data, "not a program\n").unwrap();
    let (code, stderr) = run(&["--", data.to_str().unwrap()]);
    std::fs::remove_file(&data).unwrap();
    assert_eq!(code, Some(126), "{stderr}");

    // The command exits at once, successfully (after printing its help).
    let (code, stderr) = run(&["--", binary, "--help"]);
    assert_eq!(code, Some(0), "{stderr}");
    // It exits at once with its own code 2 (a bad argument of its own):
    // forwarded as 2, where loopguard's own bad argument is 125.
    let (code, stderr) = run(&["--", binary, "--no-such-flag"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run(&["--no-such-flag", "--", binary]);
    assert_eq!(code, Some(125), "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    // A command loopguard cannot watch: loopguard's failure, 125.
    let (code, stderr) = run(&["--", "true"]);
    assert_eq!(code, Some(125), "{stderr}");
    assert!(stderr.contains("not a Rust program"), "{stderr}");
}
