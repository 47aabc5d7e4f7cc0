//! Requests of a Tokio service named without a probe per request
//! (`--requests table`): from the middleware's in-flight table (layout 2,
//! read by `attribute::inflight`), which keeps, per slot, the request in
//! flight or the last one that ended there, the thread and times of its
//! future's last long poll, and its end.
//!
//! Input: one read of the table (settled slots) and a poll stall (thread,
//! start, end, in progress or finished). Output: its culprit and victims.
//! A stall seen in progress is named then, while the culprit's future is
//! still marked as polled on the blocked thread, and remembered: its end
//! may come after the slot was taken by a newer request. Times in the
//! table are `CLOCK_MONOTONIC_COARSE`, up to a tick behind; the tick is
//! allowed for wherever a table time is compared with a kernel one.
//!
//! What it cannot give (the probes, `--requests probes`, do): victims that
//! started and ended between two reads of a busy table whose slots were
//! taken again meanwhile (more than `INFLIGHT_SLOTS` requests in the
//! stall) are not seen, so the count is a lower bound under load; no
//! per-route request counters.

use std::collections::VecDeque;

use crate::attribute::inflight::StepRequest;
use crate::attribute::{Request, Victims, take_remembered};

/// How far behind the monotonic clock a coarse time read in the target
/// may be: four ticks, at least 20 ms.
pub fn late_ns(tick_ns: u64) -> u64 {
    tick_ns.saturating_mul(4).max(20_000_000)
}

/// The request whose future thread `tid` polls now, not ended, in a task
/// poll that began at `since_ns`: a tracked request (the tower layer marks
/// every poll) by its latest poll start, which must fall inside that task
/// poll (`late_ns` early at most: the coarse clock lags), else the latest
/// started there of those that only say where they started
/// (`RequestGuard`).
pub fn running(
    requests: &[StepRequest],
    tid: u32,
    since_ns: u64,
    late_ns: u64,
) -> Option<&StepRequest> {
    let on_thread = || {
        requests
            .iter()
            .filter(move |r| tid != 0 && r.ended_ns.is_none() && r.slot.polling_tid == tid)
    };
    on_thread()
        .filter(|r| r.slot.polls_tracked)
        .max_by_key(|r| r.slot.poll_started_ns)
        .filter(|r| r.slot.poll_started_ns.saturating_add(late_ns) >= since_ns)
        .or_else(|| {
            on_thread()
                .filter(|r| !r.slot.polls_tracked)
                .max_by_key(|r| r.slot.started_ns)
        })
}

/// The request a finished poll of thread `tid` over `[start_ns, end_ns]`
/// served: the one whose last long poll on that thread overlaps it most
/// (its end taken `late_ns` later, as the coarse clock may lag); else one
/// still marked as polled there that began by the end.
pub fn covering(
    requests: &[StepRequest],
    tid: u32,
    start_ns: u64,
    end_ns: u64,
    late_ns: u64,
) -> Option<&StepRequest> {
    requests
        .iter()
        .filter(|r| r.long_tid == tid && tid != 0)
        .map(|r| {
            let late_end = r.long_end_ns.saturating_add(late_ns);
            let overlap = late_end
                .min(end_ns)
                .saturating_sub(r.long_start_ns.max(start_ns));
            (overlap, r)
        })
        .filter(|(overlap, _)| *overlap > 0)
        .max_by_key(|(overlap, r)| (*overlap, r.slot.id))
        .map(|(_, r)| r)
        .or_else(|| {
            running(requests, tid, start_ns, late_ns).filter(|r| r.slot.poll_started_ns <= end_ns)
        })
}

/// The requests other than `culprit_id` in flight at some time in
/// `[start_ns, end_ns]` (an end up to a tick late counts), oldest first.
pub fn in_flight_during(
    requests: &[StepRequest],
    culprit_id: Option<u64>,
    start_ns: u64,
    end_ns: u64,
    tick_ns: u64,
) -> Vec<Request> {
    let mut found: Vec<&StepRequest> = requests
        .iter()
        .filter(|r| {
            Some(r.slot.id) != culprit_id
                && r.in_flight_during(start_ns.saturating_sub(tick_ns), end_ns)
        })
        .collect();
    found.sort_by_key(|r| (r.slot.started_ns, r.slot.id));
    found.into_iter().map(StepRequest::to_request).collect()
}

/// What was named of a stall while in progress.
#[derive(Debug)]
struct Remembered {
    request: Option<Request>,
    victims: Vec<Request>,
}

/// Stalls named in progress, remembered (a few threads stall at once at
/// most; older entries are stalls whose end was lost).
const REMEMBERED: usize = 64;
/// Victims remembered per stall (a table's worth).
const VICTIMS_REMEMBERED: usize = 512;

/// Names poll stalls from reads of the table, remembering what it named
/// of each stall in progress until its end.
#[derive(Debug)]
pub struct TableAttribution {
    /// ns: the coarse clock's tick (`inflight::coarse_tick_ns`).
    tick_ns: u64,
    remembered: VecDeque<((u32, u64), Remembered)>,
}

