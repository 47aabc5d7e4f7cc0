//! Where `CPython` keeps what a stack walk reads, per minor version
//! (x86-64, the default build: no free threading, no debug build).
//!
//! 3.13 publishes its own offsets (`_Py_DebugOffsets`, the first bytes of
//! `_PyRuntime`, cookie `xdebugpy`): they are read from the process. 3.11
//! and 3.12 do not: their tables below were taken with `offsetof` against
//! the interpreter's own headers (pyenv 3.11.7 and 3.12.1, Debian 3.11.2)
//! and are checked at run time (a thread state's native thread id must be
//! one of the process's threads, a frame's code object must have the code
//! type).

/// How a thread state leads to its innermost frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramePath {
    /// 3.11, 3.12: `tstate->cframe->current_frame`.
    ViaCFrame { cframe: u64, current_frame: u64 },
    /// 3.13: `tstate->current_frame`.
    Direct(u64),
}

/// How the frames of one `_PyEval_EvalFrameDefault` call are told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMark {
    /// 3.11: the first frame of each call has `is_entry` set (a byte).
    IsEntry(u64),
    /// 3.12+: each call pushes a shim frame owned by the C stack.
    Shim,
}

/// `owner` of a 3.12+ shim frame (`FRAME_OWNED_BY_CSTACK`).
pub const OWNED_BY_CSTACK: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// 11, 12, 13.
    pub minor: u8,
    pub runtime_interpreters_head: u64,
    pub interp_threads_head: u64,
    pub tstate_next: u64,
    pub tstate_native_thread_id: u64,
    pub frame_path: FramePath,
    pub frame_code: u64,
    pub frame_previous: u64,
    /// `prev_instr` (3.11, 3.12: the instruction being run) or
    /// `instr_ptr` (3.13): a `_Py_CODEUNIT *` into the code's bytecode.
    pub frame_instr: u64,
    pub frame_owner: u64,
    pub entry: EntryMark,
    pub code_filename: u64,
    pub code_qualname: u64,
    pub code_linetable: u64,
    /// An `int`.
    pub code_firstlineno: u64,
    /// Where the bytecode starts inside the code object.
    pub code_adaptive: u64,
    pub ob_type: u64,
    pub bytes_size: u64,
    pub bytes_sval: u64,
    pub unicode_state: u64,
    pub unicode_length: u64,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's bytes start.
    pub ascii_size: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings' start.
    pub compact_size: u64,
}

