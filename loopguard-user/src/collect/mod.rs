//! Collect: reads what the kernel side produced. Drains the ring buffer into
//! [`PollEvent`]s, snapshots every thread's in-flight poll stack and wait
//! state from the mapped thread slots ([`slots`]), and sums the per-CPU
//! counters and histogram.

pub mod lost;
pub mod slots;
pub mod totals;

use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use loopguard_common::hist::PollHistogram;
use loopguard_common::requests::{
    self, RecentEnds, RequestEntry, RequestTotals, RouteName, RouteStats,
};
use loopguard_common::task_filter;
use loopguard_common::{
    COUNTER_SLOTS, EventKind, LoopEvent, LoopState, NudgeEvent, PollEvent, ThreadPolls, names,
};
use std::cell::Cell;

use tokio::io::unix::AsyncFd;

use self::slots::{MappedArray, SlotMapError, SlotValue};
use crate::collect::totals::{Counters, Histogram};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("the eBPF object lacks map `{0}`; rebuild loopguard (`cargo xtask build`)")]
    MissingMap(&'static str),
    #[error("failed to open map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to wait on the ring buffer")]
    Poll(#[source] std::io::Error),
    #[error(transparent)]
    Slots(#[from] SlotMapError),
}

/// Handles on the maps the agent reads.
pub struct Collector {
    ring: AsyncFd<RingBuf<MapData>>,
    slot_owners: MappedArray<u32>,
    thread_polls: MappedArray<ThreadPolls>,
    thread_loops: MappedArray<LoopState>,
    /// Slots skipped by a snapshot because their thread was writing them on
    /// every attempt (read again at the next scan).
    pub busy_slots: Cell<u64>,
    counters: PerCpuArray<MapData, u64>,
    histogram: PerCpuArray<MapData, PollHistogram>,
    /// Taken by the watch when the request probes are attached.
    pub requests: Option<RequestMaps>,
    /// Records that did not decode (wrong size or unknown kind).
    pub malformed: u64,
    /// Threads asleep in a wait at attach (`names::UNSEEN_WAITS`).
    unseen_waits: BpfHashMap<MapData, u32, u8>,
    /// Their count per bucket of tids (`names::UNSEEN_FILTER`).
    unseen_filter: Array<MapData, u64>,
    /// Per CPU, its last local timer interrupt (`names::CPU_TIMER_MAP`).
    cpu_timer: PerCpuArray<MapData, u64>,
}

/// The maps that hold requests in the kernel (`loopguard_common::requests`).
pub struct RequestMaps {
    in_flight: BpfHashMap<MapData, u64, RequestEntry>,
    ended_in_poll: BpfHashMap<MapData, u64, RequestEntry>,
    recent_ends: PerCpuArray<MapData, RecentEnds>,
    routes: BpfHashMap<MapData, u64, RouteStats>,
    totals: Array<MapData, RequestTotals>,
    /// The recent ends as last read: one read serves every culprit and
    /// victim asked about until [`Self::forget_recent_ends`] (every CPU's
    /// ring, 23 KiB each, is too much to read per slow poll).
    recent: std::cell::RefCell<Option<Vec<RequestEntry>>>,
}

/// In-flight requests read to name a stall's victims, at most.
const IN_FLIGHT_READ: usize = 4096;

impl RequestMaps {
    fn new(ebpf: &mut Ebpf) -> Result<Self, CollectError> {
        Ok(Self {
            in_flight: take(ebpf, requests::names::REQUESTS)?,
            ended_in_poll: take(ebpf, requests::names::ENDED_IN_POLL)?,
            recent_ends: take(ebpf, requests::names::RECENT_ENDS)?,
            routes: take(ebpf, requests::names::ROUTES)?,
            totals: take(ebpf, requests::names::REQUEST_TOTALS)?,
            recent: std::cell::RefCell::new(None),
        })
    }

    pub fn totals(&self) -> RequestTotals {
        self.totals.get(&0, 0).unwrap_or_default()
    }

    /// The request filed under task `task_id` (in flight).
    pub fn serving(&self, task_id: u64) -> Option<RequestEntry> {
        self.in_flight
            .get(&requests::request_key(task_id, 0), 0)
            .ok()
    }

    /// The request of task `task_id` that last ended inside a long poll.
    pub fn ended_in_poll(&self, task_id: u64) -> Option<RequestEntry> {
        self.ended_in_poll.get(&task_id, 0).ok()
    }

    /// Every CPU's recent ends, in no order: read once, then kept until
    /// [`Self::forget_recent_ends`].
    pub fn recent_ends(&self) -> std::cell::Ref<'_, [RequestEntry]> {
        if self.recent.borrow().is_none() {
            let ends = self.recent_ends.get(&0, 0).map_or_else(
                |_| Vec::new(),
                |per_cpu| {
                    per_cpu
                        .iter()
                        .flat_map(|ring| {
                            let written = usize::try_from(ring.next).unwrap_or(usize::MAX);
                            ring.entries[..written.min(ring.entries.len())].to_vec()
                        })
                        .collect()
                },
            );
            *self.recent.borrow_mut() = Some(ends);
        }
        std::cell::Ref::map(self.recent.borrow(), |ends| {
            ends.as_deref().unwrap_or_default()
        })
    }

    /// Ends may have come since the last read: the next ask reads again.
    /// Called before each batch of events and each scan, so every event
    /// (produced before its batch was drained) sees the ends before it.
    pub fn forget_recent_ends(&self) {
        *self.recent.borrow_mut() = None;
    }

    /// Requests in flight now (at most [`IN_FLIGHT_READ`]).
    pub fn in_flight(&self) -> Vec<RequestEntry> {
        self.in_flight
            .iter()
            .filter_map(Result::ok)
            .take(IN_FLIGHT_READ)
            .map(|(_, entry)| entry)
            .collect()
    }

    /// Requests started per route key.
    pub fn route_counts(&self) -> Vec<(u64, u64)> {
        self.routes
            .iter()
            .filter_map(Result::ok)
            .map(|(key, stats)| (key, stats.started))
            .collect()
    }
}

/// Maps a thread slot array of `ebpf` into the agent.
fn map<T: Copy>(ebpf: &mut Ebpf, name: &'static str) -> Result<MappedArray<T>, CollectError> {
    let map = ebpf.take_map(name).ok_or(CollectError::MissingMap(name))?;
    Ok(MappedArray::new(map, name)?)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CollectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CollectError::MissingMap(name))?;
    T::try_from(map).map_err(|source| CollectError::Map { name, source })
}

