//! The rules an effective configuration must follow. Each failure names the
//! key (and its flag), the value, and the rule with what to do.

use super::{ConfigError, Settings};

/// A probed poll costs about a microsecond at the very least, so a thread
/// cannot finish more than this many polls per second: the most a window
/// can hold on a single-threaded runtime.
pub const MAX_POLLS_PER_S: i64 = 1_000_000;

fn invalid(
    key: &str,
    flag: &str,
    value: &dyn std::fmt::Display,
    rule: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: format!("{key} ({flag})"),
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// Checks every rule; the first broken one is the error.
pub fn check(s: &Settings) -> Result<(), ConfigError> {
    // Every bounded number is also a duration or a count.
    for (key, flag, value, _) in upper_bounds(s) {
        if let Some(value) = value.filter(|&v| v <= 0) {
            return Err(invalid(
                key,
                flag,
                &value,
                "must be positive (durations and counts are > 0)",
            ));
        }
    }
    check_ranges(s)?;
    check_adaptive(s)?;
    check_cumulative(s)?;
    check_stacks(s)?;
    if s.metrics_max_routes == Some(0) {
        return Err(invalid(
            "metrics_max_routes",
            "--metrics-max-routes",
            &0,
            "must be positive (routes kept as metric labels)",
        ));
    }
    Ok(())
}

/// The longest stretch any millisecond setting may give: a day. Larger
/// values would overflow once turned into nanoseconds (a file's
/// `threshold_ms = 18446744073710` became 0.45 ms).
pub const MAX_ANY_MS: i64 = 86_400_000;

/// Upper bounds, the same whether a value comes from a flag or the file.
fn check_ranges(s: &Settings) -> Result<(), ConfigError> {
    for (key, flag, value, max) in upper_bounds(s) {
        if let Some(value) = value.filter(|&v| v > max) {
            return Err(invalid(key, flag, &value, format!("must be at most {max}")));
        }
    }
    if let Some(routes) = s.metrics_max_routes.filter(|&r| r > 100_000) {
        return Err(invalid(
            "metrics_max_routes",
            "--metrics-max-routes",
            &routes,
            "must be at most 100000",
        ));
    }
    Ok(())
}

/// `(file key, flag, value, upper bound)` of a bounded number.
type Bound = (&'static str, &'static str, Option<i64>, i64);

/// Every bounded number: those of the run, then those of the rules.
fn upper_bounds(s: &Settings) -> impl Iterator<Item = Bound> {
    run_bounds(s).into_iter().chain(rule_bounds(s))
}

/// The bounds of how often and how long loopguard watches.
fn run_bounds(s: &Settings) -> [Bound; 3] {
    [
        (
            "threshold_ms",
            "--threshold-ms",
            Some(s.threshold_ms),
            600_000,
        ),
        (
            "scan_interval_ms",
            "--scan-interval-ms",
            Some(s.scan_interval_ms),
            1000,
        ),
        // A year.
        ("duration_s", "--duration", s.duration_s, 31_536_000),
    ]
}

/// The bounds of the adaptive and cumulative rules.
fn rule_bounds(s: &Settings) -> [Bound; 7] {
    let a = &s.adaptive;
    let c = &s.cumulative;
    [
        (
            "adaptive.window_s",
            "--adaptive-window-s",
            Some(a.window_s),
            MAX_ANY_MS / 1000,
        ),
        (
            "adaptive.min_samples",
            "--adaptive-min-samples",
            Some(a.min_samples),
            1_000_000_000,
        ),
        (
            "adaptive.floor_ms",
            "--adaptive-floor-ms",
            Some(a.floor_ms),
            600_000,
        ),
        (
            "adaptive.ceiling_ms",
            "--adaptive-ceiling-ms",
            Some(a.ceiling_ms),
            600_000,
        ),
        (
            "cumulative.floor_ms",
            "--cumulative-floor-ms",
            Some(c.floor_ms),
            600_000,
        ),
        (
            "cumulative.window_ms",
            "--cumulative-window-ms",
            Some(c.window_ms),
            MAX_ANY_MS,
        ),
        (
            "cumulative.budget_ms",
            "--cumulative-budget-ms",
            Some(c.budget_ms),
            MAX_ANY_MS,
        ),
    ]
}

fn check_adaptive(s: &Settings) -> Result<(), ConfigError> {
    let a = &s.adaptive;
    if a.multiplier.is_nan() || a.multiplier <= 1.0 {
        return Err(invalid(
            "adaptive.multiplier",
            "--adaptive-multiplier",
            &a.multiplier,
            "must be greater than 1, or normal polls would count as stalls (try 3 to 5)",
        ));
    }
    if !(0.5..=0.999).contains(&a.percentile) {
        return Err(invalid(
            "adaptive.percentile",
            "--adaptive-percentile",
            &a.percentile,
            "must be between 0.5 and 0.999 (0.99 is the p99)",
        ));
    }
    if a.floor_ms > a.ceiling_ms {
        return Err(invalid(
            "adaptive.floor_ms",
            "--adaptive-floor-ms",
            &a.floor_ms,
            format!(
                "must not exceed adaptive.ceiling_ms = {}; lower the floor or raise the ceiling",
                a.ceiling_ms
            ),
        ));
    }
    if a.window_s.saturating_mul(1000) < s.scan_interval_ms {
        return Err(invalid(
            "adaptive.window_s",
            "--adaptive-window-s",
            &a.window_s,
            format!(
                "the window must not be shorter than the scan interval ({} ms)",
                s.scan_interval_ms
            ),
        ));
    }
    let capacity = a.window_s.saturating_mul(MAX_POLLS_PER_S);
    if a.min_samples > capacity {
        return Err(invalid(
            "adaptive.min_samples",
            "--adaptive-min-samples",
            &a.min_samples,
            format!(
                "is more polls than a {} s window can hold ({capacity}, at most one poll per microsecond); lower it or lengthen adaptive.window_s",
                a.window_s
            ),
        ));
    }
    Ok(())
}

fn check_cumulative(s: &Settings) -> Result<(), ConfigError> {
    let (a, c) = (&s.adaptive, &s.cumulative);
    if c.window_ms < s.scan_interval_ms {
        return Err(invalid(
            "cumulative.window_ms",
            "--cumulative-window-ms",
            &c.window_ms,
            format!(
                "the window must not be shorter than the scan interval ({} ms)",
                s.scan_interval_ms
            ),
        ));
    }
    if c.budget_ms >= c.window_ms {
        return Err(invalid(
            "cumulative.budget_ms",
            "--cumulative-budget-ms",
            &c.budget_ms,
            format!(
                "must be less than cumulative.window_ms = {}; a budget the window cannot exceed never alerts",
                c.window_ms
            ),
        ));
    }
    if c.enabled && c.floor_ms >= s.threshold_ms {
        return Err(invalid(
            "cumulative.floor_ms",
            "--cumulative-floor-ms",
            &c.floor_ms,
            format!(
                "must be less than the stall threshold (threshold_ms = {}): polls over the threshold are stalls, not cuts",
                s.threshold_ms
            ),
        ));
    }
    if c.enabled && a.enabled && c.floor_ms >= a.floor_ms {
        return Err(invalid(
            "cumulative.floor_ms",
            "--cumulative-floor-ms",
            &c.floor_ms,
            format!(
                "must be less than the lowest adaptive threshold (adaptive.floor_ms = {}): polls over the threshold are stalls, not cuts",
                a.floor_ms
            ),
        ));
    }
    Ok(())
}

/// The CLI refuses `--no-stacks` with `--all-frames` or `--folded`; the same
/// holds when one comes from the file and the other from a flag.
fn check_stacks(s: &Settings) -> Result<(), ConfigError> {
    let st = &s.stacks;
    if st.enabled {
        return Ok(());
    }
    let off = "needs stack capture, which stacks.enabled = false (--no-stacks) turns off; remove one of the two";
    if let Some(path) = &st.folded {
        return Err(invalid(
            "stacks.folded",
            "--folded",
            &format!("{:?}", path.display().to_string()),
            off,
        ));
    }
    if st.all_frames {
        return Err(invalid("stacks.all_frames", "--all-frames", &true, off));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(change: impl FnOnce(&mut Settings)) -> String {
        let mut settings = Settings::default();
        change(&mut settings);
        check(&settings)
            .expect_err("the change should be refused")
            .to_string()
    }

    #[test]
    fn the_defaults_pass() {
        assert!(check(&Settings::default()).is_ok());
        let mut adaptive = Settings::default();
        adaptive.adaptive.enabled = true;
        assert!(check(&adaptive).is_ok());
    }

    #[test]
    fn values_past_the_flags_ranges_are_refused_not_wrapped() {
        assert_eq!(
            error(|s| s.threshold_ms = 18_446_744_073_710),
            "threshold_ms (--threshold-ms) = 18446744073710: must be at most 600000"
        );
        assert!(error(|s| s.scan_interval_ms = 1001).contains("at most 1000"));
        assert!(error(|s| s.cumulative.window_ms = i64::MAX).contains("at most 86400000"));
        assert!(error(|s| s.metrics_max_routes = Some(100_001)).contains("at most 100000"));
        let edge = Settings {
            threshold_ms: 600_000,
            scan_interval_ms: 1000,
            ..Settings::default()
        };
        assert!(check(&edge).is_ok(), "the flags' own maxima pass");
    }

    #[test]
    fn non_positive_durations_are_refused() {
        assert_eq!(
            error(|s| s.threshold_ms = 0),
            "threshold_ms (--threshold-ms) = 0: must be positive (durations and counts are > 0)"
        );
        assert_eq!(
            error(|s| s.cumulative.window_ms = -5),
            "cumulative.window_ms (--cumulative-window-ms) = -5: must be positive (durations and counts are > 0)"
        );
        assert!(
            error(|s| s.adaptive.window_s = 0)
                .starts_with("adaptive.window_s (--adaptive-window-s) = 0: must be positive")
        );
        assert!(error(|s| s.duration_s = Some(0)).starts_with("duration_s (--duration) = 0"));
    }

    #[test]
    fn a_multiplier_of_one_or_less_is_refused() {
        assert_eq!(
            error(|s| s.adaptive.multiplier = 1.0),
            "adaptive.multiplier (--adaptive-multiplier) = 1: must be greater than 1, or normal polls would count as stalls (try 3 to 5)"
        );
        assert!(error(|s| s.adaptive.multiplier = 0.5).contains("= 0.5: must be greater than 1"));
    }

    #[test]
    fn a_percentile_outside_half_to_999_permille_is_refused() {
        assert_eq!(
            error(|s| s.adaptive.percentile = 0.9999),
            "adaptive.percentile (--adaptive-percentile) = 0.9999: must be between 0.5 and 0.999 (0.99 is the p99)"
        );
        assert!(
            error(|s| s.adaptive.percentile = 0.4).contains("= 0.4: must be between 0.5 and 0.999")
        );
        assert!(error(|s| s.adaptive.percentile = 99.0).contains("= 99: must be between"));
    }

    #[test]
    fn a_window_shorter_than_the_scan_interval_is_refused() {
        assert_eq!(
            error(|s| {
                s.scan_interval_ms = 500;
                s.cumulative.window_ms = 400;
                s.cumulative.budget_ms = 100;
            }),
            "cumulative.window_ms (--cumulative-window-ms) = 400: the window must not be shorter than the scan interval (500 ms)"
        );
        let mut long_scan = Settings {
            scan_interval_ms: 2000,
            ..Settings::default()
        };
        long_scan.cumulative.window_ms = 3000;
        long_scan.adaptive.window_s = 1;
        // A scan interval over a second is refused by its range first (the
        // flag's): an adaptive window (whole seconds) is never shorter.
        assert_eq!(
            check(&long_scan).unwrap_err().to_string(),
            "scan_interval_ms (--scan-interval-ms) = 2000: must be at most 1000"
        );
    }

    #[test]
    fn a_budget_not_under_the_window_is_refused() {
        assert_eq!(
            error(|s| s.cumulative.budget_ms = 1000),
            "cumulative.budget_ms (--cumulative-budget-ms) = 1000: must be less than cumulative.window_ms = 1000; a budget the window cannot exceed never alerts"
        );
    }

    #[test]
    fn a_cumulative_floor_not_under_the_threshold_is_refused() {
        assert_eq!(
            error(|s| s.cumulative.floor_ms = 50),
            "cumulative.floor_ms (--cumulative-floor-ms) = 50: must be less than the stall threshold (threshold_ms = 50): polls over the threshold are stalls, not cuts"
        );
        assert!(
            error(|s| {
                s.adaptive.enabled = true;
                s.cumulative.floor_ms = 20;
            })
            .contains(
                "= 20: must be less than the lowest adaptive threshold (adaptive.floor_ms = 20)"
            )
        );
        let mut off = Settings::default();
        off.cumulative.enabled = false;
        off.cumulative.floor_ms = 50;
        assert!(check(&off).is_ok(), "a rule that is off does not bind");
    }

    #[test]
    fn more_min_samples_than_the_window_holds_are_refused() {
        assert_eq!(
            error(|s| {
                s.adaptive.window_s = 2;
                s.adaptive.min_samples = 3_000_000;
            }),
            "adaptive.min_samples (--adaptive-min-samples) = 3000000: is more polls than a 2 s window can hold (2000000, at most one poll per microsecond); lower it or lengthen adaptive.window_s"
        );
    }

    #[test]
    fn stack_options_without_stack_capture_are_refused() {
        assert_eq!(
            error(|s| {
                s.stacks.enabled = false;
                s.stacks.folded = Some("out.folded".into());
            }),
            "stacks.folded (--folded) = \"out.folded\": needs stack capture, which stacks.enabled = false (--no-stacks) turns off; remove one of the two"
        );
        assert!(
            error(|s| {
                s.stacks.enabled = false;
                s.stacks.all_frames = true;
            })
            .starts_with("stacks.all_frames (--all-frames) = true: needs stack capture")
        );
        let mut off = Settings::default();
        off.stacks.enabled = false;
        assert!(check(&off).is_ok());
    }

    #[test]
    fn a_floor_over_the_ceiling_is_refused() {
        assert!(error(|s| s.adaptive.floor_ms = 300).starts_with(
            "adaptive.floor_ms (--adaptive-floor-ms) = 300: must not exceed adaptive.ceiling_ms = 250"
        ));
    }
}
