//! The request probes: in-flight requests kept in maps, shipped to the agent
//! only when it asks (docs/ARCHITECTURE.md, "Request state";
//! `loopguard_common::requests`).
//!
//! - `request_start` (uprobe on every `loopguard:request_start` USDT site)
//!   files the request under the task being polled, counts its route, and
//!   sends the route's text once, at its first start.
//! - `request_end` moves it to the CPU's ring of recent ends, and keeps it
//!   by task when the poll it ends in has already run a while (the culprit
//!   of a slow poll that ends after it).

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{self, bpf_get_attach_cookie},
    },
    macros::{map, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::ProbeContext,
};
use loopguard_common::{
    Counter, EventKind, MAX_USDT_SITES, UsdtArg, UsdtSpec, arg_kind, frame_flags,
    requests::{
        self, MAX_ENDED_IN_POLL, MAX_REQUESTS, MAX_ROUTES, OTHER_ROUTES, RECENT_ENDS, RecentEnds,
        RequestEntry, RequestScratch, RequestTotals, RouteName, RouteStats,
    },
    usdt::{LAYOUT_ARG, LAYOUT_VERSION, end_arg, start_arg},
};

use crate::{EVENTS, add, add_one, bump, frame_index, slots};

#[map]
static USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_USDT_SITES, 0);

#[map]
static REQUESTS: LruHashMap<u64, RequestEntry> = LruHashMap::with_max_entries(MAX_REQUESTS, 0);

#[map]
static ENDED_IN_POLL: LruHashMap<u64, RequestEntry> =
    LruHashMap::with_max_entries(MAX_ENDED_IN_POLL, 0);

#[map]
static RECENT_ENDS_RING: PerCpuArray<RecentEnds> = PerCpuArray::with_max_entries(1, 0);

#[map]
static ROUTES: HashMap<u64, RouteStats> = HashMap::with_max_entries(MAX_ROUTES, 0);

#[map]
pub(crate) static REQUEST_TOTALS: Array<RequestTotals> = Array::with_max_entries(1, 0);

#[map]
static REQUEST_SCRATCH: PerCpuArray<RequestScratch> = PerCpuArray::with_max_entries(1, 0);

/// The probed thread's saved registers (`struct pt_regs`,
/// [`loopguard_common::pt_regs`]), copied once per USDT hit with
/// constant-offset context loads: one copy instead of a helper call per
/// argument.
type SavedRegs = [u64; loopguard_common::pt_regs::WORDS];

/// Reads one USDT argument as its spec says, truncated and sign-extended.
#[inline(always)]
fn usdt_arg(regs: &SavedRegs, arg: &UsdtArg) -> u64 {
    let register = || {
        regs.get(usize::from(arg.reg_offset & 0xff) / 8)
            .copied()
            .unwrap_or(0)
    };
    let raw = match arg.kind {
        arg_kind::REGISTER => register(),
        arg_kind::MEMORY => {
            let address = (register() as i64).wrapping_add(arg.value) as u64;
            // SAFETY: bpf_probe_read_user tolerates any address.
            unsafe { bpf_probe_read_user(address as *const u64) }.unwrap_or(0)
        }
        arg_kind::IMMEDIATE => arg.value as u64,
        _ => 0,
    };
    match (arg.size, arg.signed != 0) {
        (1, false) => raw & 0xff,
        (1, true) => i64::from(raw as u8 as i8) as u64,
        (2, false) => raw & 0xffff,
        (2, true) => i64::from(raw as u16 as i16) as u64,
        (4, false) => raw & 0xffff_ffff,
        (4, true) => i64::from(raw as u32 as i32) as u64,
        _ => raw,
    }
}

/// Copies at most `N` bytes of a user string into `buf`.
#[inline(always)]
fn read_user_str<const N: usize>(ptr: u64, len: u64, buf: *mut [u8; N]) {
    let n = if len > N as u64 { N as u64 } else { len };
    if ptr == 0 || n == 0 {
        return;
    }
    // SAFETY: `buf` has room for N >= n bytes; the helper tolerates any source.
    unsafe {
        generated::bpf_probe_read_user(buf.cast(), n as u32, ptr as *const core::ffi::c_void)
    };
}

/// The task id, start and flags of the poll on top of `tid`'s stack.
#[inline(always)]
fn current_poll(tid: u32) -> (u64, u64, u32) {
    let Some(stack) = slots::polls_of(tid) else {
        return (0, 0, frame_flags::NO_POLL);
    };
    let depth = stack.depth as usize;
    if depth == 0 || depth > loopguard_common::MAX_POLL_DEPTH {
        return (0, 0, frame_flags::NO_POLL);
    }
    match stack.frames.get(frame_index(depth - 1)) {
        Some(frame) => (frame.task_id, frame.start_ns, frame.flags),
        None => (0, 0, frame_flags::NO_POLL),
    }
}

