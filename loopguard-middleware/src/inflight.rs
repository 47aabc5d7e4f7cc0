//! The in-flight table: every request this process is serving, in a static
//! array an agent attaching later can read, so that a poll already stuck
//! when loopguard attaches is still tied to its request. The layout is the
//! contract in `loopguard-usdt` (`INFLIGHT_*`); the table is announced by a
//! note that never fires (see [`announce`]).
//!
//! Since layout 2 each slot also has a step record: the thread the request
//! started on, its future's last poll that took a clock tick or more
//! (thread, start, end), and its end time. An ended request stays in its
//! slot until a new one takes it, so an agent that reads the table when a
//! stall's end reaches it still finds the request that ended inside the
//! poll that blocked, and which requests were in flight meanwhile: this is
//! how loopguard names requests without a probe per request.
//!
//! Costs: a request start copies its method, route and path (at most 144
//! bytes) into its slot; with the tower layer each later poll of the
//! response future marks the slot twice (thread id from a thread-local, one
//! `clock_gettime` of the coarse clock through the vDSO at each mark), and
//! the end stores its time. No lock, no allocation, no system call after a
//! thread's first request.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use loopguard_usdt::{
    INFLIGHT_LONG_AT, INFLIGHT_LONG_ENDS, INFLIGHT_LONG_STEPS_AT, INFLIGHT_METHOD_BYTES,
    INFLIGHT_RESERVED_BYTES, INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS, INFLIGHT_STEP_BYTES,
    INFLIGHT_STEPS_AT, INFLIGHT_TABLE_BYTES, INFLIGHT_TEXT_BYTES, inflight_slot, inflight_step,
};

const TEXT_WORDS: usize = (INFLIGHT_METHOD_BYTES + 2 * INFLIGHT_TEXT_BYTES) / 8;

#[repr(C)]
struct Slot {
    seq: AtomicU32,
    polling_tid: AtomicU32,
    id: AtomicU64,
    started_ns: AtomicU64,
    poll_started_ns: AtomicU64,
    /// flags, method, route and path lengths, 4 spare bytes (little-endian).
    meta: AtomicU64,
    /// Method, route and path, each at its full width, 8 bytes a word.
    text: [AtomicU64; TEXT_WORDS],
}

/// What a slot's request did last (written inside the slot's section).
#[repr(C)]
struct Step {
    /// The thread of the last long poll (0: none yet).
    long_tid: AtomicU32,
    /// The thread the request started on.
    start_tid: AtomicU32,
    /// ns, coarse monotonic: start and end of the last long poll.
    long_start_ns: AtomicU64,
    long_end_ns: AtomicU64,
    /// ns, coarse monotonic: the request's end (0: in flight).
    ended_ns: AtomicU64,
}

