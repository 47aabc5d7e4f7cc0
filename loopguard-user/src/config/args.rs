//! Command-line interface: `loopguard attach` and `loopguard run`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::detect::FailOn;
use crate::present::text::Format;
use crate::term::ColorChoice;

const EXAMPLES: &str = "\
EXAMPLES:
  sudo loopguard attach --pid 1234
      Report every task poll that blocks a worker of pid 1234 for 50 ms or more.
  sudo loopguard attach --pid \"$(pgrep -n my-service)\" --threshold-ms 20 --format json
      One JSON object per line, for scripts (types: attached, stall_in_progress, stall,
      cumulative, threshold, summary; docs/EVENTS.md).
  sudo loopguard attach --pid 1234 --duration 60
      Watch for a minute, then print the summary and detach.
  sudo loopguard attach --pid 1234 --metrics-addr 9464
      Also serve Prometheus metrics at http://127.0.0.1:9464/metrics (loopguard_*).
  sudo loopguard run --fail-on stall,cumulative -- ./target/release/my-service --port 8080
      Start the service with the probes already in place; exit with its exit code,
      or 3 if any poll stalled or short blocks added up (a CI guard against blocking
      code on the runtime); the offending events are listed together at the end.
  sudo loopguard attach --pid 1234 --adaptive
      Let the threshold follow 4 x the p99 of this process's own polls (20..250 ms).
  sudo loopguard attach --pid 1234 --cumulative-budget-ms 100 --exclude-routes '/health,/internal/*'
      Alert when polls of 10 ms or more add up to over 100 ms in any second, except on those routes.
  sudo loopguard attach --pid 1234 --record run.jsonl
  loopguard report run.jsonl --html run.html
      Keep every event in a file while the terminal shows text; show it again
      later, or as a page with a timeline of the stalls.
  sudo loopguard attach --pid 1234 --config loopguard.toml
  loopguard config loopguard.toml --adaptive
      Every setting is a flag and a key in a TOML file; flags win. `config` prints the result.

OUTPUT:
  STALL IN PROGRESS  a poll has been running longer than the threshold (reported once, ~5 ms after crossing it)
  STALL              a poll that blocked its thread returned; its full duration
  CUMULATIVE         polls under the threshold added up to over the budget in a window
                     (per thread or process; the tasks and routes that blocked, worst first)
  THRESHOLD          the adaptive threshold moved by more than 10 %
  Ctrl+C or SIGTERM detaches cleanly (the target keeps running) and prints a summary.

EXIT CODES:
  0 ok   1 runtime failure   2 bad arguments or configuration   3 --fail-on saw what it names
  4 the target cannot be profiled (no such pid, not Tokio, stripped)   5 privileges or kernel
  `loopguard run` exits with the command's own exit code (128+N if signal N ended it),
  or 3 as above; its own failures use 125 (loopguard failed: bad arguments, cannot
  attach, privileges), 126 (command not executable), 127 (command not found).";

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
    /// Watch every event loop on the host (Tokio, Python, Node) that the
    /// selectors match, as processes come and go; one /metrics for all.
    #[command(after_help = WATCH_EXAMPLES)]
    Watch(HostArgs),
    /// Print the effective configuration (defaults, then FILE, then flags) as TOML.
    Config(ConfigArgs),
    /// Show a recording (`--record FILE.jsonl`) again: its summary, its
    /// lines, or an HTML page of it.
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
}

const REPORT_EXAMPLES: &str = "\
EXAMPLES:
  sudo loopguard attach --pid 1234 --duration 600 --record soak.jsonl
  loopguard report soak.jsonl
      The summary the run printed at its end.
  loopguard report soak.jsonl --lines
      Every stall and alert line as the run printed it, then the summary.
  loopguard report soak.jsonl --html soak.html
      One self-contained page (no network): stalls per thread over time with
      their requests and stacks, the poll-duration histogram, routes ranked by
      stall time, cumulative alerts.";

const WATCH_EXAMPLES: &str = "\
EXAMPLES:
  sudo loopguard watch --all --metrics-addr 0.0.0.0:9464
      Every Tokio, Python and Node process on the host, running now or started
      later; one /metrics whose series carry service, container_id, container,
      namespace and pod (never the pid).
  sudo loopguard watch --all --runtime python --container 'shop-*' --service-map 'python3*=checkout'
      Only Python processes in containers named shop-*, reported as service checkout.
  sudo loopguard watch --all --exe 'api-*' --cgroup '/system.slice/*'
      Only programs named api-* run by systemd services.

