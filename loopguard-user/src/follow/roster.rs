//! What happened to each process loopguard followed: attached (with the
//! time the process waited, stopped, for its probes) or skipped, and why.
//! Printed at the end of `loopguard run`, where a CI log reader looks.

use crate::attach::AttachError;
use crate::discover::DiscoverError;
use crate::error::Error;

/// Why a process was not watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a Tokio program (or not one loopguard can read): resumed at once.
    NotTokio(String),
    /// Tokio, but not probeable as built (stripped, too old a Tokio).
    Unprobeable(String),
    /// Gone before it could be inspected or attached to.
    ExitedTooFast,
    /// Attaching failed for another reason.
    Failed(String),
}

impl Skip {
    /// Sorts an error met while inspecting or attaching to a process.
    pub fn from_error(error: &Error) -> Self {
        match error {
            Error::Discover(
                DiscoverError::NoSuchProcess { .. }
                | DiscoverError::Exiting { .. }
                | DiscoverError::NotMapped { .. },
            )
            | Error::Attach(AttachError::ProcessExited { .. }) => Self::ExitedTooFast,
            Error::Discover(DiscoverError::ReadExe { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Self::ExitedTooFast
            }
            Error::Discover(DiscoverError::NoEventLoop { why, .. }) => Self::NotTokio(why.clone()),
            Error::Discover(DiscoverError::Binary { source, .. }) => {
                Self::NotTokio(format!("not an ELF program loopguard can read ({source})"))
            }
            Error::Discover(
                error @ (DiscoverError::Stripped { .. } | DiscoverError::NoTaskPoll { .. }),
            ) => Self::Unprobeable(error.to_string()),
            other => Self::Failed(other.to_string()),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::NotTokio(_) => "not_tokio",
            Self::Unprobeable(_) => "unprobeable",
            Self::ExitedTooFast => "exited",
            Self::Failed(_) => "failed",
        }
    }

    fn why(&self) -> String {
        match self {
            Self::NotTokio(why) => format!("not Tokio: {why}"),
            Self::Unprobeable(why) | Self::Failed(why) => why.clone(),
            Self::ExitedTooFast => "exited before it could be inspected".to_owned(),
        }
    }
}

/// One exec of one process (a process that execs twice appears twice).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub pid: u32,
    pub exe: String,
    pub outcome: Result<Attached, Skip>,
}

/// An attached process.
#[derive(Clone, Debug, PartialEq)]
pub struct Attached {
    pub probes: usize,
    /// From its exec to its resume (it ran nothing meanwhile); `None`
    /// for the command itself, held by ptrace since before loopguard
    /// followed anything.
    pub stopped_ms: Option<f64>,
}

/// Every process followed, in order.
#[derive(Debug, Default)]
pub struct Roster {
    pub entries: Vec<Entry>,
}

impl Roster {
    pub fn attached(&mut self, pid: u32, exe: &str, attached: Attached) {
        self.entries.push(Entry {
            pid,
            exe: exe.to_owned(),
            outcome: Ok(attached),
        });
    }

    pub fn skipped(&mut self, pid: u32, exe: &str, skip: Skip) {
        self.entries.push(Entry {
            pid,
            exe: exe.to_owned(),
            outcome: Err(skip),
        });
    }

    pub fn attached_count(&self) -> usize {
        self.entries.iter().filter(|e| e.outcome.is_ok()).count()
    }

    /// The block printed at the end (stderr).
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The block's lines, each printed on its own (every line a target
    /// string is in gets its control characters escaped).
    pub fn lines(&self) -> Vec<String> {
        let attached = self.attached_count();
        let mut out = vec![format!(
            "loopguard: followed {} program(s): {attached} attached, {} skipped",
            self.entries.len(),
            self.entries.len() - attached
        )];
        for entry in &self.entries {
            let exe = crate::term::printable(&entry.exe);
            out.push(match &entry.outcome {
                Ok(a) => format!(
                    "  attached  pid {} {exe}: {} probes{}",
                    entry.pid,
                    a.probes,
                    a.stopped_ms
                        .map(|ms| format!(", held stopped {ms:.1} ms at exec while attaching"))
                        .unwrap_or_default()
                ),
                Err(skip) => format!("  skipped   pid {} {exe}: {}", entry.pid, skip.why()),
            });
        }
        out
    }

