//! Per-task capabilities for the FL endpoints. Each round Task is given its own coordinator, registry and
//! data-store URL, `{public}/fl/{namespace}/{job}/t/{task}/{token}`, with a fresh random token: the real
//! proplet uses the URL it is given, so nothing changes on its side. The coordinator accepts a request only
//! under a URL that some round Task holds, and only for that Task's participant and round: nobody else can
//! post an update (poison the model) or read another participant's data, and a new round means new tokens.
//!
//! The token lives only in the Task's spec (its env), where the proplet must read it; it is compared in
//! constant time and never logged, and nothing derived from it goes into status or Events.
use subtle::ConstantTimeEq;

/// Random bytes in a token (hex-encoded: twice as many characters).
const TOKEN_BYTES: usize = 16;

/// A fresh unguessable token.
pub fn new_token() -> Result<String, String> {
    let mut buf = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut buf).map_err(|e| format!("no randomness for a capability token: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The URL a round Task is given (coordinator, model registry and data store alike).
pub fn task_url(public: &str, namespace: &str, job: &str, task: &str, token: &str) -> String {
    format!(
        "{}/fl/{namespace}/{job}/t/{task}/{token}",
        public.trim_end_matches('/')
    )
}

/// Where a capability URL points: `(namespace, job, task, token)`.
#[derive(Debug, PartialEq, Eq)]
pub struct Capability<'a> {
    pub namespace: &'a str,
    pub job: &'a str,
    pub task: &'a str,
    pub token: &'a str,
}

/// The capability in a URL made by [`task_url`] (whatever its scheme and host), or `None`.
pub fn parse(url: &str) -> Option<Capability<'_>> {
    let path = &url[url.find("/fl/")? + "/fl/".len()..];
    let mut parts = path.trim_end_matches('/').split('/');
    let (namespace, job, t, task, token) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if t != "t" || parts.next().is_some() || [namespace, job, task, token].contains(&"") {
        return None;
    }
    Some(Capability {
        namespace,
        job,
        task,
        token,
    })
}

/// Whether `held` (from a Task) grants `presented` (from a request): same experiment, same Task, and the
/// same token (compared in constant time).
pub fn grants(held: &Capability<'_>, presented: &Capability<'_>) -> bool {
    held.namespace == presented.namespace
        && held.job == presented.job
        && held.task == presented.task
        && bool::from(held.token.as_bytes().ct_eq(presented.token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_long() {
        let (a, b) = (new_token().expect("token"), new_token().expect("token"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_capability_grants_its_own_task_only() {
        let url = task_url(
            "http://op:8082/",
            "ns",
            "exp",
            "exp-round-1-edge-1",
            "abc123",
        );
        assert_eq!(url, "http://op:8082/fl/ns/exp/t/exp-round-1-edge-1/abc123");
        let held = parse(&url).expect("capability");
        assert_eq!(held.token, "abc123");
        let same = parse("/fl/ns/exp/t/exp-round-1-edge-1/abc123").expect("path");
        assert!(grants(&held, &same));
        for other in [
            "/fl/ns/exp/t/exp-round-1-edge-1/abc124",
            "/fl/ns/exp/t/exp-round-1-edge-2/abc123",
            "/fl/ns/other/t/exp-round-1-edge-1/abc123",
            "/fl/ns2/exp/t/exp-round-1-edge-1/abc123",
            "/fl/ns/exp/t/exp-round-1-edge-1/abc12",
        ] {
            let p = parse(other).expect("path");
            assert!(!grants(&held, &p), "{other}");
        }
        for not_one in [
            "/fl/ns/exp",
            "/fl/ns/exp/update",
            "/fl/ns/exp/x/task/token",
            "/fl/ns/exp/t/task/token/extra",
            "/fl/ns/exp/t//token",
            "http://op/other/ns/exp/t/a/b",
        ] {
            assert_eq!(parse(not_one), None, "{not_one}");
        }
    }
}
