//! Running commands: each is printed before it runs and named in its error.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Runs `cmd`, printing it first; fails when it does not exit 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", display(cmd));
    }
    Ok(())
}

/// Whether `cmd` runs and exits 0, quietly.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Stdout of `cmd`, or an empty string when it cannot run.
pub fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// `cargo`, as the one running xtask. The agent it builds must embed its
/// eBPF programs: a missing bpf-linker is an error, not a warning.
pub fn cargo() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.env("LOOPGUARD_REQUIRE_EBPF", "1");
    cargo
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

/// `program` to run as root: directly when we are root, else under `sudo -E`.
pub fn as_root(program: impl AsRef<std::ffi::OsStr>, why: &str) -> anyhow::Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if !succeeds(Command::new("sudo").arg("--version")) {
        bail!("{why} needs root, and sudo is not installed: run this command as root");
    }
    let mut command = Command::new("sudo");
    command.arg("-E").arg(program);
    Ok(command)
}

/// Drops what the outer cargo set, so `rustup run nightly cargo` really uses nightly.
pub fn scrub_cargo_env(command: &mut Command) {
    for inherited in [
        "CARGO",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        command.env_remove(inherited);
    }
}
