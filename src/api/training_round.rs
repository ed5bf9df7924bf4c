//! `TrainingRound`: one round of a FederatedJob.
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, any_json};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "propeller.propeller.abstractmachines.fr",
    version = "v1",
    kind = "TrainingRound",
    namespaced,
    status = "TrainingRoundStatus",
    shortname = "tround",
    category = "propeller",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".spec.federatedJobRef.name"}"#,
    printcolumn = r#"{"name":"Updates","type":"integer","jsonPath":".status.updatesReceived"}"#,
    printcolumn = r#"{"name":"Required","type":"integer","jsonPath":".status.updatesRequired"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRoundSpec {
    /// e.g. round-1.
    pub round_id: String,
    pub federated_job_ref: LocalRef,
    /// The model this round starts from.
    pub model_ref: String,
    pub task_wasm_image: String,
    /// Proplet names or clientIds.
    pub participants: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub hyperparams: Option<serde_json::Value>,
    #[serde(rename = "kOfN")]
    pub k_of_n: i64,
    pub timeout_seconds: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct LocalRef {
    /// Name of the FederatedJob.
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRoundStatus {
    /// Pending, Running, Aggregating, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<RoundParticipant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_received: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_required: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregated_model_ref: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundParticipant {
    pub proplet_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_received: Option<bool>,
}
