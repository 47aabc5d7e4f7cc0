//! Command-line interface: `loopguard attach` and `loopguard run`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::report::Format;

const EXAMPLES: &str = "\
EXAMPLES:
  sudo loopguard attach --pid 1234
      Report every task poll that blocks a worker of pid 1234 for 50 ms or more.
  sudo loopguard attach --pid \"$(pgrep -n my-service)\" --threshold-ms 20 --format json
      One JSON object per line, for scripts (types: attached, stall_in_progress, stall, summary).
  sudo loopguard attach --pid 1234 --duration 60
      Watch for a minute, then print the summary and detach.
  sudo loopguard attach --pid 1234 --metrics-addr 9464
      Also serve Prometheus metrics at http://127.0.0.1:9464/metrics (loopguard_*).
  sudo loopguard attach --pid 1234 --folded stalls.folded
      Each stall with its stack and cause (on CPU, or blocked in which system call);
      at exit, the stalls' stacks in folded form for flamegraph.pl or inferno.
  sudo loopguard run --fail-on-stall -- ./target/release/my-service --port 8080
      Start the service with the probes already in place; exit with its exit code,
      or 3 if any poll stalled (a CI guard against blocking code on the runtime).

OUTPUT:
  STALL IN PROGRESS  a poll has been running longer than the threshold (reported once, ~5 ms after crossing it)
  STALL              a poll that blocked its thread returned; its full duration
  Ctrl+C or SIGTERM detaches cleanly (the target keeps running) and prints a summary.

EXIT CODES:
  0 ok   1 runtime failure   2 bad arguments   3 a stall was seen with --fail-on-stall
  4 the target cannot be profiled (no such pid, not Tokio, stripped)   5 privileges or kernel
  `loopguard run` otherwise exits with the command's own exit code.";

/// Finds the request that froze your Tokio event loop.
///
/// loopguard attaches eBPF uprobes to Tokio's task poll function in a running,
/// unmodified process and reports every poll that keeps a worker thread busy
/// for longer than a threshold: the thread, the task, how long, live.
#[derive(Debug, Parser)]
#[command(name = "loopguard", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a running Tokio process and report stalls until stopped.
    Attach(AttachArgs),
    /// Start a command with the probes in place before it serves, and report its stalls.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Process id of the Tokio program to watch.
    #[arg(long, short)]
    pub pid: u32,
    #[command(flatten)]
    pub watch: WatchArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Exit with code 3 when any stall was seen and the command itself succeeded.
    #[arg(long)]
    pub fail_on_stall: bool,
    #[command(flatten)]
    pub watch: WatchArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args, Clone)]
pub struct WatchArgs {
    /// A poll that keeps its thread at least this long (ms) is a stall.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub threshold_ms: u64,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop by itself after this many seconds (`run`: SIGTERM the command then;
    /// dying of that SIGTERM counts as success).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    /// Do not attach to loopguard-middleware's request probes. Stalls are then
    /// reported without the request, and each request costs two probe hits
    /// and two ring-buffer records less (on a trivial endpoint, about four
    /// fifths of loopguard's overhead; see the README's Overhead section).
    #[arg(long)]
    pub no_requests: bool,
    /// How often (ms) in-flight polls are checked for stalls still in progress.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub scan_interval_ms: u64,
    /// How event-loop waits are seen: `uprobe` on the C library's epoll
    /// wrappers (costs nothing outside the target, misses programs that make
    /// the syscall themselves), `tracepoint` on every syscall's entry and exit
    /// (sees every wait, but runs for every process on the host), `auto`
    /// (uprobes where the wrappers exist), or `off`.
    #[arg(long, value_enum, default_value_t = crate::attach::WaitProbes::Auto)]
    pub wait_probes: crate::attach::WaitProbes,
    /// Only threads with these names count as event loops (comma-separated;
    /// a trailing `*` matches a prefix: `node,python*`). By default every
    /// thread that waits for events in epoll or Tokio's park is one.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub loop_threads: Vec<String>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` while watching. A bare
    /// port (`9464`) binds 127.0.0.1 only; listening elsewhere is explicit
    /// (`0.0.0.0:9464`). Checked before anything is attached.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Route templates kept as metric labels; later ones are counted as
    /// `other`, so the number of series stays bounded.
    #[arg(long, value_name = "N", default_value_t = crate::export::labels::DEFAULT_MAX_ROUTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub metrics_max_routes: usize,
    #[command(flatten)]
    pub stacks: StackArgs,
}

/// Stack capture options (issue #14).
#[derive(Debug, Args, Clone)]
pub struct StackArgs {
    /// Do not capture the stacks of stalled polls (nor say whether they were
    /// on or off CPU).
    #[arg(long)]
    pub no_stacks: bool,
    /// Show every frame of a stall's stack, the runtime's below the task too.
    #[arg(long, conflicts_with = "no_stacks")]
    pub all_frames: bool,
    /// At exit, write the stalls' stacks here in folded form (one
    /// `outer;...;inner <ms>` line per stack) for flame graph tools.
    #[arg(long, value_name = "FILE", conflicts_with = "no_stacks")]
    pub folded: Option<PathBuf>,
}

impl RunArgs {
    pub fn program(&self) -> PathBuf {
        PathBuf::from(&self.command[0])
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn thresholds_out_of_range_are_refused() {
        let err = Cli::try_parse_from(["loopguard", "attach", "--pid", "1", "--threshold-ms", "0"])
            .unwrap_err();
        assert!(err.to_string().contains("threshold-ms"), "{err}");
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "loopguard",
            "run",
            "--fail-on-stall",
            "--",
            "app",
            "--port",
            "1",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!()
        };
        assert!(run.fail_on_stall);
        assert_eq!(run.command, ["app", "--port", "1"]);
    }

    #[test]
    fn help_teaches_with_examples() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("EXAMPLES:") && help.contains("loopguard attach --pid 1234"),
            "{help}"
        );
    }
}
