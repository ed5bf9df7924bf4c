//! Proves the test bed is real: CRDs and custom resources, watches, server-side status apply, Leases,
//! garbage collection by kube-controller-manager, mosquitto with authentication, crash reporting.
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, CustomResource, CustomResourceExt, ResourceExt};
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use propeller_operator::testbed::{self, eventually, shared_cluster, wait_for};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "testbed.propeller.example",
    version = "v1",
    kind = "Gadget",
    namespaced
)]
#[kube(status = "GadgetStatus")]
struct GadgetSpec {
    size: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
struct GadgetStatus {
    phase: String,
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn crd_create_watch_and_status_apply() -> anyhow::Result<()> {
    let cluster = shared_cluster();
    let client = cluster.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "gadgets.testbed.propeller.example",
        &PatchParams::apply("testbed-smoke").force(),
        &Patch::Apply(Gadget::crd()),
    )
    .await?;
    wait_for(
        cluster,
        "the Gadget CRD to be established",
        WAIT,
        || async {
            let crd = crds.get("gadgets.testbed.propeller.example").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        },
    )
    .await?;

    let ns = cluster.namespace(&client, "smoke-crd").await?;
    let gadgets: Api<Gadget> = Api::namespaced(client.clone(), &ns);
    let stream = watcher(gadgets.clone(), watcher::Config::default()).applied_objects();
    let mut stream = Box::pin(stream);

    gadgets
        .create(
            &PostParams::default(),
            &Gadget::new("g1", GadgetSpec { size: 3 }),
        )
        .await?;
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(g) = stream.try_next().await? {
            if g.name_any() == "g1" {
                return anyhow::Ok(g);
            }
        }
        anyhow::bail!("watch ended")
    })
    .await??;
    assert_eq!(seen.spec.size, 3);

    let status = serde_json::json!({
        "apiVersion": "testbed.propeller.example/v1", "kind": "Gadget",
        "status": {"phase": "Ready"}
    });
    gadgets
        .patch_status(
            "g1",
            &PatchParams::apply("testbed-smoke").force(),
            &Patch::Apply(&status),
        )
        .await?;
    let updated = tokio::time::timeout(WAIT, async {
        while let Some(g) = stream.try_next().await? {
            if g.status.as_ref().is_some_and(|s| s.phase == "Ready") {
                return anyhow::Ok(g);
            }
        }
        anyhow::bail!("watch ended")
    })
    .await??;
    assert_eq!(updated.status.map(|s| s.phase).as_deref(), Some("Ready"));
    cluster.delete_namespace(&client, &ns).await;
    Ok(())
}

#[tokio::test]
async fn lease_is_acquired_by_one_holder_only() -> anyhow::Result<()> {
    let cluster = shared_cluster();
    let client = cluster.client().await?;
    let ns = cluster.namespace(&client, "smoke-lease").await?;
    let lock = |holder: &str| {
        LeaseLock::new(
            client.clone(),
            &ns,
            LeaseLockParams {
                lease_name: "smoke".into(),
                holder_id: holder.into(),
                lease_ttl: Duration::from_secs(15),
            },
        )
    };
    let (a, b) = (lock("replica-a"), lock("replica-b"));
    assert!(matches!(
        a.try_acquire_or_renew().await?,
        LeaseLockResult::Acquired(_)
    ));
    assert!(matches!(
        b.try_acquire_or_renew().await?,
        LeaseLockResult::NotAcquired(_)
    ));
    a.step_down().await?;
    // Stepping down shortens the lease to a second; the other replica takes over once it has run out.
    wait_for(
        cluster,
        "replica-b to take the released lease",
        Duration::from_secs(10),
        || async {
            matches!(
                b.try_acquire_or_renew().await,
                Ok(LeaseLockResult::Acquired(_))
            )
            .then_some(())
        },
    )
    .await?;
    assert!(matches!(
        a.try_acquire_or_renew().await?,
        LeaseLockResult::NotAcquired(_)
    ));
    cluster.delete_namespace(&client, &ns).await;
    Ok(())
}

#[tokio::test]
async fn owned_object_is_garbage_collected() -> anyhow::Result<()> {
    let cluster = shared_cluster();
    let client = cluster.client().await?;
    let ns = cluster.namespace(&client, "smoke-gc").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}}))?;
    let owner = cms.create(&PostParams::default(), &owner).await?;
    let owned: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid, "controller": true, "blockOwnerDeletion": true
        }]}
    }))?;
    cms.create(&PostParams::default(), &owned).await?;
    cms.delete("owner", &Default::default()).await?;
    wait_for(
        cluster,
        "kube-controller-manager to collect the owned ConfigMap",
        WAIT,
        || async { matches!(cms.get_opt("owned").await, Ok(None)).then_some(()) },
    )
    .await?;
    cluster.delete_namespace(&client, &ns).await;
    Ok(())
}

