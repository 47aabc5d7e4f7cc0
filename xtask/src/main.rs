//! `cargo xtask`: the project's own commands. Each installs what it needs.
//!
//! - `setup`: install the toolchain pieces (idempotent, quick when present)
//! - `build-ebpf`: setup, then build the eBPF object alone
//! - `build`: setup, then the `loopguard` agent and the example, in release
//! - `demo`: build, start the example, attach, drive a few requests, show the output
//! - `lint`: fmt and clippy of every workspace `test` builds
//! - `manifests`: validate `deploy/kubernetes/` offline against the Kubernetes schemas
//! - `test`: fmt, clippy, unit tests, then the privileged end-to-end tests
//! - `hygiene`: the build-hygiene checks `test` runs (no aya in middleware
//!   users; the pure crates on stable without bpf-linker)
//! - `fleet`: `watch --all` at scale (issue #28): N targets, churn, leaks
//! - `bench`: the example's throughput and latency with and without loopguard
//!   attached, the agent's CPU and memory, and optionally a memory soak;
//!   `--python`: loopguard-asgi + the agent against fastapi-loopguard

mod bench;
mod build;
mod cmd;
mod demo;
mod example;
mod fleet;
mod fuzz;
mod hygiene;
mod lint;
mod manifests;
mod matrix;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "loopguard's build, test and demo commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: rust-src, bpf-linker, LLVM 22, wrk, bpftool.
    Setup,
    /// Build the eBPF object (installs what is missing first).
    BuildEbpf,
    /// Build the agent and the example service in release.
    Build,
    /// Start the example service, attach loopguard, send blocking requests, show what it reports.
    Demo,
    /// Run fmt and clippy on every workspace: the main one, the eBPF crate, the version
    /// matrix's examples and the fuzz targets.
    Lint,
    /// Validate deploy/kubernetes/ offline against the Kubernetes schemas (kubernetes-validate
    /// from `PyPI`, installed into target/manifests-python) and check the manifests fit together.
    Manifests,
    /// Run fmt, clippy, unit tests and the end-to-end tests (the latter as root, for real).
    Test(test::Options),
    /// Check build hygiene (part of `test`): no aya in the dependency tree of an app using
    /// the middleware, and the pure crates built and unit-tested on stable without bpf-linker.
    Hygiene,
    /// Run the fuzz targets (ELF, USDT notes and argument specs, task vtables, Python line
    /// tables, recordings), seeded from real binaries, for a few seconds each. Installs
    /// cargo-fuzz once.
    Fuzz(fuzz::Options),
    /// Build the Tokio version matrix's examples; prints the `LOOPGUARD_MATRIX` value
    /// the `matrix` end-to-end test reads.
    Matrix,
    /// Measure what attaching costs the example: throughput, p50/p99 latency, agent CPU and memory.
    ///
    /// Installs oha (the fixed-rate load generator) on first use. `--python`: loopguard
    /// against fastapi-loopguard 0.9.0 on a `FastAPI` app instead.
    Bench(Box<bench::Options>),
    /// Check `loopguard watch --all` at scale: `--targets` Tokio, uvicorn and Node processes
    /// started before and during the watch, a stall in each found under its labels, then
    /// `--churn-minutes` of churn; fails on a leak of BPF objects, fds, series or memory.
    Fleet(fleet::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => build::build_ebpf(),
        Command::Build => build::build_all().map(|_| ()),
        Command::Demo => demo::run(),
        Command::Lint => lint::run(),
        Command::Manifests => manifests::run(),
        Command::Test(options) => test::run(&options),
        Command::Hygiene => {
            hygiene::check_no_aya_in_apps()?;
            hygiene::check_pure_crates_on_stable()
        }
        Command::Fuzz(options) => fuzz::run(&options),
        Command::Matrix => matrix::build().map(|entries| println!("{entries}")),
        Command::Bench(options) => bench::run(&options),
        Command::Fleet(options) => fleet::run(&options),
    }
}
