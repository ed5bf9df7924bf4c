//! The federated-learning part of `make chaos`: an experiment over a few of the chaos proplets (spread over
//! the shards), running the example FL client, while the faults strike. Its participants reach the FL
//! coordinator through a balancer that forwards to whichever replica answers (any replica serves a round
//! task's capability URL), as a Service would. Judged at the end: the job completed every round.
use std::net::SocketAddr;

use base64::Engine as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};
use propeller_operator::api::FederatedJob;
use propeller_operator::testbed;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MODULE: &str = "registry.example/fl-client.wasm:1";
const DATASET: &str = "chaos-fl";
pub const JOB: &str = "chaos-fl";
const ROUNDS: i64 = 8;

/// Where participants reach the FL coordinator: whichever of `backends` (the replicas) accepts.
pub async fn balancer(backends: Vec<SocketAddr>) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let at = listener.local_addr()?;
    Ok((at, testbed::netns::forward(listener, backends)))
}

/// `n` rows of the example client's problem as seen from region `k`, as JSON.
fn dataset(k: usize, n: usize) -> Value {
    let (x, y) = testbed::fl_dataset(k, n);
    json!({"x": x, "y": y})
}

/// Creates the module, the participants' data and the job (k of n: 4 of `participants`). `false` (said
/// loudly) when the example client is not built.
pub async fn start(client: &Client, ns: &str, participants: &[String]) -> anyhow::Result<bool> {
    let Some(module) = testbed::fl_client_module("chaos: the FL experiment") else {
        return Ok(false);
    };
    let module = base64::engine::general_purpose::STANDARD.encode(std::fs::read(module)?);
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let pp = PostParams::default();
    cms.create(
        &pp,
        &serde_json::from_value(json!({
            "metadata": {"name": "fl-client",
                         "labels": {"propeller.propeller.abstractmachines.fr/module": "true"},
                         "annotations": {"propeller.propeller.abstractmachines.fr/module-name": MODULE}},
            "binaryData": {"module.wasm": module},
        }))?,
    )
    .await?;
    let data: serde_json::Map<String, Value> = participants
        .iter()
        .enumerate()
        .map(|(k, id)| {
            (
                format!("{id}.json"),
                Value::String(dataset(k, 40).to_string()),
            )
        })
        .collect();
    cms.create(
        &pp,
        &serde_json::from_value(json!({
            "metadata": {"name": "chaos-fl-data",
                         "labels": {"propeller.propeller.abstractmachines.fr/dataset": DATASET}},
            "data": data,
        }))?,
    )
    .await?;
    let job: FederatedJob = serde_json::from_value(json!({
        "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "FederatedJob",
        "metadata": {"name": JOB},
        "spec": {
            "experimentId": JOB, "modelRef": "fl/models/chaos", "taskWasmImage": MODULE,
            "participants": participants.iter().map(|p| json!({"propletId": p})).collect::<Vec<_>>(),
            "hyperparams": {"epochs": 1, "lr": 0.1},
            "kOfN": 4.min(participants.len()), "timeoutSeconds": 120, "rounds": {"total": ROUNDS},
            "aggregator": {"algorithm": "fedavg"},
            "initialModel": {"w": [0.0, 0.0], "b": 0.0},
            "dataset": DATASET,
        }
    }))?;
    Api::<FederatedJob>::namespaced(client.clone(), ns)
        .create(&pp, &job)
        .await?;
    Ok(true)
}

/// Whether the job is over (completed or failed).
pub async fn over(client: &Client, ns: &str) -> bool {
    let job = Api::<FederatedJob>::namespaced(client.clone(), ns)
        .get_opt(JOB)
        .await;
    let phase = job.ok().flatten().and_then(|j| j.status?.phase);
    matches!(phase.as_deref(), Some("Completed" | "Failed"))
}

/// The job's outcome: phase, rounds completed of [`ROUNDS`], and when each round completed.
pub async fn judge(client: &Client, ns: &str) -> anyhow::Result<(bool, Value)> {
    let job = Api::<FederatedJob>::namespaced(client.clone(), ns)
        .get(JOB)
        .await?;
    let status = job.status.unwrap_or_default();
    let done = status.completed_rounds.unwrap_or(0);
    let completed = status.phase.as_deref() == Some("Completed") && done == ROUNDS;
    let rounds: Vec<Value> = status
        .round_metrics
        .iter()
        .map(|r| {
            json!({"round": r.round, "updates": r.updates,
                   "completed_at": r.completed_at.as_ref().map(|t| t.0.to_string()),
                   "loss": r.metrics.get("loss")})
        })
        .collect();
    Ok((
        completed,
        json!({"phase": status.phase, "rounds_completed": done, "rounds": ROUNDS,
               "completed_every_round": completed, "round_metrics": rounds}),
    ))
}
