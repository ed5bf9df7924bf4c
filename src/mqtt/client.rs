//! The operator's broker connection: publishes, a subscription set that follows the Proplets, and a
//! persistent session (clean session off, a stable client id per replica), so that the broker queues what
//! proplets publish while the operator is away (a restart, a rollout) and delivers it on reconnect. The
//! subscriptions are sent again after every connect all the same (a broker that lost the session, e.g. a
//! restart without persistence, starts afresh).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, Transport};
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, info, warn};

use super::address;

/// 16 MiB: start messages carry base64 Wasm modules.
pub const MAX_PACKET_SIZE: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct MqttSettings {
    pub address: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    pub qos: u8,
    pub timeout: Duration,
    pub keep_alive: Duration,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Off (the default): the broker keeps this client's subscriptions and queues QoS ≥ 1 messages while
    /// it is disconnected.
    pub clean_session: bool,
    /// Received messages queued for the router. When it is full the client stops reading from the broker
    /// (nothing is dropped): unacknowledged messages stay with the broker until there is room.
    pub receive_queue: usize,
}

impl MqttSettings {
    pub fn new(address: &str, client_id: &str) -> Self {
        MqttSettings {
            address: address.to_string(),
            username: None,
            password: None,
            client_id: client_id.to_string(),
            qos: 1,
            timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(30),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            clean_session: false,
            receive_queue: 10_000,
        }
    }
}

