//! The Prometheus metrics: what the agent found, as counters, gauges and
//! histograms, rendered in the text exposition format.
//!
//! In: findings (stalls with their request and victims), request starts,
//! the threshold, and a [`LiveState`] the watch loop refreshes from the
//! kernel's maps a few times a second (poll histogram, lost data, busy time
//! per worker, polls stuck right now). Out: the `/metrics` body.
//!
//! Labels stay bounded ([`super::labels`]): route templates under a cap,
//! standard methods, three kinds.

use std::collections::HashMap;
use std::sync::Mutex;

use loopguard_common::hist;
use prometheus::proto::{
    Bucket, Counter as CounterValue, Gauge as GaugeValue, Histogram as HistogramValue, LabelPair,
    Metric, MetricFamily, MetricType,
};
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::labels::{OTHER_METHOD, RouteLabels, STANDARD_METHODS, method_label};
use crate::attribute::Request;
use crate::collect::totals::Histogram;

/// What a finding was, as the `kind` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockingKind {
    /// One task poll over the threshold.
    Stall,
    /// Many shorter polls adding up inside a window.
    Cumulative,
    /// An event loop that did not come back to wait for events.
    Loop,
}

impl BlockingKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Stall => "stall",
            Self::Cumulative => "cumulative",
            Self::Loop => "loop",
        }
    }
}

/// The process watched, for `loopguard_target_info`.
#[derive(Clone, Debug)]
pub struct TargetInfo {
    pub pid: u32,
    pub exe: String,
    /// The Tokio version the binary was built with, when it can be told.
    pub tokio_version: Option<String>,
}

/// Busy time of one worker thread over the last refresh.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadBusy {
    pub tid: u32,
    pub name: String,
    /// 0..=1: the share of the last interval spent inside task polls.
    pub ratio: f64,
}

/// Values read from the kernel's maps, replaced whole at each refresh.
#[derive(Clone, Debug, Default)]
pub struct LiveState {
    /// Every worker task poll so far.
    pub histogram: Histogram,
    /// `(cause, total)` of data lost or dropped.
    pub lost: Vec<(&'static str, u64)>,
    pub threads: Vec<ThreadBusy>,
    /// Event-loop threads (the wait path): share of time away from the wait.
    pub loop_threads: Vec<ThreadBusy>,
    pub requests_in_flight: u64,
    /// Polls past the threshold that have not returned, now.
    pub stuck_polls: u32,
    /// ns, how long the longest of them has run.
    pub stuck_longest_ns: u64,
}

/// Edges (ns) of the poll-duration histogram's Prometheus buckets: every
/// power of two from 1 µs to 17 s, each a slot edge of the kernel histogram,
/// so the cumulative counts are exact.
fn poll_bucket_edges_ns() -> impl Iterator<Item = u64> {
    (10..=34).map(|bit| 1u64 << bit)
}

/// Stall durations, s.
const LAG_BUCKETS_S: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Victims of one stall.
const VICTIM_BUCKETS: [f64; 12] = [
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Requests started, by route label, then by method (index into
/// [`STANDARD_METHODS`], the last slot `OTHER`). Kept as totals rather
/// than as a counter vector, so the same series can be fed either one
/// request at a time (today: the middleware's records cross the ring
/// buffer) or from totals the kernel counts per route (docs/ARCHITECTURE.md,
/// "Request state"), and counting a request of a known route allocates
/// nothing.
type RequestTotals = HashMap<String, [u64; STANDARD_METHODS.len() + 1]>;

/// Every metric loopguard exports.
pub struct Metrics {
    registry: Registry,
    blocking: IntCounterVec,
    lag: HistogramVec,
    victims: HistogramVec,
    threshold: Gauge,
    probes: IntGauge,
    routes: Mutex<RouteLabels>,
    requests: Mutex<RequestTotals>,
    /// Finished poll stalls by the innermost frame of the program's own
    /// code that was running (stack capture on), at most [`TOP_FRAMES`].
    top_frames: Mutex<HashMap<String, u64>>,
    live: Mutex<LiveState>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are fixed and distinct");
    metric
}

/// The families counted per blocking event: events by kind and route,
/// their lag, and a stall's victims.
fn event_families(registry: &Registry) -> (IntCounterVec, HistogramVec, HistogramVec) {
    let blocking = register(
        registry,
        IntCounterVec::new(
            Opts::new(
                "loopguard_blocking_total",
                "Blocking events: kind=stall (one task poll over the threshold), cumulative (short polls adding up in a window), loop (an event loop away from its wait)",
            ),
            &["kind", "route", "method"],
        )
        .expect("valid metric"),
    );
    let lag = register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(
                "loopguard_lag_seconds",
                "How long each blocking event kept its thread from the event loop",
            )
            .buckets(LAG_BUCKETS_S.to_vec()),
            &["kind", "route", "method"],
        )
        .expect("valid metric"),
    );
    let victims = register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(
                "loopguard_stall_victims",
                "Other requests in flight while a stall blocked its thread, by the culprit's route",
            )
            .buckets(VICTIM_BUCKETS.to_vec()),
            &["route", "method"],
        )
        .expect("valid metric"),
    );
    (blocking, lag, victims)
}

