//! The module registry over MQTT. A proplet given a task whose `image_url` is neither empty nor http(s)
//! asks for the module by name on `registry/proplet` and reassembles chunks from `registry/server`. The
//! operator answers from what the cluster holds, in the namespaces of the Proplets on that channel:
//! 1. a Task whose `spec.imageUrl` is that name and that carries the module in `spec.file`;
//! 2. a ConfigMap labelled `propeller.propeller.abstractmachines.fr/module: "true"`, annotated
//!    `propeller.propeller.abstractmachines.fr/module-name: <name>`, with the module in binaryData
//!    `module.wasm`.
//!
//! An unknown name gets no answer (the proplet times out with its own error) but a metric, a log line,
//! and a `ModuleFound=False` condition on the tasks waiting for it. Requests go through a bounded queue
//! and one worker, so a flood of requests costs bounded memory and one API read at a time.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::Task;
use crate::context::Context;
use crate::controllers::runtime::Waker;
use crate::mqtt::topics::Channel;
use crate::mqtt::wire::RegistryChunk;
use crate::telemetry::Metrics;

pub const MODULE_LABEL: &str = "propeller.propeller.abstractmachines.fr/module";
pub const MODULE_NAME_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/module-name";
pub const MODULE_KEY: &str = "module.wasm";
/// Requests waiting for the worker; more are dropped (and counted).
const QUEUE: usize = 256;
/// The same module asked for again on the same channel within this window is already on its way: every
/// proplet of the channel receives every chunk.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2);

/// One module request.
#[derive(Clone, Debug)]
pub struct Request {
    pub channel: Channel,
    pub app_name: String,
}

/// The router's handle on the registry worker.
#[derive(Clone)]
pub struct RegistryQueue {
    tx: mpsc::Sender<Request>,
    metrics: Arc<Metrics>,
}

impl RegistryQueue {
    pub fn offer(&self, request: Request) {
        if self.tx.try_send(request).is_err() {
            self.metrics
                .registry_requests_total
                .with_label_values(&["dropped"])
                .inc();
            warn!("module registry queue full: request dropped");
        }
    }
}

/// Splits a module into the chunks a proplet reassembles.
pub fn chunks(app_name: &str, module: &[u8], chunk_size: usize) -> Vec<RegistryChunk> {
    let pieces: Vec<&[u8]> = if module.is_empty() {
        vec![&[][..]]
    } else {
        module.chunks(chunk_size.max(1)).collect()
    };
    let total = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| RegistryChunk {
            app_name: app_name.to_string(),
            chunk_idx: i,
            total_chunks: total,
            data: base64::engine::general_purpose::STANDARD.encode(piece),
        })
        .collect()
}

/// Starts the worker; `wake` reaches the Task controller.
pub fn spawn(ctx: Arc<Context>, wake: Waker<Task>) -> (RegistryQueue, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
    let metrics = Arc::clone(&ctx.metrics);
    let handle = tokio::spawn(async move {
        let mut recent: HashMap<(Channel, String), Instant> = HashMap::new();
        while let Some(req) = rx.recv().await {
            recent.retain(|_, at| at.elapsed() < DUPLICATE_WINDOW);
            let key = (req.channel.clone(), req.app_name.clone());
            if recent.contains_key(&key) {
                ctx.metrics
                    .registry_requests_total
                    .with_label_values(&["duplicate"])
                    .inc();
                continue;
            }
            if serve(&ctx, &req, &wake).await {
                recent.insert(key, Instant::now());
            }
        }
    });
    (RegistryQueue { tx, metrics }, handle)
}

/// Whether this replica holds an active task for module `app_name` on a proplet of `channel`.
fn started_here(ctx: &Context, channel: &Channel, app_name: &str) -> bool {
    ctx.tasks.state().iter().any(|t| {
        t.phase().is_active()
            && !ctx.ownership.is_foreign_task(t)
            && t.spec.image_url.as_deref().map(str::trim) == Some(app_name)
            && t.status
                .as_ref()
                .and_then(|s| s.assigned_client_id.as_deref())
                .and_then(|c| ctx.proplet_index.by_client(c))
                .and_then(|r| ctx.proplets.get(&r))
                .is_some_and(|p| {
                    let cc = &p.spec.connection_config;
                    cc.domain() == Some(channel.domain.as_str()) && cc.channel_id == channel.channel
                })
    })
}

/// The Proplets registered on `channel`: their namespaces and clientIds.
fn proplets_on(ctx: &Context, channel: &Channel) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut namespaces = BTreeSet::new();
    let mut clients = BTreeSet::new();
    for p in ctx.proplets.state() {
        let cc = &p.spec.connection_config;
        if cc.domain() == Some(channel.domain.as_str()) && cc.channel_id == channel.channel {
            namespaces.extend(p.namespace());
            clients.insert(p.client_id());
        }
    }
    (namespaces, clients)
}

