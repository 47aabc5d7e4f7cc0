//! `loopguard watch --all`'s settings: the selectors, the service map and
//! the host's budget, as flags and as the file's `[host]` table (flags
//! win; a list given as a flag replaces the file's). Bad values are
//! refused with the key, the value and the rule.

use std::fmt::Write as _;

use serde::Deserialize;

use super::ConfigError;
use super::args::HostArgs;
use crate::discover::identity::runtime::Runtime;
use crate::discover::identity::service::ServiceRule;

/// Targets watched at once, by default (`--max-targets`).
pub const DEFAULT_MAX_TARGETS: usize = 64;
/// uprobes held in all targets at once, by default (`--max-probes`).
pub const DEFAULT_MAX_PROBES: usize = 20_000;
/// The agent's memory budget in MiB, by default (`--max-memory-mib`): the
/// default targets at about 12 MiB each, with room, and the `DaemonSet`'s
/// limit.
pub const DEFAULT_MAX_MEMORY_MIB: usize = 1024;
/// Seconds a gone target's series stay, by default (`--series-grace-s`).
pub const DEFAULT_SERIES_GRACE_S: u64 = 300;
/// The largest memory budget (MiB) taken: 1 TiB; more is a typo.
pub const MAX_MEMORY_MIB: usize = 1 << 20;
/// The most targets one agent may be asked to hold: each loads its own
/// programs (see `--max-targets`'s help), so more is a typo.
pub const MAX_MAX_TARGETS: usize = 4096;

/// The `[host]` table as written; every key optional.
#[derive(Debug, Default, Deserialize)]
pub struct HostFile {
    pub exe: Option<Vec<String>>,
    pub cgroup: Option<Vec<String>>,
    pub container: Option<Vec<String>>,
    pub runtime: Option<Vec<String>>,
    pub service_map: Option<Vec<String>>,
    pub max_targets: Option<i64>,
    pub max_probes: Option<i64>,
    pub max_memory_mib: Option<i64>,
    pub series_grace_s: Option<i64>,
}

/// The effective `watch --all` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    pub exe: Vec<String>,
    pub cgroup: Vec<String>,
    pub container: Vec<String>,
    /// Empty: every runtime.
    pub runtime: Vec<Runtime>,
    pub service_map: Vec<ServiceRule>,
    pub max_targets: usize,
    pub max_probes: usize,
    pub max_memory_mib: usize,
    pub series_grace_s: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            exe: Vec::new(),
            cgroup: Vec::new(),
            container: Vec::new(),
            runtime: Vec::new(),
            service_map: Vec::new(),
            max_targets: DEFAULT_MAX_TARGETS,
            max_probes: DEFAULT_MAX_PROBES,
            max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
            series_grace_s: DEFAULT_SERIES_GRACE_S,
        }
    }
}

fn invalid(key: &str, flag: &str, value: impl std::fmt::Debug, rule: &str) -> ConfigError {
    ConfigError::Invalid {
        key: format!("host.{key} ({flag})"),
        value: format!("{value:?}"),
        rule: rule.to_owned(),
    }
}

/// A count from the file: positive and at most `max`.
fn count(key: &str, flag: &str, value: i64, max: usize) -> Result<usize, ConfigError> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v > 0 && v <= max)
        .ok_or_else(|| {
            invalid(
                key,
                flag,
                value,
                &format!("must be a count from 1 to {max}"),
            )
        })
}

/// Globs: none may be empty (an empty one matches nothing, which is
/// never what was meant).
fn globs(key: &str, flag: &str, values: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if let Some(empty) = values.iter().find(|v| v.trim().is_empty()) {
        return Err(invalid(
            key,
            flag,
            empty,
            "each must be a non-empty glob (`*` and `?` allowed), e.g. \"api-*\"",
        ));
    }
    Ok(values)
}

