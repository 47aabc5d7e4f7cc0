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
use support::{Agent, assert_detached, http_get, require_root, scrape, server_binary};

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
        let _ = std::fs::remove_file(self.root.with_extension("cid"));
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

/// The agent image `image` from the Containerfile over a stand-in base
/// `base` (an empty root filesystem, returned: the host's C library is
/// mounted at run time).
fn build_image(repo: &Path, base: &str, image: &str) -> PathBuf {
    // The base: the host's C library, mounted at run time.
    let root = rootfs("base", &[]);
    let tar = root.with_extension("tar");
    let podman = || {
        let mut podman = Command::new("podman");
        podman.args([
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
        podman
    };
    let ok = |command: &mut Command| {
        let out = command.stdin(Stdio::null()).output().expect("run podman");
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    ok(podman().arg("import").arg(&tar).arg(base));
    let _ = std::fs::remove_file(&tar);
    ok(podman()
        .args(["build", "-q", "--pull=never", "--from", base, "-t", image])
        .arg("-f")
        .arg(repo.join("Containerfile"))
        .arg(repo));

    root
}

/// The agent image, built from the repository's Containerfile (over a
/// stand-in base: no registry here; `--from` replaces its `FROM`), runs
/// `watch --all` with exactly the `DaemonSet`'s privileges: every capability
/// dropped but `SYS_ADMIN`, `SYS_PTRACE` and `KILL`, no new privileges,
/// a read-only root, the runtime's default seccomp profile, the host's
/// pids. It finds a Tokio program on the host and reports its stall.
#[test]
#[ignore = "end-to-end: needs root, podman and the example build; run `cargo xtask test`"]
fn the_agent_image_watches_the_host_with_the_daemonsets_capabilities() {
    require_root();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    assert!(
        repo.join("target/release/loopguard").exists(),
        "the Containerfile packages target/release/loopguard; build it (`cargo xtask build`)"
    );
    let (base, image) = (
        format!("localhost/{}-base", tag()),
        format!("localhost/{}-agent", tag()),
    );
    let images = Images(vec![base.clone(), image.clone()]);
    let root = build_image(&repo, &base, &image);

    let dir = std::env::temp_dir().join(format!("{}-image-target", tag()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target_binary = dir.join("image-target");
    std::fs::copy(server_binary("LOOPGUARD_SERVER"), &target_binary).unwrap();
    let target = support::Server::start(&target_binary, &[]);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let name = format!("{}-agent", tag());
    let mut agent = Command::new("podman");
    agent
        .args([
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ])
        .args([
            "run",
            "--rm",
            "--name",
            &name,
            "--pid",
            "host",
            "--network",
            "host",
        ])
        .args([
            "--read-only",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "SYS_ADMIN,SYS_PTRACE,KILL",
        ])
        .args(["--security-opt", "no-new-privileges"])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args([
            "-v",
            "/usr/lib:/usr/lib:ro",
            "-v",
            "/usr/lib64:/usr/lib64:ro",
        ])
        .arg(&image)
        .args(["watch", "--all", "--exe", &format!("{}/*", dir.display())])
        .args([
            "--metrics-addr",
            &metrics_addr,
            "--no-stacks",
            "--format",
            "json",
        ]);
    let _running = Container {
        name,
        id: String::new(),
        root,
    };
    let agent = Agent::spawn(agent);
    agent.wait_for("the target attached", Duration::from_secs(30), |v| {
        v["type"] == "attached" && v["pid"] == target.pid
    });
    target.get("/block/sleep?ms=150");
    agent.wait_for("its stall", Duration::from_secs(5), |v| {
        v["type"] == "stall" && v["pid"] == target.pid
    });
    let text = scrape(&metrics_addr);
    let found = series(
        &text,
        "loopguard_blocking_total",
        &[r#"service="image-target""#, r#"kind="stall""#],
    );
    assert_eq!(found.len(), 1, "{text}");
    drop(agent);
    drop(target);
    drop(images);
    let _ = std::fs::remove_dir_all(dir);
}

/// Images removed on drop.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("podman")
                .args(["--events-backend", "file", "rmi", "-f", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
