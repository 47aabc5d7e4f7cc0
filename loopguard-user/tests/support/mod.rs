//! Harness for the end-to-end tests: the example server, a tiny HTTP client,
//! the agent with its output read line by line, and background traffic.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod fleet;
pub mod freezes;
pub mod prometheus;
pub mod schema;

pub const LOOPGUARD: &str = env!("CARGO_BIN_EXE_loopguard");

/// Says that a test is run again because the machine stood still, on
/// stderr and, where `cargo xtask test` asked for it, in the file
/// `LOOPGUARD_RERUN_LOG` names: libtest keeps a passing test's stderr to
/// itself, and a green run must still say what it ran twice.
pub fn note_rerun(message: &str) {
    eprintln!("{message}");
    let Some(path) = std::env::var_os("LOOPGUARD_RERUN_LOG") else {
        return;
    };
    let line = format!("{}\n", message.lines().next().unwrap_or(message));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = written {
        eprintln!(
            "cannot note the rerun in {}: {error}",
            Path::new(&path).display()
        );
    }
}

/// A finished command's exit code (`None`: killed by a signal) and stderr.
pub fn code_and_stderr(out: &Output) -> (Option<i32>, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `loopguard ARGS` to completion (stdout discarded): exit code and stderr.
pub fn loopguard(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(LOOPGUARD)
        .args(args)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    code_and_stderr(&out)
}

/// Panics unless running as root: these tests load BPF programs for real.
pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("run id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the end-to-end tests load eBPF programs and must run as root: use `sudo -E cargo xtask test`"
    );
}

/// A server binary named by an environment variable that `cargo xtask test` sets.
pub fn server_binary(var: &str) -> PathBuf {
    let path = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set; run the end-to-end tests through `cargo xtask test`")
    });
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{var}={} does not exist; `cargo xtask test` builds it",
        path.display()
    );
    path
}

/// The agent's `/metrics` at `addr`, with curl.
pub fn scrape(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-sSf", &format!("http://{addr}/metrics")])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "scrape {addr}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A response: status code and JSON body (Null when the body is not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

/// One GET over a fresh HTTP/1.1 connection.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok(Response {
        status,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    })
}

/// The address in the first line a server prints, `listening on ADDR`.
pub fn listening_addr(child: &mut Child) -> SocketAddr {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap()
}

/// `command` started with its stdout piped, and a reader of that stdout.
pub fn spawn_piped(command: &mut Command) -> (Child, BufReader<ChildStdout>) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().expect("stdout piped");
    (child, BufReader::new(stdout))
}

/// The next line `reader` gives, with its newline (empty at the end).
pub fn next_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

/// The one-letter state of process `pid` (`S`: asleep, `T`: stopped).
pub fn process_state(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    after_name.split_whitespace().next().unwrap().to_owned()
}

/// Blocks a worker of the example server at `addr` for 200 ms
/// (`/block/sleep`), then waits up to `timeout` for the agent's first
/// stall, which must be that worker's: the server's response and the stall.
pub fn stall_a_worker(agent: &Agent, addr: SocketAddr, timeout: Duration) -> (Response, Line) {
    let blocked = http_get(addr, "/block/sleep?ms=200").unwrap();
    let stall = agent.wait_for("the stall", timeout, |v| v["type"] == "stall");
    assert_eq!(stall.value["tid"], blocked.body["tid"]);
    (blocked, stall)
}

