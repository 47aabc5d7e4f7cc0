//! The version matrix, end to end: loopguard attached to the same small
//! service built against the oldest supported Tokio (1.38), one in the
//! middle and the newest published, each multi-thread and current-thread,
//! and to an actix-web service naming its requests with the middleware's
//! plain functions. Each must report a stall with its thread, task id and
//! culprit request, and detach cleanly.
//!
//! `cargo xtask test` builds them (`cargo xtask matrix` alone prints the
//! `LOOPGUARD_MATRIX` value this test reads) and runs it as root.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{Agent, Server, assert_detached, listening_addr, require_root};

/// One entry of `LOOPGUARD_MATRIX`: `label|binary|flavor`.
fn entries() -> Vec<(String, String, String)> {
    let matrix = std::env::var("LOOPGUARD_MATRIX")
        .expect("LOOPGUARD_MATRIX is not set; run `cargo xtask test` (or `cargo xtask matrix`)");
    matrix
        .split(';')
        .map(|entry| {
            let mut parts = entry.split('|').map(str::to_owned);
            let (Some(label), Some(binary), Some(flavor)) =
                (parts.next(), parts.next(), parts.next())
            else {
                panic!("malformed LOOPGUARD_MATRIX entry `{entry}`");
            };
            (label, binary, flavor)
        })
        .collect()
}

fn start(binary: &str, flavor: &str) -> Server {
    let mut command = Command::new(binary);
    command
        .args(["--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped());
    if flavor != "actix" {
        command.args(["--flavor", flavor]);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start {binary}: {e}"));
    let addr = listening_addr(&mut child);
    Server {
        pid: child.id(),
        child,
        addr,
    }
}

#[test]
#[ignore = "end-to-end: needs root and the matrix builds; run `cargo xtask test`"]
fn every_checked_tokio_and_actix_report_a_stall_with_its_request() {
    require_root();
    let entries = entries();
    assert!(entries.len() >= 7, "{entries:?}");
    for (label, binary, flavor) in entries {
        assert!(Path::new(&binary).exists(), "{label}: no {binary}");
        let server = start(&binary, &flavor);
        let agent = Agent::attach(server.pid, &[]);
        let attached = agent.wait_for("attached", Duration::from_secs(5), |v| {
            v["type"] == "attached"
        });
        assert!(
            attached.value["task_ids_verified"].as_u64() > Some(0),
            "{label}: {}",
            attached.value
        );
        assert_eq!(
            attached.value["unknown_layout_functions"],
            Value::Array(Vec::new()),
            "{label}: {}",
            attached.value
        );
        let ours = agent.programs();
        server.get("/fast");
        let blocked = server.get("/block/sleep?ms=150");
        let stall = agent
            .wait_for(
                &format!("{label}: the stall"),
                Duration::from_secs(10),
                |v| v["type"] == "stall" && v["tid"] == blocked.body["tid"],
            )
            .value;
        assert!(
            stall["duration_ms"].as_f64().unwrap() >= 140.0,
            "{label}: {stall}"
        );
        assert!(!stall["task_id"].is_null(), "{label}: {stall}");
        assert_eq!(
            stall["request"]["route"], "/block/sleep",
            "{label}: {stall}"
        );
        assert_eq!(stall["request"]["path"], "/block/sleep", "{label}: {stall}");
        let (status, _) = agent.interrupt();
        assert!(status.success(), "{label}");
        assert_detached(&ours);
        assert_eq!(server.get("/fast").body["ok"], Value::Bool(true), "{label}");
        eprintln!(
            "matrix: {label}: stall of {} ms named",
            stall["duration_ms"]
        );
    }
}

#[test]
#[ignore = "end-to-end: needs root and the matrix builds; run `cargo xtask test`"]
fn a_request_stuck_before_attach_is_named_with_the_plain_functions() {
    require_root();
    // `RequestGuard` (no tower layer): the in-flight table names the thread
    // the request started on. The oldest Tokio and actix.
    let entries: Vec<_> = entries()
        .into_iter()
        .filter(|(label, _, flavor)| flavor == "actix" || label.contains("1.38"))
        .collect();
    assert!(entries.len() >= 2, "{entries:?}");
    for (label, binary, flavor) in entries {
        let server = start(&binary, &flavor);
        let addr = server.addr;
        let sleeper =
            std::thread::spawn(move || support::http_get(addr, "/block/sleep?ms=3000").unwrap());
        std::thread::sleep(Duration::from_millis(1500));
        let agent = Agent::attach(server.pid, &["--threshold-ms", "50"]);
        let stuck = agent
            .wait_for(
                &format!("{label}: the poll stuck before attach"),
                Duration::from_secs(3),
                |v| {
                    v["type"] == "stall_in_progress"
                        && v["started_before_attach"] == Value::Bool(true)
                },
            )
            .value;
        assert_eq!(
            stuck["request"]["route"], "/block/sleep",
            "{label}: {stuck}"
        );
        assert_eq!(stuck["request"]["method"], "GET", "{label}: {stuck}");
        let ours = agent.programs();
        let slept = sleeper.join().unwrap();
        assert_eq!(stuck["tid"], slept.body["tid"], "{label}: {stuck}");
        let (status, _) = agent.interrupt();
        assert!(status.success(), "{label}");
        assert_detached(&ours);
    }
}
