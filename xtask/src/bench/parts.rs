//! `cargo xtask bench --parts`: what each part of loopguard costs, in one
//! run, against the poll floor.
//!
//! Each target in turn is measured in rounds, back to back; each round
//! measures it unattached and then under a ladder of agents, each adding
//! one part to the one before: the poll floor (the poll probes with
//! programs that return at once, nothing else), the program bodies, the
//! wait path, stack capture, requests named from the middleware's
//! in-flight table (the default configuration) and a Prometheus scrape
//! every second; beside them, the default with the request probes instead
//! of the table (`--requests probes`, the default before issue #24's table
//! mode), with the wait path on uprobes, as it was before issue #24, and
//! as one target of the host agent (`watch --all --exe PATH`, issue #28:
//! no dearer than attached alone). The order reverses every other round.
//! Targets: the example's endpoints, and real servers none of us wrote
//! (installed from crates.io into `target/bench-servers`).
//! Saturation only (wrk), where a per-request cost shows as lost
//! throughput; the server's CPU time per request is printed beside it.
//! Each target gets the fewest connections (`--connections`, doubled up to
//! 256 until it is enough) that keep it at 90 % of its CPU or more
//! unattached: a server bound by its own latency measures nothing else.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::agent::{self, Agent};
use super::{Endpoint, THRESHOLD_MS, load, median};
use crate::cmd;

/// One rung of the ladder: what the agent adds over the rung before.
struct Step {
    /// What `--rungs` calls it.
    key: &'static str,
    name: &'static str,
    args: &'static [&'static str],
    scrape: bool,
    /// Only where the target has loopguard-middleware's probe sites.
    needs_middleware: bool,
    /// Not a rung of the ladder but a variant beside it (the wait path as
    /// it was before issue #24), compared with the poll floor only.
    aside: bool,
    how: How,
}

/// How the agent takes the target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    /// `loopguard attach --pid PID`.
    Attach,
    /// As one target of `loopguard watch --all --exe PATH` (issue #28: a
    /// target of the host agent costs no more than attached alone).
    WatchAll,
}

const STEPS: [Step; 9] = [
    Step {
        key: "floor",
        name: "poll floor",
        args: &[
            "--bench-empty-programs",
            "--wait-probes",
            "off",
            "--no-stacks",
            "--no-requests",
        ],
        scrape: false,
        needs_middleware: false,
        aside: false,
        how: How::Attach,
    },
    Step {
        key: "bodies",
        name: "+ program bodies",
        args: &["--wait-probes", "off", "--no-stacks", "--no-requests"],
        scrape: false,
        needs_middleware: false,
        aside: false,
        how: How::Attach,
    },
    Step {
        key: "wait",
        name: "+ wait path",
        args: &["--no-stacks", "--no-requests"],
        scrape: false,
        needs_middleware: false,
        aside: false,
        how: How::Attach,
    },
    Step {
        key: "stacks",
        name: "+ stacks",
        args: &["--no-requests"],
        scrape: false,
        needs_middleware: false,
        aside: false,
        how: How::Attach,
    },
    Step {
        key: "default",
        name: "+ requests from the table (default)",
        args: &[],
        scrape: false,
        needs_middleware: true,
        aside: false,
        how: How::Attach,
    },
    Step {
        key: "scrape",
        name: "+ metrics scraping (1 s)",
        args: &[],
        scrape: true,
        needs_middleware: false,
        aside: false,
        how: How::Attach,
    },
    Step {
        key: "probes",
        name: "aside: requests from the probes (--requests probes)",
        args: &["--requests", "probes"],
        scrape: false,
        needs_middleware: true,
        aside: true,
        how: How::Attach,
    },
    Step {
        key: "uprobes",
        name: "aside: default, wait path on uprobes (before #24)",
        args: &["--wait-probes", "uprobe"],
        scrape: false,
        needs_middleware: false,
        aside: true,
        how: How::Attach,
    },
    Step {
        key: "watch-all",
        name: "aside: default, as a target of `watch --all --exe PATH`",
        args: &[],
        scrape: false,
        needs_middleware: false,
        aside: true,
        how: How::WatchAll,
    },
];

