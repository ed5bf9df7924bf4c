//! Child processes of the test bed: spawned so that they die with the test run, watched so that a crash
//! is reported with the last lines of its log.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Whether a process should outlive the program that started it (`make cluster-up`) or die with it (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when the starting program exits, even by SIGKILL.
    Attached,
    /// Its own session; stopped later by PID.
    Detached,
}

/// A running child process whose output goes to a log file.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log_path: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    expected_exit: Arc<AtomicBool>,
}

type SpawnRequest = (Command, Lifetime, mpsc::Sender<std::io::Result<Child>>);

/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so attached children are forked
/// from one thread that lives as long as the process.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                for (mut cmd, lifetime, reply) in rx {
                    unsafe {
                        cmd.pre_exec(move || {
                            if lifetime == Lifetime::Attached {
                                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            } else {
                                libc::setsid();
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the testbed spawner thread");
        register_exit_cleanup();
        Mutex::new(tx)
    })
}

/// PIDs to kill when the program exits normally (the Rust test harness ends with `exit`, which runs atexit).
fn attached_pids() -> &'static Mutex<HashMap<u32, String>> {
    static PIDS: OnceLock<Mutex<HashMap<u32, String>>> = OnceLock::new();
    PIDS.get_or_init(|| Mutex::new(HashMap::new()))
}

extern "C" fn kill_attached_at_exit() {
    if let Ok(pids) = attached_pids().lock() {
        for pid in pids.keys() {
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
    }
}

fn register_exit_cleanup() {
    unsafe {
        libc::atexit(kill_attached_at_exit);
    }
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log_path`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log_path: &Path,
        lifetime: Lifetime,
    ) -> Result<Proc> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log {}", log_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| anyhow!("spawner lock poisoned"))?
            .send((cmd, lifetime, reply_tx))
            .map_err(|_| anyhow!("spawner thread is gone"))?;
        let child = reply_rx
            .recv()
            .map_err(|_| anyhow!("spawner thread is gone"))?
            .with_context(|| format!("start {name}"))?;
        let pid = child.id();
        if lifetime == Lifetime::Attached {
            attached_pids()
                .lock()
                .map_err(|_| anyhow!("pid registry poisoned"))?
                .insert(pid, name.to_string());
        }
        let proc = Proc {
            name: name.to_string(),
            pid,
            log_path: log_path.to_path_buf(),
            child: Arc::new(Mutex::new(Some(child))),
            expected_exit: Arc::new(AtomicBool::new(false)),
        };
        if lifetime == Lifetime::Attached {
            proc.watch();
        }
        Ok(proc)
    }

    /// Prints the log tail as soon as the process dies unexpectedly, so a test that then times out on
    /// something else still shows the real cause.
    fn watch(&self) {
        let child = Arc::clone(&self.child);
        let expected = Arc::clone(&self.expected_exit);
        let name = self.name.clone();
        let log_path = self.log_path.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(300));
                if expected.load(Ordering::SeqCst) {
                    return;
                }
                let status = match child.lock() {
                    Ok(mut guard) => match guard.as_mut() {
                        Some(c) => c.try_wait().ok().flatten(),
                        None => return,
                    },
                    Err(_) => return,
                };
                if let Some(status) = status {
                    if !expected.load(Ordering::SeqCst) {
                        eprintln!(
                            "testbed: {name} exited unexpectedly ({status}); last log lines:\n{}",
                            tail_file(&log_path, 30)
                        );
                    }
                    return;
                }
            }
        });
    }

    /// `Ok` while the process runs; otherwise an error carrying its exit status and last log lines.
    pub fn check(&self) -> Result<()> {
        let mut guard = self
            .child
            .lock()
            .map_err(|_| anyhow!("process lock poisoned"))?;
        let Some(child) = guard.as_mut() else {
            bail!("{} was stopped", self.name);
        };
        match child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} (pid {}) exited with {status}; last log lines:\n{}",
                self.name,
                self.pid,
                self.tail(30)
            ),
        }
    }

    pub fn tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL.
    pub fn stop(&self, grace: Duration) {
        self.expected_exit.store(true, Ordering::SeqCst);
        if let Ok(mut guard) = self.child.lock()
            && let Some(mut child) = guard.take()
        {
            terminate(&mut child, grace);
        }
        if let Ok(mut pids) = attached_pids().lock() {
            pids.remove(&self.pid);
        }
    }

    /// Hands the process over to whoever stops it by PID later (`make cluster-down`).
    pub fn release(&self) -> u32 {
        self.expected_exit.store(true, Ordering::SeqCst);
        if let Ok(mut guard) = self.child.lock() {
            guard.take();
        }
        self.pid
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

fn terminate(child: &mut Child, grace: Duration) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a process known only by PID: SIGTERM, then SIGKILL after `grace`.
pub fn stop_pid(pid: u32, grace: Duration) {
    let pid = pid as i32;
    unsafe {
        if libc::kill(pid, libc::SIGTERM) != 0 {
            return;
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        // Signal 0 only probes; a detached child of an exited parent is reaped by init.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The last `lines` lines of a file (at most its last 64 KiB are read).
pub fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port that was free a moment ago. Callers retry on another port when the bind then fails.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether the log of a process that failed to start says its port was taken.
pub fn port_conflict(proc: &Proc) -> bool {
    let tail = proc.tail(40).to_lowercase();
    tail.contains("address already in use") || tail.contains("bind: address")
}

/// Polls `probe` every 200 ms until it succeeds, the process dies, or `timeout` passes.
pub fn wait_ready(
    proc: &Proc,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<(), anyhow::Error> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check()?;
        if probe() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready after {:?}; last log lines:\n{}",
                proc.name,
                timeout,
                proc.tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A random hex string from the kernel's RNG.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
