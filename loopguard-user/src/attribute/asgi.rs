//! Requests of a Python ASGI app, from the `loopguard-asgi` middleware's
//! in-flight table: a shared memfd mapping (`INFLIGHT_MEMFD_*` in
//! `loopguard-usdt`) found from `/proc/PID/maps` by its name, read with
//! `process_vm_readv` like the Rust middleware's table, plus a step record
//! per slot. asyncio runs one step at a time on its loop thread: the
//! culprit of a loop stall is the request whose step ran on that thread
//! while it was blocked, and the victims are the other requests in flight.
//!
//! Input: the target's maps and three copies of each table. Output: the
//! culprit and victims of a loop stall, in progress or finished. Everything
//! read is the target's to forge: sizes, magic and version are checked,
//! texts are cut to their widths, and times only rank candidates.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use loopguard_common::usdt::{
    INFLIGHT_MEMFD_BYTES, INFLIGHT_MEMFD_MAGIC, INFLIGHT_MEMFD_NAME, INFLIGHT_SLOTS,
    INFLIGHT_STEPS_VERSION,
};

pub use crate::attribute::inflight::StepRequest;
use crate::attribute::inflight::{self, SETTLE_ATTEMPTS, SlotCopy, settled_step_slot, u32_at};
use crate::attribute::{Request, take_remembered};
use crate::detect::{Culprit, Stall, StallKind};
use crate::discover::proc::read_memory;

/// How often the maps are read again while no table was found (the app
/// makes it on its first request).
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// The start addresses of the mappings of `maps` (a `/proc/PID/maps` text)
/// that are a loopguard-asgi table, big enough to hold one.
pub fn find_tables(maps: &str) -> Vec<u64> {
    let name = format!("/memfd:{INFLIGHT_MEMFD_NAME}");
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?;
            if path != name || !perms.starts_with('r') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            (end.checked_sub(start)? >= INFLIGHT_MEMFD_BYTES as u64).then_some(start)
        })
        .collect()
}

/// The settled requests of one table, copied three times in that order;
/// nothing unless the header says it is a table of the version this agent
/// reads.
pub fn consistent_steps(before: &[u8], data: &[u8], after: &[u8]) -> Vec<StepRequest> {
    let mut copies = [before, data, after].into_iter().map(<[u8]>::to_vec);
    settle(|| copies.next().unwrap_or_default(), 0).0
}

/// The settled requests of the table `copy` reads (a whole copy a call;
/// short once the process is gone), and whether its first copies read it:
/// `inflight::settle`, with the header checked in every copy.
pub fn settle(copy: impl FnMut() -> Vec<u8>, attempts: usize) -> (Vec<StepRequest>, bool) {
    let judge = |copies: [&[u8]; 3], index: usize| {
        if copies.iter().all(|copy| header_ok(copy)) {
            settled_step_slot(copies, index)
        } else {
            SlotCopy::Free
        }
    };
    let (found, readable) =
        inflight::settle(copy, INFLIGHT_MEMFD_BYTES, INFLIGHT_SLOTS, attempts, judge);
    (
        found.into_iter().map(|(_, request)| request).collect(),
        readable,
    )
}

fn header_ok(data: &[u8]) -> bool {
    u32_at(data, 0) == Some(INFLIGHT_MEMFD_MAGIC)
        && u32_at(data, 4) == Some(INFLIGHT_STEPS_VERSION)
        && data.len() >= INFLIGHT_MEMFD_BYTES
}

/// The culprit of a loop stall in progress on `tid`: the request whose
/// step runs on that thread now (the latest begun, if a forged table
/// names several).
pub fn running_step(requests: &[StepRequest], tid: u32) -> Option<&StepRequest> {
    requests
        .iter()
        .filter(|r| r.slot.polling_tid == tid && tid != 0)
        .max_by_key(|r| r.slot.poll_started_ns)
}

/// The culprit of a finished loop stall on `tid` over `[start_ns, end_ns]`:
/// the request whose last long step on that thread covered most of it; else
/// a step still marked running there that began before the end (the agent
/// read the table before the step's end was written).
pub fn covering_step(
    requests: &[StepRequest],
    tid: u32,
    start_ns: u64,
    end_ns: u64,
) -> Option<&StepRequest> {
    requests
        .iter()
        .map(|r| (r.long_overlap(tid, start_ns, end_ns), r))
        .filter(|(overlap, _)| *overlap > 0)
        .max_by_key(|(overlap, _)| *overlap)
        .map(|(_, r)| r)
        .or_else(|| {
            running_step(requests, tid)
                .filter(|r| r.slot.poll_started_ns != 0 && r.slot.poll_started_ns <= end_ns)
        })
}

