//! The load generators: wrk at saturation, oha at a fixed rate. Each run
//! is pinned with taskset and reduced to a [`Sample`].

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cmd;

/// What one load run measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Completed requests per second.
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests completed.
    pub requests: u64,
    /// Socket errors and timeouts (wrk); failed requests (oha).
    pub errors: u64,
    /// The load generator's own CPU, in % of one core: near 100 % per
    /// load CPU, the generator, not the server, may be the limit.
    pub load_cpu_pct: Option<f64>,
}

impl Sample {
    pub fn to_json(self) -> Value {
        json!({
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "requests": self.requests,
            "errors": self.errors,
            "load_cpu_pct": self.load_cpu_pct,
        })
    }
}

/// `wrk -t1 -cN -dSs --latency URL`, as many requests as the server takes.
pub fn wrk(cpus: &str, url: &str, seconds: u64, connections: u32) -> anyhow::Result<Sample> {
    let mut command = Command::new("taskset");
    command
        .args(["-c", cpus, "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--latency", url]);
    let (out, cpu_pct) = output_with_cpu(&mut command)
        .with_context(|| format!("failed to run `{}`", cmd::display(&command)))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{}` failed with {} (`cargo xtask setup` installs wrk):\n{text}{}",
            cmd::display(&command),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sample = parse_wrk(&text)
        .with_context(|| format!("`{}` printed:\n{text}", cmd::display(&command)))?;
    Ok(Sample {
        load_cpu_pct: Some(cpu_pct),
        ..sample
    })
}

/// Runs `command` to the end like `Command::output`, and returns the CPU
/// it used in % of one core, read from /proc every 50 ms until it exits
/// (so up to 50 ms of it are missed). `taskset` execs, so its pid is the
/// generator's.
fn output_with_cpu(command: &mut Command) -> std::io::Result<(Output, f64)> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let start = Instant::now();
    let mut cpu = 0.0_f64;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        cpu = cpu.max(super::agent::cpu_seconds(child.id()));
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    Ok((output, 100.0 * cpu / start.elapsed().as_secs_f64()))
}

/// Reads Requests/sec, the 50% and 99% lines of the latency distribution,
/// the request count and any errors; a non-2xx answer is an error.
pub fn parse_wrk(text: &str) -> anyhow::Result<Sample> {
    let mut sample = Sample::default();
    let (mut rps, mut p50, mut p99, mut requests) = (None, None, None, None);
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(value)) => rps = value.parse().ok(),
            (Some("50%"), Some(value)) => p50 = parse_wrk_duration_ms(value),
            (Some("99%"), Some(value)) => p99 = parse_wrk_duration_ms(value),
            (Some(count), Some("requests")) => requests = count.parse().ok(),
            _ => {}
        }
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 12"
            sample.errors += errors
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bail!(
                "the server answered {} requests with an error",
                count.trim()
            );
        }
    }
    sample.rps = rps.context("no Requests/sec line")?;
    sample.p50_ms = p50.context("no 50% latency line (was --latency given?)")?;
    sample.p99_ms = p99.context("no 99% latency line (was --latency given?)")?;
    sample.requests = requests.context("no request count")?;
    Ok(sample)
}

/// wrk's durations: `143.00us`, `1.20ms`, `2.00s`, `1.50m`, `1.00h`.
fn parse_wrk_duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3_600e3,
        _ => return None,
    };
    Some(value * scale)
}

/// oha at a fixed rate for `seconds`, latency measured from when each
/// request was due (`--latency-correction`: no coordinated omission).
/// Killed on drop unless finished, so an error elsewhere leaves no load running.
pub struct Oha {
    child: Option<Child>,
    display: String,
}

impl Oha {
    pub fn spawn(
        oha: &Path,
        cpus: &str,
        url: &str,
        seconds: u64,
        connections: u32,
        rate: f64,
    ) -> anyhow::Result<Self> {
        let mut command = oha_command(oha, cpus, url, seconds, connections, rate);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let display = cmd::display(&command);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start `{display}`"))?;
        Ok(Self {
            child: Some(child),
            display,
        })
    }

    pub fn finish(mut self) -> anyhow::Result<Sample> {
        let out = self
            .child
            .take()
            .expect("finished once")
            .wait_with_output()
            .with_context(|| format!("failed to run `{}`", self.display))?;
        oha_sample(&self.display, &out)
    }
}

impl Drop for Oha {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One fixed-rate run, waited for, with oha's own CPU.
pub fn oha(
    oha: &Path,
    cpus: &str,
    url: &str,
    seconds: u64,
    connections: u32,
    rate: f64,
) -> anyhow::Result<Sample> {
    let mut command = oha_command(oha, cpus, url, seconds, connections, rate);
    let display = cmd::display(&command);
    let (out, cpu_pct) =
        output_with_cpu(&mut command).with_context(|| format!("failed to run `{display}`"))?;
    let sample = oha_sample(&display, &out)?;
    Ok(Sample {
        load_cpu_pct: Some(cpu_pct),
        ..sample
    })
}

fn oha_command(
    oha: &Path,
    cpus: &str,
    url: &str,
    seconds: u64,
    connections: u32,
    rate: f64,
) -> Command {
    let threads = super::cpu_set(cpus).len().max(1);
    let mut command = Command::new("taskset");
    command
        .args(["-c", cpus])
        .arg(oha)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
        ])
        .args(["--worker-threads", &threads.to_string()])
        .args(["-c", &connections.to_string()])
        .args(["-z", &format!("{seconds}s")])
        .args(["-q", &format!("{rate:.0}")])
        .arg(url);
    command
}

fn oha_sample(display: &str, out: &Output) -> anyhow::Result<Sample> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{display}` failed with {}:\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_oha(&text).with_context(|| format!("`{display}` printed:\n{text}"))
}

