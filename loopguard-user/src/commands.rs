//! The two subcommands, from parsed arguments to an exit code.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::agent::Outcome;
use crate::agent::{self, StopReason, WatchOptions};
use crate::attach::{self, AttachedProbes};
use crate::cli::{AttachArgs, ConfigArgs, FailOn, RunArgs};
use crate::collect::Collector;
use crate::config::Settings;
use crate::discover::{self, ProbeTarget, proc};
use crate::error::{EXIT_STALL, Error};
use crate::export::server;
use crate::export::{Metrics, TargetInfo};
use crate::launch;
use crate::preflight;
use crate::stacks::{StackTools, Stacks};

fn watch_options(settings: &Settings) -> WatchOptions {
    WatchOptions {
        detect: settings.detect(),
        routes: settings.route_filter(),
        format: settings.format,
        scan_interval: Duration::from_millis(settings.scan_interval_ms.unsigned_abs()),
        requests: settings.requests,
        metrics: None,
        loop_threads: settings.loop_threads.clone(),
        wait_probes: settings.wait_probes,
        capture_stacks: true,
        stacks: crate::stacks::StackOptions {
            arm_delay_ns: settings.detect().report_floor_ns() / 2,
            all_frames: false,
        },
        folded: None,
    }
}

/// The stack flags, which are not configuration keys.
fn apply_stack_args(options: &mut WatchOptions, args: &crate::cli::StackArgs) {
    options.capture_stacks = !args.no_stacks;
    options.stacks.all_frames = args.all_frames;
    options.folded.clone_from(&args.folded);
}

/// `loopguard config`: prints the effective configuration.
pub fn config(args: &ConfigArgs) -> Result<i32, Error> {
    let settings = Settings::resolve(&args.watch, args.file.as_deref(), args.fail_on.as_deref())?;
    print!("{}", settings.to_toml());
    Ok(0)
}

/// What `run` fails on: `--fail-on`, `--fail-on-stall`, or the file's `fail_on`.
fn fail_on_flags(args: &RunArgs) -> Option<Vec<FailOn>> {
    if args.fail_on_stall {
        return Some(vec![FailOn::Stall]);
    }
    args.fail_on.clone()
}

/// Binds `--metrics-addr` before anything is attached or started, so a bad
/// address or a port in use fails first.
fn bind_metrics(settings: &Settings) -> Result<Option<std::net::TcpListener>, Error> {
    let Some(addr) = &settings.metrics_addr else {
        return Ok(None);
    };
    Ok(Some(server::bind(server::parse_addr(addr)?)?))
}

/// Starts serving `/metrics` for `target` (inside the runtime).
fn serve_metrics(
    listener: Option<std::net::TcpListener>,
    settings: &Settings,
    target: &ProbeTarget,
    probes: usize,
    options: &mut WatchOptions,
) -> Result<(), Error> {
    let Some(listener) = listener else {
        return Ok(());
    };
    let metrics = Arc::new(Metrics::new(
        &TargetInfo {
            pid: target.pid,
            exe: target.exe.display_path.clone(),
            tokio_version: target.tokio_version.clone(),
        },
        settings
            .metrics_max_routes
            .unwrap_or(crate::export::labels::DEFAULT_MAX_ROUTES),
    ));
    metrics.set_probes(probes);
    if let Ok(addr) = listener.local_addr() {
        crate::diag!("loopguard: serving Prometheus metrics at http://{addr}/metrics");
    }
    server::serve(listener, Arc::clone(&metrics))?;
    options.metrics = Some(metrics);
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}

/// What watching needs: the target, the probes in place, and the stack tools
/// (made before attaching: reading the target's files takes a moment in
/// which events would pile up).
type Prepared = (ProbeTarget, AttachedProbes, Option<StackTools>);

