//! Where an event-loop thread waits for events: the functions the wait
//! probes go on.
//!
//! - The C library's epoll wrappers (`epoll_wait`, `epoll_pwait`,
//!   `epoll_pwait2`), from the dynamic symbols of every C library the
//!   process maps, or from the executable itself when it is statically
//!   linked. The dynamic symbols are enough: Debian's `python3` and `node`
//!   are stripped and still export nothing loopguard needs, since the
//!   wrappers live in libc.
//! - Tokio's park functions, from the executable's symbol table: a parked
//!   multi-thread worker and the thread running `block_on` wait on a futex
//!   through them, never in epoll, and would otherwise look busy forever.

use std::path::PathBuf;

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use super::proc::Mapping;
use super::symbols::demangle;

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
}

/// One function the wait probes attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitSite {
    /// The file to attach to, as seen from loopguard (through
    /// `/proc/PID/root` for a library, so containers work).
    pub probe_path: PathBuf,
    /// The file as the target names it.
    pub display_path: String,
    pub file_offset: u64,
    pub name: String,
    pub kind: WaitKind,
}

/// Strips what demangling leaves around a method path: `<`, `>` and
/// generic arguments (`::<T>` and `Type<T>`), so legacy and v0 names
/// compare equal.
fn plain_path(demangled: &str) -> String {
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

/// The multi-thread worker parks that sleep in a futex (its condvar), from
/// the innermost: a build that inlined `park_condvar` keeps an outer level.
const WORKER_CONDVAR_PARKS: [&str; 3] = [
    "tokio::runtime::scheduler::multi_thread::park::Inner::park_condvar",
    "tokio::runtime::scheduler::multi_thread::park::Inner::park",
    "tokio::runtime::scheduler::multi_thread::park::Parker::park",
];

/// Whether the `sched_switch` wait path sees every park of `sites`' Tokio:
/// a multi-thread worker that parks on its condvar sleeps in a futex, which
/// only a park probe tells from a lock. When the build kept a multi-thread
/// park but none of [`WORKER_CONDVAR_PARKS`] (inlined), the uprobe path is
/// used instead. (With no multi-thread park at all, the runtime is
/// current-thread only, or every park was inlined, which no path sees.)
pub fn switch_sees_every_park(sites: &[WaitSite]) -> bool {
    let parks = || {
        sites
            .iter()
            .filter(|site| site.kind == WaitKind::TokioPark)
            .map(|site| plain_path(&site.name))
    };
    let multi_thread = "tokio::runtime::scheduler::multi_thread::";
    !parks().any(|path| path.starts_with(multi_thread))
        || parks().any(|path| WORKER_CONDVAR_PARKS.contains(&path.as_str()))
}

/// The wait sites the `sched_switch` wait path still probes. It sees a
/// thread asleep in epoll without a probe, but not a park that sleeps in a
/// futex, which a lock sleeps in too: so the `block_on` thread's parks
/// (`tokio::runtime::park::`) and a worker's condvar park keep their
/// uprobes, both only run on the way to sleep. A worker's `park_timeout`
/// (a driver poll that does not sleep, on every maintenance tick) and
/// `park_driver` (epoll) are not probed, nor the epoll wrappers.
pub fn probed_on_switch(sites: &[WaitSite]) -> Vec<&WaitSite> {
    let path_of = |site: &WaitSite| plain_path(&site.name);
    let condvar = WORKER_CONDVAR_PARKS.iter().find_map(|wanted| {
        sites
            .iter()
            .find(|site| site.kind == WaitKind::TokioPark && path_of(site) == *wanted)
    });
    sites
        .iter()
        .filter(|site| {
            site.kind == WaitKind::TokioPark
                && (path_of(site).starts_with("tokio::runtime::park::")
                    || condvar.is_some_and(|chosen| std::ptr::eq(chosen, *site)))
        })
        .collect()
}

/// The file offset of virtual address `vaddr` in an ELF.
fn file_offset(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        (vaddr >= start && vaddr < start + size).then(|| vaddr - start + offset)
    })
}

/// Wait sites in one ELF file's symbols: the epoll wrappers it defines and,
/// when `tokio` is set, Tokio's park functions.
pub fn sites_in(data: &[u8], tokio: bool) -> Vec<(u64, String, WaitKind)> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let mut sites: Vec<(u64, String, WaitKind)> = Vec::new();
    for symbol in file.symbols().chain(file.dynamic_symbols()) {
        if symbol.kind() != SymbolKind::Text || symbol.address() == 0 || symbol.is_undefined() {
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
        if let Some(offset) = file_offset(&file, symbol.address())
            && !sites.iter().any(|(seen, _, _)| *seen == offset)
        {
            sites.push((offset, demangle(bare), kind));
        }
    }
    sites.sort();
    sites
}

/// Whether a mapped file is a C library (glibc's `libc.so.6`, musl's
/// `ld-musl-*.so.1` / `libc.musl-*.so.1`).
pub fn is_c_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so")
        || name.starts_with("libc-")
        || name.starts_with("ld-musl-")
        || name.starts_with("libc.musl-")
}

