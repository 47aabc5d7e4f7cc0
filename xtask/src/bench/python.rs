//! `cargo xtask bench --python`: loopguard (the `loopguard-asgi` middleware
//! plus the agent) side by side with fastapi-loopguard 0.9.0 from `PyPI`,
//! on the same `FastAPI` app (`examples/loop-servers/fastapi_app.py`), the
//! same load, in one run.
//!
//! Four uvicorn processes serve the app at once, all pinned to the server
//! CPUs: bare, loopguard-asgi with the agent attached, loopguard-asgi alone
//! (no agent: the middleware's own cost), fastapi-loopguard. Each round
//! loads them one after another in a rotating order (saturation with wrk,
//! then a fixed rate with oha), so machine noise hits all alike; then it
//! injects blocks of known length (`time.sleep`, a CPU loop) into the two
//! watched apps while requests suspended on `await asyncio.sleep` and
//! `/fast` traffic are in flight, and reads what each tool reported.

mod score;
mod server;
mod table;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::agent::{self, Agent};
use super::load::{self, Sample};
use super::{MODERATE_SHARE, Mode, Options, Plan, write_json};
use crate::{build, setup};
use score::{Block, Report, Score};
use server::Uvicorn;

/// The agent's threshold: its default, and fastapi-loopguard's
/// `fallback_threshold_ms` (which its calibration may only lower).
const THRESHOLD_MS: u64 = 50;
/// The blocks injected each round, into each watched app: (endpoint, ms).
const BLOCKS: &[(&str, u64)] = &[("sleep", 100), ("spin", 100), ("sleep", 200), ("spin", 200)];
/// How long requests suspended on `await asyncio.sleep` are in flight
/// before a block starts.
const LEAD: Duration = Duration::from_millis(100);
/// After a block answered: time for the tools to report before the next.
const SETTLE: Duration = Duration::from_millis(400);
/// The pause between two `/fast` requests of the background traffic.
const TRAFFIC_PAUSE: Duration = Duration::from_millis(5);

/// The app as each variant runs it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Variant {
    Bare,
    /// loopguard-asgi with the agent attached: loopguard as users run it.
    Loopguard,
    /// loopguard-asgi with no agent: what the middleware alone costs.
    MiddlewareOnly,
    /// fastapi-loopguard 0.9.0 with its defaults.
    FastapiLoopguard,
}

pub const VARIANTS: [Variant; 4] = [
    Variant::Bare,
    Variant::Loopguard,
    Variant::MiddlewareOnly,
    Variant::FastapiLoopguard,
];

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Loopguard => "loopguard",
            Self::MiddlewareOnly => "asgi-no-agent",
            Self::FastapiLoopguard => "fastapi-loopguard",
        }
    }

    /// `LOOPGUARD_APP_MIDDLEWARE` for `fastapi_app.py`.
    fn middleware(self) -> &'static str {
        match self {
            Self::Bare => "none",
            Self::Loopguard | Self::MiddlewareOnly => "loopguard",
            Self::FastapiLoopguard => "fastapi-loopguard",
        }
    }
}

/// One slice of load on one variant.
pub struct Measurement {
    pub round: u32,
    pub variant: Variant,
    pub mode: Mode,
    pub rate: Option<f64>,
    pub sample: Sample,
    /// The server's CPU time per request served, in µs.
    pub server_us_per_request: f64,
    /// Reports the variant's tool made during the slice (no block was injected).
    pub alarms: usize,
}

impl Measurement {
    fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "variant": self.variant.name(),
            "mode": self.mode.name(),
            "rate": self.rate,
            "sample": self.sample.to_json(),
            "server_us_per_request": self.server_us_per_request,
            "alarms": self.alarms,
        })
    }
}

/// Everything one run produced.
pub struct Results {
    pub measurements: Vec<Measurement>,
    pub loopguard: Score,
    pub fastapi_loopguard: Score,
    pub rate: f64,
    /// The 1-minute load average before and after the run.
    pub load_average: (String, String),
}

