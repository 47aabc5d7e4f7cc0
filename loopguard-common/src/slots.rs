//! Thread slots: where the kernel keeps each target thread's state so the
//! agent can read all of it without a system call, and never half-written.
//!
//! A thread that polls or waits is given a slot index, popped from
//! [`names::FREE_SLOTS`] on its first probe and filed in
//! [`names::THREAD_SLOTS`] (tid → slot); the thread-exit program clears the
//! slot and pushes it back. Slot `i` of [`names::SLOT_OWNERS`] holds the
//! owner's tid (0: free), slot `i` of `THREAD_POLLS` and `THREAD_LOOPS` its
//! state. The three arrays are `BPF_F_MMAPABLE`: the agent maps them
//! read-only and scans the owners (32 KiB: the kernel spaces 4-byte values
//! 8 apart) to find the slots worth copying.
//!
//! Every value starts with a `seq: u32` and a `tid: u32`. Only the owning
//! thread writes its slot (its own probes, and `sched_switch` and
//! `sched_process_exit`, which run as the thread leaving the CPU or
//! exiting). A write section adds 1 to `seq` (odd) with an atomic add
//! before its first store and 1 (even) after its last; a program that finds
//! `seq` already odd runs nested inside another of the same thread's
//! sections (a preempted probe) and leaves `seq` alone, since the outer
//! section's closing add comes after all of it. The agent accepts a copy
//! only when `seq` was even before it and unchanged after it.

/// Names of the slot maps.
pub mod names {
    /// `HashMap<u32, u32>`: tid → slot index.
    pub const THREAD_SLOTS: &str = "THREAD_SLOTS";
    /// `Stack<u32>` of free slot indices, filled by the agent at load.
    pub const FREE_SLOTS: &str = "FREE_SLOTS";
    /// `Array<u32>` (mmapable): the tid that owns each slot, 0 when free.
    pub const SLOT_OWNERS: &str = "SLOT_OWNERS";
}

/// Threads tracked at once (polling or waiting). A thread that finds no
/// free slot is counted (`Counter::ThreadMapFull`, exported as
/// `loopguard_lost_total{cause="thread_map_full"}`) and not tracked; slots
/// of exited threads are reused.
pub const MAX_THREAD_SLOTS: u32 = 4096;

/// `BPF_F_MMAPABLE`: an array map the agent can `mmap`.
pub const MAP_MMAPABLE: u32 = 1 << 10;

/// A write section is open on a value whose sequence is `seq`.
#[must_use]
pub const fn is_writing(seq: u32) -> bool {
    seq & 1 != 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn odd_sequences_mark_a_write_in_progress() {
        assert!(!super::is_writing(0));
        assert!(super::is_writing(1));
        assert!(!super::is_writing(u32::MAX - 1));
        assert!(super::is_writing(u32::MAX));
    }
}
