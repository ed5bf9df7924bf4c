//! Member registration by Secret, in two formats:
//! - ours: label `propeller.propeller.abstractmachines.fr/member: "true"`, a kubeconfig under `kubeconfig`
//!   (its current context is used);
//! - Argo CD's cluster Secret: label `argocd.argoproj.io/secret-type: cluster`, keys `name`, `server` and
//!   `config` (JSON: `bearerToken`, or `username`/`password`, and `tlsClientConfig` with `insecure`,
//!   `caData`, `certData`, `keyData`, `serverName`).
//!
//! Errors say which Secret and what is wrong, never a credential.
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde::Deserialize;

use crate::clusters::{self, ClusterError, KUBECONFIG_KEY};

/// Our registration label (value `"true"`).
pub const MEMBER_LABEL: &str = "propeller.propeller.abstractmachines.fr/member";
/// Argo CD's cluster Secret label (value `cluster`).
pub const ARGOCD_LABEL: &str = "argocd.argoproj.io/secret-type";

/// The label selectors of the two formats (a Secret matching either registers a member).
pub fn selectors() -> [String; 2] {
    [
        format!("{MEMBER_LABEL}=true"),
        format!("{ARGOCD_LABEL}=cluster"),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Kubeconfig,
    ArgoCd,
}

/// Which format `secret` is in, by its labels.
pub fn format_of(secret: &Secret) -> Option<Format> {
    let labels = secret.labels();
    if labels.get(MEMBER_LABEL).is_some_and(|v| v == "true") {
        Some(Format::Kubeconfig)
    } else if labels.get(ARGOCD_LABEL).is_some_and(|v| v == "cluster") {
        Some(Format::ArgoCd)
    } else {
        None
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    if let Some(b) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(b.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

/// The member's API server as the Secret names it (Argo CD's `server`; our kubeconfig's current cluster).
pub fn server_of(secret: &Secret) -> Option<String> {
    match format_of(secret)? {
        Format::ArgoCd => text(secret, "server"),
        Format::Kubeconfig => {
            let kc = Kubeconfig::from_yaml(&text(secret, KUBECONFIG_KEY)?).ok()?;
            let context = kc.current_context.clone()?;
            let cluster = kc
                .contexts
                .iter()
                .find(|c| c.name == context)?
                .context
                .as_ref()?
                .cluster
                .clone();
            kc.clusters
                .iter()
                .find(|c| c.name == cluster)?
                .cluster
                .as_ref()?
                .server
                .clone()
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ArgoConfig {
    bearer_token: Option<String>,
    username: Option<String>,
    password: Option<String>,
    #[serde(default)]
    tls_client_config: ArgoTls,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ArgoTls {
    #[serde(default)]
    insecure: bool,
    ca_data: Option<String>,
    cert_data: Option<String>,
    key_data: Option<String>,
    server_name: Option<String>,
}

/// A client for the member `secret` registers.
pub async fn client_for(secret: &Secret) -> Result<Client, ClusterError> {
    let source_name = format!(
        "Secret {}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    match format_of(secret) {
        Some(Format::Kubeconfig) => clusters::from_secret(secret, KUBECONFIG_KEY).await,
        Some(Format::ArgoCd) => argocd_client(secret, &source_name).await,
        None => Err(ClusterError::Invalid {
            source_name,
            reason: format!("has neither {MEMBER_LABEL}=true nor {ARGOCD_LABEL}=cluster"),
        }),
    }
}

async fn argocd_client(secret: &Secret, source_name: &str) -> Result<Client, ClusterError> {
    let invalid = |reason: String| ClusterError::Invalid {
        source_name: source_name.to_string(),
        reason,
    };
    let server = text(secret, "server")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid("key \"server\" is missing".into()))?;
    let config: ArgoConfig = match text(secret, "config") {
        None => ArgoConfig::default(),
        // serde_json's messages quote no input, only positions.
        Some(c) => serde_json::from_str(&c).map_err(|e| {
            invalid(format!(
                "key \"config\" is not Argo CD's cluster config: {e}"
            ))
        })?,
    };
    let name = text(secret, "name").unwrap_or_else(|| secret.name_any());
    let tls = &config.tls_client_config;
    // Assembled as a kubeconfig so kube applies it exactly as it would a file.
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {
            "server": server.trim(),
            "certificate-authority-data": tls.ca_data,
            "insecure-skip-tls-verify": tls.insecure,
            "tls-server-name": tls.server_name,
        }}],
        "users": [{"name": name, "user": {
            "token": config.bearer_token,
            "username": config.username,
            "password": config.password,
            "client-certificate-data": tls.cert_data,
            "client-key-data": tls.key_data,
        }}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    });
    let kubeconfig: Kubeconfig = serde_json::from_value(strip_nulls(kubeconfig))
        .map_err(|e| invalid(format!("cannot form a kubeconfig: {e}")))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|_| invalid("its server or TLS data is not usable".into()))?;
    clusters::client_from_config(config, source_name).await
}

fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "super-secret-token-value";

    fn argo(config: &str, server: &str) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "edge-eu", "namespace": "hub",
                         "labels": {ARGOCD_LABEL: "cluster"}},
            "stringData": {"name": "edge-eu", "server": server, "config": config},
        }))
        .expect("secret")
    }

    #[tokio::test]
    async fn an_argocd_secret_with_a_token_gives_a_client() {
        let s = argo(
            &format!(r#"{{"bearerToken":"{TOKEN}","tlsClientConfig":{{"insecure":true}}}}"#),
            "https://10.0.0.1:6443",
        );
        assert_eq!(format_of(&s), Some(Format::ArgoCd));
        assert_eq!(server_of(&s).as_deref(), Some("https://10.0.0.1:6443"));
        client_for(&s).await.expect("a client");
    }

    #[tokio::test]
    async fn a_broken_argocd_secret_says_why_without_its_token() {
        let s = argo(
            &format!(r#"{{"bearerToken":"{TOKEN}""#),
            "https://10.0.0.1:6443",
        );
        let e = client_for(&s).await.err().expect("bad config").to_string();
        assert!(e.contains("edge-eu") && e.contains("config"), "{e}");
        assert!(!e.contains(TOKEN), "{e}");
        let s = argo("{}", "");
        let e = client_for(&s).await.err().expect("no server").to_string();
        assert!(e.contains("server"), "{e}");
    }

    /// Found by fuzzing: kube panicked building a client whose token cannot be an HTTP header.
    #[tokio::test]
    async fn a_token_that_cannot_be_a_header_is_refused_not_a_panic() {
        let s = argo(
            &format!(r#"{{"bearerToken":"{TOKEN}\n","tlsClientConfig":{{"insecure":true}}}}"#),
            "https://10.0.0.1:6443",
        );
        let e = client_for(&s).await.err().expect("refused").to_string();
        assert!(e.contains("HTTP header") && !e.contains(TOKEN), "{e}");
    }

    #[test]
    fn unlabelled_secrets_register_nothing() {
        assert_eq!(format_of(&Secret::default()), None);
    }
}