impl Collector {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, CollectError> {
        let ring: RingBuf<MapData> = take(ebpf, names::EVENTS)?;
        Ok(Self {
            // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd,
            // so the fd stays open for as long as it is registered.
            ring: unsafe { AsyncFd::register(ring) }
                .map_err(|error| CollectError::Poll(error.into()))?,
            slot_owners: map(ebpf, loopguard_common::slots::names::SLOT_OWNERS)?,
            thread_polls: map(ebpf, names::THREAD_POLLS)?,
            thread_loops: map(ebpf, names::THREAD_LOOPS)?,
            busy_slots: Cell::new(0),
            counters: take(ebpf, names::COUNTERS)?,
            histogram: take(ebpf, names::POLL_HISTOGRAM)?,
            requests: Some(RequestMaps::new(ebpf)?),
            malformed: 0,
            unseen_waits: take(ebpf, names::UNSEEN_WAITS)?,
            unseen_filter: take(ebpf, names::UNSEEN_FILTER)?,
            cpu_timer: take(ebpf, names::CPU_TIMER_MAP)?,
        })
    }

    /// Tells the kernel that threads `tids` were asleep in a wait when
    /// loopguard attached, so their first wakeup starts a busy stretch
    /// though that wait's return probe never fires. Returns how many were
    /// filed (a full map leaves the rest out: their first stretch is missed).
    /// Each tid's filter bucket is counted up before the tid is filed, so
    /// the kernel never misses one (a tid that is not filed after all only
    /// costs its bucket's switches a lookup). Called once per watch: the
    /// kernel only counts a bucket down after removing a tid filed here, so
    /// these plain writes race with nothing.
    pub fn mark_unseen_waits(&mut self, tids: &[u32]) -> usize {
        let mut added = std::collections::BTreeMap::<u32, u64>::new();
        for &tid in tids {
            *added
                .entry(task_filter::bucket_of(u64::from(tid)))
                .or_default() += 1;
        }
        for (bucket, n) in added {
            let count = self.unseen_filter.get(&bucket, 0).unwrap_or(0);
            if let Err(error) = self.unseen_filter.set(bucket, count + n, 0) {
                tracing::warn!(%error, "threads asleep at attach are not filed");
                return 0;
            }
        }
        tids.iter()
            .filter(|tid| self.unseen_waits.insert(**tid, 0, 0).is_ok())
            .count()
    }

