//! What the operator subscribes to: the inbound topics of every channel it serves (the channels of the
//! Proplets it owns, and the default channel), plus fixed topics outside any channel (the FL update
//! fallback). Topics name a (domain, channel), never a proplet: an operator that serves one proplet of a
//! channel hears every proplet of that channel.
use std::collections::BTreeSet;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::MqttClient;
use super::topics::Channel;

/// The subscription set for `channels`.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Always subscribed (`--domain-id`/`--channel-id`).
    pub default_channel: Option<Channel>,
    /// Topics outside any channel.
    pub fixed: Vec<String>,
}

impl Policy {
    pub fn wanted<'a>(
        &'a self,
        channels: impl IntoIterator<Item = &'a Channel>,
    ) -> BTreeSet<String> {
        let mut wanted: BTreeSet<String> = channels
            .into_iter()
            .chain(self.default_channel.as_ref())
            .flat_map(Channel::subscriptions)
            .collect();
        wanted.extend(self.fixed.iter().cloned());
        wanted
    }
}

/// Keeps `mqtt`'s subscriptions equal to the policy over `channels()`, recomputed after each
/// [`Notify::notify_one`] on `changed` (a burst of changes costs one recomputation) until `shutdown`. Once
/// the first set is subscribed, `marker` (a topic among the fixed ones, and a payload) is published: see
/// [`super::backlog`]; after every change, `probe(generation)` is published, so that the change can be
/// known to have reached the broker.
pub fn follow(
    mqtt: MqttClient,
    policy: Policy,
    channels: impl Fn() -> BTreeSet<Channel> + Send + 'static,
    changed: Arc<Notify>,
    mut marker: Option<(String, Vec<u8>)>,
    probe: impl Fn(u64) -> Option<(String, Vec<u8>)> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let mut probed = 0;
        loop {
            mqtt.set_subscriptions(policy.wanted(&channels())).await;
            if let Some((topic, payload)) = marker.take()
                && let Err(e) = mqtt.publish(&topic, payload).await
            {
                tracing::warn!(error = %e, "the session marker was not sent; waiting out the fallback");
            }
            let generation = mqtt.generation();
            if generation != probed
                && let Some((topic, payload)) = probe(generation)
            {
                probed = generation;
                if let Err(e) = mqtt.publish(&topic, payload).await {
                    tracing::warn!(error = %e, "subscription probe not sent");
                }
            }
            tokio::select! {
                _ = changed.notified() => {}
                _ = &mut shutdown => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_once_plus_the_default_and_fixed_topics() {
        let policy = Policy {
            default_channel: Some(Channel::new("d", "c0")),
            fixed: vec!["fl/rounds/+/updates/+".into()],
        };
        let a = Channel::new("d", "c1");
        let wanted = policy.wanted([&a, &a]);
        let per_channel = a.subscriptions().len();
        assert_eq!(wanted.len(), 2 * per_channel + 1);
        assert!(wanted.contains("fl/rounds/+/updates/+"));
        assert!(a.subscriptions().iter().all(|t| wanted.contains(t)));
        assert_eq!(Policy::default().wanted([]).len(), 0);
    }
}
