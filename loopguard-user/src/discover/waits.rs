//! Where an event-loop thread waits for events: the functions the wait
//! probes go on, in the executable and in every C library the process
//! maps (read through `/proc/PID/root` or the mapping itself), and which
//! of them each wait path probes.
//!
//! Which symbols are wait functions is `loopguard_parse::waits`
//! (re-exported here): the C library's epoll wrappers, Tokio's park
//! functions.

use std::path::PathBuf;

use loopguard_parse::waits::plain_path;
pub use loopguard_parse::waits::{EPOLL_WRAPPERS, WaitKind, is_dynamically_linked, sites_in};

use super::proc::Mapping;

/// One function the wait probes attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitSite {
    /// The file to attach to, as seen from loopguard (through
    /// `/proc/PID/root` for a library, so containers work).
    pub probe_path: PathBuf,
    /// The file as the target names it.
    pub display_path: String,
    pub file_offset: u64,
    pub name: String,
    pub kind: WaitKind,
}

/// The multi-thread worker parks that sleep in a futex (its condvar), from
/// the innermost: a build that inlined `park_condvar` keeps an outer level.
const WORKER_CONDVAR_PARKS: [&str; 3] = [
    "tokio::runtime::scheduler::multi_thread::park::Inner::park_condvar",
    "tokio::runtime::scheduler::multi_thread::park::Inner::park",
    "tokio::runtime::scheduler::multi_thread::park::Parker::park",
];

/// Whether the `sched_switch` wait path sees every park of `sites`' Tokio:
/// a multi-thread worker that parks on its condvar sleeps in a futex, which
/// only a park probe tells from a lock. When the build kept a multi-thread
/// park but none of [`WORKER_CONDVAR_PARKS`] (inlined), the uprobe path is
/// used instead. (With no multi-thread park at all, the runtime is
/// current-thread only, or every park was inlined, which no path sees.)
pub fn switch_sees_every_park(sites: &[WaitSite]) -> bool {
    let parks = || {
        sites
            .iter()
            .filter(|site| site.kind == WaitKind::TokioPark)
            .map(|site| plain_path(&site.name))
    };
    let multi_thread = "tokio::runtime::scheduler::multi_thread::";
    !parks().any(|path| path.starts_with(multi_thread))
        || parks().any(|path| WORKER_CONDVAR_PARKS.contains(&path.as_str()))
        || sites.iter().any(|site| {
            site.kind == WaitKind::TokioParkCall && plain_path(&site.name).starts_with(multi_thread)
        })
}

/// `probed` (the park functions and epoll wrappers a wait path probes),
/// and every park call of `sites` that is not inside one of those park
/// functions: a park the build inlined is seen at its call, where a
/// probed function's own call would only nest in it (two more traps per
/// park).
pub fn and_park_calls<'s>(sites: &'s [WaitSite], probed: Vec<&'s WaitSite>) -> Vec<&'s WaitSite> {
    let inside_probed = |call: &WaitSite| {
        probed
            .iter()
            .any(|site| site.kind == WaitKind::TokioPark && site.name == call.name)
    };
    let calls: Vec<&WaitSite> = sites
        .iter()
        .filter(|site| {
            matches!(
                site.kind,
                WaitKind::TokioParkCall | WaitKind::TokioParkReturn
            ) && !inside_probed(site)
        })
        .collect();
    let mut all = probed;
    all.extend(calls);
    all
}

/// The wait sites the `sched_switch` wait path still probes. It sees a
/// thread asleep in epoll without a probe, but not a park that sleeps in a
/// futex, which a lock sleeps in too: so the `block_on` thread's parks
/// (`tokio::runtime::park::`) and a worker's condvar park keep their
/// uprobes, both only run on the way to sleep. A worker's `park_timeout`
/// (a driver poll that does not sleep, on every maintenance tick) and
/// `park_driver` (epoll) are not probed, nor the epoll wrappers.
pub fn probed_on_switch(sites: &[WaitSite]) -> Vec<&WaitSite> {
    let path_of = |site: &WaitSite| plain_path(&site.name);
    let condvar = WORKER_CONDVAR_PARKS.iter().find_map(|wanted| {
        sites
            .iter()
            .find(|site| site.kind == WaitKind::TokioPark && path_of(site) == *wanted)
    });
    sites
        .iter()
        .filter(|site| {
            site.kind == WaitKind::TokioPark
                && (path_of(site).starts_with("tokio::runtime::park::")
                    || condvar.is_some_and(|chosen| std::ptr::eq(chosen, *site)))
        })
        .collect()
}

/// Whether a mapped file is a C library (glibc's `libc.so.6`, musl's
/// `ld-musl-*.so.1` / `libc.musl-*.so.1`).
pub fn is_c_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so")
        || name.starts_with("libc-")
        || name.starts_with("ld-musl-")
        || name.starts_with("libc.musl-")
}

/// Where a dynamically linked program's C library usually is, seen from
/// process `pid` (through `/proc/PID/root`): the first that exists.
pub fn default_c_library(pid: u32) -> Option<String> {
    const CANDIDATES: [&str; 7] = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/usr/lib/libc.so.6",
        "/lib/libc.so.6",
        "/lib/ld-musl-x86_64.so.1",
    ];
    CANDIDATES
        .iter()
        .find(|path| super::files::exists_in_root(pid, path))
        .map(|path| (*path).to_owned())
}

