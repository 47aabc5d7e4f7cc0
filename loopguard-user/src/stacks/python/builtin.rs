//! The C function a Python frame called, by its Python name: `time.sleep`,
//! `socket.recv`, `Context.run`.
//!
//! From 3.11 on, calling a builtin makes no Python frame, and the callable
//! on the caller's value stack cannot be found reliably: while a frame
//! runs its stack pointer is a local of the eval loop (3.13 sets the
//! frame's `stacktop` to -1 meanwhile), and slots above the top keep stale
//! objects. So the name comes from the C side: the native frame's
//! function start (its FDE in `.eh_frame_hdr`) is the `ml_meth` of a
//! `PyMethodDef` in the module's static data, and that table is named by
//! what points at it: a `PyModuleDef` (`m_methods`: a function of module
//! `m_name`), a static `PyTypeObject` (`tp_methods`) or the
//! `Py_tp_methods` slot of a `PyType_Spec` (a method of type `name`).
//! These are stable-ABI structures, laid out the same in 3.11, 3.12 and
//! 3.13, and they are data: a stripped interpreter has them too.
//!
//! Names: a module's function is `module.function` (`time.sleep`, as code
//! calls it); a type's method is `Type.method` (`socket.recv`,
//! `Context.run`: its `__qualname__`, the way Python frames of methods
//! read `Class.method`, without the C module a user never imports).
//!
//! Everything read is the target's: each module's data is copied once
//! (bounded), indexed, and dropped; names must be identifiers.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use gimli::{BaseAddresses, EhFrame, EhFrameHdr, LittleEndian, UnwindSection};
use object::elf::{FileHeader64, PF_X, PT_GNU_EH_FRAME, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};

use super::walk::Memory;

/// Every `METH_*` flag (`METH_VARARGS` 0x1 .. `METH_METHOD` 0x200).
const METH_FLAGS: u64 = 0x3ff;
/// The calling conventions: a method definition has one of them.
const METH_CALLS: u64 = 0x1 | 0x4 | 0x8 | 0x80;
/// `sizeof(PyMethodDef)`: name, function, flags, doc.
const METHOD_DEF_BYTES: u64 = 32;
/// `PyModuleDef`: `m_name`, `m_size`, `m_methods`.
const MODULE_NAME: u64 = 40;
const MODULE_SIZE: u64 = 56;
const MODULE_METHODS: u64 = 64;
/// `PyTypeObject`: `tp_name`, `tp_basicsize`, `tp_itemsize`, `tp_methods`.
const TYPE_NAME: u64 = 24;
const TYPE_BASICSIZE: u64 = 32;
const TYPE_ITEMSIZE: u64 = 40;
const TYPE_METHODS: u64 = 232;
/// `PyType_Spec.slots`; `name` is at 0, `basicsize` (an `int`) at 8.
const SPEC_SLOTS: u64 = 24;
/// `Py_tp_methods`, and `sizeof(PyType_Slot)`.
const PY_TP_METHODS: u64 = 64;
const SLOT_BYTES: u64 = 16;
/// Slot ids are small (83 in 3.14).
const MAX_SLOT_ID: u64 = 127;
/// Entries walked back to a table's start, or a slot array's, at most.
const MAX_TABLE: usize = 4096;
/// Bytes of a module's data copied at most.
const MAX_DATA_BYTES: u64 = 64 << 20;
/// Bytes of an ELF header and its program headers read.
const HEAD_BYTES: usize = 4096;
/// Characters of a name kept at most.
const MAX_NAME: usize = 128;
/// Functions named (or known not to be builtins) kept per process.
const MAX_NAMED: usize = 4096;
/// Modules indexed per process at most.
const MAX_MODULES: usize = 64;

/// A module's loaded data, copied from the process, at runtime addresses.
#[derive(Debug, Default)]
pub struct Image {
    /// `(start, bytes)` of each non-executable loaded segment.
    pub segments: Vec<(u64, Vec<u8>)>,
    /// The module's non-executable segments: names point here.
    pub data: Vec<Range<u64>>,
    /// Its executable segments: functions are here.
    pub code: Vec<Range<u64>>,
}

