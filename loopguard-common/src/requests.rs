//! Requests kept in the kernel (issue #18): in-flight requests live in a
//! map keyed by the task that serves them, routes are counted under a hash
//! of their text (the text crosses to the agent once per route), totals are
//! counted with atomic adds, and a request reaches the agent only when a
//! stall or an alert asks for it.
//!
//! - `request_start` inserts a [`RequestEntry`] into [`names::REQUESTS`]
//!   under [`request_key`], and counts the route in [`names::ROUTES`]; the
//!   first start of a route sends one [`RouteName`] record.
//! - `request_end` removes the entry, copies it with its end into the CPU's
//!   ring of recent ends ([`names::RECENT_ENDS`]), and, when the poll it
//!   ends in has already run a while (a handler finishing inside a slow
//!   poll: the usual culprit), into [`names::ENDED_IN_POLL`] under its task.
//! - Every poll frame remembers [`RequestTotals::ended`] at entry, and a
//!   slow poll's event carries [`RequestTotals::started`] at exit: every
//!   request counted between them was in flight at some point during the
//!   poll, so a stall's victims are counted exactly without a record per
//!   request.

use crate::PATH_BYTES;
use crate::{METHOD_BYTES, ROUTE_BYTES};

/// Map names.
pub mod names {
    /// In-flight requests, keyed by [`super::request_key`].
    pub const REQUESTS: &str = "REQUESTS";
    /// Requests that ended inside a poll that had already run for a while,
    /// keyed by task id: the culprit of that poll if it turns out a stall.
    pub const ENDED_IN_POLL: &str = "ENDED_IN_POLL";
    /// Per-CPU ring of the last [`super::RECENT_ENDS`] requests that ended.
    pub const RECENT_ENDS: &str = "RECENT_ENDS_RING";
    /// Requests started per route, keyed by [`super::RouteName::key`].
    pub const ROUTES: &str = "ROUTES";
    /// One [`super::RequestTotals`].
    pub const REQUEST_TOTALS: &str = "REQUEST_TOTALS";
    /// Per-CPU scratch space for building a request.
    pub const REQUEST_SCRATCH: &str = "REQUEST_SCRATCH";
}

/// In-flight requests tracked at once (an LRU map: a request whose end
/// never comes is evicted before a live one).
pub const MAX_REQUESTS: u32 = 65_536;
/// Routes counted by name; later ones are counted under [`OTHER_ROUTES`].
pub const MAX_ROUTES: u32 = 4_096;
/// Key of the routes counted together once [`MAX_ROUTES`] is reached.
pub const OTHER_ROUTES: u64 = 0;
/// Requests that ended inside a long poll, remembered by task.
pub const MAX_ENDED_IN_POLL: u32 = 4_096;
/// Recent ends kept per CPU (a power of two; the per-CPU value must stay
/// under the kernel's 32 KiB limit).
pub const RECENT_ENDS: usize = 128;

/// Key bit of a request that started outside any poll loopguard saw (or
/// in a task whose id is unknown): keyed by its request id instead.
pub const NO_TASK_KEY: u64 = 1 << 63;

/// The [`names::REQUESTS`] key of a request: its task, or its id when the
/// task is unknown.
#[expect(
    clippy::inline_always,
    reason = "the eBPF programs call it on their hot path and must not call out of line"
)]
#[inline(always)]
pub const fn request_key(task_id: u64, request_id: u64) -> u64 {
    if task_id == 0 {
        request_id | NO_TASK_KEY
    } else {
        task_id & !NO_TASK_KEY
    }
}

/// One request as the kernel keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RequestEntry {
    pub request_id: u64,
    /// The task being polled when it started (0: none seen).
    pub task_id: u64,
    /// ns, `CLOCK_MONOTONIC`.
    pub start_ns: u64,
    /// ns; 0 while in flight.
    pub end_ns: u64,
    /// [`RouteName::key`] of its method and route.
    pub route_key: u64,
    pub tid: u32,
    /// HTTP status, 0 when none (or in flight).
    pub status: u32,
    /// [`crate::frame_flags`] of the poll it started in.
    pub flags: u32,
    /// Length the app passed (may exceed the buffer: truncated).
    pub path_len: u32,
    pub path: [u8; PATH_BYTES],
}

impl RequestEntry {
    pub const fn zeroed() -> Self {
        Self {
            request_id: 0,
            task_id: 0,
            start_ns: 0,
            end_ns: 0,
            route_key: 0,
            tid: 0,
            status: 0,
            flags: 0,
            path_len: 0,
            path: [0; PATH_BYTES],
        }
    }
}

/// The per-CPU ring of recent ends (value of [`names::RECENT_ENDS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecentEnds {
    /// Ends written so far on this CPU; the next goes to `next % RECENT_ENDS`.
    pub next: u64,
    pub entries: [RequestEntry; RECENT_ENDS],
}

