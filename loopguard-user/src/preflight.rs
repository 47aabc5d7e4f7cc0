//! Preflight: checks privileges and the kernel before anything is loaded, so
//! a missing capability or an old kernel is named instead of surfacing as an
//! opaque `EPERM` or `EINVAL` from the BPF syscall.

use std::fs;

/// The oldest kernel with everything loopguard uses (BPF ring buffer: 5.8,
/// BPF cookies on uprobes: 5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "loopguard needs root or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (missing: {missing}); run it with sudo"
    )]
    Privileges { missing: String },
    #[error(
        "kernel {release} is too old: loopguard needs Linux {}.{} or later (BPF ring buffer, uprobe cookies)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
}

/// Runs every check.
pub fn check() -> Result<(), PreflightError> {
    check_privileges(&fs::read_to_string("/proc/self/status").unwrap_or_default())?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    check_kernel(release.trim())
}

/// Checks `CapEff` from the text of `/proc/self/status`.
pub fn check_privileges(status: &str) -> Result<(), PreflightError> {
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
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
        let caps = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE);
        assert!(check_privileges(&format!("CapEff:\t{caps:016x}\n")).is_ok());
    }

    #[test]
    fn an_unprivileged_user_is_told_to_use_sudo() {
        let err = check_privileges("CapEff:\t0000000000000000\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sudo") && text.contains("CAP_BPF") && text.contains("CAP_SYS_PTRACE"),
            "{text}"
        );
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
