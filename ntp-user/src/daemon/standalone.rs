//! `ntp-user serve`: attach the responder to one interface and keep its anchor fresh.

use std::fs::File;

use anyhow::{bail, Context as _, Result};
use aya::programs::XdpMode;
use ntp_common::anchor::PARAM_FLAG_LOG;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::daemon::{serve_responder, AbortOnDrop, ClockSource, ServeOptions};
use crate::host::netlink::Netlink;
use crate::host::netns;
use crate::responder::{Responder, XdpModePref};

/// How the responder ended up attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub mode: &'static str,
    pub peer: Option<String>,
}

pub async fn serve(mut opts: ServeOptions) -> Result<()> {
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
    if opts.log_packets {
        opts.params.flags |= PARAM_FLAG_LOG;
    }
    responder.set_params(opts.params)?;
    for addr in &opts.addresses {
        responder.add_served_address(*addr)?;
    }
    let logger = if opts.log_packets {
        Some(responder.enable_kernel_log()?)
    } else {
        None
    };
    let attachment = if opts.xdp_mode == XdpModePref::Off {
        Attachment {
            mode: "off",
            peer: None,
        }
    } else {
        match &service_ns {
            Some(ns) => attach(&mut responder, &opts, Some(ns), home).await?,
            None => attach(&mut responder, &opts, None, home).await?,
        }
    };
    let place = crate::responder::userspace::SocketPlace {
        netns: opts.netns.clone(),
        addresses: opts.addresses.clone(),
    };
    // An attached interface is not ours to recreate: the sockets stay where they are bound.
    let (_never, plumbing) = tokio::sync::watch::channel(0u64);
    let user_sockets = crate::daemon::UserSockets {
        sockets: crate::responder::userspace::bind_sockets(service_ns.as_ref(), &opts.addresses)?,
        place,
        plumbing,
    };
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

    let log_pump: Vec<AbortOnDrop> = logger
        .map(spawn_log_pump)
        .transpose()?
        .into_iter()
        .map(AbortOnDrop)
        .collect();
    let user_counters = serve_responder(
        &opts,
        &mut responder,
        user_sockets,
        None,
        log_pump,
        Default::default(),
    )
    .await?;
    drop(responder); // detaches both programs
    info!(
        userspace_answered = user_counters
            .answered
            .load(std::sync::atomic::Ordering::Relaxed),
        "responder detached"
    );
    Ok(())
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

/// Attaches according to the requested mode; on a veth in native mode, the peer gets the pass
/// program first so that no XDP_TX reply is ever lost to a peer without one.
async fn attach(
    responder: &mut Responder,
    opts: &ServeOptions,
    service_ns: Option<&File>,
    home: File,
) -> Result<Attachment> {
    // Interface indexes are the service namespace's: attach from inside it.
    let inside = |f: &mut dyn FnMut() -> Result<()>| match service_ns {
        Some(ns) => netns::within(ns, f),
        None => f(),
    };
    let nl = match service_ns {
        Some(ns) => Netlink::open_in(ns)?,
        None => Netlink::open()?,
    };
    let local = nl.link(&opts.interface).await?.with_context(|| {
        format!(
            "interface {:?} not found in network namespace {}",
            opts.interface,
            opts.netns.as_deref().unwrap_or("(current)")
        )
    })?;

    // Only frames sent to this interface's own MAC are answered.
    match local.mac {
        Some(mac) => responder.set_own_macs(&[(mac, local.index)])?,
        None => {
            warn!(interface = %opts.interface, "the interface has no MAC: nothing will be answered")
        }
    }

    let want_native = opts.xdp_mode != XdpModePref::Generic;
    if want_native && local.is_veth() {
        let candidates = match &opts.peer_netns {
            Some(name) => vec![(name.clone(), netns::open_named_netns(name)?)],
            None => {
                let mut c = vec![("(initial)".to_string(), home)];
                c.extend(netns::named_namespaces());
                c
            }
        };
        match netns::find_veth_peer(&nl, &local, candidates).await? {
            Some(peer) => {
                // A peer that carries an XDP program already (a guest's own, a benchmark's
                // counter) makes XDP_TX deliver as well as ours would: keep it.
                let peer_prog = Netlink::open_in(&peer.netns)?
                    .link_by_index(peer.index)
                    .await?
                    .and_then(|l| l.xdp_prog_id);
                match peer_prog {
                    Some(id) => info!(
                        peer_program_id = id,
                        "the veth peer carries an XDP program already; native XDP_TX delivers through it"
                    ),
                    None => netns::within(&peer.netns, || {
                        responder
                            .attach_peer_pass(peer.index)
                            .context("attaching the pass program to the veth peer")
                    })?,
                }
                inside(&mut || {
                    responder
                        .attach_responder(local.index, XdpMode::Driver)
                        .context("attaching the responder in native mode")
                })?;
                return Ok(Attachment {
                    mode: "native",
                    peer: Some(format!("ifindex {} in {}", peer.index, peer.netns_label)),
                });
            }
            None if opts.xdp_mode == XdpModePref::Native => bail!(
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
        let mut native = Ok(());
        inside(&mut || {
            native = responder.attach_responder(local.index, XdpMode::Driver);
            Ok(())
        })?;
        match native {
            Ok(()) => {
                return Ok(Attachment {
                    mode: "native",
                    peer: None,
                })
            }
            Err(e) if opts.xdp_mode == XdpModePref::Native => {
                return Err(e).context("attaching the responder in native mode")
            }
            Err(e) => warn!(error = %e, "native XDP not available; falling back to generic"),
        }
    }
    inside(&mut || {
        responder
            .attach_responder(local.index, XdpMode::Skb)
            .context("attaching the responder in generic mode")
    })?;
    Ok(Attachment {
        mode: "generic",
        peer: None,
    })
}
