//! Claiming tasks no shard holds yet. Each live shard watches unlabelled Tasks; the ring orders the
//! shards for each task (a task pinned to a proplet asks that proplet's shard first), the first claims at
//! once and each next one only after a grace period per rank, so that claims rarely race; a race that
//! happens is settled by the resourceVersion-checked label write (the loser sees a conflict and lets go).
//! A shard that claimed a task it cannot place passes it on (see [`pass`]).
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::labels::{Guard, patch_meta};
use crate::api::task::Task;
use crate::context::Context;
use crate::error::Result;
use crate::sharding::ring::Ring;
use crate::sharding::{PASSED_ANNOTATION, SHARD_LABEL, shard_of};

/// How much later each next shard in a task's order may claim it.
pub const CLAIM_STEP: Duration = Duration::from_secs(2);

/// The key that orders the shards for a task: the proplet it is pinned to, else its workflow or job (so
/// that the tasks of one workflow, which wait for each other, start on one shard), else itself.
fn claim_key(task: &Task) -> String {
    let spec = &task.spec;
    spec.proplet_selector
        .as_ref()
        .and_then(|s| s.proplet_id.clone())
        .or_else(|| spec.workflow_id.clone())
        .or_else(|| spec.job_id.clone())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| task.uid().unwrap_or_else(|| task.name_any()))
}

/// The shards that passed a task on.
pub fn passed_by(task: &Task) -> Vec<String> {
    task.annotations()
        .get(PASSED_ANNOTATION)
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The shards in the order they may claim `task`: the ring's order for its key, without those that
/// passed it on (all of them again once every member has).
pub fn claim_order(task: &Task, ring: &Ring) -> Vec<String> {
    let passed = passed_by(task);
    let order: Vec<String> = ring
        .preference(&claim_key(task))
        .into_iter()
        .map(str::to_string)
        .collect();
    let fresh: Vec<String> = order
        .iter()
        .filter(|s| !passed.contains(s))
        .cloned()
        .collect();
    if fresh.is_empty() { order } else { fresh }
}

pub async fn reconcile(task: Arc<Task>, ctx: Arc<Context>) -> Result<Action> {
    let (Some(me), true) = (ctx.ownership.identity(), ctx.ownership.may_act()) else {
        return Ok(Action::requeue(ctx.config.retry_period.0));
    };
    if shard_of(task.as_ref()).is_some() || task.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let order = claim_order(&task, &ctx.ownership.ring());
    let Some(rank) = order.iter().position(|s| s == me) else {
        return Ok(Action::requeue(ctx.config.retry_period.0));
    };
    let age = task
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| {
            let ms = (jiff::Timestamp::now() - t.0).get_milliseconds().max(0);
            Duration::from_millis(ms as u64)
        })
        .unwrap_or_default();
    // A task passed on is new to those who have not had it: the next one claims at once.
    let wait = if passed_by(&task).is_empty() {
        (CLAIM_STEP * rank as u32).saturating_sub(age)
    } else {
        CLAIM_STEP * rank as u32
    };
    if !wait.is_zero() {
        return Ok(Action::requeue(wait));
    }
    let claimed = patch_meta(
        &ctx.client,
        &ctx.metrics,
        task.as_ref(),
        &[(SHARD_LABEL, Some(me))],
        &[],
        Guard::Version,
    )
    .await?
    .is_some();
    let outcome = if claimed { "claimed" } else { "conflict" };
    ctx.metrics
        .shards
        .claims_total
        .with_label_values(&[outcome])
        .inc();
    Ok(Action::await_change())
}

/// Gives a claimed task that waits for a proplet back to the other shards, recording that this shard
/// tried; the last member to try keeps it (and it waits there). Returns whether it was passed on.
pub async fn pass(task: &Task, ctx: &Context) -> Result<bool> {
    let Some(me) = ctx.ownership.identity() else {
        return Ok(false);
    };
    let members = ctx.ownership.members();
    let mut passed = passed_by(task);
    if !passed.iter().any(|p| p == me) {
        passed.push(me.to_string());
    }
    if members.iter().all(|m| passed.contains(m)) {
        return Ok(false);
    }
    let list = passed.join(",");
    let done = patch_meta(
        &ctx.client,
        &ctx.metrics,
        task,
        &[(SHARD_LABEL, None)],
        &[(PASSED_ANNOTATION, Some(&list))],
        Guard::Version,
    )
    .await?
    .is_some();
    if done {
        ctx.metrics
            .shards
            .claims_total
            .with_label_values(&["passed"])
            .inc();
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::task::TaskSpec;
    use crate::sharding::ring::VIRTUAL_NODES;

    fn task(uid: &str, passed: Option<&str>) -> Task {
        let spec: TaskSpec =
            serde_json::from_value(serde_json::json!({"name": "t"})).expect("spec");
        let mut t = Task::new("t", spec);
        t.metadata.uid = Some(uid.into());
        if let Some(p) = passed {
            t.metadata.annotations = Some([(PASSED_ANNOTATION.to_string(), p.to_string())].into());
        }
        t
    }

    #[test]
    fn every_member_has_a_rank_and_those_that_passed_go_last_or_not_at_all() {
        let members: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let members_ring = Ring::new(members.clone(), VIRTUAL_NODES);
        let order = claim_order(&task("u1", None), &members_ring);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, members);
        let first = order[0].clone();
        let after = claim_order(&task("u1", Some(&first)), &members_ring);
        assert_eq!(after.len(), 2);
        assert!(!after.contains(&first));
        assert_eq!(
            claim_order(&task("u1", Some("a,b,c")), &members_ring).len(),
            3
        );
    }

    #[test]
    fn tasks_spread_over_the_members() {
        let members: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let ring = Ring::new(members.clone(), VIRTUAL_NODES);
        let firsts: Vec<String> = (0..300)
            .map(|i| claim_order(&task(&format!("uid-{i}"), None), &ring)[0].clone())
            .collect();
        for m in &members {
            let n = firsts.iter().filter(|f| *f == m).count();
            assert!((50..=150).contains(&n), "{m} first for {n} of 300");
        }
    }
}
