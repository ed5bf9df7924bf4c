//! Command-line flags and environment. Names compatible with the upstream Go operator (its Deployment
//! args keep working) and with its later renames (`--tenant-id`, `--entity-id`, `--api-key`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A Go-style duration flag (`30s`, `1m30s`, `500ms`).
#[derive(Clone, Copy, Debug)]
pub struct GoDuration(pub Duration);

impl std::str::FromStr for GoDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d: kube::core::Duration = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if d.is_negative() {
            return Err(format!("{s:?} is negative"));
        }
        Ok(GoDuration(d.into()))
    }
}

/// A listen address: `:8081`, `0.0.0.0:8081`; port 0 (`:0`, `127.0.0.1:0`) lets the system choose a free port
/// (the operator logs and reports the one it got); a bare `0` disables.
#[derive(Clone, Copy, Debug)]
pub struct BindAddress(pub Option<SocketAddr>);

impl std::str::FromStr for BindAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "0" || s.is_empty() {
            return Ok(BindAddress(None));
        }
        let full = if s.starts_with(':') {
            format!("0.0.0.0{s}")
        } else {
            s.to_string()
        };
        full.parse()
            .map(|a| BindAddress(Some(a)))
            .map_err(|e| format!("{s:?}: {e}"))
    }
}

pub use crate::sharding::ring::ShardBy;

