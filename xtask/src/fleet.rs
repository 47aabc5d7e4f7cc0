//! `cargo xtask fleet`: issue #28's scale check of `loopguard watch --all`,
//! at any size: the `host` end-to-end test
//! `a_fleet_is_attached_labelled_and_churn_leaks_nothing` (10 targets and
//! 1 minute of churn in `cargo xtask test`) run with `--targets` targets
//! (Tokio, uvicorn and Node mixed, half started before the watch and half
//! during) and `--churn-minutes` of churn. It prints what the agent held
//! every 5 s (RSS, CPU, BPF programs, maps, links, perf events, fds,
//! series) and fails when a stall is misattributed or the churn leaks.

use crate::{build, cmd, setup, test};

#[derive(clap::Args)]
pub struct Options {
    /// Target processes (three Tokio for each uvicorn and Node one).
    #[arg(long, default_value_t = 50)]
    targets: u32,
    /// Minutes of churn: a process started every second, killed 2 s later.
    #[arg(long, default_value_t = 10.0)]
    churn_minutes: f64,
    /// Watch without stack capture (its programs and perf events per target).
    #[arg(long)]
    no_stacks: bool,
}

const TEST: &str = "a_fleet_is_attached_labelled_and_churn_leaks_nothing";

pub fn run(options: &Options) -> anyhow::Result<()> {
    let binaries = build::build_all()?;
    let python = setup::python_with_uvicorn()?;
    let binary = test::build_test_binary("host")?;
    let mut command = cmd::as_root(&binary, "the scale check (it loads eBPF programs)")?;
    command
        .args(["--ignored", "--exact", TEST, "--nocapture"])
        .current_dir(cmd::root().join("loopguard-user"))
        .env("LOOPGUARD_SERVER", &binaries.stall_server)
        .env("LOOPGUARD_PYTHON", &python)
        .env("LOOPGUARD_FLEET_TARGETS", options.targets.to_string())
        .env(
            "LOOPGUARD_FLEET_CHURN_S",
            format!("{:.0}", options.churn_minutes * 60.0),
        )
        .env("RUST_LOG", "warn");
    if options.no_stacks {
        command.env("LOOPGUARD_FLEET_NO_STACKS", "1");
    }
    cmd::run(&mut command)
}
