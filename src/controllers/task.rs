//! Task controller: choose a proplet, persist the assignment, publish the start (or, for k8s proplets on
//! the job backend, hand over to [`job_backend`]), then record the result; time out tasks that never
//! answer, and reschedule tasks whose proplet went away.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{Context, apply_status, job_backend, measured, now, schedule, selection};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::{Proplet, PropletPhase, PropletType};
use crate::api::task::{PreferredPropletType, ResultTarget, RunIf, Task, TaskPhase, TaskStatus};
use crate::config::K8sTaskBackend;
use crate::error::Result;
use crate::mqtt::topics::Channel;
use crate::mqtt::wire::{StartRequest, StopRequest, TaskResult, WireMonitoringProfile};
use crate::scheduling;
use crate::telemetry::metrics;

pub const FINALIZER: &str = "propeller.propeller.abstractmachines.fr/task-finalizer";
/// Retry period for a task that waits for a proplet (proplet changes also wake it at once).
const WAIT_FOR_PROPLET: Duration = Duration::from_secs(30);

pub async fn reconcile(task: Arc<Task>, ctx: Arc<Context>) -> Result<Action> {
    let obj = Arc::clone(&task);
    measured("task", obj.as_ref(), reconcile_inner(task, ctx)).await
}

async fn reconcile_inner(task: Arc<Task>, ctx: Arc<Context>) -> Result<Action> {
    let task = match super::own_writes::newer(task.as_ref()) {
        Some(written) => Arc::new(written),
        None => task,
    };
    if task.metadata.deletion_timestamp.is_some() {
        return cleanup(&task, &ctx).await;
    }
    let status = task.status.clone().unwrap_or_default();
    if let Some(client) = status.assigned_client_id.as_deref()
        && !ctx.ownership.owns_client(client)
    {
        return Ok(Action::await_change());
    }
    let uid = task.uid().unwrap_or_default();

    // Results first: they may arrive before our own write of `running` is back from the watch, so a
    // task that does not look active is read afresh before its result is judged late.
    let pending = ctx.results.peek(&uid);
    if !pending.is_empty() {
        let current = if task.phase().is_active() {
            Some((*task).clone())
        } else {
            fresh(&ctx, &task).await?
        };
        return match current {
            Some(t) => {
                let status = t.status.clone().unwrap_or_default();
                record_results(&t, &ctx, status, pending).await
            }
            None => {
                ctx.results.done(&uid, pending.len());
                ctx.task_metrics.forget(&uid);
                Ok(Action::await_change())
            }
        };
    }

    if let Err(msg) = validate(&task) {
        return refuse(&task, &ctx, status, "InvalidSpec", &msg).await;
    }

    match task.phase() {
        // A stale view cannot dispatch twice: the assignment is written (resourceVersion-checked) first.
        TaskPhase::Pending => dispatch(&task, &ctx).await,
        TaskPhase::Scheduled => {
            // Assigned but maybe not published (operator restarted in between): publish again; a proplet
            // ignores a start for a task id it is already running.
            let fresh = fresh(&ctx, &task).await?;
            match fresh {
                Some(t) if t.phase() == TaskPhase::Scheduled => {
                    publish_and_mark_running(&t, &ctx).await
                }
                _ => Ok(Action::await_change()),
            }
        }
        TaskPhase::Running => {
            if let Some(action) = schedule::skip_overdue_tick(&task, &ctx).await? {
                return Ok(action);
            }
            if status.job_name.is_some() {
                job_backend::watch(&task, &ctx).await
            } else {
                watch_running(&task, &ctx).await
            }
        }
        TaskPhase::Interrupted => retry_interrupted(&task, &ctx).await,
        TaskPhase::Completed | TaskPhase::Failed | TaskPhase::Skipped => {
            schedule::recur(&task, &ctx).await
        }
    }
}

async fn fresh(ctx: &Context, task: &Task) -> Result<Option<Task>> {
    let ns = task.namespace().unwrap_or_default();
    Ok(Api::<Task>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&task.name_any())
        .await?)
}

