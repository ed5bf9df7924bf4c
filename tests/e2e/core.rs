//! The operator core on real parts: the seed walkthrough, liveness, rescheduling, selection, deletion,
//! broadcast, garbage on the wire, invalid specs, timeouts, k8s proplets.
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::api::{Proplet, Task};
use serde_json::json;

use crate::support::{CHANNEL, DOMAIN, Env};

/// The addition module of the real proplet's repository (export `add`).
const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

fn phase(t: &Task) -> TaskPhase {
    t.phase()
}

fn condition<'a>(
    conds: &'a [propeller_operator::api::Condition],
    t: &str,
) -> Option<&'a propeller_operator::api::Condition> {
    conds.iter().find(|c| c.type_ == t)
}

async fn running_proplet(env: &Env, name: &str) -> anyhow::Result<Proplet> {
    env.wait_for(
        &env.proplets(),
        name,
        &format!("{name} Running"),
        |p: &Proplet| p.phase() == PropletPhase::Running,
    )
    .await
}

#[tokio::test]
async fn seed_walkthrough_addition_answers_42() -> anyhow::Result<()> {
    let mut env = Env::start("seed", &[]).await?;
    // The object name differs from the clientId: the start must address the clientId.
    let sim = env.proplet("edge-client-7", |_| {}).await?;
    env.external_proplet("edge-box", "edge-client-7", json!({}))
        .await?;
    let p = running_proplet(&env, "edge-box").await?;
    let st = p.status.clone().unwrap_or_default();
    assert_eq!(st.client_id.as_deref(), Some("edge-client-7"));
    assert!(st.alive);
    assert_eq!(
        condition(&st.conditions, "Ready").map(|c| c.reason.clone()),
        Some(Some("PropletReady".into()))
    );
    env.create::<Task>(json!({
        "metadata": {"name": "addition"},
        "spec": {"name": "addition", "functionName": "add", "file": ADD, "inputs": [40, "2"],
                 "propletSelector": {"propletId": "edge-box"}},
    }))
    .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "addition",
            "the task to complete",
            |t: &Task| phase(t) == TaskPhase::Completed,
        )
        .await?;
    let st = t.status.clone().unwrap_or_default();
    assert_eq!(st.results, Some(json!("42")));
    assert_eq!(st.assigned_proplet.as_deref(), Some("edge-box"));
    assert_eq!(st.assigned_client_id.as_deref(), Some("edge-client-7"));
    assert!(st.started_at.is_some() && st.finished_at.is_some());
    assert!(
        st.updated_at.is_some(),
        "updatedAt comes with every status write"
    );
    // A task that ends within seconds never needed the finalizer (its stop would come from the delete event).
    assert!(t.finalizers().is_empty(), "{:?}", t.finalizers());

    // What went over the wire is what a real proplet accepts.
    let starts = sim
        .starts_seen
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let start = starts.first().cloned().unwrap_or_default();
    assert_eq!(start["proplet_id"], "edge-client-7");
    assert_eq!(start["inputs"], json!(["40", "2"]));
    assert_eq!(start["name"], "add");
    assert_eq!(start["id"], json!(t.uid()));
    assert_eq!(start["env"]["PROPLET_ID"], "edge-client-7");
    assert_eq!(starts.len(), 1, "dispatched exactly once");

    // Discovery data and metrics reached the Proplet's status.
    let p = env
        .wait_for(
            &env.proplets(),
            "edge-box",
            "discovery metadata",
            |p: &Proplet| {
                p.status
                    .as_ref()
                    .and_then(|s| s.metadata.as_ref())
                    .is_some()
            },
        )
        .await?;
    let md = p.status.and_then(|s| s.metadata).unwrap_or_default();
    assert_eq!(md.proplet_version.as_deref(), Some("0.5.0-sim"));
    assert_eq!(md.namespace.as_deref(), Some(env.ns.as_str()));
    sim.shutdown().await;
    env.finish().await
}