impl Image {
    fn word(&self, addr: u64) -> Option<u64> {
        self.segments.iter().find_map(|(start, bytes)| {
            let at = usize::try_from(addr.checked_sub(*start)?).ok()?;
            let b = bytes.get(at..at.checked_add(8)?)?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        })
    }

    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.segments.iter().find_map(|(start, bytes)| {
            let at = usize::try_from(addr.checked_sub(*start)?).ok()?;
            bytes.get(at..at.checked_add(len)?)
        })
    }

    /// Every 8-byte-aligned word: `(address, value)`.
    fn words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.segments.iter().flat_map(|(start, bytes)| {
            let skip = usize::try_from(start.wrapping_neg() % 8).unwrap_or(0);
            bytes
                .get(skip..)
                .unwrap_or_default()
                .chunks_exact(8)
                .zip(0u64..)
                .map(move |(b, index)| {
                    let value = u64::from_le_bytes(b.try_into().unwrap_or_default());
                    (start + skip as u64 + index * 8, value)
                })
        })
    }

    fn in_data(&self, addr: u64) -> bool {
        self.data.iter().any(|r| r.contains(&addr))
    }

    fn in_code(&self, addr: u64) -> bool {
        self.code.iter().any(|r| r.contains(&addr))
    }

    /// `(ml_name, ml_meth)` when a `PyMethodDef` is at `at`.
    fn method_def(&self, at: u64) -> Option<(u64, u64)> {
        let name = self.word(at)?;
        let meth = self.word(at + 8)?;
        let flags = self.word(at + 16)?;
        let doc = self.word(at + 24)?;
        // `ml_flags` is an `int`; the padding after it is zero.
        let flags_ok = flags & !METH_FLAGS == 0 && flags & METH_CALLS != 0;
        (flags_ok && self.in_data(name) && self.in_code(meth) && (doc == 0 || self.in_data(doc)))
            .then_some((name, meth))
    }

    /// Who owns the method table that the word at `at` points to: a
    /// `PyModuleDef` (`m_methods`) or a static `PyTypeObject` (`tp_methods`).
    fn owner_at(&self, at: u64) -> Option<Owner> {
        let module = at.checked_sub(MODULE_METHODS).and_then(|def| {
            let name = self.word(def + MODULE_NAME)?;
            // `m_size`: -1 or a state's size.
            let size = self.word(def + MODULE_SIZE)?.cast_signed();
            (self.in_data(name) && (-1..1 << 24).contains(&size)).then_some(Owner::Module(name))
        });
        module.or_else(|| {
            let object = at.checked_sub(TYPE_METHODS)?;
            let name = self.word(object + TYPE_NAME)?;
            let basicsize = self.word(object + TYPE_BASICSIZE)?;
            let itemsize = self.word(object + TYPE_ITEMSIZE)?;
            (self.in_data(name) && (1..1 << 24).contains(&basicsize) && itemsize < 1 << 16)
                .then_some(Owner::Type(name))
        })
    }

    /// The first slot of the `PyType_Slot` array holding the slot at `slot`.
    fn slots_start(&self, slot: u64) -> u64 {
        let mut start = slot;
        for _ in 0..MAX_TABLE {
            let Some(previous) = start.checked_sub(SLOT_BYTES) else {
                break;
            };
            let id = self.word(previous).unwrap_or(0);
            let function = self.word(previous + 8).unwrap_or(0);
            if !(1..=MAX_SLOT_ID).contains(&id) || function == 0 {
                break;
            }
            start = previous;
        }
        start
    }

    /// The name of the `PyType_Spec` whose `slots` is the word at `at`.
    fn spec_at(&self, at: u64) -> Option<Owner> {
        let spec = at.checked_sub(SPEC_SLOTS)?;
        let name = self.word(spec)?;
        // `basicsize` and `itemsize`, two `int`s.
        let sizes = self.word(spec + 8)?;
        let basicsize = (sizes & 0xffff_ffff) as u32;
        (self.in_data(name) && basicsize < 1 << 24).then_some(Owner::Type(name))
    }
}

