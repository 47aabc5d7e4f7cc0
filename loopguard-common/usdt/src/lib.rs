//! The USDT probes the `loopguard-middleware` crate fires, and what the
//! agent expects of them. `loopguard-common` re-exports this as
//! `loopguard_common::usdt`; the middleware depends on this crate only, so
//! an application never builds aya (see the crate's `Cargo.toml`).
#![no_std]

/// Provider of every loopguard probe.
pub const PROVIDER: &str = "loopguard";
/// `request_start(layout, id, method_ptr, method_len, route_ptr, route_len, path_ptr, path_len)`,
/// at the positions in [`start_arg`].
pub const REQUEST_START: &str = "request_start";
/// `request_end(layout, id, status)`, at the positions in [`end_arg`].
pub const REQUEST_END: &str = "request_end";
/// Arguments of `request_start`.
pub const REQUEST_START_ARGS: usize = start_arg::PATH_LEN + 1;
/// Arguments of `request_end`.
pub const REQUEST_END_ARGS: usize = end_arg::STATUS + 1;
/// The argument layout this agent understands (the first argument of both
/// probes, [`LAYOUT_ARG`]).
pub const LAYOUT_VERSION: u64 = 1;
/// Position of the layout version among the arguments, the same in every
/// probe so that a site is judged before anything else is read.
pub const LAYOUT_ARG: usize = 0;

/// Positions of `request_start`'s arguments (0-based, all 8 bytes wide):
/// the order the middleware passes them in and the kernel side reads them.
pub mod start_arg {
    /// [`super::LAYOUT_VERSION`].
    pub const LAYOUT: usize = super::LAYOUT_ARG;
    /// The request id (never 0).
    pub const ID: usize = 1;
    /// Pointer to the method's bytes.
    pub const METHOD_PTR: usize = 2;
    /// Bytes of method.
    pub const METHOD_LEN: usize = 3;
    /// Pointer to the route template's bytes (null when there is none).
    pub const ROUTE_PTR: usize = 4;
    /// Bytes of route template (0 when there is none).
    pub const ROUTE_LEN: usize = 5;
    /// Pointer to the path's bytes (no query string).
    pub const PATH_PTR: usize = 6;
    /// Bytes of path.
    pub const PATH_LEN: usize = 7;
}

/// Positions of `request_end`'s arguments (0-based, all 8 bytes wide).
pub mod end_arg {
    /// [`super::LAYOUT_VERSION`].
    pub const LAYOUT: usize = super::LAYOUT_ARG;
    /// The request id `request_start` was given.
    pub const ID: usize = 1;
    /// The HTTP status (0: no response was produced).
    pub const STATUS: usize = 2;
}

