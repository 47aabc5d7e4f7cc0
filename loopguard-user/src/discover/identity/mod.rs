//! Who a process is, for labels: its service, its container, its pod.
//!
//! In: a pid (its `/proc/PID/{exe,cgroup,environ}`, and files inside its
//! root: podman's `/run/.containerenv`, a pod's service account
//! namespace), and the node's container log names ([`kubelet`]). Out:
//! [`Identity`], whose [`Identity::labels`] go on every series of a target.
//! Never the pid: pids churn, and a label per pid would grow without end.
//!
//! Every read is bounded and goes through [`super::files`]: a target
//! controls its environment's size and what sits in its root, and must not
//! make loopguard read `/dev/zero` or wait on a FIFO. What the target
//! controls (its environment, its root's files) only names the target.
//!
//! - [`cgroup`]: container runtime and id, pod UID, systemd unit;
//! - [`docker`]: a Docker container's name, from Docker's record of it;
//! - [`environ`]: declared service, pod and namespace names;
//! - [`kubelet`]: pod, namespace and container names by container id.

pub mod cgroup;
pub mod docker;
pub mod environ;
pub mod kubelet;
pub mod runtime;
pub mod service;

use std::io;
use std::path::Path;

use self::cgroup::{CgroupFacts, ContainerRuntime};
use self::environ::EnvFacts;
use self::kubelet::{PodIndex, PodNames};
use super::files;

/// The most of `/proc/PID/cgroup` read (a path per hierarchy; v2 has one).
const MAX_CGROUP_BYTES: u64 = 16 << 10;
/// The most of `/proc/PID/environ` read; entries past it are not seen.
const MAX_ENVIRON_BYTES: u64 = 128 << 10;
/// The most of `/run/.containerenv` or a namespace file read.
const MAX_SMALL_FILE_BYTES: u64 = 4 << 10;
/// The longest label value kept, in bytes (cut at a character boundary).
pub const MAX_LABEL_BYTES: usize = 128;

/// Podman's file in every container it runs.
const CONTAINERENV: &str = "/run/.containerenv";
/// The namespace of a pod's service account, when mounted.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Who a process is. Empty fields are unknown (a process outside any
/// container has no container id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The executable's file name (`/proc/PID/exe`).
    pub exe: String,
    /// What the process declares itself (`LOOPGUARD_SERVICE`,
    /// `OTEL_SERVICE_NAME`), else the executable's name; a user mapping
    /// may replace it.
    pub service: String,
    pub container_id: String,
    pub container_runtime: String,
    /// The container's name (Kubernetes, podman, `CONTAINER_NAME`).
    pub container: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The systemd unit, outside containers.
    pub unit: String,
    /// The cgroup path (for `--cgroup` selectors; not a label).
    pub cgroup: String,
}

/// The label names [`Identity::labels`] gives values for, in order.
pub const IDENTITY_LABELS: [&str; 5] = ["service", "container_id", "container", "namespace", "pod"];

impl Identity {
    /// The values of [`IDENTITY_LABELS`], empty where unknown.
    pub fn labels(&self) -> [&str; 5] {
        [
            &self.service,
            &self.container_id,
            &self.container,
            &self.namespace,
            &self.pod,
        ]
    }
}

/// What podman writes into `/run/.containerenv` (name and id only for
/// some containers, `--privileged` ones among them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerEnv {
    pub engine: Option<String>,
    pub name: Option<String>,
    pub id: Option<String>,
}

/// Parses `/run/.containerenv` (`key="value"` lines).
pub fn parse_containerenv(text: &str) -> ContainerEnv {
    let mut out = ContainerEnv::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if value.is_empty() {
            continue;
        }
        match key.trim() {
            "engine" => out.engine = Some(value.to_owned()),
            "name" => out.name = Some(value.to_owned()),
            "id" => out.id = Some(value.to_owned()),
            _ => {}
        }
    }
    out
}

/// Everything read about one process, before it is put together.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub exe: String,
    pub cgroup_path: String,
    pub cgroup: CgroupFacts,
    pub env: EnvFacts,
    pub pod_names: Option<PodNames>,
    pub containerenv: ContainerEnv,
    /// The container's name as its runtime recorded it on the host
    /// (Docker's `config.v2.json`).
    pub runtime_name: Option<String>,
    /// The service account's namespace file, inside the process's root.
    pub account_namespace: Option<String>,
}