/// One poll stall as the table is asked about it.
#[derive(Clone, Copy, Debug)]
pub struct PollStall {
    pub tid: u32,
    pub start_ns: u64,
    /// ns: its end, or now while in progress.
    pub end_ns: u64,
    pub in_progress: bool,
}

impl TableAttribution {
    pub fn new(tick_ns: u64) -> Self {
        Self {
            tick_ns,
            remembered: VecDeque::new(),
        }
    }

    /// The culprit and victims (at most `listed` named) of `stall`, from
    /// `requests` (one read of the table now).
    pub fn attribute(
        &mut self,
        requests: &[StepRequest],
        stall: PollStall,
        listed: usize,
    ) -> (Option<Request>, Victims) {
        let key = (stall.tid, stall.start_ns);
        let remembered = take_remembered(&mut self.remembered, &key);
        let request = self.culprit(requests, stall, remembered.as_ref());
        let culprit_id = request.as_ref().map(|r| r.id);
        let mut victims = in_flight_during(
            requests,
            culprit_id,
            stall.start_ns,
            stall.end_ns,
            self.tick_ns,
        );
        if let Some(earlier) = remembered {
            merge_victims(&mut victims, earlier.victims, culprit_id);
        }
        if stall.in_progress {
            self.remember(key, request.clone(), &victims);
        }
        let count = victims.len();
        victims.truncate(listed);
        (
            request,
            Victims {
                count,
                named: victims,
            },
        )
    }

    /// The culprit: named while in progress if it was, else from the table.
    fn culprit(
        &self,
        requests: &[StepRequest],
        stall: PollStall,
        remembered: Option<&Remembered>,
    ) -> Option<Request> {
        if let Some(request) = remembered.and_then(|r| r.request.as_ref()) {
            return Some(request.clone());
        }
        let late = late_ns(self.tick_ns);
        let found = if stall.in_progress {
            running(requests, stall.tid, stall.start_ns, late)
        } else {
            covering(requests, stall.tid, stall.start_ns, stall.end_ns, late)
        };
        found.map(StepRequest::to_request)
    }

    fn remember(&mut self, key: (u32, u64), request: Option<Request>, victims: &[Request]) {
        if self.remembered.len() >= REMEMBERED {
            self.remembered.pop_front();
        }
        let kept = victims[..victims.len().min(VICTIMS_REMEMBERED)].to_vec();
        self.remembered.push_back((
            key,
            Remembered {
                request,
                victims: kept,
            },
        ));
    }
}

