//! `cargo xtask demo`: the whole product on the bundled example, in a minute.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::example::Example;
use crate::{build, cmd};

/// Requests the demo sends, and what each one does to a worker thread.
const REQUESTS: &[(&str, &str)] = &[
    ("/fast", "answers at once"),
    (
        "/block/sleep?ms=200",
        "std::thread::sleep for 200 ms on a worker",
    ),
    ("/block/spin?ms=120", "a 120 ms busy loop on a worker"),
    (
        "/spawn_blocking?ms=300",
        "300 ms on the blocking pool: legitimate, not a stall",
    ),
    (
        "/block/mutex?ms=150",
        "waits 150 ms for a contended std::sync::Mutex",
    ),
    (
        "/block/sleep?ms=1500",
        "1.5 s: reported while still stuck, then when it ends",
    ),
];

pub fn run() -> anyhow::Result<()> {
    let binaries = build::build_all()?;
    let server = Example::start(&binaries.stall_server)?;
    let addr = server.addr.clone();
    eprintln!(
        "\ndemo: stall-server (pid {}) listens on {addr}",
        server.pid()
    );

    let mut agent = cmd::as_root(&binaries.loopguard, "loading eBPF programs")?
        .args([
            "attach",
            "--pid",
            &server.pid().to_string(),
            "--threshold-ms",
            "50",
            "--duration",
            "6",
        ])
        .spawn()
        .context("failed to start loopguard")?;
    std::thread::sleep(Duration::from_secs(1));
    for (path, what) in REQUESTS {
        eprintln!("demo: GET {path:<24} {what}");
        let ok = cmd::succeeds(Command::new("curl").args([
            "-sf",
            "--max-time",
            "10",
            &format!("http://{addr}{path}"),
        ]));
        if !ok {
            eprintln!("demo: GET {path} failed");
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let status = agent.wait()?;
    drop(server);
    if !status.success() {
        bail!("loopguard exited with {status}");
    }
    eprintln!(
        "\ndemo: four stalls above (sleep 200, spin 120, mutex 150, sleep 1500); the spawn_blocking request is not one."
    );
    Ok(())
}
