//! Federated learning end to end: the operator as coordinator and model registry, proplet-sim on the
//! real proplet's FL path (model GET, update POST, MQTT fallback, object result envelope). The client's
//! computation is the simulator's `train` function (a real FL client is a Wasm module printing JSON);
//! everything on the wire and in the cluster is real.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::api::{FederatedJob, TrainingRound};
use propeller_operator::sim::{FlClient, FlRound, SimHandle};
use serde_json::{Value, json};

use crate::support::Env;

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";
const MODULE: &str = "registry.example/fl-client.wasm:1";

/// A client that moves every weight by `delta` from the model it was given.
fn client(delta: f64, samples: u64, http_fails: bool, delay: Duration) -> FlClient {
    FlClient {
        train: Arc::new(move |r: &FlRound| {
            let w: Vec<f64> = r.model["w"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let b = r.model["b"].as_f64().unwrap_or(0.0);
            json!({"round_id": r.round_id, "proplet_id": r.proplet_id, "base_model_uri": r.model_uri,
                   "num_samples": samples, "metrics": {"loss": 1.0 / (1.0 + delta)},
                   "update": {"w": w.iter().map(|x| x + delta).collect::<Vec<_>>(), "b": b - delta}})
        }),
        http_fails,
        delay,
    }
}

pub(crate) struct Fl {
    pub(crate) env: Env,
    port: u16,
    sims: Vec<SimHandle>,
}

impl Fl {
    pub(crate) async fn start(prefix: &str) -> anyhow::Result<Fl> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let bind = format!("127.0.0.1:{port}");
        let url = format!("http://127.0.0.1:{port}");
        let env = Env::start(
            prefix,
            &["--fl-bind-address", &bind, "--fl-public-url", &url],
        )
        .await?;
        // The FL client module, served by name over the MQTT registry.
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "fl-client",
                         "labels": {"propeller.propeller.abstractmachines.fr/module": "true"},
                         "annotations": {"propeller.propeller.abstractmachines.fr/module-name": MODULE}},
            "binaryData": {"module.wasm": ADD},
        }))?;
        Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns)
            .create(&Default::default(), &cm)
            .await?;
        Ok(Fl {
            env,
            port,
            sims: Vec::new(),
        })
    }

    /// A simulated proplet `client_id` with a Proplet `name`, Running.
    async fn participant(
        &mut self,
        name: &str,
        client_id: &str,
        fl: FlClient,
    ) -> anyhow::Result<()> {
        let sim = self
            .env
            .proplet(client_id, |c| {
                c.registry_poll = Duration::from_millis(200);
                c.fl_client = Some(fl);
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
                "hyperparams": {"epochs": 1, "lr": 0.01},
                "kOfN": k, "timeoutSeconds": timeout, "rounds": {"total": rounds},
                "aggregator": {"algorithm": "fedavg"},
                "initialModel": {"w": [0.0, 1.0], "b": 0.5},
            }}))
            .await?;
        Ok(())
    }

    /// `(status, body)` of an HTTP request to the operator's FL port.
    pub(crate) fn http(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> impl std::future::Future<Output = anyhow::Result<(u16, Value)>> + use<> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
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

/// What the test expects each participant to send, by Proplet name: (delta, samples).
type Clients = BTreeMap<&'static str, (f64, u64)>;

/// The FedAvg chain over the rounds' aggregated participants, computed here from first principles.
fn expected_model(clients: &Clients, rounds: &[Vec<String>]) -> (Vec<f64>, f64) {
    let (mut w, mut b) = (vec![0.0, 1.0], 0.5);
    for from in rounds {
        let n: f64 = from.iter().map(|p| clients[p.as_str()].1 as f64).sum();
        let (mut nw, mut nb) = (vec![0.0; w.len()], 0.0);
        for p in from {
            let (delta, s) = clients[p.as_str()];
            let s = s as f64;
            for (j, x) in w.iter().enumerate() {
                nw[j] += s * (x + delta) / n;
            }
            nb += s * (b - delta) / n;
        }
        (w, b) = (nw, nb);
    }
    (w, b)
}

pub(crate) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

async fn round_sets(fl: &Fl, job: &str, total: i64) -> anyhow::Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for n in 1..=total {
        let r = fl.rounds().get(&format!("{job}-round-{n}")).await?;
        out.push(r.status.map(|s| s.aggregated_from).unwrap_or_default());
    }
    Ok(out)
}

