//! The in-flight table: every request this process is serving, in a static
//! array an agent attaching later can read, so that a poll already stuck
//! when loopguard attaches is still tied to its request. The layout is the
//! contract in `loopguard-usdt` (`INFLIGHT_*`); the table is announced by a
//! note that never fires (see [`announce`]).
//!
//! Costs: a request start copies its method, route and path (at most 144
//! bytes) into its slot; with the tower layer each later poll of the
//! response future marks the slot twice (thread id from a thread-local, one
//! `clock_gettime` of the coarse clock through the vDSO). No lock, no allocation, no system
//! call after a thread's first request.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use loopguard_usdt::{
    INFLIGHT_METHOD_BYTES, INFLIGHT_RESERVED_BYTES, INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS,
    INFLIGHT_TEXT_BYTES, inflight_slot,
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

#[repr(C)]
pub(crate) struct Table {
    /// Where a tool that enables the announcing note bumps its semaphore.
    reserved: AtomicU64,
    slots: [Slot; INFLIGHT_SLOTS],
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

/// All zero: it lives in `.bss` and costs the binary nothing on disk.
pub(crate) static TABLE: Table = Table {
    reserved: AtomicU64::new(0),
    slots: [FREE; INFLIGHT_SLOTS],
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

fn slot_of(id: u64) -> &'static Slot {
    &TABLE.slots[(id % INFLIGHT_SLOTS as u64) as usize]
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

/// Files request `id` in its slot (a request still there with the same slot
/// is replaced: more than [`INFLIGHT_SLOTS`] in flight). Called inside the
/// poll that runs the handler, so the thread polling it is this one.
pub(crate) fn started(id: u64, method: &str, route: Option<&str>, path: &str, tracked: bool) {
    let slot = slot_of(id);
    let Some(seq) = slot.claim() else {
        return;
    };
    let now = now_ns();
    slot.id.store(id, Ordering::Relaxed);
    slot.polling_tid.store(tid(), Ordering::Relaxed);
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

/// Runs `change` on request `id`'s slot inside a write section, unless the
/// slot holds another request (it took the slot since) or is being written.
fn change_request(id: u64, change: impl FnOnce(&Slot)) {
    let slot = slot_of(id);
    if slot.id.load(Ordering::Relaxed) != id {
        return;
    }
    let Some(seq) = slot.claim() else {
        return;
    };
    if slot.id.load(Ordering::Relaxed) == id {
        change(slot);
    }
    slot.release(seq);
}

/// Notes that this thread starts (`true`) or stops polling request `id`'s
/// future.
pub(crate) fn polling(id: u64, now_polling: bool) {
    change_request(id, |slot| {
        if now_polling {
            slot.poll_started_ns.store(now_ns(), Ordering::Relaxed);
            slot.polling_tid.store(tid(), Ordering::Relaxed);
        } else {
            slot.polling_tid.store(0, Ordering::Relaxed);
        }
    });
}

/// Frees request `id`'s slot.
pub(crate) fn ended(id: u64) {
    change_request(id, |slot| {
        slot.id.store(0, Ordering::Relaxed);
        slot.polling_tid.store(0, Ordering::Relaxed);
    });
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

    fn text(slot: &Slot, at: usize, len: u8) -> String {
        let bytes: Vec<u8> = slot
            .text
            .iter()
            .flat_map(|word| word.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes[at..at + usize::from(len)]).into_owned()
    }

    #[test]
    fn a_request_is_filed_polled_and_freed() {
        let id = 1_000_003;
        started(id, "POST", Some("/login"), "/login", true);
        let slot = slot_of(id);
        assert_eq!(slot.id.load(Ordering::Relaxed), id);
        assert_eq!(slot.polling_tid.load(Ordering::Relaxed), tid());
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
        assert_eq!(slot.id.load(Ordering::Relaxed), id);
        ended(id);
        assert_eq!(slot.id.load(Ordering::Relaxed), 0);
        assert_eq!(slot.seq.load(Ordering::Relaxed) & 1, 0);
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
        let slot = slot_of(3_000_017);
        let seq = slot.claim().expect("free");
        assert!(slot.claim().is_none());
        slot.release(seq);
        assert!(slot.claim().is_some_and(|s| {
            slot.release(s);
            true
        }));
    }
}
