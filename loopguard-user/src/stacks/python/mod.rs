//! Python stacks of `CPython` targets (3.11, 3.12, 3.13; issue #29): the
//! Python frames a stuck loop thread runs, read from outside with
//! `process_vm_readv`, never stopping or signalling the target.
//!
//! [`layout`] says where each version keeps things, [`walk`] reads a
//! thread's frames through a [`walk::Memory`], [`linetable`] turns an
//! instruction into a line, [`builtin`] names the C function a Python
//! frame called (`time.sleep`), [`merge`] puts the frames in place of the
//! native eval-loop frames. This module finds the interpreter in a process
//! (dynamic symbols of the executable or a mapped `libpython3.x.so`, so
//! stripped binaries work) and keeps the stacks sampled while a stall is
//! in progress. Nothing here runs per request or per poll: only for a
//! thread stuck past the arm delay, and when a stall is reported.

pub mod builtin;
pub mod layout;
pub mod merge;
pub mod walk;

/// The line table parser, pure: `loopguard-parse`'s.
pub use loopguard_parse::linetable;

use std::collections::HashMap;

use object::{Object, ObjectSegment, ObjectSymbol};

use crate::discover::proc::{self, FileMappings};
use crate::stacks::fold::Frame;
use crate::stacks::symbolize::Symbols;
use walk::{CodeCache, Interpreter, Memory, PyFrame};

/// The target's memory, read with `process_vm_readv`.
pub struct ProcessMemory {
    pub pid: u32,
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let read = proc::read_memory(self.pid, addr, buf.len());
        if read.len() != buf.len() {
            return false;
        }
        buf.copy_from_slice(&read);
        true
    }
}

/// A `CPython` interpreter found in a process.
#[derive(Clone, Debug)]
pub struct PythonTarget {
    pub interp: Interpreter,
    /// The file holding the interpreter (the executable or libpython), as mapped.
    pub module: String,
}

/// What a look at a process found.
#[derive(Debug)]
pub enum Found {
    /// No `_PyRuntime` in the executable or a mapped libpython.
    NotPython,
    /// A `CPython` whose layout loopguard does not know: native stacks only.
    Unsupported {
        module: String,
        why: String,
    },
    Python(PythonTarget),
}

/// `_PyRuntime`, `Py_Version` and `PyCode_Type` of `data` (an ELF file),
/// as file offsets.
fn symbol_offsets(data: &[u8]) -> Option<[Option<u64>; 3]> {
    let file = object::File::parse(data).ok()?;
    let names = ["_PyRuntime", "Py_Version", "PyCode_Type"];
    let mut found = [None; 3];
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(name) = symbol.name() else { continue };
        let Some(index) = names.iter().position(|n| *n == name) else {
            continue;
        };
        if found[index].is_some() || symbol.address() == 0 {
            continue;
        }
        let vaddr = symbol.address();
        found[index] = file.segments().find_map(|segment| {
            let (offset, size) = segment.file_range();
            let start = segment.address();
            (vaddr >= start && vaddr - start < size).then(|| offset + (vaddr - start))
        });
    }
    found[0].is_some().then_some(found)
}

/// Looks for `CPython` in process `pid`: the executable first, then each
/// mapped `libpython3*.so`.
pub fn find(pid: u32) -> Found {
    let Ok(maps) = proc::read_maps(pid) else {
        return Found::NotPython;
    };
    for (mapping, inode, path) in candidates(pid, &maps) {
        let cap = crate::discover::files::MAX_EXECUTABLE_BYTES;
        let read = match &mapping {
            None => crate::discover::files::read_through_proc(
                std::path::Path::new(&format!("/proc/{pid}/exe")),
                cap,
            ),
            Some(mapping) => crate::discover::files::read_mapping(pid, mapping, cap),
        };
        let Ok(data) = read else {
            continue;
        };
        let Some([Some(runtime), version, code_type]) = symbol_offsets(&data) else {
            continue;
        };
        let mapped = FileMappings::new(&maps, inode);
        let at = |offset: Option<u64>| offset.and_then(|o| mapped.runtime_addr(o));
        return interpreter(pid, path, at(Some(runtime)), at(version), at(code_type));
    }
    Found::NotPython
}

