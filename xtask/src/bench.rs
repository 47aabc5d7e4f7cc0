//! `cargo xtask bench`: what attaching loopguard costs the example service.
//!
//! For each endpoint type (trivial, 1 ms of CPU work, a 4 KiB JSON document)
//! and each load mode (saturation with wrk, a fixed moderate rate with oha),
//! the server is measured unattached and attached, interleaved in one run
//! (the order alternates round to round, ABBA, to cancel drift), and the
//! medians of the per-round ratios are compared with issue #7's targets.
//! `--soak-minutes` then checks the agent's memory over a longer run.
//! `--python` compares loopguard with fastapi-loopguard on a `FastAPI` app
//! instead (`python.rs`).

mod agent;
mod attach_time;
mod load;
mod parts;
mod python;
mod report;
mod scrape;
mod soak;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::example::Example;
use crate::{build, cmd, setup};
use agent::Agent;
use load::Sample;

/// The agent's threshold while measuring: far above any request here, so
/// the cost measured is the probes', not stall reporting's.
const THRESHOLD_MS: u64 = 1_000;

#[derive(clap::Args)]
#[command(after_long_help = "\
What it does:
  Builds the agent and the example in release, starts the example pinned to
  --server-cpus with --workers Tokio workers, warms each endpoint up, then for
  each round, endpoint and mode measures the server unattached, at the floor
  and attached (one agent per round, endpoint and variant), reversing the
  order every other round. Saturation: wrk -t1 -c16 --latency. Fixed rate:
  oha -q RATE --latency-correction (latency counted from when each request
  was due).

The floor: the poll floor, the poll probes alone with programs that
  return at their first instruction, and an agent that reads nothing
  (`attach --bench-empty-programs --wait-probes off --no-stacks
  --no-requests`, plus any --floor-arg): the kernel entries the design
  cannot do without. attached / floor is what loopguard adds on top;
  floor / unattached is what the kernel charges for entering the probes.
  --parts splits what is added into its parts.
  Server µs/request (its CPU time per request served) shows the cost where
  it lands even when the load generator, not the server, is the limit.

Why pinning: on a 2-core machine, a server, load generator and agent that
  share cores make the ratios swing by ±15 %. The server gets CPU 0,
  wrk/oha and the agent CPU 1. The agent's probes run in the server's
  threads, so their cost shows on the server's core as it would in
  production; the agent's own CPU competes with the load generator.

