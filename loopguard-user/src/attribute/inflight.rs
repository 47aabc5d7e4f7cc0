//! The middleware's in-flight table (`loopguard_usdt::INFLIGHT_TABLE`),
//! read from the target's memory: the requests it serves, and (layout 2)
//! those that ended since their slot was last taken, with their last long
//! poll. It names the request behind a poll found stuck at attach (its
//! `request_start` fired before any probe could see it), and, in table
//! mode (`--requests table`), every stall's culprit and victims
//! (`attribute::table`).
//!
//! Reading is exact: the table is copied three times, and a slot is kept
//! only when its sequence is even and the same in the first and the third
//! copy. Each copy is a separate system call, so the first copy's reads all
//! come before the second's and the second's before the third's. A writer
//! whose changes overlap the second copy made the sequence odd before that
//! copy ended, so the third copy sees an odd or a newer sequence, unless the
//! first copy already saw it odd or newer; either way the slot is dropped.

use loopguard_common::usdt::{
    INFLIGHT_LONG_AT, INFLIGHT_LONG_ENDS, INFLIGHT_LONG_STEPS_AT, INFLIGHT_METHOD_BYTES,
    INFLIGHT_RESERVED_BYTES, INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS, INFLIGHT_STEP_BYTES,
    INFLIGHT_STEPS_AT, INFLIGHT_TABLE_BYTES, INFLIGHT_TEXT_BYTES, INFLIGHT_VERSION_SLOTS_ONLY,
    inflight_slot, inflight_step,
};

use crate::attribute::Request;
use crate::discover::ProbeTarget;
use crate::discover::proc::read_memory;

/// Bytes of one layout 1 table (slots only).
pub const TABLE_BYTES: usize = INFLIGHT_RESERVED_BYTES + INFLIGHT_SLOTS * INFLIGHT_SLOT_BYTES;

/// One table in the target's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableAt {
    /// Runtime address.
    pub addr: u64,
    /// Layout, from its note.
    pub version: u32,
}

impl TableAt {
    /// Whether it keeps step records (ended requests, last long polls):
    /// what naming requests without probes needs.
    pub fn has_steps(&self) -> bool {
        self.version > INFLIGHT_VERSION_SLOTS_ONLY
    }

    fn bytes(&self) -> usize {
        if self.has_steps() {
            INFLIGHT_TABLE_BYTES
        } else {
            TABLE_BYTES
        }
    }
}

/// One request in flight, as its slot tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InflightRequest {
    pub id: u64,
    /// The thread polling its future now (0: none), or, without
    /// `polls_tracked`, the thread it started on.
    pub polling_tid: u32,
    /// Whether `polling_tid` follows every poll (the tower layer).
    pub polls_tracked: bool,
    /// ns, `CLOCK_MONOTONIC`.
    pub started_ns: u64,
    /// ns, `CLOCK_MONOTONIC`: the current poll of its future began.
    pub poll_started_ns: u64,
    pub method: String,
    pub route: Option<String>,
    pub path: String,
}

impl InflightRequest {
    pub fn to_request(&self) -> Request {
        Request {
            id: self.id,
            method: self.method.clone(),
            route: self.route.clone(),
            path: self.path.clone(),
            task_id: 0,
            start_ns: self.started_ns,
            end_ns: None,
            status: None,
        }
    }

    /// When the poll stuck on `tid` began, at the latest, if this request
    /// tells: only a tracked request's current poll runs inside that task
    /// poll. The middleware reads the coarse clock, which is a tick behind
    /// plus however late that tick's interrupt ran (a VM's ticks can be
    /// milliseconds late): the lateness `table::late_ns` allows is added,
    /// so a duration measured from here stays a lower bound.
    pub fn poll_began_by(&self) -> Option<u64> {
        (self.polls_tracked && self.poll_started_ns != 0)
            .then(|| self.poll_started_ns + super::table::late_ns(coarse_tick_ns()))
    }
}

pub use crate::discover::tick::coarse_tick_ns;

/// The target's in-flight tables.
pub fn table_addresses(target: &ProbeTarget) -> Vec<TableAt> {
    target
        .binary
        .inflight_tables
        .iter()
        .filter_map(|table| {
            let site = target.mappings.runtime_addr(table.site_file_offset)?;
            Some(TableAt {
                addr: site.wrapping_add(table.table_minus_site),
                version: table.version,
            })
        })
        .collect()
}

