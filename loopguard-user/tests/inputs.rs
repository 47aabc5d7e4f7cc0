//! Bad input, end to end: each wrong target or setup gets an error that
//! names the problem and the right fix, and nothing is loaded. Root is
//! needed (to see what root is told, and to drop to the capability sets
//! a non-root user would have), so they are `#[ignore]`d in a plain
//! `cargo test`; `cargo xtask test` runs them.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{Server, code_and_stderr, loopguard, require_root, server_binary};

/// `loopguard ARGS` as uid 65534 holding exactly the capabilities `caps`
/// (setpriv's ambient set: what `setcap CAPS+ep` on the binary gives).
fn loopguard_with_caps(caps: &str, args: &[&str]) -> (Option<i32>, String) {
    let set: Vec<String> = caps.split(',').map(|cap| format!("+{cap}")).collect();
    let set = set.join(",");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(support::LOOPGUARD)
        .args(args)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    code_and_stderr(&out)
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn programs_that_are_not_rust_get_no_rebuild_advice() {
    require_root();
    for (program, args) in [("sleep", vec!["30"]), ("bash", vec!["-c", "read -r line"])] {
        let mut child = Command::new(program)
            .args(&args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        // Let exec finish (a child fresh from fork still runs our image).
        std::thread::sleep(Duration::from_millis(100));
        let (code, stderr) = loopguard(&["attach", "--pid", &child.id().to_string()]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(code, Some(4), "{program}: {stderr}");
        assert!(stderr.contains("not a Rust program"), "{program}: {stderr}");
        assert!(
            !stderr.contains("strip") && !stderr.contains("rebuild"),
            "{program}: {stderr}"
        );
    }
    let (code, stderr) = loopguard(&["run", "--", "true"]);
    assert_eq!(code, Some(125), "{stderr}");
    assert!(stderr.contains("not a Rust program"), "{stderr}");
    assert!(!stderr.contains("rebuild"), "{stderr}");
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn pid_1_kernel_threads_and_bad_numbers_are_named() {
    require_root();
    // Root is never told to become root; pid 1 may be out of reach (another
    // namespace) or watchable (an init with an epoll loop): either is fine.
    let (_, stderr) = loopguard(&["attach", "--pid", "1", "--duration", "1"]);
    assert!(
        !stderr.contains("sudo") && !stderr.contains("run loopguard as root"),
        "{stderr}"
    );
    let (code, stderr) = loopguard(&["attach", "--pid", "2"]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("pid 2 (kthreadd) is a kernel thread"),
        "{stderr}"
    );
    assert!(!stderr.contains("PID"), "{stderr}");

    let (code, stderr) = loopguard(&["attach", "--pid", "-1234"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("a pid is a positive number") && stderr.contains("--pid 1234"),
        "{stderr}"
    );
    let (code, stderr) = loopguard(&["attach", "--pid", "0"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("pid 0 is not a process"), "{stderr}");
}

#[test]
#[ignore = "end-to-end: needs root and the example builds; run `cargo xtask test`"]
fn the_documented_non_root_setup_works_and_the_old_one_is_named() {
    require_root();
    let server = Server::start(&server_binary("LOOPGUARD_SERVER"), &[]);
    let pid = server.pid.to_string();
    let watch = [
        "attach",
        "--pid",
        pid.as_str(),
        "--duration",
        "1",
        "--no-stacks",
    ];
    // What docs/TROUBLESHOOTING.md says to use: attaches, detaches, exit 0.
    let (code, stderr) = loopguard_with_caps("sys_admin,sys_ptrace,kill", &watch);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("detached"), "{stderr}");
    // The set documented before CAP_KILL: it could stop another user's
    // process at exec and never resume it, so preflight refuses it.
    let (code, stderr) = loopguard_with_caps("sys_admin,sys_ptrace", &watch);
    assert_eq!(code, Some(5), "{stderr}");
    assert!(
        stderr.contains("missing: CAP_KILL")
            && stderr.contains("setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep"),
        "{stderr}"
    );
    // The set once documented: where the kernel wants CAP_SYS_ADMIN for
    // uprobes (this one), preflight says so and nothing is loaded; on a
    // kernel that still takes CAP_PERFMON it attaches. Never a raw EACCES.
    let (code, stderr) = loopguard_with_caps("bpf,perfmon,sys_ptrace,kill", &watch);
    match code {
        Some(5) => assert!(
            stderr.contains("CAP_SYS_ADMIN")
                && stderr.contains("setcap cap_sys_admin,cap_sys_ptrace,cap_kill+ep"),
            "{stderr}"
        ),
        Some(0) => assert!(stderr.contains("detached"), "{stderr}"),
        other => panic!("exit {other:?}: {stderr}"),
    }
    assert!(!stderr.contains("os error 13"), "{stderr}");
    assert_eq!(server.get("/fast").body["ok"], Value::Bool(true));
}
