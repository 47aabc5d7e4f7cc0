//! The host-wide watch loop of `loopguard watch --all`.
//!
//! Hears of every exec on the host (the follow programs, stopping nothing),
//! after looking at every process already running; inspects each
//! ([`super::inspect`], at most two at once on the blocking pool), takes a
//! place in the [`Budget`], attaches, and hands the watch to the
//! [`Supervisor`] with its own [`Metrics`](crate::export::Metrics) inside
//! the host's [`FleetMetrics`]. A watch ends when its process exits or
//! execs (then the new program is inspected); its series stay for the
//! grace period. A process that cannot be watched is said once, with why.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use super::budget::{Budget, Notices, OverBudget};
use super::inspect::{Candidate, Inspection, Inspector, all_pids};
use crate::attach::AttachedProbes;
use crate::error::Error;
use crate::export::TargetInfo;
use crate::export::fleet::{FleetMetrics, TargetHandle};
use crate::follow::Follower;
use crate::follow::supervise::{Finished, Mode, Supervisor};
use crate::stacks::StackTools;
use crate::watch::setup::{announce, attach_discovered};
use crate::watch::{StopReason, WatchOptions};

/// Inspections and attachments running at once (two cores is the
/// machine this was sized on: reading a large executable takes one).
const INSPECTIONS_AT_ONCE: usize = 2;

/// How `watch --all` ran, for its last line.
#[derive(Debug, Default)]
pub struct HostSummary {
    pub watched: usize,
    pub refused: usize,
    pub over_budget: usize,
}

enum Step {
    Inspected(Inspection),
    Attached(Box<Candidate>, Result<AttachedProbes, Error>),
}

struct Host<'a> {
    options: &'a WatchOptions,
    fleet: Arc<FleetMetrics>,
    inspector: Arc<Inspector>,
    semaphore: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<(u32, Step)>,
    supervisor: Supervisor,
    budget: Budget,
    notices: Notices,
    /// Watched pids: their place in the metrics and their probes.
    held: HashMap<u32, (TargetHandle, usize)>,
    /// Pids being inspected or attached to.
    busy: HashSet<u32>,
    /// Busy pids that exec'd again meanwhile (`runc init` becoming the
    /// container's program): inspected again when the first look ends.
    again: HashSet<u32>,
    /// Watched pids that exec'd: inspected again once their watch ends.
    reinspect: HashSet<u32>,
    pending: usize,
    stopping: bool,
    summary: HostSummary,
}

