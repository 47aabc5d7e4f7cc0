//! `cargo xtask bench --attach-only`: how long attaching to and detaching
//! from a service with hundreds of `raw::poll` copies takes
//! (`examples/many-futures`), in the agent's own words: `attach_s` of its
//! `attached` line, and S of its last line, `detached: all N probes removed
//! in S s`. `--agent-arg=--probe-links=perf` measures the perf-event path
//! (minutes: about a tenth of a second per probe).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::median;
use crate::example::Example;

/// How long the agent stays attached in each round.
const ATTACHED_FOR: Duration = Duration::from_secs(2);

/// One round's figures.
struct Round {
    probes: u64,
    links: u64,
    kind: String,
    attach_s: f64,
    detach_s: f64,
}

pub fn run(
    loopguard: &Path,
    many_futures: &Path,
    agent_args: &[String],
    rounds: u32,
) -> anyhow::Result<()> {
    let mut measured = Vec::new();
    for round in 1..=rounds {
        let server = Example::start(many_futures)?;
        let figures = measure(loopguard, server.pid(), agent_args)?;
        eprintln!(
            "bench: round {round}: {} probes in {} {} links: attach {:.3} s, detach {:.3} s",
            figures.probes, figures.links, figures.kind, figures.attach_s, figures.detach_s
        );
        measured.push(figures);
    }
    let attach: Vec<f64> = measured.iter().map(|r| r.attach_s).collect();
    let detach: Vec<f64> = measured.iter().map(|r| r.detach_s).collect();
    let last = measured.last().context("no rounds")?;
    println!(
        "attach/detach on many-futures ({} probes, {} links): attach {:.3} s, detach {:.3} s (medians of {rounds})",
        last.probes,
        last.kind,
        median(&attach).unwrap_or_default(),
        median(&detach).unwrap_or_default(),
    );
    Ok(())
}

/// Attaches for [`ATTACHED_FOR`], lets the agent detach by itself, and
/// reads both durations from what it printed.
fn measure(loopguard: &Path, pid: u32, agent_args: &[String]) -> anyhow::Result<Round> {
    let mut command = Command::new(loopguard);
    command
        .args(["attach", "--pid", &pid.to_string(), "--format", "json"])
        .args(["--duration", &ATTACHED_FOR.as_secs().to_string()])
        .args(agent_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to start `{}`", crate::cmd::display(&command)))?;
    let stderr = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let attached = BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .find(|value| value["type"] == "attached");
    let status = child.wait()?;
    let stderr = stderr.join().unwrap_or_default();
    let (Some(attached), true) = (attached, status.success()) else {
        bail!("loopguard failed ({status}):\n{}", stderr.join("\n"));
    };
    let probes = attached["probes"].as_u64().unwrap_or(0);
    let detach_s = stderr
        .last()
        .and_then(|line| {
            line.strip_prefix(&format!(
                "loopguard: detached: all {probes} probes removed in "
            ))
        })
        .and_then(|rest| rest.strip_suffix(" s"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no `detached` last line:\n{}", stderr.join("\n")))?;
    Ok(Round {
        probes,
        links: attached["links"].as_u64().unwrap_or(0),
        kind: attached["probe_links"].as_str().unwrap_or("?").to_owned(),
        attach_s: attached["attach_s"].as_f64().unwrap_or(f64::NAN),
        detach_s,
    })
}
