//! Capacity and priority. A proplet with a task limit (`spec.maxConcurrentTasks` or
//! `--max-tasks-per-proplet`) takes a waiting task only while its free slots outnumber the waiting tasks
//! ahead of it that could use the same proplet: higher `priority` first, then older (creation time, then
//! name). Every task reaches the same verdict from the same store contents, so no queue is kept anywhere
//! but in the Tasks themselves.
pub mod cron;
pub mod dag;

use std::cmp::Reverse;
use std::sync::Arc;

use kube::ResourceExt;

use crate::api::common::{ConditionStatus, find_condition};
use crate::api::proplet::Proplet;
use crate::api::task::{Task, TaskPhase};

/// The `Scheduled=False` reason of a task held back by capacity.
pub const QUEUED: &str = "Queued";
pub const QUEUED_MESSAGE: &str = "no fitting proplet has room: waiting for a running task to end, \
     behind waiting tasks of higher priority or older";

/// Whether `t` is pending because no proplet could take it (a proplet change may let it go).
pub fn waiting_for_proplet(t: &Task) -> bool {
    t.phase() == TaskPhase::Pending
        && t.status.as_ref().is_some_and(|s| {
            find_condition(&s.conditions, "Scheduled")
                .is_some_and(|c| matches!(c.reason.as_deref(), Some("NoProplet") | Some(QUEUED)))
        })
}

/// Active (scheduled or running) tasks per (namespace, proplet name), in one pass over the tasks.
pub fn active_counts(tasks: &[Arc<Task>]) -> std::collections::HashMap<(String, String), i64> {
    let mut counts = std::collections::HashMap::new();
    for t in tasks.iter().filter(|t| t.phase().is_active()) {
        if let Some(p) = t.status.as_ref().and_then(|s| s.assigned_proplet.clone()) {
            *counts
                .entry((t.namespace().unwrap_or_default(), p))
                .or_insert(0) += 1;
        }
    }
    counts
}

/// Whether `t` waits in the capacity queue (a finishing task must wake it).
pub fn is_queued(t: &Task) -> bool {
    t.phase() == TaskPhase::Pending
        && t.status.as_ref().is_some_and(|s| {
            find_condition(&s.conditions, "Scheduled")
                .is_some_and(|c| c.reason.as_deref() == Some(QUEUED))
        })
}

/// Sort key of the wait queue: smaller goes first.
pub fn queue_key(t: &Task) -> (Reverse<i32>, Option<jiff::Timestamp>, String) {
    (
        Reverse(t.spec.priority),
        t.metadata.creation_timestamp.as_ref().map(|c| c.0),
        t.name_any(),
    )
}

/// A pending task that would dispatch now if a proplet had room (not refused, not waiting for
/// dependencies, not a broadcast).
pub fn waiting_for_a_slot(t: &Task) -> bool {
    if t.phase() != TaskPhase::Pending
        || t.metadata.deletion_timestamp.is_some()
        || t.spec.broadcast == Some(true)
    {
        return false;
    }
    let conditions = t
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let refused =
        find_condition(conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::False);
    let gated = find_condition(conditions, "Scheduled")
        .is_some_and(|c| c.reason.as_deref() == Some("WaitingForDependencies"));
    !refused && !gated
}

/// The task limit of `p`, if any.
pub fn limit(p: &Proplet, default: u32) -> Option<i64> {
    match p.spec.max_concurrent_tasks {
        Some(n) => Some(i64::from(n.max(1))),
        None if default > 0 => Some(i64::from(default)),
        None => None,
    }
}

/// Whether `task` may take a slot on `p` now. `active`: tasks scheduled or running on `p`; `tasks`: every
/// task the replica sees; `could_use(t, p)`: whether a waiting task `t` could be placed on `p`.
pub fn admit(
    task: &Task,
    p: &Proplet,
    limit: Option<i64>,
    active: i64,
    tasks: &[Arc<Task>],
    could_use: impl Fn(&Task, &Proplet) -> bool,
) -> Result<(), String> {
    let Some(limit) = limit else {
        return Ok(());
    };
    if active >= limit {
        return Err(format!("busy ({active}/{limit} tasks)"));
    }
    let me = queue_key(task);
    let ns = task.namespace();
    let ahead = tasks
        .iter()
        .filter(|t| t.namespace() == ns && t.uid() != task.uid())
        .filter(|t| waiting_for_a_slot(t) && queue_key(t) < me)
        .filter(|t| could_use(t, p))
        .count() as i64;
    if active + ahead >= limit {
        return Err(format!(
            "{ahead} task(s) of higher priority or older wait for its {} free slot(s)",
            limit - active
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(name: &str, priority: i32, created: &str) -> Arc<Task> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
                "metadata": {"name": name, "namespace": "ns", "uid": name, "creationTimestamp": created},
                "spec": {"name": name, "file": "AA==", "priority": priority},
            }))
            .expect("task"),
        )
    }

    fn proplet(max: Option<i32>) -> Proplet {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Proplet",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"type": "external", "maxConcurrentTasks": max,
                     "connectionConfig": {"domainId": "d", "channelId": "c", "clientId": "p", "clientKey": "k",
                                          "mqttAddress": "tcp://b:1883"}},
        }))
        .expect("proplet")
    }

    #[test]
    fn higher_priority_then_older_goes_first() {
        let low = task("a-low", 10, "2026-01-01T00:00:00Z");
        let high = task("z-high", 90, "2026-01-01T00:00:05Z");
        let high_later = task("b-high", 90, "2026-01-01T00:00:09Z");
        let all = vec![low.clone(), high.clone(), high_later.clone()];
        let p = proplet(Some(1));
        let any = |_: &Task, _: &Proplet| true;
        assert!(admit(&high, &p, limit(&p, 0), 0, &all, any).is_ok());
        let e = admit(&high_later, &p, limit(&p, 0), 0, &all, any).expect_err("behind z-high");
        assert!(e.contains("1 task(s)"), "{e}");
        assert!(admit(&low, &p, limit(&p, 0), 0, &all, any).is_err());
        // Two slots: the two high ones go, the low one waits.
        let p2 = proplet(Some(2));
        assert!(admit(&high_later, &p2, limit(&p2, 0), 0, &all, any).is_ok());
        assert!(admit(&low, &p2, limit(&p2, 0), 0, &all, any).is_err());
        // Busy: nobody goes.
        assert!(
            admit(&high, &p, limit(&p, 0), 1, &all, any)
                .expect_err("busy")
                .contains("busy")
        );
        // A task ahead that cannot use this proplet does not hold anyone back.
        assert!(
            admit(&low, &p, limit(&p, 0), 0, &all, |t: &Task, _: &Proplet| t
                .name_any()
                == "a-low")
            .is_ok()
        );
    }

    #[test]
    fn limits_come_from_the_proplet_or_the_default() {
        assert_eq!(limit(&proplet(None), 0), None);
        assert_eq!(limit(&proplet(None), 4), Some(4));
        assert_eq!(limit(&proplet(Some(2)), 4), Some(2));
        let p = proplet(None);
        let t = task("t", 50, "2026-01-01T00:00:00Z");
        assert!(
            admit(&t, &p, None, 1000, &[], |_: &Task, _: &Proplet| true).is_ok(),
            "unlimited"
        );
    }
}
