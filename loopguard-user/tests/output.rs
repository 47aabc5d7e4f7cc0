//! What people and scripts read: `--help`, the text lines and summary
//! (golden files under tests/golden, rewritten with
//! `LOOPGUARD_UPDATE_GOLDEN=1`), the event schema, `loopguard report`.
//!
//! The golden and schema tests need no root and run in a plain `cargo
//! test`. The end-to-end ones (`#[ignore]`d, run by `cargo xtask test` as
//! root) record a real session, replay it, and open its HTML page in
//! headless Chromium; and render a synthetic recording of a million events.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{LOOPGUARD, Server, require_root, server_binary};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with the golden file `name`, or rewrites it when
/// `LOOPGUARD_UPDATE_GOLDEN` is set.
fn assert_golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("LOOPGUARD_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; make it with LOOPGUARD_UPDATE_GOLDEN=1 cargo test --test output",
            path.display()
        )
    });
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (e, a))| e != a)
            .take(5)
            .map(|(i, (e, a))| format!("line {}:\n  golden: {e}\n  now:    {a}", i + 1))
            .collect();
        panic!(
            "{} differs ({} lines golden, {} now):\n{}\nIf the change is meant, run LOOPGUARD_UPDATE_GOLDEN=1 cargo test --test output and commit the file.",
            path.display(),
            expected.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

fn loopguard(args: &[&str]) -> std::process::Output {
    Command::new(LOOPGUARD)
        .args(args)
        .env_remove("NO_COLOR")
        .output()
        .expect("run loopguard")
}

fn stdout_of(args: &[&str]) -> String {
    let out = loopguard(args);
    assert!(
        out.status.success(),
        "loopguard {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_of_every_subcommand_is_golden() {
    assert_golden("help.txt", &stdout_of(&["--help"]));
    for sub in ["attach", "run", "watch", "config", "report"] {
        assert_golden(&format!("help-{sub}.txt"), &stdout_of(&[sub, "--help"]));
    }
}

fn session() -> String {
    golden_dir().join("session.jsonl").display().to_string()
}

#[test]
fn stall_lines_and_summary_are_golden() {
    // A recording with fixed times and ids: every kind of line.
    let lines = stdout_of(&["report", &session(), "--lines", "--color", "never"]);
    assert_golden("session-lines.txt", &lines);
    let summary = stdout_of(&["report", &session()]);
    assert!(lines.ends_with(&summary), "the summary ends the lines");
    assert!(summary.starts_with("loopguard summary (duration elapsed)"));
    // Piped output is plain unless asked; --color always colours labels only.
    assert!(!lines.contains('\u{1b}'));
    let coloured = stdout_of(&["report", &session(), "--lines", "--color", "always"]);
    assert!(
        coloured.contains("\u{1b}[1;31mSTALL\u{1b}[0m "),
        "{coloured}"
    );
    // A target's control characters never reach the terminal raw.
    assert_eq!(coloured.matches('\u{1b}').count() % 2, 0);
}

fn fixture_events() -> Vec<Value> {
    std::fs::read_to_string(session())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn the_golden_session_follows_the_schema() {
    support::schema::assert_events_follow_schema(&fixture_events());
}

#[test]
fn the_schema_catches_missing_wrong_and_unknown_fields() {
    let schema = support::schema::events_schema();
    let stall = fixture_events()
        .into_iter()
        .find(|e| e["type"] == "stall")
        .unwrap();
    let errors = |value: &Value| {
        let mut errors = Vec::new();
        support::schema::check(&schema, &schema, value, "", &mut errors);
        errors
    };
    assert!(errors(&stall).is_empty());
    let mut missing = stall.clone();
    missing.as_object_mut().unwrap().remove("tid");
    assert!(!errors(&missing).is_empty());
    let mut wrong = stall.clone();
    wrong["duration_ms"] = Value::from("long");
    assert!(!errors(&wrong).is_empty());
    let mut unknown = stall.clone();
    unknown["surprise"] = Value::from(1);
    assert!(!errors(&unknown).is_empty());
    let mut bad_time = stall;
    bad_time["start_time"] = Value::from("yesterday");
    assert!(!errors(&bad_time).is_empty());
}

#[test]
fn report_refuses_what_is_not_a_recording() {
    let dir = std::env::temp_dir().join(format!("loopguard-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.log");
    std::fs::write(&text, "STALL tid 1\n").unwrap();
    let out = loopguard(&["report", text.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 1 is not a loopguard event") && stderr.contains("--record"),
        "{stderr}"
    );
    let out = loopguard(&["report", "/nonexistent/x.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// Where the end-to-end tests leave their pages and screenshots.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("e2e-report");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Opens `page` in headless Chromium; returns the DOM after its script ran,
/// and leaves a screenshot at `screenshot`.
fn chromium(page: &Path, screenshot: &Path) -> String {
    let _ = std::fs::remove_file(screenshot);
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,2200",
        ])
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium (`cargo xtask setup` installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shot = std::fs::metadata(screenshot).map_or(0, |m| m.len());
    assert!(
        shot > 10_000,
        "no screenshot at {}: {}",
        screenshot.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text a live run printed: its stdout lines.
fn text_of(lines: &[support::Line]) -> String {
    let mut text: String = lines
        .iter()
        .map(|l| l.value.as_str().expect("text on stdout").to_owned() + "\n")
        .collect();
    if text.is_empty() {
        text.push('\n');
    }
    text
}

#[test]
#[ignore = "end-to-end: needs root, the example and chromium; run `cargo xtask test`"]
fn a_recorded_session_replays_and_renders_in_chromium() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let dir = artifacts();
    let recording = dir.join("session.jsonl");
    let pid = server.pid.to_string();
    let agent = support::Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--threshold-ms",
        "50",
        "--record",
        recording.to_str().unwrap(),
    ]);
    // Text on stdout; the recording has the attached line once the probes are in.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&recording).is_ok_and(|r| r.contains("\"attached\"")) {
        assert!(Instant::now() < deadline, "nothing recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    // As the other end-to-end tests do: let the watch settle (stack tools,
    // the census of polls stuck since before attaching) before blocking.
    std::thread::sleep(Duration::from_millis(500));
    server.get("/fast");
    for ms in [120, 200] {
        server.get(&format!("/block/sleep?ms={ms}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    server.get("/users/7/block?ms=80");
    let (status, lines) = agent.interrupt();
    assert!(status.success(), "loopguard exited with {status}");
    let live = text_of(&lines);

    let events: Vec<Value> = std::fs::read_to_string(&recording)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    support::schema::assert_events_follow_schema(&events);
    let stalls: Vec<&Value> = events.iter().filter(|e| e["type"] == "stall").collect();
    assert_eq!(stalls.len(), 3, "{events:#?}");
    assert_eq!(events.last().unwrap()["type"], "summary");

    // The replay prints what the live run printed, line for line.
    let file = recording.to_str().unwrap();
    assert_eq!(stdout_of(&["report", file, "--lines"]), live);
    let summary = stdout_of(&["report", file]);
    assert!(
        live.ends_with(&summary),
        "live:\n{live}\nreplayed:\n{summary}"
    );
    assert!(summary.contains("3 stall(s) over 50 ms"), "{summary}");

    // The page, after its script ran, shows each stall with its request.
    let page = dir.join("session.html");
    let out = loopguard(&["report", file, "--html", page.to_str().unwrap()]);
    assert!(out.status.success());
    let dom = chromium(&page, &dir.join("session.png"));
    assert!(
        dom.contains("data-rendered=\"yes\""),
        "the script did not finish:\n{dom}"
    );
    assert_eq!(dom.matches("class=\"stall-row\"").count(), 3, "{dom}");
    assert_eq!(dom.matches("class=\"mark\"").count(), 3, "{dom}");
    for route in ["GET /block/sleep", "GET /users/{id}/block"] {
        assert!(dom.contains(route), "{route} missing from the page");
    }
    assert!(dom.contains("3 stalls ("), "the header counts the stalls");
    assert!(
        dom.contains("loopguard summary (interrupted)"),
        "the summary is on the page"
    );
}

/// A recording of `stalls` stalls over ten minutes on eight threads, one in
/// `stacks_every` with a 20-frame stack (the others 4 frames), between an
/// attached line and a summary, written with loopguard's own event types.
fn synthetic_recording(path: &Path, stalls: u64, stacks_every: u64) {
    use loopguard::events::Event;
    use std::io::Write;
    let text = std::fs::read_to_string(session()).unwrap();
    let fixture: Vec<Event> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let Event::Attached(attached) = &fixture[0] else {
        panic!("the fixture starts with attached")
    };
    writeln!(out, "{}", fixture[0].to_json()).unwrap();
    let template = fixture
        .iter()
        .find_map(|e| match e {
            Event::Stall(stall) if stall.stack.is_some() && stall.request.is_some() => {
                Some(stall.clone())
            }
            _ => None,
        })
        .unwrap();
    let mut short = template.clone();
    short.stack.as_mut().unwrap().stack.truncate(4);
    let base = attached.at_ns;
    let span_ns = 600_000_000_000;
    for i in 0..stalls {
        let mut stall = if i % stacks_every == 0 {
            template.clone()
        } else {
            short.clone()
        };
        stall.tid = 4300 + (i % 8) as u32;
        stall.start_ns = base + i * span_ns / stalls;
        stall.duration_ms = 50.0 + (i * 7919 % 2000) as f64 / 10.0;
        let request = stall.request.as_mut().unwrap();
        request.id = i;
        request.route = Some(format!("/r/{}", i % 40));
        writeln!(out, "{}", Event::Stall(stall).to_json()).unwrap();
    }
    let Some(Event::Summary(summary)) = fixture.last() else {
        panic!("the fixture ends with the summary")
    };
    let mut summary = summary.clone();
    summary.at_ns = base + span_ns;
    writeln!(out, "{}", Event::Summary(summary).to_json()).unwrap();
}

#[test]
#[ignore = "needs chromium; run by `cargo xtask test`"]
fn a_script_opener_in_a_target_string_does_not_blank_the_page() {
    // `<!--<script>` in a string of the embedded JSON would put the data's
    // script element in the tokenizer's double-escaped state: the page
    // would render nothing.
    let dir = artifacts();
    let recording = dir.join("hostile.jsonl");
    synthetic_recording(&recording, 20, 1);
    let text = std::fs::read_to_string(&recording).unwrap();
    let hostile = text.replace("\"route\":\"/r/1\"", "\"route\":\"<!--<script>\"");
    assert_ne!(text, hostile, "no route to replace");
    std::fs::write(&recording, hostile).unwrap();
    let page = dir.join("hostile.html");
    let out = loopguard(&[
        "report",
        recording.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&recording);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = chromium(&page, &dir.join("hostile.png"));
    assert!(
        dom.contains("data-rendered=\"yes\""),
        "the page did not render:\n{dom}"
    );
    assert!(dom.contains("20 stalls ("), "{dom}");
}

/// Writes a synthetic recording of `stalls` stalls, renders its page, and
/// opens it; returns how long `report --html` took.
fn render_synthetic(name: &str, stalls: u64, stacks_every: u64) -> Duration {
    let dir = artifacts();
    let recording = dir.join(format!("{name}.jsonl"));
    synthetic_recording(&recording, stalls, stacks_every);
    let size = std::fs::metadata(&recording).unwrap().len();
    let page = dir.join(format!("{name}.html"));
    let started = Instant::now();
    let out = loopguard(&[
        "report",
        recording.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    let took = started.elapsed();
    let _ = std::fs::remove_file(&recording);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "report --html of {stalls} stalls ({} MB) took {:.2} s",
        size >> 20,
        took.as_secs_f64()
    );
    let html = std::fs::metadata(&page).unwrap().len();
    assert!(html < 2 << 20, "the page holds {html} bytes: not bounded");
    let dom = chromium(&page, &dir.join(format!("{name}.png")));
    assert!(dom.contains("data-rendered=\"yes\""));
    assert!(dom.contains(&format!("{stalls} stalls (")));
    took
}

#[test]
#[ignore = "writes a 300 MB recording; run by `cargo xtask test`"]
fn a_ten_minute_soak_renders_in_under_five_seconds() {
    // More than any real soak holds: 333 stalls a second for ten minutes
    // (8 workers at a 50 ms threshold stall at most 160 times a second),
    // each with its full stack.
    let took = render_synthetic("soak", 200_000, 1);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
#[ignore = "writes a 1.4 GB recording; run by `cargo xtask test`"]
fn a_million_event_recording_stays_responsive() {
    // A million stalls, one in ten with its full stack: read as a stream,
    // the page stays small whatever the recording holds.
    let took = render_synthetic("million", 1_000_000, 10);
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
