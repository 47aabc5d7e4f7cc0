//! Thread slots as the agent reads them: every target thread's poll stack
//! and wait state (`loopguard_common::slots`), in the kernel's arrays mapped
//! read-only into the agent, copied without a system call.
//!
//! In: the mapped `SLOT_OWNERS`, `THREAD_POLLS` and `THREAD_LOOPS` arrays.
//! Out: `(tid, value)` for every thread whose slot could be copied whole.
//!
//! A copy is a seqlock read: the slot's sequence is loaded (acquire) and
//! must be even, the value is copied with volatile reads, an acquire fence
//! orders the copy before the sequence is loaded again, and the copy is kept
//! only if the sequence has not moved. The owning thread makes the sequence
//! odd before its first store and even again after its last, so an unmoved
//! even sequence means no store landed during the copy. A slot being
//! written on every attempt is skipped until the next scan and counted.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use aya::maps::{Map, MapData};
use loopguard_common::slots::is_writing;
use loopguard_common::{LoopState, ThreadPolls};

/// Copies tried per slot and scan before the slot is skipped. A write
/// section is a few hundred ns; a copy even less.
pub const READ_ATTEMPTS: usize = 4;

/// A value kept in a thread slot: its write sequence at offset 0, then the
/// owner's tid (0: no thread's).
pub trait SlotValue: Copy {
    fn owner(&self) -> u32;
}

impl SlotValue for ThreadPolls {
    fn owner(&self) -> u32 {
        self.tid
    }
}

impl SlotValue for LoopState {
    fn owner(&self) -> u32 {
        self.tid
    }
}

const _: () = assert!(std::mem::offset_of!(ThreadPolls, seq) == 0);
const _: () = assert!(std::mem::offset_of!(LoopState, seq) == 0);

/// Where slot values are copied from: the kernel's mapped array, or a
/// test's stand-in that plays the writer.
pub trait SlotSource<T> {
    /// The slot's write sequence (an acquire load).
    fn sequence(&self, index: usize) -> u32;
    /// A copy of the slot, read while it may be written: possibly torn.
    fn copy(&self, index: usize) -> T;
}

/// Slot `index` copied whole, or `None` when the owner was writing it on
/// each of `attempts` tries.
pub fn read_whole<T>(source: &impl SlotSource<T>, index: usize, attempts: usize) -> Option<T> {
    for _ in 0..attempts {
        let before = source.sequence(index);
        if is_writing(before) {
            std::hint::spin_loop();
            continue;
        }
        let value = source.copy(index);
        // The copy's loads complete before the sequence is read again.
        fence(Ordering::Acquire);
        if source.sequence(index) == before {
            return Some(value);
        }
    }
    None
}

/// What one pass over the slots gave.
#[derive(Debug)]
pub struct Snapshot<T> {
    /// Threads copied whole, by tid.
    pub threads: Vec<(u32, T)>,
    /// Slots skipped because their owner was writing on every attempt.
    pub skipped: u64,
}

