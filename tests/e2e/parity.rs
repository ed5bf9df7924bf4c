//! What the later upstream operator promised and we make work: priority with capacity, the module registry
//! over MQTT, and proplet auto-discovery.
use std::time::Duration;

use kube::ResourceExt;
use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use serde_json::json;

use crate::support::Env;

/// The addition module of the real proplet's repository (export `add`).
const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

#[tokio::test]
async fn waiting_tasks_go_by_priority_then_age() -> anyhow::Result<()> {
    let mut env = Env::start("priority", &[]).await?;
    // Every task takes 2 s, so the four below are all waiting while the first one runs.
    let sim = env
        .proplet("busy-1", |c| c.faults.task_delay = Duration::from_secs(2))
        .await?;
    env.external_proplet("busy", "busy-1", json!({"maxConcurrentTasks": 1}))
        .await?;
    env.wait_for(&env.proplets(), "busy", "busy Running", |p| {
        p.phase() == propeller_operator::api::proplet::PropletPhase::Running
    })
    .await?;
    let task = |name: &str, priority: i32| {
        json!({"metadata": {"name": name},
               "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": [40, 2], "priority": priority}})
    };
    env.create::<Task>(task("first", 0)).await?;
    env.wait_for(&env.tasks(), "first", "first running", |t: &Task| {
        t.phase() == TaskPhase::Running
    })
    .await?;
    // Equal priorities keep creation order (within one second of creation: name order).
    for (name, priority) in [("low", 10), ("mid-a", 50), ("high", 90), ("mid-b", 50)] {
        env.create::<Task>(task(name, priority)).await?;
    }
    let low = env
        .wait_for(&env.tasks(), "low", "low queued", |t: &Task| {
            condition_reason(t, "Scheduled").as_deref() == Some("Queued")
        })
        .await?;
    assert_eq!(low.phase(), TaskPhase::Pending);
    env.wait_for(&env.tasks(), "low", "low completed", |t: &Task| {
        t.phase() == TaskPhase::Completed
    })
    .await?;
    let mut uid_to_name = std::collections::BTreeMap::new();
    for t in env.tasks().list(&Default::default()).await? {
        assert_eq!(t.phase(), TaskPhase::Completed, "{}", t.name_any());
        uid_to_name.insert(t.uid().unwrap_or_default(), t.name_any());
    }
    let order: Vec<String> = sim
        .starts_seen
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["id"].as_str().and_then(|id| uid_to_name.get(id)).cloned())
        .collect();
    assert_eq!(order, ["first", "high", "mid-a", "mid-b", "low"]);
    sim.shutdown().await;
    env.finish().await
}

/// `ADD` padded with a custom section to `size` bytes or more, so that it takes several chunks.
fn padded_add(size: usize) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let mut module = base64::engine::general_purpose::STANDARD.decode(ADD)?;
    let payload = size.saturating_sub(module.len());
    let mut section = vec![3u8];
    section.extend_from_slice(b"pad");
    section.resize(section.len() + payload, 0);
    module.push(0); // custom section id
    let mut n = section.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            module.push(byte);
            break;
        }
        module.push(byte | 0x80);
    }
    module.extend(section);
    Ok(module)
}

fn condition_reason(t: &Task, type_: &str) -> Option<String> {
    t.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?
        .reason
        .clone()
}

