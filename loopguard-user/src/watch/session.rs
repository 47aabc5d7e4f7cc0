//! The session: everything one watch keeps between events, and what it
//! does with each: ring buffer records to the rules, scans of the thread
//! slots to the rules and the stack capture, findings to the router.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use loopguard_common::{LoopEvent, LoopState, MAX_POLL_DEPTH, ThreadPolls};

use crate::attach::RequestSource;
use crate::attribute::RouteNames;
use crate::attribute::asgi::{self, AsgiTables};
use crate::attribute::inflight::{self, TableAt};
use crate::collect::{Collector, RawEvent, monotonic_ns};
use crate::detect::{Finding, ThresholdEngine};
use crate::discover::{ProbeTarget, proc};
use crate::stacks::Stacks;

use super::WatchOptions;
use super::cadence::{Cadence, Seen};
use super::findings::{Router, Thresholds};
use super::metrics_feed::MetricsFeed;
use super::pauses::Pauses;
use super::printer::Printer;
use super::requests::{LiveTarget, TableSource, culprit};
use super::status::StatusFeed;

/// Everything one watch keeps between events.
pub(super) struct Session<'t> {
    pub(super) engine: ThresholdEngine,
    /// Where findings go: summary, metrics, `--fail-on`, output.
    pub(super) findings: Router,
    /// ns when the adaptive rule last read the histogram.
    pub(super) histogram_read_ns: u64,
    /// The target and the kernel's request maps.
    pub(super) live: LiveTarget<'t>,
    /// The middleware's in-flight tables: the requests behind polls
    /// already stuck at attach.
    pub(super) inflight_tables: Vec<TableAt>,
    /// The probe layout mismatch was said.
    pub(super) layout_said: bool,
    pub(super) printer: Printer<'t>,
    pub(super) events: Vec<RawEvent>,
    pub(super) metrics: Option<MetricsFeed>,
    pub(super) stacks: Option<Stacks>,
    /// Threads that have polled a task (at the last scan): their polls, not
    /// their busy stretches, feed the cumulative rule.
    pub(super) polling_threads: HashSet<u32>,
    /// The live status line (stderr is a terminal).
    pub(super) status: Option<StatusFeed>,
    /// When the next scan comes.
    pub(super) cadence: Cadence,
    /// Verdicts held back while a pause may be uncounted.
    pub(super) pauses: Pauses,
}

/// Every thread's poll stack, and the loop threads' wait states.
type Snapshots = (Vec<(u32, ThreadPolls)>, Vec<(u32, LoopState)>);

/// The attach census (`census.rs`) is read by scans at the fast pace for
/// this long after the watch starts.
const CENSUS_SCANS_NS: u64 = 1_000_000_000;

impl<'t> Session<'t> {
    pub(super) fn new(
        target: &'t ProbeTarget,
        collector: &mut Collector,
        stacks: Option<Stacks>,
        options: &WatchOptions,
        started: Instant,
    ) -> Self {
        let inflight_tables = inflight::table_addresses(target);
        Session {
            engine: ThresholdEngine::new(options.detect.clone()),
            findings: Router::new(options.routes.clone(), options.metrics.clone()),
            histogram_read_ns: 0,
            live: LiveTarget {
                target,
                callers: HashMap::new(),
                request_maps: collector.requests.take().filter(|_| {
                    options.requests == RequestSource::Probes
                        && !target.binary.usdt_sites.is_empty()
                }),
                route_names: RouteNames::default(),
                asgi: target.is_loop_only().then(|| AsgiTables::new(target.pid)),
                table: (options.requests == RequestSource::Table)
                    .then(|| TableSource::new(inflight_tables.clone()))
                    .flatten(),
            },
            inflight_tables,
            layout_said: false,
            printer: Printer {
                target,
                format: options.format,
                label: options.label,
            },
            events: Vec::new(),
            metrics: options
                .metrics
                .as_ref()
                .map(|metrics| MetricsFeed::new(metrics, options.detect.threshold_ns)),
            stacks,
            polling_threads: HashSet::new(),
            status: StatusFeed::when_shown(started),
            cadence: Cadence::new(options.scan_interval, monotonic_ns() + CENSUS_SCANS_NS),
            pauses: Pauses::new(),
        }
    }
}

