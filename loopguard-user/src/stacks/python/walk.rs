//! The Python stack of one thread, read from the interpreter's structures
//! through a [`Memory`] (the target's, or a fake one in tests).
//!
//! Everything read is untrusted: the thread may be running while it is
//! read, and any pointer may be stale. So every walk is bounded (threads,
//! frames, string and table lengths), a chain that comes back to a node it
//! has seen stops, and a frame whose code object lacks the code type ends
//! the stack there.

use std::collections::{HashMap, HashSet};

use super::layout::{EntryMark, FramePath, Layout, OWNED_BY_CSTACK};
use super::linetable::line_of;

/// Reads another process's memory (or a fake one).
pub trait Memory {
    /// Fills `buf` from `addr`; `false` when not all of it could be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// Python frames kept per stack: deeper ones are cut (outermost last).
pub const MAX_FRAMES: usize = 1024;
/// Thread states looked at per interpreter.
const MAX_THREADS: usize = 4096;
/// Characters kept of a name or file.
const MAX_CHARS: u64 = 1024;
/// Bytes of a location table read at most.
const MAX_LINETABLE: u64 = 256 * 1024;
/// Code objects remembered between walks.
const MAX_CODES: usize = 4096;

/// One interpreter in one process: where its runtime state is and how to
/// read it.
#[derive(Clone, Copy, Debug)]
pub struct Interpreter {
    pub layout: Layout,
    /// Address of `_PyRuntime`.
    pub runtime: u64,
    /// Address of `PyCode_Type`.
    pub code_type: u64,
}

/// One Python frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// `co_qualname`: `Class.method`, `outer.<locals>.inner`.
    pub function: String,
    /// `co_filename`.
    pub file: String,
    /// The line of the instruction the frame runs (or calls from).
    pub line: Option<u32>,
    /// The outermost frame of one `_PyEval_EvalFrameDefault` call: the
    /// frames from the previous such one in run in one native eval frame.
    pub call_start: bool,
}

/// What a walk keeps of a code object.
#[derive(Clone, Debug)]
struct Code {
    /// The pointers and line read last time: a code object freed and
    /// another made at its address has other ones.
    key: [u64; 4],
    function: String,
    file: String,
    linetable: Vec<u8>,
    first_line: i64,
}

/// Code objects seen in earlier walks, by address.
#[derive(Debug, Default)]
pub struct CodeCache {
    codes: HashMap<u64, Code>,
}

