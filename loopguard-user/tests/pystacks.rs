//! End-to-end tests of Python stacks (issue #29): a `FastAPI` app under
//! uvicorn on each `CPython` version loopguard reads (3.11, 3.12, 3.13),
//! blocked by `time.sleep`, a pure-Python CPU loop and a blocking
//! `socket.recv`, and already stuck when loopguard attaches. Every stall's
//! stack must hold the handler's Python frame with the file and line of
//! the source (read from the `# LINE:` markers of the app), and a blocking
//! builtin's Python-level frame (`time.sleep`, `socket.recv`) between it
//! and the native leaf. 3.11 runs twice: Debian's (the interpreter in a
//! stripped executable) and pyenv's (in `libpython3.11.so`).
//!
//! Root and the virtual environments `cargo xtask test` makes
//! (`LOOPGUARD_PYTHON_3_11`, `_3_11_7`, `_3_12`, `_3_13`) are needed, so
//! the tests are `#[ignore]`d in a plain `cargo test`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::prometheus::free_port;
use support::{Agent, assert_detached, http_get, require_root};

const APP: &str = "fastapi_stacks";

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/loop-servers")
}

fn app_file() -> PathBuf {
    app_dir().join(format!("{APP}.py"))
}

/// The line of the app marked `# LINE:name`.
fn marked_line(name: &str) -> u64 {
    let source = std::fs::read_to_string(app_file()).expect("read the app");
    let marker = format!("# LINE:{name}");
    let index = source
        .lines()
        .position(|line| line.trim_end().ends_with(&marker))
        .unwrap_or_else(|| panic!("no `{marker}` in {}", app_file().display()));
    index as u64 + 1
}

/// uvicorn serving the app, killed on drop.
struct Uvicorn {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Uvicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Uvicorn {
    fn start(version: &str) -> Self {
        let var = format!("LOOPGUARD_PYTHON_{}", version.replace('.', "_"));
        let python = std::env::var_os(&var).unwrap_or_else(|| {
            panic!("{var} is not set; run the end-to-end tests through `cargo xtask test`")
        });
        let port = free_port();
        let child = Command::new(python)
            .args([
                "-m",
                "uvicorn",
                &format!("{APP}:app"),
                "--host",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string(), "--log-level", "warning"])
            .arg("--app-dir")
            .arg(app_dir())
            .stdout(Stdio::null())
            .spawn()
            .expect("start uvicorn");
        let server = Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(45);
        while !http_get(server.addr, "/fast").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "uvicorn {version} never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn get(&self, path: &str) {
        let response = http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(response.status, 200, "GET {path}: {response:?}");
    }
}

/// A local server that answers each connection's line `ms` after reading
/// it: what the app's `recv` waits for.
fn slow_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                let ms = line.trim().parse().unwrap_or(100);
                std::thread::sleep(Duration::from_millis(ms));
                let _ = conn.write_all(b"x");
            });
        }
    });
    port
}

fn python_frames(stall: &Value) -> Vec<&Value> {
    stall["stack"]
        .as_array()
        .map(|frames| frames.iter().filter(|f| f["module"] == "python").collect())
        .unwrap_or_default()
}

/// Frames of Python code: a builtin's frame (`time.sleep`) has no file.
fn code_frames(stall: &Value) -> Vec<&Value> {
    python_frames(stall)
        .into_iter()
        .filter(|f| f["file"].is_string())
        .collect()
}

/// The stall's innermost frame of Python code is `function` in the app at
/// the line marked `marker`; frames without Python code stand before it only.
fn assert_python_top(stall: &Value, function: &str, marker: &str) {
    let frames = code_frames(stall);
    let top = frames
        .first()
        .unwrap_or_else(|| panic!("no Python frames in {stall}"));
    assert_eq!(top["function"], function, "{stall}");
    let file = top["file"].as_str().unwrap_or_default();
    assert!(file.ends_with(&format!("{APP}.py")), "{stall}");
    assert_eq!(top["line"].as_u64(), Some(marked_line(marker)), "{stall}");
    // No eval-loop frame stands for a Python frame.
    let stack = stall["stack"].as_array().unwrap();
    let first_python = stack.iter().position(|f| f["module"] == "python").unwrap();
    assert!(
        stack[..first_python]
            .iter()
            .all(|f| f["function"] != "_PyEval_EvalFrameDefault"),
        "{stall}"
    );
}