/// The other requests in flight at some time during `[start_ns, end_ns]`,
/// oldest first.
pub fn victims(
    requests: &[StepRequest],
    culprit_id: Option<u64>,
    start_ns: u64,
    end_ns: u64,
) -> Vec<Request> {
    let mut found: Vec<&StepRequest> = requests
        .iter()
        .filter(|r| Some(r.slot.id) != culprit_id && r.in_flight_during(start_ns, end_ns))
        .collect();
    found.sort_by_key(|r| (r.slot.started_ns, r.slot.id));
    found.into_iter().map(StepRequest::to_request).collect()
}

/// The tables of one process, looked for until found.
#[derive(Debug)]
pub struct AsgiTables {
    pid: u32,
    addresses: Vec<u64>,
    looked: Option<Instant>,
    /// The last read that could read a table.
    last: Vec<StepRequest>,
    /// Culprits named while their stall was in progress, by `(tid, start)`,
    /// oldest first: the step a finished stall's table read no longer
    /// shows (the request ended, its slot was reused, or the process
    /// exited before the read) is still that request's.
    named_in_progress: VecDeque<((u32, u64), Request)>,
}

/// In-progress culprits remembered (a handful of loop threads stall at once
/// at most; older entries are stalls whose end was lost).
const NAMED_IN_PROGRESS_KEPT: usize = 64;

impl AsgiTables {
    /// Whether the process has a table.
    pub fn found(&self) -> bool {
        !self.addresses.is_empty()
    }

    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            addresses: Vec::new(),
            looked: None,
            last: Vec::new(),
            named_in_progress: VecDeque::new(),
        }
    }

    /// Every settled request of the process's tables (none yet: none).
    pub fn read(&mut self) -> Vec<StepRequest> {
        if self.addresses.is_empty() && self.looked.is_none_or(|at| at.elapsed() >= LOOK_AGAIN) {
            self.looked = Some(Instant::now());
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid));
            self.addresses = maps.map(|maps| find_tables(&maps)).unwrap_or_default();
            if !self.addresses.is_empty() {
                tracing::debug!(pid = self.pid, tables = ?self.addresses, "loopguard-asgi in-flight table found");
            }
        }
        let mut readable = false;
        let mut requests = Vec::new();
        for &addr in &self.addresses {
            let copy = || read_memory(self.pid, addr, INFLIGHT_MEMFD_BYTES);
            let (found, read) = settle(copy, SETTLE_ATTEMPTS);
            readable |= read;
            requests.extend(found);
        }
        crate::attribute::inflight::to_host_tids(self.pid, &mut requests);
        if readable {
            self.last.clone_from(&requests);
            requests
        } else {
            // The process is gone (its last stall is handled as the agent
            // drains): the last read is what is known.
            self.last.clone()
        }
    }
}

/// What the tables say of a loop stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No table (yet): the stall stands, without a request.
    NoTable,
    /// One request's step held the loop: it is named.
    Attributed,
    /// The app keeps a table but no request's step held the loop for the
    /// threshold: the stretch is many short steps (a loop at saturation),
    /// not one block. Not a stall.
    ShortSteps,
}

/// A stall's request and the others in flight during it, as the tables
/// name them (the watch copies them into the stall's context).
#[derive(Debug, Default)]
pub struct Named {
    /// The culprit; set by the caller when another source named it first.
    pub request: Option<Request>,
    /// Other requests in flight during it (at most `listed`).
    pub victims: Vec<Request>,
    /// How many there were in all.
    pub victim_count: usize,
}

