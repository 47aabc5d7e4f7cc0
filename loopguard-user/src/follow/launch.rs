//! Launch: starts the command of `loopguard run` stopped right after `exec`,
//! so the probes are in place before its first instruction runs.
//!
//! The child asks to be traced (`PTRACE_TRACEME`) before `exec`; the kernel
//! then stops it with `SIGTRAP` once the new program is mapped. loopguard
//! attaches, then detaches from ptrace and the program starts normally. The
//! child gets a process group of its own, so a terminal's Ctrl+C reaches
//! loopguard only, which forwards it once; and it is killed if loopguard
//! dies (`PR_SET_PDEATHSIG`), so a killed loopguard never leaves its
//! command running unwatched, out of reach of the terminal.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use crate::config::run_as::RunAs;
pub use crate::error::LaunchError;

/// A child stopped right after `exec`.
pub struct StoppedChild {
    pub child: Child,
    program: String,
}

/// Starts `command` (as `run_as`, if given), stopped after `exec`.
pub fn launch_stopped(
    command: &[OsString],
    run_as: Option<&RunAs>,
) -> Result<StoppedChild, LaunchError> {
    let program = command[0].to_string_lossy().into_owned();
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    let run_as = run_as.cloned();
    if let Some(run_as) = &run_as {
        user_env(&mut cmd, run_as);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            // First: a change of credentials clears the parent-death signal.
            if let Some(run_as) = &run_as {
                run_as.switch()?;
            }
            // No capability of loopguard's passes to the command through
            // the ambient set (setpriv, systemd's AmbientCapabilities=).
            if let Err(errno) = crate::privilege::clear_ambient() {
                return Err(io::Error::from_raw_os_error(errno));
            }
            // Die with loopguard (with the thread that forked, which is the
            // one that waits for the command until loopguard exits).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // loopguard died before the line above took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setpgid(0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        program: program.clone(),
        source,
    })?;
    if let Err(detail) = wait_for_stop(child.id() as libc::pid_t) {
        return Err(LaunchError::NoStop { program, detail });
    }
    Ok(StoppedChild { child, program })
}

/// The environment that names the user the command runs as.
fn user_env(cmd: &mut Command, run_as: &RunAs) {
    for var in ["USER", "LOGNAME"] {
        match &run_as.name {
            Some(name) => cmd.env(var, name),
            None => cmd.env_remove(var),
        };
    }
    if let Some(home) = &run_as.home {
        cmd.env("HOME", home);
    }
}

/// Waits for child `pid` to stop at its `exec` (`PTRACE_TRACEME`'s
/// `SIGTRAP`); else why it did not.
fn wait_for_stop(pid: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    // SAFETY: waiting on our own child.
    let waited = unsafe { libc::waitpid(pid, &raw mut status, 0) };
    if waited != pid || !libc::WIFSTOPPED(status) || libc::WSTOPSIG(status) != libc::SIGTRAP {
        return Err(if waited == pid && libc::WIFEXITED(status) {
            format!("it exited with code {}", libc::WEXITSTATUS(status))
        } else {
            format!("wait status {status:#x}")
        });
    }
    Ok(())
}

impl StoppedChild {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the program run, once loopguard's queued lines (the `attached`
    /// one) are out: they come before its own.
    pub fn resume(self) -> Result<Child, LaunchError> {
        crate::present::output::before_resume();
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: detaching from our own stopped tracee.
        if unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) } == -1 {
            return Err(LaunchError::Resume {
                program: self.program,
                pid: self.child.id(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(self.child)
    }
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_stops_after_exec_and_runs_after_resume() {
        let stopped = launch_stopped(&["sh".into(), "-c".into(), "exit 7".into()], None).unwrap();
        // Stopped: it cannot have exited yet.
        let exe = std::fs::read_link(format!("/proc/{}/exe", stopped.pid())).unwrap();
        assert!(
            exe.to_string_lossy().contains("sh") || exe.to_string_lossy().contains("dash"),
            "{exe:?}"
        );
        let mut child = stopped.resume().unwrap();
        assert_eq!(exit_code(child.wait().unwrap()), 7);
    }

    #[test]
    fn a_missing_program_is_named() {
        let Err(err) = launch_stopped(&["/nonexistent/loopguard-test".into()], None) else {
            panic!("a missing program started");
        };
        assert!(
            err.to_string().contains("/nonexistent/loopguard-test"),
            "{err}"
        );
    }
}
