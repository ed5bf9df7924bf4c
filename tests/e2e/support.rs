//! Runs the operator in-process against the test cluster with exactly the RBAC of kustomize/base (a
//! ServiceAccount token from the TokenRequest API), a fresh mosquitto and a fresh namespace per test.
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use propeller_operator::api::{Proplet, Task};
use propeller_operator::config::OperatorConfig;
use propeller_operator::run::Operator;
use propeller_operator::sim::{self, SimConfig, SimHandle};
use propeller_operator::telemetry::Metrics;
use propeller_operator::testbed::{self, Broker, TestCluster, install_crds, shared_cluster};
use serde_json::{Value, json};

pub const WAIT: Duration = Duration::from_secs(60);
pub const DOMAIN: &str = "dom-1";
pub const CHANNEL: &str = "chan-1";

pub struct Env {
    pub cluster: &'static TestCluster,
    /// Admin client for arranging and inspecting.
    pub admin: Client,
    pub ns: String,
    pub broker: Broker,
    /// The operators of this test (the first is started with the Env; [`Env::add_operator`] adds more), each
    /// `None` while stopped.
    operators: Vec<Option<Operator>>,
    configs: Vec<OperatorConfig>,
    op_client: Client,
    /// The operator's schedule clock: tests of recurring tasks move it forward.
    pub clock: propeller_operator::clock::Clock,
}

/// The kustomize ClusterRole, verbatim.
fn kustomize_cluster_role() -> anyhow::Result<ClusterRole> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kustomize/base/rbac.yaml"
    ))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if v["kind"] == "ClusterRole" {
            return Ok(serde_json::from_value(v)?);
        }
    }
    anyhow::bail!("kustomize/base/rbac.yaml has no ClusterRole")
}

/// The hub overlay's Role (member Secrets, readable in the operator's namespace only), applied in `ns` as
/// kustomize would (its namespace set on the objects and the binding's subject).
async fn hub_role(admin: &Client, ns: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kustomize/hub/member-secrets-role.yaml"
    ))?;
    let ssa = PatchParams::apply("e2e").force();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc)?;
        v["metadata"]["namespace"] = json!(ns);
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match v["kind"].as_str() {
            Some("Role") => {
                let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(v)?;
                Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ns)
                    .patch(&name, &ssa, &Patch::Apply(&role))
                    .await?;
            }
            Some("RoleBinding") => {
                if let Some(subjects) = v["subjects"].as_array_mut() {
                    for s in subjects {
                        s["namespace"] = json!(ns);
                    }
                }
                let b: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(v)?;
                Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns)
                    .patch(&name, &ssa, &Patch::Apply(&b))
                    .await?;
            }
            other => anyhow::bail!("kustomize/hub/member-secrets-role.yaml: unexpected {other:?}"),
        }
    }
    Ok(())
}

/// A client that authenticates as the operator's ServiceAccount in `ns`, bound to the kustomize role.
async fn operator_client(
    cluster: &TestCluster,
    admin: &Client,
    ns: &str,
) -> anyhow::Result<Client> {
    let ssa = PatchParams::apply("e2e").force();
    let role = kustomize_cluster_role()?;
    Api::<ClusterRole>::all(admin.clone())
        .patch("propeller-operator", &ssa, &Patch::Apply(&role))
        .await?;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "propeller-operator"}}))?;
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("propeller-operator-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "propeller-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "propeller-operator", "namespace": ns}],
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(
            &format!("propeller-operator-{ns}"),
            &ssa,
            &Patch::Apply(&binding),
        )
        .await?;
    let req: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))?;
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request("propeller-operator", &PostParams::default(), &req)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| anyhow::anyhow!("TokenRequest returned no token"))?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&cluster.kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Ok(Client::try_from(config)?)
}

impl Env {
    /// A namespace, a broker and the operator (restricted to the namespace) with `extra` flags.
    pub async fn start(prefix: &str, extra: &[&str]) -> anyhow::Result<Env> {
        Env::start_with(prefix, extra, false).await
    }

    /// The operator talks to the broker over TLS (its CA from the test bed); proplets stay on plain MQTT.
    pub async fn start_tls(prefix: &str) -> anyhow::Result<Env> {
        Env::start_with(prefix, &[], true).await
    }

    /// As [`Env::start`], on `cluster` (a member of [`testbed::start_clusters`], or the shared one).
    pub async fn start_on(
        cluster: &'static TestCluster,
        prefix: &str,
        extra: &[&str],
    ) -> anyhow::Result<Env> {
        Env::start_with_on(cluster, prefix, extra, false).await
    }

