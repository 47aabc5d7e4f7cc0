//! How stacks and causes show in text: the lines under a stall and the
//! summary's stacks, rendered from the event records ([`crate::events`]).

use std::fmt::Write as _;

use crate::events::{CauseRecord, FrameRecord, StackFields, StackSummary};
use crate::term::printable;

/// Frames printed per stall in text; JSON has them all.
const TEXT_FRAMES: usize = 12;
/// Stacks listed in the summary (the summary event holds as many).
pub use crate::events::build::SUMMARY_STACKS;

/// `function (file:line)` or just `function`.
pub fn frame_text(frame: &FrameRecord) -> String {
    let function = printable(&frame.function);
    match (&frame.file, frame.line) {
        (Some(file), Some(line)) => format!("{function} ({}:{line})", printable(file)),
        (Some(file), None) => format!("{function} ({})", printable(file)),
        _ => function.into_owned(),
    }
}

/// `blocked in clock_nanosleep (off CPU 199.8 ms, on CPU 0.2 ms)`.
pub fn cause_text(cause: &CauseRecord) -> String {
    let syscall = match &cause.syscall {
        Some(name) if name.parse::<i64>().is_ok() => format!("system call {name}"),
        Some(name) => printable(name).into_owned(),
        None => String::new(),
    };
    let what = match cause.kind.as_str() {
        "cpu" => "on CPU".to_owned(),
        "syscall" => format!("blocked in {syscall}"),
        "off_cpu" => "off CPU outside a system call (page faults?)".to_owned(),
        _ if syscall.is_empty() => "on and off CPU".to_owned(),
        _ => format!("on CPU and blocked in {syscall}"),
    };
    format!(
        "{what} (on CPU {:.1} ms, off CPU {:.1} ms)",
        cause.on_cpu_ms, cause.off_cpu_ms
    )
}

/// The lines printed under a stall: its cause, then its frames.
pub fn stall_lines(stack: &StackFields) -> String {
    let mut text = String::new();
    if stack.started_before_attach {
        text.push_str(
            "\n    (stuck since before loopguard attached: the duration is a lower bound)",
        );
    }
    if let Some(cause) = &stack.cause {
        text.push_str("\n    cause: ");
        text.push_str(&cause_text(cause));
        // A Python stack: the Python function that made the call, and the
        // builtin it called (`time.sleep`, a frame with no file).
        let mut python = stack
            .stack
            .iter()
            .filter(|f| f.module.as_deref() == Some(crate::stacks::python::merge::PYTHON_MODULE));
        if let Some(innermost) = python.next() {
            text.push_str(" in Python ");
            text.push_str(&frame_text(innermost));
            if innermost.file.is_none()
                && let Some(caller) = python.find(|f| f.file.is_some())
            {
                text.push_str(" from ");
                text.push_str(&frame_text(caller));
            }
        }
    }
    for (index, frame) in stack.stack.iter().take(TEXT_FRAMES).enumerate() {
        text.push_str(if index == 0 { "\n    at " } else { "\n       " });
        text.push_str(&frame_text(frame));
    }
    if stack.stack.len() > TEXT_FRAMES {
        let _ = write!(
            text,
            "\n       ... {} more",
            stack.stack.len() - TEXT_FRAMES
        );
    }
    text
}

