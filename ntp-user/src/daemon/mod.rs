//! The daemon: one runtime that runs the clock task, the userspace path, observability and,
//! in managed mode, DHCP and the plumbing's repair. [`run`] is its entry point; the standalone
//! mode (`ntp-xdp serve`, an existing interface) and the managed mode (a VIP host's own
//! namespace, pinned and hitless) differ only in how they set the responder up, then both run
//! [`serving`].
pub mod clock_task;
pub mod managed;
pub mod serving;
pub mod standalone;

use anyhow::{Context as _, Result};

pub use crate::fleet::agent::Restart;
pub use serving::{AbortOnDrop, Beside, Companion, CompanionTask, LiveAdmission};

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
    let rt = runtime()?;
    let result = rt.block_on(async {
        match &settings.vip {
            Some(vip) => {
                managed::serve_managed(settings, &beside, vip, settings.dhcp.as_ref()).await
            }
            None => standalone::serve(settings, &beside).await,
        }
    });
    // Dropping the runtime drops every task still on it: the helpers get their SIGTERM.
    drop(rt);
    result?;
    Ok(match beside.restart.requested() {
        true => Stopped::Restart,
        false => Stopped::Signal,
    })
}

/// `ntp-xdp down`: removes what the daemon of `spec` created (see [`managed::down`]).
pub fn down(spec: &crate::vip::VipSpec) -> Result<Vec<String>> {
    runtime()?.block_on(managed::down(spec))
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
