//! Broadcast tasks: one start to every Running proplet of the task's namespace, one result from each.
//! A single replica knows every proplet. A shard knows only its own, so the shard holding a broadcast
//! lists the namespace's Proplets from the API server (one list per broadcast) and subscribes to the
//! targets' channels — confirmed at the broker before the start goes out, so that no target's result can
//! arrive unheard — until the broadcast ends. The targets' own shards hear those results too and drop
//! them as a task they do not hold.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::launch::{WAIT_FOR_PROPLET, next_look, record_and_send, write_status};
use super::wire::channel_of;
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::{Proplet, PropletPhase};
use crate::api::task::{Task, TaskPhase, TaskStatus};
use crate::context::Context;
use crate::controllers::now;
use crate::error::Result;
use crate::mqtt::topics::Channel;

/// How often a broadcast waiting for its subscriptions looks again.
const WAIT_FOR_SUBSCRIPTIONS: Duration = Duration::from_millis(200);

pub(super) async fn dispatch(task: &Task, ctx: &Context, mut status: TaskStatus) -> Result<Action> {
    let g = task.metadata.generation;
    let mut by_channel: BTreeMap<Channel, Vec<String>> = BTreeMap::new();
    for p in targets(task, ctx).await? {
        if let (Some(ch), Some(client)) = (channel_of(&p), p.spec.connection_config.client()) {
            by_channel.entry(ch).or_default().push(client.to_string());
        }
    }
    if by_channel.is_empty() {
        let why = "no Running proplets in this namespace to broadcast to";
        let old = status.clone();
        set_condition(
            &mut status.conditions,
            "Scheduled",
            ConditionStatus::False,
            "NoProplet",
            why,
            g,
        );
        if status != old {
            write_status(ctx, task, status).await?;
        }
        return Ok(Action::requeue(WAIT_FOR_PROPLET));
    }
    let channels: BTreeSet<Channel> = by_channel.keys().cloned().collect();
    ctx.broadcasts
        .set(&task.uid().unwrap_or_default(), channels.clone());
    if !listening(ctx, &channels).await {
        return Ok(Action::requeue(WAIT_FOR_SUBSCRIPTIONS));
    }
    status.broadcast_targets = by_channel.into_values().flatten().collect();
    status.broadcast_targets.sort();
    status.phase = Some(TaskPhase::Running);
    status.started_at = Some(now());
    status.attempts = Some(status.attempts.unwrap_or(0) + 1);
    status.results = Some(json!({}));
    let msg = format!("broadcast to {} proplets", status.broadcast_targets.len());
    record_and_send(task, ctx, status, &msg).await?;
    ctx.routine_event(task, "Dispatched", "Dispatch", msg).await;
    Ok(Action::requeue(next_look(task, ctx)))
}

/// A running broadcast this replica holds: its targets' channels stay subscribed (recorded again after a
/// restart, from the targets in its status).
pub(super) async fn keep_listening(task: &Task, ctx: &Context) -> Result<()> {
    let uid = task.uid().unwrap_or_default();
    if ctx.broadcasts.get(&uid).is_some() {
        return Ok(());
    }
    let wanted: BTreeSet<&str> = task
        .status
        .as_ref()
        .map(|s| s.broadcast_targets.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let channels: BTreeSet<Channel> = namespace_proplets(task, ctx)
        .await?
        .iter()
        .filter(|p| {
            p.spec
                .connection_config
                .client()
                .is_some_and(|c| wanted.contains(c))
        })
        .filter_map(|p| channel_of(p))
        .collect();
    ctx.broadcasts.set(&uid, channels);
    Ok(())
}

/// The Running proplets of the task's namespace.
async fn targets(task: &Task, ctx: &Context) -> Result<Vec<Arc<Proplet>>> {
    Ok(namespace_proplets(task, ctx)
        .await?
        .into_iter()
        .filter(|p| p.phase() == PropletPhase::Running)
        .collect())
}

/// Every Proplet of the task's namespace: from the cache for a single replica, from the API server for a
/// shard (whose cache holds its own only).
async fn namespace_proplets(task: &Task, ctx: &Context) -> Result<Vec<Arc<Proplet>>> {
    let ns = task.namespace();
    if !ctx.ownership.is_sharded() {
        return Ok(ctx
            .proplets
            .state()
            .into_iter()
            .filter(|p| p.namespace() == ns)
            .collect());
    }
    let api: Api<Proplet> = Api::namespaced(ctx.client.clone(), ns.as_deref().unwrap_or_default());
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().map(Arc::new).collect())
}

/// Whether the broker has taken this replica's subscriptions to every channel's results (a result
/// published before that would reach no one here).
async fn listening(ctx: &Context, channels: &BTreeSet<Channel>) -> bool {
    let Some(mqtt) = &ctx.mqtt else {
        return false;
    };
    let topics: Vec<String> = channels.iter().flat_map(Channel::subscriptions).collect();
    match mqtt.subscribed(&topics).await {
        Some(generation) if ctx.backlog.confirmed(generation) => true,
        Some(generation) => {
            // Its probe may have been lost (a reconnect): another one, a few bytes per look.
            if let Some((topic, payload)) = ctx.backlog.probe(generation)
                && let Err(e) = mqtt.publish(&topic, payload).await
            {
                tracing::warn!(error = %e, "subscription probe not sent");
            }
            false
        }
        None => {
            ctx.resubscribe.notify_one();
            false
        }
    }
}
