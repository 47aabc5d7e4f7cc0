//! Build hygiene checks of `cargo xtask test` (issue #15): applications that
//! use the middleware never pull aya in, and the pure crates build and pass
//! their unit tests on stable Rust with no eBPF toolchain at all.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::cmd;

/// The crates with no kernel-facing code to build: the agent's library (its
/// pure modules: discover, detect, attribute, ...; attaching fails at run
/// time with a clear error when the eBPF object is empty), the shared types
/// and the middleware with its probe contract.
const PURE_CRATES: &[&str] = &[
    "loopguard",
    "loopguard-common",
    "loopguard-usdt",
    "loopguard-parse",
    "loopguard-middleware",
];

/// Fails if aya (or any `aya-*` crate) is in the dependency tree of an
/// application using the middleware: `stall-server` in this workspace, where
/// feature unification once brought it in, and `actix-server` in its own;
/// or of the parse crate built alone. Also checks the unified workspace
/// build: neither the middleware nor an example reaches aya.
pub fn check_no_aya_in_apps() -> anyhow::Result<()> {
    let started = Instant::now();
    let root = cmd::root();
    // What must never reach aya, and why: the apps using the middleware,
    // and the parsers of target files (pure, so they build, test and fuzz
    // without the agent's eBPF stack).
    let middleware = "uses loopguard-middleware: the middleware must not pull the agent's \
                      eBPF stack into applications";
    let pure: [(&str, Vec<OsString>, &str); 3] = [
        (
            "stall-server",
            vec!["-p".into(), "stall-server".into()],
            middleware,
        ),
        (
            "actix-server",
            vec![
                "--manifest-path".into(),
                root.join("examples/actix-server/Cargo.toml").into(),
                "--locked".into(),
            ],
            middleware,
        ),
        (
            "loopguard-parse",
            vec!["-p".into(), "loopguard-parse".into()],
            "is the parse crate: it must stay free of the eBPF stack",
        ),
    ];
    for (package, selection, why) in pure {
        let packages = tree(&root, &selection)?;
        let aya: Vec<&String> = packages.iter().filter(|p| is_aya(p)).collect();
        ensure!(
            aya.is_empty(),
            "{package} now depends on {}; it {why} (see `cargo tree -p {package} -i aya`)",
            aya.iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!(
            "hygiene: {package}: {} packages, none of them aya",
            packages.len()
        );
    }
    // All workspace members selected together, as a plain `cargo build`
    // does: what reaches aya through feature unification.
    let dependents = tree(
        &root,
        &["--workspace", "--invert", "aya"].map(OsString::from),
    )?;
    let unexpected: Vec<&String> = dependents
        .iter()
        .filter(|p| {
            p.starts_with("loopguard-middleware ")
                || p.starts_with("loopguard-usdt ")
                || p.contains("/examples/")
        })
        .collect();
    ensure!(
        unexpected.is_empty(),
        "in the workspace build, aya is reached from {}; only the agent's crates may \
         depend on it",
        unexpected
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "hygiene: workspace build (features unified): aya reached from neither the \
         middleware nor an example; checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds and unit-tests the pure crates with stable cargo and a PATH on
/// which bpf-linker cannot be found, in a target directory of their own (so
/// the agent there is always the one built without its eBPF object, and the
/// main target directory is left alone). The first run builds the
/// dependencies (about two minutes on two cores); later runs take seconds.
pub fn check_pure_crates_on_stable() -> anyhow::Result<()> {
    let started = Instant::now();
    let cargo = PathBuf::from(
        cmd::output(Command::new("rustup").args(["which", "--toolchain", "stable", "cargo"]))
            .trim(),
    );
    ensure!(
        cargo.is_file(),
        "the stable toolchain has no cargo (`rustup which --toolchain stable cargo`); \
         run `rustup toolchain install stable`"
    );
    let toolchain_bin = cargo.parent().context("cargo has a directory")?.to_owned();
    // The toolchain's own bin first, then every PATH entry that holds no
    // bpf-linker (rustup's proxy directory ~/.cargo/bin usually does).
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![toolchain_bin.clone()];
    dirs.extend(std::env::split_paths(&inherited).filter(|dir| !dir.join("bpf-linker").exists()));
    if let Some(found) = dirs.iter().find(|dir| dir.join("bpf-linker").exists()) {
        bail!(
            "bpf-linker sits in the stable toolchain's own directory ({}); cannot hide it",
            found.display()
        );
    }
    let path = std::env::join_paths(&dirs).context("PATH entries are joinable")?;
    let target = cmd::target_dir().join("no-bpf-linker");
    let mut test = Command::new(&cargo);
    test.current_dir(cmd::root())
        .arg("test")
        .args(PURE_CRATES.iter().flat_map(|p| ["-p", p]))
        .args(["--lib", "--quiet"])
        .env("PATH", &path)
        .env("RUSTC", toolchain_bin.join("rustc"))
        .env("CARGO_TARGET_DIR", &target)
        // The build script's switches: without these removed, a missing
        // linker would be an error, or skipped for another reason.
        .env_remove("LOOPGUARD_REQUIRE_EBPF")
        .env_remove("AYA_BUILD_SKIP");
    cmd::scrub_cargo_env(&mut test);
    eprintln!(
        "hygiene: bpf-linker hidden: PATH={}",
        path.to_string_lossy()
    );
    cmd::run(&mut test)?;
    // The agent built there embeds an empty object: its build script really
    // took the no-linker path.
    let objects = embedded_objects(&target.join("debug/build"))?;
    ensure!(
        !objects.is_empty(),
        "no embedded eBPF object under {}",
        target.display()
    );
    for object in &objects {
        let len = std::fs::metadata(object)?.len();
        ensure!(
            len == 0,
            "{} holds {len} bytes: the agent in {} was built with bpf-linker",
            object.display(),
            target.display()
        );
    }
    eprintln!(
        "hygiene: {} build and pass their unit tests on stable without bpf-linker \
         (agent built with an empty eBPF object) in {:.1} s",
        PURE_CRATES.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every package in the tree `cargo tree <selection>` prints (normal and
/// build dependencies, every target platform), one `name vX.Y.Z ...` each.
fn tree(root: &Path, selection: &[OsString]) -> anyhow::Result<Vec<String>> {
    let mut tree = cmd::cargo();
    tree.current_dir(root)
        .arg("tree")
        .args(selection)
        .args([
            "--edges",
            "normal,build",
            "--target",
            "all",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .stderr(Stdio::inherit());
    eprintln!("+ {}", cmd::display(&tree));
    let out = tree
        .output()
        .with_context(|| format!("failed to start `{}`", cmd::display(&tree)))?;
    if !out.status.success() {
        bail!("`{}` failed with {}", cmd::display(&tree), out.status);
    }
    let mut packages: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| line.trim_end_matches(" (*)").to_owned())
        .filter(|line| !line.is_empty())
        .collect();
    packages.sort();
    packages.dedup();
    Ok(packages)
}

fn is_aya(package: &str) -> bool {
    let name = package.split(' ').next().unwrap_or_default();
    name == "aya" || name.starts_with("aya-")
}

/// `build/loopguard-*/out/loopguard` files under a profile's build directory.
fn embedded_objects(build: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(build).with_context(|| format!("failed to read {}", build.display()))?;
    Ok(entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("loopguard-")
        })
        .map(|entry| entry.path().join("out/loopguard"))
        .filter(|object| object.exists())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::is_aya;

    #[test]
    fn aya_and_its_crates_are_told_from_lookalikes() {
        assert!(is_aya("aya v0.14.0"));
        assert!(is_aya("aya-obj v0.3.0"));
        assert!(!is_aya("ayanami v1.0.0"));
        assert!(!is_aya(
            "loopguard-usdt v0.1.0 (/src/loopguard-common/usdt)"
        ));
    }
}