/// oha's `--output-format json`: `summary.requestsPerSec`,
/// `latencyPercentiles.p50`/`p99` (seconds), the status codes, the errors.
/// Requests cut off by the end of the run are not errors.
pub fn parse_oha(text: &str) -> anyhow::Result<Sample> {
    let report: Value = serde_json::from_str(text).context("oha printed no JSON")?;
    let number = |pointer: &str| {
        report
            .pointer(pointer)
            .and_then(Value::as_f64)
            .with_context(|| format!("no {pointer} in oha's JSON"))
    };
    let codes = report["statusCodeDistribution"]
        .as_object()
        .context("no statusCodeDistribution in oha's JSON")?;
    let mut requests = 0;
    for (code, count) in codes {
        let count = count.as_u64().unwrap_or(0);
        if !code.starts_with('2') {
            bail!("the server answered {count} requests with {code}");
        }
        requests += count;
    }
    let errors = report["errorDistribution"].as_object().map_or(0, |errors| {
        errors
            .iter()
            .filter(|(error, _)| !error.contains("aborted due to deadline"))
            .filter_map(|(_, count)| count.as_u64())
            .sum()
    });
    Ok(Sample {
        rps: number("/summary/requestsPerSec")?,
        p50_ms: number("/latencyPercentiles/p50")? * 1e3,
        p99_ms: number("/latencyPercentiles/p99")? * 1e3,
        requests,
        errors,
        load_cpu_pct: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://127.0.0.1:3996/fast
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   149.64us  104.53us   2.94ms   91.35%
    Req/Sec   108.46k     9.32k  116.72k    80.00%
  Latency Distribution
     50%  143.00us
     75%  162.00us
     90%  188.00us
     99%    1.50ms
  215177 requests in 2.00s, 26.88MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
Requests/sec: 107558.38
Transfer/sec:     13.44MB
";

    #[test]
    fn wrk_output_gives_rps_percentiles_and_errors() {
        let sample = parse_wrk(WRK).unwrap();
        assert!((sample.rps - 107_558.38).abs() < 1e-6);
        assert!((sample.p50_ms - 0.143).abs() < 1e-9);
        assert!((sample.p99_ms - 1.5).abs() < 1e-9);
        assert_eq!((sample.requests, sample.errors), (215_177, 5));
    }

    #[test]
    fn wrk_errors_and_missing_lines_fail() {
        let non_2xx = WRK.replace(
            "  Socket errors",
            "  Non-2xx or 3xx responses: 7\n  Socket errors",
        );
        assert!(parse_wrk(&non_2xx).is_err());
        let no_latency = WRK.replace("     99%    1.50ms\n", "");
        assert!(parse_wrk(&no_latency).is_err());
    }

    #[test]
    fn wrk_durations_in_every_unit() {
        assert_eq!(parse_wrk_duration_ms("250.00us"), Some(0.25));
        assert_eq!(parse_wrk_duration_ms("3.00ms"), Some(3.0));
        assert_eq!(parse_wrk_duration_ms("1.50s"), Some(1_500.0));
        assert_eq!(parse_wrk_duration_ms("2.00m"), Some(120_000.0));
        assert_eq!(parse_wrk_duration_ms("12"), None);
        assert_eq!(parse_wrk_duration_ms("1.0xs"), None);
    }

    #[test]
    fn oha_json_gives_rps_and_percentiles() {
        let text = r#"{"summary": {"successRate": 1.0, "requestsPerSec": 1996.5},
            "latencyPercentiles": {"p50": 0.000114, "p99": 0.002},
            "statusCodeDistribution": {"200": 3998},
            "errorDistribution": {"aborted due to deadline": 4, "connection reset": 1}}"#;
        let sample = parse_oha(text).unwrap();
        assert!((sample.rps - 1996.5).abs() < 1e-9);
        assert!((sample.p50_ms - 0.114).abs() < 1e-9);
        assert!((sample.p99_ms - 2.0).abs() < 1e-9);
        assert_eq!((sample.requests, sample.errors), (3998, 1));
        let failing = text.replace(r#"{"200": 3998}"#, r#"{"200": 3998, "500": 2}"#);
        assert!(parse_oha(&failing).is_err());
    }
}