fn word(bytes: &[u8], at: u64) -> u64 {
    usize::try_from(at)
        .ok()
        .and_then(|at| bytes.get(at..at.checked_add(8)?))
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

fn read_u64(memory: &dyn Memory, addr: u64) -> Option<u64> {
    let mut buf = [0u8; 8];
    memory.read(addr, &mut buf).then(|| u64::from_le_bytes(buf))
}

/// A plausible user-space pointer to an 8-byte-aligned object.
fn pointer(addr: u64) -> bool {
    (0x1000..(1 << 47)).contains(&addr) && addr.is_multiple_of(8)
}

/// The thread states of the main interpreter, with their native thread ids.
pub fn thread_states(memory: &dyn Memory, interp: &Interpreter) -> Vec<(u64, u64)> {
    let layout = &interp.layout;
    let mut found = Vec::new();
    let Some(head) =
        read_u64(memory, interp.runtime + layout.runtime_interpreters_head).filter(|&a| pointer(a))
    else {
        return found;
    };
    let Some(mut tstate) = read_u64(memory, head.wrapping_add(layout.interp_threads_head)) else {
        return found;
    };
    let mut seen = HashSet::new();
    while found.len() < MAX_THREADS && pointer(tstate) && seen.insert(tstate) {
        let Some(tid) = read_u64(memory, tstate + layout.tstate_native_thread_id) else {
            break;
        };
        found.push((tstate, tid));
        match read_u64(memory, tstate + layout.tstate_next) {
            Some(next) => tstate = next,
            None => break,
        }
    }
    found
}

/// The Python stack of native thread `tid`, innermost first; empty when
/// the thread has no thread state (not a Python thread) or none can be read.
pub fn stack_of(
    memory: &dyn Memory,
    interp: &Interpreter,
    tid: u32,
    cache: &mut CodeCache,
) -> Vec<PyFrame> {
    thread_states(memory, interp)
        .into_iter()
        .find(|&(_, native)| native == u64::from(tid))
        .map(|(tstate, _)| frames(memory, interp, tstate, cache))
        .unwrap_or_default()
}

/// The frames of thread state `tstate`, innermost first, at most
/// [`MAX_FRAMES`].
pub fn frames(
    memory: &dyn Memory,
    interp: &Interpreter,
    tstate: u64,
    cache: &mut CodeCache,
) -> Vec<PyFrame> {
    let layout = &interp.layout;
    let mut out: Vec<PyFrame> = Vec::new();
    let Some(mut frame) = current_frame(memory, layout, tstate) else {
        return out;
    };
    let mut buf = vec![0u8; layout.frame_bytes()];
    let mut seen = HashSet::new();
    // Shim frames count too, so the loop is bounded whatever the chain holds.
    for _ in 0..MAX_FRAMES * 2 {
        if out.len() >= MAX_FRAMES || !pointer(frame) || !seen.insert(frame) {
            break;
        }
        if !memory.read(frame, &mut buf) {
            break;
        }
        let owner = usize::try_from(layout.frame_owner)
            .ok()
            .and_then(|at| buf.get(at))
            .copied()
            .unwrap_or(0);
        let previous = word(&buf, layout.frame_previous);
        if layout.entry == EntryMark::Shim && owner == OWNED_BY_CSTACK {
            if let Some(last) = out.last_mut() {
                last.call_start = true;
            }
            frame = previous;
            continue;
        }
        let code_addr = word(&buf, layout.frame_code);
        let Some(code) = code(memory, interp, code_addr, cache) else {
            break;
        };
        let start = code_addr.wrapping_add(layout.code_adaptive);
        let line = frame_line(code, start, word(&buf, layout.frame_instr));
        let call_start = match layout.entry {
            EntryMark::IsEntry(at) => word(&buf, at) & 0xff != 0,
            EntryMark::Shim => false,
        };
        out.push(PyFrame {
            function: code.function.clone(),
            file: code.file.clone(),
            line,
            call_start,
        });
        frame = previous;
    }
    out
}

/// The innermost frame of thread state `tstate`, if it has one.
fn current_frame(memory: &dyn Memory, layout: &Layout, tstate: u64) -> Option<u64> {
    match layout.frame_path {
        FramePath::ViaCFrame {
            cframe,
            current_frame,
        } => read_u64(memory, tstate + cframe)
            .filter(|&a| pointer(a))
            .and_then(|cframe| read_u64(memory, cframe + current_frame)),
        FramePath::Direct(at) => read_u64(memory, tstate + at),
    }
}

/// The line a frame of `code` is at, from its instruction pointer `instr`
/// (`start`: where the code's instructions begin).
fn frame_line(code: &Code, start: u64, instr: u64) -> Option<u32> {
    // 3.11 sets `prev_instr` one unit before the code when a frame has not
    // run yet: its first line.
    if instr < start {
        u32::try_from(code.first_line).ok()
    } else {
        line_of(&code.linetable, code.first_line, (instr - start) / 2)
    }
}

/// The code object at `addr`, from the cache when its fields are unchanged.
fn code<'c>(
    memory: &dyn Memory,
    interp: &Interpreter,
    addr: u64,
    cache: &'c mut CodeCache,
) -> Option<&'c Code> {
    let layout = &interp.layout;
    if !pointer(addr) {
        return None;
    }
    let mut head = vec![0u8; layout.code_bytes()];
    if !memory.read(addr, &mut head) || word(&head, layout.ob_type) != interp.code_type {
        return None;
    }
    let first_line = i64::from(word(&head, layout.code_firstlineno) as u32 as i32);
    let key = [
        word(&head, layout.code_filename),
        word(&head, layout.code_qualname),
        word(&head, layout.code_linetable),
        first_line as u64,
    ];
    let fresh = cache.codes.get(&addr).is_some_and(|code| code.key == key);
    if !fresh {
        let code = Code {
            key,
            function: string(memory, layout, key[1]).unwrap_or_else(|| "?".to_owned()),
            file: string(memory, layout, key[0]).unwrap_or_else(|| "?".to_owned()),
            linetable: bytes(memory, layout, key[2]).unwrap_or_default(),
            first_line,
        };
        if cache.codes.len() >= MAX_CODES {
            cache.codes.clear();
        }
        cache.codes.insert(addr, code);
    }
    cache.codes.get(&addr)
}

