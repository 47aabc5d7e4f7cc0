//! `uprobe_multi` links (Linux 6.6+): one link holds a program on many
//! offsets of one file, each with its own cookie, filtered to one process.
//! Removing a link waits for one grace period for all its offsets, where a
//! perf-event uprobe waits for one per probe, so a service with hundreds of
//! `raw::poll` copies detaches in a fraction of a second instead of minutes.
//!
//! aya 0.14 cannot create these links, and the kernel accepts a program in
//! one only if it was loaded with `expected_attach_type =
//! BPF_TRACE_UPROBE_MULTI`, which aya's `UProbe::load` does not set. So the
//! uprobe programs are loaded here from the same embedded object: parsed by
//! `aya_obj`, their map references pointed at the maps aya already created
//! (the ring buffer, the hash maps and the `.rodata`/`.bss`/`.data` globals
//! alike, so both loaders share all state), calls linked, then
//! `BPF_PROG_LOAD` and `BPF_LINK_CREATE` through the raw `bpf(2)` call. Every
//! program and link is an [`OwnedFd`]: closing it (or the agent dying)
//! removes it.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya::Ebpf;
use aya::maps::{Map, MapData};
use aya_obj::generated::{
    BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type,
};
use aya_obj::{Object, ProgramSection};

#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("failed to parse the embedded eBPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("failed to relocate the embedded eBPF object")]
    Relocate(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the eBPF object has no map `{0}` loaded; rebuild loopguard (`cargo xtask build`)")]
    MapMissing(String),
    #[error(
        "the eBPF object lacks the uprobe program `{0}`; rebuild loopguard (`cargo xtask build`)"
    )]
    ProgramMissing(&'static str),
    #[error(
        "the kernel rejected program `{program}` as a uprobe_multi program; verifier log: {log}"
    )]
    Load {
        program: &'static str,
        log: String,
        #[source]
        source: io::Error,
    },
}

