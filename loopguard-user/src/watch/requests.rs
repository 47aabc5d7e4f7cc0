//! The request view: what the kernel's request maps and the target's
//! memory say of a stall (its culprit request and victims, named), and the
//! target as the routing of findings asks it ([`LiveTarget`]).

use std::collections::HashMap;

use crate::attribute::asgi::{self, AsgiTables, Verdict};
use crate::attribute::inflight::{self, StepRequest, TableAt};
use crate::attribute::table::{self, PollStall, TableAttribution};
use crate::attribute::{self, Request, RouteNames, Victims};
use crate::collect::RequestMaps;
use crate::detect::{Culprit, RouteFilter, Stall, StallKind};
use crate::discover::{ProbeTarget, proc};
use crate::events::StallContext;

use super::findings::Target;

/// Victims listed by name on a stall; the count covers the rest.
const VICTIMS_LISTED: usize = 20;

/// The target process and the kernel's request maps, as the routing of
/// findings asks them.
pub(super) struct LiveTarget<'t> {
    pub(super) target: &'t ProbeTarget,
    /// Function names of the return addresses seen (who polled a task).
    pub(super) callers: HashMap<u64, Option<String>>,
    /// The kernel's request maps, when the request probes are attached.
    pub(super) request_maps: Option<RequestMaps>,
    pub(super) route_names: RouteNames,
    /// A Python target's `loopguard-asgi` tables (loop mode).
    pub(super) asgi: Option<AsgiTables>,
    /// The middleware's in-flight tables, when requests are named from
    /// them (`--requests table`).
    pub(super) table: Option<TableSource>,
}

/// The in-flight tables a Tokio target's requests are named from, and
/// what was named of stalls in progress.
pub(super) struct TableSource {
    pub(super) tables: Vec<TableAt>,
    /// ns: the coarse clock's tick.
    pub(super) tick_ns: u64,
    pub(super) names: TableAttribution,
}

impl TableSource {
    /// `None` when the target has no table.
    pub(super) fn new(tables: Vec<TableAt>) -> Option<Self> {
        if tables.is_empty() {
            return None;
        }
        let tick_ns = inflight::coarse_tick_ns();
        Some(Self {
            tables,
            tick_ns,
            names: TableAttribution::new(tick_ns),
        })
    }
}

impl LiveTarget<'_> {
    pub(super) fn requests(&self) -> RequestView<'_> {
        RequestView {
            maps: self.request_maps.as_ref(),
            names: &self.route_names,
            table: self.table.as_ref().map(|table| TableView {
                pid: self.target.pid,
                tables: &table.tables,
                tick_ns: table.tick_ns,
            }),
        }
    }

    /// A poll stall's culprit and victims from the in-flight table.
    fn named_by_table(
        &mut self,
        stall: &Stall,
        in_progress: bool,
    ) -> Option<(Option<Request>, Victims)> {
        let source = self.table.as_mut()?;
        if stall.kind != StallKind::Poll {
            return None;
        }
        let requests = inflight::read_steps(self.target.pid, &source.tables);
        let asked = PollStall {
            tid: stall.tid,
            start_ns: stall.start_ns,
            end_ns: stall.start_ns + stall.duration_ns,
            in_progress,
        };
        Some(source.names.attribute(&requests, asked, VICTIMS_LISTED))
    }
}

impl Target for LiveTarget<'_> {
    fn pid(&self) -> u32 {
        self.target.pid
    }

    fn is_loop_only(&self) -> bool {
        self.target.is_loop_only()
    }

    fn thread_name(&self, tid: u32) -> String {
        proc::thread_name(self.target.pid, tid)
    }

    fn context(&mut self, stall: &Stall, in_progress: bool) -> StallContext {
        let target = self.target;
        let polled_from = self
            .callers
            .entry(stall.return_addr)
            .or_insert_with(|| target.function_at(stall.return_addr).map(str::to_owned))
            .clone();
        let (request, victims) = if self.request_maps.is_none()
            && let Some(named) = self.named_by_table(stall, in_progress)
        {
            named
        } else {
            let requests = self.requests();
            let request = requests.culprit(stall.task_id, stall.start_ns);
            let victims = requests.victims(stall, request.as_ref());
            (request, victims)
        };
        StallContext {
            thread: proc::thread_name(target.pid, stall.tid),
            poll_fn: target
                .binary
                .poll_copies
                .get(stall.copy_index as usize)
                .map(|copy| copy.name.clone())
                .unwrap_or_default(),
            polled_from,
            request,
            victim_count: victims.count,
            victims: victims.named,
            stack: None,
        }
    }

    fn name_from_asgi(
        &mut self,
        stall: &Stall,
        in_progress: bool,
        context: &mut StallContext,
    ) -> Option<Verdict> {
        let asgi = self.asgi.as_mut()?;
        Some(name_from_asgi(asgi, stall, in_progress, context))
    }
}

