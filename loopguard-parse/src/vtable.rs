//! Finds the byte offset of the task id inside a Tokio task, per `raw::poll`
//! copy, by reading the task vtable out of the binary itself.
//!
//! Every task type has a static `Vtable` whose first field is its
//! `raw::poll` copy, followed by more function pointers and then three
//! offsets: `trailer_offset`, `scheduler_offset`, `id_offset` (declaration
//! order in tokio 1.38 and later). The struct is not `repr(C)`, so instead of
//! trusting that order we check it: the words must be code pointers where
//! functions are expected and plausible, mutually consistent offsets where
//! offsets are expected (`scheduler <= id < trailer`, 8-byte aligned, the id
//! right after the scheduler field). A copy whose vtable does not pass gets
//! no id offset, and its polls are reported without a task id.
//!
//! The same three offsets tell which scheduler owns the task:
//! `id_offset - scheduler_offset` is the size of the scheduler handle. Every
//! event-loop scheduler (multi-thread, current-thread, `LocalSet`) stores an
//! `Arc` of 8 bytes; the blocking pool's `BlockingSchedule` is 0 bytes (tokio
//! 1.38, 1.39) or 16 (1.40 on). Any other size is a layout this loopguard
//! does not know (a future Tokio): such a copy is [`PollClass::Unknown`],
//! probed all the same, its polls told apart by return address and
//! reported without a task id. Never "not probed".

/// One 8-byte word of the image at some virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Word {
    /// The value after relocation (a relocation's addend in a PIE).
    pub value: u64,
    /// Whether a dynamic relocation writes this word at load time.
    pub relocated: bool,
}

/// Read access to the loaded image, as the vtable check needs it.
pub trait ImageWords {
    /// The word at `vaddr`, if it lies in the file's initialised data.
    fn word(&self, vaddr: u64) -> Option<Word>;
    /// Whether `vaddr` lies in executable code.
    fn is_code(&self, vaddr: u64) -> bool;
}

/// A vtable layout loopguard knows how to check.
#[derive(Clone, Copy, Debug)]
pub struct VtableLayout {
    /// Function pointers at the start (`poll` first).
    pub fn_slots: u64,
    /// Index of `trailer_offset`, `scheduler_offset` and `id_offset`.
    pub trailer_slot: u64,
    pub scheduler_slot: u64,
    pub id_slot: u64,
}

/// tokio 1.38 onwards: poll, schedule, dealloc, `try_read_output`,
/// `drop_join_handle_slow`, `drop_abort_handle`, shutdown, then the offsets.
pub const KNOWN_LAYOUTS: &[VtableLayout] = &[VtableLayout {
    fn_slots: 7,
    trailer_slot: 7,
    scheduler_slot: 8,
    id_slot: 9,
}];

/// The task header holds at least state, `queue_next` and the vtable pointer.
const MIN_HEADER_BYTES: u64 = 24;
/// Any scheduler handle Tokio stores in a task is at most this large.
const MAX_SCHEDULER_BYTES: u64 = 64;
/// A sanity bound on task cell sizes (futures can be large, not this large).
const MAX_TASK_BYTES: u64 = 1 << 24;

/// Size of the scheduler handle of event-loop tasks (an `Arc`).
const EVENT_LOOP_SCHEDULER_BYTES: u64 = 8;
/// Sizes of the blocking pool's `BlockingSchedule`: zero-sized in tokio
/// 1.38 and 1.39, two words of hooks from 1.40.
const BLOCKING_SCHEDULER_BYTES: [u64; 2] = [0, 16];

/// Who polls the tasks of one `raw::poll` copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollClass {
    /// An event loop (multi-thread worker, current-thread runtime,
    /// `LocalSet`): probed, task ids read at the verified offset.
    EventLoop,
    /// The blocking pool: blocking there is the point, not probed.
    BlockingPool,
    /// A layout loopguard cannot vouch for (no vtable verified, or a
    /// scheduler handle of a size no known Tokio has): probed, classified
    /// per poll by its return address, no task id.
    Unknown,
}

/// What a verified vtable says about its task type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLayout {
    /// Byte offset of the task id from the task header.
    pub id_offset: u64,
    /// Size of the scheduler handle stored in the task.
    pub scheduler_bytes: u64,
}

