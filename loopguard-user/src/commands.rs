//! The two subcommands, from parsed arguments to an exit code.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::agent::{self, StopReason, WatchOptions};
use crate::attach::{self, AttachedProbes};
use crate::cli::{AttachArgs, RunArgs, WatchArgs};
use crate::collect::Collector;
use crate::discover::{self, ProbeTarget};
use crate::error::{EXIT_STALL, Error};
use crate::export::server;
use crate::export::{Metrics, TargetInfo};
use crate::launch;
use crate::preflight;
use crate::stacks::{StackTools, Stacks};

fn watch_options(args: &WatchArgs) -> WatchOptions {
    WatchOptions {
        threshold_ns: args.threshold_ms * 1_000_000,
        format: args.format,
        scan_interval: Duration::from_millis(args.scan_interval_ms),
        requests: !args.no_requests,
        metrics: None,
        loop_threads: args.loop_threads.clone(),
        wait_probes: args.wait_probes,
        capture_stacks: !args.stacks.no_stacks,
        stacks: crate::stacks::StackOptions {
            arm_delay_ns: args.threshold_ms * 1_000_000 / 2,
            all_frames: args.stacks.all_frames,
        },
        folded: args.stacks.folded.clone(),
    }
}

/// Binds `--metrics-addr` before anything is attached or started, so a bad
/// address or a port in use fails first.
fn bind_metrics(args: &WatchArgs) -> Result<Option<std::net::TcpListener>, Error> {
    let Some(addr) = &args.metrics_addr else {
        return Ok(None);
    };
    Ok(Some(server::bind(server::parse_addr(addr)?)?))
}

/// Starts serving `/metrics` for `target` (inside the runtime).
fn serve_metrics(
    listener: Option<std::net::TcpListener>,
    args: &WatchArgs,
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
        args.metrics_max_routes,
    ));
    metrics.set_probes(probes);
    if let Ok(addr) = listener.local_addr() {
        eprintln!("loopguard: serving Prometheus metrics at http://{addr}/metrics");
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
    let tools = options.capture_stacks.then(|| StackTools::prepare(pid));
    let probes = attach::attach(
        &target,
        options.threshold_ns,
        options.requests,
        options.wait_probes,
        options.capture_stacks,
    )?;
    tracing::info!(probes = probes.probe_count, "attached");
    Ok((target, probes, tools))
}

/// Watches, then detaches and prints the summary; returns the stall count.
async fn watch_and_detach(
    (target, mut probes, tools): Prepared,
    options: &WatchOptions,
    stop: impl Future<Output = StopReason>,
) -> Result<u64, Error> {
    let mut collector = Collector::new(&mut probes.ebpf)?;
    let stacks = if let Some(tools) = tools.filter(|_| probes.stacks) {
        Stacks::new(&mut probes.ebpf, tools, options.stacks)
            .inspect_err(|error| tracing::warn!(%error, "stalls are reported without stacks"))
            .ok()
    } else {
        None
    };
    agent::print_attached(&target, probes.probe_count, probes.wait_path, options);
    let outcome = agent::watch(&target, &mut collector, stacks, options, stop).await?;
    agent::print_summary(&outcome, target.pid, options);
    let total = probes.probe_count;
    let started = std::time::Instant::now();
    probes.detach(|done, total| {
        if done == total {
            eprintln!(
                "loopguard: detached: all {total} probes removed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        } else {
            eprintln!("loopguard: detaching: {done}/{total} probes removed");
        }
    });
    tracing::info!(reason = ?outcome.reason, probes = total, "detached");
    Ok(outcome.summary.stalls)
}

/// `loopguard attach`.
pub fn attach(args: &AttachArgs) -> Result<i32, Error> {
    preflight::check()?;
    let mut options = watch_options(&args.watch);
    let listener = bind_metrics(&args.watch)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let (target, probes, tools) = prepare(args.pid, &options)?;
        serve_metrics(
            listener,
            &args.watch,
            &target,
            probes.probe_count,
            &mut options,
        )?;
        let duration = args.watch.duration;
        let stop = async move {
            let (Ok(mut interrupt), Ok(mut terminate)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = interrupt.recv() => StopReason::Interrupted,
                _ = terminate.recv() => StopReason::Interrupted,
                () = sleep_for(duration) => StopReason::DurationElapsed,
            }
        };
        watch_and_detach((target, probes, tools), &options, stop).await?;
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

/// `loopguard run`.
pub fn run(args: &RunArgs) -> Result<i32, Error> {
    preflight::check()?;
    let mut options = watch_options(&args.watch);
    let listener = bind_metrics(&args.watch)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let stopped = launch::launch_stopped(&args.command)?;
        let pid = stopped.pid();
        let prepared = prepare(pid, &options);
        let (target, probes, tools) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                // Never leave a stopped, traced child behind.
                let mut child = stopped.child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(error);
            }
        };
        if let Err(error) = serve_metrics(
            listener,
            &args.watch,
            &target,
            probes.probe_count,
            &mut options,
        ) {
            let mut child = stopped.child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        let mut child = stopped.resume()?;
        let (exit_tx, mut exit_rx) = tokio::sync::watch::channel(None);
        std::thread::spawn(move || {
            let _ = exit_tx.send(Some(child.wait().ok()));
        });
        for signo in FORWARDED {
            let Ok(mut incoming) = signal(SignalKind::from_raw(signo)) else {
                continue;
            };
            tokio::spawn(async move {
                while incoming.recv().await.is_some() {
                    // SAFETY: sending a signal to our own child.
                    unsafe { libc::kill(pid as libc::pid_t, signo) };
                }
            });
        }
        let duration = args.watch.duration;
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
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let _ = child_exit.wait_for(Option::is_some).await;
            StopReason::DurationElapsed
        };
        let stalls = watch_and_detach((target, probes, tools), &options, stop).await?;
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
        Ok(if args.fail_on_stall && stalls > 0 && code == 0 {
            EXIT_STALL
        } else {
            code
        })
    })
}
