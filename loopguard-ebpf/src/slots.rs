//! Thread slots (`loopguard_common::slots`): each target thread's poll
//! stack and wait state live in slot `i` of two mmapable arrays, which the
//! agent reads in place. Only the owning thread writes its slot, always
//! inside a [`Writing`] section, so the agent can tell a whole value from a
//! half-written one by its sequence number.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ops::{Deref, DerefMut},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    helpers::generated::bpf_get_current_task,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Stack},
};
use loopguard_common::{
    Counter, LoopState, ThreadPolls,
    slots::{MAP_MMAPABLE, MAX_THREAD_SLOTS, is_writing},
    task_filter,
};

use crate::bump;

#[map]
static THREAD_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_THREAD_SLOTS, 0);

/// Filled with every slot index by the agent before any program runs.
#[map]
static FREE_SLOTS: Stack<u32> = Stack::with_max_entries(MAX_THREAD_SLOTS, 0);

#[map]
static SLOT_OWNERS: Array<u32> = Array::with_max_entries(MAX_THREAD_SLOTS, MAP_MMAPABLE);

#[map]
static THREAD_POLLS: Array<ThreadPolls> = Array::with_max_entries(MAX_THREAD_SLOTS, MAP_MMAPABLE);

#[map]
static THREAD_LOOPS: Array<LoopState> = Array::with_max_entries(MAX_THREAD_SLOTS, MAP_MMAPABLE);

/// A value kept in a slot: it starts with its write sequence and its owner.
pub(crate) trait Slotted {
    fn seq(value: *mut Self) -> *mut u32;
    fn tid(value: *mut Self) -> *mut u32;
    /// Forgets everything but the sequence and the owner. Frames above the
    /// depth are never read, so they are left as they are.
    fn clear(&mut self);
}

impl Slotted for ThreadPolls {
    #[inline(always)]
    fn seq(value: *mut Self) -> *mut u32 {
        // SAFETY: a field of a valid value pointer.
        unsafe { &raw mut (*value).seq }
    }

    #[inline(always)]
    fn tid(value: *mut Self) -> *mut u32 {
        // SAFETY: as above.
        unsafe { &raw mut (*value).tid }
    }

    #[inline(always)]
    fn clear(&mut self) {
        self.depth = 0;
        self.busy_ns = 0;
        self.task_polls = 0;
        self.preempted_ns = 0;
        self.preempted_since_ns = 0;
    }
}

impl Slotted for LoopState {
    #[inline(always)]
    fn seq(value: *mut Self) -> *mut u32 {
        // SAFETY: a field of a valid value pointer.
        unsafe { &raw mut (*value).seq }
    }

    #[inline(always)]
    fn tid(value: *mut Self) -> *mut u32 {
        // SAFETY: as above.
        unsafe { &raw mut (*value).tid }
    }

    #[inline(always)]
    fn clear(&mut self) {
        self.depth = 0;
        self.busy_start_ns = 0;
        self.wait_start_ns = 0;
        self.wait_ns = 0;
        self.busy_ns = 0;
        self.waits = 0;
        self.preempted_ns = 0;
        self.preempted_since_ns = 0;
        self.preempted_at_start_ns = 0;
    }
}

/// Adds 1 to a slot's sequence: a BPF atomic add, which the x86-64 JIT
/// emits as a `lock`-prefixed add (a full barrier); sequentially consistent
/// in LLVM's eyes, so no store is moved across it at compile time.
#[inline(always)]
fn bump_seq(seq: *mut u32) {
    // SAFETY: `seq` points into a map value, aligned, valid for this run.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(seq, 1) };
}

/// A write section on one slot value: the sequence is odd from [`Writing::open`]
/// until this is dropped. Opened inside another section of the same thread
/// (a probe preempted mid-write, then `sched_switch` for it), it leaves the
/// sequence to the outer one, which stays odd until all of both is written.
pub(crate) struct Writing<T: Slotted> {
    value: *mut T,
    opened: bool,
}

