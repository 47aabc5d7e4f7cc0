//! Symbolization: lookup addresses of a process become demangled function
//! names, and `file:line` where DWARF is in the binary or in a separate debug
//! file (`.gnu_debuglink`, build id under `/usr/lib/debug`), with inlined
//! calls expanded (`blazesym`). Results are cached per address.

use std::collections::HashMap;
use std::num::NonZeroU32;

use blazesym::symbolize::source::{Process, Source};
use blazesym::symbolize::{CodeInfo, Input, Sym, Symbolized, Symbolizer};

use super::debug_files::DebugFiles;
use super::fold::Frame;

/// Addresses cached at most; the cache is emptied when it grows past this.
const MAX_CACHED: usize = 65_536;

pub struct Symbols {
    pid: u32,
    symbolizer: Symbolizer,
    /// Address → its frames, innermost (inlined) first.
    cache: HashMap<u64, Vec<Frame>>,
    /// The files blazesym would open by path to read DWARF.
    debug_files: DebugFiles,
    /// Whether the agent said why DWARF is not read for this process.
    warned: bool,
    /// Let go of the modules blazesym parsed once unused for a while
    /// ([`Symbols::transient`]).
    transient: bool,
    /// When blazesym last parsed something it still holds.
    used_at: Option<std::time::Instant>,
}

/// The frames of a symbolized address, innermost (inlined) first.
fn frames_of(sym: &Sym<'_>) -> Vec<Frame> {
    let module = sym
        .module
        .as_ref()
        .map(|m| m.to_string_lossy().into_owned());
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    // blazesym lists inlined calls outermost first; frames go innermost first.
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = location(inlined.code_info.as_ref());
        frames.push(Frame {
            function: inlined.name.to_string(),
            module: module.clone(),
            file,
            line,
        });
    }
    let (file, line) = location(sym.code_info.as_deref());
    frames.push(Frame {
        function: sym.name.to_string(),
        module,
        file,
        line,
    });
    frames
}

fn location(info: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    info.map_or((None, None), |info| {
        let path = match &info.dir {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(&info.file),
            _ => std::path::PathBuf::from(&*info.file),
        };
        (Some(path.display().to_string()), info.line)
    })
}

/// What blazesym reads for process `pid`: each module through
/// `/proc/PID/map_files/` (the inode really mapped), never the path the
/// maps name, which the target can swap for a FIFO, a device or a symlink
/// after mapping the file. preflight requires the capability it needs
/// (`CAP_SYS_ADMIN`); where it is refused (another user's process, for a
/// non-root loopguard) those frames stay unnamed. No perf map: blazesym
/// would open `/proc/PID/root/tmp/perf-N.map`, a path the target writes,
/// following links (an absolute one leads out of the target's root) and
/// blocking on a FIFO, and parse all of it; JIT frames stay unnamed.
fn process_source(pid: u32) -> Process {
    let mut process = Process::new(pid.into());
    process.map_files = true;
    process.perf_map = false;
    process
}

/// How long a transient symbolizer keeps what it parsed after its last use:
/// a stall's stack, its census and the stalls right after it share one
/// parse.
pub const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// Gives the C heap's free pages back to the kernel. glibc keeps what was
/// freed below its top, and raises its mmap threshold after the first large
/// free, so the tens of MiB a module's parse (or a binary read whole for
/// discovery) took stay resident after they are freed. The host agent calls
/// it when a target's parse is let go and after each attach: rare, and a
/// few ms each.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no arguments but the padding to keep; glibc locks its arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn symbolizer() -> Symbolizer {
    Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        .build()
}

