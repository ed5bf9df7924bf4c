//! Types shared by several kinds: conditions, resource metrics, free-form JSON.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Status of a condition, as in metav1.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A metav1-style condition. `reason` and `message` are optional in the schema so statuses written by the
/// upstream operator stay valid; this operator always sets both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition, e.g. Ready, Connected, Healthy, Scheduled, Started, Completed.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// When the status last changed.
    pub last_transition_time: Time,
    /// One CamelCase word saying why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The metadata.generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Sets a condition; the transition time moves only when the status changes. Returns whether anything
/// (status, reason, message) changed, so callers write status only on transitions.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> bool {
    let now = Time(jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status
                || c.reason.as_deref() != Some(reason)
                || c.message.as_deref() != Some(message)
                || c.observed_generation != generation;
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = Some(reason.to_string());
            c.message = Some(message.to_string());
            c.observed_generation = generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status,
                last_transition_time: now,
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
                observed_generation: generation,
            });
            true
        }
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Latest resource usage of a proplet or a task. Percentages are ×1000 (12.5 % → 12500).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceMetrics {
    /// When the operator received the sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Time>,
    /// CPU use in thousandths of a percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_milli_percent: Option<i64>,
    /// Memory use in thousandths of a percent of the total memory, when the total is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_milli_percent: Option<i64>,
    /// Resident memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
}

/// Schema for a field that holds any JSON value (kept as is by the API server).
pub fn any_json(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Schema for a list of scalars given as strings or numbers.
pub fn string_or_number_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": { "x-kubernetes-preserve-unknown-fields": true },
    })
}

/// Schema for base64 data (the API server checks the encoding).
pub fn base64_bytes(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "byte" })
}
