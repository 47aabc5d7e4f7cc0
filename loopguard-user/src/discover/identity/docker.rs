//! A Docker container's name, from Docker's own record of it on the host:
//! `/var/lib/docker/containers/ID/config.v2.json` (`"Name": "/shop-web"`).
//!
//! In: a container id (64 hex digits, as the cgroup path gave it, so it
//! cannot lead the path elsewhere). Out: the name, or nothing when the
//! file is not there or readable (the agent in a pod without Docker's
//! directory mounted, a rootless Docker). The read is bounded and of a
//! regular file only ([`crate::discover::files::read_regular`]).

use std::path::Path;

use super::cgroup::is_container_id;
use crate::discover::files;

/// Where Docker keeps one directory per container.
pub const DOCKER_CONTAINERS_DIR: &str = "/var/lib/docker/containers";
/// The most of a container's `config.v2.json` read (its environment and
/// labels are in it: usually a few KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The name Docker gave container `id`, if its record says.
pub fn container_name(dir: &Path, id: &str) -> Option<String> {
    if !is_container_id(id) {
        return None;
    }
    let file = std::fs::File::open(dir.join(id).join("config.v2.json")).ok()?;
    let bytes = files::read_regular(file, MAX_CONFIG_BYTES).ok()?;
    name_in_config(&bytes)
}

/// The `Name` of a `config.v2.json`, without Docker's leading `/`.
pub fn name_in_config(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(rename = "Name")]
        name: Option<String>,
    }
    let config: Config = serde_json::from_slice(bytes).ok()?;
    let name = config.name?;
    let name = name.strip_prefix('/').unwrap_or(&name).trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2a9c1be0d3a7c65e8f1b2d3c4a5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";

    #[test]
    fn the_name_comes_from_the_record_without_its_slash() {
        let config = br#"{"ID":"4f2a","Name":"/shop-web","Config":{"Env":["A=1"]},"State":{"Running":true}}"#;
        assert_eq!(name_in_config(config).as_deref(), Some("shop-web"));
        assert_eq!(name_in_config(br#"{"Name":"/"}"#), None);
        assert_eq!(name_in_config(br#"{"ID":"x"}"#), None);
        assert_eq!(name_in_config(b"not json"), None);
    }

    #[test]
    fn a_record_on_disk_is_read_and_an_id_never_leads_elsewhere() {
        let dir = std::env::temp_dir().join(format!("loopguard-docker-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(ID)).unwrap();
        std::fs::write(dir.join(ID).join("config.v2.json"), br#"{"Name":"/api-1"}"#).unwrap();
        assert_eq!(container_name(&dir, ID).as_deref(), Some("api-1"));
        assert_eq!(container_name(&dir, "../../etc"), None);
        assert_eq!(container_name(&dir, &"0".repeat(64)), None, "no record");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
