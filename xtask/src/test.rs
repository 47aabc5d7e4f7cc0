//! `cargo xtask test`: fmt, clippy (host crates and the eBPF crate), unit
//! tests, then the end-to-end tests: as root, for real, against the example
//! built three ways (release, fat LTO + panic=abort, v0 mangling).

use std::process::Command;

use anyhow::bail;

use crate::{build, cmd};

#[derive(clap::Args)]
pub struct Options {
    /// Only fmt, clippy and unit tests (the end-to-end tests need root).
    #[arg(long)]
    no_e2e: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let root = cmd::root();
    // The agent's build embeds the eBPF object, so even clippy needs the toolchain.
    let binaries = build::build_all()?;
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    cmd::run(cmd::cargo().current_dir(&root).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut ebpf_clippy = Command::new("rustup");
    ebpf_clippy
        .current_dir(&root)
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
    for inherited in [
        "CARGO",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        ebpf_clippy.env_remove(inherited);
    }
    cmd::run(&mut ebpf_clippy)?;
    cmd::run(cmd::cargo().current_dir(&root).args(["test", "--release"]))?;
    if options.no_e2e {
        eprintln!("test: end-to-end tests NOT run (--no-e2e)");
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "the end-to-end tests load eBPF programs and need root: run `sudo -E cargo xtask test` (or `--no-e2e` for the rest)"
        );
    }

    cmd::run(cmd::cargo().current_dir(&root).args([
        "build",
        "--profile",
        "release-lto",
        "-p",
        "stall-server",
    ]))?;
    let v0_dir = cmd::target_dir().join("v0");
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args(["build", "--release", "-p", "stall-server"])
            .env("CARGO_TARGET_DIR", &v0_dir)
            .env("RUSTFLAGS", "-C symbol-mangling-version=v0"),
    )?;
    let target = cmd::target_dir();
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args([
                "test",
                "--release",
                "-p",
                "loopguard",
                "--test",
                "e2e",
                "--",
                "--ignored",
                "--test-threads=1",
            ])
            .env("LOOPGUARD_SERVER", &binaries.stall_server)
            .env(
                "LOOPGUARD_SERVER_LTO",
                target.join("release-lto/stall-server"),
            )
            .env("LOOPGUARD_SERVER_V0", v0_dir.join("release/stall-server"))
            .env("RUST_LOG", "info"),
    )
}
