//! An in-process MQTT broker (rumqttd) for demos and development: `--embedded-broker 127.0.0.1:1883`.
//! No authentication and no persistence; production uses SuperMQ or mosquitto.
use std::collections::HashMap;
use std::net::SocketAddr;

#[cfg(feature = "embedded-broker")]
pub fn start(listen: SocketAddr) -> anyhow::Result<()> {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    // Fail early with a clear message when the port is taken: rumqttd would only log it on its thread.
    drop(
        std::net::TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("embedded broker cannot listen on {listen}: {e}"))?,
    );
    let server = ServerSettings {
        name: "embedded-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: crate::mqtt::client::MAX_PACKET_SIZE,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    // rumqttd binds on its own thread and cannot report readiness: wait until it accepts connections.
    for _ in 0..50 {
        if std::net::TcpStream::connect(listen).is_ok() {
            tracing::info!(%listen, "embedded MQTT broker listening (no authentication; dev only)");
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("embedded broker did not start listening on {listen}")
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start(_listen: SocketAddr) -> anyhow::Result<()> {
    let _ = HashMap::<(), ()>::new();
    anyhow::bail!("this build has no embedded broker (build with --features embedded-broker)")
}