Targets (issue #18): throughput ≥ 0.90 on trivial at saturation with
  requests named (≥ 0.97 with --agent-arg=--no-requests), ≥ 0.99 on the 1 ms
  endpoint, p99 latency ≤ +10 %. A MISS is reported, not an error; only the
  soak's memory check fails the command.

Python mode (--python, issue #27): the same FastAPI app
  (examples/loop-servers/fastapi_app.py) under uvicorn, four processes at
  once on --server-cpus: bare; loopguard-asgi with the agent attached
  (`attach --threshold-ms 50`, as users run it); loopguard-asgi with no
  agent (the middleware's own cost); fastapi-loopguard 0.9.0 with its
  defaults. Each round loads them one after another in a rotating order:
  /fast at saturation (wrk) and at a fixed rate (oha). Any report made
  meanwhile is a false alarm. Then it injects blocks into the two watched
  apps (time.sleep and a CPU loop, 100 and 200 ms, each beside two
  requests suspended on `await asyncio.sleep` and /fast traffic) and reads
  the agent's JSON events and fastapi-loopguard's warnings from the app's
  stderr: recall, duration error against the endpoint's own timing,
  whether the culprit is named (fastapi-loopguard by the x-request-id it
  answered with), bystanders blamed. One table, both tools side by side,
  then one summary line per row. --endpoints, --workers, the floor, the
  soak, --scrape-every-ms and --attach-only do not apply.

Needs root (it loads eBPF programs): sudo -E cargo xtask bench
  [--python]")]
#[expect(
    clippy::struct_excessive_bools,
    reason = "clap flags, each independent"
)]
pub struct Options {
    /// Seconds of load per measurement [default: 10, or 3 with --quick].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    seconds: Option<u64>,
    /// Rounds, each measuring every endpoint and mode unattached and attached; medians are over rounds [default: 3, or 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// A short smoke run: 3 s per measurement, 1 round (--seconds and --rounds still win).
    #[arg(long)]
    quick: bool,
    /// Endpoint types to load, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = [Endpoint::Trivial, Endpoint::Work, Endpoint::Json]
    )]
    endpoints: Vec<Endpoint>,
    /// Fixed rate in requests/s for the moderate-rate mode, the same for every endpoint [default: a quarter of the unattached saturation throughput measured for that endpoint in round 1: a service at a moderate load, which the attached server still keeps up with].
    #[arg(long, value_name = "REQ_PER_SEC", value_parser = positive_rate)]
    rate: Option<f64>,
    /// Connections the load generator keeps open.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// CPUs the example server runs on (a taskset list: 0, 0-1, 0,2).
    #[arg(long, value_name = "CPUS", default_value = "0")]
    server_cpus: String,
    /// Tokio worker threads of the example server.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// CPUs wrk and oha run on (keep them off the server's).
    #[arg(long, value_name = "CPUS", default_value = "1")]
    load_cpus: String,
    /// CPUs the agent runs on (its probes still run in the server's threads).
    #[arg(long, value_name = "CPUS", default_value = "1")]
    agent_cpus: String,
    /// Extra argument for `loopguard attach`, repeatable: `--agent-arg=--no-requests`
    /// measures the agent without the request probes.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Serve metrics from the attached agent (`--metrics-addr`) and scrape
    /// `/metrics` every MS milliseconds while it is attached, as a Prometheus
    /// would: measures what being scraped costs.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..))]
    scrape_every_ms: Option<u64>,
    /// Extra argument for the floor's agent only, repeatable:
    /// `--floor-arg=--bench-entry-only` measures the floor without the poll
    /// return probes (what an entry-only design would pay the kernel).
    #[arg(long = "floor-arg", value_name = "ARG", allow_hyphen_values = true)]
    floor_args: Vec<String>,
    /// Skip the floor: by default every round also measures the same probe
    /// sites with empty programs attached, to tell the kernel's entry cost
    /// from loopguard's own work.
    #[arg(long)]
    no_floor: bool,
    /// Also write every measurement, the medians and the soak's samples as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// After the comparison, keep one agent attached for MINUTES under a moderate mixed load of the endpoints (each at its fixed rate divided by their number), sampling its RSS every 10 s. Fails if RSS exceeds 64 MiB, or grows by more than 1 MiB a minute after the first minute.
    #[arg(long, value_name = "MINUTES", value_parser = clap::value_parser!(u32).range(1..))]
    soak_minutes: Option<u32>,
    /// Only measure how long attaching to and detaching from
    /// `examples/many-futures` (hundreds of poll functions) takes, once per
    /// round (--rounds, --agent-arg apply); no load.
    #[arg(long)]
    attach_only: bool,
    /// Compare loopguard (loopguard-asgi + the agent) with fastapi-loopguard 0.9.0 on a `FastAPI` app: recall, duration error, culprits, false alarms, throughput (see below).
    #[arg(long, conflicts_with_all = [
        "endpoints", "workers", "floor_args", "no_floor", "scrape_every_ms",
        "soak_minutes", "attach_only", "parts",
    ])]
    python: bool,
    /// Instead of the comparison, measure what each part costs, in one run:
    /// the poll floor, then the program bodies, the wait path, stacks, the
    /// request probes (the default) and a scrape a second, each added to
    /// the one before; at saturation, on --endpoints and on --servers.
    #[arg(long)]
    parts: bool,
    /// Real servers for --parts, installed from crates.io into
    /// target/bench-servers the first time (symbols kept; several minutes
    /// each on two cores).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        parts::RealServer::StaticWebServer,
        parts::RealServer::Dufs,
        parts::RealServer::Miniserve,
    ], requires = "parts")]
    servers: Vec<parts::RealServer>,
    /// --parts on the example only, without installing a real server.
    #[arg(long, requires = "parts")]
    no_servers: bool,
    /// --parts measures only these rungs (comma-separated), besides the
    /// server unattached. `--rungs floor,default --rounds 20 --seconds 2`
    /// places the default against the floor on a server that wanders, from
    /// many rounds' own ratios [default: all].
    #[arg(long, value_delimiter = ',', requires = "parts", value_parser = clap::builder::PossibleValuesParser::new(parts::RUNG_KEYS))]
    rungs: Vec<String>,
}