/// Spec problems the API server may not catch (CEL is ignored by old servers) or cannot express.
pub fn validate(task: &Task) -> std::result::Result<(), String> {
    let spec = &task.spec;
    for (i, v) in spec.inputs.iter().flatten().enumerate() {
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            return Err(format!(
                "spec.inputs[{i}] must be a string or a number, not {v}"
            ));
        }
    }
    let has_file = spec.file.as_deref().is_some_and(|f| !f.trim().is_empty());
    let has_image = spec
        .image_url
        .as_deref()
        .is_some_and(|u| !u.trim().is_empty());
    if spec.encrypted == Some(true) {
        if !has_image || has_file {
            return Err("an encrypted task needs spec.imageUrl and no spec.file".into());
        }
    } else if !has_file && !has_image {
        return Err(
            "spec.file or spec.imageUrl is required (a proplet drops a start without either)"
                .into(),
        );
    }
    if spec.broadcast == Some(true)
        && spec
            .proplet_selector
            .as_ref()
            .and_then(|s| s.proplet_id.as_deref())
            .is_some_and(|id| !id.is_empty())
    {
        return Err("broadcast must not be set when propletSelector.propletId is specified".into());
    }
    if let Some(p) = spec.restart_policy.as_deref()
        && !matches!(p, "Always" | "OnFailure" | "Never")
    {
        return Err(format!(
            "spec.restartPolicy must be Always, OnFailure or Never, not {p:?}"
        ));
    }
    if let Some(interval) = spec
        .monitoring_profile
        .as_ref()
        .and_then(|m| m.interval.as_deref())
    {
        interval
            .parse::<kube::core::Duration>()
            .map_err(|e| format!("spec.monitoringProfile.interval {interval:?}: {e}"))?;
    }
    if spec.depends_on.as_ref().is_some_and(|d| !d.is_empty())
        && spec.workflow_id.as_deref().unwrap_or_default().is_empty()
        && spec.job_id.as_deref().unwrap_or_default().is_empty()
    {
        return Err("workflowId or jobId is required when dependsOn is specified".into());
    }
    if spec
        .depends_on
        .iter()
        .flatten()
        .any(|d| d == &task.name_any())
    {
        return Err("a task cannot depend on itself".into());
    }
    schedule::schedule_of(task)?;
    for source in spec.results_from.iter().flatten() {
        if !spec.depends_on.iter().flatten().any(|d| d == &source.task) {
            return Err(format!(
                "spec.resultsFrom names {:?}, which is not in dependsOn",
                source.task
            ));
        }
        let name = source.env_name();
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if source.target == ResultTarget::Env && !valid {
            return Err(format!(
                "spec.resultsFrom env {name:?} is not a valid variable name"
            ));
        }
    }
    Ok(())
}

/// A dependency cycle through the Tasks `task` depends on (directly or not), in its namespace.
fn dependency_cycle(task: &Task, ctx: &Context) -> Option<String> {
    task.spec.depends_on.as_ref().filter(|d| !d.is_empty())?;
    let ns = task.namespace();
    let all = ctx.tasks.state();
    let deps_of = |name: &str| -> Option<Vec<String>> {
        if name == task.name_any() {
            return Some(task.spec.depends_on.clone().unwrap_or_default());
        }
        all.iter()
            .find(|t| t.namespace() == ns && t.name_any() == name)
            .map(|t| t.spec.depends_on.clone().unwrap_or_default())
    };
    let mut nodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo = vec![task.name_any()];
    while let Some(name) = todo.pop() {
        if nodes.contains_key(&name) {
            continue;
        }
        let deps = deps_of(&name).unwrap_or_default();
        todo.extend(deps.iter().cloned());
        nodes.insert(name, deps);
    }
    // Dependencies not created yet are waited for, not errors.
    let known: Vec<String> = nodes
        .keys()
        .filter(|n| deps_of(n).is_some())
        .cloned()
        .collect();
    for deps in nodes.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    nodes.retain(|n, _| known.contains(n));
    crate::scheduling::dag::validate(&nodes)
        .err()
        .map(|e| e.to_string())
}

