//! Kubernetes clients for the clusters an operator talks to: its own (in-cluster or `KUBECONFIG`), one
//! named by a kubeconfig file, or a member cluster's from a kubeconfig kept in a Secret. Errors name the
//! file or Secret and what is wrong with it, never its credentials.
use std::path::Path;

use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};

/// The key of a kubeconfig in a Secret of ours.
pub const KUBECONFIG_KEY: &str = "kubeconfig";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{source_name}: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error("{source_name}: {source}")]
    Client {
        source_name: String,
        #[source]
        source: kube::Error,
    },
}

/// rustls needs one process-wide crypto provider; ring is the only one compiled in. Installing it again is
/// harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The operator's own cluster: in-cluster service account, else `KUBECONFIG` or `~/.kube/config`.
pub async fn from_environment() -> anyhow::Result<Client> {
    install_crypto_provider();
    Ok(Client::try_default().await?)
}

/// A client for the current context of a kubeconfig file.
pub async fn from_kubeconfig_file(path: &Path) -> Result<Client, ClusterError> {
    let name = format!("kubeconfig {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| ClusterError::Invalid {
        source_name: name.clone(),
        reason: format!("cannot be read: {e}"),
    })?;
    from_kubeconfig_yaml(&text, &name).await
}

/// A client for the current context of a kubeconfig given as YAML; `source_name` names it in errors.
pub async fn from_kubeconfig_yaml(text: &str, source_name: &str) -> Result<Client, ClusterError> {
    install_crypto_provider();
    let invalid = |reason: String| ClusterError::Invalid {
        source_name: source_name.to_string(),
        reason,
    };
    // Parse errors may quote the document (tokens, keys): only their position is reported.
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|_| {
        invalid(match serde_yaml::from_str::<serde_yaml::Value>(text) {
            Err(e) => match e.location() {
                Some(at) => format!(
                    "not valid YAML (line {}, column {})",
                    at.line(),
                    at.column()
                ),
                None => "not valid YAML".to_string(),
            },
            Ok(_) => "not a kubeconfig (clusters, users and contexts expected)".to_string(),
        })
    })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(describe_kubeconfig_error(&e)))?;
    client_from_config(config, source_name).await
}

/// A client for `config`, whose credentials came from outside (a file, a Secret). kube panics when a token
/// cannot be an HTTP header (a control character): that is checked first and reported, never quoted.
pub async fn client_from_config(
    config: kube::Config,
    source_name: &str,
) -> Result<Client, ClusterError> {
    use secrecy::ExposeSecret as _;
    if let Some(token) = &config.auth_info.token
        && http::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).is_err()
    {
        return Err(ClusterError::Invalid {
            source_name: source_name.to_string(),
            reason: "its token has characters an HTTP header cannot carry".into(),
        });
    }
    install_crypto_provider();
    Client::try_from(config).map_err(|source| ClusterError::Client {
        source_name: source_name.to_string(),
        source,
    })
}

/// A client from the kubeconfig stored under `key` in `secret`.
pub async fn from_secret(secret: &Secret, key: &str) -> Result<Client, ClusterError> {
    let name = format!(
        "Secret {}/{} key {key:?}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    let text = kubeconfig_in(secret, key).map_err(|reason| ClusterError::Invalid {
        source_name: name.clone(),
        reason,
    })?;
    from_kubeconfig_yaml(&text, &name).await
}

/// The kubeconfig text under `key` (from `data` or `stringData`).
fn kubeconfig_in(secret: &Secret, key: &str) -> Result<String, String> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(bytes.0.clone()).map_err(|_| "is not UTF-8 text".to_string());
    }
    if let Some(text) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Ok(text.clone());
    }
    Err("is missing".to_string())
}

/// A Secret named `name` holding `kubeconfig` under [`KUBECONFIG_KEY`], labelled with `labels`.
pub fn kubeconfig_secret(
    name: &str,
    namespace: &str,
    kubeconfig: &str,
    labels: &[(&str, &str)],
) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.to_string());
    secret.metadata.namespace = Some(namespace.to_string());
    secret.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    secret.type_ = Some("Opaque".to_string());
    secret.data = Some(
        [(
            KUBECONFIG_KEY.to_string(),
            k8s_openapi::ByteString(kubeconfig.as_bytes().to_vec()),
        )]
        .into(),
    );
    secret
}

/// kube's kubeconfig errors name what is missing (a context, a cluster, a file); some wrap file contents,
/// so only their kind is kept.
fn describe_kubeconfig_error(e: &kube::config::KubeconfigError) -> String {
    use kube::config::KubeconfigError as K;
    match e {
        K::CurrentContextNotSet => "has no current-context".into(),
        K::LoadContext(c) => format!("names context {c:?}, which it does not define"),
        K::LoadClusterOfContext(c) => format!("names cluster {c:?}, which it does not define"),
        K::MissingClusterUrl => "has no server address for its cluster".into(),
        K::ParseClusterUrl(_) => "has a server address that is not a URL".into(),
        _ => "cannot be used (certificates, keys or server address invalid)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_TOKEN: &str = "s3cr3t-t0ken-value";

    fn kubeconfig(token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nusers:\n- name: u\n  user:\n    token: {token}\n"
        )
    }

    #[tokio::test]
    async fn a_secret_of_ours_makes_a_client() {
        let s = kubeconfig_secret("m1", "hub", &kubeconfig(SECRET_TOKEN), &[("a", "b")]);
        assert!(from_secret(&s, KUBECONFIG_KEY).await.is_ok());
        assert_eq!(
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("a"))
                .map(String::as_str),
            Some("b")
        );
    }

    #[tokio::test]
    async fn bad_kubeconfigs_say_why_without_their_secrets() {
        let cases = [
            (format!("token: {SECRET_TOKEN}\n  : ["), "not valid YAML"),
            (
                kubeconfig(SECRET_TOKEN).replace("current-context: c", "current-context: nope"),
                "context",
            ),
            (format!("just: {SECRET_TOKEN}"), "current-context"),
        ];
        for (text, expected) in cases {
            let s = kubeconfig_secret("m1", "hub", &text, &[]);
            let err = from_secret(&s, KUBECONFIG_KEY)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
            assert!(err.contains("Secret hub/m1"), "{err:?} names the Secret");
            assert!(!err.contains(SECRET_TOKEN), "{err:?} leaks the token");
        }
        let s = kubeconfig_secret("m1", "hub", "x", &[]);
        let missing = from_secret(&s, "other").await.err().map(|e| e.to_string());
        assert!(missing.is_some_and(|m| m.contains("is missing")));
    }
}
