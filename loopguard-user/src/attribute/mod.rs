//! Attribute: which HTTP request a stall belongs to, and which requests had
//! to wait behind it.
//!
//! Input: what the kernel keeps of requests (`loopguard_common::requests`):
//! in-flight requests by task, recent ends, requests that ended inside a
//! long poll, the names of routes (sent once each), and a stall's count of
//! overlapping requests. Output: the culprit request of a stall (the one its
//! task was serving) and its victims (every other request in flight on the
//! process while the worker was blocked). Pure: the agent reads the maps.

pub mod asgi;
pub mod inflight;
pub mod table;

use std::collections::{BTreeMap, HashMap, VecDeque};

use loopguard_common::requests::RequestEntry;

/// One HTTP request as the middleware described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub method: String,
    /// Route template (`/users/{id}`), when the framework knows it.
    pub route: Option<String>,
    pub path: String,
    /// The task that served it (0: unknown).
    pub task_id: u64,
    /// ns, `CLOCK_MONOTONIC`.
    pub start_ns: u64,
    pub end_ns: Option<u64>,
    pub status: Option<u16>,
}

impl Request {
    /// `METHOD route`, or `METHOD path` without a template: the key routes
    /// are ranked by.
    pub fn route_key(&self) -> String {
        format!(
            "{} {}",
            self.method,
            self.route.as_deref().unwrap_or(&self.path)
        )
    }
}

/// The victims of one stall.
#[derive(Debug, Default)]
pub struct Victims {
    /// All of them, counted in the kernel, including requests no longer
    /// known by name.
    pub count: usize,
    /// The ones still known by name (in flight, or among the recent ends), by id.
    pub named: Vec<Request>,
}

/// Totals per route for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteStalls {
    pub stalls: u64,
    pub total_ns: u64,
    pub longest_ns: u64,
}

/// The method and route template of each route key the kernel sent.
#[derive(Debug, Default)]
pub struct RouteNames(HashMap<u64, (String, Option<String>)>);

/// Route keys remembered by name; more are named `?` (the kernel counts at
/// most `MAX_ROUTES` anyway).
const NAMES_KEPT: usize = 16_384;

impl RouteNames {
    /// The kernel saw route `key` start for the first time.
    pub fn insert(&mut self, key: u64, method: String, route: Option<String>) {
        if self.0.len() < NAMES_KEPT || self.0.contains_key(&key) {
            self.0.insert(key, (method, route));
        }
    }

    /// `(method, route)` of `key`, if the kernel sent it.
    pub fn get(&self, key: u64) -> Option<(&str, Option<&str>)> {
        self.0
            .get(&key)
            .map(|(method, route)| (method.as_str(), route.as_deref()))
    }
}

/// A request as the kernel keeps it, named.
pub fn request(entry: &RequestEntry, names: &RouteNames) -> Request {
    let (method, route) = names.get(entry.route_key).unwrap_or(("?", None));
    let len = (entry.path_len as usize).min(entry.path.len());
    Request {
        id: entry.request_id,
        method: method.to_owned(),
        route: route.map(str::to_owned),
        path: String::from_utf8_lossy(&entry.path[..len]).into_owned(),
        task_id: entry.task_id,
        start_ns: entry.start_ns,
        end_ns: (entry.end_ns != 0).then_some(entry.end_ns),
        status: (entry.end_ns != 0).then(|| u16::try_from(entry.status).unwrap_or(0)),
    }
}

/// The request task `task_id` was serving during a poll that began at
/// `start_ns`, from what the kernel holds: one that ended inside a poll
/// of the task since (a handler usually finishes inside the very poll
/// that stalled), else the one the task serves now, else the latest of the
/// recent ends that ended since.
pub fn culprit(
    task_id: u64,
    start_ns: u64,
    ended_in_poll: Option<Request>,
    in_flight: Option<Request>,
    recent_ends: &[Request],
) -> Option<Request> {
    let ended_since =
        |r: &Request| r.task_id == task_id && r.end_ns.is_some_and(|end| end >= start_ns);
    if let Some(request) = ended_in_poll.filter(ended_since) {
        return Some(request);
    }
    if let Some(request) = in_flight.filter(|r| r.task_id == task_id) {
        return Some(request);
    }
    recent_ends
        .iter()
        .filter(|r| ended_since(r))
        .max_by_key(|r| r.end_ns)
        .cloned()
}

