//! `loopguard report` on any recording: whatever the lines, each is folded
//! in or refused with a reason, and the text summary and the HTML page of
//! what was accepted are made without a panic, the page's data unable to
//! leave its script element.
//!
//! Input: the recording's bytes (JSON lines; invalid UTF-8 replaced).
#![no_main]

use libfuzzer_sys::fuzz_target;
use loopguard::present::replay::{Aggregate, partial_summary};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut aggregate = Aggregate::default();
    for line in text.lines() {
        if aggregate.add_line(line).is_err() {
            // `report` stops at the first line that is not an event.
            return;
        }
    }
    let summary = aggregate
        .summary
        .clone()
        .unwrap_or_else(|| partial_summary(&aggregate));
    let _ = loopguard::present::text::summary_text(&summary);
    let page = loopguard::present::html::page(&aggregate, "fuzz.jsonl");
    assert_eq!(page.matches("</script>").count(), 2);
    assert!(!page.contains("<!--<script"));
});
