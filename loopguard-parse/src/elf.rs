//! Reads a target executable: where Tokio's task poll copies are, where the
//! blocking pool's code is, and the task-id offset each copy's vtable gives.
//!
//! Input: the bytes of an ELF file. Output: a [`BinaryInfo`] in virtual
//! addresses and file offsets; turning those into runtime addresses needs the
//! process's memory map (the agent's `discover::proc`).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use object::{
    Object, ObjectSection, ObjectSegment, ObjectSymbol, RelocationFlags, SegmentFlags, SymbolKind,
    elf,
};

use crate::symbols::{SymbolRole, classify, demangle, mentions_tokio};
use crate::usdt::{ArgSpec, ArgSpecError, parse_args, parse_notes};
use crate::vtable::{ImageWords, PollClass, TaskLayout, Word, agreed_layout, verify_vtable};

/// One monomorphised copy of `tokio::runtime::task::raw::poll`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollCopy {
    /// Virtual address in the ELF.
    pub vaddr: u64,
    /// Offset in the file, what a uprobe attaches to.
    pub file_offset: u64,
    /// Demangled name (v0 names carry the future type).
    pub name: String,
    /// The task layout its vtable gives, when it was verified.
    pub layout: Option<TaskLayout>,
}

impl PollCopy {
    /// Who polls this copy's tasks: [`PollClass::Unknown`] when no vtable
    /// was verified or its layout is not one loopguard knows.
    pub fn class(&self) -> PollClass {
        self.layout
            .map_or(PollClass::Unknown, |layout| layout.class())
    }

    /// Byte offset of the task id from the task header, for event-loop
    /// copies (the only ones whose layout loopguard vouches for).
    pub fn id_offset(&self) -> Option<u64> {
        self.layout
            .filter(|layout| layout.class() == PollClass::EventLoop)
            .map(|layout| layout.id_offset)
    }

    /// Whether this copy polls blocking-pool work (known from its vtable).
    pub fn is_blocking_pool(&self) -> bool {
        self.class() == PollClass::BlockingPool
    }
}

/// One USDT probe site of the `loopguard` provider.
#[derive(Clone, Debug)]
pub struct UsdtSite {
    pub name: String,
    /// Offset in the file of the probe's `nop`.
    pub file_offset: u64,
    /// Semaphore address, 0 when there is none.
    pub semaphore: u64,
    /// The decoded argument specs, or why they cannot be read.
    pub args: Result<Vec<ArgSpec>, ArgSpecError>,
}

/// Where the middleware's in-flight table sits (see
/// `loopguard_usdt::INFLIGHT_TABLE`), relative to its note's site: the site
/// is in mapped text, so its runtime address gives the table's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightTableSite {
    /// File offset of the note's `nop`.
    pub site_file_offset: u64,
    /// Table address minus site address, as linked (wrapping).
    pub table_minus_site: u64,
    /// Its layout (`loopguard_usdt::INFLIGHT_VERSION` or an older one this
    /// agent still reads).
    pub version: u32,
}

/// What [`analyze`] found in a binary (empty for a program watched only
/// through its wait path).
#[derive(Debug, Default)]
pub struct BinaryInfo {
    pub poll_copies: Vec<PollCopy>,
    /// `loopguard:*` USDT sites (empty without the middleware).
    pub usdt_sites: Vec<UsdtSite>,
    /// The middleware's in-flight tables (one per copy of the middleware
    /// linked in; none with a middleware older than the table).
    pub inflight_tables: Vec<InflightTableSite>,
    /// The argument strings of in-flight table notes of a layout this
    /// agent does not read (another middleware version): ignored, for the
    /// caller to say so.
    pub foreign_inflight_tables: Vec<String>,
    /// File offset ranges of blocking-pool code.
    pub blocking_ranges: Vec<Range<u64>>,
    /// `(file offset, size, demangled name)` of every function symbol, sorted,
    /// to name the code a return address points into.
    pub functions: Vec<(u64, u64, String)>,
}