/// The requests in flight in `tables` of process `pid`.
pub fn read(pid: u32, tables: &[TableAt]) -> Vec<InflightRequest> {
    read_steps(pid, tables)
        .into_iter()
        .filter(|r| r.ended_ns.is_none())
        .map(|r| r.slot)
        .collect()
}

/// Every settled request of `tables` of process `pid`, in flight or (layout
/// 2) ended and still in its slot.
pub fn read_steps(pid: u32, tables: &[TableAt]) -> Vec<StepRequest> {
    let mut requests: Vec<StepRequest> = tables
        .iter()
        .flat_map(|table| {
            let copy = || read_memory(pid, table.addr, table.bytes());
            if table.has_steps() {
                read_with_long_ends(copy, SETTLE_ATTEMPTS)
            } else {
                settle(
                    copy,
                    TABLE_BYTES,
                    INFLIGHT_SLOTS,
                    SETTLE_ATTEMPTS,
                    settled_slot_only,
                )
                .0
                .into_iter()
                .map(|(_, request)| request)
                .collect()
            }
        })
        .collect();
    to_host_tids(pid, &mut requests);
    requests
}

/// How many more times a table is copied while some of its slots were
/// being written during the copies.
pub const SETTLE_ATTEMPTS: usize = 8;

/// The settled entries of a table that `copy` reads (a whole copy a call;
/// short once the process is gone), with their indexes, and whether its
/// first copies were `len` bytes long. Three copies are taken and `judge`
/// tells each of `count` entries from them; the entries a writer was in
/// are judged again on three more, up to `attempts` times, until each
/// settles. A thread writes a slot for microseconds at a time, but when a
/// stall ends the requests that waited through it run at once: the read
/// for the stall's end often meets one of them being written, and that
/// request is still a victim of the stall. Both middlewares' tables are
/// read through here.
pub fn settle(
    mut copy: impl FnMut() -> Vec<u8>,
    len: usize,
    count: usize,
    attempts: usize,
    judge: impl Fn([&[u8]; 3], usize) -> SlotCopy,
) -> (Vec<(usize, StepRequest)>, bool) {
    let (mut before, mut data, mut after) = (copy(), copy(), copy());
    let readable = data.len() >= len;
    let mut requests = Vec::new();
    let mut pending: Vec<usize> = (0..count).collect();
    for attempt in 0..=attempts {
        if attempt > 0 {
            std::thread::yield_now();
            (before, data, after) = (copy(), copy(), copy());
        }
        if [&before, &data, &after].iter().any(|c| c.len() < len) {
            break;
        }
        pending.retain(|&index| match judge([&before, &data, &after], index) {
            SlotCopy::Held(request) => {
                requests.push((index, request));
                false
            }
            SlotCopy::Free => false,
            SlotCopy::Written => true,
        });
        if pending.is_empty() {
            break;
        }
    }
    requests.sort_by_key(|&(index, _)| index);
    (requests, readable)
}

/// A static table of layout 2, read until its entries settle: its slots,
/// then the copies in its ring of long ends that the slots no longer hold
/// (a request is listed once).
fn read_with_long_ends(copy: impl FnMut() -> Vec<u8>, attempts: usize) -> Vec<StepRequest> {
    let judge = |copies: [&[u8]; 3], index: usize| {
        if index < INFLIGHT_SLOTS {
            settled_entry(copies, (INFLIGHT_RESERVED_BYTES, INFLIGHT_STEPS_AT), index)
        } else {
            settled_entry(
                copies,
                (INFLIGHT_LONG_AT, INFLIGHT_LONG_STEPS_AT),
                index - INFLIGHT_SLOTS,
            )
        }
    };
    let (entries, _) = settle(
        copy,
        INFLIGHT_TABLE_BYTES,
        INFLIGHT_SLOTS + INFLIGHT_LONG_ENDS,
        attempts,
        judge,
    );
    let mut requests: Vec<StepRequest> = Vec::new();
    for (index, request) in entries {
        if index < INFLIGHT_SLOTS || requests.iter().all(|r| r.slot.id != request.slot.id) {
            requests.push(request);
        }
    }
    requests
}

