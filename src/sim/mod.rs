//! A simulated proplet, byte-compatible with the real Rust proplet on the wire (including its quirks:
//! numeric inputs and starts without a module are dropped without an answer; starts for another proplet
//! are ignored; a daemon answers at once with an empty result; nothing is published for a stop; a module
//! named by a registry `image_url` is asked for on `registry/proplet` and polled for every 5 s, up to 60 s).
use crate::wasm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::mqtt::address;
use crate::mqtt::topics::Channel;
use crate::mqtt::wire::RegistryChunk;

/// How one simulated proplet connects and behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub address: String,
    pub domain: String,
    pub channel: String,
    /// MQTT client id and username; `proplet_id` in every message.
    pub client_id: String,
    pub password: String,
    pub liveliness_interval: Duration,
    pub metrics_interval: Duration,
    /// PROPLET_MANAGER_K8S_NAMESPACE of the real proplet.
    pub namespace: String,
    pub qos: u8,
    pub faults: Faults,
    /// How often a task waiting for registry chunks looks for a complete module (real proplet: 5 s).
    pub registry_poll: Duration,
    /// How long it waits for them before failing the task (real proplet: 60 s).
    pub registry_timeout: Duration,
    /// The proplet's own DATA_STORE_URL (a task's env takes precedence), for `GET …/datasets/{clientId}`.
    pub data_store_url: Option<String>,
}

impl SimConfig {
    pub fn new(
        address: &str,
        domain: &str,
        channel: &str,
        client_id: &str,
        password: &str,
    ) -> Self {
        SimConfig {
            address: address.into(),
            domain: domain.into(),
            channel: channel.into(),
            client_id: client_id.into(),
            password: password.into(),
            liveliness_interval: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(10),
            namespace: "default".into(),
            qos: 2,
            faults: Faults::default(),
            registry_poll: Duration::from_secs(5),
            registry_timeout: Duration::from_secs(60),
            data_store_url: None,
        }
    }
}

/// Faults to inject.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer every task with an error.
    pub fail_tasks: bool,
    /// Extra time every task takes.
    pub task_delay: Duration,
    /// FL updates cannot be POSTed to the coordinator (as if unreachable): they take the MQTT fallback.
    pub coordinator_unreachable: bool,
}

/// The start message as the real proplet's serde model reads it.
#[derive(Deserialize)]
struct ProletStart {
    id: String,
    name: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    image_url: Option<String>,
    #[serde(default)]
    inputs: Option<Vec<String>>,
    #[serde(default)]
    daemon: bool,
    #[serde(default)]
    broadcast: bool,
    #[serde(default)]
    proplet_id: Option<String>,
    #[serde(default)]
    monitoring_profile: Option<ProletMonitoringProfile>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
}

/// What a task produced.
enum Answer {
    Text(String),
    /// The FL result envelope (`results` as an object).
    Fl(serde_json::Value),
    /// The real proplet gives up on an FL task without its URLs, publishing nothing.
    Abandoned,
}

/// The version a proplet asks the registry for: digits after `global_model_v`, else trailing digits.
fn model_version(uri: &str) -> u64 {
    crate::fl::store::version_of(uri)
}

fn http_get_json(url: &str) -> Result<serde_json::Value, String> {
    let mut resp = ureq::get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("GET {url}: not JSON: {e}"))
}

fn http_get_text(url: &str) -> Result<String, String> {
    ureq::get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))
}

fn http_post_json(url: &str, body: &str) -> Result<(), String> {
    ureq::post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map(|_| ())
        .map_err(|e| format!("POST {url}: {e}"))
}

/// Every field required, `interval` in whole seconds: anything else fails the whole start.
#[derive(Deserialize)]
#[allow(dead_code)]
struct ProletMonitoringProfile {
    enabled: bool,
    interval: u64,
    collect_cpu: bool,
    collect_memory: bool,
    collect_disk_io: bool,
    collect_threads: bool,
    collect_file_descriptors: bool,
    export_to_mqtt: bool,
    retain_history: bool,
    history_size: u64,
}

#[derive(Deserialize)]
struct ProletStop {
    id: String,
}

/// Control of a running simulated proplet.
pub struct SimHandle {
    pub client_id: String,
    heartbeats: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Start messages received (including ignored ones, not counting broker redeliveries), for tests.
    pub starts_seen: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Stop messages received, for tests.
    pub stops_seen: Arc<Mutex<Vec<String>>>,
    /// Ids of the tasks run, once per run: a start for a task already running is ignored (as the real
    /// proplet does) and not counted here.
    pub runs: Arc<Mutex<Vec<String>>>,
}

