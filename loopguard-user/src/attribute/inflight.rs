//! Requests the target was already serving when loopguard attached, read
//! from the middleware's in-flight table (`loopguard_usdt::INFLIGHT_TABLE`):
//! their `request_start` fired before any probe could see it, so the
//! kernel's request maps do not hold them. This names the request behind a
//! poll found stuck at attach.
//!
//! Reading is exact: the table is copied three times, and a slot is kept
//! only when its sequence is even and the same in the first and the third
//! copy. Each copy is a separate system call, so the first copy's reads all
//! come before the second's and the second's before the third's. A writer
//! whose changes overlap the second copy made the sequence odd before that
//! copy ended, so the third copy sees an odd or a newer sequence, unless the
//! first copy already saw it odd or newer; either way the slot is dropped.

use loopguard_common::usdt::{
    INFLIGHT_METHOD_BYTES, INFLIGHT_RESERVED_BYTES, INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS,
    INFLIGHT_TEXT_BYTES, inflight_slot,
};

use crate::attribute::Request;
use crate::discover::ProbeTarget;
use crate::discover::proc::read_memory;

/// Bytes of one table.
pub const TABLE_BYTES: usize = INFLIGHT_RESERVED_BYTES + INFLIGHT_SLOTS * INFLIGHT_SLOT_BYTES;

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
    /// poll. The middleware reads the coarse clock, up to a tick behind:
    /// the tick is added back.
    pub fn poll_began_by(&self) -> Option<u64> {
        (self.polls_tracked && self.poll_started_ns != 0)
            .then(|| self.poll_started_ns + coarse_tick_ns())
    }
}

/// The resolution of `CLOCK_MONOTONIC_COARSE` (one timer tick), how far
/// behind the monotonic clock the middleware's times may be.
pub fn coarse_tick_ns() -> u64 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) } == 0;
    if ok {
        u64::try_from(res.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(res.tv_nsec).unwrap_or(0)
    } else {
        // The longest tick Linux has (HZ=100).
        10_000_000
    }
}

/// The runtime addresses of the target's in-flight tables.
pub fn table_addresses(target: &ProbeTarget) -> Vec<u64> {
    target
        .binary
        .inflight_tables
        .iter()
        .filter_map(|table| {
            let site = target.mappings.runtime_addr(table.site_file_offset)?;
            Some(site.wrapping_add(table.table_minus_site))
        })
        .collect()
}

/// The requests in flight in the tables at `addresses` of process `pid`.
pub fn read(pid: u32, addresses: &[u64]) -> Vec<InflightRequest> {
    addresses
        .iter()
        .flat_map(|&addr| {
            let before = read_memory(pid, addr, TABLE_BYTES);
            let data = read_memory(pid, addr, TABLE_BYTES);
            let after = read_memory(pid, addr, TABLE_BYTES);
            consistent_requests(&before, &data, &after)
        })
        .collect()
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The occupied slots of `data` whose sequence is even and the same in
/// `before` and `after` (three copies of one table, taken in that order).
pub fn consistent_requests(before: &[u8], data: &[u8], after: &[u8]) -> Vec<InflightRequest> {
    (0..INFLIGHT_SLOTS)
        .filter_map(|index| {
            let at = INFLIGHT_RESERVED_BYTES + index * INFLIGHT_SLOT_BYTES;
            let seq = u32_at(before, at + inflight_slot::SEQ)?;
            let unchanged = seq & 1 == 0
                && u32_at(data, at + inflight_slot::SEQ)? == seq
                && u32_at(after, at + inflight_slot::SEQ)? == seq;
            if !unchanged {
                return None;
            }
            parse_slot(data.get(at..at + INFLIGHT_SLOT_BYTES)?)
        })
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
        assert_eq!(requests[0].poll_began_by(), Some(2_000 + coarse_tick_ns()));
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
}
