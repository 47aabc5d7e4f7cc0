//! Names the HTTP request behind a blocked Tokio worker, for loopguard.
//!
//! loopguard's agent sees *which Tokio task* blocked a worker thread. This
//! crate lets it also tell *which request* that task was serving (method,
//! route template and path) and which requests waited behind it, two ways:
//!
//! - an **in-flight table** in the process's memory (the agent's default,
//!   `--requests table`): every request, its thread, the start and end of
//!   its future's last long poll, and its end, kept until its slot is
//!   reused. The agent reads it only when it sees a stall, so a request
//!   costs no kernel entry;
//! - two **USDT probes** per request, fired from inside the task that runs
//!   the handler (`--requests probes`): two kernel entries per request
//!   while an agent is attached, for exact victim counts and per-route
//!   request counters.
//!
//! # Usage
//!
//! With axum (0.8), add [`LoopguardLayer`] with `Router::layer` **after the
//! routes**, so that the route template (`axum::extract::MatchedPath`) is in
//! the request extensions when the layer sees the request:
//!
//! ```
//! # #[cfg(feature = "axum")] {
//! use axum::Router;
//! use axum::routing::get;
//! use loopguard_middleware::LoopguardLayer;
//!
//! let app: Router = Router::new()
//!     .route("/users/{id}", get(|| async { "a user" }))
//!     .layer(LoopguardLayer::new());
//! // axum::serve(listener, app).await?;
//! # drop(app);
//! # }
//! ```
//!
//! Applied around the whole router instead (`LoopguardLayer::new().layer(router)`,
//! or a `ServiceBuilder` outside `axum::serve`), the layer runs before routing
//! and reports the route as unknown; the path is still reported.
//!
//! [`LoopguardLayer`] is a plain tower layer over
//! `Service<http::Request<B>, Response = http::Response<ResBody>>`, so it also
//! wraps hyper services (through `hyper_util::service::TowerToHyperService`)
//! and tonic servers (`Server::builder().layer(LoopguardLayer::new())`; gRPC
//! answers are HTTP 200 whatever the gRPC status, and the path is
//! `/package.Service/Method`). Only axum provides a route template.
//!
//! For other frameworks (actix-web, ...), call [`request_start`] and
//! [`request_end`] or hold a [`RequestGuard`] **inside the task that runs the
//! handler**; see their docs.
//!
//! # Probe contract
//!
//! Provider [`PROVIDER`] (`loopguard`). Both probes are `.note.stapsdt` ELF
//! notes without a semaphore; every argument is an 8-byte integer register
//! (`-8@%reg` in the note). Strings are (pointer, length) pairs, not
//! NUL-terminated, valid only while the probe fires: read them at once.
//!
//! | probe | # | argument |
//! |---|---|---|
//! | [`REQUEST_START`] (`request_start`), [`REQUEST_START_ARGS`] = 8 args | 1 | [`LAYOUT_VERSION`] (1) |
//! | | 2 | request id: u64, unique in the process, from 1 up |
//! | | 3 | method pointer (`http::Method::as_str`) |
//! | | 4 | method length in bytes |
//! | | 5 | route template pointer (`/users/{id}`), null when unknown |
//! | | 6 | route template length, 0 when unknown |
//! | | 7 | path pointer (`Uri::path`, no query string) |
//! | | 8 | path length in bytes |
//! | [`REQUEST_END`] (`request_end`), [`REQUEST_END_ARGS`] = 3 args | 1 | [`LAYOUT_VERSION`] (1) |
//! | | 2 | request id, as in `request_start` |
//! | | 3 | HTTP status of the response head; 0 when there is none (inner service error, handler panicked, request cancelled) |
//!
//! Timing, which is what the agent relies on:
//!
//! - `request_start` fires at the start of the **first poll** of the future
//!   that runs the handler, not in `Service::call`: hyper's HTTP/2 server
//!   calls `call` on the connection task and spawns the returned future as a
//!   task of its own. The agent ties the request id to the Tokio task being
//!   polled on the thread when the probe fires.
//! - `request_end` fires when the handler's future completes, i.e. when the
//!   response *head* is ready; a streaming body is produced afterwards,
//!   outside the request's span.
//! - A future dropped after `request_start` and before completing (client
//!   hung up, timeout, or unwinding from a panic in the handler) fires
//!   `request_end` with status 0 after the handler's future is dropped. A
//!   future never polled fires neither probe. Responses, errors and panics
//!   pass through unchanged (nothing is caught).
//! - Each `request_start` is followed by exactly one `request_end` with the
//!   same id on the same task (with `panic = "abort"` a panic ends the
//!   process instead).
//!
//! The probe sites live in non-inlined functions, so a binary normally holds
//! one note per probe; agents should still attach to every note of that
//! name, as for any USDT probe.
//!
//! # The in-flight table
//!
//! The crate keeps every request in a static table (`loopguard_usdt::INFLIGHT_*`,
//! layout 2, in `.bss`): id, method, route and path (cut to 16 and
//! 64 bytes), start time, which thread polls its future now, its last poll
//! of a clock tick or more (thread, start, end) and its end. A request takes
//! slot `id % 256`, or one of the next three when that one holds a request
//! in flight; an ended request stays until its slot is taken again, so an
//! agent reading after a stall still finds the request that ended inside the
//! poll that blocked, and a request that ended in a poll of two clock ticks
//! or more is also copied into a ring of 64 (75 KiB in all). A third note, `loopguard:inflight_table`, never fires:
//! its semaphore field carries the table's address, so the table is found in
//! stripped binaries too. Each slot is a sequence lock, so the agent reads
//! whole entries only. The same table names the request behind a poll that
//! was already stuck when the agent attached (its `request_start` fired
//! with nobody listening).
//!
//! What the table gives the agent, and what it does not: the culprit of
//! every stall (named while the stall is in progress, remembered until its
//! end) and the victims still in the table; under heavy traffic the short
//! requests that started and ended during a stall may have had their slots
//! taken again before the agent looked, so the victim count is a lower
//! bound, and nothing counts requests per route. The probes give both.
//!
//! # Cost without an agent
//!
//! A probe site is one `nop` instruction, preceded by the register moves that
//! load its arguments, inside a function call: no system call, no branch on
//! a semaphore, no locking. Only an attached agent in probe mode turns the
//! `nop` into a breakpoint. The in-flight table adds per request a copy of at
//! most 144 bytes of text and a few atomic stores (one compare-and-swap per
//! write section), and per poll of the response future two marks, each one
//! `clock_gettime` of the coarse clock (vDSO) and a few stores; no lock, no
//! allocation, and no system call after a thread's first request (its
//! thread id is cached). Per request the layer adds one relaxed atomic increment (the
//! id), clones of the method (a plain enum value for standard methods), of
//! the `MatchedPath` (an `Arc` increment) and of the `Uri` (reference count
//! increments on its `Bytes`), and keeps them in the response future until
//! its first poll. It allocates nothing in the common case (only a method
//! longer than 15 bytes or a URI scheme other than http/https allocates, as
//! cloning them does). `examples/overhead.rs` measures it.

mod inflight;
mod probes;
mod service;

pub use probes::{
    LAYOUT_VERSION, PROVIDER, REQUEST_END, REQUEST_END_ARGS, REQUEST_START, REQUEST_START_ARGS,
    RequestGuard, next_request_id, request_end, request_start,
};
pub use service::{LoopguardLayer, LoopguardService, ResponseFuture};
