//! Symbolized stacks: trimming the runtime's own frames, folding identical
//! stacks together, and the folded-stack text flame graph tools read.
//!
//! Stacks are innermost frame first, as the unwinder yields them.

use std::collections::HashMap;
use std::fmt::Write as _;

/// One symbolized frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name (`?` when no symbol covers the address).
    pub function: String,
    /// The file it came from (the executable or a shared library).
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Frame {
    /// `function (file:line)` or just `function`.
    pub fn display(&self) -> String {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => format!("{} ({file}:{line})", self.function),
            (Some(file), None) => format!("{} ({file})", self.function),
            _ => self.function.clone(),
        }
    }

    /// Whether the frame belongs to a shared library (libc, ...).
    pub fn in_library(&self) -> bool {
        // `[vdso]`: the kernel's `clock_gettime` and friends.
        self.module
            .as_deref()
            .is_some_and(|module| module.contains(".so") || module.starts_with('['))
    }
}

/// Frames of Tokio's task harness and schedulers: everything from the first
/// of these outwards is the runtime polling the task, not the task. Known
/// by name, or by source file where the debug info names inlined calls
/// without their path (`line-tables-only` builds).
fn is_scheduler(frame: &Frame) -> bool {
    let name = frame.function.trim_start_matches('<');
    let by_name = ["tokio::runtime::task::", "tokio::runtime::scheduler::"]
        .iter()
        .any(|prefix| name.starts_with(prefix));
    let by_file = frame.file.as_deref().is_some_and(|file| {
        file.contains("/tokio-")
            && ["/src/runtime/task/", "/src/runtime/scheduler/"]
                .iter()
                .any(|dir| file.contains(dir))
    });
    by_name || by_file
}

/// The frames from the blocking call out to the task's future: the
/// runtime's frames below the task are cut (none when the innermost frame is
/// itself the runtime's, so a stack is never emptied).
pub fn trim_runtime(frames: &[Frame]) -> &[Frame] {
    let cut = frames
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, frame)| is_scheduler(frame))
        .map_or(frames.len(), |(index, _)| index);
    &frames[..cut]
}

/// The folded form of a stack: outermost first, `;`-separated function
/// names. A stack with Python frames folds on those (and a library leaf
/// such as `clock_nanosleep`), not on the interpreter's native frames.
pub fn fold(frames: &[Frame]) -> String {
    let kept: Vec<&Frame> =
        super::python::merge::fold_frames(frames).unwrap_or_else(|| frames.iter().collect());
    let mut folded = String::new();
    for frame in kept.into_iter().rev() {
        if !folded.is_empty() {
            folded.push(';');
        }
        folded.push_str(&folded_frame(&frame.function));
    }
    folded
}

/// One frame of a folded line: names come from the target's symbols, so
/// `;` (the frame separator) becomes `:` and control characters (a newline
/// would start a forged line) are escaped. Spaces stay: C++ and Rust names
/// hold them (`<T as Trait>::f`), and readers take the count after the
/// line's last space.
pub fn folded_frame(name: &str) -> String {
    crate::term::printable(name).replace(';', ":")
}

/// The innermost frame of the program itself (not of a library): what a
/// stall's `top_frame` metric label says.
pub fn top_frame(frames: &[Frame]) -> Option<&str> {
    if let Some(python) = super::python::merge::python_caller(frames) {
        return Some(python.function.as_str());
    }
    frames
        .iter()
        .find(|frame| !frame.in_library() && frame.function != "?")
        .map(|frame| frame.function.as_str())
}

/// A short name for a stack: the innermost frame of the program itself (not
/// of a library) and the frame that called it, `callee <- caller`.
pub fn label(frames: &[Frame]) -> String {
    // Python: the innermost Python function and its caller.
    if let Some(python) = super::python::merge::fold_frames(frames) {
        let mut names = python
            .iter()
            .filter(|f| super::python::merge::is_python(f))
            .map(|f| f.function.as_str());
        if let Some(first) = names.next() {
            return match names.find(|name| *name != first) {
                Some(caller) => format!("{first} <- {caller}"),
                None => first.to_owned(),
            };
        }
    }
    let start = frames
        .iter()
        .position(|frame| !frame.in_library() && frame.function != "?")
        .unwrap_or(0);
    let mut names = frames[start..].iter().map(|frame| frame.function.as_str());
    let Some(first) = names.next() else {
        return "?".to_owned();
    };
    match names.find(|name| *name != first) {
        Some(caller) => format!("{first} <- {caller}"),
        None => first.to_owned(),
    }
}

/// Stalls with the same stack, folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackStalls {
    pub label: String,
    pub folded: String,
    pub stalls: u64,
    pub total_ns: u64,
}

/// Every stall's stack, folded by identity.
#[derive(Clone, Debug, Default)]
pub struct StackTable {
    entries: HashMap<String, StackStalls>,
}

/// Stacks kept at most; further new stacks are counted under `(other)`.
const MAX_STACKS: usize = 4096;

impl StackTable {
    /// Counts one stall of `duration_ns` with (already trimmed) `frames`.
    pub fn record(&mut self, frames: &[Frame], duration_ns: u64) {
        let mut folded = fold(frames);
        if self.entries.len() >= MAX_STACKS && !self.entries.contains_key(&folded) {
            "(other)".clone_into(&mut folded);
        }
        let entry = self
            .entries
            .entry(folded.clone())
            .or_insert_with(|| StackStalls {
                label: if frames.is_empty() {
                    "(other)".to_owned()
                } else {
                    label(frames)
                },
                folded,
                stalls: 0,
                total_ns: 0,
            });
        entry.stalls += 1;
        entry.total_ns += duration_ns;
    }

