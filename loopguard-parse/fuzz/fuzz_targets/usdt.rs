//! The `.note.stapsdt` walker and the argument-spec parser on any bytes:
//! never a panic; every spec decoded is one the kernel side can use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loopguard_parse::usdt::{ArgLocation, parse_args, parse_notes};

fn check_args(text: &str) {
    if let Ok(args) = parse_args(text) {
        for arg in args {
            assert!(matches!(arg.size, 1 | 2 | 4 | 8), "{arg:?}");
            if let ArgLocation::Register { offset } | ArgLocation::Memory { offset, .. } =
                arg.location
            {
                assert!(offset < 21 * 8, "{arg:?}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for note in parse_notes(data) {
        check_args(&note.args);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_args(text);
    }
});
