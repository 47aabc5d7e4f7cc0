//! Python frames in a native stack: each `_PyEval_EvalFrameDefault` frame
//! gives way to the Python frames it ran, the interpreter's own helpers
//! between them go, a builtin's frame (`time.sleep`, named by
//! [`super::builtin`]) stands for the C function Python called, and the
//! native leaf (the system call's wrapper, a C extension's function) stays.

use crate::stacks::fold::Frame;

use super::walk::PyFrame;

/// `module` of a Python frame.
pub const PYTHON_MODULE: &str = "python";
/// The interpreter's eval loop: one native frame per Python-to-C-to-Python
/// round trip.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

/// Whether `frame` is a Python frame (made by [`interleave`]).
pub fn is_python(frame: &Frame) -> bool {
    frame.module.as_deref() == Some(PYTHON_MODULE)
}

/// Whether `frame` is a builtin's: a C function called from Python, named
/// as Python calls it (`time.sleep`), with no file or line.
pub fn is_builtin(frame: &Frame) -> bool {
    is_python(frame) && frame.file.is_none()
}

/// Whether `frame` is a frame of Python code (a file and a line).
pub fn is_python_code(frame: &Frame) -> bool {
    is_python(frame) && frame.file.is_some()
}

/// The Python-level frame of builtin `name`.
pub fn builtin_frame(name: String) -> Frame {
    Frame {
        function: name,
        module: Some(PYTHON_MODULE.to_owned()),
        file: None,
        line: None,
    }
}