impl TaskLayout {
    /// Who polls tasks of this type, from the scheduler handle's size.
    pub fn class(&self) -> PollClass {
        if self.scheduler_bytes == EVENT_LOOP_SCHEDULER_BYTES {
            PollClass::EventLoop
        } else if BLOCKING_SCHEDULER_BYTES.contains(&self.scheduler_bytes) {
            PollClass::BlockingPool
        } else {
            PollClass::Unknown
        }
    }

    /// Whether tasks of this type run on the blocking pool.
    pub fn is_blocking_pool(&self) -> bool {
        self.class() == PollClass::BlockingPool
    }
}

/// Checks the vtable that starts at `slot_vaddr` (a word holding the address
/// of a `raw::poll` copy) against the known layouts.
pub fn verify_vtable(image: &impl ImageWords, slot_vaddr: u64) -> Option<TaskLayout> {
    KNOWN_LAYOUTS
        .iter()
        .find_map(|layout| verify_layout(image, slot_vaddr, layout))
}

fn verify_layout(image: &impl ImageWords, base: u64, layout: &VtableLayout) -> Option<TaskLayout> {
    let word_at = |slot: u64| image.word(base.checked_add(8 * slot)?);
    for slot in 0..layout.fn_slots {
        let word = word_at(slot)?;
        if !image.is_code(word.value) {
            return None;
        }
    }
    let offset = |slot: u64| -> Option<u64> {
        let word = word_at(slot)?;
        (!word.relocated && word.value < MAX_TASK_BYTES && word.value % 8 == 0)
            .then_some(word.value)
    };
    let trailer = offset(layout.trailer_slot)?;
    let scheduler = offset(layout.scheduler_slot)?;
    let id = offset(layout.id_slot)?;
    let consistent = scheduler >= MIN_HEADER_BYTES
        && id >= scheduler
        && id - scheduler <= MAX_SCHEDULER_BYTES
        && trailer >= id + 8;
    // `then`, not `then_some`: the size is only computed once `id >= scheduler`.
    consistent.then(|| TaskLayout {
        id_offset: id,
        scheduler_bytes: id - scheduler,
    })
}

