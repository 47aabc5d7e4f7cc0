//! The watch loop: collect → detect → report, until told to stop.
//!
//! Ring buffer events are handled as they arrive; every scan interval the
//! in-flight poll stacks are read so a poll that is still stuck is reported
//! while it is stuck. On stop the ring buffer is drained one last time and
//! the summary printed.

mod banner;
pub mod findings;
pub mod setup;

pub use banner::print_attached;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loopguard_common::ThreadPolls;

use crate::attach::{ProbeLinks, WaitProbes};
use crate::attribute::asgi::{AsgiTables, Verdict};
use crate::attribute::{self, Request, RouteNames, Victims};
use crate::collect::lost::Lost;
use crate::collect::totals::LoopThread;
use crate::collect::{CollectError, Collector, RawEvent, RequestMaps, monotonic_ns};
use crate::detect::{
    Culprit, DetectSettings, Finding, RouteFilter, Stall, StallKind, ThresholdEngine,
};
use crate::discover::{ProbeTarget, proc};
use crate::events::StallContext;
use crate::events::summary::Summary;
use crate::events::{self, build};
use crate::export::live::{BusyTracker, stuck_polls};
use crate::export::{LiveState, Metrics};
use crate::present::alerts::Offending;
use crate::present::emit;
use crate::present::text::Format;
use crate::stacks::{StackOptions, Stacks};
use findings::{Router, Sink, Target, Thresholds};

/// How the watch loop runs.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The stall, adaptive and cumulative rules.
    pub detect: DetectSettings,
    /// Routes that raise no alert.
    pub routes: RouteFilter,
    pub format: Format,
    pub scan_interval: Duration,
    /// Attach to the middleware's request probes (`--no-requests` turns it off).
    pub requests: bool,
    /// Where findings and live values go for `/metrics` (`--metrics-addr`).
    pub metrics: Option<Arc<Metrics>>,
    /// How the wait path is probed (`--wait-probes`).
    pub wait_probes: WaitProbes,
    /// How the uprobes are attached (`--probe-links`).
    pub probe_links: ProbeLinks,
    /// Capture the stacks of stalls (`--no-stacks` turns it off).
    pub capture_stacks: bool,
    pub stacks: StackOptions,
    /// Where to write the folded stacks at exit (`--folded`).
    pub folded: Option<PathBuf>,
    /// The benchmark's floor: with empty programs the agent reads nothing
    /// until it stops.
    pub bench: crate::attach::Bench,
    /// Name the process on every line (pid and program): set when several
    /// processes are watched at once (`run` following its command).
    pub label: bool,
}

/// Why watching stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Interrupted,
    DurationElapsed,
    TargetExited,
    /// Nobody reads stdout any more (`| head -1`).
    OutputClosed,
    /// The target exec'd another program: the probes watched the old one.
    Exec,
}

impl StopReason {
    /// How the summary names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interrupted => "interrupted",
            Self::DurationElapsed => "duration elapsed",
            Self::TargetExited => "target exited",
            Self::OutputClosed => "output closed",
            Self::Exec => "target exec'd another program",
        }
    }
}

/// What a watch produced.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub reason: StopReason,
    /// Stalls and cumulative alerts, for `--fail-on`.
    pub offending: Offending,
}

/// Prints (and records) events in the chosen format.
struct Printer<'t> {
    target: &'t ProbeTarget,
    format: Format,
    label: bool,
}

/// Victims listed by name on a stall; the count covers the rest.
const VICTIMS_LISTED: usize = 20;

impl Printer<'_> {
    /// The process every line names when several are watched.
    fn process(&self) -> emit::Process<'_> {
        emit::Process {
            pid: self.target.pid,
            exe: &self.target.exe.display_path,
        }
    }
}

impl Sink for Printer<'_> {
    fn emit(&mut self, event: &events::Event) -> String {
        emit::event_from(event, self.format, self.label.then(|| self.process())).unwrap_or_default()
    }
}

