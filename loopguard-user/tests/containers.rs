//! End-to-end test of `loopguard watch --all` against real containers
//! (issue #28): Debian's podman runs the example service and a uvicorn app
//! from local root filesystems (`--rootfs`: no image registry), and the
//! stalls on `/metrics` must carry each container's id (from its cgroup)
//! and name (from podman's `/run/.containerenv`).
//!
//! How podman is run here, and why: `--runtime runc` (crun refuses a host
//! whose cgroups are hybrid, as this test VM's are), explicit `--ulimit`s
//! (the defaults raise limits the test's root cannot), `--cgroup-manager
//! cgroupfs` and `--events-backend file` (no systemd needed),
//! `--network host` (no network setup; the servers listen on loopback),
//! `--privileged` (podman writes the container's name into
//! `/run/.containerenv` only for privileged containers). The root
//! filesystem is a directory of symlinks into the host's `/usr`, mounted
//! read-only, plus the program itself.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::prometheus::free_port;
use support::{Agent, assert_detached, http_get, require_root, server_binary};

fn tag() -> String {
    format!("loopguard-ctr-e2e-{}", std::process::id())
}

/// A root filesystem: the host's `/usr` (mounted at run time) behind the
/// usual merged-/usr symlinks, and `files` copied in.
fn rootfs(name: &str, files: &[(&Path, &str)]) -> PathBuf {
    let root = std::env::temp_dir().join(format!("{}-{name}", tag()));
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["usr", "etc", "proc", "sys", "dev", "run", "tmp", "srv"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for link in ["bin", "lib", "lib64", "sbin"] {
        std::os::unix::fs::symlink(format!("usr/{link}"), root.join(link)).unwrap();
    }
    for (from, to) in files {
        std::fs::copy(from, root.join(to.trim_start_matches('/'))).unwrap();
    }
    root
}

/// A podman container, removed on drop.
struct Container {
    name: String,
    id: String,
    root: PathBuf,
}

impl Container {
    /// `podman run -d` of `command` in `root`, with `mounts` (host path,
    /// read-only, at the same path inside).
    fn run(name: &str, root: PathBuf, mounts: &[&Path], command: &[&str]) -> Self {
        let cidfile = root.with_extension("cid");
        let _ = std::fs::remove_file(&cidfile);
        let mut podman = Command::new("podman");
        podman
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "run", "-d", "--rm"])
            .args(["--name", name, "--privileged", "--network", "host"])
            .args([
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .arg("--cidfile")
            .arg(&cidfile)
            .args(["-v", "/usr:/usr:ro"]);
        for mount in mounts {
            podman.arg("-v").arg(format!("{0}:{0}:ro", mount.display()));
        }
        let out = podman
            .arg("--rootfs")
            .arg(&root)
            .args(command)
            .stdin(Stdio::null())
            .output()
            .expect("run podman (`cargo xtask setup` installs Debian's podman and runc)");
        assert!(
            out.status.success(),
            "podman run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = std::fs::read_to_string(&cidfile).unwrap().trim().to_owned();
        Self {
            name: name.to_owned(),
            id,
            root,
        }
    }

    /// The host pid of the container's first process.
    fn pid(&self) -> u32 {
        let out = Command::new("podman")
            .args([
                "--events-backend",
                "file",
                "inspect",
                "--format",
                "{{.State.Pid}}",
            ])
            .arg(&self.name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args([
                "--events-backend",
                "file",
                "rm",
                "-f",
                "-t",
                "0",
                &self.name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn wait_answering(port: u16, path: &str) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(addr, path).is_ok_and(|r| r.status == 200) {
        assert!(
            Instant::now() < deadline,
            "port {port} never answered {path}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(addr: &str) -> String {
    let out = Command::new("curl")
        .args(["-sSf", &format!("http://{addr}/metrics")])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "scrape {addr}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn series<'t>(text: &'t str, name: &str, labels: &[&str]) -> Vec<&'t str> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .collect()
}

/// The stalls of both containers under their service, container id and
/// container name.
fn assert_labelled(text: &str, api: &Container, py: &Container) {
    let api_labels = [
        r#"service="shop-api""#.to_owned(),
        format!(r#"container_id="{}""#, api.id),
        format!(r#"container="{}""#, api.name),
        r#"kind="stall""#.to_owned(),
        r#"route="/block/sleep""#.to_owned(),
    ];
    let api_labels: Vec<&str> = api_labels.iter().map(String::as_str).collect();
    let found = series(text, "loopguard_blocking_total", &api_labels);
    assert_eq!(found.len(), 1, "{text}");
    assert!(found[0].ends_with(" 1"), "{}", found[0]);
    let py_labels = [
        r#"service="checkout-py""#.to_owned(),
        format!(r#"container_id="{}""#, py.id),
        format!(r#"container="{}""#, py.name),
        r#"kind="loop""#.to_owned(),
    ];
    let py_labels: Vec<&str> = py_labels.iter().map(String::as_str).collect();
    assert_eq!(
        series(text, "loopguard_blocking_total", &py_labels).len(),
        1,
        "{text}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, podman, the example build and uvicorn; run `cargo xtask test`"]
fn stalls_in_podman_containers_carry_the_container_id_and_name() {
    require_root();
    let python = PathBuf::from(std::env::var_os("LOOPGUARD_PYTHON").expect(
        "LOOPGUARD_PYTHON is not set; run the end-to-end tests through `cargo xtask test`",
    ));
    let venv = python.parent().unwrap().parent().unwrap().to_owned();
    let apps = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/loop-servers")
        .canonicalize()
        .unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_capturing_stderr(&[
        "watch",
        "--all",
        "--container",
        &format!("{}-*", tag()),
        "--service-map",
        &format!("container:{}-py=checkout-py", tag()),
        "--metrics-addr",
        &metrics_addr,
        "--format",
        "json",
        "--no-stacks",
    ]);
    // Started during the watch: found at their exec inside the container.
    let (api_port, py_port) = (free_port(), free_port());
    let api = Container::run(
        &format!("{}-api", tag()),
        rootfs(
            "api",
            &[(&server_binary("LOOPGUARD_SERVER"), "/srv/shop-api")],
        ),
        &[],
        &["/srv/shop-api", "--addr", &format!("127.0.0.1:{api_port}")],
    );
    let py = Container::run(
        &format!("{}-py", tag()),
        rootfs("py", &[]),
        &[&venv, &apps],
        &[
            &python.display().to_string(),
            "-m",
            "uvicorn",
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            &py_port.to_string(),
            "--app-dir",
            &apps.display().to_string(),
        ],
    );
    wait_answering(api_port, "/fast");
    wait_answering(py_port, "/fast");
    for pid in [api.pid(), py.pid()] {
        agent.wait_for(
            &format!("pid {pid} attached"),
            Duration::from_secs(20),
            |v| v["type"] == "attached" && v["pid"] == pid,
        );
    }
    let addr = |port: u16| format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        http_get(addr(api_port), "/block/sleep?ms=200")
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        http_get(addr(py_port), "/sleep?ms=200").unwrap().status,
        200
    );
    let (api_pid, py_pid) = (api.pid(), py.pid());
    agent.wait_for("the api's stall", Duration::from_secs(5), |v| {
        v["type"] == "stall" && v["pid"] == api_pid
    });
    agent.wait_for("uvicorn's loop stall", Duration::from_secs(5), |v| {
        v["type"] == "stall" && v["pid"] == py_pid
    });

    assert_labelled(&scrape(&metrics_addr), &api, &py);

    let programs = agent.programs();
    agent.signal("INT");
    let (status, _, stderr) = agent.wait_with_stderr(Duration::from_secs(20));
    assert!(status.success(), "{stderr:#?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains(&format!("container {} ({})", api.name, &api.id[..12]))),
        "{stderr:#?}"
    );
    assert_detached(&programs);
    drop((api, py));
}