/// Names the culprit and victims of loop stall `stall` (in progress or
/// finished) from the tables into `named`, unless it already has a request.
/// A stall counts only when one request's step held the loop for at least
/// `threshold_ns` of it.
pub fn attribute_loop_stall(
    tables: &mut AsgiTables,
    stall: &Stall,
    in_progress: bool,
    named: &mut Named,
    listed: usize,
) -> Verdict {
    if stall.kind != StallKind::Loop || named.request.is_some() {
        return Verdict::NoTable;
    }
    let requests = tables.read();
    if !tables.found() {
        return Verdict::NoTable;
    }
    let end_ns = stall.start_ns + stall.duration_ns;
    let culprit = if in_progress {
        running_step(&requests, stall.tid)
            .filter(|r| r.slot.poll_started_ns.saturating_add(stall.threshold_ns) <= end_ns)
    } else {
        covering_step(&requests, stall.tid, stall.start_ns, end_ns).filter(|r| {
            r.long_overlap(r.long_tid, stall.start_ns, end_ns) >= stall.threshold_ns
                || r.slot.polling_tid == stall.tid
        })
    };
    let key = (stall.tid, stall.start_ns);
    let remembered = take_remembered(&mut tables.named_in_progress, &key);
    let request = match culprit {
        Some(culprit) => culprit.to_request(),
        // Named while it ran, gone from the table by the time its end was
        // read: still that request's stall.
        None => match remembered {
            Some(request) if !in_progress => request,
            _ => return Verdict::ShortSteps,
        },
    };
    if in_progress {
        if tables.named_in_progress.len() >= NAMED_IN_PROGRESS_KEPT {
            tables.named_in_progress.pop_front();
        }
        tables.named_in_progress.push_back((key, request.clone()));
    }
    let mut others = victims(&requests, Some(request.id), stall.start_ns, end_ns);
    named.request = Some(request);
    named.victim_count = others.len();
    others.truncate(listed);
    named.victims = others;
    Verdict::Attributed
}

/// What a busy stretch of `tid` over `[start_ns, end_ns]`, `held_ns` of it
/// on CPU and too short to be a stall, gives the cumulative rule: `None`
/// without a table (the stretch itself is the cut); else [`step_cut`].
pub fn cut_of_stretch(
    tables: &mut AsgiTables,
    tid: u32,
    start_ns: u64,
    end_ns: u64,
    held_ns: u64,
) -> Option<Option<(u64, u64, Culprit)>> {
    let requests = tables.read();
    if !tables.found() {
        return None;
    }
    Some(step_cut(&requests, tid, start_ns, end_ns, held_ns))
}

/// The request step that held the loop in a busy stretch (start, ns held,
/// request), or nothing: a stretch of short steps is no cut. The step's
/// wall time counts all the stretch's preemption against it, so a step
/// that only waited for a CPU (a loaded machine) holds nothing.
pub fn step_cut(
    requests: &[StepRequest],
    tid: u32,
    start_ns: u64,
    end_ns: u64,
    held_ns: u64,
) -> Option<(u64, u64, Culprit)> {
    let step = covering_step(requests, tid, start_ns, end_ns)?;
    let preempted_ns = end_ns.saturating_sub(start_ns).saturating_sub(held_ns);
    let held = step
        .long_overlap(tid, start_ns, end_ns)
        .saturating_sub(preempted_ns)
        .min(held_ns);
    if held == 0 {
        return None;
    }
    let request = step.to_request();
    let culprit = Culprit {
        id: request.id,
        route: request
            .route
            .clone()
            .unwrap_or_else(|| request.path.clone()),
        method: request.method,
        path: request.path,
    };
    Some((step.long_start_ns.max(start_ns), held, culprit))
}

/// The event-loop threads of requests in flight: loop threads even when
/// they are not the main thread (Starlette's `TestClient` runs its loop on
/// another thread).
pub fn loop_threads(tables: &mut AsgiTables) -> Vec<u32> {
    let mut tids: Vec<u32> = tables
        .read()
        .iter()
        .filter(|r| r.ended_ns.is_none() && r.loop_tid != 0)
        .map(|r| r.loop_tid)
        .collect();
    tids.sort_unstable();
    tids.dedup();
    tids
}

#[cfg(test)]
mod tests {
    use loopguard_common::usdt::{
        INFLIGHT_METHOD_BYTES, INFLIGHT_RESERVED_BYTES, INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS,
        INFLIGHT_STEP_BYTES, INFLIGHT_STEPS_AT, INFLIGHT_TEXT_BYTES, inflight_slot,
    };

    use super::*;

    const MS: u64 = 1_000_000;

    #[derive(Clone)]
    struct Filed {
        id: u64,
        seq: u32,
        polling_tid: u32,
        started_ms: u64,
        step_ms: u64,
        long: (u32, u64, u64),
        ended_ms: u64,
        path: &'static str,
    }

    fn filed(id: u64, path: &'static str) -> Filed {
        Filed {
            id,
            seq: 2,
            polling_tid: 0,
            started_ms: 100,
            step_ms: 0,
            long: (0, 0, 0),
            ended_ms: 0,
            path,
        }
    }

