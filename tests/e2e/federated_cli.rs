//! Federated learning with nothing simulated but the proplets' shell: `proplet-sim` processes (the CLI
//! binary) fetch the example FL client (examples/fl-client, a WASI command) from the operator's module
//! registry, their own data from the operator's dataset endpoint, and run the client under wasmi; the
//! operator aggregates what they post.
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use propeller_operator::api::FederatedJob;
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::testbed;
use serde_json::{Value, json};

use crate::federated::{Fl, close, dataset, fedavg_of_round, weights};
use crate::support::{CHANNEL, DOMAIN};

const MODULE: &str = "registry.example/fl-client-c.wasm:1";

/// A proplet-sim process, killed when dropped.
struct SimProcess(Child);

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_loss(w: &[f64], b: f64, x: &[[f64; 2]], y: &[f64]) -> f64 {
    let total: f64 = x
        .iter()
        .zip(y)
        .map(|(r, yi)| {
            let p = 1.0 / (1.0 + (-(b + w[0] * r[0] + w[1] * r[1])).exp());
            -(yi * (p + 1e-12).ln() + (1.0 - yi) * (1.0 - p + 1e-12).ln())
        })
        .sum();
    total / x.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_client_trains_on_each_participant_s_data_through_proplet_sim_processes()
-> anyhow::Result<()> {
    let Some(module_path) = testbed::fl_client_module("fl_cli") else {
        return Ok(());
    };
    let module = std::fs::read(module_path)?;
    let Some(mut fl) = Fl::start("fl-cli").await? else {
        return Ok(());
    };
    let ns = fl.env.ns.clone();
    let cms: Api<ConfigMap> = Api::namespaced(fl.env.admin.clone(), &ns);
    cms.create(
        &Default::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "fl-client-c",
                         "labels": {"propeller.propeller.abstractmachines.fr/module": "true"},
                         "annotations": {"propeller.propeller.abstractmachines.fr/module-name": MODULE}},
            "binaryData": {"module.wasm": base64::engine::general_purpose::STANDARD.encode(&module)},
        }))?,
    )
    .await?;
    // Two dataset ConfigMaps: one holds c1 alone, the other c2 and c3.
    let clients = ["c1", "c2", "c3"];
    let shards: Vec<_> = (0..3).map(|k| dataset(k, 30)).collect();
    let data = |k: usize| json!({"x": shards[k].0, "y": shards[k].1}).to_string();
    for (name, keys) in [("digits-a", vec![0]), ("digits-b", vec![1, 2])] {
        let entries: BTreeMap<String, String> = keys
            .iter()
            .map(|k| (format!("{}.json", clients[*k]), data(*k)))
            .collect();
        cms.create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name,
                             "labels": {"propeller.propeller.abstractmachines.fr/dataset": "digits"}},
                "data": entries,
            }))?,
        )
        .await?;
    }
    let password = "sim-secret";
    fl.env.broker.add_users(
        &clients
            .iter()
            .map(|c| (c.to_string(), password.to_string()))
            .collect::<Vec<_>>(),
    )?;
    let _sims = SimProcess(
        Command::new(env!("CARGO_BIN_EXE_proplet-sim"))
            .args(["--mqtt-address", &fl.env.broker.address()])
            .args(["--domain-id", DOMAIN, "--channel-id", CHANNEL])
            .args(["--client-ids", &clients.join(",")])
            .args(["--liveliness-interval", "1", "--registry-poll-ms", "200"])
            .args(["--namespace", &ns])
            .env("PROPLET_API_KEY", password)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    for (i, c) in clients.iter().enumerate() {
        let name = format!("edge-{}", i + 1);
        fl.env.external_proplet(&name, c, json!({})).await?;
        fl.env
            .wait_for(&fl.env.proplets(), &name, "proplet Running", |p| {
                p.phase() == PropletPhase::Running
            })
            .await?;
    }
    let starts = fl
        .listen(&format!("m/{DOMAIN}/c/{CHANNEL}/control/manager/start"))
        .await?;
    fl.env
        .create::<FederatedJob>(json!({"metadata": {"name": "exp"}, "spec": {
            "experimentId": "exp-cli", "modelRef": "fl/models/global_model_v0",
            "taskWasmImage": MODULE,
            "participants": [{"propletId": "edge-1"}, {"propletId": "edge-2"}, {"propletId": "edge-3"}],
            "hyperparams": {"epochs": 5, "lr": 0.3},
            "kOfN": 2, "timeoutSeconds": 120, "rounds": {"total": 3},
            "aggregator": {"algorithm": "fedavg"},
            "initialModel": {"w": [0.0, 0.0], "b": 0.0},
            "dataset": "digits",
        }}))
        .await?;
    let job = fl
        .env
        .wait_for(&fl.jobs(), "exp", "job Completed", |j| {
            matches!(
                j.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Completed" | "Failed")
            )
        })
        .await?;
    let status = job.status.clone().unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Completed"), "{status:?}");
    assert_eq!(status.model_version, Some(3));

    // Each round's model is the sample-weighted mean of the updates the clients posted, as stored.
    let mut models = Vec::new();
    let cap = fl.capability("exp", None).await?;
    for v in 0..=3 {
        let (code, m) = fl.http("GET", &format!("{cap}/models/{v}"), None).await?;
        assert_eq!(code, 200, "{m}");
        models.push(weights(&m));
    }
    for (n, (mw, mb)) in models.iter().enumerate().skip(1) {
        let ((w, b), from) = fedavg_of_round(&fl.env, "exp", n).await?;
        assert!(from.len() >= 2, "round {n} aggregated {from:?}");
        assert!(
            close(mw[0], w[0]) && close(mw[1], w[1]) && close(*mb, b),
            "round {n}: model {mw:?} {mb} vs FedAvg {w:?} {b}"
        );
    }
    // The global model's loss over everyone's data falls round after round.
    let all_x: Vec<[f64; 2]> = shards.iter().flat_map(|s| s.0.clone()).collect();
    let all_y: Vec<f64> = shards.iter().flat_map(|s| s.1.clone()).collect();
    let losses: Vec<f64> = models
        .iter()
        .map(|(w, b)| log_loss(w, *b, &all_x, &all_y))
        .collect();
    assert!(
        losses.windows(2).all(|p| p[1] < p[0]),
        "loss per model version: {losses:?}"
    );
    // On the wire every round start is named as the real proplet needs, and carries the data store.
    let seen = starts.lock().map(|s| s.clone()).unwrap_or_default();
    let rounds: Vec<&Value> = seen
        .iter()
        .filter(|s| s["env"]["ROUND_ID"].is_string())
        .collect();
    assert!(rounds.len() >= 6, "{seen:?}");
    let mut tokens = std::collections::BTreeSet::new();
    // Distinct tasks (a start may be sent again).
    let starts = rounds
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    for s in rounds {
        assert!(
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("fl-round-")),
            "{s}"
        );
        // Each task its own capability: coordinator, registry and data store under one per-task URL.
        let url = s["env"]["DATA_STORE_URL"].as_str().unwrap_or_default();
        assert!(url.contains(&format!("/fl/{ns}/exp/t/")), "{s}");
        assert_eq!(s["env"]["MANAGER_COORDINATOR_URL"], url, "{s}");
        tokens.insert(url.to_string());
    }
    assert_eq!(
        tokens.len(),
        starts,
        "no two round tasks share a capability (a new one every round)"
    );
    fl.finish().await
}
