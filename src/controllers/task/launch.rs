//! Putting a placed task on the wire: the finalizer, the start (to one proplet or every channel of a
//! broadcast), `running` recorded after it; the stop for a task that ends early or is deleted.
use std::collections::BTreeSet;
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
use crate::api::proplet::Proplet;
use crate::api::task::{Task, TaskPhase, TaskStatus};
use crate::context::Context;
use crate::controllers::now;
use crate::error::{Result, conflict};
use crate::mqtt::topics::Channel;
use crate::mqtt::wire::StopRequest;

pub const FINALIZER: &str = "propeller.propeller.abstractmachines.fr/task-finalizer";
/// A task still running this long after its start gets the finalizer that guarantees its stop is sent when
/// it is deleted; most tasks end sooner and never cost that write (their deletion sends a stop from the
/// delete event).
pub(super) const FINALIZER_AFTER: Duration = Duration::from_secs(5);
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

/// Starts `task` on `proplet`: the assignment and `running` in one resourceVersion-checked write, then the
/// start on the wire. A stale view fails the write and sends nothing; an operator killed between the two
/// leaves a running task that the next operator starts again (see [`resume`]).
pub(super) async fn launch(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    proplet: &Proplet,
) -> Result<Action> {
    let g = task.metadata.generation;
    let client_id = proplet.client_id();
    status.phase = Some(TaskPhase::Running);
    status.assigned_proplet = Some(proplet.name_any());
    status.assigned_client_id = Some(client_id.clone());
    status.attempts = Some(status.attempts.unwrap_or(0) + 1);
    status.error = None;
    status.started_at = Some(now());
    let assigned = format!(
        "assigned to proplet {} (clientId {client_id})",
        proplet.name_any()
    );
    set_condition(
        &mut status.conditions,
        "Scheduled",
        ConditionStatus::True,
        "Assigned",
        &assigned,
        g,
    );
    let msg = match channel_of(proplet) {
        Some(channel) => format!("start sent to {client_id} on {channel}"),
        None => format!("start sent to {client_id}"),
    };
    record_and_send(task, ctx, status, &msg).await?;
    if let Some(created) = task.metadata.creation_timestamp.as_ref() {
        let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
        ctx.metrics.task_dispatch_seconds.observe(secs.max(0.0));
    }
    info!(task = %task.name_any(), proplet = %proplet.name_any(), "task dispatched");
    ctx.routine_event(task, "Dispatched", "Dispatch", msg).await;
    Ok(Action::requeue(next_look(task, ctx)))
}

/// Writes `status` as running with the Started condition (`msg`), then sends the start: the write first, so
/// that a stale view sends nothing.
pub(super) async fn record_and_send(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    msg: &str,
) -> Result<()> {
    let g = task.metadata.generation;
    set_condition(
        &mut status.conditions,
        "Started",
        ConditionStatus::True,
        "Dispatched",
        msg,
        g,
    );
    let running = write_status(ctx, task, status).await?;
    send_start(&running, ctx).await
}