/// `  bcrypt::hash <- handlers::login: 14 stalls, 4.2 s` lines.
pub fn summary_lines(stacks: &[StackSummary]) -> Vec<String> {
    let mut lines = Vec::new();
    if stacks.is_empty() {
        return lines;
    }
    lines.push("  stacks of the stalls (longest total first):".to_owned());
    for entry in stacks.iter().take(SUMMARY_STACKS) {
        lines.push(format!(
            "    {}: {} stall{}, {:.1} s",
            printable(&entry.label),
            entry.stalls,
            if entry.stalls == 1 { "" } else { "s" },
            entry.total_stall_ms / 1000.0
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::build;
    use crate::stacks::StallStack;
    use crate::stacks::fold::{Frame, StackStalls};
    use crate::stacks::profile::{Cause, CauseKind};

    fn cause(kind: CauseKind, syscall: Option<(i64, Option<&'static str>)>) -> Cause {
        Cause {
            kind,
            syscall,
            on_cpu_ns: 1_000_000,
            off_cpu_ns: 199_000_000,
            wait_ns: 0,
        }
    }

    fn fields(stack: &StallStack) -> StackFields {
        let stall = crate::detect::Stall {
            kind: crate::detect::StallKind::Poll,
            tid: 1,
            task_id: Some(1),
            header: 0,
            start_ns: 0,
            duration_ns: 1,
            preempted_ns: 0,
            copy_index: 0,
            return_addr: 0,
            threshold_ns: 1,
            requests_window: None,
        };
        let context = crate::events::StallContext {
            stack: Some(stack.clone()),
            ..Default::default()
        };
        build::stall(&stall, None, 1, &context).stack.unwrap()
    }

    #[test]
    fn a_stall_shows_its_cause_and_frames() {
        let stack = StallStack {
            frames: vec![
                Frame {
                    function: "std::thread::sleep".into(),
                    ..Frame::default()
                },
                Frame {
                    function: "app::handler".into(),
                    file: Some("src/main.rs".into()),
                    line: Some(42),
                    ..Frame::default()
                },
            ],
            cause: Some(cause(
                CauseKind::Syscall,
                Some((230, Some("clock_nanosleep"))),
            )),
            samples: 1,
            before_attach: false,
        };
        let fields = fields(&stack);
        let text = stall_lines(&fields);
        assert_eq!(
            text,
            "\n    cause: blocked in clock_nanosleep (on CPU 1.0 ms, off CPU 199.0 ms)\n    at std::thread::sleep\n       app::handler (src/main.rs:42)"
        );
        let object = serde_json::to_value(&fields).unwrap();
        assert_eq!(object["cause"]["kind"], "syscall");
        assert_eq!(object["cause"]["syscall"], "clock_nanosleep");
        assert_eq!(object["cause"]["off_cpu_ms"], 199.0);
        assert_eq!(object["stack"][1]["line"], 42);
        assert!(object.get("started_before_attach").is_none());
    }

    #[test]
    fn a_python_stack_names_the_python_caller_in_the_cause() {
        let stack = StallStack {
            frames: vec![
                Frame {
                    function: "clock_nanosleep".into(),
                    module: Some("/lib/libc.so.6".into()),
                    ..Frame::default()
                },
                Frame {
                    function: "sleep_handler".into(),
                    module: Some(crate::stacks::python::merge::PYTHON_MODULE.into()),
                    file: Some("/srv/app.py".into()),
                    line: Some(25),
                },
            ],
            cause: Some(cause(
                CauseKind::Syscall,
                Some((230, Some("clock_nanosleep"))),
            )),
            samples: 1,
            before_attach: false,
        };
        let text = stall_lines(&fields(&stack));
        assert!(
            text.starts_with("\n    cause: blocked in clock_nanosleep (on CPU 1.0 ms, off CPU 199.0 ms) in Python sleep_handler (/srv/app.py:25)\n"),
            "{text}"
        );
        // With the builtin it called: both.
        let mut stack = stack;
        stack.frames.insert(
            1,
            crate::stacks::python::merge::builtin_frame("time.sleep".into()),
        );
        let text = stall_lines(&fields(&stack));
        assert!(
            text.starts_with("\n    cause: blocked in clock_nanosleep (on CPU 1.0 ms, off CPU 199.0 ms) in Python time.sleep from sleep_handler (/srv/app.py:25)\n    at clock_nanosleep\n       time.sleep\n       sleep_handler (/srv/app.py:25)"),
            "{text}"
        );
    }

    #[test]
    fn an_unnamed_syscall_shows_its_number() {
        let stack = StallStack {
            frames: Vec::new(),
            cause: Some(cause(CauseKind::Mixed, Some((999, None)))),
            samples: 0,
            before_attach: false,
        };
        let text = cause_text(fields(&stack).cause.as_ref().unwrap());
        assert!(
            text.starts_with("on CPU and blocked in system call 999"),
            "{text}"
        );
    }

    #[test]
    fn the_summary_names_stacks_by_label() {
        let summary = crate::events::summary::Summary {
            stacks: vec![StackStalls {
                label: "bcrypt::hash <- handlers::login".into(),
                folded: "handlers::login;bcrypt::hash".into(),
                stalls: 14,
                total_ns: 4_200_000_000,
            }],
            ..Default::default()
        };
        let event = build::summary(&summary, 1);
        assert_eq!(
            summary_lines(&event.stacks)[1],
            "    bcrypt::hash <- handlers::login: 14 stalls, 4.2 s"
        );
        assert_eq!(event.stacks[0].stalls, 14);
    }
}
