//! End-to-end tests of `loopguard watch --all` (issue #28): real processes
//! (Tokio, uvicorn, Node) started before and during the watch, attached to as they come, their
//! stalls on one `/metrics` labelled by who they are, processes that
//! cannot be watched said once, the budgets (targets, memory), and a clean detach.
//!
//! The targets carry `CONTAINER_NAME` set to a name of this test run's own
//! and the watch selects `--container` on it: the machine runs other
//! developers' copies of the same programs, which must not be touched.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::prometheus::free_port;
use support::{Agent, Server, assert_detached, http_get, require_root, scrape, server_binary};

/// This run's container name: the selector that keeps the watch to our
/// own processes.
fn tag() -> String {
    format!("loopguard-host-e2e-{}", std::process::id())
}

/// A copy of the example under another name (the service label it gets).
fn copy_as(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(server_binary("LOOPGUARD_SERVER"), &path).unwrap();
    path
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{name}", tag()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(binary: &Path) -> Server {
    Server::start_with_env(binary, &[], &[("CONTAINER_NAME", &tag())])
}

/// The value of the first series of `name` whose labels hold every one
/// of `labels` (`key="value"` each).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn attached(agent: &Agent, pid: u32, within: Duration) -> Value {
    agent
        .wait_for(&format!("pid {pid} attached"), within, |v| {
            v["type"] == "attached" && v["pid"] == pid
        })
        .value
}

/// uvicorn serving `examples/loop-servers/app.py`, with our tag.
struct Uvicorn {
    child: Child,
    port: u16,
}