/// Leaves the task pending with `Ready=False` and `reason` (an invalid spec, or one this operator cannot
/// run as configured): an Event and a log line on the transition, nothing until the spec changes.
pub(super) async fn refuse(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    reason: &str,
    msg: &str,
) -> Result<Action> {
    let old = status.clone();
    let g = task.metadata.generation;
    status.phase.get_or_insert(TaskPhase::Pending);
    status.observed_generation = g;
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        reason,
        msg,
        g,
    );
    super::report_blocked(ctx, task, &old, &status, reason, "Validate", msg).await?;
    Ok(Action::await_change())
}

/// Waits for dependencies (`dependsOn`, same namespace). `Ok(None)`: go ahead.
fn dependency_gate(task: &Task, ctx: &Context) -> std::result::Result<Option<String>, String> {
    let Some(deps) = task.spec.depends_on.as_ref().filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let ns = task.namespace();
    let mut failed = Vec::new();
    for dep in deps {
        let found = ctx
            .tasks
            .state()
            .into_iter()
            .find(|t| t.namespace() == ns && &t.name_any() == dep);
        match found.map(|t| t.phase()) {
            None => return Ok(Some(format!("waiting for dependency {dep} (not found)"))),
            Some(TaskPhase::Completed) => {}
            Some(p) if p.is_terminal() => failed.push(dep.clone()),
            Some(p) => {
                return Ok(Some(format!(
                    "waiting for dependency {dep} ({})",
                    p.as_str()
                )));
            }
        }
    }
    let run = match task.spec.run_if.unwrap_or(RunIf::Success) {
        RunIf::Success => failed.is_empty(),
        RunIf::Failure => !failed.is_empty(),
        RunIf::Always => true,
    };
    if run {
        Ok(None)
    } else {
        Err(match task.spec.run_if.unwrap_or(RunIf::Success) {
            RunIf::Success => format!("dependencies did not succeed: {}", failed.join(", ")),
            RunIf::Failure | RunIf::Always => "no dependency failed (runIf: failure)".to_string(),
        })
    }
}

