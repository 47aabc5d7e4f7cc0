//! Nudges (issue #24): the agent reads the poll stacks at its fast pace
//! only while something may be stuck, and is told when that begins.
//!
//! A thread's innermost task poll (or, outside one, its event loop's busy
//! stretch) sends one `NudgeEvent` when it has run `Config::nudge_ns`
//! (seen on the thread's clock updates: every tick while it runs, every
//! switch out), or when it goes to sleep, whichever comes first. The ring
//! buffer wakes the agent for it. Healthy polls are over long before
//! either: they send nothing, and an agent with nothing to look at sleeps.

use aya_ebpf::macros::map;
use aya_ebpf::maps::Array;
use loopguard_common::{
    Counter, EventKind, MAX_POLL_DEPTH, NudgeEvent, frame_flags, slots::MAX_THREAD_SLOTS,
};

use crate::{EVENTS, bump, frame_index, slots};

/// Per thread slot, the start of the poll or stretch last nudged for, so
/// each is nudged for once. Only the slot's thread writes it.
#[map]
static NUDGED: Array<u64> = Array::with_max_entries(MAX_THREAD_SLOTS, 0);

/// ns after which a running poll or stretch nudges the agent (0: never).
#[inline(always)]
fn nudge_ns() -> u64 {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&raw const crate::CONFIG.nudge_ns) }
}

/// The start of what thread `tid` (slot `slot`) runs now: its innermost
/// task poll, else its busy stretch; read by that thread, whose own last
/// writes these are.
#[inline(always)]
fn running_since(slot: u32, tid: u32) -> Option<u64> {
    if let Some(polls) = slots::peek_polls(slot, tid) {
        let depth = polls.depth as usize;
        if depth > 0 && depth <= MAX_POLL_DEPTH {
            let frame = polls.frames.get(frame_index(depth - 1))?;
            if frame_flags::is_task_poll(frame.flags) {
                return Some(frame.start_ns);
            }
            // A blocking-pool poll, or a scheduler loop between tasks:
            // a loop stretch may still be open around it.
        }
    }
    let state = slots::peek_loops(slot, tid)?;
    (state.depth == 0 && state.busy_start_ns != 0).then_some(state.busy_start_ns)
}

/// Run as thread `tid` on each update of its clock, at `now`: nudges once
/// its poll or stretch has run the nudge delay.
#[inline(always)]
pub(crate) fn on_cpu(tgid: u32, slot: u32, tid: u32, now: u64) {
    let delay = nudge_ns();
    if delay == 0 {
        return;
    }
    if let Some(start) = running_since(slot, tid)
        && now.saturating_sub(start) >= delay
    {
        send(tgid, slot, tid, start);
    }
}

/// Run as thread `tid` when it is switched out asleep: a poll or stretch
/// that sleeps may sleep past the threshold, with no tick to see it.
#[inline(always)]
pub(crate) fn asleep(tgid: u32, slot: u32, tid: u32) {
    if nudge_ns() == 0 {
        return;
    }
    if let Some(start) = running_since(slot, tid) {
        send(tgid, slot, tid, start);
    }
}

#[inline(always)]
fn send(tgid: u32, slot: u32, tid: u32, start: u64) {
    let Some(last) = NUDGED.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a valid map value pointer; only this thread writes it.
    unsafe {
        if core::ptr::read_volatile(last) == start {
            return;
        }
        core::ptr::write_volatile(last, start);
    }
    let event = NudgeEvent {
        kind: EventKind::Nudge as u32,
        pid: tgid,
        tid,
        pad: 0,
        start_ns: start,
    };
    if EVENTS.output::<NudgeEvent>(&event, 0).is_err() {
        bump(Counter::DroppedEvents);
    }
}