/// A message received from the broker.
pub struct Message {
    pub topic: String,
    pub payload: bytes::Bytes,
    /// Its acknowledgement, sent when this is dropped: a handler that must act on the message first (a
    /// result: its status write) takes it and keeps it until then. None for a message taken at most once.
    pub ack: std::cell::Cell<Option<Ack>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// The acknowledgement of one received message, sent to the broker when dropped. Until then the broker
/// keeps the message for this client's session: an operator killed before acting on it gets it again on
/// its next connect.
pub struct Ack {
    client: AsyncClient,
    publish: rumqttc::Publish,
}

impl Drop for Ack {
    fn drop(&mut self) {
        // Only fails when the connection is closing: the broker then redelivers the message.
        let _ = self.client.try_ack(&self.publish);
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ack(pkid {})", self.publish.pkid)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid MQTT settings: {0}")]
    Settings(String),
    #[error("publish to {topic} failed: {reason}")]
    Publish { topic: String, reason: String },
    #[error("encode payload: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Decides, in the connection's own task, whether a received message goes on to the receiver: a message it
/// refuses is acknowledged at once and costs no hand-over to another task (a shard hears every proplet of
/// its channels and refuses most of what it hears).
pub type IntakeFilter = Arc<dyn Fn(&str, &[u8]) -> bool + Send + Sync>;

/// Handle to the connection; cheap to clone.
#[derive(Clone)]
pub struct MqttClient {
    client: AsyncClient,
    qos: QoS,
    timeout: Duration,
    subscriptions: Arc<Mutex<BTreeSet<String>>>,
    /// Counts changes of the subscription set (see [`MqttClient::subscribed`]).
    generation: Arc<std::sync::atomic::AtomicU64>,
    connected: Arc<AtomicBool>,
    /// Counts connections (ConnAcks); the first is 1. Watched by whatever must recover from a reconnect.
    connects: Arc<tokio::sync::watch::Sender<u64>>,
    /// When the current connection came up (`None` while disconnected).
    up_since: Arc<std::sync::Mutex<Option<Instant>>>,
    closing: Arc<AtomicBool>,
    intake: Arc<std::sync::OnceLock<IntakeFilter>>,
}

/// The QoS a filter is subscribed with: the configured one, but at most once for periodic messages.
fn subscription_qos(filter: &str, configured: QoS) -> QoS {
    if super::topics::periodic_filter(filter) {
        QoS::AtMostOnce
    } else {
        configured
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The connection options of an operator's MQTT client. No last will: upstream's operator set one on the
/// proplets' alive topic (`proplet_id: "propeller-controller"`), which a Propeller manager on the same
/// channel registers as a phantom proplet.
fn options(settings: &MqttSettings) -> Result<MqttOptions, MqttError> {
    let addr = address::parse(&settings.address).map_err(MqttError::Settings)?;
    let mut opts = MqttOptions::new(&settings.client_id, &addr.host, addr.port);
    opts.set_keep_alive(settings.keep_alive.max(Duration::from_secs(5)));
    opts.set_clean_session(settings.clean_session);
    // Acknowledged once handled (see [`Ack`]), not on receipt.
    opts.set_manual_acks(true);
    opts.set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
    opts.set_inflight(100);
    if let Some(user) = &settings.username {
        opts.set_credentials(user, settings.password.clone().unwrap_or_default());
    }
    if addr.tls {
        opts.set_transport(tls_transport(settings)?);
    }
    Ok(opts)
}

impl MqttClient {
    /// Connects in the background (retrying with back-off for ever) and returns the handle and the stream
    /// of received messages.
    /// `connected` is set to 1 while the connection is up.
    pub fn start(
        settings: &MqttSettings,
        connected: prometheus::IntGauge,
    ) -> Result<(MqttClient, mpsc::Receiver<Message>), MqttError> {
        let opts = options(settings)?;
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        let (tx, rx) = mpsc::channel(settings.receive_queue.max(1));
        let handle = MqttClient {
            client,
            qos: qos(settings.qos),
            timeout: settings.timeout,
            subscriptions: Arc::new(Mutex::new(BTreeSet::new())),
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            connected: Arc::new(AtomicBool::new(false)),
            connects: Arc::new(tokio::sync::watch::channel(0).0),
            up_since: Arc::new(std::sync::Mutex::new(None)),
            closing: Arc::new(AtomicBool::new(false)),
            intake: Arc::new(std::sync::OnceLock::new()),
        };
        let loop_handle = handle.clone();
        let ack_client = handle.client.clone();
        let address = settings.address.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            loop {
                let event = eventloop.poll().await;
                if loop_handle.closing.load(Ordering::SeqCst) {
                    loop_handle.connected.store(false, Ordering::SeqCst);
                    debug!("MQTT client closed");
                    return;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        // session_present: the broker kept our session and delivers what it queued.
                        info!(%address, session_present = ack.session_present, "MQTT connected");
                        backoff = Duration::from_millis(250);
                        loop_handle.connected.store(true, Ordering::SeqCst);
                        loop_handle.set_up_since(Some(Instant::now()));
                        connected.set(1);
                        loop_handle.resubscribe().await;
                        // After the resubscriptions are queued: a marker published on this news follows them.
                        loop_handle.connects.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let ack = || {
                            let mut receipt =
                                rumqttc::Publish::new(&p.topic, p.qos, Vec::<u8>::new());
                            receipt.pkid = p.pkid;
                            Ack {
                                client: ack_client.clone(),
                                publish: receipt,
                            }
                        };
                        if let Some(keep) = loop_handle.intake.get()
                            && !keep(&p.topic, &p.payload)
                        {
                            // Refused: acknowledged here and now (at most once, as heartbeats are, needs
                            // no acknowledgement: nothing is built for it).
                            if p.qos != QoS::AtMostOnce {
                                drop(ack());
                            }
                            continue;
                        }
                        // At most once (heartbeats): nothing to acknowledge, so nothing is built.
                        let ack = (p.qos != QoS::AtMostOnce).then(ack);
                        let msg = Message {
                            topic: p.topic,
                            payload: p.payload,
                            ack: std::cell::Cell::new(ack),
                        };
                        if tx.send(msg).await.is_err() {
                            debug!("MQTT receiver dropped; stopping the event loop");
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        loop_handle.set_up_since(None);
                        if loop_handle.connected.swap(false, Ordering::SeqCst) {
                            warn!(%address, error = %describe(&e), "MQTT connection lost; reconnecting");
                        } else {
                            debug!(%address, error = %describe(&e), "MQTT connect failed; retrying");
                        }
                        connected.set(0);
                        tokio::time::sleep(backoff).await;
                        // Capped low: a broker back after a partition or restart is found within seconds.
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok((handle, rx))
    }

    /// Sets the filter applied to every message received from now on; only the first call has effect.
    pub fn set_intake_filter(&self, keep: IntakeFilter) {
        let _ = self.intake.set(keep);
    }

    fn set_up_since(&self, at: Option<Instant>) {
        if let Ok(mut up) = self.up_since.lock() {
            *up = at;
        }
    }

    /// When the current connection came up; `None` while disconnected.
    pub fn up_since(&self) -> Option<Instant> {
        self.up_since.lock().ok().and_then(|up| *up)
    }

    /// The number of connections so far, changing at each (re)connect.
    pub fn connects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connects.subscribe()
    }

    /// Publishes JSON. Queued while disconnected; fails when the queue stays full for the timeout.
    pub async fn publish_json<T: Serialize>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<(), MqttError> {
        let bytes = serde_json::to_vec(payload)?;
        self.publish(topic, bytes).await
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), MqttError> {
        let fut = self.client.publish(topic, self.qos, false, payload);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(MqttError::Publish {
                topic: topic.to_string(),
                reason: e.to_string(),
            }),
            Err(_) => Err(MqttError::Publish {
                topic: topic.to_string(),
                reason: format!("not queued within {:?}", self.timeout),
            }),
        }
    }

    /// Makes the subscription set exactly `wanted`.
    pub async fn set_subscriptions(&self, wanted: BTreeSet<String>) {
        let mut current = self.subscriptions.lock().await;
        if *current == wanted {
            return;
        }
        for gone in current.difference(&wanted) {
            if let Err(e) = self.client.try_unsubscribe(gone) {
                warn!(topic = %gone, error = %e, "MQTT unsubscribe failed");
            }
        }
        for new in wanted.difference(&current) {
            if let Err(e) = self
                .client
                .try_subscribe(new, subscription_qos(new, self.qos))
            {
                warn!(topic = %new, error = %e, "MQTT subscribe failed");
            }
        }
        info!(count = wanted.len(), "MQTT subscriptions updated");
        *current = wanted;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The generation of the subscription set if it holds every topic of `topics`: once a probe published
    /// after that generation came back, the broker has them (it handles a connection's packets in order).
    pub async fn subscribed(&self, topics: &[String]) -> Option<u64> {
        let current = self.subscriptions.lock().await;
        topics
            .iter()
            .all(|t| current.contains(t))
            .then(|| self.generation.load(Ordering::SeqCst))
    }

    /// The topics subscribed to now.
    pub async fn subscriptions(&self) -> BTreeSet<String> {
        self.subscriptions.lock().await.clone()
    }

    /// The current generation of the subscription set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    async fn resubscribe(&self) {
        let current = self.subscriptions.lock().await;
        for topic in current.iter() {
            if let Err(e) = self
                .client
                .try_subscribe(topic, subscription_qos(topic, self.qos))
            {
                warn!(%topic, error = %e, "MQTT resubscribe failed");
            }
        }
    }

    /// Disconnects and stops reconnecting.
    pub async fn disconnect(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
    }
}

/// Connection errors without credentials in them.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("connection refused: {code:?}"),
        other => other.to_string(),
    }
}

fn tls_transport(settings: &MqttSettings) -> Result<Transport, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &settings.ca_cert {
        for cert in CertificateDer::pem_file_iter(ca)
            .map_err(|e| MqttError::Settings(format!("read CA {}: {e}", ca.display())))?
        {
            let cert =
                cert.map_err(|e| MqttError::Settings(format!("CA {}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| MqttError::Settings(format!("CA {}: {e}", ca.display())))?;
        }
    } else {
        return Err(MqttError::Settings(
            "a TLS broker address needs --mqtt-ca-cert (no system roots are loaded)".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| MqttError::Settings(format!("client cert {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|_| {
                MqttError::Settings(format!("client key {} unreadable", key.display()))
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttError::Settings(format!("client certificate: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(MqttError::Settings(
                "--mqtt-client-cert and --mqtt-client-key go together".into(),
            ));
        }
    };
    Ok(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream defect (upstream-spec §7): the operator's connection carries no last will.
    #[test]
    fn the_operator_connects_without_a_last_will() {
        let mut settings = MqttSettings::new("tcp://broker:1883", "operator-0");
        settings.username = Some("manager".into());
        let opts = options(&settings).expect("options");
        assert!(opts.last_will().is_none());
        assert!(!opts.clean_session(), "a persistent session");
        assert_eq!(opts.client_id(), "operator-0");
    }
}