/// The target process and the kernel's request maps, as the routing of
/// findings asks them.
struct LiveTarget<'t> {
    target: &'t ProbeTarget,
    /// Function names of the return addresses seen (who polled a task).
    callers: HashMap<u64, Option<String>>,
    /// The kernel's request maps, when the request probes are attached.
    request_maps: Option<RequestMaps>,
    route_names: RouteNames,
    /// A Python target's `loopguard-asgi` tables (loop mode).
    asgi: Option<AsgiTables>,
}

impl LiveTarget<'_> {
    fn requests(&self) -> RequestView<'_> {
        RequestView {
            maps: self.request_maps.as_ref(),
            names: &self.route_names,
        }
    }
}

impl Target for LiveTarget<'_> {
    fn pid(&self) -> u32 {
        self.target.pid
    }

    fn is_loop_only(&self) -> bool {
        self.target.is_loop_only()
    }

    fn thread_name(&self, tid: u32) -> String {
        proc::thread_name(self.target.pid, tid)
    }

    fn context(&mut self, stall: &Stall) -> StallContext {
        let target = self.target;
        let polled_from = self
            .callers
            .entry(stall.return_addr)
            .or_insert_with(|| target.function_at(stall.return_addr).map(str::to_owned))
            .clone();
        let requests = self.requests();
        let request = requests.culprit(stall.task_id, stall.start_ns);
        let victims = requests.victims(stall, request.as_ref());
        StallContext {
            thread: proc::thread_name(target.pid, stall.tid),
            poll_fn: target
                .binary
                .poll_copies
                .get(stall.copy_index as usize)
                .map(|copy| copy.name.clone())
                .unwrap_or_default(),
            polled_from,
            request,
            victim_count: victims.count,
            victims: victims.named,
            stack: None,
        }
    }

    fn name_from_asgi(
        &mut self,
        stall: &Stall,
        in_progress: bool,
        context: &mut StallContext,
    ) -> Option<Verdict> {
        let asgi = self.asgi.as_mut()?;
        Some(name_from_asgi(asgi, stall, in_progress, context))
    }
}

/// What the kernel holds of requests, named (`None` maps: not tracked).
struct RequestView<'a> {
    maps: Option<&'a RequestMaps>,
    names: &'a RouteNames,
}

impl RequestView<'_> {
    /// The request task `task_id` served during a poll that began at `start_ns`.
    fn culprit(&self, task_id: Option<u64>, start_ns: u64) -> Option<Request> {
        let (maps, task) = (self.maps?, task_id?);
        let name = |entry: loopguard_common::requests::RequestEntry| {
            attribute::request(&entry, self.names)
        };
        let ended = maps.ended_in_poll(task).map(name);
        let serving = maps.serving(task).map(name);
        let found = attribute::culprit(task, start_ns, ended, serving, &[]);
        if found.is_some() {
            return found;
        }
        // Ended since, in a poll too short to keep it by task.
        let recent: Vec<Request> = maps
            .recent_ends()
            .iter()
            .filter(|entry| entry.task_id == task)
            .map(|entry| name(*entry))
            .collect();
        attribute::culprit(task, start_ns, None, None, &recent)
    }

    /// The other requests in flight during `stall`: counted in the kernel,
    /// named while it still knows them.
    fn victims(&self, stall: &Stall, culprit: Option<&Request>) -> Victims {
        let Some(maps) = self.maps else {
            return Victims::default();
        };
        let overlapping = stall
            .requests_window
            .map_or(0, |(ended_at_start, started_at_end)| {
                started_at_end
                    .unwrap_or_else(|| maps.totals().started)
                    .saturating_sub(ended_at_start)
            });
        let recent = maps.recent_ends();
        let known = maps
            .in_flight()
            .into_iter()
            .chain(recent.iter().copied())
            .map(|entry| attribute::request(&entry, self.names));
        attribute::victims(
            overlapping,
            culprit,
            known,
            (stall.start_ns, stall.start_ns + stall.duration_ns),
            VICTIMS_LISTED,
        )
    }
}

