//! The single-replica scenarios: the API server's write limit, a burst, steady rates, a crash and restart
//! mid-burst, and a swarm of heartbeating proplets.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Client;
use propeller_operator::sim::SimHandle;
use propeller_operator::testbed;
use serde_json::{Value, json};

use crate::Bench;
use crate::fleet::{
    Latencies, Wire, all_running, channel_of, create_tasks, heartbeat_swarm, make_proplets,
    raw_write_limit, remove_run, sims, slow_sims, wait_and_measure, watch_completions,
};
use crate::measure::{apiserver_writes, operator_writes, proc_usage, task_queue_depth};
use crate::operator::Operator;

/// One steady step: `rate` tasks/s for `secs`; the p99 of dispatch and completion latency.
/// One steady step in the results: its rate, latencies, and whether the operator (CPU, queue) or the API
/// server (writes) was the limit.
fn step_json(rate: f64, p99: f64, lat: &Latencies, load: &StepLoad) -> Value {
    json!({
        "rate": rate,
        "p99_ms": p99,
        "dispatch_p99_ms": lat.dispatch(99.0),
        "operator_cpu_cores": load.operator_cpu_cores,
        "max_task_queue": load.max_task_queue,
    })
}

/// What one steady step measured besides latency: where the limit is (the operator's CPU, its Task queue).
struct StepLoad {
    operator_cpu_cores: f64,
    max_task_queue: f64,
}

