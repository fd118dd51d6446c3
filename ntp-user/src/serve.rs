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

use crate::hostclock::{host_clock_anchor, HostClockIdentity};
use crate::netns;
use crate::xdp::Responder;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native where it works (on a veth: when the peer can get a pass program), else generic.
    Auto,
    /// Driver mode; on a veth the peer gets a pass program so XDP_TX frames are delivered.
    Native,
    /// Generic (SKB) mode: works on every device, slower.
    Generic,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub netns: Option<String>,
    pub interface: String,
    pub addresses: Vec<IpAddr>,
    pub xdp_mode: XdpModeArg,
    pub peer_netns: Option<String>,
    pub identity: HostClockIdentity,
    pub params: ServerParams,
    pub publish_interval: Duration,
    pub log_packets: bool,
}

/// How the responder ended up attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub mode: &'static str,
    pub peer: Option<String>,
}

pub fn serve(opts: ServeOptions) -> Result<()> {
    if opts.addresses.is_empty() {
        bail!("serve needs at least one --address to answer for");
    }
    // Enter the namespace before any other thread exists, so every thread lives there.
    let home = netns::current_netns()?;
    if let Some(name) = &opts.netns {
        netns::enter(&netns::open_named_netns(name)?)?;
    }

    let mut responder = Responder::load()?;
    let mut params = opts.params;
    if opts.log_packets {
        params.flags |= PARAM_FLAG_LOG;
    }
    responder.set_params(params)?;
    for addr in &opts.addresses {
        responder.add_served_address(*addr)?;
    }
    responder.publish_anchor(host_clock_anchor(&opts.identity)?)?;
    let logger = if opts.log_packets {
        Some(responder.enable_kernel_log()?)
    } else {
        None
    };

    let attachment = attach(&mut responder, &opts, home)?;
    info!(
        netns = opts.netns.as_deref().unwrap_or("(current)"),
        interface = %opts.interface,
        addresses = ?opts.addresses,
        mode = attachment.mode,
        peer = attachment.peer.as_deref().unwrap_or("-"),
        stratum = opts.identity.stratum,
        program_id = responder.program_id()?,
        "responder attached; serving the host clock"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_loop(&mut responder, &opts, logger))?;
    drop(responder); // detaches both programs
    info!("responder detached");
    Ok(())
}

async fn run_loop(
    responder: &mut Responder,
    opts: &ServeOptions,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
) -> Result<()> {
    let mut ticker = tokio::time::interval(opts.publish_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut logger = match logger {
        // SAFETY: the logger owns the ring buffer's fd and moves into the AsyncFd, which
        // deregisters it before dropping the logger.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the aya-log buffer: {e}"))?,
        ),
        None => None,
    };
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let publication = responder.publish_anchor(host_clock_anchor(&opts.identity)?)?;
                if publication.held_back_ns > 1_000_000 {
                    warn!(
                        held_back_ms = publication.held_back_ns as f64 / 1e6,
                        "host clock went backwards; holding served time until it catches up"
                    );
                }
            }
            ready = async {
                match logger.as_mut() {
                    Some(l) => l.readable_mut().await.map(Some),
                    None => std::future::pending().await,
                }
            } => {
                if let Ok(Some(mut guard)) = ready {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
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
