//! Events: the typed records of `--format json` and `--record`, one JSON
//! object per line, tagged by `type`. These types are the contract scripts
//! rely on (docs/EVENTS.md, docs/events.schema.json): field names, once
//! published, stay; new fields may be added, and `schema_version` in the
//! `attached` event says which set a stream has.
//!
//! [`build`] makes them from findings and the summary; [`clock`] gives the
//! RFC 3339 wall-clock times printed beside the monotonic nanoseconds.
//! Text lines are rendered from these same records ([`crate::present::text`]), so a
//! recording replays to exactly what a live run printed.

pub mod build;
pub mod clock;
pub mod shown;
pub mod summary;

use serde::{Deserialize, Serialize};

use crate::collect::lost::Lost;

/// The schema these records follow: bumped when a field changes meaning
/// or goes away (adding one does not).
pub const SCHEMA_VERSION: u32 = 1;

/// One line of the JSON stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Attached(Attached),
    StallInProgress(StallEvent),
    Stall(StallEvent),
    Cumulative(CumulativeEvent),
    Threshold(ThresholdEvent),
    Summary(Box<SummaryEvent>),
    Followed(Followed),
}

impl Event {
    /// The `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Attached(_) => "attached",
            Self::StallInProgress(_) => "stall_in_progress",
            Self::Stall(_) => "stall",
            Self::Cumulative(_) => "cumulative",
            Self::Threshold(_) => "threshold",
            Self::Summary(_) => "summary",
            Self::Followed(_) => "followed",
        }
    }

    /// The JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The probes are in place: what was found and attached, and the rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a wire record: each bool is one published yes/no field, not a state"
)]
pub struct Attached {
    pub pid: u32,
    pub exe: String,
    /// `tokio` or `loop` (no Tokio: only event-loop threads are watched).
    pub mode: String,
    pub loop_only_reason: Option<String>,
    pub poll_functions: usize,
    pub task_ids_verified: usize,
    pub blocking_pool_functions_unprobed: usize,
    /// Poll functions whose task layout is not one loopguard knows: probed,
    /// without task ids.
    #[serde(default)]
    pub unknown_layout_functions: Vec<String>,
    pub probes: usize,
    /// How the uprobes are linked: `uprobe_multi` or `perf_event`
    /// (recordings made before it existed have none).
    #[serde(default)]
    pub probe_links: String,
    /// Links holding the probes.
    #[serde(default)]
    pub links: usize,
    /// Seconds attaching took.
    #[serde(default)]
    pub attach_s: f64,
    pub request_probe_sites: usize,
    pub request_probes_attached: bool,
    pub wait_sites: usize,
    pub wait_functions: Vec<String>,
    pub wait_probes: String,
    /// Where the time the host took from a thread (steal) is read: `run
    /// queue` (at context switches and ticks) or `runtime updates` (at
    /// every scheduler clock update); empty in recordings from before.
    #[serde(default)]
    pub steal_clock: String,
    pub threshold_ms: f64,
    pub adaptive: bool,
    pub cumulative: bool,
    pub report_floor_ms: f64,
    /// The adaptive rule's settings (null when it is off; recordings made
    /// before the banner was replayable have none).
    #[serde(default)]
    pub adaptive_rule: Option<AdaptiveRule>,
    /// The cumulative rule's settings (null when it is off; as above).
    #[serde(default)]
    pub cumulative_rule: Option<CumulativeRule>,
    /// Wait sites that are epoll wrappers (the rest are Tokio's parks).
    #[serde(default)]
    pub epoll_wait_sites: usize,
    #[serde(default)]
    pub park_wait_sites: usize,
    /// `--no-requests` (`--requests off`) turned requests off.
    #[serde(default)]
    pub requests_off: bool,
    /// Where stalls' requests come from: `table`, `probes` or `off`
    /// (`--requests`; empty in recordings from before the table mode, which
    /// used the probes).
    #[serde(default)]
    pub request_source: String,
    /// The layout of the middleware's in-flight table (null: none found).
    #[serde(default)]
    pub inflight_table_version: Option<u32>,
    /// [`SCHEMA_VERSION`] of this stream.
    pub schema_version: u32,
    /// loopguard's own version.
    pub version: String,
    /// ns, `CLOCK_MONOTONIC` (the clock of every `_ns` field), when the
    /// probes were in place.
    pub at_ns: u64,
    /// RFC 3339 of `at_ns`.
    pub time: String,
}

/// The adaptive rule as `attached` states it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveRule {
    /// Polls the window must hold before the rule takes over.
    pub min_samples: u64,
    pub multiplier: f64,
    /// 0.5..=0.999.
    pub percentile: f64,
    pub floor_ms: f64,
    pub ceiling_ms: f64,
}

