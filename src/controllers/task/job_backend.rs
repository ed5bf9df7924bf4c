//! Job backend: a task placed on a `type: k8s` proplet runs as a Kubernetes Job of the Wasm runner
//! (`wasm-runner`), which writes the proplet's results message as its termination message. The module
//! comes from a ConfigMap (`spec.file`) or an http(s) URL (`spec.imageUrl`). Job and ConfigMap are owned by
//! the Task, so deleting the Task removes them and the Job's pods (garbage collection, background
//! propagation). Two status writes per task: running (with the Job's name) and the outcome.
use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::info;

use super::launch::{timeout_of, write_status};
use super::outcome::{Ending, announce, end_task, refuse, settle};
use super::wire::{parent_results, start_request};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::Proplet;
use crate::api::task::{Task, TaskPhase, TaskStatus};
use crate::context::{Context, MANAGER};
use crate::controllers::now;
use crate::error::{Error, Result};
use crate::mqtt::wire::{TaskResult, decode_result};

/// Label on Jobs, ConfigMaps and pods: the Task they run.
pub const TASK_LABEL: &str = "propeller.propeller.abstractmachines.fr/task";
/// Label on Jobs and pods: the Proplet the task was placed on.
pub const PROPLET_LABEL: &str = "propeller.propeller.abstractmachines.fr/proplet";
/// Label selecting everything this backend creates (the operator watches Jobs with it).
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=propeller-operator";
pub const RUNNER_CONTAINER: &str = "wasm-runner";
const MODULE_KEY: &str = "module.wasm";
const MODULE_DIR: &str = "/var/run/propeller/module";
/// A ConfigMap holds at most 1 MiB; larger modules must be served over http(s).
pub const MAX_CONFIGMAP_MODULE_BYTES: usize = 1024 * 1024;
/// The `job-name` label the Job controller puts on pods limits Job names to a label's 63 characters.
const MAX_JOB_NAME: usize = 63;

/// Why a task cannot run as a Job, whatever proplet it lands on.
pub fn unsupported(task: &Task) -> Option<String> {
    let spec = &task.spec;
    if spec.daemon == Some(true) {
        return Some(
            "daemon tasks cannot run as Kubernetes Jobs (a Job must end): place it on an external \
             proplet, or run the operator with --k8s-task-backend=mqtt"
                .into(),
        );
    }
    if spec.encrypted == Some(true) {
        return Some(
            "encrypted tasks need a proplet's key broker client: place it on an external proplet, or \
             run the operator with --k8s-task-backend=mqtt"
                .into(),
        );
    }
    let has_file = spec.file.as_deref().is_some_and(|f| !f.trim().is_empty());
    let url = spec.image_url.as_deref().unwrap_or_default().trim();
    if !(has_file || url.starts_with("http://") || url.starts_with("https://")) {
        return Some(format!(
            "imageUrl {url:?} is a registry reference, which only proplets resolve: give spec.file or \
             an http(s) URL, or run the operator with --k8s-task-backend=mqtt"
        ));
    }
    None
}

/// The Job (and ConfigMap) of a task's `attempt`-th dispatch.
pub fn job_name(task: &Task, attempt: i32) -> String {
    crate::naming::bounded_name(&task.name_any(), &format!("-{attempt}"), MAX_JOB_NAME)
}

/// What the backend creates for one dispatch.
#[derive(Debug)]
pub struct Plan {
    pub config_map: Option<ConfigMap>,
    pub job: Job,
}