    fn table(requests: &[Filed]) -> Vec<u8> {
        let mut bytes = vec![0u8; INFLIGHT_MEMFD_BYTES];
        bytes[0..4].copy_from_slice(&INFLIGHT_MEMFD_MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&INFLIGHT_STEPS_VERSION.to_le_bytes());
        for r in requests {
            let index = (r.id % INFLIGHT_SLOTS as u64) as usize;
            let at = INFLIGHT_RESERVED_BYTES + index * INFLIGHT_SLOT_BYTES;
            let put = |bytes: &mut Vec<u8>, off: usize, value: &[u8]| {
                bytes[off..off + value.len()].copy_from_slice(value);
            };
            put(&mut bytes, at, &r.seq.to_le_bytes());
            put(&mut bytes, at + 4, &r.polling_tid.to_le_bytes());
            put(&mut bytes, at + 8, &r.id.to_le_bytes());
            put(&mut bytes, at + 16, &(r.started_ms * MS).to_le_bytes());
            put(&mut bytes, at + 24, &(r.step_ms * MS).to_le_bytes());
            let flags = inflight_slot::flags::POLLS_TRACKED | inflight_slot::flags::HAS_ROUTE;
            put(&mut bytes, at + 32, &[flags, 3, 8, r.path.len() as u8]);
            let text = at + inflight_slot::TEXT;
            put(&mut bytes, text, b"GET");
            put(&mut bytes, text + INFLIGHT_METHOD_BYTES, b"/x/{tag}");
            put(
                &mut bytes,
                text + INFLIGHT_METHOD_BYTES + INFLIGHT_TEXT_BYTES,
                r.path.as_bytes(),
            );
            let step = INFLIGHT_STEPS_AT + index * INFLIGHT_STEP_BYTES;
            put(&mut bytes, step, &r.long.0.to_le_bytes());
            put(&mut bytes, step + 4, &7u32.to_le_bytes());
            put(&mut bytes, step + 8, &(r.long.1 * MS).to_le_bytes());
            put(&mut bytes, step + 16, &(r.long.2 * MS).to_le_bytes());
            put(&mut bytes, step + 24, &(r.ended_ms * MS).to_le_bytes());
        }
        bytes
    }

    fn read(requests: &[Filed]) -> Vec<StepRequest> {
        let t = table(requests);
        consistent_steps(&t, &t, &t)
    }

