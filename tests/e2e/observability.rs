//! The operator's /metrics after the seed walkthrough: reconcile, work-queue and MQTT counters move.
use std::time::Duration;

use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use serde_json::json;

use crate::support::Env;

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

fn scrape(port: u16, path: &str) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let body = ureq::get(&url).call()?.body_mut().read_to_string()?;
    Ok(body)
}

/// The value of the sample `name{labels…}` (0 when absent: a counter not yet incremented).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_with_the_seed_walkthrough() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bind = format!("127.0.0.1:{port}");
    let mut env = Env::start("metrics", &["--health-probe-bind-address", &bind]).await?;
    let ready = propeller_operator::testbed::wait_for(
        env.cluster,
        "/readyz",
        crate::support::WAIT,
        || async {
            tokio::task::spawn_blocking(move || scrape(port, "/readyz").ok())
                .await
                .ok()
                .flatten()
        },
    )
    .await?;
    assert_eq!(ready, "ok");
    let before = tokio::task::spawn_blocking(move || scrape(port, "/metrics")).await??;

    let sim = env.proplet("obs-1", |_| {}).await?;
    env.external_proplet("obs", "obs-1", json!({})).await?;
    env.create::<Task>(json!({"metadata": {"name": "addition"},
        "spec": {"name": "addition", "functionName": "add", "file": ADD, "inputs": [40, 2],
                 "propletSelector": {"propletId": "obs"}}}))
        .await?;
    env.wait_for(&env.tasks(), "addition", "42", |t: &Task| {
        t.phase() == TaskPhase::Completed
    })
    .await?;
    // The tasks-by-phase gauge refreshes every 5 s from the watch cache, so a
    // slow machine may need a few refreshes before it counts the completed task.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let after = loop {
        let text = tokio::task::spawn_blocking(move || scrape(port, "/metrics")).await??;
        if sample(&text, "propeller_tasks", &[("phase", "completed")]) >= 1.0
            || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let moved = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (sample(&before, name, labels), sample(&after, name, labels));
        assert!(a > b, "{name}{labels:?}: {b} -> {a}");
    };
    moved(
        "controller_runtime_reconcile_total",
        &[("controller", "task"), ("result", "success")],
    );
    moved(
        "controller_runtime_reconcile_total",
        &[("controller", "proplet")],
    );
    moved(
        "controller_runtime_reconcile_time_seconds_count",
        &[("controller", "task")],
    );
    moved("workqueue_adds_total", &[("name", "task")]);
    moved(
        "workqueue_queue_duration_seconds_count",
        &[("name", "task")],
    );
    moved(
        "propeller_mqtt_messages_total",
        &[("kind", "results"), ("outcome", "ok")],
    );
    moved(
        "propeller_mqtt_messages_total",
        &[("kind", "alive"), ("outcome", "ok")],
    );
    moved(
        "propeller_api_writes_total",
        &[("resource", "tasks"), ("verb", "patch_status")],
    );
    moved("propeller_task_dispatch_seconds_count", &[]);
    moved("propeller_task_completion_seconds_count", &[]);
    assert!(sample(&after, "propeller_tasks", &[("phase", "completed")]) >= 1.0);
    assert!(after.contains("# TYPE workqueue_depth gauge"));
    sim.shutdown().await;
    env.finish().await
}

/// A token of a new ServiceAccount `name` in `env`'s namespace, bound to `cluster_role` when given.
async fn service_account_token(
    env: &Env,
    name: &str,
    cluster_role: Option<&str>,
) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    use kube::api::{Api, PostParams};
    let sas: Api<ServiceAccount> = Api::namespaced(env.admin.clone(), &env.ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}}))?,
    )
    .await?;
    if let Some(role) = cluster_role {
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-{}", env.ns)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": env.ns}],
        }))?;
        Api::<ClusterRoleBinding>::all(env.admin.clone())
            .create(&PostParams::default(), &binding)
            .await?;
    }
    let req: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))?;
    sas.create_token_request(name, &PostParams::default(), &req)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| anyhow::anyhow!("no token"))
}

/// The metrics reader ClusterRole as kustomize/base/rbac.yaml defines it.
async fn apply_metrics_reader(env: &Env) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use kube::api::{Api, Patch, PatchParams};
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kustomize/base/rbac.yaml"
    ))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if v["metadata"]["name"] == "propeller-metrics-reader" {
            let role: ClusterRole = serde_json::from_value(v)?;
            Api::<ClusterRole>::all(env.admin.clone())
                .patch(
                    "propeller-metrics-reader",
                    &PatchParams::apply("e2e").force(),
                    &Patch::Apply(&role),
                )
                .await?;
            return Ok(());
        }
    }
    anyhow::bail!("kustomize/base/rbac.yaml has no propeller-metrics-reader")
}

/// `(status, body)` of GET https://127.0.0.1:{port}/metrics (the certificate is self-signed).
async fn secure_scrape(port: u16, token: Option<String>) -> anyhow::Result<(u16, String)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(true)
                    .build(),
            )
            .build()
            .into();
        let mut req = agent.get(&format!("https://127.0.0.1:{port}/metrics"));
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call()?;
        Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
    })
    .await?
}

#[tokio::test]
async fn secure_metrics_answer_only_callers_the_cluster_allows() -> anyhow::Result<()> {
    // The operator runs as its ServiceAccount with the kustomize Role: TokenReview and
    // SubjectAccessReview are allowed it there.
    let env = Env::start("secure-metrics", &["--metrics-bind-address", "127.0.0.1:0"]).await?;
    let port = env
        .operator(0)
        .and_then(|o| o.metrics_address())
        .map(|a| a.port())
        .ok_or_else(|| anyhow::anyhow!("no secure metrics port"))?;
    apply_metrics_reader(&env).await?;
    let scraper = service_account_token(&env, "scraper", Some("propeller-metrics-reader")).await?;
    let stranger = service_account_token(&env, "stranger", None).await?;

    assert_eq!(secure_scrape(port, None).await?.0, 401, "no token");
    assert_eq!(
        secure_scrape(port, Some("not-a-token".into())).await?.0,
        401,
        "a token the cluster does not know"
    );
    assert_eq!(
        secure_scrape(port, Some(stranger)).await?.0,
        403,
        "authenticated, not allowed"
    );
    let (code, body) = secure_scrape(port, Some(scraper)).await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("propeller_mqtt_connected 1"), "{body}");
    // Plain HTTP is not spoken on the secure port.
    let plain = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .is_ok()
    })
    .await?;
    assert!(!plain, "the secure port answers TLS only");
    let _ = kube::Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(env.admin.clone())
        .delete(&format!("scraper-{}", env.ns), &Default::default())
        .await;
    env.finish().await
}