    /// Stacks by total stall time, longest first.
    pub fn ranked(&self) -> Vec<StackStalls> {
        let mut ranked: Vec<_> = self.entries.values().cloned().collect();
        ranked.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.folded.cmp(&b.folded)));
        ranked
    }

    /// Folded-stack text (`outer;...;inner <ms>` per line), the format
    /// `flamegraph.pl` and inferno read; weights are stall milliseconds.
    pub fn folded_text(&self) -> String {
        let mut text = String::new();
        for entry in self.ranked() {
            let ms = (entry.total_ns / 1_000_000).max(1);
            let _ = writeln!(text, "{} {ms}", entry.folded);
        }
        text
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbol_cannot_forge_a_folded_line() {
        let frames = vec![
            Frame {
                function: "evil 999\nmain;forged".to_owned(),
                ..Frame::default()
            },
            Frame {
                function: "<a::B as c::D>::f".to_owned(),
                ..Frame::default()
            },
        ];
        let folded = fold(&frames);
        assert!(!folded.contains('\n'), "{folded:?}");
        assert_eq!(folded, "<a::B as c::D>::f;evil 999\\nmain:forged");
    }

    fn frame(function: &str, module: &str) -> Frame {
        Frame {
            function: function.to_owned(),
            module: Some(module.to_owned()),
            ..Frame::default()
        }
    }

    /// A `/block/sleep` stack as recorded from the example (innermost first).
    fn sleep_stack() -> Vec<Frame> {
        vec![
            frame("clock_nanosleep", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            frame("__nanosleep", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            frame("std::thread::sleep", "/srv/stall-server"),
            frame(
                "stall_server::block_sleep::{{closure}}",
                "/srv/stall-server",
            ),
            frame(
                "<axum::handler::future::IntoServiceFuture<F> as core::future::future::Future>::poll",
                "/srv/stall-server",
            ),
            frame(
                "tokio::runtime::task::core::Core<T,S>::poll",
                "/srv/stall-server",
            ),
            frame(
                "tokio::runtime::task::harness::Harness<T,S>::poll",
                "/srv/stall-server",
            ),
            frame("tokio::runtime::task::raw::poll", "/srv/stall-server"),
            frame(
                "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
                "/srv/stall-server",
            ),
            frame(
                "std::sys::pal::unix::thread::Thread::new::thread_start",
                "/srv/stall-server",
            ),
            frame("start_thread", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        ]
    }

    #[test]
    fn the_runtime_below_the_task_is_trimmed() {
        let stack = sleep_stack();
        let trimmed = trim_runtime(&stack);
        assert_eq!(trimmed.len(), 5);
        assert_eq!(trimmed[4].function, stack[4].function);
    }

    #[test]
    fn runtime_frames_named_without_their_path_are_known_by_file() {
        let mut stack = sleep_stack();
        stack[5] = Frame {
            function: "poll<axum::serve::handle_connection::{async_fn#0}>".into(),
            file: Some("/root/.cargo/registry/src/x/tokio-1.48.0/src/runtime/task/core.rs".into()),
            line: Some(375),
            ..Frame::default()
        };
        assert_eq!(trim_runtime(&stack).len(), 5);
    }

    #[test]
    fn a_stack_of_runtime_frames_only_is_kept() {
        let stack = sleep_stack()[7..].to_vec();
        assert_eq!(trim_runtime(&stack).len(), 1, "the innermost frame stays");
    }

    #[test]
    fn folding_is_outermost_first() {
        let stack = sleep_stack();
        let folded = fold(&stack[2..4]);
        assert_eq!(
            folded,
            "stall_server::block_sleep::{{closure}};std::thread::sleep"
        );
    }

    #[test]
    fn a_label_skips_libraries_and_names_the_caller() {
        let stack = sleep_stack();
        assert_eq!(
            label(trim_runtime(&stack)),
            "std::thread::sleep <- stall_server::block_sleep::{{closure}}"
        );
        assert_eq!(label(&[]), "?");
        // A spin that reads the clock: the vDSO is not the program.
        let spin = [
            frame("clock_gettime", "[vdso]"),
            frame(
                "__GI___clock_gettime",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
            ),
            frame("std::time::Instant::now", "/srv/app"),
            frame("stall_server::block_spin::{{closure}}", "/srv/app"),
        ];
        assert_eq!(
            label(&spin),
            "std::time::Instant::now <- stall_server::block_spin::{{closure}}"
        );
        assert_eq!(top_frame(&spin), Some("std::time::Instant::now"));
    }

    #[test]
    fn identical_stacks_fold_and_rank_by_time() {
        let mut table = StackTable::default();
        let sleep = sleep_stack();
        let spin = vec![frame("stall_server::spin", "/srv/app")];
        table.record(trim_runtime(&sleep), 300_000_000);
        table.record(trim_runtime(&sleep), 200_000_000);
        table.record(&spin, 100_000_000);
        let ranked = table.ranked();
        assert_eq!(ranked.len(), 2);
        assert_eq!((ranked[0].stalls, ranked[0].total_ns), (2, 500_000_000));
        assert_eq!(ranked[1].label, "stall_server::spin");
        let text = table.folded_text();
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with("<axum::handler") && first.ends_with("clock_nanosleep 500"),
            "{first}"
        );
        assert_eq!(text.lines().nth(1), Some("stall_server::spin 100"));
    }

    #[test]
    fn a_frame_shows_its_source_line_when_known() {
        let mut frame = frame("handlers::login", "/srv/app");
        assert_eq!(frame.display(), "handlers::login");
        frame.file = Some("src/handlers.rs".into());
        frame.line = Some(42);
        assert_eq!(frame.display(), "handlers::login (src/handlers.rs:42)");
    }
}
