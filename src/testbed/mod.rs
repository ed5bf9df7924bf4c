//! The test bed: real Kubernetes control planes and a real MQTT broker, for tests and for people.
//!
//! Tests call [`shared_cluster`] (one local cluster per test binary, started on first use) or
//! [`start_clusters`] (N independent clusters: a hub and members), and [`start_broker`]. With
//! `E2E_KUBECONFIG` set, the same tests use that existing cluster instead (a `:`-separated list of
//! kubeconfig paths for several clusters); tests that must restart local processes call
//! [`TestCluster::local_or_skip`] and are skipped with a printed reason.
pub mod broker;
pub mod cluster;
pub mod netns;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

pub use broker::Broker;
pub use cluster::{Binaries, ControlPlane};
pub use process::Lifetime;

/// A cluster a test can use: a local control plane or an existing cluster from `E2E_KUBECONFIG`.
pub struct TestCluster {
    pub name: String,
    pub kubeconfig: PathBuf,
    local: Option<ControlPlane>,
}

impl TestCluster {
    /// A fresh client. kube's client lives on the runtime that made it, so every test makes its own.
    pub async fn client(&self) -> Result<Client> {
        self.check()?;
        client_for(&self.kubeconfig).await
    }

    /// The local control plane, or `None` after printing why the calling test is skipped.
    pub fn local_or_skip(&self, test: &str, why: &str) -> Option<&ControlPlane> {
        if self.local.is_none() {
            eprintln!(
                "SKIPPED {test}: it {why}, which needs the local test bed (E2E_KUBECONFIG points at an existing cluster)"
            );
        }
        self.local.as_ref()
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Fails with the crashed process's last log lines when a local control-plane process died.
    pub fn check(&self) -> Result<()> {
        match &self.local {
            Some(cp) => cp.check(),
            None => Ok(()),
        }
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> Result<String> {
        let name = format!("{prefix}-{}", process::random_hex(3)?);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"propeller-testbed": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        Ok(name)
    }

    /// This cluster's kubeconfig as a Secret of ours (under [`crate::clusters::KUBECONFIG_KEY`]), for a hub
    /// to reach it as a member cluster: create it on the hub.
    pub fn kubeconfig_secret(
        &self,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<k8s_openapi::api::core::v1::Secret> {
        let text = std::fs::read_to_string(&self.kubeconfig)
            .with_context(|| format!("read kubeconfig {}", self.kubeconfig.display()))?;
        Ok(crate::clusters::kubeconfig_secret(
            name, namespace, &text, labels,
        ))
    }

    /// Deletes a namespace made by [`TestCluster::namespace`] (objects with finalizers may keep it a while).
    pub async fn delete_namespace(&self, client: &Client, name: &str) {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(name, &DeleteParams::background())
            .await;
    }
}

/// A kube client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    Ok(crate::clusters::from_kubeconfig_file(kubeconfig).await?)
}

/// The existing clusters named by `E2E_KUBECONFIG`, if set.
fn external_kubeconfigs() -> Option<Vec<PathBuf>> {
    let v = std::env::var("E2E_KUBECONFIG").ok()?;
    let paths: Vec<PathBuf> = v
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    (!paths.is_empty()).then_some(paths)
}

/// The directory for this test run's state and logs (`PROPELLER_TESTBED_DIR`, or a temp directory).
pub fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("PROPELLER_TESTBED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("propeller-testbed"));
        remove_stale_runs(&base);
        let dir = base.join(format!("run-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

/// Earlier runs keep their logs for inspection until a later run finds their process gone.
fn remove_stale_runs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn next_dir(kind: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    run_dir().join(format!("{kind}-{}", N.fetch_add(1, Ordering::SeqCst)))
}

fn binaries() -> Result<&'static Binaries> {
    static BINS: OnceLock<std::result::Result<Binaries, String>> = OnceLock::new();
    BINS.get_or_init(|| Binaries::provision().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("provisioning the local control plane failed: {e}"))
}

/// The cluster shared by all tests of this test binary. Panics (failing the test) when it cannot start.
pub fn shared_cluster() -> &'static TestCluster {
    static SHARED: OnceLock<std::result::Result<TestCluster, String>> = OnceLock::new();
    let cluster = SHARED.get_or_init(|| {
        start_clusters(1)
            .map(|mut v| v.remove(0))
            .map_err(|e| format!("{e:#}"))
    });
    match cluster {
        Ok(c) => c,
        Err(e) => panic!("the test cluster is not available: {e}"),
    }
}

/// `n` independent clusters, named `hub`, `member-1`, … With `E2E_KUBECONFIG`, the listed clusters are used
/// in order, and the last one is reused when fewer are listed (separate namespaces keep tests apart).
pub fn start_clusters(n: usize) -> Result<Vec<TestCluster>> {
    start_named((0..n).map(cluster_name).collect(), 0)
}

fn cluster_name(i: usize) -> String {
    if i == 0 {
        "hub".to_string()
    } else {
        format!("member-{i}")
    }
}

/// Two member clusters shared by the hub tests of this test binary (the shared cluster plays the hub),
/// started on first use. With `E2E_KUBECONFIG`, the second and third listed clusters (or the last one).
pub fn member_clusters() -> &'static [TestCluster] {
    static MEMBERS: OnceLock<std::result::Result<Vec<TestCluster>, String>> = OnceLock::new();
    let members = MEMBERS.get_or_init(|| {
        start_named((1..=2).map(cluster_name).collect(), 1).map_err(|e| format!("{e:#}"))
    });
    match members {
        Ok(m) => m,
        Err(e) => panic!("the member clusters are not available: {e}"),
    }
}

/// Clusters named `names`; with `E2E_KUBECONFIG`, the listed clusters from position `first` on.
fn start_named(names: Vec<String>, first: usize) -> Result<Vec<TestCluster>> {
    if let Some(paths) = external_kubeconfigs() {
        return Ok(names
            .into_iter()
            .enumerate()
            .map(|(i, name)| TestCluster {
                name,
                kubeconfig: paths[(first + i).min(paths.len() - 1)].clone(),
                local: None,
            })
            .collect());
    }
    let bins = binaries()?;
    // Started in parallel: each API server takes ~10-15 s to become ready.
    let handles: Vec<_> = names
        .into_iter()
        .map(|name| {
            let bins = bins.clone();
            let dir = next_dir(&name);
            std::thread::spawn(move || {
                ControlPlane::start(&bins, &name, &dir, Lifetime::Attached).map(|cp| TestCluster {
                    name,
                    kubeconfig: cp.kubeconfig.clone(),
                    local: Some(cp),
                })
            })
        })
        .collect();
    let mut clusters = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => clusters.push(r?),
            Err(_) => bail!("a control-plane start thread panicked"),
        }
    }
    Ok(clusters)
}

