//! When the watch loop next reads the poll stacks (issue #24).
//!
//! A scan finds polls and busy stretches still stuck, arms the stack
//! capture on them and samples Python stacks. It has something to do only
//! once one of them has run half the report floor. The kernel says when
//! that happens ([`RawEvent::Nudge`](crate::collect::RawEvent)): once per
//! poll or stretch that runs that long, or that goes to sleep. So the scans
//! run at the fast pace (`--scan-interval-ms`) only while a nudged poll or
//! stretch is still running, and for the attach census; otherwise every
//! [`IDLE_SCAN`], for the status line and what else only a scan reads.
//!
//! Why it matters: an agent that wakes 200 times a second costs the CPU it
//! shares with the service's clients (measured in docs/OVERHEAD.md: a
//! process that only sleeps 5 ms at a time, beside wrk, took 5-7 % of a
//! trivial endpoint's throughput on this VM).

use std::collections::HashMap;
use std::time::Duration;

/// The pace while nothing may be stuck.
pub const IDLE_SCAN: Duration = Duration::from_millis(100);

/// A nudged poll or stretch whose thread no scan has seen for this long
/// (its slot was mid-write, or the thread is gone) is let go.
const UNSEEN_TTL_NS: u64 = 2_000_000_000;

/// At most this many nudged polls and stretches are followed at once.
const MAX_NUDGED: usize = 4096;

/// What a scan saw of a nudged poll or stretch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Its thread is still in it.
    Running,
    /// Its thread has moved on.
    Over,
    /// The scan did not see its thread.
    Unseen,
}

/// The scan pace of one watch.
#[derive(Debug)]
pub struct Cadence {
    fast: Duration,
    /// Fast until then (ns): the attach census.
    fast_until_ns: u64,
    /// Nudged (thread, start) → when a scan last saw it running (ns).
    nudged: HashMap<(u32, u64), u64>,
    /// A new nudge came since the last scan.
    new_nudge: bool,
}

impl Cadence {
    /// `fast`: `--scan-interval-ms`; fast until `fast_until_ns` whatever
    /// the nudges say (the kernel always nudges: attach sets `nudge_ns`).
    pub fn new(fast: Duration, fast_until_ns: u64) -> Self {
        Self {
            fast,
            fast_until_ns,
            nudged: HashMap::new(),
            new_nudge: false,
        }
    }

    /// The kernel nudged for thread `tid`'s poll or stretch that began at
    /// `start_ns`, at `now_ns`.
    pub fn nudge(&mut self, tid: u32, start_ns: u64, now_ns: u64) {
        if self.nudged.len() >= MAX_NUDGED && !self.nudged.contains_key(&(tid, start_ns)) {
            // Far more than a host's stuck threads: the fast pace holds anyway.
            return;
        }
        self.nudged.insert((tid, start_ns), now_ns);
        self.new_nudge = true;
    }

    /// Whether a nudge came since the last scan: the next scan should come
    /// at the fast pace, not at the idle one.
    pub fn take_new_nudge(&mut self) -> bool {
        std::mem::take(&mut self.new_nudge)
    }

    /// After a scan at `now_ns`, whose `seen` tells of each nudged poll or
    /// stretch: the time until the next scan.
    pub fn after_scan(&mut self, now_ns: u64, mut seen: impl FnMut(u32, u64) -> Seen) -> Duration {
        self.nudged
            .retain(|&(tid, start_ns), last_seen| match seen(tid, start_ns) {
                Seen::Running => {
                    *last_seen = now_ns;
                    true
                }
                Seen::Over => false,
                Seen::Unseen => now_ns.saturating_sub(*last_seen) < UNSEEN_TTL_NS,
            });
        self.new_nudge = false;
        self.next(now_ns)
    }

    /// The time until the next scan, as things stand at `now_ns`.
    pub fn next(&self, now_ns: u64) -> Duration {
        if now_ns < self.fast_until_ns || !self.nudged.is_empty() {
            self.fast
        } else {
            IDLE_SCAN.max(self.fast)
        }
    }

    /// The fast pace.
    pub fn fast(&self) -> Duration {
        self.fast
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(5);
    const MS: u64 = 1_000_000;

    #[test]
    fn the_census_is_scanned_fast_then_the_pace_drops() {
        let mut cadence = Cadence::new(FAST, 500 * MS);
        assert_eq!(cadence.after_scan(100 * MS, |_, _| Seen::Over), FAST);
        assert_eq!(cadence.after_scan(600 * MS, |_, _| Seen::Over), IDLE_SCAN);
    }

    #[test]
    fn a_nudged_poll_keeps_the_fast_pace_until_it_is_over() {
        let mut cadence = Cadence::new(FAST, 0);
        cadence.nudge(7, 40 * MS, 50 * MS);
        assert!(cadence.take_new_nudge());
        assert!(!cadence.take_new_nudge(), "said once");
        assert_eq!(cadence.after_scan(55 * MS, |_, _| Seen::Running), FAST);
        assert_eq!(cadence.after_scan(60 * MS, |_, _| Seen::Running), FAST);
        assert_eq!(cadence.after_scan(65 * MS, |_, _| Seen::Over), IDLE_SCAN);
    }

    #[test]
    fn an_unseen_thread_is_followed_for_a_while_then_let_go() {
        let mut cadence = Cadence::new(FAST, 0);
        cadence.nudge(7, 0, MS);
        assert_eq!(cadence.after_scan(2 * MS, |_, _| Seen::Running), FAST);
        assert_eq!(cadence.after_scan(1_000 * MS, |_, _| Seen::Unseen), FAST);
        assert_eq!(
            cadence.after_scan(2_003 * MS, |_, _| Seen::Unseen),
            IDLE_SCAN
        );
    }

    #[test]
    fn each_nudge_is_judged_alone() {
        let mut cadence = Cadence::new(FAST, 0);
        cadence.nudge(7, 10 * MS, 20 * MS);
        cadence.nudge(8, 12 * MS, 20 * MS);
        let pace = cadence.after_scan(
            25 * MS,
            |tid, _| {
                if tid == 7 { Seen::Over } else { Seen::Running }
            },
        );
        assert_eq!(pace, FAST, "thread 8 is still stuck");
        assert_eq!(cadence.after_scan(30 * MS, |_, _| Seen::Over), IDLE_SCAN);
    }

    #[test]
    fn a_slow_fast_pace_is_never_made_faster() {
        let slow = Duration::from_millis(500);
        let mut cadence = Cadence::new(slow, 0);
        assert_eq!(cadence.after_scan(MS, |_, _| Seen::Over), slow);
    }
}
