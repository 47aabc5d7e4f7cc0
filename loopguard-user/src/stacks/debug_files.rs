//! The files blazesym opens by path when it reads DWARF, and whether the
//! target has put something there that would hang or steer the agent.
//!
//! For every module it symbolizes with debug info on, blazesym opens
//! `MODULE.dwp` (a DWARF package) beside the path the maps name, and, for a
//! module with a `.gnu_debuglink`, the named file beside the module's
//! canonical path and under the debug directories. It opens them blocking,
//! in the agent's mount namespace, following symlinks: a FIFO there holds
//! the agent in `open` for good, and a link name with a `/` or `..` leads
//! anywhere. Those paths are the target's to choose (its executable's
//! directory is often its own), so before each symbolization the agent
//! looks at every one of them, and reads DWARF only when none is anything
//! but a regular file or absent. Otherwise frames keep their symbol names
//! without `file:line`, and the agent says why once.
//!
//! What remains: a target racing a FIFO in between the check and
//! blazesym's open. The check runs right before each symbolization, which
//! happens only when a stall is reported.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::discover::files::{mapping_path, open_through_proc};
use crate::discover::proc::{Mapping, read_maps};

/// Where blazesym looks for separate debug files (its default list).
const DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];

/// The most bytes of a `.gnu_debuglink` section read (a name and a CRC).
const MAX_LINK_BYTES: u64 = 4096;

/// The debug link names of the modules seen, by mapping.
#[derive(Default)]
pub struct DebugFiles {
    links: HashMap<(u64, u64, String), Option<Vec<u8>>>,
}

impl DebugFiles {
    /// Why reading DWARF for process `pid` now could make the agent open
    /// a file that is not a regular file, or one outside the usual places;
    /// `None` when it is safe.
    pub fn hazard(&mut self, pid: u32) -> Option<String> {
        let maps = match read_maps(pid) {
            Ok(maps) => maps,
            Err(error) => return Some(format!("cannot read /proc/{pid}/maps: {error}")),
        };
        let mut seen = std::collections::HashSet::new();
        for mapping in maps
            .iter()
            .filter(|m| m.executable && m.path.starts_with('/'))
        {
            if !seen.insert(mapping.path.clone()) {
                continue;
            }
            let key = (mapping.start, mapping.end, mapping.path.clone());
            let link = self
                .links
                .entry(key)
                .or_insert_with(|| debug_link(pid, mapping).ok().flatten())
                .clone();
            if let Some(why) = module_hazard(Path::new(&mapping.path), link.as_deref()) {
                return Some(why);
            }
        }
        None
    }
}

/// The `.gnu_debuglink` name of the file behind `mapping`, read through the
/// mapping itself (only the headers and that section).
fn debug_link(pid: u32, mapping: &Mapping) -> io::Result<Option<Vec<u8>>> {
    let file = open_through_proc(&mapping_path(pid, mapping))?;
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return Ok(None);
    };
    let Some(section) = elf.section_by_name(".gnu_debuglink") else {
        return Ok(None);
    };
    if section.size() > MAX_LINK_BYTES {
        return Ok(Some(b"/oversized .gnu_debuglink".to_vec()));
    }
    let data = section.data().unwrap_or_default();
    let name = data.split(|&b| b == 0).next().unwrap_or_default();
    Ok(Some(name.to_vec()))
}

/// Whether a debug link name can only name a file in the directory it is
/// joined to: not empty, no `/`, not `.` or `..`.
pub fn plain_name(link: &[u8]) -> bool {
    !link.is_empty() && link != b"." && link != b".." && !link.contains(&b'/')
}

/// Whether `path` exists as something other than a regular file (after
/// symlinks): a FIFO, a device, a socket or a directory.
fn not_regular(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| !meta.is_file())
}

