//! The daemon: one runtime that runs the clock task, the userspace path, observability and,
//! in managed mode, DHCP and the plumbing's repair. [`run`] is its entry point; the standalone
//! mode (`ntp-xdp serve`, an existing interface) and the managed mode (a VIP host's own
//! namespace, pinned and hitless) differ only in how they set the responder up, then both run
//! [`serving`].
pub mod clock_task;
pub mod managed;
pub mod serving;
pub mod standalone;

use std::path::Path;

use anyhow::{Context as _, Result};

pub use crate::fleet::agent::Restart;
pub use serving::{AbortOnDrop, Beside};

use crate::config::Validated;

/// Why the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGINT or SIGTERM.
    Signal,
    /// A restart was requested (the fleet agent's): the caller starts it again.
    Restart,
}

/// Runs the daemon of `settings` until SIGINT/SIGTERM or a restart request: the managed mode
/// with a `[vip]`, otherwise the standalone one (an interface that exists).
pub fn run(settings: &Validated, beside: Beside) -> Result<Stopped> {
    let restart = beside.restart.clone();
    let rt = runtime()?;
    let result = rt.block_on(async {
        match &settings.vip {
            Some(vip) => {
                managed::serve_managed(settings, beside, vip, settings.dhcp.as_ref()).await
            }
            None => standalone::serve(settings, beside).await,
        }
    });
    // Dropping the runtime drops every task still on it: the helpers get their SIGTERM.
    drop(rt);
    result?;
    Ok(match restart.requested() {
        true => Stopped::Restart,
        false => Stopped::Signal,
    })
}

/// `ntp-xdp run`: the daemon of the config at `path` (the embedded default without one); in a
/// fleet, of the configuration last pushed to it (falling back to the one before when that
/// fails to start), with the fleet agent beside it. A restart the agent asks for starts this
/// process again in place.
pub fn run_from_config(path: Option<&Path>) -> Result<()> {
    use crate::fleet::local::LocalFiles;
    let local = crate::config::load_or_default(path)?;
    let Some(fleet) = local.fleet.clone() else {
        log_clock_source(&local);
        return run(&local, Beside::default()).map(drop);
    };
    let local_text = match path {
        Some(p) => std::fs::read_to_string(p)?,
        None => crate::config::EMBEDDED_DEFAULT.to_string(),
    };
    let local_fleet = local_text
        .parse::<toml::Table>()?
        .remove("fleet")
        .ok_or_else(|| anyhow::anyhow!("no [fleet] table"))?;
    let files = LocalFiles::new(&fleet.state_dir);
    let applied = files.applied_config();
    let start = || -> Result<Validated> {
        if !applied.exists() {
            return Ok(local.clone());
        }
        // The pushed configuration with this host's own [fleet] (the local file's wins).
        let mut t: toml::Table = std::fs::read_to_string(&applied)?.parse()?;
        t.insert("fleet".into(), local_fleet.clone());
        crate::config::parse(&toml::to_string(&t)?, &applied)
    };
    let result = start().and_then(|v| {
        log_clock_source(&v);
        let running = match applied.exists() {
            true => std::fs::read_to_string(&applied)?,
            false => local_text.clone(),
        };
        let agent = crate::fleet::agent::Agent {
            spec: fleet.clone(),
            local_fleet: local_fleet.clone(),
            check: crate::fleet::agent::Check::OnThisHost,
            cell: Default::default(),
            nts_keys: v
                .nts
                .as_ref()
                .map(|n| crate::fleet::agent::NtsKeySync::new(n.key_file.clone(), n.key_rotation)),
            running: std::sync::Mutex::new(running),
            // The daemon serves the agent's requests once it runs.
            live: None,
            problems: Default::default(),
            started_unix: crate::host::hostclock::unix_now_s(),
        };
        let beside = Beside {
            agent: Some(agent),
            ..Default::default()
        };
        run(&v, beside)
    });
    match result {
        Ok(Stopped::Restart) => Err(restart_self()),
        Ok(Stopped::Signal) => Ok(()),
        Err(e) => {
            let why = format!("{e:#}");
            if files.roll_back(&why)? {
                tracing::error!(error = %why, "the pushed configuration failed to start: back to the previous one");
                return Err(restart_self());
            }
            Err(e)
        }
    }
}

/// Replaces this process with a new run of the same command (hitless: the pinned responder
/// answers meanwhile). Returns only if that fails.
fn restart_self() -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "ntp-xdp".into());
    tracing::info!("starting again");
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    anyhow::anyhow!("restarting: {e}")
}

fn log_clock_source(v: &Validated) {
    if let crate::config::ClockSource::HostClock { identity, .. } = &v.clock_source() {
        tracing::info!(
            config = %v.source.display(),
            "no upstream configured: serving the host clock as local stratum {}",
            identity.stratum
        );
    }
}

/// The `[vip]` of `settings`, or an error saying why `what` needs it.
fn vip_of<'a>(settings: &'a Validated, what: &str) -> Result<&'a crate::vip::VipSpec> {
    settings.vip.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "config {}: no [vip] section, so {what}",
            settings.source.display()
        )
    })
}

/// `ntp-xdp down`: removes what the daemon of `settings` created (see [`managed::down`]);
/// one line per thing removed.
pub fn down(settings: &Validated) -> Result<Vec<String>> {
    let vip = vip_of(settings, "the daemon created nothing to remove")?;
    runtime()?.block_on(managed::down(vip))
}

/// `ntp-xdp on-stop`: what the systemd unit `unit`'s stop means for the daemon of
/// `settings` (see [`managed::on_systemd_stop`]), said in one line.
pub fn on_stop(settings: &Validated, unit: &str) -> Result<String> {
    let vip = vip_of(settings, "no pinned responder outlives the daemon")?;
    Ok(match managed::on_systemd_stop(&vip.netns, unit)? {
        managed::StopKind::Restart => format!(
            "{unit}: restarting; the pinned responder answers until the next daemon adopts it"
        ),
        managed::StopKind::Stop => {
            format!("{unit}: stopping; the daemon withdraws (no address served)")
        }
    })
}

/// The daemon's one runtime (everything, set-up included, runs on it, but the NTS key
/// exchange: TLS has a thread of its own). Current-thread: the clock task, the userspace path
/// and the control tasks are light; map walks and other blocking calls go to `spawn_blocking`.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}
