//! The results: `bench/results/latest.json` and the results block of `docs/benchmarks.md`.
use std::collections::BTreeMap;

use anyhow::bail;
use serde_json::{Value, json};

use crate::Args;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = mem
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| k / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} × {model}, {mem_gib:.1} GiB")
}

pub fn report(args: &Args, results: &BTreeMap<&str, Value>) -> anyhow::Result<()> {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M UTC")
        .to_string();
    let mut json_out = serde_json::Map::new();
    for (k, v) in results {
        json_out.insert(k.to_string(), v.clone());
    }
    json_out.insert("machine".into(), json!(machine()));
    json_out.insert("date".into(), json!(date));
    json_out.insert("commit".into(), json!(commit));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json_out)? + "\n")?;

    let num = |k: &str| results.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let limit = num("apiserver_write_limit_per_s");
    let per_task = num("api_writes_per_task");
    let burst_target = 0.8 * limit / (1.0 + per_task);
    let ok = |b: bool| if b { "met" } else { "**missed**" };
    let rows = [
        (
            "API server raw write limit",
            format!("{limit:.0} writes/s"),
            "reference".to_string(),
        ),
        (
            "burst throughput",
            format!(
                "{:.0} tasks/s ({:.2} × limit)",
                num("burst_tasks_per_s"),
                num("burst_tasks_per_s") / limit
            ),
            format!(
                "≥ {burst_target:.0} (0.8 × limit ÷ (1 + writes/task)): {}",
                ok(num("burst_tasks_per_s") >= burst_target)
            ),
        ),
        (
            "API writes per task (burst)",
            format!("{per_task:.2}"),
            format!("≤ 2 operator status writes: {}", ok(per_task <= 2.0)),
        ),
        (
            "steady max rate (p99 ≤ 1 s)",
            format!(
                "{:.0} tasks/s ({:.2} × limit)",
                num("steady_max_tasks_per_s"),
                num("steady_max_tasks_per_s") / limit
            ),
            "highest rate found".into(),
        ),
        (
            "dispatch p50 / p99 at 100 tasks/s",
            format!(
                "{:.1} / {:.1} ms",
                num("dispatch_p50_ms"),
                num("dispatch_p99_ms")
            ),
            format!("p99 ≤ 50 ms: {}", ok(num("dispatch_p99_ms") <= 50.0)),
        ),
        (
            "completion p50 / p99 at 100 tasks/s",
            format!(
                "{:.1} / {:.1} ms",
                num("completion_p50_ms"),
                num("completion_p99_ms")
            ),
            format!("p99 ≤ 50 ms: {}", ok(num("completion_p99_ms") <= 50.0)),
        ),
        (
            "heartbeats: API writes per proplet-minute",
            format!("{:.3}", num("heartbeat_api_writes_per_proplet_minute")),
            format!(
                "≤ 1: {}",
                ok(num("heartbeat_api_writes_per_proplet_minute") <= 1.0)
            ),
        ),
        (
            "heartbeats: operator CPU",
            format!("{:.3} cores", num("heartbeat_operator_cpu_cores")),
            format!("< 0.5: {}", ok(num("heartbeat_operator_cpu_cores") < 0.5)),
        ),
        (
            "heartbeats: operator peak RSS",
            format!("{:.0} MiB", num("heartbeat_operator_peak_rss_mib")),
            format!(
                "< 300 MiB: {}",
                ok(num("heartbeat_operator_peak_rss_mib") < 300.0)
            ),
        ),
        (
            "operator peak RSS (whole run)",
            format!("{:.0} MiB", num("operator_peak_rss_mib")),
            String::new(),
        ),
        (
            "restart mid-burst: results lost",
            format!(
                "{:.0} of {:.0}",
                num("restart_results_lost"),
                num("restart_tasks")
            ),
            format!("0: {}", ok(num("restart_results_lost") == 0.0)),
        ),
        (
            "restart mid-burst: tasks run twice",
            format!("{:.0}", num("restart_tasks_run_twice")),
            format!("0: {}", ok(num("restart_tasks_run_twice") == 0.0)),
        ),
        (
            "restart mid-burst: starts sent again (ignored by the running proplet)",
            format!("{:.0}", num("restart_starts_sent_again")),
            String::new(),
        ),
        (
            "restart mid-burst: every task ended, after the operator was back",
            format!(
                "{:.1} s (down {:.1} s)",
                num("restart_recovery_s"),
                num("restart_down_s")
            ),
            format!("≤ 10 s: {}", ok(num("restart_recovery_s") <= 10.0)),
        ),
    ];
    let mut block = format!(
        "<!-- bench:begin (written by `make bench`) -->\nMachine: {}. Date: {date}. Commit: {commit}. Burst: {} tasks over {} proplets; \
         heartbeats: {} proplets every 10 s.\n\n| measure | result | target |\n|---|---|---|\n",
        machine(),
        num("tasks"),
        num("proplets"),
        num("heartbeat_proplets"),
    );
    for (m, r, t) in rows {
        block.push_str(&format!("| {m} | {r} | {t} |\n"));
    }
    // Each steady step, with what limited it: an operator short of CPU or with a growing queue is the limit;
    // an idle operator with a short queue while latency grows means the API server is.
    if let Some(steps) = results.get("steady_steps").and_then(Value::as_array) {
        block.push_str(
            "\n| steady rate | p99 (dispatch, completion) | dispatch p99 | operator CPU | largest Task queue |\n|---|---|---|---|---|\n",
        );
        for st in steps {
            let f = |k: &str| st.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            block.push_str(&format!(
                "| {:.0}/s | {:.0} ms | {:.0} ms | {:.2} cores | {:.0} |\n",
                f("rate"),
                f("p99_ms"),
                f("dispatch_p99_ms"),
                f("operator_cpu_cores"),
                f("max_task_queue")
            ));
        }
    }
    block.push_str(&sharding_block(results));
    block.push_str("<!-- bench:end -->");
    let doc = std::fs::read_to_string(&args.doc).unwrap_or_default();
    let new_doc = match (doc.find("<!-- bench:begin"), doc.find("<!-- bench:end -->")) {
        (Some(a), Some(b)) if b > a => format!(
            "{}{}{}",
            &doc[..a],
            block,
            &doc[b + "<!-- bench:end -->".len()..]
        ),
        _ => {
            if doc.is_empty() {
                bail!("{} is missing", args.doc.display());
            }
            format!("{doc}\n{block}\n")
        }
    };
    std::fs::write(&args.doc, new_doc)?;
    eprintln!("wrote {} and {}", args.out.display(), args.doc.display());
    Ok(())
}

