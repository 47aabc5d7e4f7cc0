//! The two subcommands, from parsed arguments to an exit code.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::attach;
use crate::config::Settings;
use crate::config::args::{AttachArgs, ConfigArgs, RunArgs};
use crate::detect::FailOn;
use crate::discover::preflight;
use crate::discover::{ProbeTarget, proc};
use crate::error::{EXIT_STALL, EXIT_TARGET, Error};
use crate::export::server;
use crate::export::{Metrics, TargetInfo};
use crate::follow::launch;
use crate::follow::roster::{Attached, Skip};
use crate::follow::supervise::{Mode, Supervisor};
use crate::follow::watchdog::FORWARDED;
use crate::present::alerts::Offending;
use crate::watch::setup::{announce, prepare};
use crate::watch::{StopReason, WatchOptions};

fn watch_options(settings: &Settings) -> WatchOptions {
    WatchOptions {
        detect: settings.detect(),
        routes: settings.route_filter(),
        format: settings.format,
        scan_interval: Duration::from_millis(settings.scan_interval_ms.unsigned_abs()),
        requests: settings.requests,
        metrics: None,
        wait_probes: settings.wait_probes,
        probe_links: settings.probe_links,
        capture_stacks: settings.stacks.enabled,
        stacks: crate::stacks::StackOptions {
            arm_delay_ns: settings.detect().report_floor_ns() / 2,
            all_frames: settings.stacks.all_frames,
        },
        folded: settings.stacks.folded.clone(),
        bench: attach::Bench::default(),
        label: false,
    }
}

/// The watch options of `attach` and `run`; starts colour, the status line
/// and the recording before anything is attached (a recording that cannot
/// be made fails first).
pub(crate) fn start_watch(
    settings: &Settings,
    output: &crate::config::args::OutputArgs,
) -> Result<WatchOptions, Error> {
    let options = watch_options(settings);
    crate::term::setup(output.color, true);
    if let Some(path) = &output.record {
        crate::present::record::open(path)?;
    }
    // Emptied once: each watched process appends its stacks at its end.
    if let Some(path) = &options.folded
        && let Err(error) = crate::present::outfile::create(path)
    {
        crate::diag!(
            "loopguard: error: cannot write the folded stacks to {}: {error}; check the directory exists and is writable",
            path.display()
        );
    }
    Ok(options)
}

/// `loopguard report`: a recording shown again.
pub fn report(args: &crate::config::args::ReportArgs) -> Result<i32, Error> {
    crate::term::setup(args.color, false);
    crate::privilege::drop_to(crate::privilege::FILES);
    crate::cli::report::report(args)?;
    Ok(0)
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
pub(crate) fn bind_metrics(settings: &Settings) -> Result<Option<std::net::TcpListener>, Error> {
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

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
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
    let listener = bind_metrics(&settings)?;
    let mut options = start_watch(&settings, &args.output)?;
    options.bench = attach::Bench {
        empty_programs: args.bench_empty_programs,
        entry_only: args.bench_entry_only,
    };
    crate::privilege::drop_to(crate::privilege::WATCH);
    let runtime = runtime()?;
    let local = tokio::task::LocalSet::new();
    runtime.block_on(local.run_until(async {
        let pid = process_to_watch(args.pid);
        // Following first: an exec while attaching is not missed.
        let mut supervisor = Supervisor::start(pid, Mode::Attach, true, &options)?;
        let (target, mut probes, tools) = prepare(pid, &options)?;
        serve_metrics(
            listener,
            &settings,
            &target,
            probes.probe_count,
            &mut options,
        )?;
        let stop = stop_on_signal_or(settings.duration_s.map(i64::unsigned_abs))?;
        let collector = announce(&target, &mut probes, &options)?;
        supervisor.watch((target, probes, tools), collector, options.clone());
        supervisor.run_until(stop).await?;
        for finished in std::mem::take(&mut supervisor.finished) {
            finished.outcome?;
        }
        if let Some(why) = &supervisor.gave_up {
            crate::diag!("loopguard: error: {why}");
            return Ok(EXIT_TARGET);
        }
        Ok(0)
    }))
}

/// Resolves on Ctrl+C or SIGTERM (`Interrupted`), or after `duration`
/// seconds. A handler that cannot be installed is an error: a stop future
/// that never completes would leave the probes in until SIGKILL.
pub(crate) fn stop_on_signal_or(
    duration: Option<u64>,
) -> Result<impl std::future::Future<Output = StopReason>, Error> {
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => StopReason::Interrupted,
            _ = terminate.recv() => StopReason::Interrupted,
            () = sleep_for(duration) => StopReason::DurationElapsed,
        }
    })
}

