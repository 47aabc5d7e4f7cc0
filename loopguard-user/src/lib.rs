//! loopguard's agent: finds the task poll that froze a Tokio event loop.
//!
//! The pipeline, one module per stage:
//! [`discover`] (pid → ELF and `/proc` → [`discover::ProbeTarget`]) →
//! [`attach`] (→ [`attach::AttachedProbes`]) → [`collect`] (ring buffer and
//! in-flight maps → `PollEvent`s and snapshots) → [`detect`] (→ stalls) and
//! [`loops`] (event-loop threads away from their wait → loop stalls) →
//! [`events`] (the typed JSON records) → [`emit`] (stdout as [`report`]'s
//! text or JSON, and the [`record`]ing) and [`summary`], and [`export`]
//! (Prometheus metrics served over HTTP). [`output`] and [`term`] write
//! to the terminal; [`replay`] reads a recording back and [`html`] draws it.
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
        $crate::term::diag_line(&format!($($arg)*));
    }};
}

pub mod agent;
pub mod alerts;
pub mod asgi;
pub mod attach;
pub mod attribute;
pub mod cli;
pub mod collect;
pub mod commands;
pub mod config;
pub mod detect;
pub mod discover;
pub mod emit;
pub mod error;
pub mod events;
pub mod export;
pub mod follow;
pub mod html;
pub mod inflight;
pub mod launch;
pub mod loops;
pub mod outfile;
pub mod output;
pub mod pidfd;
pub mod preflight;
pub mod record;
pub mod replay;
pub mod report;
pub mod run_as;
pub mod stacks;
pub mod summary;
pub mod term;
