//! Putting a placed task on the wire: the finalizer, the start (to one proplet or every channel of a
//! broadcast), `running` recorded after it; the stop for a task that ends early or is deleted.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::wire::{channel_of, parent_results, start_request};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::{Proplet, PropletPhase};
use crate::api::task::{Task, TaskPhase, TaskStatus};
use crate::context::Context;
use crate::controllers::now;
use crate::error::{Result, conflict};
use crate::mqtt::topics::Channel;
use crate::mqtt::wire::StopRequest;

pub const FINALIZER: &str = "propeller.propeller.abstractmachines.fr/task-finalizer";
/// Retry period for a task that waits for a proplet (proplet changes also wake it at once).
pub(super) const WAIT_FOR_PROPLET: Duration = Duration::from_secs(30);

/// The Proplet `task` is assigned to, from the cache.
pub(super) fn assigned_proplet(ctx: &Context, task: &Task) -> Option<Arc<Proplet>> {
    let name = task.status.as_ref()?.assigned_proplet.as_deref()?;
    ctx.proplets
        .get(&ObjectRef::new(name).within(task.namespace().as_deref()?))
}

/// The task as the API server has it now (`None`: deleted).
pub(super) async fn fresh(ctx: &Context, task: &Task) -> Result<Option<Task>> {
    let ns = task.namespace().unwrap_or_default();
    Ok(Api::<Task>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&task.name_any())
        .await?)
}

pub(super) async fn publish_and_mark_running(task: &Task, ctx: &Context) -> Result<Action> {
    let g = task.metadata.generation;
    let mut status = task.status.clone().unwrap_or_default();
    let name = status.assigned_proplet.clone().unwrap_or_default();
    let (Some(proplet), Some(mqtt)) = (assigned_proplet(ctx, task), &ctx.mqtt) else {
        // The proplet vanished between assignment and publishing: start over.
        status.phase = Some(TaskPhase::Pending);
        status.assigned_proplet = None;
        status.assigned_client_id = None;
        ctx.apply_status(task, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let Some(channel) = channel_of(&proplet) else {
        return Ok(Action::requeue(WAIT_FOR_PROPLET));
    };
    let client_id = status.assigned_client_id.clone().unwrap_or_default();
    let start = start_request(task, Some(&client_id), &parent_results(task, ctx));
    if let Err(e) = mqtt.publish_json(&channel.start(), &start).await {
        ctx.metrics
            .mqtt_published_total
            .with_label_values(&["start", "error"])
            .inc();
        return Err(e.into());
    }
    ctx.metrics
        .mqtt_published_total
        .with_label_values(&["start", "ok"])
        .inc();
    if let Some(created) = task.metadata.creation_timestamp.as_ref() {
        let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
        ctx.metrics.task_dispatch_seconds.observe(secs.max(0.0));
    }
    status.phase = Some(TaskPhase::Running);
    status.started_at = Some(now());
    let msg = format!("start sent to {client_id} on {channel}");
    set_condition(
        &mut status.conditions,
        "Started",
        ConditionStatus::True,
        "Dispatched",
        &msg,
        g,
    );
    mark_running(task, ctx, &status).await?;
    info!(task = %task.name_any(), proplet = %name, "task dispatched");
    ctx.routine_event(task, "Dispatched", "Dispatch", msg).await;
    Ok(Action::requeue(timeout_of(task, ctx)))
}

/// Records `running` after the start went out. The start is not sent again when this write meets a
/// newer version of the Task (another writer touched it): the write is retried on a fresh read as long as
/// the Task still holds the same assignment.
async fn mark_running(task: &Task, ctx: &Context, running: &TaskStatus) -> Result<()> {
    let mut current = task.clone();
    for _ in 0..5 {
        match ctx.apply_status(&current, running).await {
            Ok(_) => return Ok(()),
            Err(crate::error::Error::Conflict(_)) => {
                let Some(fresh) = fresh(ctx, task).await? else {
                    return Ok(());
                };
                let before = task.status.clone().unwrap_or_default();
                let now_st = fresh.status.clone().unwrap_or_default();
                let same = fresh.phase() == TaskPhase::Scheduled
                    && now_st.assigned_client_id == before.assigned_client_id
                    && now_st.attempts == before.attempts;
                if !same {
                    return Ok(());
                }
                current = fresh;
            }
            Err(e) => return Err(e),
        }
    }
    Err(crate::error::Error::Conflict(format!(
        "could not record {} as running",
        task.name_any()
    )))
}

pub(super) async fn dispatch_broadcast(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
) -> Result<Action> {
    let g = task.metadata.generation;
    let ns = task.namespace();
    let targets: Vec<Arc<Proplet>> = ctx
        .proplets
        .state()
        .into_iter()
        .filter(|p| p.namespace() == ns && p.phase() == PropletPhase::Running)
        .collect();
    let mut channels: BTreeMap<Channel, Vec<String>> = BTreeMap::new();
    for p in &targets {
        if let (Some(ch), Some(client)) = (channel_of(p), p.spec.connection_config.client()) {
            channels.entry(ch).or_default().push(client.to_string());
        }
    }
    if channels.is_empty() {
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
            ctx.apply_status(task, &status).await?;
        }
        return Ok(Action::requeue(WAIT_FOR_PROPLET));
    }
    let task = &ensure_finalizer(task, ctx).await?;
    let start = start_request(task, None, &parent_results(task, ctx));
    let Some(mqtt) = &ctx.mqtt else {
        return Ok(Action::await_change());
    };
    for ch in channels.keys() {
        mqtt.publish_json(&ch.start(), &start).await?;
        ctx.metrics
            .mqtt_published_total
            .with_label_values(&["start", "ok"])
            .inc();
    }
    status.broadcast_targets = channels.into_values().flatten().collect();
    status.broadcast_targets.sort();
    status.phase = Some(TaskPhase::Running);
    status.started_at = Some(now());
    status.attempts = Some(status.attempts.unwrap_or(0) + 1);
    status.results = Some(json!({}));
    let msg = format!("broadcast to {} proplets", status.broadcast_targets.len());
    set_condition(
        &mut status.conditions,
        "Started",
        ConditionStatus::True,
        "Dispatched",
        &msg,
        g,
    );
    ctx.apply_status(task, &status).await?;
    ctx.routine_event(task, "Dispatched", "Dispatch", msg).await;
    Ok(Action::requeue(timeout_of(task, ctx)))
}

pub(super) fn timeout_of(task: &Task, ctx: &Context) -> Duration {
    task.spec
        .timeout_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(ctx.config.task_timeout.0)
}

/// Adds the finalizer; returns the task as written (its new resourceVersion matters for the next write).
pub(super) async fn ensure_finalizer(task: &Task, ctx: &Context) -> Result<Task> {
    if task.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(task.clone());
    }
    let ns = task.namespace().unwrap_or_default();
    let mut finalizers = task.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": task.resource_version()}});
    let written = Api::<Task>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &task.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(conflict)?;
    ctx.metrics.api_write("tasks", "patch");
    Ok(written)
}