/// Why a binary cannot be profiled.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file: {0}")]
    NotElf(#[source] object::Error),
    #[error("unsupported architecture {0:?}; loopguard supports x86-64")]
    Architecture(object::Architecture),
    #[error("the binary has no symbol table (it is stripped)")]
    Stripped,
    #[error("the binary does not contain Tokio")]
    NotTokio,
    #[error("the binary uses Tokio but no copy of `tokio::runtime::task::raw::poll` was found")]
    NoTaskPoll,
}

/// Analyzes the bytes of an executable.
pub fn analyze(data: &[u8]) -> Result<BinaryInfo, ElfError> {
    let file = object::File::parse(data).map_err(ElfError::NotElf)?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(ElfError::Architecture(file.architecture()));
    }
    let image = Image::new(&file);

    let TextSymbols {
        copies,
        mut blocking_ranges,
        mut functions,
        saw_tokio,
    } = text_symbols(&file, &image);
    if copies.is_empty() {
        return Err(if file.symbol_table().is_none() {
            ElfError::Stripped
        } else if saw_tokio {
            ElfError::NoTaskPoll
        } else {
            ElfError::NotTokio
        });
    }

    let layouts = find_layouts(&image, copies.keys().copied().collect());
    let mut poll_copies: Vec<PollCopy> = copies
        .into_iter()
        .filter_map(|(vaddr, name)| {
            Some(PollCopy {
                vaddr,
                file_offset: image.file_offset(vaddr)?,
                name,
                layout: layouts.get(&vaddr).copied().flatten(),
            })
        })
        .collect();
    poll_copies.sort_by_key(|copy| copy.vaddr);
    blocking_ranges.sort_by_key(|range| range.start);
    functions.sort_by_key(|&(offset, _, _)| offset);
    functions.dedup_by_key(|&mut (offset, _, _)| offset);
    let notes = find_usdt_sites(&file, &image);
    Ok(BinaryInfo {
        poll_copies,
        usdt_sites: notes.sites,
        inflight_tables: notes.tables,
        foreign_inflight_tables: notes.foreign_tables,
        blocking_ranges,
        functions,
    })
}

/// What the text symbols of an executable say, before it is judged.
#[derive(Default)]
struct TextSymbols {
    /// Copies of Tokio's task poll: address → demangled name.
    copies: HashMap<u64, String>,
    /// File ranges of the blocking pool's functions.
    blocking_ranges: Vec<Range<u64>>,
    /// `(file offset, size, demangled name)` of every function.
    functions: Vec<(u64, u64, String)>,
    /// Whether any symbol names Tokio.
    saw_tokio: bool,
}

/// Reads the text symbols of `file` (its symbol table, else its dynamic
/// symbols).
fn text_symbols(file: &object::File<'_>, image: &Image<'_>) -> TextSymbols {
    let symbols: Vec<_> = if file.symbol_table().is_some() {
        file.symbols().collect()
    } else {
        file.dynamic_symbols().collect()
    };
    let mut found = TextSymbols::default();
    for symbol in &symbols {
        if symbol.kind() != SymbolKind::Text || symbol.address() == 0 {
            continue;
        }
        let Ok(raw) = symbol.name() else { continue };
        let name = demangle(raw);
        found.saw_tokio |= mentions_tokio(&name);
        match classify(&name) {
            SymbolRole::TaskPoll => {
                found
                    .copies
                    .entry(symbol.address())
                    .or_insert_with(|| name.clone());
            }
            SymbolRole::BlockingPool if symbol.size() > 0 => {
                if let Some(start) = image.file_offset(symbol.address()) {
                    found.blocking_ranges.push(start..start + symbol.size());
                }
            }
            _ => {}
        }
        if let Some(start) = image.file_offset(symbol.address()) {
            found.functions.push((start, symbol.size(), name));
        }
    }
    found
}

