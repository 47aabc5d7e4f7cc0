use std::process::ExitCode;

use clap::Parser;
use loopguard::cli::commands;
use loopguard::config::args::{Cli, Command};
use loopguard::error::EXIT_RUN_FAILED;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        // Plain text: the writer escapes every control character.
        .with_ansi(false)
        .with_writer(loopguard::term::LogWriter)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            let code = if error.use_stderr() && invoked_as_run() {
                EXIT_RUN_FAILED
            } else {
                error.exit_code()
            };
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
    };
    let run = matches!(cli.command, Command::Run(_));
    let result = match &cli.command {
        Command::Attach(args) => commands::attach(args),
        Command::Run(args) => commands::run(args),
        Command::Watch(args) => loopguard::cli::host::watch_all(args),
        Command::Config(args) => commands::config(args),
        Command::Report(args) => commands::report(args),
    };
    loopguard::present::record::finish(std::time::Duration::from_secs(5));
    let lost = loopguard::present::output::finish(std::time::Duration::from_secs(2));
    if lost > 0 {
        loopguard::diag!(
            "loopguard: {lost} report line(s) not written: stdout was not read fast enough, or not at all"
        );
    }
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(error) => {
            loopguard::diag!("loopguard: error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                loopguard::diag!("  caused by: {cause}");
                source = cause.source();
            }
            let code = if run {
                error.run_exit_code()
            } else {
                error.exit_code()
            };
            ExitCode::from(code as u8)
        }
    }
}

/// Whether the subcommand on the command line is `run` (its first word
/// that is not an option), for the exit code of a usage error.
fn invoked_as_run() -> bool {
    std::env::args_os()
        .skip(1)
        .find(|arg| !arg.to_string_lossy().starts_with('-'))
        .is_some_and(|arg| arg == "run")
}