/// The floor: the poll probes alone, with programs that return at once.
/// No wait path, stacks or request probes: what the design cannot do
/// without (a kernel entry on each poll's entry and return).
const POLL_FLOOR_ARGS: [&str; 5] = [
    "--bench-empty-programs",
    "--wait-probes",
    "off",
    "--no-stacks",
    "--no-requests",
];

/// The default fixed rate as a share of unattached saturation. Half was
/// too close to the attached server's capacity: its p99 then measured
/// queueing, not the probes.
const MODERATE_SHARE: f64 = 0.25;

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(rate),
        _ => Err("a rate of at least 1 request/s".to_owned()),
    }
}

/// The endpoint types of issue #7.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum Endpoint {
    /// `/fast`: answers at once.
    Trivial,
    /// `/work?ms=1`: 1 ms of CPU work on the worker.
    Work,
    /// `/json?kb=4`: builds and serializes a 4 KiB JSON document.
    Json,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Self::Trivial => "trivial",
            Self::Work => "work",
            Self::Json => "json",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Self::Trivial => "/fast",
            Self::Work => "/work?ms=1",
            Self::Json => "/json?kb=4",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Mode {
    /// As fast as the server answers (wrk).
    Saturation,
    /// A fixed moderate rate (oha).
    Rate,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Saturation => "saturation",
            Self::Rate => "fixed rate",
        }
    }
}

/// What the server runs with during a measurement.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Variant {
    /// No probes.
    Unattached,
    /// The same probe sites with programs that return at once and an agent
    /// that reads nothing (`attach --bench-empty-programs`): what the
    /// kernel's probe entries cost by themselves.
    Floor,
    /// loopguard as users run it.
    Attached,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unattached => "unattached",
            Self::Floor => "floor",
            Self::Attached => "attached",
        }
    }
}

/// One run of load: what the load generator saw, and the agent's share.
pub struct Measurement {
    pub round: u32,
    pub endpoint: Endpoint,
    pub mode: Mode,
    pub variant: Variant,
    /// The requested rate (fixed-rate mode only).
    pub rate: Option<f64>,
    pub sample: Sample,
    /// The server's CPU over the run, in % of one core.
    pub server_cpu_pct: f64,
    /// The server's CPU time per request served, in µs.
    pub server_us_per_request: f64,
    /// Agent CPU over the run, in % of one core (attached only).
    pub agent_cpu_pct: Option<f64>,
    /// Agent memory at the end of the run (attached only).
    pub agent_memory: Option<agent::Memory>,
}

/// A fixed-rate run that served less than this share of the rate fell
/// behind: its latencies are mostly queueing.
const OVERLOAD_BELOW: f64 = 0.95;

impl Measurement {
    /// The server did not keep up with the fixed rate.
    pub fn overloaded(&self) -> bool {
        self.rate
            .is_some_and(|rate| self.sample.rps < OVERLOAD_BELOW * rate)
    }

    fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "endpoint": self.endpoint.name(),
            "path": self.endpoint.path(),
            "mode": self.mode.name(),
            "variant": self.variant.name(),
            "attached": self.variant == Variant::Attached,
            "rate": self.rate,
            "sample": self.sample.to_json(),
            "server_cpu_pct": self.server_cpu_pct,
            "server_us_per_request": self.server_us_per_request,
            "overloaded": self.overloaded(),
            "agent_cpu_pct": self.agent_cpu_pct,
            "agent_rss_kib": self.agent_memory.map(|m| m.rss_kib),
            "agent_hwm_kib": self.agent_memory.map(|m| m.hwm_kib),
        })
    }
}

