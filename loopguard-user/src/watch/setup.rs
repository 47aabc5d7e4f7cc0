//! Setting a watch up: find what to probe in a process, attach, open the
//! maps and say so. `attach` does it once, `run` once per process it
//! follows.

use crate::attach::{self, AttachProgress, AttachedProbes, LinkKind};
use crate::collect::Collector;
use crate::discover::{self, ProbeTarget};
use crate::error::Error;
use crate::stacks::StackTools;
use crate::watch::{self as agent, WatchOptions};

/// What watching needs: the target, the probes in place, and the stack tools
/// (made before attaching: reading the target's files takes a moment in
/// which events would pile up).
pub type Prepared = (ProbeTarget, AttachedProbes, Option<StackTools>);

pub fn prepare(pid: u32, options: &WatchOptions) -> Result<Prepared, Error> {
    let tools = options.capture_stacks.then(|| StackTools::prepare(pid));
    let (target, probes) = discover_and_attach(pid, options)?;
    Ok((target, probes, tools))
}

/// Finds what to probe in `pid` and attaches (no stack tools: those stay
/// on the thread that watches).
pub fn discover_and_attach(
    pid: u32,
    options: &WatchOptions,
) -> Result<(ProbeTarget, AttachedProbes), Error> {
    let target = discover::discover(pid)?;
    let probes = attach_discovered(&target, options)?;
    Ok((target, probes))
}

/// Attaches to a target already discovered.
pub fn attach_discovered(
    target: &ProbeTarget,
    options: &WatchOptions,
) -> Result<AttachedProbes, Error> {
    let pid = target.pid;
    tracing::info!(
        pid,
        exe = %target.exe.display_path,
        poll_functions = target.binary.poll_copies.len(),
        blocking_ranges = target.binary.blocking_ranges.len(),
        "discovered target"
    );
    let floor_ns = options.detect.report_floor_ns();
    tracing::info!(report_floor_ns = floor_ns, "kernel report floor");
    let attach_options = attach::AttachOptions {
        report_floor_ns: floor_ns,
        requests: options.requests == crate::attach::RequestSource::Probes,
        wait_probes: options.wait_probes,
        stacks: options.capture_stacks,
        probe_links: options.probe_links,
        bench: options.bench,
    };
    let probes = attach::attach(target, attach_options, &mut |progress| {
        report_attach_progress(progress);
    })?;
    let links = probes.links_summary;
    tracing::info!(
        probes = probes.probe_count,
        links = links.links,
        kind = links.kind.as_str(),
        seconds = links.attach_time.as_secs_f64(),
        "attached"
    );
    Ok(probes)
}

/// Prints what attaching is about to do, and how far it got when slow.
fn report_attach_progress(progress: AttachProgress) {
    match progress {
        AttachProgress::Starting {
            kind,
            probes,
            links,
        } => {
            let expected = kind.expected(probes, links);
            let how = match kind {
                LinkKind::UprobeMulti => format!("in {links} uprobe_multi links"),
                LinkKind::PerfEvent => "as perf-event uprobes, one link each".to_owned(),
            };
            crate::diag!(
                "loopguard: attaching {probes} probes {how} (expect about {:.1} s; detaching later about {:.1} s)",
                expected.attach.as_secs_f64(),
                expected.detach.as_secs_f64(),
            );
        }
        AttachProgress::Attached { done, total } if done < total => {
            crate::diag!("loopguard: attaching: {done}/{total} probes attached");
        }
        AttachProgress::Attached { .. } => {}
    }
}

/// Opens the maps and announces the attachment (before `run` lets its
/// command go, so the `attached` line comes first).
pub fn announce(
    target: &ProbeTarget,
    probes: &mut AttachedProbes,
    options: &WatchOptions,
) -> Result<Collector, Error> {
    let collector = Collector::new(&mut probes.ebpf)?;
    agent::print_attached(
        target,
        probes.probe_count,
        probes.wait_path,
        &probes.links_summary,
        options,
    );
    Ok(collector)
}
