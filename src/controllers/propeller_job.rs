//! PropellerJob controller: checks the job's dependency graph before anything runs, creates one child
//! Task per `spec.tasks` entry (owned by the job, so deleting the job deletes them and their finalizers
//! stop what runs), and derives the job's status from its children and `taskRefs`.
//!
//! Every mode is expressed as Task dependencies, so the Task controller's dependency gate does the
//! ordering and nothing is kept in memory: `parallel` and `configurable` keep the spec's `dependsOn`
//! (sibling names, resolved to the child Tasks); `sequential` adds "depends on the previous task", with
//! `runIf: always` when `continueOnFailure` is set (otherwise a failure skips everything after it).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::now;
use super::runtime::{Waker, Watches};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::propeller_job::{ExecutionMode, JobPhase, PropellerJob, PropellerJobStatus};
use crate::api::task::{RunIf, Task, TaskPhase, TaskSpec};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::scheduling::dag;
use kube::runtime::reflector::{ObjectRef, Store};

/// Label on child Tasks: the job that made them.
pub const JOB_LABEL: &str = "propeller.propeller.abstractmachines.fr/job";
pub const SPEC_INDEX_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/spec-index";
pub const SPEC_NAME_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/spec-name";

/// The child Task name of the job's task `spec_name`: a DNS label whatever the names are.
pub fn child_name(job: &str, spec_name: &str) -> String {
    crate::naming::bounded_name(&format!("{job}-{spec_name}"), "", 63)
}

/// The job's graph (task name → the sibling names it waits for), including sequential order.
fn graph(job: &PropellerJob) -> std::result::Result<BTreeMap<String, Vec<String>>, String> {
    let mut nodes = BTreeMap::new();
    let tasks = job.spec.tasks.clone().unwrap_or_default();
    let mut previous: Option<&str> = None;
    for t in &tasks {
        if t.name.trim().is_empty() {
            return Err("every spec.tasks entry needs a name".into());
        }
        let mut deps = t.depends_on.clone().unwrap_or_default();
        if job.spec.execution_mode == ExecutionMode::Sequential
            && let Some(p) = previous
            && !deps.iter().any(|d| d == p)
        {
            deps.push(p.to_string());
        }
        for r in t.results_from.iter().flatten() {
            if !deps.contains(&r.task) {
                return Err(format!(
                    "task {:?}: resultsFrom names {:?}, which is not in its dependsOn",
                    t.name, r.task
                ));
            }
        }
        if nodes.insert(t.name.clone(), deps).is_some() {
            return Err(format!("two spec.tasks entries are named {:?}", t.name));
        }
        previous = Some(&t.name);
    }
    let children: BTreeSet<String> = nodes
        .keys()
        .map(|n| child_name(&job.name_any(), n))
        .collect();
    if children.len() != nodes.len() {
        return Err("two task names map to the same child Task name".into());
    }
    dag::validate(&nodes).map_err(|e| e.to_string())?;
    Ok(nodes)
}

/// The child Tasks of `job` (pure: unit-tested).
pub fn children(job: &PropellerJob) -> std::result::Result<Vec<Task>, String> {
    let nodes = graph(job)?;
    let job_name = job.name_any();
    let owner = job
        .controller_owner_ref(&())
        .ok_or("the job has no uid yet")?;
    let continue_on_failure = job.spec.continue_on_failure == Some(true);
    let mut out = Vec::new();
    for (i, t) in job.spec.tasks.iter().flatten().enumerate() {
        let mut spec: TaskSpec = t.clone();
        let deps = nodes.get(&t.name).cloned().unwrap_or_default();
        let sequential_dep = job.spec.execution_mode == ExecutionMode::Sequential && i > 0;
        spec.depends_on =
            (!deps.is_empty()).then(|| deps.iter().map(|d| child_name(&job_name, d)).collect());
        if let Some(sources) = spec.results_from.as_mut() {
            for s in sources {
                s.task = child_name(&job_name, &s.task);
            }
        }
        if sequential_dep && continue_on_failure && spec.run_if.is_none() {
            spec.run_if = Some(RunIf::Always);
        }
        spec.job_id = job.uid();
        let task: Task = serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {
                "name": child_name(&job_name, &t.name),
                "namespace": job.namespace(),
                "labels": {JOB_LABEL: crate::naming::bounded_name(&job_name, "", 63)},
                "annotations": {SPEC_INDEX_ANNOTATION: i.to_string(), SPEC_NAME_ANNOTATION: t.name},
                "ownerReferences": [owner],
            },
            "spec": spec,
        }))
        .map_err(|e| format!("task {:?}: {e}", t.name))?;
        out.push(task);
    }
    Ok(out)
}

