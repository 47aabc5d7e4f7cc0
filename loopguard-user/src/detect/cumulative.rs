//! The cumulative rule ("death by a thousand cuts"): many polls, each too
//! short to stall, that add up inside a sliding window.
//!
//! Input: [`Cut`]s, worker polls that lasted at least the floor and less
//! than the stall threshold, with the request each one served (looked up by
//! the caller). Output: [`CumulativeAlert`]s, per worker thread and for the
//! whole process, when the blocked time inside any window exceeds the
//! budget. A poll that straddles the window's start counts only for its part
//! inside. One alert per scope per window: a condition that persists repeats
//! at most once per window, with a running count. While a thread's alert
//! covers a window the process's is not raised for the same polls, and the
//! other way round (a task that moves between workers stays one alert).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::rule::Rule;
use crate::term::printable;

/// The rule's settings (validated by `config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CumulativeSettings {
    /// ns, the shortest poll that counts.
    pub floor_ns: u64,
    /// ns, the sliding window.
    pub window_ns: u64,
    /// ns of blocking the window may hold without an alert.
    pub budget_ns: u64,
}

pub const DEFAULT_FLOOR_MS: u64 = 10;
pub const DEFAULT_WINDOW_MS: u64 = 1000;
pub const DEFAULT_BUDGET_MS: u64 = 200;

impl Default for CumulativeSettings {
    fn default() -> Self {
        Self {
            floor_ns: DEFAULT_FLOOR_MS * 1_000_000,
            window_ns: DEFAULT_WINDOW_MS * 1_000_000,
            budget_ns: DEFAULT_BUDGET_MS * 1_000_000,
        }
    }
}

/// The request a poll served, as far as the rankings need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Culprit {
    pub id: u64,
    pub method: String,
    /// The route template, or the path when the framework gave none.
    pub route: String,
    pub path: String,
}

/// One poll between the floor and the stall threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    pub tid: u32,
    pub task_id: Option<u64>,
    /// ns, `CLOCK_MONOTONIC`.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub request: Option<Culprit>,
}

impl Cut {
    pub fn end_ns(&self) -> u64 {
        self.start_ns + self.duration_ns
    }

    /// ns of this poll inside `[from_ns, to_ns]`.
    fn overlap(&self, from_ns: u64, to_ns: u64) -> u64 {
        self.end_ns()
            .min(to_ns)
            .saturating_sub(self.start_ns.max(from_ns))
    }
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One worker thread, by tid.
    Thread(u32),
    Process,
}

/// A task's share of an alert's blocked time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskShare {
    pub task_id: Option<u64>,
    pub tid: u32,
    pub polls: u64,
    pub blocked_ns: u64,
    /// The request it served in its longest poll.
    pub request: Option<Culprit>,
}

/// A route's share of an alert's blocked time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteShare {
    pub method: String,
    pub route: String,
    /// Distinct requests.
    pub requests: u64,
    pub polls: u64,
    pub blocked_ns: u64,
}

/// Blocked time over budget in one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CumulativeAlert {
    pub scope: Scope,
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    pub blocked_ns: u64,
    pub polls: u64,
    pub budget_ns: u64,
    /// 1 for a new condition; 2, 3, ... while it persists (one per window).
    pub repeat: u64,
    /// Worst first.
    pub tasks: Vec<TaskShare>,
    /// Worst first; polls without a known request are left out.
    pub routes: Vec<RouteShare>,
}

/// Contributors listed on an alert.
pub const CONTRIBUTORS_LISTED: usize = 10;

/// The cuts of one scope inside the window, and its last alert.
#[derive(Debug, Default)]
struct Window {
    cuts: VecDeque<Cut>,
    last_alert_ns: Option<u64>,
    repeat: u64,
}

impl Window {
    fn push(&mut self, cut: Cut, from_ns: u64) {
        self.cuts.push_back(cut);
        while self.cuts.front().is_some_and(|c| c.end_ns() <= from_ns) {
            self.cuts.pop_front();
        }
    }

    fn blocked(&self, from_ns: u64, to_ns: u64) -> (u64, u64) {
        self.cuts
            .iter()
            .map(|c| c.overlap(from_ns, to_ns))
            .filter(|&ns| ns > 0)
            .fold((0, 0), |(ns, polls), more| (ns + more, polls + 1))
    }

    fn quiet_since(&self, window_ns: u64, now_ns: u64) -> bool {
        self.last_alert_ns
            .is_none_or(|at| now_ns >= at.saturating_add(window_ns))
    }

