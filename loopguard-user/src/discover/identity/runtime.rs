//! The event-loop runtime a process runs, as far as its executable's
//! name tells (interpreters); Tokio is told from the binary itself
//! (`discover::elf`).

/// The event-loop runtimes loopguard watches on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Runtime {
    Tokio,
    Python,
    Node,
}

impl Runtime {
    pub const ALL: [Self; 3] = [Self::Tokio, Self::Python, Self::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokio => "tokio",
            Self::Python => "python",
            Self::Node => "node",
        }
    }
}

/// The interpreter an executable's name says it is, if any (`python3.11`,
/// `node`, `nodejs`).
pub fn interpreter_of(exe: &str) -> Option<Runtime> {
    if exe.starts_with("python") {
        Some(Runtime::Python)
    } else if exe == "node" || exe == "nodejs" {
        Some(Runtime::Node)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreters_are_told_by_name() {
        assert_eq!(interpreter_of("python3.11"), Some(Runtime::Python));
        assert_eq!(interpreter_of("python3"), Some(Runtime::Python));
        assert_eq!(interpreter_of("node"), Some(Runtime::Node));
        assert_eq!(interpreter_of("nodejs"), Some(Runtime::Node));
        assert_eq!(interpreter_of("nodemon"), None);
        assert_eq!(interpreter_of("api"), None);
    }
}