impl<T: Slotted> Writing<T> {
    /// Opens a section on `value`, in the slot of `tid`. A value this
    /// thread has not used yet is taken (cleared, marked as `tid`'s) when
    /// `take` is set, else `None`.
    #[inline(always)]
    fn open(value: *mut T, tid: u32, take: bool) -> Option<Self> {
        let owner = T::tid(value);
        // Only this thread writes its slot: plain reads see its last values.
        // SAFETY: a valid, aligned map value pointer.
        let taken = unsafe { read_volatile(owner) } != tid;
        if taken && !take {
            return None;
        }
        let seq = T::seq(value);
        // SAFETY: as above.
        let opened = !is_writing(unsafe { read_volatile(seq) });
        if opened {
            bump_seq(seq);
        }
        let mut section = Self { value, opened };
        if taken {
            section.clear();
            // SAFETY: as above.
            unsafe { write_volatile(owner, tid) };
        }
        Some(section)
    }
}

impl<T: Slotted> Drop for Writing<T> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.opened {
            bump_seq(T::seq(self.value));
        }
    }
}

impl<T: Slotted> Deref for Writing<T> {
    type Target = T;

    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { &*self.value }
    }
}

impl<T: Slotted> DerefMut for Writing<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above; only this thread writes its slot.
        unsafe { &mut *self.value }
    }
}

/// Per CPU, the last thread whose slot was looked up there and its slot
/// (`tid << 32 | slot`; 0: none). A poll's entry and return and the
/// context switches around them are mostly the same thread on the same
/// CPU: two array reads instead of a hash lookup.
#[map]
static SLOT_CACHE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A thread's slot filed by its task pointer ([`TASK_SLOTS`]).
#[derive(Clone, Copy)]
#[repr(C)]
struct TaskSlot {
    /// Its `task_struct` address (0: the entry is free).
    task: u64,
    tid: u32,
    slot: u32,
}

/// `log2` of [`TASK_SLOTS`]' entries: as many as there are slots, so two
/// threads of a service seldom share one.
const TASK_SLOT_BITS: u32 = 12;

const _: () = assert!(1 << TASK_SLOT_BITS == MAX_THREAD_SLOTS);

/// Threads with a slot by index of their task pointer
/// ([`task_filter::index_of`]), each claimed by the first slot holder
/// there and freed at its exit: where the one-entry [`SLOT_CACHE`] misses
/// (dufs runs 30 threads in turn on one CPU, and every context switch of
/// each looks its slot up) an array read stands in for a hash lookup.
#[map]
static TASK_SLOTS: Array<TaskSlot> = Array::with_max_entries(MAX_THREAD_SLOTS, 0);

/// Every [`THREAD_SLOTS`] entry counted by bucket of its thread's task
/// pointer ([`crate::task_filter`]): a thread with no slot, whose
/// [`TASK_SLOTS`] entry is not its own, is told so without the hash
/// lookup unless a slot holder shares its bucket.
#[map]
static SLOT_FILTER: Array<u64> = Array::with_max_entries(task_filter::BUCKETS, 0);

/// Where `tid` (running as `task`) has its slot filed, short of the hash.
enum Filed {
    /// In its [`TASK_SLOTS`] entry.
    Here(u32),
    /// Nowhere: it has no slot.
    Nowhere,
    /// Perhaps in [`THREAD_SLOTS`].
    Maybe,
}

