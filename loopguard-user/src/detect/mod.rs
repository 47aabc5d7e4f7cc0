//! Detect: turns finished polls, snapshots of in-flight polls and reads of
//! the poll-duration histogram into findings.
//!
//! Four rules, each a small type with its own synthetic-stream tests and
//! one shape ([`rule::Rule`]: check, describe, summary): [`stall`] (one
//! poll over the threshold), [`adaptive`] (the threshold follows a
//! percentile of this process's recent polls), [`cumulative`] (short polls
//! that add up inside a window) and [`loops`] (an event-loop thread away
//! from its wait too long). [`thresholds`] runs them together: the engine
//! the agent feeds, which gives the loop rule the threshold in force and
//! tells it of every poll stall.

pub mod adaptive;
pub mod cumulative;
pub mod exclude;
pub mod loops;
pub mod rule;
pub mod stall;
pub mod thresholds;

pub use adaptive::{AdaptiveSettings, Baseline};
pub use cumulative::{Culprit, CumulativeAlert, CumulativeSettings, Cut, Scope};
pub use exclude::RouteFilter;
pub use rule::Rule;
pub use stall::{Stall, StallDetector, StallKind};
pub use thresholds::{DetectSettings, ThresholdEngine, ThresholdRange};

/// What detection reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    /// The poll is still running and has passed the threshold.
    InProgress(Stall),
    /// The poll returned after at least the threshold.
    Finished {
        stall: Stall,
        /// Whether it had already been reported in progress.
        seen_in_progress: bool,
    },
    /// Short polls added up to more than the budget inside a window.
    Cumulative(CumulativeAlert),
    /// The adaptive threshold moved by more than a tenth since last said.
    ThresholdChanged(ThresholdChange),
}

impl Finding {
    /// The stall, for the two stall findings.
    pub fn stall(&self) -> Option<&Stall> {
        match self {
            Self::InProgress(stall) | Self::Finished { stall, .. } => Some(stall),
            Self::Cumulative(_) | Self::ThresholdChanged(_) => None,
        }
    }

    /// Which `--fail-on` kind the finding is, if any.
    pub fn fail_on(&self) -> Option<FailOn> {
        match self {
            Self::Finished { .. } => Some(FailOn::Stall),
            Self::Cumulative(_) => Some(FailOn::Cumulative),
            Self::InProgress(_) | Self::ThresholdChanged(_) => None,
        }
    }
}

/// A move of the adaptive threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdChange {
    /// ns, `CLOCK_MONOTONIC`.
    pub at_ns: u64,
    /// ns, the threshold last announced.
    pub from_ns: u64,
    /// ns, the threshold now.
    pub to_ns: u64,
    pub baseline: Baseline,
    pub percentile: f64,
    pub multiplier: f64,
}

/// What `loopguard run --fail-on` fails on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FailOn {
    /// A poll over the threshold.
    Stall,
    /// Short polls over the cumulative budget.
    Cumulative,
}

impl FailOn {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stall => "stall",
            Self::Cumulative => "cumulative",
        }
    }
}
