//! A container's Kubernetes names from the node's log directory.
//!
//! The kubelet links every container's log as
//! `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`: the node
//! itself says, for each container id the cgroup gives, its pod, namespace
//! and container name, with no API server and nothing the target wrote.
//! The names are DNS labels and subdomains (no `_`), so the split is exact.
//! In: the directory's file names. Out: [`PodNames`] by container id.
//! A `DaemonSet` mounts the directory read-only (`deploy/kubernetes/`).

use std::collections::HashMap;
use std::path::Path;

use super::cgroup::is_container_id;

/// The kubelet's directory of container log links.
pub const CONTAINER_LOGS_DIR: &str = "/var/log/containers";

/// The most entries read from the directory (a node runs a few hundred
/// containers; a directory past this is read no further).
pub const MAX_LOG_ENTRIES: usize = 20_000;

/// A container's names in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Parses one log link's file name into its container id and names.
pub fn parse_log_name(name: &str) -> Option<(String, PodNames)> {
    let stem = name.strip_suffix(".log")?;
    let (names, id) = stem.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    let mut parts = names.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (valid(pod) && valid(namespace) && valid(container) && !container.contains('.')).then(|| {
        (
            id.to_owned(),
            PodNames {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                container: container.to_owned(),
            },
        )
    })
}

/// Container ids to their Kubernetes names, as last read.
#[derive(Debug, Default)]
pub struct PodIndex {
    by_id: HashMap<String, PodNames>,
}

impl PodIndex {
    /// Builds the index from file names.
    pub fn from_names<I: IntoIterator<Item = S>, S: AsRef<str>>(names: I) -> Self {
        Self {
            by_id: names
                .into_iter()
                .take(MAX_LOG_ENTRIES)
                .filter_map(|name| parse_log_name(name.as_ref()))
                .collect(),
        }
    }

    /// Reads `dir` (names only: the links are not followed). A missing
    /// directory (not a Kubernetes node, or not mounted) is an empty index.
    pub fn read(dir: &Path) -> Self {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Self::default();
        };
        Self::from_names(
            entries
                .filter_map(Result::ok)
                .take(MAX_LOG_ENTRIES)
                .filter_map(|entry| entry.file_name().into_string().ok()),
        )
    }

    pub fn get(&self, container_id: &str) -> Option<&PodNames> {
        self.by_id.get(container_id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2a9c1be0d3a7c65e8f1b2d3c4a5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";

    #[test]
    fn a_log_link_name_splits_into_pod_namespace_container_and_id() {
        let (id, names) =
            parse_log_name(&format!("api-7d9f8-x2x4q_shop_checkout-api-{ID}.log")).unwrap();
        assert_eq!(id, ID);
        assert_eq!(
            names,
            PodNames {
                namespace: "shop".into(),
                pod: "api-7d9f8-x2x4q".into(),
                container: "checkout-api".into(),
            }
        );
    }

    #[test]
    fn other_names_are_not_taken() {
        for name in [
            format!("api_shop_checkout-{ID}.txt"),
            format!("api_shop-{ID}.log"),
            "api_shop_checkout-1234.log".to_owned(),
            format!("API_shop_checkout-{ID}.log"),
            format!("_shop_checkout-{ID}.log"),
            format!("api_shop_check_out-{ID}.log"),
        ] {
            assert_eq!(parse_log_name(&name), None, "{name}");
        }
    }

    #[test]
    fn the_index_finds_by_id_and_a_missing_directory_is_empty() {
        let index =
            PodIndex::from_names([format!("web-0_default_nginx-{ID}.log"), "junk".to_owned()]);
        assert_eq!(index.len(), 1);
        assert_eq!(index.get(ID).unwrap().pod, "web-0");
        assert!(PodIndex::read(Path::new("/nonexistent/loopguard")).is_empty());
    }
}
