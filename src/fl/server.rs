//! The coordinator, model registry and data store proplets talk to. Every round Task has its own base
//! URL, `/fl/{namespace}/{federatedjob}/t/{task}/{token}` (its `MANAGER_COORDINATOR_URL`,
//! `MODEL_REGISTRY_URL` and `DATA_STORE_URL`; see [`super::capability`]), under which:
//! - `POST …/update`: the Task's participant's client update for the Task's round;
//! - `GET …/models/{version}`: a stored model; `GET …/models`: the stored versions;
//! - `GET …/datasets/{clientId}`: the Task's participant's training data, from the ConfigMaps of the job's
//!   `spec.dataset` (see [`super::datasets`]);
//! - `GET …/rounds/{round_id}/complete` and `GET …/task?round_id=…&proplet_id=…`: the coordinator reads
//!   of Propeller's own coordinator.
//!
//! Anything else is refused (401 without a capability or with a wrong one, 403 for another participant's
//! update or data), and counted. Everything is read from the cluster (watch caches, ConfigMaps, the Task),
//! so every replica answers alike.
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::intake::{self, Receipt, Target};
use super::patience::{patiently, transient};
use super::store::{self, Via};
use super::update::Update;
use super::{capability, datasets};
use crate::api::FederatedJob;
use crate::context::Context;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

pub fn router(ctx: Arc<Context>) -> Router {
    let limit = ctx.config.fl_max_update_bytes;
    const CAP: &str = "/fl/{ns}/{job}/t/{task}/{token}";
    Router::new()
        .route(&format!("{CAP}/update"), post(update))
        .route(&format!("{CAP}/models"), get(models))
        .route(&format!("{CAP}/models/{{version}}"), get(model))
        .route(
            &format!("{CAP}/rounds/{{round}}/complete"),
            get(round_complete),
        )
        .route(&format!("{CAP}/task"), get(task))
        .route(&format!("{CAP}/datasets/{{client}}"), get(dataset))
        // The experiment-wide URLs of old: no capability, no answer.
        .route("/fl/{ns}/{job}/update", post(refuse))
        .route("/fl/{ns}/{job}/models", get(refuse))
        .route("/fl/{ns}/{job}/models/{version}", get(refuse))
        .route("/fl/{ns}/{job}/datasets/{client}", get(refuse))
        .route("/fl/{ns}/{job}/task", get(refuse))
        .route("/fl/{ns}/{job}/rounds/{round}/complete", get(refuse))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ctx)
}

/// What a capability grants: one participant in one round.
struct Grant {
    round_id: String,
    proplet_id: String,
}

fn refused(ctx: &Context, status: StatusCode, reason: &str, message: String) -> Response {
    ctx.metrics
        .fl_requests_refused_total
        .with_label_values(&[reason])
        .inc();
    error(status, message)
}

async fn refuse(State(ctx): State<Arc<Context>>) -> Response {
    refused(
        &ctx,
        StatusCode::UNAUTHORIZED,
        "no_capability",
        "use the per-task URL the round Task was given (MANAGER_COORDINATOR_URL)".into(),
    )
}

/// The grant of the capability `/fl/{ns}/{job}/t/{task}/{token}`: the round Task `task` must hold exactly
/// that URL. Errors never echo the token.
async fn authorize(
    ctx: &Context,
    (ns, job, task, token): (&str, &str, &str, &str),
) -> Result<Grant, Response> {
    let bad = || {
        refused(
            ctx,
            StatusCode::UNAUTHORIZED,
            "bad_capability",
            "this URL grants nothing: use the one the round Task was given".into(),
        )
    };
    let cached = ctx
        .tasks
        .get(&ObjectRef::<crate::api::Task>::new(task).within(ns));
    let held = match cached {
        Some(t) => Some(t),
        // Not in this replica's cache (another shard's, or just created): ask the API server.
        None => match patiently(transient, || {
            let api = Api::<crate::api::Task>::namespaced(ctx.client.clone(), ns);
            async move { api.get_opt(task).await }
        })
        .await
        {
            Ok(found) => found.map(Arc::new),
            // Not known to be wrong: the participant is told to try again, not that it is refused.
            Err(e) => {
                tracing::warn!(namespace = %ns, %task, error = %e, "FL capability not checked: the API server did not answer");
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the capability cannot be checked now (the API server did not answer); try again",
                ));
            }
        },
    };
    let Some(held) = held else { return Err(bad()) };
    let env = held.spec.env.clone().unwrap_or_default();
    let presented = capability::Capability {
        namespace: ns,
        job,
        task,
        token,
    };
    let granted = env
        .get("MANAGER_COORDINATOR_URL")
        .and_then(|u| capability::parse(u))
        .is_some_and(|c| capability::grants(&c, &presented));
    match (granted, env.get("ROUND_ID"), env.get("PROPLET_ID")) {
        (true, Some(round_id), Some(proplet_id)) => Ok(Grant {
            round_id: round_id.clone(),
            proplet_id: proplet_id.clone(),
        }),
        _ => Err(bad()),
    }
}

