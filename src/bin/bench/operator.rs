//! The operator under test, as its own process: one replica, or one shard of several.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use propeller_operator::testbed::{self, Broker, TestCluster};

use crate::{CHANNEL, DOMAIN};

/// The operator under test, as its own process.
pub struct Operator {
    child: std::process::Child,
    pub port: u16,
    /// Where its health and metrics port answers (another host when it runs in a network namespace).
    pub host: String,
    /// The shard identity (`--identity`) when it runs with `--leader-elect`.
    pub identity: Option<String>,
}

/// How a shard is started: its identity and the namespace of its Leases (default timings otherwise).
pub struct ShardSpec<'a> {
    pub identity: &'a str,
    pub lease_namespace: &'a str,
    /// Run on a host of its own (see [`testbed::netns`]) instead of this machine's loopback.
    pub host: Option<&'a Remote<'a>>,
    /// The FL server's port and the public URL proplets are given (default: any port, no public URL).
    pub fl: Option<(u16, &'a str)>,
    /// What the ring hashes.
    pub shard_by: propeller_operator::config::ShardBy,
}

/// A network namespace and how the operator inside reaches the API server and the broker.
pub struct Remote<'a> {
    pub netns: &'a testbed::netns::Netns,
    pub kubeconfig: PathBuf,
    pub mqtt: std::net::SocketAddr,
}

impl Operator {
    /// A handle that only reads the /metrics of the operator on `port` (never kills anything).
    pub fn probe(port: u16) -> Probe {
        Probe {
            host: "127.0.0.1".into(),
            port,
        }
    }

    /// One replica that owns everything, with the MQTT client id every single-replica scenario shares.
    pub fn start(
        bin: &Path,
        cluster: &TestCluster,
        broker: &Broker,
        log: &Path,
    ) -> anyhow::Result<Operator> {
        Self::spawn(bin, cluster, broker, log, None)
    }

    /// One shard: `--leader-elect`, its own identity and MQTT client id, its log beside `log`.
    pub fn start_shard(
        bin: &Path,
        cluster: &TestCluster,
        broker: &Broker,
        log: &Path,
        shard: &ShardSpec<'_>,
    ) -> anyhow::Result<Operator> {
        Self::spawn(bin, cluster, broker, log, Some(shard))
    }

    fn spawn(
        bin: &Path,
        cluster: &TestCluster,
        broker: &Broker,
        log: &Path,
        shard: Option<&ShardSpec<'_>>,
    ) -> anyhow::Result<Operator> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log: PathBuf = match shard {
            Some(s) => log.with_file_name(format!("bench-{}.log", s.identity)),
            None => log.to_path_buf(),
        };
        // Appended: a replica started again keeps its earlier log.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mqtt_client_id = match shard {
            Some(s) => format!("bench-{}", s.identity),
            None => "bench-operator".to_string(),
        };
        let remote = shard.and_then(|s| s.host);
        let (mut cmd, kubeconfig, mqtt, host) = match remote {
            Some(r) => (
                r.netns.command(bin),
                r.kubeconfig.clone(),
                format!("tcp://{}", r.mqtt),
                r.netns.inside.clone(),
            ),
            None => (
                std::process::Command::new(bin),
                cluster.kubeconfig.clone(),
                broker.address(),
                "127.0.0.1".to_string(),
            ),
        };
        let bind = if remote.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        // One runtime worker, as in a deployed pod: the manifests limit it to 1 CPU, and tokio starts one
        // worker per CPU the process may use. On this 2-core host it would start two, whose hand-offs cost
        // a lightly loaded operator a fifth of its CPU (docs/benchmarks.md). `BENCH_OPERATOR_WORKERS=0`
        // leaves tokio's default.
        let workers = std::env::var("BENCH_OPERATOR_WORKERS").unwrap_or_else(|_| "1".into());
        if workers != "0" {
            cmd.env("TOKIO_WORKER_THREADS", workers);
        }
        cmd.env("KUBECONFIG", &kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args(["--mqtt-address", &mqtt])
            .args([
                "--client-id",
                &broker.username,
                "--client-key",
                &broker.password,
            ])
            .args([
                "--mqtt-client-id",
                &mqtt_client_id,
                "--domain-id",
                DOMAIN,
                "--channel-id",
                CHANNEL,
            ])
            .args(["--health-probe-bind-address", &format!("{bind}:{port}")])
            .args(["--k8s-task-backend", "mqtt"]);
        match shard.and_then(|s| s.fl) {
            Some((port, public)) => {
                cmd.args(["--fl-bind-address", &format!("{bind}:{port}")])
                    .args(["--fl-public-url", public]);
            }
            // Several replicas run side by side: no fixed port.
            None => {
                cmd.args(["--fl-bind-address", "127.0.0.1:0"]);
            }
        }
        if let Some(s) = shard {
            let by = match s.shard_by {
                propeller_operator::config::ShardBy::ClientId => "client-id",
                propeller_operator::config::ShardBy::Channel => "channel",
            };
            cmd.args(["--leader-elect", "--identity", s.identity])
                .args(["--leader-election-namespace", s.lease_namespace])
                .args(["--shard-by", by]);
        }
        let child = cmd
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "start {} (run `cargo build --release` first)",
                    bin.display()
                )
            })?;
        Ok(Operator {
            child,
            port,
            host,
            identity: shard.map(|s| s.identity.to_string()),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn ready(&self) -> anyhow::Result<()> {
        let url = format!("http://{}:{}/readyz", self.host, self.port);
        testbed::eventually("the operator to be ready", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                tokio::task::spawn_blocking(move || ureq::get(&url).call().ok().map(|_| ()))
                    .await
                    .ok()
                    .flatten()
            }
        })
        .await
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as a rollout does; returns once the process has exited (SIGKILL after `grace`).
    pub async fn terminate(&mut self, grace: Duration) {
        // SAFETY: signalling our own child by its PID.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
    }

    /// The operator's /metrics text (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        Probe {
            host: self.host.clone(),
            port: self.port,
        }
        .metrics()
        .await
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The port of an operator's /metrics.
pub struct Probe {
    pub host: String,
    pub port: u16,
}

impl Probe {
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}:{}/metrics", self.host, self.port);
        tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .ok()?
                .body_mut()
                .read_to_string()
                .ok()
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
    }
}
