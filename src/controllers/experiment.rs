//! What every FederatedJob shares, flat or hub: the status of one that cannot start or go on, and its
//! model version 0.
use kube::runtime::controller::Action;
use serde_json::json;

use super::now;
use crate::api::FederatedJob;
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::federated_job::FederatedJobStatus;
use crate::context::Context;
use crate::error::Result;
use crate::fl::store::{self, StoreError};

/// Stores model version 0 (`spec.initialModel`, else `{}`) unless stored; `Ok(Err(why))` when it is too
/// large to store.
pub async fn store_initial_model(
    ctx: &Context,
    job: &FederatedJob,
) -> Result<std::result::Result<(), String>> {
    let initial = job.spec.initial_model.clone().unwrap_or_else(|| json!({}));
    match store::put_model(ctx, job, 0, &initial, &[], ctx.config.fl_max_model_bytes).await {
        Ok(_) => Ok(Ok(())),
        Err(StoreError::TooLarge(msg)) => Ok(Err(msg)),
        Err(StoreError::Kube(e)) => Err(e.into()),
    }
}

/// The experiment cannot start or go on (`Ready=False` with `reason`): the status, an Event, nothing
/// created.
pub async fn not_started(
    job: &FederatedJob,
    ctx: &Context,
    old: FederatedJobStatus,
    phase: &str,
    reason: &str,
    msg: &str,
) -> Result<Action> {
    let g = job.metadata.generation;
    let mut status = old.clone();
    status.observed_generation = g;
    status.phase = Some(phase.into());
    if phase == "Failed" {
        status.completion_time.get_or_insert_with(now);
    }
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        reason,
        msg,
        g,
    );
    super::report_blocked(ctx, job, &old, &status, reason, "Start", msg).await?;
    Ok(Action::await_change())
}
