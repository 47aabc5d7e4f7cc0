//! Tokio parks a build inlined into their callers: the call a parked
//! thread sleeps through, found in the machine code of Tokio's scheduler
//! and park functions.
//!
//! A multi-thread worker parks on its condition variable in
//! `multi_thread::park::Inner::park_condvar`, which the wait probes go on
//! by name ([`crate::waits`]). A fat-LTO build with Tokio's `parking_lot`
//! feature (which `full` turns on) may keep a copy of that function for
//! one caller and inline it, with `Inner::park` and `Parker::park`, into
//! `worker::Context::park_internal` for the path idle workers take: a
//! probe on the named copy never fires, and a worker asleep on its
//! condvar looks busy. What stays out of line is the condition variable's
//! own wait (`parking_lot::condvar::Condvar::wait_until_internal`, or the
//! standard library's); a call to it from Tokio's scheduler or park code
//! is a park. The wait path probes the call instruction as the park's
//! entry and the instruction after it (where the call returns) as its end.

use std::collections::{HashMap, HashSet};

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use object::{Architecture, Object, ObjectSymbol};

use crate::symbols::demangle;
use crate::waits::{file_offset, function_code, is_defined_function, plain_path};

/// Where Tokio's code that parks a thread lives (plain paths, prefixes):
/// the multi-thread workers, the current-thread scheduler, the `block_on`
/// thread's parker and the `block_on`s a park may be inlined into. Not the
/// blocking pool: its idle threads wait on a condvar too, and a probe
/// there would cost every `spawn_blocking` thread two traps per wait.
const PARK_CALLERS: [&str; 6] = [
    "tokio::runtime::scheduler::multi_thread::",
    "tokio::runtime::scheduler::current_thread::",
    "tokio::runtime::park::",
    "tokio::runtime::context::blocking::",
    "tokio::runtime::runtime::Runtime::block_on",
    "tokio::runtime::handle::Handle::block_on",
];

/// At most this much of one function is decoded (a `run` loop that
/// inlined the whole scheduler is a few KiB).
const MAX_SCANNED_BYTES: u64 = 256 * 1024;

/// A call through which a Tokio thread parks, inside a function that
/// inlined the park.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParkCall {
    /// File offset of the call instruction: the park begins.
    pub call_offset: u64,
    /// File offset of the instruction after it: the park has ended.
    pub return_offset: u64,
    /// The function the call is in (demangled).
    pub caller: String,
    /// The condition variable's wait it calls (demangled).
    pub callee: String,
}

/// Whether a function (plain path) is a condition variable's wait:
/// `parking_lot::condvar::Condvar::wait_until_internal`,
/// `std::sys::sync::condvar::futex::Condvar::wait`, Tokio's own wrappers.
fn is_condvar_wait(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let last = lower.rsplit("::").next().unwrap_or_default();
    lower.contains("condvar") && last.starts_with("wait")
}

fn is_park_caller(path: &str) -> bool {
    PARK_CALLERS.iter().any(|prefix| path.starts_with(prefix))
}

/// The park calls in one x86-64 ELF executable's code (none when it has
/// no symbol table, or is built for another architecture).
pub fn park_calls_in(data: &[u8]) -> Vec<ParkCall> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    if file.architecture() != Architecture::X86_64 {
        return Vec::new();
    }
    let mut waits: HashMap<u64, String> = HashMap::new();
    let mut callers: Vec<(u64, u64, String)> = Vec::new();
    for symbol in file.symbols() {
        if !is_defined_function(&symbol) {
            continue;
        }
        let Ok(raw) = symbol.name() else { continue };
        let name = demangle(raw);
        let path = plain_path(&name);
        if is_condvar_wait(&path) {
            waits.insert(symbol.address(), name);
        } else if is_park_caller(&path) && symbol.size() > 0 {
            callers.push((symbol.address(), symbol.size(), name));
        }
    }
    if waits.is_empty() {
        return Vec::new();
    }
    let mut calls: Vec<ParkCall> = callers
        .into_iter()
        .flat_map(|(address, size, caller)| {
            calls_in_function(data, &file, address, size, &waits)
                .into_iter()
                .map(move |(call_offset, return_offset, callee)| ParkCall {
                    call_offset,
                    return_offset,
                    caller: caller.clone(),
                    callee,
                })
        })
        .collect();
    calls.sort();
    calls.dedup_by_key(|call| call.call_offset);
    calls
}

