//! Task controller: choose a proplet, persist the assignment, publish the start (or, for k8s proplets on
//! the job backend, hand over to [`job_backend`]), then record the result; time out tasks that never
//! answer, and reschedule tasks whose proplet went away.
//!
//! One file per job: [`gates`] (may it be placed yet), [`placement`] (where), [`launch`] (the start and
//! stop on the wire), [`wire`] (the messages), [`outcome`] (how it ends), [`job_backend`] (k8s proplets).
pub mod broadcast;
pub mod gates;
pub mod job_backend;
pub mod launch;
pub mod outcome;
pub mod placement;
pub mod reconnect;
pub mod wire;

use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use kube::runtime::reflector::ObjectRef;

use super::runtime::{Seen, Shutdown, Waker, Watches, owner};
use crate::api::proplet::Proplet;
use crate::api::task::{Task, TaskPhase};
use crate::context::Context;
use crate::controllers::schedule;
use crate::error::Result;

pub use gates::validate;
pub use launch::FINALIZER;
pub use wire::{parent_results, start_request};

/// What wakes a Task: its own changes; for a task waiting on others, the creation, end or deletion of a
/// dependency, or the end or deletion of a task holding a slot it waits for; a change of the proplet it waits for or runs on; its Job.
pub fn wake_ups(ctx: &Arc<Context>, w: &mut Watches, me: &Waker<Task>) {
    w.tasks.wake_self(me);
    let c = Arc::clone(ctx);
    w.tasks.wake(me, move |t, seen| {
        if seen == Seen::Deleted || t.phase().is_terminal() {
            // A slot may have freed: the capacity queue of the namespace moves too.
            let mut woken = dependents(&c, t);
            woken.extend(queued(&c, t));
            woken
        } else if t.status.is_none() {
            // Just created (never reconciled): a task that waits for it as an unknown dependency looks
            // again, and finds it (or a cycle through it). Nothing else would wake it.
            dependents(&c, t)
        } else {
            Vec::new()
        }
    });
    let c = Arc::clone(ctx);
    w.proplets.wake(me, move |p, _| tasks_affected_by(&c, p));
    let c = Arc::clone(ctx);
    w.tasks.on_object(move |t, seen| {
        if seen == Seen::Deleted {
            stop_deleted(&c, t);
        }
    });
    if let Some(jobs) = &mut w.jobs {
        jobs.wake(me, |j, _| owner::<Task, _>(j).into_iter().collect());
    }
}

/// A running task deleted without our finalizer (it had not run long enough to earn one): its stop goes out
/// from the delete event. (With the finalizer, the controller sends it before letting the Task go.)
fn stop_deleted(ctx: &Arc<Context>, t: &Task) {
    // It needs no start from us any more. Results still waiting for it are moot if it is gone; a shard's
    // watch also says "deleted" of a Task that only moved to another shard and may come back (a live
    // handover after a restart): those are kept, parked, until the sweep drops them. Forgetting them cost
    // a task run twice when it came back without its result.
    let uid = t.uid().unwrap_or_default();
    if ctx.ownership.is_sharded() {
        ctx.results.park(&uid);
    } else {
        ctx.results.forget(&uid);
    }
    ctx.launched.forget(&uid);
    let status = t.status.clone().unwrap_or_default();
    let owned = status
        .assigned_client_id
        .as_deref()
        .is_none_or(|c| ctx.ownership.owns_client(c));
    // A deletion that waited for finalizers has been through `launch::cleanup`, which sent the stop.
    let waited = t.metadata.deletion_timestamp.is_some();
    if !t.phase().is_active() || waited || status.job_name.is_some() || !owned {
        ctx.broadcasts.forget(&uid);
        return;
    }
    let (ctx, t) = (Arc::clone(ctx), t.clone());
    tokio::spawn(async move {
        launch::stop(&t, &ctx, &status).await;
        ctx.broadcasts.forget(&uid);
    });
}

