//! Simulated proplets over MQTT, wire-compatible with the real Rust proplet:
//! `proplet-sim --mqtt-address tcp://127.0.0.1:1883 --domain-id d --channel-id c --count 3`.
use std::time::Duration;

use clap::Parser;
use propeller_operator::sim::{self, Faults, SimConfig};

#[derive(Parser)]
#[command(about = "Simulated Propeller proplets (MQTT, real Wasm execution with wasmi)")]
struct Args {
    #[arg(long, env = "MQTT_ADDRESS")]
    mqtt_address: String,
    #[arg(long, env = "PROPLET_DOMAIN_ID")]
    domain_id: String,
    #[arg(long, env = "PROPLET_CHANNEL_ID")]
    channel_id: String,
    /// Explicit clientIds (comma separated); otherwise PREFIX-1 … PREFIX-COUNT.
    #[arg(long, value_delimiter = ',')]
    client_ids: Vec<String>,
    #[arg(long, default_value = "proplet")]
    client_id_prefix: String,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// MQTT password of every simulated proplet.
    #[arg(
        long,
        env = "PROPLET_API_KEY",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
    /// Seconds between heartbeats (PROPLET_LIVELINESS_INTERVAL).
    #[arg(long, default_value_t = 10)]
    liveliness_interval: u64,
    /// Seconds between metrics messages.
    #[arg(long, default_value_t = 10)]
    metrics_interval: u64,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// QoS of publishes and subscriptions (the real proplet's default is 2).
    #[arg(long, default_value_t = 2)]
    qos: u8,
    /// Answer every task with an error.
    #[arg(long)]
    fail_tasks: bool,
    /// Milliseconds every task takes in addition to running it.
    #[arg(long, default_value_t = 0)]
    task_delay_ms: u64,
    /// Where FL participants fetch their data (`GET {url}/datasets/{clientId}`), as the real proplet's
    /// DATA_STORE_URL; a task's own DATA_STORE_URL takes precedence.
    #[arg(long, env = "DATA_STORE_URL")]
    data_store_url: Option<String>,
    /// FL updates are not POSTed (as if the coordinator were unreachable): they take the MQTT fallback.
    #[arg(long)]
    fl_coordinator_unreachable: bool,
    /// Milliseconds between looks for a module's registry chunks (the real proplet: 5000).
    #[arg(long, default_value_t = 5000)]
    registry_poll_ms: u64,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let ids: Vec<String> = if args.client_ids.is_empty() {
        (1..=args.count)
            .map(|i| format!("{}-{i}", args.client_id_prefix))
            .collect()
    } else {
        args.client_ids.clone()
    };
    let mut handles = Vec::new();
    for id in &ids {
        let mut c = SimConfig::new(
            &args.mqtt_address,
            &args.domain_id,
            &args.channel_id,
            id,
            &args.password,
        );
        c.liveliness_interval = Duration::from_secs(args.liveliness_interval.max(1));
        c.metrics_interval = Duration::from_secs(args.metrics_interval.max(1));
        c.namespace = args.namespace.clone();
        c.qos = args.qos;
        c.data_store_url = args.data_store_url.clone();
        c.registry_poll = Duration::from_millis(args.registry_poll_ms.max(10));
        c.faults = Faults {
            fail_tasks: args.fail_tasks,
            task_delay: Duration::from_millis(args.task_delay_ms),
            coordinator_unreachable: args.fl_coordinator_unreachable,
        };
        match sim::spawn(c) {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("proplet-sim: {e:#}");
                std::process::exit(2);
            }
        }
    }
    tracing::info!(
        count = handles.len(),
        "simulated proplets running: {}",
        ids.join(",")
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("proplet-sim: {e}");
            std::process::exit(2);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for h in handles {
        h.shutdown().await;
    }
}
