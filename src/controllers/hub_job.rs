//! A hub FederatedJob (`spec.members`, on a `--hub` operator): each round, a one-round FederatedJob on
//! every member cluster through its API (starting from the hub's global model), the member models copied
//! to the hub as they complete, and the hub's aggregation into the next global model once the quorum
//! (`members.minAvailable`) is in. Nothing is decided from memory: the global models and the member models
//! are ConfigMaps on the hub, so a restarted hub (or a new leader) resumes where the last one stopped.
//! Members are polled, not watched (their API servers may come and go): every [`POLL`] while a round runs.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::experiment::{not_started, store_initial_model};
use super::now;
use crate::api::Proplet;
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::federated_job::{
    FederatedJob, FederatedJobStatus, MemberParticipants, MemberRoundStatus, RoundMetrics,
};
use crate::context::Context;
use crate::error::{Result, conflict};
use crate::fl::aggregate;
use crate::fl::federation::{self, Decision, HUB_JOB_UID_LABEL, MEMBER_JOBS_FINALIZER, Standing};
use crate::fl::member_models;
use crate::fl::params::Params;
use crate::fl::store::{self, StoreError};
use crate::fl::update::Update;
use crate::multicluster::clients::MEMBER_CALL_TIMEOUT;
use crate::multicluster::probe::describe;

/// How often a running hub round looks at its members.
pub const POLL: Duration = Duration::from_secs(2);
/// A member's round may end this long after the hub's deadline and still be waited for.
const GRACE: Duration = Duration::from_secs(5);
/// Rounds kept in `status.roundMetrics`.
const HISTORY: usize = 50;

