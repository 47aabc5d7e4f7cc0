//! Attribute: which HTTP request a stall belongs to, and which requests had
//! to wait behind it.
//!
//! Input: request starts and ends from the middleware's USDT probes (each
//! start carries the Tokio task that was being polled when it fired), and
//! stalls. Output: the culprit request of a stall (the one its task was
//! serving) and its victims (every other request in flight on the process
//! while the worker was blocked). Events arrive in ring buffer order, which
//! is the order they happened in.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

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
#[derive(Debug)]
pub struct Victims<'a> {
    /// All of them, including finished requests no longer known by name.
    pub count: usize,
    /// The ones known by name, by id.
    pub named: Vec<&'a Request>,
}

/// Totals per route for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteStalls {
    pub stalls: u64,
    pub total_ns: u64,
    pub longest_ns: u64,
}

/// Requests in flight and recently finished, bounded.
#[derive(Debug)]
pub struct RequestTracker {
    in_flight: HashMap<u64, Request>,
    /// `(start_ns, id)` of every request in flight: the oldest is the one to
    /// evict, found without scanning a full table on every start.
    by_start: BTreeSet<(u64, u64)>,
    /// Task id → the request it serves now.
    by_task: HashMap<u64, u64>,
    /// Finished requests kept in full, to name culprits and victims.
    finished: VecDeque<Request>,
    /// `(start_ns, end_ns, id)` of many more finished requests, to count the
    /// victims of a long stall under load (tens of thousands of requests may
    /// finish on other workers while one is blocked).
    finished_spans: VecDeque<(u64, u64, u64)>,
    capacity: usize,
    /// Requests dropped because `capacity` were already in flight.
    pub evicted: u64,
    /// Ends whose start was never seen (started before attaching, or evicted).
    pub unmatched_ends: u64,
    /// Starts fired outside any poll loopguard saw: cannot be tied to a task.
    pub unattributable_starts: u64,
    pub started: u64,
    pub ended: u64,
    /// Most requests in flight at once.
    pub peak_in_flight: usize,
    routes: BTreeMap<String, RouteStalls>,
}

/// Finished requests remembered in full.
const FINISHED_KEPT: usize = 4096;
/// Finished requests remembered for counting victims: 6 MiB, about 4 s of
/// requests at 60k/s.
const FINISHED_SPANS_KEPT: usize = 1 << 18;

/// Distinct routes the summary ranks; later ones are counted together.
const ROUTES_KEPT: usize = 1000;
const OTHER_ROUTES: &str = "(other routes)";

