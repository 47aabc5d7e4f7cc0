//! Unwinding without frame pointers: the registers and stack copy of a
//! [`Sample`] become return addresses, using each module's `.eh_frame`
//! (`framehop`), for the executable and its shared libraries alike, and
//! frame pointers where a function has no unwind information.
//!
//! Modules come from `/proc/PID/maps`; files are opened through
//! `/proc/PID/map_files/` so a container's or a deleted file is the one read.

use std::collections::HashSet;
use std::ops::Range;
use std::time::{Duration, Instant};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};
use object::{Object, ObjectSection, ObjectSegment};

use super::sample::Regs;
use crate::discover::proc::{self, Mapping};

/// Frames unwound at most per stack.
const MAX_FRAMES: usize = 256;

/// How often the module list may be re-read when an address falls outside it.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// The unwinder for one process's modules.
pub struct StackUnwinder {
    pid: u32,
    unwinder: UnwinderX86_64<Vec<u8>>,
    cache: CacheX86_64,
    /// Executable ranges already loaded as modules.
    loaded: HashSet<(u64, u64)>,
    code: Vec<Range<u64>>,
    last_refresh: Option<Instant>,
}

impl StackUnwinder {
    /// Loads every executable file mapping of `pid` (those that fail to parse are skipped).
    pub fn for_process(pid: u32) -> Self {
        let mut unwinder = Self {
            pid,
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            loaded: HashSet::new(),
            code: Vec::new(),
            last_refresh: None,
        };
        unwinder.refresh();
        unwinder
    }

    /// Adds the modules mapped since the last look (a `dlopen`).
    fn refresh(&mut self) {
        self.last_refresh = Some(Instant::now());
        let Ok(maps) = proc::read_maps(self.pid) else {
            return;
        };
        let code = maps
            .iter()
            .filter(|m| m.executable && (m.path.starts_with('/') || m.path == "[vdso]"));
        for mapping in code {
            if !self.loaded.insert((mapping.start, mapping.end)) {
                continue;
            }
            self.code.push(mapping.start..mapping.end);
            if let Some(module) = load_module(self.pid, mapping) {
                self.unwinder.add_module(module);
            } else {
                tracing::debug!(path = %mapping.path, "no unwind information read");
            }
        }
    }

    /// The first address of each module's code.
    pub fn module_starts(&self) -> Vec<u64> {
        self.code.iter().map(|range| range.start).collect()
    }

    fn covers(&self, addr: u64) -> bool {
        self.code.iter().any(|range| range.contains(&addr))
    }

    /// Return addresses from `regs` outwards, as lookup addresses (a return
    /// address minus one, so it falls inside the calling instruction),
    /// innermost first. `read` gives the 8 bytes of stack at an address.
    pub fn unwind(&mut self, regs: Regs, mut read: impl FnMut(u64) -> Option<u64>) -> Vec<u64> {
        if !self.covers(regs.ip)
            && self
                .last_refresh
                .is_none_or(|at| at.elapsed() >= REFRESH_AT_MOST_EVERY)
        {
            self.refresh();
        }
        let mut read_stack = |addr: u64| read(addr).ok_or(());
        let mut frames = self.unwinder.iter_frames(
            regs.ip,
            UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp),
            &mut self.cache,
            &mut read_stack,
        );
        let mut addrs = Vec::new();
        while let Ok(Some(frame)) = frames.next() {
            addrs.push(frame.address_for_lookup());
            if addrs.len() >= MAX_FRAMES {
                break;
            }
        }
        addrs
    }
}

/// How good a frame pointer guess is: a verified call first, then length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct GuessScore {
    verified: bool,
    frames: usize,
}

