//! Configuration: every setting as a flag and as a key of a TOML file
//! (`--config FILE`). Defaults, then the file, then the flags given: the
//! flags win. The result is validated once, whatever its source, and
//! `loopguard config FILE` prints it.

pub mod args;
mod file;
pub mod host;
pub mod run_as;
mod validate;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::attach::{ProbeLinks, RequestSource, WaitProbes};
use crate::config::args::WatchArgs;
use crate::detect::FailOn;
use crate::detect::adaptive::{self, AdaptiveSettings};
use crate::detect::cumulative::{self, CumulativeSettings};
use crate::detect::exclude::DEFAULT_EXCLUDED_ROUTES;
use crate::detect::{DetectSettings, RouteFilter};
use crate::present::text::Format;

pub use file::{KNOWN_KEYS, nearest_key};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read the configuration file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message} (fix the TOML there)")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("unknown key `{key}` in the configuration file; {}", match suggestion {
        Some(known) => format!("did you mean `{known}`?"),
        None => format!("known keys: {}", KNOWN_KEYS.join(", ")),
    })]
    UnknownKey {
        key: String,
        suggestion: Option<String>,
    },
    #[error("{key} = {value}: {rule}")]
    Invalid {
        /// The key, with its flag: `adaptive.multiplier (--adaptive-multiplier)`.
        key: String,
        value: String,
        /// What the value must be, and how to fix it.
        rule: String,
    },
}

/// The adaptive rule's settings, in the units the file uses.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    pub percentile: f64,
    pub multiplier: f64,
    pub window_s: i64,
    pub min_samples: i64,
    pub floor_ms: i64,
    pub ceiling_ms: i64,
}

/// The cumulative rule's settings, in the units the file uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CumulativeConfig {
    pub enabled: bool,
    pub floor_ms: i64,
    pub window_ms: i64,
    pub budget_ms: i64,
}

/// Stack capture, as the file says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StacksConfig {
    /// Capture stalls' stacks and causes (`--no-stacks` turns it off).
    pub enabled: bool,
    /// Keep the runtime's frames below the task (`--all-frames`).
    pub all_frames: bool,
    /// Write the folded stacks here at exit (`--folded`).
    pub folded: Option<PathBuf>,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub threshold_ms: i64,
    pub format: Format,
    pub duration_s: Option<i64>,
    pub requests: RequestSource,
    pub scan_interval_ms: i64,
    pub exclude_routes: Vec<String>,
    pub wait_probes: WaitProbes,
    pub probe_links: ProbeLinks,
    pub loop_threads: Vec<String>,
    pub fail_on: Vec<FailOn>,
    pub metrics_addr: Option<String>,
    pub metrics_max_routes: Option<usize>,
    pub adaptive: AdaptiveConfig,
    pub cumulative: CumulativeConfig,
    pub stacks: StacksConfig,
    /// `watch --all` only: selectors, service map, budget (`[host]`).
    pub host: host::HostConfig,
}

