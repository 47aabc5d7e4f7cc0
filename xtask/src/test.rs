//! `cargo xtask test`: fmt and clippy (host crates, the eBPF crate, the
//! version matrix and the fuzz targets: `cargo xtask lint`), unit tests,
//! build hygiene (no aya in middleware users; the pure crates on stable
//! without bpf-linker), the Kubernetes manifests (`cargo xtask
//! manifests`), then the end-to-end tests: as root, for real, against the
//! example built five ways (release, fat LTO + panic=abort + Tokio's
//! `parking_lot`, v0 mangling, non-PIE, release with debug info), and
//! against `many-futures`
//! (hundreds of poll copies: attach and detach at scale).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::{build, cmd, fuzz, hygiene, lint, manifests, matrix, setup};

const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(clap::Args)]
pub struct Options {
    /// Only fmt, clippy and unit tests (the end-to-end tests need root).
    #[arg(long)]
    no_e2e: bool,
    /// Only these end-to-end test files (comma-separated, e.g.
    /// `stacks,thresholds`), without fmt, clippy, unit tests, hygiene,
    /// manifests and fuzzing: for working on one test. CI runs them all.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAME",
        conflicts_with = "no_e2e"
    )]
    only: Vec<String>,
    /// With --only: run only the tests whose name contains this.
    #[arg(long, value_name = "SUBSTRING", requires = "only")]
    filter: Option<String>,
    /// With --only: run the chosen tests this many times and count the
    /// failing runs (a timing test that fails 1 run in 5 is a bug).
    #[arg(long, value_name = "N", default_value_t = 1, requires = "only")]
    repeat: u32,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !options.only.is_empty() {
        return run_only(options);
    }
    let root = cmd::root();
    // No build needed, so first: a middleware user that pulls in aya fails fast.
    hygiene::check_no_aya_in_apps()?;
    // The agent's build embeds the eBPF object, so even clippy needs the toolchain.
    let binaries = build::build_all()?;
    // fmt and clippy, for the workspaces outside the main lock too.
    lint::run()?;
    cmd::run(cmd::cargo().current_dir(&root).args(["test", "--release"]))?;
    hygiene::check_pure_crates_on_stable()?;
    // deploy/kubernetes/ against the Kubernetes schemas, offline.
    manifests::run()?;
    // The parsers of what a target hands loopguard, fuzzed briefly (20 s
    // each); `cargo xtask fuzz --seconds N` for longer runs.
    fuzz::run(&fuzz::Options { seconds: 20 })?;
    if options.no_e2e {
        eprintln!("test: end-to-end tests NOT run (--no-e2e)");
        return Ok(());
    }
    let e2e = E2eSetup::prepare(&binaries)?;
    // Every binary runs even when an earlier one failed.
    let mut failed = Vec::new();
    for &name in E2E_TESTS {
        if let Err(error) = e2e.run(name, None) {
            eprintln!("test: end-to-end tests `{name}` failed: {error:#}");
            failed.push(name);
        }
    }
    report_reruns();
    if !failed.is_empty() {
        bail!("end-to-end test binaries failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `--only`: the named end-to-end test files, `--repeat` times.
fn run_only(options: &Options) -> anyhow::Result<()> {
    if let Some(unknown) = options
        .only
        .iter()
        .find(|name| !E2E_TESTS.contains(&name.as_str()))
    {
        bail!(
            "--only {unknown}: no such end-to-end test file; they are: {}",
            E2E_TESTS.join(", ")
        );
    }
    if options.repeat == 0 {
        bail!("--repeat 0 runs nothing; give 1 or more");
    }
    let binaries = build::build_all()?;
    let e2e = E2eSetup::prepare(&binaries)?;
    let mut failures = Vec::new();
    for round in 1..=options.repeat {
        for name in &options.only {
            if let Err(error) = e2e.run(name, options.filter.as_deref()) {
                eprintln!("test: end-to-end tests `{name}` failed in run {round}: {error:#}");
                failures.push(format!("{name} (run {round})"));
            }
        }
        if options.repeat > 1 {
            eprintln!(
                "test: run {round} of {}: {} failed so far",
                options.repeat,
                failures.len()
            );
        }
    }
    report_reruns();
    if !failures.is_empty() {
        bail!("end-to-end tests failed: {}", failures.join(", "));
    }
    Ok(())
}

/// Where the end-to-end tests note each test they ran again because the
/// machine stood still (`LOOPGUARD_RERUN_LOG`, read by the tests' harness).
fn rerun_log() -> PathBuf {
    cmd::target_dir().join("e2e-reruns.log")
}

/// Prints the tests run again during this run: a green run says it too.
fn report_reruns() {
    let reruns = std::fs::read_to_string(rerun_log()).unwrap_or_default();
    let lines: Vec<&str> = reruns.lines().filter(|line| !line.is_empty()).collect();
    if lines.is_empty() {
        eprintln!("test: no end-to-end test was run again for a machine that stood still");
        return;
    }
    eprintln!(
        "test: {} end-to-end run(s) were run again because the machine stood still:",
        lines.len()
    );
    for line in lines {
        eprintln!("  {line}");
    }
}

/// What the end-to-end tests run against: the example's builds, the
/// Python environments and the matrix, built or installed once.
struct E2eSetup {
    stall_server: PathBuf,
    many_futures: PathBuf,
    v0_dir: PathBuf,
    nopie_dir: PathBuf,
    debuginfo_dir: PathBuf,
    python: PathBuf,
    stack_pythons: Vec<(&'static str, PathBuf)>,
    matrix: String,
}

impl E2eSetup {
    fn prepare(binaries: &build::Binaries) -> anyhow::Result<Self> {
        let root = cmd::root();
        let target = cmd::target_dir();
        // This run's reruns only.
        match std::fs::remove_file(rerun_log()) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error)
                    .with_context(|| format!("cannot remove {}", rerun_log().display()));
            }
            _ => {}
        }
        let (v0_dir, nopie_dir, debuginfo_dir) = build_variants(&root, &target)?;
        let python = setup::python_with_uvicorn()?;
        let stack_pythons = setup::pythons_with_fastapi()?;
        // The loopguard-asgi middleware's own tests (no root, no agent).
        cmd::run(
            Command::new(&python)
                .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
                .arg(root.join("python/loopguard-asgi/tests")),
        )?;
        let matrix = matrix::build()?;
        Ok(Self {
            stall_server: binaries.stall_server.clone(),
            many_futures: binaries.many_futures.clone(),
            v0_dir,
            nopie_dir,
            debuginfo_dir,
            python,
            stack_pythons,
            matrix,
        })
    }

    /// Builds the test file `name` as the user and runs its end-to-end
    /// tests as root (sudo -E when not root).
    fn run(&self, name: &str, filter: Option<&str>) -> anyhow::Result<()> {
        let root = cmd::root();
        let target = cmd::target_dir();
        let binary = build_test_binary(name)?;
        let mut command = cmd::as_root(&binary, "the end-to-end tests (they load eBPF programs)")?;
        // `LOOPGUARD_PYTHON_3_12`: a FastAPI environment per CPython version.
        for (version, python) in &self.stack_pythons {
            command.env(
                format!("LOOPGUARD_PYTHON_{}", version.replace('.', "_")),
                python,
            );
        }
        command.args(["--ignored", "--test-threads=1"]);
        if let Some(filter) = filter {
            command.arg(filter);
        }
        cmd::run(
            command
                .current_dir(root.join("loopguard-user"))
                .env("LOOPGUARD_SERVER", &self.stall_server)
                .env(
                    "LOOPGUARD_SERVER_LTO",
                    target.join("release-lto/stall-server"),
                )
                .env(
                    "LOOPGUARD_SERVER_V0",
                    self.v0_dir.join("release/stall-server"),
                )
                .env(
                    "LOOPGUARD_SERVER_NOPIE",
                    self.nopie_dir
                        .join(HOST_TARGET)
                        .join("release/stall-server"),
                )
                .env(
                    "LOOPGUARD_SERVER_DEBUGINFO",
                    self.debuginfo_dir.join("release/stall-server"),
                )
                .env("LOOPGUARD_MANY_FUTURES", &self.many_futures)
                .env("LOOPGUARD_PYTHON", &self.python)
                .env("LOOPGUARD_MATRIX", &self.matrix)
                .env("LOOPGUARD_RERUN_LOG", rerun_log())
                .env("RUST_LOG", "info"),
        )
    }
}