#[inline(always)]
fn filed(task: u64, tid: u32) -> Filed {
    if let Some(entry) = TASK_SLOTS.get(task_filter::index_of(task, TASK_SLOT_BITS)) {
        // SAFETY: plain reads of a map value's fields; only the thread
        // named in it writes an entry it holds.
        let (holder, owner, slot) = unsafe {
            (
                read_volatile(&raw const entry.task),
                read_volatile(&raw const entry.tid),
                read_volatile(&raw const entry.slot),
            )
        };
        if holder == task && owner == tid && SLOT_OWNERS.get(slot).is_some_and(|&o| o == tid) {
            return Filed::Here(slot);
        }
    }
    if crate::task_filter::may_hold(&SLOT_FILTER, task) {
        Filed::Maybe
    } else {
        Filed::Nowhere
    }
}

/// Whether task `task` (any thread on the host) may hold a slot: one
/// array read, no lookup; false only for tasks that hold none.
#[inline(always)]
pub(crate) fn may_have_slot(task: u64) -> bool {
    crate::task_filter::may_hold(&SLOT_FILTER, task)
}

/// The slot of `tid`, if it has one. Run as thread `tid`.
#[inline(always)]
pub(crate) fn slot_of(tid: u32) -> Option<u32> {
    let Some(cache) = SLOT_CACHE.get_ptr_mut(0) else {
        // SAFETY: a read-only look at the map value.
        return unsafe { THREAD_SLOTS.get(tid) }.copied();
    };
    // SAFETY: a per-CPU map value pointer; one aligned 8-byte load.
    let cached = unsafe { read_volatile(cache) };
    if tid != 0 && (cached >> 32) as u32 == tid {
        let slot = cached as u32;
        // The slot may have been freed (the thread exited, its tid reused)
        // since: its owner says whether it is still `tid`'s.
        if SLOT_OWNERS.get(slot).is_some_and(|&owner| owner == tid) {
            return Some(slot);
        }
    }
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let slot = match filed(task, tid) {
        Filed::Here(slot) => slot,
        Filed::Nowhere => return None,
        // SAFETY: a read-only look at the map value.
        Filed::Maybe => unsafe { THREAD_SLOTS.get(tid) }.copied()?,
    };
    // SAFETY: as above; a nested program on this CPU may overwrite it,
    // which only costs the next lookup its shortcut.
    unsafe { write_volatile(cache, u64::from(tid) << 32 | u64::from(slot)) };
    Some(slot)
}

/// Files the new slot `slot` of `tid` (running as `task`): counted in
/// [`SLOT_FILTER`] before anything else, so no lookup passes it by, and in
/// its [`TASK_SLOTS`] entry when that is free. Two threads that claim an
/// entry at once both stay counted, so the one that lost it is still found.
#[inline(always)]
fn file(task: u64, tid: u32, slot: u32) {
    crate::task_filter::added(&SLOT_FILTER, task);
    if let Some(entry) = TASK_SLOTS.get_ptr_mut(task_filter::index_of(task, TASK_SLOT_BITS)) {
        // SAFETY: a valid map value pointer; the holder is written last.
        unsafe {
            if read_volatile(&raw const (*entry).task) == 0 {
                write_volatile(&raw mut (*entry).tid, tid);
                write_volatile(&raw mut (*entry).slot, slot);
                write_volatile(&raw mut (*entry).task, task);
            }
        }
    }
}

/// Takes `tid`'s (running as `task`) slot out of [`SLOT_FILTER`] and
/// [`TASK_SLOTS`].
#[inline(always)]
fn unfile(task: u64) {
    if let Some(entry) = TASK_SLOTS.get_ptr_mut(task_filter::index_of(task, TASK_SLOT_BITS)) {
        // SAFETY: a valid map value pointer.
        unsafe {
            if read_volatile(&raw const (*entry).task) == task {
                write_volatile(&raw mut (*entry).task, 0);
            }
        }
    }
    crate::task_filter::removed(&SLOT_FILTER, task);
}

