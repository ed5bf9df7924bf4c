//! When the messages the broker queued for this operator's session while it was away (a restart, a rollout)
//! have all been handled. Only then may the operator conclude that a running task's result did not come and
//! send its start again. MQTT has no end-of-queue signal, so the operator publishes a marker to a topic of
//! its own right after subscribing: the broker delivers a session's messages in order, so the marker comes
//! back after everything queued before it. A broker that refuses the marker topic (an ACL) leaves the
//! operator waiting [`Backlog::FALLBACK`] instead.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::topics::Channel;

pub struct Backlog {
    topic: Option<String>,
    nonce: String,
    drained: AtomicBool,
    since: Instant,
    /// The newest subscription generation a probe came back for.
    confirmed: AtomicU64,
}

impl Backlog {
    /// Past this, the backlog counts as drained even without the marker.
    pub const FALLBACK: Duration = Duration::from_secs(10);

    /// The marker goes to `{channel}/control/manager/sync/{client_id}` (a channel the operator may use;
    /// proplets do not listen there). Without a channel only the fallback applies.
    pub fn new(channel: Option<&Channel>, client_id: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Backlog {
            topic: channel.map(|c| c.topic(&format!("control/manager/sync/{client_id}"))),
            nonce: format!("{}-{nanos}", std::process::id()),
            drained: AtomicBool::new(false),
            since: Instant::now(),
            confirmed: AtomicU64::new(0),
        }
    }

    /// The topic to subscribe to, and the marker to publish on it once subscribed.
    pub fn marker(&self) -> Option<(String, Vec<u8>)> {
        Some((self.topic.clone()?, self.nonce.clone().into_bytes()))
    }

    /// A probe for subscription generation `generation`, published right after subscribing: when it comes
    /// back, the broker has processed every subscription of that generation.
    pub fn probe(&self, generation: u64) -> Option<(String, Vec<u8>)> {
        Some((
            self.topic.clone()?,
            format!("{}/probe/{generation}", self.nonce).into_bytes(),
        ))
    }

    /// Whether a received message is this operator's marker or probe; the backlog is drained when the
    /// marker comes back.
    pub fn receive(&self, topic: &str, payload: &[u8]) -> bool {
        if self.topic.as_deref() != Some(topic) {
            return false;
        }
        if payload == self.nonce.as_bytes() {
            self.drained.store(true, Ordering::SeqCst);
        } else if let Some(g) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.strip_prefix(self.nonce.as_str()))
            .and_then(|rest| rest.strip_prefix("/probe/"))
            .and_then(|g| g.parse::<u64>().ok())
        {
            self.confirmed.fetch_max(g, Ordering::SeqCst);
        }
        true
    }

    /// Whether the broker is known to have the subscriptions of `generation` (always, when the operator
    /// has no marker topic to probe with: it can only trust its own order of packets).
    pub fn confirmed(&self, generation: u64) -> bool {
        self.topic.is_none() || self.confirmed.load(Ordering::SeqCst) >= generation
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst) || self.since.elapsed() >= Self::FALLBACK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_marker_drains_it() {
        let b = Backlog::new(Some(&Channel::new("d", "c")), "op-0");
        let (topic, marker) = b.marker().expect("a marker");
        assert_eq!(topic, "m/d/c/c/control/manager/sync/op-0");
        assert!(!b.drained());
        assert!(b.receive(&topic, b"an earlier run's marker"));
        assert!(!b.drained(), "a stale marker proves nothing");
        assert!(!b.receive("m/d/c/control/proplet/results", &marker));
        assert!(b.receive(&topic, &marker));
        assert!(b.drained());
        assert!(Backlog::new(None, "x").marker().is_none());
    }

    #[test]
    fn a_probe_confirms_its_generation_and_those_before() {
        let b = Backlog::new(Some(&Channel::new("d", "c")), "op-0");
        let (topic, probe) = b.probe(3).expect("a probe");
        assert!(!b.confirmed(1));
        assert!(b.receive(&topic, &probe));
        assert!(b.confirmed(3) && b.confirmed(2) && !b.confirmed(4));
        assert!(!b.drained(), "a probe is not the marker");
        let other = Backlog::new(Some(&Channel::new("d", "c")), "op-0");
        let (_, foreign) = other.probe(9).expect("a probe");
        assert!(b.receive(&topic, &foreign));
        assert!(!b.confirmed(4), "another run's probe proves nothing");
        assert!(Backlog::new(None, "x").confirmed(7));
    }
}
