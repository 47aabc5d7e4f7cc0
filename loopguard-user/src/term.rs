//! The terminal: colour on the report's labels (`--color`, `NO_COLOR`), and
//! the live status line at the bottom of stderr (polls per second, stalls,
//! threshold, requests in flight), kept only when stderr is a terminal.
//!
//! Every line written while the status line is up clears it first, then
//! draws it again below: the status line never mixes into log lines. The
//! status is drawn by the output thread ([`crate::present::output`]), never by the watch
//! loop, so a stopped terminal cannot block the watch or its detach; a
//! diagnostic that finds the screen busy is written plainly instead of
//! waiting.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// When to colour (`--color`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// When the output is a terminal and `NO_COLOR` is not set.
    #[default]
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour an output that is (or is not) a terminal;
    /// `no_color`: the `NO_COLOR` variable is set and not empty.
    pub fn colours(self, terminal: bool, no_color: bool) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => terminal && !no_color,
        }
    }
}

static STDOUT_COLOUR: AtomicBool = AtomicBool::new(false);
static STDERR_COLOUR: AtomicBool = AtomicBool::new(false);
static STATUS_ON: AtomicBool = AtomicBool::new(false);

/// The status line as drawn now (None: not drawn).
static SCREEN: Mutex<Option<String>> = Mutex::new(None);

/// Decides colour for stdout and stderr, and whether a status line may be
/// shown (`live`: a watch, and stderr is a terminal).
pub fn setup(choice: ColorChoice, live: bool) {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    STDOUT_COLOUR.store(
        choice.colours(std::io::stdout().is_terminal(), no_color),
        Ordering::Relaxed,
    );
    let stderr_terminal = std::io::stderr().is_terminal();
    STDERR_COLOUR.store(choice.colours(stderr_terminal, no_color), Ordering::Relaxed);
    STATUS_ON.store(live && stderr_terminal, Ordering::Relaxed);
}

/// Whether the status line is shown.
pub fn status_enabled() -> bool {
    STATUS_ON.load(Ordering::Relaxed)
}

const RESET: &str = "\x1b[0m";

/// Labels of report lines and their colour, longest first.
const LABELS: [(&str, &str); 7] = [
    ("LOOP STALL IN PROGRESS", "\x1b[1;33m"),
    ("STALL IN PROGRESS", "\x1b[1;33m"),
    ("LOOP STALL", "\x1b[1;31m"),
    ("STALL", "\x1b[1;31m"),
    ("CUMULATIVE", "\x1b[1;35m"),
    ("THRESHOLD", "\x1b[36m"),
    ("loopguard summary", "\x1b[1m"),
];

/// `line` with its label coloured.
pub fn paint_label(line: &str) -> String {
    for (label, colour) in LABELS {
        if let Some(rest) = line.strip_prefix(label) {
            return format!("{colour}{label}{RESET}{rest}");
        }
    }
    line.to_owned()
}

/// A report line as stdout shows it.
pub fn paint_stdout(line: &str) -> String {
    if STDOUT_COLOUR.load(Ordering::Relaxed) {
        paint_label(line)
    } else {
        line.to_owned()
    }
}

fn paint_stderr(line: &str) -> String {
    if !STDERR_COLOUR.load(Ordering::Relaxed) {
        return line.to_owned();
    }
    for prefix in ["loopguard: error:", "loopguard: FAILED"] {
        if let Some(rest) = line.strip_prefix(prefix) {
            return format!("\x1b[1;31m{prefix}{RESET}{rest}");
        }
    }
    line.to_owned()
}

/// Erases the line the cursor is on.
const CLEAR: &str = "\r\x1b[2K";

/// The terminal's width in columns (80 when unknown).
fn width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a winsize, on stderr's descriptor.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &raw mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

/// The status text cut to fit one line (a wrapped line could not be erased).
pub fn fit(status: &str, columns: usize) -> String {
    status.chars().take(columns.saturating_sub(1)).collect()
}

/// What to write to the terminal for one log line while `status` is drawn:
/// erase it, the line, draw it again. Pure, for the tests.
pub fn frame(status: Option<&str>, line: &str) -> (String, String, String) {
    match status {
        Some(status) => (CLEAR.to_owned(), line.to_owned(), status.to_owned()),
        None => (String::new(), line.to_owned(), String::new()),
    }
}

/// Writes one report line to `stdout` (called by the output thread): the
/// status line is taken down and put back around it.
pub fn write_stdout_line(stdout: &mut impl Write, line: &str) -> std::io::Result<()> {
    if !status_enabled() {
        writeln!(stdout, "{line}")?;
        return stdout.flush();
    }
    let screen = SCREEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (clear, line, redraw) = frame(screen.as_deref(), line);
    let mut stderr = std::io::stderr();
    let _ = stderr.write_all(clear.as_bytes());
    let _ = stderr.flush();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    let _ = stderr.write_all(redraw.as_bytes());
    stderr.flush()
}

/// Draws (or, with `None`, takes down) the status line (output thread).
pub fn draw_status(status: Option<String>) {
    if !status_enabled() {
        return;
    }
    let mut screen = SCREEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = status.map(|s| fit(&crate::term::printable(&s), width()));
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{CLEAR}{}", text.as_deref().unwrap_or(""));
    let _ = stderr.flush();
    *screen = text;
}

