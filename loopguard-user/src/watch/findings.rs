//! Routes one finding: its context (request, victims, stack), then the
//! stalls per route, the metrics, the summary, the route exclusions, its
//! line (stdout, the recording) and `--fail-on`.
//!
//! Input: a [`Finding`] and what the watch knows around it, behind three
//! small traits: the target and the kernel's request maps ([`Target`]),
//! the stack capture ([`StackSource`]) and the output ([`Sink`]). Output:
//! what [`Router`] keeps ([`Summary`], [`Offending`], the route table) and
//! the metrics it is given. The routing is tested with fakes of the three.

use std::sync::Arc;

use crate::attribute::RouteTable;
use crate::attribute::asgi::Verdict;
use crate::detect::{FailOn, Finding, RouteFilter, Scope, Stall, StallKind};
use crate::events::StallContext;
use crate::events::summary::Summary;
use crate::events::{Event, build};
use crate::export::{BlockingKind, Metrics};
use crate::present::alerts::Offending;
use crate::stacks::{Stacks, StallStack};

/// The process watched, and what the kernel's maps and its memory say of
/// a stall.
pub trait Target {
    fn pid(&self) -> u32;
    /// An event loop that polls no Tokio task (Python, Node): its loop
    /// stretches are captured like polls.
    fn is_loop_only(&self) -> bool;
    fn thread_name(&self, tid: u32) -> String;
    /// The stall's thread, poll function, culprit request and victims
    /// (`in_progress`: the stall is still under way).
    fn context(&mut self, stall: &Stall, in_progress: bool) -> StallContext;
    /// A Python app's say on a loop stall, its request and victims put
    /// into `context`; `None` for a target without such a table.
    fn name_from_asgi(
        &mut self,
        stall: &Stall,
        in_progress: bool,
        context: &mut StallContext,
    ) -> Option<Verdict>;
}

/// Where a stall's stack comes from (stack capture on).
pub trait StackSource {
    fn describe(&mut self, stall: &Stall, finished: bool) -> StallStack;
}

impl StackSource for Stacks {
    fn describe(&mut self, stall: &Stall, finished: bool) -> StallStack {
        Stacks::describe(self, stall, finished)
    }
}

/// Where an event goes out.
pub trait Sink {
    /// Emits `event`; returns its text line (empty when it has none).
    fn emit(&mut self, event: &Event) -> String;
}

/// The thresholds in force, as a cumulative alert's record names them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Thresholds {
    pub threshold_ns: u64,
    pub cumulative_floor_ns: u64,
}

/// What the routing of findings keeps over a watch.
#[derive(Debug, Default)]
pub struct Router {
    /// Routes that raise no alert.
    pub routes: RouteFilter,
    pub summary: Summary,
    /// What `--fail-on` judges.
    pub offending: Offending,
    pub route_stalls: RouteTable,
    /// Where findings are counted for `/metrics` (`--metrics-addr`).
    pub metrics: Option<Arc<Metrics>>,
}

impl Router {
    pub fn new(routes: RouteFilter, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            routes,
            metrics,
            ..Self::default()
        }
    }

    /// Routes a finding of the rules.
    pub fn report<S: StackSource>(
        &mut self,
        finding: &Finding,
        thresholds: Thresholds,
        target: &mut impl Target,
        stacks: Option<&mut S>,
        sink: &mut impl Sink,
    ) {
        let Some(context) = context(finding, target, stacks) else {
            return;
        };
        if let Finding::Finished { stall, .. } = finding {
            self.route_stalls
                .record_stall(context.request.as_ref(), stall.duration_ns);
        }
        if let Some(metrics) = &self.metrics {
            count(metrics, finding, &context);
        }
        let excluded = context
            .request
            .as_ref()
            .is_some_and(|r| self.routes.excludes(r.route.as_deref().unwrap_or(&r.path)));
        self.summary.record(finding, excluded);
        if excluded {
            return;
        }
        let text = emit(finding, &context, thresholds, target, sink);
        if let Some(kind) = finding.fail_on() {
            self.offending.record(kind, text);
        }
    }

    /// Routes a stall already under way when loopguard attached, with the
    /// context the attach census found: reported in progress. Its end is
    /// never seen, so a loop stall with its request counts for `--fail-on`
    /// now.
    pub fn report_stuck(
        &mut self,
        stall: Stall,
        context: &StallContext,
        thresholds: Thresholds,
        target: &mut impl Target,
        sink: &mut impl Sink,
    ) {
        let named = stall.kind == StallKind::Loop && context.request.is_some();
        let finding = Finding::InProgress(stall);
        self.summary.record(&finding, false);
        let text = emit(&finding, context, thresholds, target, sink);
        if named {
            self.offending.record(FailOn::Stall, text);
        }
    }
}

