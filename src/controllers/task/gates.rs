//! Whether a task may be placed yet: a valid spec, no dependency cycle, dependencies done (or not, as
//! `runIf` asks).
use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::api::task::{ResultTarget, RunIf, Task, TaskPhase};
use crate::context::Context;
use crate::controllers::schedule;

/// Spec problems the API server may not catch (CEL is ignored by old servers) or cannot express.
pub fn validate(task: &Task) -> std::result::Result<(), String> {
    let spec = &task.spec;
    for (i, v) in spec.inputs.iter().flatten().enumerate() {
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            return Err(format!(
                "spec.inputs[{i}] must be a string or a number, not {v}"
            ));
        }
    }
    let has_file = spec.file.as_deref().is_some_and(|f| !f.trim().is_empty());
    let has_image = spec
        .image_url
        .as_deref()
        .is_some_and(|u| !u.trim().is_empty());
    if spec.encrypted == Some(true) {
        if !has_image || has_file {
            return Err("an encrypted task needs spec.imageUrl and no spec.file".into());
        }
    } else if !has_file && !has_image {
        return Err(
            "spec.file or spec.imageUrl is required (a proplet drops a start without either)"
                .into(),
        );
    }
    if spec.broadcast == Some(true)
        && spec
            .proplet_selector
            .as_ref()
            .and_then(|s| s.proplet_id.as_deref())
            .is_some_and(|id| !id.is_empty())
    {
        return Err("broadcast must not be set when propletSelector.propletId is specified".into());
    }
    if let Some(p) = spec.restart_policy.as_deref()
        && !matches!(p, "Always" | "OnFailure" | "Never")
    {
        return Err(format!(
            "spec.restartPolicy must be Always, OnFailure or Never, not {p:?}"
        ));
    }
    if let Some(interval) = spec
        .monitoring_profile
        .as_ref()
        .and_then(|m| m.interval.as_deref())
    {
        interval
            .parse::<kube::core::Duration>()
            .map_err(|e| format!("spec.monitoringProfile.interval {interval:?}: {e}"))?;
    }
    if spec.depends_on.as_ref().is_some_and(|d| !d.is_empty())
        && spec.workflow_id.as_deref().unwrap_or_default().is_empty()
        && spec.job_id.as_deref().unwrap_or_default().is_empty()
    {
        return Err("workflowId or jobId is required when dependsOn is specified".into());
    }
    if spec
        .depends_on
        .iter()
        .flatten()
        .any(|d| d == &task.name_any())
    {
        return Err("a task cannot depend on itself".into());
    }
    schedule::schedule_of(task)?;
    for source in spec.results_from.iter().flatten() {
        if !spec.depends_on.iter().flatten().any(|d| d == &source.task) {
            return Err(format!(
                "spec.resultsFrom names {:?}, which is not in dependsOn",
                source.task
            ));
        }
        let name = source.env_name();
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if source.target == ResultTarget::Env && !valid {
            return Err(format!(
                "spec.resultsFrom env {name:?} is not a valid variable name"
            ));
        }
    }
    Ok(())
}

/// A dependency cycle through the Tasks `task` depends on (directly or not), in its namespace.
pub(super) fn dependency_cycle(task: &Task, ctx: &Context) -> Option<String> {
    task.spec.depends_on.as_ref().filter(|d| !d.is_empty())?;
    let ns = task.namespace();
    let all = ctx.tasks.state();
    let deps_of = |name: &str| -> Option<Vec<String>> {
        if name == task.name_any() {
            return Some(task.spec.depends_on.clone().unwrap_or_default());
        }
        all.iter()
            .find(|t| t.namespace() == ns && t.name_any() == name)
            .map(|t| t.spec.depends_on.clone().unwrap_or_default())
    };
    let mut nodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo = vec![task.name_any()];
    while let Some(name) = todo.pop() {
        if nodes.contains_key(&name) {
            continue;
        }
        let deps = deps_of(&name).unwrap_or_default();
        todo.extend(deps.iter().cloned());
        nodes.insert(name, deps);
    }
    // Dependencies not created yet are waited for, not errors.
    let known: Vec<String> = nodes
        .keys()
        .filter(|n| deps_of(n).is_some())
        .cloned()
        .collect();
    for deps in nodes.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    nodes.retain(|n, _| known.contains(n));
    crate::scheduling::dag::validate(&nodes)
        .err()
        .map(|e| e.to_string())
}

/// Waits for dependencies (`dependsOn`, same namespace). `Ok(None)`: go ahead.
/// The phase of each dependency of `task`: from the cache, and for a shard (whose cache holds only its
/// own Tasks) from the API server for those it does not hold.
pub(super) async fn dependency_phases(
    task: &Task,
    ctx: &Context,
) -> crate::error::Result<std::collections::HashMap<String, TaskPhase>> {
    let ns = task.namespace();
    let mut phases = std::collections::HashMap::new();
    for dep in task.spec.depends_on.iter().flatten() {
        let cached = ctx
            .tasks
            .state()
            .into_iter()
            .find(|t| t.namespace() == ns && &t.name_any() == dep)
            .map(|t| t.phase());
        let phase = match (cached, ns.as_deref()) {
            (Some(p), _) => Some(p),
            (None, Some(ns)) if ctx.ownership.is_sharded() => {
                let api: kube::Api<Task> = kube::Api::namespaced(ctx.client.clone(), ns);
                api.get_opt(dep).await?.map(|t| t.phase())
            }
            (None, _) => None,
        };
        phases.extend(phase.map(|p| (dep.clone(), p)));
    }
    Ok(phases)
}

pub(super) fn dependency_gate(
    task: &Task,
    phases: &std::collections::HashMap<String, TaskPhase>,
) -> std::result::Result<Option<String>, String> {
    let Some(deps) = task.spec.depends_on.as_ref().filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let mut failed = Vec::new();
    for dep in deps {
        match phases.get(dep).copied() {
            None => return Ok(Some(format!("waiting for dependency {dep} (not found)"))),
            Some(TaskPhase::Completed) => {}
            Some(p) if p.is_terminal() => failed.push(dep.clone()),
            Some(p) => {
                return Ok(Some(format!(
                    "waiting for dependency {dep} ({})",
                    p.as_str()
                )));
            }
        }
    }
    let run = match task.spec.run_if.unwrap_or(RunIf::Success) {
        RunIf::Success => failed.is_empty(),
        RunIf::Failure => !failed.is_empty(),
        RunIf::Always => true,
    };
    if run {
        Ok(None)
    } else {
        Err(match task.spec.run_if.unwrap_or(RunIf::Success) {
            RunIf::Success => format!("dependencies did not succeed: {}", failed.join(", ")),
            RunIf::Failure | RunIf::Always => "no dependency failed (runIf: failure)".to_string(),
        })
    }
}
