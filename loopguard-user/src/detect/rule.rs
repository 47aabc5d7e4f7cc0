//! The one shape of a rule (in the spirit of tokio-console's `Warn`): its
//! check, the text of one of its findings, and its lines in the summary,
//! kept together.
//!
//! Input of the check: whatever the rule watches (polls, loop stretches,
//! histogram reads, cuts). Output: what it found. The text comes from
//! plain data ([`Rule::Shown`], [`Rule::Totals`]) that a live finding and a
//! recorded event both fill, so `loopguard report` replays a recording to
//! what the live run printed; `present` places the strings.

use crate::term::printable;

use super::StallKind;
use super::loops::LoopDetector;
use super::stall::StallDetector;

/// A detection rule.
pub trait Rule {
    /// What one check looks at.
    type Input<'a>;
    /// What one check finds.
    type Found;
    /// One finding of the rule, as its text line needs it.
    type Shown<'a>;
    /// What the run's summary holds of the rule.
    type Totals<'a>: ?Sized;

    /// Runs the rule on one input.
    fn check(&mut self, input: Self::Input<'_>) -> Self::Found;

    /// The text line of one finding.
    fn describe(shown: &Self::Shown<'_>) -> String;

    /// The rule's lines in the summary (none when it has nothing to say).
    fn summary(totals: &Self::Totals<'_>) -> Vec<String>;
}

/// A stall (of a task poll or of a loop), as its line says it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StallShown<'a> {
    pub kind: StallKind,
    pub in_progress: bool,
    pub tid: u32,
    /// The thread's name (`comm`), escaped here.
    pub thread: &'a str,
    pub task_id: Option<u64>,
    /// The task header's address, when the task id is unknown.
    pub header: Option<u64>,
    pub duration_ms: f64,
    pub threshold_ms: f64,
}

/// The longest stall of a run, as the summary says it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LongestShown {
    pub kind: StallKind,
    pub tid: u32,
    pub task_id: Option<u64>,
    pub header: Option<u64>,
    pub duration_ms: f64,
}

/// What the summary holds of stalls, both kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StallTotals {
    pub longest: Option<LongestShown>,
    pub total_ms: f64,
    /// Stalls still in progress at exit.
    pub unfinished: usize,
}

/// The head of a stall's line (the request and the stack follow it), by
/// the rule of its kind.
pub fn stall_line(shown: &StallShown) -> String {
    match shown.kind {
        StallKind::Poll => StallDetector::describe(shown),
        StallKind::Loop => LoopDetector::describe(shown),
    }
}

/// `LABEL tid N (thread) task T blocked D ms (threshold T ms)`, with the
/// label and verb of a stall in progress or finished.
pub(super) fn stall_head(labels: [&str; 2], shown: &StallShown) -> String {
    let (label, verb) = if shown.in_progress {
        (labels[0], "blocked for")
    } else {
        (labels[1], "blocked")
    };
    format!(
        "{label:<17} tid {tid} ({thread}) {task} {verb} {duration:.1} ms (threshold {threshold} ms)",
        tid = shown.tid,
        thread = printable(shown.thread),
        task = task_label(shown.kind, shown.task_id, shown.header),
        duration = shown.duration_ms,
        threshold = shown.threshold_ms,
    )
}

/// What blocked: a task (by id, else header address) or the event loop.
pub fn task_label(kind: StallKind, task_id: Option<u64>, header: Option<u64>) -> String {
    if kind == StallKind::Loop {
        return "its event loop (outside any task poll)".to_owned();
    }
    match (task_id, header) {
        (Some(id), _) => format!("task {id}"),
        (None, Some(header)) => format!("task@{header:#x}"),
        (None, None) => "task ?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(kind: StallKind, in_progress: bool) -> StallShown<'static> {
        StallShown {
            kind,
            in_progress,
            tid: 7,
            thread: "main\n",
            task_id: None,
            header: Some(0x10),
            duration_ms: 61.24,
            threshold_ms: 50.0,
        }
    }

    #[test]
    fn each_kind_has_its_rules_words() {
        assert_eq!(
            stall_line(&shown(StallKind::Poll, true)),
            "STALL IN PROGRESS tid 7 (main\\n) task@0x10 blocked for 61.2 ms (threshold 50 ms)"
        );
        assert_eq!(
            stall_line(&shown(StallKind::Loop, false)),
            "LOOP STALL        tid 7 (main\\n) its event loop (outside any task poll) blocked 61.2 ms (threshold 50 ms)"
        );
    }
}
