//! End-to-end: a target that tries to steer, stall or fool the root agent.
//! Each test is one finding of issue #26, against a real process.
//! Run as root: `sudo -E cargo xtask test`.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    Agent, Server, http_get, next_line, of_type, prometheus::free_port, require_root,
    server_binary, spawn_piped, stack_functions,
};

/// A Python process running `script` (with `args`), once it printed `ready`.
struct Target {
    child: Child,
}

impl Target {
    fn start(script: &str, args: &[&str]) -> Self {
        Self::start_with("LOOPGUARD_PYTHON", script, args)
    }

    /// With the Python interpreter the environment variable `var` names.
    fn start_with(var: &str, script: &str, args: &[&str]) -> Self {
        let python = std::env::var_os(var).unwrap_or_else(|| {
            panic!("{var} is not set; run the end-to-end tests through `cargo xtask test`")
        });
        let (child, mut stdout) =
            spawn_piped(Command::new(python).arg("-c").arg(script).args(args));
        assert_eq!(
            next_line(&mut stdout).trim(),
            "ready",
            "the target did not start"
        );
        Self { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the target is no longer running"
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An event loop that only waits: an epoll instance and a sleep.
const IDLE_LOOP: &str = "
import select, time
ep = select.epoll()
print('ready', flush=True)
time.sleep(600)
";

/// Maps two copies of its C library executable, deletes them, and puts a
/// symlink to /dev/zero and a FIFO under the names /proc/PID/maps now
/// shows (`NAME (deleted)`).
const SWAPPED_LIBRARIES: &str = "
import mmap, os, select, sys, time
d = sys.argv[1]
libc = next(l.split()[-1] for l in open('/proc/self/maps') if '/libc.so' in l)
held = []
for name, swap in (('libc.so.evil', 'symlink'), ('libc.so.fifo', 'fifo')):
    path = os.path.join(d, name)
    with open(libc, 'rb') as src, open(path, 'wb') as dst:
        dst.write(src.read())
    with open(path, 'rb') as f:
        held.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC))
    os.unlink(path)
    if swap == 'symlink':
        os.symlink('/dev/zero', path + ' (deleted)')
    else:
        os.mkfifo(path + ' (deleted)')
ep = select.epoll()
print('ready', flush=True)
time.sleep(600)
";

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loopguard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The agent's peak resident size (`VmHWM`, MiB), watched until it exits
/// (at most `timeout`).
fn peak_rss_mib(agent: &mut Agent, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let status = format!("/proc/{}/status", agent.child.id());
    let mut peak = 0;
    while agent.child.try_wait().unwrap().is_none() {
        let hwm = std::fs::read_to_string(&status)
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        peak = peak.max(hwm.unwrap_or(0) >> 10);
        if Instant::now() > deadline {
            let _ = agent.child.kill();
            panic!("loopguard did not exit within {timeout:?} (peak {peak} MiB)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    peak
}

/// `attach --duration 2` to `target` in JSON, which must succeed with one
/// `attached` line within `timeout`: how long it took in all and the
/// agent's peak RSS (MiB).
fn attach_for_two_seconds(target: &Target, timeout: Duration) -> (Duration, u64) {
    let started = Instant::now();
    let pid = target.pid().to_string();
    let mut agent = Agent::start_capturing_stderr(&[
        "attach",
        "--pid",
        &pid,
        "--format",
        "json",
        "--duration",
        "2",
    ]);
    let rss = peak_rss_mib(&mut agent, timeout);
    let (status, lines, stderr) = agent.wait_with_stderr(Duration::from_secs(5));
    let took = started.elapsed();
    assert!(
        status.success(),
        "attach failed: {status}; stderr: {stderr:#?}"
    );
    assert_eq!(
        support::of_type(&lines, "attached").len(),
        1,
        "no attached line: {lines:#?}"
    );
    (took, rss)
}

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn libraries_swapped_for_dev_zero_and_a_fifo_do_not_stall_attach() {
    require_root();
    let dir = scratch_dir("swapped");
    let mut target = Target::start(SWAPPED_LIBRARIES, &[dir.to_str().unwrap()]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.pid())).unwrap();
    assert!(
        maps.contains("libc.so.evil (deleted)") && maps.contains("libc.so.fifo (deleted)"),
        "the target did not map the swapped libraries: {maps}"
    );
    let (took, rss) = attach_for_two_seconds(&target, Duration::from_secs(40));
    assert!(
        took < Duration::from_secs(20),
        "attach and 2 s of watching took {took:?}"
    );
    assert!(rss < 512, "the agent grew to {rss} MiB");
    target.assert_running();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Starts `command` with at most `limit` open descriptors (soft and hard).
fn limit_descriptors(command: &mut Command, limit: libc::rlim_t) {
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn two_thousand_idle_metrics_connections_do_not_end_the_watch() {
    require_root();
    let mut target = Target::start(IDLE_LOOP, &[]);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let pid = target.pid().to_string();
    let mut command = Command::new(support::LOOPGUARD);
    command.args([
        "attach",
        "--pid",
        &pid,
        "--format",
        "json",
        "--metrics-addr",
        &metrics,
    ]);
    // The common default: 1,024 descriptors, fewer than the connections.
    limit_descriptors(&mut command, 1024);
    let mut agent = Agent::spawn(command);
    agent.wait_for("the attached line", Duration::from_secs(20), |v| {
        v["type"] == "attached"
    });
    let addr: SocketAddr = metrics.parse().unwrap();
    let idle: Vec<TcpStream> = (0..2000)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    assert!(idle.len() > 1500, "only {} connections opened", idle.len());
    // The agent checks the target's liveness every few hundred ms.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the watch ended with {} idle connections open: {:#?}",
        idle.len(),
        agent.lines()
    );
    let response = http_get(addr, "/metrics").expect("a scrape with idle connections open");
    assert_eq!(response.status, 200);
    drop(idle);
    target.assert_running();
    let (status, lines) = agent.interrupt();
    assert!(status.success(), "{status}: {lines:#?}");
    assert!(
        support::of_type(&lines, "summary").len() == 1,
        "the watch did not end with a summary: {lines:#?}"
    );
}

/// `loopguard run ARGS -- sh -c 'echo ids=UID:GID:GROUPS'` with `env`
/// added; returns what the command printed.
fn run_ids(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(support::LOOPGUARD);
    command
        .args(["run", "--format", "json"])
        .args(args)
        .args(["--", "sh", "-c", "echo ids=$(id -u):$(id -g):$(id -G)"])
        .current_dir("/")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .env_remove("SUDO_USER")
        .stderr(Stdio::piped());
    for (var, value) in env {
        command.env(var, value);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Nothing the shell runs is watchable: `run` ends with 125 then.
    assert_eq!(
        out.status.code(),
        Some(125),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("ids="))
        .unwrap_or_else(|| panic!("the command printed no ids: {stdout}"))
        .to_owned()
}

#[test]
#[ignore = "needs root; run via `cargo xtask test`"]
fn run_under_sudo_starts_the_command_as_the_user_who_ran_sudo() {
    require_root();
    let sudo = [
        ("SUDO_UID", "65534"),
        ("SUDO_GID", "65534"),
        ("SUDO_USER", "nobody"),
    ];
    assert_eq!(run_ids(&[], &sudo), "65534:65534:65534");
    assert!(
        run_ids(&["--as-root"], &sudo).starts_with("0:0:"),
        "--as-root keeps root"
    );
    assert_eq!(run_ids(&["--user", "nobody"], &[]), "65534:65534:65534");
    // Root without sudo: root is who invoked it.
    assert!(run_ids(&[], &[]).starts_with("0:0:"));
}

/// An event loop whose second thread renames itself to `name` and whose
/// executable path holds terminal escapes; prints `ready TID`.
const ESCAPING_LOOP: &str = "
import os, select, sys, threading, time
epoll = sys.argv[1] == 'epoll'
ep = select.epoll() if epoll else None
named = threading.Event()
def rename():
    tid = threading.get_native_id()
    with open(f'/proc/self/task/{tid}/comm', 'w') as comm:
        comm.write('\\x1b[2J\\x9bX')
    print('ready', tid, flush=True)
    time.sleep(600)
threading.Thread(target=rename, daemon=True).start()
time.sleep(600)
";

/// A hard link to the Python interpreter under a name full of escapes.
fn python_under_hostile_name(dir: &std::path::Path) -> PathBuf {
    let python = std::env::var_os("LOOPGUARD_PYTHON")
        .expect("LOOPGUARD_PYTHON is not set; run the end-to-end tests through `cargo xtask test`");
    let real = std::fs::canonicalize(python).unwrap();
    let evil = dir.join("py\u{1b}]0;owned\u{7}\u{1b}[31m\u{202e}");
    if std::fs::hard_link(&real, &evil).is_err() {
        std::fs::copy(&real, &evil).unwrap();
    }
    evil
}

/// `loopguard ARGS`, its stderr once it exited (within 30 s).
fn stderr_of(args: &[&str]) -> String {
    let mut child = Command::new(support::LOOPGUARD)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "loopguard {args:?} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

fn assert_no_escapes(stderr: &str, what: &str) {
    for bad in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
        assert!(
            !stderr.contains(bad),
            "{what}: a raw {bad:?} reached the terminal: {stderr:?}"
        );
    }
}

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn target_strings_cannot_drive_the_terminal() {
    require_root();
    let dir = scratch_dir("escapes");
    let python = python_under_hostile_name(&dir);
    let start = |mode: &str| {
        let (child, mut stdout) = spawn_piped(
            Command::new(&python)
                .args(["-c", ESCAPING_LOOP, mode])
                .stderr(Stdio::null()),
        );
        let line = next_line(&mut stdout);
        let tid = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("the target did not start: {line:?}"))
            .to_owned();
        (Target { child }, tid)
    };
    // Watched: the "watching" line names the exe; --pid TID names the thread.
    let (watched, tid) = start("epoll");
    let stderr = stderr_of(&["attach", "--pid", &tid, "--duration", "1"]);
    assert!(stderr.contains("is a thread of process"), "{stderr}");
    assert!(stderr.contains("watching pid"), "{stderr}");
    assert!(stderr.contains("\\u{1b}]0;owned"), "{stderr}");
    assert_no_escapes(&stderr, "the watching and thread lines");
    drop(watched);
    // Refused: the discovery error names the exe.
    let (mut refused, _) = start("no-epoll");
    let pid = refused.pid().to_string();
    let stderr = stderr_of(&["attach", "--pid", &pid]);
    assert!(stderr.contains("loopguard: error:"), "{stderr}");
    assert_no_escapes(&stderr, "a discovery error");
    refused.assert_running();
    std::fs::remove_dir_all(dir).unwrap();
}

/// The children of process `pid` (every thread's).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        children.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    children
}

/// `/proc/PID/stat`'s state letter and `comm`.
fn state_and_name(pid: u32) -> (String, String) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let name = stat
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(')'))
        .map(|(name, _)| name.to_owned())
        .unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    (state, name)
}

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn the_watchdog_lives_under_a_low_descriptor_limit() {
    require_root();
    let mut command = Command::new(support::LOOPGUARD);
    command.args(["run", "--format", "json", "--", "sh", "-c", "sleep 8"]);
    limit_descriptors(&mut command, 512);
    let agent = Agent::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(5);
    let watchdog = loop {
        let found = children_of(agent.child.id())
            .into_iter()
            .map(|pid| (pid, state_and_name(pid)))
            .find(|(_, (_, name))| name == "loopguard");
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no watchdog child of loopguard");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Give a failing watchdog the time to exit.
    std::thread::sleep(Duration::from_millis(500));
    let (state, _) = state_and_name(watchdog.0);
    assert!(
        state != "Z" && state != "X" && state != "?",
        "the watchdog (pid {}) exited under RLIMIT_NOFILE=512 (state {state})",
        watchdog.0
    );
    // Nothing it runs is watchable: `run` ends with 125 once `sleep` ends.
    let (status, lines) = agent.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(125), "{lines:#?}");
}

/// An event loop with 10,000 more threads, all asleep.
const MANY_SLEEPERS: &str = "
import select, threading, time
threading.stack_size(64 * 1024)
ep = select.epoll()
stop = threading.Event()
for _ in range(10000):
    threading.Thread(target=stop.wait, daemon=True).start()
print('ready', flush=True)
time.sleep(600)
";

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn ten_thousand_sleeping_threads_keep_attach_small_and_quick() {
    require_root();
    let mut target = Target::start(MANY_SLEEPERS, &[]);
    let (took, rss) = attach_for_two_seconds(&target, Duration::from_mins(1));
    assert!(
        took < Duration::from_secs(30),
        "attach and 2 s of watching took {took:?}"
    );
    assert!(
        rss < 256,
        "the agent grew to {rss} MiB for 10,000 sleeping threads"
    );
    target.assert_running();
}

/// An asyncio loop that blocks in `sleep(6)` called from code it wrote into
/// an anonymous executable page (a JIT frame), with a FIFO where a perf map
/// of its JIT code would be.
const JIT_FRAME_AND_FIFO_PERF_MAP: &str = "
import asyncio, ctypes, mmap, os, struct
libc = ctypes.CDLL(None)
sleep = ctypes.cast(libc.sleep, ctypes.c_void_p).value
# sub rsp,8; mov edi,6; movabs rax,sleep; call rax; add rsp,8; ret
code = (b'\\x48\\x83\\xec\\x08\\xbf\\x06\\x00\\x00\\x00\\x48\\xb8' + struct.pack('<Q', sleep)
        + b'\\xff\\xd0\\x48\\x83\\xc4\\x08\\xc3')
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
jit = ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
os.mkfifo(f'/tmp/perf-{os.getpid()}.map')
async def main():
    print('ready', flush=True)
    await asyncio.sleep(0.3)
    jit()
    await asyncio.sleep(600)
asyncio.run(main())
";

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn a_jit_frame_and_a_fifo_perf_map_leave_the_rest_of_the_stack_named() {
    require_root();
    let target = Target::start(JIT_FRAME_AND_FIFO_PERF_MAP, &[]);
    let perf_map = PathBuf::from(format!("/tmp/perf-{}.map", target.pid()));
    std::thread::sleep(Duration::from_secs(1));
    let agent = Agent::attach(target.pid(), &["--duration", "4"]);
    let stuck = agent.wait_for("the loop stuck in sleep", Duration::from_secs(5), |v| {
        v["type"] == "stall_in_progress"
    });
    let (status, lines) = agent.wait(Duration::from_secs(20));
    let _ = std::fs::remove_file(&perf_map);
    assert!(status.success(), "{lines:#?}");
    let functions = stack_functions(&stuck.value);
    assert!(
        functions
            .iter()
            .any(|f| f.contains("sleep") || f.contains("nanosleep")),
        "the C library's frames are named beside the JIT frame: {functions:?}"
    );
}

/// Maps a copy of its C library named like a libpython, deletes it and puts
/// a FIFO under the name the maps show; then its loop blocks in Python.
const SWAPPED_LIBPYTHON: &str = "
import asyncio, mmap, os, sys, time
d = sys.argv[1]
libc = next(l.split()[-1] for l in open('/proc/self/maps') if '/libc.so' in l)
path = os.path.join(d, 'libpython3.fifo.so')
with open(libc, 'rb') as src, open(path, 'wb') as dst:
    dst.write(src.read())
with open(path, 'rb') as f:
    held = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC)
