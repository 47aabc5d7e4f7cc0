//! Privileges: the capabilities loopguard keeps once its command is set up,
//! and the drop of all the others.
//!
//! What the watch still needs, whatever the command (`attach` re-attaches
//! when its target execs, `run` attaches to every program it follows):
//! `CAP_SYS_ADMIN` (uprobe perf events on current kernels, and
//! `/proc/PID/map_files/`), `CAP_BPF` and `CAP_PERFMON` (loading programs,
//! perf events on stuck threads), `CAP_SYS_PTRACE` (another user's
//! `/proc/PID/{exe,root,maps,mem}` and `process_vm_readv` for stacks and
//! Python frames), `CAP_DAC_READ_SEARCH` (reading a target's files that
//! only their owner may read), `CAP_KILL` (resuming a process of another
//! user stopped at exec, forwarding `run`'s signals) and
//! `CAP_CHECKPOINT_RESTORE` (`map_files`, where it replaces `CAP_SYS_ADMIN`).
//! Reading BPF maps and ring buffers through descriptors already held, and
//! detaching (closing them), need nothing. Everything else goes: setuid and
//! setgid (`run`'s command is started by then), binding and network
//! administration (the `/metrics` socket is bound), writing through file
//! permissions, modules, raw I/O, and so on.
//!
//! The drop removes the others from the effective, permitted and
//! inheritable sets, clears the ambient set, shrinks the bounding set (when
//! `CAP_SETPCAP` allows) and sets `no_new_privs`. All of these belong to a
//! thread, not the process, so every thread is made to run the same system
//! calls: a signal handler does it on each thread, and the threads are
//! checked through `/proc/self/task/TID/status` until every one is
//! restricted (a thread started by a thread not yet restricted is caught by
//! the next round).

use std::fs;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_KILL: u32 = 5;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_MODULE: u32 = 16;
pub const CAP_SYS_RAWIO: u32 = 17;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;
pub const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// A set of capabilities, bit N for capability N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub const fn of(caps: &[u32]) -> Self {
        let mut bits = 0;
        let mut i = 0;
        while i < caps.len() {
            bits |= 1 << caps[i];
            i += 1;
        }
        Self(bits)
    }

    pub const fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }

    /// Whether every capability of `self` is in `other`.
    pub const fn within(self, other: Self) -> bool {
        self.0 & !other.0 == 0
    }
}

/// What `attach` and `run` keep once `run`'s command is started: what
/// attaching to a process needs (again after an exec, or to a child found
/// by following), reading its memory and files, and resuming it.
pub const WATCH: CapSet = CapSet::of(&[
    CAP_DAC_READ_SEARCH,
    CAP_KILL,
    CAP_SYS_PTRACE,
    CAP_SYS_ADMIN,
    CAP_PERFMON,
    CAP_BPF,
    CAP_CHECKPOINT_RESTORE,
]);

/// What `report` keeps: reading the recording and writing the page where
/// the user who ran it said, as before.
pub const FILES: CapSet = CapSet::of(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]);

/// What the watchdog keeps: sending `SIGCONT` to what loopguard stopped
/// (its map is read through a descriptor, which needs nothing).
pub const WATCHDOG: CapSet = CapSet::of(&[CAP_KILL]);

/// The capability state of one thread, as `/proc/.../status` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCaps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl ThreadCaps {
    /// Parses the text of a `status` file; `None` when a line is missing.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let hex = |name: &str| field(name).and_then(|v| u64::from_str_radix(v, 16).ok());
        Some(Self {
            inheritable: hex("CapInh")?,
            permitted: hex("CapPrm")?,
            effective: hex("CapEff")?,
            bounding: hex("CapBnd")?,
            ambient: hex("CapAmb").unwrap_or(0),
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }

    /// Whether this thread holds nothing outside `keep` (its bounding set
    /// too, when `bounding`), and cannot gain privileges by exec.
    pub fn restricted_to(&self, keep: CapSet, bounding: bool) -> bool {
        CapSet(self.permitted).within(keep)
            && CapSet(self.effective).within(keep)
            && self.inheritable == 0
            && self.ambient == 0
            && self.no_new_privs
            && (!bounding || CapSet(self.bounding).within(keep))
    }
}