    /// Records an alert at `now_ns`; returns its running count.
    fn mark(&mut self, window_ns: u64, now_ns: u64) -> u64 {
        let persists = self
            .last_alert_ns
            .is_some_and(|at| now_ns < at.saturating_add(2 * window_ns));
        self.repeat = if persists { self.repeat + 1 } else { 1 };
        self.last_alert_ns = Some(now_ns);
        self.repeat
    }
}

/// Sliding windows per thread and for the process.
#[derive(Debug)]
pub struct CumulativeDetector {
    settings: CumulativeSettings,
    threads: HashMap<u32, Window>,
    process: Window,
    /// When a thread alert last covered the process's window.
    thread_alert_ns: Option<u64>,
    /// Polls of excluded routes: counted, never alerted on.
    pub excluded_polls: u64,
    pub excluded_ns: u64,
}

impl CumulativeDetector {
    pub fn new(settings: CumulativeSettings) -> Self {
        Self {
            settings,
            threads: HashMap::new(),
            process: Window::default(),
            thread_alert_ns: None,
            excluded_polls: 0,
            excluded_ns: 0,
        }
    }

    pub fn settings(&self) -> &CumulativeSettings {
        &self.settings
    }

    /// A poll between the floor and the threshold returned. `excluded`: it
    /// served an excluded route.
    pub fn on_cut(&mut self, cut: Cut, excluded: bool) -> Option<CumulativeAlert> {
        if excluded {
            self.excluded_polls += 1;
            self.excluded_ns += cut.duration_ns;
            return None;
        }
        let window_ns = self.settings.window_ns;
        let now_ns = cut.end_ns();
        let from_ns = now_ns.saturating_sub(window_ns);
        let tid = cut.tid;
        self.process.push(cut.clone(), from_ns);
        self.threads.entry(tid).or_default().push(cut, from_ns);
        self.forget_idle_threads(from_ns);

        let process_quiet = self.process.quiet_since(window_ns, now_ns);
        let thread = self.threads.get_mut(&tid)?;
        let (blocked_ns, polls) = thread.blocked(from_ns, now_ns);
        if blocked_ns > self.settings.budget_ns
            && process_quiet
            && thread.quiet_since(window_ns, now_ns)
        {
            let repeat = thread.mark(window_ns, now_ns);
            self.thread_alert_ns = Some(now_ns);
            let cuts = thread.cuts.iter();
            return Some(alert(
                &self.settings,
                Scope::Thread(tid),
                cuts,
                now_ns,
                (blocked_ns, polls),
                repeat,
            ));
        }
        let (blocked_ns, polls) = self.process.blocked(from_ns, now_ns);
        let covered_by_thread = self
            .thread_alert_ns
            .is_some_and(|at| now_ns < at.saturating_add(window_ns));
        if blocked_ns > self.settings.budget_ns && process_quiet && !covered_by_thread {
            let repeat = self.process.mark(window_ns, now_ns);
            let cuts = self.process.cuts.iter();
            return Some(alert(
                &self.settings,
                Scope::Process,
                cuts,
                now_ns,
                (blocked_ns, polls),
                repeat,
            ));
        }
        None
    }

    fn forget_idle_threads(&mut self, from_ns: u64) {
        let window_ns = self.settings.window_ns;
        self.threads.retain(|_, window| {
            window.cuts.iter().any(|c| c.end_ns() > from_ns)
                || window
                    .last_alert_ns
                    .is_some_and(|at| at.saturating_add(2 * window_ns) > from_ns + window_ns)
        });
    }
}

/// A cut, and whether it served an excluded route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutInput {
    pub cut: Cut,
    pub excluded: bool,
}

/// A cumulative alert, as its line says it.
#[derive(Clone, Debug, PartialEq)]
pub struct CumulativeShown<'a> {
    /// `(tid, thread name)` of a thread's alert; `None` for the process.
    pub thread: Option<(u32, &'a str)>,
    pub total_ms: f64,
    pub polls: u64,
    pub window_ms: f64,
    pub budget_ms: f64,
    pub repeat: u64,
    /// Worst first.
    pub routes: Vec<RouteShown<'a>>,
    /// `(task id, ms)`, worst first.
    pub tasks: Vec<(Option<u64>, f64)>,
}

/// A route's share of an alert, as its line says it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteShown<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub total_ms: f64,
    pub polls: u64,
}

