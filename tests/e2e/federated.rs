//! Federated learning end to end: the operator as coordinator, model registry and data store, proplet-sim
//! on the real proplet's FL path (model and dataset GET, the example FL client run as a WASI command,
//! update POST, MQTT fallback, object result envelope). Every expected model is FedAvg computed here from
//! the updates the clients posted.
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::api::{FederatedJob, TrainingRound};
use propeller_operator::sim::{SimConfig, SimHandle};
use propeller_operator::testbed;
use serde_json::{Value, json};

use crate::support::Env;

pub(crate) const MODULE: &str = "registry.example/fl-client.wasm:1";
/// The dataset every job here names; each participant's data is a key of it.
pub(crate) const DATASET: &str = "fl-data";

/// `n` samples of one labelled problem (y = 1 when 1.5·a − c + 0.2 > 0), drawn from the region `k`
/// (participants differ in what they see).
pub(crate) fn dataset(k: usize, n: usize) -> (Vec<[f64; 2]>, Vec<f64>) {
    testbed::fl_dataset(k, n)
}

pub(crate) struct Fl {
    pub(crate) env: Env,
    port: u16,
    sims: Vec<SimHandle>,
}

impl Fl {
    /// `None` (the test skips, loudly; a failure in CI) when the example FL client is not built.
    pub(crate) async fn start(prefix: &str) -> anyhow::Result<Option<Fl>> {
        Fl::start_on(testbed::shared_cluster(), prefix).await
    }

