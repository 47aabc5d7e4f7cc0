//! The probes end up as `.note.stapsdt` ELF notes in a binary that uses
//! them, with the provider, names and argument counts of the contract.

#![cfg(target_os = "linux")]

use loopguard_middleware::{
    PROVIDER, REQUEST_END, REQUEST_END_ARGS, REQUEST_START, REQUEST_START_ARGS, RequestGuard,
    next_request_id, request_end, request_start,
};
use loopguard_usdt as usdt;
use object::{Object, ObjectSection};

/// `NT_STAPSDT`.
const NOTE_TYPE: u32 = 3;

#[derive(Debug)]
struct SdtNote {
    pc: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: Vec<String>,
}

fn align4(n: usize) -> usize {
    n.next_multiple_of(4)
}

fn u32_at(data: &[u8], at: usize, little: bool) -> u32 {
    let bytes: [u8; 4] = data[at..at + 4].try_into().unwrap();
    if little {
        u32::from_le_bytes(bytes)
    } else {
        u32::from_be_bytes(bytes)
    }
}

fn u64_at(data: &[u8], at: usize, little: bool) -> u64 {
    let bytes: [u8; 8] = data[at..at + 8].try_into().unwrap();
    if little {
        u64::from_le_bytes(bytes)
    } else {
        u64::from_be_bytes(bytes)
    }
}

/// Splits off one NUL-terminated string.
fn c_str(data: &[u8]) -> (String, &[u8]) {
    let nul = data
        .iter()
        .position(|&b| b == 0)
        .expect("NUL-terminated string");
    (
        String::from_utf8(data[..nul].to_vec()).unwrap(),
        &data[nul + 1..],
    )
}

/// The stapsdt notes of a 64-bit ELF section's contents.
fn parse_notes(section: &[u8], little: bool) -> Vec<SdtNote> {
    let mut notes = Vec::new();
    let mut at = 0;
    while at + 12 <= section.len() {
        let namesz = u32_at(section, at, little) as usize;
        let descsz = u32_at(section, at + 4, little) as usize;
        let kind = u32_at(section, at + 8, little);
        let name_at = at + 12;
        let desc_at = name_at + align4(namesz);
        let owner = &section[name_at..name_at + namesz];
        let desc = &section[desc_at..desc_at + descsz];
        at = desc_at + align4(descsz);
        if owner != b"stapsdt\0" || kind != NOTE_TYPE {
            continue;
        }
        // pc, link-time address of `_.stapsdt.base`, semaphore address.
        let pc = u64_at(desc, 0, little);
        let semaphore = u64_at(desc, 16, little);
        let (provider, rest) = c_str(&desc[24..]);
        let (name, rest) = c_str(rest);
        let (args, _) = c_str(rest);
        notes.push(SdtNote {
            pc,
            semaphore,
            provider,
            name,
            args: args.split_whitespace().map(str::to_owned).collect(),
        });
    }
    notes
}

#[test]
fn binary_has_the_probe_notes() {
    // Use the probes, so that they are linked into this test binary.
    let id = next_request_id();
    request_start(id, "GET", Some("/users/{id}"), "/users/1");
    request_end(id, 200);
    request_start(next_request_id(), "GET", None, "/");
    drop(RequestGuard::start("POST", None, "/x"));

    let exe = std::fs::read("/proc/self/exe").unwrap();
    let file = object::File::parse(&*exe).unwrap();
    assert!(file.is_64(), "the test parses 64-bit notes only");
    let section = file
        .section_by_name(".note.stapsdt")
        .expect("no .note.stapsdt section");
    let notes = parse_notes(section.data().unwrap(), file.is_little_endian());
    let ours: Vec<&SdtNote> = notes.iter().filter(|n| n.provider == PROVIDER).collect();

    for (name, count) in [
        (REQUEST_START, REQUEST_START_ARGS),
        (REQUEST_END, REQUEST_END_ARGS),
    ] {
        let sites: Vec<&&SdtNote> = ours.iter().filter(|n| n.name == name).collect();
        assert!(!sites.is_empty(), "no {PROVIDER}:{name} note in {notes:?}");
        for note in sites {
            assert_eq!(note.args.len(), count, "{note:?}");
            assert!(
                note.args.iter().all(|a| a.starts_with("-8@")),
                "every argument is 8 bytes wide: {note:?}"
            );
            assert_ne!(note.pc, 0, "{note:?}");
            assert_eq!(note.semaphore, 0, "no semaphore: {note:?}");
        }
    }
    let tables: Vec<&&SdtNote> = ours
        .iter()
        .filter(|n| n.name == usdt::INFLIGHT_TABLE)
        .collect();
    assert!(!tables.is_empty(), "no in-flight table note in {notes:?}");
    for table in tables {
        assert_ne!(table.semaphore, 0, "the table's address: {table:?}");
        assert_eq!(
            table.args,
            [
                usdt::INFLIGHT_VERSION.to_string(),
                usdt::INFLIGHT_SLOTS.to_string(),
                usdt::INFLIGHT_SLOT_BYTES.to_string()
            ],
            "{table:?}"
        );
    }
    assert!(
        ours.iter()
            .all(|n| [REQUEST_START, REQUEST_END, usdt::INFLIGHT_TABLE].contains(&n.name.as_str())),
        "unexpected probes: {ours:?}"
    );
}