impl Layout {
    /// Bytes of a frame the walk reads (every field it needs is inside).
    pub fn frame_bytes(&self) -> usize {
        let last = [
            self.frame_code,
            self.frame_previous,
            self.frame_instr,
            self.frame_owner,
            match self.entry {
                EntryMark::IsEntry(at) => at,
                EntryMark::Shim => 0,
            },
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        usize::try_from(last).unwrap_or(0) + 8
    }

    /// Bytes of a code object the walk reads.
    pub fn code_bytes(&self) -> usize {
        let last = [
            self.ob_type,
            self.code_filename,
            self.code_qualname,
            self.code_linetable,
            self.code_firstlineno,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        usize::try_from(last).unwrap_or(0) + 8
    }
}

/// The table for 3.11 or 3.12; 3.13 reads [`from_debug_offsets`].
pub fn builtin(minor: u8) -> Option<Layout> {
    let common = Layout {
        minor,
        runtime_interpreters_head: 40,
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        frame_path: FramePath::ViaCFrame {
            cframe: 56,
            current_frame: 8,
        },
        frame_code: 32,
        frame_previous: 48,
        frame_instr: 56,
        frame_owner: 69,
        entry: EntryMark::IsEntry(68),
        code_filename: 112,
        code_qualname: 128,
        code_linetable: 136,
        code_firstlineno: 72,
        code_adaptive: 184,
        ob_type: 8,
        bytes_size: 16,
        bytes_sval: 32,
        unicode_state: 32,
        unicode_length: 16,
        ascii_size: 48,
        compact_size: 72,
    };
    match minor {
        11 => Some(common),
        12 => Some(Layout {
            interp_threads_head: 72,
            tstate_native_thread_id: 144,
            frame_path: FramePath::ViaCFrame {
                cframe: 56,
                current_frame: 0,
            },
            frame_code: 0,
            frame_previous: 8,
            frame_owner: 70,
            entry: EntryMark::Shim,
            code_firstlineno: 68,
            code_adaptive: 192,
            ascii_size: 40,
            compact_size: 56,
            ..common
        }),
        _ => None,
    }
}

/// `_Py_DebugOffsets` starts with this.
pub const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";
/// Bytes of `_Py_DebugOffsets` read (3.13: 73 `uint64_t`s).
pub const DEBUG_OFFSETS_BYTES: usize = 73 * 8;

/// The layout a 3.13 interpreter publishes at the start of `_PyRuntime`
/// (`bytes`: at least [`DEBUG_OFFSETS_BYTES`] of it). `None` when the
/// cookie is missing, the build is free-threaded or it is not 3.13 (the
/// struct's shape is per version).
pub fn from_debug_offsets(bytes: &[u8]) -> Option<Layout> {
    if bytes.len() < DEBUG_OFFSETS_BYTES || &bytes[..8] != DEBUG_COOKIE {
        return None;
    }
    let word = |index: usize| {
        let at = index * 8;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
    };
    let version = word(1);
    if (version >> 24) & 0xff != 3 || (version >> 16) & 0xff != 13 || word(2) != 0 {
        return None;
    }
    // Indices of the `uint64_t`s in 3.13's `_Py_DebugOffsets`.
    let ascii_size = word(70);
    let layout = Layout {
        minor: 13,
        runtime_interpreters_head: word(5),
        interp_threads_head: word(9),
        tstate_next: word(21),
        tstate_native_thread_id: word(25),
        frame_path: FramePath::Direct(word(23)),
        frame_previous: word(29),
        frame_code: word(30),
        frame_instr: word(31),
        frame_owner: word(33),
        entry: EntryMark::Shim,
        code_filename: word(35),
        code_qualname: word(37),
        code_linetable: word(38),
        code_firstlineno: word(39),
        code_adaptive: word(43),
        ob_type: word(45),
        bytes_size: word(65),
        bytes_sval: word(66),
        unicode_state: word(68),
        unicode_length: word(69),
        ascii_size,
        // `PyCompactUnicodeObject` adds `utf8_length` and `utf8`.
        compact_size: ascii_size + 16,
    };
    // Offsets far past any of these structs are not offsets.
    let sane = [
        layout.runtime_interpreters_head,
        layout.interp_threads_head,
        layout.tstate_native_thread_id,
        layout.frame_owner,
        layout.code_adaptive,
        layout.bytes_sval,
        layout.ascii_size,
    ]
    .iter()
    .all(|&offset| offset < 0x10000);
    sane.then_some(layout)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The words the walk uses of the `_Py_DebugOffsets` that pyenv's
    /// 3.13.0 `libpython3.13.so` holds (the rest zero).
    pub fn debug_offsets_3_13() -> Vec<u8> {
        let mut words = [0u64; 73];
        words[1] = 0x030d_00f0;
        words[5] = 632;
        words[9] = 7344;
        words[21] = 8;
        words[23] = 72;
        words[25] = 160;
        words[29] = 8;
        words[30] = 0;
        words[31] = 56;
        words[33] = 70;
        words[35] = 112;
        words[37] = 128;
        words[38] = 136;
        words[39] = 68;
        words[43] = 200;
        words[45] = 8;
        words[65] = 16;
        words[66] = 32;
        words[68] = 32;
        words[69] = 16;
        words[70] = 40;
        let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes[..8].copy_from_slice(DEBUG_COOKIE);
        bytes
    }

    #[test]
    fn debug_offsets_give_the_3_13_layout() {
        let layout = from_debug_offsets(&debug_offsets_3_13()).expect("3.13 layout");
        assert_eq!(layout.minor, 13);
        assert_eq!(layout.frame_path, FramePath::Direct(72));
        assert_eq!(layout.frame_owner, 70);
        assert_eq!(layout.compact_size, 56);
    }

    #[test]
    fn other_versions_and_free_threaded_builds_are_refused() {
        let mut bytes = debug_offsets_3_13();
        bytes[8..16].copy_from_slice(&0x030e_00f0u64.to_le_bytes());
        assert_eq!(from_debug_offsets(&bytes), None);
        let mut bytes = debug_offsets_3_13();
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(from_debug_offsets(&bytes), None);
        let mut bytes = debug_offsets_3_13();
        bytes[0] = b'y';
        assert_eq!(from_debug_offsets(&bytes), None);
        assert_eq!(from_debug_offsets(&bytes[..100]), None);
    }

    #[test]
    fn only_3_11_and_3_12_have_tables() {
        assert!(builtin(11).is_some());
        assert_eq!(builtin(12).map(|l| l.entry), Some(EntryMark::Shim));
        assert!(builtin(10).is_none());
        assert!(builtin(13).is_none());
    }
}
