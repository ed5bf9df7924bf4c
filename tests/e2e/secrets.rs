//! Secrets never leak: the operator process runs (as a hub, with the FL coordinator) with known secret
//! values — its MQTT password, a k8s proplet's literal clientKey, member-cluster credentials (good, wrong
//! and broken Secrets), FL capability tokens — through the paths that report errors, and then its log,
//! the status of every object, every Event and every FL error answer are searched for them: 0 hits.
use std::io::Read as _;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, Secret};
use kube::api::{Api, ListParams, PostParams};
use propeller_operator::api::{FederatedJob, MemberCluster, Proplet, Task, TrainingRound};
use propeller_operator::testbed;
use serde_json::json;

use crate::support::Env;

fn hex() -> anyhow::Result<String> {
    propeller_operator::testbed::process::random_hex(8)
}

/// Every object's status in `ns`, every Event there, as one text.
async fn reported(env: &Env) -> anyhow::Result<String> {
    let mut out = String::new();
    let lp = ListParams::default();
    let admin = &env.admin;
    let ns = &env.ns;
    macro_rules! statuses {
        ($($k:ty),*) => {$(
            for o in Api::<$k>::namespaced(admin.clone(), ns).list(&lp).await?.items {
                out.push_str(&serde_json::to_string(&o.status)?);
            }
        )*};
    }
    statuses!(Task, Proplet, FederatedJob, TrainingRound, MemberCluster);
    for e in Api::<CoreEvent>::namespaced(admin.clone(), ns)
        .list(&lp)
        .await?
        .items
    {
        out.push_str(&serde_json::to_string(&e)?);
    }
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    for e in events.list(&lp).await?.items {
        out.push_str(&serde_json::to_string(&e)?);
    }
    Ok(out)
}