    async fn start_with(prefix: &str, extra: &[&str], tls: bool) -> anyhow::Result<Env> {
        Env::start_with_on(shared_cluster(), prefix, extra, tls).await
    }

    async fn start_with_on(
        cluster: &'static TestCluster,
        prefix: &str,
        extra: &[&str],
        tls: bool,
    ) -> anyhow::Result<Env> {
        // RUST_LOG=propeller_operator=debug shows the operator's log with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let admin = cluster.client().await?;
        install_crds(&admin).await?;
        let ns = cluster.namespace(&admin, prefix).await?;
        let broker = if tls {
            testbed::start_tls_broker()?
        } else {
            testbed::start_broker()?
        };
        let op_client = operator_client(cluster, &admin, &ns).await?;
        if extra.contains(&"--hub") {
            hub_role(&admin, &ns).await?;
        }
        let (address, ca) = match &broker.tls {
            Some(t) => (
                format!("ssl://127.0.0.1:{}", t.port),
                t.ca_cert.display().to_string(),
            ),
            None => (broker.address(), String::new()),
        };
        let identity = format!("operator-{ns}");
        let mut args = vec![
            "propeller-operator",
            "--mqtt-address",
            &address,
            "--client-id",
            &broker.username,
            "--client-key",
            &broker.password,
            "--identity",
            &identity,
            "--domain-id",
            DOMAIN,
            "--channel-id",
            CHANNEL,
            "--watch-namespace",
            &ns,
            "--last-seen-threshold",
            "3s",
            "--status-refresh",
            "5s",
        ];
        if tls {
            args.extend_from_slice(&["--mqtt-ca-cert", &ca]);
        }
        // No metrics endpoint unless the test asks for one.
        if !extra
            .iter()
            .any(|a| a.starts_with("--health-probe-bind-address"))
        {
            args.extend_from_slice(&["--health-probe-bind-address", "0"]);
        }
        // Any free port: several operators (and test binaries) run at once.
        if !extra.iter().any(|a| a.starts_with("--fl-bind-address")) {
            args.extend_from_slice(&["--fl-bind-address", "127.0.0.1:0"]);
        }
        args.extend_from_slice(extra);
        let config = OperatorConfig::try_parse_from_args(&args)?;
        let mut env = Env {
            cluster,
            admin,
            ns,
            broker,
            operators: Vec::new(),
            configs: vec![config],
            op_client,
            clock: propeller_operator::clock::Clock::default(),
        };
        env.operators.push(Some(env.launch(0).await?));
        Ok(env)
    }

    async fn launch(&self, i: usize) -> anyhow::Result<Operator> {
        Operator::start(
            self.op_client.clone(),
            self.configs[i].clone(),
            self.clock.clone(),
        )
        .await
    }

    /// Starts another operator in this process on the same cluster, namespace and broker, as `identity`
    /// (its own MQTT client id) with the first operator's flags plus `extra`; returns its index.
    pub async fn add_operator(&mut self, identity: &str, extra: &[&str]) -> anyhow::Result<usize> {
        let mut args = vec!["propeller-operator".to_string()];
        let first = &self.configs[0];
        args.extend(first_args(first));
        args.push(format!("--identity={identity}"));
        args.extend(extra.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut config = OperatorConfig::try_parse_from_args(&refs)?;
        config.client_key = first.client_key.clone();
        self.configs.push(config);
        let i = self.configs.len() - 1;
        let op = self.launch(i).await?;
        self.operators.push(Some(op));
        Ok(i)
    }

    /// Kills operator `i` as `kill -9` would: no drain, no Lease released.
    pub async fn crash_operator_n(&mut self, i: usize) {
        if let Some(op) = self.operators.get_mut(i).and_then(Option::take) {
            op.crash().await;
        }
    }

    /// Starts operator `i` again with its own flags (the same identity: a StatefulSet pod coming back).
    pub async fn restart_operator_n(&mut self, i: usize) -> anyhow::Result<()> {
        let op = self.launch(i).await?;
        self.operators[i] = Some(op);
        Ok(())
    }

    /// How many operators this test started (running or not).
    pub fn operator_count(&self) -> usize {
        self.operators.len()
    }

    /// Operator `i`, if it runs.
    pub fn operator(&self, i: usize) -> Option<&Operator> {
        self.operators.get(i).and_then(Option::as_ref)
    }

    /// The first operator's metrics (each operator has its own registry).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.operator(0)
            .map(|o| Arc::clone(&o.context().metrics))
            .unwrap_or_else(|| Arc::new(Metrics::new().expect("metric families are unique")))
    }