/// The distinct C libraries process `pid` maps executable: one executable
/// mapping of each, to be read through (a name the target may have
/// deleted and reused since, " (deleted)" suffix or not).
pub fn c_libraries(maps: &[Mapping]) -> Vec<Mapping> {
    let mut libraries: Vec<Mapping> = maps
        .iter()
        .filter(|m| m.executable && m.path.starts_with('/') && is_c_library(&m.path))
        .cloned()
        .collect();
    libraries.sort_by(|a, b| a.path.cmp(&b.path));
    libraries.dedup_by(|a, b| a.path == b.path);
    libraries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn park_site(name: &str) -> WaitSite {
        WaitSite {
            probe_path: PathBuf::from("/srv/app"),
            display_path: "/srv/app".to_owned(),
            file_offset: 0,
            name: name.to_owned(),
            kind: if EPOLL_WRAPPERS.contains(&name) {
                WaitKind::Epoll
            } else {
                WaitKind::TokioPark
            },
        }
    }

    fn probed_names(names: &[&str]) -> Vec<String> {
        let sites: Vec<WaitSite> = names.iter().map(|name| park_site(name)).collect();
        probed_on_switch(&sites)
            .into_iter()
            .map(|site| site.name.clone())
            .collect()
    }

    #[test]
    fn sched_switch_keeps_the_futex_parks_probed() {
        let mt = "tokio::runtime::scheduler::multi_thread::park::";
        let all = [
            "epoll_wait",
            "tokio::runtime::park::CachedParkThread::park",
            "<tokio::runtime::park::Inner>::park_timeout",
            &format!("<{mt}Inner>::park_condvar"),
            &format!("{mt}Inner::park_driver"),
            &format!("{mt}Inner::park"),
            &format!("{mt}Parker::park_timeout"),
        ];
        assert_eq!(
            probed_names(&all),
            [
                "tokio::runtime::park::CachedParkThread::park",
                "<tokio::runtime::park::Inner>::park_timeout",
                &format!("<{mt}Inner>::park_condvar"),
            ]
        );
        // park_condvar inlined: the next level out, never park_timeout.
        assert_eq!(
            probed_names(&[
                &format!("{mt}Parker::park_timeout"),
                &format!("{mt}Parker::park"),
                &format!("{mt}Inner::park_driver"),
            ]),
            [format!("{mt}Parker::park")]
        );
    }

    /// A park the build inlined is probed at its call, unless the call is
    /// inside a park function the path probes anyway (it would only nest).
    #[test]
    fn park_calls_are_probed_outside_probed_park_functions() {
        let mt = "tokio::runtime::scheduler::multi_thread::";
        let condvar = format!("{mt}park::Inner::park_condvar");
        let internal = format!("{mt}worker::Context::park_internal");
        let call = |name: &str, kind| WaitSite {
            kind,
            ..park_site(name)
        };
        let sites = [
            park_site(&condvar),
            call(&condvar, WaitKind::TokioParkCall),
            call(&condvar, WaitKind::TokioParkReturn),
            call(&internal, WaitKind::TokioParkCall),
            call(&internal, WaitKind::TokioParkReturn),
        ];
        let probed: Vec<(&str, WaitKind)> = and_park_calls(&sites, probed_on_switch(&sites))
            .into_iter()
            .map(|site| (site.name.as_str(), site.kind))
            .collect();
        assert_eq!(
            probed,
            [
                (condvar.as_str(), WaitKind::TokioPark),
                (internal.as_str(), WaitKind::TokioParkCall),
                (internal.as_str(), WaitKind::TokioParkReturn),
            ]
        );
        // Every named park inlined, but the call to the condvar found: the
        // sched_switch path sees every park.
        let only_calls = [
            park_site(&format!("{mt}park::Inner::park_driver")),
            call(&internal, WaitKind::TokioParkCall),
            call(&internal, WaitKind::TokioParkReturn),
        ];
        assert!(switch_sees_every_park(&only_calls));
        assert!(!switch_sees_every_park(&only_calls[..1]));
    }

    #[test]
    fn a_worker_park_inlined_away_keeps_the_uprobe_path() {
        let mt = "tokio::runtime::scheduler::multi_thread::park::";
        let sites = |names: &[&str]| names.iter().map(|name| park_site(name)).collect::<Vec<_>>();
        assert!(switch_sees_every_park(&sites(&[
            "epoll_wait",
            &format!("<{mt}Inner>::park_condvar"),
            &format!("{mt}Inner::park_driver"),
        ])));
        // Current-thread only: the block_on parks and epoll.
        assert!(switch_sees_every_park(&sites(&[
            "epoll_wait",
            "tokio::runtime::park::CachedParkThread::park",
        ])));
        // A multi-thread worker whose condvar park no probe can catch.
        assert!(!switch_sees_every_park(&sites(&[
            "epoll_wait",
            &format!("{mt}Inner::park_driver"),
            &format!("{mt}Parker::park_timeout"),
        ])));
    }

    #[test]
    fn c_libraries_are_told_by_name() {
        assert!(is_c_library("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_c_library("/lib/ld-musl-x86_64.so.1"));
        assert!(!is_c_library("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"));
        assert!(!is_c_library("/usr/bin/node"));
    }

    #[test]
    fn epoll_wrappers_are_found_in_the_c_library() {
        // The C library this test runs on defines the wrappers: each found,
        // once, at a file offset inside it, and nothing else claimed.
        let libc = default_c_library(std::process::id()).expect("a C library");
        let bytes = std::fs::read(&libc).unwrap();
        let sites = sites_in(&bytes, false);
        let names: Vec<&str> = sites.iter().map(|(_, name, _)| name.as_str()).collect();
        assert!(names.contains(&"epoll_wait"), "{libc}: {names:?}");
        assert!(
            sites
                .iter()
                .all(|(offset, name, kind)| *kind == WaitKind::Epoll
                    && EPOLL_WRAPPERS.contains(&name.as_str())
                    && (*offset as usize) < bytes.len()),
            "{sites:?}"
        );
    }
}