/// Where a task stands, for the job's counts.
fn counted(phase: Option<TaskPhase>) -> &'static str {
    match phase {
        None | Some(TaskPhase::Pending) => "pending",
        Some(TaskPhase::Scheduled | TaskPhase::Running) => "running",
        Some(TaskPhase::Interrupted) => "interrupted",
        Some(TaskPhase::Completed) => "completed",
        Some(TaskPhase::Failed) => "failed",
        Some(TaskPhase::Skipped) => "skipped",
    }
}

/// The job's status from its tasks (children, then taskRefs; a missing one is pending).
pub fn progress(
    job: &PropellerJob,
    tasks: &[(String, Option<Arc<Task>>)],
    mut status: PropellerJobStatus,
) -> PropellerJobStatus {
    let g = job.metadata.generation;
    let mut n: BTreeMap<&str, i64> = BTreeMap::new();
    let mut failed_names = Vec::new();
    for (name, t) in tasks {
        let phase = t.as_ref().map(|t| t.phase());
        let bucket = counted(phase);
        *n.entry(bucket).or_default() += 1;
        if bucket == "failed" {
            failed_names.push(name.clone());
        }
    }
    let get = |k: &str| n.get(k).copied().unwrap_or(0);
    status.task_count = Some(tasks.len() as i64);
    status.pending_count = Some(get("pending"));
    status.running_count = Some(get("running"));
    status.completed_count = Some(get("completed"));
    status.failed_count = Some(get("failed"));
    status.skipped_count = Some(get("skipped"));
    status.interrupted_count = Some(get("interrupted"));
    status.observed_generation = g;
    status.created_at.get_or_insert_with(now);
    let done = get("completed") + get("failed") + get("skipped");
    let started = get("pending") < tasks.len() as i64 || tasks.is_empty();
    if started && status.start_time.is_none() {
        status.start_time = Some(now());
    }
    let phase = if done == tasks.len() as i64 {
        if get("failed") > 0 {
            JobPhase::Failed
        } else {
            JobPhase::Completed
        }
    } else if started {
        JobPhase::Running
    } else {
        JobPhase::Pending
    };
    let finished = matches!(phase, JobPhase::Completed | JobPhase::Failed);
    if finished && status.finish_time.is_none() {
        status.finish_time = Some(now());
    }
    status.phase = Some(phase);
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::True,
        "SpecValid",
        "the dependency graph is valid",
        g,
    );
    let running_msg = format!("{} of {} tasks done", done, tasks.len());
    set_condition(
        &mut status.conditions,
        "Running",
        if finished {
            ConditionStatus::False
        } else {
            ConditionStatus::True
        },
        if finished { "Finished" } else { "TasksRunning" },
        if finished {
            "every task ended"
        } else {
            &running_msg
        },
        g,
    );
    let (completed, reason, msg) = match phase {
        JobPhase::Completed => (
            ConditionStatus::True,
            "Succeeded",
            format!("{} completed, {} skipped", get("completed"), get("skipped")),
        ),
        JobPhase::Failed => (
            ConditionStatus::False,
            "TaskFailed",
            format!("failed: {}", failed_names.join(", ")),
        ),
        _ => (ConditionStatus::Unknown, "InProgress", running_msg.clone()),
    };
    set_condition(
        &mut status.conditions,
        "Completed",
        completed,
        reason,
        &msg,
        g,
    );
    status
}

/// Ignoring `updatedAt`, whether two statuses differ.
fn changed(a: &PropellerJobStatus, b: &PropellerJobStatus) -> bool {
    let strip = |s: &PropellerJobStatus| PropellerJobStatus {
        updated_at: None,
        ..s.clone()
    };
    strip(a) != strip(b)
}

/// What wakes a PropellerJob: its own changes and those of the tasks it counts (its own, and those named
/// in `taskRefs`).
pub fn wake_ups(ctx: &Arc<Context>, w: &mut Watches, me: &Waker<PropellerJob>) {
    w.propeller_jobs.wake_self(me);
    let c = Arc::clone(ctx);
    w.tasks
        .wake(me, move |t, _| jobs_counting(&c.propeller_jobs, t));
}