/// For each copy: the layout all its vtables agree on (`None` inside when
/// they disagree or none verified).
fn find_layouts(image: &Image<'_>, copies: HashSet<u64>) -> HashMap<u64, Option<TaskLayout>> {
    let mut slots: HashMap<u64, Vec<u64>> = HashMap::new();
    // A PIE's vtables are filled in by relative relocations at load time ...
    for (&slot, &target) in &image.relocations {
        if copies.contains(&target) {
            slots.entry(target).or_default().push(slot);
        }
    }
    // ... a non-PIE executable's hold the addresses literally, in whichever
    // data segment the linker chose (a PIE's file holds zeros there).
    for (range, _, bytes, executable) in &image.segments {
        if *executable {
            continue;
        }
        let skip = ((8 - range.start % 8) % 8) as usize;
        let words = bytes.get(skip..).unwrap_or_default().chunks_exact(8);
        for (i, chunk) in words.enumerate() {
            let value = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if copies.contains(&value) {
                slots
                    .entry(value)
                    .or_default()
                    .push(range.start + skip as u64 + 8 * i as u64);
            }
        }
    }
    copies
        .into_iter()
        .map(|copy| {
            let verdicts = slots.get(&copy).map(Vec::as_slice).unwrap_or_default();
            let layout = agreed_layout(verdicts.iter().map(|&slot| verify_vtable(image, slot)));
            (copy, layout)
        })
        .collect()
}

/// What the `loopguard` provider's notes announce.
#[derive(Default)]
struct ProviderNotes {
    sites: Vec<UsdtSite>,
    tables: Vec<InflightTableSite>,
    foreign_tables: Vec<String>,
}

/// The `loopguard` provider's USDT sites, their addresses corrected for
/// prelinking the way `SystemTap` defines (`.stapsdt.base`), and the
/// in-flight tables its notes announce.
fn find_usdt_sites(file: &object::File<'_>, image: &Image<'_>) -> ProviderNotes {
    let Some(notes) = file
        .section_by_name(".note.stapsdt")
        .and_then(|section| section.data().ok())
    else {
        return ProviderNotes::default();
    };
    let actual_base = file
        .section_by_name(".stapsdt.base")
        .map(|section| section.address());
    let corrected = |note_base: u64, addr: u64| match actual_base {
        Some(base) if note_base != 0 => addr.wrapping_add(base).wrapping_sub(note_base),
        _ => addr,
    };
    let mut found = ProviderNotes::default();
    for note in parse_notes(notes) {
        if note.provider != loopguard_common::usdt::PROVIDER {
            continue;
        }
        let pc = corrected(note.base, note.pc);
        let Some(file_offset) = image.file_offset(pc) else {
            continue;
        };
        if note.name == loopguard_common::usdt::INFLIGHT_TABLE {
            if let Some(version) = inflight_layout_known(&note.args)
                && note.semaphore != 0
            {
                found.tables.push(InflightTableSite {
                    site_file_offset: file_offset,
                    table_minus_site: corrected(note.base, note.semaphore).wrapping_sub(pc),
                    version,
                });
            } else {
                found.foreign_tables.push(note.args);
            }
            continue;
        }
        found.sites.push(UsdtSite {
            file_offset,
            semaphore: note.semaphore,
            args: parse_args(&note.args),
            name: note.name,
        });
    }
    found
}

/// The version of an in-flight table note's layout (`version slots
/// slot_bytes`), if it is one this agent reads: the current one, or the
/// first (slots only), with the same slots.
fn inflight_layout_known(args: &str) -> Option<u32> {
    use loopguard_common::usdt::{
        INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS, INFLIGHT_VERSION, INFLIGHT_VERSION_SLOTS_ONLY,
    };
    [INFLIGHT_VERSION, INFLIGHT_VERSION_SLOTS_ONLY]
        .into_iter()
        .find(|version| {
            let expected = format!("{version} {INFLIGHT_SLOTS} {INFLIGHT_SLOT_BYTES}");
            args.split_whitespace().eq(expected.split_whitespace())
        })
}

