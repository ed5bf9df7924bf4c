//! `Proplet`: a worker that runs Wasm — a Deployment the operator manages (`k8s`) or a device it only
//! watches over MQTT (`external`).
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, ResourceMetrics};

/// A proplet and how it reaches the broker.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "propeller.propeller.abstractmachines.fr",
    version = "v1",
    kind = "Proplet",
    namespaced,
    status = "PropletStatus",
    shortname = "ppl",
    category = "propeller",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Tasks","type":"integer","jsonPath":".status.taskCount"}"#,
    printcolumn = r#"{"name":"Replicas","type":"string","jsonPath":".status.k8sStatus.readyReplicas"}"#,
    printcolumn = r#"{"name":"Client ID","type":"string","jsonPath":".status.clientId","priority":1}"#,
    printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self.type != 'k8s' || has(self.k8s)").message("spec.k8s is required when type is k8s"))]
#[serde(rename_all = "camelCase")]
pub struct PropletSpec {
    /// k8s: the operator runs the proplet as a Deployment. external: a device or process it only watches.
    #[serde(rename = "type")]
    pub type_: PropletType,
    /// Details of an external proplet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalSpec>,
    /// The Deployment of a k8s proplet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8sSpec>,
    /// Resources of the proplet (cpu, memory, and custom names). For k8s proplets they become the
    /// container's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BTreeMap<String, IntOrString>>,
    /// Broker connection and identity.
    pub connection_config: ConnectionConfig,
    /// Tasks this proplet runs at once (scheduled or running); more wait, highest priority first. Unset:
    /// the operator's --max-tasks-per-proplet (default unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_tasks: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PropletType {
    K8s,
    External,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalSpec {
    /// Kind of device, matched by a Task's propletSelector.matchDeviceTypes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// What the device offers, matched by a Task's propletSelector.matchCapabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct K8sSpec {
    /// Proplet container image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// debug, info, warn or error.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Number of proplet pods (each needs its own clientId on a real broker; use one Proplet per pod there).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Directory of proplet plugins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_dir: Option<String>,
    /// Image pull policy of the proplet container (default IfNotPresent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Proplet settings, passed as PROPLET_* environment variables in the units the proplet parses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<PropletEnvConfig>,
    /// Node labels the proplet pods, and the Jobs of tasks placed on this proplet, are scheduled by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
}

fn default_replicas() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Proplet settings for a k8s proplet. Durations are written as durations (10s, 1m) and passed to the
/// proplet as whole seconds, the only form it parses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropletEnvConfig {
    /// Heartbeat period (PROPLET_LIVELINESS_INTERVAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveliness_interval: Option<kube::core::Duration>,
    /// Metrics period (PROPLET_METRICS_INTERVAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_interval: Option<kube::core::Duration>,
    /// Port of the proplet's /metrics and /health (PROPLET_METRICS_PORT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<i32>,
    /// Serve /metrics on the proplet (PROPLET_METRICS_ENABLED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_enabled: Option<bool>,
    /// Path of an external Wasm runtime; an explicit empty string forces the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_wasm_runtime: Option<String>,
    /// Hardware abstraction layer (PROPLET_HAL_ENABLED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hal_enabled: Option<bool>,
    /// Outgoing HTTP for tasks (PROPLET_HTTP_ENABLED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_enabled: Option<bool>,
    /// USB access for tasks (PROPLET_USB_ENABLED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_enabled: Option<bool>,
    /// OpenTelemetry collector URL (PROPLET_OTEL_URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otel_url: Option<String>,
    /// Trace sampling ratio (PROPLET_TRACE_RATIO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_ratio: Option<String>,
    /// Comma-separated tags reported in discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<String>,
    /// Where the proplet is (PROPLET_LOCATION).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Free-text description (PROPLET_DESCRIPTION).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Key broker service for confidential tasks (PROPLET_KBS_URI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kbs_uri: Option<String>,
    /// Attestation agent configuration file (PROPLET_AA_CONFIG_PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aa_config_path: Option<String>,
    /// CA certificate file for a TLS broker (PROPLET_MQTT_TLS_CA_CERT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_tls_ca_cert: Option<String>,
    /// Client certificate file (PROPLET_MQTT_TLS_CLIENT_CERT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_tls_client_cert: Option<String>,
    /// Client key file (PROPLET_MQTT_TLS_CLIENT_KEY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_tls_client_key: Option<String>,
    /// Skip broker certificate checks (PROPLET_MQTT_TLS_INSECURE_SKIP_VERIFY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_tls_insecure_skip_verify: Option<bool>,
}

