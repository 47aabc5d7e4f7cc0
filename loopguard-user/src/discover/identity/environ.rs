//! What a process's environment says about who it is.
//!
//! In: the bytes of `/proc/PID/environ` (a bounded prefix: a cut last
//! entry is dropped). Out: [`EnvFacts`]. The environment is the target's
//! own memory and says what the target wants: it is used only for labels
//! that describe the target itself, never for anything loopguard does.
//!
//! - service: `LOOPGUARD_SERVICE`, else `OTEL_SERVICE_NAME` (the
//!   OpenTelemetry convention many services already set);
//! - Kubernetes: `KUBERNETES_SERVICE_HOST` (set in every pod) says the
//!   process runs in one; the pod's name from `POD_NAME` (or
//!   `KUBERNETES_POD_NAME`, `MY_POD_NAME`: what the downward API is
//!   usually given), else `HOSTNAME` (a pod's hostname is its name unless
//!   the spec sets one); the namespace from `POD_NAMESPACE` (or
//!   `KUBERNETES_NAMESPACE`, `MY_POD_NAMESPACE`); the container from
//!   `CONTAINER_NAME`;
//! - podman sets `container=podman`, docker sets nothing, both set
//!   `HOSTNAME` to the container's short id unless given a name.

/// The environment variables of interest, when set and not empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvFacts {
    pub service: Option<String>,
    pub in_kubernetes: bool,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub container_name: Option<String>,
    pub hostname: Option<String>,
    /// `container=podman` (or another engine's word).
    pub container_engine: Option<String>,
}

/// The longest entry (`KEY=value`) looked at; longer ones are skipped.
const MAX_ENTRY_BYTES: usize = 4096;

/// Parses `/proc/PID/environ`. `complete` says whether the bytes are the
/// whole environment; if not, the last entry may be cut and is dropped.
pub fn parse_environ(bytes: &[u8], complete: bool) -> EnvFacts {
    let mut entries: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    if !complete || bytes.last().is_some_and(|&b| b != 0) {
        entries.pop();
    }
    let mut facts = EnvFacts::default();
    let mut loopguard_service = None;
    let mut otel_service = None;
    let mut pod_name = [None, None, None];
    let mut pod_namespace = [None, None, None];
    for entry in entries {
        if entry.len() > MAX_ENTRY_BYTES {
            continue;
        }
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        let value = Some(value.to_owned());
        match key {
            "LOOPGUARD_SERVICE" => loopguard_service = value,
            "OTEL_SERVICE_NAME" => otel_service = value,
            "KUBERNETES_SERVICE_HOST" => facts.in_kubernetes = true,
            "POD_NAME" => pod_name[0] = value,
            "KUBERNETES_POD_NAME" => pod_name[1] = value,
            "MY_POD_NAME" => pod_name[2] = value,
            "POD_NAMESPACE" => pod_namespace[0] = value,
            "KUBERNETES_NAMESPACE" => pod_namespace[1] = value,
            "MY_POD_NAMESPACE" => pod_namespace[2] = value,
            "CONTAINER_NAME" => facts.container_name = value,
            "HOSTNAME" => facts.hostname = value,
            "container" => facts.container_engine = value,
            _ => {}
        }
    }
    facts.service = loopguard_service.or(otel_service);
    facts.pod_name = pod_name.into_iter().flatten().next();
    facts.pod_namespace = pod_namespace.into_iter().flatten().next();
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environ(entries: &[&str]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for entry in entries {
            bytes.extend_from_slice(entry.as_bytes());
            bytes.push(0);
        }
        bytes
    }

    #[test]
    fn a_pod_with_the_downward_api() {
        let bytes = environ(&[
            "PATH=/usr/bin",
            "HOSTNAME=api-7d9f8-x2x4q",
            "KUBERNETES_SERVICE_HOST=10.96.0.1",
            "MY_POD_NAME=api-7d9f8-x2x4q",
            "POD_NAMESPACE=shop",
            "OTEL_SERVICE_NAME=checkout",
        ]);
        let facts = parse_environ(&bytes, true);
        assert!(facts.in_kubernetes);
        assert_eq!(facts.pod_name.as_deref(), Some("api-7d9f8-x2x4q"));
        assert_eq!(facts.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(facts.service.as_deref(), Some("checkout"));
        assert_eq!(facts.hostname.as_deref(), Some("api-7d9f8-x2x4q"));
    }

    #[test]
    fn loopguard_service_wins_and_preferred_names_win() {
        let bytes = environ(&[
            "MY_POD_NAME=third",
            "POD_NAME=first",
            "OTEL_SERVICE_NAME=otel",
            "LOOPGUARD_SERVICE=mine",
            "container=podman",
            "EMPTY=",
            "CONTAINER_NAME=",
        ]);
        let facts = parse_environ(&bytes, true);
        assert_eq!(facts.service.as_deref(), Some("mine"));
        assert_eq!(facts.pod_name.as_deref(), Some("first"));
        assert_eq!(facts.container_engine.as_deref(), Some("podman"));
        assert_eq!(facts.container_name, None);
        assert!(!facts.in_kubernetes);
    }

    #[test]
    fn a_cut_last_entry_huge_entries_and_bad_bytes_are_skipped() {
        let mut bytes = environ(&["HOSTNAME=ok"]);
        bytes.extend_from_slice(b"LOOPGUARD_SERVICE=cut-her");
        let facts = parse_environ(&bytes, false);
        assert_eq!(facts.hostname.as_deref(), Some("ok"));
        assert_eq!(facts.service, None);
        // Complete but without the final NUL (a process may rewrite its
        // environment): the unterminated tail is dropped too.
        assert_eq!(parse_environ(&bytes, true).service, None);

        let huge = format!("POD_NAME={}", "x".repeat(MAX_ENTRY_BYTES));
        let bytes = [environ(&[&huge]), vec![0xff, b'=', 0]].concat();
        assert_eq!(parse_environ(&bytes, true), EnvFacts::default());
        assert_eq!(parse_environ(b"", true), EnvFacts::default());
        assert_eq!(parse_environ(b"\0\0=\0", true), EnvFacts::default());
    }
}
