//! The sharding scenarios, each comparing several replicas (`--leader-elect`, one shard each) with one
//! replica in the same run: a burst, messages per shard on one channel and on one channel per 100
//! proplets, CPU and memory per shard over a large heartbeating fleet, failover after a SIGKILL, a graceful
//! handover after a SIGTERM, and the largest fleet the shards hold.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Bench;
use crate::fleet::{
    all_running, channel_of, create_tasks, heartbeat_swarm, make_proplets, make_proplets_at,
    remove_run, sims, wait_and_measure, watch_completions,
};
use crate::measure::{apiserver_writes, metric_sum, operator_writes, proc_usage};
use crate::operator::Operator;
use crate::sharded_moves::{Fleet, failover, graceful};
use crate::shards::{census, identity, leader, settle, start_shards};

/// Proplets per MQTT channel in the scale and growth scenarios.
const PER_CHANNEL: usize = 100;

/// MQTT messages an operator received (every kind and outcome) and those it dropped as not its own.
async fn messages(op: &Operator) -> (f64, f64) {
    let text = op.metrics().await;
    (
        metric_sum(&text, "propeller_mqtt_messages_total", &[]),
        metric_sum(
            &text,
            "propeller_mqtt_messages_total",
            &["outcome=\"not_owned\""],
        ),
    )
}

/// What a set of operators used over a window: CPU cores, peak and current RSS, messages received.
async fn usage_over(ops: &[&Operator], window: Duration) -> anyhow::Result<Vec<Value>> {
    let mut before = Vec::new();
    for op in ops {
        before.push((proc_usage(op.pid())?.0, messages(op).await));
    }
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (op, (cpu0, (msg0, drop0))) in ops.iter().zip(before) {
        let (cpu1, peak) = proc_usage(op.pid())?;
        let (msg1, drop1) = messages(op).await;
        out.push(json!({
            "identity": op.identity,
            "cpu_cores": (cpu1 - cpu0) / secs,
            "peak_rss_mib": peak,
            "rss_mib": status_mib(op.pid(), "VmRSS:"),
            "anon_rss_mib": status_mib(op.pid(), "RssAnon:"),
            "messages_per_s": (msg1 - msg0) / secs,
            "not_owned_per_s": (drop1 - drop0) / secs,
        }));
    }
    Ok(out)
}

/// A size from /proc/{pid}/status, in MiB: `VmRSS:` (resident now) or `RssAnon:` (its part that is the
/// process's own memory, without the executable's and libraries' pages, which the page cache shares).
fn status_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |k| k / 1024.0)
}

fn max_of(rows: &[Value], key: &str) -> f64 {
    rows.iter()
        .filter_map(|r| r[key].as_f64())
        .fold(f64::NAN, f64::max)
}

/// A single replica over the heartbeating fleet of `n` proplets in `ns`, measured for `window` once it
/// runs them all and its start-up writes are over; then killed.
async fn single_window(
    b: &Bench,
    ns: &str,
    n: usize,
    when: &str,
    window: Duration,
) -> anyhow::Result<Value> {
    let mut single = Operator::start(&b.args.operator, b.cluster, &b.broker, &b.log)?;
    single.ready().await?;
    all_running(&b.client, ns, n, Duration::from_secs(600)).await?;
    // Its first heartbeat from each proplet is news to it (10,000 status reads, some writes): over in
    // about 30 s at 10,000 proplets.
    tokio::time::sleep(Duration::from_secs(45)).await;
    eprintln!(
        "scale: measuring the single replica ({when} the shards) for {} s",
        window.as_secs()
    );
    let row = usage_over(&[&single], window).await?;
    single.kill();
    row.into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no usage measured for the single replica"))
}

/// The mean of two usage rows of one kind of replica, field by field.
fn mean_row(a: &Value, b: &Value) -> Value {
    let mut out = a.clone();
    if let (Some(o), Some(bo)) = (out.as_object_mut(), b.as_object()) {
        for (k, v) in o.iter_mut() {
            if let (Some(x), Some(y)) = (v.as_f64(), bo.get(k).and_then(Value::as_f64)) {
                *v = json!((x + y) / 2.0);
            }
        }
    }
    out
}

/// Heartbeats for `ids` (channel `per_channel` as they were created) until aborted.
fn beat(b: &Bench, ids: &[String], per_channel: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(heartbeat_swarm(
        b.broker.port,
        b.broker.username.clone(),
        b.broker.password.clone(),
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), channel_of(i, per_channel)))
            .collect(),
    ))
}