/// The direct calls to one of `waits` in the function of `size` bytes at
/// `address`: `(call's file offset, return's file offset, callee)`.
fn calls_in_function(
    data: &[u8],
    file: &object::File<'_>,
    address: u64,
    size: u64,
    waits: &HashMap<u64, String>,
) -> Vec<(u64, u64, String)> {
    let Some(start) = file_offset(file, address) else {
        return Vec::new();
    };
    let Some(code) = function_code(data, start, size.min(MAX_SCANNED_BYTES)) else {
        return Vec::new();
    };
    let mut calls = Vec::new();
    let mut jumped_to = HashSet::new();
    for instruction in Decoder::with_ip(64, code, address, DecoderOptions::NONE) {
        match instruction.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                jumped_to.insert(instruction.near_branch_target());
            }
            FlowControl::Call => {
                if let Some(callee) = waits.get(&instruction.near_branch_target()) {
                    calls.push((instruction.ip(), instruction.next_ip(), callee));
                }
            }
            _ => {}
        }
    }
    // The return probe ends a wait wherever it fires: where another path
    // of the function joins at that instruction (a `park_timeout` that
    // never sleeps), it would end a wait that never began there. Such a
    // call is left alone.
    calls
        .into_iter()
        .filter(|(_, back, _)| !jumped_to.contains(back))
        .filter_map(|(call, back, callee)| {
            Some((
                file_offset(file, call)?,
                file_offset(file, back)?,
                callee.clone(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condvar_waits_are_told_by_name() {
        for wait in [
            "parking_lot::condvar::Condvar::wait_until_internal",
            "std::sys::sync::condvar::futex::Condvar::wait",
            "std::sys::sync::condvar::futex::Condvar::wait_optional_timeout",
            "tokio::loom::std::parking_lot::Condvar::wait",
        ] {
            assert!(is_condvar_wait(wait), "{wait}");
        }
        for other in [
            "parking_lot::condvar::Condvar::notify_one_slow",
            "tokio::runtime::park::Inner::park",
            "std::sys::pal::unix::futex::futex_wait",
        ] {
            assert!(!is_condvar_wait(other), "{other}");
        }
    }

    #[test]
    fn only_tokio_scheduler_and_park_code_parks() {
        assert!(is_park_caller(
            "tokio::runtime::scheduler::multi_thread::worker::Context::park_internal"
        ));
        assert!(is_park_caller(
            "tokio::runtime::context::blocking::BlockingRegionGuard::block_on"
        ));
        assert!(is_park_caller("tokio::runtime::runtime::Runtime::block_on"));
        assert!(!is_park_caller(
            "tokio::runtime::blocking::pool::Inner::run"
        ));
        assert!(!is_park_caller("myapp::worker::park"));
    }

    /// Code at 0x1000: `park_internal` (0x1000, 16 bytes) calls the
    /// condvar's wait (0x1030) and another function (0x1040); the
    /// blocking pool's `run` (0x1010) calls the wait too; `park_joined`
    /// (0x1020) calls it where another path joins at its return.
    fn code() -> Vec<u8> {
        let mut code = vec![0xcc; 0x50];
        let call = |code: &mut Vec<u8>, at: usize, target: i64| {
            let rel = i32::try_from(target - (0x1000 + at as i64 + 5)).unwrap();
            code[at] = 0xe8;
            code[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
        };
        call(&mut code, 0x00, 0x1030);
        call(&mut code, 0x05, 0x1040);
        code[0x0a] = 0xc3;
        call(&mut code, 0x10, 0x1030);
        // park_joined (0x1020, 16 bytes): jmp +5 (to 0x1027, the return
        // address of) call wait; ret.
        code[0x20] = 0xeb;
        code[0x21] = 0x05;
        call(&mut code, 0x22, 0x1030);
        for ret in [0x15, 0x27, 0x30, 0x40] {
            code[ret] = 0xc3;
        }
        code
    }

    const SYMBOLS: [(&str, u64, u64); 5] = [
        (
            "_ZN5tokio7runtime9scheduler12multi_thread6worker7Context11park_joined17h0123456789abcdefE",
            0x1020,
            16,
        ),
        (
            "_ZN5tokio7runtime9scheduler12multi_thread6worker7Context13park_internal17h0123456789abcdefE",
            0x1000,
            16,
        ),
        (
            "_ZN5tokio7runtime8blocking4pool5Inner3run17h0123456789abcdefE",
            0x1010,
            16,
        ),
        (
            "_ZN11parking_lot7condvar7Condvar19wait_until_internal17h0123456789abcdefE",
            0x1030,
            1,
        ),
        (
            "_ZN5tokio7runtime9scheduler12multi_thread6worker7Context5other17h0123456789abcdefE",
            0x1040,
            1,
        ),
    ];

    /// An executable: [`code`] in one loadable segment, [`SYMBOLS`] in its
    /// symbol table.
    fn executable() -> Vec<u8> {
        use object::write::elf::{FileHeader, ProgramHeader, SectionHeader, Sym, Writer};
        use object::{Endianness, elf};
        let code = code();
        let symbols = SYMBOLS;
        let mut out = Vec::new();
        let mut writer = Writer::new(Endianness::Little, true, &mut out);
        writer.reserve_file_header();
        writer.reserve_program_headers(1);
        let text_offset = writer.reserve(code.len(), 0x1000);
        let text_name = writer.add_section_name(b".text");
        writer.reserve_null_section_index();
        let text_index = writer.reserve_section_index();
        let names: Vec<_> = symbols
            .iter()
            .map(|(name, _, _)| writer.add_string(name.as_bytes()))
            .collect();
        writer.reserve_null_symbol_index();
        for _ in &symbols {
            writer.reserve_symbol_index(Some(text_index));
        }
        writer.reserve_symtab_section_index();
        writer.reserve_strtab_section_index();
        writer.reserve_shstrtab_section_index();
        writer.reserve_symtab();
        writer.reserve_strtab();
        writer.reserve_shstrtab();
        writer.reserve_section_headers();
        writer
            .write_file_header(&FileHeader {
                os_abi: 0,
                abi_version: 0,
                e_type: elf::ET_EXEC,
                e_machine: elf::EM_X86_64,
                e_entry: 0x1000,
                e_flags: 0,
            })
            .unwrap();
        writer.write_program_header(&ProgramHeader {
            p_type: elf::PT_LOAD,
            p_flags: elf::PF_R | elf::PF_X,
            p_offset: text_offset as u64,
            p_vaddr: 0x1000,
            p_paddr: 0x1000,
            p_filesz: code.len() as u64,
            p_memsz: code.len() as u64,
            p_align: 0x1000,
        });
        writer.pad_until(text_offset);
        writer.write(&code);
        writer.write_null_symbol();
        for ((_, value, size), name) in symbols.iter().zip(names) {
            writer.write_symbol(&Sym {
                name: Some(name),
                section: Some(text_index),
                st_info: (elf::STB_LOCAL << 4) | elf::STT_FUNC,
                st_other: 0,
                st_shndx: 0,
                st_value: *value,
                st_size: *size,
            });
        }
        writer.write_strtab();
        writer.write_shstrtab();
        writer.write_null_section_header();
        writer.write_section_header(&SectionHeader {
            name: Some(text_name),
            sh_type: elf::SHT_PROGBITS,
            sh_flags: u64::from(elf::SHF_ALLOC | elf::SHF_EXECINSTR),
            sh_addr: 0x1000,
            sh_offset: text_offset as u64,
            sh_size: code.len() as u64,
            sh_link: 0,
            sh_info: 0,
            sh_addralign: 16,
            sh_entsize: 0,
        });
        writer.write_symtab_section_header(symbols.len() as u32 + 1);
        writer.write_strtab_section_header();
        writer.write_shstrtab_section_header();
        out
    }

    #[test]
    fn a_call_to_the_condvar_wait_from_the_scheduler_is_a_park() {
        let data = executable();
        let calls = park_calls_in(&data);
        assert_eq!(calls.len(), 1, "{calls:?}");
        let call = &calls[0];
        assert_eq!(&data[call.call_offset as usize..][..1], &[0xe8]);
        assert_eq!(call.return_offset, call.call_offset + 5);
        assert!(call.caller.contains("park_internal"), "{}", call.caller);
        assert!(
            call.callee.contains("wait_until_internal"),
            "{}",
            call.callee
        );
        assert!(park_calls_in(b"not an elf").is_empty());
    }
}
