//! `testbed up` starts one local cluster and mosquitto in the background and writes their connection
//! details to `<dir>/env`; `testbed down` stops them. Used by `make cluster-up` / `make cluster-down`.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use propeller_operator::testbed::{Binaries, Broker, ControlPlane, Lifetime, process};

#[derive(Parser)]
#[command(about = "Local Kubernetes control plane and MQTT broker for development and tests")]
struct Cli {
    /// Directory for state, logs, the env file and the PID file.
    #[arg(long, default_value = ".testbed", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster and a broker in the background (no-op when already running).
    Up,
    /// Stop everything `up` started.
    Down,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up => up(&cli.dir),
        Cmd::Down => down(&cli.dir),
    };
    if let Err(e) = result {
        eprintln!("testbed: {e:#}");
        std::process::exit(1);
    }
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("pids")
}

fn running_pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(pid_file(dir))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn up(dir: &Path) -> Result<()> {
    let pids = running_pids(dir);
    if !pids.is_empty() && pids.iter().all(|p| alive(*p)) {
        println!(
            "testbed: already running; connection details in {}",
            dir.join("env").display()
        );
        return Ok(());
    }
    if !pids.is_empty() {
        down(dir)?;
    }
    fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let bins = Binaries::provision()?;
    let cp = ControlPlane::start(
        &bins,
        "propeller-dev",
        &dir.join("cluster"),
        Lifetime::Detached,
    )
    .context("start the control plane")?;
    let broker =
        Broker::start(&dir.join("mosquitto"), Lifetime::Detached).context("start mosquitto")?;
    let env = format!(
        "KUBECONFIG={}\nMQTT_ADDRESS={}\nMQTT_USERNAME={}\nMQTT_PASSWORD={}\nTESTBED_DIR={}\n",
        cp.kubeconfig.display(),
        broker.address(),
        broker.username,
        broker.password,
        dir.display()
    );
    let env_path = dir.join("env");
    fs::write(&env_path, env)?;
    restrict(&env_path)?;
    let mut pids = cp.release();
    if let Some(pid) = broker.release() {
        // Scripts reload the broker's password file with SIGHUP after adding users.
        fs::write(dir.join("mosquitto.pid"), format!("{pid}\n"))?;
        pids.push(pid);
    }
    fs::write(
        pid_file(&dir),
        pids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )?;
    println!("testbed: up; connection details in {}", env_path.display());
    Ok(())
}

/// The env file holds a password and a token: readable by its owner only.
fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    let pids = running_pids(dir);
    if pids.is_empty() {
        println!("testbed: nothing running in {}", dir.display());
        return Ok(());
    }
    for pid in &pids {
        process::stop_pid(*pid, Duration::from_secs(5));
    }
    if let Some(p) = pids.iter().find(|p| alive(**p)) {
        bail!("process {p} is still running");
    }
    let _ = fs::remove_file(pid_file(dir));
    // Stale certificates and etcd data would only confuse the next `up`.
    let _ = fs::remove_dir_all(dir.join("cluster"));
    let _ = fs::remove_dir_all(dir.join("mosquitto"));
    let _ = fs::remove_file(dir.join("env"));
    println!("testbed: down");
    Ok(())
}
