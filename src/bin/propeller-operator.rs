//! The operator: `propeller-operator --mqtt-address tcp://broker:1883 --domain-id … --channel-id …`.
use clap::Parser;
use propeller_operator::config::OperatorConfig;

#[tokio::main]
async fn main() {
    let config = OperatorConfig::parse();
    init_logging(config.log_json);
    if let Err(e) = propeller_operator::run::run(config).await {
        tracing::error!(error = %format!("{e:#}"), "operator failed");
        std::process::exit(1);
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
