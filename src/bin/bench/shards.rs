//! What the sharding scenarios share: the shards started as replicas of one ring, which is the leader, and
//! where a fleet's Proplets stand (a census from the API server).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::{Api, Client, ResourceExt};
use propeller_operator::api::Proplet;
use propeller_operator::api::proplet::PropletPhase;
use propeller_operator::controllers::sharding::plan::position;
use propeller_operator::sharding::ring::{LOAD_FACTOR, Ring, VIRTUAL_NODES};
use propeller_operator::sharding::{DRAIN_LABEL, SHARD_LABEL};

use crate::Bench;
use crate::measure::metric_sum;
use crate::operator::{Operator, ShardSpec};

/// Where a fleet's Proplets stand: phase and shard labels, and how many sit where the ring puts them.
#[derive(Default, Debug)]
pub struct Census {
    pub total: usize,
    pub running: usize,
    pub by_shard: BTreeMap<String, usize>,
    draining: usize,
    unlabelled: usize,
    /// Labelled with the shard the ring assigns (over every Proplet of the cluster) to the live shards.
    placed: usize,
}

/// Every Proplet of the cluster (paged: listing thousands is itself load on the API server).
async fn all_proplets(client: &Client) -> anyhow::Result<Vec<Proplet>> {
    let api: Api<Proplet> = Api::all(client.clone());
    let mut out = Vec::new();
    let mut lp = kube::api::ListParams::default().limit(1000);
    loop {
        let page = api.list(&lp).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(out),
        }
    }
}

pub async fn census(b: &Bench, ns: &str, live: &[String]) -> anyhow::Result<Census> {
    let by = b.args.shard_by;
    let all = all_proplets(&b.client).await?;
    let ring = Ring::new(live.iter().cloned(), VIRTUAL_NODES);
    // Placed as the leader places them: by clientId, within its channel when the ring groups by channel.
    let placed: Vec<(String, &str)> = all
        .iter()
        .filter_map(|p| {
            let client = p.spec.connection_config.client()?;
            Some((position(p, by), client))
        })
        .collect();
    let want = ring.assign_grouped(placed.iter().map(|(g, k)| (g.as_str(), *k)), LOAD_FACTOR);
    let mut out = Census::default();
    for p in all.iter().filter(|p| p.namespace().as_deref() == Some(ns)) {
        out.total += 1;
        if p.phase() == PropletPhase::Running {
            out.running += 1;
        }
        let shard = p.labels().get(SHARD_LABEL);
        match shard {
            Some(s) => *out.by_shard.entry(s.clone()).or_default() += 1,
            None => out.unlabelled += 1,
        }
        if p.labels().contains_key(DRAIN_LABEL) {
            out.draining += 1;
        } else if let Some(c) = p.spec.connection_config.client()
            && shard.is_some()
            && shard.map(String::as_str) == want.get(c).copied()
        {
            out.placed += 1;
        }
    }
    Ok(out)
}

/// Waits until `n` Proplets are Running, each labelled with one of `live`, none draining; and, when
/// `balanced`, each where the ring over `live` puts it. Returns the time it took.
pub async fn settle(
    b: &Bench,
    ns: &str,
    n: usize,
    live: &[String],
    balanced: bool,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let c = census(b, ns, live).await?;
        let labelled: usize = live.iter().filter_map(|s| c.by_shard.get(s)).sum();
        if c.running >= n && labelled >= n && c.draining == 0 && (!balanced || c.placed >= n) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            anyhow::bail!("not settled after {timeout:?}: {c:?}");
        }
        // Listing the whole fleet is itself load on the API server: less often for a large one.
        tokio::time::sleep(Duration::from_millis(500).max(Duration::from_millis(n as u64 / 4)))
            .await;
    }
}

pub fn identity(i: usize) -> String {
    format!("bench-shard-{i}")
}

pub fn start_shard(b: &Bench, lease_ns: &str, i: usize) -> anyhow::Result<Operator> {
    Operator::start_shard(
        &b.args.operator,
        b.cluster,
        &b.broker,
        &b.log,
        &ShardSpec {
            identity: &identity(i),
            lease_namespace: lease_ns,
            host: None,
            fl: None,
            shard_by: b.args.shard_by,
        },
    )
}

pub async fn start_shards(b: &Bench, lease_ns: &str) -> anyhow::Result<Vec<Operator>> {
    let mut ops = Vec::new();
    for i in 0..b.args.shards {
        ops.push(start_shard(b, lease_ns, i)?);
    }
    for op in &ops {
        op.ready().await?;
    }
    Ok(ops)
}

/// The index of the replica that reports itself leader.
pub async fn leader(ops: &[Operator]) -> Option<usize> {
    for (i, op) in ops.iter().enumerate() {
        if metric_sum(&op.metrics().await, "leader_election_master_status", &[]) >= 1.0 {
            return Some(i);
        }
    }
    None
}
