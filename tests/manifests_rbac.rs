//! The operator's Role grants what the operator's ownerReferences need, and the hub's access on a member is
//! the narrow one docs/multi-cluster.md describes. (The e2e suite runs the operator under these Roles on an
//! API server with OwnerReferencesPermissionEnforcement, which enforces the first point for real.)
use std::collections::BTreeSet;

fn docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// `(resource, verb)` pairs a role's rules grant in `group`.
fn grants(role: &serde_json::Value, group: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        let groups: Vec<&str> = rule["apiGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str())
            .collect();
        if !groups.contains(&group) {
            continue;
        }
        for r in rule["resources"].as_array().into_iter().flatten() {
            for v in rule["verbs"].as_array().into_iter().flatten() {
                out.insert((
                    r.as_str().unwrap_or_default().to_string(),
                    v.as_str().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    out
}

const GROUP: &str = "propeller.propeller.abstractmachines.fr";

/// Upstream defect (upstream-spec §7): its Role lacked `*/finalizers` permissions the operator needs. Every
/// kind that owns something the operator makes (a blocking ownerReference), or that carries one of its
/// finalizers, needs `update` on its `finalizers`.
#[test]
fn the_role_grants_every_finalizers_permission_the_operator_needs() {
    let role = docs("kustomize/base/rbac.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("the operator's ClusterRole");
    let granted = grants(&role, GROUP);
    // Owners: Task → Job (job backend), TrainingRound → Task, FederatedJob → TrainingRound and models,
    // PropellerJob → Task, Proplet → Deployment. Finalizers: Task (its stop), FederatedJob (member jobs).
    for kind in [
        "tasks",
        "trainingrounds",
        "federatedjobs",
        "propellerjobs",
        "proplets",
    ] {
        assert!(
            granted.contains(&(format!("{kind}/finalizers"), "update".to_string())),
            "{kind}/finalizers update is missing from the Role: {granted:?}"
        );
    }
}

#[test]
fn the_hub_gets_exactly_the_documented_access_on_a_member() {
    let access = docs("kustomize/member/hub-access.yaml");
    let roles: Vec<&serde_json::Value> = access
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .collect();
    assert_eq!(roles.len(), 2, "probe and experiments");
    let mut all = BTreeSet::new();
    for r in &roles {
        all.extend(grants(r, GROUP));
        all.extend(grants(r, ""));
    }
    let want: BTreeSet<(String, String)> = [
        ("proplets", "list"),
        ("federatedjobs", "get"),
        ("federatedjobs", "list"),
        ("federatedjobs", "create"),
        ("federatedjobs", "delete"),
        ("federatedjobs", "deletecollection"),
        ("configmaps", "get"),
    ]
    .iter()
    .map(|(r, v)| (r.to_string(), v.to_string()))
    .collect();
    assert_eq!(all, want);
    for r in &roles {
        for rule in r["rules"].as_array().into_iter().flatten() {
            let resources = rule["resources"].to_string();
            assert!(!resources.contains("secrets"), "no Secrets for the hub");
            assert!(!resources.contains('*') && !rule["verbs"].to_string().contains('*'));
        }
    }
    let kustomization = &docs("kustomize/member/kustomization.yaml")[0];
    let resources = kustomization["resources"].to_string();
    assert!(resources.contains("hub-access.yaml") && resources.contains("../default"));
}
