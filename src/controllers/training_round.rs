//! TrainingRound controller: one Task per participant, pinned to it and named `fl-round-…` so a real
//! proplet runs the client as a WASI command with the coordinator and registry URLs in its env; k-of-n
//! quorum over the updates stored in the cluster; aggregation into the next model version.
//!
//! Everything it decides from is in the cluster (Tasks, update ConfigMaps, its own status), so an
//! operator restarted at any point resumes the round: `Aggregating` records which updates are
//! aggregated, and a model version is written once.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::now;
use super::runtime::{Seen, Waker, Watches, owner};
use crate::api::common::{ConditionStatus, find_condition, set_condition};
use crate::api::task::{Task, TaskPhase};
use crate::api::training_round::{RoundParticipant, TrainingRoundStatus, phase};
use crate::api::{FederatedJob, TrainingRound};
use crate::context::Context;
use crate::error::Result;
use crate::fl::intake::{self, Target};
use crate::fl::store::{self, StoreError, StoredUpdate, Via};
use crate::fl::{aggregate, capability, update::Update};

/// Label on round Tasks: the round that made them.
pub const ROUND_LABEL: &str = "propeller.propeller.abstractmachines.fr/training-round";
/// Label on rounds made by a FederatedJob: its round number.
pub const ROUND_NUMBER_LABEL: &str = "propeller.propeller.abstractmachines.fr/round-number";

/// Spec errors, before anything runs.
pub fn validate(round: &TrainingRound) -> std::result::Result<(), String> {
    let s = &round.spec;
    if s.round_id.trim().is_empty() {
        return Err("roundId is empty".into());
    }
    if s.participants.is_empty() {
        return Err("participants is empty".into());
    }
    let unique: BTreeSet<&String> = s.participants.iter().collect();
    if unique.len() != s.participants.len() {
        return Err("a participant is listed twice".into());
    }
    if s.k_of_n < 1 || s.k_of_n > s.participants.len() as i64 {
        return Err(format!(
            "kOfN is {}: it must be between 1 and the {} participants",
            s.k_of_n,
            s.participants.len()
        ));
    }
    if s.timeout_seconds < 1 {
        return Err("timeoutSeconds must be at least 1".into());
    }
    if s.task_wasm_image.trim().is_empty() {
        return Err("taskWasmImage is empty".into());
    }
    Ok(())
}

/// The name of `participant`'s Task in `round`.
pub fn task_name(round: &str, participant: &str) -> String {
    crate::naming::bounded_name(&format!("{round}-{participant}"), "", 63)
}

/// The Task running `participant`'s training, its FL URLs carrying the capability `token` (pure:
/// unit-tested).
pub fn participant_task(
    round: &TrainingRound,
    job: &FederatedJob,
    participant: &str,
    client_id: Option<&str>,
    (public_url, token): (&str, &str),
) -> std::result::Result<Task, String> {
    let ns = round.namespace().unwrap_or_default();
    let name = task_name(&round.name_any(), participant);
    let url = capability::task_url(public_url, &ns, &job.name_any(), &name, token);
    let proplet_id = client_id.unwrap_or(participant);
    let mut env = BTreeMap::from([
        ("ROUND_ID".to_string(), round.spec.round_id.clone()),
        ("MODEL_URI".to_string(), round.spec.model_ref.clone()),
        ("MODEL_REGISTRY_URL".to_string(), url.clone()),
        ("MANAGER_COORDINATOR_URL".to_string(), url.clone()),
        ("PROPLET_ID".to_string(), proplet_id.to_string()),
        ("FL_JOB_ID".to_string(), job.spec.experiment_id.clone()),
    ]);
    if let Some(h) = &round.spec.hyperparams {
        env.insert("HYPERPARAMS".into(), h.to_string());
    }
    if job.spec.dataset.as_deref().is_some_and(|d| !d.is_empty()) {
        // The coordinator serves `…/datasets/{clientId}` under the same per-task URL.
        env.insert("DATA_STORE_URL".into(), url);
    }
    let owner = round
        .controller_owner_ref(&())
        .ok_or("the round has no uid yet")?;
    serde_json::from_value(json!({
        "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {ROUND_LABEL: store::label_value(&round.name_any())},
            "ownerReferences": [owner],
        },
        "spec": {
            // The `fl-round-` prefix makes a proplet run the module as a WASI command.
            "name": format!("fl-round-{}-{proplet_id}", round.spec.round_id),
            "imageUrl": round.spec.task_wasm_image,
            "propletSelector": {"propletId": participant},
            "env": env,
            "mode": "train",
            "timeoutSeconds": round.spec.timeout_seconds,
        },
    }))
    .map_err(|e| e.to_string())
}