    /// As [`Fl::start`], on `cluster` (a member cluster of a hub test).
    pub(crate) async fn start_on(
        cluster: &'static testbed::TestCluster,
        prefix: &str,
    ) -> anyhow::Result<Option<Fl>> {
        let Some(module) = testbed::fl_client_module(prefix) else {
            return Ok(None);
        };
        let module = base64::engine::general_purpose::STANDARD.encode(std::fs::read(module)?);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let bind = format!("127.0.0.1:{port}");
        let url = format!("http://127.0.0.1:{port}");
        let env = Env::start_on(
            cluster,
            prefix,
            &["--fl-bind-address", &bind, "--fl-public-url", &url],
        )
        .await?;
        // The example FL client, served by name over the MQTT registry.
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "fl-client",
                         "labels": {"propeller.propeller.abstractmachines.fr/module": "true"},
                         "annotations": {"propeller.propeller.abstractmachines.fr/module-name": MODULE}},
            "binaryData": {"module.wasm": module},
        }))?;
        Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns)
            .create(&Default::default(), &cm)
            .await?;
        Ok(Some(Fl {
            env,
            port,
            sims: Vec::new(),
        }))
    }

    /// A simulated proplet `client_id` with a Proplet `name`, Running, whose data (in [`DATASET`]) is
    /// `samples` rows of region `k`.
    pub(crate) async fn participant(
        &mut self,
        name: &str,
        client_id: &str,
        (k, samples): (usize, usize),
        tune: impl FnOnce(&mut SimConfig),
    ) -> anyhow::Result<()> {
        let (x, y) = dataset(k, samples);
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": format!("data-{client_id}"),
                         "labels": {"propeller.propeller.abstractmachines.fr/dataset": DATASET}},
            "data": {format!("{client_id}.json"): json!({"x": x, "y": y}).to_string()},
        }))?;
        Api::<ConfigMap>::namespaced(self.env.admin.clone(), &self.env.ns)
            .create(&Default::default(), &cm)
            .await?;
        let sim = self
            .env
            .proplet(client_id, |c| {
                c.registry_poll = Duration::from_millis(200);
                tune(c);
            })
            .await?;
        self.sims.push(sim);
        self.env
            .external_proplet(name, client_id, json!({}))
            .await?;
        self.env
            .wait_for(&self.env.proplets(), name, "proplet Running", |p| {
                p.phase() == PropletPhase::Running
            })
            .await?;
        Ok(())
    }

    pub(crate) fn jobs(&self) -> Api<FederatedJob> {
        Api::namespaced(self.env.admin.clone(), &self.env.ns)
    }

    pub(crate) fn rounds(&self) -> Api<TrainingRound> {
        Api::namespaced(self.env.admin.clone(), &self.env.ns)
    }

    async fn job(
        &self,
        name: &str,
        participants: &[&str],
        k: i64,
        rounds: i64,
        timeout: i64,
    ) -> anyhow::Result<()> {
        self.env
            .create::<FederatedJob>(json!({"metadata": {"name": name}, "spec": {
                "experimentId": format!("exp-{name}"), "modelRef": "fl/models/global_model_v0",
                "taskWasmImage": MODULE,
                "participants": participants.iter().map(|p| json!({"propletId": p})).collect::<Vec<_>>(),
                "hyperparams": {"epochs": 2, "lr": 0.3},
                "kOfN": k, "timeoutSeconds": timeout, "rounds": {"total": rounds},
                "aggregator": {"algorithm": "fedavg"},
                "initialModel": {"w": [0.0, 1.0], "b": 0.5},
                "dataset": DATASET,
            }}))
            .await?;
        Ok(())
    }

    /// The FL base path a round Task of `job` was given (`/fl/{ns}/{job}/t/{task}/{token}`): the
    /// capability its participant uses. `participant`: that participant's Task, else any.
    pub(crate) async fn capability(
        &self,
        job: &str,
        participant: Option<&str>,
    ) -> anyhow::Result<String> {
        let tasks = self.env.tasks().list(&ListParams::default()).await?;
        let prefix = format!("/fl/{}/{job}/t/", self.env.ns);
        tasks
            .items
            .iter()
            .filter(|t| {
                participant
                    .is_none_or(|p| t.metadata.name.as_deref().is_some_and(|n| n.ends_with(p)))
            })
            .filter_map(|t| t.spec.env.as_ref()?.get("MANAGER_COORDINATOR_URL").cloned())
            .find_map(|url| url.find(&prefix).map(|i| url[i..].to_string()))
            .ok_or_else(|| anyhow::anyhow!("no round Task of {job} holds a capability"))
    }

    /// `(status, body)` of an HTTP request to the operator's FL port.
    pub(crate) fn http(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> impl std::future::Future<Output = anyhow::Result<(u16, Value)>> + use<> {
        http_to(self.port, method, path, body)
    }

    /// Collects the JSON messages published on `topic` from now on.
    pub(crate) async fn listen(
        &self,
        topic: &str,
    ) -> anyhow::Result<Arc<std::sync::Mutex<Vec<Value>>>> {
        let mut opts = rumqttc::MqttOptions::new(
            format!("listen-{}", self.env.ns),
            "127.0.0.1",
            self.env.broker.port,
        );
        opts.set_credentials(&self.env.broker.username, &self.env.broker.password);
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
        client.subscribe(topic, rumqttc::QoS::AtLeastOnce).await?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = Arc::clone(&seen);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _client = client;
            let mut ready = Some(ready_tx);
            while let Ok(ev) = el.poll().await {
                match ev {
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        if let (Ok(v), Ok(mut s)) =
                            (serde_json::from_slice::<Value>(&p.payload), out.lock())
                        {
                            s.push(v);
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await??;
        Ok(seen)
    }

    pub(crate) async fn finish(self) -> anyhow::Result<()> {
        for s in self.sims {
            s.shutdown().await;
        }
        self.env.finish().await
    }
}

/// `(status, body)` of an HTTP request to 127.0.0.1:`port` (the body as JSON, else as a string).
pub(crate) fn http_to(
    port: u16,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> impl std::future::Future<Output = anyhow::Result<(u16, Value)>> + use<> {
    let url = format!("http://127.0.0.1:{port}{path}");
    async move {
        tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, Value)> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut resp = match (method, body) {
                ("POST", Some(b)) => agent.post(&url).send(b.to_string())?,
                _ => agent.get(&url).call()?,
            };
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string()?;
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ))
        })
        .await?
    }
}