/// The victims of a stall over `[start_ns, end_ns]`: `overlapping`
/// requests were in flight at some point during it (counted in the
/// kernel, the culprit among them); `known` are the requests still known by
/// name, in flight or recently ended. At most `limit` are named.
pub fn victims(
    overlapping: u64,
    culprit: Option<&Request>,
    known: impl IntoIterator<Item = Request>,
    (start_ns, end_ns): (u64, u64),
    limit: usize,
) -> Victims {
    let culprit_id = culprit.map(|r| r.id);
    let mut named: Vec<Request> = known
        .into_iter()
        .filter(|r| {
            Some(r.id) != culprit_id
                && r.start_ns <= end_ns
                && r.end_ns.is_none_or(|end| end >= start_ns)
        })
        .collect();
    named.sort_by_key(|r| r.id);
    named.dedup_by_key(|r| r.id);
    named.truncate(limit);
    let count = overlapping.saturating_sub(u64::from(culprit.is_some()));
    Victims {
        count: usize::try_from(count)
            .unwrap_or(usize::MAX)
            .max(named.len()),
        named,
    }
}

/// Takes the value remembered under `key` out of `list` (what was named of
/// a stall while in progress, by thread and start).
pub(crate) fn take_remembered<K: PartialEq, V>(list: &mut VecDeque<(K, V)>, key: &K) -> Option<V> {
    let at = list.iter().position(|(k, _)| k == key)?;
    list.remove(at).map(|(_, value)| value)
}

/// Stalls per route, bounded, for the summary.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: BTreeMap<String, RouteStalls>,
}

/// Distinct routes the summary ranks; later ones are counted together.
const ROUTES_KEPT: usize = 1000;
const OTHER_ROUTES: &str = "(other routes)";

impl RouteTable {
    /// Counts a finished stall against its culprit's route.
    pub fn record_stall(&mut self, culprit: Option<&Request>, duration_ns: u64) {
        let mut key = culprit.map_or_else(|| "(no request)".to_owned(), Request::route_key);
        // Without route templates the key is a raw path: keep the table bounded.
        if self.routes.len() >= ROUTES_KEPT && !self.routes.contains_key(&key) {
            OTHER_ROUTES.clone_into(&mut key);
        }
        let route = self.routes.entry(key).or_default();
        route.stalls += 1;
        route.total_ns += duration_ns;
        route.longest_ns = route.longest_ns.max(duration_ns);
    }

    /// Routes by total stall time, worst first.
    pub fn ranked_routes(&self) -> Vec<(&str, &RouteStalls)> {
        let mut routes: Vec<(&str, &RouteStalls)> =
            self.routes.iter().map(|(k, v)| (k.as_str(), v)).collect();
        routes.sort_by(|a, b| {
            b.1.total_ns
                .cmp(&a.1.total_ns)
                .then(b.1.stalls.cmp(&a.1.stalls))
        });
        routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, task_id: u64, start_ns: u64, end_ns: Option<u64>) -> Request {
        Request {
            id,
            method: "GET".into(),
            route: Some("/r".into()),
            path: "/r".into(),
            task_id,
            start_ns,
            end_ns,
            status: end_ns.map(|_| 200),
        }
    }

    #[test]
    fn a_request_that_ended_inside_the_stalled_poll_is_the_culprit() {
        // start (t=0) ... the handler blocks, returns, request_end (t=340), the poll ends.
        let ended = request(1, 10, 0, Some(340));
        let next = request(2, 10, 345, None); // keep-alive: the task's next request
        let found = culprit(10, 1, Some(ended.clone()), Some(next), &[]);
        assert_eq!(found.map(|r| r.id), Some(1));
        // A stall of that task that began after the request ended is not its.
        let found = culprit(10, 400, Some(ended), None, &[]);
        assert_eq!(found, None);
    }