/// A stall's context with its stack; `None` when a Python app's table
/// says the stretch was no stall (many short steps).
fn context<S: StackSource>(
    finding: &Finding,
    target: &mut impl Target,
    stacks: Option<&mut S>,
) -> Option<StallContext> {
    let Some(stall) = finding.stall() else {
        return Some(StallContext::default());
    };
    let in_progress = matches!(finding, Finding::InProgress(_));
    let mut context = target.context(stall, in_progress);
    if target.name_from_asgi(stall, in_progress, &mut context) == Some(Verdict::ShortSteps) {
        return None;
    }
    // A loop-only target's stretches are captured like polls; a Tokio
    // worker's are not (see `StackConfig::loop_stretches`).
    let captured = stall.kind == StallKind::Poll || target.is_loop_only();
    if captured
        && context.stack.is_none()
        && let Some(stacks) = stacks
    {
        let finished = matches!(finding, Finding::Finished { .. });
        context.stack = Some(stacks.describe(stall, finished));
    }
    Some(context)
}

/// Emits a finding's record; returns its text line (for `--fail-on`).
fn emit(
    finding: &Finding,
    context: &StallContext,
    thresholds: Thresholds,
    target: &impl Target,
    sink: &mut impl Sink,
) -> String {
    let cumulative = match finding {
        Finding::Cumulative(alert) => build::CumulativeContext {
            threshold_ns: thresholds.threshold_ns,
            floor_ns: thresholds.cumulative_floor_ns,
            thread: match alert.scope {
                Scope::Thread(tid) => Some(target.thread_name(tid)),
                Scope::Process => None,
            },
        },
        _ => build::CumulativeContext::default(),
    };
    sink.emit(&build::finding(finding, target.pid(), context, &cumulative))
}

