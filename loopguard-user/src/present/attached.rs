//! The attached banner's text, rendered from the `attached` event alone:
//! the line a live run says on stderr once the probes are in, and the one
//! `loopguard report --lines` replays first. Target strings are escaped.

use std::fmt::Write as _;

use crate::events::Attached;
use crate::term::printable;

/// `loopguard: watching pid N (exe): what was probed; the rules; Ctrl+C to stop`.
pub fn attached_text(attached: &Attached) -> String {
    let exe = printable(&attached.exe);
    let waits = waits_text(attached);
    let linked = format!(
        "{} probes in {} {} links, attached in {:.2} s",
        attached.probes, attached.links, attached.probe_links, attached.attach_s
    );
    if let Some(why) = &attached.loop_only_reason {
        return format!(
            "loopguard: watching pid {} ({exe}) in loop mode ({}): every thread that waits in epoll is an event loop, reported when it stays away longer than the threshold; {waits}; {linked}; threshold {} ms; Ctrl+C to stop",
            attached.pid,
            printable(why),
            attached.threshold_ms.trunc(),
        );
    }
    let requests = requests_text(attached);
    let blocking_pool = attached.blocking_pool_functions_unprobed;
    format!(
        "loopguard: watching pid {} ({exe}): {} poll functions probed ({blocking_pool} more only run on the blocking pool), task ids for {}, {requests}, {waits}; {linked}; {}; Ctrl+C to stop",
        attached.pid,
        attached.poll_functions.saturating_sub(blocking_pool),
        attached.task_ids_verified,
        rules_text(attached),
    )
}

/// Where stalls' requests come from.
fn requests_text(attached: &Attached) -> String {
    if attached.requests_off {
        return "requests off (--requests off), so stalls are not tied to requests".to_owned();
    }
    if attached.request_source == "table" {
        return match attached.inflight_table_version {
            None => "no loopguard-middleware in-flight table, so stalls are not tied to requests"
                .to_owned(),
            Some(1) => "requests from loopguard-middleware's in-flight table, layout 1 (an older middleware: only stalls seen in progress are tied to requests; update it or use --requests probes)".to_owned(),
            Some(_) => "requests from loopguard-middleware's in-flight table (no request probes)"
                .to_owned(),
        };
    }
    if attached.request_probe_sites == 0 {
        "no loopguard-middleware probes, so stalls are not tied to requests".to_owned()
    } else {
        format!("{} request probe sites", attached.request_probe_sites)
    }
}

/// How the wait path is watched.
fn waits_text(attached: &Attached) -> String {
    let (epoll_sites, park_sites) = (attached.epoll_wait_sites, attached.park_wait_sites);
    match attached.wait_probes.as_str() {
        "off" => "wait path off (--wait-probes off)".to_owned(),
        "sched_switch" => {
            "epoll waits seen on sched_switch (uprobes only on Tokio's futex parks)".to_owned()
        }
        "syscall tracepoints" => format!(
            "epoll waits seen on the syscall tracepoints{}",
            if park_sites > 0 {
                format!(" and {park_sites} Tokio park sites")
            } else {
                String::new()
            }
        ),
        // A recording from before the sites were counted by kind.
        _ if epoll_sites + park_sites == 0 && attached.wait_sites > 0 => format!(
            "wait uprobes on {} sites ({})",
            attached.wait_sites,
            printable(&attached.wait_functions.join(", "))
        ),
        _ => format!(
            "wait uprobes on {epoll_sites} epoll and {park_sites} Tokio park sites ({})",
            printable(&attached.wait_functions.join(", "))
        ),
    }
}

