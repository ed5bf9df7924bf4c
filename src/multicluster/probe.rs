//! One look at a member cluster: its version, whether our CRDs are installed, its proplets.
use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client};

use crate::api::Proplet;
use crate::api::proplet::PropletPhase;

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub version: String,
    pub operator_installed: bool,
    pub proplets_running: i64,
    pub proplets_total: i64,
}

/// Probes `client`'s cluster within `timeout`. The error says what failed (never a credential: kube's
/// errors carry the server's address and status, not the request's headers).
pub async fn probe(client: &Client, timeout: Duration) -> Result<Found, String> {
    tokio::time::timeout(timeout, probe_now(client))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

async fn probe_now(client: &Client) -> Result<Found, String> {
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("API server unreachable: {}", describe(&e)))?;
    let api: Api<Proplet> = Api::all(client.clone());
    let mut found = Found {
        version: version.git_version,
        operator_installed: true,
        proplets_running: 0,
        proplets_total: 0,
    };
    let mut lp = ListParams::default().limit(500);
    loop {
        match api.list(&lp).await {
            Ok(page) => {
                found.proplets_total += page.items.len() as i64;
                found.proplets_running += page
                    .items
                    .iter()
                    .filter(|p| p.phase() == PropletPhase::Running)
                    .count() as i64;
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(c) => lp = lp.continue_token(&c),
                    None => return Ok(found),
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                found.operator_installed = false;
                return Ok(found);
            }
            Err(e) => return Err(format!("listing Proplets: {}", describe(&e))),
        }
    }
}

/// A kube error in a sentence: the API's own message, or the kind of transport failure.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            format!("connection failed: {e}")
        }
        other => other.to_string(),
    }
}