/// A spec problem found while planning: (condition reason, message).
pub type Refusal = (&'static str, String);

/// The objects for running `task` on `proplet` (pure: unit-tested without a cluster).
pub fn plan(
    task: &Task,
    proplet: &Proplet,
    attempt: i32,
    ctx_image: &str,
    timeout_secs: u64,
    max_attempts: i32,
    parents: &BTreeMap<String, Value>,
) -> std::result::Result<Plan, Refusal> {
    let name = job_name(task, attempt);
    let ns = task.namespace();
    let owner = task
        .controller_owner_ref(&())
        .ok_or(("InvalidSpec", "the Task has no uid yet".to_string()))?;
    let client_id = proplet.client_id();
    let start = start_request(task, Some(&client_id), parents);
    let labels = json!({
        "app.kubernetes.io/name": "propeller-task",
        "app.kubernetes.io/managed-by": MANAGER,
        TASK_LABEL: crate::naming::bounded_name(&task.name_any(), "", 63),
        PROPLET_LABEL: crate::naming::bounded_name(&proplet.name_any(), "", 63),
    });

    let module_bytes = if start.file.is_empty() {
        None
    } else {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&start.file)
            .map_err(|e| ("InvalidSpec", format!("spec.file is not base64: {e}")))?;
        if bytes.len() > MAX_CONFIGMAP_MODULE_BYTES {
            return Err((
                "ModuleTooLarge",
                format!(
                    "the module is {} bytes; a ConfigMap holds at most {MAX_CONFIGMAP_MODULE_BYTES}: \
                     serve it over http(s) with spec.imageUrl instead of spec.file",
                    bytes.len()
                ),
            ));
        }
        Some(bytes)
    };

    let mut args = vec![format!("--function={}", start.name)];
    args.extend(start.inputs.iter().map(|i| format!("--input={i}")));
    let env_map = start.env.clone().unwrap_or_default();
    args.extend(env_map.keys().map(|k| format!("--pass-env={k}")));
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    match module_bytes {
        Some(_) => {
            args.push(format!("--module-file={MODULE_DIR}/{MODULE_KEY}"));
            volumes.push(json!({"name": "module", "configMap": {"name": name}}));
            mounts.push(json!({"name": "module", "mountPath": MODULE_DIR, "readOnly": true}));
        }
        None => args.push(format!("--module-url={}", start.image_url.trim())),
    }
    if !start.cli_args.is_empty() {
        args.push("--".into());
        args.extend(start.cli_args.iter().cloned());
    }
    let env: Vec<Value> = env_map
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();

    // Tasks run where their proplet's pods may run.
    let node_selector = proplet
        .spec
        .k8s
        .as_ref()
        .and_then(|k| k.node_selector.clone())
        .unwrap_or_default();
    let mut resources = BTreeMap::new();
    if let Some(r) = &task.spec.resource_requirements {
        if let Some(cpu) = &r.cpu {
            resources.insert("cpu".to_string(), cpu.clone());
        }
        if let Some(mem) = &r.memory {
            resources.insert("memory".to_string(), mem.clone());
        }
        for (k, v) in r.custom.iter().flatten() {
            resources.insert(k.clone(), v.clone());
        }
    }
    let resources = if resources.is_empty() {
        json!({})
    } else {
        json!({"requests": resources, "limits": resources})
    };
    // Jobs accept Never and OnFailure only; Always (or nothing) means "retry", which OnFailure is.
    let never = task.spec.restart_policy.as_deref() == Some("Never");
    let backoff_limit =
        task.spec
            .backoff_limit
            .unwrap_or(if never { 0 } else { (max_attempts - 1).max(0) });

    let config_map = module_bytes.map(|bytes| {
        serde_json::from_value::<ConfigMap>(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
            "binaryData": {MODULE_KEY: base64::engine::general_purpose::STANDARD.encode(bytes)},
        }))
    });
    let config_map = config_map
        .transpose()
        .map_err(|e| ("InvalidSpec", format!("ConfigMap: {e}")))?;
    let job = serde_json::from_value::<Job>(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
        "spec": {
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": timeout_secs,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": if never { "Never" } else { "OnFailure" },
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "containers": [{
                        "name": RUNNER_CONTAINER,
                        "image": ctx_image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": args,
                        "env": env,
                        "resources": resources,
                        "volumeMounts": mounts,
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "runAsUser": 65532,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                    "volumes": volumes,
                    "nodeSelector": node_selector,
                },
            },
        },
    }))
    .map_err(|e| ("InvalidSpec", format!("Job: {e}")))?;
    Ok(Plan { config_map, job })
}