/// The file descriptor of a map aya created.
fn map_fd(map: &Map) -> BorrowedFd<'_> {
    let data: &MapData = match map {
        Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::BloomFilter(data)
        | Map::CgroupArray(data)
        | Map::CgroupStorage(data)
        | Map::CgrpStorage(data)
        | Map::CpuMap(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::HashMap(data)
        | Map::HashOfMaps(data)
        | Map::InodeStorage(data)
        | Map::LpmTrie(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuCgroupStorage(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerfEventArray(data)
        | Map::ProgramArray(data)
        | Map::Queue(data)
        | Map::ReusePortSockArray(data)
        | Map::RingBuf(data)
        | Map::SockHash(data)
        | Map::SockMap(data)
        | Map::SkStorage(data)
        | Map::Stack(data)
        | Map::StackTraceMap(data)
        | Map::Unsupported(data)
        | Map::XskMap(data) => data,
    };
    data.fd().as_fd()
}

/// The `bpf(2)` system call; returns the new file descriptor.
fn bpf_fd(cmd: bpf_cmd, attr: &bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` whose pointer
    // fields point at buffers that outlive the call; the size passed is its own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_ref(attr),
            size_of::<bpf_attr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `BPF_PROG_LOAD` of a kprobe-type program for `uprobe_multi` links;
/// `log` receives the verifier's log when not empty.
fn load_program(
    name: &str,
    instructions: &[bpf_insn],
    license: &CStr,
    log: &mut [u8],
) -> io::Result<OwnedFd> {
    // SAFETY: `bpf_attr` is plain old data; all zeroes is its empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the union's `BPF_PROG_LOAD` member, written before the call.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
    load.expected_attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
    load.insns = instructions.as_ptr() as u64;
    load.insn_cnt = instructions.len() as u32;
    load.license = license.as_ptr() as u64;
    // The kernel takes names of up to 15 characters plus the NUL.
    for (slot, byte) in load.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    if !log.is_empty() {
        load.log_level = 1;
        load.log_buf = log.as_mut_ptr() as u64;
        load.log_size = log.len() as u32;
    }
    bpf_fd(bpf_cmd::BPF_PROG_LOAD, &attr)
}

/// `BPF_LINK_CREATE` of a `uprobe_multi` link: `program` on every offset
/// of `path` (cookies alongside), return probes if `returns`, firing only
/// in process `pid` (0: any).
fn create_link(
    program: BorrowedFd<'_>,
    path: &CStr,
    offsets: &[u64],
    cookies: &[u64],
    pid: u32,
    returns: bool,
) -> io::Result<OwnedFd> {
    debug_assert_eq!(offsets.len(), cookies.len());
    // SAFETY: as in `load_program`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the union's `BPF_LINK_CREATE` member, written before the call.
    let link = unsafe { &mut attr.link_create };
    link.__bindgen_anon_1.prog_fd = program.as_raw_fd() as u32;
    link.attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
    // SAFETY: the union's `uprobe_multi` member, written before the call.
    let multi = unsafe { &mut link.__bindgen_anon_3.uprobe_multi };
    multi.path = path.as_ptr() as u64;
    multi.offsets = offsets.as_ptr() as u64;
    multi.cookies = cookies.as_ptr() as u64;
    multi.cnt = offsets.len() as u32;
    multi.pid = pid;
    multi.flags = if returns {
        BPF_F_UPROBE_MULTI_RETURN
    } else {
        0
    };
    bpf_fd(bpf_cmd::BPF_LINK_CREATE, &attr)
}

/// Whether this kernel has `uprobe_multi` links whose pid filter selects a
/// whole process. Asked with a two-instruction program and links that
/// cannot succeed: on a directory the kernel answers EBADF once it knows
/// the link type (6.6+); kernels before the pid-filter fix (6.10, and the
/// stable releases it went to) filtered on the thread that registered
/// rather than the process, and only the fixed ones reject a negative pid
/// with EINVAL before looking at the path.
pub fn supported() -> bool {
    let mut exit = [zeroed_insn(), zeroed_insn()];
    // r0 = 0; exit
    exit[0].code = (aya_obj::generated::BPF_ALU64
        | aya_obj::generated::BPF_MOV
        | aya_obj::generated::BPF_K) as u8;
    exit[1].code = (aya_obj::generated::BPF_JMP | aya_obj::generated::BPF_EXIT) as u8;
    let Ok(program) = load_program("lg_multi_probe", &exit, c"GPL", &mut []) else {
        return false;
    };
    let root = c"/";
    let known = create_link(program.as_fd(), root, &[0], &[0], 0, false);
    if known.is_ok() || known.as_ref().err().and_then(io::Error::raw_os_error) != Some(libc::EBADF)
    {
        return false;
    }
    let fixed = create_link(program.as_fd(), root, &[0], &[0], u32::MAX, false);
    fixed.err().and_then(|error| error.raw_os_error()) == Some(libc::EINVAL)
}

fn zeroed_insn() -> bpf_insn {
    // SAFETY: `bpf_insn` is plain old data.
    unsafe { std::mem::zeroed() }
}

/// The uprobe programs of the embedded object, relocated against the maps
/// of a loaded [`Ebpf`] and loaded for `uprobe_multi` links on demand.
pub struct MultiPrograms {
    object: Object,
    loaded: HashMap<&'static str, OwnedFd>,
}

impl MultiPrograms {
    /// Prepares the programs of `object` (the bytes `ebpf` was loaded from).
    pub fn new(object: &[u8], ebpf: &Ebpf) -> Result<Self, MultiError> {
        let mut object = Object::parse(object).map_err(MultiError::Parse)?;
        if object.has_btf_relocations() {
            let btf =
                aya::Btf::from_sys_fs().map_err(|error| MultiError::Relocate(error.into()))?;
            object
                .relocate_btf(&btf)
                .map_err(|error| MultiError::Relocate(error.into()))?;
        }
        let maps = std::mem::take(&mut object.maps);
        let mut with_fds = Vec::with_capacity(maps.len());
        for (name, map) in &maps {
            let loaded = ebpf
                .map(name)
                .ok_or_else(|| MultiError::MapMissing(name.clone()))?;
            with_fds.push((name.as_str(), map_fd(loaded).as_raw_fd(), map));
        }
        let text_sections: HashSet<usize> = object
            .functions
            .keys()
            .map(|(section, _)| *section)
            .collect();
        object
            .relocate_maps(with_fds.into_iter(), &text_sections)
            .map_err(|error| MultiError::Relocate(error.into()))?;
        object
            .relocate_calls(&text_sections)
            .map_err(|error| MultiError::Relocate(error.into()))?;
        Ok(Self {
            object,
            loaded: HashMap::new(),
        })
    }

    /// Whether `name` is a return probe (`#[uretprobe]`).
    pub fn is_return(&self, name: &'static str) -> Result<bool, MultiError> {
        match self
            .object
            .programs
            .get(name)
            .map(|program| &program.section)
        {
            Some(ProgramSection::URetProbe { .. }) => Ok(true),
            Some(ProgramSection::UProbe { .. }) => Ok(false),
            _ => Err(MultiError::ProgramMissing(name)),
        }
    }

    /// Program `name`, loaded (once) for `uprobe_multi` links.
    pub fn program(&mut self, name: &'static str) -> Result<BorrowedFd<'_>, MultiError> {
        if !self.loaded.contains_key(name) {
            let fd = self.load(name)?;
            self.loaded.insert(name, fd);
        }
        Ok(self.loaded[name].as_fd())
    }

    /// The loaded programs, without the object they came from.
    pub fn into_loaded(self) -> Vec<OwnedFd> {
        self.loaded.into_values().collect()
    }

    fn load(&self, name: &'static str) -> Result<OwnedFd, MultiError> {
        self.is_return(name)?;
        let program = &self.object.programs[name];
        let function = self
            .object
            .functions
            .get(&program.function_key())
            .ok_or(MultiError::ProgramMissing(name))?;
        let license = &program.license;
        load_program(name, &function.instructions, license, &mut []).or_else(|_| {
            let mut log = vec![0u8; 1 << 20];
            load_program(name, &function.instructions, license, &mut log).map_err(|source| {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                // The end of the log says what the verifier stopped at.
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                MultiError::Load {
                    program: name,
                    log: tail,
                    source,
                }
            })
        })
    }
}

/// One `uprobe_multi` link; closing it removes all its probes.
pub struct MultiLink {
    _fd: OwnedFd,
    /// Offsets it holds.
    pub probes: usize,
}

/// Attaches `program` to every `(offset, cookie)` of `path`, in process `pid`.
pub fn attach(
    program: BorrowedFd<'_>,
    path: &Path,
    sites: &[(u64, u64)],
    pid: u32,
    returns: bool,
) -> io::Result<MultiLink> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let (offsets, cookies): (Vec<u64>, Vec<u64>) = sites.iter().copied().unzip();
    let fd = create_link(program, &path, &offsets, &cookies, pid, returns)?;
    Ok(MultiLink {
        _fd: fd,
        probes: sites.len(),
    })
}
