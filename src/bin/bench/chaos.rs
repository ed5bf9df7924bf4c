//! `make chaos`: Tasks over simulated proplets on sharded operator processes while faults strike at random
//! times — a replica killed with SIGKILL (started again as the same shard a few seconds later), mosquitto
//! restarted (persistent, as a production broker), the API server stopped for a while (SIGSTOP, then
//! SIGCONT). Bounded: it ends when every Task has ended, or at `--chaos-minutes`. The invariants come out
//! as numbers: tasks not completed (lost or failed), still running (stuck), run twice by a proplet, results
//! a proplet produced that no Task recorded; and how long completions took to resume after each fault.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::ListParams;
use kube::{Api, ResourceExt};
use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::testbed::{self, Broker, Lifetime};
use serde_json::json;

use crate::Bench;
use crate::chaos_apiserver::ApiServer;
use crate::chaos_fl;
use crate::fleet::{all_running, create_tasks, make_proplets, slow_sims, watch_completions};
use crate::measure::{percentile, sorted};
use crate::operator::{Operator, Remote, ShardSpec};
use anyhow::Context as _;
use propeller_operator::testbed::netns::Netns;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Results seen at the broker, by task id.
type ResultCounts = Arc<Mutex<HashMap<String, usize>>>;

/// Counts, per task id, the results that reached the broker, from a persistent session of its own: a run
/// twice whose first result never got there was the only way to a result; one whose results both did was
/// needless double work.
fn observe_results(
    broker: &mut Broker,
) -> anyhow::Result<(ResultCounts, tokio::task::JoinHandle<()>)> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (user, pass) = ("chaos-observer", "chaos-observer-key");
    broker.add_user(user, pass)?;
    let mut opts = MqttOptions::new(user, "127.0.0.1", broker.port);
    opts.set_credentials(user, pass);
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let seen: ResultCounts = Arc::default();
    let counts = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let topic = "m/+/c/+/control/proplet/results";
                    let _ = client.try_subscribe(topic, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let id = serde_json::from_slice::<serde_json::Value>(&p.payload)
                        .ok()
                        .and_then(|v| v["task_id"].as_str().map(str::to_string));
                    if let (Some(id), Ok(mut c)) = (id, counts.lock()) {
                        *c.entry(id).or_default() += 1;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok((seen, task))
}

/// A small deterministic generator (xorshift): a run is repeatable from its printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn identity(i: usize) -> String {
    format!("chaos-{i}")
}

fn shard(
    b: &Bench,
    broker: &Broker,
    lease_ns: &str,
    i: usize,
    host: Option<&Remote<'_>>,
    fl: (u16, &str),
) -> anyhow::Result<Operator> {
    Operator::start_shard(
        &b.args.operator,
        b.cluster,
        broker,
        &b.log,
        &ShardSpec {
            identity: &identity(i),
            lease_namespace: lease_ns,
            host,
            fl: Some(fl),
            shard_by: b.args.shard_by,
        },
    )
}

/// The host of its own for the replica that gets cut from the broker: `None` (said loudly) where network
/// namespaces cannot be made or the cluster is not local.
async fn partitionable_host(b: &Bench, broker: &Broker) -> Option<(Netns, PathBuf, SocketAddr)> {
    let made = async {
        let cp = b
            .cluster
            .local_or_skip("chaos: a partitioned replica", "relays to its API server")
            .context("not a local cluster")?;
        let mut ns = Netns::create(1)?;
        let api = ns.relay_api(cp.apiserver_address()).await?;
        let mqtt = ns
            .relay_mqtt(SocketAddr::from(([127, 0, 0, 1], broker.port)))
            .await?;
        let kubeconfig = ns.kubeconfig_via(&b.cluster.kubeconfig, api, testbed::run_dir())?;
        anyhow::Ok((ns, kubeconfig, mqtt))
    };
    match made.await {
        Ok(host) => Some(host),
        Err(e) => {
            eprintln!(
                "chaos: NO PARTITION FAULT in this run — a network namespace could not be made: {e:#}"
            );
            None
        }
    }
}

