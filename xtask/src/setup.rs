//! Installs the toolchain pieces the build and the tests need, each only when
//! missing, so a second run takes a second.

use std::process::Command;

use anyhow::Context;

use crate::cmd;

/// Debian packages: LLVM 22 for bpf-linker, wrk for load, bpftool to check
/// that detaching leaves no programs behind.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "wrk",
    "bpftool",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    install_apt_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn install_apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let why = "installing Debian packages";
    cmd::run(cmd::as_root("apt-get", why)?.args(["update", "-qq"]))?;
    cmd::run(
        cmd::as_root("apt-get", why)?
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn install_rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    if !installed.lines().any(|line| line.starts_with("rustc")) {
        eprintln!("setup: installing the nightly toolchain");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    eprintln!("setup: adding rust-src to nightly (the eBPF build compiles core)");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let version = cmd::output(Command::new("bpf-linker").arg("--version"));
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute on two cores)"
    );
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
    .context("failed to install bpf-linker")
}