/// Broker address and the proplet's identity. Upstream's later names (tenantId, entityId, apiKey,
/// apiKeySecretRef) are accepted for domainId, clientId, clientKey and clientKeySecretRef.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.domainId) || has(self.tenantId)").message("domainId (or tenantId) is required"))]
#[x_kube(validation = Rule::new("has(self.clientId) || has(self.entityId)").message("clientId (or entityId) is required"))]
#[x_kube(validation = Rule::new("(has(self.clientKey) ? 1 : 0) + (has(self.clientKeySecretRef) ? 1 : 0) + (has(self.apiKey) ? 1 : 0) + (has(self.apiKeySecretRef) ? 1 : 0) == 1").message("exactly one of clientKey or clientKeySecretRef must be set"))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionConfig {
    /// SuperMQ domain: the {domain} of m/{domain}/c/{channel}/….
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub domain_id: Option<String>,
    /// Later name of domainId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub tenant_id: Option<String>,
    /// The {channel} of the proplet's topics.
    #[schemars(length(min = 1))]
    pub channel_id: String,
    /// The proplet's MQTT client id and username; `proplet_id` in its messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub client_id: Option<String>,
    /// Later name of clientId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub entity_id: Option<String>,
    /// The proplet's MQTT password, in clear. Prefer clientKeySecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    /// Later name of clientKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// A key of a Secret in the Proplet's namespace holding the MQTT password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_secret_ref: Option<SecretKeyRef>,
    /// Later name of clientKeySecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Broker address as the proplet sees it, e.g. tcp://mqtt:1883 or ssl://broker:8883.
    pub mqtt_address: String,
    /// Broker timeout (the proplet receives whole seconds).
    #[serde(default = "default_mqtt_timeout")]
    pub mqtt_timeout: kube::core::Duration,
    /// QoS for the proplet's publishes and subscriptions.
    #[serde(default)]
    #[schemars(range(min = 0, max = 2))]
    pub mqtt_qos: i32,
}

fn default_mqtt_timeout() -> kube::core::Duration {
    std::time::Duration::from_secs(30).into()
}

/// A key in a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name (required in practice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Key in the Secret's data.
    pub key: String,
    /// Whether the Secret may be missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Where the proplet's password comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientKey<'a> {
    Literal(&'a str),
    Secret(&'a SecretKeyRef),
}

impl ConnectionConfig {
    pub fn domain(&self) -> Option<&str> {
        self.domain_id.as_deref().or(self.tenant_id.as_deref())
    }

    pub fn client(&self) -> Option<&str> {
        self.client_id.as_deref().or(self.entity_id.as_deref())
    }

    /// The one key source, or an error naming what is wrong.
    pub fn key(&self) -> Result<ClientKey<'_>, String> {
        let literal = self.client_key.as_deref().or(self.api_key.as_deref());
        let secret = self
            .client_key_secret_ref
            .as_ref()
            .or(self.api_key_secret_ref.as_ref());
        let count = [
            self.client_key.is_some(),
            self.api_key.is_some(),
            self.client_key_secret_ref.is_some(),
            self.api_key_secret_ref.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        match (literal, secret, count) {
            (Some(k), None, 1) => Ok(ClientKey::Literal(k)),
            (None, Some(s), 1) => Ok(ClientKey::Secret(s)),
            (_, _, 0) => Err("exactly one of clientKey or clientKeySecretRef must be set".into()),
            _ => Err(
                "clientKey and clientKeySecretRef are mutually exclusive; set exactly one".into(),
            ),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PropletPhase {
    #[default]
    Initializing,
    Running,
    Offline,
}

impl PropletPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PropletPhase::Initializing => "Initializing",
            PropletPhase::Running => "Running",
            PropletPhase::Offline => "Offline",
        }
    }
}

/// Observed state of a proplet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropletStatus {
    /// Initializing (no heartbeat yet), Running, or Offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PropletPhase>,
    /// Ready, Connected, Healthy.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Last heartbeat the operator recorded (refreshed at most every --status-refresh while nothing
    /// else changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Whether heartbeats arrive.
    #[serde(default)]
    pub alive: bool,
    /// Receive times of recent recorded heartbeats (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alive_history: Vec<Time>,
    /// Tasks currently scheduled on or running on the proplet.
    #[serde(default)]
    pub task_count: i64,
    /// The proplet's clientId (for `kubectl get -o wide` and selectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Resources the proplet offers (from spec.resources).
    /// Resources the proplet offers (from spec.resources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_resources: Option<AvailableResources>,
    /// Replicas of a k8s proplet's Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_status: Option<K8sStatus>,
    /// What the proplet reported about itself at start-up (control/proplet/create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<PropletMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_metrics: Option<ResourceMetrics>,
    /// metadata.generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailableResources {
    /// CPU, e.g. 500m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory, e.g. 128Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Other resources by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct K8sStatus {
    /// Ready pods of the Deployment.
    pub ready_replicas: i32,
    /// Available pods of the Deployment.
    pub available_replicas: i32,
}

/// Discovery data of a proplet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropletMetadata {
    /// Description the proplet reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Tags the proplet reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Location the proplet reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The proplet's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// docker, binary or embedded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Operating system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// CPU architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_arch: Option<String>,
    /// Total memory of the host in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory_bytes: Option<i64>,
    /// Proplet version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_version: Option<String>,
    /// Wasm runtime (wasmtime-internal or an external runtime path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_runtime: Option<String>,
    /// The namespace the proplet reports (PROPLET_MANAGER_K8S_NAMESPACE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Proplet {
    /// The MQTT clientId (empty when the spec has none, which validation reports).
    pub fn client_id(&self) -> String {
        self.spec
            .connection_config
            .client()
            .unwrap_or_default()
            .to_string()
    }

    pub fn phase(&self) -> PropletPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}
