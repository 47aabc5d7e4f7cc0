//! The host's limits: how many targets and probes `loopguard watch --all`
//! holds at once, and the promise to say why a process is not watched
//! once, not at every exec.
//!
//! Pure: [`Budget`] counts what is held and refuses past the limits with
//! a message that names the flag to raise; [`Notices`] remembers what was
//! said (bounded: past its cap it stops remembering and stays quiet).

use std::collections::HashSet;

/// What a watched target costs the agent, about (MiB): measured with 50
/// Tokio, uvicorn and Node targets (`cargo xtask fleet`: 578 MiB), half of
/// it the target's BPF maps.
pub const PER_TARGET_MIB: u64 = 12;

/// What the host holds, against its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    pub max_targets: usize,
    pub max_probes: usize,
    /// KiB of resident memory the agent may hold.
    pub max_memory_kib: u64,
    targets: usize,
    probes: usize,
}

/// Why a target was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error(
        "the host budget of {max} targets is reached; raise --max-targets (each target costs about 12 MiB of memory, half of it BPF maps, and a sched_switch program)"
    )]
    Targets { max: usize },
    #[error(
        "the agent holds {held_mib} MiB, and a target costs about {PER_TARGET_MIB} MiB more: past the host's memory budget of {max_mib} MiB; raise --max-memory-mib (and the agent's memory limit with it), or narrow the selectors"
    )]
    Memory { held_mib: u64, max_mib: u64 },
    #[error(
        "its {probes} probes would take the host past its budget of {max} probes ({held} held); raise --max-probes, or narrow the selectors"
    )]
    Probes {
        probes: usize,
        held: usize,
        max: usize,
    },
}

impl Budget {
    pub fn new(max_targets: usize, max_probes: usize, max_memory_mib: usize) -> Self {
        Self {
            max_targets,
            max_probes,
            max_memory_kib: (max_memory_mib as u64).saturating_mul(1024),
            targets: 0,
            probes: 0,
        }
    }

    /// Takes a place for one more target (before attaching), the agent
    /// holding `resident_kib` of memory now.
    pub fn reserve_target(&mut self, resident_kib: u64) -> Result<(), OverBudget> {
        if self.targets >= self.max_targets {
            return Err(OverBudget::Targets {
                max: self.max_targets,
            });
        }
        if resident_kib + PER_TARGET_MIB * 1024 > self.max_memory_kib {
            return Err(OverBudget::Memory {
                held_mib: resident_kib / 1024,
                max_mib: self.max_memory_kib / 1024,
            });
        }
        self.targets += 1;
        Ok(())
    }

    /// Counts a reserved target's probes (once attached); refused past the
    /// limit, and then the place is given back.
    pub fn add_probes(&mut self, probes: usize) -> Result<(), OverBudget> {
        if self.probes + probes > self.max_probes {
            self.targets = self.targets.saturating_sub(1);
            return Err(OverBudget::Probes {
                probes,
                held: self.probes,
                max: self.max_probes,
            });
        }
        self.probes += probes;
        Ok(())
    }

    /// A target let go: its place and its probes.
    pub fn release(&mut self, probes: usize) {
        self.targets = self.targets.saturating_sub(1);
        self.probes = self.probes.saturating_sub(probes);
    }

    pub fn targets(&self) -> usize {
        self.targets
    }

    pub fn probes(&self) -> usize {
        self.probes
    }
}

/// Keys already reported: each unwatchable program is named once.
#[derive(Debug, Default)]
pub struct Notices {
    said: HashSet<String>,
}

/// Keys remembered at most; past it nothing more is said.
const MAX_NOTICES: usize = 4096;

impl Notices {
    /// Whether `key` is new (and so worth saying); remembers it.
    pub fn first(&mut self, key: &str) -> bool {
        if self.said.contains(key) || self.said.len() >= MAX_NOTICES {
            return false;
        }
        self.said.insert(key.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_probes_are_held_within_their_limits() {
        let mut budget = Budget::new(2, 100, 1024);
        budget.reserve_target(0).unwrap();
        budget.add_probes(60).unwrap();
        budget.reserve_target(0).unwrap();
        let error = budget.add_probes(50).unwrap_err();
        assert!(error.to_string().contains("--max-probes"), "{error}");
        // The refused target's place was given back.
        assert_eq!((budget.targets(), budget.probes()), (1, 60));
        budget.reserve_target(0).unwrap();
        budget.add_probes(40).unwrap();
        let error = budget.reserve_target(0).unwrap_err();
        assert!(error.to_string().contains("--max-targets"), "{error}");
        budget.release(60);
        assert_eq!((budget.targets(), budget.probes()), (1, 40));
        budget.reserve_target(0).unwrap();
    }

    #[test]
    fn a_target_past_the_memory_budget_is_refused_with_the_flag_to_raise() {
        let mut budget = Budget::new(64, 20_000, 100);
        // 80 MiB held: one more target (about 12) still fits.
        budget.reserve_target(80 * 1024).unwrap();
        let error = budget.reserve_target(90 * 1024).unwrap_err();
        let said = error.to_string();
        assert!(
            said.contains("--max-memory-mib") && said.contains("90 MiB"),
            "{said}"
        );
        // Refused before any place was taken.
        assert_eq!(budget.targets(), 1);
    }

    #[test]
    fn a_notice_is_given_once() {
        let mut notices = Notices::default();
        assert!(notices.first("/srv/api: stripped"));
        assert!(!notices.first("/srv/api: stripped"));
        assert!(notices.first("/srv/other: stripped"));
        for n in 0..MAX_NOTICES {
            notices.first(&n.to_string());
        }
        assert!(!notices.first("new after the cap"));
    }
}