impl RequestTracker {
    pub fn new(capacity: usize) -> Self {
        Self {
            in_flight: HashMap::new(),
            by_start: BTreeSet::new(),
            by_task: HashMap::new(),
            finished: VecDeque::new(),
            finished_spans: VecDeque::new(),
            capacity: capacity.max(1),
            evicted: 0,
            unmatched_ends: 0,
            unattributable_starts: 0,
            started: 0,
            ended: 0,
            peak_in_flight: 0,
            routes: BTreeMap::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A request started; `request.task_id` is 0 when the probe fired
    /// outside a poll loopguard saw.
    pub fn start(&mut self, request: Request) {
        self.started += 1;
        if self.in_flight.len() >= self.capacity {
            // Drop the oldest: its end was probably lost.
            if let Some(&(_, oldest)) = self.by_start.first() {
                self.forget(oldest);
                self.evicted += 1;
            }
        }
        if request.task_id == 0 {
            self.unattributable_starts += 1;
        } else {
            self.by_task.insert(request.task_id, request.id);
        }
        self.by_start.insert((request.start_ns, request.id));
        if let Some(replaced) = self.in_flight.insert(request.id, request) {
            // The same id twice (a middleware restarted its counter): keep the index exact.
            self.by_start.remove(&(replaced.start_ns, replaced.id));
        }
        self.peak_in_flight = self.peak_in_flight.max(self.in_flight.len());
    }

    /// A request ended with `status` (0: no response).
    pub fn end(&mut self, id: u64, status: u16, end_ns: u64) {
        let Some(mut request) = self.forget(id) else {
            self.unmatched_ends += 1;
            return;
        };
        self.ended += 1;
        request.end_ns = Some(end_ns);
        request.status = Some(status);
        if self.finished_spans.len() >= FINISHED_SPANS_KEPT {
            self.finished_spans.pop_front();
        }
        self.finished_spans
            .push_back((request.start_ns, end_ns, request.id));
        if self.finished.len() >= FINISHED_KEPT {
            self.finished.pop_front();
        }
        self.finished.push_back(request);
    }

    fn forget(&mut self, id: u64) -> Option<Request> {
        let request = self.in_flight.remove(&id)?;
        self.by_start.remove(&(request.start_ns, id));
        if self.by_task.get(&request.task_id) == Some(&id) {
            self.by_task.remove(&request.task_id);
        }
        Some(request)
    }

    /// The request task `task_id` was serving during a stall that began at
    /// `start_ns`: the one it serves now, or one that ended since (a handler
    /// usually finishes inside the very poll that stalled, so its end comes
    /// through before the poll's).
    pub fn culprit(&self, task_id: Option<u64>, start_ns: u64) -> Option<&Request> {
        let task_id = task_id?;
        if let Some(request) = self
            .by_task
            .get(&task_id)
            .and_then(|id| self.in_flight.get(id))
        {
            return Some(request);
        }
        self.finished
            .iter()
            .rev()
            .find(|r| r.task_id == task_id && r.end_ns.is_some_and(|end| end >= start_ns))
    }

    /// Every other request in flight at some point in `[start_ns, end_ns]`:
    /// how many, and those that can still be named (all in flight, and the
    /// most recently finished), by id.
    pub fn victims(&self, culprit: Option<u64>, start_ns: u64, end_ns: u64) -> Victims<'_> {
        let overlaps =
            |start: u64, end: Option<u64>| start <= end_ns && end.is_none_or(|end| end >= start_ns);
        let not_culprit = |id: u64| Some(id) != culprit;
        let in_flight = self
            .in_flight
            .values()
            .filter(|r| overlaps(r.start_ns, None) && not_culprit(r.id));
        let mut named: Vec<&Request> = in_flight
            .clone()
            .chain(self.finished.iter().filter(|r| {
                r.end_ns.is_some() && overlaps(r.start_ns, r.end_ns) && not_culprit(r.id)
            }))
            .collect();
        named.sort_by_key(|r| r.id);
        let finished = self
            .finished_spans
            .iter()
            .filter(|&&(start, end, id)| overlaps(start, Some(end)) && not_culprit(id))
            .count();
        Victims {
            count: in_flight.count() + finished,
            named,
        }
    }

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

    fn request(id: u64, task_id: u64, start_ns: u64, route: &str) -> Request {
        Request {
            id,
            method: "GET".into(),
            route: Some(route.into()),
            path: route.replace("{id}", "7"),
            task_id,
            start_ns,
            end_ns: None,
            status: None,
        }
    }

    #[test]
    fn a_stall_belongs_to_the_request_its_task_serves() {
        let mut tracker = RequestTracker::new(100);
        tracker.start(request(1, 10, 0, "/login"));
        tracker.start(request(2, 20, 5, "/fast"));
        assert_eq!(tracker.culprit(Some(10), 0).map(|r| r.id), Some(1));
        assert_eq!(tracker.culprit(Some(20), 0).map(|r| r.id), Some(2));
        assert_eq!(tracker.culprit(Some(30), 0), None);
        assert_eq!(tracker.culprit(None, 0), None);
    }

    #[test]
    fn a_request_that_ended_inside_the_stalled_poll_is_still_the_culprit() {
        // start (t=0) ... handler blocks, returns, request_end (t=340) ... poll ends.
        let mut tracker = RequestTracker::new(100);
        tracker.start(request(1, 10, 0, "/login"));
        tracker.start(request(2, 20, 5, "/fast"));
        tracker.end(1, 200, 340);
        assert_eq!(tracker.culprit(Some(10), 1).map(|r| r.id), Some(1));
        // A stall of that task that began after the request ended is not its.
        assert_eq!(tracker.culprit(Some(10), 400), None);
        let victims: Vec<u64> = tracker
            .victims(Some(1), 1, 341)
            .named
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(victims, vec![2]);
    }

    #[test]
    fn victims_are_counted_beyond_those_kept_by_name() {
        // A 2 ms stall while 10,000 short requests come and go on another worker.
        let mut tracker = RequestTracker::new(100);
        tracker.start(request(1, 10, 0, "/login"));
        for id in 2..10_002 {
            tracker.start(request(id, 20, id * 100, "/fast"));
            tracker.end(id, 200, id * 100 + 50);
        }
        tracker.end(1, 200, 2_000_000);
        let victims = tracker.victims(Some(1), 0, 2_000_001);
        assert_eq!(victims.count, 10_000);
        assert_eq!(
            victims.named.len(),
            FINISHED_KEPT - 1,
            "all but the culprit"
        );
        assert!(victims.named.windows(2).all(|w| w[0].id < w[1].id));
    }

    #[test]
    fn keep_alive_moves_a_task_to_its_next_request() {
        // One connection task serves requests 1 then 2.
        let mut tracker = RequestTracker::new(100);
        tracker.start(request(1, 10, 0, "/a"));
        tracker.end(1, 200, 10);
        assert_eq!(tracker.culprit(Some(10), 15), None);
        tracker.start(request(2, 10, 20, "/b"));
        assert_eq!(tracker.culprit(Some(10), 25).map(|r| r.id), Some(2));
    }

    #[test]
    fn an_end_before_the_next_start_does_not_unmap_a_newer_request() {
        // Out of order: request 2 started on the task before request 1's end arrived.
        let mut tracker = RequestTracker::new(100);
        tracker.start(request(1, 10, 0, "/a"));
        tracker.start(request(2, 10, 20, "/b"));
        tracker.end(1, 200, 25);
        assert_eq!(tracker.culprit(Some(10), 30).map(|r| r.id), Some(2));
    }

    #[test]
    fn victims_are_the_others_in_flight_during_the_stall() {
        let mut tracker = RequestTracker::new(100);
        tracker.start(request(1, 10, 0, "/block")); // culprit
        tracker.start(request(2, 20, 10, "/fast")); // waits, still in flight
        tracker.start(request(3, 30, 20, "/fast")); // waits, finished during the stall
        tracker.end(3, 200, 90);
        tracker.start(request(4, 40, 1, "/old"));
        tracker.end(4, 200, 2); // finished before the stall: no victim
        tracker.start(request(5, 50, 500, "/late")); // started after: no victim
        let ids: Vec<u64> = tracker
            .victims(Some(1), 5, 100)
            .named
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![2, 3]);
    }