/// What the instruction before a return address `ret` is, from the bytes
/// `code` = the 7 bytes ending at `ret`: a direct call (`e8 rel32`, with its
/// target), an indirect call (`ff /2`, target unknown), or no call.
pub fn call_before(ret: u64, code: &[u8; 7]) -> CallBefore {
    if code[2] == 0xe8 {
        let rel = i32::from_le_bytes([code[3], code[4], code[5], code[6]]);
        return CallBefore::Direct(ret.wrapping_add_signed(i64::from(rel)));
    }
    // `ff` with ModRM.reg = 2, ending at `ret` for the encodings compilers
    // emit: `call reg` (2 or 3 bytes with REX), `call [reg+disp8]` (3),
    // `call [rsp+disp8]` (4), `call [rip+disp32]` and `call [reg+disp32]`
    // (6), `call [rsp+disp32]` (7).
    let indirect = [2usize, 3, 4, 6, 7]
        .iter()
        .any(|&back| code[7 - back] == 0xff && (code[8 - back] >> 3) & 7 == 2);
    if indirect {
        CallBefore::Indirect
    } else {
        CallBefore::None
    }
}

/// See [`call_before`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallBefore {
    Direct(u64),
    Indirect,
    None,
}

/// A loadable segment: stated address, file offset, file size, executable.
pub type Segment = (u64, u64, u64, bool);

/// Where to look for `rbp` when unwinding without it stopped: just above
/// the last return address found, the frame of the function that needs it
/// begins; its frame pointer is one of the 16-byte aligned slots there
/// (where `push rbp` right after the call leaves it) sitting below a return
/// address (`is_code`). The first few such slots, lowest first.
pub fn frame_pointer_candidates(
    sp: u64,
    top: u64,
    last_return: u64,
    read: impl Fn(u64) -> Option<u64>,
    is_code: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let mut candidates = Vec::new();
    let mut slot = sp & !7;
    let frame_start = loop {
        if slot + 8 > top {
            return candidates;
        }
        if read(slot) == Some(last_return) {
            break slot + 8;
        }
        slot += 8;
    };
    let mut slot = (frame_start + 15) & !15;
    while slot + 16 <= top && slot < frame_start + FRAME_POINTER_SCAN_BYTES {
        if read(slot + 8).is_some_and(&is_code) {
            candidates.push(slot);
            if candidates.len() == MAX_FRAME_POINTER_GUESSES {
                break;
            }
        }
        slot += 16;
    }
    candidates
}

/// Frame pointer guesses tried at most. A guess whose next return address
/// comes right after a call of the function it returns to wins; then one
/// the caller's code cannot contradict; then the one that unwinds furthest.
const MAX_FRAME_POINTER_GUESSES: usize = 6;

/// How far into a frame its frame pointer is looked for.
const FRAME_POINTER_SCAN_BYTES: u64 = 4096;

impl StackUnwinder {
    /// Like [`Self::unwind`] for registers without `rbp` (a thread asleep,
    /// read from `/proc`): a frame-pointer function (the standard library
    /// has them) stops the unwind, so its frame pointer is guessed from the
    /// stack. `top` is the end of the stack copy. `calls(inside, next)`
    /// judges a guess: whether the code before the return address after
    /// `next` calls the function `inside` is in (`Some(true)`), calls
    /// something else or is no call (`Some(false)`), or cannot tell (an
    /// indirect call). A stale frame pointer left in a frame from an
    /// earlier, deeper call can unwind further than the true one, so the
    /// caller's call is what decides (see [`MAX_FRAME_POINTER_GUESSES`]).
    pub fn unwind_guessing_bp(
        &mut self,
        regs: Regs,
        top: u64,
        read: impl Fn(u64) -> Option<u64>,
        mut calls: impl FnMut(u64, u64) -> Option<bool>,
    ) -> Vec<u64> {
        let plain = self.unwind(regs, &read);
        let Some(&last) = plain.last().filter(|_| plain.len() >= 2) else {
            return plain;
        };
        let code = self.code.clone();
        let is_code = |addr: u64| code.iter().any(|range| range.contains(&addr));
        let mut best = (GuessScore::default(), plain.clone());
        for bp in frame_pointer_candidates(regs.sp, top, last + 1, &read, is_code) {
            let guessed = self.unwind(Regs { bp, ..regs }, &read);
            let Some(&next) = guessed.get(plain.len()) else {
                continue;
            };
            let verdict = calls(last, next);
            if verdict == Some(false) {
                continue;
            }
            let score = GuessScore {
                verified: verdict == Some(true),
                frames: guessed.len(),
            };
            if score > best.0 {
                best = (score, guessed);
            }
        }
        best.1
    }
}

