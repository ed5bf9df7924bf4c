//! Upstream's manifests apply to our CRDs: b8fbffa's samples unchanged, HEAD's with only the API group
//! changed. Each file has a named expected outcome, and nothing the sample wrote is pruned.
use kube::api::{DynamicObject, PostParams};
use kube::discovery::pinned_kind;
use kube::{Api, ResourceExt};
use propeller_operator::testbed::{install_crds, shared_cluster, shared_dir};
use serde_json::Value;

#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted,
}

/// Every sample upstream ships, and what our API server must do with it.
const EXPECTED: &[(&str, &str, Outcome)] = &[
    (
        "upstream-b8fbffa",
        "propeller_v1_proplet.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-b8fbffa",
        "propeller_v1_proplet_external.yaml",
        Outcome::Accepted,
    ),
    // Unquoted numeric inputs: rejected by upstream's own schema, accepted by ours.
    (
        "upstream-b8fbffa",
        "propeller_v1_task.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-b8fbffa",
        "propeller_v1_task_with_image.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_proxy_deployment.yaml",
        Outcome::Accepted,
    ),
    // FederatedJob: upstream b8fbffa's schema required status, so no create could succeed there.
    (
        "upstream-head",
        "propeller_v1_federatedjob.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_propellerjob.yaml",
        Outcome::Accepted,
    ),
    // tenantId / entityId / apiKey: accepted as aliases of domainId / clientId / clientKey.
    (
        "upstream-head",
        "propeller_v1_proplet.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_proplet_external.yaml",
        Outcome::Accepted,
    ),
    // spec.k8s.env (later field): kept, not pruned.
    (
        "upstream-head",
        "propeller_v1_proplet_full.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_proplet_wasi_nn.yaml",
        Outcome::Accepted,
    ),
    ("upstream-head", "propeller_v1_task.yaml", Outcome::Accepted),
    (
        "upstream-head",
        "propeller_v1_task_attestation_test.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_broadcast.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_compute.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_dag.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_dag_a.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_filesystem.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_hal_test.yaml",
        Outcome::Accepted,
    ),
    // Over 256 KiB: too big for kubectl's client-side apply annotation, fine with server-side apply.
    (
        "upstream-head",
        "propeller_v1_task_http_client.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_http_server.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_monitoring.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_recurring.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_string_input.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_tee.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_wasi_http.yaml",
        Outcome::Accepted,
    ),
    (
        "upstream-head",
        "propeller_v1_task_with_image.yaml",
        Outcome::Accepted,
    ),
];

/// Every leaf of `want` is in `have` with the same value (defaults may add more).
fn missing_leaves(path: &str, want: &Value, have: &Value, out: &mut Vec<String>) {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            for (k, v) in w {
                match h.get(k) {
                    Some(hv) => missing_leaves(&format!("{path}.{k}"), v, hv, out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(h)) if w.len() == h.len() => {
            for (i, (wv, hv)) in w.iter().zip(h).enumerate() {
                missing_leaves(&format!("{path}[{i}]"), wv, hv, out);
            }
        }
        (w, h) if w == h => {}
        // JSON numbers: 0.0 comes back as 0.
        (Value::Number(w), Value::Number(h)) if w.as_f64() == h.as_f64() => {}
        // Durations and quantities come back as the API server stored them; compare as text.
        (w, h) if w.to_string().trim_matches('"') == h.to_string().trim_matches('"') => {}
        _ => out.push(format!("{path}: sent {want}, stored {have}")),
    }
}

#[tokio::test]
async fn upstream_samples_apply_to_our_crds() -> anyhow::Result<()> {
    let Some(shared) = shared_dir("upstream_samples_apply_to_our_crds") else {
        return Ok(());
    };
    let cluster = shared_cluster();
    let client = cluster.client().await?;
    install_crds(&client).await?;
    // The two upstream versions reuse names: one namespace each.
    let mut namespaces = std::collections::BTreeMap::new();
    for dir in ["upstream-b8fbffa", "upstream-head"] {
        namespaces.insert(dir, cluster.namespace(&client, "samples").await?);
    }
    let mut listed = std::collections::BTreeSet::new();
    for dir in ["upstream-b8fbffa", "upstream-head"] {
        for entry in std::fs::read_dir(shared.join("reference").join(dir).join("samples"))? {
            let name = entry?.file_name().to_string_lossy().to_string();
            if name.starts_with("propeller_") {
                listed.insert((dir.to_string(), name));
            }
        }
    }
    let expected: std::collections::BTreeSet<_> = EXPECTED
        .iter()
        .map(|(d, f, _)| (d.to_string(), f.to_string()))
        .collect();
    assert_eq!(
        listed, expected,
        "every upstream sample has a named expected outcome"
    );

    let mut failures = Vec::new();
    for (dir, file, outcome) in EXPECTED {
        let ns = &namespaces[dir];
        let text = std::fs::read_to_string(
            shared
                .join("reference")
                .join(dir)
                .join("samples")
                .join(file),
        )?;
        let text = text.replace(
            "propeller.propeller.absmach.eu/v1",
            "propeller.propeller.abstractmachines.fr/v1",
        );
        // Every expected outcome is Accepted: any problem is a failure.
        let Outcome::Accepted = outcome;
        for problem in create_documents(&client, ns, &text).await? {
            failures.push(format!("{dir}/{file}: {problem}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for ns in namespaces.values() {
        cluster.delete_namespace(&client, ns).await;
    }
    Ok(())
}

/// Creates every document of a manifest in `ns`; returns what was rejected, pruned or changed.
async fn create_documents(
    client: &kube::Client,
    ns: &str,
    text: &str,
) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde_yaml::with::singleton_map_recursive::deserialize(doc)
            .or_else(|_| anyhow::Ok(Value::Null))?;
        if value.is_null() {
            continue;
        }
        let mut obj: DynamicObject = serde_json::from_value(value.clone())?;
        let gvk = obj
            .types
            .as_ref()
            .map(kube::api::GroupVersionKind::try_from)
            .transpose()?
            .ok_or_else(|| anyhow::anyhow!("no apiVersion/kind"))?;
        let (ar, _) = pinned_kind(client, &gvk).await?;
        obj.metadata.namespace = Some(ns.to_string());
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        // Create, as `kubectl apply` does for a new object (server-side apply on a 1.20 server trips
        // over Service ports without a protocol, which is not what this test is about).
        match api.create(&PostParams::default(), &obj).await {
            Ok(stored) => {
                let mut missing = Vec::new();
                missing_leaves("spec", &value["spec"], &stored.data["spec"], &mut missing);
                if !missing.is_empty() && value.get("spec").is_some() {
                    failures.push(format!(
                        "{}: pruned or changed: {missing:?}",
                        obj.name_any()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: rejected: {e}", obj.name_any())),
        }
    }
    Ok(failures)
}

/// Our own examples apply as written.
#[tokio::test]
async fn our_examples_apply_to_our_crds() -> anyhow::Result<()> {
    let cluster = shared_cluster();
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let mut failures = Vec::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    // examples/ and its directories (examples/multicluster).
    let mut dirs = vec![dir];
    let mut files = Vec::new();
    while let Some(d) = dirs.pop() {
        for path in std::fs::read_dir(&d)?.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 5,
        "examples/ has the documented examples: {files:?}"
    );
    for file in &files {
        // One namespace per file: examples reuse names.
        let ns = cluster.namespace(&client, "examples").await?;
        let text = std::fs::read_to_string(file)?;
        for problem in create_documents(&client, &ns, &text).await? {
            failures.push(format!("{}: {problem}", file.display()));
        }
        cluster.delete_namespace(&client, &ns).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
