//! USDT probes: the `.note.stapsdt` notes an application's probe sites leave
//! in its ELF, and the argument specs in them (`-8@%rdi`, `8@-16(%rbp)`,
//! `-4@$5`), decoded into something the kernel side can read.
//!
//! Input: the bytes of the note section, and of the arguments string of one
//! note. Output: [`UsdtNote`]s and [`ArgSpec`]s (x86-64 `pt_regs` offsets).

use std::fmt;

/// Note type of a `SystemTap` SDT probe.
const NT_STAPSDT: u32 = 3;
const STAPSDT_OWNER: &[u8] = b"stapsdt";

/// One probe site as its note describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtNote {
    /// Address of the probe's `nop`, as linked.
    pub pc: u64,
    /// Address of `_.stapsdt.base` as linked (to correct for prelinking).
    pub base: u64,
    /// Address of the semaphore, 0 when there is none.
    pub semaphore: u64,
    pub provider: String,
    pub name: String,
    /// The raw argument specs, space separated.
    pub args: String,
}

/// Parses every stapsdt note in the bytes of a `.note.stapsdt` section;
/// malformed trailing bytes end the walk.
pub fn parse_notes(section: &[u8]) -> Vec<UsdtNote> {
    let mut notes = Vec::new();
    let mut at = 0;
    while let Some(header) = section.get(at..at + 12) {
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
        let (name_size, desc_size, kind) = (word(0) as usize, word(4) as usize, word(8));
        let name_at = at + 12;
        let desc_at = name_at + name_size.next_multiple_of(4);
        let next = desc_at + desc_size.next_multiple_of(4);
        let (Some(owner), Some(desc)) = (
            section.get(name_at..name_at + name_size),
            section.get(desc_at..desc_at + desc_size),
        ) else {
            break;
        };
        let ours =
            kind == NT_STAPSDT && owner.strip_suffix(b"\0").unwrap_or(owner) == STAPSDT_OWNER;
        if ours && let Some(note) = parse_desc(desc) {
            notes.push(note);
        }
        at = next;
    }
    notes
}

fn parse_desc(desc: &[u8]) -> Option<UsdtNote> {
    let address = |i: usize| {
        Some(u64::from_le_bytes(
            desc.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let mut strings = desc
        .get(24..)?
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned());
    Some(UsdtNote {
        pc: address(0)?,
        base: address(1)?,
        semaphore: address(2)?,
        provider: strings.next()?,
        name: strings.next()?,
        args: strings.next().unwrap_or_default(),
    })
}

/// Where an argument's value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgLocation {
    /// In a register: byte offset in x86-64 `struct pt_regs`.
    Register { offset: u16 },
    /// In memory at register + displacement.
    Memory { offset: u16, displacement: i64 },
    /// A constant.
    Immediate(i64),
}

/// One decoded argument spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    /// 1, 2, 4 or 8.
    pub size: u8,
    pub signed: bool,
    pub location: ArgLocation,
}

/// Why an argument spec cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpecError {
    pub spec: String,
    pub reason: &'static str,
}

impl fmt::Display for ArgSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "USDT argument `{}`: {}", self.spec, self.reason)
    }
}

impl std::error::Error for ArgSpecError {}

/// Decodes every spec of a note's argument string.
pub fn parse_args(args: &str) -> Result<Vec<ArgSpec>, ArgSpecError> {
    args.split_whitespace().map(parse_arg).collect()
}

/// Decodes one spec: `[-]SIZE@OPERAND`, AT&T syntax.
pub fn parse_arg(spec: &str) -> Result<ArgSpec, ArgSpecError> {
    let error = |reason| ArgSpecError {
        spec: spec.to_owned(),
        reason,
    };
    let (size, operand) = spec
        .split_once('@')
        .ok_or_else(|| error("no `@` between size and operand"))?;
    let (signed, size) = match size.strip_prefix('-') {
        Some(size) => (true, size),
        None => (false, size),
    };
    let size: u8 = size.parse().map_err(|_| error("size is not a number"))?;
    if ![1, 2, 4, 8].contains(&size) {
        return Err(error("size must be 1, 2, 4 or 8"));
    }
    let location = if let Some(register) = operand.strip_prefix('%') {
        ArgLocation::Register {
            offset: register_offset(register).ok_or_else(|| error("unknown register"))?,
        }
    } else if let Some(value) = operand.strip_prefix('$') {
        ArgLocation::Immediate(parse_int(value).ok_or_else(|| error("immediate is not a number"))?)
    } else if let Some((displacement, rest)) = operand.split_once('(') {
        let register = rest
            .strip_suffix(')')
            .ok_or_else(|| error("unbalanced parentheses"))?;
        if register.contains(',') {
            return Err(error("indexed memory operands are not supported"));
        }
        let register = register
            .strip_prefix('%')
            .ok_or_else(|| error("memory base is not a register"))?;
        let displacement = if displacement.is_empty() {
            0
        } else {
            parse_int(displacement)
                .ok_or_else(|| error("displacement is not a number (symbols are not supported)"))?
        };
        let offset = register_offset(register).ok_or_else(|| error("unknown register"))?;
        if register == "rip" {
            return Err(error("rip-relative operands are not supported"));
        }
        ArgLocation::Memory {
            offset,
            displacement,
        }
    } else {
        return Err(error(
            "operand is not a register, memory reference or immediate",
        ));
    };
    Ok(ArgSpec {
        size,
        signed,
        location,
    })
}

fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    Some(if negative { -value } else { value })
}

/// Offset in x86-64 `struct pt_regs` of a register or of the register that
/// holds a sub-register (`eax`, `ax`, `al` are read from `rax`; the size of
/// the spec then truncates). High-byte registers (`ah`) are not supported.
pub fn register_offset(name: &str) -> Option<u16> {
    const FULL: [(&str, u16); 17] = loopguard_common::pt_regs::BY_NAME;
    // Legacy sub-registers: (64-bit, 32-bit, 16-bit, 8-bit low).
    const LEGACY: [[&str; 4]; 8] = [
        ["rax", "eax", "ax", "al"],
        ["rbx", "ebx", "bx", "bl"],
        ["rcx", "ecx", "cx", "cl"],
        ["rdx", "edx", "dx", "dl"],
        ["rsi", "esi", "si", "sil"],
        ["rdi", "edi", "di", "dil"],
        ["rbp", "ebp", "bp", "bpl"],
        ["rsp", "esp", "sp", "spl"],
    ];
    let full = |wide: &str| {
        FULL.iter()
            .find(|(n, _)| *n == wide)
            .map(|&(_, offset)| offset)
    };
    if let Some(offset) = full(name) {
        return Some(offset);
    }
    if let Some(names) = LEGACY.iter().find(|names| names[1..].contains(&name)) {
        return full(names[0]);
    }
    // r8d, r8w, r8b ... r15d, r15w, r15b
    let base = name.strip_suffix(['d', 'w', 'b'])?;
    base.starts_with('r')
        .then(|| full(base))
        .flatten()
        .filter(|_| base != "rip" && base != "rsp")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str) -> ArgLocation {
        ArgLocation::Register {
            offset: register_offset(name).unwrap(),
        }
    }

    #[test]
    fn register_arguments_of_every_size() {
        assert_eq!(
            parse_arg("-8@%rdi"),
            Ok(ArgSpec {
                size: 8,
                signed: true,
                location: reg("rdi")
            })
        );
        assert_eq!(
            parse_arg("8@%rax"),
            Ok(ArgSpec {
                size: 8,
                signed: false,
                location: reg("rax")
            })
        );
        assert_eq!(parse_arg("4@%eax").unwrap().location, reg("rax"));
        assert_eq!(parse_arg("-2@%si").unwrap().location, reg("rsi"));
        assert_eq!(parse_arg("1@%dil").unwrap().location, reg("rdi"));
        assert_eq!(parse_arg("4@%r9d").unwrap().location, reg("r9"));
        assert_eq!(parse_arg("2@%r15w").unwrap().location, reg("r15"));
        assert_eq!(parse_arg("1@%r10b").unwrap().location, reg("r10"));
    }

    #[test]
    fn pt_regs_offsets_match_the_kernel_layout() {
        assert_eq!(register_offset("r15"), Some(0));
        assert_eq!(register_offset("rax"), Some(80));
        assert_eq!(register_offset("rdi"), Some(112));
        assert_eq!(register_offset("rsp"), Some(152));
        assert_eq!(register_offset("ah"), None);
        assert_eq!(register_offset("xmm0"), None);
        assert_eq!(register_offset("ripd"), None);
    }

    #[test]
    fn memory_and_immediate_arguments() {
        assert_eq!(
            parse_arg("8@-16(%rbp)").unwrap().location,
            ArgLocation::Memory {
                offset: 32,
                displacement: -16
            }
        );
        assert_eq!(
            parse_arg("-4@8(%rsp)").unwrap().location,
            ArgLocation::Memory {
                offset: 152,
                displacement: 8
            }
        );
        assert_eq!(
            parse_arg("8@(%rax)").unwrap().location,
            ArgLocation::Memory {
                offset: 80,
                displacement: 0
            }
        );
        assert_eq!(
            parse_arg("8@0x10(%rbx)").unwrap().location,
            ArgLocation::Memory {
                offset: 40,
                displacement: 16
            }
        );
        assert_eq!(
            parse_arg("-4@$5").unwrap().location,
            ArgLocation::Immediate(5)
        );
        assert_eq!(
            parse_arg("8@$-1").unwrap().location,
            ArgLocation::Immediate(-1)
        );
    }

    #[test]
    fn unsupported_specs_say_why() {
        for (spec, reason) in [
            ("8", "no `@`"),
            ("3@%rax", "size must be"),
            ("x@%rax", "size is not"),
            ("8@%ah", "unknown register"),
            ("8@(%rax,%rbx,8)", "indexed"),
            ("8@sym(%rip)", "symbols"),
            ("8@8(%rip)", "rip-relative"),
            ("8@rax", "operand is not"),
        ] {
            let error = parse_arg(spec).unwrap_err();
            assert!(error.to_string().contains(reason), "{spec}: {error}");
        }
    }

    #[test]
    fn a_whole_argument_string() {
        let specs = parse_args("-8@%rax -8@%rcx 8@-24(%rbp)").unwrap();
        assert_eq!(specs.len(), 3);
        assert!(parse_args("-8@%rax bogus").is_err());
        assert_eq!(parse_args("").unwrap(), vec![]);
    }

    fn note(provider: &str, name: &str, args: &str, pc: u64) -> Vec<u8> {
        let mut desc = Vec::new();
        for address in [pc, 0x5000, 0] {
            desc.extend_from_slice(&u64::to_le_bytes(address));
        }
        for text in [provider, name, args] {
            desc.extend_from_slice(text.as_bytes());
            desc.push(0);
        }
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&8u32.to_le_bytes());
        bytes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&NT_STAPSDT.to_le_bytes());
        bytes.extend_from_slice(b"stapsdt\0");
        desc.resize(desc.len().next_multiple_of(4), 0);
        bytes.extend_from_slice(&desc);
        bytes
    }

    #[test]
    fn notes_are_parsed_from_a_section() {
        let mut section = note("loopguard", "request_start", "-8@%rax -8@%rcx", 0x1234);
        section.extend(note("loopguard", "request_end", "-8@%rdx", 0x1300));
        let notes = parse_notes(&section);
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].provider, "loopguard");
        assert_eq!(notes[0].name, "request_start");
        assert_eq!(notes[0].pc, 0x1234);
        assert_eq!(notes[0].base, 0x5000);
        assert_eq!(notes[0].semaphore, 0);
        assert_eq!(notes[0].args, "-8@%rax -8@%rcx");
        assert_eq!(notes[1].name, "request_end");
    }

    #[test]
    fn notes_are_read_out_of_a_synthetic_elf() {
        use object::{Object, ObjectSection};
        let mut elf = object::write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let text = elf.add_section(Vec::new(), b".text".to_vec(), object::SectionKind::Text);
        elf.append_section_data(text, &[0x90; 16], 16);
        let section = elf.add_section(
            Vec::new(),
            b".note.stapsdt".to_vec(),
            object::SectionKind::Note,
        );
        let mut notes = note(
            "loopguard",
            "request_start",
            "-8@%r10 -8@%rdi 8@-16(%rbp)",
            0x10,
        );
        notes.extend(note("other", "probe", "", 0x20));
        elf.append_section_data(section, &notes, 4);
        let bytes = elf.write().unwrap();

        let file = object::File::parse(&*bytes).unwrap();
        let data = file
            .section_by_name(".note.stapsdt")
            .unwrap()
            .data()
            .unwrap();
        let parsed = parse_notes(data);
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            (
                parsed[0].provider.as_str(),
                parsed[0].name.as_str(),
                parsed[0].pc
            ),
            ("loopguard", "request_start", 0x10)
        );
        let args = parse_args(&parsed[0].args).unwrap();
        assert_eq!(args[0].location, ArgLocation::Register { offset: 56 });
        assert_eq!(
            args[2].location,
            ArgLocation::Memory {
                offset: 32,
                displacement: -16
            }
        );
        assert_eq!(parsed[1].provider, "other");
    }

    #[test]
    fn a_truncated_section_keeps_the_whole_notes() {
        let mut section = note("loopguard", "request_start", "", 1);
        section.extend_from_slice(&[8, 0, 0, 0, 200, 0]);
        assert_eq!(parse_notes(&section).len(), 1);
        assert!(parse_notes(&[]).is_empty());
    }
}