/// Adds the victims seen earlier that `victims` lacks, oldest first.
fn merge_victims(victims: &mut Vec<Request>, earlier: Vec<Request>, culprit_id: Option<u64>) {
    for victim in earlier {
        if Some(victim.id) != culprit_id && victims.iter().all(|v| v.id != victim.id) {
            victims.push(victim);
        }
    }
    victims.sort_by_key(|r| (r.start_ns, r.id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::inflight::InflightRequest;

    const MS: u64 = 1_000_000;
    const TICK: u64 = 4 * MS;
    const LATE: u64 = 20 * MS;

    /// Request `id` on `/p{id}`, started at `started_ms`, tracked.
    fn req(id: u64, started_ms: u64) -> StepRequest {
        StepRequest {
            slot: InflightRequest {
                id,
                polling_tid: 0,
                polls_tracked: true,
                started_ns: started_ms * MS,
                poll_started_ns: started_ms * MS,
                method: "GET".into(),
                route: Some("/p/{id}".into()),
                path: format!("/p{id}"),
            },
            loop_tid: 7,
            long_tid: 0,
            long_start_ns: 0,
            long_end_ns: 0,
            ended_ns: None,
        }
    }

    fn polled(mut r: StepRequest, tid: u32, since_ms: u64) -> StepRequest {
        r.slot.polling_tid = tid;
        r.slot.poll_started_ns = since_ms * MS;
        r
    }

    /// Ended at `end_ms` inside a long poll on `tid` that began at `from_ms`.
    fn ended_in_poll(mut r: StepRequest, tid: u32, from_ms: u64, end_ms: u64) -> StepRequest {
        r.long_tid = tid;
        r.long_start_ns = from_ms * MS;
        r.long_end_ns = end_ms * MS;
        r.ended_ns = Some(end_ms * MS);
        r
    }

    fn ids(requests: &[Request]) -> Vec<u64> {
        requests.iter().map(|r| r.id).collect()
    }

    fn stall(tid: u32, start_ms: u64, end_ms: u64, in_progress: bool) -> PollStall {
        PollStall {
            tid,
            start_ns: start_ms * MS,
            end_ns: end_ms * MS,
            in_progress,
        }
    }

    #[test]
    fn the_request_polled_on_the_blocked_thread_is_the_culprit_in_progress() {
        let requests = [
            polled(req(1, 100), 7, 100),
            req(2, 90),                 // suspended: a victim
            polled(req(3, 95), 8, 120), // polled on another worker
        ];
        let running = |requests: &[StepRequest], tid| {
            running(requests, tid, 99 * MS, LATE).map(|r| r.slot.id)
        };
        assert_eq!(running(&requests, 7), Some(1));
        assert_eq!(running(&requests, 9), None);
        assert_eq!(running(&requests, 0), None);
        let mut ended = polled(req(4, 100), 9, 100);
        ended.ended_ns = Some(110 * MS);
        // An ended request is polled by nobody, whatever its slot says.
        assert_eq!(running(&[ended], 9), None);
        // A mark older than the task poll is stale (its end was not written).
        assert_eq!(running(&[polled(req(5, 10), 7, 10)], 7), None);
        // One a few ticks early is the coarse clock lagging after idle.
        assert_eq!(running(&[polled(req(5, 85), 7, 85)], 7), Some(5));
        // A request that only says where it started: the latest there.
        let mut guard = req(6, 50);
        guard.slot.polls_tracked = false;
        guard.slot.polling_tid = 7;
        assert_eq!(running(&[guard], 7), Some(6));
    }

    #[test]
    fn a_culprit_that_ended_in_its_blocking_poll_is_found_after_the_stall() {
        // Request 1 blocked thread 7 from 100 to 400 ms and ended in that
        // poll; the same connection task then served request 5 in the same
        // task poll (keep-alive), quickly.
        let mut next = req(5, 400);
        next.ended_ns = Some(400 * MS);
        let requests = [
            ended_in_poll(req(1, 100), 7, 100, 400),
            next,
            req(2, 150),                             // waited, still in flight
            ended_in_poll(req(3, 20), 7, 20, 60),    // an earlier, separate block
            ended_in_poll(req(4, 200), 8, 200, 300), // blocked another worker
        ];
        // The kernel's poll began a little before the coarse clock said.
        let found = covering(&requests, 7, 99 * MS, 401 * MS, LATE).unwrap();
        assert_eq!(found.slot.id, 1);
        assert_eq!(found.to_request().end_ns, Some(400 * MS));
        assert!(covering(&requests, 9, 99 * MS, 401 * MS, LATE).is_none());
        // Victims: in flight at some time during it, not the culprit.
        let victims = in_flight_during(&requests, Some(1), 99 * MS, 401 * MS, TICK);
        assert_eq!(ids(&victims), [2, 4, 5]);
    }

    #[test]
    fn a_poll_still_marked_running_names_a_finished_stall_read_early() {
        let requests = [polled(req(1, 100), 7, 100)];
        assert!(covering(&requests, 7, 99 * MS, 300 * MS, LATE).is_some());
        // A poll that began after the stall ended is not its culprit.
        assert!(covering(&requests, 7, 10 * MS, 50 * MS, LATE).is_none());
    }

    #[test]
    fn a_stall_named_in_progress_keeps_its_culprit_and_victims_after_the_slots_are_reused() {
        let mut names = TableAttribution::new(TICK);
        let during = [polled(req(1, 100), 7, 100), req(2, 110), req(3, 120)];
        let (culprit, victims) = names.attribute(&during, stall(7, 99, 160, true), 20);
        assert_eq!(culprit.map(|r| r.id), Some(1));
        assert_eq!((victims.count, ids(&victims.named)), (2, vec![2, 3]));
        // By the end every slot was taken by later requests: request 9
        // started during the stall and is still in flight.
        let after = [req(9, 200), req(10, 500)];
        let (culprit, victims) = names.attribute(&after, stall(7, 99, 400, false), 20);
        assert_eq!(culprit.map(|r| r.id), Some(1));
        assert_eq!(ids(&victims.named), [2, 3, 9]);
        assert_eq!(victims.count, 3);
        // Remembered once only.
        let (culprit, _) = names.attribute(&after, stall(7, 99, 400, false), 20);
        assert_eq!(culprit, None);
    }

    #[test]
    fn victims_are_counted_in_all_and_named_up_to_the_limit() {
        let mut names = TableAttribution::new(TICK);
        let mut requests: Vec<StepRequest> = (2..40).map(|id| req(id, 100)).collect();
        requests.push(ended_in_poll(req(1, 100), 7, 100, 300));
        let (culprit, victims) = names.attribute(&requests, stall(7, 100, 300, false), 20);
        assert_eq!(culprit.map(|r| r.id), Some(1));
        assert_eq!((victims.count, victims.named.len()), (38, 20));
    }

    #[test]
    fn the_remembered_stalls_are_bounded() {
        let mut names = TableAttribution::new(TICK);
        let requests = [polled(req(1, 100), 7, 100)];
        for start in 0..(REMEMBERED as u64 + 10) {
            names.attribute(&requests, stall(7, start, start + 60, true), 20);
        }
        assert_eq!(names.remembered.len(), REMEMBERED);
    }
}
