//! `Task`: one WebAssembly workload to run on a proplet.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, ResourceMetrics, any_json, base64_bytes, string_or_number_list};

/// What to run, where, and how.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "propeller.propeller.abstractmachines.fr",
    version = "v1",
    kind = "Task",
    namespaced,
    status = "TaskStatus",
    shortname = "ptask",
    category = "propeller",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Proplet","type":"string","jsonPath":".status.assignedProplet"}"#,
    printcolumn = r#"{"name":"Start Time","type":"date","jsonPath":".status.startedAt"}"#,
    printcolumn = r#"{"name":"Finish Time","type":"date","jsonPath":".status.finishedAt"}"#,
    printcolumn = r#"{"name":"Preferred Type","type":"string","jsonPath":".spec.preferredPropletType","priority":1}"#,
    printcolumn = r#"{"name":"Results","type":"string","jsonPath":".status.results","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// Logical name of the task.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Wasm export to call. Empty: the Task's metadata.name. A name starting with `fl-round-` or `_start`
    /// runs the module as a WASI command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_name: Option<String>,
    /// standard or federated; forwarded to the proplet.
    #[serde(default)]
    pub kind: TaskKind,
    /// Where the proplet gets the module: an http(s) URL it downloads, or a registry reference it asks for
    /// over MQTT (registry/proplet). Ignored when `file` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// The Wasm module itself, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "base64_bytes")]
    pub file: Option<String>,
    /// Command-line arguments for WASI commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cli_args: Option<Vec<String>>,
    /// Arguments of the export, in order. Numbers and strings are accepted; proplets receive strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "string_or_number_list")]
    pub inputs: Option<Vec<serde_json::Value>>,
    /// Which proplets may run the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_selector: Option<PropletSelector>,
    /// Restrict to k8s or external proplets, or any.
    #[serde(default)]
    pub preferred_proplet_type: PreferredPropletType,
    /// CPU and memory the task needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_requirements: Option<ResourceRequirements>,
    /// Environment variables for the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Long-running task. Proplets report a daemon as finished at once, with an empty result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<bool>,
    /// Run on every proplet of the channel instead of one; results are recorded per proplet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<bool>,
    /// infer or train; forwarded to the proplet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TaskMode>,
    /// Per-task resource monitoring on the proplet (sent as task_metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring_profile: Option<MonitoringProfile>,
    /// Always, OnFailure or Never: whether an interrupted or failed task is run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    /// Confidential computing: the proplet fetches the key from the KBS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// KBS resource path of the decryption key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kbs_resource_path: Option<String>,
    /// Names of Tasks in the same namespace that must finish first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<String>>,
    /// success (default): run when every dependency completed; failure: run when one failed; always: run
    /// once every dependency has ended, whatever the outcome. A skipped dependency counts as not succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_if: Option<RunIf>,
    /// Results of dependencies handed to this task when it starts: appended to its inputs or set as
    /// environment variables. Each `task` must be listed in dependsOn. (They are also sent to the proplet
    /// as `parent_results`, as the Propeller manager does.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_from: Option<Vec<ResultSource>>,
    /// Groups tasks of one workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Set by a PropellerJob on its tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// 5-field cron expression (minute hour day-of-month month day-of-week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Run again at every tick of `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_recurring: Option<bool>,
    /// IANA time zone of `schedule` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// 0 (lowest) to 100; forwarded to the proplet.
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 100))]
    pub priority: i32,
    /// Free-form object forwarded to the proplet as `metadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub metadata: Option<serde_json::Value>,
    /// Storage path for the proplet's hardware abstraction layer (sent as hal_storage_path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hal_storage_path: Option<String>,
    /// Seconds a dispatched task may run before it fails with reason Timeout (default: the operator's
    /// --task-timeout). Proplets drop some malformed starts without answering, so every task has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<i64>,
    /// Job backend only (tasks on k8s proplets): how many times the runner pod is retried before the Job
    /// fails. Default: 0 with restartPolicy Never, otherwise the operator's --max-task-attempts minus one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: Option<i32>,
}

