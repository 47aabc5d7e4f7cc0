//! The two USDT probes, the request id counter and [`RequestGuard`].

use std::sync::atomic::{AtomicU64, Ordering};

// The contract with the agent lives in `loopguard-usdt` (re-exported by
// `loopguard-common`), which both sides build from, so the two cannot drift apart:
//
// - `LAYOUT_VERSION`: the first argument of both probes. The agent refuses
//   probes whose argument count, or events whose version, it does not know.
//   Bump it whenever the argument list of either probe changes.
// - `request_start`: layout version, request id, method pointer and length,
//   route template pointer and length (null and 0 when unknown), path
//   pointer and length. All 8 bytes wide, in the order of
//   `loopguard_usdt::start_arg`, which the kernel side reads them by.
// - `request_end`: layout version, request id, HTTP status (0 when no
//   response was produced). All 8 bytes wide, as `loopguard_usdt::end_arg`.
pub use loopguard_usdt::{
    LAYOUT_VERSION, PROVIDER, REQUEST_END, REQUEST_END_ARGS, REQUEST_START, REQUEST_START_ARGS,
};

/// Source of request ids. Starts at 1, so 0 never names a request.
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Returns a new request id, unique within this process (a global counter
/// starting at 1).
#[inline]
pub fn next_request_id() -> u64 {
    NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed)
}

/// Fires `loopguard:request_start` for request `id`.
///
/// `route` is the route template (`/users/{id}`) when the framework knows
/// it, `path` the request path without the query string. The agent reads the
/// strings while the probe fires, so they only need to live for this call.
///
/// **Call this from inside the task that runs the handler** (ideally right at
/// the start of the handler's future, in its first poll): the agent ties the
/// request to the Tokio task being polled on this thread at this moment.
/// Calling it from a connection task that later spawns the handler
/// attributes the request to the wrong task.
///
/// Without an attached agent this is a `nop` and a few register moves.
#[inline(never)]
pub fn request_start(id: u64, method: &str, route: Option<&str>, path: &str) {
    fire_start(id, method, route, path);
    crate::inflight::started(id, method, route, path, false);
}

/// [`request_start`] for the tower layer, which also tells the in-flight
/// table about every later poll of the request's future.
pub(crate) fn request_start_tracked(id: u64, method: &str, route: Option<&str>, path: &str) {
    fire_start(id, method, route, path);
    crate::inflight::started(id, method, route, path, true);
}

/// The `request_start` probe site (one per binary, whichever function
/// calls it).
#[inline(never)]
fn fire_start(id: u64, method: &str, route: Option<&str>, path: &str) {
    let (route_ptr, route_len) = match route {
        Some(route) => (route.as_ptr(), route.len()),
        None => (std::ptr::null(), 0),
    };
    probe::probe!(
        loopguard,
        request_start,
        LAYOUT_VERSION,
        id,
        method.as_ptr(),
        method.len(),
        route_ptr,
        route_len,
        path.as_ptr(),
        path.len(),
    );
    #[cfg(test)]
    recorder::record(recorder::Event::Start {
        id,
        method: method.to_owned(),
        route: route.map(str::to_owned),
        path: path.to_owned(),
    });
}

/// Fires `loopguard:request_end` for request `id` with HTTP `status`; pass 0
/// when the request produced no response (the handler failed, panicked or
/// was cancelled).
///
/// Call it on the same task as [`request_start`], once per started request.
/// Without an attached agent this is a `nop` and a few register moves.
#[inline(never)]
pub fn request_end(id: u64, status: u16) {
    probe::probe!(
        loopguard,
        request_end,
        LAYOUT_VERSION,
        id,
        u64::from(status)
    );
    crate::inflight::ended(id);
    crate::inflight::announce();
    #[cfg(test)]
    recorder::record(recorder::Event::End { id, status });
}

/// RAII helper for frameworks without tower: fires `request_start` when
/// created and `request_end` when finished or dropped.
///
/// Create it **inside the task that runs the handler** (for example at the
/// top of an actix-web middleware's response future or of the handler
/// itself), not where the request is accepted, and keep it alive until the
/// response head is ready. [`finish`](Self::finish) reports the status; a
/// guard dropped without it (handler panicked, request cancelled) reports
/// status 0.
///
/// ```
/// use loopguard_middleware::RequestGuard;
///
/// async fn handle(method: &str, path: &str) -> u16 {
///     let guard = RequestGuard::start(method, Some("/users/{id}"), path);
///     let status = 200; // ... run the handler ...
///     guard.finish(status);
///     status
/// }
/// # drop(handle("GET", "/users/7"));
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard at once ends the request with status 0"]
pub struct RequestGuard {
    id: u64,
    finished: bool,
}

impl RequestGuard {
    /// Takes a new request id and fires `request_start` for it.
    pub fn start(method: &str, route: Option<&str>, path: &str) -> Self {
        let id = next_request_id();
        request_start(id, method, route, path);
        Self {
            id,
            finished: false,
        }
    }

    /// The request id passed to both probes.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Fires `request_end` with `status`.
    pub fn finish(mut self, status: u16) {
        self.finished = true;
        request_end(self.id, status);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.finished {
            request_end(self.id, 0);
        }
    }
}

/// Records the probes fired on the current thread, for the unit tests.
#[cfg(test)]
pub(crate) mod recorder {
    use std::cell::RefCell;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Event {
        Start {
            id: u64,
            method: String,
            route: Option<String>,
            path: String,
        },
        End {
            id: u64,
            status: u16,
        },
    }

    thread_local! {
        static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
    }

    pub(crate) fn record(event: Event) {
        EVENTS.with_borrow_mut(|events| events.push(event));
    }

    /// The events fired on this thread since the last call.
    pub(crate) fn take() -> Vec<Event> {
        EVENTS.with_borrow_mut(std::mem::take)
    }
}

#[cfg(test)]
mod tests {
    use super::recorder::{self, Event};
    use super::*;

    #[test]
    fn ids_increase() {
        let a = next_request_id();
        let b = next_request_id();
        assert!(a >= 1);
        assert!(b > a);
    }

    #[test]
    fn guard_finish_reports_status() {
        recorder::take();
        let guard = RequestGuard::start("POST", None, "/upload");
        let id = guard.id();
        guard.finish(201);
        assert_eq!(
            recorder::take(),
            [
                Event::Start {
                    id,
                    method: "POST".into(),
                    route: None,
                    path: "/upload".into()
                },
                Event::End { id, status: 201 },
            ]
        );
    }

    #[test]
    fn guard_dropped_reports_zero() {
        recorder::take();
        let guard = RequestGuard::start("GET", Some("/users/{id}"), "/users/3");
        let id = guard.id();
        drop(guard);
        assert_eq!(
            recorder::take(),
            [
                Event::Start {
                    id,
                    method: "GET".into(),
                    route: Some("/users/{id}".into()),
                    path: "/users/3".into()
                },
                Event::End { id, status: 0 },
            ]
        );
    }
}
