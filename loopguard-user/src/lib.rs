//! loopguard's agent: finds the task poll that froze a Tokio event loop.
//!
//! The pipeline, one module per stage:
//! [`discover`] (pid → ELF and `/proc` → [`discover::ProbeTarget`]) →
//! [`attach`] (→ [`attach::AttachedProbes`]) → [`collect`] (ring buffer and
//! in-flight maps → `PollEvent`s and snapshots) → [`detect`] (→ stalls) and
//! [`loops`] (event-loop threads away from their wait → loop stalls) →
//! [`report`] (text or JSON lines) and [`summary`], and [`export`]
//! (Prometheus metrics served over HTTP).
//! [`config`] merges flags and the TOML file into the settings the rules
//! run with; [`alerts`] renders what the threshold rules find.
//! [`agent`] runs the loop, [`commands`] the subcommands, [`launch`] starts
//! the program of `loopguard run`; [`preflight`] checks privileges and the
//! kernel first.

/// Writes one diagnostic line to stderr, like `eprintln!`, but ignores a
/// closed or full stderr: losing a diagnostic must never stop loopguard, and
/// above all never its detach.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod agent;
pub mod alerts;
pub mod attach;
pub mod attribute;
pub mod cli;
pub mod collect;
pub mod commands;
pub mod config;
pub mod detect;
pub mod discover;
pub mod error;
pub mod export;
pub mod launch;
pub mod loops;
pub mod output;
pub mod pidfd;
pub mod preflight;
pub mod report;
pub mod stacks;
pub mod summary;
