//! Task filters ([`loopguard_common::task_filter`]): an array of counts per
//! bucket of task pointers beside a hash map keyed by task pointer, so a
//! program that runs for every task on the host looks the hash map up only
//! for tasks that may be in it.

use core::ptr::read_volatile;

use aya_ebpf::maps::Array;
use loopguard_common::task_filter::bucket_of;

use crate::add;

/// Whether the hash map beside `filter` may hold `task`: one array read.
#[inline(always)]
pub(crate) fn may_hold(filter: &Array<u64>, task: u64) -> bool {
    // SAFETY: a valid, aligned map value pointer.
    filter
        .get_ptr_mut(bucket_of(task))
        .is_some_and(|count| unsafe { read_volatile(count) } != 0)
}

/// `task` was inserted into the hash map beside `filter`.
#[inline(always)]
pub(crate) fn added(filter: &Array<u64>, task: u64) {
    if let Some(count) = filter.get_ptr_mut(bucket_of(task)) {
        add(count, 1);
    }
}

/// `task` was removed from the hash map beside `filter`.
#[inline(always)]
pub(crate) fn removed(filter: &Array<u64>, task: u64) {
    if let Some(count) = filter.get_ptr_mut(bucket_of(task)) {
        add(count, u64::MAX);
    }
}
