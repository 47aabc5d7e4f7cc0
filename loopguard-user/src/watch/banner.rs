//! The attached banner: what was found and probed, announced once the
//! probes are in (the `attached` event on stdout, a line on stderr).

use crate::attach::{LinkSummary, RequestSource, WaitPath};
use crate::detect::{AdaptiveSettings, CumulativeSettings};
use crate::discover::vtable::PollClass;
use crate::discover::waits::WaitKind;
use crate::discover::{ProbeTarget, WatchMode};
use crate::events;
use crate::present::attached::attached_text;
use crate::present::emit;
use crate::present::text::Format;
use crate::watch::WatchOptions;

/// Announces the attachment: JSON on stdout, text on stderr.
pub fn print_attached(
    target: &ProbeTarget,
    probe_count: usize,
    wait_path: WaitPath,
    links: &LinkSummary,
    options: &WatchOptions,
) {
    let found = Found::of(target);
    let attached = attached_event(target, &found, probe_count, wait_path, links, options);
    let text = attached_text(&attached);
    emit::event(&events::Event::Attached(attached), options.format);
    if options.format == Format::Text {
        crate::diag!("{text}");
    }
    if !found.unknown.is_empty() {
        crate::diag!("{}", unknown_layout_warning(&found.unknown));
    }
}

/// What discovery found, counted for the banner.
struct Found<'t> {
    /// Poll copies whose task ids are read (verified event-loop layout).
    event_loop: usize,
    /// Poll copies only the blocking pool runs: not probed.
    blocking_pool: usize,
    /// Names of the poll copies whose task layout is not known.
    unknown: Vec<&'t str>,
    epoll_sites: usize,
    park_sites: usize,
    /// Wait functions probed, sorted, once each.
    wait_functions: Vec<&'t str>,
    /// Why the target is watched in loop mode (`None` for Tokio).
    loop_only: Option<&'t str>,
}

impl<'t> Found<'t> {
    fn of(target: &'t ProbeTarget) -> Self {
        let copies = &target.binary.poll_copies;
        let sites = &target.wait_sites;
        let epoll_sites = sites.iter().filter(|s| s.kind == WaitKind::Epoll).count();
        let mut wait_functions: Vec<&str> = sites.iter().map(|site| site.name.as_str()).collect();
        wait_functions.sort_unstable();
        wait_functions.dedup();
        Self {
            event_loop: copies
                .iter()
                .filter(|copy| copy.class() == PollClass::EventLoop)
                .count(),
            blocking_pool: copies.iter().filter(|copy| copy.is_blocking_pool()).count(),
            unknown: copies
                .iter()
                .filter(|copy| copy.class() == PollClass::Unknown)
                .map(|copy| copy.name.as_str())
                .collect(),
            epoll_sites,
            // A park call is probed twice (the call and its return): one
            // park site.
            park_sites: sites
                .iter()
                .filter(|s| matches!(s.kind, WaitKind::TokioPark | WaitKind::TokioParkCall))
                .count(),
            wait_functions,
            loop_only: match &target.mode {
                WatchMode::Tokio => None,
                WatchMode::LoopOnly { why } => Some(why.as_str()),
            },
        }
    }
}

/// The newest layout of the target's in-flight tables (none: `None`).
fn table_version(target: &ProbeTarget) -> Option<u32> {
    let tables = &target.binary.inflight_tables;
    tables.iter().map(|table| table.version).max()
}