/// The load bias of an executable mapping: runtime address minus the
/// address the ELF file states, from the executable segment the mapping's
/// file offset falls in (a page can hold the end of one segment and the
/// start of the next: only the executable one is mapped executable).
pub fn load_bias(mapping_start: u64, mapping_offset: u64, segments: &[Segment]) -> Option<u64> {
    segments
        .iter()
        .filter(|(_, _, _, executable)| *executable)
        .find(|(_, file_offset, file_size, _)| {
            (file_offset & !0xfff) <= mapping_offset && mapping_offset < file_offset + file_size
        })
        .map(|(vaddr, file_offset, _, _)| {
            let stated = (vaddr + mapping_offset).wrapping_sub(*file_offset);
            mapping_start.wrapping_sub(stated)
        })
}

/// The bytes of the file behind `mapping`; for the vDSO (`clock_gettime`
/// and friends live there), its image read from the process.
fn module_bytes(pid: u32, mapping: &Mapping) -> Option<Vec<u8>> {
    if mapping.path == "[vdso]" {
        let len = usize::try_from(mapping.end - mapping.start).ok()?;
        let image = crate::discover::proc::read_memory(pid, mapping.start, len);
        return (image.len() == len).then_some(image);
    }
    // Through the mapping only: the name is the target's to change.
    crate::discover::files::read_mapping(pid, mapping, crate::discover::files::MAX_EXECUTABLE_BYTES)
        .ok()
}

