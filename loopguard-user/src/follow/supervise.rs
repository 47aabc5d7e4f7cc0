//! One watch per attached process: the watches of `loopguard run` (the
//! command and every Tokio program it starts) or of `loopguard attach` (the
//! target, re-attached when it execs).
//!
//! Exec events come from the [`Follower`]; each process is inspected and
//! attached on the blocking pool while it is stopped, then resumed; its
//! watch runs on this thread's `LocalSet`, and detaches on the blocking
//! pool, so one process's detach never holds another stopped.

use std::collections::HashMap;
use std::future::Future;

use tokio::sync::{mpsc, watch};

use super::roster::{Attached, Roster, Skip, label};
use super::watchdog::Watchdog;
use super::{FollowError, Follower};
use crate::attach::AttachedProbes;
use crate::collect::{Collector, monotonic_ns};
use crate::discover::ProbeTarget;
use crate::discover::proc;
use crate::error::Error;
use crate::stacks::StackTools;
use crate::stacks::Stacks;
use crate::watch::setup::{Prepared, announce, discover_and_attach};
use crate::watch::{self as agent, Outcome, StopReason, WatchOptions};

/// How long a process stopped at exec waits for loopguard to inspect and
/// attach to it before it is resumed unwatched.
pub const EXEC_DISCOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What is followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `run`: the command and its descendants; programs that cannot be
    /// watched are skipped.
    Run,
    /// `attach`: one process; an exec into a program that cannot be
    /// watched ends the watch.
    Attach,
}

/// A watch that ended.
pub struct Finished {
    pub pid: u32,
    generation: u64,
    pub exe: String,
    pub outcome: Result<Outcome, Error>,
}

type PreparedResult = (u32, u64, Result<(ProbeTarget, AttachedProbes), Error>);

pub struct Supervisor {
    /// Dropped before the watchdog: detaches, then resumes what is stopped.
    follower: Option<Follower>,
    _watchdog: Option<Watchdog>,
    mode: Mode,
    /// Options for processes found by following (no metrics endpoint).
    options: WatchOptions,
    pub roster: Roster,
    active: HashMap<u32, (u64, watch::Sender<Option<StopReason>>)>,
    generation: u64,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    prepared_tx: mpsc::UnboundedSender<PreparedResult>,
    prepared_rx: mpsc::UnboundedReceiver<PreparedResult>,
    pending: usize,
    pub finished: Vec<Finished>,
    /// `attach`: why the watch ended on an exec.
    pub gave_up: Option<String>,
}

