//! Hierarchical FL across clusters: a hub operator (on the shared cluster) runs a FederatedJob on two
//! member clusters of the test bed, each with its own mosquitto, operator and simulated proplets running
//! the example FL client. The hub reaches members only through their API servers (kubeconfig Secrets).
//! Every global model is checked against FedAvg over all participants' updates, computed here.
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use propeller_operator::api::FederatedJob;
use propeller_operator::fl::store;
use propeller_operator::testbed::{self, TestCluster};
use serde_json::{Value, json};

use crate::federated::{DATASET, Fl, MODULE, close, round_sums, weights};
use crate::support::Env;

/// The member clusters are shared by the tests here; those that stop a member's API server have them alone.
static MEMBERS_IN_USE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A member site: its operator, broker and three participants (Proplets `<site>-edge-1..3`).
async fn site(
    cluster: &'static TestCluster,
    site: &str,
    samples: [usize; 3],
    delay: Duration,
) -> anyhow::Result<Option<Fl>> {
    let Some(mut fl) = Fl::start_on(cluster, site).await? else {
        return Ok(None);
    };
    for (i, n) in samples.iter().enumerate() {
        let region = i + if site == "site-b" { 3 } else { 0 };
        fl.participant(
            &format!("{site}-edge-{}", i + 1),
            &format!("{site}-p{}", i + 1),
            (region, *n),
            |c| c.faults.task_delay = delay,
        )
        .await?;
    }
    Ok(Some(fl))
}

/// The hub, with `members` registered by Secrets of ours.
async fn hub(members: &[(&str, &'static TestCluster)]) -> anyhow::Result<Env> {
    let env = Env::start("hub", &["--hub", "--member-probe-interval", "1s"]).await?;
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    for (name, cluster) in members {
        let s = cluster.kubeconfig_secret(
            name,
            &env.ns,
            &[("propeller.propeller.abstractmachines.fr/member", "true")],
        )?;
        secrets.create(&PostParams::default(), &s).await?;
    }
    Ok(env)
}

fn hub_job(name: &str, members: Value, rounds: i64, timeout: i64) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "experimentId": format!("exp-{name}"), "modelRef": "fl/models/global_model_v0",
        "taskWasmImage": MODULE, "hyperparams": {"epochs": 2, "lr": 0.3},
        "timeoutSeconds": timeout, "rounds": {"total": rounds},
        "aggregator": {"algorithm": "fedavg"},
        "initialModel": {"w": [0.0, 1.0], "b": 0.5},
        "dataset": DATASET, "members": members,
    }})
}

