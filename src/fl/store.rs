//! Durable FL state in the cluster, so any replica serves it and a restart loses nothing: each model
//! version is a ConfigMap owned by its FederatedJob, each received update a ConfigMap owned by its
//! TrainingRound. Creates are idempotent by name: a second copy of an update (HTTP, then the MQTT
//! fallback, then the result envelope) finds the first one there.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};

use super::update::Update;
use crate::api::{FederatedJob, TrainingRound};
use crate::context::Context;
use crate::naming::bounded_name;

/// On model ConfigMaps: the FederatedJob (as a label value).
pub const MODEL_LABEL: &str = "propeller.propeller.abstractmachines.fr/fl-model";
/// On update ConfigMaps: the TrainingRound (as a label value).
pub const UPDATE_LABEL: &str = "propeller.propeller.abstractmachines.fr/fl-update";
pub const VERSION_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/model-version";
pub const AGGREGATED_FROM_ANNOTATION: &str =
    "propeller.propeller.abstractmachines.fr/aggregated-from";
pub const PARTICIPANT_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/participant";
pub const VIA_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/received-via";
pub const LATE_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/late";
pub const MODEL_KEY: &str = "model.json";
pub const UPDATE_KEY: &str = "update.json";
/// What one ConfigMap can hold, with room for its metadata.
pub const CONFIGMAP_LIMIT: usize = 1024 * 1024 - 16 * 1024;

/// The URI a round hands proplets; they parse the version back out of it.
pub fn model_uri(version: u64) -> String {
    format!("fl/models/global_model_v{version}")
}

/// The version a proplet asks for given `MODEL_URI`: the digits after `global_model_v`, else the trailing
/// digits, else 0 (the real proplet's rule).
pub fn version_of(uri: &str) -> u64 {
    let digits = |s: &str| -> Option<u64> {
        let d: String = s.chars().take_while(char::is_ascii_digit).collect();
        d.parse().ok()
    };
    if let Some(i) = uri.rfind("global_model_v")
        && let Some(v) = digits(&uri[i + "global_model_v".len()..])
    {
        return v;
    }
    let tail: String = uri
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    tail.parse().unwrap_or(0)
}

pub fn label_value(name: &str) -> String {
    bounded_name(name, "", 63)
}

pub fn model_name(job: &str, version: u64) -> String {
    bounded_name(job, &format!("-model-v{version}"), 253)
}

pub fn update_name(round: &str, participant: &str) -> String {
    bounded_name(&format!("{round}-update-{participant}"), "", 253)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Kube(#[from] kube::Error),
}

/// A model version as stored.
pub struct StoredModel {
    pub model: Value,
    /// The participants whose updates made it (empty for the initial model).
    pub aggregated_from: Vec<String>,
}

fn parse_model(cm: &ConfigMap) -> Option<StoredModel> {
    let text = cm.data.as_ref()?.get(MODEL_KEY)?;
    let model = serde_json::from_str(text).ok()?;
    let aggregated_from = cm
        .annotations()
        .get(AGGREGATED_FROM_ANNOTATION)
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default();
    Some(StoredModel {
        model,
        aggregated_from,
    })
}

/// Stores model `version` of `job` unless it exists; returns what is stored under that version (a
/// version is written once: an operator restarted mid-aggregation finds its earlier result).
pub async fn put_model(
    ctx: &Context,
    job: &FederatedJob,
    version: u64,
    model: &Value,
    aggregated_from: &[String],
    max_bytes: usize,
) -> Result<StoredModel, StoreError> {
    let text = model.to_string();
    let limit = max_bytes.min(CONFIGMAP_LIMIT);
    if text.len() > limit {
        return Err(StoreError::TooLarge(format!(
            "model version {version} is {} bytes, over the limit of {limit} bytes \
             (--fl-max-model-bytes; a model is one ConfigMap, at most 1 MiB)",
            text.len()
        )));
    }
    let ns = job.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let name = model_name(&job.name_any(), version);
    let owner = job.controller_owner_ref(&()).map(|mut o| {
        o.controller = None;
        o
    });
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {MODEL_LABEL: label_value(&job.name_any())},
            "annotations": {
                VERSION_ANNOTATION: version.to_string(),
                AGGREGATED_FROM_ANNOTATION: serde_json::to_string(aggregated_from).unwrap_or_default(),
            },
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "data": {MODEL_KEY: text},
    }))
    .map_err(|e| StoreError::TooLarge(e.to_string()))?;
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => {
            ctx.metrics.api_write("configmaps", "create");
            Ok(StoredModel {
                model: model.clone(),
                aggregated_from: aggregated_from.to_vec(),
            })
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&name).await?;
            parse_model(&existing).ok_or_else(|| {
                StoreError::TooLarge(format!("ConfigMap {name} exists but holds no model"))
            })
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn get_model(
    client: &Client,
    namespace: &str,
    job: &str,
    version: u64,
) -> Result<Option<StoredModel>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .get_opt(&model_name(job, version))
        .await?
        .as_ref()
        .and_then(parse_model))
}