/// Feeds the metrics the values only the kernel's maps hold.
struct MetricsFeed {
    metrics: Arc<Metrics>,
    busy: BusyTracker,
    loop_busy: BusyTracker,
    names: HashMap<u32, String>,
    last_refresh: Option<Instant>,
}

/// How often the live metrics (poll histogram, busy time, lost data) are
/// read from the kernel: often enough for a 1 s scrape interval.
const METRICS_REFRESH: Duration = Duration::from_millis(200);

/// Everything one watch keeps between events.
struct Session<'t> {
    engine: ThresholdEngine,
    /// Where findings go: summary, metrics, `--fail-on`, output.
    findings: Router,
    /// ns when the adaptive rule last read the histogram.
    histogram_read_ns: u64,
    /// The target and the kernel's request maps.
    live: LiveTarget<'t>,
    /// Runtime addresses of the middleware's in-flight tables: the
    /// requests behind polls already stuck at attach.
    inflight_tables: Vec<u64>,
    /// The probe layout mismatch was said.
    layout_said: bool,
    printer: Printer<'t>,
    events: Vec<RawEvent>,
    metrics: Option<MetricsFeed>,
    stacks: Option<Stacks>,
    /// Threads that have polled a task (at the last scan): their polls, not
    /// their busy stretches, feed the cumulative rule.
    polling_threads: HashSet<u32>,
    /// The live status line (stderr is a terminal).
    status: Option<StatusFeed>,
}

/// What the status line was last drawn from.
struct StatusFeed {
    started: Instant,
    last: Option<(Instant, u64)>,
}

impl StatusFeed {
    /// A feed when the status line is shown (stderr is a terminal).
    fn when_shown(started: Instant) -> Option<Self> {
        crate::term::status_enabled().then_some(Self {
            started,
            last: None,
        })
    }
}

/// How often the status line is redrawn.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// How long threads are watched at attach for polls stuck since before:
/// the threshold, within these bounds.
const CENSUS_MIN: Duration = Duration::from_millis(50);
const CENSUS_MAX: Duration = Duration::from_millis(500);

/// How long a stop may take to explain a target's exit.
const STOP_GRACE: Duration = Duration::from_millis(500);