/// The example built the other ways the tests need: fat LTO (with Tokio's
/// `parking_lot`), v0 mangling,
/// non-PIE and with debug info. Returns the v0, non-PIE and debug-info
/// target directories.
fn build_variants(
    root: &std::path::Path,
    target: &std::path::Path,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    // With Tokio's `parking_lot` feature (`full` turns it on): that build
    // inlines the worker's condvar park into its callers (issue #23).
    cmd::run(cmd::cargo().current_dir(root).args([
        "build",
        "--profile",
        "release-lto",
        "-p",
        "stall-server",
        "--features",
        "parking-lot",
    ]))?;
    let v0_dir = target.join("v0");
    cmd::run(
        cmd::cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "stall-server"])
            .env("CARGO_TARGET_DIR", &v0_dir)
            .env("RUSTFLAGS", "-C symbol-mangling-version=v0"),
    )?;
    // Non-PIE: vtables hold literal addresses instead of relocations. An
    // explicit --target keeps RUSTFLAGS off the proc-macros.
    let nopie_dir = target.join("nopie");
    cmd::run(
        cmd::cargo()
            .current_dir(root)
            .args([
                "build",
                "--release",
                "-p",
                "stall-server",
                "--target",
                HOST_TARGET,
            ])
            .env("CARGO_TARGET_DIR", &nopie_dir)
            .env(
                "RUSTFLAGS",
                "-C relocation-model=static -C link-arg=-no-pie",
            ),
    )?;
    // With debug info (line tables, inlined calls and their names) kept, for
    // the stack tests' file:line checks: the release profile strips it.
    let debuginfo_dir = target.join("debuginfo");
    cmd::run(
        cmd::cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "stall-server"])
            .env("CARGO_TARGET_DIR", &debuginfo_dir)
            .env("CARGO_PROFILE_RELEASE_DEBUG", "limited")
            .env("CARGO_PROFILE_RELEASE_STRIP", "none"),
    )?;
    Ok((v0_dir, nopie_dir, debuginfo_dir))
}

