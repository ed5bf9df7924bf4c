//! Proplet auto-discovery (`--auto-discover-proplets`): an unknown proplet announcing itself on
//! `control/proplet/create` gets an external Proplet in the discovery namespace, with the domain and
//! channel of the topic it spoke on, its clientId, a reference to the configured Secret for its key (never
//! the key), and the label [`DISCOVERED_LABEL`]. Its discovery metadata reaches the status through the
//! liveness tracker, as for any Proplet.
//!
//! A flood of fake ids costs bounded work: announcements wait in a bounded queue (overflow is dropped and
//! counted), Proplets are created at most `--discovery-rate` per second, and no more than
//! `--discovery-max-proplets` discovered Proplets may exist (past it: a metric, a log line and, at most
//! once a minute, an Event on the discovery namespace).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::Proplet;
use crate::context::Context;
use crate::mqtt::topics::Channel;
use crate::telemetry::Metrics;

pub const DISCOVERED_LABEL: &str = "propeller.propeller.abstractmachines.fr/discovered";
const QUEUE: usize = 1024;
/// Created Proplets not yet back from the watch still count toward the bound for this long.
const IN_FLIGHT: Duration = Duration::from_secs(30);
const LIMIT_EVENT_EVERY: Duration = Duration::from_secs(60);

/// Whether the operator created `p` for a proplet that announced itself.
pub fn is_discovered(p: &Proplet) -> bool {
    p.labels()
        .get(DISCOVERED_LABEL)
        .is_some_and(|v| v == "true")
}

/// An unknown proplet that announced itself.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub channel: Channel,
    pub client_id: String,
}

/// The router's handle on the discovery worker.
#[derive(Clone)]
pub struct DiscoveryQueue {
    tx: mpsc::Sender<Announcement>,
    metrics: Arc<Metrics>,
}

impl DiscoveryQueue {
    pub fn offer(&self, a: Announcement) {
        if self.tx.try_send(a).is_err() {
            count(&self.metrics, "dropped");
            warn!("discovery queue full: announcement dropped");
        }
    }
}

fn count(metrics: &Metrics, outcome: &str) {
    metrics.discovery_total.with_label_values(&[outcome]).inc();
}

/// The Proplet created for a discovered proplet (pure: unit-tested).
pub fn proplet_for(
    a: &Announcement,
    namespace: &str,
    mqtt_address: &str,
    secret: &str,
    secret_key: &str,
) -> serde_json::Result<Proplet> {
    let name = crate::naming::bounded_name(&format!("discovered-{}", a.client_id), "", 63);
    serde_json::from_value(json!({
        "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Proplet",
        "metadata": {"name": name, "namespace": namespace, "labels": {DISCOVERED_LABEL: "true"}},
        "spec": {
            "type": "external",
            "external": {"deviceType": "external"},
            "connectionConfig": {
                "domainId": a.channel.domain, "channelId": a.channel.channel, "clientId": a.client_id,
                "clientKeySecretRef": {"name": secret, "key": secret_key.replace("{clientId}", &a.client_id)},
                "mqttAddress": mqtt_address,
            },
        },
    }))
}