/// The loadable segments of a file plus its `R_X86_64_RELATIVE` relocations.
struct Image<'d> {
    /// `(vaddr range backed by file bytes, file offset, bytes, executable)`.
    segments: Vec<(Range<u64>, u64, &'d [u8], bool)>,
    /// Slot address → target address, from relative relocations.
    relocations: HashMap<u64, u64>,
}

impl<'d> Image<'d> {
    fn new(file: &object::File<'d>) -> Self {
        let segments = file
            .segments()
            .filter_map(|segment| {
                let (offset, size) = segment.file_range();
                let bytes = segment.data().ok()?;
                let executable = match segment.flags() {
                    SegmentFlags::Elf { p_flags } => p_flags & elf::PF_X != 0,
                    _ => false,
                };
                // A hostile header may place a segment at the top of the
                // address space: one that wraps around is no segment.
                let end = segment.address().checked_add(size)?;
                Some((segment.address()..end, offset, bytes, executable))
            })
            .collect();
        let relocations = file
            .dynamic_relocations()
            .into_iter()
            .flatten()
            .filter_map(|(slot, relocation)| match relocation.flags() {
                RelocationFlags::Elf {
                    r_type: elf::R_X86_64_RELATIVE,
                } => Some((slot, relocation.addend() as u64)),
                _ => None,
            })
            .collect();
        Self {
            segments,
            relocations,
        }
    }

    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(range, ..)| range.contains(&vaddr))
            .map(|(range, offset, ..)| offset + (vaddr - range.start))
    }
}

impl ImageWords for Image<'_> {
    fn word(&self, vaddr: u64) -> Option<Word> {
        let (range, _, bytes, _) = self
            .segments
            .iter()
            .find(|(range, ..)| range.contains(&vaddr))?;
        let at = (vaddr - range.start) as usize;
        let raw = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
        Some(match self.relocations.get(&vaddr) {
            Some(&target) => Word {
                value: target,
                relocated: true,
            },
            None => Word {
                value: raw,
                relocated: false,
            },
        })
    }

    fn is_code(&self, vaddr: u64) -> bool {
        self.segments
            .iter()
            .any(|(range, _, _, executable)| *executable && range.contains(&vaddr))
    }
}

#[cfg(test)]
mod tests {
    use object::write::{Object as Writer, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolScope};

    use super::*;