/// The rules in force.
fn rules_text(attached: &Attached) -> String {
    let threshold = attached.threshold_ms;
    let mut text = match &attached.adaptive_rule {
        Some(a) if attached.adaptive => format!(
            "adaptive threshold ({threshold} ms until {} polls were seen, then {} x p{} within {}..{} ms)",
            a.min_samples,
            a.multiplier,
            a.percentile * 100.0,
            a.floor_ms,
            a.ceiling_ms
        ),
        _ => format!("threshold {threshold} ms"),
    };
    match &attached.cumulative_rule {
        Some(c) if attached.cumulative => {
            let _ = write!(
                text,
                ", cumulative {} ms per {} ms of polls over {} ms",
                c.budget_ms, c.window_ms, c.floor_ms
            );
        }
        // A recording from before the rules' settings were recorded.
        None if attached.cumulative => text.push_str(", cumulative rule on"),
        _ => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AdaptiveRule, CumulativeRule, Event};

    fn attached() -> Attached {
        Attached {
            pid: 4242,
            exe: "/srv/app".into(),
            mode: "tokio".into(),
            loop_only_reason: None,
            poll_functions: 12,
            task_ids_verified: 10,
            blocking_pool_functions_unprobed: 2,
            unknown_layout_functions: Vec::new(),
            probes: 34,
            probe_links: "uprobe_multi".into(),
            links: 6,
            attach_s: 0.071,
            request_probe_sites: 2,
            request_probes_attached: true,
            wait_sites: 3,
            wait_functions: vec!["epoll_wait".into(), "park".into()],
            wait_probes: "uprobes".into(),
            steal_clock: "run queue".into(),
            threshold_ms: 50.0,
            adaptive: false,
            cumulative: true,
            report_floor_ms: 10.0,
            adaptive_rule: None,
            cumulative_rule: Some(CumulativeRule {
                budget_ms: 200.0,
                window_ms: 1000.0,
                floor_ms: 10.0,
            }),
            epoll_wait_sites: 1,
            park_wait_sites: 2,
            requests_off: false,
            request_source: "probes".into(),
            inflight_table_version: Some(2),
            schema_version: 1,
            version: "0.1.0".into(),
            at_ns: 0,
            time: String::new(),
        }
    }

    #[test]
    fn the_banner_says_what_was_probed_and_the_rules() {
        assert_eq!(
            attached_text(&attached()),
            "loopguard: watching pid 4242 (/srv/app): 10 poll functions probed (2 more only run on the blocking pool), task ids for 10, 2 request probe sites, wait uprobes on 1 epoll and 2 Tokio park sites (epoll_wait, park); 34 probes in 6 uprobe_multi links, attached in 0.07 s; threshold 50 ms, cumulative 200 ms per 1000 ms of polls over 10 ms; Ctrl+C to stop"
        );
        let adaptive = Attached {
            adaptive: true,
            adaptive_rule: Some(AdaptiveRule {
                min_samples: 1000,
                multiplier: 4.0,
                percentile: 0.99,
                floor_ms: 20.0,
                ceiling_ms: 250.0,
            }),
            cumulative: false,
            requests_off: true,
            wait_probes: "sched_switch".into(),
            ..attached()
        };
        let text = attached_text(&adaptive);
        assert!(
            text.contains("requests off (--requests off)")
                && text.contains("epoll waits seen on sched_switch")
                && text.ends_with(
                    "; adaptive threshold (50 ms until 1000 polls were seen, then 4 x p99 within 20..250 ms); Ctrl+C to stop"
                ),
            "{text}"
        );
    }

    #[test]
    fn the_banner_says_where_requests_come_from() {
        let table = |version| Attached {
            request_source: "table".into(),
            request_probes_attached: false,
            inflight_table_version: version,
            ..attached()
        };
        assert!(
            attached_text(&table(Some(2))).contains(
                "requests from loopguard-middleware's in-flight table (no request probes)"
            )
        );
        assert!(attached_text(&table(Some(1))).contains("layout 1 (an older middleware"));
        assert!(attached_text(&table(None)).contains("no loopguard-middleware in-flight table"));
        // A recording from before the table mode: the probes.
        let old = Attached {
            request_source: String::new(),
            ..attached()
        };
        assert!(attached_text(&old).contains("2 request probe sites"));
    }

    #[test]
    fn a_loop_target_and_a_hostile_exe_read_plainly() {
        let looped = Attached {
            exe: "/x\u{1b}]0;pwned\u{7}".into(),
            mode: "loop".into(),
            loop_only_reason: Some("no Tokio poll function".into()),
            threshold_ms: 50.5,
            wait_probes: "syscall tracepoints".into(),
            park_wait_sites: 0,
            ..attached()
        };
        let text = attached_text(&looped);
        assert!(!text.chars().any(char::is_control), "{text}");
        assert!(
            text.contains("in loop mode (no Tokio poll function)")
                && text.contains("epoll waits seen on the syscall tracepoints;")
                && text.ends_with("; threshold 50 ms; Ctrl+C to stop"),
            "{text}"
        );
    }

    #[test]
    fn a_recording_from_before_the_banner_was_replayable_still_replays() {
        let mut value = serde_json::to_value(Event::Attached(attached())).unwrap();
        let object = value.as_object_mut().unwrap();
        for field in [
            "adaptive_rule",
            "cumulative_rule",
            "epoll_wait_sites",
            "park_wait_sites",
            "requests_off",
        ] {
            assert!(object.remove(field).is_some(), "{field}");
        }
        let Ok(Event::Attached(old)) = serde_json::from_value(value) else {
            panic!("an old attached line no longer reads");
        };
        let text = attached_text(&old);
        assert!(
            text.contains("2 request probe sites")
                && text.contains("wait uprobes on 3 sites (epoll_wait, park)")
                && text.contains("; threshold 50 ms, cumulative rule on; Ctrl+C"),
            "{text}"
        );
    }
}