impl Session<'_> {
    fn thresholds(&self) -> Thresholds {
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

    /// Polls (and `block_on` bodies) already stuck when loopguard attached,
    /// found from their threads' stacks once the census window has passed:
    /// reported in progress, with a lower bound.
    fn report_stuck_before_attach(&mut self, collector: &Collector, now_ns: u64) {
        let Some(stacks) = &mut self.stacks else {
            return;
        };
        // Threads where a poll began or ended, or a wait, since attaching
        // are not stuck in something that began before.
        let polls_seen = || {
            let mut seen: Vec<u32> = collector
                .snapshot()
                .iter()
                .filter(|(_, polls)| polls.depth > 0 || polls.task_polls > 0)
                .map(|(tid, _)| *tid)
                .collect();
            seen.extend(collector.loop_snapshot().iter().map(|(tid, _)| *tid));
            seen
        };
        let pid = self.printer.target.pid;
        let loop_only = self.printer.target.is_loop_only();
        let engine = &mut self.engine;
        // A Python app's table names its loop threads (read once, if asked).
        let asgi = &mut self.live.asgi;
        let mut asgi_loops: Option<Vec<u32>> = None;
        // A process with no epoll instance (an interpreter met at exec) has
        // no loop to be stuck in.
        let has_loop = loop_only && proc::has_epoll_fd(pid);
        let loop_thread = |tid: u32| {
            has_loop
                && (asgi_loops
                    .get_or_insert_with(|| {
                        asgi.as_mut()
                            .map(crate::attribute::asgi::loop_threads)
                            .unwrap_or_default()
                    })
                    .contains(&tid)
                    || engine.presumed_loop_thread(pid, tid, |tid| proc::thread_name(pid, tid)))
        };
        let Some(found) = stacks.finish_census(now_ns, polls_seen, loop_thread) else {
            return;
        };
        // Their requests started before the probes: the middleware's
        // in-flight table names them.
        let in_flight = if found.is_empty() {
            Vec::new()
        } else {
            crate::attribute::inflight::read(self.printer.target.pid, &self.inflight_tables)
        };
        for (mut stall, mut stack) in found {
            stall.threshold_ns = self.engine.threshold_ns();
            let request = (stall.kind == StallKind::Poll)
                .then(|| crate::attribute::inflight::running_on(&in_flight, stall.tid))
                .flatten();
            if let Some(began) =
                request.and_then(crate::attribute::inflight::InflightRequest::poll_began_by)
                && began < stall.start_ns
            {
                stack.extend_back(stall.start_ns - began);
                stall.duration_ns += stall.start_ns - began;
                stall.start_ns = began;
            }
            let thresholds = self.thresholds();
            let mut context = self.live.context(&stall);
            if let Some(request) = request {
                context.request = Some(request.to_request());
            }
            self.live.name_from_asgi(&stall, true, &mut context);
            context.stack = Some(stack);
            self.findings.report_stuck(
                stall,
                &context,
                thresholds,
                &mut self.live,
                &mut self.printer,
            );
        }
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
    fn handle_events(&mut self, collector: &mut Collector) {
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
                    let finding = self.engine.on_poll_end(poll, |task_id, start_ns| {
                        culprit(&view, routes, task_id, start_ns)
                    });
                    if let Some(finding) = finding {
                        self.report(&finding);
                    }
                }
                RawEvent::LoopBusy(busy) => {
                    let pid = self.printer.target.pid;
                    if let Some(finding) = self
                        .engine
                        .on_loop_stretch(busy, |tid| proc::thread_name(pid, tid))
                    {
                        self.report(&finding);
                    } else if !self.polling_threads.contains(&busy.tid) {
                        let held_ns = busy.duration_ns.saturating_sub(busy.preempted_ns);
                        let end_ns = busy.start_ns + busy.duration_ns;
                        // A Python app's table gives the step that held the
                        // loop, if one did, instead of the whole stretch.
                        let step = self.live.asgi.as_mut().and_then(|asgi| {
                            crate::attribute::asgi::cut_of_stretch(
                                asgi,
                                busy.tid,
                                busy.start_ns,
                                end_ns,
                                held_ns,
                            )
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

    fn scan(&mut self, collector: &Collector) {
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
        let loop_threads = collector.loop_snapshot();
        if let Some(stacks) = &mut self.stacks {
            let stretches: &[_] = if self.printer.target.is_loop_only() {
                &loop_threads
            } else {
                &[]
            };
            stacks.scan(now_ns, &threads, stretches);
        }
        self.report_stuck_before_attach(collector, now_ns);
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
        self.refresh_status(collector);
        let due = self.metrics.as_ref().is_some_and(|feed| {
            feed.last_refresh
                .is_none_or(|last| last.elapsed() >= METRICS_REFRESH)
        });
        if due {
            self.refresh_metrics(collector, now_ns, &threads);
        }
    }

    /// Redraws the status line once a second: polls per second from the
    /// kernel's histogram, stalls so far, the threshold, requests in flight.
    fn refresh_status(&mut self, collector: &Collector) {
        let Some(feed) = &mut self.status else {
            return;
        };
        let now = Instant::now();
        if feed
            .last
            .is_some_and(|(at, _)| now.duration_since(at) < STATUS_REFRESH)
        {
            return;
        }
        let polls = collector.histogram().total();
        let rate = feed.last.map_or(0, |(at, before)| {
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            (polls.saturating_sub(before) as f64 / secs).round() as u64
        });
        feed.last = Some((now, polls));
        crate::present::output::status(Some(crate::term::status_text(
            rate,
            self.findings.summary.stalls,
            events::ms(self.engine.threshold_ns()),
            self.live.request_maps.as_ref().map_or(0, |maps| {
                let totals = maps.totals();
                usize::try_from(totals.started.saturating_sub(totals.ended)).unwrap_or(usize::MAX)
            }),
            now.duration_since(feed.started).as_secs(),
        )));
    }

    /// Reads what only the kernel's maps hold into the metrics.
    fn refresh_metrics(
        &mut self,
        collector: &Collector,
        now_ns: u64,
        threads: &[(u32, ThreadPolls)],
    ) {
        let Some(feed) = &mut self.metrics else {
            return;
        };
        feed.last_refresh = Some(Instant::now());
        // Always the live value, not only when a move is large enough to say.
        feed.metrics.set_threshold_ns(self.engine.threshold_ns());
        let (stuck, longest) = stuck_polls(now_ns, self.engine.threshold_ns(), threads);
        let pid = self.printer.target.pid;
        let names = &mut feed.names;
        let busy = feed.busy.update(now_ns, threads, |tid| {
            names
                .entry(tid)
                .or_insert_with(|| proc::thread_name(pid, tid))
                .clone()
        });
        let loops = collector.loop_snapshot();
        let loop_busy = feed.loop_busy.update_totals(
            now_ns,
            loops
                .iter()
                .filter(|(_, state)| state.waits > 0)
                .map(|(tid, state)| {
                    let thread = LoopThread::from_state(*tid, String::new(), state, now_ns);
                    (*tid, thread.busy_ns)
                }),
            |tid| {
                names
                    .entry(tid)
                    .or_insert_with(|| proc::thread_name(pid, tid))
                    .clone()
            },
        );
        names.retain(|tid, _| {
            threads.iter().any(|(alive, _)| alive == tid)
                || loops.iter().any(|(alive, _)| alive == tid)
        });
        let counters = collector.counters();
        let totals = self
            .live
            .request_maps
            .as_ref()
            .map(RequestMaps::totals)
            .unwrap_or_default();
        if let Some(maps) = &self.live.request_maps {
            let names = &self.live.route_names;
            feed.metrics
                .set_requests_started(maps.route_counts().into_iter().map(|(key, started)| {
                    let (method, route) = names.get(key).unwrap_or(("?", None));
                    (method.to_owned(), route.map(str::to_owned), started)
                }));
        }
        feed.metrics.set_live(LiveState {
            histogram: collector.histogram(),
            lost: Lost::causes(&counters)
                .chain([
                    // A scan that found a thread's slot being written on every
                    // attempt leaves it out: that scan's view of it is lost.
                    ("snapshot_slot_busy", collector.busy_slots.get()),
                    ("malformed_record", collector.malformed),
                    ("request_evicted", totals.replaced),
                    ("request_end_without_start", totals.unmatched_ends),
                    ("request_start_outside_poll", totals.outside_poll),
                    ("request_probe_layout_mismatch", totals.layout_mismatches),
                ])
                .collect(),
            threads: busy,
            loop_threads: loop_busy,
            requests_in_flight: totals.started.saturating_sub(totals.ended),
            stuck_polls: stuck,
            stuck_longest_ns: longest,
        });
    }
}

/// The request a task served during a poll that began at `start_ns`, and
/// whether its route is excluded.
fn culprit(
    requests: &RequestView,
    routes: &RouteFilter,
    task_id: Option<u64>,
    start_ns: u64,
) -> (Option<Culprit>, bool) {
    let Some(request) = requests.culprit(task_id, start_ns) else {
        return (None, false);
    };
    let route = request.route.unwrap_or_else(|| request.path.clone());
    let excluded = routes.excludes(&route);
    let culprit = Culprit {
        id: request.id,
        method: request.method,
        route,
        path: request.path,
    };
    (Some(culprit), excluded)
}

impl<'t> Session<'t> {
    fn new(
        target: &'t ProbeTarget,
        collector: &mut Collector,
        stacks: Option<Stacks>,
        options: &WatchOptions,
        started: Instant,
    ) -> Self {
        Session {
            engine: ThresholdEngine::new(options.detect.clone()),
            findings: Router::new(options.routes.clone(), options.metrics.clone()),
            histogram_read_ns: 0,
            live: LiveTarget {
                target,
                callers: HashMap::new(),
                request_maps: collector
                    .requests
                    .take()
                    .filter(|_| options.requests && !target.binary.usdt_sites.is_empty()),
                route_names: RouteNames::default(),
                asgi: target.is_loop_only().then(|| AsgiTables::new(target.pid)),
            },
            inflight_tables: crate::attribute::inflight::table_addresses(target),
            layout_said: false,
            printer: Printer {
                target,
                format: options.format,
                label: options.label,
            },
            events: Vec::new(),
            metrics: options.metrics.as_ref().map(|metrics| {
                metrics.set_threshold_ns(options.detect.threshold_ns);
                MetricsFeed {
                    metrics: Arc::clone(metrics),
                    busy: BusyTracker::default(),
                    loop_busy: BusyTracker::default(),
                    names: HashMap::new(),
                    last_refresh: None,
                }
            }),
            stacks,
            polling_threads: HashSet::new(),
            status: StatusFeed::when_shown(started),
        }
    }
}

/// Watches until `stop` resolves (or the target exits).
pub async fn watch(
    target: &ProbeTarget,
    collector: &mut Collector,
    stacks: Option<Stacks>,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<Outcome, CollectError> {
    let started = Instant::now();
    let mut stacks = stacks;
    if let Some(stacks) = &mut stacks {
        let window =
            Duration::from_nanos(options.detect.threshold_ns).clamp(CENSUS_MIN, CENSUS_MAX);
        stacks.start_census(window);
        // Their waits' returns cannot be seen: the kernel watches for them.
        // Not without a wait path: no wait would ever end the stretch that
        // starts, and a worker's idle time would read as a loop stall.
        if !matches!(options.wait_probes, crate::attach::WaitProbes::Off) {
            let waiting = stacks.asleep_in_waits();
            let filed = collector.mark_unseen_waits(&waiting);
            tracing::debug!(?waiting, filed, "threads asleep in a wait at attach");
        }
    }
    let mut session = Session::new(target, collector, stacks, options, started);
    let mut scan = tokio::time::interval(options.scan_interval);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut liveness = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(stop);

    let reason = loop {
        tokio::select! {
            reason = &mut stop => break reason,
            ready = collector.readable(), if !options.bench.empty_programs => {
                ready?;
                session.handle_events(collector);
            }
            _ = scan.tick(), if !options.bench.empty_programs => {
                // Events first, so a poll that just ended is not reported as in progress.
                session.handle_events(collector);
                session.scan(collector);
            }
            _ = liveness.tick() => {
                if crate::present::output::reader_gone() {
                    break StopReason::OutputClosed;
                }
                if !proc::is_alive(target.pid) {
                    // The caller may know better why it ended (`run`'s
                    // --duration kills it): give its stop a moment to say so.
                    let known = tokio::time::timeout(STOP_GRACE, &mut stop).await;
                    break known.unwrap_or(StopReason::TargetExited);
                }
            }
        }
    };
    session.handle_events(collector);
    crate::present::output::status(None);
    // The endpoint stays up until loopguard exits: a last scrape sees the totals.
    session.refresh_metrics(collector, monotonic_ns(), &collector.snapshot());
    let mut summary = session.findings.summary;
    summary.unfinished = session.engine.unfinished() + session.engine.unfinished_loops();
    summary.thresholds = session.engine.range();
    summary.adaptive = options.detect.adaptive.is_some();
    summary.excluded_cuts = session.engine.excluded_cuts();
    summary.preempted_cuts = session.engine.preempted_cuts;
    let now_ns = monotonic_ns();
    summary.loop_threads = collector
        .loop_snapshot()
        .iter()
        .filter(|(_, state)| state.waits > 0)
        .map(|(tid, state)| {
            LoopThread::from_state(*tid, proc::thread_name(target.pid, *tid), state, now_ns)
        })
        .collect();
    summary.loop_threads.sort_by_key(|thread| thread.tid);
    summary.counters = collector.counters();
    summary.histogram = collector.histogram();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.at_ns = now_ns;
    summary.stop_reason = reason.as_str();
    summary.requests = events::RequestsSummary::new(
        session.live.request_maps.as_ref().map(RequestMaps::totals),
        &session.findings.route_stalls,
    );
    // Several processes (`run` following) share the file: each line says whose.
    let root_frame = options.label.then(|| {
        crate::stacks::fold::folded_frame(&format!(
            "[pid {} {}]",
            target.pid, target.exe.display_path
        ))
    });
    summary.stacks = finish_stacks(
        session.stacks.as_ref(),
        options.folded.as_deref(),
        root_frame.as_deref(),
    );
    if collector.malformed > 0 {
        tracing::warn!(
            records = collector.malformed,
            "ring buffer records that did not decode were skipped"
        );
    }
    Ok(Outcome {
        summary,
        reason,
        offending: session.findings.offending,
    })
}

/// The run's stalls folded by stack, written to `folded` too when asked.
fn finish_stacks(
    stacks: Option<&Stacks>,
    folded: Option<&std::path::Path>,
    root_frame: Option<&str>,
) -> Vec<crate::stacks::fold::StackStalls> {
    let Some(stacks) = stacks else {
        return Vec::new();
    };
    if let Some(path) = folded {
        let text = stacks.folded_text();
        let text = match root_frame {
            Some(root) => text.lines().fold(String::new(), |mut out, line| {
                use std::fmt::Write as _;
                let _ = writeln!(out, "{root};{line}");
                out
            }),
            None => text,
        };
        write_folded(path, &text);
    }
    stacks.ranked()
}

/// Appends the folded stacks to the file `start_watch` emptied (every
/// watched process adds its own); a failure is reported, not fatal (the
/// summary still prints).
fn write_folded(path: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let written =
        crate::present::outfile::append(path).and_then(|mut file| file.write_all(text.as_bytes()));
    if let Err(error) = written {
        crate::diag!(
            "loopguard: error: cannot write the folded stacks to {}: {error}; check the directory exists and is writable",
            path.display()
        );
    }
}

/// Prints (and records) the summary: JSON or text on stdout, naming the
/// process on every line when several are watched.
pub fn print_summary(outcome: &Outcome, target: &ProbeTarget, options: &WatchOptions) {
    let summary = build::summary(&outcome.summary, target.pid);
    let process = emit::Process {
        pid: target.pid,
        exe: &target.exe.display_path,
    };
    emit::event_from(
        &events::Event::Summary(Box::new(summary)),
        options.format,
        options.label.then_some(process),
    );
}

/// The culprit and victims of loop stall `stall` from a Python app's
/// `loopguard-asgi` table, into `context` (unless it already has a request).
fn name_from_asgi(
    asgi: &mut crate::attribute::asgi::AsgiTables,
    stall: &crate::detect::Stall,
    in_progress: bool,
    context: &mut StallContext,
) -> crate::attribute::asgi::Verdict {
    let mut named = crate::attribute::asgi::Named {
        request: context.request.take(),
        ..Default::default()
    };
    let verdict = crate::attribute::asgi::attribute_loop_stall(
        asgi,
        stall,
        in_progress,
        &mut named,
        VICTIMS_LISTED,
    );
    context.request = named.request;
    if verdict == crate::attribute::asgi::Verdict::Attributed {
        context.victims = named.victims;
        context.victim_count = named.victim_count;
    }
    verdict
}