/// One steady step: `rate` tasks/s for `secs`; the p99 of dispatch and completion latency, and the load.
async fn steady_step(
    client: &Client,
    ns: &str,
    rate: f64,
    secs: u64,
    wire: &Arc<Mutex<Wire>>,
    operator: &Operator,
) -> anyhow::Result<(f64, Latencies, StepLoad)> {
    let run = format!("steady-{rate}");
    let done = Arc::new(Mutex::new(HashMap::new()));
    let watch = watch_completions(client, ns, Arc::clone(&done));
    let n = (rate * secs as f64) as usize;
    let names: Vec<String> = (0..n).map(|i| format!("s{rate}-{i}")).collect();
    let (cpu_before, _) = proc_usage(operator.pid())?;
    let t0 = Instant::now();
    let max_queue = Arc::new(Mutex::new(0.0f64));
    let sampler = {
        let max_queue = Arc::clone(&max_queue);
        let port = operator.port;
        tokio::spawn(async move {
            let probe = Operator::probe(port);
            loop {
                if let (Some(d), Ok(mut m)) = (task_queue_depth(&probe).await, max_queue.lock()) {
                    *m = m.max(d);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let created = create_tasks(client, ns, &run, names, rate).await?;
    let lat = wait_and_measure(&created, wire, &done, Duration::from_secs(300)).await;
    sampler.abort();
    let (cpu_after, _) = proc_usage(operator.pid())?;
    let load = StepLoad {
        operator_cpu_cores: (cpu_after - cpu_before) / t0.elapsed().as_secs_f64(),
        max_task_queue: max_queue.lock().map(|m| *m).unwrap_or(f64::NAN),
    };
    watch.abort();
    remove_run(client, ns, &run).await?;
    // A rate the API server cannot absorb at all leaves tasks unfinished: the step failed, the search goes on.
    let lat = match lat {
        Ok(lat) => lat,
        Err(e) => {
            eprintln!("steady {rate:.0}/s: {e}");
            return Ok((
                f64::INFINITY,
                Latencies {
                    dispatch_ms: Vec::new(),
                    completion_ms: Vec::new(),
                    last_completion: None,
                },
                load,
            ));
        }
    };
    let p99 = lat.dispatch(99.0).max(lat.completion(99.0));
    Ok((p99, lat, load))
}

/// The API server's write limit, before any operator runs.
pub async fn raw_limit(b: &mut Bench) -> anyhow::Result<()> {
    let Bench {
        cluster,
        client,
        results,
        ..
    } = b;
    let raw_ns = cluster.namespace(client, "bench-raw").await?;
    let limit = raw_write_limit(client, &raw_ns).await?;
    eprintln!("raw write limit: {limit:.0}/s");
    results.insert("apiserver_write_limit_per_s", json!(limit));
    cluster.delete_namespace(client, &raw_ns).await;
    Ok(())
}

/// A burst of Tasks, created as fast as possible; leaves its namespace and proplets for the steady steps.
pub async fn burst(b: &mut Bench, operator: &Operator) -> anyhow::Result<(String, Vec<SimHandle>)> {
    let Bench {
        args,
        cluster,
        client,
        broker,
        wire,
        results,
        ..
    } = b;
    let ns = cluster.namespace(client, "bench-burst").await?;
    let ids: Vec<String> = (0..args.burst_proplets).map(|i| format!("p-{i}")).collect();
    make_proplets(client, &ns, &ids, broker, 0).await?;
    let swarm = sims(broker, &ids).await?;
    all_running(client, &ns, ids.len(), Duration::from_secs(120)).await?;
    let done = Arc::new(Mutex::new(HashMap::new()));
    let watch = watch_completions(client, &ns, Arc::clone(&done));
    let before = apiserver_writes(client).await?;
    let (cpu_before, _) = proc_usage(operator.pid())?;
    let burst_start = Instant::now();
    let names: Vec<String> = (0..args.burst_tasks).map(|i| format!("b-{i}")).collect();
    let created = create_tasks(client, &ns, "burst", names, 0.0).await?;
    let lat = wait_and_measure(&created, wire, &done, Duration::from_secs(900)).await?;
    let burst_secs = lat
        .last_completion
        .map(|l| l.duration_since(burst_start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let (cpu_after, _) = proc_usage(operator.pid())?;
    results.insert(
        "burst_operator_cpu_cores",
        json!((cpu_after - cpu_before) / burst_secs),
    );
    // Let trailing writes (events, proplet task counts) land before counting.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = apiserver_writes(client).await?;
    watch.abort();
    let writes = operator_writes(&before, &after, args.burst_tasks as f64);
    let per_task = writes / args.burst_tasks as f64;
    let burst_rate = args.burst_tasks as f64 / burst_secs;
    eprintln!("burst: {burst_rate:.0} tasks/s, {per_task:.2} writes/task");
    results.insert("burst_tasks_per_s", json!(burst_rate));
    results.insert("api_writes_per_task", json!(per_task));
    results.insert("burst_dispatch_p50_ms", json!(lat.dispatch(50.0)));
    results.insert("burst_dispatch_p99_ms", json!(lat.dispatch(99.0)));
    results.insert("burst_completion_p99_ms", json!(lat.completion(99.0)));
    results.insert(
        "burst_writes_by_resource",
        json!(
            after
                .iter()
                .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .collect::<BTreeMap<_, _>>()
        ),
    );
    results.insert("proplets", json!(args.burst_proplets));
    results.insert("tasks", json!(args.burst_tasks));
    remove_run(client, &ns, "burst").await?;
    Ok((ns, swarm))
}

/// Steady: double the rate until p99 > 1 s, then one bisection step.
pub async fn steady(
    b: &mut Bench,
    operator: &Operator,
    ns: String,
    swarm: Vec<SimHandle>,
) -> anyhow::Result<()> {
    let Bench {
        args,
        cluster,
        client,
        wire,
        results,
        ..
    } = b;
    let mut good: Option<f64> = None;
    let mut bad: Option<f64> = None;
    let mut at_100: Option<Latencies> = None;
    let mut steps = Vec::new();
    let mut rate: f64 = 25.0;
    // Double while the p99 holds (halve while it does not, from the start), then bisect once.
    loop {
        let (p99, lat, load) =
            steady_step(client, &ns, rate, args.steady_seconds, wire, operator).await?;
        eprintln!("steady {rate:.0}/s: p99 {p99:.0} ms");
        steps.push(step_json(rate, p99, &lat, &load));
        if rate == 100.0 {
            at_100 = Some(lat);
        }
        if p99 <= 1000.0 {
            good = Some(rate);
            if bad.is_some() || rate >= 1600.0 {
                break;
            }
            rate *= 2.0;
        } else {
            bad = Some(rate);
            if good.is_some() || rate <= 5.0 {
                break;
            }
            rate = (rate / 2.0).round();
        }
    }
    if let (Some(g), Some(b)) = (good, bad)
        && b - g > 5.0
    {
        let mid = ((g + b) / 2.0).round();
        let (p99, lat, load) =
            steady_step(client, &ns, mid, args.steady_seconds, wire, operator).await?;
        eprintln!("steady {mid:.0}/s: p99 {p99:.0} ms");
        steps.push(step_json(mid, p99, &lat, &load));
        if p99 <= 1000.0 {
            good = Some(mid);
        }
    }
    // The latency target is stated at 100 tasks/s; measure there when the search did not.
    if at_100.is_none() {
        let (p99, lat, load) =
            steady_step(client, &ns, 100.0, args.steady_seconds, wire, operator).await?;
        eprintln!("steady 100/s: p99 {p99:.0} ms");
        steps.push(step_json(100.0, p99, &lat, &load));
        at_100 = Some(lat);
    }
    results.insert("steady_max_tasks_per_s", json!(good.unwrap_or(0.0)));
    results.insert("steady_steps", json!(steps));
    if let Some(l) = at_100 {
        results.insert("dispatch_p50_ms", json!(l.dispatch(50.0)));
        results.insert("dispatch_p99_ms", json!(l.dispatch(99.0)));
        results.insert("completion_p50_ms", json!(l.completion(50.0)));
        results.insert("completion_p99_ms", json!(l.completion(99.0)));
    }
    let (_, peak) = proc_usage(operator.pid())?;
    results.insert("operator_peak_rss_mib", json!(peak));
    for s in swarm {
        s.kill();
    }
    cluster.delete_namespace(client, &ns).await;
    Ok(())
}

/// Restart: tasks taking 2 s, the operator killed (SIGKILL) mid-burst and started again.
pub async fn restart(b: &mut Bench, operator: &mut Operator) -> anyhow::Result<()> {
    let Bench {
        args,
        cluster,
        client,
        broker,
        wire,
        results,
        log,
        ..
    } = b;
    let ns = cluster.namespace(client, "bench-restart").await?;
    let ids: Vec<String> = (0..args.restart_proplets)
        .map(|i| format!("r-{i}"))
        .collect();
    make_proplets(client, &ns, &ids, broker, 0).await?;
    let swarm = slow_sims(broker, &ids, Duration::from_secs(2)).await?;
    all_running(client, &ns, ids.len(), Duration::from_secs(120)).await?;
    let done = Arc::new(Mutex::new(HashMap::new()));
    let watch = watch_completions(client, &ns, Arc::clone(&done));
    let names: Vec<String> = (0..args.restart_tasks).map(|i| format!("r-{i}")).collect();
    let created = create_tasks(client, &ns, "restart", names, 0.0).await?;
    let third = args.restart_tasks / 3;
    testbed::eventually(
        "a third of the tasks done",
        Duration::from_secs(300),
        || async { (done.lock().ok()?.len() >= third).then_some(()) },
    )
    .await?;
    operator.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    *operator = Operator::start(&args.operator, cluster, broker, log)?;
    operator.ready().await?;
    let back = Instant::now();
    let all_done = testbed::eventually("every task done", Duration::from_secs(120), || async {
        let d = done.lock().ok()?;
        (created.keys().all(|u| d.contains_key(u))).then(|| d.values().max().copied())
    })
    .await;
    watch.abort();
    let (lost, recovered_s) = match all_done {
        Ok(last) => (
            0,
            last.map(|l| l.saturating_duration_since(back).as_secs_f64()),
        ),
        Err(_) => {
            let d = done.lock().map_err(|_| anyhow::anyhow!("lock"))?;
            (created.keys().filter(|u| !d.contains_key(*u)).count(), None)
        }
    };
    let (sent_again, runs_twice) = {
        let w = wire.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        let again: usize = created
            .keys()
            .filter_map(|u| w.start_count.get(u))
            .map(|n| n.saturating_sub(1))
            .sum();
        let mut runs: HashMap<String, usize> = HashMap::new();
        for s in &swarm {
            for id in s.runs.lock().map(|r| r.clone()).unwrap_or_default() {
                *runs.entry(id).or_default() += 1;
            }
        }
        if std::env::var_os("BENCH_DEBUG").is_some() {
            for (id, n) in runs.iter().filter(|(_, n)| **n > 1) {
                let first = w
                    .starts
                    .get(id)
                    .map(|t| t.duration_since(killed.min(*t)).as_secs_f64());
                let res = w
                    .results
                    .get(id)
                    .map(|t| t.saturating_duration_since(killed).as_secs_f64());
                eprintln!(
                    "twice: {id} runs {n} starts {:?} first start {:?} first result after kill {:?} (back at {:?})",
                    w.start_count.get(id),
                    w.starts
                        .get(id)
                        .map(|t| killed.saturating_duration_since(*t).as_secs_f64()),
                    res,
                    back.duration_since(killed).as_secs_f64()
                );
                let _ = first;
            }
        }
        (again, runs.values().filter(|n| **n > 1).count())
    };
    eprintln!(
        "restart: {lost} lost, {sent_again} starts sent again, {runs_twice} run twice, recovered in {recovered_s:?} s"
    );
    results.insert("restart_tasks", json!(args.restart_tasks));
    results.insert("restart_results_lost", json!(lost));
    results.insert("restart_starts_sent_again", json!(sent_again));
    results.insert("restart_tasks_run_twice", json!(runs_twice));
    results.insert(
        "restart_down_s",
        json!(back.duration_since(killed).as_secs_f64()),
    );
    results.insert("restart_recovery_s", json!(recovered_s));
    for s in swarm {
        s.kill();
    }
    cluster.delete_namespace(client, &ns).await;
    Ok(())
}

/// Heartbeats: many proplets, no tasks.
pub async fn heartbeats(b: &mut Bench, operator: &Operator) -> anyhow::Result<()> {
    let Bench {
        args,
        cluster,
        client,
        broker,
        results,
        ..
    } = b;
    let ns = cluster.namespace(client, "bench-hb").await?;
    let ids: Vec<String> = (0..args.heartbeat_proplets)
        .map(|i| format!("hb-{i}"))
        .collect();
    make_proplets(client, &ns, &ids, broker, 0).await?;
    let beat = tokio::spawn(heartbeat_swarm(
        broker.port,
        broker.username.clone(),
        broker.password.clone(),
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), channel_of(i, 0)))
            .collect(),
    ));
    all_running(client, &ns, ids.len(), Duration::from_secs(600)).await?;
    let before = apiserver_writes(client).await?;
    let (cpu_before, _) = proc_usage(operator.pid())?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.heartbeat_seconds)).await;
    let (cpu_after, peak) = proc_usage(operator.pid())?;
    let after = apiserver_writes(client).await?;
    let secs = t0.elapsed().as_secs_f64();
    beat.abort();
    let minutes = secs / 60.0;
    let writes = operator_writes(&before, &after, 0.0);
    results.insert(
        "heartbeat_api_writes_per_proplet_minute",
        json!(writes / (ids.len() as f64 * minutes)),
    );
    results.insert(
        "heartbeat_operator_cpu_cores",
        json!((cpu_after - cpu_before) / secs),
    );
    results.insert("heartbeat_operator_peak_rss_mib", json!(peak));
    results.insert("heartbeat_proplets", json!(ids.len()));
    results.insert(
        "operator_peak_rss_mib",
        json!(
            peak.max(
                results
                    .get("operator_peak_rss_mib")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            )
        ),
    );
    Ok(())
}