/// A fresh mosquitto with authentication on, owned by the calling test (restartable).
pub fn start_broker() -> Result<Broker> {
    Broker::start(&next_dir("mosquitto"), Lifetime::Attached)
}

/// A fresh mosquitto with a plain and a TLS listener.
pub fn start_tls_broker() -> Result<Broker> {
    Broker::start_tls(&next_dir("mosquitto"), Lifetime::Attached)
}

/// Polls `f` until it yields `Some`, failing after `timeout` with `what` and, for a local cluster, the state
/// of its processes.
pub async fn wait_for<T, F, Fut>(
    cluster: &TestCluster,
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        cluster.check()?;
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until it yields `Some`, failing after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates or replaces this operator's CRDs and waits until the API server serves them. (Not server-side
/// apply: a 1.20 API server rejects the CEL rules' field there, while create and replace drop it.)
pub async fn install_crds(client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crds = crate::api::all_crds();
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        // Tests install concurrently: a conflict means someone else just wrote it; read and try again.
        let mut attempts = 0;
        loop {
            let result = match api.get_opt(&name).await? {
                Some(existing) => {
                    let mut crd = crd.clone();
                    crd.metadata.resource_version = existing.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &crd).await
                }
                None => api.create(&PostParams::default(), crd).await,
            };
            match result {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if (e.code == 409) && attempts < 10 => attempts += 1,
                Err(e) => return Err(e).with_context(|| format!("install CRD {name}")),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let established = api
                .get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .is_some_and(|s| {
                    s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            if Instant::now() > deadline {
                bail!("CRD {name} not established after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// `../shared` beside the checkout (upstream samples, specs), when present. Outside CI its absence is a
/// printed skip; in CI (`CI=true`) it is a failure.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = cluster::repo_root().join("../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {} is missing, and CI must have it", dir.display());
    }
    eprintln!(
        "SKIPPED {test}: {} is absent (it exists only beside the developers' checkout and in CI)",
        dir.display()
    );
    None
}

/// The example FL client built by `make fl-client` (`make test` builds it first). Outside CI its absence
/// is a printed skip; in CI (`CI=true`) it is a failure.
pub fn fl_client_module(test: &str) -> Option<PathBuf> {
    let path = cluster::repo_root().join("target/wasm32-wasi/fl-client.wasm");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: {} is missing: `make fl-client` builds it",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED {test}: {} is absent; run `make fl-client` (or `make test`, which builds it)",
        path.display()
    );
    None
}

/// `n` samples of one labelled problem for the example FL client (y = 1 when 1.5·a − c + 0.2 > 0), drawn from
/// region `k`: participants given different `k` see different parts of it.
pub fn fl_dataset(k: usize, n: usize) -> (Vec<[f64; 2]>, Vec<f64>) {
    let x: Vec<[f64; 2]> = (0..n)
        .map(|i| {
            let t = i as f64;
            [
                (t * 0.7 + k as f64).sin() * 1.5 + 0.3 * k as f64 - 0.3,
                (t * 1.3 + 2.0 * k as f64).cos(),
            ]
        })
        .collect();
    let y = x
        .iter()
        .map(|r| f64::from(1.5 * r[0] - r[1] + 0.2 > 0.0))
        .collect();
    (x, y)
}
