//! Routes what proplets publish: heartbeats and discovery to the liveness tracker, results to the Task
//! controller. Malformed payloads and unknown senders are counted, logged with their topic, and dropped.
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::api::common::ResourceMetrics;
use crate::api::proplet::{Proplet, PropletMetadata};
use crate::api::task::Task;
use crate::context::Context;
use crate::controllers::runtime::Waker;
use crate::liveness::Change;
use crate::mqtt::client::Message;
use crate::mqtt::topics::{self, Channel, Inbound};
use crate::mqtt::wire::{self, DiscoveryMetadata};
use crate::sharding::Ownership;

pub struct Triggers {
    pub proplets: Waker<Proplet>,
    pub tasks: Waker<Task>,
    pub registry: crate::registry::RegistryQueue,
    /// Set with --auto-discover-proplets.
    pub discovery: Option<crate::discovery::DiscoveryQueue>,
}

pub async fn run(mut rx: mpsc::Receiver<Message>, ctx: Arc<Context>, triggers: Triggers) {
    // What the broker queued while we were away comes first: judge it against complete caches, or a
    // result would look like one for an unknown task. (Messages wait in the bounded channel meanwhile.)
    ctx.caches_ready.wait().await;
    debug!("watch caches ready: routing MQTT messages");
    // Only now: before the caches are complete, a proplet of ours would look like another shard's.
    if ctx.ownership.is_sharded()
        && let Some(mqtt) = &ctx.mqtt
    {
        mqtt.set_intake_filter(not_owned_filter(&ctx));
    }
    while let Some(msg) = rx.recv().await {
        if ctx.backlog.receive(&msg.topic, &msg.payload) {
            debug!(drained = ctx.backlog.drained(), "session marker received");
            continue;
        }
        if crate::fl::parse_update_topic(&msg.topic).is_some() {
            // Stored through the API server: off the router's path.
            tokio::spawn(fl_update(Arc::clone(&ctx), msg));
            continue;
        }
        handle(&msg, &ctx, &triggers);
    }
}

/// A client update on the fallback topic `fl/rounds/{round_id}/updates/{proplet_id}`.
async fn fl_update(ctx: Arc<Context>, msg: Message) {
    use tracing::Instrument as _;
    let span = tracing::info_span!("mqtt", topic = %msg.topic);
    fl_update_inner(ctx, msg).instrument(span).await
}

async fn fl_update_inner(ctx: Arc<Context>, msg: Message) {
    use crate::fl::{intake, store::Via, update::Update};
    let Some((round_id, proplet_id)) = crate::fl::parse_update_topic(&msg.topic) else {
        return;
    };
    if msg.payload.len() > ctx.config.fl_max_update_bytes {
        ctx.metrics.mqtt_message("fl_update", "too_large");
        ctx.metrics.fl_update("mqtt", "too_large");
        warn!(topic = %msg.topic, bytes = msg.payload.len(), "FL update over --fl-max-update-bytes dropped");
        return;
    }
    let update = match Update::parse(&msg.payload) {
        Ok(u) if u.round_id == round_id && u.proplet_id == proplet_id => u,
        Ok(u) => {
            ctx.metrics.mqtt_message("fl_update", "malformed");
            ctx.metrics.fl_update("mqtt", "malformed");
            warn!(topic = %msg.topic, payload_round = %u.round_id, payload_proplet = %u.proplet_id,
                  "FL update whose round or proplet differs from its topic dropped");
            return;
        }
        Err(e) => {
            ctx.metrics.mqtt_message("fl_update", "malformed");
            ctx.metrics.fl_update("mqtt", "malformed");
            warn!(topic = %msg.topic, error = %e, "malformed FL update dropped");
            return;
        }
    };
    let outcome = match intake::receive(&ctx, intake::Target::Anywhere, &update, Via::Mqtt).await {
        Ok(_) => "ok",
        Err(r) => r.outcome,
    };
    ctx.metrics.mqtt_message("fl_update", outcome);
}

fn malformed(ctx: &Context, kind: Inbound, topic: &str, err: &wire::DecodeError, len: usize) {
    ctx.metrics.mqtt_message(kind.as_str(), "malformed");
    warn!(%topic, bytes = len, error = %err, "dropping a malformed MQTT payload");
}