    #[test]
    fn the_table_is_found_by_its_mapping_name() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 123 /usr/bin/python3.11
7f0000000000-7f000000e000 rw-s 00000000 00:01 4242 /memfd:loopguard-inflight (deleted)
7f0000100000-7f0000101000 rw-s 00000000 00:01 4243 /memfd:loopguard-inflight (deleted)
7f0000200000-7f000020e000 rw-s 00000000 00:01 4244 /memfd:other (deleted)
7f0000300000-7f000030e000 ---s 00000000 00:01 4245 /memfd:loopguard-inflight (deleted)
";
        // The one-page mapping is too small to be a table; the last is unreadable.
        assert_eq!(find_tables(maps), [0x7f00_0000_0000]);
    }

    #[test]
    fn a_table_with_another_header_is_not_read() {
        let mut t = table(&[filed(1, "/a")]);
        assert_eq!(consistent_steps(&t, &t, &t).len(), 1);
        t[4] = 9;
        assert!(consistent_steps(&t, &t, &t).is_empty());
        let short = &table(&[filed(1, "/a")])[..INFLIGHT_MEMFD_BYTES - 1];
        assert!(consistent_steps(short, short, short).is_empty());
    }

    #[test]
    fn a_slot_being_written_is_dropped() {
        let settled = table(&[filed(1, "/a"), filed(2, "/b")]);
        let mut writing = filed(2, "/b");
        writing.seq = 3;
        let writing = table(&[filed(1, "/a"), writing]);
        let found = consistent_steps(&settled, &writing, &settled);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].slot.path, "/a");
    }

    #[test]
    fn a_slot_being_written_is_copied_again_until_it_settles() {
        // The loop resumes after a stall and runs the waiting request 2:
        // its slot is written during the first copies, settled after.
        let settled = table(&[filed(1, "/a"), filed(2, "/b")]);
        let mut writing = filed(2, "/b");
        writing.seq = 3;
        let writing = table(&[filed(1, "/a"), writing]);
        let mut copies = vec![
            settled.clone(),
            writing.clone(),
            settled.clone(),
            settled.clone(),
        ];
        copies.resize(6, settled.clone());
        let mut copies = copies.into_iter();
        let (found, readable) = settle(|| copies.next().unwrap_or_default(), 8);
        assert!(readable);
        let mut paths: Vec<_> = found.iter().map(|r| r.slot.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/a", "/b"]);
        // A slot never settled is left out after the attempts; the others
        // are read once each.
        let (found, _) = settle(|| writing.clone(), 2);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].slot.path, "/a");
        // A process gone before the copies: nothing, unreadable.
        let (found, readable) = settle(Vec::new, 8);
        assert!(found.is_empty() && !readable);
    }

    #[test]
    fn the_running_step_is_the_culprit_in_progress_not_a_suspended_request() {
        let mut blocking = filed(1, "/x/block");
        blocking.polling_tid = 7;
        blocking.step_ms = 150;
        let suspended = filed(2, "/x/suspended");
        let mut elsewhere = filed(3, "/x/other-loop");
        elsewhere.polling_tid = 8;
        let requests = read(&[blocking, suspended, elsewhere]);
        let culprit = running_step(&requests, 7).unwrap();
        assert_eq!(culprit.slot.path, "/x/block");
        assert_eq!(culprit.to_request().route.as_deref(), Some("/x/{tag}"));
        assert!(running_step(&requests, 9).is_none());
        assert!(running_step(&requests, 0).is_none());
        let victims = victims(&requests, Some(culprit.slot.id), 150 * MS, 400 * MS);
        let paths: Vec<_> = victims.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/x/suspended", "/x/other-loop"]);
    }

    #[test]
    fn a_finished_stall_is_matched_to_the_long_step_that_covered_it() {
        // Request 1 blocked 200..400 ms and has ended; request 2 blocked
        // 500..520 ms; request 3 waited through both.
        let mut first = filed(1, "/x/first");
        first.long = (7, 200, 400);
        first.ended_ms = 401;
        let mut second = filed(2, "/x/second");
        second.long = (7, 500, 520);
        let mut waiting = filed(3, "/x/waiting");
        waiting.started_ms = 150;
        let mut late = filed(4, "/x/late");
        late.started_ms = 450;
        let requests = read(&[first, second, waiting, late]);
        let culprit = covering_step(&requests, 7, 199 * MS, 401 * MS).unwrap();
        assert_eq!(culprit.slot.path, "/x/first");
        assert_eq!(culprit.to_request().end_ns, Some(401 * MS));
        // Another thread's stall is not theirs.
        assert!(covering_step(&requests, 8, 199 * MS, 401 * MS).is_none());
        let named = victims(&requests, Some(culprit.slot.id), 199 * MS, 401 * MS);
        let paths: Vec<_> = named.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/x/second", "/x/waiting"],
            "the late one started after"
        );
        // Ended before the stall: no victim.
        let named = victims(&requests, None, 450 * MS, 460 * MS);
        assert!(named.iter().all(|r| r.path != "/x/first"));
    }

    #[test]
    fn a_step_read_before_its_end_is_written_still_names_its_request() {
        let mut blocking = filed(1, "/x/block");
        blocking.polling_tid = 7;
        blocking.step_ms = 300;
        let requests = read(&[blocking]);
        assert!(covering_step(&requests, 7, 299 * MS, 500 * MS).is_some());
        // A step that began after the stall ended is not its culprit.
        assert!(covering_step(&requests, 7, 100 * MS, 200 * MS).is_none());
    }
    #[test]
    fn a_short_block_is_a_cut_and_a_step_that_waited_for_a_cpu_is_not() {
        let mut blocking = filed(1, "/x/block");
        blocking.long = (7, 110, 130);
        let requests = read(&[blocking]);
        // A 20 ms step in a 25 ms stretch, all on CPU.
        let (start, held, who) = step_cut(&requests, 7, 108 * MS, 133 * MS, 25 * MS).unwrap();
        assert_eq!(
            (start, held, who.route.as_str()),
            (110 * MS, 20 * MS, "/x/{tag}")
        );
        // The same stretch preempted 20 ms: the step held the loop 0 ms.
        assert!(step_cut(&requests, 7, 108 * MS, 133 * MS, 5 * MS).is_none());
        // No long step in the stretch: many short steps are no cut.
        assert!(step_cut(&requests, 7, 200 * MS, 230 * MS, 30 * MS).is_none());
    }
}
