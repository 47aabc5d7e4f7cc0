//! Route exclusions: health checks and metrics scrapes that may block by
//! design. Their polls are counted but raise no alert and are left out of
//! rankings.
//!
//! Patterns are globs matched against the route template (or the path when
//! the framework gave none): `*` matches any run of characters, `/`
//! included; `?` matches one character; anything else matches itself.

use crate::discover::glob::glob_match;

/// The routes left out when nothing else is configured.
pub const DEFAULT_EXCLUDED_ROUTES: [&str; 4] = ["/health", "/healthz", "/ready", "/metrics"];

/// A set of glob patterns over routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteFilter {
    patterns: Vec<Vec<char>>,
}

impl RouteFilter {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self {
            patterns: patterns
                .iter()
                .map(|p| p.as_ref().chars().collect())
                .collect(),
        }
    }

    /// Whether `route` matches any pattern.
    pub fn excludes(&self, route: &str) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let route: Vec<char> = route.chars().collect();
        self.patterns.iter().any(|p| glob_match(p, &route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_match_exactly() {
        let filter = RouteFilter::new(&DEFAULT_EXCLUDED_ROUTES);
        assert!(filter.excludes("/health"));
        assert!(filter.excludes("/metrics"));
        assert!(!filter.excludes("/healthy"));
        assert!(!filter.excludes("/api/health"));
        assert!(!filter.excludes("/"));
    }

    #[test]
    fn globs_match_runs_and_single_characters() {
        let filter = RouteFilter::new(&["/internal/*", "/v?/status", "*/probe"]);
        assert!(filter.excludes("/internal/"));
        assert!(filter.excludes("/internal/a/b/c"));
        assert!(filter.excludes("/v1/status"));
        assert!(!filter.excludes("/v10/status"));
        assert!(filter.excludes("/k8s/probe"));
        assert!(!filter.excludes("/k8s/probe/x"));
        assert!(!filter.excludes("/internals"));
    }

    #[test]
    fn no_patterns_exclude_nothing() {
        assert!(!RouteFilter::new::<&str>(&[]).excludes("/health"));
        assert!(RouteFilter::new(&["*"]).excludes(""));
    }
}
