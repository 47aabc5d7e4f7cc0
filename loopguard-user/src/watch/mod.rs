//! Watch: one process, collect → detect → report, until told to stop.
//!
//! Ring buffer events are handled as they arrive; scans read the in-flight
//! poll stacks so a poll that is still stuck is reported while it is stuck,
//! at the fast pace only while the kernel says something may be stuck
//! ([`cadence`]). On stop the ring buffer is drained one last time and the
//! summary printed.
//!
//! [`setup`] discovers, attaches and opens the maps; [`run`] is the watch
//! loop; [`session`] keeps what one watch knows between events and
//! [`findings`] routes each finding. Around them: [`requests`] (the
//! request view), [`census`] (polls stuck before attach), [`metrics_feed`],
//! [`status`] (the status line), [`printer`] and [`banner`].

mod banner;
mod cadence;
mod census;
pub mod findings;
mod metrics_feed;
mod pauses;
mod printer;
mod requests;
mod run;
mod session;
pub mod setup;
mod status;

pub use banner::print_attached;
pub use printer::print_summary;
pub use run::watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::attach::{ProbeLinks, RequestSource, WaitProbes};
use crate::detect::{DetectSettings, RouteFilter};
use crate::events::summary::Summary;
use crate::export::Metrics;
use crate::present::alerts::Offending;
use crate::present::text::Format;
use crate::stacks::StackOptions;

/// How the watch loop runs.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The stall, adaptive and cumulative rules.
    pub detect: DetectSettings,
    /// Routes that raise no alert.
    pub routes: RouteFilter,
    pub format: Format,
    pub scan_interval: Duration,
    /// Where a stall's request comes from (`--requests`).
    pub requests: RequestSource,
    /// Where findings and live values go for `/metrics` (`--metrics-addr`).
    pub metrics: Option<Arc<Metrics>>,
    /// How the wait path is probed (`--wait-probes`).
    pub wait_probes: WaitProbes,
    /// How the uprobes are attached (`--probe-links`).
    pub probe_links: ProbeLinks,
    /// Capture the stacks of stalls (`--no-stacks` turns it off).
    pub capture_stacks: bool,
    pub stacks: StackOptions,
    /// Where to write the folded stacks at exit (`--folded`).
    pub folded: Option<PathBuf>,
    /// The benchmark's floor: with empty programs the agent reads nothing
    /// until it stops.
    pub bench: crate::attach::Bench,
    /// Name the process on every line (pid and program): set when several
    /// processes are watched at once (`run` following its command).
    pub label: bool,
}

/// Why watching stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Interrupted,
    DurationElapsed,
    TargetExited,
    /// Nobody reads stdout any more (`| head -1`).
    OutputClosed,
    /// The target exec'd another program: the probes watched the old one.
    Exec,
}

impl StopReason {
    /// How the summary names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interrupted => "interrupted",
            Self::DurationElapsed => "duration elapsed",
            Self::TargetExited => "target exited",
            Self::OutputClosed => "output closed",
            Self::Exec => "target exec'd another program",
        }
    }
}

/// What a watch produced.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub reason: StopReason,
    /// Stalls and cumulative alerts, for `--fail-on`.
    pub offending: Offending,
}
