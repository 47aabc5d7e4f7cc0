//! Reading the target's files as root without letting the target steer the
//! read.
//!
//! Every path in `/proc/PID/maps` is the target's to choose: it can delete
//! a mapped file and put a symlink to `/dev/zero`, a FIFO or a device under
//! the same name. So a mapped file is opened through the mapping itself
//! (`/proc/PID/map_files/START-END`, the inode really mapped), a path the
//! target has not mapped yet is resolved inside the target's root with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, and every open is
//! non-blocking (a FIFO cannot hold the open). What was opened must be a
//! regular file no larger than a cap, and no more than the cap is ever
//! read.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::proc::Mapping;

/// The most loopguard reads of an executable or a library it unwinds
/// through (debug builds of large services reach hundreds of MiB).
pub const MAX_EXECUTABLE_BYTES: u64 = 1 << 30;

/// The most loopguard reads of a C library (glibc is about 2 MiB).
pub const MAX_C_LIBRARY_BYTES: u64 = 64 << 20;

/// The path of the file behind one mapping of process `pid`: the kernel
/// resolves it to the inode mapped, whatever now sits under its name.
pub fn mapping_path(pid: u32, mapping: &Mapping) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    ))
}

/// Reads a file through a magic link of `/proc` (`/proc/PID/exe`,
/// `/proc/PID/map_files/…`): a regular file of at most `cap` bytes.
pub fn read_through_proc(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    read_regular(open_through_proc(path)?, cap)
}

/// Opens a magic link of `/proc` without blocking (a FIFO cannot hold the
/// open); the caller checks what it got.
pub fn open_through_proc(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
}

/// Reads the file behind one mapping of process `pid`.
pub fn read_mapping(pid: u32, mapping: &Mapping, cap: u64) -> io::Result<Vec<u8>> {
    read_through_proc(&mapping_path(pid, mapping), cap)
}

/// Reads `path` as process `pid` sees it: resolved inside its root (an
/// absolute symlink or `..` cannot leave it) and without magic links.
/// Symlinks inside the root are followed (`libc.so.6 -> libc-2.31.so` on
/// older systems); what they lead to must still be a regular file.
pub fn read_in_root(pid: u32, path: &str, cap: u64) -> io::Result<Vec<u8>> {
    let root = File::open(format!("/proc/{pid}/root"))?;
    let relative = CString::new(path.trim_start_matches('/').as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: a valid directory fd, a NUL-terminated path, and an open_how
    // of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            relative.as_ptr(),
            &raw const how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    read_regular(file, cap)
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Whether `path` exists inside process `pid`'s root, resolved as
/// [`read_in_root`] resolves it.
pub fn exists_in_root(pid: u32, path: &str) -> bool {
    match read_in_root(pid, path, 0) {
        Ok(_) => true,
        Err(error) => error.kind() == io::ErrorKind::FileTooLarge,
    }
}

/// Reads at most `cap` bytes of a regular file through `/proc` (a
/// process's `environ`, `cgroup`: their size is not known before reading,
/// and the target sets it). Returns the bytes and whether they are the
/// whole file.
pub fn read_prefix_through_proc(path: &Path, cap: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut file = open_through_proc(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file; loopguard reads only regular files",
        ));
    }
    let mut bytes = Vec::new();
    file.by_ref().take(cap + 1).read_to_end(&mut bytes)?;
    let whole = bytes.len() as u64 <= cap;
    bytes.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
    Ok((bytes, whole))
}

/// Reads an open file whole if it is a regular file of at most `cap` bytes.
pub fn read_regular(mut file: File, cap: u64) -> io::Result<Vec<u8>> {
    let metadata = file.metadata()?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is {what}, not a regular file; loopguard reads only regular files"),
        ));
    }
    if metadata.len() > cap {
        return Err(too_large(metadata.len(), cap));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // The file may grow while it is read: never past the cap.
    file.by_ref().take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_large(bytes.len() as u64, cap));
    }
    Ok(bytes)
}

fn too_large(size: u64, cap: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!(
            "it is {} MiB or more, over loopguard's limit of {} MiB",
            size >> 20,
            cap >> 20
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt as _;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("loopguard-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_regular_file_under_the_cap_is_read_whole() {
        let dir = temp_dir("regular");
        let path = dir.join("lib");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_through_proc(&path, 10).unwrap(), b"0123456789");
        let error = read_through_proc(&path, 9).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::FileTooLarge);
        assert!(error.to_string().contains("limit"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_prefix_is_read_up_to_the_cap_and_says_whether_it_is_whole() {
        let dir = temp_dir("prefix");
        let path = dir.join("environ");
        std::fs::write(&path, b"A=1\0B=2\0").unwrap();
        assert_eq!(
            read_prefix_through_proc(&path, 8).unwrap(),
            (b"A=1\0B=2\0".to_vec(), true)
        );
        assert_eq!(
            read_prefix_through_proc(&path, 5).unwrap(),
            (b"A=1\0B".to_vec(), false)
        );
        let environ = format!("/proc/{}/environ", std::process::id());
        assert!(
            !read_prefix_through_proc(Path::new(&environ), 1 << 20)
                .unwrap()
                .0
                .is_empty()
        );
        assert!(read_prefix_through_proc(Path::new("/dev/zero"), 16).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn devices_and_fifos_are_refused_without_blocking() {
        let error = read_through_proc(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(error.to_string().contains("character device"), "{error}");
        let dir = temp_dir("fifo");
        let fifo = dir.join("fifo");
        let name = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would wait for ever.
        let error = read_through_proc(&fifo, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("FIFO"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_path_in_root_cannot_follow_a_symlink_out() {
        let dir = temp_dir("symlink");
        std::os::unix::fs::symlink("/dev/zero", dir.join("libc.so.6")).unwrap();
        std::fs::write(dir.join("real"), b"elf").unwrap();
        std::os::unix::fs::symlink("real", dir.join("libc.so.7")).unwrap();
        let pid = std::process::id();
        let inside = |name: &str| format!("{}/{name}", dir.display());
        assert!(read_in_root(pid, &inside("libc.so.6"), 1 << 20).is_err());
        assert_eq!(read_in_root(pid, &inside("real"), 1 << 20).unwrap(), b"elf");
        assert_eq!(
            read_in_root(pid, &inside("libc.so.7"), 1 << 20).unwrap(),
            b"elf"
        );
        assert!(exists_in_root(pid, &inside("real")));
        assert!(!exists_in_root(pid, &inside("libc.so.6")));
        assert!(!exists_in_root(pid, &inside("missing")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