/// The text of one route, sent once per route (first start) through the
/// events ring; [`crate::EventKind::RouteName`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RouteName {
    pub kind: u32,
    pub pid: u32,
    /// Hash of the method and route bytes and their lengths.
    pub key: u64,
    pub method_len: u32,
    /// 0: the framework gave no route template.
    pub route_len: u32,
    pub method: [u8; METHOD_BYTES],
    pub route: [u8; ROUTE_BYTES],
}

impl RouteName {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            pid: 0,
            key: 0,
            method_len: 0,
            route_len: 0,
            method: [0; METHOD_BYTES],
            route: [0; ROUTE_BYTES],
        }
    }
}

/// Scratch space for `request_start` (too large for the BPF stack).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RequestScratch {
    pub entry: RequestEntry,
    pub name: RouteName,
}

/// Requests counted per route (value of [`names::ROUTES`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteStats {
    pub started: u64,
}

/// Process-wide request totals (value of [`names::REQUEST_TOTALS`]),
/// counted with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTotals {
    pub started: u64,
    /// Ends that matched a start (the others: `unmatched_ends`).
    pub ended: u64,
    /// Most requests in flight at once (started − ended, read racily).
    pub peak_in_flight: u64,
    /// Ends whose start was not seen (started before attaching, or evicted).
    pub unmatched_ends: u64,
    /// Starts outside any poll loopguard saw: tied to no task.
    pub outside_poll: u64,
    /// Starts that found their task still serving an earlier request whose
    /// end never came: the earlier one is counted ended.
    pub replaced: u64,
    /// Probe hits with a layout this agent does not read (ignored).
    pub layout_mismatches: u64,
    /// The last such layout.
    pub last_bad_layout: u64,
}

/// The route key: FNV-1a over the method and route buffers (zero past their
/// lengths) by 8-byte words, then the lengths. Defined once, so the agent's
/// tests and the kernel agree.
#[inline(always)]
pub fn route_key(method: &[u8; METHOD_BYTES], route: &[u8; ROUTE_BYTES], lens: (u32, u32)) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i + 8 <= METHOD_BYTES {
        hash = (hash ^ word(method, i)).wrapping_mul(PRIME);
        i += 8;
    }
    let mut i = 0;
    while i + 8 <= ROUTE_BYTES {
        hash = (hash ^ word(route, i)).wrapping_mul(PRIME);
        i += 8;
    }
    hash = (hash ^ (u64::from(lens.0) << 32 | u64::from(lens.1))).wrapping_mul(PRIME);
    // Never the key of the routes counted together.
    if hash == OTHER_ROUTES { 1 } else { hash }
}

#[expect(
    clippy::inline_always,
    reason = "the eBPF programs call it on their hot path and must not call out of line"
)]
#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], at: usize) -> u64 {
    let mut value = 0u64;
    let mut k = 0;
    while k < 8 {
        value |= u64::from(bytes[at + k]) << (8 * k);
        k += 1;
    }
    value
}

const _: () = assert!(core::mem::size_of::<RequestEntry>() == 56 + PATH_BYTES);
const _: () = assert!(core::mem::size_of::<RecentEnds>() < 32 * 1024);
const _: () = assert!(RECENT_ENDS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<RouteName>() == 24 + METHOD_BYTES + ROUTE_BYTES);
const _: () = assert!(core::mem::size_of::<RequestTotals>() == 64);
const _: () = assert!(METHOD_BYTES.is_multiple_of(8) && ROUTE_BYTES.is_multiple_of(8));

#[cfg(test)]
mod tests {
    use super::*;

    fn key(method: &str, route: &str) -> u64 {
        let mut m = [0; METHOD_BYTES];
        let mut r = [0; ROUTE_BYTES];
        m[..method.len()].copy_from_slice(method.as_bytes());
        r[..route.len()].copy_from_slice(route.as_bytes());
        route_key(&m, &r, (method.len() as u32, route.len() as u32))
    }

    #[test]
    fn keys_differ_by_method_route_and_length() {
        assert_eq!(key("GET", "/a"), key("GET", "/a"));
        assert_ne!(key("GET", "/a"), key("POST", "/a"));
        assert_ne!(key("GET", "/a"), key("GET", "/b"));
        assert_ne!(key("GET", ""), key("GET", "/"));
        assert_ne!(key("GET", "/a"), OTHER_ROUTES);
    }

    #[test]
    fn requests_without_a_task_have_their_own_keys() {
        assert_eq!(request_key(7, 99), 7);
        assert_eq!(request_key(0, 0x63), 0x63 | NO_TASK_KEY);
        assert_ne!(request_key(0, 7), request_key(7, 1));
    }
}
