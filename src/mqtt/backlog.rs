//! When the messages the broker queued for this operator's session while it was away (a restart, a rollout)
//! have all been handled. Only then may the operator conclude that a running task's result did not come and
//! send its start again. MQTT has no end-of-queue signal, so the operator publishes a marker to a topic of
//! its own right after subscribing: the broker delivers a session's messages in order, so the marker comes
//! back after everything queued before it. A broker that refuses the marker topic (an ACL) leaves the
//! operator waiting [`Backlog::FALLBACK`] instead.
//!
//! A reconnect (the broker restarted, or this operator was cut from it) starts the same over: a marker per
//! connection. It also leaves every proplet suspect: with its clean session, a proplet that was disconnected
//! too lost what was published to it meanwhile. A proplet is *back* once a message of its own arrived after
//! that connection's marker (so it was published after the broker was up again) and a moment has passed
//! for its resubscription, which may trail its first publish.
//!
//! A connection can also die silently (a network partition): nothing arrives, and the client notices only
//! at its keepalive. An echo published to the same topic every [`Backlog::ECHO_EVERY`] tells: while our own
//! echo does not come back, silence from proplets says nothing about them.
use std::collections::HashMap;
use std::sync::Mutex;
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
    /// The latest reconnect (none before the first).
    reconnect: Mutex<Option<Reconnect>>,
    /// When our own echo last came back (the start, before the first).
    echoed: Mutex<Instant>,
}

struct Reconnect {
    /// The connection count ([`super::MqttClient::connects`]) it began.
    connection: u64,
    at: Instant,
    marker_back: bool,
    /// Proplets heard since the marker came back, and when first.
    heard: HashMap<String, Instant>,
}

impl Reconnect {
    fn drained(&self) -> bool {
        self.marker_back || self.at.elapsed() >= Backlog::FALLBACK
    }
}

impl Backlog {
    /// Past this, the backlog counts as drained even without the marker.
    pub const FALLBACK: Duration = Duration::from_secs(10);
    /// After a proplet's first message following a reconnect, the time its resubscription is given.
    pub const RESUBSCRIBE_MARGIN: Duration = Duration::from_secs(1);
    /// How often the echo goes out.
    pub const ECHO_EVERY: Duration = Duration::from_secs(2);
    /// Past this without an echo back, the connection is not known to work.
    pub const ECHO_LATE: Duration = Duration::from_secs(7);

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
            reconnect: Mutex::new(None),
            echoed: Mutex::new(Instant::now()),
        }
    }

    /// The echo to publish every [`Backlog::ECHO_EVERY`] (none without a marker topic).
    pub fn echo(&self) -> Option<(String, Vec<u8>)> {
        Some((
            self.topic.clone()?,
            format!("{}/echo", self.nonce).into_bytes(),
        ))
    }

    /// Whether what the broker sends reaches us: our echo came back lately (always, without a marker topic).
    pub fn hears_itself(&self) -> bool {
        self.topic.is_none()
            || self
                .echoed
                .lock()
                .is_ok_and(|at| at.elapsed() < Self::ECHO_LATE)
    }

    /// Connection number `connection` (> 1) is up: the backlog is undrained again until this connection's
    /// marker, returned here, comes back; every proplet is suspect until heard again.
    pub fn reconnected(&self, connection: u64) -> Option<(String, Vec<u8>)> {
        if let Ok(mut r) = self.reconnect.lock() {
            *r = Some(Reconnect {
                connection,
                at: Instant::now(),
                marker_back: false,
                heard: HashMap::new(),
            });
        }
        Some((
            self.topic.clone()?,
            format!("{}/connect/{connection}", self.nonce).into_bytes(),
        ))
    }

    /// A message of proplet `client_id` arrived.
    pub fn heard(&self, client_id: &str) {
        if let Ok(mut r) = self.reconnect.lock()
            && let Some(r) = r.as_mut()
            && r.drained()
            && !r.heard.contains_key(client_id)
        {
            r.heard.insert(client_id.to_string(), Instant::now());
        }
    }

    /// Whether what is published to `client_id` now reaches it, as far as this operator can know: no
    /// reconnect happened, or the proplet has been heard since (and its resubscription had its moment).
    pub fn back(&self, client_id: &str) -> bool {
        self.reconnect.lock().is_ok_and(|r| {
            r.as_ref().is_none_or(|r| {
                r.heard
                    .get(client_id)
                    .is_some_and(|t| t.elapsed() >= Self::RESUBSCRIBE_MARGIN)
            })
        })
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
        let rest = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.strip_prefix(self.nonce.as_str()));
        if payload == self.nonce.as_bytes() {
            self.drained.store(true, Ordering::SeqCst);
        } else if rest == Some("/echo") {
            if let Ok(mut at) = self.echoed.lock() {
                *at = Instant::now();
            }
        } else if let Some(n) = rest
            .and_then(|rest| rest.strip_prefix("/connect/"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            if let Ok(mut r) = self.reconnect.lock()
                && let Some(r) = r.as_mut()
                && r.connection == n
            {
                r.marker_back = true;
            }
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
        let first = self.drained.load(Ordering::SeqCst) || self.since.elapsed() >= Self::FALLBACK;
        first
            && self
                .reconnect
                .lock()
                .is_ok_and(|r| r.as_ref().is_none_or(Reconnect::drained))
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
    fn a_reconnect_undrains_it_and_makes_every_proplet_suspect_until_heard() {
        let b = Backlog::new(Some(&Channel::new("d", "c")), "op-0");
        let (topic, marker) = b.marker().expect("a marker");
        b.receive(&topic, &marker);
        assert!(b.drained() && b.back("p1"), "no reconnect: nothing suspect");
        let (_, second) = b.reconnected(2).expect("a marker per connection");
        assert_ne!(second, marker);
        assert!(
            !b.drained(),
            "what was queued during the outage is not handled yet"
        );
        b.heard("p1");
        assert!(
            !b.back("p1"),
            "heard before the marker: maybe queued from before the outage"
        );
        let (_, stale) = b.reconnected(3).expect("marker");
        b.receive(&topic, &second);
        assert!(
            !b.drained(),
            "the marker of an earlier connection proves nothing"
        );
        b.receive(&topic, &stale);
        assert!(b.drained());
        b.heard("p1");
        assert!(!b.back("p1"), "its resubscription gets a moment");
        assert!(!b.back("p2"), "not heard since");
        let mut r = b.reconnect.lock().expect("lock");
        let at = r
            .as_mut()
            .and_then(|r| r.heard.get_mut("p1"))
            .expect("heard");
        *at -= Backlog::RESUBSCRIBE_MARGIN;
        drop(r);
        assert!(b.back("p1"));
    }

    #[test]
    fn only_our_own_echo_says_the_connection_works() {
        let b = Backlog::new(Some(&Channel::new("d", "c")), "op-0");
        assert!(b.hears_itself(), "given the time for a first echo");
        *b.echoed.lock().expect("lock") -= Backlog::ECHO_LATE;
        assert!(!b.hears_itself());
        let (topic, echo) = b.echo().expect("an echo");
        let other = Backlog::new(Some(&Channel::new("d", "c")), "op-0");
        let (_, foreign) = other.echo().expect("an echo");
        assert!(b.receive(&topic, &foreign));
        assert!(!b.hears_itself(), "another run's echo proves nothing");
        assert!(b.receive(&topic, &echo));
        assert!(b.hears_itself());
        assert!(Backlog::new(None, "x").hears_itself());
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