/// Writes bytes meant for stderr (a diagnostic or a log record), around
/// the status line when it is up; never waits for the output thread.
pub fn write_stderr(bytes: &[u8]) {
    let mut stderr = std::io::stderr();
    if status_enabled()
        && let Ok(screen) = SCREEN.try_lock()
        && let Some(status) = screen.as_deref()
    {
        let _ = stderr.write_all(CLEAR.as_bytes());
        let _ = stderr.write_all(bytes);
        let _ = stderr.write_all(status.as_bytes());
        let _ = stderr.flush();
        return;
    }
    let _ = stderr.write_all(bytes);
}

/// One diagnostic line on stderr (see [`crate::diag`]).
pub fn diag_line(line: &str) {
    write_stderr(diag_text(line).as_bytes());
}

/// What [`diag_line`] writes. Diagnostics quote the target (its exe path,
/// thread names, symbols, discovery errors): whatever they hold, control
/// and bidirectional-override characters are escaped here, so no message
/// can drive the terminal or forge a line.
pub fn diag_text(line: &str) -> String {
    let mut text = paint_stderr(&crate::term::printable(line));
    text.push('\n');
    text
}

/// What [`LogWriter`] writes of a formatted log record: log records quote
/// the target too (its exe path, thread and symbol names), so each line is
/// escaped as every diagnostic is; the line ends stay.
pub fn log_text(record: &[u8]) -> String {
    let text = String::from_utf8_lossy(record);
    let lines: Vec<_> = text.split('\n').map(printable).collect();
    lines.join("\n")
}

/// The writer `tracing` logs through, so log records do not fight with
/// the status line either.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_stderr(log_text(buf).as_bytes());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// The status line's text.
pub fn status_text(
    polls_per_s: u64,
    stalls: u64,
    threshold_ms: f64,
    in_flight: usize,
    elapsed_s: u64,
) -> String {
    format!(
        "loopguard: {polls_per_s} polls/s | {stalls} stall{} | threshold {threshold_ms:.1} ms | {in_flight} request{} in flight | {elapsed_s} s",
        if stalls == 1 { "" } else { "s" },
        if in_flight == 1 { "" } else { "s" },
    )
}

/// `text` with every control character escaped (`\r`, `\n`, `\u{1b}`):
/// thread names, routes and paths come from the target, and must not be
/// able to forge a line or drive the terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_unprintable) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if is_unprintable(c) {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Control characters (C0, DEL, C1), and the bidirectional marks and
/// overrides that reorder what a terminal shows.
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostics_cannot_drive_the_terminal() {
        let line =
            "loopguard: watching pid 7 (/tmp/\u{1b}]0;owned\u{7}\u{9b}2J\u{202e}exe\nSTALL forged)";
        let text = diag_text(line);
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        assert!(
            !text
                .chars()
                .any(|c| c == '\u{1b}' || c == '\u{7}' || c == '\u{9b}' || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("\\u{1b}]0;owned"), "{text:?}");
    }

    #[test]
    fn colour_follows_the_choice_the_terminal_and_no_color() {
        assert!(ColorChoice::Auto.colours(true, false));
        assert!(!ColorChoice::Auto.colours(false, false), "piped: plain");
        assert!(!ColorChoice::Auto.colours(true, true), "NO_COLOR");
        assert!(ColorChoice::Always.colours(false, true), "the flag wins");
        assert!(!ColorChoice::Never.colours(true, false));
    }

    #[test]
    fn only_the_label_is_coloured() {
        assert_eq!(
            paint_label("STALL IN PROGRESS tid 1"),
            "\x1b[1;33mSTALL IN PROGRESS\x1b[0m tid 1"
        );
        assert_eq!(
            paint_label("STALL             tid 1"),
            "\x1b[1;31mSTALL\x1b[0m             tid 1"
        );
        assert_eq!(paint_label("  dropped events: 0"), "  dropped events: 0");
    }

    #[test]
    fn a_log_line_takes_the_status_down_and_puts_it_back() {
        let (clear, line, redraw) = frame(Some("loopguard: 10 polls/s"), "STALL x");
        assert_eq!(clear, "\r\x1b[2K");
        assert_eq!(line, "STALL x");
        assert_eq!(redraw, "loopguard: 10 polls/s");
        assert_eq!(
            frame(None, "STALL x"),
            (String::new(), "STALL x".into(), String::new())
        );
        assert_eq!(fit("abcdef", 4), "abc");
    }

    #[test]
    fn the_status_reads_well() {
        assert_eq!(
            status_text(12_345, 1, 50.0, 3, 61),
            "loopguard: 12345 polls/s | 1 stall | threshold 50.0 ms | 3 requests in flight | 61 s"
        );
    }

    #[test]
    fn log_records_cannot_drive_the_terminal() {
        let record = "INFO discovered target exe=/tmp/py\u{1b}]0;owned\u{7}\u{202e}\n";
        let written = log_text(record.as_bytes());
        assert!(!written.contains('\u{1b}') && !written.contains('\u{202e}'));
        assert!(written.ends_with('\n'), "the record's own line end stays");
    }
}
