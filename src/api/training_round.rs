//! `TrainingRound`: one round of a FederatedJob.
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, any_json};

/// One round: a Task per participant, aggregated once k of n updates arrived.
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
    /// The FederatedJob this round belongs to.
    pub federated_job_ref: LocalRef,
    /// The model this round starts from.
    pub model_ref: String,
    /// The FL client module.
    pub task_wasm_image: String,
    /// Proplet names or clientIds.
    pub participants: Vec<String>,
    /// Training hyperparameters (HYPERPARAMS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub hyperparams: Option<serde_json::Value>,
    /// Updates needed to aggregate.
    #[serde(rename = "kOfN")]
    pub k_of_n: i64,
    /// Seconds the round may take.
    pub timeout_seconds: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct LocalRef {
    /// Name of the FederatedJob.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Progress of the round.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRoundStatus {
    /// Pending, Running, Aggregating, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// When the round started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the round ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// State of each participant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<RoundParticipant>,
    /// Updates received so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_received: Option<i64>,
    /// Updates needed (kOfN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_required: Option<i64>,
    /// The aggregated model of this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregated_model_ref: Option<String>,
    /// Its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<i64>,
    /// The participants whose updates are aggregated (fixed when the round enters Aggregating).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregated_from: Vec<String>,
    /// Samples behind the aggregated updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_samples: Option<i64>,
    /// Sample-weighted means of the numeric metrics clients reported (e.g. loss).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Updates that arrived after the round closed: recorded, not aggregated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_updates: Option<i64>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and progress conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundParticipant {
    /// Proplet name or clientId.
    pub proplet_id: String,
    /// The participant's Task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_ref: Option<ObjectReference>,
    /// The participant's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Whether its update arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_received: Option<bool>,
    /// The proplet's MQTT clientId (`proplet_id` in its updates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Samples its update was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_samples: Option<i64>,
    /// How its update came: http, mqtt (the fallback topic) or result (the result envelope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_via: Option<String>,
}

/// Round phases (strings, as upstream's status shows them).
pub mod phase {
    pub const PENDING: &str = "Pending";
    pub const RUNNING: &str = "Running";
    pub const AGGREGATING: &str = "Aggregating";
    pub const COMPLETED: &str = "Completed";
    pub const FAILED: &str = "Failed";
}

impl TrainingRound {
    pub fn phase(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or(phase::PENDING)
    }

    /// Aggregating, completed or failed: no update counts any more.
    pub fn is_closed(&self) -> bool {
        matches!(
            self.phase(),
            phase::AGGREGATING | phase::COMPLETED | phase::FAILED
        )
    }

    /// The participant (as the spec names it) that `proplet_id` is: the name itself, or the clientId of
    /// the Proplet of that name (`client_of` looks it up).
    pub fn participant_for(
        &self,
        proplet_id: &str,
        client_of: impl Fn(&str) -> Option<String>,
    ) -> Option<String> {
        self.spec
            .participants
            .iter()
            .find(|p| *p == proplet_id || client_of(p).as_deref() == Some(proplet_id))
            .cloned()
    }
}