A process that matches but cannot be watched (stripped, too old a Tokio) is
named once with why, and counted in loopguard_host_skipped_total{reason}.
Past --max-targets, --max-probes or --max-memory-mib, processes are not
watched, said once.
The selectors, --service-map and the budget are also keys of the
configuration file's [host] table (--config FILE; flags win), e.g.
  [host]
  container = [\"shop-*\"]
  service_map = [\"python3*=checkout\", \"container:shop-web=web\"]
  max_targets = 32";

/// `loopguard watch --all`: the host's event loops.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// Every process on the host that the selectors match (all of them
    /// without selectors), already running or started later.
    #[arg(long, required = true)]
    pub all: bool,
    /// Only executables whose name matches GLOB (or whose path does, for a
    /// GLOB with a `/`); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exe: Vec<String>,
    /// Only processes whose cgroup path matches GLOB; repeatable.
    #[arg(long, value_name = "GLOB")]
    pub cgroup: Vec<String>,
    /// Only processes in a container whose name or id matches GLOB; repeatable.
    #[arg(long, value_name = "GLOB")]
    pub container: Vec<String>,
    /// Only these runtimes [default: tokio,python,node].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "RUNTIMES")]
    pub runtime: Vec<crate::discover::identity::runtime::Runtime>,
    /// Name the service of executables (or, with `container:`, of
    /// containers) matching PATTERN; the first rule that matches wins over
    /// `LOOPGUARD_SERVICE` / `OTEL_SERVICE_NAME` and the executable's name.
    #[arg(long, value_name = "PATTERN=SERVICE")]
    pub service_map: Vec<crate::discover::identity::service::ServiceRule>,
    /// Targets watched at once; past it, processes are not watched (said once).
    /// Each target costs the agent about 12 MiB (its own programs and
    /// maps, 6 MiB of them, charged to the agent's cgroup; its collector
    /// and unwind tables; see --max-memory-mib), and a `sched_switch`
    /// program run on every context switch [default: 64].
    #[arg(long, value_name = "N")]
    pub max_targets: Option<usize>,
    /// uprobes held in all targets at once [default: 20000].
    #[arg(long, value_name = "N")]
    pub max_probes: Option<usize>,
    /// The agent's memory (resident, MiB) past which no new target is
    /// watched (said once): a target costs about 12 MiB. Set it at or
    /// below the agent's cgroup limit, so a busy node gets a message
    /// rather than an OOM kill [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub max_memory_mib: Option<usize>,
    /// Seconds a gone target's series stay in /metrics [default: 300].
    #[arg(long, value_name = "SECS")]
    pub series_grace_s: Option<u64>,
    #[command(flatten)]
    pub watch: WatchArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The recording (JSON lines, as `--record` or `--format json` wrote them).
    #[arg(value_name = "FILE.jsonl")]
    pub file: PathBuf,
    /// Also print every stall and alert line before the summary.
    #[arg(long)]
    pub lines: bool,
    /// Write an HTML page of the recording here.
    #[arg(long, value_name = "OUT.html")]
    pub html: Option<PathBuf>,
    /// Colour the labels [default: auto: on a terminal, unless `NO_COLOR` is set].
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, hide_default_value = true)]
    pub color: ColorChoice,
}

