//! Bounded label values: route templates under a cap, standard methods.
//!
//! A Prometheus series is made for every distinct label set, so raw paths
//! (`/users/8812`) never become labels: a request without a route template
//! is `unmatched`, routes past the cap are `other`, a stall with no request
//! is `none`, and methods outside the standard ones are `OTHER`.

use std::collections::HashSet;

use crate::attribute::Request;

/// Routes kept as labels by default before new ones become `other`.
pub const DEFAULT_MAX_ROUTES: usize = 200;

/// Label of a stall that no request is known for (no middleware, or the
/// poll served no request).
pub const NO_REQUEST: &str = "none";
/// Route label of a request whose framework gave no route template.
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// Route label of every route past the cap.
pub const OTHER_ROUTE: &str = "other";
/// Method label of a method outside [`STANDARD_METHODS`].
pub const OTHER_METHOD: &str = "OTHER";

/// Methods kept as they are (RFC 9110 and PATCH).
pub const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// `method` as a label: a standard method (case-insensitive) or `OTHER`.
pub fn method_label(method: &str) -> &'static str {
    STANDARD_METHODS
        .iter()
        .find(|standard| standard.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or(OTHER_METHOD)
}

/// Hands out route labels, at most `max_routes` distinct templates.
#[derive(Debug)]
pub struct RouteLabels {
    known: HashSet<String>,
    max_routes: usize,
    /// Distinct templates turned into `other` because the cap was reached.
    pub overflowed: u64,
    overflow_seen: HashSet<String>,
}

/// Templates remembered as having overflowed (to count them once each).
const OVERFLOW_REMEMBERED: usize = 10_000;

impl RouteLabels {
    pub fn new(max_routes: usize) -> Self {
        Self {
            known: HashSet::new(),
            max_routes,
            overflowed: 0,
            overflow_seen: HashSet::new(),
        }
    }

    /// `(route, method)` labels for a request, or for no request.
    pub fn of(&mut self, request: Option<&Request>) -> (String, &'static str) {
        let Some(request) = request else {
            return (NO_REQUEST.to_owned(), NO_REQUEST);
        };
        let method = method_label(&request.method);
        let Some(route) = request.route.as_deref() else {
            return (UNMATCHED_ROUTE.to_owned(), method);
        };
        (self.route(route), method)
    }

    fn route(&mut self, route: &str) -> String {
        if self.known.contains(route) {
            return route.to_owned();
        }
        if self.known.len() < self.max_routes {
            self.known.insert(route.to_owned());
            return route.to_owned();
        }
        if self.overflow_seen.len() < OVERFLOW_REMEMBERED
            && self.overflow_seen.insert(route.to_owned())
        {
            self.overflowed += 1;
        }
        OTHER_ROUTE.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, route: Option<&str>) -> Request {
        Request {
            id: 1,
            method: method.to_owned(),
            route: route.map(str::to_owned),
            path: "/users/8812".to_owned(),
            task_id: 1,
            start_ns: 0,
            end_ns: None,
            status: None,
        }
    }

    #[test]
    fn methods_are_standard_or_other() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("patch"), "PATCH");
        assert_eq!(method_label("PROPFIND"), "OTHER");
        assert_eq!(method_label(""), "OTHER");
    }

    #[test]
    fn raw_paths_never_become_labels() {
        let mut labels = RouteLabels::new(10);
        assert_eq!(
            labels.of(Some(&request("GET", None))),
            ("unmatched".to_owned(), "GET")
        );
        assert_eq!(labels.of(None), ("none".to_owned(), "none"));
        assert_eq!(
            labels.of(Some(&request("POST", Some("/users/{id}")))),
            ("/users/{id}".to_owned(), "POST")
        );
    }

    #[test]
    fn routes_past_the_cap_are_other() {
        let mut labels = RouteLabels::new(2);
        for route in ["/a", "/b", "/c", "/d", "/c"] {
            labels.of(Some(&request("GET", Some(route))));
        }
        assert_eq!(labels.of(Some(&request("GET", Some("/a")))).0, "/a");
        assert_eq!(labels.of(Some(&request("GET", Some("/b")))).0, "/b");
        assert_eq!(labels.of(Some(&request("GET", Some("/e")))).0, "other");
        assert_eq!(labels.overflowed, 3, "/c, /d and /e, each once");
    }
}
