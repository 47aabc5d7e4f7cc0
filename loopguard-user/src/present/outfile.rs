//! The files loopguard writes (`--record`, `--folded`, `--html`): it may
//! run as root in a directory others can write to, so it writes only to a
//! regular file it opened without following a symbolic link (a link left
//! at the path is an error, not a way to truncate its target), never
//! blocks opening a FIFO, and creates files with mode 0644 (less the
//! umask).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Mode of a file loopguard creates (before the umask).
pub const MODE: u32 = 0o644;

/// Opens `path` for writing from its start (created, or emptied).
pub fn create(path: &Path) -> io::Result<File> {
    let file = open(path, false)?;
    file.set_len(0)?;
    Ok(file)
}

/// Opens `path` for appending (created if missing).
pub fn append(path: &Path) -> io::Result<File> {
    open(path, true)
}

fn open(path: &Path, append: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .append(append)
        .create(true)
        .mode(MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a symbolic link, and loopguard does not write through links; give the path of a regular file",
            ),
            Some(libc::ENXIO) => not_regular("a FIFO with no reader"),
            _ => error,
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(not_regular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }));
    }
    // Blocking writes from here on.
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

fn not_regular(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}; loopguard writes only regular files"),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("loopguard-outfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_symlink_at_the_path_is_refused_and_its_target_kept() {
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.join("out.html");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let error = create(&link).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert!(append(&link).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = create(&fifo).unwrap_err();
        assert!(error.to_string().contains("FIFO"), "{error}");
        let error = create(Path::new("/dev/null")).unwrap_err();
        assert!(error.to_string().contains("device"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_are_created_0644_emptied_or_appended() {
        let dir = scratch("modes");
        let path = dir.join("out");
        create(&path).unwrap().write_all(b"one\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o644, 0, "mode {mode:o}");
        append(&path).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        create(&path).unwrap().write_all(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