/// The cumulative rule as `attached` states it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CumulativeRule {
    /// ms of short polls a window may hold without an alert.
    pub budget_ms: f64,
    pub window_ms: f64,
    /// The shortest poll that counts.
    pub floor_ms: f64,
}

/// A request as stalls name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The middleware's request id.
    pub id: u64,
    pub method: String,
    /// Route template (`/users/{id}`), when the framework gave one.
    pub route: Option<String>,
    pub path: String,
}

/// A stall (`type` `stall`: finished; `stall_in_progress`: still stuck).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StallEvent {
    /// `poll` (one task poll) or `loop` (an event loop away from its wait).
    pub kind: String,
    pub pid: u32,
    pub tid: u32,
    /// The thread's name (`comm`).
    pub thread: String,
    pub task_id: Option<u64>,
    /// ms, how long it blocked (so far, in progress).
    pub duration_ms: f64,
    /// ms, the threshold in force when it was detected.
    pub threshold_ms: f64,
    /// The request its task served (needs the middleware).
    pub request: Option<RequestRecord>,
    pub victim_count: usize,
    /// The other requests in flight (at most 20; `victim_count` counts all).
    pub victims: Vec<RequestRecord>,
    /// ns, `CLOCK_MONOTONIC`, when the poll began.
    pub start_ns: u64,
    pub poll_fn: String,
    pub polled_from: Option<String>,
    /// Finished stalls: whether it was reported in progress first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_in_progress: Option<bool>,
    /// With stack capture on.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<StackFields>,
    /// The task header's address, when the task id is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_header: Option<u64>,
    /// RFC 3339 of `start_ns`.
    pub start_time: String,
    /// RFC 3339, when the line was made.
    pub time: String,
}

/// What stack capture adds to a stall.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackFields {
    /// Innermost first.
    pub stack: Vec<FrameRecord>,
    pub stack_samples: usize,
    pub cause: Option<CauseRecord>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started_before_attach: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRecord {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
}

/// Where the stalled poll spent its time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CauseRecord {
    /// `cpu`, `syscall`, `off_cpu` or `mixed`.
    pub kind: String,
    /// The system call slept in longest: its name, or its number.
    pub syscall: Option<String>,
    pub on_cpu_ms: f64,
    pub off_cpu_ms: f64,
    pub cpu_wait_ms: f64,
}

/// Short polls over the budget inside a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CumulativeEvent {
    pub pid: u32,
    /// `thread` or `process`.
    pub scope: String,
    pub tid: Option<u32>,
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    pub window_ms: f64,
    pub total_ms: f64,
    pub polls: u64,
    pub budget_ms: f64,
    pub floor_ms: f64,
    pub threshold_ms: f64,
    pub repeat: u64,
    pub tasks: Vec<TaskShareRecord>,
    /// Routes, worst first.
    pub requests: Vec<RouteShareRecord>,
    /// The thread's name (scope `thread`).
    #[serde(default)]
    pub thread: Option<String>,
    pub window_start_time: String,
    pub window_end_time: String,
    pub time: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskShareRecord {
    pub task_id: Option<u64>,
    pub tid: u32,
    pub polls: u64,
    pub total_ms: f64,
    pub request: Option<RequestRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteShareRecord {
    pub method: String,
    pub route: String,
    pub requests: u64,
    pub polls: u64,
    pub total_ms: f64,
}

/// The adaptive threshold moved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdEvent {
    pub pid: u32,
    pub threshold_ms: f64,
    pub previous_ms: f64,
    pub percentile: f64,
    pub percentile_ms: f64,
    pub multiplier: f64,
    pub samples: u64,
    pub at_ns: u64,
    pub at_time: String,
    pub time: String,
}

/// The end of a run: everything the text summary shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryEvent {
    pub pid: u32,
    pub threshold_ms: f64,
    pub threshold: ThresholdSummary,
    pub cumulative_alerts: u64,
    pub preempted_polls_not_counted: u64,
    pub excluded: ExcludedSummary,
    pub elapsed_s: f64,
    pub stop_reason: String,
    pub polls: u64,
    pub blocking_pool_polls: u64,
    pub stalls: u64,
    pub stalls_unfinished: usize,
    pub total_stall_ms: f64,
    pub longest_stall_ms: Option<f64>,
    pub longest_stall_task_id: Option<u64>,
    pub poll_p50_ms_upper: Option<f64>,
    pub poll_p99_ms_upper: Option<f64>,
    pub dropped_events: u64,
    pub unmatched_returns: u64,
    pub stack_overflows: u64,
    pub thread_map_full: u64,
    /// Request starts not tracked: the kernel's request map had no room.
    /// (Absent from recordings made before it was counted apart.)
    #[serde(default)]
    pub request_map_full: u64,
    /// Thread slots that could not be put back for reuse.
    /// (Absent from recordings made before it was reported.)
    #[serde(default)]
    pub thread_slot_leaked: u64,
    pub requests: RequestsSummary,
    pub stacks: Vec<StackSummary>,
    pub loop_threads: Vec<LoopThreadSummary>,
    /// The longest stall in full.
    #[serde(default)]
    pub longest_stall: Option<LongestStall>,
    /// Worker poll durations: the kernel histogram's non-empty slots.
    #[serde(default)]
    pub poll_histogram: Vec<HistogramSlot>,
    /// ns, `CLOCK_MONOTONIC`, when watching stopped.
    #[serde(default)]
    pub at_ns: u64,
    /// RFC 3339 of `at_ns`.
    pub time: String,
}