/// The in-flight table: the requests a process is serving, kept by the
/// middleware in a static array so that an agent attaching later can name
/// the request behind a poll that was already stuck (its `request_start`
/// fired before any probe was there to see it).
///
/// The table is found through a note of provider [`PROVIDER`] named
/// [`INFLIGHT_TABLE`] that never fires: its *semaphore* field holds the
/// table's address (prelink-corrected like any semaphore), its arguments
/// string is `"<INFLIGHT_VERSION> <INFLIGHT_SLOTS> <INFLIGHT_SLOT_BYTES>"`.
/// Notes survive `strip`, so the table is found in stripped binaries too.
///
/// Layout: [`INFLIGHT_RESERVED_BYTES`] reserved bytes (a tool enabling the
/// note as a probe would bump a semaphore there), then [`INFLIGHT_SLOTS`]
/// slots of [`INFLIGHT_SLOT_BYTES`] bytes, every field little-endian at the
/// offsets in [`inflight_slot`]. A request takes slot `id % INFLIGHT_SLOTS`
/// (from layout 2, the first of it and the next three that holds no request
/// in flight, so a long request stays while later ones come and go); readers
/// find requests by their `ID`, never by position.
///
/// From [`INFLIGHT_VERSION`] 2 on, one step record of [`INFLIGHT_STEP_BYTES`]
/// per slot follows the slots (at [`INFLIGHT_STEPS_AT`], as in the memfd
/// table below), covered by its slot's sequence lock: `LOOP_TID` the thread
/// the request started on, `LONG_*` the request future's last poll that
/// took a clock tick or more (its thread, start and end), `ENDED_NS` its
/// end. A slot whose request ended keeps it, texts and all, until a new
/// request takes the slot: an agent that reads the table after a stall still
/// finds the request that ended inside the blocked poll. Then (at
/// [`INFLIGHT_LONG_AT`]) a ring of [`INFLIGHT_LONG_ENDS`] slots and their
/// step records (at [`INFLIGHT_LONG_STEPS_AT`]), same layout: a copy of each
/// request that ended in a poll of two ticks or more, so a stall's culprit
/// outlives its slot when traffic takes it again. Version 1 tables (no step
/// records; a slot is freed, `ID` 0, at its request's end) are still read.
///
/// Each slot is a sequence lock: a writer makes `seq` odd before changing
/// anything and even again after; a reader keeps a copy only if it read
/// the same even `seq` before and after copying.
pub const INFLIGHT_TABLE: &str = "inflight_table";
/// Version of the table layout, the first word of the note's arguments.
pub const INFLIGHT_VERSION: u32 = 2;
/// The first layout: slots only, freed at each request's end.
pub const INFLIGHT_VERSION_SLOTS_ONLY: u32 = 1;
/// Slots in the table.
pub const INFLIGHT_SLOTS: usize = 256;
/// Bytes before the first slot.
pub const INFLIGHT_RESERVED_BYTES: usize = 8;
/// Bytes of method kept (longer methods are cut).
pub const INFLIGHT_METHOD_BYTES: usize = 16;
/// Bytes of route template and of path kept (longer ones are cut).
pub const INFLIGHT_TEXT_BYTES: usize = 64;
/// Bytes per slot.
pub const INFLIGHT_SLOT_BYTES: usize =
    inflight_slot::TEXT + INFLIGHT_METHOD_BYTES + 2 * INFLIGHT_TEXT_BYTES;

/// Byte offsets of a slot's fields.
pub mod inflight_slot {
    /// u32: odd while a writer changes the slot.
    pub const SEQ: usize = 0;
    /// u32: the thread polling the request's future right now (0: none).
    /// Without poll tracking (see [`flags::POLLS_TRACKED`]), the thread
    /// `request_start` ran on, kept until the request ends.
    pub const POLLING_TID: usize = 4;
    /// u64: request id (0: the slot is free).
    pub const ID: usize = 8;
    /// u64: ns, `CLOCK_MONOTONIC_COARSE` (the monotonic clock as of the
    /// last tick: up to `clock_getres` behind), when `request_start` fired.
    pub const STARTED_NS: usize = 16;
    /// u64: ns, `CLOCK_MONOTONIC_COARSE`, when the current poll of the
    /// request's future began (valid while `POLLING_TID` is set and polls
    /// are tracked).
    pub const POLL_STARTED_NS: usize = 24;
    /// u8: [`flags`].
    pub const FLAGS: usize = 32;
    /// u8: bytes of method kept.
    pub const METHOD_LEN: usize = 33;
    /// u8: bytes of route kept.
    pub const ROUTE_LEN: usize = 34;
    /// u8: bytes of path kept.
    pub const PATH_LEN: usize = 35;
    /// The texts: method, route, path, each at its full width.
    pub const TEXT: usize = 40;

    /// Bits of the `FLAGS` byte.
    pub mod flags {
        /// The request has a route template (it may be empty).
        pub const HAS_ROUTE: u8 = 1;
        /// `POLLING_TID` follows every poll of the request's future (the
        /// tower layer), rather than naming the thread it started on.
        pub const POLLS_TRACKED: u8 = 2;
    }
}

