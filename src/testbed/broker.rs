//! A real MQTT broker for tests: Debian's mosquitto on a free loopback port with a password file.
use std::collections::BTreeMap;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::process::{Lifetime, Proc, free_port, port_conflict, random_hex, wait_ready};

/// A running mosquitto with authentication on.
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    /// The user every test component may use; more can be added with [`Broker::add_user`].
    pub username: String,
    pub password: String,
    users: BTreeMap<String, String>,
    lifetime: Lifetime,
    proc: Option<Proc>,
    /// A second, TLS listener (same users), when started with [`Broker::start_tls`].
    pub tls: Option<TlsListener>,
    /// Sessions and queued messages survive a restart (saved in `dir` on shutdown), as a production
    /// broker's do; off by default (tests restart brokers to lose state on purpose).
    persistent: bool,
}

/// The TLS listener: its port and the CA that signed its certificate.
pub struct TlsListener {
    pub port: u16,
    pub ca_cert: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

const PORT_ATTEMPTS: usize = 5;

impl Broker {
    /// Like [`Broker::start`], plus a TLS listener (`ssl://127.0.0.1:PORT`) with its own CA.
    pub fn start_tls(dir: &Path, lifetime: Lifetime) -> Result<Broker> {
        let pki = super::cluster::Pki::create(&dir.join("pki"))?;
        Broker::start_with(dir, lifetime, Some(pki))
    }

    pub fn start(dir: &Path, lifetime: Lifetime) -> Result<Broker> {
        Broker::start_with(dir, lifetime, None)
    }

    fn start_with(
        dir: &Path,
        lifetime: Lifetime,
        pki: Option<super::cluster::Pki>,
    ) -> Result<Broker> {
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let username = "propeller".to_string();
        let password = random_hex(16)?;
        let mut broker = Broker {
            dir,
            port: 0,
            username: username.clone(),
            password: password.clone(),
            users: BTreeMap::from([(username, password)]),
            lifetime,
            proc: None,
            tls: None,
            persistent: false,
        };
        broker.write_password_file()?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            broker.port = free_port()?;
            if let Some(pki) = &pki {
                broker.tls = Some(TlsListener {
                    port: free_port()?,
                    ca_cert: pki.ca_cert.clone(),
                    cert: pki.server_cert.clone(),
                    key: pki.server_key.clone(),
                });
            }
            match broker.launch() {
                Ok(()) => return Ok(broker),
                Err(e) => {
                    let conflict = broker.proc.as_ref().is_some_and(port_conflict);
                    if let Some(p) = broker.proc.take() {
                        p.stop(Duration::from_secs(1));
                    }
                    if !conflict {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no free port for mosquitto")))
    }

    /// Keeps sessions and queued messages across restarts from now on (restarts the broker to apply).
    pub fn make_persistent(&mut self) -> Result<()> {
        self.persistent = true;
        self.restart()
    }

    /// `tcp://127.0.0.1:PORT`, the form the operator and proplets take.
    pub fn address(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Adds (or changes) a user; mosquitto rereads its password file on SIGHUP.
    pub fn add_user(&mut self, username: &str, password: &str) -> Result<()> {
        self.users
            .insert(username.to_string(), password.to_string());
        self.write_password_file()?;
        if let Some(proc) = &self.proc {
            unsafe {
                libc::kill(proc.pid as i32, libc::SIGHUP);
            }
            // The reload is asynchronous; give it a moment before the new user connects.
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }

    /// Adds many users with one reload.
    pub fn add_users(&mut self, users: &[(String, String)]) -> Result<()> {
        for (u, p) in users {
            self.users.insert(u.clone(), p.clone());
        }
        self.write_password_file()?;
        if let Some(proc) = &self.proc {
            unsafe {
                libc::kill(proc.pid as i32, libc::SIGHUP);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }

    /// Stops the broker; clients see their connection drop.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(Duration::from_secs(3));
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    pub fn check(&self) -> Result<()> {
        match &self.proc {
            Some(p) => p.check(),
            None => bail!("mosquitto is stopped"),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid)
    }

    pub fn release(mut self) -> Option<u32> {
        self.proc.take().map(|p| p.release())
    }

    fn write_password_file(&self) -> Result<()> {
        let path = self.dir.join("passwd");
        let _ = fs::remove_file(&path);
        for (user, pass) in &self.users {
            let mut cmd = Command::new("mosquitto_passwd");
            if !path.exists() {
                cmd.arg("-c");
            }
            let out = cmd
                .arg("-b")
                .arg(&path)
                .args([user, pass])
                .output()
                .context("run mosquitto_passwd (is mosquitto installed?)")?;
            if !out.status.success() {
                bail!(
                    "mosquitto_passwd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    fn launch(&mut self) -> Result<()> {
        let conf = self.dir.join("mosquitto.conf");
        // `user root` keeps mosquitto from dropping privileges when the tests run as root, so it can
        // read the password file in our private directory.
        let user_line = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        fs::write(
            &conf,
            format!(
                "{user_line}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n\
                 {persistence}\nmax_inflight_messages 100\n\
                 max_queued_messages 100000\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                 log_type notice\nlog_type information\nconnection_messages true\n",
                port = self.port,
                pw = self.dir.join("passwd").display(),
                persistence = if self.persistent {
                    format!(
                        "persistence true\npersistence_location {}/",
                        self.dir.display()
                    )
                } else {
                    "persistence false".to_string()
                },
            ),
        )?;
        if let Some(tls) = &self.tls {
            let mut f = fs::OpenOptions::new().append(true).open(&conf)?;
            use std::io::Write;
            writeln!(
                f,
                "listener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}",
                tls.port,
                tls.ca_cert.display(),
                tls.cert.display(),
                tls.key.display()
            )?;
        }
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(
            "mosquitto",
            cmd,
            &self.dir.join("mosquitto.log"),
            self.lifetime,
        )?;
        let port = self.port;
        let ready = wait_ready(&proc, Duration::from_secs(15), || {
            TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(500),
            )
            .is_ok()
        });
        self.proc = Some(proc);
        ready
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
