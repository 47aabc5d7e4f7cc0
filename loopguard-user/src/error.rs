//! The top-level error and its exit code.

use crate::attach::AttachError;
use crate::collect::CollectError;
use crate::config::ConfigError;
use crate::discover::DiscoverError;
use crate::export::ExportError;
use crate::follow::FollowError;
use crate::launch::LaunchError;
use crate::preflight::PreflightError;

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
    Record(#[from] crate::record::RecordError),
    #[error(transparent)]
    Replay(#[from] crate::replay::ReplayError),
    #[error("failed to start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("failed to install the signal handlers loopguard forwards signals with")]
    Signals(#[source] std::io::Error),
}

impl Error {
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

#[cfg(test)]
mod tests {
    use super::*;

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
