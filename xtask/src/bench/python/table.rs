//! The side-by-side table of `cargo xtask bench --python`, one summary
//! line per row, and the same rows as JSON. Ratios are medians over rounds
//! of each round's ratio to the bare app.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::super::{Mode, Options, Plan, median};
use super::score::Score;
use super::{Measurement, Results, Variant};

/// Issue #27: throughput with the middleware (and the agent) in place.
const THROUGHPUT_MIN: f64 = 0.95;
/// Issue #27: every block's duration within this of the block.
const ERROR_MAX_MS: f64 = 2.0;

/// The median over rounds of `value(variant) / value(bare)` in `mode`.
pub fn ratio(
    measurements: &[Measurement],
    variant: Variant,
    mode: Mode,
    value: fn(&Measurement) -> f64,
) -> Option<f64> {
    let of = |round: u32, v: Variant| {
        measurements
            .iter()
            .find(|m| m.round == round && m.variant == v && m.mode == mode)
            .map(value)
    };
    let rounds = measurements.iter().map(|m| m.round).max().unwrap_or(0);
    let ratios: Vec<f64> = (1..=rounds)
        .filter_map(|round| Some(of(round, variant)? / of(round, Variant::Bare)?))
        .collect();
    median(&ratios)
}

fn rps(m: &Measurement) -> f64 {
    m.sample.rps
}

fn cpu_per_request(m: &Measurement) -> f64 {
    m.server_us_per_request
}

fn p99(m: &Measurement) -> f64 {
    m.sample.p99_ms
}

/// Which tool a row favours.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lead {
    Loopguard,
    Tie,
    FastapiLoopguard,
}

/// One row: both tools' figures, the target, and who leads.
pub struct Row {
    pub name: &'static str,
    pub loopguard: String,
    pub fastapi_loopguard: String,
    pub target: String,
    /// `None` where the row has no target.
    pub met: Option<bool>,
    pub lead: Lead,
}

fn lead(loopguard: f64, fastapi_loopguard: f64, higher_is_better: bool) -> Lead {
    let (a, b) = if higher_is_better {
        (loopguard, fastapi_loopguard)
    } else {
        (fastapi_loopguard, loopguard)
    };
    if (a - b).abs() < 1e-9 {
        Lead::Tie
    } else if a > b {
        Lead::Loopguard
    } else {
        Lead::FastapiLoopguard
    }
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("x{v:.3}"))
}

pub fn rows(results: &Results) -> Vec<Row> {
    let mut rows = detection_rows(&results.loopguard, &results.fastapi_loopguard);
    rows.extend(load_rows(&results.measurements));
    rows
}

/// What each tool made of the blocks and of the load without blocks.
fn detection_rows(lg: &Score, fl: &Score) -> Vec<Row> {
    vec![
        Row {
            name: "recall (blocks found)",
            loopguard: format!("{}/{}", lg.found, lg.blocks),
            fastapi_loopguard: format!("{}/{}", fl.found, fl.blocks),
            target: "100 %".to_owned(),
            met: Some(lg.blocks > 0 && lg.found == lg.blocks),
            lead: lead(share(lg.found, lg.blocks), share(fl.found, fl.blocks), true),
        },
        Row {
            name: "duration error mean / max, ms",
            loopguard: format!("{} / {}", ms(lg.mean_error_ms()), ms(lg.max_error_ms())),
            fastapi_loopguard: format!("{} / {}", ms(fl.mean_error_ms()), ms(fl.max_error_ms())),
            target: format!("max ≤ {ERROR_MAX_MS:.0}"),
            met: Some(lg.max_error_ms().is_some_and(|e| e <= ERROR_MAX_MS)),
            lead: lead(
                lg.max_error_ms().unwrap_or(f64::INFINITY),
                fl.max_error_ms().unwrap_or(f64::INFINITY),
                false,
            ),
        },
        Row {
            name: "culprit named",
            loopguard: format!("{}/{}", lg.culprit_named, lg.blocks),
            fastapi_loopguard: format!("{}/{}", fl.culprit_named, fl.blocks),
            target: "every block".to_owned(),
            met: Some(lg.blocks > 0 && lg.culprit_named == lg.blocks),
            lead: lead(
                share(lg.culprit_named, lg.blocks),
                share(fl.culprit_named, fl.blocks),
                true,
            ),
        },
        Row {
            name: "bystanders blamed",
            loopguard: bystanders(lg),
            fastapi_loopguard: bystanders(fl),
            target: "0".to_owned(),
            met: Some(lg.bystanders == 0),
            lead: lead(lg.bystanders as f64, fl.bystanders as f64, false),
        },
        Row {
            name: "false alarms under load, no block",
            loopguard: alarms(lg),
            fastapi_loopguard: alarms(fl),
            target: "0".to_owned(),
            met: Some(lg.false_alarms == 0),
            lead: lead(lg.false_alarms as f64, fl.false_alarms as f64, false),
        },
        Row {
            name: "other reports while blocks ran",
            loopguard: extra(lg),
            fastapi_loopguard: extra(fl),
            target: String::new(),
            met: None,
            lead: lead(lg.extra_alarms as f64, fl.extra_alarms as f64, false),
        },
    ]
}