/// One burst of `b.args.burst_tasks` in `ns`: tasks/s and operator writes per task.
async fn burst_once(b: &Bench, ns: &str, run: &str) -> anyhow::Result<(f64, f64)> {
    let done = Arc::new(Mutex::new(HashMap::new()));
    let watch = watch_completions(&b.client, ns, Arc::clone(&done));
    let before = apiserver_writes(&b.client).await?;
    let t0 = Instant::now();
    let names: Vec<String> = (0..b.args.burst_tasks)
        .map(|i| format!("{run}-{i}"))
        .collect();
    let created = create_tasks(&b.client, ns, run, names, 0.0).await?;
    let lat = wait_and_measure(&created, &b.wire, &done, Duration::from_secs(900)).await?;
    let secs = lat
        .last_completion
        .map_or(f64::NAN, |l| l.duration_since(t0).as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = apiserver_writes(&b.client).await?;
    watch.abort();
    remove_run(&b.client, ns, run).await?;
    let n = b.args.burst_tasks as f64;
    Ok((n / secs, operator_writes(&before, &after, n) / n))
}

pub async fn run(b: &mut Bench) -> anyhow::Result<()> {
    let lease_ns = b.cluster.namespace(&b.client, "bench-leases").await?;
    let shards_n = b.args.shards;

    let live: Vec<String> = (0..shards_n).map(identity).collect();
    if !b.args.shard_scale_only && !b.args.shard_failover_only {
        burst_and_fanout(b, &lease_ns, &live).await?;
    }
    // 3. Scale: one replica, then the shards, over the same heartbeating fleet (a channel per 100).
    let ns = b.cluster.namespace(&b.client, "bench-scale").await?;
    let mut ids: Vec<String> = (0..b.args.shard_proplets)
        .map(|i| format!("sc-{i}"))
        .collect();
    make_proplets(&b.client, &ns, &ids, &b.broker, PER_CHANNEL).await?;
    let mut hb = beat(b, &ids, PER_CHANNEL);
    let fleet = Fleet {
        ns: &ns,
        lease_ns: &lease_ns,
        live: &live,
        n: ids.len(),
    };
    if b.args.shard_failover_only {
        let mut ops = start_shards(b, &lease_ns).await?;
        settle(b, &ns, ids.len(), &live, true, Duration::from_secs(600)).await?;
        failover(b, &fleet, &mut ops).await?;
        hb.abort();
        for op in &mut ops {
            op.kill();
        }
        b.cluster.delete_namespace(&b.client, &ns).await;
        b.cluster.delete_namespace(&b.client, &lease_ns).await;
        return Ok(());
    }
    let window = Duration::from_secs(b.args.shard_window_seconds);
    let first_single = single_window(b, &ns, ids.len(), "before", window).await?;
    let mut ops = start_shards(b, &lease_ns).await?;
    settle(b, &ns, ids.len(), &live, true, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let before = apiserver_writes(&b.client).await?;
    let t0 = Instant::now();
    let refs: Vec<&Operator> = ops.iter().collect();
    eprintln!("scale: measuring the shards for {} s", window.as_secs());
    let rows = usage_over(&refs, window).await?;
    let after = apiserver_writes(&b.client).await?;
    let per_min = operator_writes(&before, &after, 0.0)
        / (ids.len() as f64 * t0.elapsed().as_secs_f64() / 60.0);
    let leading = leader(&ops).await.map(identity);
    // The single replica again, after the shards: the shards are compared with the mean of the two, so
    // that a drift of the machine over the run (a single replica's CPU moved by a quarter between runs)
    // does not fall on one side only.
    for op in &mut ops {
        op.kill();
    }
    let last_single = single_window(b, &ns, ids.len(), "after", window).await?;
    let single_row = vec![mean_row(&first_single, &last_single)];
    let ratio = |key: &str| max_of(&rows, key) / max_of(&single_row, key);
    // The leader's extra work (its view of every Proplet, the ring over them) apart from a shard's own.
    let followers: Vec<Value> = rows
        .iter()
        .filter(|r| r["identity"].as_str() != leading.as_deref())
        .cloned()
        .collect();
    let follower_ratio = |key: &str| max_of(&followers, key) / max_of(&single_row, key);
    let published = ids.len() as f64 / 10.0;
    let fan100 = max_of(&rows, "messages_per_s") / published;
    eprintln!(
        "scale {}: shard/singleton CPU {:.2}, peak RSS {:.2}, messages {fan100:.2} of the heartbeats",
        ids.len(),
        ratio("cpu_cores"),
        ratio("peak_rss_mib")
    );
    b.results.insert("shard_scale_proplets", json!(ids.len()));
    b.results.insert("shard_scale_single", json!(single_row));
    b.results.insert(
        "shard_scale_single_windows",
        json!([first_single, last_single]),
    );
    b.results.insert("shard_scale_shards", json!(rows));
    b.results
        .insert("shard_cpu_ratio", json!(ratio("cpu_cores")));
    b.results
        .insert("shard_rss_ratio", json!(ratio("peak_rss_mib")));
    b.results
        .insert("shard_current_rss_ratio", json!(ratio("rss_mib")));
    b.results
        .insert("shard_anon_rss_ratio", json!(ratio("anon_rss_mib")));
    b.results.insert("shard_scale_leader", json!(leading));
    b.results.insert(
        "shard_follower_cpu_ratio",
        json!(follower_ratio("cpu_cores")),
    );
    b.results
        .insert("shard_follower_rss_ratio", json!(follower_ratio("rss_mib")));
    b.results.insert(
        "shard_follower_anon_rss_ratio",
        json!(follower_ratio("anon_rss_mib")),
    );
    b.results
        .insert("shard_messages_ratio_per_100", json!(fan100));
    b.results
        .insert("shard_writes_per_proplet_minute", json!(per_min));
    if b.args.shard_scale_only {
        hb.abort();
        b.cluster.delete_namespace(&b.client, &ns).await;
        b.cluster.delete_namespace(&b.client, &lease_ns).await;
        return Ok(());
    }
    // The shards back for the rest, under the same names: each takes up its own Lease again.
    let mut ops = start_shards(b, &lease_ns).await?;
    settle(b, &ns, ids.len(), &live, true, Duration::from_secs(600)).await?;

    failover(b, &fleet, &mut ops).await?;
    graceful(b, &fleet, &mut ops).await?;
    // Rebalancing a large fleet live may outlast the wait on a loaded machine: that is a result too, and
    // the fleet search needs a balanced ring, so it is skipped then.
    let rebalanced = settle(b, &ns, ids.len(), &live, true, Duration::from_secs(300)).await;
    if let Err(e) = &rebalanced {
        eprintln!("rebalance after the graceful stop: {e}");
        b.results
            .insert("shard_rebalance_error", json!(format!("{e:#}")));
    }

    // 6. The largest fleet the shards hold: heartbeats every 10 s, ≤ 0.5 writes per proplet-minute.
    let budget = Instant::now() + Duration::from_secs(b.args.fleet_minutes * 60);
    let mut steps = vec![
        json!({"proplets": ids.len(), "held": true, "writes_per_proplet_minute": per_min,
                                "max_shard_cpu_cores": max_of(&rows, "cpu_cores"),
                                "max_shard_rss_mib": max_of(&rows, "rss_mib")}),
    ];
    let mut largest = ids.len();
    while rebalanced.is_ok() && ids.len() < b.args.fleet_max && Instant::now() < budget {
        let target = (ids.len() * 2).min(b.args.fleet_max);
        let more: Vec<String> = (ids.len()..target).map(|i| format!("sc-{i}")).collect();
        // Created with their index, so each lands on the channel its heartbeats use.
        make_proplets_at(&b.client, &ns, &more, &b.broker, PER_CHANNEL, ids.len()).await?;
        ids.extend(more);
        hb.abort();
        hb = beat(b, &ids, PER_CHANNEL);
        let step = fleet_step(b, &ns, &ids, &ops, &live).await;
        eprintln!("fleet {}: {step}", ids.len());
        let held = step["held"].as_bool().unwrap_or(false);
        steps.push(step);
        if !held {
            break;
        }
        largest = ids.len();
    }
    hb.abort();
    b.results.insert("shard_fleet_steps", json!(steps));
    b.results.insert("shard_largest_fleet", json!(largest));
    for op in &mut ops {
        op.terminate(Duration::from_secs(60)).await;
    }
    b.cluster.delete_namespace(&b.client, &ns).await;
    b.cluster.delete_namespace(&b.client, &lease_ns).await;
    Ok(())
}

/// The burst (one replica, then the shards, on the same proplets) and the messages per shard with every
/// proplet on one channel.
async fn burst_and_fanout(b: &mut Bench, lease_ns: &str, live: &[String]) -> anyhow::Result<()> {
    let shards_n = b.args.shards;
    // 1. Burst: one replica, then the shards, on the same proplets.
    let ns = b.cluster.namespace(&b.client, "bench-sburst").await?;
    let ids: Vec<String> = (0..b.args.burst_proplets)
        .map(|i| format!("sb-{i}"))
        .collect();
    make_proplets(&b.client, &ns, &ids, &b.broker, 0).await?;
    let swarm = sims(&mut b.broker, &ids).await?;
    let mut single = Operator::start(&b.args.operator, b.cluster, &b.broker, &b.log)?;
    single.ready().await?;
    all_running(&b.client, &ns, ids.len(), Duration::from_secs(120)).await?;
    let (rate1, writes1) = burst_once(b, &ns, "sb1").await?;
    single.kill();
    let mut ops = start_shards(b, lease_ns).await?;
    settle(b, &ns, ids.len(), live, false, Duration::from_secs(120)).await?;
    let (rate_n, writes_n) = burst_once(b, &ns, "sbn").await?;
    eprintln!(
        "sharded burst: 1 replica {rate1:.0} tasks/s ({writes1:.2} writes/task), {shards_n} shards {rate_n:.0} tasks/s ({writes_n:.2})"
    );
    b.results
        .insert("shard_burst_single_tasks_per_s", json!(rate1));
    b.results.insert("shard_burst_tasks_per_s", json!(rate_n));
    b.results
        .insert("shard_burst_single_writes_per_task", json!(writes1));
    b.results
        .insert("shard_burst_writes_per_task", json!(writes_n));
    b.results.insert("shard_count", json!(shards_n));
    for s in swarm {
        s.kill();
    }
    b.cluster.delete_namespace(&b.client, &ns).await;

    // 2. Messages per shard with every proplet on one channel.
    let ns = b.cluster.namespace(&b.client, "bench-fan").await?;
    let ids: Vec<String> = (0..b.args.fanout_proplets)
        .map(|i| format!("fan-{i}"))
        .collect();
    make_proplets(&b.client, &ns, &ids, &b.broker, 0).await?;
    let hb = beat(b, &ids, 0);
    settle(b, &ns, ids.len(), live, false, Duration::from_secs(300)).await?;
    let refs: Vec<&Operator> = ops.iter().collect();
    let rows = usage_over(&refs, Duration::from_secs(60)).await?;
    hb.abort();
    let published = ids.len() as f64 / 10.0;
    let fan1 = max_of(&rows, "messages_per_s") / published;
    eprintln!("one channel: each shard receives {fan1:.2} of the heartbeats");
    b.results
        .insert("shard_messages_ratio_one_channel", json!(fan1));
    b.results.insert("shard_fanout_one_channel", json!(rows));
    b.cluster.delete_namespace(&b.client, &ns).await;

    // Killed, not stopped: a graceful stop would hand every proplet from one to the next. The scale scenario
    // starts each again as itself, and it takes its own Lease again.
    for op in &mut ops {
        op.kill();
    }
    Ok(())
}

/// One step of the fleet search: every proplet Running and ≤ 0.5 writes per proplet-minute over two
/// measuring windows.
async fn fleet_step(
    b: &Bench,
    ns: &str,
    ids: &[String],
    ops: &[Operator],
    live: &[String],
) -> Value {
    let n = ids.len();
    if let Err(e) = settle(b, ns, n, live, false, Duration::from_secs(900)).await {
        return json!({"proplets": n, "held": false, "why": format!("never settled: {e}")});
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let Ok(before) = apiserver_writes(&b.client).await else {
        return json!({"proplets": n, "held": false, "why": "API server metrics unreadable"});
    };
    let t0 = Instant::now();
    let refs: Vec<&Operator> = ops.iter().collect();
    let rows = usage_over(&refs, Duration::from_secs(2 * b.args.shard_window_seconds))
        .await
        .unwrap_or_default();
    let per_min = match apiserver_writes(&b.client).await {
        Ok(after) => {
            operator_writes(&before, &after, 0.0) / (n as f64 * t0.elapsed().as_secs_f64() / 60.0)
        }
        Err(_) => f64::NAN,
    };
    let running = census(b, ns, live).await.map(|c| c.running).unwrap_or(0);
    let held = running >= n && per_min <= 0.5;
    let why = if running < n {
        format!("{} of {n} proplets not Running at the end", n - running)
    } else if per_min > 0.5 {
        format!("{per_min:.2} writes per proplet-minute")
    } else {
        String::new()
    };
    json!({
        "proplets": n, "held": held, "why": why, "writes_per_proplet_minute": per_min,
        "max_shard_cpu_cores": max_of(&rows, "cpu_cores"),
        "max_shard_rss_mib": max_of(&rows, "rss_mib"),
        "max_shard_messages_per_s": max_of(&rows, "messages_per_s"),
    })
}