#[tokio::test]
async fn three_rounds_of_fedavg_complete_over_http_and_the_mqtt_fallback() -> anyhow::Result<()> {
    let mut fl = Fl::start("fl-three").await?;
    let clients: Clients = [
        ("edge-1", (0.5, 10)),
        ("edge-2", (-1.0, 30)),
        ("edge-3", (2.0, 20)),
    ]
    .into();
    fl.participant("edge-1", "p1", client(0.5, 10, false, Duration::ZERO))
        .await?;
    fl.participant("edge-2", "p2", client(-1.0, 30, false, Duration::ZERO))
        .await?;
    let notices = fl.listen("fl/rounds/next").await?;
    // edge-3's coordinator POST fails: its update takes the unprefixed MQTT fallback topic.
    fl.participant("edge-3", "p3", client(2.0, 20, true, Duration::ZERO))
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

    // The final model, served to proplets, is the weighted-mean chain over the aggregated updates.
    let mut sets = round_sets(&fl, "exp", 3).await?;
    for s in &mut sets {
        for p in s.iter_mut() {
            if p == "p3" {
                *p = "edge-3".into();
            }
        }
    }
    let (w, b) = expected_model(&clients, &sets);
    let (code, model) = fl
        .http("GET", &format!("/fl/{}/exp/models/3", fl.env.ns), None)
        .await?;
    assert_eq!(code, 200, "{model}");
    let got_w: Vec<f64> = model["w"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    assert!(
        got_w.len() == 2 && got_w.iter().zip(&w).all(|(a, e)| close(*a, *e)),
        "{model} vs {w:?}"
    );
    assert!(
        close(model["b"].as_f64().unwrap_or(f64::NAN), b),
        "{model} vs b={b}"
    );
    let (code, list) = fl
        .http("GET", &format!("/fl/{}/exp/models", fl.env.ns), None)
        .await?;
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
    let mut fl = Fl::start("fl-late").await?;
    let clients: Clients = [("s-1", (1.0, 5)), ("s-2", (3.0, 15)), ("s-3", (100.0, 50))].into();
    fl.participant("s-1", "s-1", client(1.0, 5, false, Duration::ZERO))
        .await?;
    fl.participant("s-2", "s-2", client(3.0, 15, false, Duration::ZERO))
        .await?;
    fl.participant(
        "s-3",
        "s-3",
        client(100.0, 50, false, Duration::from_secs(6)),
    )
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
    let (w, b) = expected_model(&clients, &[from]);
    let (code, model) = fl
        .http("GET", &format!("/fl/{}/late/models/1", fl.env.ns), None)
        .await?;
    assert_eq!(code, 200);
    assert!(
        close(model["w"][0].as_f64().unwrap_or(f64::NAN), w[0])
            && close(model["b"].as_f64().unwrap_or(f64::NAN), b),
        "{model}"
    );
    fl.finish().await
}

#[tokio::test]
async fn without_quorum_a_round_times_out_and_strangers_are_refused() -> anyhow::Result<()> {
    let mut fl = Fl::start("fl-timeout").await?;
    fl.participant("t-1", "t-1", client(1.0, 5, false, Duration::ZERO))
        .await?;
    // t-2 never comes up: its Task waits for it, the round waits for k=2, then times out.
    fl.job("quorum", &["t-1", "t-2"], 2, 2, 8).await?;
    let ns = fl.env.ns.clone();
    fl.env
        .wait_for(&fl.rounds(), "quorum-round-1", "round Running", |r| {
            r.phase() == "Running"
        })
        .await?;
    let update = |p: &str, round: &str| json!({"round_id": round, "proplet_id": p, "num_samples": 1, "update": {"w": [1.0, 1.0], "b": 1.0}});
    let post = |body: Value| fl.http("POST", &format!("/fl/{ns}/quorum/update"), Some(body));
    assert_eq!(post(update("mallory", "round-1")).await?.0, 403);
    assert_eq!(post(update("t-1", "round-9")).await?.0, 404);
    assert_eq!(
        post(json!({"round_id": "round-1", "proplet_id": "t-1"}))
            .await?
            .0,
        400
    );
    assert_eq!(
        post(
            json!({"round_id": "round-1", "proplet_id": "t-1", "num_samples": 0, "update": [1.0]})
        )
        .await?
        .0,
        400
    );
    let huge = json!({"round_id": "round-1", "proplet_id": "t-1", "num_samples": 1, "update": vec![0.5; 200_000]});
    // The server refuses it from its Content-Length, before reading it: the client may see the 413, or
    // the connection closed under a body it is still sending. Either way the refusal is counted.
    match post(huge).await {
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
        fl.http("GET", &format!("/fl/{ns}/quorum/models/7"), None)
            .await?
            .0,
        404
    );
    assert_eq!(
        fl.http(
            "POST",
            &format!("/fl/{ns}/nosuchjob/update"),
            Some(update("t-1", "round-1"))
        )
        .await?
        .0,
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
    let mut fl = Fl::start("fl-restart").await?;
    let clients: Clients = [("r-1", (1.0, 4)), ("r-2", (-2.0, 12))].into();
    fl.participant("r-1", "r-1", client(1.0, 4, false, Duration::ZERO))
        .await?;
    fl.participant(
        "r-2",
        "r-2",
        client(-2.0, 12, false, Duration::from_secs(25)),
    )
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
    let (w, b) = expected_model(&clients, &[from]);
    let (code, model) = fl
        .http("GET", &format!("/fl/{}/restart/models/1", fl.env.ns), None)
        .await?;
    assert_eq!(code, 200);
    assert!(
        close(model["w"][1].as_f64().unwrap_or(f64::NAN), w[1])
            && close(model["b"].as_f64().unwrap_or(f64::NAN), b),
        "{model}"
    );
    fl.finish().await
}
