//! How stacks and causes show in stall reports and the summary: JSON
//! fields (`stack`, `cause`, the summary's `stacks`) and text lines.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::StallStack;
use super::fold::{Frame, StackStalls};
use super::profile::{Cause, CauseKind};

/// Frames printed per stall in text; JSON has them all.
const TEXT_FRAMES: usize = 12;
/// Stacks listed in the summary.
pub const SUMMARY_STACKS: usize = 5;

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1000.0).round() / 1000.0
}

fn frame_json(frame: &Frame) -> Value {
    json!({ "function": frame.function, "file": frame.file, "line": frame.line, "module": frame.module })
}

fn cause_json(cause: &Cause) -> Value {
    json!({
        "kind": cause.kind.as_str(),
        "syscall": cause.syscall.map(|(nr, name)| name.map_or_else(|| nr.to_string(), str::to_owned)),
        "on_cpu_ms": ms(cause.on_cpu_ns),
        "off_cpu_ms": ms(cause.off_cpu_ns),
        "cpu_wait_ms": ms(cause.wait_ns),
    })
}

/// Adds `stack` and `cause` to a stall's JSON object.
pub fn add_json(object: &mut Value, stack: &StallStack) {
    object["stack"] = stack.frames.iter().map(frame_json).collect();
    object["stack_samples"] = json!(stack.samples);
    object["cause"] = stack.cause.as_ref().map_or(Value::Null, cause_json);
    if stack.before_attach {
        object["started_before_attach"] = json!(true);
    }
}

/// `blocked in clock_nanosleep (off CPU 199.8 ms, on CPU 0.2 ms)`.
pub fn cause_text(cause: &Cause) -> String {
    let syscall = cause
        .syscall
        .map(|(nr, name)| name.map_or_else(|| format!("system call {nr}"), str::to_owned))
        .unwrap_or_default();
    let what = match cause.kind {
        CauseKind::Cpu => "on CPU".to_owned(),
        CauseKind::Syscall => format!("blocked in {syscall}"),
        CauseKind::OffCpu => "off CPU outside a system call (page faults?)".to_owned(),
        CauseKind::Mixed if syscall.is_empty() => "on and off CPU".to_owned(),
        CauseKind::Mixed => format!("on CPU and blocked in {syscall}"),
    };
    format!(
        "{what} (on CPU {:.1} ms, off CPU {:.1} ms)",
        ms(cause.on_cpu_ns),
        ms(cause.off_cpu_ns)
    )
}

/// The lines printed under a stall: its cause, then its frames.
pub fn stall_lines(stack: &StallStack) -> String {
    let mut text = String::new();
    if stack.before_attach {
        text.push_str(
            "\n    (stuck since before loopguard attached: the duration is a lower bound)",
        );
    }
    if let Some(cause) = &stack.cause {
        text.push_str("\n    cause: ");
        text.push_str(&cause_text(cause));
    }
    for (index, frame) in stack.frames.iter().take(TEXT_FRAMES).enumerate() {
        text.push_str(if index == 0 { "\n    at " } else { "\n       " });
        text.push_str(&frame.display());
    }
    if stack.frames.len() > TEXT_FRAMES {
        let _ = write!(
            text,
            "
       ... {} more",
            stack.frames.len() - TEXT_FRAMES
        );
    }
    text
}

pub fn summary_json(stacks: &[StackStalls]) -> Value {
    stacks
        .iter()
        .take(SUMMARY_STACKS)
        .map(|entry| {
            json!({
                "label": entry.label,
                "folded": entry.folded,
                "stalls": entry.stalls,
                "total_stall_ms": ms(entry.total_ns),
            })
        })
        .collect()
}

/// `  bcrypt::hash <- handlers::login: 14 stalls, 4.2 s` lines.
pub fn summary_lines(stacks: &[StackStalls]) -> Vec<String> {
    let mut lines = Vec::new();
    if stacks.is_empty() {
        return lines;
    }
    lines.push("  stacks of the stalls (longest total first):".to_owned());
    for entry in stacks.iter().take(SUMMARY_STACKS) {
        lines.push(format!(
            "    {}: {} stall{}, {:.1} s",
            entry.label,
            entry.stalls,
            if entry.stalls == 1 { "" } else { "s" },
            entry.total_ns as f64 / 1e9
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(kind: CauseKind, syscall: Option<(i64, Option<&'static str>)>) -> Cause {
        Cause {
            kind,
            syscall,
            on_cpu_ns: 1_000_000,
            off_cpu_ns: 199_000_000,
            wait_ns: 0,
        }
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
        let text = stall_lines(&stack);
        assert_eq!(
            text,
            "\n    cause: blocked in clock_nanosleep (on CPU 1.0 ms, off CPU 199.0 ms)\n    at std::thread::sleep\n       app::handler (src/main.rs:42)"
        );
        let mut object = json!({});
        add_json(&mut object, &stack);
        assert_eq!(object["cause"]["kind"], "syscall");
        assert_eq!(object["cause"]["syscall"], "clock_nanosleep");
        assert_eq!(object["cause"]["off_cpu_ms"], 199.0);
        assert_eq!(object["stack"][1]["line"], 42);
    }

    #[test]
    fn an_unnamed_syscall_shows_its_number() {
        let text = cause_text(&cause(CauseKind::Mixed, Some((999, None))));
        assert!(
            text.starts_with("on CPU and blocked in system call 999"),
            "{text}"
        );
    }

    #[test]
    fn the_summary_names_stacks_by_label() {
        let stacks = [StackStalls {
            label: "bcrypt::hash <- handlers::login".into(),
            folded: "handlers::login;bcrypt::hash".into(),
            stalls: 14,
            total_ns: 4_200_000_000,
        }];
        assert_eq!(
            summary_lines(&stacks)[1],
            "    bcrypt::hash <- handlers::login: 14 stalls, 4.2 s"
        );
        assert_eq!(summary_json(&stacks)[0]["stalls"], 14);
    }
}
