//! The causes of lost data the kernel side counts, written once: the
//! metrics' `cause` label, the summary's JSON field and its text all come
//! from [`Lost`].

use loopguard_common::Counter;

use crate::collect::totals::Counters;

/// Data the kernel side could not record, one variant per loss
/// [`Counter`] (every counter but [`Counter::BlockingPolls`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    DroppedEvents,
    UnmatchedReturns,
    StackOverflow,
    ThreadMapFull,
    RequestMapFull,
    SlotLeaked,
}

impl Lost {
    /// Every cause, in the order the summary and the metrics list them.
    pub const ALL: [Self; 6] = [
        Self::DroppedEvents,
        Self::UnmatchedReturns,
        Self::StackOverflow,
        Self::ThreadMapFull,
        Self::RequestMapFull,
        Self::SlotLeaked,
    ];

    /// The kernel counter that counts it.
    pub fn counter(self) -> Counter {
        match self {
            Self::DroppedEvents => Counter::DroppedEvents,
            Self::UnmatchedReturns => Counter::UnmatchedReturns,
            Self::StackOverflow => Counter::StackOverflow,
            Self::ThreadMapFull => Counter::ThreadMapFull,
            Self::RequestMapFull => Counter::RequestMapFull,
            Self::SlotLeaked => Counter::SlotLeaked,
        }
    }

    /// The `cause` label of `loopguard_lost_total`.
    pub fn cause(self) -> &'static str {
        match self {
            Self::DroppedEvents => "ring_buffer_full",
            Self::UnmatchedReturns => "return_without_entry",
            Self::StackOverflow => "poll_stack_overflow",
            Self::ThreadMapFull => "thread_map_full",
            Self::RequestMapFull => "request_map_full",
            Self::SlotLeaked => "thread_slot_leaked",
        }
    }

    /// What the text summary says after the count.
    pub fn text(self) -> &'static str {
        match self {
            Self::DroppedEvents => "events dropped (ring buffer full)",
            Self::UnmatchedReturns => "returns without a matching entry",
            Self::StackOverflow => "polls nested too deep to time",
            Self::ThreadMapFull => "polls untracked (thread map full)",
            Self::RequestMapFull => "requests untracked (request map full)",
            Self::SlotLeaked => "thread slots leaked (never reused)",
        }
    }

    /// `(cause label, total)` of every cause, as the metrics export them.
    pub fn causes(counters: &Counters) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::ALL
            .into_iter()
            .map(|lost| (lost.cause(), counters.get(lost.counter())))
    }
}

#[cfg(test)]
mod tests {
    use super::Lost;
    use loopguard_common::{COUNTER_SLOTS, Counter};

    #[test]
    fn every_counter_but_blocking_polls_is_a_loss_once() {
        let mut seen: Vec<u32> = Lost::ALL.iter().map(|l| l.counter() as u32).collect();
        seen.push(Counter::BlockingPolls as u32);
        seen.sort_unstable();
        assert_eq!(seen, (0..COUNTER_SLOTS).collect::<Vec<_>>());
        let mut causes: Vec<&str> = Lost::ALL.iter().map(|l| l.cause()).collect();
        causes.sort_unstable();
        causes.dedup();
        assert_eq!(causes.len(), Lost::ALL.len());
    }
}
