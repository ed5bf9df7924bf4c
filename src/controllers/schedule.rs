//! Cron for Tasks. A task with `schedule` waits for its next tick (`status.nextRun`, computed in
//! `timezone`) before it dispatches. A non-recurring task runs once, at its first tick. A recurring one
//! (`isRecurring`) runs at every tick: when a run has ended and the next tick has come, the run goes into
//! `status.history` (the last 10) and the task starts again. A tick that comes while the previous run is
//! still going is skipped, not started twice (`Recurring=False, reason=TickSkipped`, an Event).
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::Value;

use crate::api::common::{ConditionStatus, set_condition};
use crate::api::task::{RunRecord, Task, TaskPhase, TaskStatus};
use crate::context::Context;
use crate::error::Result;
use crate::scheduling::cron::{self, Schedule};

const HISTORY: usize = 10;
const TEXT_LIMIT: usize = 256;

/// The task's schedule, if it has one (an error is an invalid spec).
pub fn schedule_of(task: &Task) -> std::result::Result<Option<Schedule>, String> {
    let spec = &task.spec;
    let expr = spec.schedule.as_deref().map(str::trim).unwrap_or_default();
    if expr.is_empty() {
        if spec.is_recurring == Some(true) {
            return Err("isRecurring needs a schedule".into());
        }
        return Ok(None);
    }
    cron::parse(expr, spec.timezone.as_deref()).map(Some)
}

fn recurring(task: &Task) -> bool {
    task.spec.is_recurring == Some(true)
}

fn until(t: &Time, now: jiff::Timestamp) -> Duration {
    t.0.duration_since(now).unsigned_abs()
}

/// For a pending task: `Ok(None)` when it may dispatch now (its tick has come, or it has no schedule);
/// otherwise what to do while it waits. On dispatch, `status.nextRun` moves to the tick after this one
/// (recurring) or is cleared.
pub async fn pending_gate(
    task: &Task,
    ctx: &Context,
    status: &mut TaskStatus,
    old: &TaskStatus,
) -> Result<Option<Action>> {
    let Ok(Some(schedule)) = schedule_of(task) else {
        return Ok(None);
    };
    let now = ctx.clock.now();
    let tick = match &status.next_run {
        Some(t) => t.clone(),
        None => {
            let from = task
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|c| c.0)
                .unwrap_or(now);
            let Some(next) = schedule.next_after(from) else {
                return Ok(None);
            };
            Time(next)
        }
    };
    if tick.0 > now {
        status.next_run = Some(tick.clone());
        let g = task.metadata.generation;
        set_condition(
            &mut status.conditions,
            "Scheduled",
            ConditionStatus::False,
            "WaitingForTick",
            "waiting for the next tick of spec.schedule (status.nextRun)",
            g,
        );
        if status != old {
            stamped(status);
            ctx.apply_status(task, status).await?;
        }
        return Ok(Some(Action::requeue(until(&tick, now))));
    }
    status.next_run = if recurring(task) {
        schedule.next_after(now).map(Time)
    } else {
        None
    };
    Ok(None)
}

/// For a running recurring task: a tick that has come is skipped (recorded once) and the next one set.
pub async fn skip_overdue_tick(task: &Task, ctx: &Context) -> Result<Option<Action>> {
    if !recurring(task) {
        return Ok(None);
    }
    let Ok(Some(schedule)) = schedule_of(task) else {
        return Ok(None);
    };
    let mut status = task.status.clone().unwrap_or_default();
    let now = ctx.clock.now();
    let Some(tick) = status.next_run.clone().filter(|t| t.0 <= now) else {
        return Ok(None);
    };
    let msg = format!(
        "the run due at {} was not started: the previous run was still going",
        tick.0
    );
    status.next_run = schedule.next_after(now).map(Time);
    set_condition(
        &mut status.conditions,
        "Recurring",
        ConditionStatus::False,
        "TickSkipped",
        &msg,
        task.metadata.generation,
    );
    stamped(&mut status);
    ctx.apply_status(task, &status).await?;
    ctx.event(task, EventType::Normal, "TickSkipped", "Schedule", msg)
        .await;
    Ok(Some(Action::requeue(Duration::from_millis(200))))
}

fn text(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.chars().take(TEXT_LIMIT).collect()
}

/// For an ended task: a recurring one starts again at its next tick.
pub async fn recur(task: &Task, ctx: &Context) -> Result<Action> {
    if !recurring(task) {
        return Ok(Action::await_change());
    }
    let Ok(Some(schedule)) = schedule_of(task) else {
        return Ok(Action::await_change());
    };
    let old = task.status.clone().unwrap_or_default();
    let now = ctx.clock.now();
    let tick = match &old.next_run {
        Some(t) => t.clone(),
        None => {
            let Some(next) = schedule.next_after(now) else {
                return Ok(Action::await_change());
            };
            let mut status = old.clone();
            status.next_run = Some(Time(next));
            stamped(&mut status);
            ctx.apply_status(task, &status).await?;
            return Ok(Action::requeue(until(&Time(next), now)));
        }
    };
    if tick.0 > now {
        return Ok(Action::requeue(until(&tick, now)));
    }
    let mut status = old.clone();
    let record = RunRecord {
        started_at: status.started_at.take(),
        finished_at: status.finished_at.take(),
        phase: status.phase,
        results: status.results.take().as_ref().map(text),
        error: status
            .error
            .take()
            .map(|e| e.chars().take(TEXT_LIMIT).collect()),
    };
    status.history.push(record);
    let excess = status.history.len().saturating_sub(HISTORY);
    status.history.drain(..excess);
    status.phase = Some(TaskPhase::Pending);
    status.assigned_proplet = None;
    status.assigned_client_id = None;
    status.attempts = None;
    status.job_name = None;
    status.broadcast_targets.clear();
    status.latest_metrics = None;
    status
        .conditions
        .retain(|c| c.type_ == "Ready" || c.type_ == "Recurring");
    // next_run stays at the tick that has come: the next pass dispatches at once.
    stamped(&mut status);
    ctx.apply_status(task, &status).await?;
    tracing::info!(task = %task.name_any(), runs = status.history.len(), "recurring task starts again");
    Ok(Action::requeue(Duration::from_millis(100)))
}

/// Every Task status write carries `updatedAt` (it costs no extra write).
fn stamped(status: &mut TaskStatus) {
    status.updated_at = Some(super::now());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(spec: Value) -> Task {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {"name": "t", "namespace": "ns"}, "spec": spec,
        }))
        .expect("task")
    }

    #[test]
    fn schedules_are_checked_with_the_spec() {
        assert!(
            schedule_of(&task(json!({"name": "t"})))
                .expect("none")
                .is_none()
        );
        let e =
            schedule_of(&task(json!({"name": "t", "isRecurring": true}))).expect_err("no schedule");
        assert!(e.contains("schedule"));
        let e = schedule_of(&task(
            json!({"name": "t", "schedule": "* * * * *", "timezone": "Nowhere/Town"}),
        ))
        .expect_err("zone");
        assert!(e.contains("Nowhere/Town"));
        assert!(
            schedule_of(&task(
                json!({"name": "t", "schedule": "*/5 * * * *", "timezone": "Asia/Tokyo"})
            ))
            .expect("ok")
            .is_some()
        );
    }
}