impl SimHandle {
    /// Stops or resumes heartbeats while staying connected (a hung proplet).
    pub fn set_heartbeats(&self, on: bool) {
        self.heartbeats.store(on, Ordering::SeqCst);
    }

    /// Dies: the connection drops with no DISCONNECT and no last will (as a killed proplet).
    pub fn kill(self) {
        self.task.abort();
    }

    /// Shuts down gracefully (DISCONNECT), as on SIGINT.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts a simulated proplet on the current runtime.
pub fn spawn(config: SimConfig) -> anyhow::Result<SimHandle> {
    let addr = address::parse(&config.address).map_err(|e| anyhow::anyhow!(e))?;
    if addr.tls {
        anyhow::bail!("the simulator speaks plain MQTT only");
    }
    let mut opts = MqttOptions::new(&config.client_id, &addr.host, addr.port);
    opts.set_credentials(&config.client_id, &config.password);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(10 * 1024 * 1024, 10 * 1024 * 1024);
    let (client, eventloop) = AsyncClient::new(opts, 128);
    let heartbeats = Arc::new(AtomicBool::new(true));
    let (stop_tx, stop_rx) = watch::channel(false);
    let starts_seen = Arc::new(Mutex::new(Vec::new()));
    let stops_seen = Arc::new(Mutex::new(Vec::new()));
    let runs = Arc::new(Mutex::new(Vec::new()));
    let proplet = Arc::new(Proplet {
        config: config.clone(),
        channel: Channel::new(&config.domain, &config.channel),
        client,
        qos: match config.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        },
        running: Mutex::new(HashSet::new()),
        aborted: Mutex::new(HashSet::new()),
        modules: Mutex::new(HashMap::new()),
        starts_seen: Arc::clone(&starts_seen),
        stops_seen: Arc::clone(&stops_seen),
        runs: Arc::clone(&runs),
    });
    let task = tokio::spawn(Arc::clone(&proplet).run(eventloop, Arc::clone(&heartbeats), stop_rx));
    Ok(SimHandle {
        client_id: config.client_id,
        heartbeats,
        stop: stop_tx,
        task,
        starts_seen,
        stops_seen,
        runs,
    })
}

/// Chunks of one module: the total stays what the first chunk said; duplicates are ignored.
struct Assembly {
    total: usize,
    parts: BTreeMap<usize, Vec<u8>>,
}

impl Assembly {
    fn complete(&self) -> Option<Vec<u8>> {
        (self.parts.len() == self.total).then(|| self.parts.values().flatten().copied().collect())
    }
}

struct Proplet {
    config: SimConfig,
    channel: Channel,
    client: AsyncClient,
    qos: QoS,
    running: Mutex<HashSet<String>>,
    aborted: Mutex<HashSet<String>>,
    /// Registry chunks by app_name, as the real proplet reassembles them.
    modules: Mutex<HashMap<String, Assembly>>,
    starts_seen: Arc<Mutex<Vec<serde_json::Value>>>,
    stops_seen: Arc<Mutex<Vec<String>>>,
    runs: Arc<Mutex<Vec<String>>>,
}