/// Upstream defect (upstream-spec §7): its `taskCount` counted terminal tasks too, so it never fell.
#[tokio::test]
async fn a_proplets_task_count_returns_to_zero_when_its_task_ends() -> anyhow::Result<()> {
    let mut env = Env::start("taskcount", &[]).await?;
    let sim = env
        // Longer than the 10 s a changed taskCount may wait to be written (writes are coalesced).
        .proplet("busy-1", |c| c.faults.task_delay = Duration::from_secs(15))
        .await?;
    env.external_proplet("busy", "busy-1", json!({})).await?;
    running_proplet(&env, "busy").await?;
    env.create::<Task>(json!({
        "metadata": {"name": "slow-addition"},
        "spec": {"name": "slow-addition", "functionName": "add", "file": ADD, "inputs": [40, 2],
                 "propletSelector": {"propletId": "busy"}},
    }))
    .await?;
    let count = |p: &Proplet| p.status.as_ref().map_or(-1, |s| s.task_count);
    env.wait_for(&env.proplets(), "busy", "taskCount 1 while running", |p| {
        count(p) == 1
    })
    .await?;
    env.wait_for(
        &env.tasks(),
        "slow-addition",
        "the task to complete",
        |t: &Task| phase(t) == TaskPhase::Completed,
    )
    .await?;
    env.wait_for(&env.proplets(), "busy", "taskCount back to 0", |p| {
        count(p) == 0
    })
    .await?;
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn proplet_goes_offline_and_comes_back() -> anyhow::Result<()> {
    let mut env = Env::start("liveness", &[]).await?;
    env.external_proplet("p1", "client-1", json!({})).await?;
    let p = env.proplets().get("p1").await?;
    assert_ne!(p.phase(), PropletPhase::Running, "no heartbeat yet");
    let sim = env.proplet("client-1", |_| {}).await?;
    running_proplet(&env, "p1").await?;
    sim.set_heartbeats(false);
    let p = env
        .wait_for(&env.proplets(), "p1", "p1 Offline", |p: &Proplet| {
            p.phase() == PropletPhase::Offline
        })
        .await?;
    let st = p.status.unwrap_or_default();
    assert!(!st.alive);
    assert_eq!(
        condition(&st.conditions, "Connected").map(|c| c.reason.clone()),
        Some(Some("PropletOffline".into()))
    );
    sim.set_heartbeats(true);
    running_proplet(&env, "p1").await?;
    // A proplet that says it is offline is Offline at once.
    sim.set_heartbeats(false);
    env.publish_raw(
        &format!("m/{DOMAIN}/c/{CHANNEL}/control/proplet/alive"),
        br#"{"proplet_id":"client-1","status":"offline","namespace":"x"}"#,
    )
    .await?;
    let started = std::time::Instant::now();
    env.wait_for(
        &env.proplets(),
        "p1",
        "p1 Offline at once",
        |p: &Proplet| p.phase() == PropletPhase::Offline,
    )
    .await?;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "offline message acts before the threshold"
    );
    sim.shutdown().await;
    env.finish().await
}

