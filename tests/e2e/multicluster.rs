//! A hub's member clusters, registered by Secrets: our kubeconfig format and Argo CD's cluster Secret; a
//! broken Secret gets a clear status; a rotated credential takes effect without a restart. The shared test
//! cluster plays the member (as a hub would reach any cluster through its API server).
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use propeller_operator::api::MemberCluster;
use propeller_operator::api::common::{ConditionStatus, find_condition};
use serde_json::json;

use crate::support::Env;

fn reachable(m: &MemberCluster) -> Option<(ConditionStatus, String)> {
    let s = m.status.as_ref()?;
    let c = find_condition(&s.conditions, "Reachable")?;
    Some((c.status, c.reason.clone().unwrap_or_default()))
}

/// The server, CA data and token of the test cluster's kubeconfig (as an Argo CD Secret carries them).
pub(crate) fn server_ca_token(kubeconfig: &str) -> anyhow::Result<(String, String, String)> {
    let v: serde_yaml::Value = serde_yaml::from_str(kubeconfig)?;
    let cluster = &v["clusters"][0]["cluster"];
    let text = |x: &serde_yaml::Value| x.as_str().map(str::to_string);
    Ok((
        text(&cluster["server"]).ok_or_else(|| anyhow::anyhow!("no server"))?,
        text(&cluster["certificate-authority-data"]).unwrap_or_default(),
        text(&v["users"][0]["user"]["token"]).ok_or_else(|| anyhow::anyhow!("no token"))?,
    ))
}

pub(crate) fn argo_secret(
    name: &str,
    server: &str,
    ca: &str,
    token: &str,
) -> anyhow::Result<Secret> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"argocd.argoproj.io/secret-type": "cluster"}},
        "stringData": {
            "name": "edge-eu", "server": server,
            "config": json!({"bearerToken": token, "tlsClientConfig": {"caData": ca}}).to_string(),
        },
    }))?)
}