/// What a run is set to, after --quick.
pub struct Plan {
    pub seconds: u64,
    pub rounds: u32,
    pub endpoints: Vec<Endpoint>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the benchmark attaches eBPF programs and needs root: run `sudo -E cargo xtask bench`"
        );
    }
    check_cpus(options)?;
    let plan = plan(options);
    if options.python {
        return python::run(options, &plan);
    }
    let binaries = build::build_all()?;
    if options.attach_only {
        return attach_time::run(
            &binaries.loopguard,
            &binaries.many_futures,
            &options.agent_args,
            plan.rounds,
        );
    }
    let mut server_command = Command::new("taskset");
    server_command
        .args(["-c", &options.server_cpus])
        .arg(&binaries.stall_server)
        .args(["--workers", &options.workers.to_string()]);
    let server = Example::spawn(server_command)?;
    let base = format!("http://{}", server.addr);
    if options.parts {
        return run_parts(options, &plan, &binaries.loopguard, server.pid(), &base);
    }
    let oha = setup::install_oha()?;
    eprintln!(
        "bench: stall-server pid {} on {} ({} worker(s), CPUs {}); load on CPUs {}, agent on CPUs {}; {} round(s) of {} s",
        server.pid(),
        server.addr,
        options.workers,
        options.server_cpus,
        options.load_cpus,
        options.agent_cpus,
        plan.rounds,
        plan.seconds,
    );
    let setting = Setting {
        options,
        plan: &plan,
        loopguard: &binaries.loopguard,
        oha: &oha,
        server_pid: server.pid(),
        base: &base,
    };
    let results = compare(&setting)?;
    let comparison = report::Comparison::new(
        &results.measurements,
        &plan.endpoints,
        (
            cpu_set(&options.server_cpus).len(),
            cpu_set(&options.load_cpus).len(),
        ),
        !options.agent_args.iter().any(|arg| arg == "--no-requests"),
    );
    print!("{}", comparison.render(options, &plan, &results));

    let soak = match options.soak_minutes {
        Some(minutes) => Some(soak::run(&soak::Setup {
            options,
            loopguard: &binaries.loopguard,
            oha: &oha,
            server_pid: server.pid(),
            base: &base,
            endpoints: &plan.endpoints,
            rates: &results.rates,
            minutes,
        })?),
        None => None,
    };
    drop(server);

    if let Some(path) = &options.json {
        let document = json!({
            "config": config_json(options, &plan, &results.rates),
            "measurements": results.measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
            "medians": comparison.to_json(),
            "agent_attach_s": results.attach_secs,
            "agent_summaries": results.summaries,
            "soak": soak.as_ref().map(soak::Report::to_json),
        });
        write_json(path, &document)?;
        eprintln!("bench: wrote {}", path.display());
    }
    if let Some(soak) = soak {
        print!("{}", soak.render());
        soak.verdict()?;
    }
    Ok(())
}

/// `--parts`: the ladder of parts on the example (pid `example_pid` at
/// `base`) and the real servers.
fn run_parts(
    options: &Options,
    plan: &Plan,
    loopguard: &Path,
    example_pid: u32,
    base: &str,
) -> anyhow::Result<()> {
    parts::run(&parts::Setup {
        loopguard,
        example_pid,
        example_base: base,
        endpoints: &plan.endpoints,
        servers: if options.no_servers {
            &[]
        } else {
            &options.servers
        },
        server_cpus: &options.server_cpus,
        load_cpus: &options.load_cpus,
        agent_cpus: &options.agent_cpus,
        seconds: plan.seconds,
        rounds: plan.rounds,
        connections: options.connections,
        rungs: &options.rungs,
    })
}

/// What every measurement shares.
struct Setting<'a> {
    options: &'a Options,
    plan: &'a Plan,
    loopguard: &'a Path,
    oha: &'a Path,
    server_pid: u32,
    base: &'a str,
}

/// Everything the interleaved rounds produced.
pub struct Results {
    pub measurements: Vec<Measurement>,
    /// The agents' `summary` lines, one per attach.
    pub summaries: Vec<Value>,
    /// How long each attach took, in seconds.
    pub attach_secs: Vec<f64>,
    /// The fixed rate used for each endpoint.
    pub rates: BTreeMap<Endpoint, f64>,
}

