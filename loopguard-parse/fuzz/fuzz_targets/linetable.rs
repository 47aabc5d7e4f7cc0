//! The `CPython` location-table reader on any bytes, at any code unit:
//! never a panic, never a loop without end.
//!
//! Input: 8 bytes of first line (signed, little-endian), 8 bytes of code
//! unit, then the table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loopguard_parse::linetable::line_of;

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Some((unit, table)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let first_line = i64::from_le_bytes(*first);
    let _ = line_of(table, first_line, u64::from_le_bytes(*unit));
    // Every instruction of a short code object, as a stack walk asks.
    for unit in 0..64 {
        let _ = line_of(table, first_line, unit);
    }
});
