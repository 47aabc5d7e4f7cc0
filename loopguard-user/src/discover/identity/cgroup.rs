//! What a process's cgroup path says about where it runs: the container
//! (runtime and id), the Kubernetes pod (its UID and `QoS` class) and the
//! systemd unit.
//!
//! In: the text of `/proc/PID/cgroup`. Out: [`CgroupFacts`]. The path is
//! the one the cgroup v2 line (`0::/...`) gives, or, on a v1-only host, the
//! `name=systemd` line; it is relative to the reader's cgroup namespace
//! (an agent in a pod with its own namespace sees `/../../kubepods.slice/...`),
//! so only its components are read, never its root. Forms known:
//!
//! | who | path (last components) |
//! | --- | --- |
//! | docker, systemd driver | `system.slice/docker-<id>.scope` |
//! | docker, cgroupfs driver | `docker/<id>` |
//! | podman | `machine.slice/libpod-<id>.scope` (`.../container` under it with `--systemd`), `libpod_parent/libpod-<id>` |
//! | containerd (CRI), systemd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | containerd (CRI), cgroupfs | `kubepods/burstable/pod<uid>/<id>` |
//! | cri-o | `.../kubepods-besteffort-pod<uid>.slice/crio-<id>.scope` |
//! | systemd service | `system.slice/<unit>.service` |
//!
//! The monitors beside a container (`libpod-conmon-<id>.scope`,
//! `crio-conmon-<id>.scope`) are not the container. An id is 64 lowercase
//! hex digits, or it is not taken.

/// The engine that made a container, as its cgroup names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerRuntime {
    Docker,
    Podman,
    Containerd,
    CriO,
    /// An id with no runtime prefix (the cgroupfs driver under `kubepods`).
    Unknown,
}

impl ContainerRuntime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Unknown => "unknown",
        }
    }
}

