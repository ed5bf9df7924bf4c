//! `crds/` must be what `crdgen` generates from the Rust types.
use propeller_operator::api::{all_crds, crd_yaml};

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut stale = Vec::new();
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let path = dir.join(format!("{name}.yaml"));
        let want = crd_yaml(&crd).expect("serialize CRD");
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale CRDs (regenerate with `make crds`): {stale:?}"
    );
}

#[test]
fn every_crd_is_namespaced_with_status_and_category() {
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.scope, "Namespaced", "{name}");
        assert!(
            crd.spec
                .names
                .categories
                .as_ref()
                .is_some_and(|c| c.contains(&"propeller".to_string())),
            "{name}"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: status subresource"
        );
        let schema = serde_json::to_value(&v.schema).expect("schema");
        let required = schema["openAPIV3Schema"]["required"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            !required.contains(&serde_json::json!("status")),
            "{name}: status must never be required"
        );
    }
}

/// `kubectl explain` has something to say about every field.
#[test]
fn every_field_has_a_description() {
    fn walk(kind: &str, path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                if !["apiVersion", "kind", "metadata"].contains(&name.as_str())
                    && sub.get("description").is_none()
                {
                    missing.push(format!("{kind}{here}"));
                }
                walk(kind, &here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(kind, &format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in all_crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        walk(
            &crd.spec.names.kind,
            "",
            &schema["openAPIV3Schema"],
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}
