//! Stack capture's programs: the kernel configuration they are loaded
//! with, and the perf-event program loaded with the
//! probes (what they capture is read by [`crate::stacks`]).

use aya::Ebpf;
use aya::programs::PerfEvent;
use loopguard_common::stacks::{StackConfig, names};

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(
        "failed to load the stack capture program `{program}`; pass --no-stacks to watch without stacks"
    )]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the eBPF object lacks `{0}`; rebuild loopguard (`cargo xtask build`)")]
    Missing(&'static str),
    #[error("failed to open map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The kernel configuration: capture armed at `arm_delay_ns` (of the
/// process every program filters on, `Config::target_tgid`).
/// `loop_stretches`: also capture loop threads in a long busy stretch
/// (loop-only targets).
pub fn kernel_config(arm_delay_ns: u64, enabled: bool, loop_stretches: bool) -> StackConfig {
    StackConfig {
        enabled: u32::from(enabled),
        loop_stretches: u32::from(loop_stretches),
        arm_delay_ns,
        min_sample_gap_ns: 2_000_000,
    }
}

/// Loads the perf-event program, which goes with the `Ebpf` that owns it.
/// The `sched_switch` half runs inside `thread_switch`, switched on by
/// [`kernel_config`]'s `enabled`.
pub fn attach_programs(ebpf: &mut Ebpf) -> Result<(), StackError> {
    let program: &mut PerfEvent = ebpf
        .program_mut(names::ON_CPU)
        .ok_or(StackError::Missing(names::ON_CPU))?
        .try_into()
        .map_err(program_error(names::ON_CPU))?;
    program.load().map_err(program_error(names::ON_CPU))?;
    Ok(())
}

fn program_error(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> StackError {
    move |source| StackError::Program {
        program,
        source: Box::new(source),
    }
}
