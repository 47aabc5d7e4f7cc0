//! Who `loopguard run` starts its command as.
//!
//! loopguard needs root to attach, the command does not: under `sudo` the
//! command runs as the user who ran sudo (`SUDO_UID`, `SUDO_GID`, and that
//! user's groups), `--user NAME|UID` names another, and `--as-root` keeps
//! root. Without sudo, the command runs as whoever runs loopguard.

use std::ffi::{CStr, CString};
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum RunAsError {
    #[error("no user `{user}` on this system; give `--user` an existing name or numeric uid")]
    UnknownUser { user: String },
    #[error(
        "{var}={value} is not a numeric id; fix the environment, or say who runs the command with `--user NAME` (or `--as-root`)"
    )]
    BadSudoId { var: &'static str, value: String },
    #[error(
        "`--user` needs loopguard to run as root (it is uid {euid}); start it with sudo, or drop `--user`"
    )]
    NotRoot { euid: u32 },
    #[error("failed to look up the groups of user `{user}`")]
    Groups {
        user: String,
        #[source]
        source: io::Error,
    },
}

/// An identity to switch to between fork and exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Login name and home directory, for `USER`, `LOGNAME` and `HOME`.
    pub name: Option<String>,
    pub home: Option<String>,
}

/// Where the identity comes from, decided from the flags and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// As loopguard itself runs.
    Unchanged,
    /// `--user`: a name or a numeric uid.
    User(String),
    /// `sudo`'s invoking user.
    Sudo { uid: u32, gid: u32 },
}

/// Decides who runs the command: `--as-root` keeps loopguard's own
/// identity, `--user` names one, and under sudo (root, with `SUDO_UID`) the
/// user who ran sudo.
pub fn choose(
    user: Option<&str>,
    as_root: bool,
    euid: u32,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Choice, RunAsError> {
    if as_root {
        return Ok(Choice::Unchanged);
    }
    if let Some(user) = user {
        if euid != 0 {
            return Err(RunAsError::NotRoot { euid });
        }
        return Ok(Choice::User(user.to_owned()));
    }
    if euid != 0 {
        return Ok(Choice::Unchanged);
    }
    let Some(uid) = env("SUDO_UID") else {
        return Ok(Choice::Unchanged);
    };
    let id = |var: &'static str, value: String| {
        value
            .trim()
            .parse::<u32>()
            .map_err(|_| RunAsError::BadSudoId { var, value })
    };
    let uid = id("SUDO_UID", uid)?;
    let gid = match env("SUDO_GID") {
        Some(gid) => id("SUDO_GID", gid)?,
        None => uid,
    };
    if uid == 0 {
        // sudo run by root itself.
        return Ok(Choice::Unchanged);
    }
    Ok(Choice::Sudo { uid, gid })
}

/// Who runs `run`'s command: [`choose`] from the flags, this process's
/// effective uid and the environment, then [`resolve`].
pub fn command_identity(user: Option<&str>, as_root: bool) -> Result<Option<RunAs>, RunAsError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let choice = choose(user, as_root, euid, |var| std::env::var(var).ok())?;
    let run_as = resolve(&choice)?;
    if let Some(run_as) = &run_as {
        tracing::info!(
            uid = run_as.uid,
            gid = run_as.gid,
            "the command runs as uid {}",
            run_as.uid
        );
    }
    Ok(run_as)
}

/// The identity of a choice, looked up in the user database.
pub fn resolve(choice: &Choice) -> Result<Option<RunAs>, RunAsError> {
    match choice {
        Choice::Unchanged => Ok(None),
        Choice::Sudo { uid, gid } => {
            let entry = Passwd::by_uid(*uid);
            let groups = match &entry {
                Some(entry) => group_list(&entry.name, *gid)?,
                None => vec![*gid],
            };
            Ok(Some(RunAs {
                uid: *uid,
                gid: *gid,
                groups,
                name: entry.as_ref().map(|e| e.name.clone()),
                home: entry.map(|e| e.home),
            }))
        }
        Choice::User(user) => {
            let entry =
                Passwd::by_name(user).or_else(|| user.parse().ok().and_then(Passwd::by_uid));
            match entry {
                Some(entry) => Ok(Some(RunAs {
                    uid: entry.uid,
                    gid: entry.gid,
                    groups: group_list(&entry.name, entry.gid)?,
                    name: Some(entry.name),
                    home: Some(entry.home),
                })),
                // A bare uid with no entry: its own group, no others.
                None => match user.parse::<u32>() {
                    Ok(uid) => Ok(Some(RunAs {
                        uid,
                        gid: uid,
                        groups: vec![uid],
                        name: None,
                        home: None,
                    })),
                    Err(_) => Err(RunAsError::UnknownUser { user: user.clone() }),
                },
            }
        }
    }
}

