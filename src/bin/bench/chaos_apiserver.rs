//! The API server faults of `make chaos`: stopped for a while (SIGSTOP, then SIGCONT: every request hangs),
//! or restarted (SIGTERM — SIGKILL after 5 s — then started again with the same command line and environment, read from /proc:
//! connections drop, every watch ends and is re-established). The test bed's record of the process goes
//! stale after a restart; the restarted server is this run's child and is stopped with it.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::Client;

pub struct ApiServer {
    pid: u32,
    /// The server started by a restart (the test bed's own is gone then).
    restarted: Option<Child>,
    log: std::path::PathBuf,
}

impl ApiServer {
    pub fn new(pid: u32, log: std::path::PathBuf) -> Self {
        ApiServer {
            pid,
            restarted: None,
            log,
        }
    }

    /// Stops it for `secs`.
    pub async fn pause(&self, secs: u64) {
        // SAFETY: signalling the test bed's kube-apiserver process.
        unsafe { libc::kill(self.pid as i32, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_secs(secs)).await;
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
    }

    /// Restarts it; returns once it answers again.
    pub async fn restart(&mut self, client: &Client) -> anyhow::Result<()> {
        let split = |bytes: Vec<u8>| -> Vec<String> {
            bytes
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        let argv = split(std::fs::read(format!("/proc/{}/cmdline", self.pid))?);
        let env = split(std::fs::read(format!("/proc/{}/environ", self.pid))?);
        let (program, args) = argv
            .split_first()
            .context("an empty API server command line")?;
        // SAFETY: signalling the test bed's kube-apiserver process.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        // Its graceful shutdown waits for long requests (watches): killed after a few seconds, as a
        // kubelet would.
        let grace = Instant::now() + Duration::from_secs(5);
        let gone = grace + Duration::from_secs(10);
        // Gone once reaped (by the test bed) or a zombie.
        while std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            anyhow::ensure!(Instant::now() < gone, "the API server did not stop");
            if Instant::now() > grace {
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(mut old) = self.restarted.take() {
            let _ = old.wait();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(program)
            .args(args)
            .env_clear()
            .envs(env.iter().filter_map(|kv| kv.split_once('=')))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start the API server again")?;
        self.pid = child.id();
        self.restarted = Some(child);
        let up = Instant::now() + Duration::from_secs(90);
        while client.apiserver_version().await.is_err() {
            anyhow::ensure!(
                Instant::now() < up,
                "the restarted API server does not answer"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.restarted.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
