//! FederatedJob controller: validates the experiment, stores model version 0, and runs rounds
//! 1..`rounds.total` as TrainingRounds, round n+1 starting from the model round n produced. Its status
//! is derived from its rounds (nothing kept in memory): current and completed rounds, per-participant
//! state, per-round metrics and the latest model.
use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::experiment::{not_started, store_initial_model};
use super::now;
use super::runtime::{Waker, Watches, owner};
use super::training_round::{ROUND_NUMBER_LABEL, ready_message};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::federated_job::{FederatedJobStatus, ParticipantStatus, RoundMetrics};
use crate::api::training_round::phase;
use crate::api::{FederatedJob, TrainingRound};
use crate::context::Context;
use crate::error::Result;
use crate::fl::store;
use crate::fl::{aggregate, params::Params};

/// Label on rounds: the FederatedJob that made them.
pub const FEDERATED_JOB_LABEL: &str = "propeller.propeller.abstractmachines.fr/federated-job";
/// Rounds kept in `status.roundMetrics`.
const HISTORY: usize = 50;

/// Spec errors, before anything runs.
pub fn validate(job: &FederatedJob) -> std::result::Result<(), String> {
    let s = &job.spec;
    if s.experiment_id.trim().is_empty() {
        return Err("experimentId is empty".into());
    }
    if s.task_wasm_image.trim().is_empty() {
        return Err("taskWasmImage is empty".into());
    }
    if s.participants.is_empty() {
        return Err("participants is empty".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &s.participants {
        if p.proplet_id.trim().is_empty() {
            return Err("a participant has an empty propletId".into());
        }
        if !seen.insert(&p.proplet_id) {
            return Err(format!("participant {:?} is listed twice", p.proplet_id));
        }
    }
    if s.k_of_n < 1 || s.k_of_n > s.participants.len() as i64 {
        return Err(format!(
            "kOfN is {}: it must be between 1 and the {} participants",
            s.k_of_n,
            s.participants.len()
        ));
    }
    if s.rounds.total < 1 {
        return Err(format!(
            "rounds.total is {}: at least 1 round",
            s.rounds.total
        ));
    }
    if s.timeout_seconds < 1 {
        return Err("timeoutSeconds must be at least 1".into());
    }
    aggregate::by_name(&s.aggregator.algorithm, s.aggregator.config.as_ref())?;
    if let Some(m) = &s.initial_model
        && m != &json!({})
    {
        Params::from_json(m).map_err(|e| format!("initialModel: {e}"))?;
    }
    Ok(())
}

pub fn round_name(job: &str, n: i64) -> String {
    crate::naming::bounded_name(job, &format!("-round-{n}"), 253)
}

/// Round `n` of `job`, starting from model `version` (pure: unit-tested).
pub fn round(
    job: &FederatedJob,
    n: i64,
    version: u64,
) -> std::result::Result<TrainingRound, String> {
    let owner = job
        .controller_owner_ref(&())
        .ok_or("the job has no uid yet")?;
    serde_json::from_value(json!({
        "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "TrainingRound",
        "metadata": {
            "name": round_name(&job.name_any(), n),
            "namespace": job.namespace(),
            "labels": {
                FEDERATED_JOB_LABEL: store::label_value(&job.name_any()),
                ROUND_NUMBER_LABEL: n.to_string(),
            },
            "ownerReferences": [owner],
        },
        "spec": {
            "roundId": format!("round-{n}"),
            "federatedJobRef": {"name": job.name_any()},
            "modelRef": store::model_uri(version),
            "taskWasmImage": job.spec.task_wasm_image,
            "participants": job.spec.participants.iter().map(|p| p.proplet_id.clone()).collect::<Vec<_>>(),
            "hyperparams": job.spec.hyperparams,
            "kOfN": job.spec.k_of_n,
            "timeoutSeconds": job.spec.timeout_seconds,
        },
    }))
    .map_err(|e| e.to_string())
}

/// The job's rounds by number (from the watch cache).
fn rounds_of(ctx: &Context, job: &FederatedJob) -> BTreeMap<i64, Arc<TrainingRound>> {
    let uid = job.uid().unwrap_or_default();
    ctx.training_rounds
        .state()
        .into_iter()
        .filter(|r| r.owner_references().iter().any(|o| o.uid == uid))
        .filter_map(|r| Some((r.labels().get(ROUND_NUMBER_LABEL)?.parse().ok()?, r)))
        .collect()
}

/// What wakes a FederatedJob: its own changes and those of its TrainingRounds.
pub fn wake_ups(w: &mut Watches, me: &Waker<FederatedJob>) {
    w.federated_jobs.wake_self(me);
    w.training_rounds
        .wake(me, |r, _| owner::<FederatedJob, _>(r).into_iter().collect());
}

pub async fn reconcile(job: Arc<FederatedJob>, ctx: Arc<Context>) -> Result<Action> {
    if crate::fl::federation::is_hub_job(&job) {
        return super::hub_job::reconcile(job, ctx).await;
    }
    if job.metadata.deletion_timestamp.is_some() {
        // Rounds, their Tasks, updates and models go with the job (ownerReferences).
        return Ok(Action::await_change());
    }
    let old = job.status.clone().unwrap_or_default();
    let g = job.metadata.generation;
    if matches!(old.phase.as_deref(), Some("Completed" | "Failed")) && old.observed_generation == g
    {
        return Ok(Action::await_change());
    }
    if let Err(msg) = validate(&job) {
        return not_started(&job, &ctx, old, "Failed", "InvalidSpec", &msg).await;
    }
    if ctx.config.fl_public_url.is_empty() {
        let msg = "the operator has no --fl-public-url: proplets could not reach the coordinator";
        return not_started(&job, &ctx, old, "Pending", "FLNotConfigured", msg).await;
    }
    let rounds = rounds_of(&ctx, &job);
    if rounds.is_empty()
        && let Err(msg) = store_initial_model(&ctx, &job).await?
    {
        return not_started(&job, &ctx, old, "Failed", "InvalidSpec", &msg).await;
    }
    let (current, latest) = match rounds.last_key_value() {
        Some((n, r)) => (*n, Some(Arc::clone(r))),
        None => (0, None),
    };
    // The next round starts once the current one completed.
    let next = match &latest {
        None => Some((1, 0)),
        Some(r) if r.phase() == phase::COMPLETED && current < job.spec.rounds.total => {
            let v = r
                .status
                .as_ref()
                .and_then(|s| s.model_version)
                .unwrap_or(current);
            Some((current + 1, v.max(0) as u64))
        }
        _ => None,
    };
    if let Some((n, version)) = next {
        let r = round(&job, n, version).map_err(crate::error::Error::Invalid)?;
        let api: Api<TrainingRound> =
            Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
        match api.create(&PostParams::default(), &r).await {
            Ok(_) => {
                ctx.metrics.api_write("trainingrounds", "create");
                info!(job = %job.name_any(), round = n, "training round started");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let status = progress(&job, &rounds, next.map(|(n, _)| n), old.clone());
    if status != old {
        ctx.apply_status(job.as_ref(), &status).await?;
        if status.phase != old.phase {
            let (kind, reason) = match status.phase.as_deref() {
                Some("Failed") => (EventType::Warning, "Failed"),
                Some("Completed") => (EventType::Normal, "Completed"),
                _ => (EventType::Normal, "Running"),
            };
            let note = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .and_then(|c| c.message.clone())
                .unwrap_or_default();
            ctx.event(job.as_ref(), kind, reason, "Progress", note)
                .await;
        }
    }
    // Round changes wake the job.
    Ok(Action::await_change())
}

/// The job's status from its rounds (`starting`: a round just created, not yet in the cache).
pub fn progress(
    job: &FederatedJob,
    rounds: &BTreeMap<i64, Arc<TrainingRound>>,
    starting: Option<i64>,
    old: FederatedJobStatus,
) -> FederatedJobStatus {
    let g = job.metadata.generation;
    let mut status = old;
    status.observed_generation = g;
    status.start_time.get_or_insert_with(now);
    let completed: Vec<(&i64, &Arc<TrainingRound>)> = rounds
        .iter()
        .filter(|(_, r)| r.phase() == phase::COMPLETED)
        .collect();
    status.completed_rounds = Some(completed.len() as i64);
    let current = starting.unwrap_or_else(|| rounds.keys().last().copied().unwrap_or(0));
    status.current_round = Some(current);
    let mut history: Vec<RoundMetrics> = completed
        .iter()
        .filter_map(|(n, r)| {
            let s = r.status.as_ref()?;
            Some(RoundMetrics {
                round: **n,
                updates: s.aggregated_from.len() as i64,
                total_samples: s.total_samples.unwrap_or(0),
                metrics: s.metrics.clone(),
                model_version: s.model_version.unwrap_or(0),
                completed_at: s.end_time.clone(),
            })
        })
        .collect();
    if history.len() > HISTORY {
        history.drain(..history.len() - HISTORY);
    }
    if let Some(last) = history.last() {
        status.model_version = Some(last.model_version);
        status.aggregated_model_ref = Some(store::model_uri(last.model_version.max(0) as u64));
    } else {
        status.model_version = Some(0);
    }
    status.round_metrics = history;
    // Participants: their state in the current round, and rounds their updates went into.
    let latest = rounds.get(&current);
    status.participants = job
        .spec
        .participants
        .iter()
        .map(|p| {
            let id = &p.proplet_id;
            let contributed = completed
                .iter()
                .filter(|(_, r)| {
                    r.status
                        .as_ref()
                        .is_some_and(|s| s.aggregated_from.contains(id))
                })
                .count() as i64;
            let state = latest
                .and_then(|r| r.status.as_ref())
                .and_then(|s| s.participants.iter().find(|q| &q.proplet_id == id))
                .and_then(|q| q.status.clone());
            let previous = status.participants.iter().find(|q| &q.proplet_id == id);
            let last_update = match previous {
                Some(q) if q.rounds_contributed == Some(contributed) => q.last_update.clone(),
                _ if contributed > 0 => Some(now()),
                _ => None,
            };
            ParticipantStatus {
                proplet_id: id.clone(),
                status: state.or_else(|| Some("Pending".into())),
                last_update,
                rounds_contributed: Some(contributed),
            }
        })
        .collect();
    let total = job.spec.rounds.total;
    let failed = latest.filter(|r| r.phase() == phase::FAILED);
    let (phase, ready, reason, msg) = if let Some(r) = failed {
        (
            "Failed",
            ConditionStatus::False,
            "RoundFailed",
            format!("round {current} failed: {}", ready_message(r)),
        )
    } else if completed.len() as i64 >= total {
        (
            "Completed",
            ConditionStatus::True,
            "Completed",
            format!(
                "all {total} rounds completed; model version {}",
                status.model_version.unwrap_or(0)
            ),
        )
    } else {
        (
            "Running",
            ConditionStatus::True,
            "Running",
            format!("round {current} of {total} running"),
        )
    };
    if matches!(phase, "Completed" | "Failed") {
        status.completion_time.get_or_insert_with(now);
    }
    status.phase = Some(phase.into());
    set_condition(&mut status.conditions, "Ready", ready, reason, &msg, g);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(patch: serde_json::Value) -> FederatedJob {
        let mut spec = json!({"experimentId": "exp-1", "modelRef": "m", "taskWasmImage": "fl.wasm",
            "participants": [{"propletId": "a"}, {"propletId": "b"}], "kOfN": 2, "timeoutSeconds": 30,
            "rounds": {"total": 2}, "aggregator": {"algorithm": "fedavg"}});
        if let (Some(s), Some(p)) = (spec.as_object_mut(), patch.as_object()) {
            s.extend(p.clone());
        }
        serde_json::from_value(
            json!({"metadata": {"name": "exp", "namespace": "ns", "uid": "u"}, "spec": spec}),
        )
        .expect("job")
    }

    #[test]
    fn invalid_specs_say_why() {
        assert!(validate(&job(json!({}))).is_ok());
        let cases = [
            (json!({"kOfN": 3}), "kOfN"),
            (json!({"kOfN": 0}), "kOfN"),
            (json!({"rounds": {"total": 0}}), "rounds.total"),
            (
                json!({"aggregator": {"algorithm": "median-of-means"}}),
                "unknown aggregator",
            ),
            (
                json!({"participants": [{"propletId": "a"}, {"propletId": "a"}]}),
                "twice",
            ),
            (json!({"initialModel": {"w": "zero"}}), "initialModel"),
        ];
        for (patch, why) in cases {
            let e = validate(&job(patch.clone())).expect_err("invalid");
            assert!(e.contains(why), "{patch}: {e}");
        }
    }

    #[test]
    fn a_new_job_starts_round_one_running() {
        let j = job(json!({}));
        let s = progress(&j, &BTreeMap::new(), Some(1), FederatedJobStatus::default());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!((s.current_round, s.completed_rounds), (Some(1), Some(0)));
        assert_eq!(s.participants.len(), 2);
        // Unchanged inputs give an unchanged status: no write.
        let again = progress(&j, &BTreeMap::new(), Some(1), s.clone());
        assert_eq!(again, s);
    }
}