/// Puts the facts together, most trusted source first: the node's own
/// names (cgroup, kubelet log links), then what the process says.
pub fn combine(facts: Facts) -> Identity {
    let Facts {
        exe,
        cgroup_path,
        cgroup,
        env,
        pod_names,
        containerenv,
        runtime_name,
        account_namespace,
    } = facts;
    let mut identity = Identity {
        exe: label_value(&exe),
        cgroup: cgroup_path,
        ..Identity::default()
    };
    identity.service = label_value(env.service.as_deref().unwrap_or(&exe));
    if let Some((runtime, id)) = container_of(&cgroup, &env, &containerenv) {
        id.clone_into(&mut identity.container_id);
        runtime.as_str().clone_into(&mut identity.container_runtime);
    }
    let in_pod = cgroup.pod_uid.is_some() || env.in_kubernetes || pod_names.is_some();
    let first = |sources: &[Option<&str>]| {
        sources
            .iter()
            .flatten()
            .find(|s| !s.trim().is_empty())
            .map(|s| label_value(s.trim()))
            .unwrap_or_default()
    };
    let names = pod_names.as_ref();
    identity.container = first(&[
        names.map(|n| n.container.as_str()),
        runtime_name.as_deref(),
        env.container_name.as_deref(),
        containerenv.name.as_deref(),
    ]);
    if in_pod {
        identity.namespace = first(&[
            names.map(|n| n.namespace.as_str()),
            env.pod_namespace.as_deref(),
            account_namespace.as_deref(),
        ]);
        identity.pod = first(&[
            names.map(|n| n.pod.as_str()),
            env.pod_name.as_deref(),
            env.hostname.as_deref(),
        ]);
        identity.pod_uid = cgroup.pod_uid.unwrap_or_default();
    }
    if identity.container_id.is_empty() && !in_pod {
        identity.unit = cgroup.unit.map(|u| label_value(&u)).unwrap_or_default();
    }
    identity
}

/// The runtime and id of the container the process runs in: from its
/// cgroup, else (under podman) from `/run/.containerenv`.
fn container_of<'a>(
    cgroup: &'a CgroupFacts,
    env: &EnvFacts,
    containerenv: &'a ContainerEnv,
) -> Option<(ContainerRuntime, &'a str)> {
    if let Some((runtime, id)) = &cgroup.container {
        Some((*runtime, id.as_str()))
    } else if env.container_engine.as_deref() == Some("podman")
        && let Some(id) = containerenv
            .id
            .as_deref()
            .filter(|id| cgroup::is_container_id(id))
    {
        Some((ContainerRuntime::Podman, id))
    } else {
        None
    }
}