async fn sleep_for(secs: Option<u64>) {
    match secs {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

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
    let run_as = crate::config::run_as::command_identity(args.user.as_deref(), args.as_root)
        .map_err(launch::LaunchError::from)?;
    preflight::check()?;
    let listener = bind_metrics(&settings)?;
    let mut options = start_watch(&settings, &args.output)?;
    let follow = !args.no_follow;
    options.label = follow;
    let runtime = runtime()?;
    let local = tokio::task::LocalSet::new();
    runtime.block_on(local.run_until(async {
        // Handlers first: a signal in the first moments must be forwarded,
        // not kill loopguard by its default action.
        let forwarded = signal_handlers()?;
        let stopped = launch::launch_stopped(&args.command, run_as.as_ref())?;
        // Started (as its user): setuid and setgid are not needed any more.
        crate::privilege::drop_to(crate::privilege::WATCH);
        let pid = stopped.pid();
        // Following starts while the command is stopped: nothing it forks
        // or execs is missed.
        let mut supervisor = match Supervisor::start(pid, Mode::Run, follow, &options) {
            Ok(supervisor) => supervisor,
            Err(error) => return Err(abandon(stopped, error.into())),
        };
        if let Err(error) = watch_command(&mut supervisor, pid, listener, &settings, &mut options) {
            return Err(abandon(stopped, error));
        }
        // Opened while the child is stopped and unreaped: it names this
        // process for good, so no forwarded signal reaches a recycled pid.
        let pidfd = match crate::follow::pidfd::Pidfd::open(pid) {
            Ok(pidfd) => Arc::new(pidfd),
            Err(error) => return Err(abandon(stopped, Error::Signals(error))),
        };
        let mut child = stopped.resume()?;
        let (exit_tx, mut exit_rx) = tokio::sync::watch::channel(None);
        std::thread::spawn(move || {
            let _ = exit_tx.send(Some(child.wait().ok()));
        });
        forward_signals(forwarded, &pidfd);
        // Set when --duration's SIGTERM goes out. The watch loop may see the
        // child die (and stop) before this future returns, so the stop reason
        // cannot tell.
        let terminated_by_us = Arc::new(AtomicBool::new(false));
        let stop = command_stop(
            exit_rx.clone(),
            settings.duration_s.map(i64::unsigned_abs),
            pidfd,
            Arc::clone(&terminated_by_us),
        );
        supervisor.run_until(stop).await?;
        let status = exit_rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|status| status.flatten());
        let code = command_exit_code(status, terminated_by_us.load(Ordering::SeqCst));
        finish_run(&mut supervisor, &settings, code)
    }))
}

/// The exit code `run` passes on from its command (1 when its status could
/// not be read); `terminated_by_us`: --duration sent it SIGTERM.
fn command_exit_code(status: Option<std::process::ExitStatus>, terminated_by_us: bool) -> i32 {
    status.map_or(1, |status| {
        // A command ended by --duration's own SIGTERM ran as asked.
        if terminated_by_us && status.signal() == Some(libc::SIGTERM) {
            0
        } else {
            launch::exit_code(status)
        }
    })
}

/// A handler for each signal `run` forwards to its command.
fn signal_handlers() -> Result<Vec<(i32, tokio::signal::unix::Signal)>, Error> {
    FORWARDED
        .into_iter()
        .map(|signo| {
            Ok((
                signo,
                signal(SignalKind::from_raw(signo)).map_err(Error::Signals)?,
            ))
        })
        .collect()
}

/// Forwards each signal loopguard receives to the command (through its
/// pidfd, so never to a recycled pid).
fn forward_signals(
    forwarded: Vec<(i32, tokio::signal::unix::Signal)>,
    pidfd: &Arc<crate::follow::pidfd::Pidfd>,
) {
    for (signo, mut incoming) in forwarded {
        let pidfd = Arc::clone(pidfd);
        tokio::spawn(async move {
            while incoming.recv().await.is_some() {
                // ESRCH once the command has exited: nothing to forward to.
                let _ = pidfd.signal(signo);
            }
        });
    }
}