/// What the summary holds of cumulative alerts and excluded routes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CumulativeTotals {
    pub alerts: u64,
    /// Stalls of excluded routes.
    pub excluded_stalls: u64,
    /// Cuts of excluded routes, and their ms.
    pub excluded_polls: u64,
    pub excluded_ms: f64,
}

/// Contributors an alert's line names.
const CONTRIBUTORS_SAID: usize = 3;

impl Rule for CumulativeDetector {
    type Input<'a> = CutInput;
    type Found = Option<CumulativeAlert>;
    type Shown<'a> = CumulativeShown<'a>;
    type Totals<'a> = CumulativeTotals;

    fn check(&mut self, input: CutInput) -> Option<CumulativeAlert> {
        self.on_cut(input.cut, input.excluded)
    }

    fn describe(alert: &CumulativeShown<'_>) -> String {
        let scope = match alert.thread {
            Some((tid, thread)) => format!("tid {tid} ({})", printable(thread)),
            None => "process".to_owned(),
        };
        let repeat = if alert.repeat > 1 {
            format!(" [still, {} windows in a row]", alert.repeat)
        } else {
            String::new()
        };
        let routes: Vec<String> = alert
            .routes
            .iter()
            .take(CONTRIBUTORS_SAID)
            .map(|r| {
                format!(
                    "{} {} {:.1} ms in {} polls",
                    printable(r.method),
                    printable(r.route),
                    r.total_ms,
                    r.polls
                )
            })
            .collect();
        let tasks: Vec<String> = alert
            .tasks
            .iter()
            .take(CONTRIBUTORS_SAID)
            .map(|(task_id, total_ms)| {
                let task = task_id.map_or_else(|| "task ?".to_owned(), |id| format!("task {id}"));
                format!("{task} {total_ms:.1} ms")
            })
            .collect();
        let by = if routes.is_empty() {
            format!("; by {}", tasks.join(", "))
        } else {
            format!("; by {}", routes.join(", "))
        };
        format!(
            "{:<17} {scope} blocked {:.1} ms in {} short polls within {:.0} ms (budget {:.0} ms){repeat}{by}",
            "CUMULATIVE", alert.total_ms, alert.polls, alert.window_ms, alert.budget_ms,
        )
    }

    /// The alerts raised, and what excluded routes kept quiet.
    fn summary(totals: &CumulativeTotals) -> Vec<String> {
        let mut lines = Vec::new();
        if totals.alerts > 0 {
            lines.push(format!("  cumulative alerts: {}", totals.alerts));
        }
        if totals.excluded_stalls > 0 || totals.excluded_polls > 0 {
            lines.push(format!(
                "  excluded routes: {} stall(s) and {} short polls ({:.1} ms) not alerted on",
                totals.excluded_stalls, totals.excluded_polls, totals.excluded_ms
            ));
        }
        lines
    }
}

fn alert<'a>(
    settings: &CumulativeSettings,
    scope: Scope,
    cuts: impl Iterator<Item = &'a Cut>,
    now_ns: u64,
    (blocked_ns, polls): (u64, u64),
    repeat: u64,
) -> CumulativeAlert {
    let from_ns = now_ns.saturating_sub(settings.window_ns);
    let (tasks, routes) = rank(cuts, from_ns, now_ns);
    CumulativeAlert {
        scope,
        window_start_ns: from_ns,
        window_end_ns: now_ns,
        blocked_ns,
        polls,
        budget_ns: settings.budget_ns,
        repeat,
        tasks,
        routes,
    }
}

/// Adds `ns` blocked by one poll serving `request` to its route; the
/// route's requests are counted once each.
fn count_route(
    routes: &mut BTreeMap<(String, String), (RouteShare, Vec<u64>)>,
    request: &Culprit,
    ns: u64,
) {
    let (route, ids) = routes
        .entry((request.method.clone(), request.route.clone()))
        .or_insert_with(|| {
            (
                RouteShare {
                    method: request.method.clone(),
                    route: request.route.clone(),
                    requests: 0,
                    polls: 0,
                    blocked_ns: 0,
                },
                Vec::new(),
            )
        });
    route.polls += 1;
    route.blocked_ns += ns;
    if !ids.contains(&request.id) {
        ids.push(request.id);
        route.requests += 1;
    }
}

