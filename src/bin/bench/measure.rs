//! What the benchmark reads off the API server, the operator processes and their /metrics.
use std::collections::BTreeMap;

use kube::Client;

use crate::operator::Probe;

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Write requests the API server counted, by resource (from its own `apiserver_request_total`).
pub async fn apiserver_writes(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        if !matches!(
            label("verb").as_str(),
            "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY"
        ) {
            continue;
        }
        let key = format!("{} {} {}", label("verb"), label("resource"), label("code"));
        *out.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// Writes between two snapshots on the resources the operator writes.
pub fn operator_writes(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    own: f64,
) -> f64 {
    let relevant = |k: &str| {
        let resource = k.split(' ').nth(1).unwrap_or_default();
        [
            "tasks",
            "proplets",
            "events",
            "propellerjobs",
            "jobs",
            "configmaps",
        ]
        .contains(&resource)
    };
    let total: f64 = after
        .iter()
        .filter(|(k, _)| relevant(k))
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
        .sum();
    total - own
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process.
pub fn proc_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let utime: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(((utime + stime) / ticks, hwm_kib / 1024.0))
}

/// The Task controller's work-queue depth, from the operator's /metrics.
pub async fn task_queue_depth(operator: &Probe) -> Option<f64> {
    let text = operator.metrics().await;
    text.lines()
        .find(|l| l.starts_with("workqueue_depth{name=\"task\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The sum of every sample of metric `name` whose labels contain each of `labels` (`k="v"` strings).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