/// Slot `index` of a layout 1 table (slots only), in three copies.
fn settled_slot_only(copies: [&[u8]; 3], index: usize) -> SlotCopy {
    let at = INFLIGHT_RESERVED_BYTES + index * INFLIGHT_SLOT_BYTES;
    if !settled_at(copies, at) {
        return SlotCopy::Written;
    }
    match copies[1].get(at..at + INFLIGHT_SLOT_BYTES).map(parse_slot) {
        Some(Some(slot)) => SlotCopy::Held(StepRequest::without_steps(slot)),
        Some(None) => SlotCopy::Free,
        None => SlotCopy::Written,
    }
}

/// Puts our pid namespace's thread ids in place of the target's own in
/// `requests` when it runs in another one (a container): the table holds
/// what `gettid` told the app, the kernel programs see ours. A thread
/// that is gone becomes 0 (none).
pub fn to_host_tids(pid: u32, requests: &mut [StepRequest]) {
    if requests.is_empty() {
        return;
    }
    let Some(tids) = crate::discover::proc::namespace_tids(pid) else {
        return;
    };
    let host = |tid: &mut u32| {
        if *tid != 0 {
            *tid = tids.get(tid).copied().unwrap_or(0);
        }
    };
    for request in requests {
        host(&mut request.slot.polling_tid);
        host(&mut request.loop_tid);
        host(&mut request.long_tid);
    }
}

/// A static table of layout 2, copied three times in that order: its
/// settled slots, then the ring's long ends they no longer hold.
pub fn with_long_ends(before: &[u8], data: &[u8], after: &[u8]) -> Vec<StepRequest> {
    let mut copies = [before, data, after].into_iter().map(<[u8]>::to_vec);
    read_with_long_ends(|| copies.next().unwrap_or_default(), 0)
}

/// Slot `index` of a table with step records (`INFLIGHT_MEMFD_BYTES`
/// long, its header not looked at), copied three times in that order.
pub fn settled_step_slot(copies: [&[u8]; 3], index: usize) -> SlotCopy {
    if index >= INFLIGHT_SLOTS
        || copies
            .iter()
            .any(|copy| copy.len() < INFLIGHT_STEPS_AT + INFLIGHT_SLOTS * INFLIGHT_STEP_BYTES)
    {
        return SlotCopy::Written;
    }
    settled_entry(copies, (INFLIGHT_RESERVED_BYTES, INFLIGHT_STEPS_AT), index)
}

/// One slot as three copies of it tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotCopy {
    /// A writer was in it while it was copied (or a copy is short).
    Written,
    /// Settled, and no request holds it.
    Free,
    /// Settled, holding this request.
    Held(StepRequest),
}

/// Entry `index` of the slots at `slots_at` with their step records at
/// `steps_at`, in three copies of one table.
fn settled_entry(
    [before, data, after]: [&[u8]; 3],
    (slots_at, steps_at): (usize, usize),
    index: usize,
) -> SlotCopy {
    let at = slots_at + index * INFLIGHT_SLOT_BYTES;
    if !settled_at([before, data, after], at) {
        return SlotCopy::Written;
    }
    let Some(bytes) = data.get(at..at + INFLIGHT_SLOT_BYTES) else {
        return SlotCopy::Written;
    };
    let Some(slot) = parse_slot(bytes) else {
        return SlotCopy::Free;
    };
    let request = (|| {
        let step = data.get(steps_at + index * INFLIGHT_STEP_BYTES..)?;
        let ended_ns = u64_at(step, inflight_step::ENDED_NS)?;
        Some(StepRequest {
            slot,
            loop_tid: u32_at(step, inflight_step::LOOP_TID)?,
            long_tid: u32_at(step, inflight_step::LONG_TID)?,
            long_start_ns: u64_at(step, inflight_step::LONG_START_NS)?,
            long_end_ns: u64_at(step, inflight_step::LONG_END_NS)?,
            ended_ns: (ended_ns != 0).then_some(ended_ns),
        })
    })();
    request.map_or(SlotCopy::Written, SlotCopy::Held)
}