/// Starts the worker.
pub fn spawn(
    ctx: Arc<Context>,
    namespace: String,
) -> (DiscoveryQueue, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Announcement>(QUEUE);
    let metrics = Arc::clone(&ctx.metrics);
    let handle = tokio::spawn(async move {
        let mut pace =
            tokio::time::interval(Duration::from_secs(1) / ctx.config.discovery_rate.max(1));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut created: HashMap<String, Instant> = HashMap::new();
        let mut last_limit_event: Option<Instant> = None;
        while let Some(a) = rx.recv().await {
            created.retain(|_, at| at.elapsed() < IN_FLIGHT);
            if ctx.proplet_index.by_client(&a.client_id).is_some()
                || created.contains_key(&a.client_id)
            {
                count(&ctx.metrics, "exists");
                continue;
            }
            let existing = ctx
                .proplets
                .state()
                .iter()
                .filter(|p| is_discovered(p))
                .filter(|p| !created.contains_key(&p.client_id()))
                .count();
            if existing + created.len() >= ctx.config.discovery_max_proplets {
                count(&ctx.metrics, "limit");
                warn!(client_id = %a.client_id, limit = ctx.config.discovery_max_proplets,
                      "discovered-Proplet limit reached: announcement refused");
                if last_limit_event.is_none_or(|t| t.elapsed() >= LIMIT_EVENT_EVERY) {
                    last_limit_event = Some(Instant::now());
                    limit_event(&ctx, &namespace).await;
                }
                continue;
            }
            pace.tick().await;
            if create(&ctx, &namespace, &a).await {
                created.insert(a.client_id.clone(), Instant::now());
            }
        }
    });
    (DiscoveryQueue { tx, metrics }, handle)
}

/// Creates the Proplet; true when it now exists.
async fn create(ctx: &Context, namespace: &str, a: &Announcement) -> bool {
    let proplet = match proplet_for(
        a,
        namespace,
        &ctx.config.mqtt_address,
        &ctx.config.discovery_secret,
        &ctx.config.discovery_secret_key,
    ) {
        Ok(p) => p,
        Err(e) => {
            count(&ctx.metrics, "error");
            warn!(client_id = %a.client_id, error = %e, "cannot build a Proplet for a discovered proplet");
            return false;
        }
    };
    let api: Api<Proplet> = Api::namespaced(ctx.client.clone(), namespace);
    match api.create(&PostParams::default(), &proplet).await {
        Ok(p) => {
            count(&ctx.metrics, "created");
            ctx.metrics.api_write("proplets", "create");
            info!(proplet = %p.name_any(), client_id = %a.client_id, channel = %a.channel,
                  "Proplet created for a discovered proplet");
            true
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            count(&ctx.metrics, "exists");
            true
        }
        Err(e) => {
            count(&ctx.metrics, "error");
            warn!(client_id = %a.client_id, error = %e, "creating a discovered Proplet failed");
            false
        }
    }
}

async fn limit_event(ctx: &Context, namespace: &str) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Namespace".into()),
        name: Some(namespace.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "DiscoveryLimitReached".into(),
        note: Some(format!(
            "{} discovered Proplets exist (--discovery-max-proplets): announcements of further unknown \
             proplets are refused until some are deleted",
            ctx.config.discovery_max_proplets
        )),
        action: "Discover".into(),
        secondary: None,
    };
    match ctx.recorder.publish(&ev, &reference).await {
        Ok(()) => ctx.metrics.api_write("events", "create"),
        Err(e) => warn!(error = %e, "could not publish the discovery-limit Event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discovered_proplet_references_its_key_and_keeps_its_channel() {
        let a = Announcement {
            channel: Channel::new("dom-9", "chan-9"),
            client_id: "C0FFEE_01".into(),
        };
        let p = proplet_for(&a, "edge", "tcp://mqtt:1883", "keys", "{clientId}").expect("proplet");
        assert_eq!(p.name_any(), format!("{}", p.name_any().to_lowercase()));
        assert!(
            p.name_any().starts_with("discovered-c0ffee-01"),
            "{}",
            p.name_any()
        );
        let v = serde_json::to_value(&p).expect("json");
        let cc = &v["spec"]["connectionConfig"];
        assert_eq!(
            (cc["domainId"].as_str(), cc["channelId"].as_str()),
            (Some("dom-9"), Some("chan-9"))
        );
        assert_eq!(cc["clientId"], "C0FFEE_01");
        assert_eq!(cc["clientKeySecretRef"]["key"], "C0FFEE_01");
        assert!(cc.get("clientKey").is_none(), "no key in clear");
        assert_eq!(v["metadata"]["labels"][DISCOVERED_LABEL], "true");
    }
}