pub async fn reconcile(job: Arc<FederatedJob>, ctx: Arc<Context>) -> Result<Action> {
    if job.metadata.deletion_timestamp.is_some() {
        return clean_up(&job, &ctx).await;
    }
    let old = job.status.clone().unwrap_or_default();
    let g = job.metadata.generation;
    if matches!(old.phase.as_deref(), Some("Completed" | "Failed")) && old.observed_generation == g
    {
        return Ok(Action::await_change());
    }
    if !ctx.config.hub {
        let msg = "spec.members makes this a hub job: it runs on an operator started with --hub";
        return not_started(&job, &ctx, old, "Pending", "NotAHub", msg).await;
    }
    let aggregator = match federation::validate(&job).and_then(|()| {
        aggregate::by_name(
            &job.spec.aggregator.algorithm,
            job.spec.aggregator.config.as_ref(),
        )
    }) {
        Ok(a) => a,
        Err(msg) => return not_started(&job, &ctx, old, "Failed", "InvalidSpec", &msg).await,
    };
    let job = ensure_finalizer(&job, &ctx).await?;
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();

    // Where the experiment stands: the global model versions stored on the hub.
    let mut models = store::list_model_sources(&ctx.client, &ns, &name).await?;
    if models.is_empty() {
        if let Err(msg) = store_initial_model(&ctx, &job).await? {
            return not_started(&job, &ctx, old, "Failed", "InvalidSpec", &msg).await;
        }
        models.insert(0, Vec::new());
    }
    let version = models.keys().last().copied().unwrap_or(0);
    let mut status = old.clone();
    status.observed_generation = g;
    status.start_time.get_or_insert_with(now);
    status.completed_rounds = Some(version as i64);
    status.model_version = Some(version as i64);
    status.aggregated_model_ref = Some(store::model_uri(version));
    if version >= 1
        && !status
            .round_metrics
            .iter()
            .any(|r| r.round == version as i64)
    {
        // Aggregated by an earlier attempt whose status write was lost.
        let used = member_models::member_models(&ctx.client, &job, version as i64).await?;
        let from = models.get(&version).cloned().unwrap_or_default();
        record_round(&mut status, version as i64, &from, &used);
    }
    let total = job.spec.rounds.total.max(1) as u64;
    if version >= total {
        status.current_round = Some(total as i64);
        status.members = member_rows(&job, &models, &BTreeMap::new(), &old);
        status.completion_time.get_or_insert_with(now);
        let msg = format!("all {total} rounds completed; global model version {version}");
        return settle(
            &job,
            &ctx,
            old,
            status,
            ("Completed", ConditionStatus::True, "Completed", &msg),
        )
        .await;
    }

    // The current round: n, from global model n−1.
    let n = version as i64 + 1;
    if old.current_round != Some(n) || status.round_start_time.is_none() {
        status.round_start_time = Some(now());
    }
    status.current_round = Some(n);
    let Some(base) = store::get_model(&ctx.client, &ns, &name, version).await? else {
        return Ok(Action::requeue(POLL));
    };
    let stored = member_models::member_models(&ctx.client, &job, n).await?;
    // Members are looked at together: one that does not answer holds up none of the others.
    let members = job.spec.members.clone().unwrap_or_default().clusters;
    let looks: BTreeMap<String, Look> = futures::future::join_all(members.iter().map(|m| async {
        let look = match stored.get(&m.name) {
            Some(u) => Look::contributed(u.num_samples),
            None => look_at_member(&ctx, &job, m, n, &base.model).await,
        };
        (m.name.clone(), look)
    }))
    .await
    .into_iter()
    .collect();
    let standing: BTreeMap<String, Standing> = looks
        .iter()
        .map(|(m, l)| (m.clone(), l.standing.clone()))
        .collect();
    let started = status
        .round_start_time
        .as_ref()
        .map_or_else(jiff::Timestamp::now, |t| t.0);
    let limit = Duration::from_secs(job.spec.timeout_seconds.max(1) as u64) + GRACE;
    let elapsed: Duration = jiff::Timestamp::now()
        .duration_since(started)
        .try_into()
        .unwrap_or_default();
    let decision = federation::decide(&standing, federation::min_available(&job), elapsed >= limit);
    status.members = member_rows(&job, &models, &looks, &old);
    let total_members = looks.len();
    match decision {
        Decision::Aggregate => {
            let contributed = member_models::member_models(&ctx.client, &job, n).await?;
            let from: Vec<String> = contributed.keys().cloned().collect();
            let updates: Vec<Update> = contributed.values().cloned().collect();
            let model = match aggregator.aggregate(&updates) {
                Ok(m) => m,
                Err(msg) => {
                    let msg = format!("round {n}: {msg}");
                    return not_started(&job, &ctx, old, "Failed", "AggregationFailed", &msg).await;
                }
            };
            let written = match store::put_model(
                &ctx,
                &job,
                n as u64,
                &model.to_json(),
                &from,
                ctx.config.fl_max_model_bytes,
            )
            .await
            {
                Ok(w) => w,
                Err(StoreError::TooLarge(msg)) => {
                    return not_started(&job, &ctx, old, "Failed", "ModelTooLarge", &msg).await;
                }
                Err(StoreError::Kube(e)) => return Err(e.into()),
            };
            models.insert(n as u64, written.aggregated_from.clone());
            record_round(&mut status, n, &written.aggregated_from, &contributed);
            status.completed_rounds = Some(n);
            status.model_version = Some(n);
            status.aggregated_model_ref = Some(store::model_uri(n as u64));
            status.members = member_rows(&job, &models, &looks, &old);
            let msg = format!(
                "round {n}: aggregated the models of {} of {total_members} members ({}) with {} into global model version {n}",
                written.aggregated_from.len(),
                written.aggregated_from.join(", "),
                aggregator.name()
            );
            info!(job = %name, round = n, "hub round aggregated");
            ctx.metrics
                .fl_rounds_total
                .with_label_values(&["completed"])
                .inc();
            ctx.event(
                job.as_ref(),
                EventType::Normal,
                "Aggregated",
                "Aggregate",
                msg.clone(),
            )
            .await;
            settle(
                &job,
                &ctx,
                old,
                status,
                ("Running", ConditionStatus::True, "Aggregated", &msg),
            )
            .await?;
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        Decision::Waiting { missing } => {
            let why: Vec<String> = missing
                .iter()
                .map(|m| match looks.get(m).map(|l| &l.standing) {
                    Some(Standing::Failed(e) | Standing::Unreachable(e)) => format!("{m} ({e})"),
                    _ => m.clone(),
                })
                .collect();
            let msg = format!(
                "round {n} has {} of the {} member models it needs; waiting for {}",
                total_members - missing.len(),
                federation::min_available(&job),
                why.join("; ")
            );
            retry_failed(&ctx, &job, &looks, n).await;
            settle(
                &job,
                &ctx,
                old,
                status,
                ("Running", ConditionStatus::False, "WaitingForMembers", &msg),
            )
            .await?;
            Ok(Action::requeue(POLL))
        }
        Decision::Running => {
            let done = standing
                .values()
                .filter(|s| **s == Standing::Contributed)
                .count();
            let msg = format!(
                "round {n} of {total} running on {total_members} members; {done} member models in"
            );
            settle(
                &job,
                &ctx,
                old,
                status,
                ("Running", ConditionStatus::True, "Running", &msg),
            )
            .await?;
            Ok(Action::requeue(POLL))
        }
    }
}

/// What the hub saw of one member this round.
#[derive(Clone, Debug)]
struct Look {
    standing: Standing,
    job: Option<String>,
    participants: Option<i64>,
    samples: Option<i64>,
    /// What holds a member's round up (its job's `Ready=False` message), shown while it trains.
    note: Option<String>,
}

impl Look {
    fn contributed(samples: u64) -> Look {
        Look {
            standing: Standing::Contributed,
            job: None,
            participants: None,
            samples: Some(samples as i64),
            note: None,
        }
    }

    fn missing(standing: Standing) -> Look {
        Look {
            standing,
            job: None,
            participants: None,
            samples: None,
            note: None,
        }
    }
}

/// Member `m`'s part in round `n`: its FederatedJob there (created when missing), and its model copied to
/// the hub once that job completed.
async fn look_at_member(
    ctx: &Context,
    job: &FederatedJob,
    m: &MemberParticipants,
    n: i64,
    base: &Value,
) -> Look {
    let hub_ns = ctx.config.member_namespace();
    let client = match ctx
        .member_clients
        .for_member(&ctx.client, &hub_ns, &m.name)
        .await
    {
        Ok(c) => c,
        Err(e) => return Look::missing(Standing::Unreachable(e.to_string())),
    };
    match tokio::time::timeout(
        MEMBER_CALL_TIMEOUT * 3,
        member_round(ctx, job, m, n, base, client),
    )
    .await
    {
        Ok(Ok(look)) => look,
        Ok(Err(e)) => Look::missing(Standing::Unreachable(e)),
        Err(_) => Look::missing(Standing::Unreachable(format!(
            "no answer within {:?}",
            MEMBER_CALL_TIMEOUT * 3
        ))),
    }
}

async fn member_round(
    ctx: &Context,
    job: &FederatedJob,
    m: &MemberParticipants,
    n: i64,
    base: &Value,
    client: Client,
) -> std::result::Result<Look, String> {
    let k = |e: kube::Error| describe(&e);
    let member_ns = federation::member_namespace(job, m);
    let api: Api<FederatedJob> = Api::namespaced(client.clone(), &member_ns);
    let name = federation::member_job_name(&job.name_any(), n);
    let mut look = Look::missing(Standing::Training);
    look.job = Some(name.clone());
    let Some(mj) = api.get_opt(&name).await.map_err(k)? else {
        let proplets: Vec<Proplet> = if m.participants.is_empty() {
            Api::<Proplet>::namespaced(client.clone(), &member_ns)
                .list(&ListParams::default())
                .await
                .map_err(k)?
                .items
        } else {
            Vec::new()
        };
        let participants = federation::choose_participants(m, &proplets);
        if participants.is_empty() {
            look.standing = Standing::Failed(format!(
                "no Running proplets in namespace {member_ns} match its selector"
            ));
            return Ok(look);
        }
        let desired = federation::member_job(job, m, n, base, &participants)?;
        match api.create(&PostParams::default(), &desired).await {
            Ok(_) => {
                info!(job = %job.name_any(), member = %m.name, round = n, "member round created");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(k(e)),
        }
        look.participants = Some(participants.len() as i64);
        return Ok(look);
    };
    look.participants = Some(mj.spec.participants.len() as i64);
    if mj.labels().get(HUB_JOB_UID_LABEL) != job.uid().as_ref() {
        look.standing = Standing::Failed(format!(
            "a FederatedJob {name} in {member_ns} exists there and was not made by this hub job"
        ));
        return Ok(look);
    }
    let s = mj.status.clone().unwrap_or_default();
    match s.phase.as_deref() {
        Some("Completed") => {
            let version = s.model_version.unwrap_or(1).max(1) as u64;
            let Some(model) = store::get_model(&client, &member_ns, &name, version)
                .await
                .map_err(k)?
            else {
                look.standing =
                    Standing::Failed(format!("its model version {version} is not stored there"));
                return Ok(look);
            };
            let last = s.round_metrics.last();
            let samples = last.map_or(0, |r| r.total_samples).max(0) as u64;
            let update = Params::from_json(&model.model)
                .map_err(|e| format!("its model is not a model: {e}"))
                .and_then(|params| {
                    (samples > 0)
                        .then_some(params)
                        .ok_or_else(|| "its round reports no samples".to_string())
                })
                .map(|params| Update {
                    round_id: format!("round-{n}"),
                    proplet_id: m.name.clone(),
                    num_samples: samples,
                    metrics: last.map(|r| r.metrics.clone()).unwrap_or_default(),
                    params,
                });
            match update {
                Ok(u) => match member_models::put_member_model(ctx, job, n, &m.name, &u).await {
                    Ok(_) => {
                        look.standing = Standing::Contributed;
                        look.samples = Some(samples as i64);
                    }
                    Err(StoreError::TooLarge(msg)) => look.standing = Standing::Failed(msg),
                    Err(StoreError::Kube(e)) => {
                        // The hub's own API server: not the member's fault.
                        warn!(job = %job.name_any(), member = %m.name, error = %e, "member model not stored");
                    }
                },
                Err(why) => look.standing = Standing::Failed(why),
            }
        }
        Some("Failed") => {
            let why = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .and_then(|c| c.message.clone())
                .unwrap_or_else(|| "its round failed".into());
            look.standing = Standing::Failed(why);
        }
        _ => {
            // Not started or stuck on the member (no FL URL there, a missing module…): say why.
            look.note = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == ConditionStatus::False)
                .and_then(|c| c.message.clone());
        }
    }
    Ok(look)
}

/// Below quorum with members whose round failed: their rounds run again (the failed job is deleted; the
/// next look creates it anew from the same global model).
async fn retry_failed(ctx: &Context, job: &FederatedJob, looks: &BTreeMap<String, Look>, n: i64) {
    let members = job.spec.members.clone().unwrap_or_default().clusters;
    for m in &members {
        let Some(Look {
            standing: Standing::Failed(why),
            job: Some(member_job),
            ..
        }) = looks.get(&m.name)
        else {
            continue;
        };
        let hub_ns = ctx.config.member_namespace();
        let Ok(client) = ctx
            .member_clients
            .for_member(&ctx.client, &hub_ns, &m.name)
            .await
        else {
            continue;
        };
        let api: Api<FederatedJob> = Api::namespaced(client, &federation::member_namespace(job, m));
        let deleted = tokio::time::timeout(
            MEMBER_CALL_TIMEOUT,
            api.delete(member_job, &DeleteParams::background()),
        )
        .await;
        if matches!(deleted, Ok(Ok(_))) {
            let note = format!(
                "member {}'s round {n} failed ({why}): running it again",
                m.name
            );
            ctx.event(job, EventType::Warning, "MemberRoundRetried", "Retry", note)
                .await;
        }
    }
}

/// Each member's row in the status.
fn member_rows(
    job: &FederatedJob,
    models: &BTreeMap<u64, Vec<String>>,
    looks: &BTreeMap<String, Look>,
    old: &FederatedJobStatus,
) -> Vec<MemberRoundStatus> {
    let members = job.spec.members.clone().unwrap_or_default().clusters;
    members
        .iter()
        .map(|m| {
            let contributed = models
                .values()
                .filter(|from| from.contains(&m.name))
                .count() as i64;
            let before = old.members.iter().find(|r| r.name == m.name);
            let Some(look) = looks.get(&m.name) else {
                return MemberRoundStatus {
                    name: m.name.clone(),
                    state: "Done".into(),
                    rounds_contributed: contributed,
                    ..Default::default()
                };
            };
            let (state, message) = match &look.standing {
                Standing::Contributed => ("Contributed", None),
                Standing::Training => ("Training", look.note.clone()),
                Standing::Failed(e) => ("Failed", Some(e.clone())),
                Standing::Unreachable(e) => ("Unreachable", Some(e.clone())),
            };
            MemberRoundStatus {
                name: m.name.clone(),
                state: state.into(),
                job: look
                    .job
                    .clone()
                    .or_else(|| before.and_then(|b| b.job.clone())),
                participants: look
                    .participants
                    .or_else(|| before.and_then(|b| b.participants)),
                samples: look.samples,
                rounds_contributed: contributed,
                message,
            }
        })
        .collect()
}

/// Adds round `n`'s line to the history.
fn record_round(
    status: &mut FederatedJobStatus,
    n: i64,
    from: &[String],
    models: &BTreeMap<String, Update>,
) {
    let used: Vec<Update> = from.iter().filter_map(|m| models.get(m).cloned()).collect();
    status.round_metrics.retain(|r| r.round != n);
    status.round_metrics.push(RoundMetrics {
        round: n,
        updates: used.len() as i64,
        total_samples: used.iter().map(|u| u.num_samples as i64).sum(),
        metrics: aggregate::mean_metrics(&used),
        model_version: n,
        completed_at: Some(now()),
    });
    status.round_metrics.sort_by_key(|r| r.round);
    if status.round_metrics.len() > HISTORY {
        let extra = status.round_metrics.len() - HISTORY;
        status.round_metrics.drain(..extra);
    }
}

/// Writes `status` with phase and Ready condition `(phase, ready, reason, message)` when it changed; an
/// Event when the phase or reason changed.
async fn settle(
    job: &FederatedJob,
    ctx: &Context,
    old: FederatedJobStatus,
    mut status: FederatedJobStatus,
    (phase, ready, reason, msg): (&str, ConditionStatus, &str, &str),
) -> Result<Action> {
    status.phase = Some(phase.into());
    set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        reason,
        msg,
        job.metadata.generation,
    );
    if status == old {
        return Ok(Action::requeue(POLL));
    }
    let old_reason = old
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.reason.clone());
    ctx.apply_status(job, &status).await?;
    if old.phase.as_deref() != Some(phase) || old_reason.as_deref() != Some(reason) {
        let kind = if ready == ConditionStatus::True {
            EventType::Normal
        } else {
            EventType::Warning
        };
        if reason != "Aggregated" {
            ctx.event(job, kind, reason, "Progress", msg.to_string())
                .await;
        }
    }
    Ok(Action::requeue(POLL))
}

