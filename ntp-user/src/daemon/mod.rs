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

pub use serving::{
    AbortOnDrop, ClockSource, Companion, CompanionTask, LiveAdmission, Restart, ServeOptions,
};

/// Runs the daemon until SIGINT/SIGTERM: the managed mode when `opts.managed` is set,
/// otherwise the standalone one.
pub fn run(mut opts: ServeOptions) -> Result<()> {
    let rt = runtime()?;
    let result = rt.block_on(async {
        match opts.managed.take() {
            Some((vip, dhcp)) => managed::serve_managed(opts, vip, dhcp).await,
            None => standalone::serve(opts).await,
        }
    });
    // Dropping the runtime drops every task still on it: the helpers get their SIGTERM.
    drop(rt);
    result
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
