//! The functions an event-loop thread waits for events in, found in the
//! symbols of one ELF file: the wait probes go on them (the agent's
//! `discover::waits` picks the files: the executable and the C libraries
//! the process maps).
//!
//! - The C library's epoll wrappers (`epoll_wait`, `epoll_pwait`,
//!   `epoll_pwait2`), from its dynamic symbols, or from the executable
//!   itself when it is statically linked. The dynamic symbols are enough:
//!   Debian's `python3` and `node` are stripped and still export nothing
//!   loopguard needs, since the wrappers live in libc.
//! - Tokio's park functions, from the executable's symbol table: a parked
//!   multi-thread worker and the thread running `block_on` wait on a futex
//!   through them, never in epoll, and would otherwise look busy forever.

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::symbols::demangle;

/// The C library's epoll wrappers.
pub const EPOLL_WRAPPERS: [&str; 3] = ["epoll_wait", "epoll_pwait", "epoll_pwait2"];

/// Tokio's park functions (demangled, generics and `<>` removed). A worker
/// parks in `Inner::park_condvar` or `Inner::park_driver` (which waits in
/// epoll, nested), the `block_on` thread in `park::Inner::park`. Outer
/// levels are listed too, for builds that inline the inner ones: nested
/// waits count once.
const TOKIO_PARKS: &[&str] = &[
    "tokio::runtime::scheduler::multi_thread::park::Inner::park_condvar",
    "tokio::runtime::scheduler::multi_thread::park::Inner::park_driver",
    "tokio::runtime::scheduler::multi_thread::park::Inner::park",
    "tokio::runtime::scheduler::multi_thread::park::Parker::park",
    "tokio::runtime::scheduler::multi_thread::park::Parker::park_timeout",
    "tokio::runtime::park::Inner::park",
    "tokio::runtime::park::Inner::park_timeout",
    "tokio::runtime::park::CachedParkThread::park",
    "tokio::runtime::park::CachedParkThread::park_timeout",
];

/// What a wait site is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WaitKind {
    /// A C library epoll wrapper.
    Epoll,
    /// One of Tokio's park functions.
    TokioPark,
    /// A call a Tokio thread parks through, in a function that inlined the
    /// park ([`crate::park_calls`]): probed on the call instruction, as
    /// the park's entry.
    TokioParkCall,
    /// The instruction such a call returns to: the park's end.
    TokioParkReturn,
}

/// Strips what demangling leaves around a method path: `<`, `>` and
/// generic arguments (`::<T>` and `Type<T>`), so legacy and v0 names
/// compare equal.
pub fn plain_path(demangled: &str) -> String {
    let mut out = String::with_capacity(demangled.len());
    let mut generics = 0usize;
    for c in demangled.chars() {
        match c {
            '<' if generics > 0 => generics += 1,
            '>' if generics > 0 => generics -= 1,
            _ if generics > 0 => {}
            // After a name (`Type<`) or `::` (`f::<`), `<` opens generics;
            // elsewhere (`<Type as Trait>`, `<Type>::f`) it only qualifies.
            '<' if out.ends_with(|p: char| p.is_alphanumeric() || p == '_') => generics = 1,
            '<' if out.ends_with("::") => {
                out.truncate(out.len() - 2);
                generics = 1;
            }
            '<' | '>' => {}
            _ => out.push(c),
        }
    }
    out
}

fn is_tokio_park(demangled: &str) -> bool {
    let path = plain_path(demangled);
    TOKIO_PARKS.contains(&path.as_str())
}

/// The file offset of virtual address `vaddr` in an ELF.
pub(crate) fn file_offset(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        // Header values, unchecked: no arithmetic on them may wrap.
        let into = vaddr.checked_sub(segment.address())?;
        if into < size {
            offset.checked_add(into)
        } else {
            None
        }
    })
}

/// How far past its entry, at file offset `entry`, a wait probe goes on
/// the function of `size` bytes at `address` ([`crate::placement`]); 0 for
/// a function whose size is not known or whose bytes are not all there.
fn probe_skip(data: &[u8], entry: u64, size: u64, address: u64) -> u64 {
    function_code(data, entry, size).map_or(0, |code| {
        crate::placement::entry_probe_offset(code, address)
    })
}