/// A compact `str` object's text (ASCII, Latin-1, UCS-2 or UCS-4), cut at
/// [`MAX_CHARS`], control characters replaced.
fn string(memory: &dyn Memory, layout: &Layout, addr: u64) -> Option<String> {
    if !pointer(addr) {
        return None;
    }
    // The `PyASCIIObject` part only: a short string may end a mapping.
    let mut head = vec![0u8; usize::try_from(layout.ascii_size).ok()?];
    if !memory.read(addr, &mut head) {
        return None;
    }
    let state = word(&head, layout.unicode_state) as u32;
    let length = word(&head, layout.unicode_length).min(MAX_CHARS);
    let kind = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !compact || !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) {
        return None;
    }
    let data = addr
        + if ascii {
            layout.ascii_size
        } else {
            layout.compact_size
        };
    let mut raw = vec![0u8; usize::try_from(length * u64::from(kind)).ok()?];
    if !memory.read(data, &mut raw) {
        return None;
    }
    let chars: String = match kind {
        1 => raw.iter().map(|&b| char::from(b)).collect(),
        2 => raw
            .chunks_exact(2)
            .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))).unwrap_or('?'))
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('?'))
            .collect(),
    };
    Some(
        chars
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    )
}

/// A `bytes` object's contents, at most [`MAX_LINETABLE`].
fn bytes(memory: &dyn Memory, layout: &Layout, addr: u64) -> Option<Vec<u8>> {
    if !pointer(addr) {
        return None;
    }
    let size = read_u64(memory, addr + layout.bytes_size)?;
    if size > MAX_LINETABLE {
        return None;
    }
    let mut raw = vec![0u8; usize::try_from(size).ok()?];
    memory
        .read(addr + layout.bytes_sval, &mut raw)
        .then_some(raw)
}

#[cfg(test)]
pub mod fake {
    //! A process image built in memory: interpreter, threads, frames.

    use std::collections::BTreeMap;

    use super::*;
    use crate::stacks::python::layout;

    /// Regions of bytes at addresses.
    #[derive(Default)]
    pub struct FakeMemory {
        pub regions: BTreeMap<u64, Vec<u8>>,
        next: u64,
    }