fn phase(j: &FederatedJob) -> Option<&str> {
    j.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// Waits up to `secs` for the hub job `exp` to complete; the error shows its last status.
async fn completed(
    jobs: &Api<FederatedJob>,
    what: &str,
    secs: u64,
) -> anyhow::Result<FederatedJob> {
    let done = testbed::wait_for(
        testbed::shared_cluster(),
        what,
        Duration::from_secs(secs),
        || async {
            jobs.get("exp")
                .await
                .ok()
                .filter(|j| phase(j) == Some("Completed"))
        },
    )
    .await;
    match done {
        Ok(j) => Ok(j),
        Err(e) => {
            let seen = jobs.get("exp").await.map(|j| format!("{:?}", j.status));
            anyhow::bail!("{e}; hub job status: {seen:?}")
        }
    }
}

/// Global model `n` as the hub stores it, with the members it was aggregated from.
async fn global_model(hub: &Env, job: &str, n: u64) -> anyhow::Result<(Value, Vec<String>)> {
    let m = store::get_model(&hub.admin, &hub.ns, job, n)
        .await?
        .ok_or_else(|| anyhow::anyhow!("global model {n} of {job} is not stored on the hub"))?;
    Ok((m.model, m.aggregated_from))
}

/// Asserts that global model `n` is FedAvg over every update the contributing members' rounds aggregated
/// (two-level FedAvg equals flat FedAvg), and that each member's round `n` started from model `n − 1`.
async fn global_model_is_flat_fedavg(
    hub: &Env,
    job: &str,
    n: u64,
    sites: &[(&str, &Fl)],
) -> anyhow::Result<Vec<String>> {
    let (model, from) = global_model(hub, job, n).await?;
    let (previous, _) = global_model(hub, job, n - 1).await?;
    let member_job = format!("{job}-round-{n}");
    let (mut w, mut b, mut total) = (Vec::<f64>::new(), 0.0, 0.0);
    for (name, fl) in sites {
        if !from.iter().any(|m| m == name) {
            continue;
        }
        let mj = fl.jobs().get(&member_job).await?;
        assert_eq!(
            mj.spec.initial_model.as_ref(),
            Some(&previous),
            "{name}'s round {n} starts from global model {}",
            n - 1
        );
        let ((sw, sb, st), participants) = round_sums(&fl.env, &member_job, 1).await?;
        assert!(!participants.is_empty(), "{name} round {n}");
        w.resize(sw.len(), 0.0);
        for (acc, x) in w.iter_mut().zip(&sw) {
            *acc += x;
        }
        b += sb;
        total += st;
    }
    anyhow::ensure!(total > 0.0, "round {n}: no member contributed ({from:?})");
    let (mw, mb) = weights(&model);
    let (ew, eb): (Vec<f64>, f64) = (w.iter().map(|x| x / total).collect(), b / total);
    assert!(
        mw.len() == ew.len() && mw.iter().zip(&ew).all(|(a, e)| close(*a, *e)) && close(mb, eb),
        "global model {n}: {model} vs flat FedAvg {ew:?} {eb}"
    );
    Ok(from)
}

#[tokio::test]
async fn two_members_train_two_rounds_into_the_flat_fedavg_model() -> anyhow::Result<()> {
    let _members = MEMBERS_IN_USE.read().await;
    let clusters = testbed::member_clusters();
    let Some(a) = site(&clusters[0], "site-a", [10, 30, 20], Duration::ZERO).await? else {
        return Ok(());
    };
    let Some(b) = site(&clusters[1], "site-b", [25, 15, 40], Duration::ZERO).await? else {
        return Ok(());
    };
    let hub = hub(&[("site-a", &clusters[0]), ("site-b", &clusters[1])]).await?;
    // site-a by Proplet names, site-b as "all Running proplets" with a cap of 3.
    let members = json!({"clusters": [
        {"name": "site-a", "namespace": a.env.ns,
         "participants": [{"propletId": "site-a-edge-1"}, {"propletId": "site-a-edge-2"}, {"propletId": "site-a-edge-3"}]},
        {"name": "site-b", "namespace": b.env.ns, "maxParticipants": 3},
    ]});
    let mut hub = hub;
    hub.create::<FederatedJob>(hub_job("exp", members, 2, 60))
        .await?;
    let jobs: Api<FederatedJob> = Api::namespaced(hub.admin.clone(), &hub.ns);
    // A hub restarted mid-experiment resumes it from what the hub cluster holds.
    testbed::wait_for(
        hub.cluster,
        "the hub's round 1 under way",
        Duration::from_secs(120),
        || async {
            let s = jobs.get("exp").await.ok()?.status?;
            s.members.iter().any(|m| m.job.is_some()).then_some(())
        },
    )
    .await?;
    hub.stop_operator().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    hub.resume_operator().await?;
    let done = completed(&jobs, "hub job Completed", 180).await;
    let job = done?;
    let status = job.status.clone().unwrap_or_default();
    assert_eq!(
        (status.completed_rounds, status.model_version),
        (Some(2), Some(2))
    );
    assert_eq!(status.round_metrics.len(), 2, "{status:?}");
    for r in &status.round_metrics {
        assert_eq!(r.updates, 2, "both members in round {}", r.round);
        assert_eq!(r.total_samples, 60 + 80, "every participant's samples");
        assert!(r.metrics.contains_key("loss"), "{r:?}");
    }
    assert!(
        status.members.iter().all(|m| m.rounds_contributed == 2),
        "{:?}",
        status.members
    );
    let sites = [("site-a", &a), ("site-b", &b)];
    for n in 1..=2 {
        let from = global_model_is_flat_fedavg(&hub, "exp", n, &sites).await?;
        assert_eq!(from, ["site-a", "site-b"], "round {n}");
    }

    // Deleting the hub job deletes what it made on the members.
    jobs.delete("exp", &DeleteParams::default()).await?;
    for (name, fl) in sites {
        let api = fl.jobs();
        testbed::wait_for(
            fl.env.cluster,
            &format!("{name}'s member jobs deleted with the hub job"),
            Duration::from_secs(60),
            || async {
                let left = api
                    .list(
                        &ListParams::default()
                            .labels("propeller.propeller.abstractmachines.fr/hub-job-uid"),
                    )
                    .await
                    .ok()?;
                left.items.is_empty().then_some(())
            },
        )
        .await?;
    }
    testbed::wait_for(
        hub.cluster,
        "the hub job gone",
        Duration::from_secs(30),
        || async { jobs.get_opt("exp").await.ok()?.is_none().then_some(()) },
    )
    .await?;
    hub.finish().await?;
    a.finish().await?;
    b.finish().await
}

/// The hub and both sites for a test that stops site-b's API server (`None`: skipped, said why); site-b's
/// training takes `slow`, so that its round still runs when its API server stops.
async fn with_a_stoppable_member(
    test: &str,
    slow: Duration,
) -> anyhow::Result<Option<(&'static testbed::ControlPlane, Fl, Fl, Env)>> {
    let clusters = testbed::member_clusters();
    let Some(cp) = clusters[1].local_or_skip(test, "stops a member's kube-apiserver") else {
        return Ok(None);
    };
    let Some(a) = site(&clusters[0], "site-a", [10, 30, 20], Duration::ZERO).await? else {
        return Ok(None);
    };
    let Some(b) = site(&clusters[1], "site-b", [25, 15, 40], slow).await? else {
        return Ok(None);
    };
    let hub = hub(&[("site-a", &clusters[0]), ("site-b", &clusters[1])]).await?;
    Ok(Some((cp, a, b, hub)))
}

/// Starts the hub job `exp` over both sites (`minAvailable`, `(rounds, timeoutSeconds)`) and stops site-b's
/// API server once its round 1 exists; it resumes when the returned guard drops.
async fn stop_site_b_in_round_one(
    hub: &Env,
    a: &Fl,
    b: &Fl,
    cp: &testbed::ControlPlane,
    min_available: Option<i64>,
    (rounds, timeout): (i64, i64),
) -> anyhow::Result<(Api<FederatedJob>, Frozen)> {
    let mut members = json!({"clusters": [
        {"name": "site-a", "namespace": a.env.ns},
        {"name": "site-b", "namespace": b.env.ns},
    ]});
    if let Some(min) = min_available {
        members["minAvailable"] = json!(min);
    }
    hub.create::<FederatedJob>(hub_job("exp", members, rounds, timeout))
        .await?;
    let b_jobs = b.jobs();
    testbed::wait_for(
        hub.cluster,
        "site-b's round 1 created",
        Duration::from_secs(60),
        || async { b_jobs.get_opt("exp-round-1").await.ok()?.map(|_| ()) },
    )
    .await?;
    Ok((
        Api::namespaced(hub.admin.clone(), &hub.ns),
        Frozen::freeze(cp.apiserver.pid),
    ))
}

/// Deletes the hub job `exp` and waits until it is gone (its finalizer needs the hub operator running).
async fn delete_hub_job(hub: &Env) -> anyhow::Result<()> {
    let jobs: Api<FederatedJob> = Api::namespaced(hub.admin.clone(), &hub.ns);
    jobs.delete("exp", &DeleteParams::default()).await?;
    testbed::wait_for(
        hub.cluster,
        "the hub job gone",
        Duration::from_secs(60),
        || async { jobs.get_opt("exp").await.ok()?.is_none().then_some(()) },
    )
    .await
}

/// Resumes a stopped process when dropped, so that a failing test leaves no frozen API server behind.
struct Frozen(u32);

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[tokio::test]
async fn a_member_lost_mid_round_is_left_out_and_rejoins_the_next_round() -> anyhow::Result<()> {
    let _members = MEMBERS_IN_USE.write().await;
    let Some((cp, a, b, hub)) = with_a_stoppable_member(
        "a_member_lost_mid_round_is_left_out_and_rejoins_the_next_round",
        Duration::from_secs(6),
    )
    .await?
    else {
        return Ok(());
    };
    // One member model is enough: a member lost for a round is left out of it.
    let (jobs, frozen) = stop_site_b_in_round_one(&hub, &a, &b, cp, Some(1), (2, 20)).await?;
    // The hub sees site-b unreachable and, at the deadline, aggregates round 1 from site-a alone.
    let saw_unreachable = std::sync::atomic::AtomicBool::new(false);
    let round_two = testbed::wait_for(
        hub.cluster,
        "round 2 started without site-b",
        Duration::from_secs(90),
        || async {
            let j = jobs.get("exp").await.ok()?;
            let s = j.status?;
            if s.members
                .iter()
                .any(|m| m.name == "site-b" && m.state == "Unreachable")
            {
                saw_unreachable.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (s.completed_rounds >= Some(1)).then_some(())
        },
    )
    .await;
    drop(frozen);
    round_two?;
    let (_, from) = global_model(&hub, "exp", 1).await?;
    assert_eq!(from, ["site-a"], "round 1 went on without site-b");
    assert!(
        saw_unreachable.load(std::sync::atomic::Ordering::Relaxed),
        "the hub showed site-b Unreachable while it was stopped"
    );
    // site-b is back: round 2 includes it.
    let done = completed(&jobs, "hub job Completed", 120).await;
    done?;
    let sites = [("site-a", &a), ("site-b", &b)];
    let from = global_model_is_flat_fedavg(&hub, "exp", 2, &sites).await?;
    assert_eq!(from, ["site-a", "site-b"], "site-b rejoined in round 2");
    delete_hub_job(&hub).await?;
    hub.finish().await?;
    a.finish().await?;
    b.finish().await
}

/// The hub's access on a member as `kustomize/member/hub-access.yaml` grants it, for experiments in `ns`
/// (the ClusterRoleBinding named per namespace: tests share the member clusters).
async fn grant_hub_access(member: &kube::Client, ns: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
    use kube::api::{Patch, PatchParams};
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kustomize/member/hub-access.yaml"
    ))?;
    let ssa = PatchParams::apply("e2e").force();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc)?;
        if let Some(subjects) = v["subjects"].as_array_mut() {
            for s in subjects {
                s["namespace"] = json!(ns);
            }
        }
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match v["kind"].as_str() {
            Some("ServiceAccount") => {
                v["metadata"]["namespace"] = json!(ns);
                let sa: ServiceAccount = serde_json::from_value(v)?;
                Api::<ServiceAccount>::namespaced(member.clone(), ns)
                    .patch(&name, &ssa, &Patch::Apply(&sa))
                    .await?;
            }
            Some("ClusterRole") => {
                let r: ClusterRole = serde_json::from_value(v)?;
                Api::<ClusterRole>::all(member.clone())
                    .patch(&name, &ssa, &Patch::Apply(&r))
                    .await?;
            }
            Some("ClusterRoleBinding") => {
                let name = format!("{name}-{ns}");
                v["metadata"]["name"] = json!(name);
                let b: ClusterRoleBinding = serde_json::from_value(v)?;
                Api::<ClusterRoleBinding>::all(member.clone())
                    .patch(&name, &ssa, &Patch::Apply(&b))
                    .await?;
            }
            Some("RoleBinding") => {
                v["metadata"]["namespace"] = json!(ns);
                let b: RoleBinding = serde_json::from_value(v)?;
                Api::<RoleBinding>::namespaced(member.clone(), ns)
                    .patch(&name, &ssa, &Patch::Apply(&b))
                    .await?;
            }
            // The long-lived token Secret needs the token controller; tests mint bound tokens instead.
            Some("Secret") => {}
            other => anyhow::bail!("kustomize/member/hub-access.yaml: unexpected {other:?}"),
        }
    }
    Ok(())
}

