//! Following processes across fork and exec: `loopguard run` watches every
//! Tokio program its command starts, at any depth; `loopguard attach`
//! notices its target exec'ing another program.
//!
//! - [`Follower`] (here) loads the kernel side (`loopguard_common::follow`):
//!   the followed set, the stop at exec, the exec events.
//! - [`watchdog`]: a small process that resumes whatever is still stopped
//!   if loopguard dies.
//! - [`roster`]: what happened to each process (attached, skipped and why),
//!   pure.
//! - [`supervise`]: one watch per attached process, started and ended as
//!   exec events and exits come.

pub mod deadline;
pub mod launch;
pub mod pidfd;
pub mod roster;
pub mod supervise;
pub mod watchdog;

use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::{Ebpf, EbpfLoader};
use loopguard_common::follow::{ExecEvent, FollowConfig, FollowCounter, names};
use tokio::io::unix::AsyncFd;

use crate::attach::{AttachError, EBPF_OBJECT, attach_raw_tracepoint};

pub use crate::error::FollowError;

/// The kernel side of following; detaches on drop.
pub struct Follower {
    /// The programs; taken (detached) first on drop, before the last resume.
    ebpf: Option<Ebpf>,
    events: AsyncFd<RingBuf<MapData>>,
    pids: BpfHashMap<MapData, u32, u32>,
    stopped: BpfHashMap<MapData, u32, u32>,
    counters: Array<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FollowError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(FollowError::Attach(AttachError::Missing(name)))?;
    T::try_from(map).map_err(|source| FollowError::Map { name, source })
}

impl Follower {
    /// Follows `seed` (and, with `children`, everything it forks from now
    /// on), stopping each followed process at exec until [`Self::resume`].
    /// `before_attach` runs once the maps exist and before any program is
    /// attached (the watchdog is forked there, holding the stopped map
    /// and none of the programs).
    pub fn start(
        seed: u32,
        children: bool,
        before_attach: impl FnOnce(RawFd) -> Result<(), FollowError>,
    ) -> Result<Self, FollowError> {
        let config = FollowConfig {
            stop_on_exec: 1,
            all_processes: 0,
        };
        let mut ebpf = load(config)?;
        let mut pids: BpfHashMap<MapData, u32, u32> = take(&mut ebpf, names::FOLLOW_PIDS)?;
        pids.insert(seed, 1, 0).map_err(|source| FollowError::Map {
            name: names::FOLLOW_PIDS,
            source,
        })?;
        let stopped_map = ebpf
            .take_map(names::FOLLOW_STOPPED)
            .ok_or(FollowError::Attach(AttachError::Missing(
                names::FOLLOW_STOPPED,
            )))?;
        let stopped_fd = match &stopped_map {
            aya::maps::Map::HashMap(data) => data.fd().as_fd().as_raw_fd(),
            _ => {
                return Err(FollowError::Attach(AttachError::Missing(
                    names::FOLLOW_STOPPED,
                )));
            }
        };
        let stopped: BpfHashMap<MapData, u32, u32> =
            BpfHashMap::try_from(stopped_map).map_err(|source| FollowError::Map {
                name: names::FOLLOW_STOPPED,
                source,
            })?;
        let counters = take(&mut ebpf, names::FOLLOW_COUNTERS)?;
        let ring: RingBuf<MapData> = take(&mut ebpf, names::FOLLOW_EVENTS)?;
        before_attach(stopped_fd)?;
        // Exits first, then forks, then execs: a task is never followed
        // without its exit being seen, and a child is followed before it
        // can exec.
        attach_raw_tracepoint(&mut ebpf, names::FOLLOW_EXIT, "sched_process_exit")?;
        if children {
            attach_raw_tracepoint(&mut ebpf, names::FOLLOW_FORK, "sched_process_fork")?;
        }
        attach_raw_tracepoint(&mut ebpf, names::FOLLOW_EXEC, "sched_process_exec")?;
        Self::listening(ebpf, ring, pids, stopped, counters)
    }