/// Serves on a listener already bound (so that port 0 can be reported before serving starts).
pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Context>) -> anyhow::Result<()> {
    axum::serve(listener, router(ctx)).await?;
    Ok(())
}

fn job(ctx: &Context, ns: &str, name: &str) -> Option<Arc<FederatedJob>> {
    ctx.federated_jobs
        .get(&ObjectRef::<FederatedJob>::new(name).within(ns))
}

async fn dataset(
    State(ctx): State<Arc<Context>>,
    Path((ns, name, task, token, client_id)): Path<(String, String, String, String, String)>,
) -> Response {
    let grant = match authorize(&ctx, (&ns, &name, &task, &token)).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    if grant.proplet_id != client_id {
        return refused(
            &ctx,
            StatusCode::FORBIDDEN,
            "wrong_participant",
            format!(
                "this task's participant is {:?}: it reads its own data only",
                grant.proplet_id
            ),
        );
    }
    let outcome = |o: &str| {
        ctx.metrics
            .fl_dataset_requests_total
            .with_label_values(&[o])
            .inc()
    };
    let Some(job) = job(&ctx, &ns, &name) else {
        outcome("not_found");
        return error(
            StatusCode::NOT_FOUND,
            format!("no FederatedJob {ns}/{name}"),
        );
    };
    let Some(dataset) = job.spec.dataset.clone().filter(|d| !d.is_empty()) else {
        outcome("not_found");
        return error(
            StatusCode::NOT_FOUND,
            format!("FederatedJob {ns}/{name} names no dataset (spec.dataset)"),
        );
    };
    match patiently(transient, || {
        datasets::participant_data(&ctx.client, &ns, &dataset, &client_id)
    })
    .await
    {
        Ok(Some(data)) => {
            outcome("served");
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                data,
            )
                .into_response()
        }
        Ok(None) => {
            outcome("not_found");
            error(
                StatusCode::NOT_FOUND,
                format!(
                    "dataset {dataset:?} has no key {:?} in a ConfigMap labelled {}={dataset}",
                    datasets::key_for(&client_id),
                    datasets::DATASET_LABEL
                ),
            )
        }
        Err(e) => {
            outcome("error");
            error(
                StatusCode::BAD_GATEWAY,
                format!("reading dataset {dataset:?}: {e}"),
            )
        }
    }
}

