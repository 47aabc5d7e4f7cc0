//! End-to-end: the capabilities the agent keeps once its watch is set up
//! (issue #26, finding 3), read from `/proc/PID/task/*/status` of the
//! running agent, with stacks and following still at work after the drop.
//! Run as root: `sudo -E cargo xtask test`.

mod support;

use std::process::Command;
use std::time::Duration;

use loopguard::privilege::{
    CAP_BPF, CAP_DAC_OVERRIDE, CAP_KILL, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_SETGID,
    CAP_SETPCAP, CAP_SETUID, CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE,
};
use serde_json::Value;
use support::{
    Agent, assert_detached, http_get, next_line, process_state, require_root, server_binary,
    spawn_piped, stack_functions,
};

/// A `CapXxx:` field (hex) or `NoNewPrivs:` of a status file.
fn field(status: &str, name: &str) -> u64 {
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim();
    if name == "NoNewPrivs" {
        value.parse().unwrap()
    } else {
        u64::from_str_radix(value, 16).unwrap()
    }
}

/// Every thread of `pid`: (tid, its status text).
fn thread_statuses(pid: u32) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let entry = entry.unwrap();
        if let Ok(status) = std::fs::read_to_string(entry.path().join("status")) {
            all.push((entry.file_name().to_string_lossy().into_owned(), status));
        }
    }
    assert!(!all.is_empty(), "pid {pid} has no threads");
    all
}

/// Asserts that every thread of the agent `pid` holds what a watch needs
/// and nothing it dropped, in each set, with `no_new_privs`.
fn assert_watch_privileges(pid: u32) {
    for (tid, status) in thread_statuses(pid) {
        let effective = field(&status, "CapEff");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let caps = field(&status, set);
            for cap in [CAP_SYS_ADMIN, CAP_BPF, CAP_SYS_PTRACE, CAP_KILL] {
                assert!(
                    caps & (1 << cap) != 0,
                    "thread {tid} lost {cap} in {set}: {status}"
                );
            }
            for cap in [
                CAP_SETUID,
                CAP_SETGID,
                CAP_SETPCAP,
                CAP_NET_ADMIN,
                CAP_NET_BIND_SERVICE,
                CAP_SYS_MODULE,
                CAP_DAC_OVERRIDE,
            ] {
                assert!(
                    caps & (1 << cap) == 0,
                    "thread {tid} kept {cap} in {set}: {status}"
                );
            }
        }
        assert_eq!(
            field(&status, "CapPrm"),
            effective,
            "thread {tid}: {status}"
        );
        assert_eq!(field(&status, "CapInh"), 0, "thread {tid}: {status}");
        assert_eq!(field(&status, "CapAmb"), 0, "thread {tid}: {status}");
        assert_eq!(field(&status, "NoNewPrivs"), 1, "thread {tid}: {status}");
    }
}

/// The watchdog the agent forked (its only child when following `attach`):
/// it keeps `CAP_KILL` alone.
fn assert_watchdog_privileges(agent: u32) {
    let children =
        std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).unwrap_or_default();
    let mut seen = 0;
    for child in children.split_whitespace() {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{child}/status")) else {
            continue;
        };
        if !status.starts_with("Name:\tloopguard") {
            continue;
        }
        seen += 1;
        assert_eq!(field(&status, "CapEff"), 1 << CAP_KILL, "{status}");
        assert_eq!(field(&status, "CapPrm"), 1 << CAP_KILL, "{status}");
        // Its bounding set is the agent's (CAP_SETPCAP was dropped before
        // the fork); with no_new_privs no exec could grant from it anyway.
        assert_eq!(field(&status, "CapBnd") & (1 << CAP_SETUID), 0, "{status}");
        assert_eq!(field(&status, "NoNewPrivs"), 1, "{status}");
    }
    assert_eq!(seen, 1, "one watchdog among the children {children:?}");
}