/// The files that may hold the interpreter: the executable, then each
/// `libpython3*.so` mapped, as `(mapping, inode, path)`. Each is read
/// through `/proc/PID/exe` (no mapping) or the mapping itself (never the
/// path the maps name, which the target can swap for a FIFO or a symlink
/// to /dev/zero).
fn candidates(pid: u32, maps: &[proc::Mapping]) -> Vec<(Option<proc::Mapping>, u64, String)> {
    let exe_inode = proc::executable(pid).map(|e| e.inode).ok();
    let mut candidates: Vec<(Option<proc::Mapping>, u64, String)> = Vec::new();
    if let Some(inode) = exe_inode
        && let Some(mapping) = maps.iter().find(|m| m.inode == inode)
    {
        candidates.push((None, inode, mapping.path.clone()));
    }
    for mapping in maps {
        let name = mapping.path.rsplit('/').next().unwrap_or_default();
        if name.starts_with("libpython3")
            && name.contains(".so")
            && !candidates.iter().any(|c| c.1 == mapping.inode)
        {
            candidates.push((Some(mapping.clone()), mapping.inode, mapping.path.clone()));
        }
    }
    candidates
}

/// The interpreter in `module`, from the runtime addresses of its
/// `_PyRuntime`, `Py_Version` and `PyCode_Type`, when its version is one
/// loopguard reads.
fn interpreter(
    pid: u32,
    module: String,
    runtime: Option<u64>,
    version: Option<u64>,
    code_type: Option<u64>,
) -> Found {
    let memory = ProcessMemory { pid };
    let unsupported = |why: String| Found::Unsupported {
        module: module.clone(),
        why,
    };
    let (Some(runtime), Some(code_type)) = (runtime, code_type) else {
        return unsupported("`_PyRuntime` or `PyCode_Type` is not mapped".to_owned());
    };
    let mut word = [0u8; 4];
    let version = version
        .filter(|&addr| memory.read(addr, &mut word))
        .map(|_| u32::from_le_bytes(word));
    let Some(version) = version else {
        return unsupported(
            "it has no `Py_Version` (CPython before 3.11; loopguard reads 3.11, 3.12 and 3.13)"
                .to_owned(),
        );
    };
    let (major, minor) = ((version >> 24) & 0xff, ((version >> 16) & 0xff) as u8);
    let layout = match (major, minor) {
        (3, 11 | 12) => layout::builtin(minor),
        (3, 13) => {
            let mut offsets = vec![0u8; layout::DEBUG_OFFSETS_BYTES];
            memory
                .read(runtime, &mut offsets)
                .then(|| layout::from_debug_offsets(&offsets))
                .flatten()
        }
        _ => None,
    };
    let Some(layout) = layout else {
        return unsupported(format!(
            "CPython {major}.{minor} is not one loopguard reads (3.11, 3.12 and 3.13 without free threading are)"
        ));
    };
    Found::Python(PythonTarget {
        interp: Interpreter {
            layout,
            runtime,
            code_type,
        },
        module,
    })
}

/// Python stacks sampled per stall `(tid, start)`, at most this many kinds.
const KINDS_KEPT: usize = 16;
/// A stuck thread's Python stack is read at most this often...
const SAMPLE_EVERY_NS: u64 = 10_000_000;
/// ...and at most 1/this of the time: a 1,024-frame walk took 4-20 ms
/// on the test VM (3 reads a frame, about 5 µs each), so a deep stack is
/// read every 80-400 ms, not every 10 ms.
const SAMPLE_DUTY: u64 = 20;
/// How long samples are kept after their stall was last seen stuck.
const SAMPLES_TTL_NS: u64 = 2_000_000_000;

#[derive(Debug, Default)]
struct StallSamples {
    /// Distinct stacks and how often each was seen.
    stacks: Vec<(Vec<PyFrame>, u32)>,
    last_ns: u64,
    /// Not read again before.
    next_ns: u64,
}

enum State {
    /// Not looked for yet: the first stuck thread looks.
    Unknown,
    Absent,
    /// Found; `checked` once a thread state's native id matched a thread.
    Present {
        target: Box<PythonTarget>,
        checked: bool,
    },
}