    /// Stops the first operator (as a crash or a rollout would); `resume_operator` starts a fresh one.
    pub async fn stop_operator(&mut self) -> anyhow::Result<Duration> {
        self.stop_operator_n(0).await
    }

    /// Stops operator `i`; returns how long its stop took.
    pub async fn stop_operator_n(&mut self, i: usize) -> anyhow::Result<Duration> {
        let Some(op) = self.operators.get_mut(i).and_then(Option::take) else {
            return Ok(Duration::ZERO);
        };
        tokio::time::timeout(Duration::from_secs(10), op.stop())
            .await
            .map_err(|_| anyhow::anyhow!("operator {i} did not stop within 10 s"))
    }

    /// Operator `i`'s graceful goodbye, as on SIGTERM: it hands its proplets to the other shards (at most
    /// `deadline`), then stops. Returns how many proplets it still held when it let go.
    pub async fn leave_operator_n(
        &mut self,
        i: usize,
        deadline: Duration,
    ) -> anyhow::Result<usize> {
        let Some(op) = self.operators.get_mut(i).and_then(Option::take) else {
            return Ok(0);
        };
        let left = op.leave(deadline).await;
        tokio::time::timeout(Duration::from_secs(10), op.stop())
            .await
            .map_err(|_| anyhow::anyhow!("operator {i} did not stop within 10 s"))?;
        Ok(left)
    }

    pub async fn resume_operator(&mut self) -> anyhow::Result<()> {
        let op = self.launch(0).await?;
        self.operators[0] = Some(op);
        Ok(())
    }

    /// Starts a simulated proplet with its own broker account.
    pub async fn proplet(
        &mut self,
        client_id: &str,
        tune: impl FnOnce(&mut SimConfig),
    ) -> anyhow::Result<SimHandle> {
        let key = format!("{client_id}-key");
        self.broker.add_user(client_id, &key)?;
        let mut c = SimConfig::new(&self.broker.address(), DOMAIN, CHANNEL, client_id, &key);
        c.liveliness_interval = Duration::from_millis(500);
        c.metrics_interval = Duration::from_secs(1);
        c.namespace = self.ns.clone();
        tune(&mut c);
        sim::spawn(c)
    }

    /// Starts `n` simulated proplets `{prefix}-c{i}` (one broker reload for all) with their external
    /// Proplets `p{i}`.
    pub async fn proplet_fleet(
        &mut self,
        prefix: &str,
        n: usize,
        tune: impl Fn(&mut SimConfig),
    ) -> anyhow::Result<Vec<SimHandle>> {
        let clients: Vec<String> = (0..n).map(|i| format!("{prefix}-c{i}")).collect();
        let users: Vec<(String, String)> = clients
            .iter()
            .map(|c| (c.clone(), format!("{c}-key")))
            .collect();
        self.broker.add_users(&users)?;
        let mut sims = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let mut config = SimConfig::new(
                &self.broker.address(),
                DOMAIN,
                CHANNEL,
                c,
                &format!("{c}-key"),
            );
            config.liveliness_interval = Duration::from_millis(500);
            config.metrics_interval = Duration::from_secs(1);
            config.namespace = self.ns.clone();
            tune(&mut config);
            // A proplet tuned onto a channel of its own is declared on it.
            let extra = if config.channel == CHANNEL {
                json!({})
            } else {
                json!({"connectionConfig": {"domainId": DOMAIN, "channelId": config.channel,
                    "clientId": c, "clientKey": format!("{c}-key"), "mqttAddress": self.broker.address()}})
            };
            sims.push(sim::spawn(config)?);
            self.external_proplet(&format!("p{i}"), c, extra).await?;
        }
        Ok(sims)
    }

    /// Creates an object from JSON in the test namespace.
    pub async fn create<K>(&self, value: Value) -> anyhow::Result<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let obj: K = serde_json::from_value(value)?;
        Ok(Api::<K>::namespaced(self.admin.clone(), &self.ns)
            .create(&PostParams::default(), &obj)
            .await?)
    }

    pub fn tasks(&self) -> Api<Task> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn proplets(&self) -> Api<Proplet> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Waits until `check` accepts the named object.
    pub async fn wait_for<K>(
        &self,
        api: &Api<K>,
        name: &str,
        what: &str,
        check: impl Fn(&K) -> bool,
    ) -> anyhow::Result<K>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let last = std::sync::Mutex::new(None);
        let found = testbed::wait_for(self.cluster, what, WAIT, || async {
            let obj = api.get_opt(name).await.ok().flatten()?;
            let ok = check(&obj);
            if let Ok(mut l) = last.lock() {
                *l = Some(format!("{obj:?}"));
            }
            ok.then_some(obj)
        })
        .await;
        found.map_err(|e| {
            let seen = last.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
            anyhow::anyhow!("{e}; last seen: {seen}")
        })
    }

    /// A Running external Proplet named `name` for the simulated proplet `client_id`.
    pub async fn external_proplet(
        &self,
        name: &str,
        client_id: &str,
        extra: Value,
    ) -> anyhow::Result<Proplet> {
        let mut spec = json!({
            "type": "external",
            "external": {"deviceType": "sim", "capabilities": ["wasm"]},
            "connectionConfig": {"domainId": DOMAIN, "channelId": CHANNEL, "clientId": client_id,
                                 "clientKey": format!("{client_id}-key"), "mqttAddress": self.broker.address()},
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        self.create::<Proplet>(json!({"metadata": {"name": name}, "spec": spec}))
            .await
    }

    pub async fn publish_raw(&self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        let mut opts = rumqttc::MqttOptions::new(
            format!("raw-{}", testbed::process::random_hex(3)?),
            "127.0.0.1",
            self.broker.port,
        );
        opts.set_credentials(&self.broker.username, &self.broker.password);
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .await?;
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = el.poll().await {
                    return;
                }
            }
        })
        .await?;
        Ok(())
    }

    /// Stops the operators and deletes the namespace.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        for i in 0..self.operators.len() {
            self.stop_operator_n(i).await?;
        }
        let _ = Api::<ClusterRoleBinding>::all(self.admin.clone())
            .delete(
                &format!("propeller-operator-{}", self.ns),
                &Default::default(),
            )
            .await;
        self.cluster.delete_namespace(&self.admin, &self.ns).await;
        Ok(())
    }
}

