//! The hub's clients for its members, one per registration Secret, shared by the prober and the fan-out.
//! A client is rebuilt only when its Secret's resourceVersion changes: a rotated token or certificate takes
//! effect at the next use, and the clients of other members are not touched.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::registration::{self, client_for};

/// A call to a member answers within this or the member counts as unreachable for now.
pub const MEMBER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

struct Cached {
    version: String,
    client: Result<Client, String>,
}

#[derive(Default)]
pub struct MemberClients {
    cache: Mutex<HashMap<String, Cached>>,
}

/// Why a member cannot be used now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// No registration Secret of that name.
    NotRegistered,
    /// Its Secret holds no usable credentials (the reason, never the content).
    InvalidSecret(String),
    /// The hub's own API server failed reading the Secret.
    Hub(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::NotRegistered => write!(f, "no registration Secret of that name"),
            Unusable::InvalidSecret(why) => write!(f, "its Secret is not usable: {why}"),
            Unusable::Hub(why) => write!(f, "reading its Secret failed: {why}"),
        }
    }
}

impl MemberClients {
    /// The client for `secret` (cached while its resourceVersion stays); `Err` says why it is unusable.
    pub async fn for_secret(&self, secret: &Secret) -> Result<Client, String> {
        let name = secret.name_any();
        let version = secret.resource_version().unwrap_or_default();
        if let Some(c) = self.lock().get(&name).filter(|c| c.version == version) {
            return c.client.clone();
        }
        let client = client_for(secret).await.map_err(|e| e.to_string());
        self.lock().insert(
            name,
            Cached {
                version,
                client: client.clone(),
            },
        );
        client
    }

    /// The client of member `name`, whose registration Secret is in `namespace` of the hub.
    pub async fn for_member(
        &self,
        hub: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Client, Unusable> {
        let secrets: Api<Secret> = Api::namespaced(hub.clone(), namespace);
        let secret = match tokio::time::timeout(MEMBER_CALL_TIMEOUT, secrets.get_opt(name)).await {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return Err(Unusable::NotRegistered),
            Ok(Err(e)) => return Err(Unusable::Hub(e.to_string())),
            Err(_) => return Err(Unusable::Hub("no answer".into())),
        };
        if registration::format_of(&secret).is_none() {
            return Err(Unusable::NotRegistered);
        }
        self.for_secret(&secret)
            .await
            .map_err(Unusable::InvalidSecret)
    }

    /// Forgets the members not in `names` (their Secrets are gone); returns those forgotten.
    pub fn retain(&self, names: &[String]) -> Vec<String> {
        let mut gone = Vec::new();
        self.lock().retain(|name, _| {
            let keep = names.contains(name);
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        gone
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        // A panic elsewhere cannot leave the map half-written: every change is one insert or retain.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