/// Watches every matching process on the host until `stop`.
pub async fn watch_host(
    inspector: Inspector,
    budget: Budget,
    fleet: Arc<FleetMetrics>,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<HostSummary, Error> {
    // Execs first, then the processes already there: none is missed.
    let mut follower = Follower::start_all().map_err(Error::Follow)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut host = Host {
        options,
        fleet,
        inspector: Arc::new(inspector),
        semaphore: Arc::new(Semaphore::new(INSPECTIONS_AT_ONCE)),
        tx,
        supervisor: Supervisor::start(0, Mode::Run, false, options).map_err(Error::Follow)?,
        budget,
        notices: Notices::default(),
        held: HashMap::new(),
        busy: HashSet::new(),
        again: HashSet::new(),
        reinspect: HashSet::new(),
        pending: 0,
        stopping: false,
        summary: HostSummary::default(),
    };
    for pid in all_pids() {
        host.inspect(pid);
    }
    tokio::pin!(stop);
    loop {
        if host.stopping && host.supervisor.active_count() == 0 && host.pending == 0 {
            break;
        }
        tokio::select! {
            reason = &mut stop, if !host.stopping => {
                host.stopping = true;
                host.supervisor.stop_all(reason);
            }
            events = follower.next(), if !host.stopping => {
                for event in events.map_err(Error::Follow)? {
                    host.on_exec(event.tgid);
                }
            }
            Some((pid, next)) = rx.recv() => {
                host.pending -= 1;
                host.on_step(pid, next);
            }
            Some(done) = host.supervisor.next_finished() => host.on_finished(&done),
        }
    }
    let (tasks_full, events_lost) = follower.lost();
    if events_lost > 0 {
        crate::diag!(
            "loopguard: warning: {events_lost} exec(s) on the host were missed (the exec ring buffer was full); {tasks_full} task(s) not followed"
        );
    }
    Ok(host.summary)
}

impl Host<'_> {
    /// A watch has ended: its target leaves the fleet and the budget, and
    /// is looked at again if it exec'd meanwhile.
    fn on_finished(&mut self, done: &Finished) {
        if let Err(error) = &done.outcome {
            crate::diag!(
                "loopguard: watch of pid {} ({}) ended: {error}",
                done.pid,
                crate::term::printable(&done.exe)
            );
        }
        if let Some((handle, probes)) = self.held.remove(&done.pid) {
            self.fleet.gone(handle);
            self.budget.release(probes);
        }
        if self.reinspect.remove(&done.pid) && !self.stopping {
            self.inspect(done.pid);
        }
    }

    fn on_exec(&mut self, pid: u32) {
        if self.supervisor.is_watching(pid) {
            // The probes watched the old program; the new one is looked
            // at once that watch has ended.
            self.supervisor.stop(pid, StopReason::Exec);
            self.reinspect.insert(pid);
        } else {
            self.inspect(pid);
        }
    }

    /// Inspects `pid` on the blocking pool (unless it is already).
    fn inspect(&mut self, pid: u32) {
        if self.stopping {
            return;
        }
        if !self.busy.insert(pid) {
            self.again.insert(pid);
            return;
        }
        self.pending += 1;
        let inspector = Arc::clone(&self.inspector);
        let semaphore = Arc::clone(&self.semaphore);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let inspection = tokio::task::spawn_blocking(move || inspector.inspect(pid))
                .await
                .unwrap_or(Inspection::Skip("inspection panicked"));
            let _ = tx.send((pid, Step::Inspected(inspection)));
        });
    }

    /// The look at `pid` is over; if it exec'd meanwhile, look again.
    fn done(&mut self, pid: u32) {
        self.busy.remove(&pid);
        if self.again.remove(&pid) {
            self.inspect(pid);
        }
    }

    fn on_step(&mut self, pid: u32, step: Step) {
        match step {
            Step::Inspected(Inspection::Skip(why)) => {
                tracing::debug!(pid, why, "not watched");
                self.done(pid);
            }
            Step::Inspected(Inspection::Refused {
                key,
                reason,
                message,
            }) => {
                self.done(pid);
                self.refused(pid, &key, reason, &message);
            }
            Step::Inspected(Inspection::Candidate(candidate)) => {
                if self.stopping || self.again.contains(&pid) {
                    self.done(pid);
                    return;
                }
                if let Err(error) = self.budget.reserve_target(resident_kib()) {
                    self.done(pid);
                    self.summary.over_budget += 1;
                    self.fleet.skipped("budget");
                    let key = match error {
                        OverBudget::Memory { .. } => "budget: memory",
                        _ => "budget: targets",
                    };
                    if self.notices.first(key) {
                        crate::diag!(
                            "loopguard: pid {pid} ({}) not watched: {error}",
                            crate::term::printable(&candidate.target.exe.display_path)
                        );
                    }
                    return;
                }
                self.attach(pid, candidate);
            }
            Step::Attached(candidate, result) => {
                if self.again.contains(&pid) {
                    // It exec'd while being attached: the probes are on
                    // the old program.
                    tokio::task::spawn_blocking(move || drop(result));
                    self.budget.release(0);
                    self.done(pid);
                    return;
                }
                self.busy.remove(&pid);
                self.attached(pid, *candidate, result);
            }
        }
    }

    fn refused(&mut self, pid: u32, key: &str, reason: &'static str, message: &str) {
        self.summary.refused += 1;
        self.fleet.skipped(reason);
        if self.notices.first(key) {
            crate::diag!("loopguard: pid {pid} not watched: {message}");
        }
    }

    fn attach(&mut self, pid: u32, candidate: Box<Candidate>) {
        self.pending += 1;
        let options = self.options.clone();
        let semaphore = Arc::clone(&self.semaphore);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let (candidate, result) = tokio::task::spawn_blocking(move || {
                let result = attach_discovered(&candidate.target, &options);
                (candidate, result)
            })
            .await
            .expect("attaching does not panic");
            let _ = tx.send((pid, Step::Attached(candidate, result)));
        });
    }

    /// Attaching to `candidate` failed: refused, unless it exited first.
    fn attach_failed(&mut self, pid: u32, candidate: &Candidate, error: &Error) {
        self.budget.release(0);
        let key = format!("{}: {error}", candidate.target.exe.display_path);
        let reason = match crate::follow::roster::Skip::from_error(error) {
            crate::follow::roster::Skip::ExitedTooFast => return,
            _ => "attach_failed",
        };
        self.refused(pid, &key, reason, &error.to_string());
    }

    /// `candidate`'s probes would take the host over its budget.
    fn over_budget(&mut self, pid: u32, candidate: &Candidate, error: &OverBudget) {
        self.summary.over_budget += 1;
        self.fleet.skipped("budget");
        if self.notices.first("budget: probes") {
            crate::diag!(
                "loopguard: pid {pid} ({}) not watched: {error}",
                crate::term::printable(&candidate.target.exe.display_path)
            );
        }
    }

    fn attached(&mut self, pid: u32, candidate: Candidate, result: Result<AttachedProbes, Error>) {
        let probes = match result {
            Ok(probes) => probes,
            Err(error) => {
                self.attach_failed(pid, &candidate, &error);
                return;
            }
        };
        let count = probes.probe_count;
        if self.stopping {
            self.budget.release(0);
            tokio::task::spawn_blocking(move || drop(probes));
            return;
        }
        if let Err(error) = self.budget.add_probes(count) {
            self.over_budget(pid, &candidate, &error);
            tokio::task::spawn_blocking(move || drop(probes));
            return;
        }
        self.watch(pid, candidate, probes);
    }

    /// Starts watching an attached target within the budget: its series,
    /// its stack tools, its session.
    fn watch(&mut self, pid: u32, candidate: Candidate, mut probes: AttachedProbes) {
        let count = probes.probe_count;
        let Candidate {
            identity,
            runtime,
            target,
        } = candidate;
        let (handle, metrics) = self.fleet.add(
            &identity,
            &TargetInfo {
                pid,
                exe: target.exe.display_path.clone(),
                tokio_version: target.tokio_version.clone(),
            },
        );
        metrics.set_probes(count);
        let mut options = self.options.clone();
        options.metrics = Some(metrics);
        options.label = true;
        // One of many: lean tools (see `StackTools::prepare_lean`).
        let tools = options
            .capture_stacks
            .then(|| StackTools::prepare_lean(pid));
        match announce(&target, &mut probes, &options) {
            Ok(collector) => {
                crate::diag!(
                    "loopguard: watching pid {pid} ({}) as {}: service {}{}",
                    crate::term::printable(&target.exe.display_path),
                    runtime.as_str(),
                    crate::term::printable(&identity.service),
                    describe_place(&identity)
                );
                self.supervisor
                    .watch((target, probes, tools), collector, options);
                self.held.insert(pid, (handle, count));
                self.summary.watched += 1;
                // Discovery read the binary whole: give those pages back.
                crate::stacks::symbolize::trim_heap();
            }
            Err(error) => {
                self.fleet.gone(handle);
                self.budget.release(count);
                tokio::task::spawn_blocking(move || drop(probes));
                crate::diag!("loopguard: pid {pid} not watched: {error}");
            }
        }
    }
}

/// `, container NAME (ID), pod NS/POD` where known.
fn describe_place(identity: &crate::discover::identity::Identity) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if !identity.container_id.is_empty() {
        let short = &identity.container_id[..identity.container_id.len().min(12)];
        if identity.container.is_empty() {
            let _ = write!(out, ", container {short}");
        } else {
            let _ = write!(
                out,
                ", container {} ({short})",
                crate::term::printable(&identity.container)
            );
        }
    }
    if !identity.pod.is_empty() {
        let _ = write!(
            out,
            ", pod {}/{}",
            crate::term::printable(&identity.namespace),
            crate::term::printable(&identity.pod)
        );
    }
    out
}

/// KiB of memory the agent holds now (`VmRSS`); 0 when unknown, which
/// leaves the memory budget to the other limits.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