/// When `run`'s watch stops: the command exited, or `duration_s` passed
/// and the command, sent SIGTERM (`terminating` set), has gone.
#[expect(
    clippy::option_option,
    reason = "the exit channel: not yet exited, or exited with a status that may not have been read"
)]
async fn command_stop(
    mut child_exit: tokio::sync::watch::Receiver<Option<Option<std::process::ExitStatus>>>,
    duration_s: Option<u64>,
    pidfd: Arc<crate::follow::pidfd::Pidfd>,
    terminating: Arc<AtomicBool>,
) -> StopReason {
    let exited = child_exit.wait_for(Option::is_some);
    let timed_out = if let Some(secs) = duration_s {
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
}

/// Attaches to `run`'s command, stopped after exec; a program loopguard
/// does not watch (a shell, cargo) is skipped when following, to watch
/// what it starts.
fn watch_command(
    supervisor: &mut Supervisor,
    pid: u32,
    listener: Option<std::net::TcpListener>,
    settings: &Settings,
    options: &mut WatchOptions,
) -> Result<(), Error> {
    match prepare(pid, options) {
        Ok((target, mut probes, tools)) => {
            serve_metrics(listener, settings, &target, probes.probe_count, options)?;
            let collector = announce(&target, &mut probes, options)?;
            supervisor.roster.attached(
                pid,
                &target.exe.display_path,
                Attached {
                    probes: probes.probe_count,
                    stopped_ms: None,
                },
            );
            supervisor.watch((target, probes, tools), collector, options.clone());
            Ok(())
        }
        Err(error) if supervisor.following() && skippable(&error) => {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map_or_else(|_| "?".to_owned(), |p| p.display().to_string());
            crate::diag!(
                "loopguard: {} is not watched ({}); following the programs it starts",
                crate::term::printable(&exe),
                first_clause(&error.to_string())
            );
            supervisor
                .roster
                .skipped(pid, &exe, Skip::from_error(&error));
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// The end of `run`: who was watched, the offending events in one block,
/// and the exit code.
fn finish_run(supervisor: &mut Supervisor, settings: &Settings, code: i32) -> Result<i32, Error> {
    let mut offending = Offending::default();
    for finished in std::mem::take(&mut supervisor.finished) {
        offending.merge(finished.outcome?.offending);
    }
    if supervisor.following() {
        if settings.format == crate::present::text::Format::Json {
            crate::present::emit::event(&supervisor.roster.event(), settings.format);
        }
        for line in supervisor.roster.lines() {
            crate::diag!("{line}");
        }
    }
    let block = offending.block(&settings.fail_on);
    if let Some(block) = &block {
        // One diagnostic per line: a diagnostic escapes line ends, and the
        // block's (a stall's cause and stack under its line) are its own;
        // what the target named in them was escaped when they were made.
        for line in block.lines() {
            crate::diag!("{line}");
        }
    }
    let watched_nothing = supervisor.roster.attached_count() == 0;
    if watched_nothing {
        crate::diag!(
            "loopguard: error: no program the command ran could be watched (see above); loopguard watches Tokio programs built with symbols"
        );
    }
    Ok(exit_code(code, block.is_some(), watched_nothing))
}

/// `run`'s exit code: the command's own when it failed; else 3 when what
/// `--fail-on` names was seen, 125 (loopguard failed) when nothing could be
/// watched, 0.
fn exit_code(command: i32, offended: bool, watched_nothing: bool) -> i32 {
    if command != 0 {
        command
    } else if offended {
        EXIT_STALL
    } else if watched_nothing {
        crate::error::EXIT_RUN_FAILED
    } else {
        0
    }
}

/// Errors that make `run` skip its command and follow what it starts.
fn skippable(error: &Error) -> bool {
    matches!(
        Skip::from_error(error),
        Skip::NotTokio(_) | Skip::Unprobeable(_)
    )
}

/// The message up to its first `;` (the advice after it is for `attach`).
fn first_clause(message: &str) -> &str {
    message.split(';').next().unwrap_or(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_exit_codes_put_the_command_first() {
        assert_eq!(exit_code(101, true, false), 101);
        assert_eq!(exit_code(0, true, false), EXIT_STALL);
        assert_eq!(exit_code(0, false, true), crate::error::EXIT_RUN_FAILED);
        assert_eq!(exit_code(0, true, true), EXIT_STALL);
        assert_eq!(exit_code(0, false, false), 0);
        assert_eq!(exit_code(2, false, false), 2);
    }
}
