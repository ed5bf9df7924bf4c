//! Placing a pending task: its gates (schedule, dependencies), then the proplet it goes to — the least
//! loaded that fits and has room — or the reason it waits; k8s proplets on the job backend hand over to
//! [`super::job_backend`].
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::gates::{dependency_cycle, dependency_gate};
use super::job_backend;
use super::launch::{
    WAIT_FOR_PROPLET, dispatch_broadcast, ensure_finalizer, publish_and_mark_running,
};
use super::outcome::{Ending, end_task, refuse};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::{Proplet, PropletType};
use crate::api::task::{PreferredPropletType, Task, TaskPhase};
use crate::config::K8sTaskBackend;
use crate::context::Context;
use crate::controllers::{now, schedule, selection};
use crate::error::Result;
use crate::scheduling;

pub(super) async fn dispatch(task: &Task, ctx: &Context) -> Result<Action> {
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
                ctx.apply_status(task, &status).await?;
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
                ctx.apply_status(task, &status).await?;
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
    let scheduled = ctx.apply_status(&task, &status).await?;
    publish_and_mark_running(&scheduled, ctx).await
}
