//! `ntp-user serve`: attach the responder to one interface and keep its anchor fresh.

use std::fs::File;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use aya::programs::XdpMode;
use ntp_common::anchor::PARAM_FLAG_LOG;
use ntp_common::ServerParams;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::clock::system::SystemConfig;
use crate::host::hostclock::{host_clock_anchor, HostClockIdentity};
use crate::host::netns;
use crate::responder::Responder;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native where it works (on a veth: when the peer can get a pass program), else generic.
    Auto,
    /// Driver mode; on a veth the peer gets a pass program so XDP_TX frames are delivered.
    Native,
    /// Generic (SKB) mode: works on every device, slower.
    Generic,
    /// No XDP: the daemon's userspace path answers everything.
    Off,
}

/// Where served time comes from.
#[derive(Debug, Clone)]
pub enum ClockSource {
    /// The host clock as it is (already disciplined by chrony/PTP, or no upstream at all:
    /// a local stratum like chrony's `local stratum 10`).
    HostClock {
        identity: HostClockIdentity,
        publish_interval: Duration,
    },
    /// The daemon's own clock, disciplined against these upstreams.
    Upstreams {
        system: SystemConfig,
        upstreams: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub netns: Option<String>,
    pub interface: String,
    pub addresses: Vec<IpAddr>,
    pub xdp_mode: XdpModeArg,
    pub peer_netns: Option<String>,
    pub params: ServerParams,
    pub log_packets: bool,
    pub clock: ClockSource,
    /// The plumbing the daemon creates and keeps (None: attach to an existing interface and
    /// detach on exit).
    pub managed: Option<(
        crate::host::vip::VipSpec,
        Option<crate::host::dhcp::DhcpSpec>,
    )>,
    /// Access list, rate limit, guest clock records.
    pub admission: crate::responder::admission::AdmissionSpec,
    /// Metrics, control socket, alarms.
    pub observe: crate::observe::ObserveSpec,
}

/// How the responder ended up attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub mode: &'static str,
    pub peer: Option<String>,
}

pub fn serve(mut opts: ServeOptions) -> Result<()> {
    if let Some((vip, dhcp)) = opts.managed.take() {
        return crate::daemon::managed::serve_managed(opts, vip, dhcp);
    }
    if opts.addresses.is_empty() {
        bail!("serve needs at least one --address to answer for");
    }
    // The daemon stays in its own namespace (upstream sockets live there) and enters the
    // service namespace only to attach.
    let home = netns::current_netns()?;
    let service_ns = match &opts.netns {
        Some(name) => Some(netns::open_named_netns(name)?),
        None => None,
    };

    let mut responder = Responder::load_sized(opts.admission.tables)?;
    opts.admission.apply(&mut responder)?;
    let mut params = opts.params;
    if opts.log_packets {
        params.flags |= PARAM_FLAG_LOG;
    }
    responder.set_params(params)?;
    for addr in &opts.addresses {
        responder.add_served_address(*addr)?;
    }
    let logger = if opts.log_packets {
        Some(responder.enable_kernel_log()?)
    } else {
        None
    };
    let attachment = if opts.xdp_mode == XdpModeArg::Off {
        Attachment {
            mode: "off",
            peer: None,
        }
    } else {
        match &service_ns {
            Some(ns) => netns::within(ns, || attach(&mut responder, &opts, home))?,
            None => attach(&mut responder, &opts, home)?,
        }
    };
    let user_sockets =
        crate::responder::userspace::bind_sockets(service_ns.as_ref(), &opts.addresses)?;
    let source = match &opts.clock {
        ClockSource::HostClock { identity, .. } => {
            format!("host clock as local stratum {}", identity.stratum)
        }
        ClockSource::Upstreams { upstreams, .. } => {
            format!("own clock disciplined against {}", upstreams.join(", "))
        }
    };
    info!(
        netns = opts.netns.as_deref().unwrap_or("(current)"),
        interface = %opts.interface,
        addresses = ?opts.addresses,
        mode = attachment.mode,
        peer = attachment.peer.as_deref().unwrap_or("-"),
        program_id = responder.program_id()?,
        "responder attached; serving the {source}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (observatory, clock_status, user_counters) =
        crate::observe::Observatory::for_responder(&opts.observe, &responder)?;
    let result = rt.block_on(async {
        let shutdown = shutdown_signal()?;
        let _observe = crate::observe::start(observatory).await?;
        let _log_pump = logger.map(spawn_log_pump).transpose()?;
        let _userspace = AbortOnDrop(tokio::spawn(userspace_path(
            user_sockets,
            responder.subscribe(),
            params,
            user_counters.clone(),
        )));
        run_clock(&opts.clock, &mut responder, None, clock_status, shutdown).await
    });
    if let Some(socket) = &opts.observe.control_socket {
        let _ = std::fs::remove_file(socket);
    }
    result?;
    drop(responder); // detaches both programs
    info!(
        userspace_answered = user_counters
            .answered
            .load(std::sync::atomic::Ordering::Relaxed),
        "responder detached"
    );
    Ok(())
}

/// Aborts a task when dropped (when the runtime's main future ends).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the userspace path; logs if it ever stops.
pub(crate) async fn userspace_path(
    sockets: Vec<std::net::UdpSocket>,
    anchors: tokio::sync::watch::Receiver<ntp_common::TimeAnchor>,
    params: ServerParams,
    counters: std::sync::Arc<crate::responder::userspace::UserspaceCounters>,
) {
    if let Err(e) = crate::responder::userspace::serve(sockets, anchors, params, counters).await {
        tracing::error!(error = %format!("{e:#}"), "the userspace path stopped");
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub(crate) fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = sigint.recv() => info!("SIGINT: stopping"),
        }
    })
}