/// The frames of a stall's stack, as `function` strings (none without a stack).
pub fn stack_functions(stall: &Value) -> Vec<String> {
    stall["stack"]
        .as_array()
        .map(|frames| {
            frames
                .iter()
                .filter_map(|frame| frame["function"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The example server, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

impl Server {
    pub fn start(binary: &Path, args: &[&str]) -> Self {
        Self::start_with_env(binary, args, &[])
    }

    /// Starts the server with extra environment variables.
    pub fn start_with_env(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary)
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let addr = listening_addr(&mut child);
        let pid = child.id();
        Self { child, addr, pid }
    }

    pub fn get(&self, path: &str) -> Response {
        let response = http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(response.status, 200, "GET {path}: {response:?}");
        response
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line the agent printed on stdout: JSON, or a plain string otherwise.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub value: Value,
}

/// A running `loopguard`, its stdout collected by a thread.
pub struct Agent {
    pub child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    reader: Option<JoinHandle<()>>,
    /// Stderr lines, when [`Self::start_capturing_stderr`] started it
    /// (they are echoed to the test's stderr too).
    stderr: Option<(SharedLines, JoinHandle<()>)>,
}

/// Lines a reader thread collects.
type SharedLines = Arc<Mutex<Vec<String>>>;

impl Agent {
    pub fn start(args: &[&str]) -> Self {
        let mut command = Command::new(LOOPGUARD);
        command.args(args);
        Self::spawn(command)
    }

    /// Like [`Self::start`], keeping the stderr lines for [`Self::stderr_lines`].
    pub fn start_capturing_stderr(args: &[&str]) -> Self {
        let mut command = Command::new(LOOPGUARD);
        command.args(args);
        Self::spawn_with(command, true)
    }

    /// Starts `command` (a `loopguard` command line) with its stdout read.
    pub fn spawn(command: Command) -> Self {
        Self::spawn_with(command, false)
    }

    fn spawn_with(mut command: Command, capture_stderr: bool) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("start loopguard");
        let stderr = child.stderr.take().map(|stderr| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    sink.lock().unwrap().push(line);
                }
            });
            (lines, reader)
        });
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let at = Instant::now();
                let mut sink = sink.lock().unwrap();
                for value in split_stdout_line(line) {
                    sink.push(Line { at, value });
                }
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
            stderr,
        }
    }

    /// What the agent printed on stderr so far (needs
    /// [`Self::start_capturing_stderr`]); complete once [`Self::wait`] returned.
    pub fn stderr_lines(&self) -> Vec<String> {
        let (lines, _) = self
            .stderr
            .as_ref()
            .expect("started with start_capturing_stderr");
        lines.lock().unwrap().clone()
    }

    /// Ids of the BPF programs this agent holds now.
    pub fn programs(&self) -> Vec<u64> {
        programs_held_by(self.child.id())
    }

    /// Programs this agent loads to find steal time: the timer program,
    /// and the runtime-update one where the attached line says the run
    /// queue's steal clock cannot be read.
    pub fn steal_programs(&self) -> usize {
        let lines = self.lines();
        let attached = of_type(&lines, "attached");
        let clock = attached.first().map(|a| a["steal_clock"].clone());
        match clock.as_ref().and_then(Value::as_str) {
            Some("run queue") => 1,
            Some("runtime updates") => 2,
            other => panic!("the attached line's steal_clock: {other:?}"),
        }
    }

    /// `loopguard attach --pid PID --format json` plus `args`; waits until attached.
    pub fn attach(pid: u32, args: &[&str]) -> Self {
        let pid = pid.to_string();
        let mut all = vec!["attach", "--pid", &pid, "--format", "json"];
        all.extend_from_slice(args);
        let agent = Self::start(&all);
        agent.wait_for("the attached line", Duration::from_secs(20), |v| {
            v["type"] == "attached"
        });
        agent
    }

    /// Waits for a line matching `pred`; panics with everything seen on timeout.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Line {
        self.wait_for_since(None, what, timeout, pred)
    }

    /// The `listening on ADDR` line of a server the agent runs (its
    /// output passed through on stdout), and that address.
    pub fn wait_for_listening(&self, timeout: Duration) -> (Line, SocketAddr) {
        let line = self.wait_for("the server's address", timeout, |v| {
            v.as_str().is_some_and(|s| s.starts_with("listening on "))
        });
        let addr = line.value.as_str().unwrap()["listening on ".len()..]
            .trim()
            .parse()
            .unwrap();
        (line, addr)
    }

    /// Like [`Self::wait_for`], counting only lines printed after `since`.
    pub fn wait_for_since(
        &self,
        since: Option<Instant>,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| since.is_none_or(|since| l.at > since) && pred(&l.value))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent printed {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The `stall_in_progress` line for something stuck since before
    /// attaching (`started_before_attach`) that also matches `pred`;
    /// asserts it came within a second of `attached`.
    pub fn wait_for_stuck_before_attach(
        &self,
        what: &str,
        attached: Instant,
        pred: impl Fn(&Value) -> bool,
    ) -> Line {
        let line = self.wait_for(what, Duration::from_secs(3), |v| {
            v["type"] == "stall_in_progress"
                && v["started_before_attach"] == Value::Bool(true)
                && pred(v)
        });
        assert!(
            line.at < attached + Duration::from_secs(1),
            "{what}: reported {:?} after attaching",
            line.at - attached
        );
        line
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the agent to exit (up to `timeout`), then returns its status and output.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, Vec<Line>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "loopguard did not exit within {timeout:?}; it printed {:#?}",
                    self.lines()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.reader.take().unwrap().join().unwrap();
        (status, self.lines())
    }

    /// Like [`Self::wait`], plus every stderr line (needs
    /// [`Self::start_capturing_stderr`]).
    pub fn wait_with_stderr(mut self, timeout: Duration) -> (ExitStatus, Vec<Line>, Vec<String>) {
        let (lines, reader) = self
            .stderr
            .take()
            .expect("started with start_capturing_stderr");
        let (status, stdout) = self.wait(timeout);
        reader.join().unwrap();
        let stderr = lines.lock().unwrap().clone();
        (status, stdout, stderr)
    }

    /// Ctrl+C, then the exit status and everything printed.
    pub fn interrupt(self) -> (ExitStatus, Vec<Line>) {
        self.signal("INT");
        self.wait(Duration::from_secs(15))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests to `/fast` in a loop on a thread, until stopped.
pub struct FastTraffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl FastTraffic {
    pub fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (Arc::clone(&stop), Arc::clone(&done));
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if http_get(addr, "/fast").is_ok_and(|r| r.status == 200) {
                    done2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            stop,
            done,
            handle: Some(handle),
        }
    }

    /// Stops and returns how many requests succeeded.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.done.load(Ordering::Relaxed)
    }
}