async fn update(
    State(ctx): State<Arc<Context>>,
    Path((ns, name, task, token)): Path<(String, String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let grant = match authorize(&ctx, (&ns, &name, &task, &token)).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            ctx.metrics.fl_update("http", "too_large");
            return error(e.status(), e.body_text());
        }
    };
    if job(&ctx, &ns, &name).is_none() {
        ctx.metrics.fl_update("http", "unknown_round");
        return error(
            StatusCode::NOT_FOUND,
            format!("no FederatedJob {ns}/{name}"),
        );
    }
    let update = match Update::parse(&body) {
        Ok(u) => u,
        Err(e) => {
            ctx.metrics.fl_update("http", "malformed");
            tracing::warn!(%ns, job = %name, "malformed FL update: {e}");
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    if update.proplet_id != grant.proplet_id || update.round_id != grant.round_id {
        ctx.metrics.fl_update("http", "refused");
        return refused(
            &ctx,
            StatusCode::FORBIDDEN,
            "wrong_participant",
            format!(
                "this task posts {:?}'s update for {:?} only",
                grant.proplet_id, grant.round_id
            ),
        );
    }
    let target = Target::Job {
        namespace: &ns,
        name: &name,
    };
    match intake::receive(&ctx, target, &update, Via::Http).await {
        Ok(Receipt::Late) => error(
            StatusCode::CONFLICT,
            format!(
                "round {} is closed: the update is recorded and not aggregated",
                update.round_id
            ),
        ),
        Ok(r) => axum::Json(json!({"status": r.as_str()})).into_response(),
        Err(r) => error(
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
            r.message,
        ),
    }
}

async fn model(
    State(ctx): State<Arc<Context>>,
    Path((ns, name, task, token, version)): Path<(String, String, String, String, String)>,
) -> Response {
    if let Err(r) = authorize(&ctx, (&ns, &name, &task, &token)).await {
        return r;
    }
    let Ok(v) = version.parse::<u64>() else {
        ctx.metrics
            .fl_model_requests_total
            .with_label_values(&["not_found"])
            .inc();
        return error(
            StatusCode::NOT_FOUND,
            format!("{version:?} is not a model version"),
        );
    };
    match patiently(transient, || store::get_model(&ctx.client, &ns, &name, v)).await {
        Ok(Some(m)) => {
            ctx.metrics
                .fl_model_requests_total
                .with_label_values(&["served"])
                .inc();
            axum::Json(m.model).into_response()
        }
        Ok(None) => {
            ctx.metrics
                .fl_model_requests_total
                .with_label_values(&["not_found"])
                .inc();
            error(
                StatusCode::NOT_FOUND,
                format!("{ns}/{name} has no model version {v}"),
            )
        }
        Err(e) => {
            ctx.metrics
                .fl_model_requests_total
                .with_label_values(&["error"])
                .inc();
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("could not read the model: {e}"),
            )
        }
    }
}

async fn models(
    State(ctx): State<Arc<Context>>,
    Path((ns, name, task, token)): Path<(String, String, String, String)>,
) -> Response {
    if let Err(r) = authorize(&ctx, (&ns, &name, &task, &token)).await {
        return r;
    }
    match patiently(transient, || store::list_models(&ctx.client, &ns, &name)).await {
        Ok(versions) => {
            let list: Vec<Value> = versions
                .iter()
                .map(|v| json!({"version": v, "model_uri": store::model_uri(*v)}))
                .collect();
            axum::Json(json!({"models": list, "latest": versions.last()})).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not list models: {e}"),
        ),
    }
}

fn round_of(
    ctx: &Context,
    ns: &str,
    job: &str,
    round_id: &str,
) -> Option<Arc<crate::api::TrainingRound>> {
    ctx.training_rounds.state().into_iter().find(|r| {
        r.namespace().as_deref() == Some(ns)
            && r.spec.federated_job_ref.name == job
            && r.spec.round_id == round_id
    })
}

async fn round_complete(
    State(ctx): State<Arc<Context>>,
    Path((ns, name, task, token, round_id)): Path<(String, String, String, String, String)>,
) -> Response {
    if let Err(r) = authorize(&ctx, (&ns, &name, &task, &token)).await {
        return r;
    }
    let Some(r) = round_of(&ctx, &ns, &name, &round_id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no round {round_id:?} in {ns}/{name}"),
        );
    };
    let received = r
        .status
        .as_ref()
        .and_then(|s| s.updates_received)
        .unwrap_or(0);
    axum::Json(json!({
        "round_id": round_id,
        "completed": r.phase() == crate::api::training_round::phase::COMPLETED,
        "num_updates": received,
        "phase": r.phase(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct TaskQuery {
    round_id: String,
    proplet_id: String,
}

async fn task(
    State(ctx): State<Arc<Context>>,
    Path((ns, name, task, token)): Path<(String, String, String, String)>,
    Query(q): Query<TaskQuery>,
) -> Response {
    if let Err(r) = authorize(&ctx, (&ns, &name, &task, &token)).await {
        return r;
    }
    let Some(r) = round_of(&ctx, &ns, &name, &q.round_id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no round {:?} in {ns}/{name}", q.round_id),
        );
    };
    if r.participant_for(&q.proplet_id, |p| intake::client_of(&ctx, &ns, p))
        .is_none()
    {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{:?} is not a participant of {}",
                q.proplet_id,
                r.name_any()
            ),
        );
    }
    axum::Json(json!({"task": {
        "round_id": q.round_id,
        "model_ref": r.spec.model_ref,
        "config": {"proplet_id": q.proplet_id},
        "hyperparams": r.spec.hyperparams.clone().unwrap_or(json!({})),
    }}))
    .into_response()
}
