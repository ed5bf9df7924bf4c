//! Which proplet runs a task: the selector's rules, Running proplets only, then the least loaded
//! (fewest active tasks), ties broken by name so the choice is stable.
use std::sync::Arc;

use kube::ResourceExt;

use crate::api::proplet::{Proplet, PropletPhase, PropletType};
use crate::api::task::{PreferredPropletType, Task};

/// Picks a proplet for `task` among `proplets` (any namespace; only the task's own is considered), or
/// says why none fits.
/// `admit` says whether a proplet has room for the task now (capacity and priority, see
/// [`crate::scheduling`]).
pub fn select(
    task: &Task,
    proplets: &[Arc<Proplet>],
    load: impl Fn(&Proplet) -> i64,
    admit: impl Fn(&Proplet) -> Result<(), String>,
) -> Result<Arc<Proplet>, String> {
    let ns = task.namespace();
    let local: Vec<&Arc<Proplet>> = proplets.iter().filter(|p| p.namespace() == ns).collect();
    let selector = task.spec.proplet_selector.clone().unwrap_or_default();

    if let Some(id) = selector.proplet_id.as_deref().filter(|s| !s.is_empty()) {
        // By name first, then by clientId.
        let pinned = local.iter().find(|p| p.name_any() == id).or_else(|| {
            local
                .iter()
                .find(|p| p.spec.connection_config.client() == Some(id))
        });
        if let Some(Err(why)) = pinned
            .filter(|p| p.phase() == PropletPhase::Running)
            .map(|p| admit(p))
        {
            return Err(format!("the pinned proplet {id} is {why}"));
        }
        return match pinned {
            None => Err(format!(
                "no Proplet named {id:?} or with clientId {id:?} in this namespace"
            )),
            Some(p) if p.phase() != PropletPhase::Running => Err(format!(
                "the pinned proplet {} is {}",
                p.name_any(),
                p.phase().as_str()
            )),
            Some(p) => Ok(Arc::clone(p)),
        };
    }

    if local.is_empty() {
        return Err("no Proplets in this namespace".into());
    }
    let mut rejected = Vec::new();
    let mut candidates: Vec<(i64, String, &Arc<Proplet>)> = Vec::new();
    for p in local {
        match fits(task, p).and_then(|()| admit(p)) {
            Ok(()) => candidates.push((load(p), p.name_any(), p)),
            Err(why) => rejected.push(format!("{}: {why}", p.name_any())),
        }
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    match candidates.first() {
        Some((_, _, p)) => Ok(Arc::clone(p)),
        None => {
            rejected.sort();
            rejected.truncate(5);
            Err(format!("no proplet matches: {}", rejected.join("; ")))
        }
    }
}

/// Whether `task` could be placed on `p` (its pin or its selector), ignoring capacity.
pub fn could_use(task: &Task, p: &Proplet) -> bool {
    if task.namespace() != p.namespace() {
        return false;
    }
    match task
        .spec
        .proplet_selector
        .as_ref()
        .and_then(|s| s.proplet_id.as_deref())
        .filter(|s| !s.is_empty())
    {
        Some(id) => {
            (p.name_any() == id || p.spec.connection_config.client() == Some(id))
                && p.phase() == PropletPhase::Running
        }
        None => fits(task, p).is_ok(),
    }
}

fn fits(task: &Task, p: &Proplet) -> Result<(), String> {
    if p.phase() != PropletPhase::Running {
        return Err(p.phase().as_str().to_string());
    }
    match (task.spec.preferred_proplet_type, p.spec.type_) {
        (PreferredPropletType::K8s, PropletType::External) => return Err("not k8s".into()),
        (PreferredPropletType::External, PropletType::K8s) => return Err("not external".into()),
        _ => {}
    }
    let Some(sel) = &task.spec.proplet_selector else {
        return Ok(());
    };
    if let Some(want) = &sel.match_labels {
        let labels = p.labels();
        if let Some((k, v)) = want.iter().find(|(k, v)| labels.get(*k) != Some(*v)) {
            return Err(format!("label {k}={v} missing"));
        }
    }
    let external = p.spec.external.as_ref();
    if let Some(types) = sel.match_device_types.as_ref().filter(|t| !t.is_empty()) {
        let dt = external.and_then(|e| e.device_type.as_deref());
        if !dt.is_some_and(|dt| types.iter().any(|t| t == dt)) {
            return Err(format!(
                "deviceType {} not in {types:?}",
                dt.unwrap_or("(none)")
            ));
        }
    }
    if let Some(caps) = sel.match_capabilities.as_ref().filter(|c| !c.is_empty()) {
        let have = external
            .and_then(|e| e.capabilities.clone())
            .unwrap_or_default();
        if let Some(missing) = caps.iter().find(|c| !have.contains(c)) {
            return Err(format!("capability {missing} missing"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn proplet(name: &str, client: &str, phase: &str, extra: serde_json::Value) -> Arc<Proplet> {
        let mut v = json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Proplet",
            "metadata": {"name": name, "namespace": "ns", "labels": {"zone": "a"}},
            "spec": {"type": "external", "external": {"deviceType": "rpi", "capabilities": ["wasm"]},
                     "connectionConfig": {"domainId": "d", "channelId": "c", "clientId": client,
                                          "clientKey": "k", "mqttAddress": "tcp://b:1883"}},
            "status": {"phase": phase},
        });
        if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        Arc::new(serde_json::from_value(v).expect("proplet"))
    }

    fn task(selector: serde_json::Value) -> Task {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {"name": "t", "namespace": "ns"},
            "spec": {"name": "t", "propletSelector": selector},
        }))
        .expect("task")
    }

    #[test]
    fn a_proplet_without_room_is_skipped() {
        let ps = vec![
            proplet("a", "ca", "Running", json!({})),
            proplet("b", "cb", "Running", json!({})),
        ];
        let full_a = |p: &Proplet| {
            if p.name_any() == "a" {
                Err("busy (1/1 tasks)".to_string())
            } else {
                Ok(())
            }
        };
        assert_eq!(
            select(&task(json!({})), &ps, |_| 0, full_a).map(|p| p.name_any()),
            Ok("b".into())
        );
        let e = select(&task(json!({"propletId": "a"})), &ps, |_| 0, full_a).expect_err("full");
        assert!(e.contains("busy"), "{e}");
        assert!(could_use(&task(json!({"propletId": "cb"})), &ps[1]));
        assert!(!could_use(&task(json!({"propletId": "cb"})), &ps[0]));
    }

    #[test]
    fn pinned_by_name_or_client_id() {
        let ps = vec![proplet("p1", "client-1", "Running", json!({}))];
        assert!(select(&task(json!({"propletId": "p1"})), &ps, |_| 0, |_| Ok(())).is_ok());
        assert!(
            select(
                &task(json!({"propletId": "client-1"})),
                &ps,
                |_| 0,
                |_| Ok(())
            )
            .is_ok()
        );
        let e = select(&task(json!({"propletId": "nope"})), &ps, |_| 0, |_| Ok(()))
            .expect_err("unknown");
        assert!(e.contains("nope"));
    }

    #[test]
    fn pinned_offline_proplet_is_refused() {
        let ps = vec![proplet("p1", "c1", "Offline", json!({}))];
        let e =
            select(&task(json!({"propletId": "p1"})), &ps, |_| 0, |_| Ok(())).expect_err("offline");
        assert!(e.contains("Offline"));
    }

    #[test]
    fn least_loaded_then_name() {
        let ps = vec![
            proplet("b", "cb", "Running", json!({})),
            proplet("a", "ca", "Running", json!({})),
            proplet("c", "cc", "Running", json!({})),
        ];
        let load = |p: &Proplet| if p.name_any() == "a" { 2 } else { 1 };
        assert_eq!(
            select(&task(json!({})), &ps, load, |_| Ok(())).map(|p| p.name_any()),
            Ok("b".into())
        );
        assert_eq!(
            select(&task(json!({})), &ps, |_| 0, |_| Ok(())).map(|p| p.name_any()),
            Ok("a".into())
        );
    }

    #[test]
    fn selector_rules() {
        let ps = vec![
            proplet(
                "x",
                "cx",
                "Running",
                json!({"external": {"deviceType": "jetson", "capabilities": ["wasm", "gpu"]}}),
            ),
            proplet("y", "cy", "Running", json!({})),
            proplet(
                "z",
                "cz",
                "Offline",
                json!({"external": {"deviceType": "jetson", "capabilities": ["gpu"]}}),
            ),
        ];
        let pick = |sel| select(&task(sel), &ps, |_| 0, |_| Ok(())).map(|p| p.name_any());
        assert_eq!(
            pick(json!({"matchDeviceTypes": ["jetson"]})),
            Ok("x".into())
        );
        assert_eq!(pick(json!({"matchCapabilities": ["gpu"]})), Ok("x".into()));
        assert_eq!(pick(json!({"matchLabels": {"zone": "a"}})), Ok("x".into()));
        assert!(pick(json!({"matchLabels": {"zone": "b"}})).is_err());
        assert!(
            pick(json!({"matchCapabilities": ["tpu"]}))
                .expect_err("none")
                .contains("tpu")
        );
    }
}
