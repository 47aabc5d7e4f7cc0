//! Installs the toolchain pieces the build and the tests need, each only when
//! missing, so a second run takes a second.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::cmd;

/// Debian packages: LLVM 22 for bpf-linker, wrk for load, bpftool to check
/// that detaching leaves no programs behind, Prometheus (and its promtool)
/// for the metrics end-to-end test, Python's venv and Node.js for the
/// event loops the wait-path end-to-end tests watch, Chromium to open the
/// HTML report headless, podman and runc to run the example in real
/// containers (`tests/containers.rs`; crun, podman's default, refuses
/// hybrid cgroup hosts), gcc and Debian's Python headers to build
/// loopguard-asgi's C module.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "wrk",
    "bpftool",
    "prometheus",
    "python3-venv",
    "python3-dev",
    "gcc",
    "nodejs",
    "chromium",
    "podman",
    "runc",
];
/// The ASGI server the wait-path end-to-end test runs (from `PyPI`, into a
/// virtual environment under the target directory).
const UVICORN_VERSION: &str = "0.54.0";
/// `FastAPI` for the Python stack end-to-end tests (with uvicorn
/// [`UVICORN_VERSION`]), one virtual environment per `CPython` version.
const FASTAPI_VERSION: &str = "0.165.0";
/// The `CPython` versions whose stacks loopguard reads, and where each is
/// looked for: Debian's (a stripped executable holding the interpreter)
/// first, then pyenv's builds (the interpreter in `libpython3.x.so`).
pub const STACK_PYTHONS: &[(&str, &[&str])] = &[
    (
        "3.11",
        &[
            "/usr/bin/python3.11",
            "/root/.pyenv/versions/3.11.7/bin/python3.11",
        ],
    ),
    // pyenv's 3.11 too: its interpreter is in `libpython3.11.so`, not
    // the executable as Debian's is.
    ("3.11.7", &["/root/.pyenv/versions/3.11.7/bin/python3.11"]),
    ("3.12", &["/root/.pyenv/versions/3.12.1/bin/python3.12"]),
    ("3.13", &["/root/.pyenv/versions/3.13.0/bin/python3.13"]),
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The fixed-rate load generator of `cargo xtask bench` (MSRV 1.88). Not
/// part of [`run`]: only the benchmark needs it.
pub const OHA_VERSION: &str = "1.16.0";

pub fn run() -> anyhow::Result<()> {
    install_apt_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    python_with_uvicorn()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn install_apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let why = "installing Debian packages";
    cmd::run(cmd::as_root("apt-get", why)?.args(["update", "-qq"]))?;
    cmd::run(
        cmd::as_root("apt-get", why)?
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn install_rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    if !installed.lines().any(|line| line.starts_with("rustc")) {
        eprintln!("setup: installing the nightly toolchain");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    eprintln!("setup: adding rust-src to nightly (the eBPF build compiles core)");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let version = cmd::output(Command::new("bpf-linker").arg("--version"));
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute on two cores)"
    );
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
    .context("failed to install bpf-linker")
}

/// What the Python end-to-end tests and the Python benchmark install from
/// `PyPI` beside uvicorn, pinned: `FastAPI` on `Starlette` and `anyio`, `httpx` and
/// pytest for the CI-guard suites, and fastapi-loopguard, the package the
/// benchmark compares against.
const PYTHON_PACKAGES: &[&str] = &[
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "anyio==4.16.0",
    "httpx==0.29.0",
    "pytest==9.2.0",
    "fastapi-loopguard==0.9.0",
];

/// A virtual environment with uvicorn [`UVICORN_VERSION`],
/// [`PYTHON_PACKAGES`] and this repository's `python/loopguard-asgi`
/// (editable, its C module built in place) for the Python end-to-end
/// tests, made with Debian's `python3` (stripped, as users' Pythons often
/// are) unless it is there; returns its `python`. An editable install does
/// not rebuild the C module when its source changes: a module older than
/// its source, or missing, is built again.
pub fn python_with_uvicorn() -> anyhow::Result<PathBuf> {
    let venv = cmd::target_dir().join("e2e-python");
    let python = venv.join("bin/python");
    let asgi = cmd::root().join("python/loopguard-asgi");
    let wanted = std::iter::once(format!("uvicorn=={UVICORN_VERSION}"))
        .chain(PYTHON_PACKAGES.iter().map(|p| (*p).to_owned()))
        .collect::<Vec<_>>();
    // One line per package, `name==version`, then where loopguard_asgi is,
    // then whether its C module is built from the current source.
    let check = "import importlib.metadata as m, os, sys, loopguard_asgi\n\
        for spec in sys.argv[1:]:\n    name = spec.split('==')[0]\n    print(name + '==' + m.version(name))\n\
        print(loopguard_asgi.__file__)\n\
        from loopguard_asgi import _impl\n\
        source = os.path.join(os.path.dirname(loopguard_asgi.__file__), '_native.c')\n\
        print(_impl.native is not None and os.path.getmtime(_impl.native.__file__) >= os.path.getmtime(source))";
    let installed = cmd::output(Command::new(&python).arg("-c").arg(check).args(&wanted));
    let mut lines = installed.lines();
    let pinned = wanted
        .iter()
        .all(|spec| lines.next() == Some(spec.as_str()));
    let editable = lines
        .next()
        .is_some_and(|file| Path::new(file).starts_with(&asgi));
    let native = lines.next() == Some("True");
    if pinned && editable && native {
        return Ok(python);
    }
    if !python.exists() {
        eprintln!(
            "setup: making a Python virtual environment with uvicorn {UVICORN_VERSION} and FastAPI for the end-to-end tests"
        );
        cmd::run(
            Command::new("/usr/bin/python3")
                .arg("-m")
                .arg("venv")
                .arg(&venv),
        )
        .context(
            "failed to make the end-to-end tests' Python virtual environment (Debian's python3-venv)",
        )?;
    }
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&wanted)
            .arg("-e")
            .arg(&asgi),
    )
    .context(
        "failed to install uvicorn, FastAPI and python/loopguard-asgi (PyPI must be reachable)",
    )?;
    Ok(python)
}

