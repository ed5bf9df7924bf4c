//! Topic layout: everything lives under `m/{domain}/c/{channel}/`.
use std::fmt;

/// The (domain, channel) pair that scopes a proplet's topics.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Channel {
    pub domain: String,
    pub channel: String,
}

impl Channel {
    pub fn new(domain: impl Into<String>, channel: impl Into<String>) -> Self {
        Channel {
            domain: domain.into(),
            channel: channel.into(),
        }
    }

    pub fn base(&self) -> String {
        format!("m/{}/c/{}", self.domain, self.channel)
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base())
    }

    pub fn start(&self) -> String {
        self.topic(START)
    }

    pub fn stop(&self) -> String {
        self.topic(STOP)
    }

    pub fn registry_server(&self) -> String {
        self.topic(REGISTRY_SERVER)
    }

    /// The filters the operator subscribes to for this channel.
    pub fn subscriptions(&self) -> Vec<String> {
        INBOUND.iter().map(|k| self.topic(k.suffix())).collect()
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base())
    }
}

pub const START: &str = "control/manager/start";
pub const STOP: &str = "control/manager/stop";
/// Where module chunks go, for every proplet on the channel.
pub const REGISTRY_SERVER: &str = "registry/server";

/// Messages proplets send to the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Inbound {
    Create,
    Alive,
    Metrics,
    Results,
    TaskMetrics,
    /// A proplet asks for a module by name.
    RegistryRequest,
}

pub const INBOUND: [Inbound; 6] = [
    Inbound::Create,
    Inbound::Alive,
    Inbound::Metrics,
    Inbound::Results,
    Inbound::TaskMetrics,
    Inbound::RegistryRequest,
];

impl Inbound {
    pub fn suffix(self) -> &'static str {
        match self {
            Inbound::Create => "control/proplet/create",
            Inbound::Alive => "control/proplet/alive",
            Inbound::Metrics => "control/proplet/metrics",
            Inbound::Results => "control/proplet/results",
            Inbound::TaskMetrics => "control/proplet/task_metrics",
            Inbound::RegistryRequest => "registry/proplet",
        }
    }

    /// Sent again every few seconds whatever happens (heartbeats, resource metrics): a lost one is
    /// replaced by the next, so the operator takes them at most once. The broker then keeps none for an
    /// operator that is away (its return is not a flood of stale heartbeats) and nothing is acknowledged:
    /// a real proplet publishes at QoS 2, which costs the operator an acknowledgement per heartbeat
    /// otherwise.
    pub fn periodic(self) -> bool {
        matches!(self, Inbound::Alive | Inbound::Metrics)
    }

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Inbound::Create => "create",
            Inbound::Alive => "alive",
            Inbound::Metrics => "metrics",
            Inbound::Results => "results",
            Inbound::TaskMetrics => "task_metrics",
            Inbound::RegistryRequest => "registry",
        }
    }
}

/// Splits `m/{domain}/c/{channel}/{suffix}` into the channel and the message kind.
pub fn parse(topic: &str) -> Option<(Channel, Inbound)> {
    let (domain, channel, kind) = split(topic)?;
    Some((Channel::new(domain, channel), kind))
}

/// The kind of message a topic carries, read without copying its channel: a shard asks this of every
/// message it hears, most of them another shard's.
pub fn kind_of(topic: &str) -> Option<Inbound> {
    split(topic).map(|(_, _, kind)| kind)
}

fn split(topic: &str) -> Option<(&str, &str, Inbound)> {
    let rest = topic.strip_prefix("m/")?;
    let (domain, rest) = rest.split_once("/c/")?;
    let (channel, suffix) = rest.split_once('/')?;
    if domain.is_empty() || channel.is_empty() || domain.contains('/') {
        return None;
    }
    let kind = INBOUND.into_iter().find(|k| k.suffix() == suffix)?;
    Some((domain, channel, kind))
}

/// Whether a subscription filter (a channel's topic, or a pattern with `+` for the domain and channel)
/// names periodic messages (see [`Inbound::periodic`]).
pub fn periodic_filter(filter: &str) -> bool {
    kind_of(filter).is_some_and(Inbound::periodic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proplet_topics() {
        let (ch, kind) = parse("m/dom-1/c/chan-1/control/proplet/alive").expect("parses");
        assert_eq!(ch, Channel::new("dom-1", "chan-1"));
        assert_eq!(kind, Inbound::Alive);
        assert_eq!(ch.start(), "m/dom-1/c/chan-1/control/manager/start");
    }

    #[test]
    fn kind_of_agrees_with_parse() {
        for topic in [
            "m/dom-1/c/chan-1/control/proplet/alive",
            "m/dom-1/c/chan-1/control/proplet/metrics",
            "m/dom-1/c/chan-1/registry/proplet",
            "m/dom-1/c/chan-1/control/manager/start",
            "m/dom/1/c/chan-1/control/proplet/alive",
            "m//c/chan-1/control/proplet/alive",
            "fl/rounds/r1/updates/p1",
        ] {
            assert_eq!(kind_of(topic), parse(topic).map(|(_, k)| k), "{topic}");
        }
    }

    #[test]
    fn only_heartbeats_and_metrics_are_periodic() {
        let ch = Channel::new("d", "c");
        let periodic: Vec<Inbound> = INBOUND
            .into_iter()
            .filter(|k| periodic_filter(&ch.topic(k.suffix())))
            .collect();
        assert_eq!(periodic, [Inbound::Alive, Inbound::Metrics]);
        assert!(periodic_filter("m/+/c/+/control/proplet/alive"));
        assert!(!periodic_filter("m/+/c/+/control/proplet/results"));
        assert!(!periodic_filter("fl/rounds/+/updates/+"));
    }

    #[test]
    fn rejects_foreign_topics() {
        assert!(parse("fl/rounds/r1/updates/p1").is_none());
        assert!(parse("m/d/c/ch/control/manager/start").is_none());
        assert!(parse("m//c/ch/control/proplet/alive").is_none());
        assert!(parse("m/d/x/c/ch/control/proplet/alive").is_none());
    }
}