/// What the metrics count of a finding: finished stalls with their
/// request (and top frame, with stacks), cumulative alerts by the request
/// that blocked longest, threshold moves.
fn count(metrics: &Metrics, finding: &Finding, context: &StallContext) {
    match finding {
        Finding::Finished { stall, .. } => {
            let kind = match stall.kind {
                StallKind::Poll => BlockingKind::Stall,
                StallKind::Loop => BlockingKind::Loop,
            };
            metrics.record(
                kind,
                context.request.as_ref(),
                stall.duration_ns,
                context.victim_count,
            );
            if stall.kind == StallKind::Poll
                && let Some(stack) = &context.stack
            {
                metrics.record_top_frame(crate::stacks::fold::top_frame(&stack.frames));
            }
        }
        Finding::Cumulative(alert) => {
            let top = alert
                .tasks
                .iter()
                .find_map(|t| t.request.as_ref())
                .map(|c| crate::attribute::Request {
                    id: c.id,
                    method: c.method.clone(),
                    route: Some(c.route.clone()),
                    path: c.path.clone(),
                    task_id: 0,
                    start_ns: 0,
                    end_ns: None,
                    status: None,
                });
            metrics.record(BlockingKind::Cumulative, top.as_ref(), alert.blocked_ns, 0);
        }
        Finding::ThresholdChanged(change) => metrics.set_threshold_ns(change.to_ns),
        Finding::InProgress(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::Request;
    use crate::detect::{CumulativeAlert, ThresholdChange};
    use crate::export::metrics::TargetInfo;
    use crate::stacks::fold::Frame;

    const MS: u64 = 1_000_000;

    /// A target whose every stall served `request`, and whose Python
    /// table (if any) says `asgi`.
    #[derive(Default)]
    struct FakeTarget {
        loop_only: bool,
        request: Option<Request>,
        asgi: Option<Verdict>,
    }

    impl Target for FakeTarget {
        fn pid(&self) -> u32 {
            7
        }
        fn is_loop_only(&self) -> bool {
            self.loop_only
        }
        fn thread_name(&self, tid: u32) -> String {
            format!("worker-{tid}")
        }
        fn context(&mut self, stall: &Stall, _: bool) -> StallContext {
            StallContext {
                thread: self.thread_name(stall.tid),
                request: self.request.clone(),
                victim_count: 2,
                ..StallContext::default()
            }
        }
        fn name_from_asgi(&mut self, _: &Stall, _: bool, _: &mut StallContext) -> Option<Verdict> {
            self.asgi
        }
    }

    /// Stacks that remember what they were asked.
    #[derive(Default)]
    struct FakeStacks(Vec<(u32, bool)>);

    impl StackSource for FakeStacks {
        fn describe(&mut self, stall: &Stall, finished: bool) -> StallStack {
            self.0.push((stall.tid, finished));
            StallStack {
                frames: vec![Frame {
                    function: "app::handler".into(),
                    module: None,
                    file: None,
                    line: None,
                }],
                cause: None,
                samples: 1,
                before_attach: false,
            }
        }
    }

    /// The events emitted, and their text.
    #[derive(Default)]
    struct Lines(Vec<Event>);

    impl Sink for Lines {
        fn emit(&mut self, event: &Event) -> String {
            self.0.push(event.clone());
            crate::present::text::event_text(event).unwrap_or_default()
        }
    }

    fn stall(kind: StallKind) -> Stall {
        Stall {
            kind,
            tid: 3,
            task_id: Some(9),
            header: 0,
            start_ns: MS,
            duration_ns: 80 * MS,
            preempted_ns: 0,
            copy_index: 0,
            return_addr: 0,
            threshold_ns: 50 * MS,
            requests_window: None,
        }
    }

    fn finished(kind: StallKind) -> Finding {
        Finding::Finished {
            stall: stall(kind),
            seen_in_progress: false,
        }
    }

    fn request(route: &str) -> Request {
        Request {
            id: 1,
            method: "GET".into(),
            route: Some(route.into()),
            path: route.into(),
            task_id: 9,
            start_ns: 0,
            end_ns: None,
            status: None,
        }
    }

    fn router() -> Router {
        let metrics = Metrics::new(
            &TargetInfo {
                pid: 7,
                exe: "/srv/app".into(),
                tokio_version: None,
            },
            100,
        );
        Router::new(RouteFilter::new(&["/health"]), Some(Arc::new(metrics)))
    }

    fn thresholds() -> Thresholds {
        Thresholds {
            threshold_ns: 50 * MS,
            cumulative_floor_ns: 10 * MS,
        }
    }

    fn report(
        router: &mut Router,
        finding: &Finding,
        target: &mut FakeTarget,
        stacks: Option<&mut FakeStacks>,
    ) -> Lines {
        let mut lines = Lines::default();
        router.report(finding, thresholds(), target, stacks, &mut lines);
        lines
    }

    fn metrics(router: &Router) -> String {
        router
            .metrics
            .as_ref()
            .map(|m| m.render())
            .unwrap_or_default()
    }

    #[test]
    fn a_finished_stall_reaches_stacks_routes_metrics_summary_and_fail_on() {
        let mut router = router();
        let mut target = FakeTarget {
            request: Some(request("/login")),
            ..FakeTarget::default()
        };
        let mut stacks = FakeStacks::default();
        let lines = report(
            &mut router,
            &finished(StallKind::Poll),
            &mut target,
            Some(&mut stacks),
        );
        assert_eq!(stacks.0, [(3, true)]);
        assert!(matches!(&lines.0[..], [Event::Stall(s)] if s.stack.is_some()));
        assert_eq!(router.summary.stalls, 1);
        assert_eq!(router.route_stalls.ranked_routes().len(), 1);
        assert_eq!(router.offending.count(FailOn::Stall), 1);
        assert!(router.offending.lines[0].1.starts_with("STALL "));
        let text = metrics(&router);
        assert!(
            text.contains(
                r#"loopguard_blocking_total{kind="stall",method="GET",route="/login"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("app::handler"), "{text}");
    }

    #[test]
    fn a_stall_in_progress_is_said_but_not_counted_or_failed_on() {
        let mut router = router();
        let mut stacks = FakeStacks::default();
        let lines = report(
            &mut router,
            &Finding::InProgress(stall(StallKind::Poll)),
            &mut FakeTarget::default(),
            Some(&mut stacks),
        );
        assert_eq!(stacks.0, [(3, false)]);
        assert!(matches!(&lines.0[..], [Event::StallInProgress(_)]));
        assert_eq!(router.summary.stalls, 0);
        assert_eq!(router.offending.count(FailOn::Stall), 0);
        assert!(!metrics(&router).contains("kind=\"stall\""));
    }

    #[test]
    fn an_excluded_route_is_counted_apart_and_never_said() {
        let mut router = router();
        let mut target = FakeTarget {
            request: Some(request("/health")),
            ..FakeTarget::default()
        };
        let lines = report(
            &mut router,
            &finished(StallKind::Poll),
            &mut target,
            None::<&mut FakeStacks>,
        );
        assert!(lines.0.is_empty());
        assert_eq!(
            (router.summary.stalls, router.summary.excluded_stalls),
            (0, 1)
        );
        assert_eq!(router.offending.count(FailOn::Stall), 0);
        // The metrics count every stall, excluded or not.
        assert!(metrics(&router).contains(r#"kind="stall",method="GET",route="/health"} 1"#));
    }

    #[test]
    fn loop_stretches_are_captured_only_on_a_loop_only_target() {
        for loop_only in [false, true] {
            let mut router = router();
            let mut stacks = FakeStacks::default();
            let mut target = FakeTarget {
                loop_only,
                ..FakeTarget::default()
            };
            report(
                &mut router,
                &finished(StallKind::Loop),
                &mut target,
                Some(&mut stacks),
            );
            assert_eq!(stacks.0.len(), usize::from(loop_only));
            assert!(metrics(&router).contains(r#"kind="loop""#));
            assert_eq!(router.summary.stalls, 1);
        }
    }

    #[test]
    fn short_steps_of_a_python_loop_are_no_stall_at_all() {
        let mut router = router();
        let mut target = FakeTarget {
            loop_only: true,
            asgi: Some(Verdict::ShortSteps),
            ..FakeTarget::default()
        };
        let mut stacks = FakeStacks::default();
        let lines = report(
            &mut router,
            &finished(StallKind::Loop),
            &mut target,
            Some(&mut stacks),
        );
        assert!(lines.0.is_empty() && stacks.0.is_empty());
        assert_eq!(router.summary.stalls + router.summary.excluded_stalls, 0);
        assert!(router.route_stalls.ranked_routes().is_empty());
    }

    #[test]
    fn a_cumulative_alert_names_its_thread_and_fails_on_cumulative() {
        let mut router = router();
        let alert = CumulativeAlert {
            scope: Scope::Thread(4),
            window_start_ns: 0,
            window_end_ns: 1000 * MS,
            blocked_ns: 250 * MS,
            polls: 12,
            budget_ns: 200 * MS,
            repeat: 1,
            tasks: Vec::new(),
            routes: Vec::new(),
        };
        let lines = report(
            &mut router,
            &Finding::Cumulative(alert),
            &mut FakeTarget::default(),
            None::<&mut FakeStacks>,
        );
        let [Event::Cumulative(event)] = &lines.0[..] else {
            panic!("{:?}", lines.0);
        };
        assert_eq!(event.thread.as_deref(), Some("worker-4"));
        assert_eq!((event.threshold_ms, event.floor_ms), (50.0, 10.0));
        assert_eq!(router.summary.cumulative_alerts, 1);
        assert_eq!(router.offending.count(FailOn::Cumulative), 1);
        assert!(metrics(&router).contains(r#"kind="cumulative""#));
    }

    #[test]
    fn a_threshold_move_sets_the_metric_and_fails_nothing() {
        let mut router = router();
        let change = ThresholdChange {
            at_ns: 0,
            from_ns: 50 * MS,
            to_ns: 20 * MS,
            baseline: crate::detect::Baseline {
                samples: 1000,
                quantile_ns: 5 * MS,
                quantile_upper_ns: 5 * MS,
                threshold_ns: 20 * MS,
            },
            percentile: 0.99,
            multiplier: 4.0,
        };
        let lines = report(
            &mut router,
            &Finding::ThresholdChanged(change),
            &mut FakeTarget::default(),
            None::<&mut FakeStacks>,
        );
        assert!(matches!(&lines.0[..], [Event::Threshold(_)]));
        assert!(metrics(&router).contains("loopguard_threshold_seconds 0.02"));
        assert_eq!(
            router.offending.count(FailOn::Stall) + router.offending.count(FailOn::Cumulative),
            0
        );
    }

    #[test]
    fn a_loop_stuck_before_attach_fails_the_run_only_with_its_request() {
        for (kind, request, offending) in [
            (StallKind::Loop, Some(request("/slow")), 1),
            (StallKind::Loop, None, 0),
            (StallKind::Poll, Some(request("/slow")), 0),
        ] {
            let mut router = router();
            let mut lines = Lines::default();
            let context = StallContext {
                request,
                ..StallContext::default()
            };
            router.report_stuck(
                stall(kind),
                &context,
                thresholds(),
                &mut FakeTarget::default(),
                &mut lines,
            );
            assert!(matches!(&lines.0[..], [Event::StallInProgress(_)]));
            assert_eq!(router.offending.count(FailOn::Stall), offending, "{kind:?}");
        }
    }
}
