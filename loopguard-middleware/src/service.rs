//! The tower layer, service and response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::probes::{next_request_id, request_end, request_start_tracked};

/// Tower [`Layer`] that wraps a service in [`LoopguardService`].
///
/// With axum, apply it with `Router::layer` *after* adding the routes, so
/// that the route template (`MatchedPath`) is in the request extensions.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopguardLayer {
    _private: (),
}

impl LoopguardLayer {
    /// Creates the layer. It has no configuration.
    pub const fn new() -> Self {
        Self { _private: () }
    }
}

impl<S> Layer<S> for LoopguardLayer {
    type Service = LoopguardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoopguardService::new(inner)
    }
}

/// Tower [`Service`] firing `loopguard:request_start` and
/// `loopguard:request_end` around every request it passes to the inner
/// service. Responses, errors and panics pass through untouched.
///
/// `call` only takes a request id and cheap clones of the method, the route
/// template and the URI; the probes fire from the returned
/// [`ResponseFuture`], inside the task that polls it.
#[derive(Clone, Debug)]
pub struct LoopguardService<S> {
    inner: S,
}

impl<S> LoopguardService<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The inner service.
    pub const fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub const fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for LoopguardService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Capture before the request moves into the inner service. Nothing
        // fires here: hyper's HTTP/2 server calls `call` on the connection
        // task and spawns the future it returns as a task of its own.
        let captured = Captured::from_request(&req);
        ResponseFuture {
            inner: self.inner.call(req),
            probe: RequestProbe {
                state: State::NotStarted(captured),
            },
        }
    }
}

pin_project! {
    /// Response future of [`LoopguardService`].
    ///
    /// Fires `request_start` at the start of its first poll, then polls the
    /// inner future; fires `request_end` with the response status when the
    /// inner future completes (`Ok(response)`: the status of the response
    /// head; `Err`: 0). Dropped or unwound after `request_start` but before
    /// completion, it fires `request_end` with status 0 once the inner
    /// future has been dropped.
    ///
    /// With a streaming body, `request_end` marks the response *head*: the
    /// body is produced later, outside of this future.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Declared after `inner`, so dropped after it: a request cancelled
        // while its handler state is being dropped ends after that drop.
        probe: RequestProbe,
    }
}

impl<F: fmt::Debug> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .field("probe", &self.probe)
            .finish()
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _polling = this.probe.start();
        // A panic here unwinds through us untouched; dropping the future
        // then ends the request with status 0.
        let output = ready!(this.inner.poll(cx));
        let status = match &output {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        };
        this.probe.end(status);
        Poll::Ready(output)
    }
}

/// The route template type, when a framework provides one.
#[cfg(feature = "axum")]
type Route = axum::extract::MatchedPath;
#[cfg(not(feature = "axum"))]
type Route = std::convert::Infallible;

#[cfg(feature = "axum")]
fn route_of<B>(req: &Request<B>) -> Option<Route> {
    // An `Arc<str>` clone.
    req.extensions().get::<Route>().cloned()
}

#[cfg(not(feature = "axum"))]
fn route_of<B>(_req: &Request<B>) -> Option<Route> {
    None
}

#[cfg(feature = "axum")]
fn route_str(route: &Route) -> &str {
    route.as_str()
}

#[cfg(not(feature = "axum"))]
fn route_str(route: &Route) -> &str {
    match *route {}
}

/// What `request_start` reports, captured in `call` without allocating in
/// the common case: standard methods are plain enum values, `MatchedPath`
/// is an `Arc<str>`, and a `Uri` clone only bumps the reference counts of its
/// `Bytes` (it allocates only for schemes other than http and https).
#[derive(Debug)]
struct Captured {
    id: u64,
    method: Method,
    route: Option<Route>,
    uri: Uri,
}

