//! `/metrics` over HTTPS for those the cluster allows, as controller-runtime's secure metrics serve it
//! (`--metrics-bind-address` with `--metrics-secure`): the caller's bearer token is checked with a
//! TokenReview, and what it authenticates as must be allowed `get` on the non-resource URL `/metrics`
//! (a SubjectAccessReview; grant it with the ClusterRole `propeller-metrics-reader`). No token: 401; not
//! allowed: 403. Decisions are kept for [`DECISION_TTL`], by a hash of the token (never the token), so a
//! scrape every few seconds costs the API server little. The certificate is `tls.crt`/`tls.key` from
//! `--metrics-cert-dir`, else a self-signed one made at start (as controller-runtime does).
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tracing::{debug, warn};

use super::Metrics;

/// How long an allow or deny decision is reused.
pub const DECISION_TTL: Duration = Duration::from_secs(30);

/// The TLS configuration: the certificate in `dir`, else a self-signed one.
pub fn tls_config(dir: Option<&Path>) -> anyhow::Result<ServerConfig> {
    crate::clusters::install_crypto_provider();
    let (certs, key) = match dir {
        Some(d) => {
            let certs = CertificateDer::pem_file_iter(d.join("tls.crt"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", d.join("tls.crt").display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{}: {e}", d.join("tls.crt").display()))?;
            // The key file's content is never quoted in an error.
            let key = PrivateKeyDer::from_pem_file(d.join("tls.key")).map_err(|_| {
                anyhow::anyhow!("{}: not a PEM private key", d.join("tls.key").display())
            })?;
            (certs, key)
        }
        None => {
            let names = vec![
                "localhost".to_string(),
                "propeller-operator-metrics".to_string(),
            ];
            let cert = rcgen::generate_simple_self_signed(names)?;
            (
                vec![cert.cert.der().clone()],
                PrivateKeyDer::try_from(cert.key_pair.serialize_der())
                    .map_err(|e| anyhow::anyhow!("the self-signed key: {e}"))?,
            )
        }
    };
    Ok(ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
}

#[derive(Clone)]
struct Guard {
    client: Client,
    metrics: Arc<Metrics>,
    /// token hash → (allowed, when decided)
    decisions: Arc<Mutex<HashMap<u64, (bool, Instant)>>>,
    /// Keyed per process: a hash kept in memory says nothing about the token elsewhere.
    hasher: std::collections::hash_map::RandomState,
}

/// Serves `/metrics` over TLS on a listener already bound, until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: ServerConfig,
    client: Client,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let guard = Guard {
        client,
        metrics,
        decisions: Arc::default(),
        hasher: Default::default(),
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(guard);
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "secure metrics: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "secure metrics: connection ended");
            }
        });
    }
}

async fn scrape(State(g): State<Guard>, headers: HeaderMap) -> Response {
    let Some(token) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
    };
    let key = std::hash::BuildHasher::hash_one(&g.hasher, token);
    let cached = g
        .decisions
        .lock()
        .ok()
        .and_then(|d| d.get(&key).copied())
        .filter(|(_, at)| at.elapsed() < DECISION_TTL);
    let allowed = match cached {
        Some((allowed, _)) => Ok(allowed),
        None => decide(&g.client, token).await,
    };
    match allowed {
        Ok(allowed) => {
            if let Ok(mut d) = g.decisions.lock() {
                d.retain(|_, (_, at)| at.elapsed() < DECISION_TTL);
                d.insert(key, (allowed, Instant::now()));
            }
            if allowed {
                g.metrics.render().into_response()
            } else {
                (StatusCode::FORBIDDEN, "not allowed to get /metrics\n").into_response()
            }
        }
        Err(Denied::Unauthenticated) => {
            (StatusCode::UNAUTHORIZED, "the token is not valid\n").into_response()
        }
        Err(Denied::Unavailable(why)) => {
            warn!("secure metrics: cannot check a caller: {why}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check the caller now\n",
            )
                .into_response()
        }
    }
}

enum Denied {
    Unauthenticated,
    Unavailable(String),
}

/// Whether the token's holder may get `/metrics` (`Err`: not authenticated, or the API server failed).
async fn decide(client: &Client, token: &str) -> Result<bool, Denied> {
    let review: TokenReview = serde_json::from_value(json!({"spec": {"token": token}}))
        .map_err(|e| Denied::Unavailable(e.to_string()))?;
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Denied::Unavailable(format!("TokenReview: {}", kube_reason(&e))))?;
    let status = reviewed.status.unwrap_or_default();
    let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
        return Err(Denied::Unauthenticated);
    };
    let sar: SubjectAccessReview = serde_json::from_value(json!({"spec": {
        "user": user.username, "groups": user.groups, "uid": user.uid, "extra": user.extra,
        "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
    }}))
    .map_err(|e| Denied::Unavailable(e.to_string()))?;
    let answered = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &sar)
        .await
        .map_err(|e| Denied::Unavailable(format!("SubjectAccessReview: {}", kube_reason(&e))))?;
    Ok(answered.status.is_some_and(|s| s.allowed))
}

/// A kube error without the request (a TokenReview's body holds the token).
fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        _ => "the API server did not answer".into(),
    }
}