fn frame(py: &PyFrame) -> Frame {
    Frame {
        function: py.function.clone(),
        module: Some(PYTHON_MODULE.to_owned()),
        file: Some(py.file.clone()),
        line: py.line,
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `native` (innermost first) with `python` (innermost first, split into
/// one group per eval call at `call_start`) in place of its eval-loop
/// frames. Native frames of `interpreter` (the executable or libpython
/// holding the interpreter, a path or a file name) outside the innermost
/// eval frame are the interpreter calling itself and are dropped, and so
/// are those outside a builtin's frame (the call's trampolines,
/// `cfunction_vectorcall_O`); native frames of other modules (C
/// extensions) stay where they are. Groups left over (the native unwind
/// stopped early) go outermost.
pub fn interleave(native: &[Frame], python: &[PyFrame], interpreter: &str) -> Vec<Frame> {
    if python.is_empty() {
        return native.to_vec();
    }
    let mut groups = Vec::new();
    let mut start = 0;
    for (index, py) in python.iter().enumerate() {
        if py.call_start || index + 1 == python.len() {
            groups.push(&python[start..=index]);
            start = index + 1;
        }
    }
    let mut groups = groups.into_iter();
    let interpreter = file_name(interpreter);
    let in_interpreter = |frame: &Frame| {
        frame
            .module
            .as_deref()
            .is_some_and(|module| file_name(module) == interpreter)
    };
    let mut out = Vec::with_capacity(native.len() + python.len());
    let mut past_eval = false;
    for native_frame in native {
        if native_frame.function == EVAL_LOOP {
            past_eval = true;
            match groups.next() {
                Some(group) => out.extend(group.iter().map(frame)),
                None => out.push(native_frame.clone()),
            }
        } else if is_builtin(native_frame) {
            past_eval = true;
            out.push(native_frame.clone());
        } else if !(past_eval && in_interpreter(native_frame)) {
            out.push(native_frame.clone());
        }
    }
    for group in groups {
        out.extend(group.iter().map(frame));
    }
    out
}

/// The frames a Python stack folds on: its Python frames, and the
/// innermost frame when it is a library's (`clock_nanosleep`, `recv` in
/// libc) other than libpython, so a sleep and a CPU loop in one handler
/// fold apart while samples of one CPU loop (whose innermost native frame
/// moves) fold together. `None` for a stack without frames of Python code.
pub fn fold_frames(frames: &[Frame]) -> Option<Vec<&Frame>> {
    if !frames.iter().any(is_python_code) {
        return None;
    }
    let mut kept: Vec<&Frame> = Vec::new();
    if let Some(leaf) = frames.first()
        && !is_python(leaf)
        && leaf.in_library()
        && !leaf
            .module
            .as_deref()
            .is_some_and(|m| file_name(m).starts_with("libpython"))
    {
        kept.push(leaf);
    }
    kept.extend(frames.iter().filter(|f| is_python(f)));
    Some(kept)
}

/// `function (file:line)` of the innermost frame of Python code: the
/// Python code that made the blocking call (through a builtin such as
/// `time.sleep`, or not), or that runs on the CPU.
pub fn python_caller(frames: &[Frame]) -> Option<&Frame> {
    frames.iter().find(|f| is_python_code(f))
}

/// The builtin the innermost frame of Python code called, when the stack
/// has one inside it (`time.sleep`).
pub fn python_builtin(frames: &[Frame]) -> Option<&Frame> {
    frames
        .iter()
        .take_while(|f| !is_python_code(f))
        .find(|f| is_builtin(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(function: &str, module: &str) -> Frame {
        Frame {
            function: function.to_owned(),
            module: Some(module.to_owned()),
            file: None,
            line: None,
        }
    }

    fn py(function: &str, line: u32, call_start: bool) -> PyFrame {
        PyFrame {
            function: function.to_owned(),
            file: "/srv/app.py".to_owned(),
            line: Some(line),
            call_start,
        }
    }

    const LIB: &str = "/opt/py/lib/libpython3.12.so.1.0";

    /// The function names of `frames`, innermost first.
    fn names<'a>(frames: impl IntoIterator<Item = &'a Frame>) -> Vec<&'a str> {
        frames.into_iter().map(|f| f.function.as_str()).collect()
    }

    /// The function names of `frames` as they fold (they hold Python code).
    fn folded(frames: &[Frame]) -> Vec<&str> {
        names(fold_frames(frames).expect("Python frames to fold"))
    }

    /// The function name of a frame found, if one was.
    fn name(frame: Option<&Frame>) -> Option<&str> {
        frame.map(|f| f.function.as_str())
    }

    #[test]
    fn eval_frames_give_way_to_their_python_frames() {
        let natives = [
            native("clock_nanosleep", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("time_sleep", LIB),
            native("cfunction_vectorcall_O", LIB),
            native(EVAL_LOOP, LIB),
            native(
                "task_step",
                "/opt/py/lib/python3.12/lib-dynload/_asyncio.so",
            ),
            native("_PyObject_MakeTpCall", LIB),
            native(EVAL_LOOP, LIB),
            native("PyEval_EvalCode", LIB),
            native("main", "/opt/py/bin/python3.12"),
        ];
        let python = [
            py("block", 8, false),
            py("handler", 12, true),
            py("Loop.run_once", 30, false),
            py("<module>", 1, true),
        ];
        let merged = interleave(&natives, &python, "libpython3.12.so.1.0");
        assert_eq!(
            names(&merged),
            [
                "clock_nanosleep",
                "time_sleep",
                "cfunction_vectorcall_O",
                "block",
                "handler",
                "task_step",
                "Loop.run_once",
                "<module>",
                "main",
            ]
        );
        assert_eq!(merged[3].display(), "block (/srv/app.py:8)");
        assert_eq!(name(python_caller(&merged)), Some("block"));
        assert_eq!(
            folded(&merged),
            [
                "clock_nanosleep",
                "block",
                "handler",
                "Loop.run_once",
                "<module>"
            ]
        );
    }

    #[test]
    fn a_builtin_stands_for_its_c_function_and_its_trampolines_go() {
        let natives = [
            native("clock_nanosleep", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("pysleep", LIB),
            builtin_frame("time.sleep".to_owned()),
            native("cfunction_vectorcall_O", LIB),
            native(EVAL_LOOP, LIB),
            native("0x4f2a10", "/usr/bin/python3.11"),
            builtin_frame("Context.run".to_owned()),
            native("_PyObject_MakeTpCall", LIB),
            native(EVAL_LOOP, LIB),
        ];
        let python = [
            py("block", 8, false),
            py("handler", 12, true),
            py("Handle._run", 30, true),
        ];
        let merged = interleave(&natives, &python, "libpython3.12.so.1.0");
        assert_eq!(
            names(&merged),
            [
                "clock_nanosleep",
                "pysleep",
                "time.sleep",
                "block",
                "handler",
                "0x4f2a10",
                "Context.run",
                "Handle._run",
            ]
        );
        assert_eq!(name(python_caller(&merged)), Some("block"));
        assert_eq!(name(python_builtin(&merged)), Some("time.sleep"));
        assert_eq!(
            folded(&merged),
            [
                "clock_nanosleep",
                "time.sleep",
                "block",
                "handler",
                "Context.run",
                "Handle._run"
            ]
        );
        // A builtin with no Python code read: folded as native frames.
        let alone = [natives[0].clone(), natives[2].clone()];
        assert!(fold_frames(&alone).is_none());
        assert!(python_caller(&alone).is_none());
    }

    #[test]
    fn more_groups_than_eval_frames_go_outermost_and_no_python_keeps_native() {
        let natives = [native("_PyEval_EvalFrameDefault", LIB)];
        let python = [py("a", 1, true), py("b", 2, true)];
        assert_eq!(names(&interleave(&natives, &python, LIB)), ["a", "b"]);
        let kept = interleave(&natives, &[], LIB);
        assert_eq!(kept, natives);
        assert!(fold_frames(&kept).is_none());
        // Only Python frames (no native stack): still a stack.
        let only = interleave(&[], &python, LIB);
        assert_eq!(only.len(), 2);
    }

    #[test]
    fn a_cpu_loop_folds_on_python_frames_whatever_its_native_leaf() {
        let python = [py("spin", 5, true)];
        let a = interleave(
            &[native("PyNumber_Add", LIB), native(EVAL_LOOP, LIB)],
            &python,
            LIB,
        );
        let b = interleave(&[native(EVAL_LOOP, LIB)], &python, LIB);
        assert_eq!(folded(&a), folded(&b));
    }
}