/// Whether the slot at `at` has the same even sequence in three copies
/// taken in that order: no writer touched it while it was copied.
fn settled_at([before, data, after]: [&[u8]; 3], at: usize) -> bool {
    let seq = |copy: &[u8]| u32_at(copy, at + inflight_slot::SEQ);
    match seq(before) {
        Some(first) => first & 1 == 0 && seq(data) == Some(first) && seq(after) == Some(first),
        None => false,
    }
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The occupied slots of `data` whose sequence is even and the same in
/// `before` and `after` (three copies of a layout 1 table, taken in that
/// order).
pub fn consistent_requests(before: &[u8], data: &[u8], after: &[u8]) -> Vec<InflightRequest> {
    let mut copies = [before, data, after].into_iter().map(<[u8]>::to_vec);
    let copy = || copies.next().unwrap_or_default();
    settle(copy, TABLE_BYTES, INFLIGHT_SLOTS, 0, settled_slot_only)
        .0
        .into_iter()
        .map(|(_, request)| request.slot)
        .collect()
}

pub(crate) fn parse_slot(slot: &[u8]) -> Option<InflightRequest> {
    use inflight_slot::flags;
    let id = u64_at(slot, inflight_slot::ID)?;
    if id == 0 {
        return None;
    }
    let flags_byte = slot[inflight_slot::FLAGS];
    let text = |at: usize, width: usize, len_at: usize| {
        let len = usize::from(slot[len_at]).min(width);
        let start = inflight_slot::TEXT + at;
        String::from_utf8_lossy(&slot[start..start + len]).into_owned()
    };
    let method = text(0, INFLIGHT_METHOD_BYTES, inflight_slot::METHOD_LEN);
    let route = text(
        INFLIGHT_METHOD_BYTES,
        INFLIGHT_TEXT_BYTES,
        inflight_slot::ROUTE_LEN,
    );
    let path = text(
        INFLIGHT_METHOD_BYTES + INFLIGHT_TEXT_BYTES,
        INFLIGHT_TEXT_BYTES,
        inflight_slot::PATH_LEN,
    );
    Some(InflightRequest {
        id,
        polling_tid: u32_at(slot, inflight_slot::POLLING_TID)?,
        polls_tracked: flags_byte & flags::POLLS_TRACKED != 0,
        started_ns: u64_at(slot, inflight_slot::STARTED_NS)?,
        poll_started_ns: u64_at(slot, inflight_slot::POLL_STARTED_NS)?,
        method,
        route: (flags_byte & flags::HAS_ROUTE != 0).then_some(route),
        path,
    })
}

/// One request of a table, with its step record (a layout 1 table has
/// none: its step fields are zero, `loop_tid` the thread it started on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRequest {
    pub slot: InflightRequest,
    /// The event-loop thread it started on.
    pub loop_tid: u32,
    /// Its last step of 1 ms or more (Rust: poll of its future over a
    /// clock tick): thread, start, end (ns, monotonic).
    pub long_tid: u32,
    pub long_start_ns: u64,
    pub long_end_ns: u64,
    /// ns, monotonic; `None` while in flight.
    pub ended_ns: Option<u64>,
}

impl StepRequest {
    /// A request of a layout 1 table (in flight, no step record).
    pub fn without_steps(slot: InflightRequest) -> Self {
        Self {
            loop_tid: slot.polling_tid,
            slot,
            long_tid: 0,
            long_start_ns: 0,
            long_end_ns: 0,
            ended_ns: None,
        }
    }

    pub fn to_request(&self) -> Request {
        Request {
            end_ns: self.ended_ns,
            ..self.slot.to_request()
        }
    }

    /// ns of its last long step on `tid` inside `[from_ns, to_ns]`.
    pub fn long_overlap(&self, tid: u32, from_ns: u64, to_ns: u64) -> u64 {
        if self.long_tid != tid || self.long_start_ns == 0 {
            return 0;
        }
        self.long_end_ns
            .min(to_ns)
            .saturating_sub(self.long_start_ns.max(from_ns))
    }

    /// Whether it was in flight at some time in `[from_ns, to_ns]`.
    pub fn in_flight_during(&self, from_ns: u64, to_ns: u64) -> bool {
        self.slot.started_ns <= to_ns && self.ended_ns.is_none_or(|end| end >= from_ns)
    }
}