#[tokio::test]
async fn registry_modules_are_served_in_chunks() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut env = Env::start("registry", &["--registry-chunk-size=1024"]).await?;
    // The real proplet polls every 5 s for up to 60 s; the simulated one is told to poll every 200 ms and
    // give up after 3 s, to keep the test short.
    let sim = env
        .proplet("reg-1", |c| {
            c.registry_poll = Duration::from_millis(200);
            c.registry_timeout = Duration::from_secs(3);
        })
        .await?;
    env.external_proplet("reg", "reg-1", json!({})).await?;
    env.wait_for(&env.proplets(), "reg", "reg Running", |p| {
        p.phase() == propeller_operator::api::proplet::PropletPhase::Running
    })
    .await?;

    // A module stored by name in a ConfigMap, 3 KiB: three chunks of 1 KiB.
    let module = padded_add(3000)?;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "add-module",
                     "labels": {"propeller.propeller.abstractmachines.fr/module": "true"},
                     "annotations": {"propeller.propeller.abstractmachines.fr/module-name": "registry.example/add.wasm:1"}},
        "binaryData": {"module.wasm": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &module)},
    }))?;
    kube::Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns)
        .create(&Default::default(), &cm)
        .await?;
    let by_name = |name: &str, image: &str| {
        json!({"metadata": {"name": name},
               "spec": {"name": name, "functionName": "add", "imageUrl": image, "inputs": [40, 2],
                        "propletSelector": {"propletId": "reg"}}})
    };
    env.create::<Task>(by_name("from-configmap", "registry.example/add.wasm:1"))
        .await?;
    // A Task carrying the module inline under a registry name serves other tasks asking for that name.
    env.create::<Task>(json!({"metadata": {"name": "holder"},
        "spec": {"name": "holder", "functionName": "add", "file": ADD, "imageUrl": "registry.example/inline:2",
                 "inputs": [1, 1], "propletSelector": {"propletId": "reg"}}}))
        .await?;
    env.create::<Task>(by_name("from-task", "registry.example/inline:2"))
        .await?;
    env.create::<Task>(by_name("missing", "registry.example/nope:9"))
        .await?;
    for name in ["from-configmap", "from-task"] {
        let t = env
            .wait_for(
                &env.tasks(),
                name,
                &format!("{name} completed"),
                |t: &Task| t.phase().is_terminal(),
            )
            .await?;
        let st = t.status.clone().unwrap_or_default();
        assert_eq!(
            (t.phase(), st.results),
            (TaskPhase::Completed, Some(json!("42"))),
            "{name}: {:?}",
            st.error
        );
    }
    // The unknown module: a condition at once, then the proplet's own timeout error.
    let t = env
        .wait_for(&env.tasks(), "missing", "ModuleNotFound", |t: &Task| {
            condition_reason(t, "ModuleFound").as_deref() == Some("ModuleNotFound")
        })
        .await?;
    assert_eq!(t.phase(), TaskPhase::Running);
    let t = env
        .wait_for(&env.tasks(), "missing", "missing failed", |t: &Task| {
            t.phase() == TaskPhase::Failed
        })
        .await?;
    let error = t.status.and_then(|s| s.error).unwrap_or_default();
    assert!(
        error.contains("Timeout waiting for binary chunks"),
        "{error}"
    );
    let served = env
        .metrics()
        .registry_requests_total
        .with_label_values(&["served"])
        .get();
    assert!(served >= 2, "served {served}");
    // 3 chunks of 1 KiB for the ConfigMap's module, 1 for the inline one.
    let chunks = env
        .metrics()
        .mqtt_published_total
        .with_label_values(&["registry_chunk", "ok"])
        .get();
    assert!(chunks >= 4, "published {chunks} chunks");
    sim.shutdown().await;
    env.finish().await
}

/// A Running external Proplet: once it is Running, the operator is subscribed to the default channel.
/// Declared (and seen by the operator) before its proplet starts, so it is never discovered.
async fn anchor(env: &mut Env) -> anyhow::Result<propeller_operator::sim::SimHandle> {
    env.external_proplet("anchor", "anchor-1", json!({}))
        .await?;
    env.wait_for(&env.proplets(), "anchor", "anchor seen", |p| {
        p.status.is_some()
    })
    .await?;
    let sim = env.proplet("anchor-1", |_| {}).await?;
    env.wait_for(&env.proplets(), "anchor", "anchor Running", |p| {
        p.phase() == propeller_operator::api::proplet::PropletPhase::Running
    })
    .await?;
    Ok(sim)
}

const DISCOVERED: &str = "propeller.propeller.abstractmachines.fr/discovered=true";