    /// Waits until the ring buffer has data.
    pub async fn readable(&self) -> Result<(), CollectError> {
        let mut guard = self.ring.readable().await.map_err(CollectError::Poll)?;
        guard.clear_ready();
        Ok(())
    }

    /// Moves every queued event into `out`.
    pub fn drain(&mut self, out: &mut Vec<RawEvent>) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(event) => out.push(event),
                None => self.malformed += 1,
            }
        }
    }

    /// Every thread's in-flight polls, as the kernel has them now: each
    /// stack whole, never half-written (no system call).
    pub fn snapshot(&self) -> Vec<(u32, ThreadPolls)> {
        self.read_slots(&self.thread_polls)
    }

    /// Every event-loop thread's wait state, as the kernel has it now, each
    /// whole.
    pub fn loop_snapshot(&self) -> Vec<(u32, LoopState)> {
        self.read_slots(&self.thread_loops)
    }

    fn read_slots<T: SlotValue>(&self, values: &MappedArray<T>) -> Vec<(u32, T)> {
        let snapshot = slots::snapshot(self.slot_owners.words(), values);
        self.busy_slots
            .set(self.busy_slots.get() + snapshot.skipped);
        snapshot.threads
    }

    /// ns of each CPU's last local timer interrupt, by CPU number (0: none
    /// seen, or not watched): one lookup.
    pub fn timer_interrupts(&self) -> Vec<u64> {
        self.cpu_timer
            .get(&0, 0)
            .map_or_else(|_| Vec::new(), |per_cpu| per_cpu.iter().copied().collect())
    }

    pub fn counters(&self) -> Counters {
        let mut counters = Counters::default();
        sum_per_cpu(&self.counters, &mut counters.0[..COUNTER_SLOTS as usize]);
        counters
    }

    /// The poll-duration histogram summed over CPUs: one lookup.
    pub fn histogram(&self) -> Histogram {
        let mut histogram = Histogram::default();
        if let Ok(per_cpu) = self.histogram.get(&0, 0) {
            for cpu in per_cpu.iter() {
                for (total, count) in histogram.0.iter_mut().zip(cpu.slots) {
                    *total += count;
                }
                histogram.1 += cpu.sum_ns;
            }
        }
        histogram
    }
}

/// Fills `totals[i]` with slot `i` of a per-CPU array, summed over CPUs (0
/// for a slot that cannot be read).
fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, totals: &mut [u64]) {
    for (slot, total) in totals.iter_mut().enumerate() {
        *total = array
            .get(&(slot as u32), 0)
            .map_or(0, |values| values.iter().sum());
    }
}

/// A decoded ring buffer record.
#[derive(Clone, Debug)]
pub enum RawEvent {
    PollEnd(PollEvent),
    /// An event-loop thread came back to wait after a long busy stretch.
    LoopBusy(LoopEvent),
    /// The first start of a route: its key's method and template.
    RouteName {
        key: u64,
        method: String,
        route: Option<String>,
    },
    /// A poll or stretch may be stuck ([`loopguard_common::NudgeEvent`]).
    Nudge {
        tid: u32,
        start_ns: u64,
    },
}