/// The Proplet a message is from, if it is registered on the channel the message came on.
fn proplet_for(ctx: &Context, channel: &Channel, client_id: &str) -> Option<ObjectRef<Proplet>> {
    let r = ctx.proplet_index.by_client(client_id)?;
    let p = ctx.proplets.get(&r)?;
    let cc = &p.spec.connection_config;
    (cc.domain() == Some(channel.domain.as_str()) && cc.channel_id == channel.channel).then_some(r)
}

/// A heartbeat or metrics message from a proplet this shard does not hold: its kind.
fn not_owned(ownership: &Ownership, topic: &str, payload: &[u8]) -> Option<Inbound> {
    let kind @ (Inbound::Alive | Inbound::Metrics) = topics::kind_of(topic)? else {
        return None;
    };
    let id = wire::peek_proplet_id(payload)?;
    (!id.is_empty() && !ownership.holds_client(id)).then_some(kind)
}

/// Drops another shard's heartbeats and metrics in the MQTT connection's task, before they are queued for
/// the router: counted, never decoded or traced.
fn not_owned_filter(ctx: &Context) -> crate::mqtt::client::IntakeFilter {
    let ownership = ctx.ownership.clone();
    let counted = |kind: Inbound| {
        ctx.metrics
            .mqtt_messages_total
            .with_label_values(&[kind.as_str(), "not_owned"])
    };
    let (alive, metrics) = (counted(Inbound::Alive), counted(Inbound::Metrics));
    Arc::new(
        move |topic, payload| match not_owned(&ownership, topic, payload) {
            None => true,
            Some(Inbound::Alive) => {
                alive.inc();
                false
            }
            Some(_) => {
                metrics.inc();
                false
            }
        },
    )
}