/// The flags of `config` that a further operator of the same test shares (broker, namespace, timings); the
/// MQTT password is copied separately (never on a command line).
fn first_args(config: &OperatorConfig) -> Vec<String> {
    let mut args = vec![
        format!("--mqtt-address={}", config.mqtt_address),
        format!("--client-id={}", config.client_id),
        format!("--domain-id={}", config.domain_id),
        format!("--channel-id={}", config.channel_id),
        format!("--watch-namespace={}", config.watch_namespace),
        format!(
            "--last-seen-threshold={}s",
            config.last_seen_threshold.0.as_secs()
        ),
        format!("--status-refresh={}s", config.status_refresh.0.as_secs()),
        "--health-probe-bind-address=127.0.0.1:0".to_string(),
        "--fl-bind-address=127.0.0.1:0".to_string(),
    ];
    if let Some(ca) = &config.mqtt_ca_cert {
        args.push(format!("--mqtt-ca-cert={}", ca.display()));
    }
    if config.leader_elect {
        args.extend([
            "--leader-elect".to_string(),
            format!("--lease-duration={}ms", config.lease_duration.0.as_millis()),
            format!("--renew-deadline={}ms", config.renew_deadline.0.as_millis()),
            format!("--retry-period={}ms", config.retry_period.0.as_millis()),
            format!(
                "--takeover-relabel-after={}ms",
                config.takeover_relabel_after.0.as_millis()
            ),
            format!(
                "--shard-by={}",
                clap::ValueEnum::to_possible_value(&config.shard_by)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            ),
        ]);
    }
    args
}

/// Waits until the Proplet `name` is Running.
pub async fn wait_running(env: &Env, name: &str) -> anyhow::Result<Proplet> {
    env.wait_for(
        &env.proplets(),
        name,
        &format!("{name} Running"),
        |p: &Proplet| p.phase() == propeller_operator::api::proplet::PropletPhase::Running,
    )
    .await
}

/// One operator per entry of `clusters` (the same cluster may appear several times), all in this process,
/// each with its own namespace, broker, metrics, ports and MQTT identity, started with `extra` flags.
pub async fn fleet(
    clusters: &[&'static TestCluster],
    prefix: &str,
    extra: &[&str],
) -> anyhow::Result<Vec<Env>> {
    let mut envs = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        envs.push(Env::start_on(cluster, &format!("{prefix}-{i}"), extra).await?);
    }
    Ok(envs)
}