    /// A relocatable object for `architecture` with one text section and a
    /// 16-byte function symbol per name (raw, mangled as given).
    fn object_with_functions(architecture: Architecture, names: &[&str]) -> Vec<u8> {
        let mut writer = Writer::new(BinaryFormat::Elf, architecture, Endianness::Little);
        let text = writer.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
        writer.append_section_data(text, &vec![0xc3; 16 * (names.len() + 1)], 16);
        for (i, name) in names.iter().enumerate() {
            writer.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: 16 * (i as u64 + 1),
                size: 16,
                kind: SymbolKind::Text,
                scope: SymbolScope::Linkage,
                weak: false,
                section: SymbolSection::Section(text),
                flags: SymbolFlags::None,
            });
        }
        writer.write().unwrap()
    }

    const TASK_POLL: &str = "_ZN5tokio7runtime4task3raw4poll17h0123456789abcdefE";
    const TOKIO_OTHER: &str = "_ZN5tokio7runtime4time6Driver4park17h0123456789abcdefE";

    #[test]
    fn what_is_not_an_x86_64_elf_is_refused_as_such() {
        assert!(matches!(analyze(b"not an elf"), Err(ElfError::NotElf(_))));
        assert!(matches!(analyze(&[]), Err(ElfError::NotElf(_))));
        let arm = object_with_functions(Architecture::Aarch64, &[TASK_POLL]);
        assert!(matches!(
            analyze(&arm),
            Err(ElfError::Architecture(Architecture::Aarch64))
        ));
    }

    #[test]
    fn programs_without_the_task_poll_are_told_apart() {
        let c = object_with_functions(Architecture::X86_64, &["main", "epoll_wait"]);
        assert!(matches!(analyze(&c), Err(ElfError::NotTokio)), "C program");
        let tokio = object_with_functions(Architecture::X86_64, &["main", TOKIO_OTHER]);
        let error = analyze(&tokio).unwrap_err();
        assert!(matches!(error, ElfError::NoTaskPoll), "{error:?}");
        assert!(error.to_string().contains("raw::poll"), "{error}");
    }

    #[test]
    fn a_task_poll_symbol_makes_a_tokio_binary() {
        let bytes = object_with_functions(Architecture::X86_64, &[TOKIO_OTHER, TASK_POLL]);
        // A relocatable object maps nothing: no copy has a file offset to
        // attach to, and nothing else is claimed.
        let info = analyze(&bytes).unwrap();
        assert!(info.poll_copies.is_empty(), "{:?}", info.poll_copies);
        assert!(info.usdt_sites.is_empty() && info.inflight_tables.is_empty());
        assert!(info.foreign_inflight_tables.is_empty());
    }

    /// An x86-64 executable of headers only: one loadable segment of the
    /// whole file at `vaddr`, no sections, no symbols.
    fn headers_only_executable(vaddr: u64) -> Vec<u8> {
        let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
        bytes.resize(16, 0);
        for half in [2u16, 62] {
            bytes.extend_from_slice(&half.to_le_bytes()); // e_type EXEC, e_machine x86-64
        }
        bytes.extend_from_slice(&1u32.to_le_bytes()); // e_version
        for word in [0u64, 64, 0] {
            bytes.extend_from_slice(&word.to_le_bytes()); // e_entry, e_phoff, e_shoff
        }
        bytes.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [64u16, 56, 1, 64, 0, 0] {
            // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
            bytes.extend_from_slice(&half.to_le_bytes());
        }
        let size = 64 + 56;
        bytes.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        bytes.extend_from_slice(&5u32.to_le_bytes()); // R + X
        for word in [0, vaddr, vaddr, size, size, 0x1000] {
            // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!(bytes.len() as u64, size);
        bytes
    }

    #[test]
    fn a_segment_at_the_top_of_the_address_space_does_not_wrap() {
        assert!(matches!(
            analyze(&headers_only_executable(0x40_0000)),
            Err(ElfError::Stripped)
        ));
        // Its end would be past u64::MAX: no panic, just no such segment.
        assert!(matches!(
            analyze(&headers_only_executable(u64::MAX - 8)),
            Err(ElfError::Stripped)
        ));
    }

    #[test]
    fn only_the_in_flight_table_layout_of_this_agent_is_known() {
        use loopguard_common::usdt::{INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS, INFLIGHT_VERSION};
        let ours = format!("{INFLIGHT_VERSION} {INFLIGHT_SLOTS} {INFLIGHT_SLOT_BYTES}");
        assert_eq!(inflight_layout_known(&ours), Some(INFLIGHT_VERSION));
        assert_eq!(
            inflight_layout_known(&format!("  {ours} ")),
            Some(INFLIGHT_VERSION)
        );
        // The first layout (slots only) is still read.
        let first = format!("1 {INFLIGHT_SLOTS} {INFLIGHT_SLOT_BYTES}");
        assert_eq!(inflight_layout_known(&first), Some(1));
        let newer = format!(
            "{} {INFLIGHT_SLOTS} {INFLIGHT_SLOT_BYTES}",
            INFLIGHT_VERSION + 1
        );
        assert_eq!(inflight_layout_known(&newer), None);
        let other_slots = format!("{INFLIGHT_VERSION} 128 {INFLIGHT_SLOT_BYTES}");
        assert_eq!(inflight_layout_known(&other_slots), None);
        assert_eq!(inflight_layout_known(""), None);
    }
}
