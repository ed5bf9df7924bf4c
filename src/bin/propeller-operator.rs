//! The operator: `propeller-operator --mqtt-address tcp://broker:1883 --domain-id … --channel-id …`.
use clap::Parser;
use propeller_operator::config::OperatorConfig;

fn main() {
    // Before the runtime starts its threads: the allocator is set up while this is the only one.
    keep_large_blocks_apart();
    serve();
}

#[tokio::main]
async fn serve() {
    let config = OperatorConfig::parse();
    init_logging(config.log_json);
    if let Err(e) = propeller_operator::run::run(config).await {
        tracing::error!(error = %format!("{e:#}"), "operator failed");
        std::process::exit(1);
    }
}

/// Keeps glibc's mmap threshold at its default (128 KiB) for good. Left to itself glibc raises the threshold
/// to the size of each large block freed: after the first page of a list (about 0.9 MB of JSON for 250
/// Proplets) every later page's body came from the heap, and what the heap grew to stayed resident after
/// the list. Mapped apart, each such block is given back when freed: the leader, which lists the whole
/// fleet, measured 1.8 MiB less at 10,000 Proplets (docs/sharding.md, Numbers at scale).
fn keep_large_blocks_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets one allocator parameter, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,rumqttd=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
