//! The Tokio version matrix: `examples/tokio-matrix` built against each
//! checked Tokio version (each with a lock of its own, outside the main
//! workspace), and `examples/actix-server`, for the `matrix` end-to-end test.
//!
//! One target directory serves them all, so only Tokio and what depends on
//! it are built again per version: about a minute on two cores, once.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cmd;

/// Tokio versions checked: the oldest supported, one in the middle, and
/// (`None`) the newest published, resolved afresh on every run.
pub const TOKIO_VERSIONS: &[Option<&str>] = &[Some("1.38.2"), Some("1.45.1"), None];

/// What the `matrix` test attaches to: `label|binary|flavor` entries,
/// `;`-separated (`LOOPGUARD_MATRIX`).
pub fn build() -> anyhow::Result<String> {
    let root = cmd::root();
    let matrix_dir = cmd::target_dir().join("matrix");
    let target = matrix_dir.join("target");
    let mut entries = Vec::new();
    for version in TOKIO_VERSIONS {
        let label = version.unwrap_or("latest");
        let dir = matrix_dir.join(format!("tokio-{label}"));
        let manifest = write_manifest(&root, &dir, *version)?;
        if version.is_none() {
            // The newest Tokio published today, not the one locked last time.
            cmd::run(
                cmd::cargo()
                    .arg("update")
                    .arg("--manifest-path")
                    .arg(&manifest),
            )?;
        }
        cmd::run(
            cmd::cargo()
                .args(["build", "--release", "--manifest-path"])
                .arg(&manifest)
                .env("CARGO_TARGET_DIR", &target),
        )?;
        let binary = dir.join("tokio-matrix");
        std::fs::copy(target.join("release/tokio-matrix"), &binary).with_context(|| {
            format!(
                "failed to copy the tokio-matrix build to {}",
                binary.display()
            )
        })?;
        let resolved = locked_version(&dir.join("Cargo.lock"), "tokio")?;
        eprintln!("matrix: tokio {resolved} -> {}", binary.display());
        for flavor in ["multi-thread", "current-thread"] {
            entries.push(format!(
                "tokio {resolved} {flavor}|{}|{flavor}",
                binary.display()
            ));
        }
    }
    let actix = root.join("examples/actix-server/Cargo.toml");
    cmd::run(
        cmd::cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(&actix)
            .env("CARGO_TARGET_DIR", &target),
    )?;
    let resolved = locked_version(&root.join("examples/actix-server/Cargo.lock"), "actix-web")?;
    entries.push(format!(
        "actix-web {resolved}|{}|actix",
        target.join("release/actix-server").display()
    ));
    Ok(entries.join(";"))
}

/// Clippy for the matrix's examples, once each: `tokio-matrix` against the
/// oldest checked Tokio (its code is the same for every version), and
/// `actix-server` with its own lock. Check builds in the matrix's target
/// directory: about two minutes the first time on two cores, a second after.
pub fn clippy() -> anyhow::Result<()> {
    let root = cmd::root();
    let matrix_dir = cmd::target_dir().join("matrix");
    let oldest = TOKIO_VERSIONS[0].context("the first checked Tokio version is pinned")?;
    let tokio_matrix = write_manifest(
        &root,
        &matrix_dir.join(format!("tokio-{oldest}")),
        Some(oldest),
    )?;
    let actix = root.join("examples/actix-server/Cargo.toml");
    // The generated manifest's lock is written by the first build; the
    // actix example's is in the repository and must be current.
    for (manifest, lock) in [(&tokio_matrix, None), (&actix, Some("--locked"))] {
        cmd::run(
            cmd::cargo()
                .args(["clippy", "--all-targets", "--manifest-path"])
                .arg(manifest)
                .args(lock)
                .args(["--", "-D", "warnings"])
                .env("CARGO_TARGET_DIR", matrix_dir.join("target")),
        )?;
    }
    Ok(())
}

/// The example's manifest with its Tokio pinned to `version` (or left at
/// "1.38" or later) and absolute paths, in a directory of its own.
fn write_manifest(root: &Path, dir: &Path, version: Option<&str>) -> anyhow::Result<PathBuf> {
    let example = root.join("examples/tokio-matrix");
    let template = std::fs::read_to_string(example.join("Cargo.toml"))
        .context("failed to read examples/tokio-matrix/Cargo.toml")?;
    let pinned = version.map_or_else(
        || "version = \"1.38\"".to_owned(),
        |v| format!("version = \"={v}\""),
    );
    let text = template
        .replace(
            "tokio = { version = \"1.38\"",
            &format!("tokio = {{ {pinned}"),
        )
        .replace(
            "path = \"../../loopguard-middleware\"",
            &format!("path = \"{}\"", root.join("loopguard-middleware").display()),
        )
        .replace(
            "[dependencies]",
            &format!(
                "[[bin]]\nname = \"tokio-matrix\"\npath = \"{}\"\n\n[dependencies]",
                example.join("src/main.rs").display()
            ),
        );
    anyhow::ensure!(
        text.contains(&pinned) && text.contains("[[bin]]"),
        "examples/tokio-matrix/Cargo.toml no longer has the lines xtask rewrites"
    );
    std::fs::create_dir_all(dir)?;
    let manifest = dir.join("Cargo.toml");
    std::fs::write(&manifest, text)?;
    Ok(manifest)
}

/// The version of `package` in a Cargo.lock.
fn locked_version(lock: &Path, package: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(lock)
        .with_context(|| format!("failed to read {}", lock.display()))?;
    let needle = format!("name = \"{package}\"\nversion = \"");
    let start = text
        .find(&needle)
        .with_context(|| format!("{package} is not in {}", lock.display()))?
        + needle.len();
    Ok(text[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_owned())
}