/// The `size` bytes of a function at file offset `start`, when they are
/// all there.
pub(crate) fn function_code(data: &[u8], start: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(start).ok()?;
    data.get(start..start.checked_add(usize::try_from(size).ok()?)?)
}

/// Whether an ELF symbol is a function defined in its file (a text symbol
/// with an address).
pub(crate) fn is_defined_function(symbol: &object::Symbol<'_, '_>) -> bool {
    symbol.kind() == SymbolKind::Text && symbol.address() != 0 && !symbol.is_undefined()
}

/// Wait sites in one ELF file's symbols: the epoll wrappers it defines and,
/// when `tokio` is set, Tokio's park functions. Each offset is where the
/// probe goes: the function's entry, or a few instructions in where the
/// kernel emulates the instruction ([`crate::placement`]).
pub fn sites_in(data: &[u8], tokio: bool) -> Vec<(u64, String, WaitKind)> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let mut sites: Vec<(u64, String, WaitKind)> = Vec::new();
    for symbol in file.symbols().chain(file.dynamic_symbols()) {
        if !is_defined_function(&symbol) {
            continue;
        }
        let Ok(raw) = symbol.name() else { continue };
        // glibc versions its exports (`epoll_wait@@GLIBC_2.3.2`).
        let bare = raw.split('@').next().unwrap_or(raw);
        let kind = if EPOLL_WRAPPERS.contains(&bare) {
            WaitKind::Epoll
        } else if tokio && is_tokio_park(&demangle(raw)) {
            WaitKind::TokioPark
        } else {
            continue;
        };
        let Some(entry) = file_offset(&file, symbol.address()) else {
            continue;
        };
        // Aliases of one function (its symbol and its dynamic symbol) get
        // the same place.
        let offset = entry + probe_skip(data, entry, symbol.size(), symbol.address());
        if !sites.iter().any(|(seen, _, _)| *seen == offset) {
            sites.push((offset, demangle(bare), kind));
        }
    }
    sites.sort();
    sites
}

/// Whether an ELF asks for a dynamic loader (`.interp`).
pub fn is_dynamically_linked(data: &[u8]) -> bool {
    object::File::parse(data).is_ok_and(|file| file.section_by_name(".interp").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_and_v0_park_names_are_recognised() {
        assert!(is_tokio_park("tokio::runtime::park::Inner::park"));
        assert!(is_tokio_park("<tokio::runtime::park::Inner>::park"));
        assert!(is_tokio_park(
            "<tokio::runtime::scheduler::multi_thread::park::Inner>::park_condvar"
        ));
        assert!(is_tokio_park(
            "<tokio::runtime::park::CachedParkThread>::park::<core::time::Duration>"
        ));
        assert!(!is_tokio_park("tokio::runtime::park::Inner::unpark"));
        assert!(!is_tokio_park(
            "tokio::runtime::park::CachedParkThread::block_on"
        ));
    }

    #[test]
    fn files_without_segments_or_not_elf_give_no_sites() {
        use object::write::{Object as Writer, Symbol, SymbolSection};
        use object::{
            Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolScope,
        };
        let mut writer = Writer::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = writer.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
        writer.append_section_data(text, &[0xc3; 64], 16);
        for (name, at) in [("epoll_wait", 0), ("epoll_pwait2", 16), ("read", 32)] {
            writer.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: at,
                size: 16,
                kind: SymbolKind::Text,
                scope: SymbolScope::Dynamic,
                weak: false,
                section: SymbolSection::Section(text),
                flags: SymbolFlags::None,
            });
        }
        let bytes = writer.write().unwrap();
        // A relocatable object has no segments: offsets are not known, so
        // nothing can be attached, and nothing is claimed.
        assert!(sites_in(&bytes, false).is_empty());
        assert!(sites_in(b"not an elf", true).is_empty());
        assert!(!is_dynamically_linked(&bytes));
        assert!(!is_dynamically_linked(b"not an elf"));
    }

    #[test]
    fn plain_paths_drop_generics() {
        assert_eq!(
            plain_path("<a::B<c::D>>::f::<e::F<g>>"),
            "a::B::f",
            "the type's own generics go too"
        );
    }
}