/// Creates the Job (and its ConfigMap) for `task` on `proplet` and records the task as running.
pub async fn dispatch(
    task: &Task,
    ctx: &Context,
    mut status: TaskStatus,
    proplet: &Proplet,
) -> Result<Action> {
    let g = task.metadata.generation;
    let attempt = status.attempts.unwrap_or(0) + 1;
    let timeout = timeout_of(task, ctx);
    let plan = match plan(
        task,
        proplet,
        attempt,
        &ctx.config.wasm_runner_image,
        timeout.as_secs(),
        ctx.config.max_task_attempts,
        &parent_results(task, ctx),
    ) {
        Ok(p) => p,
        Err((reason, msg)) => return refuse(task, ctx, status, reason, &msg).await,
    };
    let ns = task.namespace().unwrap_or_default();
    let uid = task.uid().unwrap_or_default();
    if let Some(cm) = &plan.config_map {
        create_or_adopt(
            ctx,
            Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns),
            cm,
            &uid,
        )
        .await?;
    }
    let job_name = plan.job.name_any();
    create_or_adopt(
        ctx,
        Api::<Job>::namespaced(ctx.client.clone(), &ns),
        &plan.job,
        &uid,
    )
    .await?;

    let client_id = proplet.client_id();
    status.phase = Some(TaskPhase::Running);
    status.assigned_proplet = Some(proplet.name_any());
    status.assigned_client_id = Some(client_id);
    status.attempts = Some(attempt);
    status.job_name = Some(job_name.clone());
    status.started_at = Some(now());
    status.error = None;
    status.results = None;
    set_condition(
        &mut status.conditions,
        "Scheduled",
        ConditionStatus::True,
        "Assigned",
        &format!("placed on k8s proplet {}", proplet.name_any()),
        g,
    );
    let msg = format!("Job {job_name} created");
    set_condition(
        &mut status.conditions,
        "Started",
        ConditionStatus::True,
        "JobCreated",
        &msg,
        g,
    );
    // A conflict leaves the Job in place: the next pass computes the same name and adopts it.
    write_status(ctx, task, status.clone()).await?;
    if let Some(created) = task.metadata.creation_timestamp.as_ref() {
        let secs = jiff::Timestamp::now()
            .duration_since(created.0)
            .as_secs_f64();
        ctx.metrics.task_dispatch_seconds.observe(secs.max(0.0));
    }
    info!(task = %task.name_any(), job = %job_name, "task dispatched as a Job");
    ctx.routine_event(task, "Dispatched", "Dispatch", msg).await;
    // The Job watch wakes the task; the requeue only guards against a missed event.
    Ok(Action::requeue(
        timeout + std::time::Duration::from_secs(30),
    ))
}

