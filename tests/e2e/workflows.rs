//! Workflows on the real API server: PropellerJob modes, DAGs of standalone Tasks with result passing,
//! cycles and unknown dependencies, taskRefs, deletion mid-run.
use std::time::Duration;

use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use propeller_operator::api::propeller_job::JobPhase;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::api::{PropellerJob, Task};
use propeller_operator::sim::SimHandle;
use serde_json::{Value, json};

use crate::support::Env;

/// The addition module of the real proplet's repository (export `add`).
const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

async fn worker(
    env: &mut Env,
    tune: impl FnOnce(&mut propeller_operator::sim::SimConfig),
) -> anyhow::Result<SimHandle> {
    let sim = env.proplet("wf-1", tune).await?;
    env.external_proplet("wf", "wf-1", json!({})).await?;
    env.wait_for(&env.proplets(), "wf", "wf Running", |p| {
        p.phase() == propeller_operator::api::proplet::PropletPhase::Running
    })
    .await?;
    Ok(sim)
}

fn add(name: &str, extra: Value) -> Value {
    let mut spec = json!({"name": name, "functionName": "add", "file": ADD});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}

/// A step that fails on the proplet: the module has no `mul`.
fn failing(name: &str) -> Value {
    json!({"name": name, "functionName": "mul", "file": ADD, "inputs": [6, 7]})
}

fn condition<'a>(
    conds: &'a [propeller_operator::api::Condition],
    t: &str,
) -> Option<&'a propeller_operator::api::Condition> {
    conds.iter().find(|c| c.type_ == t)
}