#[repr(C)]
pub(crate) struct Table {
    /// Where a tool that enables the announcing note bumps its semaphore.
    reserved: AtomicU64,
    slots: [Slot; INFLIGHT_SLOTS],
    steps: [Step; INFLIGHT_SLOTS],
    /// Copies of requests that ended in a long poll, a ring.
    long_slots: [Slot; INFLIGHT_LONG_ENDS],
    long_steps: [Step; INFLIGHT_LONG_ENDS],
    /// Copies written so far; the next goes to `long_next % INFLIGHT_LONG_ENDS`.
    long_next: AtomicU64,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Slot>() == INFLIGHT_SLOT_BYTES);
    assert!(offset_of!(Slot, seq) == inflight_slot::SEQ);
    assert!(offset_of!(Slot, polling_tid) == inflight_slot::POLLING_TID);
    assert!(offset_of!(Slot, id) == inflight_slot::ID);
    assert!(offset_of!(Slot, started_ns) == inflight_slot::STARTED_NS);
    assert!(offset_of!(Slot, poll_started_ns) == inflight_slot::POLL_STARTED_NS);
    assert!(offset_of!(Slot, meta) == inflight_slot::FLAGS);
    assert!(offset_of!(Slot, text) == inflight_slot::TEXT);
    assert!(offset_of!(Table, slots) == INFLIGHT_RESERVED_BYTES);
    assert!(offset_of!(Table, steps) == INFLIGHT_STEPS_AT);
    assert!(offset_of!(Table, long_slots) == INFLIGHT_LONG_AT);
    assert!(offset_of!(Table, long_steps) == INFLIGHT_LONG_STEPS_AT);
    assert!(offset_of!(Table, long_next) == INFLIGHT_TABLE_BYTES);
    assert!(size_of::<Step>() == INFLIGHT_STEP_BYTES);
    assert!(offset_of!(Step, long_tid) == inflight_step::LONG_TID);
    assert!(offset_of!(Step, start_tid) == inflight_step::LOOP_TID);
    assert!(offset_of!(Step, long_start_ns) == inflight_step::LONG_START_NS);
    assert!(offset_of!(Step, long_end_ns) == inflight_step::LONG_END_NS);
    assert!(offset_of!(Step, ended_ns) == inflight_step::ENDED_NS);
};

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    seq: AtomicU32::new(0),
    polling_tid: AtomicU32::new(0),
    id: AtomicU64::new(0),
    started_ns: AtomicU64::new(0),
    poll_started_ns: AtomicU64::new(0),
    meta: AtomicU64::new(0),
    text: [const { AtomicU64::new(0) }; TEXT_WORDS],
};

#[allow(clippy::declare_interior_mutable_const)]
const NO_STEP: Step = Step {
    long_tid: AtomicU32::new(0),
    start_tid: AtomicU32::new(0),
    long_start_ns: AtomicU64::new(0),
    long_end_ns: AtomicU64::new(0),
    ended_ns: AtomicU64::new(0),
};

/// All zero: it lives in `.bss` and costs the binary nothing on disk.
pub(crate) static TABLE: Table = Table {
    reserved: AtomicU64::new(0),
    slots: [FREE; INFLIGHT_SLOTS],
    steps: [NO_STEP; INFLIGHT_SLOTS],
    long_slots: [FREE; INFLIGHT_LONG_ENDS],
    long_steps: [NO_STEP; INFLIGHT_LONG_ENDS],
    long_next: AtomicU64::new(0),
};

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// This thread's id (the kernel's, as loopguard prints it).
fn tid() -> u32 {
    TID.with(|tid| {
        if tid.get() == 0 {
            // SAFETY: gettid has no preconditions.
            tid.set(u32::try_from(unsafe { libc::gettid() }).unwrap_or(0));
        }
        tid.get()
    })
}

/// ns, `CLOCK_MONOTONIC_COARSE`: the monotonic clock (that of
/// `bpf_ktime_get_ns`) as of the last timer tick, so at most one tick
/// (`clock_getres`, 1–10 ms) behind, for a fifth of the cost. The agent
/// adds the tick back to keep its durations lower bounds.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; the coarse clock exists since Linux 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Slots a request may take: its home slot `id % INFLIGHT_SLOTS` and the
/// next ones, so that a long request is not pushed out by the requests
/// that start while it runs.
const PROBED_SLOTS: u64 = 4;

fn candidates(id: u64) -> impl Iterator<Item = usize> {
    (0..PROBED_SLOTS).map(move |k| (id.wrapping_add(k) % INFLIGHT_SLOTS as u64) as usize)
}

/// Whether slot `index` holds a request in flight.
fn in_flight(index: usize) -> bool {
    TABLE.slots[index].id.load(Ordering::Relaxed) != 0
        && TABLE.steps[index].ended_ns.load(Ordering::Relaxed) == 0
}

/// The slot request `id` was filed in, if it still holds it.
fn find(id: u64) -> Option<usize> {
    candidates(id).find(|&index| TABLE.slots[index].id.load(Ordering::Relaxed) == id)
}