/// Who a method table belongs to, by the address of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// `m_name` of a `PyModuleDef`.
    Module(u64),
    /// `tp_name` of a static type, or `name` of a `PyType_Spec`.
    Type(u64),
}

/// A module's method definitions, by function.
#[derive(Debug, Default)]
pub struct MethodIndex {
    /// `ml_meth` → (`ml_name`, the first entry of its table).
    methods: HashMap<u64, (u64, u64)>,
    /// A table's first entry → who owns it.
    owners: HashMap<u64, Owner>,
}

impl MethodIndex {
    /// Finds every method definition of `image` and who owns its table.
    pub fn build(image: &Image) -> Self {
        let words: Vec<(u64, u64)> = image.words().collect();
        let mut methods = method_defs(image, &words);
        table_starts(image, &mut methods);
        let owners = table_owners(image, &words, &methods);
        Self { methods, owners }
    }

    /// Method definitions found.
    pub fn len(&self) -> usize {
        self.methods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    /// The Python name of the function starting at `function`, if a method
    /// definition names it; its strings read through `memory`.
    pub fn name(&self, memory: &dyn Memory, function: u64) -> Option<String> {
        let &(name, table) = self.methods.get(&function)?;
        let method = identifier(memory, name, false)?;
        let owner = match self.owners.get(&table) {
            Some(Owner::Module(module)) => identifier(memory, *module, true),
            // `_socket.socket` → `socket`: the type's own name.
            Some(Owner::Type(tp_name)) => identifier(memory, *tp_name, true)
                .and_then(|full| full.rsplit('.').next().map(str::to_owned)),
            None => None,
        };
        Some(match owner {
            Some(owner) => format!("{owner}.{method}"),
            None => method,
        })
    }
}

/// The NUL-terminated identifier at `addr` (dots allowed when `dotted`);
/// `None` for anything else.
fn identifier(memory: &dyn Memory, addr: u64, dotted: bool) -> Option<String> {
    // A short name can end its mapping: try shorter reads.
    for len in [MAX_NAME + 1, 32, 8] {
        let mut buf = vec![0u8; len];
        if !memory.read(addr, &mut buf) {
            continue;
        }
        let end = buf.iter().position(|&b| b == 0)?;
        let name = &buf[..end];
        let first_ok = name
            .first()
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_');
        let rest_ok = name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || (dotted && *b == b'.'));
        return (first_ok && rest_ok)
            .then(|| String::from_utf8(name.to_vec()).ok())
            .flatten();
    }
    None
}

/// A module's unwind table: which function an address is in.
#[derive(Debug, Default)]
pub struct FunctionStarts {
    /// `.eh_frame_hdr` and `.eh_frame`, at their runtime addresses.
    hdr: (u64, Vec<u8>),
    eh_frame: (u64, Vec<u8>),
}