/// A token of the member's `propeller-hub` ServiceAccount in `ns`, valid while the Secret `bound_to`
/// exists there (deleting it revokes the token).
async fn hub_token(member: &kube::Client, ns: &str, bound_to: &str) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let anchor: Secret = serde_json::from_value(json!({"metadata": {"name": bound_to}}))?;
    let anchor = Api::<Secret>::namespaced(member.clone(), ns)
        .create(&PostParams::default(), &anchor)
        .await?;
    let req: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": [], "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": bound_to,
                           "uid": anchor.metadata.uid},
    }}))?;
    Api::<ServiceAccount>::namespaced(member.clone(), ns)
        .create_token_request("propeller-hub", &PostParams::default(), &req)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| anyhow::anyhow!("TokenRequest returned no token"))
}

/// Whether the member's API server accepts `token` (a revoked one gets 401).
async fn token_accepted(cluster: &TestCluster, token: &str) -> anyhow::Result<bool> {
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&cluster.kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    let client = kube::Client::try_from(config)?;
    match Api::<FederatedJob>::all(client)
        .list(&ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 401 => Ok(false),
        // 403 is fine: authenticated, only not allowed to list every namespace.
        Ok(_) | Err(kube::Error::Api(_)) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
async fn an_argocd_member_with_least_privilege_survives_a_revoked_token() -> anyhow::Result<()> {
    let _members = MEMBERS_IN_USE.read().await;
    let clusters = testbed::member_clusters();
    let Some(a) = site(&clusters[0], "site-a", [10, 30, 20], Duration::ZERO).await? else {
        return Ok(());
    };
    // Rounds on site-b take a while, so that the token changes, and the API server (which caches a
    // token's authentication for 10 s) stops accepting the old one, during the experiment.
    let Some(b) = site(&clusters[1], "site-b", [25, 15, 40], Duration::from_secs(8)).await? else {
        return Ok(());
    };
    // site-a by our kubeconfig Secret; site-b by an Argo CD cluster Secret holding a token of the
    // `propeller-hub` ServiceAccount with exactly the access kustomize/member grants.
    let hub = hub(&[("site-a", &clusters[0])]).await?;
    grant_hub_access(&b.env.admin, &b.env.ns).await?;
    let first = hub_token(&b.env.admin, &b.env.ns, "hub-token-1").await?;
    let (server, ca, _) =
        crate::multicluster::server_ca_token(&std::fs::read_to_string(&clusters[1].kubeconfig)?)?;
    let secrets: Api<Secret> = Api::namespaced(hub.admin.clone(), &hub.ns);
    secrets
        .create(
            &PostParams::default(),
            &crate::multicluster::argo_secret("site-b", &server, &ca, &first)?,
        )
        .await?;
    let members = json!({"clusters": [
        {"name": "site-a", "namespace": a.env.ns},
        {"name": "site-b", "namespace": b.env.ns},
    ]});
    hub.create::<FederatedJob>(hub_job("exp", members, 3, 60))
        .await?;
    let jobs: Api<FederatedJob> = Api::namespaced(hub.admin.clone(), &hub.ns);
    testbed::wait_for(
        hub.cluster,
        "round 1 aggregated",
        Duration::from_secs(120),
        || async {
            let s = jobs.get("exp").await.ok()?.status?;
            (s.completed_rounds >= Some(1)).then_some(())
        },
    )
    .await?;

    // Rotation: a new token in the hub's Secret, then the old one revoked on the member.
    let second = hub_token(&b.env.admin, &b.env.ns, "hub-token-2").await?;
    secrets
        .replace(
            "site-b",
            &PostParams::default(),
            &crate::multicluster::argo_secret("site-b", &server, &ca, &second)?,
        )
        .await?;
    Api::<Secret>::namespaced(b.env.admin.clone(), &b.env.ns)
        .delete("hub-token-1", &DeleteParams::default())
        .await?;
    testbed::wait_for(
        b.env.cluster,
        "the old token revoked",
        Duration::from_secs(30),
        || async { (!token_accepted(&clusters[1], &first).await.ok()?).then_some(()) },
    )
    .await?;
    assert!(token_accepted(&clusters[1], &second).await?);
    let now = jobs.get("exp").await?.status.unwrap_or_default();
    assert!(
        now.completed_rounds < Some(3),
        "the old token was revoked before the last round: {now:?}"
    );

    let done = completed(&jobs, "hub job Completed", 180).await;
    done?;
    let sites = [("site-a", &a), ("site-b", &b)];
    for n in 1..=3 {
        let from = global_model_is_flat_fedavg(&hub, "exp", n, &sites).await?;
        assert_eq!(from, ["site-a", "site-b"], "round {n}: both members");
    }
    // The probe works with the same narrow access.
    let m = Api::<propeller_operator::api::MemberCluster>::namespaced(hub.admin.clone(), &hub.ns)
        .get("site-b")
        .await?
        .status
        .unwrap_or_default();
    assert_eq!(m.operator_installed, Some(true), "{m:?}");
    assert!(m.error.is_none() && m.proplets_running >= Some(3), "{m:?}");
    delete_hub_job(&hub).await?;
    hub.finish().await?;
    a.finish().await?;
    b.finish().await
}

#[tokio::test]
async fn below_quorum_a_round_waits_for_a_lost_member_and_completes_when_it_is_back()
-> anyhow::Result<()> {
    let _members = MEMBERS_IN_USE.write().await;
    let Some((cp, a, b, hub)) = with_a_stoppable_member(
        "below_quorum_a_round_waits_for_a_lost_member_and_completes_when_it_is_back",
        Duration::from_secs(3),
    )
    .await?
    else {
        return Ok(());
    };
    // Every member is needed (minAvailable defaults to all).
    let (jobs, frozen) = stop_site_b_in_round_one(&hub, &a, &b, cp, None, (1, 8)).await?;
    let waiting = testbed::wait_for(
        hub.cluster,
        "the round waiting for site-b",
        Duration::from_secs(60),
        || async {
            let s = jobs.get("exp").await.ok()?.status?;
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason.as_deref() == Some("WaitingForMembers")
                && ready
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains("site-b")))
            .then_some(s)
        },
    )
    .await;
    // Nothing was aggregated without the quorum.
    let premature = store::get_model(&hub.admin, &hub.ns, "exp", 1).await?;
    drop(frozen);
    let waiting = waiting?;
    assert!(premature.is_none(), "no global model below the quorum");
    assert_eq!(waiting.phase.as_deref(), Some("Running"), "{waiting:?}");
    let done = completed(&jobs, "hub job Completed once site-b is back", 120).await;
    done?;
    let sites = [("site-a", &a), ("site-b", &b)];
    let from = global_model_is_flat_fedavg(&hub, "exp", 1, &sites).await?;
    assert_eq!(from, ["site-a", "site-b"]);
    delete_hub_job(&hub).await?;
    hub.finish().await?;
    a.finish().await?;
    b.finish().await
}