impl Slot {
    /// Makes `seq` odd: this writer owns the slot until [`Self::release`].
    /// `None` when another thread writes it now (two requests whose ids
    /// share the slot): this change is skipped.
    fn claim(&self) -> Option<u32> {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq & 1 != 0 {
            return None;
        }
        self.seq
            .compare_exchange(
                seq,
                seq.wrapping_add(1),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        // The odd sequence is visible before any of the writes that follow.
        fence(Ordering::Release);
        Some(seq)
    }

    fn release(&self, seq: u32) {
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    fn write_text(&self, at: usize, width: usize, text: &[u8]) -> u8 {
        let kept = &text[..text.len().min(width)];
        for (i, chunk) in kept.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.text[(at + i * 8) / 8].store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        u8::try_from(kept.len()).unwrap_or(u8::MAX)
    }
}

/// Files request `id` in the first of its slots that holds no request in
/// flight (all of them busy: its home slot, replacing the request there).
/// Called inside the poll that runs the handler, so the thread polling it
/// is this one.
pub(crate) fn started(id: u64, method: &str, route: Option<&str>, path: &str, tracked: bool) {
    let Some((index, seq)) = claim_free(id) else {
        return;
    };
    let (slot, step) = (&TABLE.slots[index], &TABLE.steps[index]);
    let now = now_ns();
    let tid = tid();
    step.long_tid.store(0, Ordering::Relaxed);
    step.start_tid.store(tid, Ordering::Relaxed);
    step.long_start_ns.store(0, Ordering::Relaxed);
    step.long_end_ns.store(0, Ordering::Relaxed);
    step.ended_ns.store(0, Ordering::Relaxed);
    slot.id.store(id, Ordering::Relaxed);
    slot.polling_tid.store(tid, Ordering::Relaxed);
    slot.started_ns.store(now, Ordering::Relaxed);
    slot.poll_started_ns.store(now, Ordering::Relaxed);
    let method_len = slot.write_text(0, INFLIGHT_METHOD_BYTES, method.as_bytes());
    let route_len = slot.write_text(
        INFLIGHT_METHOD_BYTES,
        INFLIGHT_TEXT_BYTES,
        route.unwrap_or_default().as_bytes(),
    );
    let path_len = slot.write_text(
        INFLIGHT_METHOD_BYTES + INFLIGHT_TEXT_BYTES,
        INFLIGHT_TEXT_BYTES,
        path.as_bytes(),
    );
    let mut flags = 0;
    if route.is_some() {
        flags |= inflight_slot::flags::HAS_ROUTE;
    }
    if tracked {
        flags |= inflight_slot::flags::POLLS_TRACKED;
    }
    let meta = u64::from_le_bytes([flags, method_len, route_len, path_len, 0, 0, 0, 0]);
    slot.meta.store(meta, Ordering::Relaxed);
    slot.release(seq);
}

/// Claims the first of request `id`'s slots with no request in flight,
/// else its home slot; `None` when the one chosen is being written.
fn claim_free(id: u64) -> Option<(usize, u32)> {
    for index in candidates(id).filter(|&index| !in_flight(index)) {
        let Some(seq) = TABLE.slots[index].claim() else {
            continue;
        };
        if !in_flight(index) {
            return Some((index, seq));
        }
        // Taken meanwhile.
        TABLE.slots[index].release(seq);
    }
    let home = candidates(id).next()?;
    Some((home, TABLE.slots[home].claim()?))
}

/// Runs `change` on request `id`'s slot inside a write section, unless the
/// slot holds another request (it took the slot since), the request has
/// ended, or the slot is being written.
fn change_request(id: u64, change: impl FnOnce(&Slot, &Step)) {
    let Some(index) = find(id) else {
        return;
    };
    let (slot, step) = (&TABLE.slots[index], &TABLE.steps[index]);
    let mine =
        || slot.id.load(Ordering::Relaxed) == id && step.ended_ns.load(Ordering::Relaxed) == 0;
    if !mine() {
        return;
    }
    let Some(seq) = slot.claim() else {
        return;
    };
    if mine() {
        change(slot, step);
    }
    slot.release(seq);
}

/// Ends the poll this thread made of a slot's request at `now`: it was
/// long if it took a tick of the coarse clock or more.
fn poll_done(slot: &Slot, step: &Step, tid: u32, now: u64) {
    let began = slot.poll_started_ns.load(Ordering::Relaxed);
    if slot.polling_tid.load(Ordering::Relaxed) == tid && began != 0 && now > began {
        step.long_tid.store(tid, Ordering::Relaxed);
        step.long_start_ns.store(began, Ordering::Relaxed);
        step.long_end_ns.store(now, Ordering::Relaxed);
    }
    slot.polling_tid.store(0, Ordering::Relaxed);
}

/// Notes that this thread starts (`true`) or stops polling request `id`'s
/// future.
pub(crate) fn polling(id: u64, now_polling: bool) {
    change_request(id, |slot, step| {
        let now = now_ns();
        if now_polling {
            slot.poll_started_ns.store(now, Ordering::Relaxed);
            slot.polling_tid.store(tid(), Ordering::Relaxed);
        } else {
            poll_done(slot, step, tid(), now);
        }
    });
}

/// Marks request `id` ended, inside the poll that ends it: that poll is
/// its last. The slot keeps it until a new request takes it; if that poll
/// was long, a copy goes to the ring of long ends too.
pub(crate) fn ended(id: u64) {
    let mut long_end = false;
    change_request(id, |slot, step| {
        let now = now_ns();
        let began = slot.poll_started_ns.load(Ordering::Relaxed);
        poll_done(slot, step, tid(), now);
        step.ended_ns.store(now.max(1), Ordering::Relaxed);
        long_end = began != 0 && now.saturating_sub(began) >= 2 * coarse_tick_ns();
    });
    if long_end && let Some(index) = find(id) {
        keep_long_end(index);
    }
}

/// ns: the coarse clock's tick, asked once.
fn coarse_tick_ns() -> u64 {
    static TICK_NS: AtomicU64 = AtomicU64::new(0);
    let known = TICK_NS.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) } == 0;
    let tick = if ok {
        u64::try_from(res.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(res.tv_nsec).unwrap_or(0)
    } else {
        10_000_000
    };
    TICK_NS.store(tick.max(1), Ordering::Relaxed);
    tick.max(1)
}

/// Copies slot `index` (a request that ended in a long poll) into the next
/// entry of the ring of long ends. Rare: only requests whose last poll took
/// two ticks of the coarse clock get here.
fn keep_long_end(index: usize) {
    let at = (TABLE.long_next.fetch_add(1, Ordering::Relaxed) % INFLIGHT_LONG_ENDS as u64) as usize;
    let (from, from_step) = (&TABLE.slots[index], &TABLE.steps[index]);
    let (to, to_step) = (&TABLE.long_slots[at], &TABLE.long_steps[at]);
    let Some(seq) = to.claim() else {
        return;
    };
    let copy32 =
        |a: &AtomicU32, b: &AtomicU32| b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
    let copy64 =
        |a: &AtomicU64, b: &AtomicU64| b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
    // The source is this thread's own request, ended: nothing writes it now
    // but a new request taking the slot, which its sequence shows.
    let source_seq = from.seq.load(Ordering::Acquire);
    let id = from.id.load(Ordering::Relaxed);
    copy32(&from.polling_tid, &to.polling_tid);
    copy64(&from.started_ns, &to.started_ns);
    copy64(&from.poll_started_ns, &to.poll_started_ns);
    copy64(&from.meta, &to.meta);
    for (a, b) in from.text.iter().zip(&to.text) {
        copy64(a, b);
    }
    copy32(&from_step.long_tid, &to_step.long_tid);
    copy32(&from_step.start_tid, &to_step.start_tid);
    copy64(&from_step.long_start_ns, &to_step.long_start_ns);
    copy64(&from_step.long_end_ns, &to_step.long_end_ns);
    copy64(&from_step.ended_ns, &to_step.ended_ns);
    fence(Ordering::Acquire);
    let unchanged = source_seq & 1 == 0 && from.seq.load(Ordering::Relaxed) == source_seq;
    to.id
        .store(if unchanged { id } else { 0 }, Ordering::Relaxed);
    to.release(seq);
}

/// The note announcing the table: provider `loopguard`, name
/// `inflight_table`, the table's address in its semaphore field, the layout
/// in its arguments. Its site is a `nop` that runs once per request end;
/// nothing is meant to attach there.
pub(crate) fn announce() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    // SAFETY: a `nop`, plus a note in a non-allocated section and the
    // SystemTap base symbol, exactly as the `probe` crate's sites do.
    unsafe {
        std::arch::asm!(
            "990: nop",
            ".pushsection .note.stapsdt,\"?\",\"note\"",
            ".balign 4",
            ".4byte 992f-991f, 994f-993f, 3",
            "991: .asciz \"stapsdt\"",
            "992: .balign 4",
            "993: .8byte 990b",
            ".8byte _.stapsdt.base",
            ".8byte {table}",
            ".asciz \"loopguard\"",
            ".asciz \"inflight_table\"",
            ".asciz \"{version} {slots} {slot_bytes}\"",
            "994: .balign 4",
            ".popsection",
            ".ifndef _.stapsdt.base",
            ".pushsection .stapsdt.base,\"aGR\",\"progbits\",.stapsdt.base,comdat",
            ".weak _.stapsdt.base",
            ".hidden _.stapsdt.base",
            "_.stapsdt.base: .space 1",
            ".size _.stapsdt.base, 1",
            ".popsection",
            ".endif",
            table = sym TABLE,
            version = const loopguard_usdt::INFLIGHT_VERSION,
            slots = const INFLIGHT_SLOTS,
            slot_bytes = const INFLIGHT_SLOT_BYTES,
            options(nomem, nostack, preserves_flags),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_of(id: u64) -> &'static Slot {
        &TABLE.slots[find(id).expect("filed")]
    }

    fn step_of(id: u64) -> &'static Step {
        &TABLE.steps[find(id).expect("filed")]
    }