/// The paths blazesym may open for a module mapped from `module` with
/// debug link `link` (a plain name), besides the module itself.
pub fn link_candidates(canonical_module: &Path, link: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let dir = canonical_module.parent().unwrap_or(Path::new("/"));
    paths.push(dir.join(link));
    let relative = dir.strip_prefix("/").unwrap_or(dir);
    for debug_dir in DEBUG_DIRS {
        paths.push(Path::new(debug_dir).join(link));
        let mut sub = Some(relative);
        while let Some(part) = sub.filter(|p| !p.as_os_str().is_empty()) {
            paths.push(Path::new(debug_dir).join(part).join(link));
            sub = part.parent();
        }
    }
    paths
}

fn module_hazard(module: &Path, link: Option<&[u8]>) -> Option<String> {
    let shown = crate::term::printable(&module.display().to_string()).into_owned();
    let mut dwp = module.as_os_str().to_owned();
    dwp.push(".dwp");
    if not_regular(Path::new(&dwp)) {
        return Some(format!("{shown}.dwp is not a regular file"));
    }
    let link = link?;
    if not_regular(module) {
        return Some(format!("{shown} is no longer a regular file"));
    }
    if !plain_name(link) {
        return Some(format!(
            "{shown} names a debug file that is not a plain file name ({})",
            crate::term::printable(&String::from_utf8_lossy(link))
        ));
    }
    let canonical = fs::canonicalize(module).unwrap_or_else(|_| module.to_path_buf());
    // The bytes as blazesym joins them: a name that is not UTF-8 names a
    // file too.
    let link = Path::new(std::ffi::OsStr::from_bytes(link));
    link_candidates(&canonical, link)
        .into_iter()
        .find(|path| not_regular(path))
        .map(|path| {
            format!(
                "its debug file {} is not a regular file",
                crate::term::printable(&path.display().to_string())
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_name_is_a_plain_name() {
        assert!(plain_name(b"service.debug"));
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"/dev/zero",
            b"../../tmp/fifo",
            b"a/b",
        ] {
            assert!(!plain_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_link_is_looked_for_beside_the_module_and_under_the_debug_dirs() {
        let paths = link_candidates(Path::new("/srv/app/bin/service"), Path::new("s.debug"));
        for expected in [
            "/srv/app/bin/s.debug",
            "/usr/lib/debug/s.debug",
            "/usr/lib/debug/srv/app/bin/s.debug",
            "/usr/lib/debug/srv/s.debug",
            "/lib/debug/srv/app/s.debug",
        ] {
            assert!(
                paths.iter().any(|p| p == Path::new(expected)),
                "{expected} in {paths:?}"
            );
        }
    }

    #[test]
    fn a_fifo_beside_a_module_is_a_hazard_and_a_regular_file_is_not() {
        let dir = std::env::temp_dir().join(format!("loopguard-dwp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let module = dir.join("service");
        fs::write(&module, b"\x7fELF").unwrap();
        assert_eq!(module_hazard(&module, None), None);
        assert_eq!(module_hazard(&module, Some(b"service.debug")), None);

        let fifo = dir.join("service.dwp");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let why = module_hazard(&module, None).expect("a FIFO .dwp is a hazard");
        assert!(why.contains("service.dwp"), "{why}");
        fs::remove_file(&fifo).unwrap();

        std::os::unix::fs::symlink("/dev/zero", dir.join("service.debug")).unwrap();
        assert!(module_hazard(&module, Some(b"service.debug")).is_some());
        assert!(module_hazard(&module, Some(b"/dev/zero")).is_some());
        assert_eq!(module_hazard(&module, Some(b"other.debug")), None);
        // A name that is not UTF-8 is looked at as the bytes it is.
        let odd = std::ffi::OsStr::from_bytes(b"svc\xff.debug");
        std::os::unix::fs::symlink("/dev/zero", dir.join(odd)).unwrap();
        assert!(module_hazard(&module, Some(b"svc\xff.debug")).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }
}