impl Captured {
    fn from_request<B>(req: &Request<B>) -> Self {
        Self {
            id: next_request_id(),
            method: req.method().clone(),
            route: route_of(req),
            uri: req.uri().clone(),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Not polled yet.
    NotStarted(Captured),
    /// `request_start` fired, `request_end` not yet.
    Started(u64),
    /// `request_end` fired.
    Ended,
}

#[derive(Debug)]
struct RequestProbe {
    state: State,
}

impl RequestProbe {
    /// Fires `request_start` unless it already fired, and notes in the
    /// in-flight table that this thread polls the request until the
    /// returned guard is dropped.
    #[inline]
    fn start(&mut self) -> Option<Polling> {
        match &self.state {
            State::NotStarted(captured) => {
                let id = captured.id;
                // The pointers point into `captured`, alive until the state
                // changes below, after the probe. Filing the request marks
                // this poll too.
                request_start_tracked(
                    id,
                    captured.method.as_str(),
                    captured.route.as_ref().map(route_str),
                    captured.uri.path(),
                );
                self.state = State::Started(id);
                Some(Polling(id))
            }
            State::Started(id) => {
                crate::inflight::polling(*id, true);
                Some(Polling(*id))
            }
            State::Ended => None,
        }
    }

    /// Fires `request_end` if `request_start` fired and it did not.
    #[inline]
    fn end(&mut self, status: u16) {
        if let State::Started(id) = self.state {
            self.state = State::Ended;
            request_end(id, status);
        }
    }
}

/// A poll of a started request's future under way: its drop (return or
/// unwind) tells the in-flight table the thread stopped polling it.
struct Polling(u64);

impl Drop for Polling {
    fn drop(&mut self) {
        crate::inflight::polling(self.0, false);
    }
}

impl Drop for RequestProbe {
    fn drop(&mut self) {
        self.end(0);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::task::Waker;

    use http::{HeaderValue, StatusCode};

    use super::*;
    use crate::probes::recorder::{self, Event};

    /// A tower service made of a closure, by hand.
    #[derive(Clone)]
    struct FnService<T>(T);

    impl<T, B, Fut, R, E> Service<Request<B>> for FnService<T>
    where
        T: FnMut(Request<B>) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        type Response = R;
        type Error = E;
        type Future = Fut;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<B>) -> Fut {
            (self.0)(req)
        }
    }

    /// Pending `n` times (waking itself), then ready.
    struct YieldTimes(u32);

    impl Future for YieldTimes {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 == 0 {
                Poll::Ready(())
            } else {
                self.0 -= 1;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
        fut.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Polls to completion with a no-op waker (the futures here always
    /// make progress).
    fn block_on<F: Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            if let Poll::Ready(out) = poll_once(fut.as_mut()) {
                return out;
            }
        }
    }

    fn request(method: Method, uri: &str) -> Request<&'static str> {
        Request::builder()
            .method(method)
            .uri(uri)
            .body("request body")
            .unwrap()
    }

    fn ready<S, B>(svc: &mut S)
    where
        S: Service<Request<B>>,
        S::Error: fmt::Debug,
    {
        match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => panic!("service not ready"),
        }
    }

    fn start(id: u64, method: &str, route: Option<&str>, path: &str) -> Event {
        Event::Start {
            id,
            method: method.into(),
            route: route.map(Into::into),
            path: path.into(),
        }
    }

    fn started_id(events: &[Event]) -> u64 {
        match events.first() {
            Some(Event::Start { id, .. }) => *id,
            other => panic!("expected a start event, got {other:?}"),
        }
    }

