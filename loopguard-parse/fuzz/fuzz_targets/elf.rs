//! `elf::analyze` on any bytes: an error or a result, never a
//! panic, and what it returns points inside the file. The wait functions
//! among the same symbols (`waits::sites_in`): never a panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loopguard_parse::elf::analyze;
use loopguard_parse::waits::{WaitKind, is_dynamically_linked, sites_in};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = analyze(data) {
        for copy in &info.poll_copies {
            if let Some(offset) = copy.id_offset() {
                assert!(offset >= 24 && offset % 8 == 0, "{copy:?}");
            }
        }
        for range in &info.blocking_ranges {
            assert!(range.start <= range.end, "{range:?}");
        }
    }
    let _ = is_dynamically_linked(data);
    for (_, name, kind) in sites_in(data, false) {
        assert_eq!(kind, WaitKind::Epoll, "{name}");
    }
    let _ = sites_in(data, true);
});