/// The target: the default attach keeps this share of the poll
/// floor's throughput.
const DEFAULT_OVER_FLOOR_MIN: f64 = 0.93;

/// Real servers the bench can install and load.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum RealServer {
    /// static-web-server (hyper + Tokio, default features off), serving a
    /// small file.
    StaticWebServer,
    /// dufs (hyper + Tokio file server), serving the same file.
    Dufs,
    /// miniserve (actix-web on Tokio current-thread workers), serving the
    /// same file.
    Miniserve,
}

impl RealServer {
    fn name(self) -> &'static str {
        match self {
            Self::StaticWebServer => "static-web-server",
            Self::Dufs => "dufs",
            Self::Miniserve => "miniserve",
        }
    }

    fn version(self) -> &'static str {
        match self {
            Self::StaticWebServer => "2.44.1",
            Self::Dufs => "0.47.0",
            Self::Miniserve => "0.35.0",
        }
    }
}

/// Where real servers are installed (`cargo install --root`).
fn servers_root() -> PathBuf {
    cmd::target_dir().join("bench-servers")
}

/// Installs `server` into `target/bench-servers` unless it is there: the
/// release profile with symbols kept (loopguard needs them), once.
fn install(server: RealServer) -> anyhow::Result<PathBuf> {
    let root = servers_root();
    let binary = root.join("bin").join(server.name());
    if binary.exists() {
        return Ok(binary);
    }
    eprintln!(
        "bench: installing {} {} into {} (several minutes on two cores, once)",
        server.name(),
        server.version(),
        root.display()
    );
    let mut install = cmd::cargo();
    install
        .args(["install", "--locked", "--root"])
        .arg(&root)
        .args([server.name(), "--version", server.version()])
        // The HTTP serving path only: no TLS, compression or auth crates,
        // so the first install takes minutes, not a quarter of an hour.
        .arg("--no-default-features")
        .env("CARGO_PROFILE_RELEASE_STRIP", "false")
        .env("CARGO_TARGET_DIR", root.join("build"));
    cmd::run(&mut install).with_context(|| {
        format!(
            "failed to install {}: run `{}` to see why (it needs crates.io)",
            server.name(),
            cmd::display(&install)
        )
    })?;
    Ok(binary)
}