pub async fn run(b: &mut Bench) -> anyhow::Result<()> {
    let (tasks_n, proplets_n, shards_n) =
        (b.args.chaos_tasks, b.args.chaos_proplets, b.args.shards);
    let seed = b.args.chaos_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 | 1)
    });
    let mut rng = Rng(seed);
    eprintln!("chaos: {tasks_n} tasks, {proplets_n} proplets, {shards_n} shards, seed {seed}");
    let mut broker = Broker::start(
        &testbed::run_dir().join("chaos-mosquitto"),
        Lifetime::Attached,
    )?;
    broker.make_persistent()?;
    let (at_broker, observer) = observe_results(&mut broker)?;
    let lease_ns = b.cluster.namespace(&b.client, "chaos-leases").await?;
    let ns = b.cluster.namespace(&b.client, "chaos").await?;
    let ids: Vec<String> = (0..proplets_n).map(|i| format!("ch-{i}")).collect();
    make_proplets(&b.client, &ns, &ids, &broker, 0).await?;
    // Tasks take a moment, so that faults find work in flight.
    let sims = slow_sims(&mut broker, &ids, Duration::from_millis(300)).await?;
    // The last replica lives on a host of its own, so that it can be cut from the broker.
    let netns = partitionable_host(b, &broker).await;
    let remote = netns.as_ref().map(|(netns, kubeconfig, mqtt)| Remote {
        netns,
        kubeconfig: kubeconfig.clone(),
        mqtt: *mqtt,
    });
    let cut = shards_n - 1;
    let host_of = |i: usize| if i == cut { remote.as_ref() } else { None };
    // Every replica serves FL on a port of its own; participants reach whichever answers.
    let fl_ports: Vec<u16> = (0..shards_n)
        .map(|_| {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        })
        .collect::<anyhow::Result<_>>()?;
    let backends = (0..shards_n)
        .map(|i| {
            let host = host_of(i).map_or("127.0.0.1".to_string(), |r| r.netns.inside.clone());
            Ok(SocketAddr::new(host.parse()?, fl_ports[i]))
        })
        .collect::<anyhow::Result<_>>()?;
    let (fl_at, _balancer) = chaos_fl::balancer(backends).await?;
    let fl_url = format!("http://{fl_at}");
    let fl_of = |i: usize| (fl_ports[i], fl_url.as_str());
    let mut ops: Vec<Operator> = (0..shards_n)
        .map(|i| shard(b, &broker, &lease_ns, i, host_of(i), fl_of(i)))
        .collect::<anyhow::Result<_>>()?;
    for op in &ops {
        op.ready().await?;
    }
    all_running(&b.client, &ns, ids.len(), Duration::from_secs(180)).await?;
    // A few participants, spread over the fleet (and so over the shards).
    let participants: Vec<String> = ids
        .iter()
        .step_by((ids.len() / 6).max(1))
        .take(6)
        .cloned()
        .collect();
    let fl_ran = chaos_fl::start(&b.client, &ns, &participants).await?;

    let done = Arc::new(Mutex::new(HashMap::new()));
    let _watch = watch_completions(&b.client, &ns, Arc::clone(&done));
    let names: Vec<String> = (0..tasks_n).map(|i| format!("chaos-{i}")).collect();
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A steady arrival, long enough for every kind of fault to strike while tasks arrive, run and report.
    let rate = (tasks_n as f64 / b.args.chaos_arrival_secs.max(1) as f64).max(1.0);
    let (client, task_ns) = (b.client.clone(), ns.clone());
    let creating =
        tokio::spawn(async move { create_tasks(&client, &task_ns, "chaos", names, rate).await });
    let deadline = started + Duration::from_secs(b.args.chaos_minutes * 60);
    let mut apiserver = b
        .cluster
        .local_or_skip("chaos: stopping and restarting the API server", "does it")
        .map(|cp| {
            ApiServer::new(
                cp.apiserver.pid,
                cp.dir.join("kube-apiserver-restarted.log"),
            )
        });
    let completed = || done.lock().map(|d| d.len()).unwrap_or(0);
    let mut faults: Vec<(String, Instant, Instant)> = Vec::new();
    let only = &b.args.chaos_faults;
    let names = [
        "kill",
        "broker",
        "apiserver",
        "partition",
        "apiserver-restart",
    ];
    let local = apiserver.is_some();
    let available = [true, true, local, remote.is_some(), local];
    let kinds = (0..names.len())
        .filter(|k| available[*k] && (only.is_empty() || only.iter().any(|o| o == names[*k])))
        .count();
    let mut cycle: Vec<u64> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(6 + rng.below(10))).await;
        if Instant::now() > deadline || (creating.is_finished() && completed() >= tasks_n) {
            break;
        }
        let struck = faults.len();
        // Until the tasks are nearly done, and at least one of every kind.
        if !creating.is_finished() || completed() < tasks_n * 9 / 10 || struck < kinds {
            let at = Instant::now();
            // Every kind in turn, in an order the seed picks: each strikes at least once per cycle.
            if cycle.is_empty() {
                cycle = (0..names.len() as u64)
                    .filter(|k| {
                        let k = *k as usize;
                        available[k] && (only.is_empty() || only.iter().any(|o| o == names[k]))
                    })
                    .collect();
                for i in (1..cycle.len()).rev() {
                    cycle.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let kind = match cycle.pop().unwrap_or(0) {
                0 => {
                    let i = rng.below(shards_n as u64) as usize;
                    ops[i].kill();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    ops[i] = shard(b, &broker, &lease_ns, i, host_of(i), fl_of(i))?;
                    format!("SIGKILL replica {i}")
                }
                1 => {
                    broker.restart()?;
                    "mosquitto restart".to_string()
                }
                3 => {
                    let secs = b.args.chaos_partition_secs;
                    if let Some(r) = &remote {
                        r.netns.cut_mqtt()?;
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                        r.netns.heal_mqtt()?;
                    }
                    format!("replica {cut} cut from the broker {secs} s")
                }
                4 => {
                    if let Some(a) = &mut apiserver {
                        a.restart(&b.client).await?;
                    }
                    "API server restarted".to_string()
                }
                _ => {
                    if let Some(a) = &apiserver {
                        a.pause(5).await;
                    }
                    "API server stopped 5 s".to_string()
                }
            };
            eprintln!(
                "chaos: {kind} at {:.0} s",
                at.duration_since(started).as_secs_f64()
            );
            faults.push((kind, at, Instant::now()));
        }
    }
    let created = match creating.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e),
        Err(e) => anyhow::bail!("creating tasks: {e}"),
    };
    // Let the last faults settle before judging.
    let settle_until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < settle_until
        && (completed() < created.len() || (fl_ran && !chaos_fl::over(&b.client, &ns).await))
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Judge.
    let tasks = Api::<Task>::namespaced(b.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tasks {
        *phases.entry(t.phase().as_str().to_string()).or_default() += 1;
    }
    let completed_uids: std::collections::HashSet<String> = tasks
        .iter()
        .filter(|t| t.phase() == TaskPhase::Completed)
        .filter_map(|t| t.uid())
        .collect();
    let stuck = tasks
        .iter()
        .filter(|t| t.phase().is_active() || t.phase() == TaskPhase::Pending)
        .count();
    let not_completed = created.len() - completed_uids.len().min(created.len());
    let mut runs: HashMap<String, usize> = HashMap::new();
    let mut start_msgs: HashMap<String, usize> = HashMap::new();
    for s in &sims {
        for id in s.runs.lock().map(|r| r.clone()).unwrap_or_default() {
            *runs.entry(id).or_default() += 1;
        }
        // Every proplet on a channel hears every start on it: count those addressed to this one.
        for st in s.starts_seen.lock().map(|r| r.clone()).unwrap_or_default() {
            if st["proplet_id"].as_str() != Some(s.client_id.as_str()) {
                continue;
            }
            if let Some(id) = st["id"].as_str() {
                *start_msgs.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    let at_broker = at_broker.lock().map(|m| m.clone()).unwrap_or_default();
    let reached = |id: &str| at_broker.get(id).copied().unwrap_or(0);
    let ran_twice = runs.values().filter(|n| **n > 1).count();
    // Run again though every earlier run's result had reached the broker: double work the operator caused.
    let ran_twice_needlessly = runs
        .iter()
        .filter(|(id, n)| **n > 1 && reached(id) >= **n)
        .count();
    let started_again = start_msgs.values().filter(|n| **n > 1).count();
    // A result the broker had and no Task recorded (a Task that ended records its result, or its error):
    // lost by the operator.
    let ended: std::collections::HashSet<String> = tasks
        .iter()
        .filter(|t| matches!(t.phase(), TaskPhase::Completed | TaskPhase::Failed))
        .filter_map(|t| t.uid())
        .collect();
    let dropped = runs
        .keys()
        .filter(|id| !ended.contains(*id) && reached(id) > 0)
        .count();
    let lost_by_proplets: usize = runs
        .iter()
        .map(|(id, n)| n.saturating_sub(reached(id)))
        .sum();
    // When each task that did not complete was created and last started: which fault it met.
    let not_completed_tasks: Vec<serde_json::Value> = tasks
        .iter()
        .filter(|t| t.phase() != TaskPhase::Completed)
        .map(|t| {
            let status = t.status.clone().unwrap_or_default();
            json!({
                "task": t.name_any(), "phase": t.phase().as_str(),
                "created": t.metadata.creation_timestamp.as_ref().map(|c| c.0.to_string()),
                "started": status.started_at.map(|s| s.0.to_string()),
                "proplet": status.assigned_client_id, "error": status.error,
                "runs": runs.get(&t.uid().unwrap_or_default()).copied().unwrap_or(0),
            })
        })
        .collect();
    let done_at: Vec<Instant> = done
        .lock()
        .map(|d| d.values().copied().collect())
        .unwrap_or_default();
    let mut recovery: Vec<(String, f64)> = Vec::new();
    for (kind, at, over) in &faults {
        // Completions resume: the first completion after the fault is over.
        if let Some(next) = done_at.iter().filter(|t| *t > over).min() {
            recovery.push((kind.clone(), next.duration_since(*at).as_secs_f64()));
        }
    }
    let secs = sorted(recovery.iter().map(|r| r.1).collect());
    let (fl_completed, fl) = if fl_ran {
        chaos_fl::judge(&b.client, &ns).await?
    } else {
        (
            false,
            json!("NOT RUN: the example FL client is not built (`make fl-client`)"),
        )
    };
    let result = json!({
        "federated_job": fl,
        "seed": seed, "tasks": created.len(), "proplets": proplets_n, "shards": shards_n,
        "faults": faults.iter().map(|f| json!({"fault": f.0, "at_s": f.1.duration_since(started).as_secs_f64()})).collect::<Vec<_>>(),
        "phases": phases,
        "tasks_not_completed": not_completed,
        "tasks_stuck": stuck,
        "tasks_run_twice_by_a_proplet": ran_twice,
        "tasks_run_twice_needlessly": ran_twice_needlessly,
        "results_lost_by_a_proplets_connection": lost_by_proplets,
        "tasks_whose_start_reached_their_proplet_again": started_again,
        "results_dropped": dropped,
        "not_completed": not_completed_tasks,
        "started_at_unix_s": started_unix,
        "recovery_s": recovery.iter().map(|r| json!({"fault": r.0, "s": r.1})).collect::<Vec<_>>(),
        "recovery_median_s": percentile(&secs, 50.0),
        "recovery_max_s": secs.last().copied().unwrap_or(0.0),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    std::fs::write(
        "bench/results/chaos.json",
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    for mut op in ops {
        op.kill();
    }
    for s in sims {
        s.kill();
    }
    observer.abort();
    if not_completed > 0 || stuck > 0 || ran_twice_needlessly > 0 || dropped > 0 || !fl_completed {
        anyhow::bail!("chaos: an invariant broke (see bench/results/chaos.json)");
    }
    Ok(())
}