/// The `requests` key's source: a name, or `true` (the default source) and
/// `false` (off), as the key was first written.
fn request_source(value: file::RequestsValue) -> Result<RequestSource, ConfigError> {
    match value {
        file::RequestsValue::Switch(true) => Ok(RequestSource::default()),
        file::RequestsValue::Switch(false) => Ok(RequestSource::Off),
        file::RequestsValue::Source(source) => {
            clap::ValueEnum::from_str(&source, true).map_err(|_| ConfigError::Invalid {
                key: "requests (--requests)".into(),
                value: format!("{source:?}"),
                rule: "must be \"table\", \"probes\" or \"off\"".into(),
            })
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            threshold_ms: 50,
            format: Format::Text,
            duration_s: None,
            requests: RequestSource::Table,
            scan_interval_ms: 5,
            exclude_routes: DEFAULT_EXCLUDED_ROUTES.map(str::to_owned).to_vec(),
            wait_probes: WaitProbes::Auto,
            probe_links: ProbeLinks::Auto,
            loop_threads: Vec::new(),
            fail_on: Vec::new(),
            metrics_addr: None,
            metrics_max_routes: None,
            adaptive: AdaptiveConfig {
                enabled: false,
                percentile: adaptive::DEFAULT_PERCENTILE,
                multiplier: adaptive::DEFAULT_MULTIPLIER,
                window_s: adaptive::DEFAULT_WINDOW_S as i64,
                min_samples: adaptive::DEFAULT_MIN_SAMPLES as i64,
                floor_ms: adaptive::DEFAULT_FLOOR_MS as i64,
                ceiling_ms: adaptive::DEFAULT_CEILING_MS as i64,
            },
            cumulative: CumulativeConfig {
                enabled: true,
                floor_ms: cumulative::DEFAULT_FLOOR_MS as i64,
                window_ms: cumulative::DEFAULT_WINDOW_MS as i64,
                budget_ms: cumulative::DEFAULT_BUDGET_MS as i64,
            },
            stacks: StacksConfig {
                enabled: true,
                all_frames: false,
                folded: None,
            },
            host: host::HostConfig::default(),
        }
    }
}

const MS: u64 = 1_000_000;

impl Settings {
    /// Defaults, then `config_file` (or `--config`), then the flags given;
    /// validated. `fail_on`: the `run` flags, when given.
    pub fn resolve(
        args: &WatchArgs,
        config_file: Option<&Path>,
        fail_on: Option<&[FailOn]>,
    ) -> Result<Self, ConfigError> {
        let mut settings = Self::default();
        if let Some(path) = config_file.or(args.config.as_deref()) {
            settings.apply_file(file::load(path)?)?;
        }
        settings.apply_flags(args, fail_on);
        validate::check(&settings)?;
        Ok(settings)
    }

