//! `PropellerJob`: a named batch of Tasks run as a group.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Condition;
use super::task::TaskSpec;

/// A batch of Tasks and how they run.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "propeller.propeller.abstractmachines.fr",
    version = "v1",
    kind = "PropellerJob",
    namespaced,
    status = "PropellerJobStatus",
    shortname = "pjob",
    category = "propeller",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.executionMode"}"#,
    printcolumn = r#"{"name":"Tasks","type":"integer","jsonPath":".status.taskCount"}"#,
    printcolumn = r#"{"name":"Completed","type":"integer","jsonPath":".status.completedCount"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failedCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PropellerJobSpec {
    /// Logical name of the job.
    #[schemars(length(min = 1))]
    pub name: String,
    /// parallel: all tasks at once; sequential: one at a time in list order; configurable: dependsOn decides.
    #[serde(default)]
    pub execution_mode: ExecutionMode,
    /// Tasks the job creates; dependsOn names refer to sibling tasks[].name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskSpec>>,
    /// Existing Tasks in the same namespace that count toward the job's completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_refs: Option<Vec<String>>,
    /// sequential only: run the next task after a failed one (default false: the remaining tasks are
    /// skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_on_failure: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionMode {
    Parallel,
    Sequential,
    #[default]
    Configurable,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    #[default]
    Pending,
    Running,
    Completed,
    Failed,
}

/// Progress of the job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropellerJobStatus {
    /// Pending, Running, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// When the job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// When the operator first saw the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    /// Last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
    /// Tasks in the job (spec.tasks and spec.taskRefs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_count: Option<i64>,
    /// Tasks completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_count: Option<i64>,
    /// Tasks failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_count: Option<i64>,
    /// Tasks skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_count: Option<i64>,
    /// Tasks interrupted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_count: Option<i64>,
    /// Tasks running or scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_count: Option<i64>,
    /// Tasks not started yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_count: Option<i64>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Running, Completed, Failed, Ready.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