pub fn handle(msg: &Message, ctx: &Context, triggers: &Triggers) {
    // A shard hears every proplet of the channels it listens to: another shard's heartbeats and metrics
    // are dropped before any decoding or tracing (here only those received before the intake filter is set).
    if ctx.ownership.is_sharded()
        && let Some(kind) = not_owned(&ctx.ownership, &msg.topic, &msg.payload)
    {
        ctx.metrics.mqtt_message(kind.as_str(), "not_owned");
        return;
    }
    let parsed = topics::parse(&msg.topic);
    // One span per message: its log lines carry the topic and, once decoded, the proplet or task id.
    let span = tracing::info_span!(
        "mqtt",
        topic = %msg.topic,
        proplet = tracing::field::Empty,
        task = tracing::field::Empty
    );
    let _entered = span.enter();
    let Some((channel, kind)) = parsed else {
        ctx.metrics.mqtt_message("other", "unexpected_topic");
        debug!(topic = %msg.topic, "message on a topic the operator does not handle");
        return;
    };
    let (threshold, refresh) = (
        ctx.config.last_seen_threshold.0,
        ctx.config.status_refresh.0,
    );
    let payload = &msg.payload[..];
    match kind {
        Inbound::Alive => match wire::decode_alive(payload) {
            Err(e) => malformed(ctx, kind, &msg.topic, &e, payload.len()),
            Ok(m) => with_proplet(ctx, kind, &channel, &m.proplet_id, |r| {
                ctx.backlog.heard(&m.proplet_id);
                if ctx
                    .liveness
                    .heartbeat(&m.proplet_id, m.is_offline(), threshold, refresh)
                    == Change::Transition
                {
                    triggers.proplets.wake(r);
                }
            }),
        },
        Inbound::Create => match wire::decode_discovery(payload) {
            Err(e) => malformed(ctx, kind, &msg.topic, &e, payload.len()),
            Ok(m) => {
                let md = metadata(m.metadata.unwrap_or_default(), m.namespace);
                // Discovery is sent once, at proplet start-up, often before its Proplet is created:
                // keep it (bounded) so the Proplet shows it whenever it appears.
                // (Only for unknown proplets: for a known one, `discovery` below must see the change.)
                // (A shard knows only its own proplets: unknown ones are the leader's.)
                if (ctx.ownership.holds_client(&m.proplet_id) || ctx.ownership.is_leader())
                    && proplet_for(ctx, &channel, &m.proplet_id).is_none()
                {
                    ctx.liveness.remember_discovery(&m.proplet_id, md.clone());
                    // Unknown anywhere (not merely on another channel): a candidate for discovery.
                    if let Some(d) = &triggers.discovery
                        && ctx.ownership.is_leader()
                        && ctx.proplet_index.by_client(&m.proplet_id).is_none()
                    {
                        d.offer(crate::discovery::Announcement {
                            channel: channel.clone(),
                            client_id: m.proplet_id.clone(),
                        });
                    }
                }
                with_proplet(ctx, kind, &channel, &m.proplet_id, |r| {
                    if ctx.liveness.discovery(&m.proplet_id, md) == Change::Transition {
                        triggers.proplets.wake(r);
                    }
                })
            }
        },
        Inbound::Metrics => match wire::decode_metrics(payload) {
            Err(e) => malformed(ctx, kind, &msg.topic, &e, payload.len()),
            Ok(m) => {
                let total = ctx
                    .liveness
                    .get(&m.proplet_id)
                    .and_then(|o| o.metadata)
                    .and_then(|md| md.total_memory_bytes)
                    .filter(|t| *t > 0);
                let rss = m.memory_metrics.as_ref().and_then(|mm| mm.rss_bytes);
                let sample = ResourceMetrics {
                    timestamp: Some(crate::controllers::now()),
                    cpu_milli_percent: m
                        .cpu_metrics
                        .as_ref()
                        .and_then(|c| c.percent)
                        .map(|p| (p * 1000.0) as i64),
                    memory_milli_percent: memory_milli_percent(rss, total.map(|t| t.max(0) as u64)),
                    memory_bytes: rss.map(|r| r as i64),
                };
                with_proplet(ctx, kind, &channel, &m.proplet_id, |_| {
                    ctx.backlog.heard(&m.proplet_id);
                    ctx.liveness.metrics(&m.proplet_id, sample)
                })
            }
        },
        Inbound::Results => match wire::decode_result(payload) {
            Err(e) => malformed(ctx, kind, &msg.topic, &e, payload.len()),
            Ok(r) => match traced_task(&r.task_id, ctx) {
                None if ctx.ownership.is_sharded() => {
                    // Another shard's task, or one moving here whose Task is not in our cache yet:
                    // parked in memory until it shows up or the sweep drops it as not ours. Acknowledged
                    // now: the broker delivers only so many unacknowledged messages, and parking most of a
                    // shared channel's results would stall this session's heartbeats behind them.
                    ctx.metrics.mqtt_message(kind.as_str(), "parked");
                    ctx.results.push(&r.task_id.clone(), r, None);
                }
                None => {
                    ctx.metrics.mqtt_message(kind.as_str(), "unknown_task");
                    debug!(topic = %msg.topic, task_id = %r.task_id, "result for an unknown task");
                }
                // A fenced shard's Task another survivor took over: parked as another shard's.
                Some(t)
                    if ctx
                        .tasks
                        .get(&t)
                        .is_some_and(|task| ctx.ownership.is_foreign_task(&task)) =>
                {
                    ctx.metrics.mqtt_message(kind.as_str(), "parked");
                    ctx.results.push(&r.task_id.clone(), r, None);
                }
                Some(t) => {
                    ctx.metrics.mqtt_message(kind.as_str(), "ok");
                    let uid = r.task_id.clone();
                    debug!(task_id = %uid, "result received");
                    // Acknowledged to the broker once the Task controller has written it.
                    ctx.results.push(&uid, r, msg.ack.take());
                    triggers.tasks.wake(t);
                }
            },
        },
        Inbound::RegistryRequest => match wire::decode_registry_request(payload) {
            Err(e) => malformed(ctx, kind, &msg.topic, &e, payload.len()),
            Ok(r) => {
                ctx.metrics.mqtt_message(kind.as_str(), "ok");
                triggers.registry.offer(crate::registry::Request {
                    channel,
                    app_name: r.app_name.trim().to_string(),
                });
            }
        },
        Inbound::TaskMetrics => match wire::decode_task_metrics(payload) {
            Err(e) => malformed(ctx, kind, &msg.topic, &e, payload.len()),
            Ok(m) => match traced_task(&m.task_id, ctx) {
                None => {
                    ctx.metrics.mqtt_message(kind.as_str(), "unknown_task");
                    debug!(topic = %msg.topic, task_id = %m.task_id, "task metrics for an unknown task");
                }
                Some(t) => {
                    ctx.metrics.mqtt_message(kind.as_str(), "ok");
                    let sample = m.metrics.unwrap_or_default();
                    let snapshot = ResourceMetrics {
                        timestamp: Some(crate::controllers::now()),
                        cpu_milli_percent: sample.cpu_percent.map(|p| (p * 1000.0) as i64),
                        memory_milli_percent: sample.memory_percent.map(|p| (p * 1000.0) as i64),
                        memory_bytes: sample.memory_bytes.map(|b| b.min(i64::MAX as u64) as i64),
                    };
                    // Wake the controller only when a write is due (at most every --status-refresh).
                    if ctx
                        .task_metrics
                        .offer(&m.task_id, snapshot, ctx.config.status_refresh.0)
                    {
                        triggers.tasks.wake(t);
                    }
                }
            },
        },
    }
}