/// Tasks to look at again when a proplet changes: those waiting for one in its namespace, and those on it.
fn tasks_affected_by(ctx: &Context, p: &Proplet) -> Vec<ObjectRef<Task>> {
    let ns = p.namespace();
    let name = p.name_any();
    ctx.tasks
        .state()
        .iter()
        .filter(|t| t.namespace() == ns)
        .filter(|t| {
            // Pending tasks only when they wait for a proplet: a fresh one has its own event, and waking
            // every pending task on every proplet change is quadratic in a burst.
            crate::scheduling::waiting_for_proplet(t)
                || (t.phase().is_active()
                    && t.status
                        .as_ref()
                        .and_then(|s| s.assigned_proplet.as_deref())
                        == Some(name.as_str()))
        })
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// Tasks waiting for room on a proplet in `t`'s namespace.
fn queued(ctx: &Context, t: &Task) -> Vec<ObjectRef<Task>> {
    let ns = t.namespace();
    ctx.tasks
        .state()
        .iter()
        .filter(|q| q.namespace() == ns && crate::scheduling::is_queued(q))
        .map(|q| ObjectRef::from_obj(q.as_ref()))
        .collect()
}

/// Pending tasks that name `t` in `dependsOn`.
fn dependents(ctx: &Context, t: &Task) -> Vec<ObjectRef<Task>> {
    let ns = t.namespace();
    let name = t.name_any();
    ctx.tasks
        .state()
        .iter()
        .filter(|d| d.namespace() == ns && d.phase() == TaskPhase::Pending)
        .filter(|d| d.spec.depends_on.iter().flatten().any(|n| n == &name))
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// Keeps the tasks-by-phase gauge current, from the cache (no API call), for dashboards.
pub async fn report_phases(ctx: Arc<Context>, shutdown: Shutdown) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = &mut shutdown => return,
        }
        let mut counts = std::collections::BTreeMap::new();
        for t in ctx.tasks.state() {
            *counts.entry(t.phase().as_str()).or_insert(0i64) += 1;
        }
        for phase in TaskPhase::ALL {
            let n = counts.get(phase.as_str()).copied().unwrap_or(0);
            ctx.metrics
                .tasks
                .with_label_values(&[phase.as_str()])
                .set(n);
        }
    }
}

pub async fn reconcile(task: Arc<Task>, ctx: Arc<Context>) -> Result<Action> {
    let task = ctx.own_writes.latest(task);
    // A fenced shard's Task in our cache that is not on a proplet we took over: another survivor's, or
    // waiting for the leader to hand it back to be claimed.
    if ctx.ownership.is_foreign_task(&task) {
        return Ok(Action::await_change());
    }
    if task.metadata.deletion_timestamp.is_some() {
        return launch::cleanup(&task, &ctx).await;
    }
    let status = task.status.clone().unwrap_or_default();
    let uid = task.uid().unwrap_or_default();

    // Results first: they may arrive before our own write of `running` is back from the watch, so a
    // task that does not look active is read afresh before its result is judged late.
    let pending = ctx.results.peek(&uid);
    if !pending.is_empty() {
        let current = if task.phase().is_active() {
            Some((*task).clone())
        } else {
            launch::fresh(&ctx, &task).await?
        };
        return match current {
            Some(t) => {
                let status = t.status.clone().unwrap_or_default();
                outcome::record_results(&t, &ctx, status, pending).await
            }
            None => {
                ctx.results.done(&uid, pending.len());
                ctx.task_metrics.forget(&uid);
                Ok(Action::await_change())
            }
        };
    }

    // Results are recorded by whoever holds the Task (a status write, resourceVersion-checked); anything
    // that may publish waits for the proplet to be ours (not moving away).
    if let Some(client) = status.assigned_client_id.as_deref()
        && !ctx.ownership.holds_client(client)
    {
        return Ok(Action::await_change());
    }
    if !ctx
        .ownership
        .may_act_for(status.assigned_client_id.as_deref())
    {
        // Our Lease (or the takeover of its proplet) is being confirmed late: nothing is decided until it
        // is fresh again.
        return Ok(Action::requeue(ctx.config.retry_period.0));
    }

    if let Err(msg) = validate(&task) {
        return outcome::refuse(&task, &ctx, status, "InvalidSpec", &msg).await;
    }

    match task.phase() {
        // A stale view cannot dispatch twice: the assignment is written (resourceVersion-checked) first.
        TaskPhase::Pending => placement::dispatch(&task, &ctx).await,
        TaskPhase::Scheduled => {
            // Left by an operator version that wrote the assignment before the start: launched now.
            let fresh = launch::fresh(&ctx, &task).await?;
            match fresh {
                Some(t) if t.phase() == TaskPhase::Scheduled => {
                    launch::launch_scheduled(&t, &ctx).await
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
                if task.spec.broadcast == Some(true) {
                    broadcast::keep_listening(&task, &ctx).await?;
                }
                if let Some(wait) = launch::resume(&task, &ctx).await? {
                    return Ok(wait);
                }
                outcome::watch_running(&task, &ctx).await
            }
        }
        TaskPhase::Interrupted => outcome::retry_interrupted(&task, &ctx).await,
        TaskPhase::Completed | TaskPhase::Failed | TaskPhase::Skipped => {
            schedule::recur(&task, &ctx).await
        }
    }
}