    impl Memory for FakeMemory {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let Some((start, bytes)) = self.regions.range(..=addr).next_back() else {
                return false;
            };
            let at = (addr - start) as usize;
            match bytes.get(at..at + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    pub const CODE_TYPE: u64 = 0x7000_0000;

    impl FakeMemory {
        pub fn alloc(&mut self, len: usize) -> u64 {
            if self.next == 0 {
                self.next = 0x10_0000;
            }
            let addr = self.next;
            self.next += (len as u64 + 0x100) & !0xff;
            self.regions.insert(addr, vec![0; len]);
            addr
        }

        pub fn put(&mut self, addr: u64, value: u64) {
            let (start, bytes) = self.regions.range_mut(..=addr).next_back().unwrap();
            let at = (addr - start) as usize;
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }

        pub fn put_byte(&mut self, addr: u64, value: u8) {
            let (start, bytes) = self.regions.range_mut(..=addr).next_back().unwrap();
            bytes[(addr - start) as usize] = value;
        }

        pub fn ascii(&mut self, layout: &Layout, text: &str) -> u64 {
            let addr = self.alloc(layout.ascii_size as usize + text.len() + 1);
            // kind 1, compact, ascii.
            self.put(addr + layout.unicode_state, (1 << 2) | (1 << 5) | (1 << 6));
            self.put(addr + layout.unicode_length, text.len() as u64);
            let (start, bytes) = self.regions.range_mut(..=addr).next_back().unwrap();
            let at = (addr - start + layout.ascii_size) as usize;
            bytes[at..at + text.len()].copy_from_slice(text.as_bytes());
            addr
        }

        pub fn bytes(&mut self, layout: &Layout, data: &[u8]) -> u64 {
            let addr = self.alloc(layout.bytes_sval as usize + data.len());
            self.put(addr + layout.bytes_size, data.len() as u64);
            let (start, bytes) = self.regions.range_mut(..=addr).next_back().unwrap();
            let at = (addr - start + layout.bytes_sval) as usize;
            bytes[at..at + data.len()].copy_from_slice(data);
            addr
        }

        /// A code object for `function` in `file` starting at `first_line`
        /// whose instruction `n` is on line `first_line + n` (one unit each).
        pub fn code(
            &mut self,
            layout: &Layout,
            function: &str,
            file: &str,
            first_line: u32,
        ) -> u64 {
            let addr = self.alloc(layout.code_adaptive as usize + 64);
            self.put(addr + layout.ob_type, CODE_TYPE);
            let name = self.ascii(layout, function);
            let path = self.ascii(layout, file);
            // Units 0..32: each one line further (form 13, delta +1), the first +0.
            let mut table = vec![0x80 | (13 << 3), 0];
            for _ in 1..32 {
                table.extend([0x80 | (13 << 3), 2]);
            }
            let table = self.bytes(layout, &table);
            self.put(addr + layout.code_qualname, name);
            self.put(addr + layout.code_filename, path);
            self.put(addr + layout.code_linetable, table);
            let (start, bytes) = self.regions.range_mut(..=addr).next_back().unwrap();
            let at = (addr - start + layout.code_firstlineno) as usize;
            bytes[at..at + 4].copy_from_slice(&first_line.to_le_bytes());
            addr
        }

        /// A frame running `code` at unit `unit`, under `previous`.
        pub fn frame(
            &mut self,
            layout: &Layout,
            code: u64,
            unit: u64,
            previous: u64,
            entry: bool,
        ) -> u64 {
            let addr = self.alloc(layout.frame_bytes());
            self.put(addr + layout.frame_code, code);
            self.put(addr + layout.frame_previous, previous);
            self.put(
                addr + layout.frame_instr,
                code + layout.code_adaptive + 2 * unit,
            );
            if let layout::EntryMark::IsEntry(at) = layout.entry {
                self.put_byte(addr + at, u8::from(entry));
            }
            addr
        }

        pub fn shim(&mut self, layout: &Layout, previous: u64) -> u64 {
            let addr = self.alloc(layout.frame_bytes());
            self.put(addr + layout.frame_previous, previous);
            self.put_byte(addr + layout.frame_owner, layout::OWNED_BY_CSTACK);
            addr
        }

        /// Runtime → interpreter → one thread state per `(tid, top frame)`.
        pub fn interpreter(&mut self, layout: &Layout, threads: &[(u32, u64)]) -> Interpreter {
            let runtime = self.alloc(layout.runtime_interpreters_head as usize + 8);
            let interp = self.alloc(layout.interp_threads_head as usize + 8);
            self.put(runtime + layout.runtime_interpreters_head, interp);
            let mut next = 0;
            for &(tid, top) in threads.iter().rev() {
                let tstate = self.alloc(256);
                self.put(tstate + layout.tstate_next, next);
                self.put(tstate + layout.tstate_native_thread_id, u64::from(tid));
                match layout.frame_path {
                    layout::FramePath::ViaCFrame {
                        cframe,
                        current_frame,
                    } => {
                        let cf = self.alloc(32);
                        self.put(cf + current_frame, top);
                        self.put(tstate + cframe, cf);
                    }
                    layout::FramePath::Direct(at) => self.put(tstate + at, top),
                }
                next = tstate;
            }
            self.put(interp + layout.interp_threads_head, next);
            Interpreter {
                layout: *layout,
                runtime,
                code_type: CODE_TYPE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeMemory;
    use super::*;
    use crate::stacks::python::layout;

    fn layouts() -> Vec<Layout> {
        vec![
            layout::builtin(11).unwrap(),
            layout::builtin(12).unwrap(),
            layout::from_debug_offsets(&layout::tests::debug_offsets_3_13()).unwrap(),
        ]
    }

    /// `main` (app.py:1) → shim/entry → `handler` (app.py:10, unit 3) →
    /// `block` (app.py:20, unit 2), as one thread's stack.
    fn app(memory: &mut FakeMemory, layout: &Layout) -> u64 {
        let main = memory.code(layout, "main", "app.py", 1);
        let handler = memory.code(layout, "Api.handler", "app.py", 10);
        let block = memory.code(layout, "block", "app.py", 20);
        let is_entry = matches!(layout.entry, layout::EntryMark::IsEntry(_));
        // 3.12+: each eval call's frames sit on a shim frame.
        let shim = |memory: &mut FakeMemory, previous: u64| {
            if is_entry {
                previous
            } else {
                memory.shim(layout, previous)
            }
        };
        let base = shim(memory, 0);
        let outer = memory.frame(layout, main, 4, base, true);
        let below = shim(memory, outer);
        let middle = memory.frame(layout, handler, 3, below, true);
        memory.frame(layout, block, 2, middle, false)
    }

    #[test]
    fn a_thread_s_frames_innermost_first_with_their_lines() {
        for layout in layouts() {
            let mut memory = FakeMemory::default();
            let top = app(&mut memory, &layout);
            let interp = memory.interpreter(&layout, &[(7, 0), (42, top)]);
            let mut cache = CodeCache::default();
            let stack = stack_of(&memory, &interp, 42, &mut cache);
            let seen: Vec<_> = stack
                .iter()
                .map(|f| (f.function.as_str(), f.file.as_str(), f.line, f.call_start))
                .collect();
            assert_eq!(
                seen,
                [
                    ("block", "app.py", Some(22), false),
                    ("Api.handler", "app.py", Some(13), true),
                    ("main", "app.py", Some(5), true),
                ],
                "3.{}",
                layout.minor
            );
            // Again from the cache, and a thread with no frames.
            assert_eq!(stack_of(&memory, &interp, 42, &mut cache), stack);
            assert!(stack_of(&memory, &interp, 7, &mut cache).is_empty());
            assert!(stack_of(&memory, &interp, 99, &mut cache).is_empty());
        }
    }

    #[test]
    fn a_deep_stack_is_cut_and_a_cycle_ends() {
        let layout = layout::builtin(11).unwrap();
        let mut memory = FakeMemory::default();
        let code = memory.code(&layout, "recurse", "deep.py", 1);
        let mut top = 0;
        for _ in 0..3000 {
            top = memory.frame(&layout, code, 1, top, false);
        }
        let bottom = memory.frame(&layout, code, 1, top, false);
        // The outermost frame points back at the innermost: a cycle.
        let first = *memory
            .regions
            .keys()
            .find(|&&a| {
                let mut buf = [0u8; 8];
                memory.read(a + layout.frame_code, &mut buf) && u64::from_le_bytes(buf) == code
            })
            .unwrap();
        memory.put(first + layout.frame_previous, bottom);
        let interp = memory.interpreter(&layout, &[(1, bottom)]);
        let stack = stack_of(&memory, &interp, 1, &mut CodeCache::default());
        assert_eq!(stack.len(), MAX_FRAMES);

        let mut memory = FakeMemory::default();
        let code = memory.code(&layout, "f", "f.py", 1);
        let a = memory.frame(&layout, code, 0, 0, false);
        let b = memory.frame(&layout, code, 0, a, false);
        memory.put(a + layout.frame_previous, b);
        let interp = memory.interpreter(&layout, &[(1, b)]);
        assert_eq!(
            stack_of(&memory, &interp, 1, &mut CodeCache::default()).len(),
            2
        );
    }

    #[test]
    fn bad_pointers_and_foreign_objects_end_the_stack() {
        let layout = layout::builtin(12).unwrap();
        let mut memory = FakeMemory::default();
        let code = memory.code(&layout, "ok", "ok.py", 1);
        let not_code = memory.alloc(512);
        let outer = memory.frame(&layout, not_code, 0, 0, false);
        let middle = memory.frame(&layout, code, 0, outer, false);
        let top = memory.frame(&layout, code, 0, middle, false);
        // The innermost frame's `previous` is fine; the middle one's code
        // pointer is garbage, odd and unmapped in turn.
        let interp = memory.interpreter(&layout, &[(1, top), (2, 0xdead_beef), (3, 8)]);
        let stack = stack_of(&memory, &interp, 1, &mut CodeCache::default());
        assert_eq!(stack.len(), 2);
        assert!(stack_of(&memory, &interp, 2, &mut CodeCache::default()).is_empty());
        assert!(stack_of(&memory, &interp, 3, &mut CodeCache::default()).is_empty());
        // A thread list that loops.
        let states = thread_states(&memory, &interp);
        assert_eq!(states.len(), 3);
        memory.put(states[2].0 + layout.tstate_next, states[0].0);
        assert_eq!(thread_states(&memory, &interp).len(), 3);
    }

    #[test]
    fn corrupt_memory_always_terminates() {
        // Every word of a real image flipped in turn, then random bytes.
        for layout in layouts() {
            let mut memory = FakeMemory::default();
            let top = app(&mut memory, &layout);
            let interp = memory.interpreter(&layout, &[(42, top)]);
            let addrs: Vec<(u64, usize)> =
                memory.regions.iter().map(|(a, b)| (*a, b.len())).collect();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for _ in 0..3000 {
                let (addr, len) = addrs[(next() % addrs.len() as u64) as usize];
                if len < 8 {
                    continue;
                }
                let at = (addr + (next() % (len as u64 - 7))) & !7;
                let value = match next() % 4 {
                    0 => next(),
                    1 => addrs[(next() % addrs.len() as u64) as usize].0,
                    2 => 0,
                    _ => top,
                };
                let mut old = [0u8; 8];
                memory.read(at, &mut old);
                memory.put(at, value);
                let stack = stack_of(&memory, &interp, 42, &mut CodeCache::default());
                assert!(stack.len() <= MAX_FRAMES);
                memory.put(at, u64::from_le_bytes(old));
            }
        }
    }
}
