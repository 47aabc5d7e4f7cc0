//! The USDT probes the `loopguard-middleware` crate fires, and what the
//! agent expects of them. `loopguard-common` re-exports this as
//! `loopguard_common::usdt`; the middleware depends on this crate only, so
//! an application never builds aya (see the crate's `Cargo.toml`).
#![no_std]

/// Provider of every loopguard probe.
pub const PROVIDER: &str = "loopguard";
/// `request_start(layout, id, method_ptr, method_len, route_ptr, route_len, path_ptr, path_len)`.
pub const REQUEST_START: &str = "request_start";
/// `request_end(layout, id, status)`.
pub const REQUEST_END: &str = "request_end";
/// Arguments of `request_start`.
pub const REQUEST_START_ARGS: usize = 8;
/// Arguments of `request_end`.
pub const REQUEST_END_ARGS: usize = 3;
/// The argument layout this agent understands (the first argument of both probes).
pub const LAYOUT_VERSION: u64 = 1;