async fn dispatch(task: &Task, ctx: &Context) -> Result<Action> {
    let g = task.metadata.generation;
    let mut status = task.status.clone().unwrap_or_default();
    let old = status.clone();
    status.phase = Some(TaskPhase::Pending);
    status.observed_generation = g;
    status.created_at.get_or_insert_with(now);
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::True,
        "SpecValid",
        "the spec is valid",
        g,
    );

    if let Some(wait) = schedule::pending_gate(task, ctx, &mut status, &old).await? {
        return Ok(wait);
    }
    if let Some(cycle) = dependency_cycle(task, ctx) {
        return refuse(task, ctx, status, "InvalidSpec", &cycle).await;
    }
    match dependency_gate(task, ctx) {
        Ok(None) => {}
        Ok(Some(wait)) => {
            set_condition(
                &mut status.conditions,
                "Scheduled",
                ConditionStatus::False,
                "WaitingForDependencies",
                &wait,
                g,
            );
            if status != old {
                apply_status(&ctx.client, task, &status).await?;
            }
            return Ok(Action::await_change());
        }
        Err(skip) => {
            let end = Ending {
                phase: TaskPhase::Skipped,
                reason: "Skipped",
                event: Some((EventType::Normal, "Schedule")),
                error: false,
            };
            end_task(task, ctx, status, end, skip).await?;
            return Ok(Action::await_change());
        }
    }

    let Some(_) = &ctx.mqtt else {
        let end = Ending {
            phase: TaskPhase::Failed,
            reason: "MQTTNotConfigured",
            event: None,
            error: true,
        };
        end_task(
            task,
            ctx,
            status,
            end,
            "MQTT is not configured (--mqtt-address)".into(),
        )
        .await?;
        return Ok(Action::await_change());
    };

    if task.spec.broadcast == Some(true) {
        return dispatch_broadcast(task, ctx, status).await;
    }

    // On the job backend, a task that cannot run as a Job may only go to external proplets.
    let job_backend = ctx.config.k8s_task_backend == K8sTaskBackend::Job;
    let not_a_job = job_backend
        .then(|| job_backend::unsupported(task))
        .flatten();
    if let Some(why) = &not_a_job
        && task.spec.preferred_proplet_type == PreferredPropletType::K8s
    {
        return refuse(task, ctx, status, "UnsupportedOnJobBackend", why).await;
    }
    let pinned = task
        .spec
        .proplet_selector
        .as_ref()
        .and_then(|s| s.proplet_id.as_deref())
        .is_some_and(|id| !id.is_empty());
    let proplets: Vec<Arc<Proplet>> = ctx
        .proplets
        .state()
        .into_iter()
        .filter(|p| not_a_job.is_none() || pinned || p.spec.type_ != PropletType::K8s)
        .collect();
    let all_tasks = ctx.tasks.state();
    let counts = scheduling::active_counts(&all_tasks);
    let load = |p: &Proplet| {
        counts
            .get(&(p.namespace().unwrap_or_default(), p.name_any()))
            .copied()
            .unwrap_or(0)
    };
    let held_back = std::cell::Cell::new(false);
    let admit = |p: &Proplet| {
        let limit = scheduling::limit(p, ctx.config.max_tasks_per_proplet);
        let active = load(p);
        let verdict = scheduling::admit(task, p, limit, active, &all_tasks, selection::could_use);
        held_back.set(held_back.get() || verdict.is_err());
        verdict
    };
    let chosen = selection::select(task, &proplets, load, admit);
    let proplet = match chosen {
        Ok(p) => p,
        Err(why) => {
            // Held back by capacity: the task waits its turn (a finishing task wakes it).
            // A fixed message: a queue position in it would cost a write whenever the queue moves.
            let (reason, why) = if held_back.get() {
                (scheduling::QUEUED, scheduling::QUEUED_MESSAGE.to_string())
            } else {
                ("NoProplet", why)
            };
            set_condition(
                &mut status.conditions,
                "Scheduled",
                ConditionStatus::False,
                reason,
                &why,
                g,
            );
            if status != old {
                apply_status(&ctx.client, task, &status).await?;
                ctx.event(task, EventType::Normal, reason, "Schedule", why)
                    .await;
            }
            return Ok(Action::requeue(WAIT_FOR_PROPLET));
        }
    };
    if job_backend && proplet.spec.type_ == PropletType::K8s {
        if let Some(why) = &not_a_job {
            return refuse(task, ctx, status, "UnsupportedOnJobBackend", why).await;
        }
        return job_backend::dispatch(task, ctx, status, &proplet).await;
    }
    let client_id = proplet.client_id();
    // The finalizer write changes the resourceVersion: the assignment is written on top of it.
    let task = ensure_finalizer(task, ctx).await?;
    status.phase = Some(TaskPhase::Scheduled);
    status.assigned_proplet = Some(proplet.name_any());
    status.assigned_client_id = Some(client_id.clone());
    status.attempts = Some(status.attempts.unwrap_or(0) + 1);
    status.error = None;
    let msg = format!(
        "assigned to proplet {} (clientId {client_id})",
        proplet.name_any()
    );
    set_condition(
        &mut status.conditions,
        "Scheduled",
        ConditionStatus::True,
        "Assigned",
        &msg,
        g,
    );
    let scheduled = apply_status(&ctx.client, &task, &status).await?;
    publish_and_mark_running(&scheduled, ctx).await
}

