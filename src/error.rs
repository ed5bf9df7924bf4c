//! The operator's one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("MQTT: {0}")]
    Mqtt(#[from] crate::mqtt::client::MqttError),
    #[error("serialize: {0}")]
    Json(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("conflict (stale view; retrying): {0}")]
    Conflict(String),
    #[error("invalid object: {0}")]
    Invalid(String),
    #[error("this shard may not act (its Lease is not fresh): {0}")]
    Fenced(String),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed precondition (stale resourceVersion) as [`Error::Conflict`].
pub fn conflict(e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 409 || s.code == 422 => Error::Conflict(s.message.clone()),
        _ => Error::Kube(e),
    }
}
