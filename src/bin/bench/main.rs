//! `make bench`: the operator (release build, its own process) against the test bed's local cluster and
//! mosquitto with simulated proplets. Scenarios, all in one run: the API server's raw write limit, a burst
//! of Tasks, a steady arrival rate searched for its highest sustainable value, and a swarm of heartbeating
//! proplets. Writes `bench/results/latest.json` and the results block of `docs/benchmarks.md`.
mod chaos;
mod chaos_apiserver;
mod chaos_fl;
mod fleet;
mod measure;
mod operator;
mod report;
mod scenarios;
mod sharded;
mod sharded_moves;
mod shards;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use kube::Client;
use propeller_operator::testbed::{self, Broker, TestCluster};
use serde_json::{Value, json};

use crate::fleet::{Wire, observe_wire};
use crate::operator::Operator;

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";
const DOMAIN: &str = "bench-dom";
const CHANNEL: &str = "bench-chan";

#[derive(Parser, Debug)]
#[command(about = "Benchmarks of propeller-operator (see docs/benchmarks.md)")]
pub struct Args {
    /// Where the JSON results go.
    #[arg(long, default_value = "bench/results/latest.json")]
    pub out: PathBuf,
    /// The Markdown page whose results block is rewritten.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub doc: PathBuf,
    /// The operator binary (a release build).
    #[arg(long, default_value = "target/release/propeller-operator")]
    pub operator: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub burst_tasks: usize,
    #[arg(long, default_value_t = 200)]
    pub burst_proplets: usize,
    /// Seconds per steady-rate step.
    #[arg(long, default_value_t = 60)]
    pub steady_seconds: u64,
    #[arg(long, default_value_t = 10_000)]
    pub heartbeat_proplets: usize,
    /// Seconds of the heartbeat scenario (after every proplet is Running).
    #[arg(long, default_value_t = 180)]
    pub heartbeat_seconds: u64,
    /// Tasks of the restart scenario (each takes 2 s) and its proplets.
    #[arg(long, default_value_t = 600)]
    pub restart_tasks: usize,
    #[arg(long, default_value_t = 50)]
    pub restart_proplets: usize,
    /// Only the heartbeat scenario; results are printed, not written (for investigating it).
    #[arg(long)]
    pub heartbeats_only: bool,
    /// Only the sharding scenarios; their results replace those in `--out` and the page's results block.
    #[arg(long)]
    pub sharded_only: bool,
    /// Only the sharding scale scenario (one replica, then the shards, over the same fleet); results are
    /// printed, not written (for investigating a shard's CPU and memory, e.g. with perf beside it).
    #[arg(long)]
    pub shard_scale_only: bool,
    /// Only the sharding failover scenario (the shards over the fleet, one killed): results are printed,
    /// not written (for investigating a takeover, with each survivor's timeline).
    #[arg(long)]
    pub shard_failover_only: bool,
    /// Replicas in the sharding scenarios.
    #[arg(long, default_value_t = 3)]
    pub shards: usize,
    /// Proplets of the sharding scale scenario (one MQTT channel per 100 of them).
    #[arg(long, default_value_t = 10_000)]
    pub shard_proplets: usize,
    /// Seconds over which CPU, memory, messages and writes are measured in the sharding scale scenario:
    /// two of the operator's `--status-refresh` periods (3 min), so that each window holds two lastSeen
    /// refreshes of every proplet, for the single replica and the shards alike. (When refreshes still came
    /// in waves, a window shorter than two periods held one or two of them: 0.40 or 0.58 writes per
    /// proplet-minute from the same code.)
    #[arg(long, default_value_t = 360)]
    pub shard_window_seconds: u64,
    /// What the shards' ring hashes (the operator's `--shard-by`): client-id or channel.
    #[arg(long, value_enum, default_value_t = propeller_operator::config::ShardBy::ClientId)]
    pub shard_by: propeller_operator::config::ShardBy,
    /// Proplets on one channel for the messages-per-shard comparison.
    #[arg(long, default_value_t = 1_200)]
    pub fanout_proplets: usize,
    /// The fleet-growth search stops at this many proplets...
    #[arg(long, default_value_t = 100_000)]
    pub fleet_max: usize,
    /// ...or after this many minutes.
    #[arg(long, default_value_t = 30)]
    pub fleet_minutes: u64,
    /// Only the chaos run (`make chaos`): results in bench/results/chaos.json.
    #[arg(long)]
    pub chaos: bool,
    #[arg(long, default_value_t = 5_000)]
    pub chaos_tasks: usize,
    #[arg(long, default_value_t = 200)]
    pub chaos_proplets: usize,
    /// The chaos run stops after this many minutes whatever happens.
    #[arg(long, default_value_t = 8)]
    pub chaos_minutes: u64,
    /// Repeats a chaos run's faults (printed at its start).
    #[arg(long)]
    pub chaos_seed: Option<u64>,
    /// How long the partitioned replica stays cut from the broker (long enough for both sides to notice).
    #[arg(long, default_value_t = 60)]
    pub chaos_partition_secs: u64,
    /// Tasks arrive steadily over this many seconds.
    #[arg(long, default_value_t = 150)]
    pub chaos_arrival_secs: u64,
    /// Only these fault kinds (comma-separated: kill, broker, apiserver, partition); all by default.
    #[arg(long, value_delimiter = ',')]
    pub chaos_faults: Vec<String>,
}

