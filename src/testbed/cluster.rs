//! One local Kubernetes control plane: etcd, kube-apiserver (TLS, token authentication, RBAC) and
//! kube-controller-manager (garbage collector, Deployment → ReplicaSet), on free loopback ports.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::process::{Lifetime, Proc, free_port, port_conflict, random_hex, wait_ready};

/// Where the provisioned kube-apiserver and kube-controller-manager binaries live.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub etcd: PathBuf,
}

impl Binaries {
    /// Runs `e2e/provision.sh` (installs packages, builds once into the cache) and returns the binaries.
    /// `PROPELLER_K8S_BIN` names a directory holding prebuilt binaries instead.
    pub fn provision() -> Result<Binaries> {
        let dir = match std::env::var_os("PROPELLER_K8S_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script = repo_root().join("e2e/provision.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .with_context(|| format!("run {}", script.display()))?;
                if !out.status.success() {
                    bail!("{} failed (its last line says why)", script.display());
                }
                let stdout = String::from_utf8_lossy(&out.stdout);
                let cache = stdout.lines().last().unwrap_or_default().trim().to_string();
                PathBuf::from(cache).join("bin")
            }
        };
        let bins = Binaries {
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
            etcd: PathBuf::from("etcd"),
        };
        for b in [&bins.kube_apiserver, &bins.kube_controller_manager] {
            if !b.exists() {
                bail!("{} is missing", b.display());
            }
        }
        Ok(bins)
    }
}

/// The repository this crate was built from (for scripts under `e2e/`).
pub fn repo_root() -> PathBuf {
    std::env::var_os("PROPELLER_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A running local control plane.
pub struct ControlPlane {
    pub name: String,
    pub dir: PathBuf,
    pub server: String,
    pub token: String,
    pub kubeconfig: PathBuf,
    pub ca_cert: PathBuf,
    pub etcd: Proc,
    pub apiserver: Proc,
    pub controller_manager: Proc,
}

const PORT_ATTEMPTS: usize = 5;

impl ControlPlane {
    /// The API server's address on the loopback (from `server`, `https://127.0.0.1:PORT`).
    pub fn apiserver_address(&self) -> std::net::SocketAddr {
        self.server
            .trim_start_matches("https://")
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 6443)))
    }

    /// Starts a cluster named `name` with its state under `dir`. Ready when its `/readyz` answers ok.
    pub fn start(
        bins: &Binaries,
        name: &str,
        dir: &Path,
        lifetime: Lifetime,
    ) -> Result<ControlPlane> {
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let pki = Pki::create(&dir.join("pki"))?;
        let token = random_hex(24)?;
        let token_file = dir.join("tokens.csv");
        fs::write(&token_file, format!("{token},admin,admin,system:masters\n"))?;

        let etcd = retry_on_port_conflict(|| start_etcd(bins, name, &dir, lifetime))?;
        let (apiserver, port) = retry_on_port_conflict(|| {
            let port = free_port().map_err(|e| (None, e))?;
            let proc =
                start_apiserver(bins, name, &dir, &pki, &etcd.1, &token_file, port, lifetime)
                    .map_err(|e| (None, e))?;
            let url = format!("https://127.0.0.1:{port}/readyz");
            let ready = wait_ready(&proc, Duration::from_secs(90), || {
                curl_ok(&url, &token, &pki.ca_cert)
            });
            match ready {
                Ok(()) => Ok((proc, port)),
                Err(e) => Err((Some(proc), e)),
            }
        })?;
        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, name, &server, &pki.ca_cert, &token)?;

        let mut kcm = Command::new(&bins.kube_controller_manager);
        kcm.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--controllers=*,-serviceaccount-token")
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.sa_key.display()
            ))
            .arg("--secure-port=0")
            .arg("--port=0")
            .arg("--use-service-account-credentials=false");
        let controller_manager = Proc::spawn(
            &format!("{name}/kube-controller-manager"),
            kcm,
            &dir.join("kube-controller-manager.log"),
            lifetime,
        )?;
        // The controller manager has no port to probe here; give it a moment to fail loudly.
        std::thread::sleep(Duration::from_millis(500));
        controller_manager.check()?;

        Ok(ControlPlane {
            name: name.to_string(),
            dir,
            server,
            token,
            kubeconfig,
            ca_cert: pki.ca_cert,
            etcd: etcd.0,
            apiserver,
            controller_manager,
        })
    }

    /// `Ok` while all three processes run; otherwise the first crash with its log tail.
    pub fn check(&self) -> Result<()> {
        self.etcd.check()?;
        self.apiserver.check()?;
        self.controller_manager.check()
    }

    /// Leaves the processes running (for `make cluster-up`) and returns their PIDs, clients first.
    pub fn release(&self) -> Vec<u32> {
        vec![
            self.controller_manager.release(),
            self.apiserver.release(),
            self.etcd.release(),
        ]
    }

    pub fn stop(&self) {
        self.controller_manager.stop(Duration::from_secs(3));
        self.apiserver.stop(Duration::from_secs(5));
        self.etcd.stop(Duration::from_secs(5));
    }
}