/// A real server running pinned, killed when dropped.
struct Running {
    child: Child,
    url: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(server: RealServer, binary: &Path, cpus: &str) -> anyhow::Result<Running> {
    let www = servers_root().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(
        www.join("index.html"),
        "<!doctype html><title>bench</title><p>hello</p>\n",
    )?;
    let addr = super::scrape::free_addr()?;
    let mut command = Command::new("taskset");
    command.args(["-c", cpus]).arg(binary);
    match server {
        RealServer::StaticWebServer => command
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .arg("--root")
            .arg(&www)
            .args(["--threads-multiplier", "1", "--log-level", "error"]),
        // Both size their worker pools from the CPUs they may run on:
        // one, under taskset.
        RealServer::Dufs => {
            command
                .arg(&www)
                .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        }
        RealServer::Miniserve => command.arg(&www).args([
            "--interfaces",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
        ]),
    };
    let child = command
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start `{}`", cmd::display(&command)))?;
    let running = Running {
        child,
        url: format!("http://{addr}/index.html"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 10 s", server.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(running)
}

/// One target of the ladder: a URL on a pinned server.
struct Target {
    label: String,
    pid: u32,
    url: String,
    middleware: bool,
    /// wrk's connections for it ([`saturating_connections`]).
    connections: u32,
}

/// The server's share of one CPU at or above which it counts as saturated.
const SATURATED_CPU: f64 = 0.9;

/// The fewest connections, from `first` up by doubling to 256, at which
/// wrk keeps the unattached target's CPU saturated. Under too few a server
/// can be bound by its own latency (dufs and miniserve wait out 40 ms
/// delayed ACKs under `-c16` here, at 10-25 % CPU): its throughput then
/// measures that wait, not what a probe costs, and moves 20 % from run to
/// run. Under many more than it needs it thrashes: dufs saturates at
/// `-c128` with 5,220-5,845 requests/s in ten 3 s runs, but at `-c256`
/// (where steps of four landed) gave 4,100-5,400 with two modes, too wide
/// to place a 7 % cost.
fn saturating_connections(setup: &Setup, target: &Target, first: u32) -> anyhow::Result<u32> {
    let mut connections = first;
    loop {
        let before = agent::cpu_seconds(target.pid);
        let start = Instant::now();
        load::wrk(setup.load_cpus, &target.url, 1, connections)?;
        let share = (agent::cpu_seconds(target.pid) - before) / start.elapsed().as_secs_f64();
        if share >= SATURATED_CPU || connections >= 256 {
            if share < SATURATED_CPU {
                eprintln!(
                    "bench: {} uses {:.0} % of its CPU under {connections} connections: its ratios measure its latency more than our cost",
                    target.label,
                    share * 100.0
                );
            }
            return Ok(connections);
        }
        connections = (connections * 2).min(256);
    }
}

/// What the ladder gave one target: per rung (0 = unattached), the
/// requests/s and server µs per request of every round.
#[derive(Default)]
struct Ladder {
    rps: BTreeMap<usize, Vec<f64>>,
    us: BTreeMap<usize, Vec<f64>>,
}

/// The settings the ladder runs with.
pub struct Setup<'a> {
    pub loopguard: &'a Path,
    pub example_pid: u32,
    pub example_base: &'a str,
    pub endpoints: &'a [Endpoint],
    pub servers: &'a [RealServer],
    pub server_cpus: &'a str,
    pub load_cpus: &'a str,
    pub agent_cpus: &'a str,
    pub seconds: u64,
    pub rounds: u32,
    pub connections: u32,
    /// `--rungs`: the rungs to measure by key (empty: all).
    pub rungs: &'a [String],
}

pub fn run(setup: &Setup) -> anyhow::Result<()> {
    let mut running = Vec::new();
    let mut targets: Vec<Target> = setup
        .endpoints
        .iter()
        .map(|endpoint| Target {
            label: format!("stall-server {}", endpoint.path()),
            pid: setup.example_pid,
            url: format!("{}{}", setup.example_base, endpoint.path()),
            middleware: true,
            connections: setup.connections,
        })
        .collect();
    for &server in setup.servers {
        let binary = install(server)?;
        let server_process = start(server, &binary, setup.server_cpus)?;
        targets.push(Target {
            label: format!("{} {} (small file)", server.name(), server.version()),
            pid: server_process.child.id(),
            url: server_process.url.clone(),
            middleware: false,
            connections: setup.connections,
        });
        running.push(server_process);
    }
    for target in &mut targets {
        target.connections = saturating_connections(setup, target, setup.connections)?;
    }
    let mut ladders: Vec<Ladder> = targets.iter().map(|_| Ladder::default()).collect();
    // A target's rounds run back to back, not interleaved with the other
    // targets': a server left idle while four others are measured (30 s
    // here) lets its thread pools drain (Tokio's blocking pool keeps an
    // idle thread 10 s; dufs went from 313 threads to 2), and whichever
    // rung came first in the next round found a pool regrown from nothing,
    // of another size than the rungs after it found. dufs, whose
    // throughput follows its pool's size, gave that first rung 11 % more
    // than the same rung in third place.
    for (target, ladder) in targets.iter().zip(&mut ladders) {
        // Its pools grown to what the load needs before the first round.
        eprintln!("bench: warming up {} for {} s", target.label, setup.seconds);
        load::wrk(
            setup.load_cpus,
            &target.url,
            setup.seconds,
            target.connections,
        )?;
        for round in 1..=setup.rounds {
            let mut rungs: Vec<usize> = (0..=STEPS.len())
                .filter(|&rung| rung == 0 || runs_rung(setup, target, rung))
                .collect();
            if round % 2 == 0 {
                rungs.reverse();
            }
            for rung in rungs {
                let (rps, us) = measure(setup, target, rung)?;
                let name = if rung == 0 {
                    "unattached"
                } else {
                    STEPS[rung - 1].name
                };
                eprintln!(
                    "bench: parts round {round}/{} {}: {name}: {rps:.0} req/s, server {us:.2} µs/request",
                    setup.rounds, target.label
                );
                ladder.rps.entry(rung).or_default().push(rps);
                ladder.us.entry(rung).or_default().push(us);
            }
        }
    }
    drop(running);
    print!("{}", render(setup, &targets, &ladders));
    Ok(())
}

/// Whether `target` is measured at `rung` (1-based): chosen by `--rungs`,
/// and where the target has what the rung adds.
fn runs_rung(setup: &Setup, target: &Target, rung: usize) -> bool {
    let step = &STEPS[rung - 1];
    let chosen = |key: &str| setup.rungs.is_empty() || setup.rungs.iter().any(|k| k == key);
    if step.needs_middleware && !target.middleware {
        return false;
    }
    chosen(step.key) || (step.key == default_key(target) && chosen("default"))
}

/// The key of the rung that measures `target`'s default configuration:
/// without the middleware it is the stacks rung's (no table to read).
fn default_key(target: &Target) -> &'static str {
    if target.middleware {
        "default"
    } else {
        "stacks"
    }
}

/// The keys `--rungs` takes: the steps' own, in their order.
pub const RUNG_KEYS: [&str; STEPS.len()] = {
    let mut keys = [""; STEPS.len()];
    let mut index = 0;
    while index < STEPS.len() {
        keys[index] = STEPS[index].key;
        index += 1;
    }
    keys
};

/// Seconds of load before each measured run ([`measure`]).
const WARM_UP_SECS: u64 = 1;

/// One wrk run at `rung` (0: unattached): requests/s and the server's CPU
/// µs per request.
fn measure(setup: &Setup, target: &Target, rung: usize) -> anyhow::Result<(f64, f64)> {
    let agent = if rung == 0 {
        None
    } else {
        let step = &STEPS[rung - 1];
        let args: Vec<String> = step.args.iter().map(|&arg| arg.to_owned()).collect();
        Some(if step.how == How::WatchAll {
            let exe = std::fs::read_link(format!("/proc/{}/exe", target.pid))
                .with_context(|| format!("the executable of pid {}", target.pid))?;
            Agent::watch_all(setup.loopguard, &exe, setup.agent_cpus, THRESHOLD_MS, &args)?
        } else {
            Agent::attach(
                setup.loopguard,
                target.pid,
                setup.agent_cpus,
                THRESHOLD_MS,
                &args,
                step.scrape.then_some(Duration::from_secs(1)),
            )?
        })
    };
    // The first second after an attach is not the steady state this
    // measures: every thread's first probe hit sets up its uprobe state
    // and claims its slot, and the agent finishes starting. dufs gave
    // its first 2 s after attaching 3,740-4,440 requests/s, the next
    // 4,650-4,980. Every rung, unattached too, gets the same warm-up.
    load::wrk(
        setup.load_cpus,
        &target.url,
        WARM_UP_SECS,
        target.connections,
    )?;
    let before = agent::cpu_seconds(target.pid);
    let start = Instant::now();
    let sample = load::wrk(
        setup.load_cpus,
        &target.url,
        setup.seconds,
        target.connections,
    )?;
    let wall = start.elapsed().as_secs_f64();
    let cpu = agent::cpu_seconds(target.pid) - before;
    if let Some(agent) = agent {
        agent.detach()?;
    }
    let served = sample.rps * wall;
    let us = if served > 0.0 {
        1e6 * cpu / served
    } else {
        f64::NAN
    };
    Ok((sample.rps, us))
}

/// `what` (measured at `rung`) against the poll floor: the median of the
/// rounds' own ratios, with its middle half, and the ratio of the two
/// medians. The verdict takes the rounds' median: the two rungs of one
/// round run seconds apart, so each is compared with what the machine and
/// the server were doing then. The ratio of medians compares rungs
/// measured minutes apart, and the machine drifts: in one run `/fast`
/// unattached gave ~94,000 requests/s in five rounds and ~115,000 in
/// eleven, the other rungs moving with it, and its ratio of medians came
/// out at 0.850 while the rounds' median was 0.970. With fewer than four rounds there is no median of
/// rounds to trust, and the ratio of medians decides.
fn over_floor(out: &mut String, ladder: &Ladder, what: &str, rung: usize) {
    let (Some(floor), Some(measured)) = (ladder.rps.get(&1), ladder.rps.get(&rung)) else {
        return;
    };
    let (Some(floor_median), Some(median_rps)) = (median(floor), median(measured)) else {
        return;
    };
    let of_medians = median_rps / floor_median;
    let mut per_round: Vec<f64> = floor
        .iter()
        .zip(measured)
        .map(|(floor, measured)| measured / floor)
        .filter(|ratio| ratio.is_finite())
        .collect();
    per_round.sort_by(f64::total_cmp);
    let (over, how) = match median(&per_round) {
        Some(paired) if per_round.len() >= 4 => {
            let quarter = per_round.len() / 4;
            (
                paired,
                format!(
                    "median of {} rounds, middle half {:.3}-{:.3}; ratio of medians {of_medians:.3}",
                    per_round.len(),
                    per_round[quarter],
                    per_round[per_round.len() - 1 - quarter],
                ),
            )
        }
        _ => (
            of_medians,
            format!("ratio of medians over {} rounds", per_round.len()),
        ),
    };
    let verdict = if over >= DEFAULT_OVER_FLOOR_MIN {
        "meets"
    } else {
        "misses"
    };
    let _ = writeln!(
        out,
        "{what} / poll floor: {over:.3} ({verdict} the issue's {DEFAULT_OVER_FLOOR_MIN}; {how})"
    );
}

fn render(setup: &Setup, targets: &[Target], ladders: &[Ladder]) -> String {
    let mut out = String::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        out,
        "\nWhat each part costs (wrk -t1 -d{}s, -c{} or more where the server needs more to use its CPU; median of {} round(s); server on CPUs {}, wrk and agent on {}; load average {}):",
        setup.seconds,
        setup.connections,
        setup.rounds,
        setup.server_cpus,
        setup.load_cpus,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    for (target, ladder) in targets.iter().zip(ladders) {
        let rps = |rung: usize| ladder.rps.get(&rung).and_then(|v| median(v));
        let us = |rung: usize| ladder.us.get(&rung).and_then(|v| median(v));
        let Some(unattached) = rps(0) else { continue };
        let _ = writeln!(
            out,
            "\n{}: unattached {unattached:.0} req/s, {:.2} µs/request (wrk -c{})",
            target.label,
            us(0).unwrap_or(f64::NAN),
            target.connections
        );
        let _ = writeln!(
            out,
            "| part | req/s | ratio | share (ratio lost) | server µs/request | added µs/request |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        let mut previous = (1.0, us(0).unwrap_or(f64::NAN));
        let mut asides = Vec::new();
        for (index, step) in STEPS.iter().enumerate() {
            let rung = index + 1;
            let (Some(r), Some(u)) = (rps(rung), us(rung)) else {
                continue;
            };
            let ratio = r / unattached;
            if step.aside {
                let _ = writeln!(out, "| {} | {r:.0} | {ratio:.3} | | {u:.2} | |", step.name);
                asides.push((step.name.trim_start_matches("aside: "), rung));
                continue;
            }
            let _ = writeln!(
                out,
                "| {} | {r:.0} | {ratio:.3} | {:+.3} | {u:.2} | {:+.2} |",
                step.name,
                ratio - previous.0,
                u - previous.1
            );
            previous = (ratio, u);
        }
        let default_rung = 1 + STEPS
            .iter()
            .position(|step| step.key == default_key(target))
            .unwrap_or(0);
        for (what, rung) in [("default", default_rung)].into_iter().chain(asides) {
            over_floor(&mut out, ladder, what, rung);
        }
    }
    out
}
