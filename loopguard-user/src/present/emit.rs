//! Emit: sends each event where it goes: stdout as text or JSON
//! (`--format`), and the recording (`--record`) as JSON.

use crate::events::Event;
use crate::present::text::{self as report, Format};
use crate::present::{output, record};
use crate::term;

/// The process an event is about, named on every line when several are
/// watched at once (`run` following its command's children).
#[derive(Clone, Copy, Debug)]
pub struct Process<'a> {
    pub pid: u32,
    pub exe: &'a str,
}

/// Emits `event`; returns its text line (for `--fail-on`), if it has one.
pub fn event(event: &Event, format: Format) -> Option<String> {
    event_from(event, format, None)
}

/// Emits `event` about `process`: text lines start with its pid and
/// program, JSON lines carry its `exe`.
pub fn event_from(event: &Event, format: Format, process: Option<Process>) -> Option<String> {
    let text = report::event_text(event).map(|text| match process {
        Some(process) => {
            let label = label(process.pid, process.exe);
            text.lines()
                .map(|line| format!("{label} {line}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        None => text,
    });
    let recording = record::active();
    if format == Format::Json || recording {
        let json = match process {
            Some(process) => with_exe(event.to_json(), process.exe),
            None => event.to_json(),
        };
        match (format, recording) {
            (Format::Json, true) => {
                record::line(json.clone());
                output::line(json);
            }
            (Format::Json, false) => output::line(json),
            (Format::Text, _) => record::line(json),
        }
    }
    if format == Format::Text
        && let Some(text) = &text
    {
        output::line(term::paint_stdout(text));
    }
    text
}

/// A JSON line with `exe` added (its pid is in every line already).
fn with_exe(line: String, exe: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.insert("exe".into(), exe.into());
            serde_json::Value::Object(object).to_string()
        }
        _ => line,
    }
}

/// How a process is named on every line when several are watched.
pub fn label(pid: u32, exe: &str) -> String {
    let name = exe.rsplit('/').next().unwrap_or(exe);
    format!("[pid {pid} {}]", crate::term::printable(name))
}
