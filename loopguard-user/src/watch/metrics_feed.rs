//! The metrics feed: what only the kernel's maps hold (the poll histogram,
//! busy time per thread, polls stuck now, lost data, requests started),
//! read into the metrics every 200 ms for `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loopguard_common::requests::RequestTotals;
use loopguard_common::{LoopState, ThreadPolls};

use crate::collect::lost::Lost;
use crate::collect::totals::LoopThread;
use crate::collect::{Collector, RequestMaps};
use crate::discover::proc;
use crate::export::live::{BusyTracker, stuck_polls};
use crate::export::{LiveState, Metrics, ThreadBusy};

use super::requests::RequestView;

/// How often the live metrics (poll histogram, busy time, lost data) are
/// read from the kernel: often enough for a 1 s scrape interval.
const METRICS_REFRESH: Duration = Duration::from_millis(200);

/// Feeds the metrics the values only the kernel's maps hold.
pub(super) struct MetricsFeed {
    metrics: Arc<Metrics>,
    busy: BusyTracker,
    loop_busy: BusyTracker,
    /// Thread names, kept while the thread lives.
    names: HashMap<u32, String>,
    last_refresh: Option<Instant>,
}

impl MetricsFeed {
    /// A feed into `metrics`, which start at the fixed threshold.
    pub(super) fn new(metrics: &Arc<Metrics>, threshold_ns: u64) -> Self {
        metrics.set_threshold_ns(threshold_ns);
        Self {
            metrics: Arc::clone(metrics),
            busy: BusyTracker::default(),
            loop_busy: BusyTracker::default(),
            names: HashMap::new(),
            last_refresh: None,
        }
    }

    /// Whether the last refresh is old enough for another.
    pub(super) fn due(&self) -> bool {
        self.last_refresh
            .is_none_or(|last| last.elapsed() >= METRICS_REFRESH)
    }

    /// Reads what only the kernel's maps hold into the metrics: `threads`
    /// are the poll stacks read at `now_ns`, `threshold_ns` the one in
    /// force, `pid` the target.
    pub(super) fn refresh(
        &mut self,
        collector: &Collector,
        now_ns: u64,
        threads: &[(u32, ThreadPolls)],
        threshold_ns: u64,
        pid: u32,
        requests: &RequestView,
    ) {
        self.last_refresh = Some(Instant::now());
        // Always the live value, not only when a move is large enough to say.
        self.metrics.set_threshold_ns(threshold_ns);
        let (stuck, longest) = stuck_polls(now_ns, threshold_ns, threads);
        let loops = collector.loop_snapshot();
        let (busy, loop_busy) = self.busy_threads(now_ns, threads, &loops, pid);
        let totals = requests.maps.map(RequestMaps::totals).unwrap_or_default();
        if let Some(maps) = requests.maps {
            let names = requests.names;
            self.metrics
                .set_requests_started(maps.route_counts().into_iter().map(|(key, started)| {
                    let (method, route) = names.get(key).unwrap_or(("?", None));
                    (method.to_owned(), route.map(str::to_owned), started)
                }));
        }
        self.metrics.set_live(LiveState {
            histogram: collector.histogram(),
            lost: lost(collector, &totals),
            threads: busy,
            loop_threads: loop_busy,
            // Without the probes, the table's count (at most its slots).
            requests_in_flight: match (requests.maps, &requests.table) {
                (None, Some(table)) => table.in_flight() as u64,
                _ => totals.started.saturating_sub(totals.ended),
            },
            stuck_polls: stuck,
            stuck_longest_ns: longest,
        });
    }

    /// The busy share of every worker (from its polls) and of every
    /// event-loop thread (from its waits); forgets the names of threads
    /// gone.
    fn busy_threads(
        &mut self,
        now_ns: u64,
        threads: &[(u32, ThreadPolls)],
        loops: &[(u32, LoopState)],
        pid: u32,
    ) -> (Vec<ThreadBusy>, Vec<ThreadBusy>) {
        let names = &mut self.names;
        let mut name = |tid: u32| {
            names
                .entry(tid)
                .or_insert_with(|| proc::thread_name(pid, tid))
                .clone()
        };
        let busy = self.busy.update(now_ns, threads, &mut name);
        let loop_busy = self.loop_busy.update_totals(
            now_ns,
            loops
                .iter()
                .filter(|(_, state)| state.waits > 0)
                .map(|(tid, state)| {
                    let thread = LoopThread::from_state(*tid, String::new(), state, now_ns);
                    (*tid, thread.busy_ns)
                }),
            &mut name,
        );
        names.retain(|tid, _| {
            threads.iter().any(|(alive, _)| alive == tid)
                || loops.iter().any(|(alive, _)| alive == tid)
        });
        (busy, loop_busy)
    }
}

/// Every cause of lost data, with the agent's own beside the kernel's.
fn lost(collector: &Collector, totals: &RequestTotals) -> Vec<(&'static str, u64)> {
    Lost::causes(&collector.counters())
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
        .collect()
}