fn leaf(stall: &Value) -> &str {
    stall["stack"][0]["function"].as_str().unwrap_or_default()
}

/// The innermost Python-level frame is builtin `name` (no file, no line),
/// right inside the frame of Python code that called it, and the native
/// leaf (`clock_nanosleep`, `recv`) stays innermost.
fn assert_builtin(stall: &Value, name: &str, native_leaf: &str) {
    let frames = python_frames(stall);
    assert_eq!(frames[0]["function"], name, "{stall}");
    assert!(frames[0]["file"].is_null(), "{stall}");
    assert!(frames[0]["line"].is_null(), "{stall}");
    assert!(frames[1]["file"].is_string(), "{stall}");
    assert!(
        leaf(stall).contains(native_leaf),
        "leaf {}: {stall}",
        leaf(stall)
    );
}

fn the_stall<'a>(stalls: &[&'a Value], function: &str) -> &'a Value {
    let found: Vec<_> = stalls
        .iter()
        .filter(|s| python_frames(s).iter().any(|f| f["function"] == function))
        .collect();
    assert_eq!(found.len(), 1, "one stall in {function}: {stalls:#?}");
    found[0]
}

/// 1,000 recursive calls under the framework's frames: cut at 1,024.
fn assert_deep(stalls: &[&Value]) {
    let deep = stalls
        .iter()
        .find(|s| {
            code_frames(s)
                .first()
                .is_some_and(|f| f["function"] == "deep")
        })
        .unwrap_or_else(|| panic!("no stall in `deep`: {stalls:#?}"));
    assert_python_top(deep, "deep", "deep");
    assert_builtin(deep, "time.sleep", "sleep");
    let deep_frames = code_frames(deep);
    // `deep(1000)` .. `deep(1)` call from the recursion's line, under
    // `deep_handler` and the framework, whose outermost frames are cut.
    assert_eq!(deep_frames.len(), 1024, "{deep}");
    let call_line = marked_line("deep_call");
    assert!(
        deep_frames[1..=1000]
            .iter()
            .all(|f| f["function"] == "deep" && f["line"].as_u64() == Some(call_line)),
        "{deep}"
    );
    assert_eq!(deep_frames[1001]["function"], "deep_handler", "{deep}");
}

