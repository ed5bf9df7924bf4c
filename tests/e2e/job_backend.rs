//! The Job backend on a real API server and kube-controller-manager (its Job controller and garbage
//! collector). No kubelet runs here, so the test plays the kubelet's part: it runs the Job pod's container
//! — the real `wasm-runner` binary with the pod's args, env and the module from its ConfigMap — and writes
//! the pod's terminated state (phase, exit code, termination message) into the pod's status. The Job
//! controller then writes the Job's status, which the operator reads. Proplets carry a nodeSelector no
//! node matches, so on a cluster with nodes the Job pods stay unscheduled and the test is still the kubelet.
use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::api::{Proplet, Task};
use propeller_operator::config::OperatorConfig;
use propeller_operator::controllers::task::job_backend::pod_selector;
use propeller_operator::testbed;
use serde_json::{Value, json};

use crate::support::{CHANNEL, DOMAIN, Env, WAIT};

/// The addition module of the real proplet's repository (export `add`).
const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";
const NO_NODE: &str = "propeller-e2e/no-such-node";

/// A Running `type: k8s` Proplet named `name`: a simulated proplet heartbeats with its clientId, as the
/// proplet pods of its Deployment would.
async fn k8s_pool(env: &mut Env, name: &str) -> anyhow::Result<propeller_operator::sim::SimHandle> {
    let client_id = format!("{name}-client");
    let sim = env.proplet(&client_id, |_| {}).await?;
    env.create::<Proplet>(json!({
        "metadata": {"name": name},
        "spec": {"type": "k8s",
                 "k8s": {"image": "ghcr.io/absmach/propeller/proplet:latest", "nodeSelector": {NO_NODE: "true"}},
                 "connectionConfig": {"domainId": DOMAIN, "channelId": CHANNEL, "clientId": client_id,
                                      "clientKey": format!("{client_id}-key"), "mqttAddress": env.broker.address()}},
    }))
    .await?;
    env.wait_for(
        &env.proplets(),
        name,
        &format!("{name} Running"),
        |p: &Proplet| p.phase() == PropletPhase::Running,
    )
    .await?;
    Ok(sim)
}

/// The Job's pods that have not terminated yet (created by the Job controller).
async fn waiting_pod(env: &Env, job: &Job) -> anyhow::Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &env.ns);
    let selector = pod_selector(job);
    testbed::wait_for(
        env.cluster,
        &format!("a pending pod of Job {}", job.name_any()),
        WAIT,
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            list.items.into_iter().find(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                !matches!(phase.as_deref(), Some("Succeeded" | "Failed"))
            })
        },
    )
    .await
}

/// What the kubelet would do with the pod: run its container, the real runner binary.
async fn run_container(env: &Env, pod: &Pod) -> anyhow::Result<(i32, String)> {
    let spec = pod.spec.clone().unwrap_or_default();
    let container = spec
        .containers
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the pod has no container"))?;
    let dir = std::env::temp_dir().join(format!("kubelet-{}-{}", env.ns, pod.name_any()));
    std::fs::create_dir_all(&dir)?;
    // The ConfigMap volume, as the kubelet mounts it.
    let mut mounted = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let Some(cm_name) = v.config_map.as_ref().map(|c| c.name.clone()) else {
            continue;
        };
        let cm = Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns)
            .get(&cm_name)
            .await?;
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == v.name)
            .map(|m| m.mount_path.clone())
            .ok_or_else(|| anyhow::anyhow!("volume {} is not mounted", v.name))?;
        for (key, bytes) in cm.binary_data.iter().flatten() {
            let local = dir.join(key);
            std::fs::write(&local, &bytes.0)?;
            mounted.insert(format!("{mount}/{key}"), local.display().to_string());
        }
    }
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|a| match a.strip_prefix("--module-file=") {
            Some(path) => format!(
                "--module-file={}",
                mounted.get(path).cloned().unwrap_or_default()
            ),
            None => a.clone(),
        })
        .collect();
    let log = dir.join("termination-log");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-runner"))
        .arg(format!("--termination-log={}", log.display()))
        .args(&args)
        .env_clear()
        .envs(
            container
                .env
                .iter()
                .flatten()
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())),
        )
        .output()?;
    let message = std::fs::read_to_string(&log).unwrap_or_default();
    Ok((out.status.code().unwrap_or(-1), message))
}

