//! `cargo xtask fuzz [--seconds N]`: the cargo-fuzz targets of
//! `loopguard-parse/fuzz` (ELF parser, USDT notes and argument specs, task
//! vtables, `CPython` line tables) and `loopguard-user/fuzz` (recordings for
//! `loopguard report`), seeded from real binaries, each run for N seconds
//! (20 by default; `cargo xtask test` runs them so). Installs cargo-fuzz
//! once.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::cmd;

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz workspaces and their targets: the parsers of what a target
/// process hands loopguard, in the parse crate (no eBPF object, no aya),
/// and what the agent reads back itself.
const WORKSPACES: &[(&str, &[&str])] = &[
    (
        "loopguard-parse/fuzz",
        &["elf", "usdt", "vtable", "linetable"],
    ),
    ("loopguard-user/fuzz", &["report"]),
];

/// Every target with the fuzz workspace (directory) it is in.
fn targets() -> impl Iterator<Item = (&'static str, &'static str)> {
    WORKSPACES
        .iter()
        .flat_map(|&(dir, targets)| targets.iter().map(move |&target| (dir, target)))
}

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    install_cargo_fuzz()?;
    let seeds = write_seeds()?;
    for (dir, target) in targets() {
        let fuzz_dir = cmd::root().join(dir);
        let corpus = cmd::target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut fuzz = nightly_cargo();
        fuzz.args(["fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&corpus)
            .arg(seeds.join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            .arg(format!("-max_len={}", max_len(&seeds.join(target))))
            .arg("-print_final_stats=1")
            .env("CARGO_TARGET_DIR", cmd::target_dir().join("fuzz"))
            // The fuzzers never attach: no eBPF object to build.
            .env("AYA_BUILD_SKIP", "1");
        cmd::run(&mut fuzz).with_context(|| format!("fuzz target `{target}` failed"))?;
    }
    Ok(())
}

/// Clippy for the fuzz targets, on stable like the main workspace's (they
/// need no nightly feature to build; only running them does), in the fuzz
/// target directory. `--locked`: their locks must follow the parse crate's
/// and the agent's dependencies.
pub fn clippy() -> anyhow::Result<()> {
    for (dir, _) in WORKSPACES {
        let manifest = cmd::root().join(dir).join("Cargo.toml");
        cmd::run(
            cmd::cargo()
                .args(["clippy", "--all-targets", "--locked", "--manifest-path"])
                .arg(manifest)
                .args(["--", "-D", "warnings"])
                .env("CARGO_TARGET_DIR", cmd::target_dir().join("fuzz"))
                // As for the fuzzers themselves: no eBPF object (an empty one).
                .env("AYA_BUILD_SKIP", "1")
                .env_remove("LOOPGUARD_REQUIRE_EBPF"),
        )?;
    }
    Ok(())
}

fn nightly_cargo() -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", "cargo"]);
    cmd::scrub_cargo_env(&mut command);
    command.current_dir(cmd::root());
    command
}

fn install_cargo_fuzz() -> anyhow::Result<()> {
    if cmd::output(nightly_cargo().args(["fuzz", "--version"])).contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute, once)");
    cmd::run(cmd::cargo().args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// The largest seed, so libFuzzer reads whole binaries.
fn max_len(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|meta| meta.len())
        .max()
        .unwrap_or(0)
        .max(4096)
}

/// Seeds from real binaries, under `target/fuzz-seeds/TARGET`: small real
/// executables for `elf`, the `.note.stapsdt` section of the example and
/// its notes' argument strings for `usdt`, the task vtables of the layouts
/// Tokio uses for `vtable`.
fn write_seeds() -> anyhow::Result<PathBuf> {
    let seeds = cmd::target_dir().join("fuzz-seeds");
    for (_, target) in targets() {
        std::fs::create_dir_all(seeds.join(target))?;
    }
    let example = cmd::target_dir().join("release/stall-server");
    anyhow::ensure!(
        example.exists(),
        "{} is missing; run `cargo xtask build` first",
        example.display()
    );
    // elf: a C program, and the example cut down to what discovery reads
    // (headers, symbols, the notes, the vtables' sections).
    std::fs::copy("/usr/bin/true", seeds.join("elf/true"))?;
    cmd::run(
        Command::new("objcopy")
            .args([
                "--strip-debug",
                "--remove-section=.text",
                "--remove-section=.eh_frame",
                "--remove-section=.eh_frame_hdr",
                "--remove-section=.gcc_except_table",
            ])
            .arg(&example)
            .arg(seeds.join("elf/stall-server-slim")),
    )?;
    // usdt: the note section itself, and each note's argument string.
    // (Not `-O binary`: the note section is not loaded, so that writes nothing.)
    cmd::run(
        Command::new("objcopy")
            .arg(format!(
                "--dump-section=.note.stapsdt={}",
                seeds.join("usdt/note.stapsdt").display()
            ))
            .arg(&example)
            .arg(seeds.join("usdt/scratch")),
    )?;
    let _ = std::fs::remove_file(seeds.join("usdt/scratch"));
    let notes = cmd::output(Command::new("readelf").arg("-n").arg(&example));
    for (i, args) in notes
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Arguments:"))
        .enumerate()
    {
        std::fs::write(seeds.join(format!("usdt/args-{i}")), args.trim())?;
    }
    // vtable: seven code pointers, then trailer, scheduler and id offsets,
    // for an event-loop task (8-byte handle) and the blocking pool's (0 and
    // 16 bytes), in the fuzz target's format.
    for (name, offsets) in [
        ("event-loop", [0x80u64, 0x20, 0x28]),
        ("blocking-old", [0x40, 0x20, 0x20]),
        ("blocking-new", [0x80, 0x20, 0x30]),
    ] {
        let mut bytes = 0x100u16.to_le_bytes().to_vec();
        for slot in 0..7u64 {
            bytes.extend_from_slice(&(0x1000 + 0x40 * slot).to_le_bytes());
            bytes.push(1);
        }
        for offset in offsets {
            bytes.extend_from_slice(&offset.to_le_bytes());
            bytes.push(0);
        }
        std::fs::write(seeds.join(format!("vtable/{name}")), bytes)?;
    }
    // linetable: first line 10, code unit 12, then a table with every form
    // (the one the parser's unit test reads).
    let mut table = 10i64.to_le_bytes().to_vec();
    table.extend_from_slice(&12u64.to_le_bytes());
    table.extend_from_slice(&[
        0xf9, 0xf2, 4, 0, 1, 5, 0x99, 0x12, 0xd8, 4, 9, 0xea, 7, 0xf1, 0x90, 0x01, 0, 0, 0,
    ]);
    std::fs::write(seeds.join("linetable/forms"), table)?;
    // report: the golden recording of the output tests.
    std::fs::copy(
        cmd::root().join("loopguard-user/tests/golden/session.jsonl"),
        seeds.join("report/session.jsonl"),
    )?;
    Ok(seeds)
}