/// What every scenario shares: the cluster, the broker, the wire observer, the results so far.
pub struct Bench {
    pub args: Args,
    pub cluster: &'static TestCluster,
    pub client: Client,
    pub broker: Broker,
    pub wire: Arc<Mutex<Wire>>,
    pub results: BTreeMap<&'static str, Value>,
    pub log: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    propeller_operator::clusters::install_crypto_provider();
    let args = Args::parse();
    let cluster = testbed::shared_cluster();
    let client = cluster.client().await?;
    testbed::install_crds(&client).await?;
    let broker = testbed::start_broker()?;
    let wire = Arc::new(Mutex::new(Wire::default()));
    let _observer = observe_wire(&broker, Arc::clone(&wire)).await?;
    let log = testbed::run_dir().join("bench-operator.log");
    let mut b = Bench {
        args,
        cluster,
        client,
        broker,
        wire,
        results: BTreeMap::new(),
        log,
    };
    if b.args.chaos {
        return chaos::run(&mut b).await;
    }
    if b.args.shard_scale_only || b.args.shard_failover_only {
        sharded::run(&mut b).await?;
        println!("{}", serde_json::to_string_pretty(&b.results)?);
        return Ok(());
    }
    scenarios::raw_limit(&mut b).await?;
    if !b.args.sharded_only {
        let mut operator = Operator::start(&b.args.operator, cluster, &b.broker, &b.log)?;
        operator.ready().await?;
        if !b.args.heartbeats_only {
            let (ns, swarm) = scenarios::burst(&mut b, &operator).await?;
            scenarios::steady(&mut b, &operator, ns, swarm).await?;
            scenarios::restart(&mut b, &mut operator).await?;
        }
        scenarios::heartbeats(&mut b, &operator).await?;
        if b.args.heartbeats_only {
            println!("{}", serde_json::to_string_pretty(&b.results)?);
            return Ok(());
        }
    }
    sharded::run(&mut b).await?;
    if b.args.sharded_only {
        // The other scenarios' results stay those of the last full run (the page says so).
        let previous: BTreeMap<String, Value> = std::fs::read_to_string(&b.args.out)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        // This run's write limit is kept apart: the rows of the last full run are judged against its own.
        if let Some(limit) = b.results.remove("apiserver_write_limit_per_s") {
            b.results.insert("shard_apiserver_write_limit_per_s", limit);
        }
        for (k, v) in previous {
            if !k.starts_with("shard") && !matches!(k.as_str(), "machine" | "date" | "commit") {
                let key: &'static str = Box::leak(k.into_boxed_str());
                b.results.insert(key, v);
            }
        }
        b.results.insert("sharded_only_run", json!(true));
    }
    report::report(&b.args, &b.results)?;
    Ok(())
}
