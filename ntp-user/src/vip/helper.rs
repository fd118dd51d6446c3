//! The helper daemons the daemon runs inside its service namespace (dnsmasq, keepalived,
//! radvd), supervised one way: started with its namespace entered, its output logged under its
//! name, restarted when it exits (backing off to 30 s), restarted in the new namespace when a
//! repair recreated the plumbing, run only while `active` (a standby VIP host runs no DHCP or
//! RA), and stopped with SIGTERM when the supervisor ends (keepalived then releases its
//! addresses, radvd sends its final advertisement).

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::host::files::state_dir;

/// One helper daemon.
pub trait Helper: Send + Sync + 'static {
    /// Its program name (the log target, and what a stale pid must be).
    fn name(&self) -> &'static str;
    /// The service namespace it runs in.
    fn netns(&self) -> &str;
    /// Its command line; writes its configuration file if it has one.
    fn command(&self) -> Result<(PathBuf, Vec<String>)>;
    /// What to do before each start (a new keepalived releases the addresses a killed one
    /// left behind).
    fn before_start(
        &self,
        _ns: &std::fs::File,
    ) -> impl std::future::Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Where Debian installs `name` (/usr/sbin, else /usr/bin; else the bare name, for PATH).
pub fn program_path(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Writes a helper's configuration file (rewritten at every start): only a [`ConfFile`], whose
/// every value was checked by [`crate::vip::conffile`].
pub fn write_config(path: &Path, file: &crate::vip::conffile::ConfFile) -> Result<()> {
    std::fs::write(path, file.as_str()).with_context(|| format!("writing {}", path.display()))
}

/// Supervises `helper` until dropped; see the module's description.
pub async fn supervise<H: Helper>(
    helper: H,
    mut plumbing: watch::Receiver<u64>,
    mut active: watch::Receiver<bool>,
) {
    let name = helper.name();
    let mut backoff = Duration::from_secs(1);
    loop {
        while !*active.borrow_and_update() {
            if active.changed().await.is_err() {
                return;
            }
        }
        let started = tokio::time::Instant::now();
        tokio::select! {
            outcome = run_once(&helper) => match outcome {
                Ok(status) => warn!(%status, "{name} exited; restarting it"),
                Err(e) => warn!(error = %format!("{e:#}"), "{name} could not run; retrying"),
            },
            Ok(()) = plumbing.changed() => {
                info!(netns = %helper.netns(), "plumbing recreated: restarting {name} in it");
                backoff = Duration::from_secs(1);
                continue;
            }
            Ok(()) = active.changed() => {
                info!(netns = %helper.netns(), "not the VRRP master any more: {name} stopped");
                continue;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Sends SIGTERM to a helper when dropped (its supervisor's run ended).
struct TermOnDrop(Option<u32>);

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

async fn run_once<H: Helper>(helper: &H) -> Result<std::process::ExitStatus> {
    let name = helper.name();
    std::fs::create_dir_all(state_dir(helper.netns())).context("creating the state directory")?;
    let ns = crate::host::netns::open_named_netns(helper.netns())?;
    helper.before_start(&ns).await?;
    let (program, args) = helper.command()?;
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({}; is it installed?)", program.display()))?;
    let _stop = TermOnDrop(child.id());
    info!(pid = child.id(), netns = %helper.netns(), "{name} running");
    let outputs: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for out in outputs.into_iter().flatten() {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                info!("{name}: {line}");
            }
        });
    }
    Ok(child.wait().await?)
}

/// Whether `pid` has exited: gone, or a zombie (a helper this daemon started is its child,
/// reaped later).
fn exited(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // The state follows the command name's closing parenthesis.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    })
}

/// Stops a helper (dnsmasq, keepalived) an earlier daemon left running: the pid in
/// `pid_file`, only if that process is `program` and names that pid file on its command line
/// (a recycled pid is never signalled). Returns the pid stopped.
pub fn stop_by_pid_file(pid_file: &Path, program: &str) -> Result<Option<i32>> {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return Ok(None);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(None);
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    let argv0 = cmdline.split('\0').next().unwrap_or("");
    if !argv0.ends_with(program) || !cmdline.contains(&*pid_file.to_string_lossy()) {
        return Ok(None);
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("stopping a stale {program}"))?;
    // keepalived releases its addresses before it exits: on a loaded machine that can take a
    // while, and an exit before it leaves them behind.
    for _ in 0..250 {
        if exited(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(pid_file);
    Ok(Some(pid.as_raw()))
}
