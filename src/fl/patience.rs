//! FL requests wait out an API server that does not answer (a restart takes seconds) instead of failing:
//! neither the real proplet nor the example client retries, and a participant's failed request costs its
//! round. Bounded, so a request still ends (503) when the API server stays away.
use std::future::Future;
use std::time::{Duration, Instant};

/// How long one FL request waits for the API server at most.
pub const API_PATIENCE: Duration = Duration::from_secs(30);

/// Whether `e` says the API server is away or overloaded (worth waiting for), not that the answer is no.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(ae) => ae.code >= 500 || ae.code == 429,
        _ => true,
    }
}

/// Calls `call` again while it fails with an error `is_transient` accepts, for up to [`API_PATIENCE`].
pub async fn patiently<T, E, F, Fut>(is_transient: impl Fn(&E) -> bool, mut call: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + API_PATIENCE;
    let mut pause = Duration::from_millis(200);
    loop {
        match call().await {
            Err(e) if is_transient(&e) && Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_out_transient_errors_and_returns_the_rest_at_once() {
        let mut calls = 0;
        let got: Result<u8, &str> = patiently(
            |e: &&str| *e == "away",
            || {
                calls += 1;
                let answer = if calls < 4 { Err("away") } else { Ok(7) };
                async move { answer }
            },
        )
        .await;
        assert_eq!((got, calls), (Ok(7), 4));
        let mut calls = 0;
        let got: Result<u8, &str> = patiently(
            |e: &&str| *e == "away",
            || {
                calls += 1;
                async { Err("no") }
            },
        )
        .await;
        assert_eq!((got, calls), (Err("no"), 1));
    }
}