/// The request a poll stuck on thread `tid` serves: the tracked request
/// whose future that thread polls now; else, among requests that only say
/// which thread they started on, the latest started there (a handler
/// blocking in its first poll, the usual case).
pub fn running_on(requests: &[InflightRequest], tid: u32) -> Option<&InflightRequest> {
    let on_thread = || requests.iter().filter(move |r| r.polling_tid == tid);
    on_thread()
        .filter(|r| r.polls_tracked)
        .max_by_key(|r| r.poll_started_ns)
        .or_else(|| on_thread().max_by_key(|r| r.started_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Slot {
        seq: u32,
        tid: u32,
        id: u64,
        started: u64,
        poll_started: u64,
        flags: u8,
        method: &'static str,
        route: &'static str,
        path: &'static str,
    }

    fn table(slots: &[(usize, Slot)]) -> Vec<u8> {
        let mut bytes = vec![0u8; TABLE_BYTES];
        for (index, slot) in slots {
            let at = INFLIGHT_RESERVED_BYTES + index * INFLIGHT_SLOT_BYTES;
            let put = |bytes: &mut Vec<u8>, off: usize, value: &[u8]| {
                bytes[at + off..at + off + value.len()].copy_from_slice(value);
            };
            put(&mut bytes, inflight_slot::SEQ, &slot.seq.to_le_bytes());
            put(
                &mut bytes,
                inflight_slot::POLLING_TID,
                &slot.tid.to_le_bytes(),
            );
            put(&mut bytes, inflight_slot::ID, &slot.id.to_le_bytes());
            put(
                &mut bytes,
                inflight_slot::STARTED_NS,
                &slot.started.to_le_bytes(),
            );
            put(
                &mut bytes,
                inflight_slot::POLL_STARTED_NS,
                &slot.poll_started.to_le_bytes(),
            );
            let lens = [
                slot.flags,
                slot.method.len() as u8,
                slot.route.len() as u8,
                slot.path.len() as u8,
            ];
            put(&mut bytes, inflight_slot::FLAGS, &lens);
            put(&mut bytes, inflight_slot::TEXT, slot.method.as_bytes());
            put(
                &mut bytes,
                inflight_slot::TEXT + INFLIGHT_METHOD_BYTES,
                slot.route.as_bytes(),
            );
            put(
                &mut bytes,
                inflight_slot::TEXT + INFLIGHT_METHOD_BYTES + INFLIGHT_TEXT_BYTES,
                slot.path.as_bytes(),
            );
        }
        bytes
    }

    fn login(seq: u32, tid: u32) -> Slot {
        Slot {
            seq,
            tid,
            id: 8812,
            started: 1_000,
            poll_started: 2_000,
            flags: inflight_slot::flags::HAS_ROUTE | inflight_slot::flags::POLLS_TRACKED,
            method: "POST",
            route: "/login",
            path: "/login",
        }
    }

    #[test]
    fn a_settled_slot_is_read_whole() {
        let t = table(&[(8812 % INFLIGHT_SLOTS, login(4, 77))]);
        let requests = consistent_requests(&t, &t, &t);
        assert_eq!(
            requests,
            [InflightRequest {
                id: 8812,
                polling_tid: 77,
                polls_tracked: true,
                started_ns: 1_000,
                poll_started_ns: 2_000,
                method: "POST".into(),
                route: Some("/login".into()),
                path: "/login".into(),
            }]
        );
        assert_eq!(
            requests[0].poll_began_by(),
            Some(2_000 + crate::attribute::table::late_ns(coarse_tick_ns()))
        );
    }

    #[test]
    fn a_slot_written_during_the_copy_is_dropped() {
        let settled = table(&[(3, login(4, 77))]);
        let writing = table(&[(3, login(5, 77))]);
        let rewritten = table(&[(3, login(6, 78))]);
        // Odd in the copy: a writer was in it.
        assert!(consistent_requests(&settled, &writing, &rewritten).is_empty());
        // Even everywhere, but a newer sequence after: the copy may mix both.
        assert!(consistent_requests(&settled, &settled, &rewritten).is_empty());
        // Odd before.
        assert!(consistent_requests(&writing, &writing, &writing).is_empty());
        // A free slot is no request.
        let free = table(&[]);
        assert!(consistent_requests(&free, &free, &free).is_empty());
        // A short read (the process went away) gives nothing.
        assert!(consistent_requests(&settled[..100], &settled, &settled).is_empty());
    }

    #[test]
    fn the_request_polled_on_the_stuck_thread_is_chosen() {
        let mut waiting = login(2, 0);
        waiting.id = 1;
        let mut guarded = login(2, 77);
        guarded.id = 2;
        guarded.flags = 0;
        guarded.started = 9_000;
        let t = table(&[(1, waiting), (2, guarded), (3, login(2, 77))]);
        let requests = consistent_requests(&t, &t, &t);
        assert_eq!(running_on(&requests, 77).map(|r| r.id), Some(8812));
        assert_eq!(running_on(&requests, 78), None);
        // Without tracked requests, the latest started on that thread.
        let untracked: Vec<_> = requests
            .iter()
            .filter(|r| !r.polls_tracked)
            .cloned()
            .collect();
        let chosen = running_on(&untracked, 77).unwrap();
        assert_eq!(chosen.id, 2);
        assert_eq!(chosen.poll_began_by(), None);
        assert_eq!(chosen.route, None);
    }

    /// A layout 2 table: `slots` at their index, `ring` entries in the ring
    /// of long ends, each with an end time and a long poll.
    fn table_v2(slots: &[(usize, Slot)], ring: &[(usize, Slot)]) -> Vec<u8> {
        let mut bytes = table(slots);
        bytes.resize(INFLIGHT_TABLE_BYTES, 0);
        let v1 = table(ring);
        for (index, slot) in ring {
            let from = INFLIGHT_RESERVED_BYTES + index * INFLIGHT_SLOT_BYTES;
            let to = INFLIGHT_LONG_AT + index * INFLIGHT_SLOT_BYTES;
            bytes[to..to + INFLIGHT_SLOT_BYTES]
                .copy_from_slice(&v1[from..from + INFLIGHT_SLOT_BYTES]);
            let step = INFLIGHT_LONG_STEPS_AT + index * INFLIGHT_STEP_BYTES;
            bytes[step..step + 4].copy_from_slice(&slot.tid.to_le_bytes());
            bytes[step + inflight_step::LONG_START_NS..][..8]
                .copy_from_slice(&5_000u64.to_le_bytes());
            bytes[step + inflight_step::LONG_END_NS..][..8]
                .copy_from_slice(&9_000u64.to_le_bytes());
            bytes[step + inflight_step::ENDED_NS..][..8].copy_from_slice(&9_000u64.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn the_ring_of_long_ends_adds_requests_the_slots_no_longer_hold() {
        let mut gone = login(2, 77);
        gone.id = 41;
        let mut also_in_slots = login(2, 0);
        also_in_slots.id = 8812;
        let t = table_v2(&[(3, login(2, 0))], &[(0, gone), (1, also_in_slots)]);
        let requests = with_long_ends(&t, &t, &t);
        let ids: Vec<u64> = requests.iter().map(|r| r.slot.id).collect();
        assert_eq!(ids, [8812, 41], "listed once each, the slots first");
        let kept = &requests[1];
        assert_eq!(
            (kept.long_tid, kept.long_start_ns, kept.ended_ns),
            (77, 5_000, Some(9_000))
        );
        // A ring entry being written is left out.
        let mut writing = login(3, 77);
        writing.id = 41;
        let torn = table_v2(&[(3, login(2, 0))], &[(0, writing)]);
        assert_eq!(with_long_ends(&t, &torn, &t).len(), 1);
        // A read cut short (the process going away) is not trusted.
        assert!(
            with_long_ends(
                &t[..INFLIGHT_LONG_AT],
                &t[..INFLIGHT_LONG_AT],
                &t[..INFLIGHT_LONG_AT]
            )
            .is_empty()
        );
    }

    #[test]
    fn a_slot_caught_mid_write_is_copied_again_until_it_settles() {
        // The stall ends and the worker runs the request that waited: its
        // slot is written during the first copies, settled after. Same
        // reading as loopguard-asgi's table (`settle`).
        let mut other = login(2, 0);
        other.id = 5;
        let settled = table_v2(&[(3, login(2, 0)), (4, other.clone())], &[]);
        let writing = table_v2(&[(3, login(3, 0)), (4, other)], &[]);
        let mut copies = [&settled, &writing, &settled, &settled, &settled, &settled]
            .into_iter()
            .cloned();
        let requests = read_with_long_ends(|| copies.next().unwrap_or_default(), 8);
        let ids: Vec<u64> = requests.iter().map(|r| r.slot.id).collect();
        assert_eq!(ids, [8812, 5], "both, the slots in their order");
        // Never settled: left out once the attempts are spent.
        let mut copies = std::iter::repeat_n(writing.clone(), 9);
        let requests = read_with_long_ends(|| copies.next().unwrap_or_default(), 2);
        assert_eq!(requests.len(), 1, "{requests:?}");
    }
}