/// Throughput, CPU and latency against the bare app.
fn load_rows(m: &[Measurement]) -> Vec<Row> {
    let mut rows = Vec::new();
    let throughput = |v| ratio(m, v, Mode::Saturation, rps);
    let (tl, tf) = (
        throughput(Variant::Loopguard),
        throughput(Variant::FastapiLoopguard),
    );
    rows.push(Row {
        name: "throughput vs bare, saturation",
        loopguard: times(tl),
        fastapi_loopguard: times(tf),
        target: format!("≥ {THROUGHPUT_MIN}"),
        met: Some(tl.is_some_and(|t| t >= THROUGHPUT_MIN)),
        lead: lead(tl.unwrap_or(0.0), tf.unwrap_or(0.0), true),
    });
    let alone = throughput(Variant::MiddlewareOnly);
    rows.push(Row {
        name: "  the same, middleware without agent",
        loopguard: times(alone),
        fastapi_loopguard: "(in process)".to_owned(),
        target: String::new(),
        met: None,
        lead: lead(alone.unwrap_or(0.0), tf.unwrap_or(0.0), true),
    });
    for (name, value) in [
        (
            "server CPU/request vs bare, fixed rate",
            cpu_per_request as fn(&Measurement) -> f64,
        ),
        ("p99 latency vs bare, fixed rate", p99),
    ] {
        let (l, f) = (
            ratio(m, Variant::Loopguard, Mode::Rate, value),
            ratio(m, Variant::FastapiLoopguard, Mode::Rate, value),
        );
        rows.push(Row {
            name,
            loopguard: times(l),
            fastapi_loopguard: times(f),
            target: String::new(),
            met: None,
            lead: lead(
                l.unwrap_or(f64::INFINITY),
                f.unwrap_or(f64::INFINITY),
                false,
            ),
        });
    }
    rows
}

fn bystanders(score: &Score) -> String {
    if score.blocks == 0 {
        return "-".to_owned();
    }
    format!(
        "{} ({:.1} per block)",
        score.bystanders,
        score.bystanders as f64 / score.blocks as f64
    )
}

fn alarms(score: &Score) -> String {
    format!("{} in {:.0} s", score.false_alarms, score.load_seconds)
}

fn extra(score: &Score) -> String {
    format!("{} beside {} blocks", score.extra_alarms, score.blocks)
}

