//! The `/metrics` endpoint: an HTTP/1.1 server (hyper) on the agent's own
//! runtime, answering every scrape with the current [`Metrics`].
//!
//! The address is parsed and bound before anything is attached, so a typo
//! or a port in use is an error that leaves the target untouched.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::metrics::Metrics;

/// Scrape connections open at once; a new one past this closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send a request's headers, idle
/// keep-alive time included.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "`--metrics-addr {value}` is not an address: {reason}; give a port (`9464`, binds 127.0.0.1) or HOST:PORT (`0.0.0.0:9464` to listen on every interface)"
    )]
    BadAddress { value: String, reason: String },
    #[error(
        "cannot serve metrics on {addr}: the address is already in use; stop what listens there (`ss -ltnp 'sport = :{port}'`) or pick another port with --metrics-addr",
        port = addr.port()
    )]
    InUse { addr: SocketAddr },
    #[error("failed to listen for metrics scrapes on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `--metrics-addr`: `PORT` or `:PORT` bind loopback; `HOST:PORT`
/// (a name, an IPv4 address or `[IPv6]`) binds what it says.
pub fn parse_addr(value: &str) -> Result<SocketAddr, ExportError> {
    let bad = |reason: &str| ExportError::BadAddress {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = value.trim();
    let port_only = trimmed.strip_prefix(':').unwrap_or(trimmed);
    if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port_only
            .parse()
            .map_err(|_| bad("the port must be 0-65535"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(addr) = trimmed.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = trimmed.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    if host.is_empty() {
        return Err(bad("no port"));
    }
    let port: u16 = port.parse().map_err(|_| bad("the port must be 0-65535"))?;
    (host, port)
        .to_socket_addrs()
        .map_err(|_| bad(&format!("cannot resolve host `{host}`")))?
        .next()
        .ok_or_else(|| bad(&format!("host `{host}` has no address")))
}

/// Binds the metrics address now, before attaching.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ExportError> {
    let listener = TcpListener::bind(addr).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            ExportError::InUse { addr }
        } else {
            ExportError::Bind { addr, source }
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ExportError::Bind { addr, source })?;
    Ok(listener)
}

/// What a scrape is answered with: one target's [`Metrics`], or the
/// host's (`super::fleet`).
pub trait Scrape: Send + Sync + 'static {
    /// The `/metrics` body.
    fn render(&self) -> String;
}

impl Scrape for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

/// Serves scrapes on `listener` until the runtime shuts down.
pub fn serve<S: Scrape>(listener: TcpListener, metrics: Arc<S>) -> Result<(), ExportError> {
    let addr = listener.local_addr().map_err(|source| ExportError::Bind {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        source,
    })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| ExportError::Bind { addr, source })?;
    tokio::spawn(async move {
        // The oldest connections, closed first when a new one comes in at
        // the limit: idle clients cannot hold every descriptor, and the
        // newest (a scrape arriving now) is the one kept.
        let mut open: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "metrics: failed to accept a scrape connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            open.retain(|connection| !connection.is_finished());
            while open.len() >= MAX_CONNECTIONS {
                if let Some(oldest) = open.pop_front() {
                    oldest.abort();
                }
            }
            let metrics = Arc::clone(&metrics);
            let connection = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, Infallible>(respond(&request, metrics.as_ref())) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "metrics: scrape connection ended with an error");
                }
            });
            open.push_back(connection.abort_handle());
        }
    });
    Ok(())
}

/// The Prometheus text format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn respond<B>(request: &Request<B>, metrics: &dyn Scrape) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, TEXT_FORMAT, metrics.render())
        }
        (&Method::GET | &Method::HEAD, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "loopguard: metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: loopguard serves /metrics\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_binds_loopback() {
        assert_eq!(
            parse_addr("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr(":9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
    }

    #[test]
    fn other_binds_are_explicit() {
        assert_eq!(
            parse_addr("0.0.0.0:9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("[::1]:9464").unwrap(),
            "[::1]:9464".parse().unwrap()
        );
        assert_eq!(parse_addr("localhost:9464").unwrap().port(), 9464);
    }

    #[test]
    fn bad_addresses_name_the_fix() {
        for bad in ["", "70000", "host:", "nonsense", ":x"] {
            let error = parse_addr(bad).unwrap_err().to_string();
            assert!(
                error.contains("--metrics-addr") && error.contains("9464"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn a_port_in_use_is_refused_before_attaching() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let error = bind(taken.local_addr().unwrap()).unwrap_err();
        assert!(matches!(error, ExportError::InUse { .. }), "{error:?}");
        assert!(error.to_string().contains("already in use"), "{error}");
    }
}