/// The PropellerJobs a task counts for: its owner, and those naming it in taskRefs.
fn jobs_counting(jobs: &Store<PropellerJob>, t: &Task) -> Vec<ObjectRef<PropellerJob>> {
    let ns = t.namespace();
    let name = t.name_any();
    let mut out: Vec<ObjectRef<PropellerJob>> = t
        .owner_references()
        .iter()
        .filter(|o| o.kind == "PropellerJob")
        .filter_map(|o| Some(ObjectRef::new(&o.name).within(ns.as_deref()?)))
        .collect();
    out.extend(
        jobs.state()
            .iter()
            .filter(|j| j.namespace() == ns)
            .filter(|j| j.spec.task_refs.iter().flatten().any(|r| r == &name))
            .map(|j| ObjectRef::from_obj(j.as_ref())),
    );
    out
}

pub async fn reconcile(job: Arc<PropellerJob>, ctx: Arc<Context>) -> Result<Action> {
    if job.metadata.deletion_timestamp.is_some() {
        // Children go with the job (ownerReferences); their finalizers stop what runs.
        return Ok(Action::await_change());
    }
    let old = job.status.clone().unwrap_or_default();
    let ns = job.namespace().unwrap_or_default();
    let desired = match children(&job) {
        Ok(c) => c,
        Err(msg) => return invalid(&job, &ctx, old, &msg).await,
    };
    // Create what is missing; an existing Task of that name must be ours.
    let api: Api<Task> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = job.uid().unwrap_or_default();
    for child in &desired {
        let existing = ctx
            .tasks
            .get(&kube::runtime::reflector::ObjectRef::from_obj(child));
        if let Some(e) = existing {
            if !e.owner_references().iter().any(|o| o.uid == uid) {
                let msg = format!(
                    "Task {} exists and does not belong to this job",
                    e.name_any()
                );
                return invalid(&job, &ctx, old, &msg).await;
            }
            continue;
        }
        match api.create(&PostParams::default(), child).await {
            Ok(_) => ctx.metrics.api_write("tasks", "create"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(Error::from(e)),
        }
    }
    let mut tasks: Vec<(String, Option<Arc<Task>>)> = desired
        .iter()
        .map(|c| {
            let found = ctx
                .tasks
                .get(&kube::runtime::reflector::ObjectRef::from_obj(c));
            (c.name_any(), found)
        })
        .collect();
    for r in job.spec.task_refs.iter().flatten() {
        let found = ctx
            .tasks
            .get(&kube::runtime::reflector::ObjectRef::new(r).within(&ns));
        tasks.push((r.clone(), found));
    }
    let mut status = progress(&job, &tasks, old.clone());
    if changed(&status, &old) {
        status.updated_at = Some(now());
        ctx.apply_status(job.as_ref(), &status).await?;
        let was = old.phase;
        if status.phase != was {
            let phase = status.phase.unwrap_or_default();
            info!(job = %job.name_any(), phase = ?phase, "PropellerJob phase");
            let (kind, reason) = match phase {
                JobPhase::Failed => (EventType::Warning, "Failed"),
                JobPhase::Completed => (EventType::Normal, "Completed"),
                _ => (EventType::Normal, "Running"),
            };
            let note = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Completed")
                .and_then(|c| c.message.clone())
                .unwrap_or_default();
            ctx.event(job.as_ref(), kind, reason, "Progress", note)
                .await;
        }
    }
    // Task changes wake the job; nothing to poll.
    Ok(Action::await_change())
}

/// `Ready=False, reason=InvalidSpec`, an Event and a log line; nothing is created.
async fn invalid(
    job: &PropellerJob,
    ctx: &Context,
    old: PropellerJobStatus,
    msg: &str,
) -> Result<Action> {
    let mut status = old.clone();
    let g = job.metadata.generation;
    status.observed_generation = g;
    status.phase.get_or_insert(JobPhase::Pending);
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        "InvalidSpec",
        msg,
        g,
    );
    if changed(&status, &old) {
        status.updated_at = Some(now());
        super::report_blocked(ctx, job, &old, &status, "InvalidSpec", "Validate", msg).await?;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(mode: &str, tasks: serde_json::Value) -> PropellerJob {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "PropellerJob",
            "metadata": {"name": "pipe", "namespace": "ns", "uid": "j-1"},
            "spec": {"name": "pipe", "executionMode": mode, "tasks": tasks},
        }))
        .expect("job")
    }

    fn deps(t: &Task) -> Vec<String> {
        t.spec.depends_on.clone().unwrap_or_default()
    }

    #[test]
    fn every_mode_resolves_sibling_names() {
        let tasks = json!([
            {"name": "a", "file": "AA=="},
            {"name": "B_step", "file": "AA==", "dependsOn": ["a"], "resultsFrom": [{"task": "a"}]},
            {"name": "c", "file": "AA=="},
        ]);
        for mode in ["parallel", "configurable"] {
            let c = children(&job(mode, tasks.clone())).expect("children");
            assert!(
                c[1].name_any().starts_with("pipe-b-step-"),
                "{}",
                c[1].name_any()
            );
            assert_eq!(deps(&c[1]), ["pipe-a"]);
            assert!(deps(&c[2]).is_empty());
            assert_eq!(
                c[1].spec.results_from.as_ref().map(|r| r[0].task.clone()),
                Some("pipe-a".into())
            );
            assert_eq!(c[0].spec.job_id.as_deref(), Some("j-1"));
            assert_eq!(c[0].owner_references()[0].uid, "j-1");
        }
        let c = children(&job("sequential", tasks)).expect("children");
        assert_eq!(deps(&c[2]), [c[1].name_any()]);
        assert_eq!(c[2].spec.run_if, None, "a failure stops the sequence");
    }

    #[test]
    fn continue_on_failure_runs_the_next_task_anyway() {
        let mut j = job(
            "sequential",
            json!([{"name": "a", "file": "AA=="}, {"name": "b", "file": "AA=="}]),
        );
        j.spec.continue_on_failure = Some(true);
        let c = children(&j).expect("children");
        assert_eq!(c[1].spec.run_if, Some(RunIf::Always));
    }

    #[test]
    fn cycles_unknown_names_and_duplicates_are_refused() {
        let e = children(&job(
            "configurable",
            json!([
                {"name": "a", "file": "AA==", "dependsOn": ["b"]},
                {"name": "b", "file": "AA==", "dependsOn": ["a"]},
            ]),
        ))
        .expect_err("cycle");
        assert_eq!(e, "dependency cycle: a -> b -> a");
        let e = children(&job(
            "parallel",
            json!([{"name": "a", "file": "AA==", "dependsOn": ["ghost"]}]),
        ))
        .expect_err("unknown");
        assert!(e.contains("ghost"), "{e}");
        let e = children(&job(
            "parallel",
            json!([{"name": "a", "file": "AA=="}, {"name": "a", "file": "AA=="}]),
        ))
        .expect_err("duplicate");
        assert!(e.contains("two"), "{e}");
    }

    #[test]
    fn the_phase_follows_the_tasks() {
        let j = job("parallel", json!([]));
        let t = |phase: &str| -> Option<Arc<Task>> {
            Some(Arc::new(
                serde_json::from_value(json!({
                    "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
                    "metadata": {"name": "t"}, "spec": {"name": "t"}, "status": {"phase": phase},
                }))
                .expect("task"),
            ))
        };
        let s = progress(
            &j,
            &[("a".into(), t("completed")), ("b".into(), t("running"))],
            Default::default(),
        );
        assert_eq!(
            (s.phase, s.completed_count, s.running_count),
            (Some(JobPhase::Running), Some(1), Some(1))
        );
        let s = progress(
            &j,
            &[("a".into(), t("completed")), ("b".into(), t("skipped"))],
            Default::default(),
        );
        assert_eq!(s.phase, Some(JobPhase::Completed));
        let s = progress(
            &j,
            &[("a".into(), t("failed")), ("b".into(), t("skipped"))],
            s,
        );
        assert_eq!(s.phase, Some(JobPhase::Failed));
        assert!(s.finish_time.is_some());
        let s = progress(&j, &[("a".into(), None)], Default::default());
        assert_eq!(
            s.phase,
            Some(JobPhase::Pending),
            "a missing taskRef is pending"
        );
        assert_eq!(
            progress(&j, &[], Default::default()).phase,
            Some(JobPhase::Completed)
        );
    }
}
