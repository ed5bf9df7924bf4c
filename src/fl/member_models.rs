//! Member models kept on the hub: when a member's round completes, the hub copies its model and sample
//! count into a ConfigMap of its own (owned by the hub job), before aggregating. A member that becomes
//! unreachable afterwards still counts, and a hub restarted mid-round aggregates from what it holds.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::federation::owner_of;
use super::store::{CONFIGMAP_LIMIT, StoreError, UPDATE_KEY, create_once, label_value};
use super::update::Update;
use crate::api::FederatedJob;
use crate::context::Context;
use crate::naming::bounded_name;

/// On member-model ConfigMaps: the hub job (as a label value).
pub const MEMBER_MODEL_LABEL: &str = "propeller.propeller.abstractmachines.fr/fl-member-model";
/// On member-model ConfigMaps: the hub round.
pub const ROUND_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/hub-round";
/// On member-model ConfigMaps: the member.
pub const MEMBER_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/member";

pub fn member_model_name(job: &str, round: i64, member: &str) -> String {
    bounded_name(&format!("{job}-round-{round}-member-{member}"), "", 253)
}

/// Stores `member`'s model of hub round `round` unless one is stored (`Ok(false)`: the first one counts).
pub async fn put_member_model(
    ctx: &Context,
    job: &FederatedJob,
    round: i64,
    member: &str,
    model: &Update,
) -> Result<bool, StoreError> {
    let text = model.to_json().to_string();
    let limit = ctx.config.fl_max_model_bytes.min(CONFIGMAP_LIMIT);
    if text.len() > limit {
        return Err(StoreError::TooLarge(format!(
            "member {member}'s model is {} bytes, over the limit of {limit} bytes (--fl-max-model-bytes)",
            text.len()
        )));
    }
    let ns = job.namespace().unwrap_or_default();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": member_model_name(&job.name_any(), round, member),
            "labels": {MEMBER_MODEL_LABEL: label_value(&job.name_any())},
            "annotations": {ROUND_ANNOTATION: round.to_string(), MEMBER_ANNOTATION: member},
            "ownerReferences": owner_of(job).into_iter().collect::<Vec<_>>(),
        },
        "data": {UPDATE_KEY: text},
    }))
    .map_err(|e| StoreError::TooLarge(e.to_string()))?;
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    Ok(create_once(ctx, &api, &cm).await?)
}

/// The member models stored for hub round `round` of `job`, by member.
pub async fn member_models(
    client: &Client,
    job: &FederatedJob,
    round: i64,
) -> Result<BTreeMap<String, Update>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let lp = ListParams::default().labels(&format!(
        "{MEMBER_MODEL_LABEL}={}",
        label_value(&job.name_any())
    ));
    let uid = job.uid().unwrap_or_default();
    Ok(api
        .list(&lp)
        .await?
        .items
        .iter()
        .filter(|cm| cm.owner_references().iter().any(|o| o.uid == uid))
        .filter(|cm| {
            cm.annotations()
                .get(ROUND_ANNOTATION)
                .is_some_and(|r| *r == round.to_string())
        })
        .filter_map(|cm| {
            let member = cm.annotations().get(MEMBER_ANNOTATION)?.clone();
            let text = cm.data.as_ref()?.get(UPDATE_KEY)?;
            let update = Update::from_value(&serde_json::from_str(text).ok()?).ok()?;
            Some((member, update))
        })
        .collect())
}