/// `(w, b)` of a model or an update's `update`.
pub(crate) fn weights(m: &Value) -> (Vec<f64>, f64) {
    (
        m["w"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
        m["b"].as_f64().unwrap_or(f64::NAN),
    )
}

/// FedAvg of the updates round `n` of `job` aggregated, computed here from the updates as the clients
/// posted them (stored by the coordinator); with the participants it aggregated.
pub(crate) async fn fedavg_of_round(
    env: &Env,
    job: &str,
    n: usize,
) -> anyhow::Result<((Vec<f64>, f64), Vec<String>)> {
    let (sums, from) = round_sums(env, job, n).await?;
    let (w, b, total) = sums;
    Ok(((w.iter().map(|x| x / total).collect(), b / total), from))
}

/// Sample-weighted sums `(Σ nᵢwᵢ, Σ nᵢbᵢ, Σ nᵢ)` of the updates round `n` of `job` aggregated, with the
/// participants it aggregated.
pub(crate) async fn round_sums(
    env: &Env,
    job: &str,
    n: usize,
) -> anyhow::Result<((Vec<f64>, f64, f64), Vec<String>)> {
    let round = format!("{job}-round-{n}");
    let from = Api::<TrainingRound>::namespaced(env.admin.clone(), &env.ns)
        .get(&round)
        .await?
        .status
        .map(|s| s.aggregated_from)
        .unwrap_or_default();
    let stored = Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns)
        .list(&ListParams::default().labels(&format!(
            "propeller.propeller.abstractmachines.fr/fl-update={round}"
        )))
        .await?;
    let (mut w, mut b, mut total) = (Vec::<f64>::new(), 0.0, 0.0);
    for cm in &stored.items {
        let who = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("propeller.propeller.abstractmachines.fr/participant"))
            .cloned()
            .unwrap_or_default();
        if !from.contains(&who) {
            continue;
        }
        let u: Value = serde_json::from_str(
            cm.data
                .as_ref()
                .and_then(|d| d.get("update.json"))
                .map(String::as_str)
                .unwrap_or("{}"),
        )?;
        let s = u["num_samples"].as_f64().unwrap_or(0.0);
        let (uw, ub) = weights(&u["update"]);
        w.resize(uw.len(), 0.0);
        for (acc, x) in w.iter_mut().zip(&uw) {
            *acc += s * x;
        }
        b += s * ub;
        total += s;
    }
    anyhow::ensure!(
        total > 0.0,
        "round {n} of {job}: no stored update of {from:?}"
    );
    Ok(((w, b, total), from))
}

/// Asserts that model `n` of `job`, as proplets download it, is the FedAvg of round `n`'s updates.
async fn model_is_fedavg(fl: &Fl, job: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let ((w, b), from) = fedavg_of_round(&fl.env, job, n).await?;
    let cap = fl.capability(job, None).await?;
    let (code, model) = fl.http("GET", &format!("{cap}/models/{n}"), None).await?;
    assert_eq!(code, 200, "{model}");
    let (mw, mb) = weights(&model);
    assert!(
        mw.len() == w.len() && mw.iter().zip(&w).all(|(a, e)| close(*a, *e)) && close(mb, b),
        "model {n} of {job}: {model} vs FedAvg {w:?} {b}"
    );
    Ok(from)
}

pub(crate) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn three_rounds_of_fedavg_complete_over_http_and_the_mqtt_fallback() -> anyhow::Result<()> {
    let Some(mut fl) = Fl::start("fl-three").await? else {
        return Ok(());
    };
    fl.participant("edge-1", "p1", (0, 10), |_| {}).await?;
    fl.participant("edge-2", "p2", (1, 30), |_| {}).await?;
    let notices = fl.listen("fl/rounds/next").await?;
    // edge-3's coordinator POST fails: its update takes the unprefixed MQTT fallback topic.
    fl.participant("edge-3", "p3", (2, 20), |c| {
        c.faults.coordinator_unreachable = true
    })
    .await?;
    // Participants by Proplet name and by clientId.
    fl.job("exp", &["edge-1", "edge-2", "p3"], 2, 3, 60).await?;
    let job = fl
        .env
        .wait_for(&fl.jobs(), "exp", "job Completed", |j| {
            j.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Completed")
        })
        .await?;
    let status = job.status.clone().unwrap_or_default();
    assert_eq!(status.completed_rounds, Some(3));
    assert_eq!(status.model_version, Some(3));
    assert_eq!(status.round_metrics.len(), 3);
    assert!(
        status
            .round_metrics
            .iter()
            .all(|m| m.updates >= 2 && m.metrics.contains_key("loss"))
    );

    // Every model, served to proplets, is FedAvg of the updates its round aggregated.
    for n in 1..=3 {
        let from = model_is_fedavg(&fl, "exp", n).await?;
        assert!(from.len() >= 2, "round {n}: {from:?}");
    }
    let cap = fl.capability("exp", None).await?;
    let (code, list) = fl.http("GET", &format!("{cap}/models"), None).await?;
    assert_eq!((code, list["latest"].as_u64()), (200, Some(3)), "{list}");

    // edge-3's updates came over MQTT (stored with that route).
    let cms = Api::<ConfigMap>::namespaced(fl.env.admin.clone(), &fl.env.ns)
        .list(&ListParams::default().labels("propeller.propeller.abstractmachines.fr/fl-update"))
        .await?;
    let via = |p: &str| {
        cms.items
            .iter()
            .filter(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("propeller.propeller.abstractmachines.fr/participant"))
                    .map(String::as_str)
                    == Some(p)
            })
            .filter_map(|c| {
                c.metadata
                    .annotations
                    .as_ref()?
                    .get("propeller.propeller.abstractmachines.fr/received-via")
                    .cloned()
            })
            .collect::<Vec<_>>()
    };
    assert!(
        !via("p3").is_empty() && via("p3").iter().all(|v| v == "mqtt"),
        "{:?}",
        via("p3")
    );
    assert!(
        via("edge-1").iter().all(|v| v == "http"),
        "{:?}",
        via("edge-1")
    );
    // Propeller's notice after each round, the last one saying no round follows.
    let seen: Vec<Value> = notices.lock().map(|n| n.clone()).unwrap_or_default();
    let versions: Vec<u64> = seen
        .iter()
        .filter_map(|n| n["new_model_version"].as_u64())
        .collect();
    assert_eq!(versions, vec![1, 2, 3], "{seen:?}");
    assert_eq!(seen[2]["model_uri"], "fl/models/global_model_v3");
    assert_eq!(seen[2]["next_round_available"], false);
    assert_eq!(seen[0]["next_round_available"], true);
    fl.finish().await
}