/// Connects to the broker and returns the outcome of the CONNECT.
async fn connect(
    address_port: u16,
    user: &str,
    password: &str,
) -> anyhow::Result<(AsyncClient, rumqttc::EventLoop)> {
    let mut opts = MqttOptions::new(
        format!("smoke-{}", testbed::process::random_hex(4)?),
        "127.0.0.1",
        address_port,
    );
    opts.set_credentials(user, password);
    let (client, mut el) = AsyncClient::new(opts, 100);
    let ack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await?;
    match ack {
        Ok(ConnectReturnCode::Success) => Ok((client, el)),
        Ok(code) => anyhow::bail!("connection refused: {code:?}"),
        Err(e) => anyhow::bail!("connection failed: {e}"),
    }
}

#[tokio::test]
async fn mosquitto_authenticates_and_routes() -> anyhow::Result<()> {
    let mut broker = testbed::start_broker()?;
    let (sub, mut sub_el) = connect(broker.port, &broker.username, &broker.password).await?;
    sub.subscribe("m/d/c/ch/#", QoS::AtLeastOnce).await?;
    let (publ, mut pub_el) = connect(broker.port, &broker.username, &broker.password).await?;
    tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });

    let received = tokio::time::timeout(Duration::from_secs(10), async {
        let mut published = false;
        loop {
            match sub_el.poll().await? {
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    publ.publish(
                        "m/d/c/ch/control/proplet/alive",
                        QoS::AtLeastOnce,
                        false,
                        "hello",
                    )
                    .await?;
                    published = true;
                }
                Event::Incoming(Packet::Publish(p)) => return anyhow::Ok(p),
                _ => {}
            }
        }
    })
    .await??;
    assert_eq!(received.topic, "m/d/c/ch/control/proplet/alive");
    assert_eq!(&received.payload[..], b"hello");

    let refused = connect(broker.port, &broker.username, "wrong-password").await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("refused") || err.contains("NotAuthorized") || err.contains("BadUserName"),
        "a wrong password must be refused, got: {err:?}"
    );

    // A second user added while running works at once.
    broker.add_user("proplet-1", "key-1")?;
    connect(broker.port, "proplet-1", "key-1").await?;

    // Restart in the middle: the same port serves again.
    broker.restart()?;
    connect(broker.port, &broker.username, &broker.password).await?;
    broker.check()?;
    Ok(())
}

#[tokio::test]
async fn crashed_broker_is_reported_with_its_log() -> anyhow::Result<()> {
    let broker = testbed::start_broker()?;
    broker.check()?;
    let pid = broker
        .pid()
        .ok_or_else(|| anyhow::anyhow!("broker has no process"))?;
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let err = eventually("the crash to show", Duration::from_secs(10), || async {
        broker.check().err()
    })
    .await?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains("mosquitto") && msg.contains("last log lines"),
        "{msg}"
    );
    assert!(
        msg.contains("mosquitto version"),
        "the log tail is included: {msg}"
    );
    Ok(())
}

#[tokio::test]
async fn independent_clusters_and_crash_reporting() -> anyhow::Result<()> {
    let clusters = testbed::start_clusters(3)?;
    let names: Vec<_> = clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["hub", "member-1", "member-2"]);
    let hub = clusters[0].client().await?;
    let member = clusters[1].client().await?;
    let ns = clusters[0].namespace(&hub, "only-on-hub").await?;
    let on_member = Api::<k8s_openapi::api::core::v1::Namespace>::all(member.clone())
        .get_opt(&ns)
        .await?;
    if clusters[0].is_local() {
        assert!(on_member.is_none(), "clusters are independent");
    }
    let Some(cp) = clusters[2].local_or_skip("crash reporting", "kills a local kube-apiserver")
    else {
        return Ok(());
    };
    unsafe { libc::kill(cp.apiserver.pid as i32, libc::SIGKILL) };
    let err = wait_for(
        &clusters[0],
        "the crash to show",
        Duration::from_secs(10),
        || async { clusters[2].check().err() },
    )
    .await?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains("member-2/kube-apiserver") && msg.contains("last log lines"),
        "{msg}"
    );
    // The crash fails calls on that cluster with the same report.
    let e = clusters[2]
        .client()
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("kube-apiserver"), "{e}");
    Ok(())
}
