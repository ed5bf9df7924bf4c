//! The `ha` kustomize overlay runs what docs/sharding.md describes: three replicas with stable identities,
//! leader election and sharding on, the Leases' namespace from the pod, a disruption budget, and RBAC for
//! Leases in the base role.
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect()
}

#[test]
fn the_ha_overlay_runs_three_sharded_replicas_with_stable_identities() {
    let sts: StatefulSet = serde_json::from_value(docs("kustomize/ha/statefulset.yaml").remove(0))
        .expect("a StatefulSet");
    let spec = sts.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.expect("pod spec");
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    assert!(args.iter().any(|a| a == "--leader-elect"), "{args:?}");
    // Every flag of the overlay is one the operator accepts.
    let argv: Vec<&str> = std::iter::once("propeller-operator")
        .chain(args.iter().map(String::as_str))
        .collect();
    if let Err(e) = propeller_operator::config::OperatorConfig::try_parse_from_args(&argv) {
        panic!("the overlay's args are refused: {e}");
    }
    let env: Vec<String> = c.env.iter().flatten().map(|e| e.name.clone()).collect();
    assert!(
        env.contains(&"POD_NAME".to_string()),
        "the identity is the pod name"
    );
    assert!(
        env.contains(&"POD_NAMESPACE".to_string()),
        "Leases go to the pod's namespace"
    );
    assert!(
        pod.affinity.and_then(|a| a.pod_anti_affinity).is_some(),
        "replicas prefer different nodes"
    );

    let pdb: PodDisruptionBudget =
        serde_json::from_value(docs("kustomize/ha/pdb.yaml").remove(0)).expect("a PDB");
    assert_eq!(
        pdb.spec.and_then(|s| s.max_unavailable),
        Some(IntOrString::Int(1))
    );

    let kustomization = &docs("kustomize/ha/kustomization.yaml")[0];
    let resources = kustomization["resources"].to_string();
    for r in ["../default", "statefulset.yaml", "pdb.yaml"] {
        assert!(resources.contains(r), "{r} in {resources}");
    }
    let patches = kustomization["patches"].to_string();
    assert!(patches.contains("$patch: delete") && patches.contains("Deployment"));
}

#[test]
fn the_role_may_hold_leases() {
    let role = docs("kustomize/base/rbac.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let role: ClusterRole = serde_json::from_value(role).expect("ClusterRole");
    let rule = role
        .rules
        .iter()
        .flatten()
        .find(|r| r.resources.iter().flatten().any(|x| x == "leases"))
        .expect("a rule for leases");
    for verb in ["get", "list", "create", "update"] {
        assert!(rule.verbs.iter().any(|v| v == verb), "{verb} on leases");
    }
}
