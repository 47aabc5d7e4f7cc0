//! The scale check of `loopguard watch --all` (issue #28): many targets of
//! the three runtimes, some started before the watch and some during, a
//! stall injected into each, churn, and what the agent holds over time.
//!
//! Pure harness: [`Fleet`] starts and stops the targets, [`Holdings`] is
//! one sample of what the agent holds (memory, BPF objects, fds, series),
//! [`Churn`] starts a short-lived process every second on a thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{http_get, listening_addr, prometheus::free_port, server_binary};

/// The event-loop runtimes of the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tokio,
    Python,
    Node,
}

impl Kind {
    /// The n-th target's runtime: three Tokio, one Python, one Node, again.
    pub fn of(n: usize) -> Self {
        match n % 5 {
            3 => Self::Python,
            4 => Self::Node,
            _ => Self::Tokio,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tokio => "tokio",
            Self::Python => "python",
            Self::Node => "node",
        }
    }

    /// The request that blocks the loop for `ms`, the stall's `kind` and
    /// the route the metrics name it by.
    pub fn stall(self, ms: u64, tag: &str) -> (String, &'static str, &'static str) {
        match self {
            Self::Tokio => (format!("/block/sleep?ms={ms}"), "poll", "/block/sleep"),
            Self::Python => (format!("/sleep/{tag}?ms={ms}"), "loop", "/sleep/{tag}"),
            // CPU time: a loaded machine leaves a wall-clock busy loop too
            // little of it to hold the loop past the threshold (loopguard
            // judges held time, not time preempted).
            Self::Node => (format!("/busy?ms={ms}&clock=cpu"), "loop", "none"),
        }
    }
}

/// One target of the fleet, killed on drop.
pub struct Target {
    pub kind: Kind,
    pub service: String,
    pub child: Child,
    pub addr: SocketAddr,
    pub started: Instant,
}

impl Target {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the target (does not wait for it to answer: [`Self::ready`]).
    pub fn start(kind: Kind, service: &str, container: &str) -> Self {
        let env = [
            ("LOOPGUARD_SERVICE", service),
            ("CONTAINER_NAME", container),
        ];
        let started = Instant::now();
        let (child, addr) = match kind {
            Kind::Tokio => {
                let mut child = Command::new(tokio_binary())
                    .args(["--addr", "127.0.0.1:0"])
                    .envs(env)
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start the example");
                let addr = listening_addr(&mut child);
                (child, addr)
            }
            Kind::Python => {
                let port = free_port();
                let child = Command::new(python())
                    .args(["-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1"])
                    .args(["--port", &port.to_string(), "--log-level", "warning"])
                    .arg("--app-dir")
                    .arg(loop_servers())
                    .envs(env)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start uvicorn");
                (child, SocketAddr::from(([127, 0, 0, 1], port)))
            }
            Kind::Node => {
                let mut child = Command::new("node")
                    .arg(loop_servers().join("server.js"))
                    .envs(env)
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start node (`cargo xtask setup` installs Debian's nodejs)");
                let addr = listening_addr(&mut child);
                (child, addr)
            }
        };
        Self {
            kind,
            service: service.to_owned(),
            child,
            addr,
            started,
        }
    }

    /// Waits until the target answers `/fast`.
    pub fn ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !http_get(self.addr, "/fast").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "{} ({}) did not answer within {timeout:?}",
                self.service,
                self.kind.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tokio_binary() -> PathBuf {
    server_binary("LOOPGUARD_SERVER")
}

fn python() -> std::ffi::OsString {
    std::env::var_os("LOOPGUARD_PYTHON")
        .expect("LOOPGUARD_PYTHON is not set; run the end-to-end tests through `cargo xtask test`")
}

fn loop_servers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/loop-servers")
}

/// What the agent holds at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub progs: usize,
    pub maps: usize,
    pub links: usize,
    pub perf_events: usize,
    pub fds: usize,
    /// Series on `/metrics`, the host's own families left out.
    pub series: usize,
    pub watched: usize,
}