/// Forwards the program's aya-log records while the runtime runs.
fn spawn_log_pump(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns the ring buffer's fd and moves into the AsyncFd, which
    // deregisters it before dropping the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the aya-log buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Runs the clock `source` and publishes it until `shutdown`: the host clock, or the daemon's
/// own disciplined one (continuing across restarts with `continuity`).
pub(crate) async fn run_clock(
    source: &ClockSource,
    responder: &mut Responder,
    continuity: Option<crate::daemon::clock_task::Continuity>,
    status: crate::observe::status::ClockStatusCell,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    match source {
        ClockSource::HostClock {
            identity,
            publish_interval,
        } => serve_host_clock(responder, identity, *publish_interval, status, shutdown).await,
        ClockSource::Upstreams { system, upstreams } => {
            crate::daemon::clock_task::run_disciplined(
                responder,
                system.clone(),
                upstreams,
                continuity,
                status,
                shutdown,
            )
            .await
        }
    }
}

pub(crate) async fn serve_host_clock(
    responder: &mut Responder,
    identity: &HostClockIdentity,
    publish_interval: Duration,
    status: crate::observe::status::ClockStatusCell,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut ticker = tokio::time::interval(publish_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut kernel_unsynced = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let anchor = host_clock_anchor(identity)?;
                let unsynced = anchor.leap == ntp_common::wire::LEAP_UNSYNCHRONIZED;
                if unsynced != kernel_unsynced {
                    kernel_unsynced = unsynced;
                    if unsynced {
                        warn!("the kernel says the host clock is unsynchronized: serving LI=3");
                    } else {
                        info!("the kernel says the host clock is synchronized: serving it");
                    }
                }
                let publication = responder.publish_anchor(anchor)?;
                *status.lock().unwrap_or_else(|e| e.into_inner()) = crate::observe::status::ClockStatus {
                    reference: if identity.follow_kernel_sync {
                        "host-clock (kernel clock disciplined by another daemon)".into()
                    } else {
                        format!("host clock as local stratum {}", identity.stratum)
                    },
                    synchronized: !unsynced,
                    root_dispersion_s: anchor.root_dispersion_ns as f64 * 1e-9,
                    stratum: identity.stratum,
                    refid: crate::observe::status::refid_text(identity.refid, identity.stratum),
                    last_sync_mono_ns: (!unsynced).then_some(anchor.mono_ns),
                    ..Default::default()
                };
                if publication.held_back_ns > 1_000_000 {
                    warn!(
                        held_back_ms = publication.held_back_ns as f64 / 1e6,
                        "host clock went backwards; holding served time until it catches up"
                    );
                }
            }
            _ = &mut shutdown => break,
        }
    }
    Ok(())
}

/// Attaches according to the requested mode; on a veth in native mode, the peer gets the pass
/// program first so that no XDP_TX reply is ever lost to a peer without one.
fn attach(responder: &mut Responder, opts: &ServeOptions, home: File) -> Result<Attachment> {
    let local = netns::link_facts(Some(&opts.interface), None)?.with_context(|| {
        format!(
            "interface {:?} not found in network namespace {}",
            opts.interface,
            opts.netns.as_deref().unwrap_or("(current)")
        )
    })?;

    let want_native = opts.xdp_mode != XdpModeArg::Generic;
    if want_native && local.is_veth() {
        let candidates = match &opts.peer_netns {
            Some(name) => vec![(name.clone(), netns::open_named_netns(name)?)],
            None => {
                let mut c = vec![("(initial)".to_string(), home)];
                c.extend(netns::named_namespaces());
                c
            }
        };
        match netns::find_veth_peer(&local, candidates)? {
            Some(peer) => {
                netns::within(&peer.netns, || {
                    responder
                        .attach_peer_pass(peer.index)
                        .context("attaching the pass program to the veth peer")
                })?;
                responder
                    .attach_responder(local.index, XdpMode::Driver)
                    .context("attaching the responder in native mode")?;
                return Ok(Attachment {
                    mode: "native",
                    peer: Some(format!("ifindex {} in {}", peer.index, peer.netns_label)),
                });
            }
            None if opts.xdp_mode == XdpModeArg::Native => bail!(
                "native mode on veth {:?} needs its peer to carry an XDP program, but the peer \
                 was not found in any named namespace; pass --peer-netns NAME or use --xdp-mode generic",
                opts.interface
            ),
            None => warn!(
                interface = %opts.interface,
                "veth peer not found; falling back to generic XDP"
            ),
        }
    } else if want_native {
        match responder.attach_responder(local.index, XdpMode::Driver) {
            Ok(()) => {
                return Ok(Attachment {
                    mode: "native",
                    peer: None,
                })
            }
            Err(e) if opts.xdp_mode == XdpModeArg::Native => {
                return Err(e).context("attaching the responder in native mode")
            }
            Err(e) => warn!(error = %e, "native XDP not available; falling back to generic"),
        }
    }
    responder
        .attach_responder(local.index, XdpMode::Skb)
        .context("attaching the responder in generic mode")?;
    Ok(Attachment {
        mode: "generic",
        peer: None,
    })
}