impl Supervisor {
    /// Follows `seed` (`Run`: with its descendants), or nothing with
    /// `follow` false (watches are still run the same way).
    pub fn start(
        seed: u32,
        mode: Mode,
        follow: bool,
        options: &WatchOptions,
    ) -> Result<Self, FollowError> {
        let mut watchdog = None;
        let follower = if follow {
            Some(Follower::start(seed, mode == Mode::Run, |stopped_map| {
                watchdog = Some(Watchdog::spawn(stopped_map).map_err(FollowError::Watchdog)?);
                Ok(())
            })?)
        } else {
            None
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (prepared_tx, prepared_rx) = mpsc::unbounded_channel();
        let mut options = options.clone();
        options.metrics = None;
        Ok(Self {
            follower,
            _watchdog: watchdog,
            mode,
            options,
            roster: Roster::default(),
            active: HashMap::new(),
            generation: 0,
            done_tx,
            done_rx,
            prepared_tx,
            prepared_rx,
            pending: 0,
            finished: Vec::new(),
            gave_up: None,
        })
    }

    pub fn following(&self) -> bool {
        self.follower.is_some()
    }

    /// Starts watching an attached process (its attach line already printed).
    pub fn watch(&mut self, prepared: Prepared, collector: Collector, options: WatchOptions) {
        let (target, mut probes, tools) = prepared;
        self.generation += 1;
        let generation = self.generation;
        let (stop_tx, mut stop_rx) = watch::channel(None);
        self.active.insert(target.pid, (generation, stop_tx));
        let done = self.done_tx.clone();
        tokio::task::spawn_local(async move {
            let mut collector = collector;
            let stacks = match tools {
                Some(tools) if probes.stacks => {
                    Stacks::new(&mut probes.ebpf, tools, options.stacks)
                        .inspect_err(
                            |error| tracing::warn!(%error, "stalls are reported without stacks"),
                        )
                        .ok()
                }
                _ => None,
            };
            let stop = async move {
                match stop_rx.wait_for(Option::is_some).await {
                    Ok(reason) => reason.unwrap_or(StopReason::Interrupted),
                    Err(_) => std::future::pending().await,
                }
            };
            let outcome = agent::watch(&target, &mut collector, stacks, &options, stop).await;
            if let Ok(outcome) = &outcome {
                agent::print_summary(outcome, &target, &options);
            }
            drop(collector);
            let prefix = if options.label {
                format!("{} ", label(target.pid, &target.exe.display_path))
            } else {
                String::new()
            };
            detach(probes, prefix, target.pid).await;
            let _ = done.send(Finished {
                pid: target.pid,
                generation,
                exe: target.exe.display_path.clone(),
                outcome: outcome.map_err(Error::from),
            });
        });
    }

    /// Whether `pid` is being watched now.
    pub fn is_watching(&self, pid: u32) -> bool {
        self.active.contains_key(&pid)
    }

    /// How many watches are running.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Tells the watch of `pid`, if any, to stop.
    pub fn stop(&self, pid: u32, reason: StopReason) {
        if let Some((_, stop_tx)) = self.active.get(&pid) {
            let _ = stop_tx.send(Some(reason));
        }
    }

    /// Tells every watch to stop.
    pub fn stop_all(&self, reason: StopReason) {
        for (_, stop_tx) in self.active.values() {
            let _ = stop_tx.send(Some(reason));
        }
    }

    /// The next watch to end, for a caller that drives the watches itself
    /// (`loopguard watch --all`) rather than through [`Self::run_until`].
    pub async fn next_finished(&mut self) -> Option<Finished> {
        let done = self.done_rx.recv().await?;
        if self
            .active
            .get(&done.pid)
            .is_some_and(|(generation, _)| *generation == done.generation)
        {
            self.active.remove(&done.pid);
        }
        Some(done)
    }

    /// Runs until `stop` resolves and every watch has ended (`Run`), or
    /// until the target is gone or exec'd out of reach (`Attach`).
    pub async fn run_until(&mut self, stop: impl Future<Output = StopReason>) -> Result<(), Error> {
        tokio::pin!(stop);
        let mut stopping: Option<StopReason> = None;
        loop {
            let idle = self.active.is_empty() && self.pending == 0;
            if idle && (stopping.is_some() || self.mode == Mode::Attach) {
                break;
            }
            tokio::select! {
                reason = &mut stop, if stopping.is_none() => {
                    stopping = Some(reason);
                    for (_, stop_tx) in self.active.values() {
                        let _ = stop_tx.send(Some(reason));
                    }
                }
                events = next_exec(self.follower.as_mut()) => {
                    for event in events.map_err(Error::Follow)? {
                        self.on_exec(event.tgid, event.ts_ns, stopping.is_some());
                    }
                }
                Some((pid, exec_ns, result)) = self.prepared_rx.recv() => {
                    self.pending -= 1;
                    self.on_prepared(pid, exec_ns, result, stopping);
                }
                Some(done) = self.done_rx.recv() => {
                    if self.active.get(&done.pid).is_some_and(|(generation, _)| *generation == done.generation) {
                        self.active.remove(&done.pid);
                        if let Some(follower) = &mut self.follower
                            && !proc::is_alive(done.pid)
                        {
                            follower.forget(done.pid);
                        }
                    }
                    self.finished.push(done);
                }
            }
        }
        if let Some(follower) = &mut self.follower {
            let (tasks_full, events_lost) = follower.lost();
            if tasks_full + events_lost > 0 {
                crate::diag!(
                    "loopguard: warning: {tasks_full} process(es) not followed (too many at once) and {events_lost} exec(s) missed"
                );
            }
        }
        Ok(())
    }

    /// A followed process exec'd: stop watching its old program, inspect
    /// and attach to the new one while it is stopped.
    fn on_exec(&mut self, pid: u32, exec_ns: u64, stopping: bool) {
        if let Some((_, stop_tx)) = self.active.get(&pid) {
            let _ = stop_tx.send(Some(StopReason::Exec));
        }
        if stopping {
            if let Some(follower) = &mut self.follower {
                follower.resume(pid);
            }
            return;
        }
        self.pending += 1;
        let options = self.options.clone();
        let tx = self.prepared_tx.clone();
        // The process waits stopped meanwhile: never for ever. Past the
        // limit it is resumed unwatched; probes attached later by the
        // abandoned work are dropped with its result.
        tokio::spawn(async move {
            let work = move || discover_and_attach(pid, &options);
            let result = super::deadline::blocking_within(EXEC_DISCOVERY_TIMEOUT, work)
                .await
                .unwrap_or_else(|| {
                    Err(Error::Follow(FollowError::DiscoveryTimeout {
                        pid,
                        secs: EXEC_DISCOVERY_TIMEOUT.as_secs(),
                    }))
                });
            let _ = tx.send((pid, exec_ns, result));
        });
    }

    fn on_prepared(
        &mut self,
        pid: u32,
        exec_ns: u64,
        result: Result<(ProbeTarget, AttachedProbes), Error>,
        stopping: Option<StopReason>,
    ) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_or_else(|_| "?".to_owned(), |p| p.display().to_string());
        let attached = result.and_then(|(target, mut probes)| {
            // Here, not on the blocking pool: the symbolizer stays on one
            // thread. The process is stopped, so no event waits meanwhile.
            let tools = self
                .options
                .capture_stacks
                .then(|| StackTools::prepare(pid));
            let collector = announce(&target, &mut probes, &self.options)?;
            Ok(((target, probes, tools), collector))
        });
        match attached {
            Ok((prepared, collector)) => {
                let probes = prepared.1.probe_count;
                let exe = prepared.0.exe.display_path.clone();
                let options = self.options.clone();
                self.watch(prepared, collector, options);
                if let Some(reason) = stopping
                    && let Some((_, stop_tx)) = self.active.get(&pid)
                {
                    let _ = stop_tx.send(Some(reason));
                }
                let stopped_ms = monotonic_ns().saturating_sub(exec_ns) as f64 / 1e6;
                crate::present::output::before_resume();
                if let Some(follower) = &mut self.follower {
                    follower.resume(pid);
                }
                self.roster.attached(
                    pid,
                    &exe,
                    Attached {
                        probes,
                        stopped_ms: Some(stopped_ms),
                    },
                );
            }
            Err(error) => self.not_watched(pid, &exe, &error),
        }
    }