impl Uvicorn {
    fn start() -> Self {
        let python = std::env::var_os("LOOPGUARD_PYTHON").expect(
            "LOOPGUARD_PYTHON is not set; run the end-to-end tests through `cargo xtask test`",
        );
        let port = free_port();
        let child = Command::new(python)
            .args(["-m", "uvicorn", "app:app", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--log-level", "warning"])
            .arg("--app-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/loop-servers"))
            .env("CONTAINER_NAME", tag())
            .stdout(Stdio::null())
            .spawn()
            .expect("start uvicorn");
        let server = Self { child, port };
        wait_until("uvicorn to answer", Duration::from_secs(30), || {
            http_get(server.addr(), "/fast").is_ok_and(|r| r.status == 200)
        });
        server
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }
}

impl Drop for Uvicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's metrics after svc-during and uvicorn each blocked once:
/// the stalls under their service and container, nothing of the others,
/// never a pid.
fn assert_labelled(text: &str) {
    let container = format!(r#"container="{}""#, tag());
    let stall = sample(
        text,
        "loopguard_blocking_total",
        &[
            r#"service="svc-during""#,
            &container,
            r#"kind="stall""#,
            r#"route="/block/sleep""#,
        ],
    );
    assert_eq!(stall, Some(1.0), "{text}");
    let loop_stall = sample(
        text,
        "loopguard_blocking_total",
        &[r#"service="checkout-py""#, &container, r#"kind="loop""#],
    );
    assert!(loop_stall.is_some_and(|n| n >= 1.0), "{text}");
    // svc-before blocked nothing; svc-untagged is not watched at all.
    assert_eq!(
        sample(
            text,
            "loopguard_blocking_total",
            &[r#"service="svc-before""#]
        ),
        None,
        "{text}"
    );
    assert!(!text.contains("svc-untagged"), "{text}");
    assert!(
        !text.contains("pid="),
        "a pid label on the host's metrics: {text}"
    );
    let node_loop = sample(
        text,
        "loopguard_blocking_total",
        &[r#"service="node""#, &container, r#"kind="loop""#],
    );
    assert!(node_loop.is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(
        sample(text, "loopguard_host_targets", &[r#"state="watched""#]),
        Some(4.0),
        "{text}"
    );
}

/// Node.js serving `examples/loop-servers/server.js`, with our tag.
struct Node {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Node {
    fn start() -> Self {
        let mut child = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/loop-servers/server.js"))
            .env("CONTAINER_NAME", tag())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start node (`cargo xtask setup` installs Debian's nodejs)");
        let addr = support::listening_addr(&mut child);
        Self { child, addr }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "end-to-end: needs root, the example build and uvicorn; run `cargo xtask test`"]
fn processes_before_and_during_the_watch_are_attached_and_their_stalls_labelled() {
    require_root();
    let dir = temp_dir("labels");
    let before = start(&copy_as(&dir, "svc-before"));
    let python = Uvicorn::start();
    let node = Node::start();
    // Another program, not ours to watch (no tag).
    let other = Server::start(&copy_as(&dir, "svc-untagged"), &[]);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_capturing_stderr(&[
        "watch",
        "--all",
        "--container",
        &tag(),
        "--service-map",
        "python3*=checkout-py",
        "--metrics-addr",
        &metrics_addr,
        "--format",
        "json",
        "--no-stacks",
    ]);
    let already = Duration::from_secs(30);
    let tokio = attached(&agent, before.pid, already);
    assert_eq!(tokio["mode"], "tokio", "{tokio}");
    let loop_mode = attached(&agent, python.child.id(), already);
    assert_eq!(loop_mode["mode"], "loop", "{loop_mode}");
    let node_mode = attached(&agent, node.child.id(), already);
    assert_eq!(node_mode["mode"], "loop", "{node_mode}");

    // Started during the watch: attached within seconds of its exec.
    let started = Instant::now();
    let during = start(&copy_as(&dir, "svc-during"));
    attached(&agent, during.pid, Duration::from_secs(10));
    eprintln!(
        "host test: svc-during attached {:.2} s after it was started",
        started.elapsed().as_secs_f64()
    );

    during.get("/block/sleep?ms=200");
    let response = http_get(python.addr(), "/sleep?ms=200").unwrap();
    assert_eq!(response.status, 200);
    let response = http_get(node.addr, "/busy?ms=200").unwrap();
    assert_eq!(response.status, 200);
    agent.wait_for("the loop stall of node", Duration::from_secs(5), |v| {
        v["type"] == "stall" && v["pid"] == node.child.id() && v["kind"] == "loop"
    });
    agent.wait_for("the stall of svc-during", Duration::from_secs(5), |v| {
        v["type"] == "stall" && v["pid"] == during.pid
    });
    agent.wait_for("the loop stall of uvicorn", Duration::from_secs(5), |v| {
        v["type"] == "stall" && v["pid"] == python.child.id() && v["kind"] == "loop"
    });

    assert_labelled(&scrape(&metrics_addr));

    // One exits: detached, its series kept for the grace period.
    drop(during);
    wait_until(
        "svc-during to be counted gone",
        Duration::from_secs(10),
        || {
            sample(
                &scrape(&metrics_addr),
                "loopguard_host_targets",
                &[r#"state="gone""#],
            ) == Some(1.0)
        },
    );
    assert!(scrape(&metrics_addr).contains(r#"service="svc-during""#));

    let programs = agent.programs();
    assert!(!programs.is_empty());
    let (status, lines, stderr) = {
        agent.signal("INT");
        agent.wait_with_stderr(Duration::from_secs(20))
    };
    assert!(status.success(), "{status:?}: {stderr:#?}");
    let summaries = support::of_type(&lines, "summary");
    assert!(summaries.len() >= 4, "a summary per target: {summaries:#?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("host watch ended: 4 target(s) watched")),
        "{stderr:#?}"
    );
    assert_detached(&programs);
    drop((before, python, node, other));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "end-to-end: needs root and the example build; run `cargo xtask test`"]
fn an_unwatchable_program_is_said_once_and_the_budget_holds() {
    require_root();
    let dir = temp_dir("refused");
    let stripped = copy_as(&dir, "svc-stripped");
    let status = Command::new("strip").arg(&stripped).status().unwrap();
    assert!(status.success());
    let first = start(&copy_as(&dir, "svc-first"));
    let (agent, metrics_addr) = budget_agent(&["--max-targets", "1"]);
    attached(&agent, first.pid, Duration::from_secs(30));
    // Over the budget: said once, never attached.
    let second = start(&copy_as(&dir, "svc-second"));
    let third = start(&copy_as(&dir, "svc-third"));
    // A stripped Tokio program, run twice: said once.
    let refused = [start(&stripped), start(&stripped)];
    wait_until("the skips to be counted", Duration::from_secs(15), || {
        let text = scrape(&metrics_addr);
        sample(
            &text,
            "loopguard_host_skipped_total",
            &[r#"reason="unprobeable""#],
        ) == Some(2.0)
            && sample(
                &text,
                "loopguard_host_skipped_total",
                &[r#"reason="budget""#],
            ) == Some(2.0)
    });
    let lines = agent.lines();
    for server in [&second, &third, &refused[0], &refused[1]] {
        assert!(
            !lines
                .iter()
                .any(|l| l.value["type"] == "attached" && l.value["pid"] == server.pid),
            "pid {} was attached",
            server.pid
        );
    }
    let programs = agent.programs();
    agent.signal("INT");
    let (status, _, stderr) = agent.wait_with_stderr(Duration::from_secs(20));
    assert!(status.success());
    let said = |needle: &str| stderr.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(said("stripped"), 1, "{stderr:#?}");
    assert_eq!(said("--max-targets"), 1, "{stderr:#?}");
    assert_detached(&programs);
    drop((first, second, third, refused));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "end-to-end: needs root and the example build; run `cargo xtask test`"]
fn a_target_past_the_memory_budget_is_not_watched_and_said_once() {
    require_root();
    let dir = temp_dir("memory");
    // 1 MiB: less than the agent itself holds, so no target fits.
    let servers = [
        start(&copy_as(&dir, "svc-mem-a")),
        start(&copy_as(&dir, "svc-mem-b")),
    ];
    let (agent, metrics_addr) = budget_agent(&["--max-memory-mib", "1"]);
    wait_until(
        "the refusals to be counted",
        Duration::from_secs(15),
        || {
            sample(
                &scrape(&metrics_addr),
                "loopguard_host_skipped_total",
                &[r#"reason="budget""#],
            ) == Some(2.0)
        },
    );
    let lines = agent.lines();
    assert!(
        !lines.iter().any(|l| l.value["type"] == "attached"),
        "attached past the budget: {lines:?}"
    );
    agent.signal("INT");
    let (status, _, stderr) = agent.wait_with_stderr(Duration::from_secs(20));
    assert!(status.success());
    let said: Vec<&String> = stderr
        .iter()
        .filter(|l| l.contains("--max-memory-mib"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr:#?}");
    assert!(said[0].contains("memory budget of 1 MiB"), "{said:?}");
    drop(servers);
    let _ = std::fs::remove_dir_all(dir);
}

/// `watch --all` over our tagged processes under `limit` (a budget flag
/// and its value), serving metrics; its address.
fn budget_agent(limit: &[&str]) -> (Agent, String) {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let tag = tag();
    let mut args = vec!["watch", "--all", "--container", &tag];
    args.extend_from_slice(limit);
    args.extend([
        "--metrics-addr",
        &metrics_addr,
        "--format",
        "json",
        "--no-stacks",
    ]);
    (Agent::start_capturing_stderr(&args), metrics_addr)
}

/// A number from the environment (`cargo xtask fleet` sets them), or `default`.
fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{name}={v}"))
    })
}

/// Issue #28's scale check: `LOOPGUARD_FLEET_TARGETS` targets (default 10;
/// Tokio, uvicorn and Node mixed), half started before the watch and half
/// during, a stall injected into each and found under its service,
/// container and route; then `LOOPGUARD_FLEET_CHURN_S` seconds (default
/// 60) of churn, a process started every second, after which the agent
/// holds the BPF objects, fds and series it held before, with its memory
/// flat; and stopping it leaves nothing attached. `cargo xtask fleet
/// --targets 50 --churn-minutes 10` runs the full size.
#[test]
#[ignore = "end-to-end: needs root, the example build, uvicorn and node; run `cargo xtask test`"]
fn a_fleet_is_attached_labelled_and_churn_leaks_nothing() {
    use support::fleet::{Sampler, Target};
    require_root();
    let count = usize::try_from(env_number("LOOPGUARD_FLEET_TARGETS", 10)).unwrap();
    let churn_for = Duration::from_secs(env_number("LOOPGUARD_FLEET_CHURN_S", 60));
    let tag = tag();

    // Half before the watch, half during.
    let mut targets = start_targets((0..count).step_by(2), &tag);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let agent_started = Instant::now();
    let agent = fleet_agent(&tag, &metrics_addr);
    for target in &targets {
        attached(&agent, target.pid(), Duration::from_mins(2));
    }
    let all_before = agent_started.elapsed();
    let sampler = Sampler::start(agent.child.id(), &metrics_addr, Duration::from_secs(5));
    let during: Vec<Target> = start_targets((1..count).step_by(2), &tag);
    for target in &during {
        attached(&agent, target.pid(), Duration::from_mins(1));
    }
    say_attach_latencies(&agent, &during);
    targets.extend(during);

    let missed = inject_stalls(&agent, &targets, &metrics_addr, &tag);
    let churn = churn_phase(&agent, &sampler, &metrics_addr, count, churn_for, &tag);
    let text = scrape(&metrics_addr);
    // Stopping the agent leaves the targets running and nothing attached.
    let programs = sampler.stop();
    agent.signal("INT");
    let (status, _, stderr) = agent.wait_with_stderr(Duration::from_mins(2));
    assert!(status.success(), "{status:?}: {stderr:#?}");
    assert_detached(&programs);
    for target in &targets {
        assert_eq!(http_get(target.addr, "/fast").unwrap().status, 200);
    }
    eprintln!(
        "fleet: {count} targets; the {} started before attached {:.1} s after the agent started",
        count.div_ceil(2),
        all_before.as_secs_f64(),
    );
    churn.check(&text);
    assert!(missed.is_empty(), "stalls not found: {missed:#?}");
}

/// Series kept of a gone target, in the scale check: short, to see them go.
const FLEET_GRACE_S: u64 = 20;

/// Starts the fleet's `numbers`-th targets, each answering.
fn start_targets(numbers: impl Iterator<Item = usize>, tag: &str) -> Vec<support::fleet::Target> {
    use support::fleet::{Kind, Target};
    let targets: Vec<Target> = numbers
        .map(|n| {
            Target::start(
                Kind::of(n),
                &format!("fleet-{}-{n}", Kind::of(n).name()),
                tag,
            )
        })
        .collect();
    for target in &targets {
        target.ready(Duration::from_mins(2));
    }
    targets
}

/// `watch --all` over the processes tagged `tag`, as the scale check runs it.
fn fleet_agent(tag: &str, metrics_addr: &str) -> Agent {
    let grace = FLEET_GRACE_S.to_string();
    let mut args = vec![
        "watch",
        "--all",
        "--container",
        tag,
        "--metrics-addr",
        metrics_addr,
        "--format",
        "json",
        "--series-grace-s",
        &grace,
    ];
    if std::env::var_os("LOOPGUARD_FLEET_NO_STACKS").is_some() {
        args.push("--no-stacks");
    }
    Agent::start_capturing_stderr(&args)
}

/// How long after their start the targets started during the watch were
/// attached, by runtime.
fn say_attach_latencies(agent: &Agent, during: &[support::fleet::Target]) {
    use support::fleet::Kind;
    for kind in [Kind::Tokio, Kind::Python, Kind::Node] {
        let latencies: Vec<f64> = during
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| line_after(agent, t.pid(), t.started))
            .collect();
        eprintln!(
            "fleet: {} started during the watch: attached {:.2} to {:.2} s after their start",
            kind.name(),
            latencies.iter().copied().fold(f64::INFINITY, f64::min),
            latencies.iter().copied().fold(0.0, f64::max)
        );
    }
}

/// What the agent held before and after the churn.
struct ChurnResult {
    before: support::fleet::Holdings,
    after: support::fleet::Holdings,
    churned: u64,
    attached: usize,
    /// Highest RSS (KiB) in the churn's first half, then its second.
    halves: (u64, u64),
}

/// Runs the churn for `churn_for` and reads what the agent holds before
/// and after it (once its `count` targets alone are watched and the
/// grace of the churn's series has passed).
fn churn_phase(
    agent: &Agent,
    sampler: &support::fleet::Sampler,
    metrics_addr: &str,
    count: usize,
    churn_for: Duration,
    tag: &str,
) -> ChurnResult {
    use support::fleet::{Churn, Holdings, scrape_quietly};
    let settle = |why: &str| {
        wait_until(why, Duration::from_mins(2), || {
            Holdings::of(agent.child.id(), &scrape_quietly(metrics_addr)).watched == count
        });
        let idle = Holdings::of(agent.child.id(), "");
        std::thread::sleep(Duration::from_secs(FLEET_GRACE_S + 5));
        let held = Holdings::of(agent.child.id(), &scrape_quietly(metrics_addr));
        let share = cpu_share(held.cpu_ticks - idle.cpu_ticks, FLEET_GRACE_S + 5);
        (held, share)
    };
    let (before, idle_cpu) = settle("the fleet to be watched");
    eprintln!("fleet: before the churn: {before}");
    let start = sampler.started.elapsed();
    let churn = Churn::start("fleet-churn", tag);
    std::thread::sleep(churn_for);
    let churned = churn.stop();
    let end = sampler.started.elapsed();
    let churn_cpu = cpu_share(
        Holdings::of(agent.child.id(), "").cpu_ticks - before.cpu_ticks,
        churn_for.as_secs(),
    );
    let (after, _) = settle("the churn's targets to be detached");
    eprintln!("fleet: after the churn:  {after}");
    eprintln!(
        "fleet: agent CPU {idle_cpu:.1} % of a core before the churn (idle targets), {churn_cpu:.1} % during it"
    );
    let rss = |from: Duration, to: Duration| {
        let taken = sampler.between(from, to);
        taken.iter().map(|h| h.rss_kib).max().unwrap_or(0)
    };
    let half = start + end.saturating_sub(start) / 2;
    ChurnResult {
        before,
        after,
        churned,
        attached: support::of_type(&agent.lines(), "attached").len() - count,
        halves: (rss(start, half), rss(half, end)),
    }
}

impl ChurnResult {
    /// Nothing leaked: BPF objects, fds and series back where they were,
    /// memory flat; `text` is the last scrape.
    fn check(&self, text: &str) {
        let Self {
            before,
            after,
            churned,
            attached,
            halves: (first, second),
        } = self;
        eprintln!(
            "fleet: churn: {churned} processes started, {attached} attached; agent RSS max {:.1} MiB in its first half, {:.1} MiB in its second",
            *first as f64 / 1024.0,
            *second as f64 / 1024.0
        );
        assert_eq!(after.bpf(), before.bpf(), "BPF objects leaked by the churn");
        // A scrape's connection may be open at either count.
        assert!(
            after.fds <= before.fds + 2,
            "fds leaked: {before} -> {after}"
        );
        assert!(
            after.series <= before.series,
            "series leaked: {before} -> {after}"
        );
        assert!(!text.contains("fleet-churn"), "churn series kept: {text}");
        assert!(
            *second <= first + first / 10 + 16 * 1024,
            "agent memory grew through the churn: {first} KiB, then {second} KiB"
        );
        assert!(*attached > 0, "no churn process was attached");
    }
}

/// A stall in each target, found under its own service, container and
/// route; the targets whose stall was not (each said at once, and the
/// check goes on: a scale run keeps its numbers).
fn inject_stalls(
    agent: &Agent,
    targets: &[support::fleet::Target],
    metrics_addr: &str,
    tag: &str,
) -> Vec<String> {
    // A loop waiting since before attach comes back from that wait unseen
    // (README, loop mode's limit): one request first.
    for target in targets {
        assert_eq!(http_get(target.addr, "/fast").unwrap().status, 200);
    }
    let mut missed = Vec::new();
    for target in targets {
        let (path, kind, _) = target.kind.stall(200, &target.service);
        let sent = Instant::now();
        let response = http_get(target.addr, &path).unwrap();
        assert_eq!(response.status, 200, "{} {path}", target.service);
        let pid = target.pid();
        let found = wait_for_line(agent, Duration::from_secs(10), |v| {
            v["type"] == "stall" && v["pid"] == pid && v["kind"] == kind
        });
        if !found {
            eprintln!(
                "fleet: MISSED the {kind} stall of {} (pid {pid}, {path}, answered {:?} after it was sent: {})",
                target.service,
                sent.elapsed(),
                response.body
            );
            missed.push(format!("{} (pid {pid}): no {kind} stall", target.service));
        }
    }
    let text = scrape(metrics_addr);
    let container = format!(r#"container="{tag}""#);
    for target in targets {
        let (_, kind, route) = target.kind.stall(200, &target.service);
        let metric_kind = if kind == "poll" { "stall" } else { "loop" };
        let labels = [
            format!(r#"service="{}""#, target.service),
            container.clone(),
            format!(r#"kind="{metric_kind}""#),
            format!(r#"route="{route}""#),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        if !sample(&text, "loopguard_blocking_total", &labels).is_some_and(|n| n >= 1.0) {
            missed.push(format!(
                "{}: no {metric_kind} on route {route} in /metrics",
                target.service
            ));
        }
    }
    missed
}

/// Whether the agent printed a line matching `pred` within `timeout`.
fn wait_for_line(agent: &Agent, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if agent.lines().iter().any(|l| pred(&l.value)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Clock ticks (100 a second) over `seconds`, in % of one core.
fn cpu_share(ticks: u64, seconds: u64) -> f64 {
    ticks as f64 / seconds as f64
}

/// Seconds from `started` to the `attached` line of `pid`.
fn line_after(agent: &Agent, pid: u32, started: Instant) -> f64 {
    agent
        .lines()
        .iter()
        .find(|l| l.value["type"] == "attached" && l.value["pid"] == pid)
        .map_or(f64::NAN, |l| (l.at - started).as_secs_f64())
}
