//! The coordinator and model registry proplets talk to, under `/fl/{namespace}/{federatedjob}` (the
//! `MANAGER_COORDINATOR_URL` and `MODEL_REGISTRY_URL` of that experiment's round tasks):
//! - `POST …/update`: a client update (the FL client's JSON);
//! - `GET …/models/{version}`: a stored model; `GET …/models`: the stored versions;
//! - `GET …/datasets/{clientId}`: a participant's training data (the round tasks' `DATA_STORE_URL`), from
//!   the ConfigMaps of the job's `spec.dataset` (see [`super::datasets`]);
//! - `GET …/rounds/{round_id}/complete` and `GET …/task?round_id=…&proplet_id=…`: the coordinator reads
//!   of Propeller's own coordinator.
//!
//! Everything is read from the cluster (watch caches and ConfigMaps), so every replica answers alike.
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use serde::Deserialize;
use serde_json::{Value, json};

use super::datasets;
use super::intake::{self, Receipt, Target};
use super::store::{self, Via};
use super::update::Update;
use crate::api::FederatedJob;
use crate::context::Context;

/// The base URL (coordinator and registry) of one experiment, as proplets are given it.
pub fn experiment_url(public: &str, namespace: &str, job: &str) -> String {
    format!("{}/fl/{namespace}/{job}", public.trim_end_matches('/'))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

pub fn router(ctx: Arc<Context>) -> Router {
    let limit = ctx.config.fl_max_update_bytes;
    Router::new()
        .route("/fl/{ns}/{job}/update", post(update))
        .route("/fl/{ns}/{job}/models", get(models))
        .route("/fl/{ns}/{job}/models/{version}", get(model))
        .route(
            "/fl/{ns}/{job}/rounds/{round}/complete",
            get(round_complete),
        )
        .route("/fl/{ns}/{job}/task", get(task))
        .route("/fl/{ns}/{job}/datasets/{client}", get(dataset))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ctx)
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
    Path((ns, name, client_id)): Path<(String, String, String)>,
) -> Response {
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
    match datasets::participant_data(&ctx.client, &ns, &dataset, &client_id).await {
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
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
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
    Path((ns, name, version)): Path<(String, String, String)>,
) -> Response {
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
    match store::get_model(&ctx.client, &ns, &name, v).await {
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
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match store::list_models(&ctx.client, &ns, &name).await {
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
    Path((ns, name, round_id)): Path<(String, String, String)>,
) -> Response {
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
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<TaskQuery>,
) -> Response {
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