fn load_module(pid: u32, mapping: &Mapping) -> Option<Module<Vec<u8>>> {
    let data = module_bytes(pid, mapping)?;
    let file = object::File::parse(&*data).ok()?;
    let segments: Vec<_> = file
        .segments()
        .map(|segment| {
            let (offset, size) = segment.file_range();
            let executable = match segment.flags() {
                object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => false,
            };
            (segment.address(), offset, size, executable)
        })
        .collect();
    let bias = load_bias(mapping.start, mapping.offset, &segments)?;
    let section = |name: &str| {
        let section = file.section_by_name(name)?;
        let range = section.address()..section.address() + section.size();
        Some((range, section.uncompressed_data().ok()?.into_owned()))
    };
    // The text itself only serves framehop's prologue analysis of the
    // innermost frame; not keeping a copy of every module's code saves
    // megabytes of agent memory.
    let text_svma = file
        .section_by_name(".text")
        .map(|s| s.address()..s.address() + s.size());
    let text = None;
    let (eh_frame_svma, eh_frame) = section(".eh_frame").unzip();
    let (eh_frame_hdr_svma, eh_frame_hdr) = section(".eh_frame_hdr").unzip();
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma,
        text,
        got_svma: file
            .section_by_name(".got")
            .map(|s| s.address()..s.address() + s.size()),
        eh_frame_svma,
        eh_frame,
        eh_frame_hdr_svma,
        eh_frame_hdr,
        debug_frame: section(".debug_frame").map(|(_, data)| data),
        ..ExplicitModuleSectionInfo::default()
    };
    Some(Module::new(
        mapping.path.clone(),
        mapping.start..mapping.end,
        bias,
        info,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example's own layout (`readelf -l`): the read-only segment ends
    /// inside the page the text segment starts in.
    const STALL_SERVER: [Segment; 3] = [
        (0, 0, 0xc_9344, false),
        (0xc_a350, 0xc_9350, 0x1d_82c0, true),
        (0x2a_3610, 0x2a_1610, 0x1_c940, false),
    ];

    #[test]
    fn the_call_before_a_return_address_is_decoded() {
        // call rel32 = +0x100 from the return address.
        let direct = [0x90, 0x90, 0xe8, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(call_before(0x1000, &direct), CallBefore::Direct(0x1100));
        let backwards = [0x90, 0x90, 0xe8, 0x00, 0xff, 0xff, 0xff];
        assert_eq!(
            call_before(0x1000, &backwards),
            CallBefore::Direct(0x1000 - 0x100)
        );
        // call *%rax; call *0x10(%rbx); call *0x1234(%rip).
        assert_eq!(
            call_before(0, &[0, 0, 0, 0, 0, 0xff, 0xd0]),
            CallBefore::Indirect
        );
        assert_eq!(
            call_before(0, &[0, 0, 0, 0, 0xff, 0x53, 0x10]),
            CallBefore::Indirect
        );
        assert_eq!(
            call_before(0, &[0, 0xff, 0x15, 0x34, 0x12, 0, 0]),
            CallBefore::Indirect
        );
        // mov %rsp,%rbp; pop; ret: no call.
        assert_eq!(
            call_before(0, &[0x48, 0x89, 0xe5, 0x5d, 0xc3, 0x90, 0x90]),
            CallBefore::None
        );
    }

    #[test]
    fn the_bias_of_a_pie_text_mapping_comes_from_the_text_segment() {
        // /proc/PID/maps: 5555cb4fc000-5555cb6d5000 r-xp 000c9000 ... stall-server
        let bias = load_bias(0x5555_cb4f_c000, 0xc_9000, &STALL_SERVER).unwrap();
        assert_eq!(bias, 0x5555_cb4f_c000 - 0xc_a000);
        // A return address into `block_sleep::{{closure}}` (0x12cb40..0x12ccc3).
        assert_eq!(0x5555_cb55_ebdf - bias, 0x12_cbdf);
    }

    #[test]
    fn the_frame_pointer_is_found_in_the_frame_above_the_last_return_address() {
        // A thread asleep in clock_nanosleep, as read from the example: the
        // return address into std's sleep at +0x48, std's frame pointer at
        // +0x70 (below the return address into the handler at +0x78).
        let sp = 0x7f29_f68b_1440;
        let words: std::collections::HashMap<u64, u64> = [
            (0x28, 0x55a8_6bf1_0b17),
            (0x30, sp + 0x70),
            (0x48, 0x55a8_6bef_dce3),
            (0x60, sp + 0x160),
            (0x70, 0x6b6c),
            (0x78, 0x55a8_6bdb_fbe0),
        ]
        .into_iter()
        .map(|(offset, value)| (sp + offset, value))
        .collect();
        let read = |addr: u64| Some(words.get(&addr).copied().unwrap_or(0));
        let is_code = |addr: u64| (0x55a8_6bd0_0000..0x55a8_6c00_0000).contains(&addr);
        // Above the return address into std's sleep (+0x28): a stale
        // return address at +0x48, the frame pointer at +0x70.
        assert_eq!(
            frame_pointer_candidates(sp, sp + 0x1000, 0x55a8_6bf1_0b17, read, is_code),
            [sp + 0x40, sp + 0x70]
        );
        assert!(frame_pointer_candidates(sp, sp + 0x1000, 0x1234, read, is_code).is_empty());
    }

    #[test]
    fn the_bias_of_a_non_pie_mapping_is_zero() {
        let segments = [
            (0x40_0000, 0, 0x1000, false),
            (0x40_1000, 0x1000, 0x8000, true),
        ];
        assert_eq!(load_bias(0x40_1000, 0x1000, &segments), Some(0));
        assert_eq!(load_bias(0x40_1000, 0x9_0000, &segments), None);
    }

    #[test]
    fn an_unaligned_segment_offset_still_matches_its_page() {
        let segments = [(0x2_1234, 0x1234, 0x100, true)];
        assert_eq!(
            load_bias(0x7f00_0000_0000, 0x1000, &segments),
            Some(0x7f00_0000_0000 - 0x2_1000)
        );
    }
}
