//! Emit: sends each event where it goes: stdout as text or JSON
//! (`--format`), and the recording (`--record`) as JSON.

use crate::events::Event;
use crate::report::{self, Format};
use crate::{output, record, term};

/// Emits `event`; returns its text line (for `--fail-on`), if it has one.
pub fn event(event: &Event, format: Format) -> Option<String> {
    let text = report::event_text(event);
    let recording = record::active();
    if format == Format::Json || recording {
        let json = event.to_json();
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
