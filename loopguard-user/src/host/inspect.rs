//! Looking at one process for `loopguard watch --all`: who it is, whether
//! the selectors take it, and what to probe in it. Runs on the blocking
//! pool (it reads files).
//!
//! In: a pid. Out: an [`Inspection`]: skip it quietly (not selected, not an
//! event-loop runtime, gone, loopguard itself), refuse it with a reason
//! (said once per program), or a [`Candidate`] to attach to.
//!
//! Every exec on the host comes here, so the cheap checks come first (the
//! identity's few small files, the selectors, the executable's name) and
//! an executable read once is not read again: the verdict on a program
//! that is no runtime, or that cannot be watched, is kept by its inode.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::select::{Runtime, Selectors, interpreter_of};
use crate::discover::identity::kubelet::{CONTAINER_LOGS_DIR, PodIndex};
use crate::discover::identity::service::ServiceMap;
use crate::discover::identity::{Identity, read_identity};
use crate::discover::{self, ProbeTarget};
use crate::error::Error;
use crate::follow::roster::Skip;

/// A process to attach to.
pub struct Candidate {
    pub identity: Identity,
    pub runtime: Runtime,
    pub target: ProbeTarget,
}

/// What became of one inspection.
pub enum Inspection {
    /// Not ours to watch: said at debug level only.
    Skip(&'static str),
    /// Selected, but cannot be watched: `reason` is the metrics label,
    /// `key` what the notice is said once for (the program and reason).
    Refused {
        key: String,
        reason: &'static str,
        message: String,
    },
    Candidate(Box<Candidate>),
}

/// A verdict kept on a program (by device and inode).
#[derive(Clone, Debug)]
enum Verdict {
    /// Not an event-loop runtime loopguard watches on a host.
    NotRuntime,
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Programs remembered at most; the cache starts over past it.
const MAX_VERDICTS: usize = 4096;
/// How often the kubelet's log names are read again when a container id
/// is not among them (a container just started).
const POD_INDEX_REFRESH: Duration = Duration::from_secs(5);

/// Inspects processes; shared by the inspections running at once.
pub struct Inspector {
    selectors: Selectors,
    services: ServiceMap,
    pods: Mutex<(PodIndex, Option<Instant>)>,
    verdicts: Mutex<HashMap<(u64, u64), Verdict>>,
    own_pid: u32,
}

impl Inspector {
    pub fn new(selectors: Selectors, services: ServiceMap) -> Self {
        Self {
            selectors,
            services,
            pods: Mutex::new((PodIndex::default(), None)),
            verdicts: Mutex::new(HashMap::new()),
            own_pid: std::process::id(),
        }
    }

    pub fn inspect(&self, pid: u32) -> Inspection {
        if pid == self.own_pid {
            return Inspection::Skip("loopguard itself");
        }
        let exe = format!("/proc/{pid}/exe");
        // No executable: a kernel thread, or gone.
        let (Ok(path), Ok(meta)) = (std::fs::read_link(&exe), std::fs::metadata(&exe)) else {
            return Inspection::Skip("no executable (a kernel thread, or gone)");
        };
        let key = (meta.dev(), meta.ino());
        let path = path.to_string_lossy().into_owned();
        let interpreter = interpreter_of(discover::identity::exe_name(&path));
        let wanted = match interpreter {
            Some(runtime) => self.selectors.wants(runtime),
            // Tokio, or Node under another name.
            None => self.selectors.wants_tokio() || self.selectors.wants(Runtime::Node),
        };
        if !wanted {
            return Inspection::Skip("a runtime not asked for");
        }
        let Ok(mut identity) = self.identify(pid) else {
            return Inspection::Skip("gone");
        };
        self.services.apply(&mut identity);
        if !self.selectors.matches(&identity, &path) {
            return Inspection::Skip("not selected");
        }
        if let Some(known) = self.known(key, &path) {
            return known;
        }
        let interpreter = match interpreter {
            // Only Node is asked for among the programs not named as an
            // interpreter: no need to read this one as Tokio.
            None if !self.selectors.wants_tokio() => {
                if !runs_node(pid) {
                    self.remember(key, Verdict::NotRuntime);
                    return Inspection::Skip("not an event-loop runtime");
                }
                Some(Runtime::Node)
            }
            known => known,
        };
        self.judge(pid, key, &path, identity, interpreter)
    }