impl Proplet {
    async fn run(
        self: Arc<Self>,
        mut eventloop: rumqttc::EventLoop,
        heartbeats: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) {
        // Like the real proplet: discovery first, then the subscriptions.
        self.publish("control/proplet/create", self.discovery())
            .await;
        self.subscribe();
        let mut alive = tokio::time::interval(self.config.liveliness_interval);
        let mut metrics = tokio::time::interval(self.config.metrics_interval);
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = self.client.disconnect().await;
                    // Let the DISCONNECT go out.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while eventloop.poll().await.is_ok() {}
                    }).await;
                    return;
                }
                _ = alive.tick() => {
                    if heartbeats.load(Ordering::SeqCst) {
                        let msg = json!({"proplet_id": self.config.client_id, "status": "alive", "namespace": self.config.namespace});
                        self.publish("control/proplet/alive", msg).await;
                    }
                }
                _ = metrics.tick() => {
                    if heartbeats.load(Ordering::SeqCst) {
                        self.publish("control/proplet/metrics", self.metrics()).await;
                    }
                }
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        backoff = Duration::from_millis(200);
                        if !ack.session_present {
                            self.subscribe();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let me = Arc::clone(&self);
                        tokio::spawn(async move { me.on_message(&p.topic, &p.payload, p.dup).await });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(client_id = %self.config.client_id, error = %e, "proplet-sim connection error");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    fn subscribe(&self) {
        for suffix in [
            "control/manager/start",
            "control/manager/stop",
            "control/manager/invoke",
            "registry/server",
        ] {
            let _ = self
                .client
                .try_subscribe(self.channel.topic(suffix), self.qos);
        }
    }

    async fn publish(&self, suffix: &str, payload: serde_json::Value) {
        let topic = self.channel.topic(suffix);
        if let Err(e) = self
            .client
            .publish(topic, self.qos, false, payload.to_string())
            .await
        {
            warn!(client_id = %self.config.client_id, error = %e, "proplet-sim publish failed");
        }
    }

    fn discovery(&self) -> serde_json::Value {
        json!({
            "proplet_id": self.config.client_id,
            "namespace": self.config.namespace,
            "metadata": {
                "environment": "binary", "os": "linux", "hostname": "proplet-sim", "cpu_arch": std::env::consts::ARCH,
                "total_memory_bytes": 1073741824u64, "proplet_version": "0.5.0-sim", "wasm_runtime": "wasmi-sim",
            },
        })
    }

    fn metrics(&self) -> serde_json::Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        json!({
            "proplet_id": self.config.client_id, "namespace": self.config.namespace,
            "timestamp": {"secs_since_epoch": now.as_secs(), "nanos_since_epoch": now.subsec_nanos()},
            "cpu_metrics": {"user_seconds": 0.01, "system_seconds": 0.02, "percent": 1.5},
            "memory_metrics": {"rss_bytes": 19402752u64, "heap_alloc_bytes": 0, "heap_sys_bytes": 0, "heap_inuse_bytes": 0},
        })
    }

    /// `redelivery`: the broker's DUP flag (a QoS 1 message sent again after a reconnect).
    async fn on_message(&self, topic: &str, payload: &[u8], redelivery: bool) {
        if topic.contains("control/manager/start") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload)
                && !redelivery
                && let Ok(mut seen) = self.starts_seen.lock()
            {
                seen.push(v);
            }
            self.on_start(payload).await;
        } else if topic.ends_with("registry/server") {
            self.on_chunk(payload);
        } else if topic.contains("control/manager/stop") {
            match serde_json::from_slice::<ProletStop>(payload) {
                Ok(stop) if !stop.id.is_empty() => {
                    if let Ok(mut s) = self.stops_seen.lock() {
                        s.push(stop.id.clone());
                    }
                    let was_running = self
                        .running
                        .lock()
                        .map(|mut r| r.remove(&stop.id))
                        .unwrap_or(false);
                    if was_running {
                        if let Ok(mut a) = self.aborted.lock() {
                            a.insert(stop.id.clone());
                        }
                        info!(client_id = %self.config.client_id, task = %stop.id, "Task aborted");
                    } else {
                        warn!(client_id = %self.config.client_id, task = %stop.id, "stop for a task that is not running");
                    }
                }
                _ => warn!(client_id = %self.config.client_id, "Failed to decode stop request"),
            }
        }
    }

    fn on_chunk(&self, payload: &[u8]) {
        let Ok(chunk) = serde_json::from_slice::<RegistryChunk>(payload) else {
            warn!(client_id = %self.config.client_id, "Failed to decode registry chunk");
            return;
        };
        let Ok(data) = base64::engine::general_purpose::STANDARD.decode(chunk.data.as_bytes())
        else {
            warn!(client_id = %self.config.client_id, "registry chunk is not base64");
            return;
        };
        if let Ok(mut modules) = self.modules.lock() {
            let a = modules.entry(chunk.app_name).or_insert_with(|| Assembly {
                total: chunk.total_chunks,
                parts: BTreeMap::new(),
            });
            if a.total == chunk.total_chunks && chunk.chunk_idx < a.total {
                a.parts.entry(chunk.chunk_idx).or_insert(data);
            }
        }
    }

    /// Asks the registry for `app_name` and waits for all its chunks, like the real proplet.
    async fn fetch_from_registry(&self, app_name: &str) -> Result<Vec<u8>, String> {
        self.publish("registry/proplet", json!({"app_name": app_name}))
            .await;
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.registry_poll).await;
            let ready = self
                .modules
                .lock()
                .ok()
                .and_then(|m| m.get(app_name).and_then(Assembly::complete));
            if let Some(module) = ready {
                return Ok(module);
            }
            if started.elapsed() >= self.config.registry_timeout {
                return Err("Timeout waiting for binary chunks".into());
            }
        }
    }

    /// `GET {DATA_STORE_URL}/datasets/{clientId}` (the task's DATA_STORE_URL, else the proplet's), as the
    /// real proplet fetches a participant's data; `None` without a URL or when the fetch fails (logged).
    async fn dataset(&self, env: &BTreeMap<String, String>) -> Option<String> {
        let base = env
            .get("DATA_STORE_URL")
            .cloned()
            .or_else(|| self.config.data_store_url.clone())
            .filter(|u| !u.is_empty())?;
        let url = format!(
            "{}/datasets/{}",
            base.trim_end_matches('/'),
            self.config.client_id
        );
        match tokio::task::spawn_blocking(move || http_get_text(&url)).await {
            Ok(Ok(text)) => Some(text),
            Ok(Err(e)) => {
                warn!(client_id = %self.config.client_id, error = %e, "dataset fetch failed");
                None
            }
            Err(_) => None,
        }
    }

    /// The real proplet's FL path: model from MODEL_REGISTRY_URL, the client's stdout POSTed to
    /// MANAGER_COORDINATOR_URL/update (or published on the unprefixed fallback topic), then the envelope.
    async fn federated(
        &self,
        task_id: &str,
        name: &str,
        module: Vec<u8>,
        env: &BTreeMap<String, String>,
    ) -> Result<Answer, String> {
        let round_id = env.get("ROUND_ID").cloned().unwrap_or_default();
        let model_uri = env.get("MODEL_URI").cloned().unwrap_or_default();
        let mut model = serde_json::Value::Null;
        if !model_uri.is_empty() {
            let Some(registry) = env.get("MODEL_REGISTRY_URL") else {
                warn!(client_id = %self.config.client_id, "MODEL_REGISTRY_URL missing: FL task abandoned");
                return Ok(Answer::Abandoned);
            };
            let url = format!(
                "{}/models/{}",
                registry.trim_end_matches('/'),
                model_version(&model_uri)
            );
            model = tokio::task::spawn_blocking(move || http_get_json(&url))
                .await
                .map_err(|e| e.to_string())??;
        }
        // As the real proplet: a `fl-round-`/`_start` name runs the module as a WASI command; any other name
        // is called as an export, which an FL client does not have.
        if !wasm::is_command(name) {
            return Err(format!(
                "Failed to run {name:?}: an FL round task must be named fl-round-… (no such export)"
            ));
        }
        let mut vars: Vec<(String, String)> =
            env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !model.is_null() {
            vars.push(("MODEL_DATA".into(), model.to_string()));
        }
        if let Some(data) = self.dataset(env).await {
            vars.push(("DATASET_DATA".into(), data));
        }
        let name = name.to_string();
        let stdout = tokio::task::spawn_blocking(move || {
            wasm::command::run(&module, &name, &[], &[], &vars)
        })
        .await
        .map_err(|e| e.to_string())??;
        let Some(coordinator) = env.get("MANAGER_COORDINATOR_URL").cloned() else {
            warn!(client_id = %self.config.client_id, "MANAGER_COORDINATOR_URL missing: FL task abandoned");
            return Ok(Answer::Abandoned);
        };
        if serde_json::from_str::<serde_json::Value>(&stdout).is_ok() {
            let http_fails = self.config.faults.coordinator_unreachable;
            let url = format!("{}/update", coordinator.trim_end_matches('/'));
            let body = stdout.clone();
            let posted = if http_fails {
                Err("simulated coordinator outage".to_string())
            } else {
                tokio::task::spawn_blocking(move || http_post_json(&url, &body))
                    .await
                    .map_err(|e| e.to_string())?
            };
            if let Err(e) = posted {
                info!(client_id = %self.config.client_id, error = %e, "update POST failed; publishing on MQTT");
                let topic = format!("fl/rounds/{round_id}/updates/{}", self.config.client_id);
                if let Err(e) = self
                    .client
                    .publish(topic, self.qos, false, stdout.clone())
                    .await
                {
                    warn!(client_id = %self.config.client_id, error = %e, "fallback publish failed");
                }
            }
        }
        let samples: u64 = env
            .get("FL_NUM_SAMPLES")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let format = env
            .get("FL_FORMAT")
            .cloned()
            .unwrap_or_else(|| "f32-delta".into());
        Ok(Answer::Fl(json!({
            "task_id": task_id, "round_id": round_id, "proplet_id": self.config.client_id,
            "num_samples": samples,
            "update_b64": base64::engine::general_purpose::STANDARD.encode(stdout.as_bytes()),
            "format": format, "metrics": {},
        })))
    }

    async fn on_start(&self, payload: &[u8]) {
        let start: ProletStart = match serde_json::from_slice(payload) {
            Ok(s) => s,
            Err(e) => {
                warn!(client_id = %self.config.client_id, error = %e, "Failed to decode start request");
                return;
            }
        };
        if start.id.is_empty() || start.name.is_empty() {
            warn!(client_id = %self.config.client_id, "start request without id or name");
            return;
        }
        let file = start.file.unwrap_or_default();
        let image_url = start.image_url.unwrap_or_default();
        if file.is_empty() && image_url.is_empty() {
            warn!(client_id = %self.config.client_id, "either file or image_url must be provided");
            return;
        }
        if !start.broadcast
            && let Some(target) = start.proplet_id.as_deref()
            && target != self.config.client_id
        {
            return;
        }
        let fresh = self
            .running
            .lock()
            .map(|mut r| r.insert(start.id.clone()))
            .unwrap_or(false);
        if !fresh {
            debug!(client_id = %self.config.client_id, task = %start.id, "duplicate start ignored");
            return;
        }
        if let Ok(mut runs) = self.runs.lock() {
            runs.push(start.id.clone());
        }
        let monitor = start
            .monitoring_profile
            .as_ref()
            .filter(|m| m.enabled && m.export_to_mqtt)
            .map(|m| Duration::from_secs(m.interval.max(1)));
        let env = start.env.clone().unwrap_or_default();
        let is_fl = env.contains_key("ROUND_ID");
        let work = async {
            if start.daemon {
                return Ok(Answer::Text(String::new()));
            }
            if !self.config.faults.task_delay.is_zero() {
                tokio::time::sleep(self.config.faults.task_delay).await;
            }
            if self.config.faults.fail_tasks {
                Err("simulated failure".to_string())
            } else {
                let module = if !file.is_empty() {
                    base64::engine::general_purpose::STANDARD
                        .decode(file.as_bytes())
                        .map_err(|e| format!("Failed to decode wasm file: {e}"))
                } else if image_url.starts_with("http://") || image_url.starts_with("https://") {
                    Err(format!("proplet-sim cannot fetch {image_url:?}"))
                } else {
                    self.fetch_from_registry(&image_url).await
                };
                match module {
                    Ok(module) if is_fl => {
                        self.federated(&start.id, &start.name, module, &env).await
                    }
                    Ok(module) => {
                        // A command name runs `_start` with the task's env (the external runtime's
                        // `--env`); any other name is called as an export with the inputs.
                        let name = start.name.clone();
                        let inputs = start.inputs.unwrap_or_default();
                        let vars: Vec<(String, String)> = env.clone().into_iter().collect();
                        tokio::task::spawn_blocking(move || {
                            wasm::command::run(&module, &name, &inputs, &[], &vars)
                        })
                        .await
                        .unwrap_or_else(|e| Err(format!("task panicked: {e}")))
                        .map(Answer::Text)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        // While the task runs, task_metrics every profile interval (as the real proplet samples them).
        let ticker = async {
            let Some(every) = monitor else {
                return std::future::pending::<()>().await;
            };
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let msg = json!({"task_id": start.id, "proplet_id": self.config.client_id,
                    "metrics": {"cpu_percent": 3.5, "memory_bytes": 52428800u64, "memory_percent": 0.6,
                                "disk_read_bytes": 0, "disk_write_bytes": 0, "uptime_seconds": 1,
                                "thread_count": 9, "file_descriptor_count": 31},
                    "aggregated": null});
                self.publish("control/proplet/task_metrics", msg).await;
            }
        };
        let outcome = tokio::select! {
            o = work => o,
            _ = ticker => Err("unreachable".to_string()),
        };
        let still_running = self
            .running
            .lock()
            .map(|mut r| r.remove(&start.id))
            .unwrap_or(false);
        let aborted = self
            .aborted
            .lock()
            .map(|mut a| a.remove(&start.id))
            .unwrap_or(false);
        if !still_running || aborted {
            return;
        }
        let msg = match outcome {
            Ok(Answer::Abandoned) => return,
            // The real proplet sends no top-level proplet_id with an FL result.
            Ok(Answer::Fl(envelope)) => {
                json!({"task_id": start.id, "results": envelope, "error": null})
            }
            Ok(Answer::Text(r)) => {
                json!({"task_id": start.id, "proplet_id": self.config.client_id, "results": r, "error": null})
            }
            Err(e) => {
                json!({"task_id": start.id, "proplet_id": self.config.client_id, "results": "", "error": e})
            }
        };
        self.publish("control/proplet/results", msg).await;
    }
}
