//! Builds: the eBPF object alone, or the agent (which embeds it) and the example.

use std::path::PathBuf;
use std::process::Command;

use crate::{cmd, setup};

/// Builds the eBPF object on its own (the agent's build script does the
/// same when it embeds it); prints where it is.
pub fn build_ebpf() -> anyhow::Result<()> {
    setup::run()?;
    let mut nightly_cargo = Command::new("rustup");
    nightly_cargo
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "-p",
            "loopguard-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .current_dir(cmd::root());
    cmd::scrub_cargo_env(&mut nightly_cargo);
    cmd::run(&mut nightly_cargo)?;
    let object = cmd::target_dir().join("bpfel-unknown-none/release/loopguard");
    eprintln!("build-ebpf: {}", object.display());
    Ok(())
}

/// Paths of the release binaries.
pub struct Binaries {
    pub loopguard: PathBuf,
    pub stall_server: PathBuf,
    /// The example with hundreds of `raw::poll` copies.
    pub many_futures: PathBuf,
}

pub fn build_all() -> anyhow::Result<Binaries> {
    setup::run()?;
    cmd::run(cmd::cargo().current_dir(cmd::root()).args([
        "build",
        "--release",
        "-p",
        "loopguard",
        "-p",
        "stall-server",
        "-p",
        "many-futures",
    ]))?;
    let release = cmd::target_dir().join("release");
    Ok(Binaries {
        loopguard: release.join("loopguard"),
        stall_server: release.join("stall-server"),
        many_futures: release.join("many-futures"),
    })
}
