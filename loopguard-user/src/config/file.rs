//! The TOML file: its schema, syntax errors with line and column, and
//! unknown keys with the nearest known key suggested.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Every key the file may hold; tables as `table.key`.
pub const KNOWN_KEYS: &[&str] = &[
    "threshold_ms",
    "format",
    "duration_s",
    "requests",
    "scan_interval_ms",
    "exclude_routes",
    "wait_probes",
    "loop_threads",
    "fail_on",
    "metrics_addr",
    "metrics_max_routes",
    "adaptive",
    "adaptive.enabled",
    "adaptive.percentile",
    "adaptive.multiplier",
    "adaptive.window_s",
    "adaptive.min_samples",
    "adaptive.floor_ms",
    "adaptive.ceiling_ms",
    "cumulative",
    "cumulative.enabled",
    "cumulative.floor_ms",
    "cumulative.window_ms",
    "cumulative.budget_ms",
    "stacks",
    "stacks.enabled",
    "stacks.all_frames",
    "stacks.folded",
    "host",
    "host.exe",
    "host.cgroup",
    "host.container",
    "host.runtime",
    "host.service_map",
    "host.max_targets",
    "host.max_probes",
    "host.max_memory_mib",
    "host.series_grace_s",
];

/// The file as written; every key optional. Durations are signed so that a
/// negative one gets the validation message rather than a type error.
#[derive(Debug, Default, Deserialize)]
pub struct FileConfig {
    pub threshold_ms: Option<i64>,
    pub format: Option<String>,
    pub duration_s: Option<i64>,
    /// `"table"`, `"probes"` or `"off"` (`--requests`); `true` is the
    /// default source, `false` is `"off"`.
    pub requests: Option<RequestsValue>,
    pub scan_interval_ms: Option<i64>,
    pub exclude_routes: Option<Vec<String>>,
    /// `switch`, `calls`, `uprobe`, `tracepoint`, `auto` or `off`
    /// (`--wait-probes`).
    pub wait_probes: Option<String>,
    /// Thread names that count as event loops (`--loop-threads`).
    pub loop_threads: Option<Vec<String>>,
    pub fail_on: Option<Vec<String>>,
    /// Prometheus exporter address (`--metrics-addr`).
    pub metrics_addr: Option<String>,
    /// Routes the exporter labels before folding the rest (`--metrics-max-routes`).
    pub metrics_max_routes: Option<usize>,
    #[serde(default)]
    pub adaptive: AdaptiveFile,
    #[serde(default)]
    pub cumulative: CumulativeFile,
    #[serde(default)]
    pub stacks: StacksFile,
    /// `watch --all`'s selectors, service map and budget.
    #[serde(default)]
    pub host: super::host::HostFile,
}

/// The `requests` key: a source's name, or a switch (the older form).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RequestsValue {
    Switch(bool),
    Source(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct AdaptiveFile {
    pub enabled: Option<bool>,
    pub percentile: Option<f64>,
    pub multiplier: Option<f64>,
    pub window_s: Option<i64>,
    pub min_samples: Option<i64>,
    pub floor_ms: Option<i64>,
    pub ceiling_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CumulativeFile {
    pub enabled: Option<bool>,
    pub floor_ms: Option<i64>,
    pub window_ms: Option<i64>,
    pub budget_ms: Option<i64>,
}

/// Stack capture (`--no-stacks`, `--all-frames`, `--folded`).
#[derive(Debug, Default, Deserialize)]
pub struct StacksFile {
    pub enabled: Option<bool>,
    pub all_frames: Option<bool>,
    /// Relative to the working directory, as the flag's.
    pub folded: Option<PathBuf>,
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses the text of a file named `path` (for messages).
pub fn parse(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    let syntax = |error: &toml::de::Error| {
        let (line, column) = error
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: error.message().trim().to_owned(),
        }
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| syntax(&e))?;
    check_keys(&table, "")?;
    toml::from_str(text).map_err(|e| syntax(&e))
}

/// 1-based line and column of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn check_keys(table: &toml::Table, prefix: &str) -> Result<(), ConfigError> {
    for (key, value) in table {
        let full = format!("{prefix}{key}");
        if !KNOWN_KEYS.contains(&full.as_str()) {
            return Err(ConfigError::UnknownKey {
                suggestion: nearest_key(&full).map(str::to_owned),
                key: full,
            });
        }
        if let toml::Value::Table(inner) = value {
            check_keys(inner, &format!("{full}."))?;
        }
    }
    Ok(())
}

/// The known key closest to `key` by edit distance, if it is close enough
/// to be a typo (or the same key in another table).
pub fn nearest_key(key: &str) -> Option<&'static str> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    KNOWN_KEYS
        .iter()
        .map(|known| {
            let known_leaf = known.rsplit('.').next().unwrap_or(known);
            let distance = edit_distance(key, known).min(edit_distance(leaf, known_leaf) + 1);
            (distance, *known)
        })
        .filter(|&(distance, known)| distance <= (known.len() / 3).max(2))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, known)| known)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let file = parse(
            r#"
threshold_ms = 40
format = "json"
exclude_routes = ["/health", "/internal/*"]
fail_on = ["stall", "cumulative"]
metrics_addr = "127.0.0.1:9090"
metrics_max_routes = 50

[adaptive]
enabled = true
percentile = 0.995
window_s = 30

[cumulative]
budget_ms = 150

[stacks]
enabled = true
all_frames = true
folded = "stalls.folded"
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(file.threshold_ms, Some(40));
        assert_eq!(file.adaptive.percentile, Some(0.995));
        assert_eq!(file.cumulative.budget_ms, Some(150));
        assert_eq!(file.metrics_max_routes, Some(50));
        assert_eq!(file.stacks.enabled, Some(true));
        assert_eq!(file.stacks.all_frames, Some(true));
        assert_eq!(file.stacks.folded, Some(PathBuf::from("stalls.folded")));
    }

    #[test]
    fn stack_keys_belong_to_the_stacks_table() {
        let error = parse("all_frames = true\n", "t.toml").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("did you mean `stacks.all_frames`?"),
            "{error}"
        );
        let error = parse("[stacks]\nfold = \"x\"\n", "t.toml").unwrap_err();
        assert!(
            error.to_string().contains("did you mean `stacks.folded`?"),
            "{error}"
        );
        let error = parse("[stacks]\nenabled = \"no\"\n", "t.toml").unwrap_err();
        assert!(error.to_string().starts_with("t.toml:2:"), "{error}");
    }

    #[test]
    fn an_unknown_key_names_the_nearest_known_one() {
        let error = parse("treshold_ms = 40\n", "t.toml").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown key `treshold_ms` in the configuration file; did you mean `threshold_ms`?"
        );
        let error = parse("[cumulative]\nbudget = 100\n", "t.toml").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("did you mean `cumulative.budget_ms`?"),
            "{error}"
        );
        let error = parse("[adaptive]\nbudget_ms = 100\n", "t.toml").unwrap_err();
        assert!(
            error.to_string().contains("`adaptive.budget_ms`")
                && error.to_string().contains("`cumulative.budget_ms`"),
            "{error}"
        );
        let error = parse("zzzzzzzzzzzz = 1\n", "t.toml").unwrap_err();
        assert!(error.to_string().contains("known keys:"), "{error}");
    }

    #[test]
    fn malformed_toml_says_where() {
        let error = parse("threshold_ms = 40\n[adaptive\nenabled = true\n", "t.toml").unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("t.toml:2:"), "{text}");
        let error = parse("threshold_ms = \"forty\"\n", "t.toml").unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("t.toml:1:16:"), "{text}");
    }
}