/// Tasks and routes by blocked time inside `[from_ns, to_ns]`, worst first.
pub fn rank<'a>(
    cuts: impl Iterator<Item = &'a Cut>,
    from_ns: u64,
    to_ns: u64,
) -> (Vec<TaskShare>, Vec<RouteShare>) {
    // Keyed by (task, tid) so polls without a task id stay apart per thread.
    let mut tasks: BTreeMap<(Option<u64>, u32), (TaskShare, u64)> = BTreeMap::new();
    let mut routes: BTreeMap<(String, String), (RouteShare, Vec<u64>)> = BTreeMap::new();
    for cut in cuts {
        let ns = cut.overlap(from_ns, to_ns);
        if ns == 0 {
            continue;
        }
        let (task, longest) = tasks.entry((cut.task_id, cut.tid)).or_insert_with(|| {
            (
                TaskShare {
                    task_id: cut.task_id,
                    tid: cut.tid,
                    polls: 0,
                    blocked_ns: 0,
                    request: None,
                },
                0,
            )
        });
        task.polls += 1;
        task.blocked_ns += ns;
        if ns > *longest && cut.request.is_some() {
            *longest = ns;
            task.request.clone_from(&cut.request);
        }
        let Some(request) = &cut.request else {
            continue;
        };
        count_route(&mut routes, request, ns);
    }
    let mut tasks: Vec<TaskShare> = tasks.into_values().map(|(t, _)| t).collect();
    tasks.sort_by(|a, b| b.blocked_ns.cmp(&a.blocked_ns).then(b.polls.cmp(&a.polls)));
    tasks.truncate(CONTRIBUTORS_LISTED);
    let mut routes: Vec<RouteShare> = routes.into_values().map(|(r, _)| r).collect();
    routes.sort_by(|a, b| b.blocked_ns.cmp(&a.blocked_ns).then(b.polls.cmp(&a.polls)));
    routes.truncate(CONTRIBUTORS_LISTED);
    (tasks, routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn cut(tid: u32, task: u64, start_ms: u64, ms: u64, route: &str) -> Cut {
        Cut {
            tid,
            task_id: Some(task),
            start_ns: start_ms * MS,
            duration_ns: ms * MS,
            request: Some(Culprit {
                id: task * 1000 + start_ms,
                method: "GET".into(),
                route: route.into(),
                path: route.into(),
            }),
        }
    }

    #[test]
    fn a_window_under_budget_raises_nothing() {
        let mut rule = CumulativeDetector::new(CumulativeSettings::default());
        for i in 0..10 {
            // 10 x 20 ms = exactly the budget: not over it.
            assert_eq!(rule.on_cut(cut(1, 7, i * 90, 20, "/a"), false), None);
        }
    }

    #[test]
    fn excluded_routes_are_counted_but_never_alerted() {
        let mut rule = CumulativeDetector::new(CumulativeSettings::default());
        for i in 0..40 {
            assert_eq!(rule.on_cut(cut(1, 7, i * 25, 20, "/metrics"), true), None);
        }
        assert_eq!((rule.excluded_polls, rule.excluded_ns), (40, 800 * MS));
    }

    #[test]
    fn polls_spread_over_threads_alert_for_the_process() {
        let mut rule = CumulativeDetector::new(CumulativeSettings::default());
        let mut alerts = Vec::new();
        for i in 0..12 {
            let tid = 1 + (i % 3) as u32;
            alerts.extend(rule.on_cut(cut(tid, i, i * 50, 20, "/spread"), false));
        }
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        let alert = &alerts[0];
        assert_eq!(alert.scope, Scope::Process);
        assert_eq!((alert.polls, alert.blocked_ns), (11, 220 * MS));
        assert_eq!(alert.routes[0].route, "/spread");
        assert_eq!(alert.routes[0].requests, 11);
    }

    #[test]
    fn contributors_rank_by_blocked_time() {
        let mut rule = CumulativeDetector::new(CumulativeSettings::default());
        let mut alert = None;
        for i in 0..8 {
            alert = alert.or(rule.on_cut(cut(1, 5, i * 100, 10, "/small"), false));
            alert = alert.or(rule.on_cut(cut(1, 9, i * 100 + 50, 20, "/big"), false));
        }
        let alert = alert.expect("an alert");
        assert_eq!(alert.scope, Scope::Thread(1));
        assert_eq!(alert.tasks[0].task_id, Some(9));
        assert_eq!(alert.routes[0].route, "/big");
        assert_eq!(alert.routes[1].route, "/small");
        assert!(alert.routes[0].blocked_ns > alert.routes[1].blocked_ns);
    }
}
