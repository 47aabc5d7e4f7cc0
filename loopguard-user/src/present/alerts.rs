//! Renders what the threshold rules add to stalls: cumulative alerts and
//! moves of the adaptive threshold (a JSON object or a text line each), and
//! the block of offending events `loopguard run --fail-on` prints at the end.

use crate::detect::adaptive::AdaptiveThreshold;
use crate::detect::cumulative::CumulativeDetector;
use crate::detect::{FailOn, Rule};
use crate::events::{CumulativeEvent, ThresholdEvent};

/// The text line of a cumulative alert (the cumulative rule's words).
pub fn cumulative_text(alert: &CumulativeEvent) -> String {
    CumulativeDetector::describe(&alert.shown())
}

/// The text line of a threshold move (the adaptive rule's words).
pub fn threshold_text(change: &ThresholdEvent) -> String {
    AdaptiveThreshold::describe(&change.shown())
}

/// Offending events kept for the block at the end; the rest are counted.
pub const OFFENDING_KEPT: usize = 100;

/// What `--fail-on` collects while watching.
#[derive(Clone, Debug, Default)]
pub struct Offending {
    /// `(kind, text line)`, in order, at most [`OFFENDING_KEPT`].
    pub lines: Vec<(FailOn, String)>,
    pub stalls: u64,
    pub cumulative: u64,
}

impl Offending {
    pub fn record(&mut self, kind: FailOn, line: String) {
        match kind {
            FailOn::Stall => self.stalls += 1,
            FailOn::Cumulative => self.cumulative += 1,
        }
        if self.lines.len() < OFFENDING_KEPT {
            self.lines.push((kind, line));
        }
    }

    /// Adds another process's offending events to these.
    pub fn merge(&mut self, other: Self) {
        self.stalls += other.stalls;
        self.cumulative += other.cumulative;
        let room = OFFENDING_KEPT.saturating_sub(self.lines.len());
        self.lines.extend(other.lines.into_iter().take(room));
    }

    pub fn count(&self, kind: FailOn) -> u64 {
        match kind {
            FailOn::Stall => self.stalls,
            FailOn::Cumulative => self.cumulative,
        }
    }

    /// The block printed when `--fail-on kinds` fails the run, or `None`
    /// when nothing of those kinds was seen.
    pub fn block(&self, kinds: &[FailOn]) -> Option<String> {
        let total: u64 = kinds.iter().map(|&k| self.count(k)).sum();
        if total == 0 {
            return None;
        }
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let mut out = vec![format!(
            "loopguard: FAILED (--fail-on {}): {total} offending event(s):",
            names.join(",")
        )];
        let shown: Vec<&String> = self
            .lines
            .iter()
            .filter(|(kind, _)| kinds.contains(kind))
            .map(|(_, line)| line)
            .collect();
        out.extend(shown.iter().map(|line| format!("  {line}")));
        let hidden = total.saturating_sub(shown.len() as u64);
        if hidden > 0 {
            out.push(format!("  ... and {hidden} more (see above)"));
        }
        Some(out.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::cumulative::{RouteShare, TaskShare};
    use crate::detect::{Culprit, CumulativeAlert, Scope};
    use crate::events::build;

    fn event(alert: &CumulativeAlert, thread: &str) -> CumulativeEvent {
        build::cumulative(alert, 7, 50_000_000, 5_000_000, Some(thread.to_owned()))
    }

    fn alert() -> CumulativeAlert {
        CumulativeAlert {
            scope: Scope::Thread(42),
            window_start_ns: 0,
            window_end_ns: 1_000_000_000,
            blocked_ns: 340_000_000,
            polls: 17,
            budget_ns: 200_000_000,
            repeat: 1,
            tasks: vec![TaskShare {
                task_id: Some(9),
                tid: 42,
                polls: 17,
                blocked_ns: 340_000_000,
                request: Some(Culprit {
                    id: 5,
                    method: "GET".into(),
                    route: "/block/repeat".into(),
                    path: "/block/repeat".into(),
                }),
            }],
            routes: vec![RouteShare {
                method: "GET".into(),
                route: "/block/repeat".into(),
                requests: 1,
                polls: 17,
                blocked_ns: 340_000_000,
            }],
        }
    }

    #[test]
    fn a_cumulative_alert_carries_scope_window_total_and_contributors() {
        let value = serde_json::to_value(event(&alert(), "tokio-rt-worker")).unwrap();
        assert_eq!(value["scope"], "thread");
        assert_eq!(value["tid"], 42);
        assert_eq!(value["total_ms"], 340.0);
        assert_eq!(value["polls"], 17);
        assert_eq!(value["window_ms"], 1000.0);
        assert_eq!(value["requests"][0]["route"], "/block/repeat");
        assert_eq!(value["requests"][0]["method"], "GET");
        assert_eq!(value["tasks"][0]["task_id"], 9);
        let line = cumulative_text(&event(&alert(), "tokio-rt-worker"));
        assert!(
            line.starts_with("CUMULATIVE        tid 42 (tokio-rt-worker) blocked 340.0 ms in 17 short polls within 1000 ms (budget 200 ms); by GET /block/repeat 340.0 ms in 17 polls"),
            "{line}"
        );
    }

    #[test]
    fn target_strings_cannot_forge_a_line() {
        let mut forged = alert();
        forged.routes[0].route = "/x\nSTALL fake".into();
        let line = cumulative_text(&event(&forged, "evil\u{1b}]0;title"));
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
    }

    #[test]
    fn the_fail_block_lists_only_the_kinds_asked_for() {
        let mut offending = Offending::default();
        assert_eq!(offending.block(&[FailOn::Stall]), None);
        offending.record(FailOn::Stall, "STALL one".into());
        offending.record(FailOn::Cumulative, "CUMULATIVE two".into());
        let block = offending.block(&[FailOn::Cumulative]).unwrap();
        assert_eq!(
            block,
            "loopguard: FAILED (--fail-on cumulative): 1 offending event(s):\n  CUMULATIVE two"
        );
        assert!(
            offending
                .block(&[FailOn::Stall, FailOn::Cumulative])
                .unwrap()
                .contains("STALL one")
        );
    }
}