    fn text(slot: &Slot, at: usize, len: u8) -> String {
        let bytes: Vec<u8> = slot
            .text
            .iter()
            .flat_map(|word| word.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes[at..at + usize::from(len)]).into_owned()
    }

    #[test]
    fn a_request_is_filed_polled_and_kept_ended() {
        let id = 1_000_003;
        started(id, "POST", Some("/login"), "/login", true);
        let (slot, step) = (slot_of(id), step_of(id));
        assert_eq!(slot.id.load(Ordering::Relaxed), id);
        assert_eq!(slot.polling_tid.load(Ordering::Relaxed), tid());
        assert_eq!(step.start_tid.load(Ordering::Relaxed), tid());
        assert_eq!(step.ended_ns.load(Ordering::Relaxed), 0);
        assert_eq!(slot.seq.load(Ordering::Relaxed) & 1, 0);
        let meta = slot.meta.load(Ordering::Relaxed).to_le_bytes();
        assert_eq!(
            meta[0],
            inflight_slot::flags::HAS_ROUTE | inflight_slot::flags::POLLS_TRACKED
        );
        assert_eq!(text(slot, 0, meta[1]), "POST");
        assert_eq!(text(slot, INFLIGHT_METHOD_BYTES, meta[2]), "/login");
        polling(id, false);
        assert_eq!(slot.polling_tid.load(Ordering::Relaxed), 0);
        polling(id, true);
        assert_eq!(slot.polling_tid.load(Ordering::Relaxed), tid());
        // Another request's end leaves this one alone.
        ended(id + INFLIGHT_SLOTS as u64);
        assert_eq!(step.ended_ns.load(Ordering::Relaxed), 0);
        ended(id);
        // Ended, but kept with its texts until the slot is taken again.
        assert_eq!(slot.id.load(Ordering::Relaxed), id);
        assert_ne!(step.ended_ns.load(Ordering::Relaxed), 0);
        assert_eq!(slot.polling_tid.load(Ordering::Relaxed), 0);
        assert_eq!(slot.seq.load(Ordering::Relaxed) & 1, 0);
        // The poll guard's drop after the end changes nothing.
        let seq = slot.seq.load(Ordering::Relaxed);
        polling(id, false);
        assert_eq!(slot.seq.load(Ordering::Relaxed), seq);
        // The next request of the slot clears the step record.
        started(id + INFLIGHT_SLOTS as u64, "GET", None, "/next", true);
        assert_eq!(step.ended_ns.load(Ordering::Relaxed), 0);
        assert_eq!(step.long_tid.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_long_request_keeps_its_slot_while_later_ones_come_and_go() {
        // Slots 100.. of ids 5_000_100 + k * 256.
        let long = 5_000_100 + 256 * 20_000;
        let long = long - long % INFLIGHT_SLOTS as u64 + 100;
        started(long, "GET", None, "/long", true);
        for n in 1..=300 {
            let id = long + n * INFLIGHT_SLOTS as u64;
            started(id, "GET", None, "/short", true);
            ended(id);
        }
        let slot = slot_of(long);
        assert_eq!(slot.id.load(Ordering::Relaxed), long);
        assert_eq!(step_of(long).ended_ns.load(Ordering::Relaxed), 0);
        ended(long);
    }

    #[test]
    fn a_request_that_ended_in_a_long_poll_outlives_its_slot_in_the_ring() {
        let id = 6_000_200;
        started(id, "GET", Some("/slow"), "/slow", true);
        let began = now_ns().saturating_sub(100_000_000).max(1);
        slot_of(id).poll_started_ns.store(began, Ordering::Relaxed);
        ended(id);
        let kept = TABLE
            .long_slots
            .iter()
            .position(|slot| slot.id.load(Ordering::Relaxed) == id)
            .expect("copied to the ring");
        let step = &TABLE.long_steps[kept];
        assert_eq!(step.long_start_ns.load(Ordering::Relaxed), began);
        assert_ne!(step.ended_ns.load(Ordering::Relaxed), 0);
        assert_eq!(TABLE.long_slots[kept].seq.load(Ordering::Relaxed) & 1, 0);
        // A quick one is not copied.
        let quick = id + 1;
        started(quick, "GET", None, "/quick", true);
        ended(quick);
        assert!(
            TABLE
                .long_slots
                .iter()
                .all(|slot| slot.id.load(Ordering::Relaxed) != quick)
        );
    }

    #[test]
    fn a_poll_over_a_clock_tick_is_kept_as_the_last_long_one() {
        let id = 4_000_250;
        started(id, "GET", Some("/block"), "/block", true);
        let (slot, step) = (slot_of(id), step_of(id));
        // A poll that began 50 ms ago (as the coarse clock tells) and ends
        // with the request: the one that blocked.
        let began = now_ns().saturating_sub(50_000_000).max(1);
        slot.poll_started_ns.store(began, Ordering::Relaxed);
        ended(id);
        assert_eq!(step.long_tid.load(Ordering::Relaxed), tid());
        assert_eq!(step.long_start_ns.load(Ordering::Relaxed), began);
        let end = step.long_end_ns.load(Ordering::Relaxed);
        assert!(end > began);
        assert_eq!(step.ended_ns.load(Ordering::Relaxed), end);
    }

    #[test]
    fn long_texts_are_cut_to_their_width() {
        let id = 2_000_011;
        let path = "/x".repeat(100);
        started(id, "PROPFIND-EXTENDED-LONG", None, &path, false);
        let meta = slot_of(id).meta.load(Ordering::Relaxed).to_le_bytes();
        assert_eq!(meta[0], 0);
        assert_eq!(usize::from(meta[1]), INFLIGHT_METHOD_BYTES);
        assert_eq!(meta[2], 0);
        assert_eq!(usize::from(meta[3]), INFLIGHT_TEXT_BYTES);
        ended(id);
    }

    #[test]
    fn a_slot_being_written_is_not_claimed_twice() {
        let slot = &TABLE.slots[candidates(3_000_017).next().unwrap()];
        let seq = slot.claim().expect("free");
        assert!(slot.claim().is_none());
        slot.release(seq);
        assert!(slot.claim().is_some_and(|s| {
            slot.release(s);
            true
        }));
    }
}