impl FunctionStarts {
    /// From the `.eh_frame_hdr` at `hdr_addr` of `image` (the `.eh_frame`
    /// it points to runs at most to its segment's end).
    pub fn new(image: &Image, hdr_addr: u64, hdr_len: usize) -> Option<Self> {
        let hdr = image.bytes(hdr_addr, hdr_len)?.to_vec();
        let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr);
        let parsed = EhFrameHdr::new(&hdr, LittleEndian).parse(&bases, 8).ok()?;
        let gimli::Pointer::Direct(eh_addr) = parsed.eh_frame_ptr() else {
            return None;
        };
        let eh_frame = image.segments.iter().find_map(|(start, bytes)| {
            let at = usize::try_from(eh_addr.checked_sub(*start)?).ok()?;
            bytes.get(at..).map(<[u8]>::to_vec)
        })?;
        Some(Self {
            hdr: (hdr_addr, hdr),
            eh_frame: (eh_addr, eh_frame),
        })
    }

    /// The start of the function whose code holds `addr`.
    pub fn function_start(&self, addr: u64) -> Option<u64> {
        let bases = BaseAddresses::default()
            .set_eh_frame_hdr(self.hdr.0)
            .set_eh_frame(self.eh_frame.0);
        let parsed = EhFrameHdr::new(&self.hdr.1, LittleEndian)
            .parse(&bases, 8)
            .ok()?;
        let eh_frame = EhFrame::new(&self.eh_frame.1, LittleEndian);
        let fde = parsed
            .table()?
            .fde_for_address(&eh_frame, &bases, addr, EhFrame::cie_from_offset)
            .ok()?;
        Some(fde.initial_address())
    }
}

/// One module's builtins: its function starts and method definitions.
#[derive(Debug)]
pub struct ModuleBuiltins {
    starts: FunctionStarts,
    methods: MethodIndex,
}

impl ModuleBuiltins {
    /// Reads the module whose ELF header is mapped at `base` (its mapping
    /// at file offset 0): program headers, then its data (at most
    /// [`MAX_DATA_BYTES`]), which is indexed and dropped.
    pub fn load(memory: &dyn Memory, base: u64) -> Option<Self> {
        let mut head = vec![0u8; HEAD_BYTES];
        if !memory.read(base, &mut head) {
            return None;
        }
        let endian = object::LittleEndian;
        let header = FileHeader64::<object::LittleEndian>::parse(&*head).ok()?;
        let headers = header.program_headers(endian, &*head).ok()?;
        let first = headers
            .iter()
            .find(|p| p.p_type(endian) == PT_LOAD && p.p_offset(endian) == 0)?;
        let bias = base.wrapping_sub(first.p_vaddr(endian) & !0xfff);
        let mut image = Image::default();
        let mut eh_frame_hdr = None;
        let mut copied = 0u64;
        for program in headers {
            let start = program.p_vaddr(endian).wrapping_add(bias);
            let (file_size, memory_size) = (program.p_filesz(endian), program.p_memsz(endian));
            match program.p_type(endian) {
                PT_GNU_EH_FRAME => eh_frame_hdr = Some((start, memory_size)),
                PT_LOAD if program.p_flags(endian) & PF_X != 0 => {
                    image.code.push(start..start.saturating_add(memory_size));
                }
                PT_LOAD => {
                    image.data.push(start..start.saturating_add(memory_size));
                    copied = copied.saturating_add(file_size);
                    if copied > MAX_DATA_BYTES {
                        return None;
                    }
                    let mut bytes = vec![0u8; usize::try_from(file_size).ok()?];
                    if memory.read(start, &mut bytes) {
                        image.segments.push((start, bytes));
                    }
                }
                _ => {}
            }
        }
        let (hdr_addr, hdr_len) = eh_frame_hdr?;
        let starts = FunctionStarts::new(&image, hdr_addr, usize::try_from(hdr_len).ok()?)?;
        Some(Self {
            starts,
            methods: MethodIndex::build(&image),
        })
    }
}

/// The builtins of one process's modules, indexed on first use.
#[derive(Debug, Default)]
pub struct Builtins {
    /// By the address of the module's ELF header: `None` when it could not
    /// be read.
    modules: HashMap<u64, Option<ModuleBuiltins>>,
    /// Function start → its Python name (`None`: not a builtin).
    named: HashMap<u64, Option<String>>,
}