impl Drop for ControlPlane {
    /// Clients first, storage last, so nothing reports the others' exit as a crash.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts something on a free port; when it failed because the port was taken meanwhile, tries another.
fn retry_on_port_conflict<T>(mut start: impl FnMut() -> StartResult<T>) -> Result<T> {
    let mut last = None;
    for _ in 0..PORT_ATTEMPTS {
        match start() {
            Ok(v) => return Ok(v),
            Err((proc, err)) => {
                let conflict = proc.as_ref().is_some_and(port_conflict);
                if let Some(proc) = proc {
                    proc.stop(Duration::from_secs(2));
                }
                if !conflict {
                    return Err(err);
                }
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no free port found")))
}

/// A started process, or the error with the process that failed (if it got as far as starting).
type StartResult<T> = std::result::Result<T, (Option<Proc>, anyhow::Error)>;

fn start_etcd(
    bins: &Binaries,
    cluster: &str,
    dir: &Path,
    lifetime: Lifetime,
) -> StartResult<(Proc, String)> {
    let fail = |e: anyhow::Error| -> StartResult<(Proc, String)> { Err((None, e)) };
    let (client, peer) = match (free_port(), free_port()) {
        (Ok(c), Ok(p)) => (c, p),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let data = dir.join("etcd-data");
    let _ = fs::remove_dir_all(&data);
    let url = format!("http://127.0.0.1:{client}");
    let mut cmd = Command::new(&bins.etcd);
    cmd.arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
        .arg("--unsafe-no-fsync=true")
        .arg("--quota-backend-bytes=4294967296");
    let proc = match Proc::spawn(
        &format!("{cluster}/etcd"),
        cmd,
        &dir.join("etcd.log"),
        lifetime,
    ) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let health = format!("{url}/health");
    match wait_ready(&proc, Duration::from_secs(30), || {
        Command::new("curl")
            .args(["-fsS", "-m", "2", &health])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }) {
        Ok(()) => Ok((proc, url)),
        Err(e) => Err((Some(proc), e)),
    }
}

#[allow(clippy::too_many_arguments)]
fn start_apiserver(
    bins: &Binaries,
    cluster: &str,
    dir: &Path,
    pki: &Pki,
    etcd_url: &str,
    token_file: &Path,
    port: u16,
    lifetime: Lifetime,
) -> Result<Proc> {
    let mut cmd = Command::new(&bins.kube_apiserver);
    cmd.arg(format!("--etcd-servers={etcd_url}"))
        .arg(format!("--secure-port={port}"))
        .arg("--insecure-port=0")
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!(
            "--cert-dir={}",
            dir.join("apiserver-certs").display()
        ))
        .arg(format!("--tls-cert-file={}", pki.server_cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.server_key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!(
            "--service-account-key-file={}",
            pki.sa_key.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ))
        .arg("--api-audiences=https://kubernetes.default.svc")
        .arg("--authorization-mode=RBAC")
        // As strict as a hardened cluster about ownerReferences: blockOwnerDeletion needs `update` on the
        // owner's `finalizers` (the operator's Role must grant every one it uses).
        .arg("--enable-admission-plugins=OwnerReferencesPermissionEnforcement")
        .arg(format!("--token-auth-file={}", token_file.display()))
        .arg("--enable-priority-and-fairness=false")
        .arg("--max-requests-inflight=2000")
        .arg("--max-mutating-requests-inflight=1000")
        .arg("--event-ttl=1h");
    Proc::spawn(
        &format!("{cluster}/kube-apiserver"),
        cmd,
        &dir.join("kube-apiserver.log"),
        lifetime,
    )
}

fn curl_ok(url: &str, token: &str, ca: &Path) -> bool {
    Command::new("curl")
        .args(["-fsS", "-m", "3", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}"), url])
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"ok"))
        .unwrap_or(false)
}

/// A kubeconfig with one cluster, one user (bearer token) and one context, all named `name`.
pub fn write_kubeconfig(
    path: &Path,
    name: &str,
    server: &str,
    ca: &Path,
    token: &str,
) -> Result<()> {
    let ca_pem = fs::read(ca)?;
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server,
            "certificate-authority-data": base64_std(&ca_pem),
        }}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    });
    fs::write(path, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

fn base64_std(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Certificates: a CA, a serving certificate for 127.0.0.1 and localhost (the API server's, or the
/// broker's TLS listener's), and a service-account signing key.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub sa_key: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Result<Pki> {
        fs::create_dir_all(dir)?;
        let p = |f: &str| dir.join(f);
        let ext = p("server.ext");
        fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n\
             extendedKeyUsage=serverAuth\n",
        )?;
        openssl(&["genrsa", "-out"], &[&p("ca.key")], &["2048"])?;
        openssl(
            &[
                "req",
                "-x509",
                "-new",
                "-nodes",
                "-subj",
                "/CN=propeller-testbed-ca",
                "-days",
                "3650",
                "-key",
            ],
            &[&p("ca.key"), Path::new("-out"), &p("ca.crt")],
            &[],
        )?;
        openssl(&["genrsa", "-out"], &[&p("server.key")], &["2048"])?;
        openssl(
            &["req", "-new", "-subj", "/CN=kube-apiserver", "-key"],
            &[&p("server.key"), Path::new("-out"), &p("server.csr")],
            &[],
        )?;
        openssl(
            &["x509", "-req", "-days", "3650", "-CAcreateserial", "-in"],
            &[
                &p("server.csr"),
                Path::new("-CA"),
                &p("ca.crt"),
                Path::new("-CAkey"),
                &p("ca.key"),
                Path::new("-extfile"),
                &ext,
                Path::new("-out"),
                &p("server.crt"),
            ],
            &[],
        )?;
        openssl(&["genrsa", "-out"], &[&p("sa.key")], &["2048"])?;
        Ok(Pki {
            ca_cert: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            sa_key: p("sa.key"),
        })
    }
}

fn openssl(head: &[&str], paths: &[&Path], tail: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(head)
        .args(paths)
        .args(tail)
        .output()
        .context("run openssl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            head.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