/// Warms up, then the rounds: for each endpoint, unattached and attached
/// (one agent for both modes), the order alternating round to round.
fn compare(setting: &Setting) -> anyhow::Result<Results> {
    let (options, plan) = (setting.options, setting.plan);
    let warm_up = if options.quick { 1 } else { 2 };
    for &endpoint in &plan.endpoints {
        eprintln!("bench: warming up {} for {warm_up} s", endpoint.path());
        load::wrk(
            &options.load_cpus,
            &format!("{}{}", setting.base, endpoint.path()),
            warm_up,
            options.connections,
        )?;
    }
    let started = Instant::now();
    let mut results = Results {
        measurements: Vec::new(),
        summaries: Vec::new(),
        attach_secs: Vec::new(),
        rates: BTreeMap::new(),
    };
    if let Some(rate) = options.rate {
        let endpoints = plan.endpoints.iter();
        results
            .rates
            .extend(endpoints.map(|&endpoint| (endpoint, rate)));
    }
    for round in 1..=plan.rounds {
        // ABBA: round 1 unattached first (it sets the default rates), round
        // 2 attached first, ...; the floor sits between them.
        let mut order = vec![Variant::Unattached, Variant::Floor, Variant::Attached];
        if options.no_floor {
            order.retain(|&variant| variant != Variant::Floor);
        }
        if round % 2 == 0 {
            order.reverse();
        }
        for &endpoint in &plan.endpoints {
            for &variant in &order {
                let agent = match variant {
                    Variant::Unattached => None,
                    Variant::Floor => Some(Agent::attach(
                        setting.loopguard,
                        setting.server_pid,
                        &options.agent_cpus,
                        THRESHOLD_MS,
                        &POLL_FLOOR_ARGS
                            .iter()
                            .map(|&arg| arg.to_owned())
                            .chain(options.floor_args.iter().cloned())
                            .collect::<Vec<_>>(),
                        None,
                    )?),
                    Variant::Attached => {
                        let agent = Agent::attach(
                            setting.loopguard,
                            setting.server_pid,
                            &options.agent_cpus,
                            THRESHOLD_MS,
                            &options.agent_args,
                            options
                                .scrape_every_ms
                                .map(std::time::Duration::from_millis),
                        )?;
                        results.attach_secs.push(agent.attach_secs);
                        Some(agent)
                    }
                };
                for mode in [Mode::Saturation, Mode::Rate] {
                    let measurement = measure(
                        setting,
                        (round, endpoint, mode, variant),
                        agent.as_ref(),
                        &results.rates,
                    )?;
                    if mode == Mode::Saturation && variant == Variant::Unattached {
                        results
                            .rates
                            .entry(endpoint)
                            .or_insert_with(|| (measurement.sample.rps * MODERATE_SHARE).max(1.0));
                    }
                    eprintln!("bench: {}", report::progress_line(&measurement, plan));
                    results.measurements.push(measurement);
                }
                if let Some(agent) = agent {
                    let summary = agent.detach()?;
                    if variant == Variant::Attached {
                        results.summaries.push(summary);
                    }
                }
            }
        }
    }
    eprintln!(
        "bench: comparison done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(results)
}

fn config_json(options: &Options, plan: &Plan, rates: &BTreeMap<Endpoint, f64>) -> Value {
    json!({
        "seconds": plan.seconds,
        "rounds": plan.rounds,
        "endpoints": plan.endpoints.iter().map(|e| json!({ "name": e.name(), "path": e.path() })).collect::<Vec<_>>(),
        "connections": options.connections,
        "workers": options.workers,
        "server_cpus": options.server_cpus,
        "load_cpus": options.load_cpus,
        "agent_cpus": options.agent_cpus,
        "threshold_ms": THRESHOLD_MS,
        "agent_args": options.agent_args,
        "floor": !options.no_floor,
        "floor_args": options.floor_args,
        "rates": rates.iter().map(|(e, r)| (e.name().to_owned(), json!(r))).collect::<serde_json::Map<_, _>>(),
        "oha": setup::OHA_VERSION,
        "online_cpus": cmd::output(&mut Command::new("nproc")).trim(),
        "kernel": cmd::output(Command::new("uname").arg("-r")).trim(),
    })
}

fn plan(options: &Options) -> Plan {
    let mut endpoints = options.endpoints.clone();
    endpoints.sort();
    endpoints.dedup();
    Plan {
        seconds: options
            .seconds
            .unwrap_or(if options.quick { 3 } else { 10 }),
        rounds: options.rounds.unwrap_or(if options.quick { 1 } else { 3 }),
        endpoints,
    }
}

/// One run of load at `(round, endpoint, mode)`, with the agent's CPU
/// over it and its memory at the end when one is attached.
fn measure(
    setting: &Setting,
    (round, endpoint, mode, variant): (u32, Endpoint, Mode, Variant),
    agent: Option<&Agent>,
    rates: &BTreeMap<Endpoint, f64>,
) -> anyhow::Result<Measurement> {
    let options = setting.options;
    let url = format!("{}{}", setting.base, endpoint.path());
    let cpu_before = agent.map(Agent::cpu_seconds);
    let server_before = agent::cpu_seconds(setting.server_pid);
    let start = Instant::now();
    let (sample, rate) = match mode {
        Mode::Saturation => (
            load::wrk(
                &options.load_cpus,
                &url,
                setting.plan.seconds,
                options.connections,
            )?,
            None,
        ),
        Mode::Rate => {
            let rate = *rates
                .get(&endpoint)
                .context("no rate yet: round 1 measures unattached first")?;
            let sample = load::oha(
                setting.oha,
                &options.load_cpus,
                &url,
                setting.plan.seconds,
                options.connections,
                rate,
            )?;
            (sample, Some(rate))
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let server_cpu_s = agent::cpu_seconds(setting.server_pid) - server_before;
    let server_cpu_pct = 100.0 * server_cpu_s / wall;
    let served = sample.rps * wall;
    let agent_cpu_pct = agent
        .zip(cpu_before)
        .map(|(agent, before)| 100.0 * (agent.cpu_seconds() - before) / wall);
    Ok(Measurement {
        round,
        endpoint,
        mode,
        variant,
        rate,
        server_us_per_request: if served > 0.0 {
            1e6 * server_cpu_s / served
        } else {
            f64::NAN
        },
        sample,
        server_cpu_pct,
        agent_cpu_pct,
        agent_memory: agent.map(Agent::memory),
    })
}

/// Fails early, naming the option, when a CPU list cannot be used, and
/// warns when the server shares a CPU with the load or the agent.
fn check_cpus(options: &Options) -> anyhow::Result<()> {
    let online = cmd::output(&mut Command::new("nproc")).trim().to_owned();
    for (flag, cpus) in [
        ("--server-cpus", &options.server_cpus),
        ("--load-cpus", &options.load_cpus),
        ("--agent-cpus", &options.agent_cpus),
    ] {
        if !cmd::succeeds(Command::new("taskset").args(["-c", cpus, "true"])) {
            bail!(
                "{flag} {cpus}: taskset cannot run a command there (this machine has {online} CPU(s), numbered from 0; `taskset` is in util-linux)"
            );
        }
    }
    let server = cpu_set(&options.server_cpus);
    for (what, cpus) in [("load", &options.load_cpus), ("agent", &options.agent_cpus)] {
        if cpu_set(cpus).iter().any(|cpu| server.contains(cpu)) {
            eprintln!(
                "bench: warning: the {what} shares CPUs with the server ({cpus} vs {}): expect noisy ratios",
                options.server_cpus
            );
        }
    }
    Ok(())
}

fn cpu_set(list: &str) -> Vec<usize> {
    list.split(',')
        .filter_map(|part| {
            let part = part.trim();
            let (low, high) = part.split_once('-').unwrap_or((part, part));
            Some(low.parse::<usize>().ok()?..=high.parse::<usize>().ok()?)
        })
        .flatten()
        .collect()
}

fn write_json(path: &Path, document: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(document)?;
    std::fs::write(path, text + "\n").with_context(|| format!("failed to write {}", path.display()))
}

/// The median; the mean of the middle two for an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    } else {
        sorted[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn cpu_sets() {
        assert_eq!(cpu_set("0"), vec![0]);
        assert_eq!(cpu_set("0-2,5"), vec![0, 1, 2, 5]);
        assert!(cpu_set("x").is_empty());
    }
}