impl Builtins {
    /// The Python name of the builtin whose code holds `addr`, in the
    /// module whose ELF header is at `base`.
    pub fn name(&mut self, memory: &dyn Memory, base: u64, addr: u64) -> Option<String> {
        if !self.modules.contains_key(&base) {
            if self.modules.len() >= MAX_MODULES {
                return None;
            }
            let started = std::time::Instant::now();
            let module = ModuleBuiltins::load(memory, base);
            tracing::debug!(
                base = format_args!("{base:#x}"),
                methods = module.as_ref().map_or(0, |m| m.methods.len()),
                us = started.elapsed().as_micros(),
                "Python builtins indexed"
            );
            self.modules.insert(base, module);
        }
        let module = self.modules.get(&base)?.as_ref()?;
        let start = module.starts.function_start(addr)?;
        if let Some(known) = self.named.get(&start) {
            return known.clone();
        }
        let name = module.methods.name(memory, start);
        if self.named.len() >= MAX_NAMED {
            self.named.clear();
        }
        self.named.insert(start, name.clone());
        name
    }
}

/// Whether a mapped file is a `CPython` extension module
/// (`_socket.cpython-312-x86_64-linux-gnu.so`, `foo.abi3.so`, or anything
/// under `lib-dynload/`), whose functions may be builtins.
pub fn is_extension_module(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    (name.contains(".cpython-3") && name.contains(".so"))
        || name.ends_with(".abi3.so")
        || path.contains("/lib-dynload/")
}

/// Every method definition in `words` of `image`: function → (name, where
/// its definition is).
fn method_defs(image: &Image, words: &[(u64, u64)]) -> HashMap<u64, (u64, u64)> {
    let mut methods: HashMap<u64, (u64, u64)> = HashMap::new();
    for (index, window) in words.windows(4).enumerate() {
        // The flags first: most words are not, and that check is cheap.
        let flags = window[2].1;
        if flags & !METH_FLAGS != 0 || flags & METH_CALLS == 0 {
            continue;
        }
        let at = words[index].0;
        // The four words of one segment only.
        if window[3].0 != at + 24 {
            continue;
        }
        if let Some((name, meth)) = image.method_def(at) {
            methods.entry(meth).or_insert((name, at));
        }
    }
    methods
}

/// Replaces where each definition is with where its table starts: a table
/// runs back to the entry after the previous one's sentinel.
fn table_starts(image: &Image, methods: &mut HashMap<u64, (u64, u64)>) {
    let mut starts: HashMap<u64, u64> = HashMap::new();
    for entry in methods.values_mut() {
        let at = entry.1;
        let mut start = at;
        for _ in 0..MAX_TABLE {
            match start.checked_sub(METHOD_DEF_BYTES) {
                Some(previous) if image.method_def(previous).is_some() => {
                    if let Some(&known) = starts.get(&previous) {
                        start = known;
                        break;
                    }
                    start = previous;
                }
                _ => break,
            }
        }
        starts.insert(at, start);
        entry.1 = start;
    }
}