    #[test]
    fn response_passes_through_and_start_fires_in_first_poll() {
        recorder::take();
        let mut svc = LoopguardLayer::new().layer(FnService(|req: Request<&'static str>| {
            assert_eq!(*req.body(), "request body");
            assert_eq!(req.uri().query(), Some("x=1&y=2"));
            async {
                YieldTimes(2).await;
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("x-test", "yes")
                        .body(vec![1_u8, 2, 3])
                        .unwrap(),
                )
            }
        }));
        ready(&mut svc);
        let mut fut = std::pin::pin!(svc.call(request(Method::PUT, "/items/9?x=1&y=2")));
        assert_eq!(recorder::take(), [], "nothing may fire in call()");

        assert!(poll_once(fut.as_mut()).is_pending());
        let events = recorder::take();
        let id = started_id(&events);
        assert_eq!(events, [start(id, "PUT", None, "/items/9")]);

        assert!(poll_once(fut.as_mut()).is_pending());
        assert_eq!(recorder::take(), [], "start fires only once");

        let Poll::Ready(Ok(response)) = poll_once(fut.as_mut()) else {
            panic!("expected a response");
        };
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(
            response.headers().get("x-test"),
            Some(&HeaderValue::from_static("yes"))
        );
        assert_eq!(response.body(), &[1, 2, 3]);
        assert_eq!(recorder::take(), [Event::End { id, status: 201 }]);

        // Dropping a completed future fires nothing more.
        drop(response);
        assert_eq!(recorder::take(), []);
    }

    #[test]
    fn status_codes_are_reported() {
        recorder::take();
        let mut svc = LoopguardService::new(FnService(|req: Request<&'static str>| {
            let status: u16 = req.uri().path()[1..].parse().unwrap();
            async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
        }));
        for status in [200_u16, 204, 301, 404, 418, 500, 503, 599] {
            ready(&mut svc);
            let response = block_on(svc.call(request(Method::GET, &format!("/{status}")))).unwrap();
            assert_eq!(response.status().as_u16(), status);
            let events = recorder::take();
            let id = started_id(&events);
            assert_eq!(
                events,
                [
                    start(id, "GET", None, &format!("/{status}")),
                    Event::End { id, status }
                ]
            );
        }
    }

    #[test]
    fn errors_pass_through_with_status_zero() {
        recorder::take();
        let mut svc = LoopguardService::new(FnService(|_req: Request<&'static str>| async {
            Err::<Response<()>, _>("backend down")
        }));
        ready(&mut svc);
        let result = block_on(svc.call(request(Method::POST, "http://example.com/submit")));
        assert_eq!(result.unwrap_err(), "backend down");
        let events = recorder::take();
        let id = started_id(&events);
        assert_eq!(
            events,
            [
                start(id, "POST", None, "/submit"),
                Event::End { id, status: 0 }
            ]
        );
    }

    #[test]
    fn dropped_before_completion_ends_with_zero() {
        recorder::take();
        let mut svc = LoopguardService::new(FnService(|_req: Request<&'static str>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(()))
        }));

        // Never polled: nothing started, nothing to end.
        ready(&mut svc);
        drop(svc.call(request(Method::GET, "/never")));
        assert_eq!(recorder::take(), []);

        // Polled, then dropped (the client hung up).
        ready(&mut svc);
        let mut fut = Box::pin(svc.call(request(Method::GET, "/hangup")));
        assert!(poll_once(fut.as_mut()).is_pending());
        drop(fut);
        let events = recorder::take();
        let id = started_id(&events);
        assert_eq!(
            events,
            [
                start(id, "GET", None, "/hangup"),
                Event::End { id, status: 0 }
            ]
        );
    }

    #[test]
    fn panics_propagate_and_end_with_zero() {
        recorder::take();
        let mut svc = LoopguardService::new(FnService(|_req: Request<&'static str>| async {
            YieldTimes(1).await;
            panic!("handler exploded");
            #[expect(unreachable_code)]
            Ok::<Response<()>, Infallible>(Response::new(()))
        }));

        // The task harness pattern: the panic unwinds through `poll`, the
        // future is dropped afterwards.
        ready(&mut svc);
        let mut fut = Box::pin(svc.call(request(Method::DELETE, "/a")));
        assert!(poll_once(fut.as_mut()).is_pending());
        let payload = catch_unwind(AssertUnwindSafe(|| poll_once(fut.as_mut()))).unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"handler exploded"));
        let events = recorder::take();
        let id = started_id(&events);
        assert_eq!(events, [start(id, "DELETE", None, "/a")]);
        drop(fut);
        assert_eq!(recorder::take(), [Event::End { id, status: 0 }]);

        // The future dropped by the unwinding itself.
        ready(&mut svc);
        let fut = svc.call(request(Method::DELETE, "/b"));
        let payload = catch_unwind(AssertUnwindSafe(move || block_on(fut))).unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"handler exploded"));
        let events = recorder::take();
        let id = started_id(&events);
        assert_eq!(
            events,
            [
                start(id, "DELETE", None, "/b"),
                Event::End { id, status: 0 }
            ]
        );
    }

    #[test]
    fn many_requests_get_increasing_ids() {
        recorder::take();
        let mut svc = LoopguardService::new(FnService(|_req: Request<&'static str>| async {
            Ok::<_, Infallible>(Response::new("ok"))
        }));
        let mut last = 0;
        for i in 0..200 {
            ready(&mut svc);
            let path = format!("/n/{i}");
            assert_eq!(
                *block_on(svc.call(request(Method::GET, &path)))
                    .unwrap()
                    .body(),
                "ok"
            );
            let events = recorder::take();
            let id = started_id(&events);
            assert!(id > last, "id {id} after {last}");
            last = id;
            assert_eq!(
                events,
                [
                    start(id, "GET", None, &path),
                    Event::End { id, status: 200 }
                ]
            );
        }
    }

    #[test]
    fn extension_methods_and_odd_uris() {
        recorder::take();
        let mut svc = LoopguardService::new(FnService(|_req: Request<&'static str>| async {
            Ok::<_, Infallible>(Response::new(()))
        }));
        for (method, uri, path) in [
            ("PURGE", "/cache/x", "/cache/x"),
            ("A-VERY-LONG-EXTENSION-METHOD", "/", "/"),
            ("OPTIONS", "*", "*"),
            ("GET", "https://example.com", "/"),
            ("GET", "/caf%C3%A9?q=%20", "/caf%C3%A9"),
        ] {
            ready(&mut svc);
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            block_on(svc.call(request(method.clone(), uri))).unwrap();
            let events = recorder::take();
            let id = started_id(&events);
            assert_eq!(
                events,
                [
                    start(id, method.as_str(), None, path),
                    Event::End { id, status: 200 }
                ]
            );
        }
    }

    #[test]
    fn future_is_send_and_service_clone() {
        fn assert_send<T: Send + 'static>(_: &T) {}
        let svc = LoopguardService::new(FnService(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(()))
        }));
        let fut = svc.clone().call(Request::new(()));
        assert_send(&fut);
        // The bookkeeping added to the inner future stays small (136 bytes
        // on 64-bit targets: the `Uri` clone is 88 of them).
        assert!(
            size_of::<RequestProbe>() <= 160,
            "{}",
            size_of::<RequestProbe>()
        );
    }

    #[cfg(feature = "axum")]
    mod axum_router {
        use axum::Router;
        use axum::body::Body;
        use axum::extract::Path;
        use axum::routing::get;

        use super::*;

        fn app() -> Router {
            Router::new()
                .route(
                    "/users/{id}",
                    get(|Path(id): Path<String>| async move { format!("user {id}") }),
                )
                .route("/fast", get(|| async { "fast" }))
                .nest(
                    "/api",
                    Router::new().route("/items/{item}", get(|| async { "item" })),
                )
                .layer(LoopguardLayer::new())
        }

        fn get_request(uri: &str) -> Request<Body> {
            Request::builder().uri(uri).body(Body::empty()).unwrap()
        }

        #[test]
        fn matched_path_is_the_route() {
            recorder::take();
            let mut router = app();
            for (method, uri, route, path, status) in [
                (
                    "GET",
                    "/users/42?verbose=1",
                    Some("/users/{id}"),
                    "/users/42",
                    200,
                ),
                ("GET", "/fast", Some("/fast"), "/fast", 200),
                (
                    "GET",
                    "/api/items/7",
                    Some("/api/items/{item}"),
                    "/api/items/7",
                    200,
                ),
                // The method router's 405 still runs inside the layer.
                ("POST", "/fast", Some("/fast"), "/fast", 405),
                // The fallback has no matched path.
                ("GET", "/nope", None, "/nope", 404),
            ] {
                let mut req = get_request(uri);
                *req.method_mut() = Method::from_bytes(method.as_bytes()).unwrap();
                ready::<_, Body>(&mut router);
                let response = block_on(router.call(req)).unwrap();
                assert_eq!(response.status().as_u16(), status, "{method} {uri}");
                let events = recorder::take();
                let id = started_id(&events);
                assert_eq!(
                    events,
                    [start(id, method, route, path), Event::End { id, status }],
                    "{method} {uri}"
                );
            }
        }

        #[test]
        fn layer_outside_the_router_sees_no_route() {
            recorder::take();
            let mut svc = LoopguardLayer::new()
                .layer(Router::new().route("/users/{id}", get(|| async { "hi" })));
            ready::<_, Body>(&mut svc);
            let response = block_on(svc.call(get_request("/users/1"))).unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let events = recorder::take();
            let id = started_id(&events);
            assert_eq!(
                events,
                [
                    start(id, "GET", None, "/users/1"),
                    Event::End { id, status: 200 }
                ]
            );
        }
    }
}