fn starts_of(sim: &SimHandle) -> Vec<Value> {
    sim.starts_seen
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_diamond_of_tasks_passes_results_down() -> anyhow::Result<()> {
    let mut env = Env::start("diamond", &[]).await?;
    let sim = worker(&mut env, |_| {}).await?;
    let wf = json!({"workflowId": "diamond"});
    let with = |extra: Value| {
        let mut v = wf.clone();
        if let (Some(a), Some(b)) = (v.as_object_mut(), extra.as_object()) {
            a.extend(b.clone());
        }
        v
    };
    // Created bottom-up: dependents wait for dependencies that do not exist yet.
    env.create::<Task>(
        json!({"metadata": {"name": "d"}, "spec": add("d", with(json!({
        "dependsOn": ["b", "c"], "resultsFrom": [{"task": "b"}, {"task": "c"}]})))}),
    )
    .await?;
    env.create::<Task>(
        json!({"metadata": {"name": "c"}, "spec": add("c", with(json!({
        "inputs": [-2], "dependsOn": ["a"],
        "resultsFrom": [{"task": "a"}, {"task": "a", "as": "env"}]})))}),
    )
    .await?;
    env.create::<Task>(
        json!({"metadata": {"name": "b"}, "spec": add("b", with(json!({
        "inputs": [1], "dependsOn": ["a"], "resultsFrom": [{"task": "a"}]})))}),
    )
    .await?;
    env.create::<Task>(
        json!({"metadata": {"name": "a"}, "spec": add("a", with(json!({"inputs": [40, 2]})))}),
    )
    .await?;
    let d = env
        .wait_for(&env.tasks(), "d", "d to end", |t: &Task| {
            t.phase().is_terminal()
        })
        .await?;
    let st = d.status.clone().unwrap_or_default();
    // a = 40 + 2; b = 1 + a; c = -2 + a; d = b + c.
    assert_eq!(
        (d.phase(), st.results),
        (TaskPhase::Completed, Some(json!("83"))),
        "{:?}",
        st.error
    );
    let uid = |t: &Task| t.uid().unwrap_or_default();
    let c = env.tasks().get("c").await?;
    let starts = starts_of(&sim);
    let start_of = |id: String| {
        starts
            .iter()
            .find(|s| s["id"] == json!(id))
            .cloned()
            .unwrap_or_default()
    };
    let c_start = start_of(uid(&c));
    assert_eq!(c_start["inputs"], json!(["-2", "42"]));
    assert_eq!(c_start["env"]["RESULT_A"], "42");
    assert_eq!(c_start["parent_results"], json!({"a": "42"}));
    assert_eq!(
        start_of(uid(&d))["parent_results"],
        json!({"b": "43", "c": "40"})
    );
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn cycles_are_refused_and_unknown_dependencies_wait() -> anyhow::Result<()> {
    let env = Env::start("cycle", &[]).await?;
    for (name, dep) in [("x", "y"), ("y", "x")] {
        env.create::<Task>(json!({"metadata": {"name": name},
            "spec": add(name, json!({"workflowId": "w", "dependsOn": [dep]}))}))
            .await?;
        if name == "x" {
            // x first waits for a dependency that does not exist yet: y's creation must wake it.
            env.wait_for(&env.tasks(), "x", "x waiting for y", |t: &Task| {
                t.status
                    .as_ref()
                    .and_then(|s| condition(&s.conditions, "Scheduled"))
                    .and_then(|c| c.message.as_deref())
                    .is_some_and(|m| m.contains("y (not found)"))
            })
            .await?;
        }
    }
    env.create::<Task>(json!({"metadata": {"name": "z"},
        "spec": add("z", json!({"workflowId": "w", "dependsOn": ["ghost"]}))}))
        .await?;
    for name in ["x", "y"] {
        let t = env
            .wait_for(&env.tasks(), name, "the cycle to be refused", |t: &Task| {
                t.status
                    .as_ref()
                    .and_then(|s| condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.reason.as_deref() == Some("InvalidSpec"))
            })
            .await?;
        let msg = t
            .status
            .and_then(|s| condition(&s.conditions, "Ready").and_then(|c| c.message.clone()))
            .unwrap_or_default();
        assert!(
            msg.contains("dependency cycle") && msg.contains("x -> y -> x"),
            "{msg}"
        );
    }
    let z = env
        .wait_for(&env.tasks(), "z", "z waiting", |t: &Task| {
            t.status
                .as_ref()
                .and_then(|s| condition(&s.conditions, "Scheduled"))
                .is_some_and(|c| c.reason.as_deref() == Some("WaitingForDependencies"))
        })
        .await?;
    let msg = z
        .status
        .and_then(|s| condition(&s.conditions, "Scheduled").and_then(|c| c.message.clone()))
        .unwrap_or_default();
    assert!(msg.contains("ghost") && msg.contains("not found"), "{msg}");
    env.finish().await
}

fn job(name: &str, mode: &str, tasks: Value, extra: Value) -> Value {
    let mut spec = json!({"name": name, "executionMode": mode, "tasks": tasks});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({"metadata": {"name": name}, "spec": spec})
}

async fn finished(env: &Env, name: &str) -> anyhow::Result<PropellerJob> {
    let api: Api<PropellerJob> = Api::namespaced(env.admin.clone(), &env.ns);
    env.wait_for(
        &api,
        name,
        &format!("job {name} to finish"),
        |j: &PropellerJob| {
            matches!(
                j.status.as_ref().and_then(|s| s.phase),
                Some(JobPhase::Completed | JobPhase::Failed)
            )
        },
    )
    .await
}

fn counts(j: &PropellerJob) -> (Option<JobPhase>, i64, i64, i64) {
    let s = j.status.clone().unwrap_or_default();
    (
        s.phase,
        s.completed_count.unwrap_or(-1),
        s.failed_count.unwrap_or(-1),
        s.skipped_count.unwrap_or(-1),
    )
}

async fn child(env: &Env, job: &str, spec_name: &str) -> anyhow::Result<Task> {
    let name = propeller_operator::controllers::propeller_job::child_name(job, spec_name);
    Ok(env.tasks().get(&name).await?)
}

#[tokio::test]
async fn propeller_jobs_run_in_every_mode() -> anyhow::Result<()> {
    let mut env = Env::start("modes", &[]).await?;
    let sim = worker(&mut env, |_| {}).await?;
    let ok = |n: &str| add(n, json!({"inputs": [40, 2]}));
    env.create::<PropellerJob>(job(
        "par",
        "parallel",
        json!([ok("one"), failing("bad"), ok("two")]),
        json!({}),
    ))
    .await?;
    env.create::<PropellerJob>(job(
        "seq",
        "sequential",
        json!([ok("s1"), failing("s2"), ok("s3")]),
        json!({}),
    ))
    .await?;
    env.create::<PropellerJob>(job(
        "seq-on",
        "sequential",
        json!([ok("s1"), failing("s2"), ok("s3")]),
        json!({"continueOnFailure": true}),
    ))
    .await?;
    // configurable: a diamond with result passing; spec names that are not Kubernetes names.
    env.create::<PropellerJob>(job("dag", "configurable", json!([
        add("Step One", json!({"inputs": [40, 2]})),
        add("left", json!({"inputs": [1], "dependsOn": ["Step One"], "resultsFrom": [{"task": "Step One"}]})),
        add("right", json!({"inputs": [-2], "dependsOn": ["Step One"], "resultsFrom": [{"task": "Step One"}]})),
        add("join", json!({"dependsOn": ["left", "right"], "resultsFrom": [{"task": "left"}, {"task": "right"}]})),
    ]), json!({})))
        .await?;
    env.create::<PropellerJob>(job(
        "seq-ok",
        "sequential",
        json!([ok("s1"), ok("s2"), ok("s3")]),
        json!({}),
    ))
    .await?;
    // configurable, failing: b is skipped after a fails; c runs because of it (runIf: failure).
    env.create::<PropellerJob>(job(
        "dag-fail",
        "configurable",
        json!([
            failing("a"),
            add("b", json!({"inputs": [1, 1], "dependsOn": ["a"]})),
            add(
                "c",
                json!({"inputs": [1, 1], "dependsOn": ["a"], "runIf": "failure"})
            ),
        ]),
        json!({}),
    ))
    .await?;
    // A job waits for the existing Tasks it references, which it watches.
    env.create::<PropellerJob>(job(
        "refs",
        "parallel",
        json!([ok("own")]),
        json!({"taskRefs": ["outside"]}),
    ))
    .await?;

    assert_eq!(
        counts(&finished(&env, "par").await?),
        (Some(JobPhase::Failed), 2, 1, 0)
    );
    assert_eq!(
        counts(&finished(&env, "seq").await?),
        (Some(JobPhase::Failed), 1, 1, 1)
    );
    assert_eq!(child(&env, "seq", "s3").await?.phase(), TaskPhase::Skipped);
    assert_eq!(
        counts(&finished(&env, "seq-on").await?),
        (Some(JobPhase::Failed), 2, 1, 0)
    );
    assert_eq!(
        counts(&finished(&env, "seq-ok").await?),
        (Some(JobPhase::Completed), 3, 0, 0)
    );
    assert_eq!(
        counts(&finished(&env, "dag-fail").await?),
        (Some(JobPhase::Failed), 1, 1, 1)
    );
    assert_eq!(
        child(&env, "dag-fail", "b").await?.phase(),
        TaskPhase::Skipped
    );
    assert_eq!(
        child(&env, "dag-fail", "c").await?.phase(),
        TaskPhase::Completed
    );
    let dag = finished(&env, "dag").await?;
    assert_eq!(counts(&dag), (Some(JobPhase::Completed), 4, 0, 0));
    let join = child(&env, "dag", "join").await?;
    assert_eq!(join.status.and_then(|s| s.results), Some(json!("83")));
    let first = child(&env, "dag", "Step One").await?;
    assert!(
        first.name_any().starts_with("dag-step-one-"),
        "{}",
        first.name_any()
    );
    let st = dag.status.clone().unwrap_or_default();
    assert!(st.start_time.is_some() && st.finish_time.is_some());
    assert_eq!(
        condition(&st.conditions, "Completed")
            .and_then(|c| c.reason.clone())
            .as_deref(),
        Some("Succeeded")
    );

    // Sequential really is one at a time: s2 started after s1 ended, s3 after s2.
    let seq_ids: Vec<String> = {
        let mut v = Vec::new();
        for n in ["s1", "s2", "s3"] {
            v.push(child(&env, "seq-on", n).await?.uid().unwrap_or_default());
        }
        v
    };
    let order: Vec<usize> = starts_of(&sim)
        .iter()
        .filter_map(|s| seq_ids.iter().position(|id| s["id"] == json!(id)))
        .collect();
    assert_eq!(order, [0, 1, 2]);

    let api: Api<PropellerJob> = Api::namespaced(env.admin.clone(), &env.ns);
    let refs = env
        .wait_for(
            &api,
            "refs",
            "refs to count its own task",
            |j: &PropellerJob| j.status.as_ref().and_then(|s| s.completed_count) == Some(1),
        )
        .await?;
    assert_eq!(
        refs.status.and_then(|s| s.phase),
        Some(JobPhase::Running),
        "outside is missing"
    );
    env.create::<Task>(json!({"metadata": {"name": "outside"}, "spec": ok("outside")}))
        .await?;
    assert_eq!(
        counts(&finished(&env, "refs").await?),
        (Some(JobPhase::Completed), 2, 0, 0)
    );
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn invalid_jobs_create_nothing() -> anyhow::Result<()> {
    let env = Env::start("badjob", &[]).await?;
    env.create::<PropellerJob>(job(
        "loop",
        "configurable",
        json!([
            add("a", json!({"dependsOn": ["b"]})),
            add("b", json!({"dependsOn": ["a"]})),
        ]),
        json!({}),
    ))
    .await?;
    env.create::<PropellerJob>(job(
        "lost",
        "parallel",
        json!([add("a", json!({"dependsOn": ["nowhere"]}))]),
        json!({}),
    ))
    .await?;
    let api: Api<PropellerJob> = Api::namespaced(env.admin.clone(), &env.ns);
    for (name, needle) in [
        ("loop", "dependency cycle: a -> b -> a"),
        ("lost", "nowhere"),
    ] {
        let j = env
            .wait_for(&api, name, "InvalidSpec", |j: &PropellerJob| {
                j.status
                    .as_ref()
                    .and_then(|s| condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.reason.as_deref() == Some("InvalidSpec"))
            })
            .await?;
        let msg = j
            .status
            .and_then(|s| condition(&s.conditions, "Ready").and_then(|c| c.message.clone()))
            .unwrap_or_default();
        assert!(msg.contains(needle), "{msg}");
    }
    let children = env
        .tasks()
        .list(
            &ListParams::default()
                .labels(propeller_operator::controllers::propeller_job::JOB_LABEL),
        )
        .await?;
    assert!(children.items.is_empty(), "nothing runs");
    // The Event follows the status write (it is not part of it): wait for it.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.admin.clone(), &env.ns);
    propeller_operator::testbed::wait_for(
        env.cluster,
        "the InvalidSpec Event",
        crate::support::WAIT,
        || async {
            let notes: Vec<String> = events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("InvalidSpec"))
                .filter_map(|e| e.note)
                .collect();
            notes
                .iter()
                .any(|n| n.contains("a -> b -> a"))
                .then_some(())
        },
    )
    .await?;
    env.finish().await
}

#[tokio::test]
async fn deleting_a_job_stops_its_running_tasks() -> anyhow::Result<()> {
    let mut env = Env::start("deljob", &[]).await?;
    let sim = worker(&mut env, |c| c.faults.task_delay = Duration::from_secs(30)).await?;
    env.create::<PropellerJob>(job(
        "long",
        "parallel",
        json!([add("slow", json!({"inputs": [1, 2]}))]),
        json!({}),
    ))
    .await?;
    let name = propeller_operator::controllers::propeller_job::child_name("long", "slow");
    let t = env
        .wait_for(&env.tasks(), &name, "the child running", |t: &Task| {
            t.phase() == TaskPhase::Running
        })
        .await?;
    let api: Api<PropellerJob> = Api::namespaced(env.admin.clone(), &env.ns);
    api.delete("long", &DeleteParams::background()).await?;
    propeller_operator::testbed::wait_for(
        env.cluster,
        "the child Task to be deleted",
        crate::support::WAIT,
        || async {
            env.tasks()
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await?;
    let stops = sim.stops_seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        stops.contains(&t.uid().unwrap_or_default()),
        "a stop was sent: {stops:?}"
    );
    sim.shutdown().await;
    env.finish().await
}

fn reason_of(t: &Task, type_: &str) -> Option<String> {
    t.status
        .as_ref()
        .and_then(|s| condition(&s.conditions, type_))
        .and_then(|c| c.reason.clone())
}

/// Wakes the Task controller for `name` (a label change), as any edit would.
async fn poke(env: &Env, name: &str, n: u32) -> anyhow::Result<()> {
    let patch = json!({"metadata": {"labels": {"e2e-poke": n.to_string()}}});
    env.tasks()
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// Two real ticks of a per-minute schedule (at most two minutes).
#[tokio::test]
async fn a_recurring_task_runs_at_every_tick() -> anyhow::Result<()> {
    let mut env = Env::start("cron", &[]).await?;
    let sim = worker(&mut env, |_| {}).await?;
    env.create::<Task>(json!({"metadata": {"name": "every-minute"}, "spec": add("every-minute", json!({
        "inputs": [40, 2], "schedule": "* * * * *", "isRecurring": true, "timezone": "Europe/Paris"}))}))
        .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "every-minute",
            "the first tick to be set",
            |t: &Task| t.status.as_ref().is_some_and(|s| s.next_run.is_some()),
        )
        .await?;
    let first_tick = t.status.and_then(|s| s.next_run).map(|t| t.0);
    assert_eq!(
        first_tick.map(|t| t.as_second() % 60),
        Some(0),
        "on a minute"
    );
    let two_runs = propeller_operator::testbed::wait_for(
        env.cluster,
        "two runs",
        Duration::from_secs(150),
        || async {
            let t = env.tasks().get("every-minute").await.ok()?;
            let st = t.status.clone()?;
            (!st.history.is_empty() && t.phase() == TaskPhase::Completed).then_some(t)
        },
    )
    .await?;
    let st = two_runs.status.clone().unwrap_or_default();
    assert_eq!(st.history[0].phase, Some(TaskPhase::Completed));
    assert_eq!(st.history[0].results.as_deref(), Some("42"));
    assert_eq!(st.results, Some(json!("42")));
    assert!(
        st.next_run.map(|n| n.0) > first_tick,
        "the next tick moved on"
    );
    let runs = starts_of(&sim).len();
    assert_eq!(runs, 2, "one start per tick");
    sim.shutdown().await;
    env.finish().await
}

/// A run still going at the next tick: the tick is skipped. A run lasting past a per-minute tick would
/// take a real minute, so this test moves the operator's schedule clock forward instead (the fake clock).
#[tokio::test]
async fn a_tick_during_a_run_is_skipped() -> anyhow::Result<()> {
    let mut env = Env::start("overlap", &[]).await?;
    let sim = worker(&mut env, |c| c.faults.task_delay = Duration::from_secs(60)).await?;
    // Created in a minute's last seconds, the task would meet a real tick before the test sees it wait.
    // Moving the clock instead would not do: the first tick is the one after the Task's creation, which
    // the API server stamps in real time.
    let into_minute = env.clock.now().as_second().rem_euclid(60).unsigned_abs();
    if into_minute >= 45 {
        tokio::time::sleep(Duration::from_secs(62 - into_minute)).await;
    }
    env.create::<Task>(
        json!({"metadata": {"name": "slow"}, "spec": add("slow", json!({
        "inputs": [1, 2], "schedule": "* * * * *", "isRecurring": true}))}),
    )
    .await?;
    let t = env
        .wait_for(&env.tasks(), "slow", "waiting for its tick", |t: &Task| {
            reason_of(t, "Scheduled").as_deref() == Some("WaitingForTick")
        })
        .await?;
    let tick = t
        .status
        .and_then(|s| s.next_run)
        .map(|t| t.0)
        .unwrap_or_default();
    let wait = tick.duration_since(env.clock.now()).unsigned_abs() + Duration::from_secs(1);
    env.clock.advance(wait);
    poke(&env, "slow", 1).await?;
    env.wait_for(&env.tasks(), "slow", "the run", |t: &Task| {
        t.phase() == TaskPhase::Running
    })
    .await?;
    env.clock.advance(Duration::from_secs(60));
    poke(&env, "slow", 2).await?;
    let t = env
        .wait_for(&env.tasks(), "slow", "TickSkipped", |t: &Task| {
            reason_of(t, "Recurring").as_deref() == Some("TickSkipped")
        })
        .await?;
    assert_eq!(t.phase(), TaskPhase::Running, "the first run goes on");
    assert_eq!(starts_of(&sim).len(), 1, "not started twice");
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn bad_schedules_are_invalid_specs() -> anyhow::Result<()> {
    let env = Env::start("badcron", &[]).await?;
    for (name, schedule, zone, needle) in [
        ("feb-30", "0 0 30 2 *", "UTC", "never fires"),
        ("no-zone", "* * * * *", "Mars/Olympus", "IANA"),
        ("six", "0 * * * * *", "UTC", "5 fields"),
    ] {
        env.create::<Task>(json!({"metadata": {"name": name}, "spec": add(name, json!({
            "schedule": schedule, "timezone": zone, "isRecurring": true}))}))
            .await?;
        let t = env
            .wait_for(&env.tasks(), name, "InvalidSpec", |t: &Task| {
                reason_of(t, "Ready").as_deref() == Some("InvalidSpec")
            })
            .await?;
        let msg = t
            .status
            .and_then(|s| condition(&s.conditions, "Ready").and_then(|c| c.message.clone()))
            .unwrap_or_default();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    env.finish().await
}