    /// Hears of every exec on the host, stopping none (`loopguard watch
    /// --all`: a host agent must never hold a process it was not asked
    /// about). No watchdog is needed: nothing is ever stopped.
    pub fn start_all() -> Result<Self, FollowError> {
        let config = FollowConfig {
            stop_on_exec: 0,
            all_processes: 1,
        };
        let mut ebpf = load(config)?;
        let pids = take(&mut ebpf, names::FOLLOW_PIDS)?;
        let stopped = take(&mut ebpf, names::FOLLOW_STOPPED)?;
        let counters = take(&mut ebpf, names::FOLLOW_COUNTERS)?;
        let ring: RingBuf<MapData> = take(&mut ebpf, names::FOLLOW_EVENTS)?;
        attach_raw_tracepoint(&mut ebpf, names::FOLLOW_EXEC, "sched_process_exec")?;
        Self::listening(ebpf, ring, pids, stopped, counters)
    }

    /// The follower over a loaded object whose tracepoints are attached.
    fn listening(
        ebpf: Ebpf,
        ring: RingBuf<MapData>,
        pids: BpfHashMap<MapData, u32, u32>,
        stopped: BpfHashMap<MapData, u32, u32>,
        counters: Array<MapData, u64>,
    ) -> Result<Self, FollowError> {
        Ok(Self {
            ebpf: Some(ebpf),
            // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd.
            events: unsafe { AsyncFd::register(ring) }
                .map_err(|error| FollowError::Poll(error.into()))?,
            pids,
            stopped,
            counters,
        })
    }

    /// Waits for exec events and returns them all.
    pub async fn next(&mut self) -> Result<Vec<ExecEvent>, FollowError> {
        loop {
            let mut out = Vec::new();
            {
                let ring = self.events.get_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<ExecEvent>() {
                        // SAFETY: the kernel wrote a whole `ExecEvent`; read unaligned.
                        out.push(unsafe { item.as_ptr().cast::<ExecEvent>().read_unaligned() });
                    }
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            let mut guard = self.events.readable().await.map_err(FollowError::Poll)?;
            guard.clear_ready();
        }
    }

    /// Lets a process the kernel stopped at exec run (`SIGCONT`), and
    /// forgets the stop. A process that has gone is forgotten too.
    pub fn resume(&mut self, pid: u32) {
        // The pidfd first, then the entry: the kernel forgets a stop when
        // its process exits, so an entry still there after the open means
        // the pidfd names the stopped process, not one that reused its pid.
        let pidfd = crate::follow::pidfd::Pidfd::open(pid);
        if self.stopped.get(&pid, 0).is_ok() {
            let sent = pidfd.and_then(|pidfd| pidfd.signal(libc::SIGCONT));
            // ESRCH: it has just exited. Anything else leaves it stopped:
            // say so, with the way out.
            if let Err(error) = sent
                && error.raw_os_error() != Some(libc::ESRCH)
            {
                crate::diag!(
                    "loopguard: error: cannot resume pid {pid}, stopped at its exec ({error}); it stays stopped until `sudo kill -CONT {pid}`"
                );
            }
            let _ = self.stopped.remove(&pid);
        }
    }

    /// Resumes every process still stopped (on the way out).
    pub fn resume_all(&mut self) {
        let pids: Vec<u32> = self.stopped.keys().filter_map(Result::ok).collect();
        for pid in pids {
            self.resume(pid);
        }
    }

    /// Stops following `pid` (it exited, or `attach` gave up on it).
    pub fn forget(&mut self, pid: u32) {
        let _ = self.pids.remove(&pid);
    }

    /// Children not followed (map full) and exec events lost.
    pub fn lost(&self) -> (u64, u64) {
        let get = |c: FollowCounter| self.counters.get(&(c as u32), 0).unwrap_or(0);
        (
            get(FollowCounter::TasksFull),
            get(FollowCounter::EventsLost),
        )
    }
}

impl Drop for Follower {
    /// Detaches first, so nothing new is stopped, then resumes what is.
    fn drop(&mut self) {
        drop(self.ebpf.take());
        self.resume_all();
    }
}

/// The follow programs loaded with `config`.
fn load(config: FollowConfig) -> Result<Ebpf, FollowError> {
    Ok(EbpfLoader::new()
        .override_global(names::FOLLOW_CONFIG, &config, true)
        .load(EBPF_OBJECT)
        .map_err(|error| AttachError::Load(Box::new(error)))?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_side_stops_a_process_at_exec_with_sigstop() {
        assert_eq!(
            i32::try_from(loopguard_common::follow::SIGSTOP),
            Ok(libc::SIGSTOP)
        );
    }
}