/// Creates `obj`; an object of that name already there is fine if it belongs to this task (an earlier
/// pass created it and stopped before recording it), and an error otherwise.
async fn create_or_adopt<K>(ctx: &Context, api: Api<K>, obj: &K, task_uid: &str) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize,
    K: std::fmt::Debug,
{
    let plural = K::plural(&()).to_string();
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => {
            ctx.metrics.api_write(&plural, "create");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&obj.name_any()).await?;
            if existing
                .owner_references()
                .iter()
                .any(|o| o.uid == task_uid)
            {
                Ok(())
            } else {
                Err(Error::Conflict(format!(
                    "{plural} {} exists and does not belong to this Task",
                    obj.name_any()
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// What a Job's status says about the task.
#[derive(Debug, PartialEq)]
pub enum JobState {
    Running,
    Succeeded,
    /// (reason, message) of the Job's Failed condition.
    Failed(String, String),
}

pub fn job_state(job: &Job) -> JobState {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .cloned()
        .unwrap_or_default();
    for c in conditions.iter().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Complete" => return JobState::Succeeded,
            "Failed" => {
                return JobState::Failed(
                    c.reason.clone().unwrap_or_else(|| "Failed".into()),
                    c.message.clone().unwrap_or_else(|| "the Job failed".into()),
                );
            }
            _ => {}
        }
    }
    JobState::Running
}

/// The runner's results message from the pods of a Job: the latest termination message of the runner
/// container (a restarted container's previous message counts too), preferring a successful run.
pub fn runner_result(pods: &[Pod]) -> Option<TaskResult> {
    let mut found: Vec<(bool, String, TaskResult)> = Vec::new();
    for pod in pods {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        for cs in statuses.iter().filter(|c| c.name == RUNNER_CONTAINER) {
            let states = [
                cs.state.as_ref().and_then(|s| s.terminated.as_ref()),
                cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()),
            ];
            for t in states.into_iter().flatten() {
                let Some(result) = t
                    .message
                    .as_deref()
                    .and_then(|m| decode_result(m.as_bytes()).ok())
                else {
                    continue;
                };
                let finished = t
                    .finished_at
                    .as_ref()
                    .map(|f| f.0.to_string())
                    .unwrap_or_default();
                found.push((t.exit_code == 0, finished, result));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    found.pop().map(|(_, _, r)| r)
}

/// The label selector of a Job's pods (the Job controller's `controller-uid`).
pub fn pod_selector(job: &Job) -> String {
    job.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.match_labels.as_ref())
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_else(|| format!("job-name={}", job.name_any()))
}

/// A running Job-backed task: waits for the Job to end, then records the runner's result.
pub async fn watch(task: &Task, ctx: &Context) -> Result<Action> {
    let mut status = task.status.clone().unwrap_or_default();
    let name = status.job_name.clone().unwrap_or_default();
    let ns = task.namespace().unwrap_or_default();
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &ns);
    let cached = ctx.jobs.get(&ObjectRef::new(&name).within(&ns));
    let job = match cached {
        Some(j) => Some((*j).clone()),
        // Not yet in the cache (just created) or deleted: ask the API server.
        None => jobs.get_opt(&name).await?,
    };
    let Some(job) = job else {
        let end = Ending {
            phase: TaskPhase::Interrupted,
            reason: "Interrupted",
            event: Some((EventType::Warning, "Watch")),
            error: false,
        };
        end_task(task, ctx, status, end, format!("Job {name} was deleted")).await?;
        return Ok(Action::requeue(std::time::Duration::from_millis(200)));
    };
    let state = job_state(&job);
    if state == JobState::Running {
        return Ok(Action::requeue(
            timeout_of(task, ctx) + std::time::Duration::from_secs(30),
        ));
    }
    let selector = pod_selector(&job);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await?;
    let from_runner = runner_result(&pods.items);
    let g = task.metadata.generation;
    match (state, from_runner) {
        (JobState::Succeeded, Some(result)) if result.failure().is_none() => {
            settle(&mut status, &result, g);
        }
        (JobState::Succeeded, _) => {
            status.phase = Some(TaskPhase::Completed);
            status.finished_at = Some(now());
            status.results = None;
            set_condition(
                &mut status.conditions,
                "Completed",
                ConditionStatus::True,
                "Succeeded",
                "the Job succeeded but its pod left no result (no termination message)",
                g,
            );
        }
        (JobState::Failed(reason, msg), result) => {
            let timeout = reason == "DeadlineExceeded";
            let runner_error = result
                .as_ref()
                .and_then(|r| r.failure().map(str::to_string));
            let msg = match runner_error {
                Some(e) if !timeout => e,
                _ => format!("Job {name} failed ({reason}): {msg}"),
            };
            let end = Ending {
                phase: TaskPhase::Failed,
                reason: if timeout { "Timeout" } else { "JobFailed" },
                event: Some((EventType::Warning, "Result")),
                error: true,
            };
            end_task(task, ctx, status, end, msg).await?;
            return Ok(Action::await_change());
        }
        (JobState::Running, _) => return Ok(Action::await_change()),
    }
    write_status(ctx, task, status.clone()).await?;
    announce(task, ctx, &status).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };

    const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

    fn task(spec: Value) -> Task {
        let mut t: Task = serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {"name": "add", "namespace": "ns", "uid": "u-1"},
            "spec": spec,
        }))
        .expect("task");
        t.metadata.generation = Some(1);
        t
    }

    fn proplet() -> Proplet {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Proplet",
            "metadata": {"name": "pool", "namespace": "ns", "uid": "p-1"},
            "spec": {"type": "k8s", "k8s": {"image": "img", "nodeSelector": {"pool": "edge"}},
                     "connectionConfig": {"mqttAddress": "tcp://m:1883", "domainId": "d", "channelId": "c", "clientId": "cid", "clientKey": "secret"}},
        }))
        .expect("proplet")
    }

    #[test]
    fn a_file_task_becomes_a_configmap_and_a_job() {
        let t = task(
            json!({"name": "add", "file": ADD, "functionName": "add", "inputs": [40, -2],
                            "env": {"A": "1"}, "resourceRequirements": {"cpu": "500m", "memory": "64Mi"},
                            "cliArgs": ["x"]}),
        );
        let plan = plan(&t, &proplet(), 1, "runner:1", 600, 3, &BTreeMap::new()).expect("plan");
        let cm = plan.config_map.expect("configmap");
        assert_eq!(cm.name_any(), "add-1");
        let module = cm
            .binary_data
            .as_ref()
            .and_then(|d| d.get(MODULE_KEY))
            .expect("module");
        assert_eq!(
            module.0,
            base64::engine::general_purpose::STANDARD
                .decode(ADD)
                .expect("b64")
        );
        let job = serde_json::to_value(&plan.job).expect("json");
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(job["spec"]["backoffLimit"], 2);
        assert_eq!(job["spec"]["activeDeadlineSeconds"], 600);
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "OnFailure");
        assert_eq!(
            pod["nodeSelector"]["pool"], "edge",
            "runs where the proplet runs"
        );
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "runner:1");
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            args,
            [
                "--function=add",
                "--input=40",
                "--input=-2",
                "--pass-env=A",
                "--pass-env=PROPLET_ID",
                "--pass-env=TASK_ID",
                "--module-file=/var/run/propeller/module/module.wasm",
                "--",
                "x"
            ]
        );
        assert_eq!(c["resources"]["limits"]["cpu"], "500m");
        assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
        let env = serde_json::to_string(&c["env"]).expect("env");
        assert!(env.contains("\"TASK_ID\"") && env.contains("\"u-1\"") && env.contains("\"cid\""));
        assert!(!env.contains("secret"), "no proplet key in a task pod");
    }

    #[test]
    fn url_tasks_restart_policy_and_backoff() {
        let t = task(
            json!({"name": "add", "imageUrl": "https://example.com/add.wasm",
                            "restartPolicy": "Never"}),
        );
        let plan = plan(&t, &proplet(), 2, "runner:1", 60, 3, &BTreeMap::new()).expect("plan");
        assert!(plan.config_map.is_none());
        let job = serde_json::to_value(&plan.job).expect("json");
        assert_eq!(job["metadata"]["name"], "add-2");
        assert_eq!(job["spec"]["backoffLimit"], 0);
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert!(
            pod["containers"][0]["args"]
                .as_array()
                .expect("args")
                .contains(&json!("--module-url=https://example.com/add.wasm"))
        );
        let t = task(json!({"name": "add", "imageUrl": "https://e/x.wasm", "backoffLimit": 5}));
        let job = serde_json::to_value(&plan_of(&t).job).expect("json");
        assert_eq!(job["spec"]["backoffLimit"], 5);
    }

    fn plan_of(t: &Task) -> Plan {
        plan(t, &proplet(), 1, "r", 60, 3, &BTreeMap::new()).expect("plan")
    }

    #[test]
    fn too_big_modules_daemons_and_registry_references_are_refused() {
        let big =
            base64::engine::general_purpose::STANDARD
                .encode(vec![0u8; MAX_CONFIGMAP_MODULE_BYTES + 1]);
        let t = task(json!({"name": "big", "file": big}));
        let err = plan(&t, &proplet(), 1, "r", 60, 3, &BTreeMap::new()).expect_err("too big");
        assert_eq!(err.0, "ModuleTooLarge");
        assert!(err.1.contains("imageUrl"), "{}", err.1);
        assert!(unsupported(&task(json!({"name": "d", "file": ADD, "daemon": true}))).is_some());
        assert!(unsupported(&task(json!({"name": "r", "imageUrl": "registry/add:1"}))).is_some());
        assert!(unsupported(&task(json!({"name": "ok", "file": ADD}))).is_none());
    }

    fn pod(exit: i32, message: &str, finished: &str) -> Pod {
        Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: RUNNER_CONTAINER.into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: exit,
                            message: Some(message.into()),
                            finished_at: Some(
                                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                    finished.parse().expect("time"),
                                ),
                            ),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_result_comes_from_the_runner_pods() {
        let ok = r#"{"task_id":"u-1","results":"42","error":""}"#;
        let bad = r#"{"task_id":"u-1","results":"","error":"trap"}"#;
        let pods = [
            pod(1, bad, "2026-01-01T00:00:02Z"),
            pod(0, ok, "2026-01-01T00:00:01Z"),
        ];
        let r = runner_result(&pods).expect("result");
        assert_eq!(r.results, json!("42"));
        let pods = [
            pod(1, bad, "2026-01-01T00:00:02Z"),
            pod(1, "not json", "2026-01-01T00:00:03Z"),
        ];
        assert_eq!(
            runner_result(&pods).and_then(|r| r.error),
            Some("trap".into())
        );
        assert!(runner_result(&[]).is_none());
    }
}