/// Copies every slot whose owner (from `owners`, a hint: 0 is free) is
/// set; a whole copy that belongs to no thread (a wait-only thread's poll
/// stack, a slot being given back) is left out.
pub fn snapshot<T: SlotValue>(
    owners: impl IntoIterator<Item = u32>,
    source: &impl SlotSource<T>,
) -> Snapshot<T> {
    let mut threads = Vec::new();
    let mut skipped = 0;
    for (index, owner) in owners.into_iter().enumerate() {
        if owner == 0 {
            continue;
        }
        match read_whole(source, index, READ_ATTEMPTS) {
            Some(value) if value.owner() != 0 => threads.push((value.owner(), value)),
            Some(_) => {}
            None => skipped += 1,
        }
    }
    Snapshot { threads, skipped }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotMapError {
    #[error("map `{name}` is not an array the agent can map; rebuild loopguard")]
    NotMappable { name: &'static str },
    #[error("map `{name}` holds {found} byte values, the agent expects {expected}")]
    ValueSize {
        name: &'static str,
        found: u32,
        expected: usize,
    },
    #[error("failed to read the description of map `{name}`")]
    Info {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to map `{name}` into memory")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A `BPF_F_MMAPABLE` array map, mapped read-only.
pub struct MappedArray<T> {
    base: NonNull<u8>,
    bytes: usize,
    entries: usize,
    /// Bytes from one value to the next (the kernel rounds values up to 8).
    stride: usize,
    _map: MapData,
    _values: PhantomData<T>,
}

impl<T: Copy> MappedArray<T> {
    pub fn new(map: Map, name: &'static str) -> Result<Self, SlotMapError> {
        let Map::Array(map) = map else {
            return Err(SlotMapError::NotMappable { name });
        };
        let info = map
            .info()
            .map_err(|source| SlotMapError::Info { name, source })?;
        if info.map_flags() & loopguard_common::slots::MAP_MMAPABLE == 0 {
            return Err(SlotMapError::NotMappable { name });
        }
        if info.value_size() as usize != size_of::<T>() {
            return Err(SlotMapError::ValueSize {
                name,
                found: info.value_size(),
                expected: size_of::<T>(),
            });
        }
        let entries = info.max_entries() as usize;
        let stride = size_of::<T>().next_multiple_of(8);
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (entries * stride).next_multiple_of(page);
        let fd = {
            use std::os::fd::AsRawFd;
            map.fd().as_fd().as_raw_fd()
        };
        // SAFETY: a fresh shared read-only mapping of the map's fd, within
        // the size the kernel allows for it; nothing else aliases it mutably.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SlotMapError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: NonNull::new(base.cast()).ok_or(SlotMapError::NotMappable { name })?,
            bytes,
            entries,
            stride,
            _map: map,
            _values: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn at(&self, index: usize) -> *const u8 {
        assert!(index < self.entries, "slot {index} out of range");
        // SAFETY: inside the mapping, by the assertion.
        unsafe { self.base.as_ptr().add(index * self.stride) }
    }

    /// The first `u32` of slot `index` (its sequence, or an owner's tid).
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "the mapping is page-aligned and the stride a multiple of 8"
    )]
    fn word(&self, index: usize) -> u32 {
        // SAFETY: a mapped, 8-aligned, readable u32 that the kernel writes
        // concurrently: read as an atomic.
        unsafe { (*self.at(index).cast::<AtomicU32>()).load(Ordering::Acquire) }
    }

    /// Every slot's first `u32`: the owners, for `SLOT_OWNERS`.
    pub fn words(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.entries).map(|index| self.word(index))
    }
}

impl<T: Copy> SlotSource<T> for MappedArray<T> {
    fn sequence(&self, index: usize) -> u32 {
        self.word(index)
    }

    fn copy(&self, index: usize) -> T {
        // SAFETY: a mapped, aligned value of `T`'s size (checked against the
        // map at creation); `T` is plain integers, valid for any bytes. The
        // read may race the kernel's stores: the caller checks the sequence.
        unsafe { std::ptr::read_volatile(self.at(index).cast::<T>()) }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast::<c_void>(), self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use loopguard_common::{PollFrame, frame_flags};

    use super::*;
    use crate::detect::Finding;
    use crate::detect::stall::StallDetector;

    const MS: u64 = 1_000_000;

    /// Slots in memory, and a writer that runs during copies (as if the
    /// owning thread wrote its slot between the two sequence loads).
    struct Racing {
        slots: RefCell<Vec<ThreadPolls>>,
        /// What the `n`th copy races: a slot and the value the writer
        /// leaves there (sequence included), or `None` for no write.
        writes: Vec<Option<(usize, ThreadPolls)>>,
        copies: Cell<usize>,
    }

    impl Racing {
        fn new(slots: Vec<ThreadPolls>, writes: Vec<Option<(usize, ThreadPolls)>>) -> Self {
            Self {
                slots: RefCell::new(slots),
                writes,
                copies: Cell::new(0),
            }
        }
    }

    impl SlotSource<ThreadPolls> for Racing {
        fn sequence(&self, index: usize) -> u32 {
            self.slots.borrow()[index].seq
        }

        fn copy(&self, index: usize) -> ThreadPolls {
            let value = self.slots.borrow()[index];
            let copy = self.copies.get();
            self.copies.set(copy + 1);
            if let Some(Some((slot, written))) = self.writes.get(copy) {
                self.slots.borrow_mut()[*slot] = *written;
            }
            value
        }
    }

    /// `tid`'s stack: one task poll since `start_ms`, or a scheduler loop
    /// alone when `start_ms` is `None`; sequence `seq`.
    fn polls(tid: u32, seq: u32, task_since_ms: Option<u64>) -> ThreadPolls {
        let mut polls = ThreadPolls {
            seq,
            tid,
            depth: 1,
            ..ThreadPolls::default()
        };
        polls.frames[0] = PollFrame {
            start_ns: 0,
            flags: frame_flags::CONTAINER,
            ..PollFrame::default()
        };
        if let Some(start_ms) = task_since_ms {
            polls.depth = 2;
            polls.frames[1] = PollFrame {
                start_ns: start_ms * MS,
                task_id: 9,
                ..PollFrame::default()
            };
        }
        polls
    }

    /// What a copy taken during a write can hold: the new depth with a
    /// stale frame (of a task poll that returned long ago).
    fn torn(tid: u32, seq: u32) -> ThreadPolls {
        polls(tid, seq, Some(0))
    }

    #[test]
    fn a_whole_slot_is_copied_at_the_first_attempt() {
        let source = Racing::new(vec![polls(7, 4, Some(100))], vec![]);
        let read = read_whole(&source, 0, READ_ATTEMPTS).expect("whole");
        assert_eq!((read.tid, read.depth, read.seq), (7, 2, 4));
        assert_eq!(source.copies.get(), 1);
    }

    #[test]
    fn a_slot_whose_sequence_is_odd_is_never_copied() {
        let source = Racing::new(vec![torn(7, 5)], vec![]);
        assert!(read_whole(&source, 0, READ_ATTEMPTS).is_none());
        assert_eq!(source.copies.get(), 0, "not even copied");
    }

    #[test]
    fn a_copy_during_which_the_sequence_moved_is_dropped_and_retried() {
        // The first copy races a whole write section (seq 4 -> 6): the copy
        // may hold half of it, so it is dropped; the retry sees seq 6 still.
        let after = polls(7, 6, None);
        let source = Racing::new(vec![torn(7, 4)], vec![Some((0, after))]);
        let read = read_whole(&source, 0, READ_ATTEMPTS).expect("whole at the retry");
        assert_eq!((read.seq, read.depth), (6, 1));
        assert_eq!(source.copies.get(), 2);
    }

    #[test]
    fn a_slot_written_during_every_copy_is_skipped_and_counted() {
        let writes = (0..READ_ATTEMPTS as u32)
            .map(|i| Some((0, torn(7, 6 + 2 * i))))
            .collect();
        let source = Racing::new(vec![torn(7, 4), polls(8, 2, None)], writes);
        let taken = snapshot([7, 8], &source);
        assert_eq!(taken.skipped, 1);
        let tids: Vec<u32> = taken.threads.iter().map(|(tid, _)| *tid).collect();
        assert_eq!(tids, [8]);
    }

    #[test]
    fn the_sequence_may_wrap() {
        let after = polls(7, 0, None);
        let source = Racing::new(
            vec![polls(7, u32::MAX - 1, Some(1))],
            vec![Some((0, after))],
        );
        let read = read_whole(&source, 0, READ_ATTEMPTS).expect("whole");
        assert_eq!(read.seq, 0);
    }

    #[test]
    fn free_slots_and_values_of_no_thread_are_left_out() {
        let source = Racing::new(
            vec![polls(7, 2, None), polls(0, 2, None), polls(9, 2, None)],
            vec![],
        );
        let taken = snapshot([0, 8, 9], &source);
        let tids: Vec<u32> = taken.threads.iter().map(|(tid, _)| *tid).collect();
        assert_eq!(tids, [9], "slot 0 is free, slot 1 belongs to no thread yet");
        assert_eq!(source.copies.get(), 2);
    }

    #[test]
    fn a_torn_snapshot_is_never_reported_as_a_stall() {
        // Thread 7 is written during every copy: each copy holds the stale
        // frame of a poll that began at 0 (it would be 1 s stuck), and each
        // time the sequence moves. Thread 8 really is stuck since 400 ms.
        let writes = (0..READ_ATTEMPTS as u32)
            .map(|i| Some((0, torn(7, 12 + 2 * i))))
            .collect();
        let source = Racing::new(vec![torn(7, 10), polls(8, 2, Some(400))], writes);
        let taken = snapshot([7, 8], &source);
        let mut detector = StallDetector::new(50 * MS);
        let findings = detector.on_snapshot(1000 * MS, &taken.threads);
        let stalled: Vec<u32> = findings
            .iter()
            .map(|finding| match finding {
                Finding::InProgress(stall) => stall.tid,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(stalled, [8], "thread 7's torn copy is not reported");

        // Fed the torn value itself, the detector would report it: the
        // sequence check is what keeps it out.
        let mut detector = StallDetector::new(50 * MS);
        assert_eq!(
            detector.on_snapshot(1000 * MS, &[(7, torn(7, 10))]).len(),
            1
        );

        // A torn copy whose retry finds the write finished reports what the
        // thread really does now (a scheduler loop, no task poll): nothing.
        let source = Racing::new(vec![torn(7, 20)], vec![Some((0, polls(7, 22, None)))]);
        let taken = snapshot([7], &source);
        assert_eq!(taken.threads.len(), 1);
        assert!(detector.on_snapshot(1000 * MS, &taken.threads).is_empty());
    }
}