    #[test]
    fn missing_ends_are_bounded_and_counted() {
        let mut tracker = RequestTracker::new(3);
        for id in 1..=5 {
            tracker.start(request(id, id * 10, id, "/x"));
        }
        assert_eq!(tracker.in_flight(), 3);
        assert_eq!(tracker.evicted, 2);
        assert_eq!(tracker.culprit(Some(10), 0), None, "the oldest went first");
        tracker.end(1, 200, 9);
        assert_eq!(tracker.unmatched_ends, 1);
        assert_eq!(tracker.peak_in_flight, 3);
    }

    #[test]
    fn eviction_takes_the_oldest_request_still_in_flight() {
        let mut tracker = RequestTracker::new(2);
        // (id, task, start)
        tracker.start(request(1, 1, 10, "/a"));
        tracker.start(request(2, 2, 20, "/b"));
        tracker.end(1, 200, 30);
        tracker.start(request(3, 3, 40, "/c"));
        assert_eq!(tracker.evicted, 0);
        tracker.start(request(4, 4, 50, "/d"));
        assert_eq!(tracker.evicted, 1);
        assert_eq!(tracker.culprit(Some(2), 0), None, "2 was the oldest left");
        assert!(tracker.culprit(Some(3), 0).is_some());
        assert_eq!(tracker.by_start.len(), tracker.in_flight());
    }

    #[test]
    fn the_route_table_stays_bounded_without_templates() {
        let mut tracker = RequestTracker::new(10);
        for n in 0..ROUTES_KEPT as u64 + 50 {
            let mut raw = request(n, 0, 0, "/x");
            raw.route = None;
            raw.path = format!("/files/{n}");
            tracker.record_stall(Some(&raw), 1);
        }
        let routes = tracker.ranked_routes();
        assert_eq!(routes.len(), ROUTES_KEPT + 1);
        let other = routes.iter().find(|(key, _)| *key == OTHER_ROUTES).unwrap();
        assert_eq!(other.1.stalls, 50);
    }

    #[test]
    fn starts_outside_a_poll_are_kept_but_unattributable() {
        let mut tracker = RequestTracker::new(10);
        tracker.start(request(1, 0, 0, "/x"));
        assert_eq!(tracker.unattributable_starts, 1);
        assert_eq!(tracker.culprit(Some(0), 0), None);
        assert_eq!(tracker.victims(None, 0, 10).count, 1);
    }

    #[test]
    fn routes_rank_by_total_stall_time() {
        let mut tracker = RequestTracker::new(10);
        let login = request(1, 10, 0, "/login");
        let users = request(2, 20, 0, "/users/{id}");
        tracker.record_stall(Some(&login), 100);
        tracker.record_stall(Some(&users), 300);
        tracker.record_stall(Some(&login), 150);
        tracker.record_stall(None, 50);
        let ranked = tracker.ranked_routes();
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
