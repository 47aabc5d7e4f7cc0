//! Task ids read late ([`frame_flags::TASK_ID_ADDRESS`]): a poll frame
//! keeps the address of its task's id, and the id is read (a user memory
//! read, about a third of `poll_enter`'s own time) only for a poll that
//! turns out long: at the first clock tick or context switch inside it
//! ([`read_current`], run as the polling thread, while the task is surely
//! alive) or when its return is shipped ([`read_at_return`]). A poll that
//! ends before either, as nearly all do, never pays for it.

use aya_ebpf::helpers::bpf_probe_read_user;
use loopguard_common::{MAX_POLL_DEPTH, PollFrame, frame_flags, slots::is_writing};

use crate::{frame_index, slots};

/// The id and flags `frame` is shipped with, read now when it was left
/// for later. Run at the poll's return, as the thread that polled: its
/// task may have finished in this poll and been freed, but nothing else
/// ran on this thread since (a thread's allocator cache is its own), and
/// the read tolerates any address; a failed read ships no id.
#[inline(always)]
pub(crate) fn read_at_return(frame: &PollFrame) -> (u64, u32) {
    if frame.flags & frame_flags::TASK_ID_ADDRESS == 0 {
        return (frame.task_id, frame.flags);
    }
    let flags = frame.flags & !frame_flags::TASK_ID_ADDRESS;
    // SAFETY: bpf_probe_read_user tolerates any address.
    match unsafe { bpf_probe_read_user(frame.task_id as *const u64) } {
        Ok(id) => (id, flags),
        Err(_) => (0, flags | frame_flags::NO_TASK_ID),
    }
}

/// Run as thread `tid` (switched out, or its clock updated while it runs):
/// reads the id of the task its innermost poll polls, when left for later.
/// Nothing when the thread is inside one of its own write sections (this
/// program interrupted a probe): the next tick or switch will do. Nothing
/// either for a poll that began after `started_by` ns: a thread preempted
/// early in a poll (dufs: a third of its switches) runs that poll again,
/// and a poll that turns long there is read by its next tick, switch or
/// return.
#[inline(always)]
pub(crate) fn read_current(slot: u32, tid: u32, started_by: u64) {
    let Some(peek) = slots::peek_polls(slot, tid) else {
        return;
    };
    let depth = peek.depth as usize;
    if is_writing(peek.seq) || depth == 0 || depth > MAX_POLL_DEPTH {
        return;
    }
    if peek.frames.get(frame_index(depth - 1)).is_none_or(|frame| {
        frame.flags & frame_flags::TASK_ID_ADDRESS == 0
            || !frame_flags::is_task_poll(frame.flags)
            || frame.start_ns > started_by
    }) {
        return;
    }
    let Some(mut polls) = slots::polls_mut(slot, tid, false) else {
        return;
    };
    let depth = polls.depth as usize;
    if depth == 0 || depth > MAX_POLL_DEPTH {
        return;
    }
    if let Some(frame) = polls.frames.get_mut(frame_index(depth - 1)) {
        (frame.task_id, frame.flags) = read_at_return(frame);
    }
}