/// The sharding results: each figure beside the single replica measured in the same run.
fn sharding_block(results: &BTreeMap<&str, Value>) -> String {
    let num = |k: &str| results.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    if num("shard_count").is_nan() {
        return String::new();
    }
    let ok = |b: bool| if b { "met" } else { "**missed**" };
    let n = num("shard_count");
    let lease = 15.0;
    let rows = [
        (
            format!("burst throughput, {n:.0} shards vs 1 replica"),
            format!(
                "{:.0} vs {:.0} tasks/s ({:.2}×); writes/task {:.2} vs {:.2}",
                num("shard_burst_tasks_per_s"),
                num("shard_burst_single_tasks_per_s"),
                num("shard_burst_tasks_per_s") / num("shard_burst_single_tasks_per_s"),
                num("shard_burst_writes_per_task"),
                num("shard_burst_single_writes_per_task"),
            ),
            "measured".to_string(),
        ),
        (
            format!(
                "{:.0} proplets: largest shard's CPU ÷ single replica's (the mean of one measured before the shards and one after: {})",
                num("shard_scale_proplets"),
                single_windows(results, "cpu_cores", "cores", 3)
            ),
            format!("{:.2}", num("shard_cpu_ratio")),
            format!("≤ 0.4: {}", ok(num("shard_cpu_ratio") <= 0.4)),
        ),
        (
            format!(
                "{:.0} proplets: largest shard's peak RSS ÷ single replica's (current RSS; the single replica's peak before and after: {})",
                num("shard_scale_proplets"),
                single_windows(results, "peak_rss_mib", "MiB", 0)
            ),
            format!(
                "{:.2} ({:.2})",
                num("shard_rss_ratio"),
                num("shard_current_rss_ratio")
            ),
            format!("≤ 0.4: {}", ok(num("shard_rss_ratio") <= 0.4)),
        ),
        (
            "… the same for anonymous memory only (RssAnon: without the executable's pages, which the page cache shares)"
                .into(),
            format!("{:.2}", num("shard_anon_rss_ratio")),
            "measured".into(),
        ),
        (
            "… the followers alone, CPU / RSS / anonymous (the leader also keeps a view of every Proplet for placement)"
                .into(),
            format!(
                "{:.2} / {:.2} / {:.2}",
                num("shard_follower_cpu_ratio"),
                num("shard_follower_rss_ratio"),
                num("shard_follower_anon_rss_ratio")
            ),
            "measured".into(),
        ),
        (
            "heartbeats a shard receives ÷ heartbeats published: 1 channel / 1 channel per 100"
                .into(),
            format!(
                "{:.2} / {:.2}",
                num("shard_messages_ratio_one_channel"),
                num("shard_messages_ratio_per_100")
            ),
            "measured (topics carry the channel, not the clientId)".into(),
        ),
        (
            "API writes per proplet-minute, sharded".into(),
            format!("{:.3}", num("shard_writes_per_proplet_minute")),
            format!(
                "≤ 0.5: {}",
                ok(num("shard_writes_per_proplet_minute") <= 0.5)
            ),
        ),
        (
            "failover: follower SIGKILLed → every proplet owned by a survivor (takeover)".into(),
            format!("{:.1} s", num("shard_failover_s")),
            format!(
                "≤ Lease {lease:.0} s + 2 s: {}",
                ok(num("shard_failover_s") <= lease + 2.0)
            ),
        ),
        (
            "… of which: kill → its Lease fenced (taken, with the takeover record)".into(),
            format!("{:.1} s", num("shard_failover_fenced_s")),
            format!(
                "takeover after the fence: {:.1} s",
                num("shard_failover_s") - num("shard_failover_fenced_s")
            ),
        ),
        (
            "… and in the background: kill → first / last proplet relabelled".into(),
            format!(
                "{:.1} / {:.1} s",
                num("shard_failover_first_s"),
                num("shard_failover_relabelled_s")
            ),
            format!("{} proplets", num("shard_failover_moves")),
        ),
        (
            "the killed shard back as itself → balanced again".into(),
            format!("{:.1} s", num("shard_rejoin_s")),
            String::new(),
        ),
        (
            "graceful handover of one proplet (drain label → labelled with its new shard), p50 / p99".into(),
            format!(
                "{:.2} / {:.2} s",
                num("shard_drain_to_moved_p50_s"),
                num("shard_drain_to_moved_p99_s")
            ),
            format!("≤ 2 s: {}", ok(num("shard_drain_to_moved_p99_s") <= 2.0)),
        ),
        (
            "graceful stop (SIGTERM) → each proplet on its new shard, p50 / p99".into(),
            format!(
                "{:.2} / {:.2} s",
                num("shard_handover_p50_s"),
                num("shard_handover_p99_s")
            ),
            String::new(),
        ),
        (
            "graceful stop: proplets handed over, replica exited, all moved".into(),
            format!(
                "{:.0} proplets, {:.1} s, {:.1} s",
                num("shard_graceful_proplets"),
                num("shard_graceful_exit_s"),
                num("shard_graceful_all_moved_s")
            ),
            String::new(),
        ),
        (
            format!("largest fleet {n:.0} shards hold (10 s heartbeats, ≤ 0.5 writes/proplet-min)"),
            format!("{:.0} proplets", num("shard_largest_fleet")),
            format!(
                "aim 100,000: {}",
                ok(num("shard_largest_fleet") >= 100_000.0)
            ),
        ),
    ];
    let mut out = format!(
        "\n### Sharding ({n:.0} replicas with `--leader-elect`, default Lease timings)\n\n| measure | result | target |\n|---|---|---|\n"
    );
    for (m, r, t) in rows {
        out.push_str(&format!("| {m} | {r} | {t} |\n"));
    }
    if let Some(steps) = results.get("shard_fleet_steps").and_then(Value::as_array) {
        out.push_str("\n| fleet | held | writes/proplet-min | largest shard CPU | largest shard RSS | why not |\n|---|---|---|---|---|---|\n");
        for st in steps {
            let f = |k: &str| st.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            out.push_str(&format!(
                "| {:.0} | {} | {:.3} | {:.2} cores | {:.0} MiB | {} |\n",
                f("proplets"),
                if st["held"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                f("writes_per_proplet_minute"),
                f("max_shard_cpu_cores"),
                f("max_shard_rss_mib"),
                st["why"].as_str().unwrap_or(""),
            ));
        }
    }
    if results.get("sharded_only_run").is_some() {
        out.push_str("\nThe sharding rows come from `bench --sharded-only`; the rows above from the last full run.\n");
    }
    out
}

/// One field of the single replica's measuring windows (before and after the shards), as "a and b unit".
fn single_windows(results: &BTreeMap<&str, Value>, key: &str, unit: &str, digits: usize) -> String {
    let values: Vec<String> = results
        .get("shard_scale_single_windows")
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r[key].as_f64())
                .map(|v| format!("{v:.digits$}"))
                .collect()
        })
        .unwrap_or_default();
    match values.as_slice() {
        [] => "not measured".to_string(),
        _ => format!("{} {unit}", values.join(" and ")),
    }
}