/// How a task ends without a result: its phase, the Completed condition's reason, and the Event.
pub(super) struct Ending {
    pub phase: TaskPhase,
    pub reason: &'static str,
    /// Event type and action, if the ending deserves an Event.
    pub event: Option<(EventType, &'static str)>,
    /// Whether the message also goes to `status.error`.
    pub error: bool,
}

pub(super) async fn end_task(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    end: Ending,
    msg: String,
) -> Result<Task> {
    status.phase = Some(end.phase);
    status.finished_at = Some(now());
    if end.error {
        status.error = Some(msg.clone());
    }
    let g = task.metadata.generation;
    set_condition(
        &mut status.conditions,
        "Completed",
        ConditionStatus::False,
        end.reason,
        &msg,
        g,
    );
    let written = apply_status(&ctx.client, task, &status).await?;
    if let Some((type_, action)) = end.event {
        ctx.event(task, type_, end.reason, action, msg).await;
    }
    Ok(written)
}

/// The channel a proplet listens on.
fn channel_of(p: &Proplet) -> Option<Channel> {
    let cc = &p.spec.connection_config;
    Some(Channel::new(cc.domain()?, &cc.channel_id))
}

async fn publish_and_mark_running(task: &Task, ctx: &Context) -> Result<Action> {
    let g = task.metadata.generation;
    let mut status = task.status.clone().unwrap_or_default();
    let name = status.assigned_proplet.clone().unwrap_or_default();
    let ns = task.namespace();
    let proplet = ctx
        .proplets
        .state()
        .into_iter()
        .find(|p| p.namespace() == ns && p.name_any() == name);
    let (Some(proplet), Some(mqtt)) = (proplet, &ctx.mqtt) else {
        // The proplet vanished between assignment and publishing: start over.
        status.phase = Some(TaskPhase::Pending);
        status.assigned_proplet = None;
        status.assigned_client_id = None;
        apply_status(&ctx.client, task, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let Some(channel) = channel_of(&proplet) else {
        return Ok(Action::requeue(WAIT_FOR_PROPLET));
    };
    let client_id = status.assigned_client_id.clone().unwrap_or_default();
    let start = start_request(task, Some(&client_id), &parent_results(task, ctx));
    if let Err(e) = mqtt.publish_json(&channel.start(), &start).await {
        metrics()
            .mqtt_published_total
            .with_label_values(&["start", "error"])
            .inc();
        return Err(e.into());
    }
    metrics()
        .mqtt_published_total
        .with_label_values(&["start", "ok"])
        .inc();
    if let Some(created) = task.metadata.creation_timestamp.as_ref() {
        let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
        metrics().task_dispatch_seconds.observe(secs.max(0.0));
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
        match apply_status(&ctx.client, &current, running).await {
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

async fn dispatch_broadcast(task: &Task, ctx: &Context, mut status: TaskStatus) -> Result<Action> {
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
            apply_status(&ctx.client, task, &status).await?;
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
        metrics()
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
    apply_status(&ctx.client, task, &status).await?;
    ctx.routine_event(task, "Dispatched", "Dispatch", msg).await;
    Ok(Action::requeue(timeout_of(task, ctx)))
}

/// The start message for a task: inputs as strings, the export name, env with the proplet's identity.
/// The results of `task`'s dependencies (by dependsOn name; null for one without a result).
pub fn parent_results(task: &Task, ctx: &Context) -> BTreeMap<String, Value> {
    let ns = task.namespace();
    let deps = task.spec.depends_on.iter().flatten();
    deps.map(|dep| {
        let result = ctx
            .tasks
            .state()
            .into_iter()
            .find(|t| t.namespace() == ns && &t.name_any() == dep)
            .and_then(|t| t.status.as_ref().and_then(|s| s.results.clone()))
            .unwrap_or(Value::Null);
        (dep.clone(), result)
    })
    .collect()
}

/// A result as the text a proplet takes (inputs and env are strings).
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub fn start_request(
    task: &Task,
    client_id: Option<&str>,
    parents: &BTreeMap<String, Value>,
) -> StartRequest {
    let spec = &task.spec;
    let uid = task.uid().unwrap_or_default();
    let mut inputs: Vec<String> = spec.inputs.iter().flatten().map(as_text).collect();
    let mut env = spec.env.clone().unwrap_or_default();
    for source in spec.results_from.iter().flatten() {
        let text = parents.get(&source.task).map(as_text).unwrap_or_default();
        match source.target {
            ResultTarget::Input => inputs.push(text),
            ResultTarget::Env => {
                env.insert(source.env_name(), text);
            }
        }
    }
    if let Some(client) = client_id {
        env.insert("PROPLET_ID".into(), client.to_string());
        env.insert("TASK_ID".into(), uid.clone());
    }
    let monitoring_profile = spec
        .monitoring_profile
        .as_ref()
        .map(|m| WireMonitoringProfile {
            enabled: m.enabled.unwrap_or(false),
            interval: m
                .interval
                .as_deref()
                .and_then(|i| i.parse::<kube::core::Duration>().ok())
                .map(|d| std::time::Duration::from(d).as_secs().max(1))
                .unwrap_or(10),
            collect_cpu: m.collect_cpu.unwrap_or(false),
            collect_memory: m.collect_memory.unwrap_or(false),
            collect_disk_io: m.collect_disk_io.unwrap_or(false),
            collect_threads: m.collect_threads.unwrap_or(false),
            collect_file_descriptors: m.collect_file_descriptors.unwrap_or(false),
            export_to_mqtt: m.export_to_mqtt.unwrap_or(false),
            retain_history: m.retain_history.unwrap_or(false),
            history_size: m.history_size.unwrap_or(0).max(0) as u64,
        });
    StartRequest {
        id: uid,
        name: spec
            .function_name
            .clone()
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| task.name_any()),
        state: 1,
        kind: match spec.kind {
            crate::api::task::TaskKind::Standard => "standard".into(),
            crate::api::task::TaskKind::Federated => "federated".into(),
        },
        image_url: spec.image_url.clone().unwrap_or_default(),
        file: spec
            .file
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .collect(),
        inputs,
        cli_args: spec.cli_args.clone().unwrap_or_default(),
        env: (!env.is_empty()).then_some(env),
        daemon: spec.daemon.unwrap_or(false),
        broadcast: client_id.is_none(),
        mode: spec.mode.map(|m| match m {
            crate::api::task::TaskMode::Infer => "infer".into(),
            crate::api::task::TaskMode::Train => "train".into(),
        }),
        encrypted: spec.encrypted.unwrap_or(false),
        kbs_resource_path: spec.kbs_resource_path.clone().unwrap_or_default(),
        proplet_id: client_id.map(str::to_string),
        priority: spec.priority,
        metadata: spec.metadata.clone().filter(Value::is_object),
        monitoring_profile,
        hal_storage_path: spec.hal_storage_path.clone(),
        parent_results: (!parents.is_empty()).then(|| parents.clone()),
    }
}

/// The clientIds that have answered a broadcast.
fn answered(status: &TaskStatus) -> Vec<String> {
    status
        .results
        .as_ref()
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

pub(super) fn timeout_of(task: &Task, ctx: &Context) -> Duration {
    task.spec
        .timeout_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(ctx.config.task_timeout.0)
}

async fn watch_running(task: &Task, ctx: &Context) -> Result<Action> {
    let mut status = task.status.clone().unwrap_or_default();
    let timeout = timeout_of(task, ctx);
    let elapsed = status
        .started_at
        .as_ref()
        .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
        .unwrap_or_default();
    if elapsed >= timeout {
        let msg = if task.spec.broadcast == Some(true) {
            let answered = answered(&status);
            let missing: Vec<&String> = status
                .broadcast_targets
                .iter()
                .filter(|c| !answered.contains(c))
                .collect();
            format!("no result within {}s from {missing:?}", timeout.as_secs())
        } else {
            format!("no result within {}s", timeout.as_secs())
        };
        stop(task, ctx, &status).await;
        let end = Ending {
            phase: TaskPhase::Failed,
            reason: "Timeout",
            event: Some((EventType::Warning, "Watch")),
            error: true,
        };
        end_task(task, ctx, status, end, msg).await?;
        return Ok(Action::await_change());
    }
    if task.spec.broadcast != Some(true) {
        let name = status.assigned_proplet.clone().unwrap_or_default();
        let ns = task.namespace();
        let proplet = ctx
            .proplets
            .state()
            .into_iter()
            .find(|p| p.namespace() == ns && p.name_any() == name);
        let gone = match &proplet {
            None => Some(format!("proplet {name} was deleted")),
            Some(p) if p.phase() == PropletPhase::Offline => {
                Some(format!("proplet {name} went Offline"))
            }
            _ => None,
        };
        if let Some(why) = gone {
            let end = Ending {
                phase: TaskPhase::Interrupted,
                reason: "Interrupted",
                event: Some((EventType::Warning, "Watch")),
                error: false,
            };
            end_task(task, ctx, status, end, why).await?;
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let uid = task.uid().unwrap_or_default();
    if let Some(app_name) = ctx.module_misses.take(&uid) {
        let msg = format!(
            "a proplet asked for module {app_name:?}, which the cluster does not hold (no Task with this \
             imageUrl and a spec.file, no ConfigMap labelled {}=true annotated {}={app_name:?}); the \
             proplet gives up after its own timeout",
            crate::registry::MODULE_LABEL,
            crate::registry::MODULE_NAME_ANNOTATION,
        );
        let g = task.metadata.generation;
        if set_condition(
            &mut status.conditions,
            "ModuleFound",
            ConditionStatus::False,
            "ModuleNotFound",
            &msg,
            g,
        ) {
            if let Err(e) = apply_status(&ctx.client, task, &status).await {
                ctx.module_misses.record(&uid, &app_name);
                return Err(e);
            }
            ctx.event(task, EventType::Warning, "ModuleNotFound", "Fetch", msg)
                .await;
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    if let Some(sample) = ctx.task_metrics.take_due(&uid, ctx.config.status_refresh.0) {
        status.latest_metrics = Some(sample);
        apply_status(&ctx.client, task, &status).await?;
    }
    Ok(Action::requeue(
        timeout - elapsed + Duration::from_millis(200),
    ))
}

async fn retry_interrupted(task: &Task, ctx: &Context) -> Result<Action> {
    let g = task.metadata.generation;
    let mut status = task.status.clone().unwrap_or_default();
    let attempts = status.attempts.unwrap_or(0);
    let allowed = task.spec.restart_policy.as_deref() != Some("Never");
    if !allowed || attempts >= ctx.config.max_task_attempts {
        return Ok(Action::await_change());
    }
    status.phase = Some(TaskPhase::Pending);
    status.assigned_proplet = None;
    status.assigned_client_id = None;
    status.job_name = None;
    status.started_at = None;
    status.finished_at = None;
    let msg = format!(
        "rescheduling after interruption (attempt {} of {})",
        attempts + 1,
        ctx.config.max_task_attempts
    );
    set_condition(
        &mut status.conditions,
        "Scheduled",
        ConditionStatus::False,
        "Rescheduling",
        &msg,
        g,
    );
    apply_status(&ctx.client, task, &status).await?;
    ctx.event(task, EventType::Normal, "Rescheduling", "Schedule", msg)
        .await;
    Ok(Action::requeue(Duration::from_millis(200)))
}

async fn record_results(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    pending: Vec<super::Received>,
) -> Result<Action> {
    let uid = task.uid().unwrap_or_default();
    let g = task.metadata.generation;
    let broadcast = task.spec.broadcast == Some(true);
    let mut changed = false;
    let mut last_received = None;
    for (result, received) in &pending {
        last_received = Some(*received);
        if !task.phase().is_active() && !broadcast {
            info!(task = %task.name_any(), phase = task.phase().as_str(), rv = ?task.resource_version(), "ignoring a result for a task that is not running");
            continue;
        }
        let from = result.proplet_id.clone();
        if broadcast {
            let key = from.unwrap_or_else(|| "unknown".into());
            let entry = match result.failure() {
                Some(e) => json!({"error": e}),
                None => result.results.clone(),
            };
            let mut map = status
                .results
                .take()
                .and_then(|v| match v {
                    Value::Object(m) => Some(m),
                    _ => None,
                })
                .unwrap_or_default();
            map.insert(key, entry);
            status.results = Some(Value::Object(map));
            changed = true;
            continue;
        }
        if let (Some(from), Some(assigned)) =
            (from.as_deref(), status.assigned_client_id.as_deref())
            && from != assigned
        {
            warn!(task = %task.name_any(), %from, %assigned, "ignoring a result from a proplet the task is not assigned to");
            continue;
        }
        settle(&mut status, result, g);
        changed = true;
        break;
    }
    if broadcast && changed {
        let answered = answered(&status);
        if status
            .broadcast_targets
            .iter()
            .all(|c| answered.contains(c))
        {
            let errors: Vec<String> = status
                .results
                .as_ref()
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.get("error").map(|e| format!("{k}: {e}")))
                        .collect()
                })
                .unwrap_or_default();
            status.finished_at = Some(now());
            if errors.is_empty() {
                status.phase = Some(TaskPhase::Completed);
                set_condition(
                    &mut status.conditions,
                    "Completed",
                    ConditionStatus::True,
                    "Succeeded",
                    "every proplet returned a result",
                    g,
                );
            } else {
                status.phase = Some(TaskPhase::Failed);
                status.error = Some(errors.join("; "));
                set_condition(
                    &mut status.conditions,
                    "Completed",
                    ConditionStatus::False,
                    "Failed",
                    &errors.join("; "),
                    g,
                );
            }
        }
    }
    if changed {
        apply_status(&ctx.client, task, &status).await?;
        if let Some(received) = last_received {
            metrics()
                .task_completion_seconds
                .observe(received.elapsed().as_secs_f64());
        }
        announce(task, ctx, &status).await;
    }
    ctx.results.done(&uid, pending.len());
    if !status.phase.is_some_and(TaskPhase::is_active) {
        ctx.task_metrics.forget(&uid);
    }
    Ok(if task.phase().is_active() || changed {
        Action::requeue(Duration::from_millis(100))
    } else {
        Action::await_change()
    })
}

/// Records one task's result (from a proplet or a Job's runner): completed, or failed with its error.
pub(super) fn settle(status: &mut TaskStatus, result: &TaskResult, g: Option<i64>) {
    status.finished_at = Some(now());
    status.results = Some(result.results.clone());
    match result.failure() {
        Some(err) => {
            status.phase = Some(TaskPhase::Failed);
            status.error = Some(err.to_string());
            set_condition(
                &mut status.conditions,
                "Completed",
                ConditionStatus::False,
                "Failed",
                err,
                g,
            );
        }
        None => {
            status.phase = Some(TaskPhase::Completed);
            status.error = None;
            set_condition(
                &mut status.conditions,
                "Completed",
                ConditionStatus::True,
                "Succeeded",
                "the task returned a result",
                g,
            );
        }
    }
}

/// The Event for a task that just completed or failed.
pub(super) async fn announce(task: &Task, ctx: &Context, status: &TaskStatus) {
    match status.phase {
        Some(TaskPhase::Completed) => {
            ctx.routine_event(task, "Completed", "Result", summary(status))
                .await
        }
        Some(TaskPhase::Failed) => {
            let err = status.error.clone().unwrap_or_default();
            ctx.event(task, EventType::Warning, "Failed", "Result", err)
                .await
        }
        _ => {}
    }
}

fn summary(status: &TaskStatus) -> String {
    let text = match &status.results {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let short: String = text.chars().take(200).collect();
    format!("result: {short}")
}

/// Adds the finalizer; returns the task as written (its new resourceVersion matters for the next write).
async fn ensure_finalizer(task: &Task, ctx: &Context) -> Result<Task> {
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
        .map_err(super::conflict)?;
    metrics().api_write("tasks", "patch");
    Ok(written)
}

/// Sends a stop for a running task (bounded: the MQTT queue either takes it or the publish times out).
async fn stop(task: &Task, ctx: &Context, status: &TaskStatus) {
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
        metrics()
            .mqtt_published_total
            .with_label_values(&["stop", outcome])
            .inc();
    }
}

async fn cleanup(task: &Task, ctx: &Context) -> Result<Action> {
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
        Ok(_) => metrics().api_write("tasks", "patch"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}
