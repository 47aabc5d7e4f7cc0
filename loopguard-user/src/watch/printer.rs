//! The printer: a watch's events on stdout (text or JSON) and in the
//! recording, naming the process on every line when several are watched.

use crate::discover::ProbeTarget;
use crate::events::{self, build};
use crate::present::emit;
use crate::present::text::Format;

use super::findings::Sink;
use super::{Outcome, WatchOptions};

/// Prints (and records) events in the chosen format.
pub(super) struct Printer<'t> {
    pub(super) target: &'t ProbeTarget,
    pub(super) format: Format,
    pub(super) label: bool,
}

impl Printer<'_> {
    /// The process every line names when several are watched.
    fn process(&self) -> emit::Process<'_> {
        emit::Process {
            pid: self.target.pid,
            exe: &self.target.exe.display_path,
        }
    }
}

impl Sink for Printer<'_> {
    fn emit(&mut self, event: &events::Event) -> String {
        emit::event_from(event, self.format, self.label.then(|| self.process())).unwrap_or_default()
    }
}

/// Prints (and records) the summary: JSON or text on stdout, naming the
/// process on every line when several are watched.
pub fn print_summary(outcome: &Outcome, target: &ProbeTarget, options: &WatchOptions) {
    let summary = build::summary(&outcome.summary, target.pid);
    let mut printer = Printer {
        target,
        format: options.format,
        label: options.label,
    };
    printer.emit(&events::Event::Summary(Box::new(summary)));
}
