//! Export: the findings as Prometheus metrics, served over HTTP.
//!
//! [`labels`] keeps label values bounded, [`live`] derives what is stuck
//! now and how busy each worker is from the kernel's poll stacks,
//! [`metrics`] holds every metric and renders the text format, [`server`]
//! answers scrapes.

pub mod fleet;
pub mod labels;
pub mod live;
pub mod metrics;
pub mod server;

pub use metrics::{BlockingKind, LiveState, Metrics, TargetInfo, ThreadBusy};
pub use server::ExportError;