#[tokio::test]
async fn members_registered_by_secret_show_their_state_and_follow_a_rotated_token()
-> anyhow::Result<()> {
    // Restricted to its namespace, the operator reads member Secrets there (as POD_NAMESPACE would say).
    let env = Env::start("hub", &["--hub", "--member-probe-interval", "1s"]).await?;
    let ns = env.ns.clone();
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &ns);
    let members: Api<MemberCluster> = Api::namespaced(env.admin.clone(), &ns);
    env.external_proplet("edge-1", "c-1", json!({})).await?;

    // Our format: a kubeconfig under `kubeconfig`.
    let ours = env.cluster.kubeconfig_secret(
        "site-a",
        &ns,
        &[("propeller.propeller.abstractmachines.fr/member", "true")],
    )?;
    secrets.create(&PostParams::default(), &ours).await?;
    let m = env
        .wait_for(&members, "site-a", "member site-a Reachable", |m| {
            reachable(m).is_some_and(|(s, _)| s == ConditionStatus::True)
        })
        .await?;
    let s = m.status.clone().unwrap_or_default();
    assert!(
        s.kubernetes_version
            .as_deref()
            .is_some_and(|v| v.starts_with('v')),
        "{s:?}"
    );
    assert_eq!(
        s.operator_installed,
        Some(true),
        "the CRDs are installed there"
    );
    assert!(
        s.proplets_total >= Some(1) && s.proplets_running <= s.proplets_total,
        "{s:?}"
    );
    assert!(
        m.spec
            .server
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    );

    // Argo CD's format, with a token; then the token rotated to a bad one and back.
    let text = std::fs::read_to_string(&env.cluster.kubeconfig)?;
    let (server, ca, token) = server_ca_token(&text)?;
    secrets
        .create(
            &PostParams::default(),
            &argo_secret("site-b", &server, &ca, &token)?,
        )
        .await?;
    env.wait_for(&members, "site-b", "member site-b Reachable", |m| {
        reachable(m).is_some_and(|(s, _)| s == ConditionStatus::True)
    })
    .await?;
    let wrong = "not-the-token-0123456789";
    secrets
        .replace(
            "site-b",
            &PostParams::default(),
            &argo_secret("site-b", &server, &ca, wrong)?,
        )
        .await?;
    let m = env
        .wait_for(
            &members,
            "site-b",
            "member site-b unreachable with a wrong token",
            |m| reachable(m).is_some_and(|(s, _)| s == ConditionStatus::False),
        )
        .await?;
    let err = m.status.and_then(|s| s.error).unwrap_or_default();
    assert!(err.contains("401") || err.contains("nauthorized"), "{err}");
    assert!(
        !err.contains(wrong) && !err.contains(&token),
        "no credential in status"
    );
    secrets
        .replace(
            "site-b",
            &PostParams::default(),
            &argo_secret("site-b", &server, &ca, &token)?,
        )
        .await?;
    env.wait_for(&members, "site-b", "member site-b Reachable again", |m| {
        reachable(m).is_some_and(|(s, _)| s == ConditionStatus::True)
    })
    .await?;

    // A Secret that holds no kubeconfig: a clear status, no panic, the others unaffected.
    let broken: Secret = serde_json::from_value(json!({
        "metadata": {"name": "site-c", "labels": {"propeller.propeller.abstractmachines.fr/member": "true"}},
        "stringData": {"kubeconfig": "clusters: [unclosed"},
    }))?;
    secrets.create(&PostParams::default(), &broken).await?;
    let m = env
        .wait_for(
            &members,
            "site-c",
            "member site-c with a clear error",
            |m| {
                reachable(m)
                    .is_some_and(|(s, r)| s == ConditionStatus::False && r == "InvalidSecret")
            },
        )
        .await?;
    let err = m.status.and_then(|s| s.error).unwrap_or_default();
    assert!(err.contains("site-c") && err.contains("YAML"), "{err}");
    let a = members.get("site-a").await?;
    assert!(reachable(&a).is_some_and(|(s, _)| s == ConditionStatus::True));

    // The member's object goes with its Secret (owner reference, kube-controller-manager's GC).
    secrets.delete("site-c", &Default::default()).await?;
    let gone = propeller_operator::testbed::wait_for(
        env.cluster,
        "MemberCluster site-c deleted with its Secret",
        Duration::from_secs(60),
        || async {
            members
                .get_opt("site-c")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    gone?;
    env.finish().await
}

/// The members whose metrics an operator reports (those it probes).
fn probed_by(env: &Env, i: usize) -> std::collections::BTreeSet<String> {
    use prometheus::core::Collector;
    let Some(op) = env.operator(i) else {
        return Default::default();
    };
    op.context()
        .metrics
        .members
        .reachable
        .collect()
        .iter()
        .flat_map(|f| f.get_metric().iter())
        .flat_map(|m| m.get_label().iter())
        .filter(|l| l.name() == "member")
        .map(|l| l.value().to_string())
        .collect()
}

#[tokio::test]
async fn hub_replicas_share_the_members_by_the_ring_and_a_survivor_takes_them_all()
-> anyhow::Result<()> {
    const HUB: &[&str] = &[
        "--hub",
        "--member-probe-interval=1s",
        "--leader-elect",
        "--lease-duration=10s",
        "--renew-deadline=7s",
        "--retry-period=1s",
    ];
    let mut env = Env::start("hub-ha", HUB).await?;
    env.add_operator("hub-ha-b", &["--hub", "--member-probe-interval=1s"])
        .await?;
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    let ids: Vec<String> = (0..2)
        .filter_map(|i| env.operator(i))
        .filter_map(|o| o.context().ownership.identity().map(str::to_string))
        .collect();
    let ring = propeller_operator::sharding::ring::Ring::new(
        ids.clone(),
        propeller_operator::sharding::ring::VIRTUAL_NODES,
    );
    // Members named so that each replica gets three (the identities are random per test).
    let mut names: Vec<String> = Vec::new();
    for i in 1..=200 {
        let name = format!("site-{i}");
        let owner = ring.owner(&name).map(str::to_string);
        let taken = names
            .iter()
            .filter(|n| ring.owner(n).map(str::to_string) == owner)
            .count();
        if taken < 3 {
            names.push(name);
        }
        if names.len() == 6 {
            break;
        }
    }
    anyhow::ensure!(names.len() == 6, "no 3 + 3 split found for {ids:?}");
    for name in &names {
        let s = env.cluster.kubeconfig_secret(
            name,
            &env.ns,
            &[("propeller.propeller.abstractmachines.fr/member", "true")],
        )?;
        secrets.create(&PostParams::default(), &s).await?;
    }
    let expected = |i: usize| -> std::collections::BTreeSet<String> {
        names
            .iter()
            .filter(|n| ring.owner(n) == ids.get(i).map(String::as_str))
            .cloned()
            .collect()
    };
    // Each member is probed by the replica the ring places it on, and by no other.
    let shared = propeller_operator::testbed::eventually(
        "members probed as the ring shares them",
        Duration::from_secs(60),
        || async {
            let (a, b) = (probed_by(&env, 0), probed_by(&env, 1));
            (a == expected(0) && b == expected(1)).then_some((a, b))
        },
    )
    .await;
    let (a, b) = shared.map_err(|e| {
        anyhow::anyhow!(
            "{e}: replica 0 probes {:?} (expected {:?}), replica 1 probes {:?} (expected {:?})",
            probed_by(&env, 0),
            expected(0),
            probed_by(&env, 1),
            expected(1)
        )
    })?;
    assert_eq!((a.len(), b.len()), (3, 3), "{a:?} {b:?}");
    let members: Api<MemberCluster> = Api::namespaced(env.admin.clone(), &env.ns);
    for name in &names {
        env.wait_for(&members, name, "member Reachable", |m| {
            reachable(m).is_some_and(|(s, _)| s == ConditionStatus::True)
        })
        .await?;
    }

    // One replica leaves: the other probes every member.
    env.leave_operator_n(1, Duration::from_secs(5)).await?;
    let all: std::collections::BTreeSet<String> = names.iter().cloned().collect();
    propeller_operator::testbed::eventually(
        "the survivor probes every member",
        Duration::from_secs(60),
        || async { (probed_by(&env, 0) == all).then_some(()) },
    )
    .await?;
    env.finish().await
}
