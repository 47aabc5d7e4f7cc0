//! What each tool said, reduced to the rows of the side-by-side table:
//! recall, duration error, culprit exactness, false alarms. Pure: the
//! driver hands in the agent's JSON lines and fastapi-loopguard's log lines.

use serde_json::Value;

/// One report of a loop block, from either tool.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// A single block (loopguard `stall`, fastapi-loopguard "Event loop
    /// blocked"); `false` for loopguard's `stall_in_progress`, which names
    /// a culprit but carries no final duration.
    pub finished: bool,
    /// A cumulative alert (many small lags added up), not one block.
    pub cumulative: bool,
    /// ms the tool says the loop was held.
    pub duration_ms: f64,
    /// The requests the tool blames: loopguard's one `request.path` (none
    /// when it names no request), fastapi-loopguard's request ids (every
    /// request in flight).
    pub blamed: Vec<String>,
}

/// loopguard's `--format json` events: `stall`, `stall_in_progress` and
/// `cumulative`; any other line (attached, threshold, summary) is `None`.
pub fn parse_agent_line(line: &str) -> Option<Report> {
    let value: Value = serde_json::from_str(line).ok()?;
    let kind = value["type"].as_str()?;
    let (finished, cumulative) = match kind {
        "stall" => (true, false),
        "stall_in_progress" => (false, false),
        "cumulative" => (true, true),
        _ => return None,
    };
    let blamed = value["request"]["path"]
        .as_str()
        .map(|path| vec![path.to_owned()])
        .unwrap_or_default();
    Some(Report {
        finished,
        cumulative,
        duration_ms: value["duration_ms"]
            .as_f64()
            .or_else(|| value["total_ms"].as_f64())
            .unwrap_or(0.0),
        blamed,
    })
}

/// fastapi-loopguard 0.9.0's warnings (`monitor.py` `_handle_blocking`,
/// logged by Python's last-resort handler as the bare message):
/// `Event loop blocked for 123.45ms across 2 in-flight request(s): id1,id2`,
/// `Cumulative event loop blocking for 250.00ms across ...`, or either
/// with `(no active request)`. Its banners and anything else are `None`.
pub fn parse_fastapi_loopguard_line(line: &str) -> Option<Report> {
    let line = line.trim();
    let (cumulative, rest) = if let Some(rest) = line.strip_prefix("Event loop blocked for ") {
        (false, rest)
    } else if let Some(rest) = line.strip_prefix("Cumulative event loop blocking for ") {
        (true, rest)
    } else {
        return None;
    };
    let (number, rest) = rest.split_once("ms")?;
    let duration_ms = number.trim().parse().ok()?;
    let blamed = match rest.split_once("): ") {
        Some((_, ids)) if rest.contains("in-flight") => ids
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    Some(Report {
        finished: true,
        cumulative,
        duration_ms,
        blamed,
    })
}

/// An injected block: the request that blocked the loop and the reports
/// that arrived from its start until the next block's.
#[derive(Clone, Debug)]
pub struct Block {
    /// How the tool names the culprit: its path for loopguard, the
    /// `x-request-id` fastapi-loopguard answered with for it.
    pub culprit: String,
    /// ms the endpoint timed its own block.
    pub blocked_ms: f64,
    pub reports: Vec<Report>,
}

/// One tool's results over every block and every load slice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Score {
    pub blocks: usize,
    /// Blocks with at least one finished single-block report.
    pub found: usize,
    /// Blocks whose culprit was among the blamed.
    pub culprit_named: usize,
    /// Requests blamed that were not the block's culprit, summed over blocks.
    pub bystanders: usize,
    /// |reported − blocked| per found block, ms.
    pub errors_ms: Vec<f64>,
    /// Reports during load with no block (saturation and fixed rate).
    pub false_alarms: usize,
    /// Seconds of load those false alarms were counted over.
    pub load_seconds: f64,
    /// Reports beside the blocks that were not the block's (see [`Score::add_block`]).
    pub extra_alarms: usize,
}

impl Score {
    /// Scores one block. Its reports are those that blame its culprit
    /// (their finished durations summed: a tool may report one stall in
    /// parts) or, when none does, the longest finished one. Every other
    /// report in the window is an extra alarm beside the block: for
    /// fastapi-loopguard on a busy machine, lag that is no block's.
    pub fn add_block(&mut self, block: &Block) {
        self.blocks += 1;
        let singles: Vec<&Report> = block.reports.iter().filter(|r| !r.cumulative).collect();
        let naming: Vec<&Report> = singles
            .iter()
            .copied()
            .filter(|r| r.blamed.contains(&block.culprit))
            .collect();
        let matched: Vec<&Report> = if naming.is_empty() {
            singles
                .iter()
                .copied()
                .filter(|r| r.finished)
                .max_by(|a, b| a.duration_ms.total_cmp(&b.duration_ms))
                .into_iter()
                .collect()
        } else {
            self.culprit_named += 1;
            naming
        };
        if matched.iter().any(|r| r.finished) {
            self.found += 1;
            let total: f64 = matched
                .iter()
                .filter(|r| r.finished)
                .map(|r| r.duration_ms)
                .sum();
            self.errors_ms.push((total - block.blocked_ms).abs());
        }
        let mut bystanders: Vec<&String> = matched
            .iter()
            .flat_map(|r| &r.blamed)
            .filter(|b| **b != block.culprit)
            .collect();
        bystanders.sort();
        bystanders.dedup();
        self.bystanders += bystanders.len();
        self.extra_alarms += block.reports.len() - matched.len();
    }

