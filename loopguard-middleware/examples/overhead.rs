//! What `LoopguardLayer` costs per request with no agent attached.
//!
//! `cargo run --release -p loopguard-middleware --example overhead`
//!
//! Drives services in-process (one poll each, a no-op waker), so the figure
//! is the layer's own cost without network noise: an axum router bare, with
//! tower's `Identity` layer (what any layer costs axum), and with
//! `LoopguardLayer`; and a trivial service bare and layered. Also counts
//! heap allocations per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, Response};
use loopguard_middleware::LoopguardLayer;
use tower_layer::{Identity, Layer};
use tower_service::Service;

/// Counts every allocation of the process.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The request target, shared the way hyper shares its read buffer.
static TARGET: OnceLock<bytes::Bytes> = OnceLock::new();

fn request() -> Request<Body> {
    let uri = http::Uri::from_maybe_shared(TARGET.get().expect("set in main").clone())
        .expect("valid URI");
    Request::builder()
        .uri(uri)
        .body(Body::empty())
        .expect("valid request")
}

/// Mean ns per request over `n` requests.
fn ns_per_request<S>(service: &mut S, n: u32) -> f64
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let start = Instant::now();
    for _ in 0..n {
        let request = request();
        assert!(service.poll_ready(&mut cx).is_ready());
        let mut future = pin!(service.call(request));
        let Poll::Ready(Ok(response)) = future.as_mut().poll(&mut cx) else {
            panic!("the service did not answer in one poll");
        };
        black_box(response);
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn allocations_per_request<S>(service: &mut S) -> f64
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    ns_per_request(service, 10_000);
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 10_000.0
}

/// A service that answers at once.
#[derive(Clone)]
struct Trivial;

impl Service<Request<Body>> for Trivial {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        black_box(&request);
        std::future::ready(Ok(Response::new(Body::empty())))
    }
}

fn main() {
    let target = bytes::Bytes::from(b"/users/42?x=1".to_vec());
    let _promoted = target.clone(); // shared representation, as hyper's buffers are
    TARGET.set(target).expect("set once");

    let routes = || Router::new().route("/users/{id}", get(|| async { "ok" }));
    let mut bare = routes();
    let mut identity = routes().layer(Identity::new());
    let mut layered = routes().layer(LoopguardLayer::new());
    let mut trivial = Trivial;
    let mut trivial_layered = LoopguardLayer::new().layer(Trivial);

    println!(
        "allocations per request: router {} | + Identity {} | + LoopguardLayer {} | trivial {} | trivial + LoopguardLayer {}",
        allocations_per_request(&mut bare),
        allocations_per_request(&mut identity),
        allocations_per_request(&mut layered),
        allocations_per_request(&mut trivial),
        allocations_per_request(&mut trivial_layered),
    );
    let n = 1_000_000;
    ns_per_request(&mut bare, n / 10);
    ns_per_request(&mut layered, n / 10);
    for round in 1..=5 {
        let axum_bare = ns_per_request(&mut bare, n);
        let axum_identity = ns_per_request(&mut identity, n);
        let axum_loopguard = ns_per_request(&mut layered, n);
        let trivial_bare = ns_per_request(&mut trivial, n);
        let trivial_loopguard = ns_per_request(&mut trivial_layered, n);
        println!(
            "round {round}: router {axum_bare:.0} ns, + Identity {axum_identity:.0} ns, + LoopguardLayer {axum_loopguard:.0} ns (ours over Identity: {:+.0} ns); trivial {trivial_bare:.0} ns, + LoopguardLayer {trivial_loopguard:.0} ns ({:+.0} ns)",
            axum_loopguard - axum_identity,
            trivial_loopguard - trivial_bare,
        );
    }
}