/// Where a participant stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Received,
    /// Its update may still come.
    Possible,
    /// It cannot deliver any more.
    Lost,
}

/// What wakes a TrainingRound: its own changes, its round tasks, and client updates stored for it.
pub fn wake_ups(w: &mut Watches, me: &Waker<TrainingRound>) {
    w.training_rounds.wake_self(me);
    w.tasks.wake(me, |t, _| {
        owner::<TrainingRound, _>(t).into_iter().collect()
    });
    w.fl_updates.wake(me, |cm, seen| match seen {
        Seen::Applied => owner::<TrainingRound, _>(cm).into_iter().collect(),
        Seen::Deleted => Vec::new(),
    });
}

pub async fn reconcile(round: Arc<TrainingRound>, ctx: Arc<Context>) -> Result<Action> {
    if round.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let old = round.status.clone().unwrap_or_default();
    let updates = store::updates_of(&ctx.fl_updates, &round);
    if matches!(round.phase(), phase::COMPLETED | phase::FAILED) {
        return record_late(&round, &ctx, old, &updates).await;
    }
    if let Err(msg) = validate(&round) {
        return fail_with(&round, &ctx, old, "InvalidSpec", &msg, "invalid_spec").await;
    }
    let ns = round.namespace().unwrap_or_default();
    let job_ref = ObjectRef::<FederatedJob>::new(&round.spec.federated_job_ref.name).within(&ns);
    let Some(job) = ctx.federated_jobs.get(&job_ref) else {
        let msg = format!(
            "FederatedJob {} not found: it holds the models and the aggregator",
            round.spec.federated_job_ref.name
        );
        return waiting(&round, &ctx, old, "JobNotFound", &msg).await;
    };
    if ctx.config.fl_public_url.is_empty() {
        let msg = "the operator has no --fl-public-url: proplets could not reach the coordinator";
        return waiting(&round, &ctx, old, "FLNotConfigured", msg).await;
    }
    let aggregator = match aggregate::by_name(
        &job.spec.aggregator.algorithm,
        job.spec.aggregator.config.as_ref(),
    ) {
        Ok(a) => a,
        Err(msg) => return fail_with(&round, &ctx, old, "InvalidSpec", &msg, "invalid_spec").await,
    };
    if round.phase() == phase::AGGREGATING {
        return finish(&round, &ctx, &job, aggregator.as_ref(), old, &updates).await;
    }

    // One Task per participant.
    let tasks_api: Api<Task> = Api::namespaced(ctx.client.clone(), &ns);
    let mut tasks: BTreeMap<String, Option<Arc<Task>>> = BTreeMap::new();
    let clients: BTreeMap<&String, Option<String>> = round
        .spec
        .participants
        .iter()
        .map(|p| (p, intake::client_of(&ctx, &ns, p)))
        .collect();
    for p in &round.spec.participants {
        let client = clients.get(p).cloned().flatten();
        let existing = ctx
            .tasks
            .get(&ObjectRef::new(&task_name(&round.name_any(), p)).within(&ns));
        if existing.is_none() {
            // A new Task, a new capability: each round's tasks hold tokens of their own.
            let token = capability::new_token().map_err(crate::error::Error::Invalid)?;
            let desired = participant_task(
                &round,
                &job,
                p,
                client.as_deref(),
                (&ctx.config.fl_public_url, &token),
            )
            .map_err(crate::error::Error::Invalid)?;
            match tasks_api.create(&PostParams::default(), &desired).await {
                Ok(_) => ctx.metrics.api_write("tasks", "create"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        tasks.insert(p.clone(), existing);
    }

    // Standing of each participant.
    let mut participants = Vec::new();
    let mut standing = BTreeMap::new();
    let mut lost_why = Vec::new();
    for p in &round.spec.participants {
        let task = tasks.get(p).cloned().flatten();
        let stored = updates.get(p).filter(|u| !u.late);
        let (st, label) = match (stored, task.as_deref().map(Task::phase)) {
            (Some(_), _) => (Standing::Received, "UpdateReceived"),
            (None, None | Some(TaskPhase::Pending)) => (Standing::Possible, "Pending"),
            (None, Some(TaskPhase::Scheduled | TaskPhase::Running)) => {
                (Standing::Possible, "Training")
            }
            (None, Some(TaskPhase::Completed)) => {
                match harvest(&ctx, &round, &job, p, task.as_deref()).await {
                    Ok(()) => (Standing::Possible, "Reporting"),
                    Err(why) => {
                        lost_why.push(format!("{p} finished without an update ({why})"));
                        (Standing::Lost, "NoUpdate")
                    }
                }
            }
            (None, Some(ph)) => {
                let err = task
                    .as_ref()
                    .and_then(|t| t.status.as_ref())
                    .and_then(|s| s.error.clone())
                    .unwrap_or_else(|| ph.as_str().to_string());
                lost_why.push(format!("{p}: {err}"));
                (Standing::Lost, "Failed")
            }
        };
        standing.insert(p.clone(), st);
        participants.push(RoundParticipant {
            proplet_id: p.clone(),
            task_ref: task.as_ref().map(|t| ObjectReference {
                api_version: Some("propeller.propeller.abstractmachines.fr/v1".into()),
                kind: Some("Task".into()),
                name: Some(t.name_any()),
                namespace: t.namespace(),
                uid: t.uid(),
                ..Default::default()
            }),
            status: Some(label.into()),
            update_received: Some(st == Standing::Received),
            client_id: clients.get(p).cloned().flatten(),
            num_samples: stored.map(|u| u.update.num_samples as i64),
            received_via: stored.map(|u| u.via.clone()),
        });
    }
    let received = standing
        .values()
        .filter(|s| **s == Standing::Received)
        .count() as i64;
    let possible = standing.values().filter(|s| **s != Standing::Lost).count() as i64;
    let k = round.spec.k_of_n;
    let g = round.metadata.generation;
    let mut status = old.clone();
    status.observed_generation = g;
    status.start_time.get_or_insert_with(now);
    status.participants = participants;
    status.updates_received = Some(received);
    status.updates_required = Some(k);
    status.late_updates = late_count(&updates);

    if received >= k {
        // The quorum is in: fix the set aggregated, then aggregate.
        status.phase = Some(phase::AGGREGATING.into());
        status.aggregated_from = standing
            .iter()
            .filter(|(_, s)| **s == Standing::Received)
            .map(|(p, _)| p.clone())
            .collect();
        set_condition(
            &mut status.conditions,
            "Ready",
            ConditionStatus::True,
            "Aggregating",
            &format!("{received} of {k} required updates arrived; aggregating"),
            g,
        );
        let written = ctx.apply_status(round.as_ref(), &status).await?;
        return finish(&written, &ctx, &job, aggregator.as_ref(), status, &updates).await;
    }
    if possible < k {
        let msg = format!(
            "only {received} of {k} required updates arrived and at most {possible} can: {}",
            lost_why.join("; ")
        );
        return fail_with(
            &round,
            &ctx,
            status,
            "InsufficientUpdates",
            &msg,
            "insufficient_updates",
        )
        .await;
    }
    let started = status
        .start_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let elapsed = jiff::Timestamp::now().duration_since(started);
    let limit = jiff::SignedDuration::from_secs(round.spec.timeout_seconds);
    if elapsed >= limit {
        let msg = format!(
            "timed out after {}s with {received} of {k} required updates",
            round.spec.timeout_seconds
        );
        return fail_with(&round, &ctx, status, "Timeout", &msg, "timeout").await;
    }
    status.phase = Some(phase::RUNNING.into());
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::True,
        "Running",
        &format!("{received} of {k} required updates"),
        g,
    );
    write_if_changed(&round, &ctx, &old, &status).await?;
    let left = (limit - elapsed).unsigned_abs() + Duration::from_millis(100);
    Ok(Action::requeue(left))
}

/// A completed Task without a stored update: its update may be in the result envelope (the proplet's
/// HTTP POST and MQTT fallback both failed), or stored but not yet in the cache. `Ok`: it may still count.
async fn harvest(
    ctx: &Context,
    round: &TrainingRound,
    job: &FederatedJob,
    participant: &str,
    task: Option<&Task>,
) -> std::result::Result<(), String> {
    let ns = round.namespace().unwrap_or_default();
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    if let Ok(Some(_)) = api
        .get_opt(&store::update_name(&round.name_any(), participant))
        .await
    {
        return Ok(());
    }
    let results = task
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.results.clone())
        .filter(|r| r.is_object())
        .ok_or("its result is not an FL result envelope")?;
    let update = Update::from_result_envelope(&results)?;
    let target = Target::Job {
        namespace: &ns,
        name: &job.name_any(),
    };
    intake::receive(ctx, target, &update, Via::Result)
        .await
        .map(|_| ())
        .map_err(|r| r.message)
}

/// Aggregates the updates fixed in `status.aggregated_from` into the next model version.
async fn finish(
    round: &TrainingRound,
    ctx: &Context,
    job: &FederatedJob,
    aggregator: &dyn aggregate::Aggregator,
    mut status: TrainingRoundStatus,
    updates: &BTreeMap<String, StoredUpdate>,
) -> Result<Action> {
    let from = status.aggregated_from.clone();
    let chosen: Vec<Update> = from
        .iter()
        .filter_map(|p| updates.get(p).map(|u| u.update.clone()))
        .collect();
    if chosen.len() < from.len() {
        // Stored, but not yet in this replica's cache (e.g. just after a restart).
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let version = store::version_of(&round.spec.model_ref) + 1;
    let model = match aggregator.aggregate(&chosen) {
        Ok(m) => m,
        Err(msg) => {
            return fail_with(
                round,
                ctx,
                status,
                "AggregationFailed",
                &msg,
                "aggregation_failed",
            )
            .await;
        }
    };
    let stored = match store::put_model(
        ctx,
        job,
        version,
        &model.to_json(),
        &from,
        ctx.config.fl_max_model_bytes,
    )
    .await
    {
        Ok(s) => s,
        Err(StoreError::TooLarge(msg)) => {
            return fail_with(
                round,
                ctx,
                status,
                "ModelTooLarge",
                &msg,
                "aggregation_failed",
            )
            .await;
        }
        Err(StoreError::Kube(e)) => return Err(e.into()),
    };
    // An earlier attempt may have stored this version from the same set; the stored one is the truth.
    let used: Vec<Update> = stored
        .aggregated_from
        .iter()
        .filter_map(|p| updates.get(p).map(|u| u.update.clone()))
        .collect();
    let g = round.metadata.generation;
    status.aggregated_from = stored.aggregated_from.clone();
    status.phase = Some(phase::COMPLETED.into());
    status.end_time = Some(now());
    status.model_version = Some(version as i64);
    status.aggregated_model_ref = Some(store::model_uri(version));
    status.total_samples = Some(used.iter().map(|u| u.num_samples as i64).sum());
    status.metrics = aggregate::mean_metrics(&used);
    status.updates_received = Some(used.len() as i64);
    status.late_updates = late_count(updates);
    let msg = format!(
        "aggregated {} updates with {} into model version {version}",
        used.len(),
        aggregator.name()
    );
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::True,
        "Completed",
        &msg,
        g,
    );
    ctx.apply_status(round, &status).await?;
    ctx.metrics
        .fl_rounds_total
        .with_label_values(&["completed"])
        .inc();
    info!(round = %round.name_any(), version, "training round aggregated");
    ctx.event(round, EventType::Normal, "Aggregated", "Aggregate", msg)
        .await;
    announce(ctx, round, job, version).await;
    Ok(Action::await_change())
}

/// Propeller's notice of a finished round, on the unprefixed `fl/rounds/next`.
async fn announce(ctx: &Context, round: &TrainingRound, job: &FederatedJob, version: u64) {
    let Some(mqtt) = &ctx.mqtt else { return };
    let number: Option<i64> = round
        .labels()
        .get(ROUND_NUMBER_LABEL)
        .and_then(|n| n.parse().ok());
    let next = number.is_none_or(|n| n < job.spec.rounds.total);
    let notice = json!({
        "round_id": round.spec.round_id,
        "new_model_version": version,
        "model_uri": store::model_uri(version),
        "status": "complete",
        "next_round_available": next,
        "timestamp": jiff::Timestamp::now().to_string(),
    });
    if let Err(e) = mqtt
        .publish(crate::fl::NEXT_ROUND_TOPIC, notice.to_string().into_bytes())
        .await
    {
        warn!(round = %round.name_any(), error = %e, "could not announce the round on fl/rounds/next");
    }
}

fn late_count(updates: &BTreeMap<String, StoredUpdate>) -> Option<i64> {
    let n = updates.values().filter(|u| u.late).count() as i64;
    (n > 0).then_some(n)
}

/// A closed round only records updates that arrive late.
async fn record_late(
    round: &TrainingRound,
    ctx: &Context,
    old: TrainingRoundStatus,
    updates: &BTreeMap<String, StoredUpdate>,
) -> Result<Action> {
    let mut status = old.clone();
    let aggregated: BTreeSet<&String> = status.aggregated_from.iter().collect();
    let late = updates
        .iter()
        .filter(|(p, u)| u.late || (!aggregated.is_empty() && !aggregated.contains(p)))
        .count() as i64;
    status.late_updates = (late > 0).then_some(late);
    write_if_changed(round, ctx, &old, &status).await?;
    Ok(Action::await_change())
}

async fn write_if_changed(
    round: &TrainingRound,
    ctx: &Context,
    old: &TrainingRoundStatus,
    status: &TrainingRoundStatus,
) -> Result<()> {
    if status != old {
        ctx.apply_status(round, status).await?;
    }
    Ok(())
}

/// Not started for a reason that may pass (a missing job, no public URL): Ready=False, retried.
async fn waiting(
    round: &TrainingRound,
    ctx: &Context,
    old: TrainingRoundStatus,
    reason: &str,
    msg: &str,
) -> Result<Action> {
    let mut status = old.clone();
    status.phase.get_or_insert(phase::PENDING.into());
    let g = round.metadata.generation;
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        reason,
        msg,
        g,
    );
    super::report_blocked(ctx, round, &old, &status, reason, "Start", msg).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// The round ends Failed with `reason`: a condition, an Event, a metric, a log line.
async fn fail_with(
    round: &TrainingRound,
    ctx: &Context,
    mut status: TrainingRoundStatus,
    reason: &str,
    msg: &str,
    outcome: &str,
) -> Result<Action> {
    let g = round.metadata.generation;
    status.phase = Some(phase::FAILED.into());
    status.end_time.get_or_insert_with(now);
    status.observed_generation = g;
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        reason,
        msg,
        g,
    );
    ctx.apply_status(round, &status).await?;
    ctx.metrics
        .fl_rounds_total
        .with_label_values(&[outcome])
        .inc();
    warn!(round = %round.name_any(), %reason, "training round failed: {msg}");
    ctx.event(round, EventType::Warning, reason, "Round", msg.into())
        .await;
    Ok(Action::await_change())
}