pub fn render(options: &Options, plan: &Plan, results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nloopguard (loopguard-asgi + agent) vs fastapi-loopguard 0.9.0, FastAPI under uvicorn: {} round(s), {} s of load per slice ({} connections; fixed rate {:.0} req/s), server CPUs {}, load CPUs {}, agent CPUs {}; load average {} before, {} after",
        plan.rounds,
        plan.seconds,
        options.connections,
        results.rate,
        options.server_cpus,
        options.load_cpus,
        options.agent_cpus,
        results.load_average.0,
        results.load_average.1,
    );
    let rows = rows(results);
    let _ = writeln!(
        out,
        "\n| {:<38} | {:<22} | {:<24} | {:<11} |",
        "", "loopguard", "fastapi-loopguard 0.9.0", "target"
    );
    let _ = writeln!(
        out,
        "| {:-<38} | {:-<22} | {:-<24} | {:-<11} |",
        "", "", "", ""
    );
    for row in &rows {
        let _ = writeln!(
            out,
            "| {:<38} | {:<22} | {:<24} | {:<11} |",
            row.name, row.loopguard, row.fastapi_loopguard, row.target
        );
    }
    out.push('\n');
    for row in &rows {
        let name = row.name.trim();
        let verdict = match row.met {
            Some(true) => format!("target {} met", row.target),
            Some(false) => format!("target {} MISSED", row.target),
            None => "no target".to_owned(),
        };
        let lead = match row.lead {
            Lead::Loopguard => "loopguard ahead",
            Lead::Tie => "even",
            Lead::FastapiLoopguard => "fastapi-loopguard AHEAD",
        };
        let _ = writeln!(
            out,
            "{name}: loopguard {}, fastapi-loopguard {}; {verdict}; {lead}",
            row.loopguard, row.fastapi_loopguard
        );
    }
    out
}

pub fn to_json(results: &Results) -> Value {
    let score = |s: &Score| {
        json!({
            "blocks": s.blocks,
            "found": s.found,
            "culprit_named": s.culprit_named,
            "bystanders": s.bystanders,
            "errors_ms": s.errors_ms,
            "false_alarms": s.false_alarms,
            "extra_alarms": s.extra_alarms,
            "load_seconds": s.load_seconds,
        })
    };
    let m = &results.measurements;
    let ratios = |v| {
        json!({
            "throughput_saturation": ratio(m, v, Mode::Saturation, rps),
            "cpu_per_request_rate": ratio(m, v, Mode::Rate, cpu_per_request),
            "p99_rate": ratio(m, v, Mode::Rate, p99),
        })
    };
    json!({
        "loopguard": score(&results.loopguard),
        "fastapi_loopguard": score(&results.fastapi_loopguard),
        "ratios": {
            "loopguard": ratios(Variant::Loopguard),
            "asgi_no_agent": ratios(Variant::MiddlewareOnly),
            "fastapi_loopguard": ratios(Variant::FastapiLoopguard),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::load::Sample;
    use super::*;

    fn measurement(round: u32, variant: Variant, rps: f64) -> Measurement {
        Measurement {
            round,
            variant,
            mode: Mode::Saturation,
            rate: None,
            sample: Sample {
                rps,
                ..Sample::default()
            },
            server_us_per_request: 1e6 / rps,
            alarms: 0,
        }
    }

    #[test]
    fn ratios_are_medians_of_each_rounds_ratio_to_bare() {
        let m = vec![
            measurement(1, Variant::Bare, 1000.0),
            measurement(1, Variant::Loopguard, 900.0),
            measurement(2, Variant::Bare, 500.0),
            measurement(2, Variant::Loopguard, 480.0),
            measurement(3, Variant::Bare, 1000.0),
            measurement(3, Variant::Loopguard, 950.0),
        ];
        let r = ratio(&m, Variant::Loopguard, Mode::Saturation, rps).unwrap();
        assert!((r - 0.95).abs() < 1e-9, "{r}");
        assert!(ratio(&m, Variant::FastapiLoopguard, Mode::Saturation, rps).is_none());
    }

    #[test]
    fn leads_follow_the_rows_direction() {
        assert_eq!(lead(1.0, 0.5, true), Lead::Loopguard);
        assert_eq!(lead(1.0, 0.5, false), Lead::FastapiLoopguard);
        assert_eq!(lead(0.0, 0.0, false), Lead::Tie);
    }
}