os.unlink(path)
os.mkfifo(path + ' (deleted)')
async def main():
    print('ready', flush=True)
    await asyncio.sleep(0.3)
    time.sleep(6)
    await asyncio.sleep(600)
asyncio.run(main())
";

#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn a_libpython_swapped_for_a_fifo_does_not_hang_the_python_stacks() {
    require_root();
    let dir = scratch_dir("libpython");
    // A Python whose interpreter is in libpython (pyenv's), so the
    // libraries are searched.
    let mut target = Target::start_with(
        "LOOPGUARD_PYTHON_3_12",
        SWAPPED_LIBPYTHON,
        &[dir.to_str().unwrap()],
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.pid())).unwrap();
    assert!(maps.contains("libpython3.fifo.so (deleted)"), "{maps}");
    std::thread::sleep(Duration::from_secs(1));
    let agent = Agent::attach(target.pid(), &["--duration", "4"]);
    let stuck = agent.wait_for(
        "the loop stuck in time.sleep",
        Duration::from_secs(5),
        |v| v["type"] == "stall_in_progress",
    );
    let (status, lines) = agent.wait(Duration::from_secs(20));
    assert!(status.success(), "{lines:#?}");
    let frames = stuck.value["stack"].as_array().cloned().unwrap_or_default();
    assert!(
        frames.iter().any(|f| f["function"] == "main"),
        "the Python frames are read from the real libpython: {}",
        stuck.value
    );
    target.assert_running();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A Tokio service whose directory holds a FIFO where blazesym looks for a