pub fn run(options: &Options, plan: &Plan) -> anyhow::Result<()> {
    let load_before = load_average();
    let binaries = build::build_all()?;
    let python = setup::python_with_uvicorn()?;
    let oha = setup::install_oha()?;
    let mut servers = Vec::new();
    for variant in VARIANTS {
        let server = Uvicorn::start(&python, &options.server_cpus, variant.middleware())
            .with_context(|| format!("failed to start the {} app", variant.name()))?;
        eprintln!(
            "bench: {} app pid {} on {}",
            variant.name(),
            server.pid(),
            server.addr
        );
        servers.push((variant, server));
    }
    let warm_up = if options.quick { 1 } else { 2 };
    for (variant, server) in &servers {
        eprintln!(
            "bench: warming up the {} app for {warm_up} s",
            variant.name()
        );
        load::wrk(
            &options.load_cpus,
            &server.url("/fast"),
            warm_up,
            options.connections,
        )?;
        warm_endpoints(server.addr)?;
    }
    let agent = Agent::attach(
        &binaries.loopguard,
        server_of(&servers, Variant::Loopguard).pid(),
        &options.agent_cpus,
        THRESHOLD_MS,
        &options.agent_args,
        None,
    )?;
    eprintln!(
        "bench: agent attached in {:.1} s (mode {})",
        agent.attach_secs, agent.attached["mode"]
    );
    let run = Run {
        options,
        plan,
        oha: &oha,
        servers: &servers,
        agent: &agent,
    };
    let mut results = run.rounds()?;
    let summary = agent.detach()?;
    drop(servers);
    results.load_average = (load_before, load_average());
    print!("{}", table::render(options, plan, &results));
    if let Some(path) = &options.json {
        let document = json!({
            "config": {
                "seconds": plan.seconds,
                "rounds": plan.rounds,
                "connections": options.connections,
                "rate": results.rate,
                "threshold_ms": THRESHOLD_MS,
                "blocks": BLOCKS.iter().map(|(kind, ms)| json!({"kind": kind, "ms": ms})).collect::<Vec<_>>(),
                "server_cpus": options.server_cpus,
                "load_cpus": options.load_cpus,
                "agent_cpus": options.agent_cpus,
                "load_average": [results.load_average.0, results.load_average.1],
            },
            "measurements": results.measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
            "rows": table::to_json(&results),
            "agent_summary": summary,
        });
        write_json(path, &document)?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

fn server_of(servers: &[(Variant, Uvicorn)], variant: Variant) -> &Uvicorn {
    &servers
        .iter()
        .find(|(v, _)| *v == variant)
        .expect("every variant runs")
        .1
}

/// `FastAPI` builds an endpoint's validators on its first call: call each
/// once so that the blocks time only the block.
fn warm_endpoints(addr: SocketAddr) -> anyhow::Result<()> {
    for path in [
        "/sleep/warm?ms=1",
        "/spin/warm?ms=1",
        "/suspended/warm?ms=1",
    ] {
        for _ in 0..2 {
            let response = server::get(addr, path)?;
            if response.status != 200 {
                bail!("GET {path} on {addr} answered {}", response.status);
            }
        }
    }
    Ok(())
}

/// The first field of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Run<'a> {
    options: &'a Options,
    plan: &'a Plan,
    oha: &'a Path,
    servers: &'a [(Variant, Uvicorn)],
    agent: &'a Agent,
}

impl Run<'_> {
    fn rounds(&self) -> anyhow::Result<Results> {
        let mut results = Results {
            measurements: Vec::new(),
            loopguard: Score::default(),
            fastapi_loopguard: Score::default(),
            rate: self.options.rate.unwrap_or(0.0),
            load_average: (String::new(), String::new()),
        };
        for round in 1..=self.plan.rounds {
            // Round 1 loads the bare app first: its saturation sets the rate.
            let mut order = VARIANTS.to_vec();
            order.rotate_left((round as usize - 1) % VARIANTS.len());
            for &variant in &order {
                for mode in [Mode::Saturation, Mode::Rate] {
                    let m = self.measure(round, variant, mode, results.rate)?;
                    if variant == Variant::Bare && mode == Mode::Saturation && results.rate == 0.0 {
                        results.rate = (m.sample.rps * MODERATE_SHARE).max(1.0);
                    }
                    let seconds = self.plan.seconds as f64;
                    match variant {
                        Variant::Loopguard => results.loopguard.add_load(m.alarms, seconds),
                        Variant::FastapiLoopguard => {
                            results.fastapi_loopguard.add_load(m.alarms, seconds);
                        }
                        _ => {}
                    }
                    results.measurements.push(m);
                }
            }
            let mut watched = [Variant::Loopguard, Variant::FastapiLoopguard];
            if round % 2 == 0 {
                watched.reverse();
            }
            for variant in watched {
                for block in self.inject_blocks(round, variant)? {
                    match variant {
                        Variant::Loopguard => results.loopguard.add_block(&block),
                        _ => results.fastapi_loopguard.add_block(&block),
                    }
                }
            }
        }
        Ok(results)
    }

    /// One slice of load; the alarms the variant's tool raised meanwhile.
    fn measure(
        &self,
        round: u32,
        variant: Variant,
        mode: Mode,
        rate: f64,
    ) -> anyhow::Result<Measurement> {
        let (options, seconds) = (self.options, self.plan.seconds);
        let server = server_of(self.servers, variant);
        let url = server.url("/fast");
        self.agent.take_lines();
        let since = Instant::now();
        let cpu_before = agent::cpu_seconds(server.pid());
        let (sample, rate) = match mode {
            Mode::Saturation => (
                load::wrk(&options.load_cpus, &url, seconds, options.connections)?,
                None,
            ),
            Mode::Rate => (
                load::oha(
                    self.oha,
                    &options.load_cpus,
                    &url,
                    seconds,
                    options.connections,
                    rate,
                )?,
                Some(rate),
            ),
        };
        let wall = since.elapsed().as_secs_f64();
        let cpu = agent::cpu_seconds(server.pid()) - cpu_before;
        // Reports of a stall that ended with the load arrive a moment later.
        std::thread::sleep(Duration::from_millis(300));
        let alarms = self.reports(variant, since).len();
        let completed = sample.rps * wall;
        let m = Measurement {
            round,
            variant,
            mode,
            rate,
            sample,
            server_us_per_request: if completed > 0.0 {
                1e6 * cpu / completed
            } else {
                f64::NAN
            },
            alarms,
        };
        eprintln!(
            "bench: round {round}/{} {:<17} {:<10}: {:>7.0} req/s, p50 {:.2} ms, p99 {:.2} ms, server {:.0} µs/request, {} alarm(s)",
            self.plan.rounds,
            variant.name(),
            mode.name(),
            m.sample.rps,
            m.sample.p50_ms,
            m.sample.p99_ms,
            m.server_us_per_request,
            m.alarms,
        );
        Ok(m)
    }

    /// What the variant's tool reported since `since`: the agent's events
    /// not read yet, or fastapi-loopguard's warnings on the app's stderr.
    fn reports(&self, variant: Variant, since: Instant) -> Vec<Report> {
        match variant {
            Variant::Loopguard => self
                .agent
                .take_lines()
                .iter()
                .filter_map(|line| score::parse_agent_line(line))
                .collect(),
            Variant::FastapiLoopguard => server_of(self.servers, variant)
                .stderr_since(since)
                .iter()
                .filter_map(|line| score::parse_fastapi_loopguard_line(line))
                .collect(),
            Variant::Bare | Variant::MiddlewareOnly => Vec::new(),
        }
    }

    /// [`BLOCKS`] into one watched app, each beside two requests suspended
    /// on `await asyncio.sleep` and steady `/fast` traffic.
    fn inject_blocks(&self, round: u32, variant: Variant) -> anyhow::Result<Vec<Block>> {
        let server = server_of(self.servers, variant);
        let addr = server.addr;
        let traffic = Traffic::start(addr);
        self.reports(variant, Instant::now());
        let mut blocks = Vec::new();
        for (index, &(kind, ms)) in BLOCKS.iter().enumerate() {
            let tag = format!("r{round}b{index}");
            let since = Instant::now();
            let suspended: Vec<_> = ["a", "b"]
                .iter()
                .map(|which| {
                    let path = format!("/suspended/{tag}{which}?ms={}", ms + 300);
                    std::thread::spawn(move || server::get(addr, &path))
                })
                .collect();
            std::thread::sleep(LEAD);
            let path = format!("/{kind}/{tag}");
            let response = server::get(addr, &format!("{path}?ms={ms}"))?;
            if response.status != 200 {
                bail!("GET {path} answered {}: {}", response.status, response.body);
            }
            let body: Value = serde_json::from_str(&response.body)
                .with_context(|| format!("GET {path}: {}", response.body))?;
            let blocked_ms = body["blocked_ms"].as_f64().context("no blocked_ms")?;
            for request in suspended {
                let answered = request.join().expect("no panic")?;
                if answered.status != 200 {
                    bail!("a suspended request answered {}", answered.status);
                }
            }
            std::thread::sleep(SETTLE);
            let culprit = match variant {
                Variant::FastapiLoopguard => response
                    .header("x-request-id")
                    .context("fastapi-loopguard answered without x-request-id")?
                    .to_owned(),
                _ => path.clone(),
            };
            let reports = self.reports(variant, since);
            eprintln!(
                "bench: {} {path} blocked {blocked_ms:.1} ms: {}",
                variant.name(),
                describe(&reports)
            );
            blocks.push(Block {
                culprit,
                blocked_ms,
                reports,
            });
        }
        let fast = traffic.stop();
        if fast < 20 {
            bail!("only {fast} /fast requests went through beside the blocks");
        }
        Ok(blocks)
    }
}

fn describe(reports: &[Report]) -> String {
    if reports.is_empty() {
        return "nothing reported".to_owned();
    }
    reports
        .iter()
        .map(|r| {
            format!(
                "{}{:.1} ms blaming {}",
                if r.cumulative { "cumulative " } else { "" },
                r.duration_ms,
                match r.blamed.len() {
                    0 => "no request".to_owned(),
                    1 => r.blamed[0].clone(),
                    n => format!("{n} requests"),
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `GET /fast` in a loop on a thread until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if server::get(addr, "/fast").is_ok_and(|r| r.status == 200) {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(TRAFFIC_PAUSE);
                }
            })
        };
        Self {
            stop,
            served,
            thread,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.served.load(Ordering::Relaxed)
    }
}