/// A stall whose stack names the handler that slept.
fn assert_stall_with_stack(agent: &Agent, addr: std::net::SocketAddr) {
    let blocked = http_get(addr, "/block/sleep?ms=200").unwrap();
    let stall = agent.wait_for("the stall", Duration::from_secs(10), |v| {
        v["type"] == "stall" && v["tid"] == blocked.body["tid"]
    });
    assert!(
        stack_functions(&stall.value)
            .iter()
            .any(|f| f.contains("block_sleep")),
        "the stack is read after the drop: {}",
        stall.value
    );
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn attach_keeps_only_what_watching_needs_and_stacks_still_work() {
    require_root();
    let server = support::Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let agent = Agent::attach(server.pid, &[]);
    let programs = agent.programs();
    let pid = agent.child.id();
    assert_watch_privileges(pid);
    assert_watchdog_privileges(pid);
    assert_stall_with_stack(&agent, server.addr);
    // Threads started after the drop (the blocking pool's) hold no more.
    assert_watch_privileges(pid);
    let (status, lines) = agent.interrupt();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_detached(&programs);
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_drops_setuid_after_the_start_and_still_follows_a_child_of_another_user() {
    require_root();
    let server = server_binary("LOOPGUARD_SERVER");
    // As sudo would start it: the command runs as nobody, and the server it
    // forks is found by following, stopped at exec and resumed (CAP_KILL)
    // after the drop.
    let script = format!("{} --addr 127.0.0.1:0; true", server.display());
    let mut command = Command::new(support::LOOPGUARD);
    command
        .args(["run", "--format", "json", "--", "sh", "-c", &script])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534");
    let agent = Agent::spawn(command);
    let attached = agent.wait_for("the server attached", Duration::from_secs(30), |v| {
        v["type"] == "attached"
            && v["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("stall-server"))
    });
    let server_pid = u32::try_from(attached.value["pid"].as_u64().unwrap()).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{server_pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534\t")),
        "the server runs as nobody: {status}"
    );
    let (_, addr) = agent.wait_for_listening(Duration::from_secs(10));
    let programs = agent.programs();
    let pid = agent.child.id();
    assert_watch_privileges(pid);
    assert_stall_with_stack(&agent, addr);
    let killed = Command::new("kill")
        .args(["-TERM", &server_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, lines) = agent.wait(Duration::from_secs(30));
    assert!(status.code().is_some(), "{lines:#?}");
    assert_detached(&programs);
}

/// Sleeps 3 s (attached by then), then execs itself (`CODE`) once.
const EXECS_ONCE: &str = "
import os, select, sys, time
ep = select.epoll()
print('ready', flush=True)
if len(sys.argv) < 2:
    time.sleep(3)
    os.execv(sys.executable, [sys.executable, '-c', os.environ['CODE'], 'again'])
time.sleep(60)
";

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn a_user_with_the_documented_capabilities_resumes_a_root_process_stopped_at_exec() {
    require_root();
    let python = std::env::var_os("LOOPGUARD_PYTHON")
        .expect("LOOPGUARD_PYTHON is not set; run the end-to-end tests through `cargo xtask test`");
    // Root's process in a session of its own: SIGCONT from another user
    // needs CAP_KILL there.
    let (mut target, mut reader) = spawn_piped(
        Command::new("setsid")
            .arg(&python)
            .arg("-c")
            .arg(EXECS_ONCE)
            .env("CODE", EXECS_ONCE),
    );
    assert_eq!(next_line(&mut reader).trim(), "ready");
    let pid = target.id();
    // What `setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep` gives uid 65534.
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg("--inh-caps=+sys_admin,+sys_ptrace,+kill")
        .arg("--ambient-caps=+sys_admin,+sys_ptrace,+kill")
        .arg(support::LOOPGUARD)
        .args(["attach", "--pid", &pid.to_string(), "--format", "json"])
        .args(["--duration", "10", "--no-stacks"]);
    let agent = Agent::spawn(command);
    agent.wait_for("the first attach", Duration::from_secs(20), |v| {
        v["type"] == "attached"
    });
    assert_eq!(
        next_line(&mut reader).trim(),
        "ready",
        "the target ran on after its exec"
    );
    let after_exec = agent.wait_for("the re-attach", Duration::from_secs(15), |v| {
        v["type"] == "summary"
    });
    assert_eq!(
        after_exec.value["stop_reason"],
        "target exec'd another program"
    );
    let (status, lines) = agent.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_ne!(
        process_state(pid),
        "T",
        "the target was left stopped: {lines:#?}"
    );
    let _ = target.kill();
    let _ = target.wait();
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn run_passes_no_capability_to_its_command() {
    require_root();
    // loopguard holding its capabilities in the ambient set, as setpriv or
    // systemd's AmbientCapabilities= give them: the command gets none.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg("--inh-caps=+sys_admin,+sys_ptrace,+kill")
        .arg("--ambient-caps=+sys_admin,+sys_ptrace,+kill")
        .arg(support::LOOPGUARD)
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "grep -E '^Cap(Eff|Prm|Amb)' /proc/self/status",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = stdout.lines().filter(|l| l.starts_with("Cap")).collect();
    assert_eq!(
        fields.len(),
        3,
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in fields {
        assert!(
            line.ends_with("0000000000000000"),
            "the command holds capabilities: {stdout}"
        );
    }
}