/// The offline validator of `deploy/kubernetes/` (it ships the Kubernetes
/// `OpenAPI` schemas of every release it knows; pinned, so its schemas do not
/// move under the test).
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// A virtual environment with kubernetes-validate
/// [`KUBERNETES_VALIDATE_VERSION`] (and `PyYAML`, which it depends on),
/// made unless it is there; returns its `bin` directory.
pub fn manifest_validator() -> anyhow::Result<PathBuf> {
    let venv = cmd::target_dir().join("manifests-python");
    let bin = venv.join("bin");
    let installed = cmd::output(Command::new(bin.join("python")).args([
        "-c",
        "import importlib.metadata as m, yaml; print(m.version('kubernetes-validate'))",
    ]));
    if installed.trim() == KUBERNETES_VALIDATE_VERSION {
        return Ok(bin);
    }
    if !bin.join("python").exists() {
        eprintln!(
            "setup: making a Python virtual environment with kubernetes-validate {KUBERNETES_VALIDATE_VERSION} for the manifest test"
        );
        cmd::run(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
        )
        .context(
            "failed to make the manifest test's Python virtual environment (Debian's python3-venv)",
        )?;
    }
    cmd::run(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )
    .context("failed to install kubernetes-validate (PyPI must be reachable)")?;
    Ok(bin)
}

/// Installs oha [`OHA_VERSION`] unless it is there; returns the binary to
/// run. About six minutes on two cores the first time (it builds rustls).
pub fn install_oha() -> anyhow::Result<PathBuf> {
    if let Some(oha) = find_oha() {
        return Ok(oha);
    }
    eprintln!(
        "setup: installing oha {OHA_VERSION}, the benchmark's fixed-rate load generator (about six minutes on two cores, once)"
    );
    let install = || format!("cargo install --locked oha --version {OHA_VERSION}");
    cmd::run(cmd::cargo().args(["install", "--locked", "oha", "--version", OHA_VERSION]))
        .with_context(|| {
            format!(
                "failed to install oha: run `{}` to see why (it needs crates.io and a C compiler), then `cargo xtask bench` again",
                install()
            )
        })?;
    find_oha().with_context(|| {
        format!(
            "`{}` succeeded but no oha {OHA_VERSION} is found in $CARGO_HOME/bin, ~/.cargo/bin or PATH",
            install()
        )
    })
}

/// An oha that says it is [`OHA_VERSION`]: where `cargo install` puts it
/// first (sudo may change HOME, and PATH may lack ~/.cargo/bin), then PATH.
fn find_oha() -> Option<PathBuf> {
    let home = |var: &str, sub: &str| std::env::var_os(var).map(|dir| PathBuf::from(dir).join(sub));
    [
        home("CARGO_HOME", "bin/oha"),
        home("HOME", ".cargo/bin/oha"),
        Some(PathBuf::from("oha")),
    ]
    .into_iter()
    .flatten()
    .find(|oha| {
        cmd::output(Command::new(oha).arg("--version"))
            .split_whitespace()
            .any(|word| word == OHA_VERSION)
    })
}

/// One virtual environment per [`STACK_PYTHONS`] version with `FastAPI`
/// [`FASTAPI_VERSION`] and uvicorn [`UVICORN_VERSION`], made unless it is
/// there; returns `(version, its python)`.
pub fn pythons_with_fastapi() -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut found = Vec::new();
    for &(version, candidates) in STACK_PYTHONS {
        let Some(base) = candidates.iter().find(|path| Path::new(path).exists()) else {
            anyhow::bail!(
                "no CPython {version} for the Python stack end-to-end tests (looked for {}); install one, e.g. `pyenv install {version}`",
                candidates.join(", ")
            );
        };
        let venv = cmd::target_dir().join(format!("e2e-fastapi-{version}"));
        let python = venv.join("bin/python");
        let installed = cmd::output(Command::new(&python).args([
            "-c",
            "import fastapi, uvicorn; print(fastapi.__version__, uvicorn.__version__)",
        ]));
        if installed.trim() != format!("{FASTAPI_VERSION} {UVICORN_VERSION}") {
            eprintln!(
                "setup: making a CPython {version} virtual environment with FastAPI {FASTAPI_VERSION} and uvicorn {UVICORN_VERSION}"
            );
            let _ = std::fs::remove_dir_all(&venv);
            cmd::run(Command::new(base).args(["-m", "venv"]).arg(&venv))
                .with_context(|| format!("failed to make a virtual environment with {base}"))?;
            cmd::run(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check"])
                    .arg(format!("fastapi=={FASTAPI_VERSION}"))
                    .arg(format!("uvicorn=={UVICORN_VERSION}")),
            )
            .context("failed to install FastAPI and uvicorn from PyPI")?;
        }
        found.push((version, python));
    }
    Ok(found)
}
