//! A small axum app for loopguard's CI guard: `GET /work` answers at once,
//! unless `GUARDED_APP_BLOCK_MS` is set, in which case the handler blocks
//! its worker thread that long first (the bug the guard must catch).

use std::time::Duration;

use axum::Router;
use axum::routing::get;

/// The environment variable that makes `/work` block its worker (ms).
pub const BLOCK_ENV: &str = "GUARDED_APP_BLOCK_MS";

async fn work() -> &'static str {
    if let Some(ms) = std::env::var(BLOCK_ENV)
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        // On purpose: blocking code on the runtime.
        std::thread::sleep(Duration::from_millis(ms));
    }
    "done"
}

/// The app's routes.
pub fn app() -> Router {
    Router::new().route("/work", get(work))
}
