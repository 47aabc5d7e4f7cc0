//! One `/metrics` for every target on the host (`loopguard watch --all`).
//!
//! In: one [`Metrics`] per watched target (each fed by its own watch, as
//! `attach` feeds its one), with the target's [`Identity`]. Out: a single
//! exposition where every series also carries the identity labels
//! (`service`, `container_id`, `container`, `namespace`, `pod`) and
//! `replica`, plus the host's own counts (targets watched, skipped by
//! reason). Never the pid: `loopguard_target_info` loses its `pid` label
//! here.
//!
//! Series stay bounded as targets come and go: a gone target's series stay
//! for a grace period (a last scrape sees its totals), then are dropped;
//! gone targets kept at once are capped too. Two live targets with the
//! same identity (replicas of one service outside containers) are told
//! apart by `replica`, the lowest number free among them, so the series
//! stay distinct without a pid; a target that takes the number of a gone
//! one of the same identity (a restart) takes its place, so a service
//! that restarts keeps one set of series.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::TextEncoder;
use prometheus::proto::{LabelPair, MetricFamily, MetricType};

use super::metrics::{Metrics, TargetInfo, counter, family, gauge};
use super::server::Scrape;
use crate::discover::identity::{IDENTITY_LABELS, Identity};

/// How long a gone target's series stay, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_mins(5);

/// A target's place in the host's metrics, for [`FleetMetrics::gone`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetHandle(u64);

struct Entry {
    handle: TargetHandle,
    identity: [String; 5],
    replica: u32,
    metrics: Arc<Metrics>,
    gone_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    next: u64,
    entries: Vec<Entry>,
    skipped: HashMap<&'static str, u64>,
}

/// Every target's metrics, labelled by who the target is.
pub struct FleetMetrics {
    state: Mutex<State>,
    grace: Duration,
    /// Gone targets kept at once (their series) before the grace ends.
    max_gone: usize,
    max_routes: usize,
}

impl FleetMetrics {
    pub fn new(grace: Duration, max_gone: usize, max_routes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            grace,
            max_gone,
            max_routes,
        }
    }

    /// A new target: its own [`Metrics`] to feed, and its handle.
    pub fn add(&self, identity: &Identity, info: &TargetInfo) -> (TargetHandle, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(info, self.max_routes));
        let labels = identity.labels().map(str::to_owned);
        let mut state = lock(&self.state);
        state.next += 1;
        let handle = TargetHandle(state.next);
        // The lowest number no live target of the same identity holds. A
        // gone one holding it makes way: its service's series carry on
        // (a counter reset, which rate() takes in its stride) instead of
        // a new replica per restart.
        let live = |e: &Entry, replica: u32| {
            e.identity == labels && e.replica == replica && e.gone_at.is_none()
        };
        let replica = (0..=u32::try_from(state.entries.len()).unwrap_or(u32::MAX))
            .find(|replica| !state.entries.iter().any(|e| live(e, *replica)))
            .unwrap_or(0);
        state
            .entries
            .retain(|e| !(e.identity == labels && e.replica == replica));
        state.entries.push(Entry {
            handle,
            identity: labels,
            replica,
            metrics: Arc::clone(&metrics),
            gone_at: None,
        });
        (handle, metrics)
    }

    /// The target has gone (exited, exec'd, detached): its series stay for
    /// the grace period.
    pub fn gone(&self, handle: TargetHandle) {
        self.gone_at(handle, Instant::now());
    }

    fn gone_at(&self, handle: TargetHandle, now: Instant) {
        let mut state = lock(&self.state);
        if let Some(entry) = state.entries.iter_mut().find(|e| e.handle == handle) {
            entry.gone_at.get_or_insert(now);
        }
        self.prune(&mut state, now);
    }

    /// A process that matched and could not be watched, by reason.
    pub fn skipped(&self, reason: &'static str) {
        *lock(&self.state).skipped.entry(reason).or_default() += 1;
    }

    /// Targets watched now.
    pub fn live(&self) -> usize {
        lock(&self.state)
            .entries
            .iter()
            .filter(|e| e.gone_at.is_none())
            .count()
    }

    fn prune(&self, state: &mut State, now: Instant) {
        state.entries.retain(|e| {
            e.gone_at
                .is_none_or(|at| now.duration_since(at) < self.grace)
        });
        let gone = state.entries.iter().filter(|e| e.gone_at.is_some()).count();
        let mut excess = gone.saturating_sub(self.max_gone);
        // The oldest gone go first (entries are in the order added).
        state.entries.retain(|e| {
            let drop = excess > 0 && e.gone_at.is_some();
            excess -= usize::from(drop);
            !drop
        });
    }

    /// The exposition at `now`.
    fn render_at(&self, now: Instant) -> String {
        let mut state = lock(&self.state);
        self.prune(&mut state, now);
        let mut merged: BTreeMap<String, MetricFamily> = BTreeMap::new();
        for entry in &state.entries {
            let replica = entry.replica.to_string();
            let mut labels: Vec<(&str, &str)> = IDENTITY_LABELS
                .iter()
                .zip(&entry.identity)
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            labels.push(("replica", &replica));
            for mut family in entry.metrics.families() {
                let info = family.name() == "loopguard_target_info";
                let metrics = family.take_metric().into_iter().map(|mut metric| {
                    let mut pairs: Vec<LabelPair> =
                        labels.iter().map(|(n, v)| pair(n, v)).collect();
                    pairs.extend(
                        metric
                            .take_label()
                            .into_iter()
                            .filter(|p| !(info && p.name() == "pid")),
                    );
                    metric.set_label(pairs);
                    metric
                });
                if let Some(existing) = merged.get_mut(family.name()) {
                    existing.mut_metric().extend(metrics);
                } else {
                    family.set_metric(metrics.collect());
                    merged.insert(family.name().to_owned(), family);
                }
            }
        }
        let host = host_families(&state);
        let families: Vec<MetricFamily> = merged.into_values().chain(host).collect();
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|error| format!("# loopguard: failed to encode metrics: {error}\n"))
    }
}