/// Combines the verdicts of every candidate vtable found for one `raw::poll`
/// copy. A candidate that fails the check is no vtable (a data word that
/// happens to equal the address) and is ignored; the verified ones must all
/// agree (identical code folding can make task types share a copy; they then
/// must share the layout too).
pub fn agreed_layout(verdicts: impl IntoIterator<Item = Option<TaskLayout>>) -> Option<TaskLayout> {
    let mut agreed = None;
    for layout in verdicts.into_iter().flatten() {
        match agreed {
            None => agreed = Some(layout),
            Some(previous) if previous == layout => {}
            Some(_) => return None,
        }
    }
    agreed
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const CODE: std::ops::Range<u64> = 0x1000..0x9000;

    #[derive(Default)]
    struct FakeImage(HashMap<u64, Word>);

    impl FakeImage {
        fn vtable(base: u64, fns: u64, offsets: &[u64]) -> Self {
            let mut image = Self::default();
            for slot in 0..fns {
                image.0.insert(
                    base + 8 * slot,
                    Word {
                        value: 0x1000 + 0x40 * slot,
                        relocated: true,
                    },
                );
            }
            for (i, &value) in offsets.iter().enumerate() {
                image.0.insert(
                    base + 8 * (fns + i as u64),
                    Word {
                        value,
                        relocated: false,
                    },
                );
            }
            image
        }
    }

    impl ImageWords for FakeImage {
        fn word(&self, vaddr: u64) -> Option<Word> {
            self.0.get(&vaddr).copied()
        }
        fn is_code(&self, vaddr: u64) -> bool {
            CODE.contains(&vaddr)
        }
    }

    #[test]
    fn tokio_layout_yields_id_offset() {
        // trailer 0x80, scheduler 0x20, id 0x28: Arc<Handle> scheduler.
        let image = FakeImage::vtable(0x20000, 7, &[0x80, 0x20, 0x28]);
        let layout = verify_vtable(&image, 0x20000).unwrap();
        assert_eq!(
            layout,
            TaskLayout {
                id_offset: 0x28,
                scheduler_bytes: 8
            }
        );
        assert!(!layout.is_blocking_pool());
    }

    #[test]
    fn blocking_schedule_tasks_are_told_apart() {
        // tokio 1.38/1.39: BlockingSchedule is zero-sized, id == scheduler.
        let old =
            verify_vtable(&FakeImage::vtable(0x20000, 7, &[0x40, 0x20, 0x20]), 0x20000).unwrap();
        assert_eq!(old.id_offset, 0x20);
        assert!(old.is_blocking_pool());
        // tokio 1.40 on: it holds 16 bytes of hooks.
        let new =
            verify_vtable(&FakeImage::vtable(0x20000, 7, &[0x80, 0x20, 0x30]), 0x20000).unwrap();
        assert_eq!(new.id_offset, 0x30);
        assert!(new.is_blocking_pool());
    }

    #[test]
    fn a_scheduler_handle_of_an_unknown_size_is_unknown_not_blocking() {
        // A future Tokio with a 24-byte handle: neither 8 (event loop) nor 0
        // or 16 (blocking pool). It must stay probed, so it is not the pool.
        let layout =
            verify_vtable(&FakeImage::vtable(0x20000, 7, &[0x80, 0x20, 0x38]), 0x20000).unwrap();
        assert_eq!(layout.scheduler_bytes, 24);
        assert_eq!(layout.class(), PollClass::Unknown);
        assert!(!layout.is_blocking_pool());
        for (bytes, class) in [
            (0, PollClass::BlockingPool),
            (8, PollClass::EventLoop),
            (16, PollClass::BlockingPool),
            (32, PollClass::Unknown),
            (64, PollClass::Unknown),
        ] {
            let layout = TaskLayout {
                id_offset: 0x20 + bytes,
                scheduler_bytes: bytes,
            };
            assert_eq!(layout.class(), class, "{bytes} bytes");
        }
    }

    #[test]
    fn reordered_offsets_are_rejected() {
        let image = FakeImage::vtable(0x20000, 7, &[0x20, 0x28, 0x80]);
        assert_eq!(verify_vtable(&image, 0x20000), None);
    }

    #[test]
    fn an_id_before_the_scheduler_is_rejected_without_overflow() {
        // Found by the `vtable` fuzz target: the handle size was computed
        // (and overflowed) before the check that rules it out.
        let image = FakeImage::vtable(0x20000, 7, &[0x80, 0x30, 0x28]);
        assert_eq!(verify_vtable(&image, 0x20000), None);
        // A vtable at the very top of the address space reads no word past it.
        assert_eq!(verify_vtable(&image, u64::MAX - 7), None);
    }

    #[test]
    fn a_missing_function_pointer_is_rejected() {
        let mut image = FakeImage::vtable(0x20000, 7, &[0x80, 0x20, 0x28]);
        image.0.insert(
            0x20000 + 8 * 3,
            Word {
                value: 0,
                relocated: false,
            },
        );
        assert_eq!(verify_vtable(&image, 0x20000), None);
    }

    #[test]
    fn a_relocated_offset_is_rejected() {
        let mut image = FakeImage::vtable(0x20000, 7, &[0x80, 0x20, 0x28]);
        image.0.insert(
            0x20000 + 8 * 9,
            Word {
                value: 0x28,
                relocated: true,
            },
        );
        assert_eq!(verify_vtable(&image, 0x20000), None);
    }

    #[test]
    fn an_older_shorter_vtable_is_rejected() {
        // Only six function pointers: the seventh word is an offset, not code.
        let image = FakeImage::vtable(0x20000, 6, &[0x80, 0x20, 0x28, 0x30]);
        assert_eq!(verify_vtable(&image, 0x20000), None);
    }

    #[test]
    fn unaligned_or_huge_offsets_are_rejected() {
        assert_eq!(
            verify_vtable(&FakeImage::vtable(0, 7, &[0x80, 0x20, 0x2c]), 0),
            None
        );
        assert_eq!(
            verify_vtable(&FakeImage::vtable(0, 7, &[1 << 40, 0x20, 0x28]), 0),
            None
        );
    }

    #[test]
    fn verdicts_must_agree() {
        let layout = |id_offset| {
            Some(TaskLayout {
                id_offset,
                scheduler_bytes: 8,
            })
        };
        assert_eq!(agreed_layout([layout(0x28), layout(0x28)]), layout(0x28));
        assert_eq!(agreed_layout([layout(0x28), layout(0x30)]), None);
        assert_eq!(agreed_layout([layout(0x28), None]), layout(0x28));
        assert_eq!(agreed_layout([None, None]), None);
        assert_eq!(agreed_layout(std::iter::empty()), None);
    }
}
