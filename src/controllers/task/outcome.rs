//! How a task ends: results recorded (one proplet's, or every target's of a broadcast), timeouts,
//! interruptions and their retries, refusals, and the Event that goes with each.
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::launch::{
    FINALIZER, FINALIZER_AFTER, assigned_proplet, ensure_finalizer, stop, timeout_of, write_status,
};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::PropletPhase;
use crate::api::task::{Task, TaskPhase, TaskStatus};
use crate::context::Context;
use crate::controllers::now;
use crate::error::Result;
use crate::memory::Received;
use crate::mqtt::wire::TaskResult;

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
    crate::controllers::report_blocked(ctx, task, &old, &status, reason, "Validate", msg).await?;
    Ok(Action::await_change())
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
    let written = write_status(ctx, task, status.clone()).await?;
    if let Some((type_, action)) = end.event {
        ctx.event(task, type_, end.reason, action, msg).await;
    }
    Ok(written)
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

pub(super) async fn watch_running(task: &Task, ctx: &Context) -> Result<Action> {
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
        let gone = match &assigned_proplet(ctx, task) {
            None => Some(format!("proplet {name} was deleted")),
            Some(p) if p.phase() == PropletPhase::Offline => {
                Some(format!("proplet {name} went Offline"))
            }
            _ => None,
        };
        if let Some(why) = gone {
            tracing::info!(task = %task.name_any(), shard = ?ctx.ownership.identity(), %why, "task interrupted");
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
            if let Err(e) = write_status(ctx, task, status.clone()).await {
                ctx.module_misses.record(&uid, &app_name);
                return Err(e);
            }
            ctx.event(task, EventType::Warning, "ModuleNotFound", "Fetch", msg)
                .await;
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let mut wrote = false;
    if let Some(sample) = ctx.task_metrics.take_due(&uid, ctx.config.status_refresh.0) {
        status.latest_metrics = Some(sample);
        write_status(ctx, task, status.clone()).await?;
        wrote = true;
    }
    // Still running after a while: now it is worth a finalizer (its stop must be sent on deletion, even
    // when this operator is not running at that moment). The write is left for the next pass when a
    // status write just went out (its resourceVersion moved).
    let has_finalizer = task.finalizers().iter().any(|f| f == FINALIZER);
    if !has_finalizer && elapsed >= FINALIZER_AFTER {
        if wrote {
            return Ok(Action::requeue(Duration::from_millis(100)));
        }
        ensure_finalizer(task, ctx).await?;
    }
    let mut next = timeout - elapsed + Duration::from_millis(200);
    if !has_finalizer && elapsed < FINALIZER_AFTER {
        next = next.min(FINALIZER_AFTER - elapsed + Duration::from_millis(100));
    }
    Ok(Action::requeue(next))
}

pub(super) async fn retry_interrupted(task: &Task, ctx: &Context) -> Result<Action> {
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
    write_status(ctx, task, status.clone()).await?;
    ctx.event(task, EventType::Normal, "Rescheduling", "Schedule", msg)
        .await;
    Ok(Action::requeue(Duration::from_millis(200)))
}

pub(super) async fn record_results(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    pending: Vec<Received>,
) -> Result<Action> {
    let uid = task.uid().unwrap_or_default();
    let changed = apply_results(task, &mut status, pending.iter().map(|(r, _)| r));
    tracing::debug!(task = %task.name_any(), %uid, changed, results = pending.len(), phase = ?status.phase, "results applied");
    let last_received = pending.last().map(|(_, at)| *at);
    if changed {
        write_status(ctx, task, status.clone()).await?;
        if let Some(received) = last_received {
            ctx.metrics
                .task_completion_seconds
                .observe(received.elapsed().as_secs_f64());
        }
        announce(task, ctx, &status).await;
    }
    ctx.results.done(&uid, pending.len());
    if !status.phase.is_some_and(TaskPhase::is_active) {
        ctx.task_metrics.forget(&uid);
    }
    // A task waiting to be placed again is looked at again too: the results were all this reconcile did.
    Ok(
        if task.phase().is_active() || changed || task.phase() == TaskPhase::Pending {
            Action::requeue(Duration::from_millis(100))
        } else {
            Action::await_change()
        },
    )
}

/// Applies received results to `status`; true when it changed. A single task takes the first result from
/// its assigned proplet while it is active (others are logged and ignored); a broadcast collects one
/// result per clientId and ends when every target has answered (failed if any answered with an error).
pub(super) fn apply_results<'a>(
    task: &Task,
    status: &mut TaskStatus,
    results: impl IntoIterator<Item = &'a TaskResult>,
) -> bool {
    let g = task.metadata.generation;
    let broadcast = task.spec.broadcast == Some(true);
    let mut changed = false;
    for result in results {
        if !task.phase().is_active() && !broadcast {
            // An attempt interrupted because its proplet looked gone (e.g. this operator was cut from the
            // broker) that finished after all: only a proplet sent this task's start answers with its id, so
            // the result is the task's, and running it again would be double work.
            let interrupted = matches!(task.phase(), TaskPhase::Interrupted | TaskPhase::Pending)
                && status.attempts.unwrap_or(0) > 0;
            let daemon_ack = task.spec.daemon == Some(true) && is_empty(&result.results);
            if interrupted && result.failure().is_none() && !daemon_ack {
                info!(task = %task.name_any(), from = ?result.proplet_id, "a result of an interrupted attempt: the task completed after all");
                status.assigned_client_id = result.proplet_id.clone();
                settle(status, result, g);
                changed = true;
                break;
            }
            info!(task = %task.name_any(), phase = task.phase().as_str(), rv = ?task.resource_version(), "ignoring a result for a task that is not running");
            continue;
        }
        // The real proplet answers a daemon's start at once with an empty result: the daemon runs on
        // until it is stopped, times out or its proplet goes Offline.
        if task.spec.daemon == Some(true) && result.failure().is_none() && is_empty(&result.results)
        {
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
        settle(status, result, g);
        changed = true;
        break;
    }
    if broadcast && changed {
        let answered = answered(status);
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
    changed
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        _ => false,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn task(broadcast: bool, status: Value) -> Task {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {"name": "t", "namespace": "ns", "generation": 1},
            "spec": {"name": "t", "file": "AGFzbQ==", "broadcast": broadcast},
            "status": status,
        }))
        .expect("task")
    }

    fn result(from: &str, results: Value, error: Option<&str>) -> TaskResult {
        TaskResult {
            task_id: "uid".into(),
            proplet_id: Some(from.into()),
            results,
            error: error.map(str::to_string),
        }
    }

    fn merged(t: &Task, results: &[TaskResult]) -> (bool, TaskStatus) {
        let mut status = t.status.clone().unwrap_or_default();
        let changed = apply_results(t, &mut status, results);
        (changed, status)
    }

    #[test]
    fn an_interrupted_attempt_that_finished_after_all_completes_the_task() {
        // Interrupted (its proplet looked gone), then put back to pending for another attempt.
        for phase in ["interrupted", "pending"] {
            let t = task(false, json!({"phase": phase, "attempts": 1}));
            let (changed, st) = merged(&t, &[result("c1", json!("42"), None)]);
            assert!(changed, "{phase}: the late result is the task's");
            assert_eq!(st.phase, Some(TaskPhase::Completed));
            assert_eq!(st.assigned_client_id.as_deref(), Some("c1"));
            let (changed, _) = merged(&t, &[result("c1", json!(""), Some("boom"))]);
            assert!(!changed, "{phase}: a failed attempt is retried instead");
        }
        let fresh = task(false, json!({"phase": "pending"}));
        let (changed, _) = merged(&fresh, &[result("c1", json!("42"), None)]);
        assert!(!changed, "never started: a result for it proves nothing");
        let done = task(false, json!({"phase": "completed", "attempts": 1}));
        assert!(!merged(&done, &[result("c1", json!("43"), None)]).0);
    }

    #[test]
    fn a_running_task_takes_its_proplets_result_and_no_other() {
        let t = task(false, json!({"phase": "running", "assignedClientId": "c1"}));
        let (changed, _) = merged(&t, &[result("c2", json!("7"), None)]);
        assert!(!changed, "a stranger's result is ignored");
        let (changed, st) = merged(
            &t,
            &[
                result("c2", json!("7"), None),
                result("c1", json!("42"), None),
            ],
        );
        assert!(changed);
        assert_eq!(st.phase, Some(TaskPhase::Completed));
        assert_eq!(st.results, Some(json!("42")));
        let (_, st) = merged(&t, &[result("c1", Value::Null, Some("trap: unreachable"))]);
        assert_eq!(st.phase, Some(TaskPhase::Failed));
        assert_eq!(st.error.as_deref(), Some("trap: unreachable"));
    }

    #[test]
    fn a_result_for_a_task_that_is_not_running_changes_nothing() {
        for phase in ["completed", "failed", "pending", "interrupted"] {
            let t = task(false, json!({"phase": phase, "assignedClientId": "c1"}));
            let (changed, st) = merged(&t, &[result("c1", json!("1"), None)]);
            assert!(!changed, "{phase}");
            assert_eq!(st.results, None);
        }
    }

    #[test]
    fn a_daemon_keeps_running_after_its_immediate_empty_answer() {
        let mut t = task(false, json!({"phase": "running", "assignedClientId": "c1"}));
        t.spec.daemon = Some(true);
        let (changed, st) = merged(&t, &[result("c1", json!(""), None)]);
        assert!(!changed);
        assert_eq!(st.phase, Some(TaskPhase::Running));
        let (_, st) = merged(&t, &[result("c1", Value::Null, Some("killed"))]);
        assert_eq!(
            st.phase,
            Some(TaskPhase::Failed),
            "a daemon that fails ends"
        );
    }

    #[test]
    fn a_broadcast_ends_when_every_target_answered() {
        let t = task(
            true,
            json!({"phase": "running", "broadcastTargets": ["a", "b"], "results": {}}),
        );
        let (changed, st) = merged(&t, &[result("a", json!("1"), None)]);
        assert!(changed);
        assert_eq!(st.phase, Some(TaskPhase::Running), "b has not answered");
        let (_, st) = merged(
            &t,
            &[result("a", json!("1"), None), result("b", json!("2"), None)],
        );
        assert_eq!(st.phase, Some(TaskPhase::Completed));
        assert_eq!(st.results, Some(json!({"a": "1", "b": "2"})));
        let (_, st) = merged(
            &t,
            &[
                result("a", json!("1"), None),
                result("b", Value::Null, Some("oom")),
            ],
        );
        assert_eq!(st.phase, Some(TaskPhase::Failed));
        assert!(
            st.error
                .is_some_and(|e| e.contains("b") && e.contains("oom"))
        );
    }
}