/// Answers one request; true when it was answered (served, or found missing).
async fn serve(ctx: &Context, req: &Request, wake: &Waker<Task>) -> bool {
    let (namespaces, clients) = proplets_on(ctx, &req.channel);
    // One replica answers: a single replica; among shards, the one that started a task needing this
    // module on this channel (two shards that both did answer both: a proplet takes the same chunks
    // twice).
    let answers = if ctx.ownership.is_sharded() {
        started_here(ctx, &req.channel, &req.app_name)
    } else {
        clients
            .first()
            .is_some_and(|c| ctx.ownership.owns_client(c))
    };
    if !answers {
        ctx.metrics
            .registry_requests_total
            .with_label_values(&["other_replica"])
            .inc();
        return false;
    }
    let outcome = match find_module(ctx, &namespaces, &req.app_name).await {
        Err(e) => {
            warn!(channel = %req.channel, app_name = %req.app_name, error = %e, "module lookup failed");
            "error"
        }
        Ok(None) => {
            warn!(channel = %req.channel, app_name = %req.app_name,
                  "module requested by a proplet is not in the cluster");
            for t in waiting_tasks(ctx, &namespaces, &clients, &req.app_name) {
                ctx.module_misses
                    .record(&t.uid().unwrap_or_default(), &req.app_name);
                wake.wake(ObjectRef::from_obj(t.as_ref()));
            }
            "not_found"
        }
        Ok(Some((module, source))) => match publish(ctx, req, &module).await {
            Ok(n) => {
                info!(channel = %req.channel, app_name = %req.app_name, %source, bytes = module.len(),
                      chunks = n, "module served");
                "served"
            }
            Err(e) => {
                warn!(channel = %req.channel, app_name = %req.app_name, error = %e, "module publish failed");
                "error"
            }
        },
    };
    ctx.metrics
        .registry_requests_total
        .with_label_values(&[outcome])
        .inc();
    outcome != "error"
}

async fn publish(ctx: &Context, req: &Request, module: &[u8]) -> anyhow::Result<usize> {
    let mqtt = ctx
        .mqtt
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("MQTT is not configured"))?;
    let topic = req.channel.registry_server();
    let pieces = chunks(
        &req.app_name,
        module,
        ctx.config.registry_chunk_size as usize,
    );
    for chunk in &pieces {
        mqtt.publish_json(&topic, chunk).await?;
        ctx.metrics
            .mqtt_published_total
            .with_label_values(&["registry_chunk", "ok"])
            .inc();
    }
    Ok(pieces.len())
}

/// The module called `app_name` in `namespaces`, and where it came from.
async fn find_module(
    ctx: &Context,
    namespaces: &BTreeSet<String>,
    app_name: &str,
) -> anyhow::Result<Option<(Vec<u8>, String)>> {
    for t in ctx.tasks.state() {
        let ns = t.namespace().unwrap_or_default();
        if !namespaces.contains(&ns) || t.spec.image_url.as_deref().map(str::trim) != Some(app_name)
        {
            continue;
        }
        let Some(file) = t.spec.file.as_deref().filter(|f| !f.trim().is_empty()) else {
            continue;
        };
        match base64::engine::general_purpose::STANDARD.decode(file.trim()) {
            Ok(bytes) => return Ok(Some((bytes, format!("Task {ns}/{}", t.name_any())))),
            Err(e) => {
                warn!(task = %t.name_any(), error = %e, "spec.file is not base64; not served")
            }
        }
    }
    let selector = format!("{MODULE_LABEL}=true");
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let listed = api
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        let named = listed.items.iter().find(|cm| {
            cm.annotations()
                .get(MODULE_NAME_ANNOTATION)
                .map(|a| a.trim())
                == Some(app_name)
        });
        let Some(meta) = named else { continue };
        let cm = api.get(&meta.name_any()).await?;
        match cm.binary_data.as_ref().and_then(|d| d.get(MODULE_KEY)) {
            Some(bytes) => {
                return Ok(Some((
                    bytes.0.clone(),
                    format!("ConfigMap {ns}/{}", cm.name_any()),
                )));
            }
            None => {
                warn!(configmap = %cm.name_any(), "module ConfigMap has no binaryData {MODULE_KEY}")
            }
        }
    }
    Ok(None)
}

/// Active tasks on this channel's proplets that asked for `app_name`.
fn waiting_tasks(
    ctx: &Context,
    namespaces: &BTreeSet<String>,
    clients: &BTreeSet<String>,
    app_name: &str,
) -> Vec<Arc<Task>> {
    ctx.tasks
        .state()
        .into_iter()
        .filter(|t| t.phase().is_active())
        .filter(|t| namespaces.contains(&t.namespace().unwrap_or_default()))
        .filter(|t| t.spec.image_url.as_deref().map(str::trim) == Some(app_name))
        .filter(|t| {
            let st = t.status.as_ref();
            let on_channel = st
                .and_then(|s| s.assigned_client_id.as_deref())
                .is_some_and(|c| clients.contains(c));
            on_channel || st.is_some_and(|s| !s.broadcast_targets.is_empty())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reassemble_to_the_module() {
        let module: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let parts = chunks("reg/add:1", &module, 300);
        assert_eq!(parts.len(), 4);
        assert!(
            parts
                .iter()
                .all(|c| c.total_chunks == 4 && c.app_name == "reg/add:1")
        );
        let mut back = Vec::new();
        for (i, c) in parts.iter().enumerate() {
            assert_eq!(c.chunk_idx, i);
            back.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(&c.data)
                    .expect("base64"),
            );
        }
        assert_eq!(back, module);
        assert_eq!(
            chunks("x", &[], 10).len(),
            1,
            "an empty module is one empty chunk"
        );
    }
}