/// What the cgroup path names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// The container's runtime and 64-hex-digit id.
    pub container: Option<(ContainerRuntime, String)>,
    /// The Kubernetes pod's UID (`8f1c...-...`, dashes restored).
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`, for a pod.
    pub qos: Option<&'static str>,
    /// The systemd unit (`nginx.service`), outside containers.
    pub unit: Option<String>,
}

/// The cgroup path of a process from the text of `/proc/PID/cgroup`: the
/// v2 line's, unless it is the root while v1 hierarchies place the
/// process (a hybrid host, where containers live in the v1 hierarchies):
/// then `name=systemd`'s, else the first v1 path that is not the root.
pub fn cgroup_path(text: &str) -> Option<&str> {
    let (mut unified, mut systemd, mut other) = (None, None, None);
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        } else if path != "/" {
            if controllers == "name=systemd" {
                systemd = Some(path);
            } else if other.is_none() {
                other = Some(path);
            }
        }
    }
    unified
        .filter(|path| *path != "/")
        .or(systemd)
        .or(other)
        .or(unified)
}

/// Parses the text of `/proc/PID/cgroup`.
pub fn parse_cgroup(text: &str) -> CgroupFacts {
    cgroup_path(text).map(parse_cgroup_path).unwrap_or_default()
}

/// Parses one cgroup path.
pub fn parse_cgroup_path(path: &str) -> CgroupFacts {
    let mut facts = CgroupFacts::default();
    let components: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "..")
        .collect();
    for (index, component) in components.iter().enumerate() {
        let parent = index.checked_sub(1).map(|i| components[i]);
        if let Some(container) = container_of(component, parent) {
            facts.container = Some(container);
        } else if let Some((qos, uid)) = pod_of(component, parent) {
            facts.pod_uid = Some(uid);
            facts.qos = Some(qos);
        }
    }
    if facts.container.is_none()
        && facts.pod_uid.is_none()
        && let Some(last) = components.last()
        && let Some(unit) = unit_of(last)
    {
        facts.unit = Some(unit);
    }
    facts
}

/// A container id: 64 lowercase hex digits.
pub fn is_container_id(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn container_of(component: &str, parent: Option<&str>) -> Option<(ContainerRuntime, String)> {
    let scope = component.strip_suffix(".scope").unwrap_or(component);
    let prefixed = [
        ("docker-", ContainerRuntime::Docker),
        ("libpod-", ContainerRuntime::Podman),
        ("cri-containerd-", ContainerRuntime::Containerd),
        ("crio-", ContainerRuntime::CriO),
    ];
    for (prefix, runtime) in prefixed {
        if let Some(id) = scope.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some((runtime, id.to_owned()));
        }
    }
    if !is_container_id(component) {
        return None;
    }
    // A bare id: its parent says who made it.
    let runtime = match parent {
        Some("docker") => ContainerRuntime::Docker,
        Some("libpod_parent") => ContainerRuntime::Podman,
        _ => ContainerRuntime::Unknown,
    };
    Some((runtime, component.to_owned()))
}

/// A pod's cgroup: `kubepods-<qos>-pod<uid>.slice` (systemd, dashes in the
/// UID written as underscores), `kubepods-pod<uid>.slice` (guaranteed), or
/// `pod<uid>` under `kubepods[/<qos>]` (cgroupfs).
fn pod_of(component: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    let (qos_part, uid) = if let Some(slice) = component
        .strip_prefix("kubepods-")
        .and_then(|c| c.strip_suffix(".slice"))
    {
        let at = slice.find("pod")?;
        (slice[..at].trim_end_matches('-'), &slice[at + 3..])
    } else {
        let uid = component.strip_prefix("pod")?;
        let qos = match parent {
            Some("kubepods") => "",
            Some(qos @ ("burstable" | "besteffort")) => qos,
            _ => return None,
        };
        (qos, uid)
    };
    let qos = match qos_part {
        "" => "guaranteed",
        "burstable" => "burstable",
        "besteffort" => "besteffort",
        _ => return None,
    };
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some((qos, uid))
}

/// A pod UID: a UUID in its 8-4-4-4-12 form, lowercase hex.
fn is_pod_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(group, len)| {
            group.len() == len
                && group
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// A systemd unit that runs a service: `<name>.service`, not the slices
/// and scopes of a login session.
fn unit_of(component: &str) -> Option<String> {
    let name = component.strip_suffix(".service")?;
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.@:\\".contains(&b);
    (!name.is_empty()
        && component.len() <= 256
        && component.bytes().all(allowed)
        && !name.starts_with("user@"))
    .then(|| component.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2a9c1be0d3a7c65e8f1b2d3c4a5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";
    const UID: &str = "8f1c2d3e-4a5b-6c7d-8e9f-0a1b2c3d4e5f";

    fn container(path: &str) -> Option<(ContainerRuntime, String)> {
        parse_cgroup_path(path).container
    }

    #[test]
    fn docker_both_drivers() {
        let expected = Some((ContainerRuntime::Docker, ID.to_owned()));
        assert_eq!(
            container(&format!("/system.slice/docker-{ID}.scope")),
            expected
        );
        assert_eq!(container(&format!("/docker/{ID}")), expected);
    }

    #[test]
    fn podman_rootful_rootless_and_systemd_containers() {
        let expected = Some((ContainerRuntime::Podman, ID.to_owned()));
        assert_eq!(
            container(&format!("/machine.slice/libpod-{ID}.scope")),
            expected
        );
        assert_eq!(
            container(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
            )),
            expected
        );
        assert_eq!(
            container(&format!("/machine.slice/libpod-{ID}.scope/container")),
            expected
        );
        assert_eq!(container(&format!("/libpod_parent/libpod-{ID}")), expected);
        // conmon, the monitor beside the container, is not the container.
        let conmon = parse_cgroup_path(&format!("/machine.slice/libpod-conmon-{ID}.scope"));
        assert_eq!(conmon, CgroupFacts::default());
    }

    #[test]
    fn kubernetes_containerd_and_crio_with_their_pod() {
        let underscored = UID.replace('-', "_");
        let facts = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(
            facts.container,
            Some((ContainerRuntime::Containerd, ID.to_owned()))
        );
        assert_eq!(facts.pod_uid.as_deref(), Some(UID));
        assert_eq!(facts.qos, Some("burstable"));
        assert_eq!(facts.unit, None);

        let facts = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-pod{underscored}.slice/crio-{ID}.scope"
        ));
        assert_eq!(
            facts.container,
            Some((ContainerRuntime::CriO, ID.to_owned()))
        );
        assert_eq!(facts.qos, Some("guaranteed"));
        assert_eq!(facts.pod_uid.as_deref(), Some(UID));

        let facts = parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(
            facts.container,
            Some((ContainerRuntime::Unknown, ID.to_owned()))
        );
        assert_eq!(facts.qos, Some("besteffort"));
        assert_eq!(facts.pod_uid.as_deref(), Some(UID));

        let facts = parse_cgroup_path(&format!("/kubepods/pod{UID}/{ID}"));
        assert_eq!(facts.qos, Some("guaranteed"));
    }

    #[test]
    fn a_path_seen_from_another_cgroup_namespace_is_read_by_its_components() {
        let underscored = UID.replace('-', "_");
        let facts = parse_cgroup_path(&format!(
            "/../../kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(facts.pod_uid.as_deref(), Some(UID));
        assert!(facts.container.is_some());
    }

    #[test]
    fn systemd_units_outside_containers() {
        let facts = parse_cgroup_path("/system.slice/api-gateway.service");
        assert_eq!(facts.unit.as_deref(), Some("api-gateway.service"));
        assert_eq!(facts.container, None);
        // A login session and the user manager are no service.
        assert_eq!(
            parse_cgroup_path("/user.slice/user-1000.slice/session-3.scope").unit,
            None
        );
        assert_eq!(
            parse_cgroup_path("/user.slice/user-1000.slice/user@1000.service").unit,
            None
        );
        assert_eq!(parse_cgroup_path("/").unit, None);
    }

    #[test]
    fn near_misses_are_not_taken() {
        // Short, upper-case or non-hex ids; a pod UID of the wrong shape.
        assert_eq!(container("/system.slice/docker-4f2a9c1b.scope"), None);
        assert_eq!(container(&format!("/docker/{}", ID.to_uppercase())), None);
        assert_eq!(container(&format!("/docker/{}g", &ID[..63])), None);
        assert_eq!(
            parse_cgroup_path("/kubepods/burstable/podnot-a-uid/x").pod_uid,
            None
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods.slice/kubepods-weird-pod{UID}.slice")).pod_uid,
            None
        );
        // A process naming its own cgroup like a pod outside kubepods.
        assert_eq!(parse_cgroup_path(&format!("/mine/pod{UID}")).pod_uid, None);
    }

    #[test]
    fn the_v2_line_wins_and_v1_falls_back_to_systemd() {
        let v2 = format!("12:cpu,cpuacct:/other\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            cgroup_path(&v2),
            Some(format!("/system.slice/docker-{ID}.scope").as_str())
        );
        let v1 = format!("3:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n");
        assert_eq!(
            parse_cgroup(&v1).container,
            Some((ContainerRuntime::Docker, ID.to_owned()))
        );
        assert_eq!(cgroup_path("garbage\n"), None);
        // A hybrid host: the v2 line is the root, v1 places the container.
        let hybrid = format!("9:name=systemd:/\n4:memory:/libpod_parent/libpod-{ID}\n0::/\n");
        assert_eq!(
            parse_cgroup(&hybrid).container,
            Some((ContainerRuntime::Podman, ID.to_owned()))
        );
        assert_eq!(cgroup_path("0::/\n1:cpu:/\n"), Some("/"));
        assert_eq!(parse_cgroup(""), CgroupFacts::default());
    }
}