#[tokio::test]
async fn what_holds_a_member_round_up_is_shown_on_the_hub() -> anyhow::Result<()> {
    let _members = MEMBERS_IN_USE.read().await;
    let clusters = testbed::member_clusters();
    // A member operator without --fl-public-url: its round cannot start, and says why.
    let site = Env::start_on(&clusters[0], "site-nofl", &[]).await?;
    site.external_proplet("edge-1", "nofl-1", json!({})).await?;
    let hub = hub(&[("site-a", &clusters[0])]).await?;
    let members = json!({"clusters": [{"name": "site-a", "namespace": site.ns,
                                       "participants": [{"propletId": "edge-1"}]}]});
    hub.create::<FederatedJob>(hub_job("exp", members, 1, 60))
        .await?;
    let jobs: Api<FederatedJob> = Api::namespaced(hub.admin.clone(), &hub.ns);
    testbed::wait_for(
        hub.cluster,
        "the member's reason on the hub",
        Duration::from_secs(60),
        || async {
            let s = jobs.get("exp").await.ok()?.status?;
            s.members
                .iter()
                .find(|m| m.name == "site-a" && m.state == "Training")
                .and_then(|m| m.message.clone())
                .filter(|msg| msg.contains("--fl-public-url"))
        },
    )
    .await?;
    delete_hub_job(&hub).await?;
    hub.finish().await?;
    site.finish().await
}