/// `loopguard_target_info`: the process watched, always 1.
fn register_target_info(registry: &Registry, target: &TargetInfo) {
    let info = register(
        registry,
        IntGaugeVec::new(
            Opts::new("loopguard_target_info", "The process watched (always 1)"),
            &["pid", "exe", "tokio_version", "loopguard_version"],
        )
        .expect("valid metric"),
    );
    info.with_label_values(&[
        &target.pid.to_string(),
        &target.exe,
        target.tokio_version.as_deref().unwrap_or("unknown"),
        env!("CARGO_PKG_VERSION"),
    ])
    .set(1);
}

impl Metrics {
    pub fn new(target: &TargetInfo, max_routes: usize) -> Self {
        let registry = Registry::new();
        let (blocking, lag, victims) = event_families(&registry);
        let threshold = register(
            &registry,
            Gauge::new(
                "loopguard_threshold_seconds",
                "The stall threshold in force now",
            )
            .expect("valid metric"),
        );
        let probes = register(
            &registry,
            IntGauge::new(
                "loopguard_probes_attached",
                "uprobes loopguard holds in the target",
            )
            .expect("valid metric"),
        );
        register_target_info(&registry, target);
        Self {
            registry,
            blocking,
            lag,
            victims,
            threshold,
            probes,
            routes: Mutex::new(RouteLabels::new(max_routes)),
            requests: Mutex::new(HashMap::new()),
            top_frames: Mutex::new(HashMap::new()),
            live: Mutex::new(LiveState::default()),
        }
    }

    pub fn set_threshold_ns(&self, threshold_ns: u64) {
        self.threshold.set(threshold_ns as f64 / 1e9);
    }

    pub fn set_probes(&self, probes: usize) {
        self.probes.set(probes as i64);
    }

    /// A blocking event ended (or, for cumulative and loop, was raised).
    pub fn record(
        &self,
        kind: BlockingKind,
        culprit: Option<&Request>,
        duration_ns: u64,
        victims: usize,
    ) {
        let (route, method) = lock(&self.routes).of(culprit);
        let labels = [kind.label(), route.as_str(), method];
        self.blocking.with_label_values(&labels).inc();
        self.lag
            .with_label_values(&labels)
            .observe(duration_ns as f64 / 1e9);
        if kind == BlockingKind::Stall {
            self.victims
                .with_label_values(&[route.as_str(), method])
                .observe(victims as f64);
        }
    }

    /// A finished poll stall's top frame (`None`: no stack was captured).
    pub fn record_top_frame(&self, frame: Option<&str>) {
        let mut frames = lock(&self.top_frames);
        let frame = frame.unwrap_or(UNKNOWN_FRAME);
        let key = if frames.contains_key(frame) || frames.len() < TOP_FRAMES {
            frame
        } else {
            OTHER_FRAME
        };
        *frames.entry(key.to_owned()).or_default() += 1;
    }

    /// The kernel's count of requests started per `(method, route)`, all of
    /// them each time (they only grow).
    pub fn set_requests_started(
        &self,
        counts: impl IntoIterator<Item = (String, Option<String>, u64)>,
    ) {
        let mut fresh = RequestTotals::new();
        let mut routes = lock(&self.routes);
        for (method, route, started) in counts {
            let request = Request {
                id: 0,
                method,
                route,
                path: String::new(),
                task_id: 0,
                start_ns: 0,
                end_ns: None,
                status: None,
            };
            let (label, _) = routes.of(Some(&request));
            fresh.entry(label).or_default()[method_index(&request.method)] += started;
        }
        *lock(&self.requests) = fresh;
    }

    /// Replaces the values read from the kernel.
    pub fn set_live(&self, live: LiveState) {
        *lock(&self.live) = live;
    }

