//! The simulated side of the benchmark: proplets, Tasks, heartbeats, and what is seen on the wire.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::api::{Proplet, Task};
use propeller_operator::sim::{self, SimConfig, SimHandle};
use propeller_operator::testbed::{self, Broker};
use serde_json::{Value, json};

use crate::{ADD, CHANNEL, DOMAIN};

/// Times at which task ids were seen on the wire (start, result).
#[derive(Default)]
pub struct Wire {
    pub starts: HashMap<String, Instant>,
    pub results: HashMap<String, Instant>,
    /// Start messages per task id (more than one: sent again).
    pub start_count: HashMap<String, usize>,
}

pub async fn observe_wire(
    broker: &Broker,
    wire: Arc<Mutex<Wire>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut opts = rumqttc::MqttOptions::new("bench-observer", "127.0.0.1", broker.port);
    opts.set_credentials(&broker.username, &broker.password);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
    client
        .subscribe(
            format!("m/{DOMAIN}/c/{CHANNEL}/control/manager/start"),
            rumqttc::QoS::AtMostOnce,
        )
        .await?;
    client
        .subscribe(
            format!("m/{DOMAIN}/c/{CHANNEL}/control/proplet/results"),
            rumqttc::QoS::AtMostOnce,
        )
        .await?;
    let handle = tokio::spawn(async move {
        let _keep = client;
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let now = Instant::now();
                    let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                        continue;
                    };
                    if let Ok(mut w) = wire.lock() {
                        if p.topic.ends_with("start") {
                            if let Some(id) = v["id"].as_str() {
                                w.starts.entry(id.to_string()).or_insert(now);
                                *w.start_count.entry(id.to_string()).or_default() += 1;
                            }
                        } else if let Some(id) = v["task_id"].as_str() {
                            w.results.entry(id.to_string()).or_insert(now);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    // Let the subscriptions settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(handle)
}

/// Records when each Task of `ns` is first seen completed (by UID).
pub fn watch_completions(
    client: &Client,
    ns: &str,
    done: Arc<Mutex<HashMap<String, Instant>>>,
) -> tokio::task::JoinHandle<()> {
    let api: Api<Task> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        // Errors (an API server restart ends every watch) are retried by the watcher, not the end.
        while let Some(event) = stream.next().await {
            let Ok(t) = event else { continue };
            if t.phase() == TaskPhase::Completed
                && let (Some(uid), Ok(mut d)) = (t.uid(), done.lock())
            {
                d.entry(uid).or_insert_with(Instant::now);
            }
        }
    })
}

/// The MQTT channel of the `i`-th proplet: `per_channel` proplets share each channel (0: all share one).
pub fn channel_of(i: usize, per_channel: usize) -> String {
    match per_channel {
        0 => CHANNEL.to_string(),
        n => format!("{CHANNEL}-{}", i / n),
    }
}

/// Proplets `ids` (external, on `per_channel` proplets per channel, see [`channel_of`]).
pub async fn make_proplets(
    client: &Client,
    ns: &str,
    ids: &[String],
    broker: &Broker,
    per_channel: usize,
) -> anyhow::Result<()> {
    make_proplets_at(client, ns, ids, broker, per_channel, 0).await
}

/// Like [`make_proplets`], for ids that are the fleet's `first`-th and following (for their channel).
pub async fn make_proplets_at(
    client: &Client,
    ns: &str,
    ids: &[String],
    broker: &Broker,
    per_channel: usize,
    first: usize,
) -> anyhow::Result<()> {
    let api: Api<Proplet> = Api::namespaced(client.clone(), ns);
    stream::iter(ids.iter().cloned().enumerate())
        .map(|(i, id)| {
            let api = api.clone();
            let addr = broker.address();
            let channel = channel_of(first + i, per_channel);
            async move {
                let p: Proplet = serde_json::from_value(json!({
                    "metadata": {"name": id},
                    "spec": {"type": "external", "external": {"deviceType": "sim"},
                             "connectionConfig": {"domainId": DOMAIN, "channelId": channel, "clientId": id,
                                                  "clientKey": "k", "mqttAddress": addr}},
                }))?;
                api.create(&PostParams::default(), &p).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

pub async fn all_running(
    client: &Client,
    ns: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api: Api<Proplet> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        // Paged and every 2 s: listing thousands of Proplets is itself load on the API server.
        let mut running = 0;
        let mut lp = kube::api::ListParams::default().limit(500);
        loop {
            let page = api.list(&lp).await?;
            running += page
                .items
                .iter()
                .filter(|p| p.phase() == PropletPhase::Running)
                .count();
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        if running >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {running} of {n} proplets Running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub fn task_body(name: &str, run: &str) -> Task {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"bench-run": run}},
        "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": [40, 2]},
    }))
    .unwrap_or_else(|_| unreachable!("a constant Task"))
}

/// Creates `names` at `rate` per second (0: as fast as possible); returns create time by UID.
pub async fn create_tasks(
    client: &Client,
    ns: &str,
    run: &str,
    names: Vec<String>,
    rate: f64,
) -> anyhow::Result<HashMap<String, Instant>> {
    let api: Api<Task> = Api::namespaced(client.clone(), ns);
    let created = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    stream::iter(names.into_iter().enumerate())
        .map(|(i, name)| {
            let api = api.clone();
            let created = Arc::clone(&created);
            async move {
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let at = Instant::now();
                // An API server still digesting the previous step may refuse connections for a while.
                let mut attempt = 0;
                let t = loop {
                    match api
                        .create(&PostParams::default(), &task_body(&name, run))
                        .await
                    {
                        Ok(t) => break t,
                        Err(kube::Error::Api(e)) if e.code == 409 => break api.get(&name).await?,
                        Err(e) if attempt < 10 => {
                            attempt += 1;
                            eprintln!("creating {name} (attempt {attempt}): {e}");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                if let (Some(uid), Ok(mut c)) = (t.uid(), created.lock()) {
                    c.insert(uid, at);
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(if rate > 0.0 { 256 } else { 32 })
        .try_collect::<Vec<_>>()
        .await?;
    let out = created.lock().map(|c| c.clone()).unwrap_or_default();
    Ok(out)
}

pub struct Latencies {
    pub dispatch_ms: Vec<f64>,
    pub completion_ms: Vec<f64>,
    pub last_completion: Option<Instant>,
}

impl Latencies {
    /// The `p`-th percentile of dispatch latency (ms).
    pub fn dispatch(&self, p: f64) -> f64 {
        crate::measure::percentile(&crate::measure::sorted(self.dispatch_ms.clone()), p)
    }

    /// The `p`-th percentile of completion latency (ms).
    pub fn completion(&self, p: f64) -> f64 {
        crate::measure::percentile(&crate::measure::sorted(self.completion_ms.clone()), p)
    }
}

pub async fn wait_and_measure(
    created: &HashMap<String, Instant>,
    wire: &Arc<Mutex<Wire>>,
    done: &Arc<Mutex<HashMap<String, Instant>>>,
    timeout: Duration,
) -> anyhow::Result<Latencies> {
    let n = created.len();
    testbed::eventually(&format!("{n} tasks completed"), timeout, || async {
        let d = done.lock().ok()?;
        (created.keys().filter(|u| d.contains_key(*u)).count() >= n).then_some(())
    })
    .await?;
    let w = wire.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let d = done.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let mut out = Latencies {
        dispatch_ms: Vec::new(),
        completion_ms: Vec::new(),
        last_completion: None,
    };
    for (uid, at) in created {
        if let Some(s) = w.starts.get(uid) {
            out.dispatch_ms
                .push(s.duration_since(*at).as_secs_f64() * 1000.0);
        }
        if let (Some(r), Some(c)) = (w.results.get(uid), d.get(uid)) {
            out.completion_ms
                .push(c.saturating_duration_since(*r).as_secs_f64() * 1000.0);
            out.last_completion = out.last_completion.max(Some(*c));
        }
    }
    Ok(out)
}

/// Deletes the Tasks of one run and waits until they are gone (their finalizers are the operator's).
pub async fn remove_run(client: &Client, ns: &str, run: &str) -> anyhow::Result<()> {
    let api: Api<Task> = Api::namespaced(client.clone(), ns);
    let lp = kube::api::ListParams::default().labels(&format!("bench-run={run}"));
    // After an overloaded step etcd may time a large delete out: retry, it resumes where it stopped.
    let mut attempt = 0;
    while let Err(e) = api.delete_collection(&Default::default(), &lp).await {
        attempt += 1;
        if attempt >= 10 {
            return Err(e.into());
        }
        eprintln!("deleting the tasks of {run} (attempt {attempt}): {e}");
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    testbed::eventually(
        &format!("the tasks of {run} to be deleted"),
        Duration::from_secs(600),
        || async {
            api.list_metadata(&lp)
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await
}

/// Plain status patches as fast as a client can send them: the API server's write limit.
pub async fn raw_write_limit(client: &Client, ns: &str) -> anyhow::Result<f64> {
    let api: Api<Task> = Api::namespaced(client.clone(), ns);
    let names: Vec<String> = (0..64).map(|i| format!("raw-{i}")).collect();
    for n in &names {
        api.create(&PostParams::default(), &task_body(n, "raw"))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let workers = names.into_iter().map(|name| {
        let api = api.clone();
        let count = Arc::clone(&count);
        async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let patch = json!({"status": {"error": format!("raw write {i}")}});
                if api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .is_ok()
                {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    futures::future::join_all(workers).await;
    Ok(count.load(std::sync::atomic::Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

pub async fn sims(broker: &mut Broker, ids: &[String]) -> anyhow::Result<Vec<SimHandle>> {
    slow_sims(broker, ids, Duration::ZERO).await
}

/// Simulated proplets whose every task takes `delay`.
pub async fn slow_sims(
    broker: &mut Broker,
    ids: &[String],
    delay: Duration,
) -> anyhow::Result<Vec<SimHandle>> {
    let users: Vec<(String, String)> = ids
        .iter()
        .map(|i| (i.clone(), format!("{i}-key")))
        .collect();
    broker.add_users(&users)?;
    ids.iter()
        .map(|id| {
            let mut c =
                SimConfig::new(&broker.address(), DOMAIN, CHANNEL, id, &format!("{id}-key"));
            c.qos = 1;
            c.faults.task_delay = delay;
            sim::spawn(c)
        })
        .collect()
}

/// `ids` heartbeating every 10 s over a few connections (the operator reads the proplet id from the payload).
pub async fn heartbeat_swarm(port: u16, user: String, pass: String, ids: Vec<(String, String)>) {
    let per_conn = 1000;
    // Every connection lives in this set: aborting the swarm's task drops it, which ends them all (a
    // swarm left running would fight its successor for the same client ids).
    let mut conns = tokio::task::JoinSet::new();
    let swarm = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    for (c, chunk) in ids.chunks(per_conn).enumerate() {
        let chunk = chunk.to_vec();
        let (user, pass) = (user.clone(), pass.clone());
        conns.spawn(async move {
            let mut opts =
                rumqttc::MqttOptions::new(format!("bench-hb-{swarm:x}-{c}"), "127.0.0.1", port);
            opts.set_credentials(&user, &pass);
            let (client, mut el) = rumqttc::AsyncClient::new(opts, 2000);
            let poll = async move {
                loop {
                    if el.poll().await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let spacing = Duration::from_secs(10) / chunk.len().max(1) as u32;
            let publish = async move {
                loop {
                    for (id, channel) in &chunk {
                        let msg =
                            json!({"proplet_id": id, "status": "alive", "namespace": "bench"})
                                .to_string();
                        let _ = client
                            .publish(
                                format!("m/{DOMAIN}/c/{channel}/control/proplet/alive"),
                                rumqttc::QoS::AtMostOnce,
                                false,
                                msg,
                            )
                            .await;
                        tokio::time::sleep(spacing).await;
                    }
                }
            };
            tokio::join!(poll, publish);
        });
    }
    while conns.join_next().await.is_some() {}
}