/// Reads a `T` from the front of `bytes`, if it is long enough.
fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    // SAFETY: the length is checked, the records are plain integers and
    // byte arrays, and read_unaligned copes with any alignment.
    (bytes.len() >= size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// The text of a string the kernel copied: at most the buffer, lossy UTF-8.
fn text(buffer: &[u8], len: u32) -> String {
    let len = (len as usize).min(buffer.len());
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}

/// Decodes one ring buffer record; `None` for a short record or unknown kind.
pub fn decode(bytes: &[u8]) -> Option<RawEvent> {
    let kind = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    Some(match EventKind::try_from(kind).ok()? {
        EventKind::PollEnd => RawEvent::PollEnd(read_record(bytes)?),
        EventKind::LoopBusy => RawEvent::LoopBusy(read_record(bytes)?),
        EventKind::Nudge => {
            let nudge: NudgeEvent = read_record(bytes)?;
            RawEvent::Nudge {
                tid: nudge.tid,
                start_ns: nudge.start_ns,
            }
        }
        EventKind::RouteName => {
            let name: RouteName = read_record(bytes)?;
            RawEvent::RouteName {
                key: name.key,
                method: text(&name.method, name.method_len),
                route: (name.route_len > 0).then(|| text(&name.route, name.route_len)),
            }
        }
    })
}

/// `CLOCK_MONOTONIC` in ns: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(event: &T) -> Vec<u8> {
        // SAFETY: the records are repr(C) plain integers with no padding.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(event).cast::<u8>(), size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn a_record_round_trips() {
        let event = PollEvent {
            kind: EventKind::PollEnd as u32,
            tid: 9,
            duration_ns: 5,
            ..Default::default()
        };
        let Some(RawEvent::PollEnd(decoded)) = decode(&bytes_of(&event)) else {
            panic!("not a poll end");
        };
        assert_eq!((decoded.tid, decoded.duration_ns), (9, 5));
    }

    #[test]
    fn a_nudge_decodes_its_thread_and_start() {
        let nudge = NudgeEvent {
            kind: EventKind::Nudge as u32,
            pid: 1,
            tid: 7,
            pad: 0,
            start_ns: 123,
        };
        let Some(RawEvent::Nudge { tid, start_ns }) = decode(&bytes_of(&nudge)) else {
            panic!("not a nudge");
        };
        assert_eq!((tid, start_ns), (7, 123));
        assert!(decode(&bytes_of(&nudge)[..16]).is_none(), "short");
    }

    #[test]
    fn a_route_name_decodes_its_strings() {
        let mut name = RouteName::zeroed();
        name.kind = EventKind::RouteName as u32;
        name.key = 42;
        name.method_len = 4;
        name.method[..4].copy_from_slice(b"POST");
        name.route_len = 300;
        name.route = [b'a'; loopguard_common::ROUTE_BYTES];
        // SAFETY: plain integers and byte arrays.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&name).cast::<u8>(),
                size_of::<RouteName>(),
            )
        };
        let Some(RawEvent::RouteName { key, method, route }) = decode(bytes) else {
            panic!("not a route name");
        };
        assert_eq!((key, method.as_str()), (42, "POST"));
        assert_eq!(
            route.map(|r| r.len()),
            Some(loopguard_common::ROUTE_BYTES),
            "truncated to the buffer"
        );
        name.route_len = 0;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&name).cast::<u8>(),
                size_of::<RouteName>(),
            )
        };
        let Some(RawEvent::RouteName { route, .. }) = decode(bytes) else {
            panic!()
        };
        assert_eq!(route, None, "no template");
    }

    #[test]
    fn short_or_unknown_records_are_rejected() {
        let event = PollEvent {
            kind: 99,
            ..Default::default()
        };
        assert!(decode(&bytes_of(&event)).is_none());
        assert!(decode(&[0; 8]).is_none());
    }

    #[test]
    fn the_monotonic_clock_moves() {
        let a = monotonic_ns();
        assert!(monotonic_ns() >= a && a > 0);
    }
}