/// The end-to-end test files of the agent (`loopguard-user/tests/*.rs`).
const E2E_TESTS: &[&str] = &[
    "e2e",
    "asgi",
    "metrics",
    "loops",
    "thresholds",
    "stacks",
    "follow",
    "output",
    "scale",
    "faults",
    "inputs",
    "matrix",
    "hostile",
    "privilege",
    "pystacks",
    // Issue #28: `watch --all` over processes before and during the watch.
    "host",
    // Issue #28: the example and a uvicorn app in podman containers.
    "containers",
    // Issue #23: false alarms and a missed block_on stall (about 1 min).
    "alarms",
    // Issue #23: every build of the example and of the matrix under
    // healthy mixed load, every rule on, zero alerts (about 2 min).
    "soak",
];

/// Builds the integration test `name` of the agent; returns its executable.
pub fn build_test_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut build = cmd::cargo();
    build
        .current_dir(cmd::root())
        .args([
            "test",
            "--release",
            "-p",
            "loopguard",
            "--test",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit());
    eprintln!("+ {}", cmd::display(&build));
    let out = build
        .output()
        .with_context(|| format!("failed to start `{}`", cmd::display(&build)))?;
    if !out.status.success() {
        bail!("`{}` failed with {}", cmd::display(&build), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == name)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable for test `{name}`"))
}
