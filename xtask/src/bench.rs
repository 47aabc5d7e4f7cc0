//! `cargo xtask bench`: requests/s of the example's fast endpoint under wrk,
//! unattached and attached, interleaved in one run, reported as a ratio.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::example::Example;
use crate::{build, cmd};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unattached/attached pairs to interleave.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Open connections held by wrk.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Endpoint to load.
    #[arg(long, default_value = "/fast")]
    path: String,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the benchmark attaches eBPF programs and needs root: run `sudo -E cargo xtask bench`"
        );
    }
    let binaries = build::build_all()?;
    let server = Example::start(&binaries.stall_server)?;
    let addr = &server.addr;
    let url = format!("http://{addr}{}", options.path);
    eprintln!("bench: warming up {url}");
    wrk(&url, 2, options.connections)?;

    let mut ratios = Vec::new();
    for round in 1..=options.rounds {
        let bare = wrk(&url, options.seconds, options.connections)?;
        let mut agent = Command::new(&binaries.loopguard)
            .args([
                "attach",
                "--pid",
                &server.pid().to_string(),
                "--threshold-ms",
                "1000",
                "--format",
                "json",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start loopguard")?;
        let mut lines = BufReader::new(agent.stdout.take().expect("piped")).lines();
        let attached = lines.next().transpose()?.unwrap_or_default();
        if !attached.contains("\"attached\"") {
            bail!("loopguard did not attach: {attached}");
        }
        let cpu_before = cpu_seconds(agent.id());
        let probed = wrk(&url, options.seconds, options.connections)?;
        let cpu = cpu_seconds(agent.id()) - cpu_before;
        let rss_mib = rss_kib(agent.id()) as f64 / 1024.0;
        interrupt(agent.id());
        let summary = lines
            .map_while(Result::ok)
            .find(|line| line.contains("\"summary\""))
            .unwrap_or_default();
        agent.wait()?;
        let ratio = probed / bare;
        ratios.push(ratio);
        eprintln!(
            "bench: round {round}: unattached {bare:.0} req/s, attached {probed:.0} req/s, ratio {ratio:.3}; agent CPU {:.1}% of one core, RSS {rss_mib:.1} MiB",
            100.0 * cpu / options.seconds as f64
        );
        eprintln!("bench:   {summary}");
    }
    drop(server);
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "loopguard overhead on {}: attached/unattached throughput ratio median {median:.3} ({:+.1}%), rounds {:?}",
        options.path,
        (median - 1.0) * 100.0,
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>()
    );
    Ok(())
}

/// Runs wrk and returns its requests/s.
fn wrk(url: &str, seconds: u64, connections: u32) -> anyhow::Result<f64> {
    let mut command = Command::new("wrk");
    command.args([
        "-t",
        "2",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        url,
    ]);
    eprintln!("+ {}", cmd::display(&command));
    let out = command
        .output()
        .context("failed to run wrk (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("wrk printed no Requests/sec:\n{text}"))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sends SIGINT, as Ctrl+C would.
fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}