/// Where tasks on k8s proplets run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum K8sTaskBackend {
    /// A Kubernetes Job per task, running the Wasm runner.
    Job,
    /// An MQTT start message, as for external proplets.
    Mqtt,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "propeller-operator",
    version,
    about = "Kubernetes operator for Propeller WebAssembly proplets",
    // A flag given twice takes its last value (a Deployment's args extended by an overlay).
    args_override_self = true
)]
pub struct OperatorConfig {
    /// MQTT broker address (tcp://host:1883, ssl://host:8883, host:port). Empty: no MQTT (tasks fail with
    /// MQTTNotConfigured) unless --embedded-broker is given.
    #[arg(long, env = "MQTT_ADDRESS", default_value = "")]
    pub mqtt_address: String,
    /// QoS of every publish and subscription.
    #[arg(long, env = "MQTT_QOS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub mqtt_qos: u8,
    /// Broker wait for connects and publishes.
    #[arg(long, env = "MQTT_TIMEOUT", default_value = "30s")]
    pub mqtt_timeout: GoDuration,
    /// Domain of the default channel (always subscribed) — also `--tenant-id`.
    #[arg(long, alias = "tenant-id", env = "DOMAIN_ID", default_value = "")]
    pub domain_id: String,
    /// Channel of the default channel.
    #[arg(long, env = "CHANNEL_ID", default_value = "")]
    pub channel_id: String,
    /// MQTT username (the manager's SuperMQ client id) — also `--entity-id`.
    #[arg(long, alias = "entity-id", env = "CLIENT_ID", default_value = "")]
    pub client_id: String,
    /// MQTT password — also `--api-key`. Prefer --client-key-file: flags show in `ps`.
    #[arg(
        long,
        alias = "api-key",
        env = "CLIENT_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub client_key: String,
    /// File holding the MQTT password (e.g. a mounted Secret).
    #[arg(long, env = "CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,
    /// MQTT client id of this replica (default: `propeller-operator-{identity}`). Two connections with
    /// one client id evict each other, so every replica needs its own.
    #[arg(long, env = "MQTT_CLIENT_ID", default_value = "")]
    pub mqtt_client_id: String,
    /// This replica's name, stable across its restarts: in Events, the MQTT client id and (with HA) its
    /// shard. Default: the pod name (POD_NAME), else the host name.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub identity: String,
    /// CA certificate (PEM) for a TLS broker.
    #[arg(long, env = "MQTT_CA_CERT")]
    pub mqtt_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "MQTT_CLIENT_CERT")]
    pub mqtt_client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "MQTT_CLIENT_CERT_KEY")]
    pub mqtt_client_cert_key: Option<PathBuf>,
    /// Run an embedded MQTT broker on this address (e.g. 127.0.0.1:1883) and connect to it: for demos and
    /// development only.
    #[arg(long, env = "EMBEDDED_BROKER")]
    pub embedded_broker: Option<SocketAddr>,

    /// An external proplet without a heartbeat for this long is Offline.
    #[arg(long, default_value = "30s")]
    pub last_seen_threshold: GoDuration,
    /// How often `status.lastSeen` (and a running task's metrics) is refreshed while nothing else changes:
    /// heartbeats are coalesced, and phase changes (Offline, back) are written at once regardless, so
    /// this only bounds how old the recorded `lastSeen` may be. Each proplet is refreshed in its own slot of
    /// the period (a hash of its clientId places it), so the fleet's refreshes are spread evenly rather than
    /// written in one burst. The default keeps a quiet fleet at one status write per proplet every 3 minutes
    /// (0.33 per proplet-minute): under the 0.5 a large sharded fleet may cost, with room for the Leases and
    /// the transitions.
    #[arg(long, default_value = "3m")]
    pub status_refresh: GoDuration,
    /// Accepted for compatibility; heartbeat handling does not poll.
    #[arg(long, default_value = "10s")]
    pub liveliness_interval: GoDuration,
    /// Reconciles each controller runs at once (each is at most one API request at a time).
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// Default time a dispatched task may run (spec.timeoutSeconds overrides).
    #[arg(long, env = "TASK_TIMEOUT", default_value = "10m")]
    pub task_timeout: GoDuration,
    /// Dispatches of one task (first run plus reschedules after interruptions).
    #[arg(long, default_value_t = 3)]
    pub max_task_attempts: i32,
    /// Events for every task's routine steps (Dispatched, Completed) cost 2 API writes per task: `all`
    /// records them, `warnings` (default) only failures, refusals and other exceptions.
    #[arg(long, env = "TASK_EVENTS", value_enum, default_value_t = TaskEvents::Warnings)]
    pub task_events: TaskEvents,
    /// Tasks a proplet runs at once unless its spec.maxConcurrentTasks says otherwise; 0: unlimited.
    /// Tasks over the limit wait, highest spec.priority first, then oldest.
    #[arg(long, env = "MAX_TASKS_PER_PROPLET", default_value_t = 0)]
    pub max_tasks_per_proplet: u32,
    /// Bytes of module per registry/server chunk (a proplet accepts MQTT packets up to 10 MiB; base64
    /// adds a third).
    #[arg(long, env = "REGISTRY_CHUNK_SIZE", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=4 * 1024 * 1024))]
    pub registry_chunk_size: u32,
    /// Accepted for compatibility with the later upstream operator: placement always takes the least
    /// loaded fitting proplet, and waiting tasks always go by priority.
    #[arg(long, value_parser = ["round-robin", "priority"], default_value = "round-robin")]
    pub scheduler: String,

    /// How tasks placed on `type: k8s` proplets run: `job` (a Kubernetes Job running the Wasm runner
    /// image) or `mqtt` (a start message to the proplet pods, like external proplets).
    #[arg(long, env = "K8S_TASK_BACKEND", value_enum, default_value_t = K8sTaskBackend::Job)]
    pub k8s_task_backend: K8sTaskBackend,
    /// Image of the Wasm runner used by the job backend (built from images/Dockerfile).
    #[arg(
        long,
        env = "WASM_RUNNER_IMAGE",
        default_value = "ghcr.io/absmach/propeller-operator/wasm-runner:0.1.0"
    )]
    pub wasm_runner_image: String,

    /// Create an external Proplet for every unknown proplet that announces itself on
    /// `control/proplet/create` (on the default channel or any channel a Proplet uses).
    #[arg(long, env = "AUTO_DISCOVER_PROPLETS", default_value_t = false)]
    pub auto_discover_proplets: bool,
    /// Namespace of discovered Proplets (default: --watch-namespace, else "default").
    #[arg(long, env = "DISCOVERY_NAMESPACE", default_value = "")]
    pub discovery_namespace: String,
    /// Secret (in the discovery namespace) that discovered Proplets reference for their key; the
    /// operator records the reference and never reads or copies the key.
    #[arg(
        long,
        env = "DISCOVERY_SECRET",
        default_value = "discovered-proplet-keys"
    )]
    pub discovery_secret: String,
    /// Key in that Secret; `{clientId}` is replaced by the proplet's clientId.
    #[arg(long, env = "DISCOVERY_SECRET_KEY", default_value = "{clientId}")]
    pub discovery_secret_key: String,
    /// Most discovered Proplets that may exist at once; further announcements are refused (a metric, an
    /// Event, a log line).
    #[arg(long, env = "DISCOVERY_MAX_PROPLETS", default_value_t = 100)]
    pub discovery_max_proplets: usize,
    /// Most Proplets created by discovery per second; announcements wait in a bounded queue.
    #[arg(long, env = "DISCOVERY_RATE", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub discovery_rate: u32,

    /// Address of the FL coordinator and model registry (proplets POST updates and GET models there).
    #[arg(long, env = "FL_BIND_ADDRESS", default_value = ":8082")]
    pub fl_bind_address: BindAddress,
    /// The URL proplets reach that address at (e.g. http://propeller-operator-fl.propeller-system.svc:8082);
    /// round tasks get `{url}/fl/{namespace}/{federatedjob}` as MANAGER_COORDINATOR_URL and
    /// MODEL_REGISTRY_URL. Without it, FederatedJobs wait with Ready=False (FLNotConfigured).
    #[arg(long, env = "FL_PUBLIC_URL", default_value = "")]
    pub fl_public_url: String,
    /// Largest client update accepted (HTTP body, MQTT payload, stored update).
    #[arg(long, env = "FL_MAX_UPDATE_BYTES", default_value_t = 512 * 1024)]
    pub fl_max_update_bytes: usize,
    /// Largest model stored (each version is one ConfigMap, so at most about 1 MiB).
    #[arg(long, env = "FL_MAX_MODEL_BYTES", default_value_t = 768 * 1024)]
    pub fl_max_model_bytes: usize,

    /// Namespace to watch (empty: all).
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = ":8081")]
    pub health_probe_bind_address: BindAddress,
    /// A second /metrics port ("0": none; the health probe port always serves plain /metrics for local
    /// use). With `--metrics-secure` (the default, as controller-runtime's) it serves HTTPS to callers
    /// whose token the cluster allows `get` on `/metrics` (ClusterRole `propeller-metrics-reader`).
    #[arg(long, default_value = "0")]
    pub metrics_bind_address: BindAddress,
    /// Serve `--metrics-bind-address` over HTTPS with TokenReview + SubjectAccessReview.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_secure: bool,
    /// `tls.crt` and `tls.key` for the secure metrics port (default: a self-signed certificate made at start).
    #[arg(long)]
    pub metrics_cert_dir: Option<std::path::PathBuf>,
    /// Run as one of several replicas: a leader (Lease `--leader-election-id`) and shards (a Lease
    /// `propeller-shard-{identity}` each) that split the proplets by clientId. See docs/sharding.md.
    #[arg(long, env = "LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,
    /// Name of the leader Lease (upstream's manager uses the same).
    #[arg(long, default_value = "fa27fa49.propeller.abstractmachines.fr")]
    pub leader_election_id: String,
    /// Namespace of the leader and shard Leases (default: POD_NAMESPACE, else the watched namespace,
    /// else `default`).
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE", default_value = "")]
    pub leader_election_namespace: String,
    /// How long a Lease stays valid without renewal.
    #[arg(long, default_value = "15s")]
    pub lease_duration: GoDuration,
    /// A replica that could not renew its Lease for this long stops publishing and stops.
    #[arg(long, default_value = "10s")]
    pub renew_deadline: GoDuration,
    /// How often Leases are renewed and the ring is recomputed.
    #[arg(long, default_value = "2s")]
    pub retry_period: GoDuration,
    /// What the ring hashes to place a Proplet on a shard. client-id: its clientId (the most even
    /// spread; a channel's proplets land on every shard, so each shard hears all of that channel's
    /// messages). channel: its (domain, channel), so that a channel's proplets share a shard and MQTT
    /// intake divides between shards too (bounded load still caps each shard; a channel larger than a
    /// shard's share spills over). See docs/sharding.md.
    #[arg(long, value_enum, default_value_t = ShardBy::ClientId)]
    pub shard_by: ShardBy,
    /// Proplets handed over between live shards at the same time.
    #[arg(long, default_value_t = 100)]
    pub max_concurrent_moves: usize,
    /// How long after fencing a shard the leader waits before it relabels the Proplets the survivors took
    /// over (they handle them from the fence on; the relabel only makes the labels say so). A wait spares
    /// the API server thousands of writes at the moment the survivors list what they took over.
    #[arg(long, default_value = "0s")]
    pub takeover_relabel_after: GoDuration,
    /// Run as a hub: register member clusters from Secrets in `--member-namespace` (our kubeconfig format or
    /// Argo CD's cluster Secrets) and keep a MemberCluster per member. See docs/multi-cluster.md.
    #[arg(long, env = "HUB", default_value_t = false)]
    pub hub: bool,
    /// Where member registration Secrets live (default: POD_NAMESPACE, else the watched namespace, else
    /// `default`, as the Leases).
    #[arg(long, env = "MEMBER_NAMESPACE", default_value = "")]
    pub member_namespace: String,
    /// How often each member cluster is probed.
    #[arg(long, default_value = "15s")]
    pub member_probe_interval: GoDuration,
    /// On SIGTERM, how long a shard may spend handing its proplets to the others before it lets go of
    /// its Lease (what is left then moves at once). Keep it under the pod's termination grace period.
    #[arg(long, default_value = "20s")]
    pub shutdown_handover_timeout: GoDuration,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