const PROGRAM_NAMES: [&str; 3] = ["poll_enter", "poll_exit", "thread_exit"];

/// `bpftool -j OBJECT show`, parsed.
fn bpftool_show(object: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["-j", object, "show"])
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    let listed: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    listed.as_array().cloned().unwrap_or_default()
}

/// Ids of the BPF programs process `pid` holds open, from the kernel's own
/// `/proc/PID/fdinfo` (other agents on the machine are not counted).
pub fn programs_held_by(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = fds
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog")
        })
        .filter_map(|fd| {
            std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()
        })
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("prog_id:")?.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Waits (up to 10 s: the kernel removes uprobes one grace period at a time)
/// until none of `programs` is loaded and no link points at one of them.
pub fn assert_detached(programs: &[u64]) {
    assert!(
        !programs.is_empty(),
        "no loopguard programs were recorded while attached"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loaded: Vec<u64> = bpftool_show("prog")
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect();
        let left: Vec<u64> = programs
            .iter()
            .copied()
            .filter(|id| loaded.contains(id))
            .collect();
        let links: Vec<Value> = bpftool_show("link")
            .into_iter()
            .filter(|link| {
                link["prog_id"]
                    .as_u64()
                    .is_some_and(|id| programs.contains(&id))
            })
            .collect();
        if left.is_empty() && links.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after detach: programs {left:?}, links {links:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    assert!(!events.contains("stall-server"), "uprobe_events: {events}");
}

/// Runs curl with `args` (URLs relative to `addr` start with `/`); panics
/// unless it succeeds.
pub fn curl(addr: SocketAddr, args: &[&str]) {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                format!("http://{addr}{a}")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    let out = Command::new("curl")
        .args(["-sSf", "-o", "/dev/null"])
        .args(&args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// JSON lines of one type.
/// A stall's cause is one of `kinds`, in one of `syscalls` when given.
pub fn assert_cause(stall: &Value, kinds: &[&str], syscalls: &[&str]) {
    let cause = &stall["cause"];
    let kind = cause["kind"].as_str().unwrap_or_default();
    assert!(kinds.contains(&kind), "cause {cause} of {stall}");
    if !syscalls.is_empty() {
        let syscall = cause["syscall"].as_str().unwrap_or_default();
        assert!(syscalls.contains(&syscall), "cause {cause} of {stall}");
    }
}

/// One line of the agent's stdout as values: its JSON object, or the line
/// as a string. Under `loopguard run` the command shares that stdout, so an
/// event can follow a line the command left unfinished (the test harness
/// prints `test name ... ` before a test's result): that prefix becomes a
/// string of its own and the event is still read.
fn split_stdout_line(line: String) -> Vec<Value> {
    if let Ok(value) = serde_json::from_str(&line) {
        return vec![value];
    }
    let embedded = line.match_indices('{').find_map(|(at, _)| {
        serde_json::from_str::<Value>(&line[at..])
            .ok()
            .filter(Value::is_object)
            .map(|value| (at, value))
    });
    match embedded {
        Some((at, value)) => vec![Value::String(line[..at].to_string()), value],
        None => vec![Value::String(line)],
    }
}

pub fn of_type<'a>(lines: &'a [Line], kind: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .map(|l| &l.value)
        .filter(|v| v["type"] == kind)
        .collect()
}