/// Who owns each method table: the module or type whose definition points
/// at it, or the type spec whose slots (`Py_tp_methods`) do.
fn table_owners(
    image: &Image,
    words: &[(u64, u64)],
    methods: &HashMap<u64, (u64, u64)>,
) -> HashMap<u64, Owner> {
    let tables: HashSet<u64> = methods.values().map(|entry| entry.1).collect();
    let lowest = tables.iter().min().copied().unwrap_or(u64::MAX);
    let highest = tables.iter().max().copied().unwrap_or(0);
    let mut owners = HashMap::new();
    // Slot arrays holding a `Py_tp_methods` slot → the table.
    let mut slot_arrays: HashMap<u64, u64> = HashMap::new();
    for &(at, value) in words {
        if !(lowest..=highest).contains(&value) || !tables.contains(&value) {
            continue;
        }
        match image.owner_at(at) {
            Some(owner @ Owner::Module(_)) => {
                owners.insert(value, owner);
            }
            Some(owner) => {
                owners.entry(value).or_insert(owner);
            }
            None if at >= 8 && image.word(at - 8) == Some(PY_TP_METHODS) => {
                slot_arrays.insert(image.slots_start(at - 8), value);
            }
            None => {}
        }
    }
    if !slot_arrays.is_empty() {
        for &(at, value) in words {
            if let Some(&table) = slot_arrays.get(&value)
                && let Some(owner) = image.spec_at(at)
            {
                owners.entry(table).or_insert(owner);
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::super::walk::fake::FakeMemory;
    use super::*;

    /// Code at `0x40_0000`; data (names, tables) in the fake memory's regions.
    const CODE: Range<u64> = 0x40_0000..0x50_0000;

    struct Fixture {
        memory: FakeMemory,
        /// The table's region and where the next entry goes.
        data: u64,
        next: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let mut memory = FakeMemory::default();
            let data = memory.alloc(8192);
            Self {
                memory,
                data,
                next: data + 64,
            }
        }

        /// A C string, with room after it as in a real `.rodata`.
        fn string(&mut self, text: &str) -> u64 {
            let addr = self.memory.alloc(text.len() + 1 + MAX_NAME);
            let (start, bytes) = self.memory.regions.range_mut(..=addr).next_back().unwrap();
            let at = (addr - start) as usize;
            bytes[at..at + text.len()].copy_from_slice(text.as_bytes());
            addr
        }

        fn words(&mut self, words: &[u64]) -> u64 {
            let at = self.next;
            for (index, word) in words.iter().enumerate() {
                self.memory.put(at + index as u64 * 8, *word);
            }
            self.next += words.len() as u64 * 8;
            at
        }

        /// A method table: `(name, function, flags)` entries and a sentinel.
        fn table(&mut self, entries: &[(&str, u64, u64)]) -> u64 {
            let start = self.next;
            for &(name, function, flags) in entries {
                let name = self.string(name);
                self.words(&[name, function, flags, 0]);
            }
            self.words(&[0, 0, 0, 0]);
            start
        }

        fn image(&self) -> Image {
            let data: Vec<_> = self
                .memory
                .regions
                .iter()
                .map(|(start, bytes)| *start..*start + bytes.len() as u64)
                .collect();
            Image {
                segments: self
                    .memory
                    .regions
                    .iter()
                    .map(|(start, bytes)| (*start, bytes.clone()))
                    .collect(),
                data,
                code: vec![CODE],
            }
        }
    }

    #[test]
    fn a_module_function_is_module_dot_name() {
        let mut f = Fixture::new();
        let table = f.table(&[("perf_counter", 0x40_1000, 0x4), ("sleep", 0x40_2000, 0x8)]);
        let name = f.string("time");
        // PyModuleDef: head (40 bytes), m_name, m_doc, m_size, m_methods.
        f.words(&[1, 0, 0, 0, 0, name, 0, u64::MAX, table, 0]);
        let index = MethodIndex::build(&f.image());
        assert_eq!(index.len(), 2);
        assert_eq!(
            index.name(&f.memory, 0x40_2000).as_deref(),
            Some("time.sleep")
        );
        assert_eq!(
            index.name(&f.memory, 0x40_1000).as_deref(),
            Some("time.perf_counter")
        );
        // Not a method definition's function: not a builtin.
        assert_eq!(index.name(&f.memory, 0x40_3000), None);
    }

    #[test]
    fn a_type_s_method_is_type_dot_name_from_a_static_type_or_a_spec() {
        // A static type: tp_methods at 232, tp_name at 24.
        let mut f = Fixture::new();
        let table = f.table(&[("run", 0x40_1000, 0x80 | 0x2)]);
        let name = f.string("_contextvars.Context");
        let mut object = [0u64; 30];
        object[3] = name;
        object[4] = 48;
        object[29] = table;
        f.words(&object);
        let index = MethodIndex::build(&f.image());
        assert_eq!(
            index.name(&f.memory, 0x40_1000).as_deref(),
            Some("Context.run")
        );

        // A heap type's spec: slots {Py_tp_dealloc, f}, {Py_tp_methods, table}, {0}.
        let mut f = Fixture::new();
        let table = f.table(&[("recv", 0x40_2000, 0x1), ("send", 0x40_2100, 0x1)]);
        let slots = f.words(&[52, 0x40_0100, PY_TP_METHODS, table, 0, 0]);
        let name = f.string("_socket.socket");
        // name, basicsize 64 + itemsize 0, flags, slots.
        f.words(&[name, 64, 0x4400, slots]);
        let index = MethodIndex::build(&f.image());
        assert_eq!(
            index.name(&f.memory, 0x40_2100).as_deref(),
            Some("socket.send")
        );
    }

    #[test]
    fn an_unowned_table_gives_the_bare_name_and_bad_entries_are_not_methods() {
        let mut f = Fixture::new();
        f.table(&[("orphan", 0x40_1000, 0x8)]);
        // Flags outside METH_*, a function outside the code, no calling convention.
        let name = f.string("nope");
        f.words(&[name, 0x40_2000, 0x8000, 0]);
        f.words(&[0; 4]);
        f.words(&[name, 0x90_0000, 0x8, 0]);
        f.words(&[0; 4]);
        f.words(&[name, 0x40_3000, 0x10, 0]);
        f.words(&[0; 4]);
        // A name that is not an identifier.
        let bad = f.string("a\u{1b}[2J");
        f.words(&[bad, 0x40_4000, 0x8, 0]);
        let index = MethodIndex::build(&f.image());
        assert_eq!(index.name(&f.memory, 0x40_1000).as_deref(), Some("orphan"));
        for function in [0x40_2000, 0x90_0000, 0x40_3000, 0x40_4000] {
            assert_eq!(index.name(&f.memory, function), None, "{function:#x}");
        }
    }

    #[test]
    fn garbage_data_terminates() {
        // Random words, with some pointing at code and data: the index
        // builds, and every name it gives is an identifier.
        let mut f = Fixture::new();
        let name = f.string("ok");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut words = Vec::new();
        for _ in 0..900 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            words.push(match seed % 5 {
                0 => CODE.start + seed % 0x1000,
                1 => name,
                2 => f.data + (seed % 1024) * 8,
                3 => seed % 0x400,
                _ => seed,
            });
        }
        f.words(&words);
        let index = MethodIndex::build(&f.image());
        for &function in index.methods.keys() {
            let got = index.name(&f.memory, function).unwrap_or_default();
            assert!(
                got.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.".contains(c)),
                "{got}"
            );
        }
    }

    #[test]
    fn extension_modules_are_told_by_their_file_names() {
        assert!(is_extension_module(
            "/opt/py/lib/python3.12/lib-dynload/_socket.cpython-312-x86_64-linux-gnu.so"
        ));
        assert!(is_extension_module("/srv/venv/lib/foo.abi3.so"));
        assert!(is_extension_module("/usr/lib/python3.11/lib-dynload/x.so"));
        assert!(!is_extension_module("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }

    /// A function of this test binary, to find by one of its addresses.
    #[inline(never)]
    extern "C" fn marker(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3).rotate_left(7)
    }

    #[test]
    fn this_process_s_unwind_table_gives_function_starts() {
        let pid = std::process::id();
        let maps = crate::discover::proc::read_maps(pid).unwrap();
        let function = marker as *const () as usize as u64;
        let code = maps
            .iter()
            .find(|m| m.executable && (m.start..m.end).contains(&function))
            .unwrap();
        let base = maps
            .iter()
            .find(|m| m.inode == code.inode && m.offset == 0)
            .unwrap()
            .start;
        let memory = super::super::ProcessMemory { pid };
        let module = ModuleBuiltins::load(&memory, base).expect("this binary's tables");
        assert_eq!(std::hint::black_box(marker(1)), 3u64.rotate_left(7));
        assert_eq!(module.starts.function_start(function + 2), Some(function));
        assert_eq!(module.starts.function_start(function), Some(function));
        // No Python here: no method definitions, so no builtin.
        let mut builtins = Builtins::default();
        assert_eq!(builtins.name(&memory, base, function + 2), None);
    }
}
