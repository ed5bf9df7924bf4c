//! Placing a pending task: its gates (schedule, dependencies), then the proplet it goes to — the least
//! loaded that fits and has room — or the reason it waits; k8s proplets on the job backend hand over to
//! [`super::job_backend`].
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::gates::{dependency_cycle, dependency_gate, dependency_phases};
use super::job_backend;
use super::launch::{WAIT_FOR_PROPLET, launch};
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
    let phases = dependency_phases(task, ctx).await?;
    match dependency_gate(task, &phases) {
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
                super::launch::write_status(ctx, task, status.clone()).await?;
            }
            // A shard is not woken by dependencies other shards hold: it looks again.
            return Ok(if ctx.ownership.is_sharded() {
                Action::requeue(ctx.config.retry_period.0)
            } else {
                Action::await_change()
            });
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
        return super::broadcast::dispatch(task, ctx, status).await;
    }

    // A takeover's watches also bring proplets other survivors took over.
    let proplets = ctx
        .proplets
        .state()
        .into_iter()
        .filter(|p| {
            let client = p.spec.connection_config.client();
            !ctx.ownership
                .is_foreign(crate::sharding::shard_of(p.as_ref()).as_deref(), client)
                && ctx.ownership.may_act_for(client)
        })
        .collect();
    let choice = choose(
        task,
        proplets,
        &ctx.tasks.state(),
        ctx.config.k8s_task_backend,
        ctx.config.max_tasks_per_proplet,
    );
    let proplet = match choice {
        Choice::Refuse(why) => {
            return refuse(task, ctx, status, "UnsupportedOnJobBackend", &why).await;
        }
        Choice::AsJob(proplet) => return job_backend::dispatch(task, ctx, status, &proplet).await,
        Choice::Wait { reason, message } => {
            // A shard sees only its own proplets: another may have one that fits, or room.
            if ctx.ownership.is_sharded()
                && crate::controllers::sharding::claim::pass(task, ctx).await?
            {
                return Ok(Action::await_change());
            }
            set_condition(
                &mut status.conditions,
                "Scheduled",
                ConditionStatus::False,
                reason,
                &message,
                g,
            );
            if status != old {
                super::launch::write_status(ctx, task, status.clone()).await?;
                ctx.event(task, EventType::Normal, reason, "Schedule", message)
                    .await;
            }
            return Ok(Action::requeue(WAIT_FOR_PROPLET));
        }
        Choice::OverMqtt(proplet) => proplet,
    };
    launch(task, ctx, status, &proplet).await
}

/// Where a task goes, decided from the caches alone.
#[derive(Debug)]
pub enum Choice {
    /// Start it on this proplet over MQTT.
    OverMqtt(Arc<Proplet>),
    /// Run it as a Kubernetes Job for this k8s proplet (job backend).
    AsJob(Arc<Proplet>),
    /// No proplet now: it waits, with the `Scheduled=False` reason and message.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// It asks for what the job backend cannot run.
    Refuse(String),
}

