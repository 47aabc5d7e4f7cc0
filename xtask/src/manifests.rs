//! `cargo xtask manifests`: the Kubernetes manifests in `deploy/kubernetes/`
//! validated offline against the Kubernetes schemas (kubernetes-validate
//! from `PyPI`, strict: an unknown field fails), for the oldest and the
//! newest Kubernetes release checked, then checked against each other
//! (`manifests_check.py`: selectors, ports, annotations, capabilities).
//! Needs no root and no cluster.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cmd, setup};

/// The Kubernetes releases the manifests are validated against.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

/// Kinds the validator has no schema for (custom resources, kustomize's
/// file): allowed to be skipped, and checked by `manifests_check.py`.
const CUSTOM_KINDS: &[&str] = &["ServiceMonitor", "Kustomization"];

const CHECK: &str = include_str!("manifests_check.py");

pub fn run() -> anyhow::Result<()> {
    let bin = setup::manifest_validator()?;
    let dir = cmd::root().join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("failed to list {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    for version in KUBERNETES_VERSIONS {
        validate(&bin, version, &files)?;
    }
    // The validator catches a misspelt field: the test has teeth.
    let broken = cmd::target_dir().join("manifests-broken.yaml");
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml"))?;
    std::fs::write(&broken, daemonset.replace("hostPID:", "hostPIDs:"))?;
    if validate(&bin, KUBERNETES_VERSIONS[0], &[broken]).is_ok() {
        bail!("kubernetes-validate passed a DaemonSet with a misspelt field (`hostPIDs`)");
    }
    let check = cmd::target_dir().join("manifests_check.py");
    std::fs::write(&check, CHECK)?;
    cmd::run(Command::new(bin.join("python")).arg(&check).arg(&dir))
        .context("the manifests do not fit together")
}

/// Validates `files` against one Kubernetes release: every object passes,
/// or is of a custom kind the validator has no schema for.
fn validate(bin: &Path, version: &str, files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let mut command = Command::new(bin.join("kubernetes-validate"));
    command
        .args(["--strict", "--kubernetes-version", version])
        .args(files);
    eprintln!("+ {}", cmd::display(&command));
    let out = command
        .output()
        .with_context(|| format!("failed to start `{}`", cmd::display(&command)))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| !(line.starts_with("INFO ") && line.contains(" passed for resource ")))
        .filter(|line| {
            !(line.starts_with("WARN ")
                && CUSTOM_KINDS
                    .iter()
                    .any(|kind| line.contains(&format!("Couldn't find schema for kind {kind} "))))
        })
        .collect();
    let passed = text.matches(" passed for resource ").count();
    if !out.status.success() || !bad.is_empty() || passed == 0 {
        bail!(
            "the manifests do not validate against Kubernetes {version} ({}):\n{}",
            out.status,
            if bad.is_empty() {
                text.as_str().into()
            } else {
                bad.join("\n")
            }
        );
    }
    eprintln!("manifests: {passed} objects valid against Kubernetes {version}");
    Ok(())
}
