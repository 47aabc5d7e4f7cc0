//! Preflight: checks privileges and the kernel before anything is loaded, so
//! a missing capability or an old kernel is named instead of surfacing as an
//! opaque `EPERM` or `EINVAL` from the BPF syscall.
//!
//! What the kernel really asks for: loading needs `CAP_BPF` and
//! `CAP_PERFMON` (or `CAP_SYS_ADMIN`); reading another user's
//! `/proc/PID/exe` and opening perf events on its threads need
//! `CAP_SYS_PTRACE`; resuming a process of another user that loopguard
//! stopped at exec (to attach to its new program) needs `CAP_KILL`, or it
//! stays stopped; and the uprobes themselves (the `uprobe` perf PMU) need
//! `CAP_SYS_ADMIN` on current kernels: `CAP_PERFMON` was enough from Linux
//! 5.8 until a 2025 fix (backported to stable kernels) took it back. So
//! without `CAP_SYS_ADMIN` preflight asks the kernel: it opens a uprobe perf
//! event with an empty path, which the PMU refuses with `EACCES` before it
//! looks at the path when the capability is lacking, and with another error
//! (no such file) when it is not. No probe is ever created.

use std::fs;

/// The oldest kernel with everything loopguard uses (BPF ring buffer: 5.8,
/// BPF cookies on uprobes: 5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

const CAP_KILL: u32 = 5;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "loopguard needs root, or the capabilities CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_KILL (missing: {missing}); run it with sudo, or `setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep` on the loopguard binary (then everyone who can execute the binary can watch any process on the host, read its memory and stop it at exec: limit it to a group, `chgrp loopguard-users loopguard && chmod 750 loopguard`)"
    )]
    Privileges { missing: String },
    #[error(
        "this kernel lets only CAP_SYS_ADMIN create uprobes (CAP_BPF and CAP_PERFMON are not enough since Linux's 2025 fix); run loopguard with sudo, or give it `setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep` (then everyone who can execute the binary can watch any process on the host, read its memory and stop it at exec: limit it to a group, `chgrp loopguard-users loopguard && chmod 750 loopguard`)"
    )]
    UprobesNeedSysAdmin,
    #[error(
        "kernel {release} is too old: loopguard needs Linux {}.{} or later (BPF ring buffer, uprobe cookies)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
}

/// Runs every check.
pub fn check() -> Result<(), PreflightError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    check_privileges(&status)?;
    if effective_caps(&status) & (1 << CAP_SYS_ADMIN) == 0 {
        check_uprobe_access(try_uprobe_pmu())?;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    check_kernel(release.trim())
}

/// What the kernel answered a trial uprobe perf event: `EACCES` means the
/// capability it wants is missing; anything else (no such file, or a PMU
/// the kernel lacks, which loading will name) is not about privileges.
pub fn check_uprobe_access(trial: Result<(), i32>) -> Result<(), PreflightError> {
    match trial {
        Err(errno) if errno == libc::EACCES || errno == libc::EPERM => {
            Err(PreflightError::UprobesNeedSysAdmin)
        }
        _ => Ok(()),
    }
}

/// Opens a uprobe perf event on this process with an empty path: refused
/// with `EACCES` by a PMU that wants more privileges, before the path is
/// looked at; `ENOENT` (or similar) otherwise. Never creates a probe.
fn try_uprobe_pmu() -> Result<(), i32> {
    /// `PERF_FLAG_FD_CLOEXEC` of `<linux/perf_event.h>`.
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    let Some(pmu_type) = fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
    else {
        return Ok(());
    };
    let path = c"";
    // `struct perf_event_attr` up to `config2` (PERF_ATTR_SIZE_VER1, 72 bytes).
    let mut attr = [0u8; 72];
    attr[0..4].copy_from_slice(&pmu_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&72u32.to_ne_bytes());
    // flags: disabled (bit 0).
    attr[40..48].copy_from_slice(&1u64.to_ne_bytes());
    // config1: the path, config2: the offset (0).
    attr[56..64].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a valid, fully initialised perf_event_attr of the size
    // it declares; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// Checks `CapEff` from the text of `/proc/self/status`.
pub fn check_privileges(status: &str) -> Result<(), PreflightError> {
    let effective = effective_caps(status);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_BPF with CAP_PERFMON stand in for CAP_SYS_ADMIN on kernels that
    // still allow uprobes to CAP_PERFMON; `check` asks the kernel.
    let may_load = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if !may_load {
        missing.push("CAP_SYS_ADMIN");
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    // Without it, SIGCONT reaches another user's process only in our own
    // session: a watched process that execs would be left stopped.
    if !has(CAP_KILL) {
        missing.push("CAP_KILL");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Checks a kernel release string such as `6.18.44-fc`.
pub fn check_kernel(release: &str) -> Result<(), PreflightError> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL => Ok(()),
        // An unreadable release is not worth refusing over; loading will tell.
        (None, _) | (_, None) => Ok(()),
        _ => Err(PreflightError::KernelTooOld {
            release: release.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_passes() {
        assert!(check_privileges("Name:\tx\nCapEff:\t000001ffffffffff\n").is_ok());
    }

    #[test]
    fn bpf_perfmon_ptrace_without_sys_admin_pass() {
        let caps = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE) | (1 << CAP_KILL);
        assert!(check_privileges(&format!("CapEff:\t{caps:016x}\n")).is_ok());
        // The set once documented, without CAP_KILL: a process stopped at
        // exec could not be resumed.
        let caps = (1u64 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE);
        let text = check_privileges(&format!("CapEff:\t{caps:016x}\n"))
            .unwrap_err()
            .to_string();
        assert!(text.contains("missing: CAP_KILL"), "{text}");
    }

    #[test]
    fn an_unprivileged_user_is_told_to_use_sudo() {
        let err = check_privileges("CapEff:\t0000000000000000\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sudo")
                && text.contains("missing: CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_KILL")
                && text.contains("setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep"),
            "{text}"
        );
    }

    #[test]
    fn a_kernel_that_refuses_uprobes_to_perfmon_asks_for_sys_admin() {
        let text = check_uprobe_access(Err(libc::EACCES))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("CAP_SYS_ADMIN")
                && text.contains("setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep"),
            "{text}"
        );
        assert!(check_uprobe_access(Err(libc::ENOENT)).is_ok());
        assert!(check_uprobe_access(Err(libc::EINVAL)).is_ok());
        assert!(check_uprobe_access(Ok(())).is_ok());
    }

    #[test]
    fn the_trial_uprobe_asks_the_kernel_without_creating_a_probe() {
        // As root (the tests' usual case) the PMU accepts the caller and
        // then fails on the empty path; unprivileged, it refuses first.
        if std::path::Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
            assert_ne!(
                try_uprobe_pmu(),
                Ok(()),
                "an empty path must never make a probe"
            );
        }
    }

    #[test]
    fn kernel_versions() {
        assert!(check_kernel("6.18.44-fc-v669").is_ok());
        assert!(check_kernel("5.15.0").is_ok());
        let err = check_kernel("5.4.0-100-generic").unwrap_err();
        assert!(err.to_string().contains("5.15"), "{err}");
        assert!(check_kernel("").is_ok());
    }
}
