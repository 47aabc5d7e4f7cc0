//! `cargo xtask lint`: rustfmt and clippy over every workspace `cargo xtask
//! test` builds: the main one (host crates, then the eBPF crate for its own
//! target), and those outside the main lock: the version matrix's examples
//! (`examples/tokio-matrix`, `examples/actix-server`) and the fuzz targets
//! (`loopguard-parse/fuzz`, `loopguard-user/fuzz`).

use std::process::Command;
use std::time::Instant;

use crate::{cmd, fuzz, matrix, setup};

/// The manifests of the workspaces outside the main lock.
const OTHER_WORKSPACES: &[&str] = &[
    "examples/tokio-matrix/Cargo.toml",
    "examples/actix-server/Cargo.toml",
    "loopguard-parse/fuzz/Cargo.toml",
    "loopguard-user/fuzz/Cargo.toml",
];

pub fn run() -> anyhow::Result<()> {
    let root = cmd::root();
    // The agent's build embeds the eBPF object, so even clippy needs the toolchain.
    setup::run()?;
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    for manifest in OTHER_WORKSPACES {
        cmd::run(cmd::cargo().current_dir(&root).args([
            "fmt",
            "--check",
            "--manifest-path",
            manifest,
        ]))?;
    }
    cmd::run(cmd::cargo().current_dir(&root).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::run(&mut ebpf_clippy())?;
    let started = Instant::now();
    matrix::clippy()?;
    fuzz::clippy()?;
    eprintln!(
        "lint: clippy of the version matrix and the fuzz targets took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Clippy for the eBPF crate, which only builds for the BPF target on nightly.
fn ebpf_clippy() -> Command {
    let mut clippy = Command::new("rustup");
    clippy
        .current_dir(cmd::root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "loopguard-ebpf",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
    cmd::scrub_cargo_env(&mut clippy);
    clippy
}
