//! Polling until the cluster (or a broker) shows what a test expects.
//!
//! Tests never assert timings; they wait for a state with a generous bound and fail
//! with what they last saw.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::bail;

/// Polls `check` every 100 ms until it returns `Ok(Some(value))`. An `Err` from
/// `check` is remembered and retried (servers answer errors while they settle); at
/// the deadline the last error or "still waiting" is returned with `what`.
pub async fn until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last_error = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if tokio::time::Instant::now() >= deadline {
            match last_error {
                Some(e) => return Err(e.context(format!("{what}: not after {timeout:?}"))),
                None => bail!("{what}: not after {timeout:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `read` until it returns `expected`; fails showing the last value read.
pub async fn until_eq<T, F, Fut>(
    timeout: Duration,
    what: &str,
    expected: T,
    mut read: F,
) -> anyhow::Result<()>
where
    T: PartialEq + Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = read().await;
        if matches!(&last, Ok(v) if *v == expected) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: expected {expected:?} within {timeout:?}, last saw {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `url` answers 2xx (a process's `/readyz`).
pub async fn until_ok(timeout: Duration, what: &str, url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    until(timeout, what, || async {
        let ready = http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        Ok(ready.then_some(()))
    })
    .await
}