fn prepare(pid: u32, options: &WatchOptions) -> Result<Prepared, Error> {
    let target = discover::discover(pid)?;
    tracing::info!(
        pid,
        exe = %target.exe.display_path,
        poll_functions = target.binary.poll_copies.len(),
        blocking_ranges = target.binary.blocking_ranges.len(),
        "discovered target"
    );
    let floor_ns = options.detect.report_floor_ns();
    tracing::info!(report_floor_ns = floor_ns, "kernel report floor");
    let tools = options.capture_stacks.then(|| StackTools::prepare(pid));
    let probes = attach::attach(
        &target,
        floor_ns,
        options.requests,
        options.wait_probes,
        options.capture_stacks,
    )?;
    tracing::info!(probes = probes.probe_count, "attached");
    Ok((target, probes, tools))
}

/// Opens the maps and announces the attachment (before `run` lets its
/// command go, so the `attached` line comes first).
fn announce(
    target: &ProbeTarget,
    probes: &mut AttachedProbes,
    options: &WatchOptions,
) -> Result<Collector, Error> {
    let collector = Collector::new(&mut probes.ebpf)?;
    agent::print_attached(target, probes.probe_count, probes.wait_path, options);
    Ok(collector)
}

/// Watches, then detaches and prints the summary.
async fn watch_and_detach(
    (target, mut probes, tools): Prepared,
    mut collector: Collector,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<Outcome, Error> {
    let stacks = match tools {
        Some(tools) if probes.stacks => Stacks::new(&mut probes.ebpf, tools, options.stacks)
            .inspect_err(|error| tracing::warn!(%error, "stalls are reported without stacks"))
            .ok(),
        _ => None,
    };
    let outcome = agent::watch(&target, &mut collector, stacks, options, stop).await?;
    agent::print_summary(&outcome, target.pid, options);
    let total = probes.probe_count;
    let started = std::time::Instant::now();
    probes.detach(|done, total| {
        if done == total {
            crate::diag!(
                "loopguard: detached: all {total} probes removed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        } else {
            crate::diag!("loopguard: detaching: {done}/{total} probes removed");
        }
    });
    tracing::info!(reason = ?outcome.reason, probes = total, "detached");
    Ok(outcome)
}

/// The process `--pid` means: a thread id (loopguard prints them) is
/// taken for the process it belongs to, and said so.
fn process_to_watch(id: u32) -> u32 {
    match proc::process_of(id) {
        Some(pid) if pid != id => {
            crate::diag!(
                "loopguard: {id} is a thread of process {pid} ({}); watching process {pid}",
                proc::thread_name(pid, id)
            );
            pid
        }
        _ => id,
    }
}

/// `loopguard attach`.
pub fn attach(args: &AttachArgs) -> Result<i32, Error> {
    let settings = Settings::resolve(&args.watch, None, None)?;
    preflight::check()?;
    let mut options = watch_options(&settings);
    apply_stack_args(&mut options, &args.watch.stacks);
    let listener = bind_metrics(&settings)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let pid = process_to_watch(args.pid);
        let (target, mut probes, tools) = prepare(pid, &options)?;
        serve_metrics(
            listener,
            &settings,
            &target,
            probes.probe_count,
            &mut options,
        )?;
        let duration = settings.duration_s.map(i64::unsigned_abs);
        // A handler that cannot be installed is an error: a stop future
        // that never completes would leave the probes in until SIGKILL.
        let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signals)?;
        let stop = async move {
            tokio::select! {
                _ = interrupt.recv() => StopReason::Interrupted,
                _ = terminate.recv() => StopReason::Interrupted,
                () = sleep_for(duration) => StopReason::DurationElapsed,
            }
        };
        let collector = announce(&target, &mut probes, &options)?;
        watch_and_detach((target, probes, tools), collector, &options, stop).await?;
        Ok(0)
    })
}

