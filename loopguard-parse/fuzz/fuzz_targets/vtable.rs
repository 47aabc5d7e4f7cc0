//! The task-vtable check on any image: whatever the words, a layout it
//! accepts is a sane one (the id inside the task, after the header).
//!
//! Input: 2 bytes giving the code range's size in 16-byte units, then
//! 9-byte words (8 bytes little-endian value, 1 byte "relocated" flag)
//! laid out from the vtable's base address on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loopguard_parse::vtable::{ImageWords, PollClass, Word, verify_vtable};

const CODE_START: u64 = 0x1000;
const BASE: u64 = 0x20_0000;

struct Image {
    code_end: u64,
    words: Vec<Word>,
}

impl ImageWords for Image {
    fn word(&self, vaddr: u64) -> Option<Word> {
        let index = vaddr.checked_sub(BASE)?;
        if index % 8 != 0 {
            return None;
        }
        self.words.get(usize::try_from(index / 8).ok()?).copied()
    }

    fn is_code(&self, vaddr: u64) -> bool {
        (CODE_START..self.code_end).contains(&vaddr)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((size, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let image = Image {
        code_end: CODE_START + 16 * u64::from(u16::from_le_bytes(*size)),
        words: rest
            .chunks_exact(9)
            .map(|chunk| Word {
                value: u64::from_le_bytes(chunk[..8].try_into().unwrap()),
                relocated: chunk[8] & 1 != 0,
            })
            .collect(),
    };
    for slot in [BASE, BASE + 8, BASE + 16, BASE - 8] {
        if let Some(layout) = verify_vtable(&image, slot) {
            assert!(
                layout.id_offset >= 24 && layout.id_offset % 8 == 0,
                "{layout:?}"
            );
            assert!(layout.scheduler_bytes <= 64, "{layout:?}");
            assert_eq!(
                layout.is_blocking_pool(),
                layout.class() == PollClass::BlockingPool
            );
        }
    }
});
