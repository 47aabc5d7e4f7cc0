//! The kernel's own type information (`/sys/kernel/btf/vmlinux`, raw BTF)
//! → byte offsets of struct members, so the eBPF programs can read a
//! kernel field this kernel placed wherever its configuration put it.
//!
//! Only what an offset lookup needs is read: the header, the type
//! records (each one's size is known from its kind, so they are walked in
//! order), and the names of structs and their members. Members of an
//! anonymous struct or union are found through it, as C spells them.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not raw BTF (magic {0:#06x}, expected 0xeb9f)")]
    Magic(u16),
    #[error("BTF truncated: {0}")]
    Truncated(&'static str),
    #[error("BTF type record of unknown kind {0}")]
    UnknownKind(u32),
    #[error("no struct `{0}` in the kernel's BTF")]
    NoStruct(String),
    #[error("struct `{strukt}` has no member `{member}` in the kernel's BTF")]
    NoMember { strukt: String, member: String },
    #[error("`{0}` is a bit field, not a byte-addressed member")]
    BitField(String),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
/// The highest kind this parser knows the record size of.
const KIND_MAX: u32 = 19;

/// One type record: its kind, name, `referent` word and members.
#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name_off: u32,
    kind_flag: bool,
    /// Its `size` or `type` word (what a typedef or qualifier names).
    referent: u32,
    /// `(name_off, type, offset)` of a struct or union's members.
    members: Vec<(u32, u32, u32)>,
}

/// A parsed BTF blob: its types by id (id 0 is `void`) and string section.
pub struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    /// Parses raw little-endian BTF (what `/sys/kernel/btf/vmlinux` holds).
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let magic = u16_at(data, 0).ok_or(BtfError::Truncated("header"))?;
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let word = |at| u32_at(data, at).ok_or(BtfError::Truncated("header"));
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let section = |off: usize, len: usize, what| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated(what))?;
            let end = start.checked_add(len).ok_or(BtfError::Truncated(what))?;
            data.get(start..end).ok_or(BtfError::Truncated(what))
        };
        let type_bytes = section(type_off, type_len, "type section")?;
        let strings = section(str_off, str_len, "string section")?;
        let mut types = vec![Type {
            kind: 0,
            name_off: 0,
            kind_flag: false,
            referent: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < type_bytes.len() {
            let (ty, next) = parse_type(type_bytes, at)?;
            types.push(ty);
            at = next;
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = memchr::memchr(0, rest).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The id of the struct called `name`.
    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .position(|ty| ty.kind == KIND_STRUCT && self.name(ty.name_off) == name.as_bytes())
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    /// Through typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(ty)
                    if matches!(
                        ty.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = ty.referent;
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of member `member` in the struct or union `id`, looking
    /// inside its anonymous members; with the member's type id.
    fn member_in(&self, id: u32, member: &str, depth: u32) -> Option<Result<(u32, u32), BtfError>> {
        let ty = self.types.get(self.resolve(id) as usize)?;
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for &(name_off, member_type, offset) in &ty.members {
            let bits = if ty.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            let bitfield = ty.kind_flag && offset >> 24 != 0;
            let name = self.name(name_off);
            if name == member.as_bytes() {
                if bitfield || bits % 8 != 0 {
                    return Some(Err(BtfError::BitField(member.to_owned())));
                }
                return Some(Ok((bits / 8, member_type)));
            }
            if name.is_empty()
                && let Some(found) = self.member_in(member_type, member, depth + 1)
            {
                return Some(found.map(|(inner, ty)| (bits / 8 + inner, ty)));
            }
        }
        None
    }

    /// Byte offset of `path` (members separated by dots, each one a
    /// struct or union member of the one before) in struct `strukt`.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = self.struct_id(strukt)?;
        let mut total = 0u32;
        for member in path.split('.') {
            let (offset, member_type) =
                self.member_in(id, member, 0)
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: strukt.to_owned(),
                        member: path.to_owned(),
                    })??;
            total = total.saturating_add(offset);
            id = member_type;
        }
        Ok(total)
    }
}