#[tokio::test]
async fn a_straggler_is_recorded_late_and_left_out() -> anyhow::Result<()> {
    let Some(mut fl) = Fl::start("fl-late").await? else {
        return Ok(());
    };
    fl.participant("s-1", "s-1", (0, 5), |_| {}).await?;
    fl.participant("s-2", "s-2", (1, 15), |_| {}).await?;
    fl.participant("s-3", "s-3", (2, 50), |c| {
        c.faults.task_delay = Duration::from_secs(6)
    })
    .await?;
    fl.job("late", &["s-1", "s-2", "s-3"], 2, 1, 60).await?;
    fl.env
        .wait_for(&fl.jobs(), "late", "job Completed", |j| {
            j.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Completed")
        })
        .await?;
    // The straggler's update arrives after aggregation: recorded, not aggregated.
    let round = fl
        .env
        .wait_for(
            &fl.rounds(),
            "late-round-1",
            "a late update recorded",
            |r| r.status.as_ref().and_then(|s| s.late_updates) == Some(1),
        )
        .await?;
    let from = round.status.map(|s| s.aggregated_from).unwrap_or_default();
    assert_eq!(from, vec!["s-1".to_string(), "s-2".to_string()]);
    assert_eq!(model_is_fedavg(&fl, "late", 1).await?, from);
    fl.finish().await
}

