//! `loopguard report FILE.jsonl`: a recording shown again as text, and
//! drawn as an HTML page with `--html`.

use std::io::Write;

use crate::events::Event;
use crate::present::replay::{ReplayError, partial_summary, read};
use crate::present::text as report;

/// `loopguard report`.
pub fn report(args: &crate::config::args::ReportArgs) -> Result<(), ReplayError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let aggregate = read(&args.file, |line| {
        if !args.lines {
            return;
        }
        let event = serde_json::from_str::<Event>(line);
        if let Ok(Event::Attached(attached)) = &event {
            // On stderr, where the live run said it.
            crate::diag!("{}", crate::present::attached::attached_text(attached));
        } else if let Ok(event) = event
            && !matches!(event, Event::Summary(_))
            && let Some(text) = report::event_text(&event)
        {
            let _ = writeln!(out, "{}", crate::term::paint_stdout(&text));
        }
    })?;
    let summary = aggregate
        .summary
        .clone()
        .unwrap_or_else(|| partial_summary(&aggregate));
    let _ = writeln!(
        out,
        "{}",
        crate::term::paint_stdout(&report::summary_text(&summary))
    );
    let _ = out.flush();
    if let Some(path) = &args.html {
        let page = crate::present::html::page(&aggregate, &args.file.display().to_string());
        crate::present::outfile::create(path)
            .and_then(|mut file| file.write_all(page.as_bytes()))
            .map_err(|source| ReplayError::WriteHtml {
                path: path.clone(),
                source,
            })?;
        crate::diag!("loopguard: wrote {}", path.display());
    }
    Ok(())
}