/// A task left `scheduled` by an operator version that wrote the assignment first: it is launched now.
pub(super) async fn launch_scheduled(task: &Task, ctx: &Context) -> Result<Action> {
    let mut status = task.status.clone().unwrap_or_default();
    let Some(proplet) = assigned_proplet(ctx, task) else {
        // The proplet vanished between assignment and publishing: start over.
        status.phase = Some(TaskPhase::Pending);
        status.assigned_proplet = None;
        status.assigned_client_id = None;
        write_status(ctx, task, status).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    // The attempt was counted with the assignment.
    status.attempts = Some(status.attempts.unwrap_or(1) - 1);
    launch(task, ctx, status, &proplet).await
}

/// How long a shard waits, after a proplet became its own, before it sends the start of a running task
/// again (see [`resume`]).
const RESUME_GRACE: Duration = Duration::from_secs(3);

/// A running task this process has not started (an earlier operator did, or its start did not go out):
/// once what the broker queued for us is handled — its result would be among it — the start goes out again.
/// A proplet ignores a start for a task it is running. `None`: nothing to do.
pub(super) async fn resume(task: &Task, ctx: &Context) -> Result<Option<Action>> {
    let uid = task.uid().unwrap_or_default();
    if ctx.launched.contains(&uid) || ctx.mqtt.is_none() {
        return Ok(None);
    }
    // Handed over by a live shard that had sent this attempt's start itself.
    let attempt = task.status.as_ref().and_then(|s| s.attempts).unwrap_or(0);
    if crate::sharding::start_sent(task) == Some(attempt) {
        ctx.launched.insert(&uid);
        return Ok(None);
    }
    if !ctx.backlog.drained() {
        return Ok(Some(Action::requeue(Duration::from_millis(250))));
    }
    // After a reconnect: a start sent before the proplet is heard again may be lost as well. The timeout and
    // an Offline proplet are judged meanwhile (by the caller, on `None`).
    if !reaches(task, ctx) {
        let proplet_gone = assigned_proplet(ctx, task)
            .is_none_or(|p| p.phase() == crate::api::proplet::PropletPhase::Offline);
        let started = task.status.as_ref().and_then(|s| s.started_at.as_ref());
        let overdue = started.is_none_or(|t| {
            Timestamp::now().duration_since(t.0).unsigned_abs() >= timeout_of(task, ctx)
        });
        return Ok((!proplet_gone && !overdue).then(|| Action::requeue(RECHECK_BACK)));
    }
    // A task that just moved here (its shard went away): a result its proplet published a moment ago may
    // still be on its way to us; sending the start again now could make a finished task run twice.
    if let Some(since) = task
        .status
        .as_ref()
        .and_then(|s| s.assigned_client_id.as_deref())
        .and_then(|c| ctx.ownership.owned_since(c))
    {
        let left = RESUME_GRACE.saturating_sub(since.elapsed());
        if !left.is_zero() {
            return Ok(Some(Action::requeue(left)));
        }
    }
    // Looked at only now: the backlog's results are all in once it is drained, and this reconcile may
    // have started before its result came.
    if !ctx.results.peek(&uid).is_empty() {
        return Ok(Some(Action::requeue(Duration::from_millis(10))));
    }
    // Once per task and process, the cache is not trusted: this reconcile's copy may predate our own
    // write of its result.
    let Some(current) = fresh(ctx, task).await? else {
        return Ok(Some(Action::await_change()));
    };
    let same = |t: &Task| {
        t.status
            .as_ref()
            .map(|s| (s.assigned_client_id.clone(), s.attempts))
    };
    if current.phase() != TaskPhase::Running || same(&current) != same(task) {
        return Ok(Some(Action::requeue(Duration::from_millis(10))));
    }
    send_start(&current, ctx).await?;
    ctx.metrics
        .mqtt_published_total
        .with_label_values(&["start_again", "ok"])
        .inc();
    info!(task = %task.name_any(), %uid, "start sent again: running, and its start not known to have arrived");
    Ok(None)
}

/// How often a task whose proplet is not known to be back after a reconnect looks again.
const RECHECK_BACK: Duration = Duration::from_millis(500);

/// Whether a start published now reaches `task`'s proplet(s), as far as this operator knows: connected, and
/// every proplet concerned heard since the last reconnect (see [`crate::mqtt::backlog`]).
fn reaches(task: &Task, ctx: &Context) -> bool {
    let up = ctx.mqtt.as_ref().is_some_and(|m| m.up_since().is_some());
    let status = task.status.as_ref();
    let mut clients: Vec<&str> = status
        .map(|s| s.broadcast_targets.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if task.spec.broadcast != Some(true) {
        clients = status
            .and_then(|s| s.assigned_client_id.as_deref())
            .into_iter()
            .collect();
    }
    up && clients.iter().all(|c| ctx.backlog.back(c))
}

/// Where the start of `task` goes: the channel of its proplet, or of each broadcast target.
fn start_channels(task: &Task, ctx: &Context) -> BTreeSet<Channel> {
    let status = task.status.clone().unwrap_or_default();
    if task.spec.broadcast == Some(true) {
        if let Some(channels) = ctx.broadcasts.get(&task.uid().unwrap_or_default()) {
            return channels;
        }
        return status
            .broadcast_targets
            .iter()
            .filter_map(|c| ctx.proplet_index.by_client(c))
            .filter_map(|r| ctx.proplets.get(&r))
            .filter_map(|p| channel_of(&p))
            .collect();
    }
    assigned_proplet(ctx, task)
        .and_then(|p| channel_of(&p))
        .into_iter()
        .collect()
}

/// Publishes the start of a task recorded as running, and remembers that this process did.
async fn send_start(task: &Task, ctx: &Context) -> Result<()> {
    let Some(mqtt) = &ctx.mqtt else {
        return Ok(());
    };
    let uid = task.uid().unwrap_or_default();
    let broadcast = task.spec.broadcast == Some(true);
    let status = task.status.clone().unwrap_or_default();
    let client = (!broadcast).then_some(status.assigned_client_id.as_deref().unwrap_or_default());
    let start = start_request(task, client, &parent_results(task, ctx));
    // Remembered first: a start that fails is forgotten again and retried (the write is not repeated). One
    // that may not reach its proplet (see [`reaches`]) is not remembered: [`resume`] sends it again once the
    // proplet is back.
    if reaches(task, ctx) {
        ctx.launched.insert(&uid);
    }
    for channel in start_channels(task, ctx) {
        if let Err(e) = mqtt.publish_json(&channel.start(), &start).await {
            ctx.launched.forget(&uid);
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
    }
    Ok(())
}

/// Writes a Task's status, stamped with `updatedAt` (at no extra write).
pub(super) async fn write_status(
    ctx: &Context,
    task: &Task,
    mut status: TaskStatus,
) -> Result<Task> {
    status.updated_at = Some(now());
    let written = ctx.apply_status(task, &status).await?;
    if !written.phase().is_active() {
        let uid = written.uid().unwrap_or_default();
        ctx.launched.forget(&uid);
        ctx.broadcasts.forget(&uid);
    }
    Ok(written)
}

/// When a running task is looked at next: its timeout, or sooner when it is due for a finalizer.
pub(super) fn next_look(task: &Task, ctx: &Context) -> Duration {
    let timeout = timeout_of(task, ctx);
    if task.finalizers().iter().any(|f| f == FINALIZER) {
        timeout
    } else {
        timeout.min(FINALIZER_AFTER + Duration::from_millis(100))
    }
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
    ctx.own_writes.record(&written);
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
    let recorded = stop
        .broadcast
        .then(|| ctx.broadcasts.get(&stop.id))
        .flatten();
    let channels: Vec<Channel> = match recorded {
        Some(channels) => channels.into_iter().collect(),
        None => ctx
            .proplets
            .state()
            .iter()
            .filter(|p| p.namespace() == ns)
            .filter(|p| stop.broadcast || Some(p.name_any()) == status.assigned_proplet)
            .filter_map(|p| channel_of(p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
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
        // Held by someone else's finalizer: the delete event will come too late to stop it.
        if task.phase().is_active() && task.status.as_ref().is_some_and(|s| s.job_name.is_none()) {
            stop(task, ctx, &task.status.clone().unwrap_or_default()).await;
        }
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