/// Where the run's output goes besides stdout, and how it looks.
#[derive(Debug, Args, Clone, Default)]
pub struct OutputArgs {
    /// Also write every event as a JSON line to this file, whatever
    /// --format shows (`loopguard report FILE` shows it again).
    #[arg(long, value_name = "FILE.jsonl")]
    pub record: Option<PathBuf>,
    /// Colour the labels [default: auto: on a terminal, unless `NO_COLOR` is
    /// set]. On a terminal, stderr also shows a live status line.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, hide_default_value = true)]
    pub color: ColorChoice,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The TOML file to read (as `--config FILE`).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// As for `run`: what makes it fail.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "KINDS")]
    pub fail_on: Option<Vec<FailOn>>,
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// A pid: a positive number. A negative one gets a hint (`kill -PGID`
/// habits, or a shell variable that held an error code).
fn parse_pid(text: &str) -> Result<u32, String> {
    match text.trim().parse::<i64>() {
        Ok(pid) if pid < 0 => Err(format!(
            "a pid is a positive number, not {pid}: loopguard watches one process (not a process group, as `kill -{}` would mean); find it with `pgrep -a NAME` and pass --pid {}",
            pid.unsigned_abs(),
            pid.unsigned_abs()
        )),
        Ok(0) => Err("pid 0 is not a process; find the pid with `pgrep -a NAME`".to_owned()),
        Ok(pid) => u32::try_from(pid).map_err(|_| format!("{pid} is larger than any pid")),
        Err(_) => Err(format!(
            "`{text}` is not a pid (a positive number); find it with `pgrep -a NAME`"
        )),
    }
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Process id of the Tokio program to watch.
    #[arg(long, short, allow_negative_numbers = true, value_parser = parse_pid)]
    pub pid: u32,
    #[command(flatten)]
    pub watch: WatchArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Benchmark floor (`cargo xtask bench`): attach the same probes with
    /// programs that return at once, and read nothing, so what remains is
    /// the kernel's cost of entering them.
    #[arg(long, hide = true)]
    pub bench_empty_programs: bool,
    /// Benchmark floor without the poll return probes: what an entry-only
    /// design would pay the kernel (only with --bench-empty-programs).
    #[arg(long, hide = true, requires = "bench_empty_programs")]
    pub bench_entry_only: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Exit with code 3 when any of these was seen and the command itself
    /// succeeded, listing them together at the end (e.g. `stall,cumulative`).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "KINDS")]
    pub fail_on: Option<Vec<FailOn>>,
    /// Same as `--fail-on stall`.
    #[arg(long, conflicts_with = "fail_on")]
    pub fail_on_stall: bool,
    /// Watch the command only, not the programs it starts (by default every
    /// Tokio program the command or its descendants exec is attached to,
    /// stopped at exec until its probes are in).
    #[arg(long)]
    pub no_follow: bool,
    /// Run the command as this user (a name or a numeric uid) instead of
    /// the one who ran sudo.
    #[arg(long, value_name = "USER", conflicts_with = "as_root")]
    pub user: Option<String>,
    /// Run the command as root. By default, under sudo, it runs as the user
    /// who ran sudo (`SUDO_UID`, `SUDO_GID`).
    #[arg(long)]
    pub as_root: bool,
    #[command(flatten)]
    pub watch: WatchArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Flags that map to configuration keys. Each is optional: a flag given
/// wins over `--config FILE`, which wins over the default (`config`).
#[derive(Debug, Args, Clone, Default)]
pub struct WatchArgs {
    /// Read settings from this TOML file (`loopguard config FILE` prints what it gives).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A poll that keeps its thread at least this long (ms) is a stall [default: 50].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub threshold_ms: Option<u64>,
    /// Output format on stdout [default: text]. Under `run` the command
    /// writes to the same stdout, so a JSON line can follow its unfinished
    /// line; `--record FILE` gets the events alone.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Stop by itself after this many seconds (`run`: SIGTERM the command then;
    /// dying of that SIGTERM counts as success).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    /// Where a stall's request comes from: `table` reads loopguard-middleware's
    /// in-flight table from the target's memory when a stall is seen (no
    /// probe per request; victims are those the table still shows, a lower
    /// bound under heavy load; no request counters or
    /// `loopguard_requests_started_total`), `probes` attaches to its two USDT
    /// probes (two kernel entries per request, the largest part of the cost
    /// on a trivial endpoint; exact victim counts and per-route request
    /// counters), `off` names no request [default: table].
    #[arg(long, value_enum, conflicts_with = "no_requests")]
    pub requests: Option<crate::attach::RequestSource>,
    /// `--requests off`.
    #[arg(long)]
    pub no_requests: bool,
    /// How often (ms) in-flight polls are checked for stalls still in progress, while one may
    /// be stuck (the kernel says when a poll or busy stretch has run half the report floor, or
    /// sleeps); otherwise every 100 ms [default: 5].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub scan_interval_ms: Option<u64>,
    /// Route globs that raise no alert and are left out of rankings (still
    /// counted), comma-separated; replaces the default list; '' for none
    /// [default: /health,/healthz,/ready,/metrics].
    #[arg(long, value_delimiter = ',', value_name = "GLOBS")]
    pub exclude_routes: Option<Vec<String>>,
    /// How event-loop waits are seen: `switch` on the context-switch
    /// tracepoint (no probe per epoll wait; needs task polls to split a busy
    /// worker's time), `calls` on the entries of the C library's epoll
    /// wrappers plus the context-switch tracepoint for the calls that sleep
    /// (one kernel entry per wait), `uprobe` on their entries and returns
    /// (two; both cost nothing outside the target and miss programs that
    /// make the syscall themselves), `tracepoint` on every syscall's entry
    /// and exit (sees every wait, but runs for every process on the host),
    /// `auto` (`switch` for Tokio, else `calls` where the wrappers exist,
    /// else `tracepoint`), or `off` [default: auto].
    #[arg(long, value_enum)]
    pub wait_probes: Option<crate::attach::WaitProbes>,
    /// How the uprobes are attached: `multi` puts each program's probes in
    /// one `uprobe_multi` link (Linux 6.10+: attaching and detaching hundreds
    /// of probes takes a fraction of a second), `perf` one perf-event link
    /// per probe (any kernel; detaching takes about 0.1 s per probe), `auto`
    /// multi where the kernel has it [default: auto].
    #[arg(long, value_enum)]
    pub probe_links: Option<crate::attach::ProbeLinks>,
    /// Only threads with these names count as event loops (comma-separated;
    /// a trailing `*` matches a prefix: `node,python*`). By default every
    /// thread that waits for events in epoll or Tokio's park is one.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub loop_threads: Option<Vec<String>>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` while watching. A bare
    /// port (`9464`) binds 127.0.0.1 only; listening elsewhere is explicit
    /// (`0.0.0.0:9464`). Checked before anything is attached.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Route templates kept as metric labels; later ones are counted as
    /// `other`, so the number of series stays bounded [default: 200].
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub metrics_max_routes: Option<usize>,
    #[command(flatten)]
    pub adaptive: AdaptiveArgs,
    #[command(flatten)]
    pub cumulative: CumulativeArgs,
    #[command(flatten)]
    pub stacks: StackArgs,
}

/// Stack capture options (issue #14); keys of the `[stacks]` table:
/// `enabled`, `all_frames`, `folded`.
#[derive(Debug, Args, Clone, Default)]
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

/// The adaptive threshold (docs/THRESHOLDS.md).
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Adaptive threshold (docs/THRESHOLDS.md)")]
pub struct AdaptiveArgs {
    /// Threshold = clamp(multiplier x percentile of recent polls, floor, ceiling),
    /// instead of --threshold-ms (which applies until enough polls were seen).
    #[arg(long)]
    pub adaptive: bool,
    /// Percentile of recent worker polls taken as normal, 0.5..=0.999 [default: 0.99].
    #[arg(long, value_name = "Q")]
    pub adaptive_percentile: Option<f64>,
    /// How many times the percentile a poll must last to stall, > 1 [default: 4].
    #[arg(long, value_name = "X")]
    pub adaptive_multiplier: Option<f64>,
    /// Seconds of recent polls the percentile is taken over [default: 60].
    #[arg(long, value_name = "SECS")]
    pub adaptive_window_s: Option<u64>,
    /// Polls the window must hold before the rule takes over [default: 1000].
    #[arg(long, value_name = "N")]
    pub adaptive_min_samples: Option<u64>,
    /// Lowest threshold (ms) the rule picks [default: 20].
    #[arg(long, value_name = "MS")]
    pub adaptive_floor_ms: Option<u64>,
    /// Highest threshold (ms) the rule picks [default: 250].
    #[arg(long, value_name = "MS")]
    pub adaptive_ceiling_ms: Option<u64>,
}

/// The cumulative rule (docs/THRESHOLDS.md).
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Cumulative blocking (docs/THRESHOLDS.md)")]
pub struct CumulativeArgs {
    /// Turn the cumulative rule off.
    #[arg(long)]
    pub no_cumulative: bool,
    /// Shortest poll (ms) that counts toward the budget [default: 10].
    #[arg(long, value_name = "MS")]
    pub cumulative_floor_ms: Option<u64>,
    /// Sliding window (ms) the budget applies to [default: 1000].
    #[arg(long, value_name = "MS")]
    pub cumulative_window_ms: Option<u64>,
    /// Blocked time (ms) a window may hold without an alert [default: 200].
    #[arg(long, value_name = "MS")]
    pub cumulative_budget_ms: Option<u64>,
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
    fn negative_and_malformed_pids_get_a_hint() {
        for (pid, hint) in [
            ("-5", "a pid is a positive number, not -5"),
            ("-5", "--pid 5"),
            ("0", "pid 0 is not a process"),
            ("abc", "`abc` is not a pid"),
            ("99999999999", "larger than any pid"),
        ] {
            let err = Cli::try_parse_from(["loopguard", "attach", "--pid", pid]).unwrap_err();
            assert!(err.to_string().contains(hint), "{pid}: {err}");
        }
        let cli = Cli::try_parse_from(["loopguard", "attach", "--pid", "42"]).unwrap();
        let Command::Attach(attach) = cli.command else {
            panic!()
        };
        assert_eq!(attach.pid, 42);
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
    fn fail_on_takes_a_list_and_fail_on_stall_is_its_alias() {
        let cli = Cli::try_parse_from([
            "loopguard",
            "run",
            "--fail-on",
            "stall,cumulative",
            "--",
            "app",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!()
        };
        assert_eq!(run.fail_on, Some(vec![FailOn::Stall, FailOn::Cumulative]));
        let both = Cli::try_parse_from([
            "loopguard",
            "run",
            "--fail-on",
            "stall",
            "--fail-on-stall",
            "--",
            "app",
        ]);
        assert!(both.is_err());
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
