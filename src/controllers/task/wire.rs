//! A Task as the messages a proplet takes: the start request (inputs as strings, the export name, env with
//! the proplet's identity, the results of dependencies) and the channel a proplet listens on.
use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::Value;

use crate::api::proplet::Proplet;
use crate::api::task::{ResultTarget, Task};
use crate::context::Context;
use crate::mqtt::topics::Channel;
use crate::mqtt::wire::{StartRequest, WireMonitoringProfile};

/// The channel a proplet listens on.
pub fn channel_of(p: &Proplet) -> Option<Channel> {
    let cc = &p.spec.connection_config;
    Some(Channel::new(cc.domain()?, &cc.channel_id))
}

/// The results of `task`'s dependencies (by dependsOn name; null for one without a result).
pub fn parent_results(task: &Task, ctx: &Context) -> BTreeMap<String, Value> {
    let ns = task.namespace();
    let deps = task.spec.depends_on.iter().flatten();
    deps.map(|dep| {
        let result = ctx
            .tasks
            .state()
            .into_iter()
            .find(|t| t.namespace() == ns && &t.name_any() == dep)
            .and_then(|t| t.status.as_ref().and_then(|s| s.results.clone()))
            .unwrap_or(Value::Null);
        (dep.clone(), result)
    })
    .collect()
}

/// A result as the text a proplet takes (inputs and env are strings).
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The `name` of a start: the export to call. `functionName` when set; else a `spec.name` that names a
/// WASI command (`fl-round-…`, `_start`: the real proplet runs those as commands, and calls any other name
/// as an export, which an FL client does not have); else the object's name.
pub fn start_name(task: &Task) -> String {
    let spec = &task.spec;
    if let Some(f) = spec.function_name.as_deref().filter(|f| !f.is_empty()) {
        return f.to_string();
    }
    if crate::wasm::is_command(&spec.name) {
        spec.name.clone()
    } else {
        task.name_any()
    }
}

pub fn start_request(
    task: &Task,
    client_id: Option<&str>,
    parents: &BTreeMap<String, Value>,
) -> StartRequest {
    let spec = &task.spec;
    let uid = task.uid().unwrap_or_default();
    let mut inputs: Vec<String> = spec.inputs.iter().flatten().map(as_text).collect();
    let mut env = spec.env.clone().unwrap_or_default();
    for source in spec.results_from.iter().flatten() {
        let text = parents.get(&source.task).map(as_text).unwrap_or_default();
        match source.target {
            ResultTarget::Input => inputs.push(text),
            ResultTarget::Env => {
                env.insert(source.env_name(), text);
            }
        }
    }
    if let Some(client) = client_id {
        env.insert("PROPLET_ID".into(), client.to_string());
        env.insert("TASK_ID".into(), uid.clone());
    }
    let monitoring_profile = spec
        .monitoring_profile
        .as_ref()
        .map(|m| WireMonitoringProfile {
            enabled: m.enabled.unwrap_or(false),
            interval: m
                .interval
                .as_deref()
                .and_then(|i| i.parse::<kube::core::Duration>().ok())
                .map(|d| std::time::Duration::from(d).as_secs().max(1))
                .unwrap_or(10),
            collect_cpu: m.collect_cpu.unwrap_or(false),
            collect_memory: m.collect_memory.unwrap_or(false),
            collect_disk_io: m.collect_disk_io.unwrap_or(false),
            collect_threads: m.collect_threads.unwrap_or(false),
            collect_file_descriptors: m.collect_file_descriptors.unwrap_or(false),
            export_to_mqtt: m.export_to_mqtt.unwrap_or(false),
            retain_history: m.retain_history.unwrap_or(false),
            history_size: m.history_size.unwrap_or(0).max(0) as u64,
        });
    StartRequest {
        id: uid,
        name: start_name(task),
        state: 1,
        kind: match spec.kind {
            crate::api::task::TaskKind::Standard => "standard".into(),
            crate::api::task::TaskKind::Federated => "federated".into(),
        },
        image_url: spec.image_url.clone().unwrap_or_default(),
        file: spec
            .file
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .collect(),
        inputs,
        cli_args: spec.cli_args.clone().unwrap_or_default(),
        env: (!env.is_empty()).then_some(env),
        daemon: spec.daemon.unwrap_or(false),
        broadcast: client_id.is_none(),
        mode: spec.mode.map(|m| match m {
            crate::api::task::TaskMode::Infer => "infer".into(),
            crate::api::task::TaskMode::Train => "train".into(),
        }),
        encrypted: spec.encrypted.unwrap_or(false),
        kbs_resource_path: spec.kbs_resource_path.clone().unwrap_or_default(),
        proplet_id: client_id.map(str::to_string),
        priority: spec.priority,
        metadata: spec.metadata.clone().filter(Value::is_object),
        monitoring_profile,
        hal_storage_path: spec.hal_storage_path.clone(),
        parent_results: (!parents.is_empty()).then(|| parents.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(spec: Value) -> Task {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "watch", "namespace": "ns", "uid": "u-1"}, "spec": spec,
        }))
        .expect("task")
    }

    /// Upstream defect (upstream-spec §7): a broadcast start with a monitoring profile and no interval
    /// went out with `interval: 0`, which the real proplet rejects; ours carries its default of 10 s.
    #[test]
    fn a_broadcast_start_with_a_monitoring_profile_and_no_interval_carries_ten_seconds() {
        let t = task(
            serde_json::json!({"name": "watch", "functionName": "main", "file": "AGFzbQ==",
            "monitoringProfile": {"enabled": true, "collectCpu": true}}),
        );
        let start = start_request(&t, None, &BTreeMap::new());
        assert!(start.broadcast, "no proplet named: a broadcast");
        let wire = serde_json::to_value(&start).expect("json");
        assert_eq!(wire["monitoring_profile"]["interval"], 10, "{wire}");
        assert_eq!(wire["monitoring_profile"]["enabled"], true);
        // An explicit interval is kept, in whole seconds.
        let t = task(serde_json::json!({"name": "watch", "file": "AGFzbQ==",
            "monitoringProfile": {"enabled": true, "interval": "30s"}}));
        let wire =
            serde_json::to_value(start_request(&t, Some("c-1"), &BTreeMap::new())).expect("json");
        assert_eq!(wire["monitoring_profile"]["interval"], 30, "{wire}");
    }
}