const _: () = assert!(INFLIGHT_SLOT_BYTES.is_multiple_of(8));
const _: () = assert!(INFLIGHT_TEXT_BYTES <= u8::MAX as usize);

/// The in-flight table of a process that cannot hold a note (Python's
/// `loopguard-asgi` middleware): a shared mapping of a memfd of this name,
/// found from `/proc/PID/maps` (`/memfd:loopguard-inflight (deleted)`).
/// Its first [`INFLIGHT_RESERVED_BYTES`] hold [`INFLIGHT_MEMFD_MAGIC`] and
/// [`INFLIGHT_STEPS_VERSION`] (two u32); then the slots, as in the table
/// above with `POLLS_TRACKED` set and times from `CLOCK_MONOTONIC` (not
/// coarse); then one step record of [`INFLIGHT_STEP_BYTES`] per slot,
/// covered by its slot's sequence lock. A slot whose request ended keeps
/// it (`ENDED_NS` set) until a new request takes the slot.
pub const INFLIGHT_MEMFD_NAME: &str = "loopguard-inflight";
/// `b"lgif"` as a little-endian u32.
pub const INFLIGHT_MEMFD_MAGIC: u32 = u32::from_le_bytes(*b"lgif");
/// Version of the step records.
pub const INFLIGHT_STEPS_VERSION: u32 = 1;
/// Bytes of one step record (memfd tables, and static tables from
/// [`INFLIGHT_VERSION`] 2 on).
pub const INFLIGHT_STEP_BYTES: usize = 32;
/// Where the step records begin.
pub const INFLIGHT_STEPS_AT: usize = INFLIGHT_RESERVED_BYTES + INFLIGHT_SLOTS * INFLIGHT_SLOT_BYTES;
/// Bytes of a memfd table.
pub const INFLIGHT_MEMFD_BYTES: usize = INFLIGHT_STEPS_AT + INFLIGHT_SLOTS * INFLIGHT_STEP_BYTES;

/// Slots of the ring of requests that ended in a long poll (static tables
/// from [`INFLIGHT_VERSION`] 2 on).
pub const INFLIGHT_LONG_ENDS: usize = 64;
/// Where that ring's slots begin: right after the step records.
pub const INFLIGHT_LONG_AT: usize = INFLIGHT_MEMFD_BYTES;
/// Where that ring's step records begin.
pub const INFLIGHT_LONG_STEPS_AT: usize =
    INFLIGHT_LONG_AT + INFLIGHT_LONG_ENDS * INFLIGHT_SLOT_BYTES;
/// Bytes of a static table of [`INFLIGHT_VERSION`] 2 that a reader reads
/// (the writer's ring cursor follows, unread).
pub const INFLIGHT_TABLE_BYTES: usize =
    INFLIGHT_LONG_STEPS_AT + INFLIGHT_LONG_ENDS * INFLIGHT_STEP_BYTES;

/// Byte offsets of a step record's fields. In a static table (Rust
/// middleware) a "step" is a poll of the request's future, "long" means it
/// took at least one tick of `CLOCK_MONOTONIC_COARSE` (whose times these
/// then are), and `LOOP_TID` is the thread the request started on.
pub mod inflight_step {
    /// u32: the thread that ran the request's last long step (1 ms or more).
    pub const LONG_TID: usize = 0;
    /// u32: the event-loop thread the request started on.
    pub const LOOP_TID: usize = 4;
    /// u64: ns, `CLOCK_MONOTONIC`, when that step began (0: none yet).
    pub const LONG_START_NS: usize = 8;
    /// u64: ns, `CLOCK_MONOTONIC`, when it ended.
    pub const LONG_END_NS: usize = 16;
    /// u64: ns, `CLOCK_MONOTONIC`, when the request ended (0: in flight).
    pub const ENDED_NS: usize = 24;
}