impl Holdings {
    /// Reads what process `pid` holds, and its `/metrics` text.
    pub fn of(pid: u32, metrics: &str) -> Self {
        let mut held = Self::default();
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.filter_map(Result::ok) {
                held.fds += 1;
                let target = std::fs::read_link(fd.path()).unwrap_or_default();
                match target.to_string_lossy().as_ref() {
                    "anon_inode:bpf-prog" => held.progs += 1,
                    "anon_inode:bpf-map" => held.maps += 1,
                    "anon_inode:bpf_link" => held.links += 1,
                    "anon_inode:[perf_event]" => held.perf_events += 1,
                    _ => {}
                }
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        held.rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command (which may hold spaces): utime is 14th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        held.cpu_ticks = tick(11).unwrap_or(0) + tick(12).unwrap_or(0);
        held.series = metrics
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("loopguard_host_"))
            .count();
        held.watched = metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"loopguard_host_targets{state="watched"} "#))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        held
    }

    /// The BPF objects, links and perf events held.
    pub fn bpf(&self) -> (usize, usize, usize, usize) {
        (self.progs, self.maps, self.links, self.perf_events)
    }
}

impl std::fmt::Display for Holdings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rss {:.1} MiB, cpu {:.2} s, {} watched, progs {}, maps {}, links {}, perf events {}, fds {}, series {}",
            self.rss_kib as f64 / 1024.0,
            self.cpu_ticks as f64 / 100.0,
            self.watched,
            self.progs,
            self.maps,
            self.links,
            self.perf_events,
            self.fds,
            self.series
        )
    }
}

/// A Tokio process started every second and killed two seconds later,
/// on a thread, until stopped. All carry one service name: a service
/// that keeps restarting.
pub struct Churn {
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Churn {
    pub fn start(service: &str, container: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let (stop2, started2) = (Arc::clone(&stop), Arc::clone(&started));
        let env = [
            ("LOOPGUARD_SERVICE".to_owned(), service.to_owned()),
            ("CONTAINER_NAME".to_owned(), container.to_owned()),
        ];
        let binary = tokio_binary();
        let handle = std::thread::spawn(move || {
            let mut alive: std::collections::VecDeque<Child> = std::collections::VecDeque::new();
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let child = Command::new(&binary)
                    .args(["--addr", "127.0.0.1:0"])
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start a churn process");
                started2.fetch_add(1, Ordering::Relaxed);
                alive.push_back(child);
                if alive.len() > 2 {
                    let mut old = alive.pop_front().unwrap();
                    let _ = old.kill();
                    let _ = old.wait();
                }
                next += Duration::from_secs(1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for mut child in alive {
                let _ = child.kill();
                let _ = child.wait();
            }
        });
        Self {
            stop,
            started,
            handle: Some(handle),
        }
    }

    /// Stops (every churn process killed); how many were started.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.started.load(Ordering::Relaxed)
    }
}

/// [`Holdings`] of one process sampled every few seconds on a thread,
/// with the ids of every BPF program it held at any sample.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<std::sync::Mutex<Vec<(Duration, Holdings)>>>,
    programs: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    handle: Option<JoinHandle<()>>,
    pub started: Instant,
}

impl Sampler {
    pub fn start(pid: u32, metrics_addr: &str, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let programs = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let started = Instant::now();
        let (stop2, samples2, programs2) = (
            Arc::clone(&stop),
            Arc::clone(&samples),
            Arc::clone(&programs),
        );
        let addr = metrics_addr.to_owned();
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let held = Holdings::of(pid, &scrape_quietly(&addr));
                programs2
                    .lock()
                    .unwrap()
                    .extend(super::programs_held_by(pid));
                eprintln!("fleet: +{:>5.0} s {held}", started.elapsed().as_secs_f64());
                samples2.lock().unwrap().push((started.elapsed(), held));
                let deadline = Instant::now() + every;
                while Instant::now() < deadline && !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Self {
            stop,
            samples,
            programs,
            handle: Some(handle),
            started,
        }
    }

    /// The samples taken between `from` and `to` (times since the start).
    pub fn between(&self, from: Duration, to: Duration) -> Vec<Holdings> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, held)| *held)
            .collect()
    }

    /// Stops; every program id seen.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.programs.lock().unwrap().iter().copied().collect()
    }
}

/// `/metrics` at `addr`, or nothing when it does not answer.
pub fn scrape_quietly(addr: &str) -> String {
    Command::new("curl")
        .args([
            "-sSf",
            "--max-time",
            "10",
            &format!("http://{addr}/metrics"),
        ])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}