/// Writes the pod's terminated state, as the kubelet reports it.
async fn terminate(
    env: &Env,
    pod: &Pod,
    exit: i32,
    reason: &str,
    message: &str,
) -> anyhow::Result<()> {
    let now = serde_json::to_value(Time(jiff::Timestamp::now()))?;
    let phase = if exit == 0 { "Succeeded" } else { "Failed" };
    let status = json!({"status": {
        "phase": phase,
        "containerStatuses": [{
            "name": "wasm-runner", "image": "wasm-runner", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit, "reason": reason, "message": message,
                                     "startedAt": now, "finishedAt": now}},
        }],
    }});
    Api::<Pod>::namespaced(env.admin.clone(), &env.ns)
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(())
}

fn job_condition(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

#[tokio::test]
async fn a_task_on_a_k8s_proplet_runs_as_a_job() -> anyhow::Result<()> {
    let mut env = Env::start("jobs", &["--k8s-task-backend=job"]).await?;
    let sim = k8s_pool(&mut env, "pool").await?;
    let task = env
        .create::<Task>(json!({
            "metadata": {"name": "addition"},
            "spec": {"name": "addition", "functionName": "add", "file": ADD, "inputs": [40, 2],
                     "preferredPropletType": "k8s", "restartPolicy": "Never", "backoffLimit": 1,
                     "env": {"GREETING": "hi"},
                     "resourceRequirements": {"cpu": "100m", "memory": "32Mi"}},
        }))
        .await?;
    let t = env
        .wait_for(&env.tasks(), "addition", "the task to run", |t: &Task| {
            t.phase() == TaskPhase::Running
        })
        .await?;
    let st = t.status.clone().unwrap_or_default();
    assert_eq!(st.job_name.as_deref(), Some("addition-1"));
    assert_eq!(st.assigned_proplet.as_deref(), Some("pool"));

    // The Job and ConfigMap, owned by the Task.
    let jobs: Api<Job> = Api::namespaced(env.admin.clone(), &env.ns);
    let job = jobs.get("addition-1").await?;
    let task_uid = task.uid().unwrap_or_default();
    assert!(
        job.owner_references()
            .iter()
            .any(|o| o.uid == task_uid && o.controller == Some(true))
    );
    let j = serde_json::to_value(&job)?;
    assert_eq!(j["spec"]["backoffLimit"], 1);
    let pod_spec = &j["spec"]["template"]["spec"];
    assert_eq!(pod_spec["restartPolicy"], "Never");
    assert_eq!(pod_spec["nodeSelector"][NO_NODE], "true");
    let c = &pod_spec["containers"][0];
    let default_image = OperatorConfig::try_parse_from_args(&["x", "--client-key", "k"])
        .map(|c| c.wasm_runner_image)?;
    assert_eq!(c["image"], json!(default_image), "--wasm-runner-image");
    assert_eq!(c["resources"]["requests"]["cpu"], "100m");
    assert_eq!(c["resources"]["limits"]["memory"], "32Mi");
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let cm = cms.get("addition-1").await?;
    let module = cm
        .binary_data
        .as_ref()
        .and_then(|d| d.get("module.wasm"))
        .map(|b| b.0.clone());
    assert_eq!(
        module,
        Some(base64::engine::general_purpose::STANDARD.decode(ADD)?)
    );
    assert!(cm.owner_references().iter().any(|o| o.uid == task_uid));

    // First pod: the container is killed (no result). The Job may retry once, so the task keeps running.
    let first = waiting_pod(&env, &job).await?;
    terminate(&env, &first, 137, "OOMKilled", "").await?;
    env.wait_for(
        &jobs,
        "addition-1",
        "the Job to count one failure",
        |j: &Job| j.status.as_ref().and_then(|s| s.failed) == Some(1),
    )
    .await?;
    // The Job controller makes a new pod after its back-off (about 10 s).
    let second = waiting_pod(&env, &job).await?;
    assert_ne!(first.name_any(), second.name_any());
    let t = env.tasks().get("addition").await?;
    assert_eq!(
        t.phase(),
        TaskPhase::Running,
        "one pod failure is not a task failure"
    );

    // Second pod: run the real runner and report its exit and termination message.
    let (exit, message) = run_container(&env, &second).await?;
    assert_eq!(exit, 0, "the runner succeeded: {message}");
    terminate(&env, &second, exit, "Completed", &message).await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "addition",
            "the task to complete",
            |t: &Task| t.phase() == TaskPhase::Completed,
        )
        .await?;
    let st = t.status.clone().unwrap_or_default();
    assert_eq!(st.results, Some(json!("42")));
    assert!(job_condition(&jobs.get("addition-1").await?, "Complete"));
    let starts = sim
        .starts_seen
        .lock()
        .map(|s| s.len())
        .unwrap_or(usize::MAX);
    assert_eq!(starts, 0, "a Job task sends nothing over MQTT");

    // Deleting the Task removes the Job, its pods and the ConfigMap (garbage collection).
    env.tasks()
        .delete("addition", &DeleteParams::background())
        .await?;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &env.ns);
    let selector = pod_selector(&job);
    testbed::wait_for(
        env.cluster,
        "the Job, its pods and the ConfigMap to be deleted",
        WAIT,
        || async {
            let job_gone = jobs.get_opt("addition-1").await.ok()?.is_none();
            let cm_gone = cms.get_opt("addition-1").await.ok()?.is_none();
            let pods_gone = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .is_empty();
            (job_gone && cm_gone && pods_gone).then_some(())
        },
    )
    .await?;
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn a_failed_job_fails_the_task_and_daemons_are_refused() -> anyhow::Result<()> {
    let mut env = Env::start("jobfail", &[]).await?;
    let sim = k8s_pool(&mut env, "pool").await?;
    env.create::<Task>(json!({
        "metadata": {"name": "wrong-export"},
        "spec": {"name": "wrong-export", "functionName": "mul", "file": ADD, "inputs": [6, 7],
                 "propletSelector": {"propletId": "pool"}, "restartPolicy": "Never"},
    }))
    .await?;
    env.create::<Task>(json!({
        "metadata": {"name": "forever"},
        "spec": {"name": "forever", "functionName": "add", "file": ADD, "daemon": true,
                 "preferredPropletType": "k8s"},
    }))
    .await?;

    let jobs: Api<Job> = Api::namespaced(env.admin.clone(), &env.ns);
    let job = env
        .wait_for(&jobs, "wrong-export-1", "the Job", |_| true)
        .await?;
    let pod = waiting_pod(&env, &job).await?;
    let (exit, message) = run_container(&env, &pod).await?;
    assert_eq!(exit, 1, "a missing export fails the task: {message}");
    terminate(&env, &pod, exit, "Error", &message).await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "wrong-export",
            "the task to fail",
            |t: &Task| t.phase() == TaskPhase::Failed,
        )
        .await?;
    let st = t.status.clone().unwrap_or_default();
    let error = st.error.unwrap_or_default();
    assert!(error.contains("mul"), "the runner's error: {error}");
    assert!(job_condition(&jobs.get("wrong-export-1").await?, "Failed"));
    let completed = st.conditions.iter().find(|c| c.type_ == "Completed");
    assert_eq!(
        completed.and_then(|c| c.reason.as_deref()),
        Some("JobFailed"),
        "{:?}",
        st.conditions
    );

    let t = env
        .wait_for(
            &env.tasks(),
            "forever",
            "the daemon to be refused",
            |t: &Task| {
                t.status.as_ref().is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Ready" && c.reason.as_deref() == Some("UnsupportedOnJobBackend")
                    })
                })
            },
        )
        .await?;
    assert_ne!(t.phase(), TaskPhase::Running);
    assert!(
        jobs.get_opt("forever-1").await?.is_none(),
        "no Job for a daemon"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.admin.clone(), &env.ns);
    let reasons: Vec<Value> = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("forever"))
        .map(|e| json!(e.reason))
        .collect();
    assert!(
        reasons.contains(&json!("UnsupportedOnJobBackend")),
        "{reasons:?}"
    );
    sim.shutdown().await;
    env.finish().await
}
