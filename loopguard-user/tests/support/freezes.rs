//! A witness of the machine standing still, for judging a timing test's
//! failure by its cause (issue #23).
//!
//! One `SCHED_FIFO` 99 thread per CPU sleeps 1 ms at a time and notes every
//! wakeup that came more than [`LATE_NS`] late. Nothing inside the guest
//! makes such a thread that late but a long interrupts-off section; when the
//! threads of every CPU are late over the same interval, the whole virtual
//! machine stood still (its vCPUs were not run by the host). A task poll in
//! flight then looks as long as the freeze, on CPU, and no context switch
//! the agent could subtract happened. The witness only reports what the
//! machine did meanwhile; the soak runs a build again when every alarm of a
//! run came while the whole machine stood still, and fails on any other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A wakeup later than this (ns) is noted.
pub const LATE_NS: u64 = 10_000_000;

/// One late wakeup: the CPU, and the interval (ns, `CLOCK_MONOTONIC`, the
/// clock of the agent's `start_ns`) from the end of the expected sleep to
/// the wakeup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Late {
    pub cpu: usize,
    pub from_ns: u64,
    pub to_ns: u64,
}

impl Late {
    pub fn ms(&self) -> f64 {
        (self.to_ns - self.from_ns) as f64 / 1e6
    }
}

/// The watcher threads; stopped on drop.
pub struct Freezes {
    stop: Arc<AtomicBool>,
    late: Arc<Mutex<Vec<Late>>>,
    threads: Vec<JoinHandle<()>>,
}

/// ns of `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Freezes {
    /// Starts one watcher per online CPU (needs root for `SCHED_FIFO`).
    pub fn watch() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let late = Arc::new(Mutex::new(Vec::new()));
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let threads = (0..cpus)
            .map(|cpu| {
                let (stop, late) = (Arc::clone(&stop), Arc::clone(&late));
                std::thread::spawn(move || watch_cpu(cpu, &stop, &late))
            })
            .collect();
        Self {
            stop,
            late,
            threads,
        }
    }

    /// Late wakeups that overlap `[from_ns, to_ns]`.
    pub fn during(&self, from_ns: u64, to_ns: u64) -> Vec<Late> {
        self.late
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.from_ns < to_ns && l.to_ns > from_ns)
            .copied()
            .collect()
    }

    /// Whether the watchers of every CPU were held off during
    /// `[from_ns, to_ns]`: the whole virtual machine stood still.
    pub fn whole_machine_during(&self, from_ns: u64, to_ns: u64) -> bool {
        let cpus: std::collections::BTreeSet<usize> =
            self.during(from_ns, to_ns).iter().map(|l| l.cpu).collect();
        cpus.len() == self.threads.len()
    }

    /// A sentence on what the watchers saw during `[from_ns, to_ns]`.
    pub fn describe(&self, from_ns: u64, to_ns: u64) -> String {
        let late = self.during(from_ns, to_ns);
        if late.is_empty() {
            return "no FIFO-99 watcher was held off more than 10 ms meanwhile".to_owned();
        }
        let cpus: std::collections::BTreeSet<usize> = late.iter().map(|l| l.cpu).collect();
        let all = cpus.len() == self.threads.len();
        let list: Vec<String> = late
            .iter()
            .map(|l| format!("cpu{} {:.1} ms from {}", l.cpu, l.ms(), l.from_ns))
            .collect();
        format!(
            "FIFO-99 watchers held off meanwhile: {}{}",
            list.join(", "),
            if all {
                " (every CPU: the virtual machine stood still)"
            } else {
                ""
            }
        )
    }
}

impl Drop for Freezes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn watch_cpu(cpu: usize, stop: &AtomicBool, late: &Mutex<Vec<Late>>) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pin the freeze watcher to cpu{cpu}"
        );
        let param = libc::sched_param { sched_priority: 99 };
        assert_eq!(
            libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param),
            0,
            "make the freeze watcher SCHED_FIFO (needs root)"
        );
    }
    let sleep = Duration::from_millis(1);
    while !stop.load(Ordering::Relaxed) {
        let before = monotonic_ns();
        std::thread::sleep(sleep);
        let after = monotonic_ns();
        let due = before + sleep.as_nanos() as u64;
        if after.saturating_sub(due) > LATE_NS {
            late.lock().unwrap().push(Late {
                cpu,
                from_ns: due,
                to_ns: after,
            });
        }
    }
}