#[tokio::test]
async fn a_discovered_proplet_appears_and_runs_a_task() -> anyhow::Result<()> {
    use crate::support::{CHANNEL, DOMAIN};
    use propeller_operator::api::Proplet;
    let mut env = Env::start("discover", &["--auto-discover-proplets"]).await?;
    let anchor = anchor(&mut env).await?;
    let sim = env.proplet("disc-1", |_| {}).await?;
    let p = env
        .wait_for(
            &env.proplets(),
            "discovered-disc-1",
            "the discovered Proplet Running",
            |p: &Proplet| p.phase() == propeller_operator::api::proplet::PropletPhase::Running,
        )
        .await?;
    let v = serde_json::to_value(&p)?;
    assert_eq!(
        v["metadata"]["labels"]["propeller.propeller.abstractmachines.fr/discovered"],
        "true"
    );
    let cc = &v["spec"]["connectionConfig"];
    assert_eq!(cc["domainId"], DOMAIN);
    assert_eq!(cc["channelId"], CHANNEL);
    assert_eq!(cc["clientId"], "disc-1");
    assert_eq!(
        cc["clientKeySecretRef"],
        json!({"name": "discovered-proplet-keys", "key": "disc-1"})
    );
    assert!(cc.get("clientKey").is_none());
    assert_eq!(v["status"]["metadata"]["hostname"], "proplet-sim");

    env.create::<Task>(json!({"metadata": {"name": "on-discovered"},
        "spec": {"name": "on-discovered", "functionName": "add", "file": ADD, "inputs": [40, 2],
                 "propletSelector": {"propletId": "discovered-disc-1"}}}))
        .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "on-discovered",
            "the task to end",
            |t: &Task| t.phase().is_terminal(),
        )
        .await?;
    assert_eq!(
        t.status.and_then(|s| s.results),
        Some(json!("42")),
        "the discovered proplet ran the task"
    );

    // Announcing again only refreshes the metadata.
    let again = json!({"proplet_id": "disc-1", "namespace": env.ns,
                       "metadata": {"hostname": "renamed-host", "os": "linux"}});
    env.publish_raw(
        &format!("m/{DOMAIN}/c/{CHANNEL}/control/proplet/create"),
        again.to_string().as_bytes(),
    )
    .await?;
    env.wait_for(
        &env.proplets(),
        "discovered-disc-1",
        "the new metadata",
        |p: &Proplet| {
            p.status
                .as_ref()
                .and_then(|s| s.metadata.as_ref())
                .and_then(|m| m.hostname.as_deref())
                == Some("renamed-host")
        },
    )
    .await?;
    let discovered = env
        .proplets()
        .list(&kube::api::ListParams::default().labels(DISCOVERED))
        .await?;
    assert_eq!(discovered.items.len(), 1);

    // A proplet that announced itself before its Proplet was declared: the discovered one steps aside.
    let late = env.proplet("late-1", |_| {}).await?;
    env.wait_for(
        &env.proplets(),
        "discovered-late-1",
        "late-1 discovered",
        |_| true,
    )
    .await?;
    env.external_proplet("late", "late-1", json!({})).await?;
    propeller_operator::testbed::wait_for(
        env.cluster,
        "discovered-late-1 to be deleted",
        crate::support::WAIT,
        || async {
            env.proplets()
                .get_opt("discovered-late-1")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await?;
    env.wait_for(&env.proplets(), "late", "late Running", |p: &Proplet| {
        p.phase() == propeller_operator::api::proplet::PropletPhase::Running
    })
    .await?;
    late.shutdown().await;
    sim.shutdown().await;
    anchor.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn a_discovery_flood_stops_at_the_bound() -> anyhow::Result<()> {
    use crate::support::{CHANNEL, DOMAIN, WAIT};
    let mut env = Env::start(
        "flood",
        &[
            "--auto-discover-proplets",
            "--discovery-max-proplets=3",
            "--discovery-rate=50",
        ],
    )
    .await?;
    let anchor = anchor(&mut env).await?;
    let limit_before = env
        .metrics()
        .discovery_total
        .with_label_values(&["limit"])
        .get();
    let topic = format!("m/{DOMAIN}/c/{CHANNEL}/control/proplet/create");
    for i in 0..20 {
        let msg = json!({"proplet_id": format!("fake-{i}"), "namespace": env.ns, "metadata": {}});
        env.publish_raw(&topic, msg.to_string().as_bytes()).await?;
    }
    // Every announcement past the bound is refused, with an Event on the namespace.
    propeller_operator::testbed::wait_for(env.cluster, "17 refusals", WAIT, || async {
        let refused = env
            .metrics()
            .discovery_total
            .with_label_values(&["limit"])
            .get()
            - limit_before;
        (refused >= 17).then_some(())
    })
    .await?;
    let discovered = env
        .proplets()
        .list(&kube::api::ListParams::default().labels(DISCOVERED))
        .await?;
    assert_eq!(discovered.items.len(), 3);
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(env.admin.clone(), &env.ns);
    let reasons: Vec<Option<String>> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.as_deref() == Some("DiscoveryLimitReached")),
        "{reasons:?}"
    );
    anchor.shutdown().await;
    env.finish().await
}
