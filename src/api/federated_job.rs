//! `FederatedJob`: a federated-learning experiment of several rounds over several proplets.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, any_json};

/// A federated-learning experiment.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "propeller.propeller.abstractmachines.fr",
    version = "v1",
    kind = "FederatedJob",
    namespaced,
    status = "FederatedJobStatus",
    shortname = "fedjob",
    category = "propeller",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Current Round","type":"integer","jsonPath":".status.currentRound"}"#,
    printcolumn = r#"{"name":"Completed Rounds","type":"integer","jsonPath":".status.completedRounds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FederatedJobSpec {
    /// Experiment identifier (FL_JOB_ID of the round tasks).
    pub experiment_id: String,
    /// The initial model.
    pub model_ref: String,
    /// The FL client module (a registry reference or http(s) URL).
    pub task_wasm_image: String,
    /// Proplets taking part, by Proplet name or clientId. Empty in a hub job (`members`): each member
    /// names its own.
    #[serde(default)]
    pub participants: Vec<Participant>,
    /// Training hyperparameters, passed to the client as HYPERPARAMS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub hyperparams: Option<serde_json::Value>,
    /// Updates needed to aggregate a round. In a hub job: the default for each member (capped at its
    /// participants; 0 or absent: all of them).
    #[serde(rename = "kOfN", default)]
    pub k_of_n: i64,
    /// Seconds a round may take.
    pub timeout_seconds: i64,
    /// How many rounds to run.
    pub rounds: RoundsSpec,
    /// How updates are combined.
    pub aggregator: AggregatorSpec,
    /// The model round 1 starts from (model version 0): an object of numbers and number lists (e.g.
    /// `{"w":[0,0,0],"b":0}`) or a list of numbers. Without it, version 0 is `{}` and clients start
    /// from their own initial weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub initial_model: Option<serde_json::Value>,
    /// Participants' training data: ConfigMaps in this namespace labelled
    /// `propeller.propeller.abstractmachines.fr/dataset: <this name>`, each key `<clientId>.json` one
    /// participant's data. Round tasks then get `DATA_STORE_URL`, and each participant fetches its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Run the experiment across member clusters (on a hub operator, `--hub`): each member trains with its
    /// own proplets and aggregates locally; the hub combines the member models (weighted by samples) into
    /// each global model version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<MembersSpec>,
}

/// The member clusters of a hub experiment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MembersSpec {
    /// Member models a round needs (default: every member). A member that is unreachable, fails or times
    /// out counts as missing; below this the round waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<i64>,
    /// The members taking part and who trains there.
    pub clusters: Vec<MemberParticipants>,
}

/// One member cluster of a hub experiment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberParticipants {
    /// The MemberCluster (the name of its registration Secret).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace on the member for its FederatedJobs and Proplets (default: this job's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Proplets there, by name or clientId. Without them: the Running proplets matching `selector` (all
    /// when absent), at most `maxParticipants`, in name order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<Participant>,
    /// Labels the member's Proplets must have (`matchLabels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<std::collections::BTreeMap<String, String>>,
    /// At most this many proplets chosen by `selector` (or all Running ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_participants: Option<i64>,
    /// Updates the member needs to aggregate its round (default: the job's kOfN, else all participants).
    #[serde(rename = "kOfN", default, skip_serializing_if = "Option::is_none")]
    pub k_of_n: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    /// Proplet name or clientId.
    pub proplet_id: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundsSpec {
    /// Number of rounds (at least 1).
    pub total: i64,
    /// Round strategy (e.g. sequential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AggregatorSpec {
    /// `fedavg` (sample-weighted mean) or `trimmed-mean` (per coordinate, the extremes dropped).
    pub algorithm: String,
    /// Algorithm settings: `trimFraction` (0 to below 0.5, default 0.1) for trimmed-mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub config: Option<serde_json::Value>,
}

/// Progress of the experiment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedJobStatus {
    /// Pending, Running, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The round in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_round: Option<i64>,
    /// Rounds completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_rounds: Option<i64>,
    /// Ready and progress conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// State of each participant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<ParticipantStatus>,
    /// The latest aggregated model (`fl/models/global_model_v{N}`: ConfigMap `{job}-model-v{N}`, served
    /// to round Tasks at `…/models/{N}` under their own URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregated_model_ref: Option<String>,
    /// Version of the latest model (0: the initial model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<i64>,
    /// What each completed round produced (the last 50 rounds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_metrics: Vec<RoundMetrics>,
    /// When the first round started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the experiment completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Hub jobs: each member's part in the current round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberRoundStatus>,
    /// Hub jobs: when the current round started (its deadline is `timeoutSeconds` later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_start_time: Option<Time>,
}

/// A member's part in a hub round.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberRoundStatus {
    /// The member cluster.
    pub name: String,
    /// Pending, Training, Contributed, Failed or Unreachable.
    pub state: String,
    /// The member's FederatedJob for this round (in the member's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Proplets training there this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participants: Option<i64>,
    /// Samples behind the member's model (once contributed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<i64>,
    /// Rounds whose global model includes this member's model.
    #[serde(default)]
    pub rounds_contributed: i64,
    /// Why the member is missing (never a credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One completed round, as the experiment's history.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundMetrics {
    /// Round number (1-based).
    pub round: i64,
    /// Updates aggregated.
    pub updates: i64,
    /// Samples behind them.
    pub total_samples: i64,
    /// Sample-weighted means of the numeric metrics clients reported (e.g. loss).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// The model the round produced.
    pub model_version: i64,
    /// When it was aggregated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantStatus {
    /// Proplet name or clientId.
    pub proplet_id: String,
    /// The participant's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// When its last update arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<Time>,
    /// Rounds whose aggregate includes its update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds_contributed: Option<i64>,
}