impl SummaryEvent {
    /// The count of one cause of lost data: the one place that ties a
    /// [`Lost`] to its JSON field.
    pub fn lost(&self, cause: Lost) -> u64 {
        match cause {
            Lost::DroppedEvents => self.dropped_events,
            Lost::UnmatchedReturns => self.unmatched_returns,
            Lost::StackOverflow => self.stack_overflows,
            Lost::ThreadMapFull => self.thread_map_full,
            Lost::RequestMapFull => self.request_map_full,
            Lost::SlotLeaked => self.thread_slot_leaked,
        }
    }

    pub fn lost_mut(&mut self, cause: Lost) -> &mut u64 {
        match cause {
            Lost::DroppedEvents => &mut self.dropped_events,
            Lost::UnmatchedReturns => &mut self.unmatched_returns,
            Lost::StackOverflow => &mut self.stack_overflows,
            Lost::ThreadMapFull => &mut self.thread_map_full,
            Lost::RequestMapFull => &mut self.request_map_full,
            Lost::SlotLeaked => &mut self.thread_slot_leaked,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThresholdSummary {
    pub adaptive: bool,
    pub min_ms: f64,
    pub max_ms: f64,
    pub current_ms: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExcludedSummary {
    pub stalls: u64,
    pub cumulative_polls: u64,
    pub cumulative_ms: f64,
}

/// What the middleware's probes told over the run: the kernel's request
/// totals and the stalls per route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestsSummary {
    pub started: u64,
    pub ended: u64,
    pub in_flight: usize,
    pub peak_in_flight: usize,
    pub capacity: usize,
    pub evicted: u64,
    pub unmatched_ends: u64,
    pub unattributable_starts: u64,
    pub layout_mismatches: u64,
    /// Worst total stall time first.
    pub routes: Vec<RouteSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSummary {
    /// `METHOD route`.
    pub route: String,
    pub stalls: u64,
    pub total_stall_ms: f64,
    pub longest_stall_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackSummary {
    pub label: String,
    pub folded: String,
    pub stalls: u64,
    pub total_stall_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopThreadSummary {
    pub tid: u32,
    pub thread: String,
    pub busy_ms: f64,
    pub wait_ms: f64,
    pub waits: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LongestStall {
    pub kind: String,
    pub tid: u32,
    pub task_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_header: Option<u64>,
    pub duration_ms: f64,
    pub start_ns: u64,
}

/// One slot of the poll-duration histogram: polls that lasted
/// `lower_ns` (inclusive) to `upper_ns` (exclusive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSlot {
    pub lower_ns: u64,
    pub upper_ns: u64,
    pub count: u64,
}

/// ns to ms, rounded to the µs: how every `_ms` field is given.
pub fn ms(ns: u64) -> f64 {
    (ns as f64 / 1000.0).round() / 1000.0
}

/// The end of `run` following its command: which programs were attached
/// and which were skipped, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Followed {
    pub attached: Vec<FollowedProcess>,
    pub skipped: Vec<FollowedProcess>,
}

/// One program `run` saw its command start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FollowedProcess {
    pub pid: u32,
    pub exe: String,
    /// Attached: probes put in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<usize>,
    /// Attached: ms it was held stopped at exec while attaching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_ms: Option<f64>,
    /// Skipped: why, as a word and as a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// What a stall is shown with besides its numbers.
#[derive(Clone, Debug, Default)]
pub struct StallContext {
    /// The thread's name (`comm`).
    pub thread: String,
    /// The `raw::poll` copy's name (v0 builds name the future type in it).
    pub poll_fn: String,
    /// The function the poll returns into: the scheduler that polled.
    pub polled_from: Option<String>,
    /// The request the stalled task was serving (needs the middleware).
    pub request: Option<crate::attribute::Request>,
    /// Other requests in flight while the thread was blocked (at most 20).
    pub victims: Vec<crate::attribute::Request>,
    /// How many there were in all.
    pub victim_count: usize,
    /// Where the poll spent its time and why (stack capture on).
    pub stack: Option<crate::stacks::StallStack>,
}
