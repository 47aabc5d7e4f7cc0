//! `--soak-minutes`: one agent attached for minutes under a moderate mixed
//! load; its resident memory must stay under 64 MiB and stop growing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::agent::{Agent, Memory};
use super::load::{Oha, Sample};
use super::{Endpoint, Options, THRESHOLD_MS};

/// Issue #7: the agent stays under 64 MiB resident after an hour of load.
const RSS_LIMIT_KIB: u64 = 64 * 1024;
/// ... which a growth above 1 MiB a minute, after the first minute, would
/// break within the hour.
const GROWTH_LIMIT_KIB_PER_MIN: f64 = 1024.0;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const MINUTE: Duration = Duration::from_mins(1);
const HOUR_MINUTES: f64 = 60.0;

pub struct Setup<'a> {
    pub options: &'a Options,
    pub loopguard: &'a Path,
    pub oha: &'a Path,
    pub server_pid: u32,
    pub base: &'a str,
    pub endpoints: &'a [Endpoint],
    /// Each endpoint's fixed rate; the soak runs each at rate / endpoints.
    pub rates: &'a BTreeMap<Endpoint, f64>,
    pub minutes: u32,
}

pub struct MinuteStats {
    minute: u32,
    memory: Memory,
    /// RSS change since the previous minute, in KiB.
    growth_kib: i64,
    agent_cpu_pct: f64,
    /// What each endpoint's oha served, and the rate it was asked for.
    load: Vec<(Endpoint, Sample, f64)>,
}

pub struct Report {
    rates: Vec<(Endpoint, f64)>,
    /// `(seconds since attach, memory)`, every 10 s.
    samples: Vec<(f64, Memory)>,
    minutes: Vec<MinuteStats>,
    summary: Value,
    /// Stopped early: why.
    stopped: Option<String>,
}

pub fn run(setup: &Setup) -> anyhow::Result<Report> {
    let options = setup.options;
    let share = setup.endpoints.len().max(1) as f64;
    let rates: Vec<(Endpoint, f64)> = setup
        .endpoints
        .iter()
        .map(|&endpoint| {
            let rate = setup.rates.get(&endpoint).copied().unwrap_or(1.0);
            (endpoint, (rate / share).max(1.0))
        })
        .collect();
    eprintln!(
        "soak: {} minute(s) attached under a mixed load of {}; RSS sampled every {} s",
        setup.minutes,
        rates
            .iter()
            .map(|(e, r)| format!("{} {r:.0}/s", e.path()))
            .collect::<Vec<_>>()
            .join(" + "),
        SAMPLE_EVERY.as_secs()
    );
    let mut agent = Agent::attach(
        setup.loopguard,
        setup.server_pid,
        &options.agent_cpus,
        THRESHOLD_MS,
        &options.agent_args,
        options.scrape_every_ms.map(Duration::from_millis),
    )?;
    let attached = Instant::now();
    let mut report = Report {
        rates,
        samples: vec![(0.0, agent.memory())],
        minutes: Vec::new(),
        summary: Value::Null,
        stopped: None,
    };
    let mut previous_rss = agent.memory().rss_kib;
    'minutes: for minute in 1..=setup.minutes {
        let start = Instant::now();
        let cpu_before = agent.cpu_seconds();
        let mut load = Vec::new();
        for &(endpoint, rate) in &report.rates {
            let url = format!("{}{}", setup.base, endpoint.path());
            let oha = Oha::spawn(
                setup.oha,
                &options.load_cpus,
                &url,
                MINUTE.as_secs(),
                options.connections,
                rate,
            )?;
            load.push((endpoint, oha));
        }
        for tick in 1..=(MINUTE.as_secs() / SAMPLE_EVERY.as_secs()) as u32 {
            std::thread::sleep(
                (start + SAMPLE_EVERY * tick).saturating_duration_since(Instant::now()),
            );
            if !agent.alive() {
                report.stopped = Some("the agent exited during the soak".to_owned());
                break 'minutes;
            }
            let memory = agent.memory();
            let at = attached.elapsed().as_secs_f64();
            report.samples.push((at, memory));
            eprintln!(
                "soak: {:>4.0} s  VmRSS {:.1} MiB  VmHWM {:.1} MiB",
                at,
                mib(memory.rss_kib),
                mib(memory.hwm_kib)
            );
            if memory.rss_kib > RSS_LIMIT_KIB {
                report.stopped = Some(format!(
                    "agent RSS {:.1} MiB is over the {} MiB limit",
                    mib(memory.rss_kib),
                    RSS_LIMIT_KIB / 1024
                ));
                break 'minutes;
            }
        }
        let mut served = Vec::new();
        for ((endpoint, oha), &(_, rate)) in load.into_iter().zip(&report.rates) {
            served.push((endpoint, oha.finish()?, rate));
        }
        let memory = agent.memory();
        let minute_report = MinuteStats {
            minute,
            memory,
            growth_kib: memory.rss_kib as i64 - previous_rss as i64,
            agent_cpu_pct: 100.0 * (agent.cpu_seconds() - cpu_before)
                / start.elapsed().as_secs_f64(),
            load: served,
        };
        previous_rss = memory.rss_kib;
        eprintln!("soak: {}", minute_line(&minute_report));
        report.minutes.push(minute_report);
    }
    report.summary = agent.detach().context("detaching after the soak")?;
    Ok(report)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn minute_line(m: &MinuteStats) -> String {
    let mut line = format!(
        "minute {:>3}: VmRSS {:>6.1} MiB ({:+.2} MiB), VmHWM {:>6.1} MiB, agent {:>4.1} % CPU; served",
        m.minute,
        mib(m.memory.rss_kib),
        m.growth_kib as f64 / 1024.0,
        mib(m.memory.hwm_kib),
        m.agent_cpu_pct,
    );
    for (endpoint, sample, rate) in &m.load {
        let _ = write!(
            line,
            " {} {:.0}/s p99 {:.2} ms",
            endpoint.name(),
            sample.rps,
            sample.p99_ms
        );
        if sample.rps < 0.95 * rate {
            let _ = write!(line, " (behind the {rate:.0}/s asked)");
        }
        if sample.errors > 0 {
            let _ = write!(line, " ({} errors)", sample.errors);
        }
        line.push(',');
    }
    line.pop();
    line
}