    /// The `/metrics` body.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.families())
            .unwrap_or_else(|error| format!("# loopguard: failed to encode metrics: {error}\n"))
    }

    /// Every metric family with at least one sample (the host's exporter
    /// labels and merges them, `super::fleet`).
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut families = self.registry.gather();
        // A family with no sample (no thread busy yet, nothing lost) is
        // left out: the format has no way to say "none yet".
        families.extend(
            [
                request_family(&lock(&self.requests)),
                top_frame_family(&lock(&self.top_frames)),
            ]
            .into_iter()
            .chain(live_families(&lock(&self.live)))
            .filter(|family| !family.get_metric().is_empty()),
        );
        families
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the metrics down with it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn method_index(method: &str) -> usize {
    let label = method_label(method);
    STANDARD_METHODS
        .iter()
        .position(|standard| *standard == label)
        .unwrap_or(STANDARD_METHODS.len())
}

pub(super) fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<Metric>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

fn labelled(labels: &[(&str, &str)]) -> Metric {
    Metric::from_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect(),
    )
}

pub(super) fn gauge(labels: &[(&str, &str)], value: f64) -> Metric {
    let mut metric = labelled(labels);
    let mut gauge = GaugeValue::default();
    gauge.set_value(value);
    metric.set_gauge(gauge);
    metric
}

pub(super) fn counter(labels: &[(&str, &str)], value: u64) -> Metric {
    let mut metric = labelled(labels);
    let mut counter = CounterValue::default();
    counter.set_value(value as f64);
    metric.set_counter(counter);
    metric
}

/// Distinct top frames kept as labels; later ones are `other`.
pub const TOP_FRAMES: usize = 50;
const OTHER_FRAME: &str = "other";
const UNKNOWN_FRAME: &str = "unknown";

fn top_frame_family(frames: &HashMap<String, u64>) -> MetricFamily {
    family(
        "loopguard_stalls_by_top_frame_total",
        "Finished poll stalls by the innermost function of the program's own code that was running (at most 50 distinct, then other; unknown without a stack)",
        MetricType::COUNTER,
        frames
            .iter()
            .map(|(frame, total)| counter(&[("top_frame", frame)], *total))
            .collect(),
    )
}

fn request_family(totals: &RequestTotals) -> MetricFamily {
    let mut metrics = Vec::new();
    for (route, methods) in totals {
        for (index, &total) in methods.iter().enumerate() {
            if total > 0 {
                let method = STANDARD_METHODS.get(index).copied().unwrap_or(OTHER_METHOD);
                metrics.push(counter(&[("method", method), ("route", route)], total));
            }
        }
    }
    family(
        "loopguard_requests_monitored_total",
        "Requests the middleware's probes reported starting",
        MetricType::COUNTER,
        metrics,
    )
}

/// The kernel's poll histogram as a Prometheus histogram: exact cumulative
/// counts at every power of two from 1 µs to 17 s.
fn poll_histogram(histogram: &Histogram) -> Metric {
    let mut buckets = Vec::new();
    let mut slots = histogram.0.iter().enumerate().peekable();
    let mut cumulative = 0;
    for edge in poll_bucket_edges_ns() {
        // Slots below the edge: all of them end at or before it.
        let edge_slot = hist::slot_of(edge) as usize;
        while let Some((_, count)) = slots.next_if(|(slot, _)| *slot < edge_slot) {
            cumulative += count;
        }
        let mut bucket = Bucket::default();
        bucket.set_upper_bound(edge as f64 / 1e9);
        bucket.set_cumulative_count(cumulative);
        buckets.push(bucket);
    }
    let mut value = HistogramValue::default();
    value.set_sample_count(histogram.total());
    value.set_sample_sum(histogram.1 as f64 / 1e9);
    value.set_bucket(buckets);
    let mut metric = Metric::default();
    metric.set_histogram(value);
    metric
}

/// One gauge per thread, labelled with its name and tid.
fn busy_gauges(threads: &[ThreadBusy]) -> Vec<Metric> {
    threads
        .iter()
        .map(|thread| {
            gauge(
                &[("thread", &thread.name), ("tid", &thread.tid.to_string())],
                thread.ratio,
            )
        })
        .collect()
}

