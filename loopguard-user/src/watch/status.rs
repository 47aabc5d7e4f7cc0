//! The status line: polls per second, stalls so far, the threshold and
//! the requests in flight, redrawn on stderr once a second (when stderr is
//! a terminal).

use std::time::{Duration, Instant};

use crate::collect::{Collector, RequestMaps};
use crate::events;

/// How often the status line is redrawn.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// What the status line was last drawn from.
pub(super) struct StatusFeed {
    started: Instant,
    last: Option<(Instant, u64)>,
}

impl StatusFeed {
    /// A feed when the status line is shown (stderr is a terminal).
    pub(super) fn when_shown(started: Instant) -> Option<Self> {
        crate::term::status_enabled().then_some(Self {
            started,
            last: None,
        })
    }

    /// Redraws the status line once a second: polls per second from the
    /// kernel's histogram, `stalls` so far, the threshold, requests in
    /// flight.
    pub(super) fn refresh(
        &mut self,
        collector: &Collector,
        stalls: u64,
        threshold_ns: u64,
        requests: Option<&RequestMaps>,
    ) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|(at, _)| now.duration_since(at) < STATUS_REFRESH)
        {
            return;
        }
        let polls = collector.histogram().total();
        let rate = self.last.map_or(0, |(at, before)| {
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            (polls.saturating_sub(before) as f64 / secs).round() as u64
        });
        self.last = Some((now, polls));
        crate::present::output::status(Some(crate::term::status_text(
            rate,
            stalls,
            events::ms(threshold_ns),
            requests.map_or(0, |maps| {
                let totals = maps.totals();
                usize::try_from(totals.started.saturating_sub(totals.ended)).unwrap_or(usize::MAX)
            }),
            now.duration_since(self.started).as_secs(),
        )));
    }
}