/// The name of a capability, for messages.
pub fn cap_name(cap: u32) -> String {
    let name = match cap {
        0 => "chown",
        CAP_DAC_OVERRIDE => "dac_override",
        CAP_DAC_READ_SEARCH => "dac_read_search",
        3 => "fowner",
        4 => "fsetid",
        CAP_KILL => "kill",
        CAP_SETGID => "setgid",
        CAP_SETUID => "setuid",
        CAP_SETPCAP => "setpcap",
        CAP_NET_BIND_SERVICE => "net_bind_service",
        CAP_NET_ADMIN => "net_admin",
        13 => "net_raw",
        CAP_SYS_MODULE => "sys_module",
        CAP_SYS_RAWIO => "sys_rawio",
        CAP_SYS_PTRACE => "sys_ptrace",
        CAP_SYS_ADMIN => "sys_admin",
        24 => "sys_resource",
        CAP_PERFMON => "perfmon",
        CAP_BPF => "bpf",
        CAP_CHECKPOINT_RESTORE => "checkpoint_restore",
        other => return format!("cap_{other}"),
    };
    format!("cap_{name}")
}

/// The names of the capabilities in `set`, comma-separated.
pub fn names(set: CapSet) -> String {
    let names: Vec<String> = (0..64).filter(|&c| set.has(c)).map(cap_name).collect();
    names.join(",")
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("failed to drop capabilities: {call} failed")]
    Call {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to drop capabilities: thread {tid} still holds some after {rounds} rounds")]
    Straggler { tid: u32, rounds: u32 },
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAPBSET_DROP: libc::c_int = 24;
const PR_SET_NO_NEW_PRIVS: libc::c_int = 38;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

fn errno() -> i32 {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// The calling thread's effective set.
fn effective_now() -> io::Result<CapSet> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and two data records, as capget(2) wants.
    let done = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if done == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(CapSet(
        u64::from(data[0].effective) | (u64::from(data[1].effective) << 32),
    ))
}

/// Empties the calling thread's ambient set, so an exec passes none of
/// its capabilities on. A raw system call: safe between fork and exec.
/// Returns the errno on failure.
pub fn clear_ambient() -> Result<(), i32> {
    const NONE: libc::c_ulong = 0;
    // SAFETY: prctl on the calling thread with integer arguments.
    let done = unsafe { libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, NONE, NONE, NONE) };
    // EINVAL: a kernel without ambient capabilities (before 4.3).
    if done == -1 && errno() != libc::EINVAL {
        return Err(errno());
    }
    Ok(())
}

/// Restricts the calling thread to `keep`. Raw system calls only, no
/// allocation: this runs in a signal handler and in a forked child.
/// Returns the step that failed and its errno.
pub fn restrict_this_thread(keep: CapSet, bounding: bool) -> Result<(), (&'static str, i32)> {
    // SAFETY: prctl and capget/capset on the calling thread, with valid
    // arguments and pointers.
    unsafe {
        if bounding {
            for cap in 0..64u32 {
                if keep.has(cap) {
                    continue;
                }
                if libc::prctl(PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) == -1 {
                    // Past the kernel's last capability.
                    if errno() == libc::EINVAL {
                        break;
                    }
                    return Err(("prctl(PR_CAPBSET_DROP)", errno()));
                }
            }
        }
        clear_ambient().map_err(|code| ("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", code))?;
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) == -1 {
            return Err(("capget", errno()));
        }
        for (word, record) in data.iter_mut().enumerate() {
            #[expect(
                clippy::cast_possible_truncation,
                reason = "one 32-bit word of the set"
            )]
            let mask = (keep.0 >> (32 * word)) as u32;
            record.effective &= mask;
            record.permitted &= mask;
            record.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) == -1 {
            return Err(("capset", errno()));
        }
        if libc::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1 {
            return Err(("prctl(PR_SET_NO_NEW_PRIVS)", errno()));
        }
    }
    Ok(())
}