/// The record at `at` of the type section and where the next one starts.
fn parse_type(bytes: &[u8], at: usize) -> Result<(Type, usize), BtfError> {
    let word = |at| u32_at(bytes, at).ok_or(BtfError::Truncated("type record"));
    let (name_off, info, referent) = (word(at)?, word(at + 4)?, word(at + 8)?);
    let vlen = (info & 0xffff) as usize;
    let kind = (info >> 24) & 0x1f;
    let kind_flag = info >> 31 != 0;
    let body = at + 12;
    let extra = match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        kind if kind == KIND_PTR || kind <= KIND_MAX => 0,
        kind => return Err(BtfError::UnknownKind(kind)),
    };
    let mut members = Vec::new();
    if matches!(kind, KIND_STRUCT | KIND_UNION) {
        for index in 0..vlen {
            let member = body + 12 * index;
            members.push((word(member)?, word(member + 4)?, word(member + 8)?));
        }
    }
    let next = body + extra;
    if next > bytes.len() {
        return Err(BtfError::Truncated("type record"));
    }
    Ok((
        Type {
            kind,
            name_off,
            kind_flag,
            referent,
            members,
        },
        next,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds raw BTF from type records (each its words) and names.
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn int(&mut self, name: &str, size: u32) {
            let name = self.name(name);
            self.types
                .extend([name, KIND_INT << 24, size, 0x0100_0000 | (size * 8)]);
        }

        fn ptr(&mut self, to: u32) {
            self.types.extend([0, KIND_PTR << 24, to]);
        }

        fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let name = self.name(name);
            self.types
                .extend([name, kind << 24 | members.len() as u32, size]);
            for &(member, ty, bits) in members {
                let member = self.name(member);
                self.types.extend([member, ty, bits]);
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let types: Vec<u8> = self.types.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for word in [
                24,
                0,
                types.len() as u32,
                types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&word.to_le_bytes());
            }
            out.extend_from_slice(&types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// The shape loopguard reads: `task_struct.se.cfs_rq` → `cfs_rq.rq` →
    /// `rq.prev_steal_time_rq`, with an anonymous union on the way.
    fn scheduler_like() -> Vec<u8> {
        let mut b = Builder::new();
        b.int("long unsigned int", 8); // 1
        b.composite(
            KIND_STRUCT,
            "rq",
            64,
            &[("cpu", 1, 0), ("prev_steal_time_rq", 1, 320)],
        ); // 2
        b.ptr(2); // 3
        b.composite(KIND_STRUCT, "cfs_rq", 32, &[("load", 1, 0), ("rq", 3, 128)]); // 4
        b.ptr(4); // 5
        b.composite(
            KIND_STRUCT,
            "sched_entity",
            64,
            &[("load", 1, 0), ("cfs_rq", 5, 256)],
        ); // 6
        b.composite(KIND_UNION, "", 8, &[("flags", 1, 0), ("other", 1, 0)]); // 7
        b.composite(
            KIND_STRUCT,
            "task_struct",
            512,
            &[("state", 1, 0), ("", 7, 64), ("se", 6, 1024)],
        ); // 8
        b.bytes()
    }

    #[test]
    fn offsets_follow_member_paths() {
        let bytes = scheduler_like();
        let btf = Btf::parse(&bytes).unwrap();
        assert_eq!(btf.offset_of("task_struct", "se.cfs_rq"), Ok(128 + 32));
        assert_eq!(btf.offset_of("cfs_rq", "rq"), Ok(16));
        assert_eq!(btf.offset_of("rq", "prev_steal_time_rq"), Ok(40));
        assert_eq!(btf.offset_of("rq", "cpu"), Ok(0));
    }

    #[test]
    fn members_of_anonymous_unions_are_found_through_them() {
        let bytes = scheduler_like();
        let btf = Btf::parse(&bytes).unwrap();
        assert_eq!(btf.offset_of("task_struct", "other"), Ok(8));
    }

    #[test]
    fn what_is_missing_is_named() {
        let bytes = scheduler_like();
        let btf = Btf::parse(&bytes).unwrap();
        assert_eq!(
            btf.offset_of("rq", "prev_steal_time"),
            Err(BtfError::NoMember {
                strukt: "rq".into(),
                member: "prev_steal_time".into()
            })
        );
        assert_eq!(
            btf.offset_of("runqueue", "cpu"),
            Err(BtfError::NoStruct("runqueue".into()))
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let bytes = scheduler_like();
        assert_eq!(
            Btf::parse(&bytes[..3]).err(),
            Some(BtfError::Truncated("header"))
        );
        assert!(matches!(
            Btf::parse(b"\x9f\xeb\x01\x00"),
            Err(BtfError::Truncated(_))
        ));
        assert_eq!(Btf::parse(&[0u8; 32]).err(), Some(BtfError::Magic(0)));
        for cut in 24..bytes.len() {
            let mut short = bytes[..cut].to_vec();
            // Keep the header's lengths: every cut is a truncated section.
            short.resize(cut, 0);
            let _ = Btf::parse(&short);
        }
    }
}
