//! The attach census: polls (and `block_on` bodies, and non-Tokio loops)
//! already stuck when loopguard attached, found from their threads' stacks
//! once the census window has passed, and reported in progress, with a
//! lower bound, and with the request the middleware's in-flight table
//! says they serve.

use crate::attribute::inflight::{self, InflightRequest};
use crate::collect::Collector;
use crate::detect::{Stall, StallKind};
use crate::discover::proc;
use crate::stacks::StallStack;

use super::findings::Target;
use super::session::Session;

impl Session<'_> {
    /// Reports the stalls the census found, once its window has passed.
    pub(super) fn report_stuck_before_attach(&mut self, collector: &Collector, now_ns: u64) {
        let Some(found) = self.finish_census(collector, now_ns) else {
            return;
        };
        // Their requests started before the probes: the middleware's
        // in-flight table names them.
        let in_flight = if found.is_empty() {
            Vec::new()
        } else {
            inflight::read(self.printer.target.pid, &self.inflight_tables)
        };
        for (mut stall, mut stack) in found {
            stall.threshold_ns = self.engine.threshold_ns();
            let request = (stall.kind == StallKind::Poll)
                .then(|| inflight::running_on(&in_flight, stall.tid))
                .flatten();
            if let Some(began) = request.and_then(InflightRequest::poll_began_by)
                && began < stall.start_ns
            {
                stack.extend_back(stall.start_ns - began);
                stall.duration_ns += stall.start_ns - began;
                stall.start_ns = began;
            }
            let thresholds = self.thresholds();
            let mut context = self.live.context(&stall, true);
            if let Some(request) = request {
                context.request = Some(request.to_request());
            }
            self.live.name_from_asgi(&stall, true, &mut context);
            context.stack = Some(stack);
            self.findings.report_stuck(
                stall,
                &context,
                thresholds,
                &mut self.live,
                &mut self.printer,
            );
        }
    }

    /// The threads stuck since before attach, with their stacks, once the
    /// census window has passed (`None` before, and ever after).
    fn finish_census(
        &mut self,
        collector: &Collector,
        now_ns: u64,
    ) -> Option<Vec<(Stall, StallStack)>> {
        let stacks = self.stacks.as_mut()?;
        // Threads where a poll began or ended, or a wait, since attaching
        // are not stuck in something that began before.
        let polls_seen = || {
            let mut seen: Vec<u32> = collector
                .snapshot()
                .iter()
                .filter(|(_, polls)| polls.depth > 0 || polls.task_polls > 0)
                .map(|(tid, _)| *tid)
                .collect();
            seen.extend(collector.loop_snapshot().iter().map(|(tid, _)| *tid));
            seen
        };
        let pid = self.printer.target.pid;
        let loop_only = self.printer.target.is_loop_only();
        let engine = &mut self.engine;
        // A Python app's table names its loop threads (read once, if asked).
        let asgi = &mut self.live.asgi;
        let mut asgi_loops: Option<Vec<u32>> = None;
        // A process with no epoll instance (an interpreter met at exec) has
        // no loop to be stuck in.
        let has_loop = loop_only && proc::has_epoll_fd(pid);
        let loop_thread = |tid: u32| {
            has_loop
                && (asgi_loops
                    .get_or_insert_with(|| {
                        asgi.as_mut()
                            .map(crate::attribute::asgi::loop_threads)
                            .unwrap_or_default()
                    })
                    .contains(&tid)
                    || engine.presumed_loop_thread(pid, tid, |tid| proc::thread_name(pid, tid)))
        };
        stacks.finish_census(now_ns, polls_seen, loop_thread)
    }
}