#[tokio::test]
async fn no_secret_reaches_the_log_status_events_or_errors() -> anyhow::Result<()> {
    let mut env = Env::start("leak", &[]).await?;
    let Some(_) = env.cluster.local_or_skip(
        "no_secret_reaches_the_log_status_events_or_errors",
        "runs the operator binary with the admin kubeconfig",
    ) else {
        return env.finish().await;
    };
    // The operator as a process (its whole log), instead of the in-process one.
    env.stop_operator().await?;
    let ns = env.ns.clone();
    let fl_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log_path = testbed::run_dir().join(format!("leak-{ns}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_propeller-operator"))
        .env("KUBECONFIG", &env.cluster.kubeconfig)
        .env(
            "RUST_LOG",
            "debug,hyper=info,rustls=info,tower=info,h2=info",
        )
        .env("CLIENT_KEY", &env.broker.password)
        .args([
            "--watch-namespace",
            &ns,
            "--member-namespace",
            &ns,
            "--hub",
            "--member-probe-interval",
            "1s",
            "--mqtt-address",
            &env.broker.address(),
            "--client-id",
            &env.broker.username,
            "--identity",
            "leak-test",
            "--health-probe-bind-address",
            "127.0.0.1:0",
            "--fl-bind-address",
            &format!("127.0.0.1:{fl_port}"),
            "--fl-public-url",
            &format!("http://127.0.0.1:{fl_port}"),
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let result = exercise(&env, fl_port).await;
    let _ = child.kill();
    let _ = child.wait();
    let secrets = result?;

    let mut text = String::new();
    std::fs::File::open(&log_path)?.read_to_string(&mut text)?;
    assert!(
        text.contains("member") && text.lines().count() > 20,
        "the log was captured ({} lines)",
        text.lines().count()
    );
    let reported = reported(&env).await?;
    assert!(
        reported.contains("Unauthorized") || reported.contains("401"),
        "the wrong token was reported: {reported}"
    );
    for (what, value) in &secrets.values {
        assert!(
            !text.contains(value.as_str()),
            "{what} is in the operator's log"
        );
        assert!(
            !reported.contains(value.as_str()),
            "{what} is in a status or an Event"
        );
        for answer in &secrets.answers {
            assert!(
                !answer.contains(value.as_str()),
                "{what} is in an FL error: {answer}"
            );
        }
    }
    eprintln!(
        "searched {} log lines, {} bytes of status and Events, {} FL answers for {} secret values: 0 hits",
        text.lines().count(),
        reported.len(),
        secrets.answers.len(),
        secrets.values.len()
    );
    env.finish().await
}

struct Known {
    /// (what, value)
    values: Vec<(String, String)>,
    /// Bodies of FL error answers.
    answers: Vec<String>,
}

/// Puts every kind of secret through the operator; returns the values and the FL answers.
async fn exercise(env: &Env, fl_port: u16) -> anyhow::Result<Known> {
    let ns = &env.ns;
    let mut values = vec![("the MQTT password".to_string(), env.broker.password.clone())];
    // A k8s proplet with a literal clientKey: the operator keeps it in a Secret of its own.
    let proplet_key = format!("leak-proplet-key-{}", hex()?);
    env.create::<Proplet>(json!({"metadata": {"name": "pool"}, "spec": {
        "type": "k8s", "k8s": {"image": "proplet:test"},
        "connectionConfig": {"mqttAddress": env.broker.address(), "domainId": "d", "channelId": "c",
                             "clientId": "pool-1", "clientKey": proplet_key},
    }}))
    .await?;
    values.push(("a proplet's clientKey".into(), proplet_key));

    // Member credentials: a wrong token against the real API server (401), a token for an unreachable
    // server, and a token inside a broken kubeconfig.
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), ns);
    let (server, ca, _) =
        crate::multicluster::server_ca_token(&std::fs::read_to_string(&env.cluster.kubeconfig)?)?;
    let wrong = format!("leak-member-token-{}", hex()?);
    secrets
        .create(
            &PostParams::default(),
            &crate::multicluster::argo_secret("wrong-token", &server, &ca, &wrong)?,
        )
        .await?;
    let far = format!("leak-far-token-{}", hex()?);
    secrets
        .create(
            &PostParams::default(),
            &crate::multicluster::argo_secret("far-away", "https://127.0.0.1:1", &ca, &far)?,
        )
        .await?;
    let broken = format!("leak-broken-token-{}", hex()?);
    let bad: Secret = serde_json::from_value(json!({
        "metadata": {"name": "broken", "labels": {"propeller.propeller.abstractmachines.fr/member": "true"}},
        "stringData": {"kubeconfig": format!("users: [{{name: u, user: {{token: {broken}")},
    }))?;
    secrets.create(&PostParams::default(), &bad).await?;
    values.extend([
        ("a rejected member token".to_string(), wrong),
        ("an unreachable member's token".to_string(), far),
        ("a token in a broken kubeconfig".to_string(), broken),
    ]);

    // FL: a round whose participant never comes, so its Task holds a capability token.
    env.create::<FederatedJob>(json!({"metadata": {"name": "exp"}, "spec": {
        "experimentId": "exp-leak", "modelRef": "fl/models/global_model_v0",
        "taskWasmImage": "registry.example/fl-client.wasm:1",
        "participants": [{"propletId": "nobody"}], "kOfN": 1, "timeoutSeconds": 60,
        "rounds": {"total": 1}, "aggregator": {"algorithm": "fedavg"},
    }}))
    .await?;
    let members: Api<MemberCluster> = Api::namespaced(env.admin.clone(), ns);
    let tasks = env.tasks();
    let url = testbed::eventually(
        "the round Task and every member reported",
        crate::support::WAIT,
        || async {
            let all = members.list(&ListParams::default()).await.ok()?.items;
            let reported = all.len() == 3
                && all
                    .iter()
                    .all(|m| m.status.as_ref().is_some_and(|s| s.error.is_some()));
            let t = tasks.get_opt("exp-round-1-nobody").await.ok()??;
            let url = t.spec.env?.get("MANAGER_COORDINATOR_URL")?.clone();
            reported.then_some(url)
        },
    )
    .await?;
    let token = url.rsplit('/').next().unwrap_or_default().to_string();
    anyhow::ensure!(token.len() >= 32, "a capability token in {url}");
    values.push(("an FL capability token".into(), token.clone()));

    // FL requests that fail: their answers must not echo the capability.
    let base = url.replace(&format!("http://127.0.0.1:{fl_port}"), "");
    let forged = format!(
        "{}{}",
        &base[..base.len() - 1],
        if base.ends_with('0') { '1' } else { '0' }
    );
    let mut answers = Vec::new();
    for (method, path, body) in [
        (
            "POST",
            format!("{base}/update"),
            Some(json!({"round_id": "round-1"})),
        ),
        (
            "POST",
            format!("{base}/update"),
            Some(
                json!({"round_id": "round-9", "proplet_id": "mallory", "num_samples": 1, "update": [1.0]}),
            ),
        ),
        ("GET", format!("{base}/datasets/someone-else"), None),
        ("GET", format!("{base}/models/99"), None),
        ("POST", format!("{forged}/update"), Some(json!({}))),
        ("GET", format!("/fl/{ns}/exp/models/0"), None),
    ] {
        let (_, answer) = crate::federated::http_to(fl_port, method, &path, body).await?;
        answers.push(answer.to_string());
    }
    // Give the operator a few more probes and reconciles to log.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(Known { values, answers })
}