fn default_priority() -> i32 {
    50
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    #[default]
    Standard,
    Federated,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreferredPropletType {
    K8s,
    External,
    #[default]
    Any,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskMode {
    Infer,
    Train,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunIf {
    Success,
    Failure,
    Always,
}

/// One dependency result handed to a task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultSource {
    /// The dependency (a dependsOn name).
    #[schemars(length(min = 1))]
    pub task: String,
    /// input (default): appended to the inputs, after spec.inputs, in list order; env: an environment
    /// variable.
    #[serde(default, rename = "as")]
    pub target: ResultTarget,
    /// Variable name for `as: env` (default RESULT_<TASK>, upper-cased, other characters as `_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResultTarget {
    #[default]
    Input,
    Env,
}

impl ResultSource {
    /// The environment variable for `as: env`.
    pub fn env_name(&self) -> String {
        self.env
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| {
                let upper: String = self
                    .task
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("RESULT_{upper}")
            })
    }
}

/// Which proplets may run a task. All given rules must hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropletSelector {
    /// One proplet, by Proplet name or by its clientId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_id: Option<String>,
    /// Labels the Proplet must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// The external proplet's deviceType must be one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_device_types: Option<Vec<String>>,
    /// The external proplet must have all these capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_capabilities: Option<Vec<String>>,
}

/// Resources a task needs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    /// CPU, e.g. 500m or 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]*)?m?$"))]
    pub cpu: Option<String>,
    /// Memory, e.g. 128Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]*)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub memory: Option<String>,
    /// Other resources by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<BTreeMap<String, String>>,
}

/// Per-task monitoring on the proplet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringProfile {
    /// Monitor the task's resource use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Sampling interval as a duration (e.g. 10s); proplets receive whole seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Sample CPU use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cpu: Option<bool>,
    /// Sample memory use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_memory: Option<bool>,
    /// Sample disk I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_disk_io: Option<bool>,
    /// Sample the thread count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_threads: Option<bool>,
    /// Sample open file descriptors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_file_descriptors: Option<bool>,
    /// Publish samples as task_metrics over MQTT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_to_mqtt: Option<bool>,
    /// Keep past samples on the proplet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_history: Option<bool>,
    /// How many past samples the proplet keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_size: Option<i64>,
}

/// Lifecycle phase of a task.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskPhase {
    #[default]
    Pending,
    Scheduled,
    Running,
    Completed,
    Failed,
    Skipped,
    Interrupted,
}

impl TaskPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskPhase::Completed | TaskPhase::Failed | TaskPhase::Skipped | TaskPhase::Interrupted
        )
    }

    /// Occupies a proplet.
    pub const ALL: [TaskPhase; 7] = [
        TaskPhase::Pending,
        TaskPhase::Scheduled,
        TaskPhase::Running,
        TaskPhase::Completed,
        TaskPhase::Failed,
        TaskPhase::Skipped,
        TaskPhase::Interrupted,
    ];

    pub fn is_active(self) -> bool {
        matches!(self, TaskPhase::Scheduled | TaskPhase::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Pending => "pending",
            TaskPhase::Scheduled => "scheduled",
            TaskPhase::Running => "running",
            TaskPhase::Completed => "completed",
            TaskPhase::Failed => "failed",
            TaskPhase::Skipped => "skipped",
            TaskPhase::Interrupted => "interrupted",
        }
    }
}

/// What happened to the task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    /// pending, scheduled, running, completed, failed, skipped or interrupted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,
    /// Name of the Proplet the task was given to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_proplet: Option<String>,
    /// MQTT clientId of that proplet (the `proplet_id` on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_client_id: Option<String>,
    /// When the operator first saw the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    /// Last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
    /// When the start message was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the task reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Next cron tick, for scheduled tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// The result: the proplet's result string, an object for federated tasks, or per-proplet results of a
    /// broadcast (an object keyed by clientId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub results: Option<serde_json::Value>,
    /// Why the task failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// clientIds a broadcast was sent to; it completes when each has answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broadcast_targets: Vec<String>,
    /// How many times the task was dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// Ready, Scheduled, Started, Completed.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Latest task metrics reported by the proplet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_metrics: Option<ResourceMetrics>,
    /// The Kubernetes Job running the task (job backend, k8s proplets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Earlier runs of a recurring task, newest last (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RunRecord>,
    /// metadata.generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Task {
    pub fn phase(&self) -> TaskPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}

/// One finished run of a recurring task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// completed, failed or skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,
    /// The result (as text, at most 256 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<String>,
    /// The error (at most 256 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