/// The slot of `tid`, taken from the free stack at its first use; `None`
/// (counted as `ThreadMapFull`) when every slot is taken.
#[inline(always)]
pub(crate) fn claim_slot(tid: u32) -> Option<u32> {
    if let Some(slot) = slot_of(tid) {
        return Some(slot);
    }
    let Ok(Some(slot)) = FREE_SLOTS.pop() else {
        bump(Counter::ThreadMapFull);
        return None;
    };
    if THREAD_SLOTS.insert(tid, slot, 0).is_err() {
        give_back(slot);
        bump(Counter::ThreadMapFull);
        return None;
    }
    if let Some(owner) = SLOT_OWNERS.get_ptr_mut(slot) {
        // SAFETY: a valid, aligned map value pointer.
        unsafe { write_volatile(owner, tid) };
    }
    // SAFETY: the helper has no preconditions.
    file(unsafe { bpf_get_current_task() }, tid, slot);
    Some(slot)
}

#[inline(always)]
fn give_back(slot: u32) {
    if FREE_SLOTS.push(slot, 0).is_err() {
        bump(Counter::SlotLeaked);
    }
}

/// A write section on `tid`'s poll stack in `slot`; with `take`, one is
/// started if the thread has none yet.
#[inline(always)]
pub(crate) fn polls_mut(slot: u32, tid: u32, take: bool) -> Option<Writing<ThreadPolls>> {
    Writing::open(THREAD_POLLS.get_ptr_mut(slot)?, tid, take)
}

/// A write section on `tid`'s wait state in `slot`; with `take`, one is
/// started if the thread has none yet.
#[inline(always)]
pub(crate) fn loops_mut(slot: u32, tid: u32, take: bool) -> Option<Writing<LoopState>> {
    Writing::open(THREAD_LOOPS.get_ptr_mut(slot)?, tid, take)
}

/// `tid`'s poll stack in `slot`, for a look before deciding to write (by
/// that thread: its own last writes are what it reads).
#[inline(always)]
pub(crate) fn peek_polls(slot: u32, tid: u32) -> Option<&'static ThreadPolls> {
    THREAD_POLLS.get(slot).filter(|polls| polls.tid == tid)
}

/// `tid`'s wait state in `slot`, as [`peek_polls`].
#[inline(always)]
pub(crate) fn peek_loops(slot: u32, tid: u32) -> Option<&'static LoopState> {
    THREAD_LOOPS.get(slot).filter(|loops| loops.tid == tid)
}

/// `tid`'s poll stack, read by a program of that same thread; `None` while
/// one of its sections is open (this program interrupted it) or when it has
/// none.
#[inline(always)]
pub(crate) fn polls_of(tid: u32) -> Option<&'static ThreadPolls> {
    polls_in(slot_of(tid)?, tid)
}

/// [`polls_of`] where the slot is known already.
#[inline(always)]
pub(crate) fn polls_in(slot: u32, tid: u32) -> Option<&'static ThreadPolls> {
    let polls = THREAD_POLLS.get(slot)?;
    // SAFETY: plain reads of a map value's fields.
    let (seq, owner) = unsafe {
        (
            read_volatile(&raw const polls.seq),
            read_volatile(&raw const polls.tid),
        )
    };
    (!is_writing(seq) && owner == tid).then_some(polls)
}

/// Thread `tid` exits (run as that thread): clears its slot and frees it.
#[inline(always)]
pub(crate) fn release(tid: u32) {
    let Some(slot) = slot_of(tid) else {
        return;
    };
    if let Some(mut polls) = polls_mut(slot, tid, false) {
        polls.clear();
        polls.tid = 0;
    }
    if let Some(mut loops) = loops_mut(slot, tid, false) {
        loops.clear();
        loops.tid = 0;
    }
    if let Some(owner) = SLOT_OWNERS.get_ptr_mut(slot) {
        // SAFETY: a valid, aligned map value pointer.
        unsafe { write_volatile(owner, 0) };
    }
    if THREAD_SLOTS.remove(tid).is_ok() {
        // SAFETY: the helper has no preconditions.
        unfile(unsafe { bpf_get_current_task() });
    }
    give_back(slot);
}
