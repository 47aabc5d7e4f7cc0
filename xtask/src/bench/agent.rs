//! The loopguard agent under measurement, and what /proc says about it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::scrape::{self, Scraper};

/// How long attaching may take (discovery + loading + one uprobe per copy).
const ATTACH_TIMEOUT: Duration = Duration::from_mins(1);
/// How long detaching may take (the kernel drops uprobes ~100 ms apiece).
const DETACH_TIMEOUT: Duration = Duration::from_mins(1);
/// `USER_HZ`: the unit of utime/stime in /proc/PID/stat, 100 on every Linux
/// architecture the agent supports.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// `loopguard attach --format json` on a pid, pinned with taskset; detached
/// (SIGINT, as Ctrl+C) by [`Agent::detach`] or, failing that, on drop.
pub struct Agent {
    child: Option<Child>,
    /// Stdout lines after the `attached` one.
    lines: Receiver<String>,
    /// Collects stderr (detach progress, diagnostics) to show on failure.
    stderr: Option<JoinHandle<Vec<String>>>,
    pub attached: Value,
    pub attach_secs: f64,
    /// Scrapes `/metrics` while attached (`--scrape-every-ms`).
    scraper: Option<Scraper>,
}

/// Resident memory of a process, in KiB.
#[derive(Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident so far.
    pub hwm_kib: u64,
}

impl Agent {
    pub fn attach(
        loopguard: &Path,
        pid: u32,
        cpus: &str,
        threshold_ms: u64,
        extra_args: &[String],
        scrape_every: Option<Duration>,
    ) -> anyhow::Result<Self> {
        Self::start(
            loopguard,
            &["attach", "--pid", &pid.to_string()],
            cpus,
            threshold_ms,
            extra_args,
            scrape_every,
        )
    }

    /// `loopguard watch --all --exe EXE`: the target as one of the host's,
    /// attached to by the host agent (its first `attached` line).
    pub fn watch_all(
        loopguard: &Path,
        exe: &Path,
        cpus: &str,
        threshold_ms: u64,
        extra_args: &[String],
    ) -> anyhow::Result<Self> {
        let exe = exe.to_str().context("a target path that is not UTF-8")?;
        Self::start(
            loopguard,
            &["watch", "--all", "--exe", exe],
            cpus,
            threshold_ms,
            extra_args,
            None,
        )
    }

    fn start(
        loopguard: &Path,
        what: &[&str],
        cpus: &str,
        threshold_ms: u64,
        extra_args: &[String],
        scrape_every: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let start = Instant::now();
        let metrics_addr = match scrape_every {
            Some(_) => {
                Some(scrape::free_addr().context("failed to find a port for --metrics-addr")?)
            }
            None => None,
        };
        let mut command = Command::new("taskset");
        command.args(["-c", cpus]).arg(loopguard).args(what);
        if let Some(addr) = metrics_addr {
            command.args(["--metrics-addr", &addr.to_string()]);
        }
        command
            .args(["--threshold-ms", &threshold_ms.to_string()])
            .args(["--format", "json"])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start `{}`", crate::cmd::display(&command)))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let mut agent = Self {
            child: Some(child),
            lines,
            stderr: Some(stderr),
            attached: Value::Null,
            attach_secs: 0.0,
            scraper: None,
        };
        let deadline = start + ATTACH_TIMEOUT;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match agent.lines.recv_timeout(wait) {
                Ok(line) => {
                    let Ok(value) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if value["type"] == "attached" {
                        agent.attached = value;
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let stderr = agent.stop_and_collect_stderr();
                    bail!(
                        "loopguard did not attach within {} s:\n{stderr}",
                        ATTACH_TIMEOUT.as_secs()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let stderr = agent.stop_and_collect_stderr();
                    bail!("loopguard exited without attaching:\n{stderr}");
                }
            }
        }
        agent.attach_secs = start.elapsed().as_secs_f64();
        if let (Some(addr), Some(every)) = (metrics_addr, scrape_every) {
            agent.scraper = Some(Scraper::start(addr, every));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The stdout lines (JSON events) printed since the last call.
    pub fn take_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Whether the agent is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// CPU time the agent has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    pub fn memory(&self) -> Memory {
        memory(self.pid())
    }

    /// SIGINT, then the `summary` line, then the exit status.
    pub fn detach(mut self) -> anyhow::Result<Value> {
        if let Some(scraper) = self.scraper.take() {
            let (ok, failed) = scraper.stop();
            eprintln!("bench: {ok} scrapes of /metrics answered, {failed} failed");
        }
        let mut child = self.child.take().expect("detached once");
        interrupt(child.id());
        let deadline = Instant::now() + DETACH_TIMEOUT;
        let mut summary = None;
        while summary.is_none() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(wait) {
                Ok(line) => {
                    summary = serde_json::from_str::<Value>(&line)
                        .ok()
                        .filter(|value| value["type"] == "summary");
                }
                Err(_) => break,
            }
        }
        let status = wait_until(&mut child, deadline)?;
        let stderr = self.collect_stderr();
        match (status, summary) {
            (Some(status), Some(summary)) if status.success() => Ok(summary),
            (Some(status), _) => bail!("loopguard exited with {status} when detaching:\n{stderr}"),
            (None, _) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "loopguard did not detach within {} s; killed it:\n{stderr}",
                    DETACH_TIMEOUT.as_secs()
                )
            }
        }
    }

    fn collect_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
            .join("\n")
    }

    fn stop_and_collect_stderr(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.collect_stderr()
    }
}

impl Drop for Agent {
    /// On an error path: detach as Ctrl+C would, so no probes stay behind
    /// for longer than the agent lives.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            interrupt(child.id());
            if !matches!(
                wait_until(&mut child, Instant::now() + DETACH_TIMEOUT),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Waits for `child` to exit until `deadline`; `None` when it has not.
fn wait_until(
    child: &mut Child,
    deadline: Instant,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGINT, as Ctrl+C would.
pub fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}

/// utime + stime of a process, in seconds; 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    parse_cpu_ticks(&stat) / CLOCK_TICKS_PER_SEC
}

/// Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the
/// command name, which may itself hold spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> f64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum()
}

/// `VmRSS` and `VmHWM` of a process; zeros when it is gone.
pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    parse_memory(&status)
}

fn parse_memory(status: &str) -> Memory {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 900 0 0 0 37 5 0 0 20 0 3 0";
        assert!((parse_cpu_ticks(stat) - 42.0).abs() < f64::EPSILON);
        assert!(parse_cpu_ticks("").abs() < f64::EPSILON);
    }

    #[test]
    fn memory_reads_rss_and_peak() {
        let status = "Name:\tloopguard\nVmHWM:\t   25796 kB\nVmRSS:\t   13860 kB\n";
        let memory = parse_memory(status);
        assert_eq!((memory.rss_kib, memory.hwm_kib), (13_860, 25_796));
    }
}
