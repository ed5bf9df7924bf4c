//! The CRDs' `x-kubernetes-validations` (CEL) rules, enforced by the operator too: a 1.20 API server
//! ignores them, so every rule has its check in a controller, reported as `Ready=False` `InvalidSpec` with
//! an Event. One violating object per rule here; a rule added to a CRD without a case here fails the test.
use std::collections::BTreeSet;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, PostParams};
use propeller_operator::api::Proplet;
use propeller_operator::api::common::find_condition;
use serde_json::{Value, json};

use crate::support::Env;

/// Every CEL rule message in crds/.
fn rule_messages() -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                    out.extend(
                        rules
                            .iter()
                            .filter_map(|r| r["message"].as_str().map(str::to_string)),
                    );
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut out = BTreeSet::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(f.path()) else {
            continue;
        };
        if let Ok(v) = serde_yaml::from_str::<Value>(&text) {
            walk(&v, &mut out);
        }
    }
    out
}

#[tokio::test]
async fn every_cel_rule_is_enforced_by_the_operator_too() -> anyhow::Result<()> {
    let env = Env::start("cel", &[]).await?;
    let conn = |drop: &[&str], add: Value| {
        let mut c = json!({"domainId": "d", "channelId": "c", "clientId": "cl", "clientKey": "k",
                           "mqttAddress": env.broker.address()});
        if let Some(m) = c.as_object_mut() {
            for k in drop {
                m.remove(*k);
            }
            if let Some(a) = add.as_object() {
                m.extend(a.clone());
            }
        }
        c
    };
    let external = json!({"deviceType": "sim"});
    // (rule message, Proplet name, spec, what the operator's message says)
    let cases = [
        (
            "spec.k8s is required when type is k8s",
            "no-k8s",
            json!({"type": "k8s", "connectionConfig": conn(&[], json!({}))}),
            "spec.k8s is required",
        ),
        (
            "domainId (or tenantId) is required",
            "no-domain",
            json!({"type": "external", "external": external, "connectionConfig": conn(&["domainId"], json!({}))}),
            "domainId (or tenantId) is required",
        ),
        (
            "clientId (or entityId) is required",
            "no-client",
            json!({"type": "external", "external": external, "connectionConfig": conn(&["clientId"], json!({}))}),
            "clientId (or entityId) is required",
        ),
        (
            "exactly one of clientKey or clientKeySecretRef must be set",
            "no-key",
            json!({"type": "external", "external": external, "connectionConfig": conn(&["clientKey"], json!({}))}),
            "exactly one of clientKey or clientKeySecretRef",
        ),
    ];
    let covered: BTreeSet<String> = cases.iter().map(|c| c.0.to_string()).collect();
    assert_eq!(
        covered,
        rule_messages(),
        "every CEL rule of crds/ has a case here, and every case a rule"
    );
    let proplets: Api<Proplet> = Api::namespaced(env.admin.clone(), &env.ns);
    let mut checked = Vec::new();
    for (rule, name, spec, _) in &cases {
        let p: Proplet = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
        match proplets.create(&PostParams::default(), &p).await {
            Ok(_) => checked.push(*name),
            // A newer API server evaluates the rule itself: nothing reaches the operator.
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains(rule) => {
                eprintln!("{name}: the API server enforced {rule:?} itself");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let events: Api<Event> = Api::namespaced(env.admin.clone(), &env.ns);
    for (_, name, _, says) in cases.iter().filter(|c| checked.contains(&c.1)) {
        let p = env
            .wait_for(&proplets, name, "Ready=False InvalidSpec", |p| {
                p.status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.reason.as_deref() == Some("InvalidSpec"))
            })
            .await?;
        let msg = p
            .status
            .and_then(|s| find_condition(&s.conditions, "Ready").and_then(|c| c.message.clone()))
            .unwrap_or_default();
        assert!(msg.contains(says), "{name}: {msg}");
        propeller_operator::testbed::eventually(
            &format!("an InvalidSpec Event on {name}"),
            crate::support::WAIT,
            || async {
                events
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("InvalidSpec")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    })
            },
        )
        .await?;
    }
    if env.cluster.is_local() {
        assert_eq!(
            checked.len(),
            cases.len(),
            "a 1.20 API server lets every case through"
        );
    }
    env.finish().await
}
