//! A host of its own for one process under test: a network namespace joined to this machine by two veth
//! links, one that carries its API server traffic and one its MQTT traffic, each through a relay to the
//! service on this machine's loopback. Cutting the MQTT link partitions the process from the broker (its
//! packets go nowhere, as with a real network fault: no reset, no error until its keepalive notices) while it
//! keeps its API server and its Leases. Everything stays on this machine. Needs root (`ip netns`).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards each connection `listener` accepts to the first of `backends` that accepts it (within 0.5 s).
pub fn forward(listener: TcpListener, backends: Vec<SocketAddr>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backends = backends.clone();
            tokio::spawn(async move {
                for b in &backends {
                    let connect = TcpStream::connect(b);
                    if let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(std::time::Duration::from_millis(500), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    })
}

/// One namespace and its two links; removed on drop.
pub struct Netns {
    pub name: String,
    /// This machine's address on the API link (the relays listen there).
    api_host: String,
    /// The namespace's address on the API link: where this machine reaches the process inside.
    pub inside: String,
    mqtt_host: String,
    mqtt_link: String,
    relays: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates namespace `pn<n>` with its links; `n` (0–250) keeps names and subnets apart.
    pub fn create(n: u8) -> Result<Netns> {
        let name = format!("pn{n}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name: name.clone(),
            api_host: format!("10.{}.{n}.1", 213),
            inside: format!("10.{}.{n}.2", 213),
            mqtt_host: format!("10.{}.{n}.1", 214),
            mqtt_link: format!("pm{n}"),
            relays: Vec::new(),
        };
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        for (link, host, inside) in [
            (format!("pa{n}"), ns.api_host.clone(), ns.inside.clone()),
            (
                ns.mqtt_link.clone(),
                ns.mqtt_host.clone(),
                format!("10.214.{n}.2"),
            ),
        ] {
            let peer = format!("{link}x");
            let _ = ip(&["link", "del", &link]);
            ip(&["link", "add", &link, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", &name])?;
            ip(&["addr", "add", &format!("{host}/24"), "dev", &link])?;
            ip(&["link", "set", &link, "up"])?;
            let exec = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &name, "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            exec(&["addr", "add", &format!("{inside}/24"), "dev", &peer])?;
            exec(&["link", "set", &peer, "up"])?;
        }
        Ok(ns)
    }

    /// A relay on the API link to `target` (this machine's loopback): returns the address to dial inside.
    pub async fn relay_api(&mut self, target: SocketAddr) -> Result<SocketAddr> {
        let host = self.api_host.clone();
        self.relay(&host, target).await
    }

    /// A relay on the MQTT link to `target`: returns the address to dial inside.
    pub async fn relay_mqtt(&mut self, target: SocketAddr) -> Result<SocketAddr> {
        let host = self.mqtt_host.clone();
        self.relay(&host, target).await
    }

    async fn relay(&mut self, host: &str, target: SocketAddr) -> Result<SocketAddr> {
        let listener = TcpListener::bind((host, 0))
            .await
            .with_context(|| format!("bind a relay on {host}"))?;
        let at = listener.local_addr()?;
        self.relays.push(forward(listener, vec![target]));
        Ok(at)
    }

    /// Cuts the MQTT link (from inside: the process's packets to the broker go nowhere).
    pub fn cut_mqtt(&self) -> Result<()> {
        let peer = format!("{}x", self.mqtt_link);
        ip(&[
            "netns", "exec", &self.name, "ip", "link", "set", &peer, "down",
        ])
    }

    /// Joins it again.
    pub fn heal_mqtt(&self) -> Result<()> {
        let peer = format!("{}x", self.mqtt_link);
        ip(&[
            "netns", "exec", &self.name, "ip", "link", "set", &peer, "up",
        ])
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec` execs it: same PID).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A copy of `kubeconfig` that reaches its (loopback) API server through `relay`, checking the
    /// server's certificate for `localhost` (the test bed's certificate names it).
    pub fn kubeconfig_via(
        &self,
        kubeconfig: &Path,
        relay: SocketAddr,
        dir: &Path,
    ) -> Result<PathBuf> {
        let text = std::fs::read_to_string(kubeconfig)
            .with_context(|| format!("read {}", kubeconfig.display()))?;
        let mut config: serde_yaml::Value = serde_yaml::from_str(&text)?;
        let clusters = config
            .get_mut("clusters")
            .and_then(|c| c.as_sequence_mut())
            .context("a kubeconfig with clusters")?;
        for c in clusters {
            if let Some(cluster) = c.get_mut("cluster").and_then(|c| c.as_mapping_mut()) {
                cluster.insert("server".into(), format!("https://{relay}").into());
                cluster.insert("tls-server-name".into(), "localhost".into());
            }
        }
        let path = dir.join(format!("kubeconfig-{}", self.name));
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        Ok(path)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for r in &self.relays {
            r.abort();
        }
        let _ = ip(&["netns", "del", &self.name]);
        // Deleting the namespace deletes the peers and their links, but lazily: now, so a next run finds none.
        let n = self.mqtt_link.trim_start_matches("pm");
        for link in [format!("pa{n}"), self.mqtt_link.clone()] {
            let _ = ip(&["link", "del", &link]);
        }
    }
}
