//! `loopguard watch --all`: every event loop on the host.
//!
//! - [`select`]: which processes (selectors over identity and runtime);
//! - [`budget`]: how many targets and probes at once, and saying why a
//!   process is not watched once;
//! - [`inspect`]: one process → skip, refuse (with why) or a candidate;
//! - [`agent`]: the loop: the processes already running, every exec after,
//!   one watch per target, one `/metrics` for all
//!   ([`crate::export::fleet`]).

pub mod agent;
pub mod budget;
pub mod inspect;
pub mod select;

pub use agent::{HostSummary, watch_host};
