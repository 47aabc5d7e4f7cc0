//! Which processes `loopguard watch --all` watches: selectors over who a
//! process is, and the event-loop runtime it runs.
//!
//! In: an [`Identity`] (and, once discovered, whether the program is
//! Tokio). Out: whether to go on. Every kind of selector given must match
//! (`--exe` and `--container` both); within a kind, any pattern may
//! (`--exe 'api-*' --exe worker`). No selector: every process of a
//! runtime asked for (`--runtime`, by default all three).

use crate::discover::glob;
use crate::discover::identity::Identity;
pub use crate::discover::identity::runtime::{Runtime, interpreter_of};

/// The selectors of `loopguard watch --all`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selectors {
    /// Globs over the executable's name (or its whole path, with a `/`).
    pub exe: Vec<String>,
    /// Globs over the cgroup path.
    pub cgroup: Vec<String>,
    /// Globs over the container's name or id.
    pub container: Vec<String>,
    /// The runtimes watched; empty: all of them.
    pub runtimes: Vec<Runtime>,
}

impl Selectors {
    /// Whether the identity matches every kind of selector given. `path`
    /// is the executable's full path.
    pub fn matches(&self, identity: &Identity, path: &str) -> bool {
        let any = |patterns: &[String], subjects: &[&str]| {
            patterns.is_empty()
                || patterns.iter().any(|pattern| {
                    subjects
                        .iter()
                        .any(|subject| !subject.is_empty() && glob::matches(pattern, subject))
                })
        };
        let exe_matches = self.exe.is_empty()
            || self.exe.iter().any(|pattern| {
                let subject = if pattern.contains('/') {
                    path
                } else {
                    &identity.exe
                };
                glob::matches(pattern, subject)
            });
        exe_matches
            && any(&self.cgroup, &[&identity.cgroup])
            && any(
                &self.container,
                &[&identity.container, &identity.container_id],
            )
    }

    /// Whether `runtime` is watched.
    pub fn wants(&self, runtime: Runtime) -> bool {
        self.runtimes.is_empty() || self.runtimes.contains(&runtime)
    }

    /// Whether a program that is not an interpreter is worth reading to
    /// see if it is Tokio.
    pub fn wants_tokio(&self) -> bool {
        self.wants(Runtime::Tokio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(exe: &str, cgroup: &str, container: &str) -> Identity {
        Identity {
            exe: exe.into(),
            service: exe.into(),
            cgroup: cgroup.into(),
            container: container.into(),
            container_id: if container.is_empty() {
                String::new()
            } else {
                "4f2a9c1be0d3".repeat(5) + "abcd"
            },
            ..Identity::default()
        }
    }

    #[test]
    fn no_selector_takes_everything_of_the_runtimes_asked() {
        let all = Selectors::default();
        assert!(all.matches(&identity("api", "/", ""), "/srv/api"));
        assert!(all.wants(Runtime::Node));
        let python = Selectors {
            runtimes: vec![Runtime::Python],
            ..Selectors::default()
        };
        assert!(!python.wants_tokio());
        assert!(python.wants(Runtime::Python));
    }

    #[test]
    fn every_kind_given_must_match_and_any_pattern_of_a_kind() {
        let selectors = Selectors {
            exe: vec!["stall-*".into(), "worker".into()],
            container: vec!["shop-*".into()],
            ..Selectors::default()
        };
        assert!(selectors.matches(
            &identity("stall-server", "/", "shop-api"),
            "/x/stall-server"
        ));
        assert!(selectors.matches(&identity("worker", "/", "shop-1"), "/x/worker"));
        assert!(!selectors.matches(&identity("stall-server", "/", ""), "/x/stall-server"));
        assert!(!selectors.matches(&identity("nginx", "/", "shop-api"), "/x/nginx"));
        // A container by its id.
        let by_id = Selectors {
            container: vec!["4f2a9c1be0d3*".into()],
            ..Selectors::default()
        };
        assert!(by_id.matches(&identity("api", "/", "any"), "/api"));
    }

    #[test]
    fn exe_patterns_with_a_slash_match_the_path_and_cgroups_match_their_path() {
        let selectors = Selectors {
            exe: vec!["/srv/*".into()],
            cgroup: vec!["/system.slice/*.service".into()],
            ..Selectors::default()
        };
        let api = identity("api", "/system.slice/api.service", "");
        assert!(selectors.matches(&api, "/srv/bin/api"));
        assert!(!selectors.matches(&api, "/usr/bin/api"));
        let session = identity("api", "/user.slice/session-2.scope", "");
        assert!(!selectors.matches(&session, "/srv/bin/api"));
    }
}