    /// Reads a selected process's runtime: a candidate when it is one the
    /// selectors ask for.
    fn judge(
        &self,
        pid: u32,
        key: (u64, u64),
        path: &str,
        identity: Identity,
        interpreter: Option<Runtime>,
    ) -> Inspection {
        let target = match discover::discover(pid) {
            Ok(target) => target,
            Err(error) => return self.refuse(key, path, &Error::from(error)),
        };
        let runtime = if target.is_loop_only() {
            interpreter.or_else(|| runs_node(pid).then_some(Runtime::Node))
        } else {
            Some(Runtime::Tokio)
        };
        match runtime {
            Some(runtime) if self.selectors.wants(runtime) => {
                Inspection::Candidate(Box::new(Candidate {
                    identity,
                    runtime,
                    target,
                }))
            }
            Some(_) => Inspection::Skip("a runtime not asked for"),
            None => {
                self.remember(key, Verdict::NotRuntime);
                Inspection::Skip("not an event-loop runtime")
            }
        }
    }

    /// What an earlier look at the executable `key` (at `path`) decided,
    /// if one did.
    fn known(&self, key: (u64, u64), path: &str) -> Option<Inspection> {
        let verdict = lock(&self.verdicts).get(&key).cloned()?;
        Some(match verdict {
            Verdict::NotRuntime => Inspection::Skip("not an event-loop runtime"),
            Verdict::Refused { reason, message } => Inspection::Refused {
                key: format!("{path}: {reason}"),
                reason,
                message,
            },
        })
    }

    /// Sorts a failure to inspect; a program's own failings are kept.
    fn refuse(&self, key: (u64, u64), path: &str, error: &Error) -> Inspection {
        let (reason, message) = match Skip::from_error(error) {
            Skip::ExitedTooFast => return Inspection::Skip("gone"),
            Skip::NotTokio(_) => {
                self.remember(key, Verdict::NotRuntime);
                return Inspection::Skip("not an event-loop runtime");
            }
            Skip::Unprobeable(message) => ("unprobeable", message),
            Skip::Failed(message) => ("failed", message),
        };
        if reason == "unprobeable" {
            self.remember(
                key,
                Verdict::Refused {
                    reason,
                    message: message.clone(),
                },
            );
        }
        Inspection::Refused {
            key: format!("{path}: {reason}"),
            reason,
            message,
        }
    }

    fn remember(&self, key: (u64, u64), verdict: Verdict) {
        let mut verdicts = lock(&self.verdicts);
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(key, verdict);
    }

    /// The identity, with the kubelet's names read again (at most every
    /// few seconds) when the container is not among them yet.
    fn identify(&self, pid: u32) -> std::io::Result<Identity> {
        let mut pods = lock(&self.pods);
        let identity = read_identity(pid, &pods.0)?;
        let unnamed = !identity.container_id.is_empty() && identity.namespace.is_empty();
        let stale = pods.1.is_none_or(|at| at.elapsed() >= POD_INDEX_REFRESH);
        if unnamed && stale {
            *pods = (
                PodIndex::read(Path::new(CONTAINER_LOGS_DIR)),
                Some(Instant::now()),
            );
            return read_identity(pid, &pods.0);
        }
        Ok(identity)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether process `pid` runs Node whatever its executable's name: Node's
/// shared library mapped, or the executable exporting Node's addon
/// interface (read once per program: the verdict is kept by inode).
fn runs_node(pid: u32) -> bool {
    let maps = discover::proc::read_maps(pid).unwrap_or_default();
    if maps
        .iter()
        .any(|m| discover::interpreter::is_node_library(discover::identity::exe_name(&m.path)))
    {
        return true;
    }
    discover::files::read_through_proc(
        Path::new(&format!("/proc/{pid}/exe")),
        discover::files::MAX_EXECUTABLE_BYTES,
    )
    .is_ok_and(|data| discover::interpreter::is_node(&data))
}

/// Every process on the host now (numeric entries of `/proc`).
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopguard_itself_kernel_threads_and_unselected_processes_are_skipped() {
        let inspector = Inspector::new(Selectors::default(), ServiceMap::default());
        assert!(matches!(
            inspector.inspect(std::process::id()),
            Inspection::Skip("loopguard itself")
        ));
        // kthreadd (pid 2) has no executable.
        assert!(matches!(inspector.inspect(2), Inspection::Skip(_)));
        assert!(matches!(inspector.inspect(u32::MAX), Inspection::Skip(_)));
        let nothing = Inspector::new(
            Selectors {
                exe: vec!["no-such-program-*".into()],
                ..Selectors::default()
            },
            ServiceMap::default(),
        );
        let parent = std::os::unix::process::parent_id();
        assert!(matches!(nothing.inspect(parent), Inspection::Skip(_)));
        assert!(all_pids().contains(&parent));
    }
}