impl Report {
    fn max_rss_kib(&self) -> u64 {
        self.samples
            .iter()
            .map(|(_, m)| m.rss_kib)
            .max()
            .unwrap_or(0)
    }

    /// Average RSS growth per minute from the end of minute 1 to the end;
    /// `None` with fewer than two minutes.
    fn growth_kib_per_min(&self) -> Option<f64> {
        let first = self.minutes.first()?;
        let last = self.minutes.last()?;
        (last.minute > first.minute).then(|| {
            (last.memory.rss_kib as f64 - first.memory.rss_kib as f64)
                / f64::from(last.minute - first.minute)
        })
    }

    fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = self.stopped.iter().cloned().collect();
        let max = self.max_rss_kib();
        if max > RSS_LIMIT_KIB && self.stopped.is_none() {
            failures.push(format!(
                "agent RSS reached {:.1} MiB, over the {} MiB limit",
                mib(max),
                RSS_LIMIT_KIB / 1024
            ));
        }
        if let Some(growth) = self.growth_kib_per_min()
            && growth > GROWTH_LIMIT_KIB_PER_MIN
        {
            failures.push(format!(
                "agent RSS grew {:.2} MiB a minute after the first minute, over the 1 MiB/min limit (a leak would pass 64 MiB within the hour)",
                growth / 1024.0
            ));
        }
        failures
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nsoak: {} minute(s), one agent attached throughout, mixed load {}",
            self.minutes.len(),
            self.rates
                .iter()
                .map(|(e, r)| format!("{} {r:.0}/s", e.name()))
                .collect::<Vec<_>>()
                .join(" + ")
        );
        for minute in &self.minutes {
            let _ = writeln!(out, "  {}", minute_line(minute));
        }
        let max = self.max_rss_kib();
        let _ = write!(
            out,
            "  max VmRSS {:.1} MiB (limit {} MiB): {}",
            mib(max),
            RSS_LIMIT_KIB / 1024,
            if max <= RSS_LIMIT_KIB { "PASS" } else { "FAIL" }
        );
        match self.growth_kib_per_min() {
            Some(growth) => {
                let last = self.minutes.last().map_or(0, |m| m.memory.rss_kib) as f64;
                let minutes = self.minutes.last().map_or(0, |m| m.minute);
                let projected = last + growth.max(0.0) * (HOUR_MINUTES - f64::from(minutes));
                let _ = writeln!(
                    out,
                    "; growth after minute 1 {:+.3} MiB/min (limit 1 MiB/min): {}; at that pace {:.1} MiB after an hour",
                    growth / 1024.0,
                    if growth <= GROWTH_LIMIT_KIB_PER_MIN {
                        "PASS"
                    } else {
                        "FAIL"
                    },
                    projected / 1024.0
                );
            }
            None => {
                let _ = writeln!(out, "; growth not checked (needs 2 minutes or more)");
            }
        }
        let _ = writeln!(
            out,
            "  agent summary: {} polls, {} stall(s), {} dropped event(s)",
            self.summary["polls"], self.summary["stalls"], self.summary["dropped_events"]
        );
        out
    }

    /// Fails the command, saying why, when the memory checks failed.
    pub fn verdict(&self) -> anyhow::Result<()> {
        let failures = self.failures();
        if failures.is_empty() {
            return Ok(());
        }
        bail!("soak failed: {}", failures.join("; "))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "rates": self.rates.iter().map(|(e, r)| (e.name().to_owned(), json!(r))).collect::<serde_json::Map<_, _>>(),
            "samples": self.samples.iter().map(|(at, m)| json!({ "t_s": at, "rss_kib": m.rss_kib, "hwm_kib": m.hwm_kib })).collect::<Vec<_>>(),
            "minutes": self.minutes.iter().map(|m| json!({
                "minute": m.minute,
                "rss_kib": m.memory.rss_kib,
                "hwm_kib": m.memory.hwm_kib,
                "growth_kib": m.growth_kib,
                "agent_cpu_pct": m.agent_cpu_pct,
                "load": m.load.iter().map(|(e, s, rate)| (e.name().to_owned(), json!({ "rate": rate, "served": s.to_json() }))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
            "max_rss_kib": self.max_rss_kib(),
            "growth_kib_per_min_after_first": self.growth_kib_per_min(),
            "rss_limit_kib": RSS_LIMIT_KIB,
            "growth_limit_kib_per_min": GROWTH_LIMIT_KIB_PER_MIN,
            "stopped_early": self.stopped,
            "failures": self.failures(),
            "agent_summary": self.summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rss_by_minute: &[u64]) -> Report {
        let minutes = rss_by_minute
            .iter()
            .zip(1..)
            .map(|(&rss_kib, minute)| MinuteStats {
                minute,
                memory: Memory {
                    rss_kib,
                    hwm_kib: rss_kib,
                },
                growth_kib: 0,
                agent_cpu_pct: 0.0,
                load: Vec::new(),
            })
            .collect::<Vec<_>>();
        Report {
            rates: Vec::new(),
            samples: minutes
                .iter()
                .map(|m| (f64::from(m.minute) * 60.0, m.memory))
                .collect(),
            minutes,
            summary: Value::Null,
            stopped: None,
        }
    }

    #[test]
    fn steady_memory_passes() {
        let steady = report(&[14_000, 14_500, 14_600, 14_600]);
        assert!(steady.verdict().is_ok());
        assert!((steady.growth_kib_per_min().unwrap() - 200.0).abs() < 1e-9);
    }

    #[test]
    fn first_minute_growth_is_allowed_but_later_growth_is_not() {
        assert!(report(&[30_000, 30_100]).verdict().is_ok());
        assert!(report(&[14_000, 15_500, 17_000]).verdict().is_err());
    }

    #[test]
    fn over_the_limit_fails_and_one_minute_checks_only_the_limit() {
        assert!(report(&[70_000]).verdict().is_err());
        assert!(report(&[60_000]).verdict().is_ok());
        assert!(report(&[60_000]).growth_kib_per_min().is_none());
    }
}