impl HostConfig {
    /// The file's `[host]` table over the defaults.
    pub fn apply_file(&mut self, file: HostFile) -> Result<(), ConfigError> {
        if let Some(exe) = file.exe {
            self.exe = globs("exe", "--exe", exe)?;
        }
        if let Some(cgroup) = file.cgroup {
            self.cgroup = globs("cgroup", "--cgroup", cgroup)?;
        }
        if let Some(container) = file.container {
            self.container = globs("container", "--container", container)?;
        }
        if let Some(runtimes) = file.runtime {
            self.runtime = runtimes
                .iter()
                .map(|name| {
                    clap::ValueEnum::from_str(name, true).map_err(|_| {
                        invalid(
                            "runtime",
                            "--runtime",
                            name,
                            "each must be \"tokio\", \"python\" or \"node\"",
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(rules) = file.service_map {
            self.service_map = rules
                .iter()
                .map(|rule| {
                    rule.parse().map_err(
                        |error: crate::discover::identity::service::ServiceRuleError| {
                            invalid("service_map", "--service-map", rule, &error.to_string())
                        },
                    )
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(n) = file.max_targets {
            self.max_targets = count("max_targets", "--max-targets", n, MAX_MAX_TARGETS)?;
        }
        if let Some(n) = file.max_probes {
            self.max_probes = count("max_probes", "--max-probes", n, usize::MAX)?;
        }
        if let Some(n) = file.max_memory_mib {
            self.max_memory_mib = count("max_memory_mib", "--max-memory-mib", n, MAX_MEMORY_MIB)?;
        }
        if let Some(secs) = file.series_grace_s {
            self.series_grace_s = u64::try_from(secs).map_err(|_| {
                invalid(
                    "series_grace_s",
                    "--series-grace-s",
                    secs,
                    "must be 0 or more seconds",
                )
            })?;
        }
        Ok(())
    }

    /// The flags given over the file.
    pub fn apply_flags(&mut self, args: &HostArgs) -> Result<(), ConfigError> {
        let lists = [
            (&mut self.exe, &args.exe, "exe", "--exe"),
            (&mut self.cgroup, &args.cgroup, "cgroup", "--cgroup"),
            (
                &mut self.container,
                &args.container,
                "container",
                "--container",
            ),
        ];
        for (slot, flag, key, name) in lists {
            if !flag.is_empty() {
                *slot = globs(key, name, flag.clone())?;
            }
        }
        if !args.runtime.is_empty() {
            self.runtime.clone_from(&args.runtime);
        }
        if !args.service_map.is_empty() {
            self.service_map.clone_from(&args.service_map);
        }
        if let Some(n) = args.max_targets {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.max_targets = count("max_targets", "--max-targets", n, MAX_MAX_TARGETS)?;
        }
        if let Some(n) = args.max_probes {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.max_probes = count("max_probes", "--max-probes", n, usize::MAX)?;
        }
        if let Some(n) = args.max_memory_mib {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.max_memory_mib = count("max_memory_mib", "--max-memory-mib", n, MAX_MEMORY_MIB)?;
        }
        if let Some(secs) = args.series_grace_s {
            self.series_grace_s = secs;
        }
        Ok(())
    }

    /// The `[host]` table of `loopguard config`.
    pub fn to_toml(&self, out: &mut String) {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let runtimes: Vec<String> = self.runtime.iter().map(|r| r.as_str().to_owned()).collect();
        let rules: Vec<String> = self
            .service_map
            .iter()
            .map(ServiceRule::to_string)
            .collect();
        out.push_str(
            "\n# watch --all: selectors (empty: every process), service names, budget\n[host]\n",
        );
        let _ = writeln!(out, "exe = [{}]", list(&self.exe));
        let _ = writeln!(out, "cgroup = [{}]", list(&self.cgroup));
        let _ = writeln!(out, "container = [{}]", list(&self.container));
        let _ = writeln!(out, "runtime = [{}]", list(&runtimes));
        let _ = writeln!(out, "service_map = [{}]", list(&rules));
        let _ = writeln!(out, "max_targets = {}", self.max_targets);
        let _ = writeln!(out, "max_probes = {}", self.max_probes);
        let _ = writeln!(out, "max_memory_mib = {}", self.max_memory_mib);
        let _ = writeln!(out, "series_grace_s = {}", self.series_grace_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<HostConfig, ConfigError> {
        let file: HostFile = toml::from_str(text).unwrap();
        let mut host = HostConfig::default();
        host.apply_file(file)?;
        Ok(host)
    }

    #[test]
    fn the_host_table_sets_the_selectors_the_map_and_the_budget() {
        let host = file(
            r#"
exe = ["api-*"]
container = ["shop-*"]
runtime = ["python", "Node"]
service_map = ["python3*=checkout", "container:shop-web=web"]
max_targets = 10
series_grace_s = 0
"#,
        )
        .unwrap();
        assert_eq!(host.exe, ["api-*"]);
        assert_eq!(host.runtime, [Runtime::Python, Runtime::Node]);
        assert_eq!(host.service_map.len(), 2);
        assert_eq!(host.service_map[1].service, "web");
        assert_eq!(host.max_targets, 10);
        assert_eq!(host.max_probes, DEFAULT_MAX_PROBES);
        assert_eq!(host.series_grace_s, 0);
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_the_rule() {
        let error = file(r#"service_map = ["checkout"]"#)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(r#"host.service_map (--service-map) = "checkout": service mapping `checkout` is not `PATTERN=SERVICE`"#),
            "{error}"
        );
        let error = file(r#"runtime = ["go"]"#).unwrap_err().to_string();
        assert_eq!(
            error,
            r#"host.runtime (--runtime) = "go": each must be "tokio", "python" or "node""#
        );
        let error = file("max_targets = 0").unwrap_err().to_string();
        assert_eq!(
            error,
            "host.max_targets (--max-targets) = 0: must be a count from 1 to 4096"
        );
        let error = file(r#"exe = [""]"#).unwrap_err().to_string();
        assert!(error.starts_with(r#"host.exe (--exe) = "": each must be a non-empty glob"#));
        let error = file("series_grace_s = -1").unwrap_err().to_string();
        assert!(error.contains("must be 0 or more seconds"), "{error}");
    }

    /// `loopguard watch --all` with `flags`, parsed.
    fn watch_all(flags: &[&str]) -> crate::config::args::HostArgs {
        let mut command_line = vec!["loopguard", "watch", "--all"];
        command_line.extend_from_slice(flags);
        let cli = <crate::config::args::Cli as clap::Parser>::try_parse_from(command_line).unwrap();
        let crate::config::args::Command::Watch(args) = cli.command else {
            panic!("not watch");
        };
        args
    }

    #[test]
    fn flags_win_over_the_file_and_a_listed_flag_replaces_its_list() {
        let mut host =
            file("exe = [\"api-*\"]\ncontainer = [\"shop-*\"]\nmax_targets = 10").unwrap();
        let args = watch_all(&["--exe", "worker", "--max-targets", "5000"]);
        let error = host.apply_flags(&args).unwrap_err().to_string();
        assert_eq!(
            error,
            "host.max_targets (--max-targets) = 5000: must be a count from 1 to 4096"
        );
        host.apply_flags(&watch_all(&["--exe", "worker"])).unwrap();
        assert_eq!(host.exe, ["worker"], "the flag's list");
        assert_eq!(host.container, ["shop-*"], "the file's");
        assert_eq!(host.max_targets, 10, "the file's");
    }

    #[test]
    fn the_printed_table_reads_back_the_same() {
        let mut host = file(r#"service_map = ["container:shop-*=shop"]"#).unwrap();
        host.cgroup = vec!["/system.slice/*".into()];
        host.runtime = vec![Runtime::Tokio];
        let mut out = String::new();
        host.to_toml(&mut out);
        let table: toml::Table = toml::from_str(&out).unwrap();
        let back = file(&toml::to_string(&table["host"]).unwrap()).unwrap();
        assert_eq!(back, host);
    }
}
