//! The poll-duration histogram's slots, defined once for the kernel (which
//! counts into them) and the agent (which reads percentiles and Prometheus
//! buckets from them).
//!
//! Log-linear: every power of two is split into [`SUBS`] equal sub-buckets,
//! so a slot is at most 1/8 of its lower edge wide and a percentile read
//! from the slots is within about 6 % of the true value (the slot's middle
//! against anything inside it). Durations below [`SUBS`] ns get a slot
//! each. Slot `i` covers `[lower_ns(i), upper_ns(i))`.

/// log2 of the sub-buckets per power of two.
pub const SUB_BITS: u32 = 3;
/// Sub-buckets per power of two.
pub const SUBS: u64 = 1 << SUB_BITS;
/// Slots in use: durations up to `u64::MAX` ns land in slot `USED_SLOTS - 1`.
pub const USED_SLOTS: u32 = (64 - SUB_BITS + 1) * SUBS as u32;
/// Slots in the kernel's array: a power of two, so the kernel bounds an
/// index with a mask the verifier can follow.
pub const SLOTS: u32 = 512;
const _: () = assert!(USED_SLOTS <= SLOTS && SLOTS.is_power_of_two());

/// Index of the highest set bit of `v` (0 for 0 and 1), in five shifts:
/// BPF has no count-leading-zeros instruction.
#[expect(
    clippy::inline_always,
    reason = "the eBPF programs call it on their hot path and must not call out of line"
)]
#[inline(always)]
pub const fn log2(mut v: u64) -> u32 {
    let mut bit = 0;
    let mut shift = 32;
    while shift > 0 {
        if v >> shift != 0 {
            v >>= shift;
            bit += shift;
        }
        shift >>= 1;
    }
    bit
}

/// The slot a duration of `ns` is counted in.
#[expect(
    clippy::inline_always,
    reason = "the eBPF programs call it on their hot path and must not call out of line"
)]
#[inline(always)]
pub const fn slot_of(ns: u64) -> u32 {
    if ns < SUBS {
        return ns as u32;
    }
    let exponent = log2(ns);
    let sub = (ns >> (exponent - SUB_BITS)) & (SUBS - 1);
    (exponent - SUB_BITS + 1) * SUBS as u32 + sub as u32
}

/// The smallest duration (ns) counted in `slot`.
pub const fn lower_ns(slot: u32) -> u64 {
    if slot < SUBS as u32 {
        return slot as u64;
    }
    let exponent = slot / SUBS as u32 + SUB_BITS - 1;
    let sub = (slot % SUBS as u32) as u64;
    (SUBS + sub) << (exponent - SUB_BITS)
}

/// One past the largest duration (ns) counted in `slot` (`u64::MAX` for the last).
pub const fn upper_ns(slot: u32) -> u64 {
    if slot + 1 >= USED_SLOTS {
        u64::MAX
    } else {
        lower_ns(slot + 1)
    }
}

/// The kernel's histogram value: one per CPU, in a one-entry per-CPU array,
/// so the agent reads every slot of every CPU with a single lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PollHistogram {
    /// Worker polls whose duration fell in each slot.
    pub slots: [u64; SLOTS as usize],
    /// ns, the sum of every counted poll's duration (Prometheus `_sum`).
    pub sum_ns: u64,
}

const _: () = assert!(core::mem::size_of::<PollHistogram>() == 8 * SLOTS as usize + 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_edges() {
        assert_eq!(log2(0), 0);
        assert_eq!(log2(1), 0);
        assert_eq!(log2(2), 1);
        assert_eq!(log2(1023), 9);
        assert_eq!(log2(1024), 10);
        assert_eq!(log2(u64::MAX), 63);
    }

    #[test]
    fn small_durations_have_a_slot_each() {
        for ns in 0..16 {
            assert_eq!(slot_of(ns), ns as u32);
            assert_eq!(lower_ns(ns as u32), ns);
        }
    }

    #[test]
    fn slots_tile_the_line_without_gaps() {
        for slot in 0..USED_SLOTS - 1 {
            let (lo, hi) = (lower_ns(slot), upper_ns(slot));
            assert!(lo < hi, "slot {slot}: {lo}..{hi}");
            assert_eq!(slot_of(lo), slot, "lower edge of {slot}");
            assert_eq!(slot_of(hi - 1), slot, "upper edge of {slot}");
            assert_eq!(slot_of(hi), slot + 1, "next slot after {slot}");
        }
        assert_eq!(slot_of(u64::MAX), USED_SLOTS - 1);
        assert_eq!(upper_ns(USED_SLOTS - 1), u64::MAX);
    }

    #[test]
    fn slots_are_at_most_an_eighth_wide() {
        for slot in SUBS as u32..USED_SLOTS - 1 {
            let (lo, hi) = (lower_ns(slot), upper_ns(slot));
            assert!((hi - lo) * SUBS <= lo, "slot {slot}: {lo}..{hi}");
        }
    }

    #[test]
    fn powers_of_two_are_slot_edges() {
        for bit in SUB_BITS..63 {
            let edge = 1u64 << bit;
            assert_eq!(lower_ns(slot_of(edge)), edge);
        }
    }
}