/// The `loopguard_*` metric names a text (`PromQL` in alert rules or a
/// dashboard) uses, to check them against what is exported.
pub fn names_used(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("loopguard_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn live_families(live: &LiveState) -> Vec<MetricFamily> {
    let mut families = poll_families(live);
    families.extend(busy_families(live));
    families.extend(stuck_families(live));
    families
}

/// The polls timed and the data lost, so far.
fn poll_families(live: &LiveState) -> Vec<MetricFamily> {
    vec![
        family(
            "loopguard_poll_duration_seconds",
            "Time every worker task poll held its thread (preempted time left out), from the kernel's histogram (buckets at powers of two)",
            MetricType::HISTOGRAM,
            vec![poll_histogram(&live.histogram)],
        ),
        family(
            "loopguard_polls_total",
            "Worker task polls timed",
            MetricType::COUNTER,
            vec![counter(&[], live.histogram.total())],
        ),
        family(
            "loopguard_lost_total",
            "Data loopguard lost or dropped, by cause; anything but 0 means some stalls or requests may be missing",
            MetricType::COUNTER,
            live.lost
                .iter()
                .map(|(cause, total)| counter(&[("cause", cause)], *total))
                .collect(),
        ),
    ]
}

/// How busy the threads were over the last refresh interval, and the requests in flight.
fn busy_families(live: &LiveState) -> Vec<MetricFamily> {
    vec![
        family(
            "loopguard_thread_busy_ratio",
            "Share of the last refresh interval each worker thread spent inside task polls (0..1)",
            MetricType::GAUGE,
            busy_gauges(&live.threads),
        ),
        family(
            "loopguard_loop_busy_ratio",
            "Share of the last refresh interval each event-loop thread spent away from its wait for events (0..1)",
            MetricType::GAUGE,
            busy_gauges(&live.loop_threads),
        ),
        family(
            "loopguard_requests_in_flight",
            "Requests started and not yet ended",
            MetricType::GAUGE,
            vec![gauge(&[], live.requests_in_flight as f64)],
        ),
    ]
}

/// The polls stuck now.
fn stuck_families(live: &LiveState) -> Vec<MetricFamily> {
    vec![
        family(
            "loopguard_poll_stuck",
            "1 while a task poll has been running longer than the threshold and has not returned",
            MetricType::GAUGE,
            vec![gauge(&[], f64::from(u8::from(live.stuck_polls > 0)))],
        ),
        family(
            "loopguard_stuck_polls",
            "Task polls running longer than the threshold now",
            MetricType::GAUGE,
            vec![gauge(&[], f64::from(live.stuck_polls))],
        ),
        family(
            "loopguard_poll_stuck_seconds",
            "How long the longest poll stuck now has run (0 when none is)",
            MetricType::GAUGE,
            vec![gauge(&[], live.stuck_longest_ns as f64 / 1e9)],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(
            &TargetInfo {
                pid: 42,
                exe: "/srv/api".to_owned(),
                tokio_version: Some("1.47.1".to_owned()),
            },
            200,
        )
    }

    fn request(route: Option<&str>) -> Request {
        Request {
            id: 8812,
            method: "POST".to_owned(),
            route: route.map(str::to_owned),
            path: "/login".to_owned(),
            task_id: 7,
            start_ns: 0,
            end_ns: None,
            status: None,
        }
    }

    /// The value of the sample whose line starts with `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn stalls_count_by_kind_route_and_method() {
        let metrics = metrics();
        let login = request(Some("/login"));
        metrics.record(BlockingKind::Stall, Some(&login), 340_000_000, 4);
        metrics.record(BlockingKind::Stall, Some(&login), 60_000_000, 0);
        metrics.record(BlockingKind::Stall, None, 70_000_000, 0);
        let text = metrics.render();
        assert_eq!(
            sample(
                &text,
                r#"loopguard_blocking_total{kind="stall",method="POST",route="/login"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"loopguard_blocking_total{kind="stall",method="none",route="none"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"loopguard_lag_seconds_sum{kind="stall",method="POST",route="/login"}"#
            ),
            Some(0.4)
        );
        assert_eq!(
            sample(
                &text,
                r#"loopguard_stall_victims_sum{method="POST",route="/login"}"#
            ),
            Some(4.0)
        );
    }

    #[test]
    fn requests_are_counted_by_template_never_by_path() {
        let metrics = metrics();
        // The kernel's counts per (method, route key), read twice: the
        // second read replaces the first.
        metrics.set_requests_started([("POST".to_owned(), Some("/users/{id}".to_owned()), 1)]);
        metrics.set_requests_started([
            ("POST".to_owned(), Some("/users/{id}".to_owned()), 3),
            ("POST".to_owned(), None, 1),
        ]);
        let text = metrics.render();
        assert_eq!(
            sample(
                &text,
                r#"loopguard_requests_monitored_total{method="POST",route="/users/{id}"}"#
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"loopguard_requests_monitored_total{method="POST",route="unmatched"}"#
            ),
            Some(1.0)
        );
        assert!(
            !text.contains("/login"),
            "a raw path became a label: {text}"
        );
    }

    #[test]
    fn the_poll_histogram_has_exact_power_of_two_buckets() {
        let metrics = metrics();
        let mut histogram = Histogram::default();
        histogram.0[hist::slot_of(1_500) as usize] = 10; // 1.5 us
        histogram.0[hist::slot_of(2_047) as usize] = 5; // just under 2.048 us
        histogram.0[hist::slot_of(3_000_000) as usize] = 1; // 3 ms
        histogram.1 = 10 * 1_500 + 5 * 2_047 + 3_000_000;
        metrics.set_live(LiveState {
            histogram,
            ..LiveState::default()
        });
        let text = metrics.render();
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("loopguard_poll_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.000001024"), Some(0.0), "{text}");
        assert_eq!(bucket("0.000002048"), Some(15.0));
        assert_eq!(bucket("0.002097152"), Some(15.0));
        assert_eq!(bucket("0.004194304"), Some(16.0));
        assert_eq!(bucket("+Inf"), Some(16.0));
        assert_eq!(sample(&text, "loopguard_polls_total"), Some(16.0));
    }

    #[test]
    fn live_values_and_info_are_exported() {
        let metrics = metrics();
        metrics.set_threshold_ns(50_000_000);
        metrics.set_probes(18);
        metrics.set_live(LiveState {
            lost: vec![("ring_buffer_full", 3)],
            threads: vec![ThreadBusy {
                tid: 1240,
                name: "tokio-rt-worker".to_owned(),
                ratio: 0.25,
            }],
            requests_in_flight: 5,
            stuck_polls: 1,
            stuck_longest_ns: 2_500_000_000,
            ..LiveState::default()
        });
        let text = metrics.render();
        assert_eq!(sample(&text, "loopguard_threshold_seconds"), Some(0.05));
        assert_eq!(sample(&text, "loopguard_probes_attached"), Some(18.0));
        assert_eq!(sample(&text, "loopguard_poll_stuck"), Some(1.0));
        assert_eq!(sample(&text, "loopguard_poll_stuck_seconds"), Some(2.5));
        assert_eq!(sample(&text, "loopguard_requests_in_flight"), Some(5.0));
        assert_eq!(
            sample(&text, r#"loopguard_lost_total{cause="ring_buffer_full"}"#),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"loopguard_thread_busy_ratio{thread="tokio-rt-worker",tid="1240"}"#
            ),
            Some(0.25)
        );
        assert!(
            text.contains(r#"exe="/srv/api""#) && text.contains(r#"tokio_version="1.47.1""#),
            "{text}"
        );
    }

    #[test]
    fn top_frames_are_bounded() {
        let metrics = metrics();
        for i in 0..TOP_FRAMES + 5 {
            metrics.record_top_frame(Some(&format!("app::handler_{i}")));
        }
        metrics.record_top_frame(Some("app::handler_0"));
        metrics.record_top_frame(None);
        let text = metrics.render();
        assert_eq!(
            sample(
                &text,
                r#"loopguard_stalls_by_top_frame_total{top_frame="app::handler_0"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"loopguard_stalls_by_top_frame_total{top_frame="other"}"#
            ),
            Some(6.0),
            "5 past the cap and unknown, which came after it"
        );
    }

    #[test]
    fn the_dashboard_and_the_rules_use_only_exported_names() {
        let metrics = metrics();
        metrics.record(BlockingKind::Stall, Some(&request(Some("/login"))), 1, 1);
        metrics.record(BlockingKind::Cumulative, None, 1, 0);
        metrics.record_top_frame(Some("app::handler"));
        metrics.set_requests_started([("GET".to_owned(), Some("/login".to_owned()), 1)]);
        metrics.set_live(LiveState {
            lost: vec![("ring_buffer_full", 0)],
            threads: vec![ThreadBusy {
                tid: 1,
                name: "w".to_owned(),
                ratio: 0.0,
            }],
            ..LiveState::default()
        });
        let text = metrics.render();
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for file in [
            "grafana/loopguard-dashboard.json",
            "prometheus/loopguard-rules.yml",
        ] {
            let used = std::fs::read_to_string(examples.join(file)).unwrap();
            let names = names_used(&used);
            assert!(names.len() > 3, "{file} uses no metric?");
            // `watch --all`'s own families: export::fleet's test checks them.
            for name in names.iter().filter(|n| !n.starts_with("loopguard_host_")) {
                assert!(
                    text.lines().any(|line| line
                        .strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))),
                    "{file} uses {name}, which loopguard does not export"
                );
            }
        }
    }
}
