//! The top-level error and its exit code.

use std::io;

use crate::attach::AttachError;
use crate::collect::CollectError;
use crate::config::ConfigError;
use crate::discover::DiscoverError;
use crate::discover::preflight::PreflightError;
use crate::export::ExportError;

/// Exit code: a runtime failure.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad arguments or configuration (as clap's own).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: `--fail-on` and what it names was seen.
pub const EXIT_STALL: i32 = 3;
/// Exit code: the target cannot be profiled.
pub const EXIT_TARGET: i32 = 4;
/// Exit code: privileges or kernel.
pub const EXIT_ENVIRONMENT: i32 = 5;

/// `loopguard run` exits with its command's code (128 + N when signal N
/// ended it), so its own failures use the codes `env`, `nohup` and
/// `timeout` use, which a command's own exit code 2 (or 4, 5) cannot be
/// taken for: loopguard itself failed (bad arguments, cannot attach,
/// privileges; the message on stderr says which).
pub const EXIT_RUN_FAILED: i32 = 125;
/// `loopguard run`: the command was found but cannot be executed.
pub const EXIT_RUN_CANNOT_EXECUTE: i32 = 126;
/// `loopguard run`: the command was not found.
pub const EXIT_RUN_NOT_FOUND: i32 = 127;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Collect(#[from] CollectError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error(transparent)]
    Record(#[from] crate::present::record::RecordError),
    #[error(transparent)]
    Replay(#[from] crate::present::replay::ReplayError),
    #[error("failed to start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("failed to install the signal handlers loopguard forwards signals with")]
    Signals(#[source] std::io::Error),
}

impl Error {
    /// The exit code of `loopguard run` failing with this error (see
    /// [`EXIT_RUN_FAILED`]).
    pub fn run_exit_code(&self) -> i32 {
        match self {
            Self::Launch(LaunchError::Spawn { source, .. }) => match source.kind() {
                std::io::ErrorKind::NotFound => EXIT_RUN_NOT_FOUND,
                _ => EXIT_RUN_CANNOT_EXECUTE,
            },
            _ => EXIT_RUN_FAILED,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Preflight(_) | Self::Discover(DiscoverError::Permission { .. }) => {
                EXIT_ENVIRONMENT
            }
            Self::Discover(_)
            | Self::Launch(LaunchError::Spawn { .. })
            | Self::Attach(AttachError::ProcessExited { .. }) => EXIT_TARGET,
            Self::Config(_)
            | Self::Record(_)
            | Self::Replay(_)
            | Self::Export(ExportError::BadAddress { .. } | ExportError::InUse { .. }) => {
                EXIT_USAGE
            }
            Self::Attach(_)
            | Self::Collect(_)
            | Self::Launch(_)
            | Self::Export(_)
            | Self::Follow(_)
            | Self::Runtime(_)
            | Self::Signals(_) => EXIT_FAILURE,
        }
    }
}

/// `loopguard run` failed to follow its command (defined here, not in
/// [`crate::follow`], so this module stays below the stages that return it).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("failed to load the exec-following programs")]
    Attach(#[from] AttachError),
    #[error("failed to open map `{name}` of the exec-following programs")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to wait for exec events")]
    Poll(#[source] std::io::Error),
    #[error("failed to start the watchdog that resumes stopped processes if loopguard dies")]
    Watchdog(#[source] std::io::Error),
    #[error(
        "inspecting and attaching to pid {pid} took longer than {secs} s; it was resumed and runs unwatched (RUST_LOG=debug shows the step it was on)"
    )]
    DiscoveryTimeout { pid: u32, secs: u64 },
}

/// `loopguard run` failed to start its command.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("failed to start `{program}`; check that it exists and is executable")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("`{program}` did not stop after exec as expected ({detail})")]
    NoStop { program: String, detail: String },
    #[error(transparent)]
    RunAs(#[from] crate::config::run_as::RunAsError),
    #[error("failed to resume `{program}` (pid {pid})")]
    Resume {
        program: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_failures_cannot_be_taken_for_a_command_exit_code() {
        let spawn = |kind| {
            Error::Launch(LaunchError::Spawn {
                program: "app".into(),
                source: std::io::Error::from(kind),
            })
        };
        assert_eq!(
            spawn(std::io::ErrorKind::NotFound).run_exit_code(),
            EXIT_RUN_NOT_FOUND
        );
        assert_eq!(
            spawn(std::io::ErrorKind::PermissionDenied).run_exit_code(),
            EXIT_RUN_CANNOT_EXECUTE
        );
        let usage = Error::Config(ConfigError::UnknownKey {
            key: "x".into(),
            suggestion: None,
        });
        assert_eq!(usage.exit_code(), EXIT_USAGE);
        assert_eq!(usage.run_exit_code(), EXIT_RUN_FAILED);
        assert_eq!(
            Error::Discover(DiscoverError::Permission { pid: 1 }).run_exit_code(),
            EXIT_RUN_FAILED
        );
    }

    #[test]
    fn exit_codes_follow_the_kind_of_problem() {
        assert_eq!(
            Error::Discover(DiscoverError::NoSuchProcess { pid: 1 }).exit_code(),
            EXIT_TARGET
        );
        assert_eq!(
            Error::Discover(DiscoverError::Permission { pid: 1 }).exit_code(),
            EXIT_ENVIRONMENT
        );
        assert_eq!(
            Error::Preflight(PreflightError::KernelTooOld {
                release: "4.0".into()
            })
            .exit_code(),
            EXIT_ENVIRONMENT
        );
        assert_eq!(
            Error::Attach(AttachError::ProcessExited { pid: 1 }).exit_code(),
            EXIT_TARGET
        );
        assert_eq!(
            Error::Config(ConfigError::UnknownKey {
                key: "x".into(),
                suggestion: None
            })
            .exit_code(),
            EXIT_USAGE
        );
    }
}