    fn apply_file(&mut self, file: file::FileConfig) -> Result<(), ConfigError> {
        set(&mut self.threshold_ms, file.threshold_ms);
        if let Some(format) = file.format {
            self.format =
                clap::ValueEnum::from_str(&format, true).map_err(|_| ConfigError::Invalid {
                    key: "format (--format)".into(),
                    value: format!("{format:?}"),
                    rule: "must be \"text\" or \"json\"".into(),
                })?;
        }
        if file.duration_s.is_some() {
            self.duration_s = file.duration_s;
        }
        if let Some(requests) = file.requests {
            self.requests = request_source(requests)?;
        }
        set(&mut self.scan_interval_ms, file.scan_interval_ms);
        set(&mut self.exclude_routes, file.exclude_routes);
        set(&mut self.loop_threads, file.loop_threads);
        if let Some(probes) = file.wait_probes {
            self.wait_probes =
                clap::ValueEnum::from_str(&probes, true).map_err(|_| ConfigError::Invalid {
                    key: "wait_probes (--wait-probes)".into(),
                    value: format!("{probes:?}"),
                    rule: "must be \"auto\", \"uprobe\", \"tracepoint\" or \"off\"".into(),
                })?;
        }
        if let Some(kinds) = file.fail_on {
            self.fail_on = kinds
                .iter()
                .map(|kind| {
                    clap::ValueEnum::from_str(kind, true).map_err(|_| ConfigError::Invalid {
                        key: "fail_on (--fail-on)".into(),
                        value: format!("{kind:?}"),
                        rule: "each must be \"stall\" or \"cumulative\"".into(),
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        self.metrics_addr = file.metrics_addr.or(self.metrics_addr.take());
        set(
            &mut self.metrics_max_routes,
            file.metrics_max_routes.map(Some),
        );
        self.apply_file_tables(file.adaptive, file.cumulative, file.stacks);
        self.host.apply_file(file.host)
    }

    /// The file's `[adaptive]`, `[cumulative]` and `[stacks]` tables.
    fn apply_file_tables(
        &mut self,
        adaptive: file::AdaptiveFile,
        cumulative: file::CumulativeFile,
        stacks: file::StacksFile,
    ) {
        let (a, fa) = (&mut self.adaptive, adaptive);
        set(&mut a.enabled, fa.enabled);
        set(&mut a.percentile, fa.percentile);
        set(&mut a.multiplier, fa.multiplier);
        set(&mut a.window_s, fa.window_s);
        set(&mut a.min_samples, fa.min_samples);
        set(&mut a.floor_ms, fa.floor_ms);
        set(&mut a.ceiling_ms, fa.ceiling_ms);
        let (c, fc) = (&mut self.cumulative, cumulative);
        set(&mut c.enabled, fc.enabled);
        set(&mut c.floor_ms, fc.floor_ms);
        set(&mut c.window_ms, fc.window_ms);
        set(&mut c.budget_ms, fc.budget_ms);
        let (st, fst) = (&mut self.stacks, stacks);
        set(&mut st.enabled, fst.enabled);
        set(&mut st.all_frames, fst.all_frames);
        if fst.folded.is_some() {
            st.folded = fst.folded;
        }
    }

    fn apply_flags(&mut self, args: &WatchArgs, fail_on: Option<&[FailOn]>) {
        let signed = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        set(&mut self.threshold_ms, signed(args.threshold_ms));
        set(&mut self.format, args.format);
        if args.duration.is_some() {
            self.duration_s = signed(args.duration);
        }
        set(&mut self.requests, args.requests);
        if args.no_requests {
            self.requests = RequestSource::Off;
        }
        set(&mut self.scan_interval_ms, signed(args.scan_interval_ms));
        set(&mut self.wait_probes, args.wait_probes);
        set(&mut self.probe_links, args.probe_links);
        if let Some(names) = &args.loop_threads {
            self.loop_threads.clone_from(names);
        }
        if let Some(routes) = &args.exclude_routes {
            self.exclude_routes = routes.iter().filter(|r| !r.is_empty()).cloned().collect();
        }
        if let Some(kinds) = fail_on {
            self.fail_on = kinds.to_vec();
        }
        if args.metrics_addr.is_some() {
            self.metrics_addr.clone_from(&args.metrics_addr);
        }
        if args.metrics_max_routes.is_some() {
            self.metrics_max_routes = args.metrics_max_routes;
        }
        let (a, fa) = (&mut self.adaptive, &args.adaptive);
        if fa.adaptive {
            a.enabled = true;
        }
        set(&mut a.percentile, fa.adaptive_percentile);
        set(&mut a.multiplier, fa.adaptive_multiplier);
        set(&mut a.window_s, signed(fa.adaptive_window_s));
        set(&mut a.min_samples, signed(fa.adaptive_min_samples));
        set(&mut a.floor_ms, signed(fa.adaptive_floor_ms));
        set(&mut a.ceiling_ms, signed(fa.adaptive_ceiling_ms));
        let (c, fc) = (&mut self.cumulative, &args.cumulative);
        if fc.no_cumulative {
            c.enabled = false;
        }
        set(&mut c.floor_ms, signed(fc.cumulative_floor_ms));
        set(&mut c.window_ms, signed(fc.cumulative_window_ms));
        set(&mut c.budget_ms, signed(fc.cumulative_budget_ms));
        let (st, fst) = (&mut self.stacks, &args.stacks);
        if fst.no_stacks {
            st.enabled = false;
        }
        if fst.all_frames {
            st.all_frames = true;
        }
        if fst.folded.is_some() {
            st.folded.clone_from(&fst.folded);
        }
    }

    /// What the detection engine runs with (after validation: all positive).
    pub fn detect(&self) -> DetectSettings {
        let ms = |v: i64| v.unsigned_abs() * MS;
        let a = &self.adaptive;
        let c = &self.cumulative;
        DetectSettings {
            threshold_ns: ms(self.threshold_ms),
            adaptive: a.enabled.then(|| AdaptiveSettings {
                percentile: a.percentile,
                multiplier: a.multiplier,
                window_ns: a.window_s.unsigned_abs() * 1_000_000_000,
                min_samples: a.min_samples.unsigned_abs(),
                floor_ns: ms(a.floor_ms),
                ceiling_ns: ms(a.ceiling_ms),
            }),
            cumulative: c.enabled.then(|| CumulativeSettings {
                floor_ns: ms(c.floor_ms),
                window_ns: ms(c.window_ms),
                budget_ns: ms(c.budget_ms),
            }),
            loop_threads: self.loop_threads.clone(),
        }
    }

    pub fn route_filter(&self) -> RouteFilter {
        RouteFilter::new(&self.exclude_routes)
    }

    /// The configuration as a TOML file that gives it back.
    pub fn to_toml(&self) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = String::new();
        let _ = writeln!(out, "threshold_ms = {}", self.threshold_ms);
        let format = match self.format {
            Format::Text => "text",
            Format::Json => "json",
        };
        let _ = writeln!(out, "format = \"{format}\"");
        match self.duration_s {
            Some(secs) => _ = writeln!(out, "duration_s = {secs}"),
            None => out.push_str("# duration_s: unset (watch until stopped)\n"),
        }
        let _ = writeln!(out, "requests = \"{}\"", self.requests.as_str());
        let _ = writeln!(out, "scan_interval_ms = {}", self.scan_interval_ms);
        let _ = writeln!(out, "exclude_routes = [{}]", list(&self.exclude_routes));
        let probes = clap::ValueEnum::to_possible_value(&self.wait_probes)
            .map_or_else(|| "auto".to_owned(), |v| v.get_name().to_owned());
        let _ = writeln!(out, "wait_probes = \"{probes}\"");
        let _ = writeln!(out, "loop_threads = [{}]", list(&self.loop_threads));
        let fail_on: Vec<String> = self.fail_on.iter().map(|k| k.as_str().to_owned()).collect();
        let _ = writeln!(out, "fail_on = [{}]", list(&fail_on));
        match &self.metrics_addr {
            Some(addr) => _ = writeln!(out, "metrics_addr = {addr:?}"),
            None => out.push_str("# metrics_addr: unset (no Prometheus exporter)\n"),
        }
        match self.metrics_max_routes {
            Some(n) => _ = writeln!(out, "metrics_max_routes = {n}"),
            None => out.push_str("# metrics_max_routes: unset (the exporter's default)\n"),
        }
        self.tables_toml(&mut out);
        self.host.to_toml(&mut out);
        out
    }

    /// The `[adaptive]`, `[cumulative]` and `[stacks]` tables of [`Self::to_toml`].
    fn tables_toml(&self, out: &mut String) {
        let a = &self.adaptive;
        let _ = write!(
            out,
            "\n[adaptive]\nenabled = {}\npercentile = {:?}\nmultiplier = {:?}\nwindow_s = {}\nmin_samples = {}\nfloor_ms = {}\nceiling_ms = {}\n",
            a.enabled,
            a.percentile,
            a.multiplier,
            a.window_s,
            a.min_samples,
            a.floor_ms,
            a.ceiling_ms
        );
        let c = &self.cumulative;
        let _ = write!(
            out,
            "\n[cumulative]\nenabled = {}\nfloor_ms = {}\nwindow_ms = {}\nbudget_ms = {}\n",
            c.enabled, c.floor_ms, c.window_ms, c.budget_ms
        );
        let st = &self.stacks;
        let _ = write!(
            out,
            "\n[stacks]\nenabled = {}\nall_frames = {}\n",
            st.enabled, st.all_frames
        );
        match &st.folded {
            Some(path) => _ = writeln!(out, "folded = {:?}", path.display().to_string()),
            None => out.push_str("# folded: unset (no folded-stacks file)\n"),
        }
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("loopguard-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_defaults_are_valid_and_keep_the_fixed_threshold() {
        let settings = Settings::resolve(&WatchArgs::default(), None, None).unwrap();
        assert_eq!(settings, Settings::default());
        let detect = settings.detect();
        assert_eq!(detect.threshold_ns, 50 * MS);
        assert!(detect.adaptive.is_none());
        assert_eq!(detect.report_floor_ns(), 10 * MS);
    }

    #[test]
    fn flags_win_over_the_file() {
        let path = write_temp(
            "flags.toml",
            "threshold_ms = 80\nformat = \"json\"\n[cumulative]\nbudget_ms = 300\n",
        );
        let args = WatchArgs {
            threshold_ms: Some(30),
            ..WatchArgs::default()
        };
        let settings = Settings::resolve(&args, Some(&path), None).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(settings.threshold_ms, 30, "the flag");
        assert_eq!(settings.format, Format::Json, "the file");
        assert_eq!(settings.cumulative.budget_ms, 300, "the file");
        assert_eq!(settings.cumulative.window_ms, 1000, "the default");
    }

    #[test]
    fn stack_keys_take_the_file_then_the_flags() {
        let path = write_temp(
            "stacks.toml",
            "[stacks]\nall_frames = true\nfolded = \"from-file.folded\"\n",
        );
        let from_file = Settings::resolve(&WatchArgs::default(), Some(&path), None).unwrap();
        assert_eq!(
            from_file.stacks,
            StacksConfig {
                enabled: true,
                all_frames: true,
                folded: Some("from-file.folded".into()),
            },
            "the file over the defaults"
        );
        let mut args = WatchArgs::default();
        args.stacks.folded = Some("from-flag.folded".into());
        let flagged = Settings::resolve(&args, Some(&path), None).unwrap();
        assert_eq!(
            flagged.stacks.folded,
            Some("from-flag.folded".into()),
            "the flag"
        );
        assert!(flagged.stacks.all_frames, "still the file");

        // The file turns capture off; a flag cannot turn it back on, but
        // `--all-frames` against it is the CLI's conflict, refused.
        let off = write_temp("stacks-off.toml", "[stacks]\nenabled = false\n");
        let settings = Settings::resolve(&WatchArgs::default(), Some(&off), None).unwrap();
        assert!(!settings.stacks.enabled);
        let mut all = WatchArgs::default();
        all.stacks.all_frames = true;
        let error = Settings::resolve(&all, Some(&off), None).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("stacks.all_frames (--all-frames) = true"),
            "{error}"
        );
        // And `--no-stacks` against a file that names a folded file.
        let mut no = WatchArgs::default();
        no.stacks.no_stacks = true;
        let error = Settings::resolve(&no, Some(&path), None).unwrap_err();
        assert!(
            error.to_string().starts_with("stacks.folded (--folded)"),
            "{error}"
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&off).unwrap();
    }

    #[test]
    fn the_stack_flags_alone_set_the_stack_keys() {
        let mut args = WatchArgs::default();
        args.stacks.no_stacks = true;
        let settings = Settings::resolve(&args, None, None).unwrap();
        assert!(!settings.stacks.enabled);
        assert!(Settings::default().stacks.enabled, "on by default");
    }

    #[test]
    fn the_printed_configuration_reads_back_the_same() {
        let mut settings = Settings::default();
        settings.adaptive.enabled = true;
        settings.exclude_routes = vec!["/x/*".into()];
        settings.fail_on = vec![FailOn::Cumulative];
        settings.metrics_addr = Some("0.0.0.0:9000".into());
        settings.duration_s = Some(9);
        settings.wait_probes = WaitProbes::Off;
        settings.loop_threads = vec!["node".into(), "python*".into()];
        settings.stacks.all_frames = true;
        settings.stacks.folded = Some("/tmp/stalls.folded".into());
        let path = write_temp("roundtrip.toml", &settings.to_toml());
        let back = Settings::resolve(&WatchArgs::default(), Some(&path), None).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, settings);
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Settings::resolve(
            &WatchArgs::default(),
            Some(Path::new("/nonexistent/loopguard.toml")),
            None,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/loopguard.toml"),
            "{error}"
        );
    }
}