async fn sleep_for(secs: Option<u64>) {
    match secs {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

/// Signals `loopguard run` passes on to its command.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Kills and reaps the command `run` could not watch: never leave a
/// stopped, traced child behind. Returns `error`.
fn abandon(stopped: launch::StoppedChild, error: Error) -> Error {
    let mut child = stopped.child;
    let _ = child.kill();
    let _ = child.wait();
    error
}

/// `loopguard run`.
pub fn run(args: &RunArgs) -> Result<i32, Error> {
    let settings = Settings::resolve(&args.watch, None, fail_on_flags(args).as_deref())?;
    preflight::check()?;
    let mut options = watch_options(&settings);
    apply_stack_args(&mut options, &args.watch.stacks);
    let listener = bind_metrics(&settings)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        // Handlers first: a signal in the first moments must be forwarded,
        // not kill loopguard by its default action.
        let mut forwarded = Vec::with_capacity(FORWARDED.len());
        for signo in FORWARDED {
            let incoming = signal(SignalKind::from_raw(signo)).map_err(Error::Signals)?;
            forwarded.push((signo, incoming));
        }
        let stopped = launch::launch_stopped(&args.command)?;
        let pid = stopped.pid();
        let prepared = prepare(pid, &options);
        let (target, mut probes, tools) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => return Err(abandon(stopped, error)),
        };
        let started = serve_metrics(
            listener,
            &settings,
            &target,
            probes.probe_count,
            &mut options,
        )
        .and_then(|()| announce(&target, &mut probes, &options));
        let collector = match started {
            Ok(collector) => collector,
            Err(error) => return Err(abandon(stopped, error)),
        };
        // Opened while the child is stopped and unreaped: it names this
        // process for good, so no forwarded signal reaches a recycled pid.
        let pidfd = match crate::pidfd::Pidfd::open(pid) {
            Ok(pidfd) => Arc::new(pidfd),
            Err(error) => return Err(abandon(stopped, Error::Signals(error))),
        };
        let mut child = stopped.resume()?;
        let (exit_tx, mut exit_rx) = tokio::sync::watch::channel(None);
        std::thread::spawn(move || {
            let _ = exit_tx.send(Some(child.wait().ok()));
        });
        for (signo, mut incoming) in forwarded {
            let pidfd = Arc::clone(&pidfd);
            tokio::spawn(async move {
                while incoming.recv().await.is_some() {
                    // ESRCH once the command has exited: nothing to forward to.
                    let _ = pidfd.signal(signo);
                }
            });
        }
        let duration = settings.duration_s.map(i64::unsigned_abs);
        let mut child_exit = exit_rx.clone();
        // Set when --duration's SIGTERM goes out. The watch loop may see the
        // child die (and stop) before this future returns, so the stop reason
        // cannot tell.
        let terminated_by_us = Arc::new(AtomicBool::new(false));
        let terminating = Arc::clone(&terminated_by_us);
        let stop = async move {
            let exited = child_exit.wait_for(Option::is_some);
            let timed_out = if let Some(secs) = duration {
                tokio::time::timeout(Duration::from_secs(secs), exited)
                    .await
                    .is_err()
            } else {
                let _ = exited.await;
                false
            };
            if !timed_out {
                return StopReason::TargetExited;
            }
            // --duration ends the command: SIGTERM, then wait for it to go.
            terminating.store(true, Ordering::SeqCst);
            let _ = pidfd.signal(libc::SIGTERM);
            let _ = child_exit.wait_for(Option::is_some).await;
            StopReason::DurationElapsed
        };
        let outcome = watch_and_detach((target, probes, tools), collector, &options, stop).await?;
        let status = exit_rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|status| status.flatten());
        let code = status.map_or(1, |status| {
            // A command ended by --duration's own SIGTERM ran as asked.
            let ended_by_us =
                terminated_by_us.load(Ordering::SeqCst) && status.signal() == Some(libc::SIGTERM);
            if ended_by_us {
                0
            } else {
                launch::exit_code(status)
            }
        });
        let block = outcome.offending.block(&settings.fail_on);
        if let Some(block) = &block {
            crate::diag!("{block}");
        }
        Ok(if block.is_some() && code == 0 {
            EXIT_STALL
        } else {
            code
        })
    })
}
