//! Blocking work with a deadline: a process stopped at exec waits while
//! loopguard inspects it, and must not wait for ever whatever the
//! inspection meets.

use std::time::Duration;

/// Runs `work` on the blocking pool; `None` when it has not finished
/// within `limit` (it then runs on, and its result is dropped) or panicked.
pub async fn blocking_within<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    tokio::time::timeout(limit, tokio::task::spawn_blocking(work))
        .await
        .ok()?
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_work_is_given_up_at_the_deadline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let slow = runtime.block_on(blocking_within(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(3));
            1
        }));
        assert_eq!(slow, None);
        assert!(started.elapsed() < Duration::from_secs(2));
        let quick = runtime.block_on(blocking_within(Duration::from_secs(5), || 2));
        assert_eq!(quick, Some(2));
        runtime.shutdown_timeout(Duration::from_millis(10));
    }
}