/// The firing thread (tgid, tid), its saved registers and the argument
/// specs of the USDT site that fired, or `None` for another process or a
/// probe layout this agent does not read (counted).
#[inline(always)]
fn usdt_site(ctx: &ProbeContext) -> Option<(u32, u32, SavedRegs, &'static UsdtSpec)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != crate::target_tgid() {
        return None;
    }
    // SAFETY: the helper only reads the cookie of the link that fired.
    let site = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let spec = USDT_SPECS.get(site)?;
    // SAFETY: a uprobe's context is the thread's `pt_regs`, readable in full.
    let regs: SavedRegs = unsafe { core::ptr::read(ctx.regs.cast::<SavedRegs>()) };
    let layout = spec
        .args
        .get(LAYOUT_ARG)
        .map_or(0, |arg| usdt_arg(&regs, arg));
    if layout != LAYOUT_VERSION {
        if let Some(totals) = REQUEST_TOTALS.get_ptr_mut(0) {
            // SAFETY: a map value pointer; the field is aligned.
            unsafe {
                add_one(&raw mut (*totals).layout_mismatches);
                (*totals).last_bad_layout = layout;
            }
        }
        return None;
    }
    Some((tgid, pid_tgid as u32, regs, spec))
}

#[uprobe]
pub fn request_start(ctx: ProbeContext) -> u32 {
    if crate::empty_programs() {
        return 0;
    }
    let _ = try_request_start(&ctx);
    0
}

fn try_request_start(ctx: &ProbeContext) -> Result<(), i64> {
    let Some((tgid, tid, regs, spec)) = usdt_site(ctx) else {
        return Ok(());
    };
    let arg = |i: usize| spec.args.get(i).map_or(0, |arg| usdt_arg(&regs, arg));
    let scratch = REQUEST_SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    let totals = REQUEST_TOTALS.get_ptr_mut(0).ok_or(0i64)?;
    let (task_id, _, flags) = current_poll(tid);
    let request_id = arg(start_arg::ID);
    let (method_len, route_len, path_len) = (
        arg(start_arg::METHOD_LEN),
        arg(start_arg::ROUTE_LEN),
        arg(start_arg::PATH_LEN),
    );
    // SAFETY: `scratch` is this CPU's scratch value; `totals` a map value.
    unsafe {
        let name = &raw mut (*scratch).name;
        (*name).method = [0; loopguard_common::METHOD_BYTES];
        (*name).route = [0; loopguard_common::ROUTE_BYTES];
        read_user_str(
            arg(start_arg::METHOD_PTR),
            method_len,
            &raw mut (*name).method,
        );
        read_user_str(arg(start_arg::ROUTE_PTR), route_len, &raw mut (*name).route);
        let lens = (
            method_len.min(loopguard_common::METHOD_BYTES as u64) as u32,
            route_len.min(loopguard_common::ROUTE_BYTES as u64) as u32,
        );
        let route_key = requests::route_key(&(*name).method, &(*name).route, lens);
        count_route(tgid, route_key, &mut *name, lens);

        let entry = &raw mut (*scratch).entry;
        (*entry).request_id = request_id;
        (*entry).task_id = task_id;
        (*entry).start_ns = bpf_ktime_get_ns();
        (*entry).end_ns = 0;
        (*entry).route_key = route_key;
        (*entry).tid = tid;
        (*entry).status = 0;
        (*entry).flags = flags;
        (*entry).path_len = path_len as u32;
        read_user_str(arg(start_arg::PATH_PTR), path_len, &raw mut (*entry).path);

        let key = requests::request_key(task_id, request_id);
        if task_id == 0 {
            add_one(&raw mut (*totals).outside_poll);
        }
        // By reference: a copy would not fit the BPF stack beside the rest.
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "no copy on the BPF stack"
        )]
        let mut inserted = REQUESTS.insert(key, &*entry, u64::from(BPF_NOEXIST));
        if inserted.is_err() && REQUESTS.get_ptr(key).is_some() {
            // Its task moved on without an end: count that one ended, so it
            // is not in flight for ever.
            add_one(&raw mut (*totals).replaced);
            add_one(&raw mut (*totals).ended);
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "no copy on the BPF stack"
            )]
            let again = REQUESTS.insert(key, &*entry, 0);
            inserted = again;
        }
        if inserted.is_err() {
            // No room for it: not the ring buffer's loss, its own.
            bump(Counter::RequestMapFull);
            return Ok(());
        }
        add_one(&raw mut (*totals).started);
        let in_flight = (*totals).started.saturating_sub((*totals).ended);
        if in_flight > (*totals).peak_in_flight {
            (*totals).peak_in_flight = in_flight;
        }
    }
    Ok(())
}