impl RunAs {
    /// Switches the calling process to this identity: groups, then gid,
    /// then uid (real, effective and saved). Only async-signal-safe system
    /// calls: this runs between fork and exec.
    pub fn switch(&self) -> io::Result<()> {
        let groups: &[libc::gid_t] = &self.groups;
        // SAFETY: plain system calls on this process's credentials, with a
        // valid pointer and length.
        unsafe {
            if libc::setgroups(groups.len(), groups.as_ptr()) == -1
                || libc::setresgid(self.gid, self.gid, self.gid) == -1
                || libc::setresuid(self.uid, self.uid, self.uid) == -1
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

impl Passwd {
    fn by_name(name: &str) -> Option<Self> {
        let name = CString::new(name).ok()?;
        Self::lookup(|pwd, buf, len, result| {
            // SAFETY: valid pointers and the buffer's length.
            unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf, len, result) }
        })
    }

    fn by_uid(uid: u32) -> Option<Self> {
        Self::lookup(|pwd, buf, len, result| {
            // SAFETY: valid pointers and the buffer's length.
            unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
        })
    }

    fn lookup(
        call: impl Fn(
            *mut libc::passwd,
            *mut libc::c_char,
            usize,
            *mut *mut libc::passwd,
        ) -> libc::c_int,
    ) -> Option<Self> {
        let mut buffer = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: an all-zero passwd is valid; the call fills it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        let code = call(
            &raw mut pwd,
            buffer.as_mut_ptr(),
            buffer.len(),
            &raw mut result,
        );
        if code != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success the strings point into `buffer`, NUL-terminated.
        let text = |ptr: *const libc::c_char| {
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        };
        Some(Self {
            name: text(pwd.pw_name),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: text(pwd.pw_dir),
        })
    }
}

/// The groups of user `name` with primary group `gid`, from the group
/// database.
fn group_list(name: &str, gid: u32) -> Result<Vec<u32>, RunAsError> {
    let failed = |source| RunAsError::Groups {
        user: name.to_owned(),
        source,
    };
    let user = CString::new(name).map_err(|e| failed(io::Error::other(e)))?;
    let mut count: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; usize::try_from(count).unwrap_or(64)];
        let mut found = count;
        // SAFETY: a buffer of `found` entries; the call says how many it needs.
        let code =
            unsafe { libc::getgrouplist(user.as_ptr(), gid, groups.as_mut_ptr(), &raw mut found) };
        if code >= 0 {
            groups.truncate(usize::try_from(found).unwrap_or(0));
            return Ok(groups);
        }
        if found <= count || found > 65_536 {
            return Err(failed(io::Error::other("getgrouplist failed")));
        }
        count = found;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn under_sudo_the_command_runs_as_the_invoking_user() {
        let sudo = [("SUDO_UID", "1000"), ("SUDO_GID", "1001")];
        assert_eq!(
            choose(None, false, 0, env(&sudo)).unwrap(),
            Choice::Sudo {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(
            choose(None, true, 0, env(&sudo)).unwrap(),
            Choice::Unchanged,
            "--as-root keeps root"
        );
        assert_eq!(
            choose(Some("nobody"), false, 0, env(&sudo)).unwrap(),
            Choice::User("nobody".into()),
            "--user wins over sudo"
        );
        // Root without sudo, or sudo by root: root is who invoked it.
        assert_eq!(choose(None, false, 0, env(&[])).unwrap(), Choice::Unchanged);
        assert_eq!(
            choose(None, false, 0, env(&[("SUDO_UID", "0")])).unwrap(),
            Choice::Unchanged
        );
        // Not root (setcap): the command runs as the caller anyway.
        assert_eq!(
            choose(None, false, 1000, env(&sudo)).unwrap(),
            Choice::Unchanged
        );
    }

    #[test]
    fn bad_ids_and_impossible_switches_are_errors_with_the_fix() {
        let error = choose(None, false, 0, env(&[("SUDO_UID", "x")])).unwrap_err();
        assert!(error.to_string().contains("--user"), "{error}");
        let error = choose(Some("nobody"), false, 1000, env(&[])).unwrap_err();
        assert!(error.to_string().contains("sudo"), "{error}");
        let error = resolve(&Choice::User("no-such-user-loopguard".into())).unwrap_err();
        assert!(error.to_string().contains("no user"), "{error}");
    }

    #[test]
    fn users_resolve_by_name_and_by_uid() {
        let root = resolve(&Choice::User("root".into())).unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.name.as_deref(), Some("root"));
        let bare = resolve(&Choice::User("4242424".into())).unwrap().unwrap();
        assert_eq!(
            (bare.uid, bare.gid, bare.groups),
            (4_242_424, 4_242_424, vec![4_242_424])
        );
    }
}
