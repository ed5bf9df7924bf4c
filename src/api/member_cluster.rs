//! `MemberCluster`: a member cluster as a hub operator sees it. Not written by users: the hub makes one per
//! registration Secret (a kubeconfig of ours, or an Argo CD cluster Secret) in its namespace, owned by that
//! Secret, and keeps its status from a periodic probe of the member's API server.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Condition;

/// Where the member's credentials are: a Secret in the hub operator's namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "propeller.propeller.abstractmachines.fr",
    version = "v1",
    kind = "MemberCluster",
    namespaced,
    status = "MemberClusterStatus",
    shortname = "member",
    shortname = "members",
    category = "propeller",
    printcolumn = r#"{"name":"Reachable","type":"string","jsonPath":".status.conditions[?(@.type==\"Reachable\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.kubernetesVersion"}"#,
    printcolumn = r#"{"name":"Operator","type":"boolean","jsonPath":".status.operatorInstalled"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.propletsRunning"}"#,
    printcolumn = r#"{"name":"Proplets","type":"integer","jsonPath":".status.propletsTotal"}"#,
    printcolumn = r#"{"name":"Last Probe","type":"date","jsonPath":".status.lastSuccessfulProbeTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MemberClusterSpec {
    /// The registration Secret (same namespace): our format (a kubeconfig under `kubeconfig`, label
    /// `propeller.propeller.abstractmachines.fr/member: "true"`) or Argo CD's cluster Secret.
    pub secret_name: String,
    /// The member's API server, as the Secret names it (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// What the last probe of the member found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberClusterStatus {
    /// `Reachable`: the member's API server answered the last probe; `OperatorInstalled`: our CRDs are there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The member's Kubernetes version (gitVersion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// Whether the member has the Propeller CRDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_installed: Option<bool>,
    /// Proplets in phase Running on the member, all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplets_running: Option<i64>,
    /// Proplets on the member, all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplets_total: Option<i64>,
    /// When a probe last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_probe_time: Option<Time>,
    /// Why the member is unreachable or its Secret unusable (never its credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The generation of the registration Secret's content last used (its resourceVersion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_version: Option<String>,
}