/// The host's own families: targets watched and gone, processes skipped.
fn host_families(state: &State) -> Vec<MetricFamily> {
    let live = state.entries.iter().filter(|e| e.gone_at.is_none()).count();
    let gone = state.entries.len() - live;
    let mut host = vec![family(
        "loopguard_host_targets",
        "Targets on this host: watched now (state=watched), gone and kept for the grace period (state=gone)",
        MetricType::GAUGE,
        [("watched", live), ("gone", gone)]
            .into_iter()
            .map(|(state, count)| gauge(&[("state", state)], count as f64))
            .collect(),
    )];
    let mut skipped: Vec<_> = state.skipped.iter().collect();
    skipped.sort();
    if !skipped.is_empty() {
        host.push(family(
            "loopguard_host_skipped_total",
            "Processes that matched the selectors and were not watched, by reason",
            MetricType::COUNTER,
            skipped
                .into_iter()
                .map(|(reason, count)| counter(&[("reason", reason)], *count))
                .collect(),
        ));
    }
    host
}

impl Scrape for FleetMetrics {
    fn render(&self) -> String {
        self.render_at(Instant::now())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pair(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::BlockingKind;

    fn identity(service: &str, pod: &str) -> Identity {
        Identity {
            exe: service.into(),
            service: service.into(),
            pod: pod.into(),
            ..Identity::default()
        }
    }

    fn info(pid: u32) -> TargetInfo {
        TargetInfo {
            pid,
            exe: "/srv/api".into(),
            tokio_version: None,
        }
    }

    #[test]
    fn every_series_carries_the_identity_and_never_the_pid() {
        let fleet = FleetMetrics::new(DEFAULT_GRACE, 10, 200);
        let (_, api) = fleet.add(&identity("api", "api-0"), &info(4242));
        let (_, worker) = fleet.add(&identity("worker", ""), &info(4343));
        api.record(BlockingKind::Stall, None, 60_000_000, 0);
        worker.record(BlockingKind::Loop, None, 80_000_000, 0);
        let text = fleet.render();
        assert!(
            text.contains(
                r#"loopguard_blocking_total{service="api",container_id="",container="",namespace="",pod="api-0",replica="0",kind="stall",method="none",route="none"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"service="worker""#), "{text}");
        assert!(!text.contains("4242") && !text.contains("pid="), "{text}");
        // One HELP per family, however many targets.
        assert_eq!(text.matches("# HELP loopguard_blocking_total ").count(), 1);
        assert!(
            text.contains(r#"loopguard_host_targets{state="watched"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn replicas_of_one_identity_get_distinct_lowest_free_numbers() {
        let fleet = FleetMetrics::new(DEFAULT_GRACE, 10, 200);
        let same = identity("stall-server", "");
        let (first, _) = fleet.add(&same, &info(1));
        let (_, _) = fleet.add(&same, &info(2));
        let text = fleet.render();
        assert!(text.contains(r#"replica="0""#) && text.contains(r#"replica="1""#));
        // A gone replica's series stay for the grace period...
        let now = Instant::now();
        fleet.gone_at(first, now);
        let text = fleet.render_at(now);
        assert!(
            text.contains(r#"loopguard_host_targets{state="gone"} 1"#),
            "{text}"
        );
        // ...unless a new target of the same identity takes its number
        // (a restart): no new replica per restart.
        let (_, restarted) = fleet.add(&same, &info(3));
        restarted.record(BlockingKind::Stall, None, 60_000_000, 0);
        let text = fleet.render_at(now);
        assert!(!text.contains(r#"replica="2""#), "{text}");
        assert!(
            text.contains(r#"loopguard_host_targets{state="gone"} 0"#),
            "{text}"
        );
        assert_eq!(
            text.matches("loopguard_blocking_total{").count(),
            1,
            "{text}"
        );
        // After the grace a gone one is dropped.
        let (third, _) = fleet.add(&same, &info(4));
        fleet.gone_at(third, now);
        let later = now + DEFAULT_GRACE + Duration::from_secs(1);
        let text = fleet.render_at(later);
        assert!(!text.contains(r#"replica="2""#), "{text}");
        assert!(
            text.contains(r#"loopguard_host_targets{state="watched"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn churn_keeps_the_series_bounded() {
        let fleet = FleetMetrics::new(DEFAULT_GRACE, 5, 200);
        let now = Instant::now();
        // One service restarting: one set of series.
        for pid in 0..1000 {
            let (handle, metrics) = fleet.add(&identity("job", ""), &info(pid));
            metrics.record(BlockingKind::Stall, None, 60_000_000, 0);
            fleet.gone_at(handle, now);
        }
        assert_eq!(fleet.live(), 0);
        let text = fleet.render_at(now);
        assert!(
            text.contains(r#"loopguard_host_targets{state="gone"} 1"#),
            "{text}"
        );
        // Many services coming and going: at most the cap of gone ones.
        for pid in 0..1000 {
            let (handle, metrics) = fleet.add(&identity(&format!("job-{pid}"), ""), &info(pid));
            metrics.record(BlockingKind::Stall, None, 60_000_000, 0);
            fleet.gone_at(handle, now);
        }
        let text = fleet.render_at(now);
        assert!(
            text.contains(r#"loopguard_host_targets{state="gone"} 5"#),
            "{text}"
        );
        assert_eq!(text.matches("loopguard_blocking_total{").count(), 5);
    }

    /// Label names a `PromQL` expression uses: in `by (...)` and in
    /// matchers (`name=`, `name=~`, `name!=`, `name!~`).
    fn labels_used(expr: &str) -> Vec<String> {
        let mut labels = Vec::new();
        let mut rest = expr;
        while let Some(at) = rest.find("by (") {
            let tail = &rest[at + 4..];
            let end = tail.find(')').unwrap_or(tail.len());
            labels.extend(tail[..end].split(',').map(|l| l.trim().to_owned()));
            rest = &tail[end..];
        }
        for selector in expr.split('{').skip(1) {
            let body = selector.split('}').next().unwrap_or("");
            for matcher in body.split(',') {
                if let Some(end) = matcher.find(['=', '!']) {
                    labels.push(matcher[..end].trim().to_owned());
                }
            }
        }
        labels.retain(|l| !l.is_empty());
        labels
    }

    #[test]
    fn the_dashboard_uses_only_names_and_labels_the_fleet_exports() {
        let fleet = FleetMetrics::new(DEFAULT_GRACE, 5, 200);
        let (gone, _) = fleet.add(&identity("job", "job-0"), &info(1));
        fleet.gone(gone);
        let (_, api) = fleet.add(&identity("api", "api-0"), &info(2));
        fleet.skipped("budget");
        api.record(BlockingKind::Stall, None, 60_000_000, 0);
        api.record(BlockingKind::Loop, None, 60_000_000, 0);
        api.record(BlockingKind::Cumulative, None, 60_000_000, 0);
        api.record_top_frame(Some("app::handler"));
        api.set_requests_started([("GET".to_owned(), Some("/login".to_owned()), 1)]);
        api.set_live(super::super::metrics::LiveState {
            lost: vec![("ring_buffer_full", 0)],
            threads: vec![super::super::metrics::ThreadBusy {
                tid: 1,
                name: "w".to_owned(),
                ratio: 0.0,
            }],
            ..Default::default()
        });
        let text = fleet.render();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/grafana/loopguard-dashboard.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().unwrap().to_owned());
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(query) = variable["definition"].as_str() {
                exprs.push(query.to_owned());
            }
        }
        let fleet_panels = exprs.iter().filter(|e| e.contains("$pod")).count();
        assert!(fleet_panels >= 6, "the fleet views filter by pod");
        for expr in &exprs {
            for name in super::super::metrics::names_used(expr) {
                assert!(
                    text.lines().any(|line| line
                        .strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))),
                    "the dashboard uses {name}, which loopguard does not export"
                );
            }
            for label in labels_used(expr) {
                // Prometheus's own: the histogram bucket, the scrape target.
                let own = ["le", "instance"].contains(&label.as_str());
                assert!(
                    own || text.contains(&format!("{{{label}=\""))
                        || text.contains(&format!(",{label}=\"")),
                    "the dashboard uses the label {label} ({expr}), which loopguard does not export"
                );
            }
        }
    }

    #[test]
    fn skipped_processes_are_counted_by_reason() {
        let fleet = FleetMetrics::new(DEFAULT_GRACE, 5, 200);
        fleet.skipped("stripped");
        fleet.skipped("stripped");
        fleet.skipped("budget");
        let text = fleet.render();
        assert!(
            text.contains(r#"loopguard_host_skipped_total{reason="stripped"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"loopguard_host_skipped_total{reason="budget"} 1"#),
            "{text}"
        );
    }
}
