//! Recognises Tokio's functions by their (demangled) symbol names.
//!
//! Input: raw symbol names from an ELF symbol table, in legacy (`_ZN...E`) or
//! v0 (`_R...`) mangling, possibly with an LLVM `.llvm.NNNN` suffix.
//! Output: what each one is to loopguard ([`SymbolRole`]).

/// The path of the function Tokio stores in every task vtable as `poll`.
const TASK_POLL: &str = "tokio::runtime::task::raw::poll";

/// Prefixes of the blocking pool's thread loop: `pool::Inner::run` and its
/// thread closure (tokio 1.38 to 1.53), `sharded::` (tokio's next loop).
/// A poll that returns into it ran a `spawn_blocking` closure (or a worker
/// loop, which is itself a blocking task), never an event-loop task.
const BLOCKING_POOL: &[&str] = &[
    "tokio::runtime::blocking::pool::",
    "tokio::runtime::blocking::sharded::",
];

/// std's frame at the bottom of every spawned thread.
const THREAD_TRAMPOLINE: &str = "std::sys::backtrace::__rust_begin_short_backtrace";

/// What loopguard makes of one function symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SymbolRole {
    /// A monomorphised copy of `tokio::runtime::task::raw::poll`.
    TaskPoll,
    /// Code of Tokio's blocking pool.
    BlockingPool,
    /// Anything else.
    Other,
}

/// Demangles `raw` (legacy or v0) without the trailing hash, dropping the
/// `.llvm.N` suffix LTO adds. Names that are not Rust come back unchanged.
pub fn demangle(raw: &str) -> String {
    let raw = strip_llvm_suffix(raw);
    match rustc_demangle::try_demangle(raw) {
        Ok(name) => format!("{name:#}"),
        Err(_) => raw.to_owned(),
    }
}

fn strip_llvm_suffix(raw: &str) -> &str {
    raw.find(".llvm.").map_or(raw, |at| &raw[..at])
}

/// Classifies a demangled symbol name.
pub fn classify(demangled: &str) -> SymbolRole {
    if let Some(rest) = demangled.strip_prefix(TASK_POLL) {
        // Legacy mangling drops generic parameters; v0 keeps them as `::<T, S>`.
        if rest.is_empty() || rest.starts_with("::<") {
            return SymbolRole::TaskPoll;
        }
        return SymbolRole::Other;
    }
    // The pool's thread body may be inlined into std's thread trampoline;
    // v0 mangling then still names the pool's closure as a generic argument.
    // v0 writes methods as `<tokio::...::Inner>::run`.
    let path = demangled.trim_start_matches('<');
    let in_pool = BLOCKING_POOL.iter().any(|prefix| path.starts_with(prefix));
    let trampoline_of_pool = demangled.starts_with(THREAD_TRAMPOLINE)
        && BLOCKING_POOL
            .iter()
            .any(|prefix| demangled.contains(prefix));
    if in_pool || trampoline_of_pool {
        return SymbolRole::BlockingPool;
    }
    SymbolRole::Other
}

/// True when the symbol table mentions Tokio at all: tells "not a Tokio
/// binary" apart from "Tokio, but the poll function was not found".
pub fn mentions_tokio(demangled: &str) -> bool {
    demangled.starts_with("tokio::") || demangled.contains("<tokio::")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_poll_copy_is_recognised() {
        let name = demangle("_ZN5tokio7runtime4task3raw4poll17h0123456789abcdefE");
        assert_eq!(name, "tokio::runtime::task::raw::poll");
        assert_eq!(classify(&name), SymbolRole::TaskPoll);
    }

    #[test]
    fn llvm_suffix_is_dropped() {
        let name = demangle("_ZN5tokio7runtime4task3raw4poll17h0123456789abcdefE.llvm.1234567890");
        assert_eq!(classify(&name), SymbolRole::TaskPoll);
    }

    #[test]
    fn v0_poll_copy_is_recognised() {
        // tokio::runtime::task::raw::poll::<u8, u16>
        let name = demangle("_RINvNtNtNtCs1234_5tokio7runtime4task3raw4pollhtEB8_");
        assert!(
            name.starts_with("tokio::runtime::task::raw::poll::<"),
            "{name}"
        );
        assert_eq!(classify(&name), SymbolRole::TaskPoll);
    }

    #[test]
    fn neighbours_of_poll_are_not_poll() {
        for name in [
            "tokio::runtime::task::raw::poll_future",
            "tokio::runtime::task::raw::RawTask::poll",
            "tokio::runtime::task::harness::Harness<T,S>::poll",
            "mytokio::runtime::task::raw::poll",
        ] {
            assert_eq!(classify(name), SymbolRole::Other, "{name}");
        }
    }

    #[test]
    fn blocking_pool_code_is_recognised() {
        for name in [
            "tokio::runtime::blocking::pool::Inner::run",
            "tokio::runtime::blocking::pool::Spawner::spawn_thread::{{closure}}",
            "<tokio::runtime::blocking::pool::Inner>::run",
        ] {
            assert_eq!(classify(name), SymbolRole::BlockingPool, "{name}");
        }
        assert_eq!(
            classify(
                "std::sys::backtrace::__rust_begin_short_backtrace::<tokio::runtime::blocking::pool::Spawner::spawn_thread::{closure#0}, ()>"
            ),
            SymbolRole::BlockingPool
        );
        assert_eq!(
            classify("core::ptr::drop_in_place::<tokio::runtime::blocking::pool::Task>"),
            SymbolRole::Other
        );
    }

    #[test]
    fn non_rust_names_pass_through() {
        assert_eq!(demangle("epoll_wait"), "epoll_wait");
        assert_eq!(classify("epoll_wait"), SymbolRole::Other);
        assert!(!mentions_tokio("epoll_wait"));
        assert!(mentions_tokio("tokio::net::TcpStream::connect"));
    }
}