/// Sends a stop for a running task (bounded: the MQTT queue either takes it or the publish times out).
pub(super) async fn stop(task: &Task, ctx: &Context, status: &TaskStatus) {
    let Some(mqtt) = &ctx.mqtt else { return };
    let stop = StopRequest {
        id: task.uid().unwrap_or_default(),
        proplet_id: status.assigned_client_id.clone(),
        broadcast: task.spec.broadcast == Some(true),
    };
    let ns = task.namespace();
    let channels: Vec<Channel> = ctx
        .proplets
        .state()
        .iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| stop.broadcast || Some(p.name_any()) == status.assigned_proplet)
        .filter_map(|p| channel_of(p))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for ch in channels {
        let outcome = match mqtt.publish_json(&ch.stop(), &stop).await {
            Ok(()) => "ok",
            Err(e) => {
                warn!(task = %task.name_any(), error = %e, "stop not sent");
                "error"
            }
        };
        ctx.metrics
            .mqtt_published_total
            .with_label_values(&["stop", outcome])
            .inc();
    }
}

pub(super) async fn cleanup(task: &Task, ctx: &Context) -> Result<Action> {
    if !task.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let status = task.status.clone().unwrap_or_default();
    if task.phase().is_active() {
        stop(task, ctx, &status).await;
    }
    let ns = task.namespace().unwrap_or_default();
    let remaining: Vec<String> = task
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"finalizers": remaining, "resourceVersion": task.resource_version()}});
    match Api::<Task>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &task.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => ctx.metrics.api_write("tasks", "patch"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}