/// What the signal handler applies.
static KEEP: AtomicU64 = AtomicU64::new(u64::MAX);
static BOUNDING: AtomicBool = AtomicBool::new(false);
/// Handler runs so far, and the last errno one of them failed with.
static HANDLED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    let saved = errno();
    let keep = CapSet(KEEP.load(Ordering::SeqCst));
    if let Err((_, code)) = restrict_this_thread(keep, BOUNDING.load(Ordering::SeqCst)) {
        FAILED.store(code, Ordering::SeqCst);
    }
    HANDLED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: restoring the interrupted code's errno.
    unsafe { *libc::__errno_location() = saved };
}

/// The real-time signal that carries the drop to each thread.
fn drop_signal() -> libc::c_int {
    libc::SIGRTMAX() - 3
}

/// The ids of this process's threads.
fn threads() -> Vec<u32> {
    fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Restricts every thread of this process to `keep` (less whatever it does
/// not hold already). Returns the set the process keeps.
pub fn restrict_process(keep: CapSet) -> Result<CapSet, PrivilegeError> {
    const ROUNDS: u32 = 20;
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let failed = |call, code| PrivilegeError::Call {
        call,
        source: io::Error::from_raw_os_error(code),
    };
    let effective = effective_now().map_err(|source| PrivilegeError::Call {
        call: "capget",
        source,
    })?;
    let bounding = effective.has(CAP_SETPCAP);
    KEEP.store(keep.0, Ordering::SeqCst);
    BOUNDING.store(bounding, Ordering::SeqCst);
    FAILED.store(0, Ordering::SeqCst);
    let signo = drop_signal();
    install_handler(signo).map_err(|code| failed("sigaction", code))?;
    restrict_this_thread(keep, bounding).map_err(|(call, code)| failed(call, code))?;
    // SAFETY: no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    for _ in 0..ROUNDS {
        let pending = unrestricted_threads(me, keep, bounding);
        if pending.is_empty() {
            return Ok(CapSet(effective.0 & keep.0));
        }
        let before = HANDLED.load(Ordering::SeqCst);
        let sent = signal_threads(pid, &pending, signo);
        let deadline = Instant::now() + Duration::from_millis(500);
        while HANDLED.load(Ordering::SeqCst) < before + sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        match FAILED.load(Ordering::SeqCst) {
            0 => {}
            code => return Err(failed("a thread's capset", code)),
        }
    }
    let tid = threads()
        .into_iter()
        .find(|&tid| i64::from(tid) != i64::from(me))
        .unwrap_or(0);
    Err(PrivilegeError::Straggler {
        tid,
        rounds: ROUNDS,
    })
}

/// Installs the handler that restricts the thread it runs on, for
/// `signo`; the error is the errno of `sigaction`.
fn install_handler(signo: libc::c_int) -> Result<(), i32> {
    // SAFETY: installs a handler that makes raw system calls only; it stays
    // installed (a late signal must not meet the default action, which ends
    // the process).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        if libc::sigaction(signo, &raw const action, std::ptr::null_mut()) == -1 {
            return Err(errno());
        }
    }
    Ok(())
}

/// The threads of this process, other than `me`, that still hold more
/// than `keep` (and, with `bounding`, a bounding set over it).
fn unrestricted_threads(me: libc::pid_t, keep: CapSet, bounding: bool) -> Vec<u32> {
    threads()
        .into_iter()
        .filter(|&tid| i64::from(tid) != i64::from(me))
        .filter(|tid| {
            // A thread gone since the listing is no concern.
            fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                .ok()
                .and_then(|status| ThreadCaps::parse(&status))
                .is_some_and(|caps| !caps.restricted_to(keep, bounding))
        })
        .collect()
}

/// Sends `signo` to each of `tids` of process `pid`; returns how many
/// were sent (a thread that has just exited is not).
fn signal_threads(pid: libc::pid_t, tids: &[u32], signo: libc::c_int) -> usize {
    let mut sent = 0;
    for &tid in tids {
        // SAFETY: a signal to a thread of this process; ESRCH if it
        // has just exited.
        #[expect(clippy::cast_possible_wrap, reason = "thread ids fit an i32")]
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid as libc::pid_t, signo) } == 0 {
            sent += 1;
        }
    }
    sent
}