#[tokio::test]
async fn without_quorum_a_round_times_out_and_strangers_are_refused() -> anyhow::Result<()> {
    let Some(mut fl) = Fl::start("fl-timeout").await? else {
        return Ok(());
    };
    fl.participant("t-1", "t-1", (0, 5), |_| {}).await?;
    // t-2 never comes up: its Task waits for it, the round waits for k=2, then times out.
    fl.job("quorum", &["t-1", "t-2"], 2, 2, 8).await?;
    let ns = fl.env.ns.clone();
    fl.env
        .wait_for(&fl.rounds(), "quorum-round-1", "round Running", |r| {
            r.phase() == "Running"
        })
        .await?;
    let update = |p: &str, round: &str| json!({"round_id": round, "proplet_id": p, "num_samples": 1, "update": {"w": [1.0, 1.0], "b": 1.0}});
    // t-1's Task holds its capability: the only URL under which t-1 may post and read.
    let cap = fl.capability("quorum", Some("t-1")).await?;
    let post = |path: String, body: Value| fl.http("POST", &path, Some(body));
    let refused = |reason: &str| {
        fl.env
            .metrics()
            .fl_requests_refused_total
            .with_label_values(&[reason])
            .get()
    };
    // Without a capability, or with a forged one: 401.
    assert_eq!(
        post(format!("/fl/{ns}/quorum/update"), update("t-1", "round-1"))
            .await?
            .0,
        401
    );
    let forged = format!(
        "{}{}",
        &cap[..cap.len() - 1],
        if cap.ends_with('0') { '1' } else { '0' }
    );
    assert_eq!(
        post(format!("{forged}/update"), update("t-1", "round-1"))
            .await?
            .0,
        401
    );
    let elsewhere = cap.replace("/quorum/t/", "/nosuchjob/t/");
    assert_eq!(
        post(format!("{elsewhere}/update"), update("t-1", "round-1"))
            .await?
            .0,
        401
    );
    // Another participant's update, or another round's, or another participant's data: 403.
    assert_eq!(
        post(format!("{cap}/update"), update("mallory", "round-1"))
            .await?
            .0,
        403
    );
    assert_eq!(
        post(format!("{cap}/update"), update("t-2", "round-1"))
            .await?
            .0,
        403
    );
    assert_eq!(
        post(format!("{cap}/update"), update("t-1", "round-9"))
            .await?
            .0,
        403
    );
    assert_eq!(
        fl.http("GET", &format!("{cap}/datasets/t-2"), None)
            .await?
            .0,
        403
    );
    assert_eq!(
        fl.http("GET", &format!("{cap}/datasets/t-1"), None)
            .await?
            .0,
        200,
        "its own data"
    );
    assert_eq!(
        (
            refused("no_capability"),
            refused("bad_capability"),
            refused("wrong_participant")
        ),
        (1, 2, 4)
    );
    // Bad bodies under a good capability.
    assert_eq!(
        post(
            format!("{cap}/update"),
            json!({"round_id": "round-1", "proplet_id": "t-1"})
        )
        .await?
        .0,
        400
    );
    assert_eq!(
        post(
            format!("{cap}/update"),
            json!({"round_id": "round-1", "proplet_id": "t-1", "num_samples": 0, "update": [1.0]})
        )
        .await?
        .0,
        400
    );
    let huge = json!({"round_id": "round-1", "proplet_id": "t-1", "num_samples": 1, "update": vec![0.5; 200_000]});
    // The server refuses it from its Content-Length, before reading it: the client may see the 413, or
    // the connection closed under a body it is still sending. Either way the refusal is counted.
    match post(format!("{cap}/update"), huge).await {
        Ok((code, _)) => assert_eq!(code, 413),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("roken pipe") || e.contains("reset"), "{e}");
        }
    }
    let too_large = fl
        .env
        .metrics()
        .fl_updates_total
        .with_label_values(&["http", "too_large"])
        .get();
    assert_eq!(
        too_large, 1,
        "the oversized update was refused as too large"
    );
    assert_eq!(
        fl.http("GET", &format!("{cap}/models/7"), None).await?.0,
        404
    );

    let round = fl
        .env
        .wait_for(&fl.rounds(), "quorum-round-1", "round Failed", |r| {
            r.phase() == "Failed"
        })
        .await?;
    let ready = round
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
    assert_eq!(
        ready.as_ref().and_then(|c| c.reason.as_deref()),
        Some("Timeout"),
        "{ready:?}"
    );
    let job = fl
        .env
        .wait_for(&fl.jobs(), "quorum", "job Failed", |j| {
            j.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        })
        .await?;
    let cond = job
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"));
    assert_eq!(cond.and_then(|c| c.reason), Some("RoundFailed".into()));

    // An impossible quorum is an invalid spec before anything runs.
    fl.job("impossible", &["t-1", "t-2"], 3, 1, 10).await?;
    let job = fl
        .env
        .wait_for(&fl.jobs(), "impossible", "InvalidSpec", |j| {
            j.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.reason.as_deref() == Some("InvalidSpec"))
            })
        })
        .await?;
    assert_eq!(job.status.and_then(|s| s.phase), Some("Failed".into()));
    assert!(fl.rounds().get_opt("impossible-round-1").await?.is_none());
    fl.finish().await
}

#[tokio::test]
async fn an_operator_restart_mid_round_loses_no_update() -> anyhow::Result<()> {
    let Some(mut fl) = Fl::start("fl-restart").await? else {
        return Ok(());
    };
    fl.participant("r-1", "r-1", (0, 4), |_| {}).await?;
    fl.participant("r-2", "r-2", (1, 12), |c| {
        c.faults.task_delay = Duration::from_secs(25)
    })
    .await?;
    fl.job("restart", &["r-1", "r-2"], 2, 1, 60).await?;
    fl.env
        .wait_for(
            &fl.rounds(),
            "restart-round-1",
            "first update counted",
            |r| r.status.as_ref().and_then(|s| s.updates_received) == Some(1),
        )
        .await?;
    // r-2 answers ~25 s after its start, well after the new operator is up: its MQTT session is clean,
    // so messages published while no operator is connected would be lost (see docs/federated-learning.md).
    fl.env.stop_operator().await?;
    fl.env.resume_operator().await?;
    let round = fl
        .env
        .wait_for(&fl.rounds(), "restart-round-1", "round Completed", |r| {
            r.phase() == "Completed"
        })
        .await?;
    let from = round.status.map(|s| s.aggregated_from).unwrap_or_default();
    assert_eq!(from, vec!["r-1".to_string(), "r-2".to_string()]);
    assert_eq!(model_is_fedavg(&fl, "restart", 1).await?, from);
    fl.finish().await
}