    #[test]
    fn the_request_a_task_serves_now_is_the_culprit_of_its_poll() {
        let serving = request(7, 10, 0, None);
        assert_eq!(
            culprit(10, 5, None, Some(serving), &[]).map(|r| r.id),
            Some(7)
        );
        let other_task = request(8, 11, 0, None);
        assert_eq!(culprit(10, 5, None, Some(other_task), &[]), None);
    }

    #[test]
    fn recent_ends_name_a_culprit_that_ended_in_a_later_short_poll() {
        let recent = [
            request(1, 10, 0, Some(50)), // ended before the poll
            request(2, 10, 60, Some(400)),
            request(3, 20, 60, Some(500)), // another task
        ];
        assert_eq!(culprit(10, 100, None, None, &recent).map(|r| r.id), Some(2));
    }

    #[test]
    fn victims_are_counted_by_the_kernel_and_named_when_known() {
        let culprit_request = request(1, 10, 0, Some(340));
        let known = vec![
            request(2, 20, 10, None),     // waits, still in flight
            request(3, 30, 20, Some(90)), // waits, finished during the stall
            request(4, 40, 1, Some(2)),   // finished before the stall
            request(5, 50, 500, None),    // started after
            culprit_request.clone(),
        ];
        // 10,000 requests overlapped in the kernel's count, the culprit among them.
        let victims = victims(10_000, Some(&culprit_request), known, (5, 100), 20);
        assert_eq!(victims.count, 9_999);
        let ids: Vec<u64> = victims.named.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![2, 3]);
    }

    #[test]
    fn named_victims_are_bounded_and_never_outnumber_the_count() {
        let known = (1..100).map(|id| request(id, id, 0, None));
        let victims = victims(0, None, known, (0, 10), 20);
        assert_eq!(victims.named.len(), 20);
        assert_eq!(victims.count, 20);
    }

    #[test]
    fn kernel_entries_are_named_from_the_route_names_sent_once() {
        let mut names = RouteNames::default();
        names.insert(42, "POST".into(), Some("/login".into()));
        let mut entry = RequestEntry::zeroed();
        entry.request_id = 8812;
        entry.task_id = 77;
        entry.route_key = 42;
        entry.path[..6].copy_from_slice(b"/login");
        entry.path_len = 6;
        let found = super::request(&entry, &names);
        assert_eq!(found.route_key(), "POST /login");
        assert_eq!((found.id, found.task_id, found.end_ns), (8812, 77, None));
        entry.route_key = 7;
        entry.end_ns = 5;
        entry.status = 503;
        let unknown = super::request(&entry, &names);
        assert_eq!((unknown.method.as_str(), unknown.status), ("?", Some(503)));
    }

    #[test]
    fn the_route_table_stays_bounded_without_templates() {
        let mut table = RouteTable::default();
        for n in 0..ROUTES_KEPT as u64 + 50 {
            let mut raw = request(n, 0, 0, None);
            raw.route = None;
            raw.path = format!("/files/{n}");
            table.record_stall(Some(&raw), 1);
        }
        let routes = table.ranked_routes();
        assert_eq!(routes.len(), ROUTES_KEPT + 1);
        let other = routes.iter().find(|(key, _)| *key == OTHER_ROUTES).unwrap();
        assert_eq!(other.1.stalls, 50);
    }

    #[test]
    fn routes_rank_by_total_stall_time() {
        let mut table = RouteTable::default();
        let mut login = request(1, 10, 0, None);
        login.route = Some("/login".into());
        let mut users = request(2, 20, 0, None);
        users.route = Some("/users/{id}".into());
        table.record_stall(Some(&login), 100);
        table.record_stall(Some(&users), 300);
        table.record_stall(Some(&login), 150);
        table.record_stall(None, 50);
        let ranked = table.ranked_routes();
        assert_eq!(ranked[0].0, "GET /users/{id}");
        assert_eq!(
            ranked[1],
            (
                "GET /login",
                &RouteStalls {
                    stalls: 2,
                    total_ns: 250,
                    longest_ns: 150
                }
            )
        );
        assert_eq!(ranked[2].0, "(no request)");
    }
}
