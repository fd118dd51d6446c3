//! `ntp-xdp serve`: attach the responder to one interface and keep its anchor fresh.

use std::fs::File;

use anyhow::{anyhow, Context as _, Result};
use ntp_common::anchor::PARAM_FLAG_LOG;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::config::{ClockSource, Validated};
use crate::daemon::serving::{serve_responder, AbortOnDrop, Beside, UserSockets};
use crate::host::netlink::Netlink;
use crate::host::netns;
use crate::responder::attach::{self, Attachment, LinkKind, Step};
use crate::responder::{Attached, Responder, XdpModePref};

pub async fn serve(settings: &Validated, beside: Beside) -> Result<()> {
    let addresses = &settings.service.addresses;
    // The daemon stays in its own namespace (upstream sockets live there) and enters the
    // service namespace only to attach.
    let home = netns::current_netns()?;
    let service_ns = match settings.netns() {
        Some(name) => Some(netns::open_named_netns(name)?),
        None => None,
    };

    let mut responder = Responder::load_sized(settings.admission.tables)?;
    responder.apply_admission(&settings.admission)?;
    let mut params = settings.server_params();
    if settings.service.log_packets {
        params.flags |= PARAM_FLAG_LOG;
    }
    responder.set_params(params)?;
    for addr in addresses {
        responder.add_served_address(*addr)?;
    }
    let logger = if settings.service.log_packets {
        Some(responder.enable_kernel_log()?)
    } else {
        None
    };
    let attachment = if settings.xdp_mode == XdpModePref::Off {
        None
    } else {
        Some(attach(&mut responder, settings, service_ns.as_ref(), home).await?)
    };
    let place = crate::userspace::SocketPlace {
        netns: settings.netns().map(str::to_string),
        addresses: addresses.clone(),
    };
    // An attached interface is not ours to recreate: the sockets stay where they are bound.
    let (_never, plumbing) = tokio::sync::watch::channel(0u64);
    let user_sockets = UserSockets {
        sockets: crate::userspace::bind_sockets(service_ns.as_ref(), addresses)?,
        place,
        plumbing,
    };
    let source = match settings.clock_source() {
        ClockSource::HostClock { identity, .. } => {
            format!("host clock as local stratum {}", identity.stratum)
        }
        ClockSource::Upstreams { upstreams, .. } => {
            format!("own clock disciplined against {}", upstreams.join(", "))
        }
    };
    info!(
        netns = settings.netns().unwrap_or("(current)"),
        interface = %settings.service.interface,
        addresses = ?addresses,
        mode = attachment.as_ref().map_or("off", |a| a.mode_name()),
        peer_pass = ?attachment.as_ref().and_then(|a| a.peer_pass),
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
        settings,
        beside,
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

/// Attaches as [`attach::plan`] says for the requested mode and the interface; a veth's peer
/// is looked for among the named namespaces (or `--peer-netns`).
async fn attach(
    responder: &mut Responder,
    settings: &Validated,
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
    let local = nl
        .link(settings.service.interface.as_str())
        .await?
        .with_context(|| {
            format!(
                "interface {:?} not found in network namespace {}",
                settings.service.interface,
                settings.netns().unwrap_or("(current)")
            )
        })?;

    // Only frames sent to this interface's own MAC are answered.
    match local.mac {
        Some(mac) => responder.set_own_macs(&[(mac, local.index)])?,
        None => {
            warn!(interface = %settings.service.interface, "the interface has no MAC: nothing will be answered")
        }
    }

    let mut peer = None;
    let link = if !local.is_veth() {
        LinkKind::Device
    } else if settings.xdp_mode == XdpModePref::Generic {
        // The peer does not matter in generic mode.
        LinkKind::VethPeerForeign
    } else {
        let candidates = match &settings.service.peer_netns {
            Some(name) => vec![(name.to_string(), netns::open_named_netns(name)?)],
            None => {
                let mut c = vec![("(initial)".to_string(), home)];
                c.extend(netns::named_namespaces());
                c
            }
        };
        peer = nl.find_veth_peer(&local, candidates).await?;
        match &peer {
            None => {
                warn!(interface = %settings.service.interface, "veth peer not found in any named namespace");
                LinkKind::VethPeerForeign
            }
            Some(p) => {
                let program = Netlink::open_in(&p.netns)?
                    .link_by_index(p.index)
                    .await?
                    .and_then(|l| l.xdp_prog_id);
                info!(
                    peer = format!("ifindex {} in {}", p.index, p.netns_label),
                    peer_program_id = program,
                    "veth peer found"
                );
                match program {
                    Some(_) => LinkKind::VethPeerProgrammed,
                    None => LinkKind::VethPeerOurs,
                }
            }
        }
    };
    let attempts = attach::plan(settings.xdp_mode, link).map_err(|e| {
        anyhow!(
            "{e}: veth {:?}'s peer was not found in any named namespace; set service.peer_netns \
             (serve --peer-netns) or xdp_mode generic",
            settings.service.interface
        )
    })?;
    attach::execute(&settings.service.interface, &attempts, |step| {
        match step {
            Step::PassOnPeer => {
                let peer = peer.as_ref().context("no veth peer")?;
                netns::within(&peer.netns, || Ok(responder.attach_peer_pass(peer.index)?))?
            }
            Step::Responder(mode) => {
                inside(&mut || Ok(responder.attach_responder(local.index, mode)?))?
            }
        }
        Ok(Attached::New)
    })
}