/// Drops every capability outside `keep`, saying so at debug level; a
/// failure is a warning, not the end of the watch (the drop is a second
/// line of defence).
pub fn drop_to(keep: CapSet) {
    match restrict_process(keep) {
        Ok(kept) => tracing::debug!(
            kept = %names(kept),
            "dropped every other capability; no_new_privs is set"
        ),
        Err(error) => crate::diag!(
            "loopguard: warning: {error}; loopguard goes on with the capabilities it started with"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tloopguard\nCapInh:\t0000000000000000\nCapPrm:\t000001c000280024\nCapEff:\t000001c000280024\nCapBnd:\t000001c000280024\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t0\n";

    #[test]
    fn the_watch_keeps_what_attaching_and_reading_need_and_nothing_more() {
        for cap in [
            CAP_SYS_ADMIN,
            CAP_BPF,
            CAP_PERFMON,
            CAP_SYS_PTRACE,
            CAP_KILL,
            CAP_DAC_READ_SEARCH,
        ] {
            assert!(WATCH.has(cap), "{}", cap_name(cap));
        }
        for cap in [
            CAP_SETUID,
            CAP_SETGID,
            CAP_SETPCAP,
            CAP_NET_ADMIN,
            CAP_NET_BIND_SERVICE,
            CAP_SYS_MODULE,
            CAP_SYS_RAWIO,
            CAP_DAC_OVERRIDE,
        ] {
            assert!(!WATCH.has(cap), "{}", cap_name(cap));
        }
        assert_eq!(WATCHDOG, CapSet(1 << CAP_KILL));
        assert!(!FILES.has(CAP_SYS_ADMIN) && !FILES.has(CAP_BPF));
    }

    #[test]
    fn a_status_file_tells_a_restricted_thread() {
        let caps = ThreadCaps::parse(STATUS).unwrap();
        assert_eq!(caps.effective, WATCH.0);
        assert!(caps.no_new_privs);
        assert!(caps.restricted_to(WATCH, true));
        assert!(!caps.restricted_to(WATCHDOG, false));
        let root = STATUS
            .replace("CapEff:\t000001c000280024", "CapEff:\t000001ffffffffff")
            .replace("NoNewPrivs:\t1", "NoNewPrivs:\t0");
        let root = ThreadCaps::parse(&root).unwrap();
        assert!(!root.restricted_to(WATCH, false));
        let full_bounding =
            STATUS.replace("CapBnd:\t000001c000280024", "CapBnd:\t000001ffffffffff");
        let caps = ThreadCaps::parse(&full_bounding).unwrap();
        assert!(caps.restricted_to(WATCH, false));
        assert!(!caps.restricted_to(WATCH, true));
        assert_eq!(ThreadCaps::parse("Name:\tx\n"), None);
    }

    /// Set in the copy of this test binary that [`every_thread_is_restricted`]
    /// starts, so the drop never touches the test runner itself.
    const CHILD: &str = "LOOPGUARD_PRIVILEGE_CHILD";

    #[test]
    fn every_thread_is_restricted() {
        if std::env::var_os(CHILD).is_some() {
            // Threads started before the drop, some asleep in a system call,
            // and one started after it.
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let sleepers: Vec<_> = (0..4)
                .map(|_| {
                    let stop = std::sync::Arc::clone(&stop);
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    })
                })
                .collect();
            restrict_process(WATCHDOG).unwrap();
            let late = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(100)));
            let bounding = |caps: &ThreadCaps| caps.bounding & !WATCHDOG.0 == 0;
            let me = ThreadCaps::parse(&fs::read_to_string("/proc/self/status").unwrap()).unwrap();
            for tid in threads() {
                let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
                let caps = ThreadCaps::parse(&status).unwrap();
                assert!(
                    caps.restricted_to(WATCHDOG, bounding(&me)),
                    "thread {tid}: {status}"
                );
            }
            stop.store(true, Ordering::SeqCst);
            for sleeper in sleepers {
                sleeper.join().unwrap();
            }
            late.join().unwrap();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "privilege::tests::every_thread_is_restricted",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn capability_names_read_as_setcap_writes_them() {
        assert_eq!(
            names(WATCH),
            "cap_dac_read_search,cap_kill,cap_sys_ptrace,cap_sys_admin,cap_perfmon,cap_bpf,cap_checkpoint_restore"
        );
        assert_eq!(cap_name(63), "cap_63");
    }
}
