//! The `FastAPI` app (`examples/loop-servers/fastapi_app.py`) under uvicorn,
//! pinned, with the middleware the variant asks for; its stderr kept
//! line by line with the time each line arrived; and a minimal HTTP client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cmd;

/// How long uvicorn may take to import `FastAPI` and answer `/fast`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// One uvicorn process; killed on drop.
pub struct Uvicorn {
    child: Child,
    pub addr: SocketAddr,
    stderr: Lines,
}

impl Uvicorn {
    /// `taskset -c CPUS python -m uvicorn fastapi_app:app` with
    /// `LOOPGUARD_APP_MIDDLEWARE=middleware` (`none`, `loopguard`,
    /// `fastapi-loopguard`); returns once `/fast` answers.
    pub fn start(python: &Path, cpus: &str, middleware: &str) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("failed to find a free port for uvicorn")?
            .port();
        let mut command = Command::new("taskset");
        command
            .args(["-c", cpus])
            .arg(python)
            .args(["-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--log-level", "warning"])
            .arg("--app-dir")
            .arg(cmd::root().join("examples/loop-servers"))
            .env("LOOPGUARD_APP_MIDDLEWARE", middleware)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let display = cmd::display(&command);
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start `{display}`"))?;
        let stderr: Lines = Arc::default();
        let pipe = child.stderr.take().expect("piped");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock()
                    .expect("not poisoned")
                    .push((Instant::now(), line));
            }
        });
        let server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stderr,
        };
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        while !get(server.addr, "/fast").is_ok_and(|r| r.status == 200) {
            if Instant::now() > deadline {
                bail!(
                    "`{display}` did not answer /fast within {} s (LOOPGUARD_APP_MIDDLEWARE={middleware}); its stderr:\n{}",
                    START_TIMEOUT.as_secs(),
                    server.stderr_since(started).join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The stderr lines that arrived at or after `since`.
    pub fn stderr_since(&self, since: Instant) -> Vec<String> {
        self.stderr
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, line)| line.clone())
            .collect()
    }
}

impl Drop for Uvicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// `GET path` over a fresh connection (`Connection: close`).
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&String::from_utf8_lossy(&raw))
        .with_context(|| format!("GET {path} on {addr}: a malformed answer"))
}

fn parse_response(raw: &str) -> anyhow::Result<Response> {
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_gives_status_headers_and_body() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nX-Request-Id: 1a2b3c4d\r\n\r\n{\"blocked_ms\":100.2}";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-request-id"), Some("1a2b3c4d"));
        assert_eq!(response.body, "{\"blocked_ms\":100.2}");
        assert!(parse_response("HTTP/1.1 200 OK\r\n").is_err());
    }
}