/// The stored versions of `job`, ascending.
pub async fn list_models(
    client: &Client,
    namespace: &str,
    job: &str,
) -> Result<Vec<u64>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("{MODEL_LABEL}={}", label_value(job)));
    let mut versions: Vec<u64> = api
        .list_metadata(&lp)
        .await?
        .items
        .iter()
        .filter_map(|m| m.annotations().get(VERSION_ANNOTATION)?.parse().ok())
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// The stored versions of `job` with the participants (or members) each was aggregated from.
pub async fn list_model_sources(
    client: &Client,
    namespace: &str,
    job: &str,
) -> Result<BTreeMap<u64, Vec<String>>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("{MODEL_LABEL}={}", label_value(job)));
    Ok(api
        .list_metadata(&lp)
        .await?
        .items
        .iter()
        .filter_map(|m| {
            let a = m.annotations();
            let version = a.get(VERSION_ANNOTATION)?.parse().ok()?;
            let from = a
                .get(AGGREGATED_FROM_ANNOTATION)
                .and_then(|f| serde_json::from_str(f).ok())
                .unwrap_or_default();
            Some((version, from))
        })
        .collect())
}

/// How an update reached the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Http,
    Mqtt,
    /// The proplet's result envelope (neither HTTP nor the MQTT fallback got through).
    Result,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::Mqtt => "mqtt",
            Via::Result => "result",
        }
    }
}

/// Stores `participant`'s update for `round`. `Ok(false)`: one was already stored (the first one counts).
pub async fn put_update(
    ctx: &Context,
    round: &TrainingRound,
    participant: &str,
    update: &Update,
    via: Via,
    late: bool,
    max_bytes: usize,
) -> Result<bool, StoreError> {
    let text = update.to_json().to_string();
    let limit = max_bytes.min(CONFIGMAP_LIMIT);
    if text.len() > limit {
        return Err(StoreError::TooLarge(format!(
            "the update is {} bytes, over the limit of {limit} bytes (--fl-max-update-bytes)",
            text.len()
        )));
    }
    let ns = round.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = round.controller_owner_ref(&());
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": update_name(&round.name_any(), participant),
            "labels": {UPDATE_LABEL: label_value(&round.name_any())},
            "annotations": {
                PARTICIPANT_ANNOTATION: participant,
                VIA_ANNOTATION: via.as_str(),
                LATE_ANNOTATION: late.to_string(),
            },
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "data": {UPDATE_KEY: text},
    }))
    .map_err(|e| StoreError::TooLarge(e.to_string()))?;
    Ok(create_once(ctx, &api, &cm).await?)
}

/// Creates `cm` unless one of its name exists: `Ok(false)` when it did (the first one stands).
pub async fn create_once(
    ctx: &Context,
    api: &Api<ConfigMap>,
    cm: &ConfigMap,
) -> Result<bool, kube::Error> {
    match api.create(&PostParams::default(), cm).await {
        Ok(_) => {
            ctx.metrics.api_write("configmaps", "create");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// An update as stored for a round.
#[derive(Clone, Debug)]
pub struct StoredUpdate {
    pub update: Update,
    pub via: String,
    /// It arrived after the round had closed: recorded, never aggregated.
    pub late: bool,
}

/// The updates stored for `round`, by participant, from the watch cache of update ConfigMaps.
pub fn updates_of(
    cache: &Store<ConfigMap>,
    round: &TrainingRound,
) -> BTreeMap<String, StoredUpdate> {
    let uid = round.uid().unwrap_or_default();
    let ns = round.namespace();
    cache
        .state()
        .iter()
        .filter(|cm| cm.namespace() == ns && cm.owner_references().iter().any(|o| o.uid == uid))
        .filter_map(|cm| {
            let a = cm.annotations();
            let participant = a.get(PARTICIPANT_ANNOTATION)?.clone();
            let text = cm.data.as_ref()?.get(UPDATE_KEY)?;
            let update = Update::from_value(&serde_json::from_str(text).ok()?).ok()?;
            Some((
                participant,
                StoredUpdate {
                    update,
                    via: a.get(VIA_ANNOTATION).cloned().unwrap_or_default(),
                    late: a.get(LATE_ANNOTATION).is_some_and(|l| l == "true"),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_the_proplet_parses_them() {
        assert_eq!(version_of(&model_uri(7)), 7);
        assert_eq!(version_of("fl/models/global_model_v12"), 12);
        assert_eq!(version_of("oci://registry/model:3"), 3);
        assert_eq!(version_of("model-latest"), 0);
    }
}