/// Chooses among `proplets` for `task`: those it selects, Running, with room (`max_tasks_per_proplet`
/// unless a proplet says otherwise, the waiting order by priority then age), the least loaded first. On the
/// job backend a task that cannot run as a Job only considers external proplets, unless it insists on a k8s
/// one (then it is refused).
pub fn choose(
    task: &Task,
    proplets: Vec<Arc<Proplet>>,
    all_tasks: &[Arc<Task>],
    backend: K8sTaskBackend,
    max_tasks_per_proplet: u32,
) -> Choice {
    let job_backend = backend == K8sTaskBackend::Job;
    let not_a_job = job_backend
        .then(|| job_backend::unsupported(task))
        .flatten();
    if let Some(why) = &not_a_job
        && task.spec.preferred_proplet_type == PreferredPropletType::K8s
    {
        return Choice::Refuse(why.clone());
    }
    let pinned = task
        .spec
        .proplet_selector
        .as_ref()
        .and_then(|s| s.proplet_id.as_deref())
        .is_some_and(|id| !id.is_empty());
    let proplets: Vec<Arc<Proplet>> = proplets
        .into_iter()
        .filter(|p| not_a_job.is_none() || pinned || p.spec.type_ != PropletType::K8s)
        .collect();
    let counts = scheduling::active_counts(all_tasks);
    let load = |p: &Proplet| {
        counts
            .get(&(p.namespace().unwrap_or_default(), p.name_any()))
            .copied()
            .unwrap_or(0)
    };
    let held_back = std::cell::Cell::new(false);
    let admit = |p: &Proplet| {
        let limit = scheduling::limit(p, max_tasks_per_proplet);
        let verdict = scheduling::admit(task, p, limit, load(p), all_tasks, selection::could_use);
        held_back.set(held_back.get() || verdict.is_err());
        verdict
    };
    match selection::select(task, &proplets, load, admit) {
        // Held back by capacity: the task waits its turn (a finishing task wakes it). A fixed message: a
        // queue position in it would cost a write whenever the queue moves.
        Err(_) if held_back.get() => Choice::Wait {
            reason: scheduling::QUEUED,
            message: scheduling::QUEUED_MESSAGE.to_string(),
        },
        Err(why) => Choice::Wait {
            reason: "NoProplet",
            message: why,
        },
        Ok(p) if job_backend && p.spec.type_ == PropletType::K8s => match not_a_job {
            Some(why) => Choice::Refuse(why),
            None => Choice::AsJob(p),
        },
        Ok(p) => Choice::OverMqtt(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn proplet(name: &str, type_: &str, extra: Value) -> Arc<Proplet> {
        let mut spec = json!({
            "type": type_,
            "connectionConfig": {"domainId": "d", "channelId": "c", "clientId": format!("c-{name}"),
                                 "clientKey": "k", "mqttAddress": "tcp://b:1883"},
        });
        if type_ == "k8s" {
            spec["k8s"] = json!({"image": "proplet:1"});
        }
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Proplet",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": spec, "status": {"phase": "Running"},
            }))
            .expect("proplet"),
        )
    }

    fn task(name: &str, spec: Value, status: Value) -> Arc<Task> {
        let mut full = json!({"name": name, "file": "AGFzbQ=="});
        if let (Some(s), Some(e)) = (full.as_object_mut(), spec.as_object()) {
            s.extend(e.clone());
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
                "metadata": {"name": name, "namespace": "ns",
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": full, "status": status,
            }))
            .expect("task"),
        )
    }

    fn running_on(name: &str, proplet: &str) -> Arc<Task> {
        task(
            name,
            json!({}),
            json!({"phase": "running", "assignedProplet": proplet}),
        )
    }

    fn name(c: &Choice) -> String {
        match c {
            Choice::OverMqtt(p) => format!("mqtt:{}", p.name_any()),
            Choice::AsJob(p) => format!("job:{}", p.name_any()),
            Choice::Wait { reason, .. } => format!("wait:{reason}"),
            Choice::Refuse(_) => "refuse".into(),
        }
    }

    #[test]
    fn the_least_loaded_proplet_is_chosen() {
        let ps = vec![
            proplet("a", "external", json!({})),
            proplet("b", "external", json!({})),
        ];
        let t = task("t", json!({}), json!({}));
        let busy_a = vec![running_on("x", "a"), Arc::clone(&t)];
        let c = choose(&t, ps.clone(), &busy_a, K8sTaskBackend::Mqtt, 0);
        assert_eq!(name(&c), "mqtt:b");
        let busy_b = vec![running_on("x", "b"), running_on("y", "b")];
        let c = choose(&t, ps, &busy_b, K8sTaskBackend::Mqtt, 0);
        assert_eq!(name(&c), "mqtt:a");
    }

    #[test]
    fn a_full_fleet_queues_and_an_empty_one_says_why() {
        let ps = vec![proplet("a", "external", json!({"maxConcurrentTasks": 1}))];
        let t = task("t", json!({}), json!({}));
        let all = vec![running_on("x", "a"), Arc::clone(&t)];
        let c = choose(&t, ps.clone(), &all, K8sTaskBackend::Mqtt, 0);
        assert_eq!(name(&c), format!("wait:{}", scheduling::QUEUED));
        // The operator-wide limit applies to proplets without their own.
        let plain = vec![proplet("b", "external", json!({}))];
        let all = vec![running_on("x", "b"), Arc::clone(&t)];
        let c = choose(&t, plain.clone(), &all, K8sTaskBackend::Mqtt, 1);
        assert_eq!(name(&c), format!("wait:{}", scheduling::QUEUED));
        assert_eq!(
            name(&choose(&t, plain, &all, K8sTaskBackend::Mqtt, 0)),
            "mqtt:b"
        );
        match choose(&t, Vec::new(), &[], K8sTaskBackend::Mqtt, 0) {
            Choice::Wait { reason, .. } => assert_eq!(reason, "NoProplet"),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn the_job_backend_takes_k8s_proplets_and_refuses_what_a_job_cannot_run() {
        let k8s = vec![proplet("k", "k8s", json!({}))];
        let t = task("t", json!({}), json!({}));
        assert_eq!(
            name(&choose(&t, k8s.clone(), &[], K8sTaskBackend::Job, 0)),
            "job:k"
        );
        assert_eq!(
            name(&choose(&t, k8s.clone(), &[], K8sTaskBackend::Mqtt, 0)),
            "mqtt:k"
        );
        // A daemon cannot be a Job: only external proplets are considered...
        let daemon = task("d", json!({"daemon": true}), json!({}));
        let mixed = vec![Arc::clone(&k8s[0]), proplet("e", "external", json!({}))];
        assert_eq!(
            name(&choose(&daemon, mixed, &[], K8sTaskBackend::Job, 0)),
            "mqtt:e"
        );
        assert_eq!(
            name(&choose(&daemon, k8s.clone(), &[], K8sTaskBackend::Job, 0)),
            "wait:NoProplet"
        );
        // ...and one that insists on a k8s proplet is refused.
        let insists = task(
            "i",
            json!({"daemon": true, "preferredPropletType": "k8s"}),
            json!({}),
        );
        assert_eq!(
            name(&choose(&insists, k8s.clone(), &[], K8sTaskBackend::Job, 0)),
            "refuse"
        );
        let pinned = task(
            "p",
            json!({"daemon": true, "propletSelector": {"propletId": "k"}}),
            json!({}),
        );
        assert_eq!(
            name(&choose(&pinned, k8s, &[], K8sTaskBackend::Job, 0)),
            "refuse"
        );
    }
}