/// Whether an ELF asks for a dynamic loader (`.interp`).
pub fn is_dynamically_linked(data: &[u8]) -> bool {
    object::File::parse(data).is_ok_and(|file| file.section_by_name(".interp").is_some())
}

/// Where a dynamically linked program's C library usually is, seen from
/// process `pid` (through `/proc/PID/root`): the first that exists.
pub fn default_c_library(pid: u32) -> Option<String> {
    const CANDIDATES: [&str; 7] = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/usr/lib/libc.so.6",
        "/lib/libc.so.6",
        "/lib/ld-musl-x86_64.so.1",
    ];
    CANDIDATES
        .iter()
        .find(|path| super::files::exists_in_root(pid, path))
        .map(|path| (*path).to_owned())
}

/// The distinct C libraries process `pid` maps executable: one executable
/// mapping of each, to be read through (a name the target may have
/// deleted and reused since, " (deleted)" suffix or not).
pub fn c_libraries(maps: &[Mapping]) -> Vec<Mapping> {
    let mut libraries: Vec<Mapping> = maps
        .iter()
        .filter(|m| m.executable && m.path.starts_with('/') && is_c_library(&m.path))
        .cloned()
        .collect();
    libraries.sort_by(|a, b| a.path.cmp(&b.path));
    libraries.dedup_by(|a, b| a.path == b.path);
    libraries
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

    fn park_site(name: &str) -> WaitSite {
        WaitSite {
            probe_path: PathBuf::from("/srv/app"),
            display_path: "/srv/app".to_owned(),
            file_offset: 0,
            name: name.to_owned(),
            kind: if EPOLL_WRAPPERS.contains(&name) {
                WaitKind::Epoll
            } else {
                WaitKind::TokioPark
            },
        }
    }

    fn probed_names(names: &[&str]) -> Vec<String> {
        let sites: Vec<WaitSite> = names.iter().map(|name| park_site(name)).collect();
        probed_on_switch(&sites)
            .into_iter()
            .map(|site| site.name.clone())
            .collect()
    }

    #[test]
    fn sched_switch_keeps_the_futex_parks_probed() {
        let mt = "tokio::runtime::scheduler::multi_thread::park::";
        let all = [
            "epoll_wait",
            "tokio::runtime::park::CachedParkThread::park",
            "<tokio::runtime::park::Inner>::park_timeout",
            &format!("<{mt}Inner>::park_condvar"),
            &format!("{mt}Inner::park_driver"),
            &format!("{mt}Inner::park"),
            &format!("{mt}Parker::park_timeout"),
        ];
        assert_eq!(
            probed_names(&all),
            [
                "tokio::runtime::park::CachedParkThread::park",
                "<tokio::runtime::park::Inner>::park_timeout",
                &format!("<{mt}Inner>::park_condvar"),
            ]
        );
        // park_condvar inlined: the next level out, never park_timeout.
        assert_eq!(
            probed_names(&[
                &format!("{mt}Parker::park_timeout"),
                &format!("{mt}Parker::park"),
                &format!("{mt}Inner::park_driver"),
            ]),
            [format!("{mt}Parker::park")]
        );
    }

    #[test]
    fn a_worker_park_inlined_away_keeps_the_uprobe_path() {
        let mt = "tokio::runtime::scheduler::multi_thread::park::";
        let sites = |names: &[&str]| names.iter().map(|name| park_site(name)).collect::<Vec<_>>();
        assert!(switch_sees_every_park(&sites(&[
            "epoll_wait",
            &format!("<{mt}Inner>::park_condvar"),
            &format!("{mt}Inner::park_driver"),
        ])));
        // Current-thread only: the block_on parks and epoll.
        assert!(switch_sees_every_park(&sites(&[
            "epoll_wait",
            "tokio::runtime::park::CachedParkThread::park",
        ])));
        // A multi-thread worker whose condvar park no probe can catch.
        assert!(!switch_sees_every_park(&sites(&[
            "epoll_wait",
            &format!("{mt}Inner::park_driver"),
            &format!("{mt}Parker::park_timeout"),
        ])));
    }

    #[test]
    fn c_libraries_are_told_by_name() {
        assert!(is_c_library("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_c_library("/lib/ld-musl-x86_64.so.1"));
        assert!(!is_c_library("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"));
        assert!(!is_c_library("/usr/bin/node"));
    }

    #[test]
    fn epoll_wrappers_are_found_in_an_elf() {
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
        // The C library this test runs on defines the wrappers: each found,
        // once, at a file offset inside it, and nothing else claimed.
        let libc = default_c_library(std::process::id()).expect("a C library");
        let bytes = std::fs::read(&libc).unwrap();
        let sites = sites_in(&bytes, false);
        let names: Vec<&str> = sites.iter().map(|(_, name, _)| name.as_str()).collect();
        assert!(names.contains(&"epoll_wait"), "{libc}: {names:?}");
        assert!(
            sites
                .iter()
                .all(|(offset, name, kind)| *kind == WaitKind::Epoll
                    && EPOLL_WRAPPERS.contains(&name.as_str())
                    && (*offset as usize) < bytes.len()),
            "{sites:?}"
        );
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