/// The Python side of one watched process's stacks.
pub struct PythonStacks {
    pid: u32,
    state: State,
    cache: CodeCache,
    samples: HashMap<(u32, u64), StallSamples>,
    builtins: builtin::Builtins,
}

impl PythonStacks {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            state: State::Unknown,
            cache: CodeCache::default(),
            samples: HashMap::new(),
            builtins: builtin::Builtins::default(),
        }
    }

    /// The interpreter, found on first use and checked against the
    /// process's threads (said once when it cannot be read).
    fn target(&mut self) -> Option<&PythonTarget> {
        if matches!(self.state, State::Unknown) {
            self.state = match find(self.pid) {
                Found::NotPython => State::Absent,
                Found::Unsupported { module, why } => {
                    tracing::warn!(pid = self.pid, %module, "no Python stacks: {why}; stacks stay native");
                    State::Absent
                }
                Found::Python(target) => {
                    tracing::debug!(pid = self.pid, module = %target.module, minor = target.interp.layout.minor, "Python interpreter found");
                    State::Present {
                        target: Box::new(target),
                        checked: false,
                    }
                }
            };
        }
        if let State::Present { target, checked } = &mut self.state
            && !*checked
        {
            let memory = ProcessMemory { pid: self.pid };
            let states = walk::thread_states(&memory, &target.interp);
            if !states.is_empty() {
                let tids = tids(self.pid);
                if states.iter().any(|(_, tid)| tids.contains(tid)) {
                    *checked = true;
                } else {
                    tracing::warn!(
                        pid = self.pid,
                        module = %target.module,
                        minor = target.interp.layout.minor,
                        "no Python stacks: the interpreter's thread states do not match the process's threads (a CPython build with another layout?); stacks stay native"
                    );
                    self.state = State::Absent;
                }
            }
        }
        match &self.state {
            State::Present { target, .. } => Some(&**target),
            _ => None,
        }
    }

    /// The native frames of `addrs` (innermost first), with the frame of
    /// a C function called from Python as that builtin's Python-level frame
    /// (`time.sleep` for `time_sleep`). Only for a `CPython` target, and
    /// only functions of the interpreter or of an extension module are
    /// looked up; a module is indexed the first time one of its addresses
    /// is (see [`builtin`]).
    pub fn native_frames(&mut self, symbols: &mut Symbols, addrs: &[u64]) -> Vec<Frame> {
        let frames = symbols.frames(addrs);
        let Some(interpreter) = self.target().map(|t| t.module.clone()) else {
            return frames;
        };
        let Ok(maps) = proc::read_maps(self.pid) else {
            return frames;
        };
        let memory = ProcessMemory { pid: self.pid };
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(frames.len());
        for &addr in addrs {
            // From the cache `frames` above filled.
            let mut frames = symbols.frames(&[addr]);
            let code = maps
                .iter()
                .find(|m| m.executable && (m.start..m.end).contains(&addr));
            // An unnamed frame (a stripped interpreter's static function)
            // still says whose it is, so the interpreter's are told apart.
            if let Some(code) = code {
                for frame in frames.iter_mut().filter(|f| f.module.is_none()) {
                    frame.module = Some(code.path.clone());
                }
            }
            let base = code
                .filter(|m| m.path == interpreter || builtin::is_extension_module(&m.path))
                .and_then(|code| {
                    maps.iter()
                        .find(|m| m.inode == code.inode && m.path == code.path && m.offset == 0)
                })
                .map(|header| header.start);
            let name = base.and_then(|base| self.builtins.name(&memory, base, addr));
            if let (Some(name), Some(function)) = (name, frames.last_mut()) {
                *function = merge::builtin_frame(name);
            }
            out.extend(frames);
        }
        tracing::debug!(
            addrs = addrs.len(),
            us = started.elapsed().as_micros(),
            "Python builtins named"
        );
        out
    }

    /// The Python stack of thread `tid` right now, innermost first.
    pub fn stack_now(&mut self, tid: u32) -> Vec<PyFrame> {
        let Some(interp) = self.target().map(|t| t.interp) else {
            return Vec::new();
        };
        let started = std::time::Instant::now();
        let stack = walk::stack_of(
            &ProcessMemory { pid: self.pid },
            &interp,
            tid,
            &mut self.cache,
        );
        tracing::debug!(
            tid,
            frames = stack.len(),
            us = started.elapsed().as_micros(),
            "Python stack read"
        );
        stack
    }

    /// Thread `tid` is stuck in the stall that began at `start`: notes its
    /// Python stack (at most every [`SAMPLE_EVERY_NS`]).
    pub fn sample(&mut self, tid: u32, start: u64, now_ns: u64) {
        if let Some(samples) = self.samples.get_mut(&(tid, start))
            && now_ns < samples.next_ns
        {
            // Still stuck: keep its samples.
            samples.last_ns = now_ns;
            return;
        }
        let started = std::time::Instant::now();
        let stack = self.stack_now(tid);
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let entry = self.samples.entry((tid, start)).or_default();
        entry.last_ns = now_ns;
        entry.next_ns =
            now_ns.saturating_add(SAMPLE_EVERY_NS.max(took.saturating_mul(SAMPLE_DUTY)));
        if stack.is_empty() {
            return;
        }
        if let Some(same) = entry.stacks.iter_mut().find(|(s, _)| *s == stack) {
            same.1 += 1;
        } else if entry.stacks.len() < KINDS_KEPT {
            entry.stacks.push((stack, 1));
        }
    }

    /// Forgets the samples of stalls not seen stuck for a while.
    pub fn expire(&mut self, now_ns: u64) {
        self.samples
            .retain(|_, s| now_ns.saturating_sub(s.last_ns) < SAMPLES_TTL_NS);
    }

    /// `native` with the Python frames of the stall `(tid, start)` in
    /// place: the stack sampled most often during it (used up when it is
    /// `finished`), or read now from a thread still stuck.
    pub fn merge(&mut self, tid: u32, start: u64, finished: bool, native: &[Frame]) -> Vec<Frame> {
        let sampled = if finished {
            self.samples.remove(&(tid, start))
        } else {
            self.samples.get(&(tid, start)).map(|s| StallSamples {
                stacks: s.stacks.clone(),
                ..StallSamples::default()
            })
        };
        let python = sampled
            .and_then(|s| most_seen(s.stacks))
            .or_else(|| (!finished).then(|| self.stack_now(tid)))
            .unwrap_or_default();
        self.interleave(native, &python)
    }

    /// `native` with thread `tid`'s Python frames as they are now.
    pub fn merge_now(&mut self, tid: u32, native: &[Frame]) -> Vec<Frame> {
        let python = self.stack_now(tid);
        self.interleave(native, &python)
    }

    /// `native` with `python` in place of its eval-loop frames.
    pub fn interleave(&self, native: &[Frame], python: &[PyFrame]) -> Vec<Frame> {
        match &self.state {
            State::Present { target, .. } if !python.is_empty() => {
                merge::interleave(native, python, &target.module)
            }
            _ => native.to_vec(),
        }
    }
}

