//! A real Prometheus server (Debian's `prometheus`, which `cargo xtask
//! setup` installs) on loopback, scraping one target every second, and
//! `PromQL` through its HTTP API.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http_get;

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server, killed (and its data removed) on drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`) every second as
    /// job `loopguard`; waits until it is ready.
    pub fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("loopguard-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: loopguard\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus (`cargo xtask setup` installs Debian's package)");
        let server = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(addr, "/-/ready").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready; its log: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Value {
        let response = http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(
            response.body["status"], "success",
            "GET {path}: {response:?}"
        );
        response.body["data"].clone()
    }

    /// An instant query at `at` (seconds since the epoch) or now: the value
    /// of each series, with its labels.
    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                let value = series["value"][1].as_str().unwrap().parse().unwrap();
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value an instant query returns; panics unless exactly one.
    pub fn scalar(&self, promql: &str) -> f64 {
        let result = self.query(promql);
        assert_eq!(result.len(), 1, "{promql}: {result:?}");
        result[0].1
    }

    /// A range query: every series' values from `start` to `end` (seconds
    /// since the epoch) at `step` seconds.
    pub fn range(&self, promql: &str, start: f64, end: f64, step: f64) -> Vec<Vec<f64>> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            encode(promql)
        ));
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                series["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|point| point[1].as_str().unwrap().parse().unwrap())
                    .collect()
            })
            .collect()
    }

    /// Waits until the last scrape of the target is newer than `after`
    /// (seconds since the epoch) and succeeded.
    pub fn wait_for_scrape_after(&self, after: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let targets = self.api("/api/v1/targets");
            let fresh = targets["activeTargets"].as_array().is_some_and(|active| {
                active.iter().any(|target| {
                    target["health"] == "up"
                        && target["lastScrape"]
                            .as_str()
                            .and_then(rfc3339_seconds)
                            .is_some_and(|at| at > after)
                })
            });
            if fresh {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never scraped loopguard after {after}: {targets:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Seconds since the epoch now.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `2026-11-26T12:00:01.123456789Z` (or with an offset) as seconds since the epoch.
fn rfc3339_seconds(text: &str) -> Option<f64> {
    let out = Command::new("date")
        .args(["-d", text, "+%s.%N"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