/// DWARF package (`SERVICE.dwp`) and a `/dev/zero` link where a debug file
/// could be: the stall is reported with its named stack, without
/// `file:line` from DWARF, and the agent neither hangs nor reads on.
#[test]
#[ignore = "needs root and a kernel with BPF; run via `cargo xtask test`"]
fn a_fifo_where_a_dwarf_package_would_be_does_not_hang_symbolization() {
    require_root();
    let dir = scratch_dir("dwp");
    let binary = dir.join("service");
    std::fs::copy(server_binary("LOOPGUARD_SERVER"), &binary).unwrap();
    let fifo = std::ffi::CString::new(format!("{}.dwp", binary.display())).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let server = Server::start(&binary, &["--flavor", "multi-thread", "--workers", "2"]);
    let agent = Agent::attach(server.pid, &["--threshold-ms", "50"]);
    server.get("/block/sleep?ms=200");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (status, lines) = agent.interrupt();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the agent took {:?} to stop",
        started.elapsed()
    );
    assert!(status.success(), "loopguard exited with {status}");
    let stalls = of_type(&lines, "stall");
    assert_eq!(stalls.len(), 1, "{lines:#?}");
    let functions = stack_functions(stalls[0]);
    assert!(
        functions.iter().any(|f| f.contains("block")),
        "the service's frames keep their names: {functions:?}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