/// The Task a message is about, with its id recorded in the message's span.
fn traced_task(task_id: &str, ctx: &Context) -> Option<ObjectRef<Task>> {
    tracing::Span::current().record("task", task_id);
    ctx.task_index.by_uid(task_id)
}

fn with_proplet(
    ctx: &Context,
    kind: Inbound,
    channel: &Channel,
    client_id: &str,
    f: impl FnOnce(ObjectRef<Proplet>),
) {
    tracing::Span::current().record("proplet", client_id);
    // Heartbeats are kept while the Lease is being renewed late: dropping them would make our proplets
    // look Offline once it is renewed.
    if !ctx.ownership.holds_client(client_id) {
        ctx.metrics.mqtt_message(kind.as_str(), "not_owned");
        return;
    }
    match proplet_for(ctx, channel, client_id) {
        Some(r) => {
            ctx.metrics.mqtt_message(kind.as_str(), "ok");
            f(r)
        }
        None => {
            ctx.metrics.mqtt_message(kind.as_str(), "unknown_proplet");
            debug!(%channel, %client_id, kind = kind.as_str(), "message from a proplet with no Proplet on this channel");
        }
    }
}

fn metadata(m: DiscoveryMetadata, namespace: Option<String>) -> PropletMetadata {
    PropletMetadata {
        description: m.description,
        tags: m.tags,
        location: m.location,
        ip: m.ip,
        environment: m.environment,
        os: m.os,
        hostname: m.hostname,
        cpu_arch: m.cpu_arch,
        total_memory_bytes: m.total_memory_bytes.map(|t| t.min(i64::MAX as u64) as i64),
        proplet_version: m.proplet_version,
        wasm_runtime: m.wasm_runtime,
        namespace,
    }
}

/// A proplet's memory use in thousandths of a percent: its RSS over the total memory it reported at
/// discovery (upstream divided by a constant instead). Unknown without both.
pub fn memory_milli_percent(rss: Option<u64>, total: Option<u64>) -> Option<i64> {
    let (r, t) = (rss?, total.filter(|t| *t > 0)?);
    Some(((r as f64 / t as f64) * 100_000.0) as i64)
}

#[cfg(test)]
mod memory_tests {
    use super::memory_milli_percent;

    /// Upstream defect (upstream-spec §7): the memory percent must come from RSS ÷ the discovered total.
    #[test]
    fn memory_percent_is_rss_over_the_discovered_total() {
        let gib = 1024 * 1024 * 1024;
        assert_eq!(memory_milli_percent(Some(gib / 4), Some(gib)), Some(25_000));
        assert_eq!(
            memory_milli_percent(Some(3 * gib), Some(8 * gib)),
            Some(37_500)
        );
        assert_eq!(
            memory_milli_percent(Some(gib), None),
            None,
            "no total: unknown"
        );
        assert_eq!(memory_milli_percent(Some(gib), Some(0)), None);
        assert_eq!(memory_milli_percent(None, Some(gib)), None);
    }
}