/// The stack seen most often; of those seen as often, the first seen: a
/// deep stack is read rarely (see [`SAMPLE_DUTY`]), so a stall may hold
/// one sample of its blocking call and one of the code that ran after it
/// in the same busy stretch, and the call came first.
fn most_seen(stacks: Vec<(Vec<PyFrame>, u32)>) -> Option<Vec<PyFrame>> {
    stacks
        .into_iter()
        .enumerate()
        .max_by_key(|(index, (_, count))| (*count, std::cmp::Reverse(*index)))
        .map(|(_, (stack, _))| stack)
}

fn tids(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(function: &str) -> Vec<PyFrame> {
        vec![PyFrame {
            function: function.to_owned(),
            file: "app.py".to_owned(),
            line: Some(1),
            call_start: true,
        }]
    }

    #[test]
    fn the_stack_seen_most_wins_and_a_tie_goes_to_the_first_seen() {
        let one = |f: &str, n| (stack(f), n);
        assert_eq!(
            most_seen(vec![one("deep", 1), one("after", 1)]),
            Some(stack("deep"))
        );
        assert_eq!(
            most_seen(vec![one("a", 1), one("b", 3), one("c", 3)]),
            Some(stack("b"))
        );
        assert_eq!(most_seen(Vec::new()), None);
    }
}