/// The Ready condition's message, for the job's status.
pub fn ready_message(round: &TrainingRound) -> String {
    round
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, "Ready"))
        .and_then(|c| c.message.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> FederatedJob {
        serde_json::from_value(json!({
            "metadata": {"name": "exp", "namespace": "ns", "uid": "j-1"},
            "spec": {"experimentId": "exp-1", "modelRef": "m", "taskWasmImage": "fl.wasm",
                     "participants": [{"propletId": "edge-1"}], "kOfN": 1, "timeoutSeconds": 30,
                     "rounds": {"total": 2}, "aggregator": {"algorithm": "fedavg"}}
        }))
        .expect("job")
    }

    #[test]
    fn a_named_dataset_gives_round_tasks_a_data_store() {
        let mut j = job();
        j.spec.dataset = Some("digits".into());
        let mut r = super::super::federated_job::round(&j, 1, 0).expect("round");
        r.metadata.uid = Some("r-1".into());
        let t = participant_task(&r, &j, "edge-1", None, ("http://op:8082", "tok")).expect("task");
        let env = t.spec.env.unwrap_or_default();
        assert_eq!(
            env["DATA_STORE_URL"],
            "http://op:8082/fl/ns/exp/t/exp-round-1-edge-1/tok"
        );
    }

    #[test]
    fn round_tasks_are_what_a_real_proplet_needs() {
        let j = job();
        let r = super::super::federated_job::round(&j, 1, 0).expect("round");
        let mut r = r;
        r.metadata.uid = Some("r-1".into());
        let t = participant_task(
            &r,
            &j,
            "edge-1",
            Some("client-9"),
            ("http://op:8082/", "tok"),
        )
        .expect("task");
        assert_eq!(t.spec.name, "fl-round-round-1-client-9");
        // The name on the wire: the real proplet runs a WASI command only for `fl-round-…`.
        let mut named = t.clone();
        named.metadata.name = Some("exp-round-1-edge-1".into());
        assert_eq!(
            crate::controllers::task::wire::start_name(&named),
            "fl-round-round-1-client-9"
        );
        let env = t.spec.env.clone().unwrap_or_default();
        assert!(!env.contains_key("DATA_STORE_URL"), "no dataset named");
        assert_eq!(
            env["MANAGER_COORDINATOR_URL"],
            "http://op:8082/fl/ns/exp/t/exp-round-1-edge-1/tok"
        );
        assert_eq!(env["MODEL_REGISTRY_URL"], env["MANAGER_COORDINATOR_URL"]);
        assert_eq!(env["MODEL_URI"], "fl/models/global_model_v0");
        assert_eq!(env["ROUND_ID"], "round-1");
        assert_eq!(env["PROPLET_ID"], "client-9");
        assert_eq!(
            t.spec
                .proplet_selector
                .clone()
                .and_then(|s| s.proplet_id)
                .as_deref(),
            Some("edge-1")
        );
        assert_eq!(t.owner_references()[0].uid, "r-1");
        assert!(validate(&r).is_ok());
        r.spec.k_of_n = 2;
        assert!(validate(&r).is_err());
    }
}