    /// Counts the reports made during a slice of load without blocks.
    pub fn add_load(&mut self, reports: usize, seconds: f64) {
        self.false_alarms += reports;
        self.load_seconds += seconds;
    }

    pub fn mean_error_ms(&self) -> Option<f64> {
        (!self.errors_ms.is_empty())
            .then(|| self.errors_ms.iter().sum::<f64>() / self.errors_ms.len() as f64)
    }

    pub fn max_error_ms(&self) -> Option<f64> {
        self.errors_ms.iter().copied().reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_lines_give_stalls_and_their_request() {
        let stall = r#"{"type":"stall","kind":"loop","duration_ms":101.5,"request":{"id":3,"method":"GET","route":"/sleep/{tag}","path":"/sleep/a"},"victims":[{"path":"/suspended/a"}]}"#;
        let report = parse_agent_line(stall).unwrap();
        assert!(report.finished && !report.cumulative);
        assert!((report.duration_ms - 101.5).abs() < 1e-9);
        assert_eq!(report.blamed, ["/sleep/a"]);
        let anonymous = r#"{"type":"stall_in_progress","duration_ms":60,"request":null}"#;
        let report = parse_agent_line(anonymous).unwrap();
        assert!(!report.finished && report.blamed.is_empty());
        assert!(parse_agent_line(r#"{"type":"attached","pid":1}"#).is_none());
        assert!(parse_agent_line("not json").is_none());
    }

    #[test]
    fn fastapi_loopguard_lines_give_lag_and_every_request_in_flight() {
        let line = "Event loop blocked for 104.73ms across 3 in-flight request(s): 1a2b3c4d,5e6f7a8b,9c0d1e2f";
        let report = parse_fastapi_loopguard_line(line).unwrap();
        assert!(!report.cumulative);
        assert!((report.duration_ms - 104.73).abs() < 1e-9);
        assert_eq!(report.blamed, ["1a2b3c4d", "5e6f7a8b", "9c0d1e2f"]);
        let cumulative =
            "Cumulative event loop blocking for 212.00ms across 1 in-flight request(s): abcd0123";
        assert!(parse_fastapi_loopguard_line(cumulative).unwrap().cumulative);
        let idle = "Event loop blocked for 61.20ms (no active request)";
        assert!(
            parse_fastapi_loopguard_line(idle)
                .unwrap()
                .blamed
                .is_empty()
        );
        for other in [
            "── LOOPGUARD: Event Loop Blocked! ─────",
            "  In-flight request: GET /fast",
            "LoopGuard calibrated: baseline=0.10ms, threshold=10.00ms",
        ] {
            assert!(parse_fastapi_loopguard_line(other).is_none(), "{other}");
        }
    }

    fn report(duration_ms: f64, blamed: &[&str]) -> Report {
        Report {
            finished: true,
            cumulative: false,
            duration_ms,
            blamed: blamed.iter().map(|b| (*b).to_owned()).collect(),
        }
    }

    #[test]
    fn a_block_scores_recall_error_culprit_and_bystanders() {
        let mut score = Score::default();
        score.add_block(&Block {
            culprit: "c".into(),
            blocked_ms: 100.0,
            // Two parts of one stall, each blaming every request in
            // flight, and lag that is no block's.
            reports: vec![
                report(92.0, &["c", "s1", "f"]),
                report(12.0, &["c", "s1"]),
                report(30.0, &["s1"]),
            ],
        });
        score.add_block(&Block {
            culprit: "d".into(),
            blocked_ms: 200.0,
            reports: vec![],
        });
        assert_eq!((score.blocks, score.found, score.culprit_named), (2, 1, 1));
        assert_eq!(score.bystanders, 2, "s1 once, f once");
        assert_eq!(score.extra_alarms, 1);
        assert_eq!(score.errors_ms.len(), 1);
        assert!((score.mean_error_ms().unwrap() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn cumulative_alerts_and_wrong_culprits_do_not_count_as_found() {
        let mut score = Score::default();
        let mut cumulative = report(250.0, &["c"]);
        cumulative.cumulative = true;
        score.add_block(&Block {
            culprit: "c".into(),
            blocked_ms: 100.0,
            reports: vec![cumulative],
        });
        score.add_block(&Block {
            culprit: "c2".into(),
            blocked_ms: 100.0,
            reports: vec![report(100.5, &["other"]), report(20.0, &[])],
        });
        assert_eq!(
            score.extra_alarms, 2,
            "the cumulative one and the shorter one"
        );
        assert_eq!(
            (score.found, score.culprit_named, score.bystanders),
            (1, 0, 1)
        );
        assert!((score.max_error_ms().unwrap() - 0.5).abs() < 1e-9);
        score.add_load(1, 5.0);
        assert_eq!(score.false_alarms, 1);
    }
}