/// Heartbeats are coalesced, but `lastSeen` still moves on every `--status-refresh` (5 s here) while a
/// proplet stays Running: the heartbeat that finds it due asks for the write.
#[tokio::test]
async fn a_running_proplets_last_seen_is_refreshed_without_a_transition() -> anyhow::Result<()> {
    let mut env = Env::start("refresh", &[]).await?;
    env.external_proplet("p1", "client-1", json!({})).await?;
    let sim = env.proplet("client-1", |_| {}).await?;
    running_proplet(&env, "p1").await?;
    let last_seen = |p: &Proplet| p.status.as_ref().and_then(|s| s.last_seen.clone());
    let mut seen = last_seen(&env.proplets().get("p1").await?);
    for refresh in 1..=2 {
        let before = seen.clone();
        let p = env
            .wait_for(
                &env.proplets(),
                "p1",
                &format!("lastSeen refreshed ({refresh})"),
                |p: &Proplet| last_seen(p).is_some() && last_seen(p) != before,
            )
            .await?;
        assert_eq!(p.phase(), PropletPhase::Running);
        seen = last_seen(&p);
    }
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn task_of_a_dead_proplet_is_interrupted_and_rescheduled() -> anyhow::Result<()> {
    let mut env = Env::start("resched", &["--task-timeout", "5m"]).await?;
    let slow = env
        .proplet("slow", |c| c.faults.task_delay = Duration::from_secs(600))
        .await?;
    env.external_proplet("a-slow", "slow", json!({})).await?;
    running_proplet(&env, "a-slow").await?;
    env.create::<Task>(json!({
        "metadata": {"name": "t1"},
        "spec": {"name": "t1", "functionName": "add", "file": ADD, "inputs": ["1", "2"]},
    }))
    .await?;
    env.wait_for(&env.tasks(), "t1", "t1 running on a-slow", |t: &Task| {
        phase(t) == TaskPhase::Running
            && t.status
                .as_ref()
                .and_then(|s| s.assigned_proplet.as_deref())
                == Some("a-slow")
    })
    .await?;
    let fast = env.proplet("fast", |_| {}).await?;
    env.external_proplet("b-fast", "fast", json!({})).await?;
    running_proplet(&env, "b-fast").await?;
    slow.kill();
    let t = env
        .wait_for(&env.tasks(), "t1", "t1 completed elsewhere", |t: &Task| {
            phase(t) == TaskPhase::Completed
        })
        .await?;
    let st = t.status.unwrap_or_default();
    assert_eq!(st.assigned_proplet.as_deref(), Some("b-fast"));
    assert_eq!(st.attempts, Some(2));
    assert_eq!(st.results, Some(json!("3")));
    fast.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn selection_rules_pick_the_right_proplet() -> anyhow::Result<()> {
    let mut env = Env::start("select", &[]).await?;
    let s1 = env.proplet("c-gpu", |_| {}).await?;
    let s2 = env.proplet("c-cpu", |_| {}).await?;
    env.external_proplet(
        "gpu",
        "c-gpu",
        json!({"external": {"deviceType": "jetson", "capabilities": ["wasm", "gpu"]}}),
    )
    .await?;
    env.external_proplet("cpu", "c-cpu", json!({})).await?;
    running_proplet(&env, "gpu").await?;
    running_proplet(&env, "cpu").await?;
    for (name, selector, want) in [
        ("by-client-id", json!({"propletId": "c-cpu"}), "cpu"),
        ("by-device", json!({"matchDeviceTypes": ["jetson"]}), "gpu"),
        (
            "by-capability",
            json!({"matchCapabilities": ["gpu"]}),
            "gpu",
        ),
    ] {
        env.create::<Task>(json!({"metadata": {"name": name},
            "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": ["1", "1"], "propletSelector": selector}}))
            .await?;
        let t = env
            .wait_for(&env.tasks(), name, "completion", |t: &Task| {
                phase(t) == TaskPhase::Completed
            })
            .await?;
        assert_eq!(
            t.status.and_then(|s| s.assigned_proplet).as_deref(),
            Some(want),
            "{name}"
        );
    }
    // Nothing matches: stays pending and says why.
    env.create::<Task>(json!({"metadata": {"name": "no-match"},
        "spec": {"name": "x", "file": ADD, "propletSelector": {"matchCapabilities": ["tpu"]}}}))
        .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "no-match",
            "a NoProplet condition",
            |t: &Task| {
                t.status
                    .as_ref()
                    .and_then(|s| condition(&s.conditions, "Scheduled"))
                    .is_some_and(|c| c.reason.as_deref() == Some("NoProplet"))
            },
        )
        .await?;
    assert_eq!(phase(&t), TaskPhase::Pending);
    let msg = t
        .status
        .and_then(|s| condition(&s.conditions, "Scheduled").and_then(|c| c.message.clone()))
        .unwrap_or_default();
    assert!(msg.contains("tpu"), "{msg}");
    s1.shutdown().await;
    s2.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn deleting_a_running_task_sends_stop() -> anyhow::Result<()> {
    let mut env = Env::start("delete", &[]).await?;
    let sim = env
        .proplet("c1", |c| c.faults.task_delay = Duration::from_secs(600))
        .await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    let t = env
        .create::<Task>(json!({"metadata": {"name": "long"},
            "spec": {"name": "long", "functionName": "add", "file": ADD, "inputs": ["1", "1"]}}))
        .await?;
    env.wait_for(&env.tasks(), "long", "running", |t: &Task| {
        phase(t) == TaskPhase::Running
    })
    .await?;
    env.tasks().delete("long", &DeleteParams::default()).await?;
    propeller_operator::testbed::wait_for(
        env.cluster,
        "the task to be gone",
        crate::support::WAIT,
        || async { matches!(env.tasks().get_opt("long").await, Ok(None)).then_some(()) },
    )
    .await?;
    let uid = t.uid().unwrap_or_default();
    propeller_operator::testbed::eventually(
        "the stop to reach the proplet",
        Duration::from_secs(10),
        || async {
            sim.stops_seen
                .lock()
                .ok()
                .filter(|s| s.contains(&uid))
                .map(|_| ())
        },
    )
    .await?;
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn broadcast_records_every_proplets_result() -> anyhow::Result<()> {
    let mut env = Env::start("bcast", &[]).await?;
    let a = env.proplet("ca", |_| {}).await?;
    let b = env.proplet("cb", |_| {}).await?;
    env.external_proplet("pa", "ca", json!({})).await?;
    env.external_proplet("pb", "cb", json!({})).await?;
    running_proplet(&env, "pa").await?;
    running_proplet(&env, "pb").await?;
    env.create::<Task>(json!({"metadata": {"name": "everyone"},
        "spec": {"name": "everyone", "functionName": "add", "file": ADD, "inputs": ["5", "6"], "broadcast": true}}))
        .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "everyone",
            "broadcast completion",
            |t: &Task| phase(t) == TaskPhase::Completed,
        )
        .await?;
    assert_eq!(
        t.status.and_then(|s| s.results),
        Some(json!({"ca": "11", "cb": "11"}))
    );
    a.shutdown().await;
    b.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn garbage_on_every_topic_changes_nothing() -> anyhow::Result<()> {
    let mut env = Env::start("garbage", &[]).await?;
    let sim = env.proplet("c1", |_| {}).await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    for suffix in ["create", "alive", "metrics", "results", "task_metrics"] {
        let topic = format!("m/{DOMAIN}/c/{CHANNEL}/control/proplet/{suffix}");
        for payload in [
            &b"\xff\xfe not json"[..],
            b"[]",
            b"{}",
            br#"{"proplet_id":"","task_id":""}"#,
            br#"{"proplet_id":"nobody","task_id":"no-such-task","results":"1"}"#,
        ] {
            env.publish_raw(&topic, payload).await?;
        }
    }
    env.create::<Task>(json!({"metadata": {"name": "after-garbage"},
        "spec": {"name": "x", "functionName": "add", "file": ADD, "inputs": ["2", "2"]}}))
        .await?;
    let t = env
        .wait_for(&env.tasks(), "after-garbage", "completion", |t: &Task| {
            phase(t) == TaskPhase::Completed
        })
        .await?;
    assert_eq!(t.status.and_then(|s| s.results), Some(json!("4")));
    let p = env.proplets().get("p1").await?;
    assert_eq!(p.phase(), PropletPhase::Running);
    let metrics = env.metrics().render();
    assert!(
        metrics.contains(r#"outcome="malformed""#),
        "malformed payloads are counted"
    );
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn invalid_specs_get_a_condition() -> anyhow::Result<()> {
    let env = Env::start("invalid", &[]).await?;
    // No module at all: a real proplet would drop it silently.
    env.create::<Task>(json!({"metadata": {"name": "no-module"}, "spec": {"name": "x"}}))
        .await?;
    // An object as an input.
    env.create::<Task>(json!({"metadata": {"name": "bad-input"}, "spec": {"name": "x", "file": ADD, "inputs": [{"a": 1}]}}))
        .await?;
    // Both key sources (the CEL rule is ignored by a 1.20 API server; the controller checks it too).
    env.external_proplet("two-keys", "c2", json!({})).await?;
    let mut p = env.proplets().get("two-keys").await?;
    p.spec.connection_config.client_key_secret_ref =
        Some(propeller_operator::api::proplet::SecretKeyRef {
            name: Some("s".into()),
            key: "k".into(),
            optional: None,
        });
    p.metadata.managed_fields = None;
    let replaced = env
        .proplets()
        .replace("two-keys", &Default::default(), &p)
        .await;
    if replaced.is_ok() {
        let p = env
            .wait_for(&env.proplets(), "two-keys", "InvalidSpec", |p: &Proplet| {
                p.status
                    .as_ref()
                    .and_then(|s| condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.reason.as_deref() == Some("InvalidSpec"))
            })
            .await?;
        let msg = p
            .status
            .and_then(|s| condition(&s.conditions, "Ready").and_then(|c| c.message.clone()))
            .unwrap_or_default();
        assert!(msg.contains("mutually exclusive"), "{msg}");
    } else {
        eprintln!("the API server enforced the CEL rule itself: {replaced:?}");
    }
    for (name, needle) in [
        ("no-module", "spec.file or spec.imageUrl"),
        ("bad-input", "spec.inputs[0]"),
    ] {
        let t = env
            .wait_for(&env.tasks(), name, "InvalidSpec", |t: &Task| {
                t.status
                    .as_ref()
                    .and_then(|s| condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.reason.as_deref() == Some("InvalidSpec"))
            })
            .await?;
        let msg = t
            .status
            .and_then(|s| condition(&s.conditions, "Ready").and_then(|c| c.message.clone()))
            .unwrap_or_default();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.admin.clone(), &env.ns);
    let evs = events.list(&Default::default()).await?;
    assert!(
        evs.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec")),
        "an Event accompanies the condition"
    );
    env.finish().await
}

#[tokio::test]
async fn a_task_without_an_answer_times_out() -> anyhow::Result<()> {
    let mut env = Env::start("timeout", &[]).await?;
    let sim = env
        .proplet("c1", |c| c.faults.task_delay = Duration::from_secs(600))
        .await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    env.create::<Task>(json!({"metadata": {"name": "stuck"},
        "spec": {"name": "x", "functionName": "add", "file": ADD, "inputs": ["1", "1"], "timeoutSeconds": 2}}))
        .await?;
    let t = env
        .wait_for(&env.tasks(), "stuck", "a timeout", |t: &Task| {
            phase(t) == TaskPhase::Failed
        })
        .await?;
    let st = t.status.unwrap_or_default();
    assert_eq!(
        condition(&st.conditions, "Completed")
            .and_then(|c| c.reason.clone())
            .as_deref(),
        Some("Timeout")
    );
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn a_failing_task_records_the_proplets_error() -> anyhow::Result<()> {
    let mut env = Env::start("fail", &[]).await?;
    let sim = env.proplet("c1", |_| {}).await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    env.create::<Task>(json!({"metadata": {"name": "mul"},
        "spec": {"name": "x", "functionName": "mul", "file": ADD, "inputs": ["1"]}}))
        .await?;
    let t = env
        .wait_for(&env.tasks(), "mul", "failure", |t: &Task| {
            phase(t) == TaskPhase::Failed
        })
        .await?;
    let err = t.status.and_then(|s| s.error).unwrap_or_default();
    assert!(
        err.contains("arguments") || err.contains("not found"),
        "{err}"
    );
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn k8s_proplet_gets_a_deployment_with_the_right_env() -> anyhow::Result<()> {
    let env = Env::start("k8s", &[]).await?;
    env.create::<Proplet>(json!({
        "metadata": {"name": "worker"},
        "spec": {"type": "k8s",
                 "k8s": {"image": "ghcr.io/absmach/propeller/proplet:latest", "replicas": 2,
                         "env": {"livelinessInterval": "15s", "externalWasmRuntime": "", "httpEnabled": true}},
                 "resources": {"cpu": "50m", "memory": "128Mi"},
                 "connectionConfig": {"tenantId": "t-1", "channelId": "ch-1", "entityId": "worker-1",
                                      "apiKeySecretRef": {"name": "worker-key", "key": "key"},
                                      "mqttAddress": "tcp://mqtt:1883", "mqttTimeout": "1m"}},
    }))
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    let d = env
        .wait_for(&deployments, "worker-proplet", "the Deployment", |_| true)
        .await?;
    let spec = d.spec.clone().unwrap_or_default();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        d.owner_references().first().map(|o| o.name.as_str()),
        Some("worker")
    );
    let c = spec.template.spec.unwrap_or_default().containers.remove(0);
    let env_of = |n: &str| c.env.iter().flatten().find(|e| e.name == n).cloned();
    let value = |n: &str| env_of(n).and_then(|e| e.value);
    assert_eq!(value("PROPLET_DOMAIN_ID").as_deref(), Some("t-1"));
    assert_eq!(value("PROPLET_TENANT_ID").as_deref(), Some("t-1"));
    assert_eq!(value("PROPLET_CLIENT_ID").as_deref(), Some("worker-1"));
    assert_eq!(value("PROPLET_ENTITY_ID").as_deref(), Some("worker-1"));
    assert_eq!(
        value("PROPLET_MQTT_TIMEOUT").as_deref(),
        Some("60"),
        "whole seconds, as the proplet parses"
    );
    assert_eq!(value("PROPLET_LIVELINESS_INTERVAL").as_deref(), Some("15"));
    // An explicit empty value is kept (it forces the built-in runtime); the API server omits empty values.
    let runtime =
        env_of("PROPLET_EXTERNAL_WASM_RUNTIME").expect("PROPLET_EXTERNAL_WASM_RUNTIME is set");
    assert_eq!(runtime.value.unwrap_or_default(), "");
    assert_eq!(value("PROPLET_HTTP_ENABLED").as_deref(), Some("true"));
    assert_eq!(
        value("PROPLET_MANAGER_K8S_NAMESPACE").as_deref(),
        Some(env.ns.as_str())
    );
    for key in ["PROPLET_CLIENT_KEY", "PROPLET_API_KEY"] {
        let sel = env_of(key)
            .and_then(|e| e.value_from)
            .and_then(|v| v.secret_key_ref);
        assert_eq!(
            sel.map(|s| (s.name, s.key)),
            Some(("worker-key".to_string(), "key".to_string())),
            "{key}"
        );
    }
    let requests = c.resources.and_then(|r| r.requests).unwrap_or_default();
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("50m"));

    // A literal key goes to an owned Secret, never into the Deployment in clear.
    env.create::<Proplet>(json!({
        "metadata": {"name": "literal"},
        "spec": {"type": "k8s", "k8s": {"image": "img"},
                 "connectionConfig": {"domainId": "d", "channelId": "c", "clientId": "lit-1", "clientKey": "s3cret",
                                      "mqttAddress": "tcp://mqtt:1883"}},
    }))
    .await?;
    let d = env
        .wait_for(&deployments, "literal-proplet", "the Deployment", |_| true)
        .await?;
    let text = serde_json::to_string(&d)?;
    assert!(!text.contains("s3cret"), "the key is not in the Deployment");
    // Without a kubelet nothing heartbeats: the proplet stays Initializing and the Deployment is not ready.
    let p = env.proplets().get("worker").await?;
    assert_ne!(p.phase(), PropletPhase::Running);
    env.finish().await
}

#[tokio::test]
async fn a_restarted_operator_publishes_an_assigned_task_once() -> anyhow::Result<()> {
    let mut env = Env::start("restart", &[]).await?;
    let sim = env.proplet("c1", |_| {}).await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    env.stop_operator().await?;
    // The state an operator leaves when it dies after persisting the assignment, before publishing.
    env.create::<Task>(json!({"metadata": {"name": "crash"},
        "spec": {"name": "x", "functionName": "add", "file": ADD, "inputs": ["20", "22"]}}))
        .await?;
    let status = json!({"apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
        "status": {"phase": "scheduled", "assignedProplet": "p1", "assignedClientId": "c1", "attempts": 1, "conditions": []}});
    env.tasks()
        .patch_status(
            "crash",
            &kube::api::PatchParams::apply("e2e-crash").force(),
            &kube::api::Patch::Apply(&status),
        )
        .await?;
    env.resume_operator().await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "crash",
            "completion after the restart",
            |t: &Task| phase(t) == TaskPhase::Completed,
        )
        .await?;
    assert_eq!(t.status.and_then(|s| s.results), Some(json!("42")));
    let starts = sim
        .starts_seen
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    assert_eq!(
        starts.len(),
        1,
        "published exactly once after the restart: {starts:?}"
    );
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn a_broker_restart_is_survived() -> anyhow::Result<()> {
    let mut env = Env::start("broker-restart", &[]).await?;
    let sim = env.proplet("c1", |_| {}).await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    env.broker.restart()?;
    // Operator and proplet reconnect; the operator's subscriptions are back (clean session).
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.create::<Task>(json!({"metadata": {"name": "after-restart"},
        "spec": {"name": "x", "functionName": "add", "file": ADD, "inputs": ["1", "41"]}}))
        .await?;
    let t = env
        .wait_for(&env.tasks(), "after-restart", "completion", |t: &Task| {
            phase(t) == TaskPhase::Completed
        })
        .await?;
    assert_eq!(t.status.and_then(|s| s.results), Some(json!("42")));
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn task_metrics_reach_the_status_while_running() -> anyhow::Result<()> {
    let mut env = Env::start("task-metrics", &[]).await?;
    let sim = env
        .proplet("c1", |c| c.faults.task_delay = Duration::from_secs(8))
        .await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    env.create::<Task>(json!({"metadata": {"name": "watched"},
        "spec": {"name": "x", "functionName": "add", "file": ADD, "inputs": ["1", "1"],
                 "monitoringProfile": {"enabled": true, "exportToMqtt": true, "interval": "1s", "collectCpu": true}}}))
        .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "watched",
            "task metrics in status",
            |t: &Task| {
                t.status
                    .as_ref()
                    .and_then(|s| s.latest_metrics.as_ref())
                    .is_some()
            },
        )
        .await?;
    let st = t.status.unwrap_or_default();
    assert_eq!(
        st.phase,
        Some(TaskPhase::Running),
        "written while the task runs"
    );
    let m = st.latest_metrics.unwrap_or_default();
    assert_eq!(m.cpu_milli_percent, Some(3500));
    assert_eq!(m.memory_bytes, Some(52428800));
    // The start carried a complete monitoring profile with a whole-second interval.
    let starts = sim
        .starts_seen
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let profile = starts
        .first()
        .map(|s| s["monitoring_profile"].clone())
        .unwrap_or_default();
    assert_eq!(profile["interval"], 1);
    assert_eq!(profile["collect_memory"], false);
    env.wait_for(&env.tasks(), "watched", "completion", |t: &Task| {
        phase(t) == TaskPhase::Completed
    })
    .await?;
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn the_operator_reaches_the_broker_over_tls() -> anyhow::Result<()> {
    let mut env = Env::start_tls("tls").await?;
    let sim = env.proplet("c1", |_| {}).await?;
    env.external_proplet("p1", "c1", json!({})).await?;
    running_proplet(&env, "p1").await?;
    env.create::<Task>(json!({"metadata": {"name": "over-tls"},
        "spec": {"name": "x", "functionName": "add", "file": ADD, "inputs": ["21", "21"]}}))
        .await?;
    let t = env
        .wait_for(&env.tasks(), "over-tls", "completion", |t: &Task| {
            phase(t) == TaskPhase::Completed
        })
        .await?;
    assert_eq!(t.status.and_then(|s| s.results), Some(json!("42")));
    let log = std::fs::read_to_string(env.broker.dir.join("mosquitto.log"))?;
    let tls_port = env.broker.tls.as_ref().map(|t| t.port).unwrap_or_default();
    assert!(
        log.contains(&format!("port {tls_port}")),
        "the operator connected on the TLS listener"
    );
    sim.shutdown().await;
    env.finish().await
}