impl OperatorConfig {
    /// Parses flags given as a list (the first item is the program name).
    pub fn try_parse_from_args(args: &[&str]) -> Result<Self, clap::Error> {
        <Self as Parser>::try_parse_from(args)
    }

    /// The MQTT password from --client-key or --client-key-file (never logged).
    pub fn mqtt_password(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.client_key_file {
            let key = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("read --client-key-file {}: {e}", path.display()))?;
            return Ok(Some(key.trim_end_matches(['\n', '\r']).to_string()));
        }
        Ok((!self.client_key.is_empty()).then(|| self.client_key.clone()))
    }

    /// Where discovered Proplets go; an error when the operator would not see them.
    pub fn discovery_namespace(&self) -> anyhow::Result<String> {
        let ns = match (
            self.discovery_namespace.as_str(),
            self.watch_namespace.as_str(),
        ) {
            ("", "") => "default".to_string(),
            ("", watched) => watched.to_string(),
            (ns, "") => ns.to_string(),
            (ns, watched) if ns == watched => ns.to_string(),
            (ns, watched) => anyhow::bail!(
                "--discovery-namespace {ns} is not the watched namespace {watched}: discovered \
                 Proplets would never be seen"
            ),
        };
        Ok(ns)
    }

    /// This replica's name: `--identity`, else the host name.
    pub fn identity(&self) -> String {
        if !self.identity.is_empty() {
            return self.identity.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("pid-{}", std::process::id()))
    }

    /// Where member registration Secrets and MemberClusters live.
    pub fn member_namespace(&self) -> String {
        if self.member_namespace.is_empty() {
            let mut c = self.clone();
            c.leader_election_namespace.clear();
            c.lease_namespace()
        } else {
            self.member_namespace.clone()
        }
    }

    /// Where the Leases live.
    pub fn lease_namespace(&self) -> String {
        if !self.leader_election_namespace.is_empty() {
            return self.leader_election_namespace.clone();
        }
        match std::env::var("POD_NAMESPACE") {
            Ok(ns) if !ns.is_empty() => ns,
            _ if !self.watch_namespace.is_empty() => self.watch_namespace.clone(),
            _ => "default".to_string(),
        }
    }

    /// Lease timings, checked: renewal must be able to succeed before the Lease runs out.
    pub fn lease_timings(&self) -> anyhow::Result<crate::sharding::lease::Timings> {
        let t = crate::sharding::lease::Timings {
            duration: self.lease_duration.0,
            renew_deadline: self.renew_deadline.0,
            retry_period: self.retry_period.0,
        };
        if !(t.retry_period < t.renew_deadline && t.renew_deadline < t.duration) {
            anyhow::bail!(
                "--retry-period ({:?}) < --renew-deadline ({:?}) < --lease-duration ({:?}) must hold",
                t.retry_period,
                t.renew_deadline,
                t.duration
            );
        }
        Ok(t)
    }

    /// The MQTT client id: `--mqtt-client-id`, else one derived from [`OperatorConfig::identity`].
    pub fn mqtt_client_id(&self) -> String {
        if self.mqtt_client_id.is_empty() {
            format!("propeller-operator-{}", self.identity())
        } else {
            self.mqtt_client_id.clone()
        }
    }

    pub fn default_channel(&self) -> Option<crate::mqtt::topics::Channel> {
        (!self.domain_id.is_empty() && !self.channel_id.is_empty())
            .then(|| crate::mqtt::topics::Channel::new(&self.domain_id, &self.channel_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_upstream_deployment_args() {
        let c = OperatorConfig::try_parse_from([
            "op",
            "--leader-elect",
            "--health-probe-bind-address=:8181",
            "--metrics-bind-address=:8443",
            "--mqtt-address=tcp://mqtt:1883",
            "--tenant-id=d",
            "--entity-id=e",
            "--api-key=k",
            "--channel-id=c",
            "--mqtt-timeout=1m30s",
            "--scheduler=priority",
        ])
        .expect("parses");
        assert_eq!(c.domain_id, "d");
        assert_eq!(c.client_id, "e");
        assert_eq!(c.mqtt_timeout.0, Duration::from_secs(90));
        assert_eq!(c.health_probe_bind_address.0.map(|a| a.port()), Some(8181));
        assert_eq!(c.mqtt_qos, 1);
        assert_eq!(c.k8s_task_backend, K8sTaskBackend::Job);
        let c = OperatorConfig::try_parse_from(["op", "--k8s-task-backend=mqtt"]).expect("parses");
        assert_eq!(c.k8s_task_backend, K8sTaskBackend::Mqtt);
        assert!(OperatorConfig::try_parse_from(["op", "--k8s-task-backend=pod"]).is_err());
        let ns = |args: &[&str]| {
            OperatorConfig::try_parse_from_args(args)
                .map_err(|e| anyhow::anyhow!(e))
                .and_then(|c| c.discovery_namespace())
        };
        assert_eq!(ns(&["op"]).ok().as_deref(), Some("default"));
        assert_eq!(
            ns(&["op", "--watch-namespace=w"]).ok().as_deref(),
            Some("w")
        );
        assert!(ns(&["op", "--watch-namespace=w", "--discovery-namespace=d"]).is_err());
    }

    #[test]
    fn every_replica_has_its_own_mqtt_client_id() {
        let a = OperatorConfig::try_parse_from(["op", "--identity=op-0"]).expect("parses");
        let b = OperatorConfig::try_parse_from(["op", "--identity=op-1"]).expect("parses");
        assert_eq!(a.mqtt_client_id(), "propeller-operator-op-0");
        assert_ne!(a.mqtt_client_id(), b.mqtt_client_id());
        let fixed = OperatorConfig::try_parse_from(["op", "--mqtt-client-id=m"]).expect("parses");
        assert_eq!(fixed.mqtt_client_id(), "m");
        let host = OperatorConfig::try_parse_from(["op"]).expect("parses");
        assert!(!host.identity().is_empty());
    }

    #[test]
    fn ports_may_be_chosen_by_the_system() {
        let c = OperatorConfig::try_parse_from([
            "op",
            "--health-probe-bind-address=127.0.0.1:0",
            "--fl-bind-address=:0",
        ])
        .expect("parses");
        assert_eq!(c.health_probe_bind_address.0.map(|a| a.port()), Some(0));
        assert_eq!(c.fl_bind_address.0.map(|a| a.port()), Some(0));
        let off = OperatorConfig::try_parse_from(["op", "--fl-bind-address=0"]).expect("parses");
        assert!(
            off.fl_bind_address.0.is_none(),
            "a bare 0 turns the server off"
        );
    }

    #[test]
    fn rejects_bad_durations_and_qos() {
        assert!(OperatorConfig::try_parse_from(["op", "--mqtt-timeout=soon"]).is_err());
        assert!(OperatorConfig::try_parse_from(["op", "--mqtt-qos=3"]).is_err());
    }
}

/// Which Task Events the operator records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskEvents {
    Warnings,
    All,
}