async fn ensure_finalizer(job: &Arc<FederatedJob>, ctx: &Context) -> Result<Arc<FederatedJob>> {
    let Some(finalizers) = federation::with_finalizer(job) else {
        return Ok(Arc::clone(job));
    };
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": job.resource_version()}});
    let written =
        Api::<FederatedJob>::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default())
            .patch(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(conflict)?;
    ctx.metrics.api_write("federatedjobs", "patch");
    Ok(Arc::new(written))
}

/// A deleted hub job takes its member FederatedJobs with it (their rounds and Tasks follow by the members'
/// garbage collection). A member that cannot be reached holds the deletion, with an Event saying so;
/// deleting its registration Secret lets the job go without it.
async fn clean_up(job: &FederatedJob, ctx: &Context) -> Result<Action> {
    if !job.finalizers().iter().any(|f| f == MEMBER_JOBS_FINALIZER) {
        return Ok(Action::await_change());
    }
    let hub_ns = ctx.config.member_namespace();
    let selector = format!("{HUB_JOB_UID_LABEL}={}", job.uid().unwrap_or_default());
    let mut pending = Vec::new();
    for m in job.spec.members.clone().unwrap_or_default().clusters {
        let client = match ctx
            .member_clients
            .for_member(&ctx.client, &hub_ns, &m.name)
            .await
        {
            Ok(c) => c,
            Err(crate::multicluster::clients::Unusable::NotRegistered) => continue,
            Err(e) => {
                pending.push(format!("{} ({e})", m.name));
                continue;
            }
        };
        let api: Api<FederatedJob> =
            Api::namespaced(client, &federation::member_namespace(job, &m));
        let lp = ListParams::default().labels(&selector);
        match tokio::time::timeout(
            MEMBER_CALL_TIMEOUT,
            api.delete_collection(&DeleteParams::background(), &lp),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => pending.push(format!("{} ({})", m.name, describe(&e))),
            Err(_) => pending.push(format!("{} (no answer)", m.name)),
        }
    }
    if !pending.is_empty() {
        let msg = format!(
            "deleting the member FederatedJobs on {} failed; retrying (delete a member's registration Secret to let the job go without it)",
            pending.join(", ")
        );
        ctx.event(
            job,
            EventType::Warning,
            "MemberCleanupPending",
            "Delete",
            msg,
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    let rest: Vec<String> = job
        .finalizers()
        .iter()
        .filter(|f| *f != MEMBER_JOBS_FINALIZER)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"finalizers": rest, "resourceVersion": job.resource_version()}});
    let api =
        Api::<FederatedJob>::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    match api
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => ctx.metrics.api_write("federatedjobs", "patch"),
        Err(kube::Error::Api(a)) if a.code == 404 => {}
        Err(e) => return Err(conflict(e)),
    }
    Ok(Action::await_change())
}
