//! loopguard's agent: finds the task poll that froze a Tokio event loop.
//!
//! One folder per pipeline stage, in the order the data flows (each stage
//! imports only the ones above it in this list):
//!
//! 1. [`discover`]: pid → ELF and `/proc` → [`discover::ProbeTarget`];
//!    [`discover::preflight`] checks privileges and the kernel first.
//! 2. [`attach`]: → [`attach::AttachedProbes`].
//! 3. [`collect`]: ring buffer and maps → `PollEvent`s, snapshots and the
//!    end-of-run totals ([`collect::totals`]).
//! 4. [`detect`]: → stalls (the threshold rules) and loop stalls
//!    ([`detect::loops`]: event-loop threads away from their wait).
//! 5. [`attribute`]: a stall → the request it served and the ones it held
//!    up ([`attribute::inflight`]: the kernel's in-flight table).
//! 6. [`stacks`]: where a stalled thread was.
//! 7. [`events`]: the typed JSON records.
//! 8. [`export`]: Prometheus metrics served over HTTP.
//! 9. [`present`]: the report as text or JSON on stdout, the recording,
//!    alerts, stacks as text, replay and the HTML page.
//! 10. [`config`]: flags ([`config::args`]) and the TOML file merged into
//!     the settings the rules run with.
//! 11. [`watch`]: the watch loop over one process.
//! 12. [`follow`]: `loopguard run`: launch, follow forks, supervise.
//! 13. [`host`]: `loopguard watch --all`: every matching event loop on the
//!     host, with one `/metrics` labelled by who each target is.
//! 14. [`cli`]: the subcommands, and [`error`] with their exit codes.
//!
//! [`term`] (colour, the status line, diagnostics) is used by all, and
//! [`privilege`] (the capabilities kept once a watch is set up) by the
//! commands.

/// Writes one diagnostic line to stderr, like `eprintln!`, but ignores a
/// closed or full stderr: losing a diagnostic must never stop loopguard, and
/// above all never its detach.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {{
        $crate::term::diag_line(&format!($($arg)*));
    }};
}

pub mod term;

pub mod privilege;

pub mod discover;

pub mod attach;

pub mod collect;

pub mod detect;

pub mod attribute;

pub mod stacks;

pub mod events;

pub mod export;

pub mod present;

pub mod config;

pub mod watch;

pub mod follow;

pub mod host;

pub mod error;

pub mod cli;

#[cfg(test)]
mod layers;

#[cfg(test)]
mod lengths;