/// What the kernel holds of requests, named (`None` maps: not tracked),
/// or the in-flight table they are named from instead.
pub(super) struct RequestView<'a> {
    pub(super) maps: Option<&'a RequestMaps>,
    pub(super) names: &'a RouteNames,
    pub(super) table: Option<TableView<'a>>,
}

/// Where a target's in-flight tables are.
pub(super) struct TableView<'a> {
    pid: u32,
    tables: &'a [TableAt],
    tick_ns: u64,
}

impl TableView<'_> {
    /// The request a finished poll of thread `tid` over `[start_ns,
    /// end_ns]` served, from a read of the table now.
    fn culprit(&self, tid: u32, start_ns: u64, end_ns: u64) -> Option<Request> {
        let requests = inflight::read_steps(self.pid, self.tables);
        let late = table::late_ns(self.tick_ns);
        table::covering(&requests, tid, start_ns, end_ns, late).map(StepRequest::to_request)
    }

    /// Requests in flight now (at most a table's worth).
    pub(super) fn in_flight(&self) -> usize {
        inflight::read_steps(self.pid, self.tables)
            .iter()
            .filter(|r| r.ended_ns.is_none())
            .count()
    }
}

impl RequestView<'_> {
    /// The request task `task_id` served during a poll that began at `start_ns`.
    pub(super) fn culprit(&self, task_id: Option<u64>, start_ns: u64) -> Option<Request> {
        let (maps, task) = (self.maps?, task_id?);
        let name = |entry: loopguard_common::requests::RequestEntry| {
            attribute::request(&entry, self.names)
        };
        let ended = maps.ended_in_poll(task).map(name);
        let serving = maps.serving(task).map(name);
        let found = attribute::culprit(task, start_ns, ended, serving, &[]);
        if found.is_some() {
            return found;
        }
        // Ended since, in a poll too short to keep it by task.
        let recent: Vec<Request> = maps
            .recent_ends()
            .iter()
            .filter(|entry| entry.task_id == task)
            .map(|entry| name(*entry))
            .collect();
        attribute::culprit(task, start_ns, None, None, &recent)
    }

    /// The other requests in flight during `stall`: counted in the kernel,
    /// named while it still knows them.
    fn victims(&self, stall: &Stall, culprit: Option<&Request>) -> Victims {
        let Some(maps) = self.maps else {
            return Victims::default();
        };
        let overlapping = stall
            .requests_window
            .map_or(0, |(ended_at_start, started_at_end)| {
                started_at_end
                    .unwrap_or_else(|| maps.totals().started)
                    .saturating_sub(ended_at_start)
            });
        let recent = maps.recent_ends();
        let known = maps
            .in_flight()
            .into_iter()
            .chain(recent.iter().copied())
            .map(|entry| attribute::request(&entry, self.names));
        attribute::victims(
            overlapping,
            culprit,
            known,
            (stall.start_ns, stall.start_ns + stall.duration_ns),
            VICTIMS_LISTED,
        )
    }
}

/// The request a task served during a poll of thread `tid` over
/// `[start_ns, end_ns]`, and whether its route is excluded.
pub(super) fn culprit(
    requests: &RequestView,
    routes: &RouteFilter,
    (task_id, tid): (Option<u64>, u32),
    start_ns: u64,
    end_ns: u64,
) -> (Option<Culprit>, bool) {
    let found = match (&requests.maps, &requests.table) {
        (None, Some(table)) => table.culprit(tid, start_ns, end_ns),
        _ => requests.culprit(task_id, start_ns),
    };
    let Some(request) = found else {
        return (None, false);
    };
    let route = request.route.unwrap_or_else(|| request.path.clone());
    let excluded = routes.excludes(&route);
    let culprit = Culprit {
        id: request.id,
        method: request.method,
        route,
        path: request.path,
    };
    (Some(culprit), excluded)
}

/// The culprit and victims of loop stall `stall` from a Python app's
/// `loopguard-asgi` table, into `context` (unless it already has a request).
pub(super) fn name_from_asgi(
    tables: &mut AsgiTables,
    stall: &Stall,
    in_progress: bool,
    context: &mut StallContext,
) -> Verdict {
    let mut named = asgi::Named {
        request: context.request.take(),
        ..Default::default()
    };
    let verdict =
        asgi::attribute_loop_stall(tables, stall, in_progress, &mut named, VICTIMS_LISTED);
    context.request = named.request;
    if verdict == Verdict::Attributed {
        context.victims = named.victims;
        context.victim_count = named.victim_count;
    }
    verdict
}