/// A label value from a string the target may have chosen: control
/// characters become `?`, and it is cut to [`MAX_LABEL_BYTES`].
pub fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LABEL_BYTES));
    for c in text.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_LABEL_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The executable's file name from the `/proc/PID/exe` link's text (the
/// kernel appends ` (deleted)` to a replaced file).
pub fn exe_name(link: &str) -> &str {
    let link = link.strip_suffix(" (deleted)").unwrap_or(link);
    link.rsplit('/').next().unwrap_or(link)
}

/// Reads every fact about `pid` and puts them together. Only the
/// executable link is required (a process gone has none); every other
/// source that cannot be read is left out.
pub fn read_identity(pid: u32, pods: &PodIndex) -> io::Result<Identity> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let exe = exe_name(&link.to_string_lossy()).to_owned();
    let proc_file = |name: &str, cap| {
        files::read_prefix_through_proc(Path::new(&format!("/proc/{pid}/{name}")), cap).ok()
    };
    let cgroup_text = proc_file("cgroup", MAX_CGROUP_BYTES)
        .map(|(bytes, _)| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let cgroup_path = cgroup::cgroup_path(&cgroup_text)
        .unwrap_or_default()
        .to_owned();
    let cgroup = cgroup::parse_cgroup_path(&cgroup_path);
    let env = proc_file("environ", MAX_ENVIRON_BYTES)
        .map(|(bytes, whole)| environ::parse_environ(&bytes, whole))
        .unwrap_or_default();
    let in_root = |path: &str| {
        files::read_in_root(pid, path, MAX_SMALL_FILE_BYTES)
            .ok()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    };
    let podman = matches!(cgroup.container, Some((ContainerRuntime::Podman, _)))
        || env.container_engine.as_deref() == Some("podman");
    let containerenv = if podman {
        in_root(CONTAINERENV)
            .map(|text| parse_containerenv(&text))
            .unwrap_or_default()
    } else {
        ContainerEnv::default()
    };
    let pod_names = cgroup
        .container
        .as_ref()
        .and_then(|(_, id)| pods.get(id))
        .cloned();
    let runtime_name = match &cgroup.container {
        Some((ContainerRuntime::Docker, id)) if pod_names.is_none() => {
            docker::container_name(Path::new(docker::DOCKER_CONTAINERS_DIR), id)
        }
        _ => None,
    };
    let account_namespace = if pod_names.is_none()
        && env.pod_namespace.is_none()
        && (cgroup.pod_uid.is_some() || env.in_kubernetes)
    {
        in_root(SERVICE_ACCOUNT_NAMESPACE)
    } else {
        None
    };
    Ok(combine(Facts {
        exe,
        cgroup_path,
        cgroup,
        env,
        pod_names,
        containerenv,
        runtime_name,
        account_namespace,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2a9c1be0d3a7c65e8f1b2d3c4a5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";
    const UID: &str = "8f1c2d3e-4a5b-6c7d-8e9f-0a1b2c3d4e5f";

    fn k8s_cgroup() -> CgroupFacts {
        cgroup::parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        ))
    }

    #[test]
    fn a_pod_named_by_the_node_wins_over_what_it_says() {
        let identity = combine(Facts {
            exe: "api".into(),
            cgroup: k8s_cgroup(),
            env: EnvFacts {
                pod_name: Some("liar".into()),
                in_kubernetes: true,
                ..EnvFacts::default()
            },
            pod_names: Some(PodNames {
                namespace: "shop".into(),
                pod: "api-7d9f8-x2x4q".into(),
                container: "checkout".into(),
            }),
            ..Facts::default()
        });
        assert_eq!(
            identity.labels(),
            ["api", ID, "checkout", "shop", "api-7d9f8-x2x4q"]
        );
        assert_eq!(identity.pod_uid, UID);
        assert_eq!(identity.container_runtime, "containerd");
    }

    #[test]
    fn without_the_log_links_the_environment_and_account_name_the_pod() {
        let identity = combine(Facts {
            exe: "python3.11".into(),
            cgroup: k8s_cgroup(),
            env: EnvFacts {
                service: Some("checkout".into()),
                hostname: Some("api-7d9f8-x2x4q".into()),
                in_kubernetes: true,
                ..EnvFacts::default()
            },
            account_namespace: Some("shop\n".into()),
            ..Facts::default()
        });
        assert_eq!(
            identity.labels(),
            ["checkout", ID, "", "shop", "api-7d9f8-x2x4q"]
        );
        assert_eq!(identity.exe, "python3.11");
    }

    #[test]
    fn a_podman_container_and_a_plain_service() {
        let identity = combine(Facts {
            exe: "stall-server".into(),
            cgroup: cgroup::parse_cgroup_path(&format!("/machine.slice/libpod-{ID}.scope")),
            env: EnvFacts {
                container_engine: Some("podman".into()),
                hostname: Some("4f2a9c1be0d3".into()),
                ..EnvFacts::default()
            },
            containerenv: parse_containerenv(&format!(
                "engine=\"podman-4.3.1\"\nname=\"shop-api\"\nid=\"{ID}\"\nimage=\"\"\n"
            )),
            ..Facts::default()
        });
        // Not a pod: the hostname is no pod name.
        assert_eq!(identity.labels(), ["stall-server", ID, "shop-api", "", ""]);
        assert_eq!(identity.container_runtime, "podman");

        let identity = combine(Facts {
            exe: "api".into(),
            cgroup: cgroup::parse_cgroup_path("/system.slice/api.service"),
            ..Facts::default()
        });
        assert_eq!(identity.labels(), ["api", "", "", "", ""]);
        assert_eq!(identity.unit, "api.service");
    }

    #[test]
    fn a_docker_container_is_named_by_dockers_record_over_its_own_word() {
        let identity = combine(Facts {
            exe: "api".into(),
            cgroup: cgroup::parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope")),
            env: EnvFacts {
                container_name: Some("what-it-says".into()),
                ..EnvFacts::default()
            },
            runtime_name: Some("shop-api".into()),
            ..Facts::default()
        });
        assert_eq!(identity.labels(), ["api", ID, "shop-api", "", ""]);
        assert_eq!(identity.container_runtime, "docker");
    }

    #[test]
    fn label_values_are_printable_and_bounded() {
        assert_eq!(label_value("a\nb\u{1b}[31m"), "a?b?[31m");
        let long = "é".repeat(100);
        let cut = label_value(&long);
        assert_eq!(cut.len(), MAX_LABEL_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(exe_name("/srv/bin/api (deleted)"), "api");
        assert_eq!(exe_name("api"), "api");
    }

    #[test]
    fn this_process_is_read_without_a_pod_index() {
        let identity = read_identity(std::process::id(), &PodIndex::default()).unwrap();
        assert!(!identity.exe.is_empty());
        assert_eq!(identity.service, identity.exe);
        assert!(read_identity(u32::MAX, &PodIndex::default()).is_err());
    }
}