    /// The `followed` event.
    pub fn event(&self) -> crate::events::Event {
        use crate::events::{Followed, FollowedProcess};
        let entry = |e: &Entry| match &e.outcome {
            Ok(a) => FollowedProcess {
                pid: e.pid,
                exe: e.exe.clone(),
                probes: Some(a.probes),
                stopped_ms: a.stopped_ms.map(|ms| (ms * 1000.0).round() / 1000.0),
                reason: None,
                why: None,
            },
            Err(skip) => FollowedProcess {
                pid: e.pid,
                exe: e.exe.clone(),
                probes: None,
                stopped_ms: None,
                reason: Some(skip.kind().to_owned()),
                why: Some(skip.why()),
            },
        };
        crate::events::Event::Followed(Followed {
            attached: self
                .entries
                .iter()
                .filter(|e| e.outcome.is_ok())
                .map(entry)
                .collect(),
            skipped: self
                .entries
                .iter()
                .filter(|e| e.outcome.is_err())
                .map(entry)
                .collect(),
        })
    }
}

pub use crate::present::emit::label;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roster_says_who_was_attached_and_why_others_were_skipped() {
        let mut roster = Roster::default();
        roster.skipped(
            10,
            "/usr/bin/cargo",
            Skip::NotTokio("no Tokio symbols".into()),
        );
        roster.attached(
            11,
            "/t/deps/api-1a2b",
            Attached {
                probes: 40,
                stopped_ms: Some(31.25),
            },
        );
        roster.skipped(12, "/bin/true", Skip::ExitedTooFast);
        let text = roster.text();
        assert!(
            text.contains("3 program(s): 1 attached, 2 skipped"),
            "{text}"
        );
        assert!(
            text.contains("attached  pid 11 /t/deps/api-1a2b: 40 probes, held stopped 31.2 ms"),
            "{text}"
        );
        assert!(
            text.contains("skipped   pid 10 /usr/bin/cargo: not Tokio: no Tokio symbols"),
            "{text}"
        );
        assert!(
            text.contains("pid 12 /bin/true: exited before it could be inspected"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&roster.event().to_json()).unwrap();
        assert_eq!(json["type"], "followed");
        assert_eq!(json["attached"][0]["pid"], 11);
        assert_eq!(json["skipped"][1]["reason"], "exited");
    }

    #[test]
    fn errors_sort_into_reasons() {
        let gone = Error::Discover(DiscoverError::NoSuchProcess { pid: 1 });
        assert_eq!(Skip::from_error(&gone), Skip::ExitedTooFast);
        let exited = Error::Attach(AttachError::ProcessExited { pid: 1 });
        assert_eq!(Skip::from_error(&exited), Skip::ExitedTooFast);
        let sh = Error::Discover(DiscoverError::NoEventLoop {
            pid: 1,
            path: "/bin/sh".into(),
            why: "no Tokio symbols, and it has no epoll instance open".into(),
        });
        assert!(
            matches!(Skip::from_error(&sh), Skip::NotTokio(why) if why.starts_with("no Tokio"))
        );
        let stripped = Error::Discover(DiscoverError::Stripped {
            pid: 1,
            path: "/srv/api".into(),
        });
        assert!(
            matches!(Skip::from_error(&stripped), Skip::Unprobeable(why) if why.contains("stripped"))
        );
    }

    #[test]
    fn labels_name_the_program_not_its_directory() {
        assert_eq!(label(7, "/t/debug/deps/api-1a2b"), "[pid 7 api-1a2b]");
        assert_eq!(label(7, "x\u{1b}]0;y"), "[pid 7 x\\u{1b}]0;y]");
    }
}