    /// A followed program loopguard cannot watch: resumed, and let go
    /// (under `attach`, the run ends with why).
    fn not_watched(&mut self, pid: u32, exe: &str, error: &Error) {
        // Resumed at once: it is not ours to hold.
        if let Some(follower) = &mut self.follower {
            follower.resume(pid);
        }
        let skip = Skip::from_error(error);
        match self.mode {
            Mode::Run => {
                tracing::info!(pid, exe, ?skip, "followed program not watched");
            }
            Mode::Attach => {
                self.gave_up = Some(format!(
                    "pid {pid} exec'd {}, which loopguard cannot watch: {error}; it keeps running, unwatched",
                    crate::term::printable(exe)
                ));
                if let Some(follower) = &mut self.follower {
                    follower.forget(pid);
                }
            }
        }
        self.roster.skipped(pid, exe, skip);
    }
}

/// The next exec events, or never when nothing is followed.
async fn next_exec(
    follower: Option<&mut Follower>,
) -> Result<Vec<loopguard_common::follow::ExecEvent>, FollowError> {
    match follower {
        Some(follower) => follower.next().await,
        None => std::future::pending().await,
    }
}

/// Detaches `probes` from `pid` on the blocking pool (a grace period per
/// probe: seconds), saying how long it should take and when it is done;
/// every line starts with `prefix`.
async fn detach(probes: AttachedProbes, prefix: String, pid: u32) {
    let total = probes.probe_count;
    let links = probes.links_summary;
    crate::diag!(
        "{prefix}loopguard: detaching {total} probes in {} {} links (expect about {:.1} s)",
        links.links,
        links.kind.as_str(),
        links.kind.expected(total, links.links).detach.as_secs_f64()
    );
    let started = std::time::Instant::now();
    let detached = tokio::task::spawn_blocking(move || {
        let mut said_done = false;
        probes.detach(|done, total| {
            if done == total && !std::mem::replace(&mut said_done, true) {
                crate::diag!(
                    "{prefix}loopguard: detached: all {total} probes removed in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            } else if done < total {
                crate::diag!("{prefix}loopguard: detaching: {done}/{total} probes removed");
            }
        });
    })
    .await;
    if detached.is_err() {
        crate::diag!("loopguard: error: detaching from pid {pid} failed");
    }
}