impl Symbols {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            symbolizer: symbolizer(),
            cache: HashMap::new(),
            debug_files: DebugFiles::default(),
            warned: false,
            transient: false,
            used_at: None,
        }
    }

    /// A symbolizer that keeps the frames it named but lets go of the
    /// modules it parsed for them (their symbol tables and debug info:
    /// 15-50 MiB a process, for Tokio, `CPython` and Node targets on these
    /// machines) once [`Symbols::release_if_idle`] finds them unused for
    /// [`IDLE_RELEASE`]. For one target of many (`watch --all`): a stall
    /// after that parses again, and a host's memory stays a few MiB per
    /// target.
    pub fn transient(pid: u32) -> Self {
        Self {
            transient: true,
            ..Self::new(pid)
        }
    }

    /// Drops what blazesym parsed, if transient and unused for
    /// [`IDLE_RELEASE`]; called on the agent's tick.
    pub fn release_if_idle(&mut self) {
        if self.transient
            && self
                .used_at
                .is_some_and(|used| used.elapsed() >= IDLE_RELEASE)
        {
            self.symbolizer = symbolizer();
            self.used_at = None;
            trim_heap();
        }
    }

    /// The frames of `addrs` (innermost first), inlined calls expanded.
    pub fn frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|addr| !self.cache.contains_key(addr))
            .collect();
        if !missing.is_empty() {
            if self.cache.len() + missing.len() > MAX_CACHED {
                self.cache.clear();
            }
            let resolved = self.resolve(&missing);
            self.cache.extend(missing.into_iter().zip(resolved));
            self.used_at = Some(std::time::Instant::now());
        }
        addrs
            .iter()
            .flat_map(|addr| self.cache.get(addr).cloned().unwrap_or_default())
            .collect()
    }

    /// The process source for this symbolization: DWARF only when no file
    /// blazesym would open for it by path is a FIFO, a device or a link
    /// out ([`super::debug_files`]).
    fn source(&mut self) -> Source<'static> {
        let mut process = process_source(self.pid);
        if let Some(why) = self.debug_files.hazard(self.pid) {
            process.debug_syms = false;
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    pid = self.pid,
                    "debug info not read: {why}; frames keep their names without file:line"
                );
            }
        }
        Source::Process(process)
    }

    fn resolve(&mut self, addrs: &[u64]) -> Vec<Vec<Frame>> {
        let unknown = |addr: u64| {
            vec![Frame {
                function: format!("{addr:#x}"),
                ..Frame::default()
            }]
        };
        if NonZeroU32::new(self.pid).is_none() {
            return addrs.iter().map(|&addr| unknown(addr)).collect();
        }
        let source = self.source();
        let results = match self.symbolizer.symbolize(&source, Input::AbsAddr(addrs)) {
            Ok(results) => results,
            // One address blazesym cannot take (in a JIT page, the stack, or
            // a module it cannot open: the target chooses its return
            // addresses) fails the batch; then each address alone, so the
            // others keep their names.
            Err(_) => addrs
                .iter()
                .map(|&addr| {
                    self.symbolizer
                        .symbolize_single(&source, Input::AbsAddr(addr))
                        .unwrap_or(Symbolized::Unknown(
                            blazesym::symbolize::Reason::Unsupported,
                        ))
                })
                .collect(),
        };
        results
            .into_iter()
            .zip(addrs)
            .map(|(result, &addr)| match result {
                Symbolized::Sym(sym) => frames_of(&sym),
                Symbolized::Unknown(_) => unknown(addr),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::sample::Regs;
    use crate::stacks::unwind::StackUnwinder;

    #[test]
    fn modules_are_read_through_the_mapping_never_by_their_path() {
        let source = process_source(1);
        assert!(source.map_files, "never the path the maps name");
        assert!(!source.perf_map, "never a file the target names in /tmp");
    }

    /// Registers and a copy of this thread's stack, as the kernel records a sample.
    #[inline(never)]
    fn record_here() -> (Regs, u64, Vec<u8>) {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers, touches no memory.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        let maps = crate::discover::proc::read_maps(std::process::id()).unwrap();
        let top = maps
            .iter()
            .find(|m| (m.start..m.end).contains(&sp))
            .map(|m| m.end)
            .unwrap();
        let len = (top - sp).min(32 * 1024) as usize;
        // SAFETY: [sp, sp + len) is this thread's mapped stack.
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
        (Regs { ip, sp, bp }, sp, stack)
    }

    #[inline(never)]
    fn caller_of_record() -> (Regs, u64, Vec<u8>) {
        std::hint::black_box(record_here())
    }

    #[test]
    fn a_recorded_stack_unwinds_and_symbolizes_to_its_callers() {
        unwind_from_here();
    }

    /// The test's body, out of line: the harness may inline the `#[test]`
    /// fn itself into its call shim, and then no symbol names it.
    #[inline(never)]
    fn unwind_from_here() {
        let (regs, base, stack) = caller_of_record();
        let pid = std::process::id();
        let mut unwinder = StackUnwinder::for_process(pid);
        let read = |addr: u64| {
            let offset = usize::try_from(addr.checked_sub(base)?).ok()?;
            Some(u64::from_le_bytes(
                stack.get(offset..offset + 8)?.try_into().ok()?,
            ))
        };
        let addrs = unwinder.unwind(regs, read);
        assert!(addrs.len() >= 3, "{addrs:x?}");
        let frames = Symbols::new(pid).frames(&addrs);
        let names: Vec<&str> = frames.iter().map(|f| f.function.as_str()).collect();
        let position = |needle: &str| names.iter().position(|name| name.contains(needle));
        let (Some(inner), Some(outer)) = (position("record_here"), position("caller_of_record"))
        else {
            panic!("{names:#?}");
        };
        assert!(inner < outer, "{names:#?}");
        assert!(
            position("unwind_from_here").is_some_and(|caller| caller > outer),
            "the test itself is further out: {names:#?}"
        );
    }
}