/// The `attached` record.
fn attached_event(
    target: &ProbeTarget,
    found: &Found,
    probe_count: usize,
    wait_path: WaitPath,
    links: &LinkSummary,
    options: &WatchOptions,
) -> events::Attached {
    let request_sites = target.binary.usdt_sites.len();
    let at_ns = crate::collect::monotonic_ns();
    events::Attached {
        pid: target.pid,
        exe: target.exe.display_path.clone(),
        mode: if found.loop_only.is_some() {
            "loop"
        } else {
            "tokio"
        }
        .to_owned(),
        loop_only_reason: found.loop_only.map(str::to_owned),
        poll_functions: target.binary.poll_copies.len(),
        task_ids_verified: found.event_loop,
        blocking_pool_functions_unprobed: found.blocking_pool,
        unknown_layout_functions: found
            .unknown
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
        probes: probe_count,
        probe_links: links.kind.as_str().to_owned(),
        links: links.links,
        attach_s: links.attach_time.as_secs_f64(),
        request_probe_sites: request_sites,
        request_probes_attached: options.requests == RequestSource::Probes && request_sites > 0,
        wait_sites: target.wait_sites.len(),
        wait_functions: found
            .wait_functions
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
        wait_probes: wait_path.as_str().to_owned(),
        steal_clock: steal_clock().to_owned(),
        threshold_ms: options.detect.threshold_ns as f64 / 1e6,
        adaptive: options.detect.adaptive.is_some(),
        cumulative: options.detect.cumulative.is_some(),
        report_floor_ms: options.detect.report_floor_ns() as f64 / 1e6,
        adaptive_rule: options.detect.adaptive.as_ref().map(adaptive_rule),
        cumulative_rule: options.detect.cumulative.as_ref().map(cumulative_rule),
        epoll_wait_sites: found.epoll_sites,
        park_wait_sites: found.park_sites,
        requests_off: options.requests == RequestSource::Off,
        request_source: options.requests.as_str().to_owned(),
        inflight_table_version: table_version(target),
        schema_version: events::SCHEMA_VERSION,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        at_ns,
        time: events::clock::from_monotonic(at_ns),
    }
}

/// The attach-time warning naming the poll functions whose task layout is
/// not one loopguard knows (probed anyway, without task ids).
fn unknown_layout_warning(unknown: &[&str]) -> String {
    const SHOWN: usize = 4;
    let mut names = unknown
        .iter()
        .take(SHOWN)
        .map(|name| crate::term::printable(name).into_owned())
        .collect::<Vec<_>>()
        .join("; ");
    if unknown.len() > SHOWN {
        use std::fmt::Write as _;
        let _ = write!(names, "; and {} more", unknown.len() - SHOWN);
    }
    format!(
        "loopguard: warning: {} poll function(s) have a task layout this loopguard does not know (a newer Tokio?): they are probed, told apart from blocking-pool work by return address, and their stalls carry no task id: {names}",
        unknown.len()
    )
}

/// The adaptive rule's settings as `attached` states them.
fn adaptive_rule(a: &AdaptiveSettings) -> events::AdaptiveRule {
    events::AdaptiveRule {
        min_samples: a.min_samples,
        multiplier: a.multiplier,
        percentile: a.percentile,
        floor_ms: ms(a.floor_ns),
        ceiling_ms: ms(a.ceiling_ns),
    }
}

/// The cumulative rule's settings as `attached` states them.
fn cumulative_rule(c: &CumulativeSettings) -> events::CumulativeRule {
    events::CumulativeRule {
        budget_ms: ms(c.budget_ns),
        window_ms: ms(c.window_ns),
        floor_ms: ms(c.floor_ns),
    }
}

/// ns as the `attached` event gives ms (exactly, not rounded).
fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Where the time the host took from a thread is read (`steal_clock`).
fn steal_clock() -> &'static str {
    if crate::discover::steal::rq_steal().known() {
        "run queue"
    } else {
        "runtime updates"
    }
}

#[cfg(test)]
mod tests {
    use super::unknown_layout_warning;

    #[test]
    fn copies_of_an_unknown_layout_are_named_at_attach() {
        let names = [
            "a::poll",
            "b::poll",
            "c::poll",
            "d::poll",
            "e\u{1b}]0;x::poll",
            "f",
        ];
        let text = unknown_layout_warning(&names[..2]);
        assert!(text.contains("2 poll function(s)"), "{text}");
        assert!(text.contains("a::poll; b::poll"), "{text}");
        assert!(
            text.contains("probed") && text.contains("no task id"),
            "{text}"
        );
        let text = unknown_layout_warning(&names);
        assert!(
            text.contains("and 2 more") && !text.contains("e\u{1b}"),
            "{text}"
        );
    }
}