/// Counts a start of route `key`; its first start sends the route's text.
/// Past [`MAX_ROUTES`], routes are counted together.
#[inline(always)]
fn count_route(tgid: u32, key: u64, name: &mut RouteName, lens: (u32, u32)) {
    if let Some(stats) = ROUTES.get_ptr_mut(key) {
        // SAFETY: a map value pointer.
        add_one(unsafe { &raw mut (*stats).started });
        return;
    }
    let first = RouteStats { started: 1 };
    if ROUTES.insert(key, first, u64::from(BPF_NOEXIST)).is_err() {
        // Full, or another CPU inserted it first.
        let other = if ROUTES.get_ptr_mut(key).is_some() {
            key
        } else {
            OTHER_ROUTES
        };
        match ROUTES.get_ptr_mut(other) {
            // SAFETY: a map value pointer.
            Some(stats) => add_one(unsafe { &raw mut (*stats).started }),
            None => {
                let _ = ROUTES.insert(other, first, 0);
            }
        }
        return;
    }
    name.kind = EventKind::RouteName as u32;
    name.pid = tgid;
    name.key = key;
    name.method_len = lens.0;
    name.route_len = lens.1;
    // Woken at once: the agent must know a route's name before a stall of it.
    if EVENTS.output::<RouteName>(name, 0).is_err() {
        bump(Counter::DroppedEvents);
    }
}

#[uprobe]
pub fn request_end(ctx: ProbeContext) -> u32 {
    if crate::empty_programs() {
        return 0;
    }
    let _ = try_request_end(&ctx);
    0
}

fn try_request_end(ctx: &ProbeContext) -> Result<(), i64> {
    let Some((_, tid, regs, spec)) = usdt_site(ctx) else {
        return Ok(());
    };
    let arg = |i: usize| spec.args.get(i).map_or(0, |arg| usdt_arg(&regs, arg));
    let totals = REQUEST_TOTALS.get_ptr_mut(0).ok_or(0i64)?;
    let request_id = arg(end_arg::ID);
    let (task_id, poll_start_ns, _) = current_poll(tid);
    let now = unsafe { bpf_ktime_get_ns() };
    // Where its start filed it: under this task, or by id.
    let mut key = requests::request_key(task_id, request_id);
    let mut entry = REQUESTS.get_ptr_mut(key);
    // SAFETY: map value pointers, valid for this program run.
    if entry.is_none_or(|e| unsafe { (*e).request_id } != request_id) {
        key = requests::request_key(0, request_id);
        entry = REQUESTS.get_ptr_mut(key);
    }
    let Some(entry) = entry else {
        // SAFETY: a map value pointer.
        add_one(unsafe { &raw mut (*totals).unmatched_ends });
        return Ok(());
    };
    // SAFETY: map value pointers, valid for this program run.
    unsafe {
        (*entry).end_ns = now;
        (*entry).status = arg(end_arg::STATUS) as u32;
        if let Some(ring) = RECENT_ENDS_RING.get_ptr_mut(0) {
            let slot = ((*ring).next as usize) & (RECENT_ENDS - 1);
            if let Some(slot) = (*ring).entries.get_mut(slot) {
                *slot = *entry;
            }
            (*ring).next += 1;
        }
        // A handler that finishes inside a poll already running a while:
        // if that poll turns out a stall, this request is its culprit.
        if task_id != 0
            && poll_start_ns != 0
            && now.saturating_sub(poll_start_ns) >= crate::report_floor_ns() / 4
        {
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "no copy on the BPF stack"
            )]
            let _ = ENDED_IN_POLL.insert(task_id, &*entry, 0);
        }
        add(&raw mut (*totals).ended, 1);
    }
    let _ = REQUESTS.remove(key);
    Ok(())
}

/// The request totals' `(started, ended)` now, for poll frames and events.
#[inline(always)]
pub(crate) fn totals() -> (u64, u64) {
    match REQUEST_TOTALS.get_ptr(0) {
        // SAFETY: a map value pointer; torn reads of either field are fine.
        Some(totals) => unsafe {
            (
                core::ptr::read_volatile(&raw const (*totals).started),
                core::ptr::read_volatile(&raw const (*totals).ended),
            )
        },
        None => (0, 0),
    }
}