/// Sleeps in two handlers (twice, once), spins, waits in `recv` and sleeps
/// 1,000 calls deep; checks each stall's Python stack, then the folded
/// output and the summary. Causes are `loops.rs`'s and `stacks.rs`'s to
/// check: on a loaded 2-core VM a sleep was once classed as on CPU.
fn blocks_in_python(version: &str) {
    let server = Uvicorn::start(version);
    let folded = std::env::temp_dir().join(format!("loopguard-pystacks-{version}.folded"));
    let _ = std::fs::remove_file(&folded);
    let agent = Agent::attach(
        server.child.id(),
        &["--threshold-ms", "50", "--folded", folded.to_str().unwrap()],
    );
    let programs = agent.programs();
    let port = slow_server();
    let paths = [
        "/sleep?ms=300".to_owned(),
        "/sleep?ms=300".to_owned(),
        "/doze?ms=300".to_owned(),
        "/spin?ms=300".to_owned(),
        format!("/recv?port={port}&ms=300"),
        "/deep?depth=1000&ms=300".to_owned(),
    ];
    for path in &paths {
        server.get(path);
        std::thread::sleep(Duration::from_millis(150));
    }
    let (status, lines) = agent.interrupt();
    assert!(status.success());
    let stalls = support::of_type(&lines, "stall");
    assert_eq!(stalls.len(), paths.len(), "{stalls:#?}");

    let sleeps: Vec<_> = stalls
        .iter()
        .filter(|s| {
            code_frames(s)
                .first()
                .is_some_and(|f| f["function"] == "sleep_handler")
        })
        .collect();
    assert_eq!(sleeps.len(), 2, "{stalls:#?}");
    for stall in sleeps {
        assert_python_top(stall, "sleep_handler", "sleep");
        assert_builtin(stall, "time.sleep", "sleep");
    }
    let doze = the_stall(&stalls, "doze_handler");
    assert_python_top(doze, "doze_handler", "doze");
    assert_builtin(doze, "time.sleep", "sleep");

    let spin = the_stall(&stalls, "spin");
    assert_python_top(spin, "spin", "spin");
    let spin_frames = code_frames(spin);
    assert_eq!(spin_frames[1]["function"], "spin_handler", "{spin}");
    assert_eq!(
        spin_frames[1]["line"].as_u64(),
        Some(marked_line("spin_call")),
        "{spin}"
    );

    let recv = the_stall(&stalls, "recv_handler");
    assert_python_top(recv, "recv_handler", "recv");
    // A method of `_socket.socket`, named as its `__qualname__`.
    assert_builtin(recv, "socket.recv", "recv");

    assert_deep(&stalls);

    // Folded: one stack per handler, and the summary counts them.
    let text = std::fs::read_to_string(&folded).expect("the folded file");
    let with = |name: &str| -> Vec<&str> {
        text.lines()
            .filter(|line| line.split([';', ' ']).any(|frame| frame == name))
            .collect()
    };
    assert_eq!(with("sleep_handler").len(), 1, "{text}");
    assert_eq!(with("doze_handler").len(), 1, "{text}");
    // The builtin folds right inside its caller.
    assert!(
        with("sleep_handler")[0].contains(";sleep_handler;time.sleep;"),
        "{text}"
    );
    assert!(!text.contains("_PyEval_EvalFrameDefault"), "{text}");
    let summary = support::of_type(&lines, "summary");
    let stacks = summary[0]["stacks"].as_array().expect("summary stacks");
    let count = |name: &str| {
        stacks
            .iter()
            .filter(|s| {
                s["folded"]
                    .as_str()
                    .unwrap_or_default()
                    .split(';')
                    .any(|f| f == name)
            })
            .map(|s| s["stalls"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(count("sleep_handler"), [2], "{stacks:#?}");
    assert_eq!(count("doze_handler"), [1], "{stacks:#?}");
    assert_detached(&programs);
    let _ = std::fs::remove_file(&folded);
}

/// Attaches while `/sleep` has held the loop for 1.5 s: reported within a
/// second with its Python stack.
fn stuck_at_attach(version: &str) {
    let server = Uvicorn::start(version);
    let addr = server.addr;
    let blocker = std::thread::spawn(move || http_get(addr, "/sleep?ms=3500").unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    let agent = Agent::attach(server.child.id(), &["--threshold-ms", "50"]);
    let attached = Instant::now();
    let stuck = agent.wait_for_stuck_before_attach("the loop", attached, |_| true);
    assert_eq!(stuck.value["kind"], "loop", "{}", stuck.value);
    assert_python_top(&stuck.value, "sleep_handler", "sleep");
    assert_builtin(&stuck.value, "time.sleep", "sleep");
    let programs = agent.programs();
    assert_eq!(blocker.join().unwrap().status, 200);
    let (status, _) = agent.interrupt();
    assert!(status.success());
    assert_detached(&programs);
}

#[test]
#[ignore = "end-to-end: needs root and the FastAPI environments; run `cargo xtask test`"]
fn python_3_11_stacks() {
    require_root();
    blocks_in_python("3.11");
    stuck_at_attach("3.11");
}

/// pyenv's 3.11: the interpreter in `libpython3.11.so`, with symbols.
#[test]
#[ignore = "end-to-end: needs root and the FastAPI environments; run `cargo xtask test`"]
fn python_3_11_libpython_stacks() {
    require_root();
    blocks_in_python("3.11.7");
    stuck_at_attach("3.11.7");
}

#[test]
#[ignore = "end-to-end: needs root and the FastAPI environments; run `cargo xtask test`"]
fn python_3_12_stacks() {
    require_root();
    blocks_in_python("3.12");
    stuck_at_attach("3.12");
}

#[test]
#[ignore = "end-to-end: needs root and the FastAPI environments; run `cargo xtask test`"]
fn python_3_13_stacks() {
    require_root();
    blocks_in_python("3.13");
    stuck_at_attach("3.13");
}
