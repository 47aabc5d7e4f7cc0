//! A Prometheus-like scraper for the bench: GET /metrics from the agent at
//! a fixed interval for as long as the agent is attached, so the cost of
//! being scraped shows in the attached figures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A loopback address with a port nobody listens on now.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Scrapes until stopped; counts the scrapes that answered 200.
pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, u64)>>,
}

impl Scraper {
    pub fn start(addr: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            let mut next = Instant::now();
            while !stopping.load(Ordering::Relaxed) {
                if scrape(addr).is_ok() {
                    ok += 1;
                } else {
                    failed += 1;
                }
                next += every;
                while Instant::now() < next && !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(every));
                }
            }
            (ok, failed)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns (scrapes answered, scrapes failed).
    pub fn stop(mut self) -> (u64, u64) {
        self.halt()
    }

    fn halt(&mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.halt();
    }
}

fn scrape(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("scrape did not answer 200"))
    }
}