impl Session<'_> {
    pub(super) fn thresholds(&self) -> Thresholds {
        Thresholds {
            threshold_ns: self.engine.threshold_ns(),
            cumulative_floor_ns: self
                .engine
                .settings()
                .cumulative
                .as_ref()
                .map_or(0, |c| c.floor_ns),
        }
    }

    fn report(&mut self, finding: &Finding) {
        let thresholds = self.thresholds();
        self.findings.report(
            finding,
            thresholds,
            &mut self.live,
            self.stacks.as_mut(),
            &mut self.printer,
        );
    }

    /// Says once that the app's middleware fires a probe layout this agent
    /// does not read (the kernel ignores those hits and counts them).
    fn check_layout(&mut self) {
        let Some(maps) = &self.live.request_maps else {
            return;
        };
        let totals = maps.totals();
        if totals.layout_mismatches > 0 && !self.layout_said {
            self.layout_said = true;
            crate::diag!(
                "loopguard: error: the app's loopguard-middleware fires probe layout {}, this loopguard reads layout {}; requests are not attributed (use matching versions)",
                totals.last_bad_layout,
                loopguard_common::usdt::LAYOUT_VERSION
            );
        }
    }

    /// Handles everything queued in the ring buffer, in order.
    pub(super) fn handle_events(&mut self, collector: &mut Collector) {
        collector.drain(&mut self.events);
        if let Some(maps) = &self.live.request_maps {
            maps.forget_recent_ends();
        }
        let events = std::mem::take(&mut self.events);
        for event in &events {
            match event {
                RawEvent::PollEnd(poll) => {
                    let view = self.live.requests();
                    let routes = &self.findings.routes;
                    let end_ns = poll.start_ns + poll.duration_ns;
                    let finding = self.engine.on_poll_end(poll, |task_id, start_ns| {
                        culprit(&view, routes, (task_id, poll.tid), start_ns, end_ns)
                    });
                    if let Some(finding) = finding {
                        self.report(&finding);
                    }
                }
                RawEvent::LoopBusy(busy) => self.on_loop_busy(busy),
                RawEvent::Nudge { tid, start_ns } => {
                    self.cadence.nudge(*tid, *start_ns, monotonic_ns());
                }
                RawEvent::RouteName { key, method, route } => {
                    self.live
                        .route_names
                        .insert(*key, method.clone(), route.clone());
                }
            }
        }
        self.events = events;
        self.events.clear();
    }

    /// Reads the thread slots and acts on what is stuck; returns the time
    /// until the next scan.
    pub(super) fn scan(&mut self, collector: &Collector) -> Duration {
        self.check_layout();
        if let Some(maps) = &self.live.request_maps {
            maps.forget_recent_ends();
        }
        let now_ns = monotonic_ns();
        let threads = collector.snapshot();
        self.polling_threads.clear();
        self.polling_threads.extend(
            threads
                .iter()
                .filter(|(_, polls)| polls.task_polls > 0 || polls.depth > 0)
                .map(|(tid, _)| *tid),
        );
        let loop_threads = self.open_loops(collector, now_ns);
        if let Some(stacks) = &mut self.stacks {
            let stretches: &[_] = if self.printer.target.is_loop_only() {
                &loop_threads
            } else {
                &[]
            };
            stacks.scan(now_ns, &threads, stretches);
        }
        self.report_stuck_before_attach(collector, now_ns);
        let (threads, loop_threads) = self.judged(collector, now_ns, threads, loop_threads);
        for finding in self.engine.on_snapshot(now_ns, &threads) {
            self.report(&finding);
        }
        let interval = self.engine.settings().update_interval_ns();
        if interval.is_some_and(|every| now_ns >= self.histogram_read_ns + every) {
            self.histogram_read_ns = now_ns;
            if let Some(finding) = self.engine.on_histogram(now_ns, &collector.histogram()) {
                self.report(&finding);
            }
        }
        let pid = self.printer.target.pid;
        for finding in self
            .engine
            .on_loop_snapshot(now_ns, &loop_threads, &threads, |tid| {
                proc::thread_name(pid, tid)
            })
        {
            self.report(&finding);
        }
        if let Some(status) = &mut self.status {
            status.refresh(
                collector,
                self.findings.summary.stalls,
                self.engine.threshold_ns(),
                self.live.request_maps.as_ref(),
            );
        }
        if self.metrics.as_ref().is_some_and(MetricsFeed::due) {
            self.refresh_metrics(collector, now_ns, &threads);
        }
        self.cadence.after_scan(now_ns, |tid, start_ns| {
            seen(&threads, &loop_threads, tid, start_ns)
        })
    }

    /// Reads what only the kernel's maps hold into the metrics.
    pub(super) fn refresh_metrics(
        &mut self,
        collector: &Collector,
        now_ns: u64,
        threads: &[(u32, loopguard_common::ThreadPolls)],
    ) {
        if let Some(feed) = &mut self.metrics {
            feed.refresh(
                collector,
                now_ns,
                threads,
                self.engine.threshold_ns(),
                self.printer.target.pid,
                &self.live.requests(),
            );
        }
    }

    /// The snapshots the detectors judge: without the threads whose
    /// verdict waits for their CPU's next timer interrupt (`pauses.rs`).
    fn judged(
        &self,
        collector: &Collector,
        now_ns: u64,
        threads: Vec<(u32, ThreadPolls)>,
        loop_threads: Vec<(u32, LoopState)>,
    ) -> Snapshots {
        let pending = self.pauses_pending(collector, now_ns, &threads, &loop_threads);
        if pending.is_empty() {
            return (threads, loop_threads);
        }
        (
            threads
                .into_iter()
                .filter(|(tid, _)| !pending.contains(tid))
                .collect(),
            loop_threads
                .into_iter()
                .filter(|(tid, _)| !pending.contains(tid))
                .collect(),
        )
    }

    /// Threads in a poll or busy stretch as long as the threshold, whose
    /// CPU has taken no timer interrupt for longer than a pause allows.
    fn pauses_pending(
        &self,
        collector: &Collector,
        now_ns: u64,
        threads: &[(u32, ThreadPolls)],
        loop_threads: &[(u32, LoopState)],
    ) -> HashSet<u32> {
        let shortest = self.engine.threshold_ns();
        let long = |start_ns: u64| start_ns != 0 && now_ns.saturating_sub(start_ns) >= shortest;
        let candidates: Vec<u32> = threads
            .iter()
            .filter(|(_, polls)| {
                polls
                    .innermost_task_poll()
                    .is_some_and(|frame| long(frame.start_ns))
            })
            .map(|(tid, _)| *tid)
            .chain(
                loop_threads
                    .iter()
                    .filter(|(_, state)| state.depth == 0 && long(state.busy_start_ns))
                    .map(|(tid, _)| *tid),
            )
            .collect();
        self.pauses
            .pending(collector, self.printer.target.pid, now_ns, &candidates)
    }

    /// The loop threads' wait state now, less the busy stretches whose
    /// loop has closed since (those are not loop stalls).
    fn open_loops(&self, collector: &Collector, now_ns: u64) -> Vec<(u32, LoopState)> {
        let mut loop_threads = collector.loop_snapshot();
        // Only stretches already as long as the threshold are looked at in
        // /proc.
        let threshold_ns = self.engine.threshold_ns();
        loop_threads.retain(|(tid, state)| {
            state.depth > 0
                || state.busy_start_ns == 0
                || now_ns.saturating_sub(state.busy_start_ns) < threshold_ns
                || !self.loop_closed(*tid, state.wait_fd)
        });
        loop_threads
    }

    /// A loop thread came back to wait: a loop stall, or else (on a thread
    /// that polls no task) a cut for the cumulative rule.
    /// Whether the event loop thread `tid` last waited for (epoll fd
    /// `wait_fd`, encoded) has been closed since: its epoll fd is gone.
    fn loop_closed(&self, tid: u32, wait_fd: u32) -> bool {
        loopguard_common::wait_fd::decode(wait_fd)
            .is_some_and(|fd| proc::epoll_fd_open(self.printer.target.pid, tid, fd) == Some(false))
    }

    fn on_loop_busy(&mut self, busy: &LoopEvent) {
        if loopguard_common::wait_fd::ended_elsewhere(busy.wait_fd)
            && self.loop_closed(busy.tid, busy.wait_fd)
        {
            // The thread's own work between two loops: the one it came back
            // from closed, and it next waited on another (a second
            // `asyncio.run`); no loop was held up. A stretch that ends on the
            // same loop stands, even when that loop has closed since.
            return;
        }
        let pid = self.printer.target.pid;
        if let Some(finding) = self
            .engine
            .on_loop_stretch(busy, |tid| proc::thread_name(pid, tid))
        {
            self.report(&finding);
            return;
        }
        if self.polling_threads.contains(&busy.tid) {
            return;
        }
        let held_ns = busy.duration_ns.saturating_sub(busy.preempted_ns);
        let end_ns = busy.start_ns + busy.duration_ns;
        // A Python app's table gives the step that held the loop, if one
        // did, instead of the whole stretch.
        let step = self.live.asgi.as_mut().and_then(|tables| {
            asgi::cut_of_stretch(tables, busy.tid, busy.start_ns, end_ns, held_ns)
        });
        let cut = match step {
            None => Some((busy.start_ns, held_ns, None)),
            Some(step) => step.map(|(start, held, who)| (start, held, Some(who))),
        };
        if let Some((start_ns, held_ns, request)) = cut
            && let Some(finding) = self
                .engine
                .on_loop_busy(busy.tid, start_ns, held_ns, request)
        {
            self.report(&finding);
        }
    }
}

/// What a scan's snapshots say of the poll or busy stretch of thread `tid`
/// that began at `start_ns` (a nudge's).
fn seen(
    threads: &[(u32, ThreadPolls)],
    loops: &[(u32, LoopState)],
    tid: u32,
    start_ns: u64,
) -> Seen {
    let polls = threads.iter().find(|(t, _)| *t == tid).map(|(_, p)| p);
    let state = loops.iter().find(|(t, _)| *t == tid).map(|(_, s)| s);
    if polls.is_none() && state.is_none() {
        return Seen::Unseen;
    }
    let in_poll = polls.is_some_and(|polls| {
        let depth = (polls.depth as usize).min(MAX_POLL_DEPTH);
        polls.frames[..depth]
            .iter()
            .any(|frame| frame.start_ns == start_ns)
    });
    let in_stretch = state.is_some_and(|state| state.depth == 0 && state.busy_start_ns == start_ns);
    if in_poll || in_stretch {
        Seen::Running
    } else {
        Seen::Over
    }
}
