//! The daemon on a VIP host: it creates and keeps the namespace plumbing ([`crate::vip`]),
//! attaches the responder through pinned links, serves DHCP, and leaves the pinned responder
//! answering when it stops, so that a restart or an upgrade (or a crash) is hitless.
//! `ntp-xdp down` removes all of it.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::XdpMode;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::Validated;
use crate::daemon::serving::{serve_responder, AbortOnDrop, Beside, UserSockets};
use crate::host::files::state_dir;
use crate::host::netlink::Netlink;
use crate::host::netns;
use crate::responder::attach::{self, Attachment, LinkKind, Step};
use crate::responder::{self, attach_pinned, pin_dir, Attached, OwnMacs, Responder};
use crate::responder::{XdpModePref, PEER_PASS_PROGRAM, RESPONDER_PROGRAM};
use crate::userspace::SocketPlace;
use crate::vip::dhcp::{self, DhcpSpec};
use crate::vip::{self, Created, VipSpec};
use crate::vip::{helper, keepalived, radvd};

/// One daemon per namespace: an exclusive lock held for the daemon's life.
pub struct DaemonLock {
    _lock: nix::fcntl::Flock<File>,
}

impl DaemonLock {
    pub fn path(netns: &str) -> std::path::PathBuf {
        state_dir(netns).join("daemon.lock")
    }

    pub fn acquire(netns: &str) -> Result<DaemonLock> {
        use std::io::Write as _;
        std::fs::create_dir_all(state_dir(netns))
            .with_context(|| format!("creating {}", state_dir(netns).display()))?;
        let path = DaemonLock::path(netns);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
            anyhow!(
                "another daemon serves namespace {netns} (pid {}; lock {}): {e}",
                running_pid(netns).map_or("?".into(), |p| p.to_string()),
                path.display()
            )
        })?;
        lock.set_len(0)?;
        write!(lock, "{}", std::process::id())?;
        Ok(DaemonLock { _lock: lock })
    }

    /// Whether a daemon holds the lock now.
    pub fn held(netns: &str) -> bool {
        let Ok(file) = File::open(DaemonLock::path(netns)) else {
            return false;
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    }
}

fn running_pid(netns: &str) -> Option<u32> {
    std::fs::read_to_string(DaemonLock::path(netns))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Where each attachment ended up, for the repair pass to restore it the same way.
#[derive(Debug, Clone)]
struct AttachPlan {
    /// The responder on the namespace end (native: the host end carries the pass program).
    ns_end: Attachment,
    host_interfaces: Vec<Attachment>,
}

fn link_pin(netns: &str, what: &str) -> std::path::PathBuf {
    pin_dir(netns).join(format!("link_{what}"))
}

/// Removes the pins of attachments the config does not ask for (a host interface taken out of
/// `vip.host_interfaces`; every one with `xdp_mode = "off"`): the kernel detaches a program
/// when its last link reference goes. Returns the pins removed.
fn release_unwanted_links(spec: &VipSpec, mode: XdpModePref) -> Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir(pin_dir(&spec.netns)) else {
        return Ok(Vec::new());
    };
    let mut released = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(what) = name.strip_prefix("link_") else {
            continue;
        };
        let wanted = mode != XdpModePref::Off
            && match what.strip_prefix("host_") {
                Some(interface) => spec.host_interfaces.iter().any(|h| h == interface),
                None => true,
            };
        if !wanted {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            released.push(what.to_string());
        }
    }
    Ok(released)
}

/// Attaches the responder (and the peer's pass program in native mode), adopting pinned
/// attachments of an earlier daemon.
async fn attach_all(
    responder: &mut Responder,
    spec: &VipSpec,
    ns: &File,
    mode: XdpModePref,
) -> Result<AttachPlan> {
    let host = Netlink::open()?;
    let inside = Netlink::open_in(ns)?;
    let ns_if = inside
        .link(&spec.ns_interface)
        .await?
        .with_context(|| format!("{} missing in {}", spec.ns_interface, spec.netns))?;
    let host_if = host
        .link(&spec.host_interface)
        .await?
        .with_context(|| format!("{} missing", spec.host_interface))?;
    // The namespace end's peer is the host end: ours.
    let attempts = attach::plan(mode, LinkKind::VethPeerOurs)?;
    let ns_end = attach::execute(&spec.ns_interface, &attempts, |step| match step {
        Step::PassOnPeer => attach_pinned(
            responder.program(PEER_PASS_PROGRAM)?,
            host_if.index,
            XdpMode::Driver,
            &link_pin(&spec.netns, "peer"),
            host_if.xdp_prog_id,
        ),
        Step::Responder(m) => netns::within(ns, || {
            attach_pinned(
                responder.program(RESPONDER_PROGRAM)?,
                ns_if.index,
                m,
                &link_pin(&spec.netns, "responder"),
                ns_if.xdp_prog_id,
            )
        }),
    })?;
    let mut host_interfaces = Vec::new();
    for name in &spec.host_interfaces {
        let link = host
            .link(name)
            .await?
            .with_context(|| format!("vip.host_interfaces: {name} does not exist"))?;
        let pin = link_pin(&spec.netns, &format!("host_{name}"));
        // The peer of a host veth is not ours; a host interface takes whichever mode works,
        // whatever the namespace end was asked for.
        let kind = if link.kind == Some(netlink_packet_route::link::InfoKind::Veth) {
            LinkKind::VethPeerForeign
        } else {
            LinkKind::Device
        };
        let attempts = attach::plan(XdpModePref::Auto, kind)?;
        host_interfaces.push(attach::execute(name, &attempts, |step| match step {
            Step::PassOnPeer => Err(anyhow!("the peer of host interface {name} is not ours")),
            Step::Responder(m) => attach_pinned(
                responder.program(RESPONDER_PROGRAM)?,
                link.index,
                m,
                &pin,
                link.xdp_prog_id,
            ),
        })?);
    }
    responder.set_own_macs(&own_macs_now(spec, &host, &inside).await?)?;
    Ok(AttachPlan {
        ns_end,
        host_interfaces,
    })
}

/// Re-attaches from the pinned programs wherever an interface lost its program (a veth
/// recreated after someone deleted it, an `ip link set xdp off`).
async fn reattach_lost(spec: &VipSpec, plan: &AttachPlan) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let host = Netlink::open()?;
    let ns = netns::open_named_netns(&spec.netns)?;
    let inside = Netlink::open_in(&ns)?;
    if plan.ns_end.peer_pass.is_some() {
        if let Some(l) = host.link(&spec.host_interface).await? {
            if l.xdp_prog_id.is_none() {
                let mut prog = responder::pinned_program(&spec.netns, PEER_PASS_PROGRAM)?;
                attach_pinned(
                    &mut prog,
                    l.index,
                    XdpMode::Driver,
                    &link_pin(&spec.netns, "peer"),
                    None,
                )?;
                out.push(format!(
                    "re-attached the pass program to {}",
                    spec.host_interface
                ));
            }
        }
    }
    if let Some(l) = inside.link(&spec.ns_interface).await? {
        if l.xdp_prog_id.is_none() {
            let mut prog = responder::pinned_program(&spec.netns, RESPONDER_PROGRAM)?;
            netns::within(&ns, || {
                attach_pinned(
                    &mut prog,
                    l.index,
                    plan.ns_end.mode,
                    &link_pin(&spec.netns, "responder"),
                    None,
                )
            })?;
            out.push(format!(
                "re-attached the responder to {} ({})",
                spec.ns_interface,
                plan.ns_end.mode_name()
            ));
        }
    }
    for attachment in &plan.host_interfaces {
        let name = &attachment.interface;
        if let Some(l) = host.link(name).await? {
            if l.xdp_prog_id.is_none() {
                let mut prog = responder::pinned_program(&spec.netns, RESPONDER_PROGRAM)?;
                attach_pinned(
                    &mut prog,
                    l.index,
                    attachment.mode,
                    &link_pin(&spec.netns, &format!("host_{name}")),
                    None,
                )?;
                out.push(format!(
                    "re-attached the responder to host interface {name}"
                ));
            }
        }
    }
    Ok(out)
}

/// The MACs of the interfaces the responder answers on, as they are now: the namespace end
/// of the veth (recreated by a repair, it has a new MAC and index) and the host interfaces.
async fn own_macs_now(
    spec: &VipSpec,
    host: &Netlink,
    inside: &Netlink,
) -> Result<Vec<([u8; 6], u32)>> {
    let mut out = Vec::new();
    let mut add = |link: Option<crate::host::netlink::Link>| {
        if let Some(l) = link {
            if let Some(mac) = l.mac {
                out.push((mac, l.index));
            }
        }
    };
    add(inside.link(&spec.ns_interface).await?);
    for name in &spec.host_interfaces {
        add(host.link(name).await?);
    }
    Ok(out)
}

/// The repair pass, a task on the daemon's runtime: every `repair_interval`, compare and fix;
/// log every repair.
async fn repair(
    spec: VipSpec,
    mut created: Created,
    plan: Option<AttachPlan>,
    mut own_macs: Option<OwnMacs>,
    plumbing: tokio::sync::watch::Sender<u64>,
) {
    let host = match Netlink::open() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "drift repair disabled: no netlink");
            return;
        }
    };
    let mut tick = tokio::time::interval(spec.repair_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: start-up has just ensured everything
                       // The own-MAC table needs writing again only after an interface was recreated.
    let mut macs_stale = false;
    loop {
        tick.tick().await;
        match vip::ensure(&spec, &mut created, &host).await {
            Ok(ensured) => {
                for change in ensured.changes {
                    warn!(repair = %change, "drift repaired");
                }
                if ensured.recreated {
                    // The userspace path and the helpers follow into the new plumbing, and
                    // the namespace end has a new ifindex to register with its MAC.
                    plumbing.send_modify(|epoch| *epoch += 1);
                    macs_stale = true;
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "drift repair failed; retrying"),
        }
        let Some(plan) = &plan else { continue };
        match reattach_lost(&spec, plan).await {
            Ok(changes) => {
                macs_stale |= !changes.is_empty();
                for change in changes {
                    warn!(repair = %change, "drift repaired");
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "re-attaching failed; retrying"),
        }
        if !macs_stale {
            continue;
        }
        if let Some(table) = &mut own_macs {
            let macs =
                match netns::open_named_netns(&spec.netns).and_then(|ns| Netlink::open_in(&ns)) {
                    Ok(inside) => own_macs_now(&spec, &host, &inside).await,
                    Err(e) => Err(e),
                };
            match macs.and_then(|m| table.set(&m)) {
                Ok(()) => macs_stale = false,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "registering the interfaces' MACs failed; retrying")
                }
            }
        }
    }
}

/// Runs the daemon with the plumbing it owns. Returns on SIGINT/SIGTERM, leaving the pinned
/// responder and the plumbing in place.
pub async fn serve_managed(
    settings: &Validated,
    beside: Beside,
    spec: &VipSpec,
    dhcp_spec: Option<&DhcpSpec>,
) -> Result<()> {
    let _lock = DaemonLock::acquire(&spec.netns)?;
    // A withdrawal asked of a daemon that had already exited is not this one's.
    let _ = std::fs::remove_file(withdraw_marker(&spec.netns));
    let host = Netlink::open()?;
    let mut created = Created::load(&spec.netns)?.unwrap_or_default();
    for change in vip::ensure(&spec, &mut created, &host).await?.changes {
        info!(change = %change, "plumbing");
    }
    created.save()?;
    if let Some(pid) = dhcp::stop_stale(&spec.netns)? {
        info!(pid, "stopped the dnsmasq an earlier daemon left");
    }
    if let Some(pid) = keepalived::stop_stale(&spec.netns)? {
        info!(pid, "stopped the keepalived an earlier daemon left");
    }
    if let Some(pid) = radvd::stop_stale(&spec.netns)? {
        info!(pid, "stopped the radvd an earlier daemon left");
    }
    let ns = netns::open_named_netns(&spec.netns)?;

    let mut responder = Responder::load_pinned(&pin_dir(&spec.netns), settings.admission.tables)?;
    let adopted = responder.current_anchor().is_some();
    responder.set_params(settings.server_params())?;
    responder.apply_admission(&settings.admission)?;
    let mut served: Vec<IpAddr> = spec.served_addresses();
    for a in &settings.service.addresses {
        if !served.contains(a) {
            served.push(*a);
        }
    }
    // A redundant VIP host serves the addresses only while it holds them: the role watcher
    // sets them, and clears them a grace after the host gave them up (frames to its own MAC
    // only, so a standby never answers as a second clock). Until it knows its role, a
    // restarted daemon leaves them as its predecessor did: a master restarting keeps
    // answering the guests whose ARP entries name it while a standby takes over.
    if spec.redundancy.is_none() {
        responder.set_served_addresses(&served)?;
    }
    // A shared network's peers are the only sources of VRRP for this group on the guests'
    // side; on a link of its own, VRRP from that side is always a guest's.
    let vrrp_peers = match &spec.redundancy {
        Some(r) if r.link.is_none() => r.keepalived.unicast_peers.clone(),
        _ => Vec::new(),
    };
    responder.set_vrrp_peers(&vrrp_peers)?;
    let user_sockets = crate::userspace::bind_sockets(Some(&ns), &served)?;
    // Attachments an earlier daemon pinned that this config no longer asks for would go on
    // answering from maps nobody updates: release them.
    for gone in release_unwanted_links(&spec, settings.xdp_mode)? {
        info!(attachment = %gone, "released an attachment the config no longer asks for");
    }
    let plan = if settings.xdp_mode == XdpModePref::Off {
        info!("XDP off: the userspace path answers everything");
        None
    } else {
        Some(attach_all(&mut responder, &spec, &ns, settings.xdp_mode).await?)
    };
    let attachments: Vec<&Attachment> = plan
        .iter()
        .flat_map(|p| std::iter::once(&p.ns_end).chain(&p.host_interfaces))
        .collect();
    let adopted_only = |a: &&Attachment| {
        a.how == Attached::Adopted && a.peer_pass.is_none_or(|p| p == Attached::Adopted)
    };
    let links = if attachments.is_empty() {
        "none"
    } else if attachments.iter().all(adopted_only) {
        "adopted"
    } else {
        "new"
    };
    for a in &attachments {
        info!(attachment = %a, "responder");
    }
    info!(
        netns = %spec.netns,
        interface = %spec.ns_interface,
        addresses = ?served,
        mode = plan.as_ref().map_or("off", |p| p.ns_end.mode_name()),
        program_id = responder.program_id()?,
        links,
        adopted_anchor = adopted,
        pins = %pin_dir(&spec.netns).display(),
        "responder attached (pinned); serving"
    );
    crate::observe::journal::notify_status(&serving_status(&spec, &served));

    let continuity = crate::daemon::clock_task::Continuity {
        state_file: state_dir(&spec.netns).join("clock.json"),
    };
    let own_macs = plan.as_ref().map(|_| responder.own_macs()).transpose()?;
    // Bumped by the repair pass whenever it recreates the namespace or the veth.
    let (plumbing, plumbing_rx) = tokio::sync::watch::channel(0u64);
    // Whether this host serves (DHCP included): always, unless it is a redundant VIP host's
    // standby.
    let (is_master, is_master_rx) = tokio::sync::watch::channel(spec.redundancy.is_none());
    let vrrp = crate::observe::status::VrrpCell::default();
    let mut tasks = Vec::new();
    if let Some(d) = dhcp_spec {
        tasks.push(AbortOnDrop(tokio::spawn(helper::supervise(
            d.clone(),
            plumbing_rx.clone(),
            is_master_rx.clone(),
        ))));
    }
    if let Some(ra) = &spec.router_advertisements {
        // Like DHCP: only from the host that holds the addresses.
        tasks.push(AbortOnDrop(tokio::spawn(helper::supervise(
            ra.clone(),
            plumbing_rx.clone(),
            is_master_rx.clone(),
        ))));
    }
    if let Some(r) = &spec.redundancy {
        let (r_keepalived, plumbing_rx_k) = (r.keepalived.clone(), plumbing_rx.clone());
        // keepalived runs on every host of the group, master or not.
        let (_always, always) = tokio::sync::watch::channel(true);
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let _always = _always;
            helper::supervise(r_keepalived, plumbing_rx_k, always).await
        })));
        tasks.push(AbortOnDrop(tokio::spawn(watch_role(
            spec.clone(),
            served.clone(),
            responder.served_addrs()?,
            is_master,
            vrrp.clone(),
        ))));
    }
    tasks.push(AbortOnDrop(tokio::spawn(repair(
        spec.clone(),
        created,
        plan,
        own_macs,
        plumbing,
    ))));
    let user_sockets = UserSockets {
        sockets: user_sockets,
        place: SocketPlace {
            netns: Some(spec.netns.clone()),
            addresses: served.clone(),
        },
        plumbing: plumbing_rx,
    };
    let result = serve_responder(
        settings,
        beside,
        &mut responder,
        user_sockets,
        Some(continuity),
        tasks,
        vrrp,
    )
    .await;
    // The repair and DHCP tasks stop here (dnsmasq with its supervisor), keepalived with its
    // SIGTERM: it releases the addresses and resigns before it exits. Wait for that, so that
    // once this process has exited the addresses are on no more than one host (systemd kills
    // what is left of the unit then).
    if spec.redundancy.is_some() {
        match keepalived::stop_stale(&spec.netns) {
            Ok(Some(pid)) => info!(pid, "keepalived stopped: the addresses are released"),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "waiting for keepalived to release the addresses")
            }
        }
    }
    if std::fs::remove_file(withdraw_marker(&spec.netns)).is_ok() {
        withdraw(&spec, &mut responder)?;
        result?;
        info!(
            "stopped and withdrawn: this host serves no time until a daemon starts again; the \
             namespace and pins stay for a fast start (`ntp-xdp down` removes them)"
        );
        return Ok(());
    }
    result?;
    info!(
        "stopped; the pinned responder keeps answering from the last anchor (LI=3 once it is \
         older than max_anchor_age). A new daemon adopts it; `ntp-xdp down` removes everything"
    );
    Ok(())
}

/// The file that asks a stopping daemon to withdraw rather than leave the pinned responder
/// answering: written by `ntp-xdp on-stop` (the unit's ExecStop) before systemd's SIGTERM.
pub fn withdraw_marker(netns: &str) -> std::path::PathBuf {
    state_dir(netns).join("withdraw-on-stop")
}

/// What `ntp-xdp on-stop` found systemd doing to the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// The stop half of a restart (`systemctl restart`, `try-restart`, a package upgrade):
    /// the pinned responder goes on answering until the new daemon adopts it.
    Restart,
    /// A stop: the daemon withdraws as it exits.
    Stop,
}

/// The unit's ExecStop: unless systemd is restarting `unit`, asks the daemon of `netns` to
/// withdraw when its SIGTERM comes (systemd sends it once ExecStop has returned).
pub fn on_systemd_stop(netns: &str, unit: &str) -> Result<StopKind> {
    let out = std::process::Command::new("systemctl")
        .args(["list-jobs", "--no-legend", "--full", "--plain"])
        .output()
        .context("running systemctl list-jobs")?;
    if !out.status.success() {
        bail!(
            "systemctl list-jobs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if unit_job_is_restart(&String::from_utf8_lossy(&out.stdout), unit) {
        return Ok(StopKind::Restart);
    }
    std::fs::create_dir_all(state_dir(netns))
        .with_context(|| format!("creating {}", state_dir(netns).display()))?;
    let marker = withdraw_marker(netns);
    std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
    Ok(StopKind::Stop)
}

/// Whether `systemctl list-jobs --no-legend` (`JOB UNIT TYPE STATE` per line) shows a restart
/// job on `unit`: systemd runs a restart as a stop under the restart job, then a start.
fn unit_job_is_restart(list_jobs: &str, unit: &str) -> bool {
    list_jobs.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        matches!(words.as_slice(), [_, u, "restart", ..] if *u == unit)
    })
}

/// A stop for good: no more answers from this host. The responder's served addresses are
/// cleared (requests pass to a stack where nothing listens once the process is gone), and
/// the helpers are stopped and awaited: dnsmasq, and radvd (its last advertisement withdraws
/// the route).
fn withdraw(spec: &VipSpec, responder: &mut Responder) -> Result<()> {
    responder
        .set_served_addresses(&[])
        .context("clearing the served addresses")?;
    for (name, stopped) in [
        ("dnsmasq", dhcp::stop_stale(&spec.netns)),
        ("radvd", radvd::stop_stale(&spec.netns)),
    ] {
        match stopped {
            Ok(Some(pid)) => info!(pid, "{name} stopped"),
            Ok(None) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "stopping {name}"),
        }
    }
    info!(netns = %spec.netns, "withdrawn: no address served");
    crate::observe::journal::notify_status("withdrawn: no address served");
    Ok(())
}

/// The unit's status line while serving: the addresses, and where the guests are.
fn serving_status(spec: &VipSpec, served: &[IpAddr]) -> String {
    let addresses: Vec<String> = served.iter().map(IpAddr::to_string).collect();
    let guests = spec.bridge.as_deref().map_or_else(
        || format!("interface {}", spec.host_interface),
        |b| format!("bridge {b}"),
    );
    let role = if spec.redundancy.is_some() {
        " while VRRP master"
    } else {
        ""
    };
    format!(
        "serving {} to guests on {guests}{role} (namespace {})",
        addresses.join(", "),
        spec.netns
    )
}

#[cfg(test)]
mod stop_tests {
    use super::unit_job_is_restart;

    #[test]
    fn a_restart_job_is_told_from_a_stop() {
        let jobs = "1234 ntp-xdp.service restart running\n1240 other.service stop waiting\n";
        assert!(unit_job_is_restart(jobs, "ntp-xdp.service"));
        assert!(!unit_job_is_restart(jobs, "other.service"));
        let stop = "1301 ntp-xdp.service stop running\n";
        assert!(!unit_job_is_restart(stop, "ntp-xdp.service"));
        assert!(!unit_job_is_restart("", "ntp-xdp.service"));
        // Another unit whose name contains ours is not ours.
        assert!(!unit_job_is_restart(
            "7 ntp-xdp.service.d restart running\n",
            "ntp-xdp.service"
        ));
    }
}

/// How often a redundant VIP host looks at which addresses it holds.
const ROLE_POLL: Duration = Duration::from_millis(100);

/// How long a host that gave the addresses up still answers requests sent to its own MAC:
/// guests whose ARP entries still name it are answered until the new master's gratuitous
/// ARPs reach them (a graceful handover, a restart, loses nothing). Frames to another MAC
/// are never answered, so no request gets two answers.
const HANDOVER_GRACE: Duration = Duration::from_secs(3);

/// A redundant VIP host's role, from the addresses keepalived put on the namespace end: the
/// service address there means master. The responder serves the addresses, and dnsmasq
/// runs, only while this host is master; each change is logged and shown in status.
async fn watch_role(
    spec: VipSpec,
    served: Vec<IpAddr>,
    mut served_map: crate::responder::ServedAddrs,
    is_master: tokio::sync::watch::Sender<bool>,
    vrrp: crate::observe::status::VrrpCell,
) {
    let Some(service) = spec.service_addresses.first().copied() else {
        return;
    };
    let mut master = None;
    let mut transitions = 0u64;
    let tracked = spec
        .redundancy
        .as_ref()
        .map(|r| r.track_interfaces.clone())
        .unwrap_or_default();
    let host = match Netlink::open() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "VRRP role watcher disabled: no netlink");
            return;
        }
    };
    let mut uplinks_down: Vec<String> = Vec::new();
    let mut inside: Option<Netlink> = None;
    // When a backup stops answering (the grace after losing or not holding the addresses).
    let mut stop_serving_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(ROLE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Uplinks: down, or without carrier, makes this host unhealthy (the health check
        // fails and keepalived gives the addresses up).
        let mut down = Vec::new();
        for name in &tracked {
            match host.link(name).await {
                Ok(Some(l)) if l.up && l.carrier => {}
                Ok(_) => down.push(name.clone()),
                Err(e) => debug!(error = %format!("{e:#}"), "reading an uplink failed"),
            }
        }
        if down != uplinks_down {
            for name in down.iter().filter(|n| !uplinks_down.contains(n)) {
                warn!(uplink = %name, "uplink down: giving the addresses up");
            }
            for name in uplinks_down.iter().filter(|n| !down.contains(n)) {
                info!(uplink = %name, "uplink back");
            }
            uplinks_down = down;
            if let Some(v) = vrrp.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                v.uplinks_down = uplinks_down.clone();
            }
        }
        // One session in the service namespace, opened again when the namespace end is not
        // found there (a repair recreated the namespace: the old session is in the old one).
        let holds = async {
            if inside.is_none() {
                inside = Some(Netlink::open_in(&netns::open_named_netns(&spec.netns)?)?);
            }
            let nl = inside.as_ref().expect("opened above");
            let Some(link) = nl.link(&spec.ns_interface).await? else {
                inside = None;
                return Ok(false);
            };
            anyhow::Ok(nl.addresses(link.index).await?.contains(&service))
        }
        .await;
        let now_master = match holds {
            Ok(h) => h,
            Err(e) => {
                inside = None;
                debug!(error = %format!("{e:#}"), "reading the VRRP addresses failed");
                continue;
            }
        };
        if stop_serving_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
            match served_map.set(&[]) {
                Ok(()) => stop_serving_at = None,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "clearing the served addresses failed; retrying")
                }
            }
        }
        if master == Some(now_master) {
            continue;
        }
        if now_master {
            stop_serving_at = None;
            if let Err(e) = served_map.set(&served) {
                warn!(error = %format!("{e:#}"), "setting the served addresses failed; retrying");
                continue;
            }
        } else {
            stop_serving_at = Some(tokio::time::Instant::now() + HANDOVER_GRACE);
        }
        if master.is_some() {
            transitions += 1;
        }
        master = Some(now_master);
        let role = if now_master { "master" } else { "backup" };
        info!(role, "VRRP role: {role}");
        is_master.send_replace(now_master);
        *vrrp.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(crate::observe::status::VrrpStatus {
                role: role.into(),
                transitions,
                uplinks_down: uplinks_down.clone(),
            });
    }
}

/// `ntp-xdp down`: removes exactly what the daemon of this config created, and its pins.
pub async fn down(spec: &VipSpec) -> Result<Vec<String>> {
    if DaemonLock::held(&spec.netns) {
        bail!(
            "the daemon for namespace {} is still running (pid {}); stop it first",
            spec.netns,
            running_pid(&spec.netns).map_or("?".into(), |p| p.to_string())
        );
    }
    let mut done = Vec::new();
    if let Some(pid) = dhcp::stop_stale(&spec.netns)? {
        done.push(format!("stopped dnsmasq (pid {pid})"));
    }
    if let Some(pid) = keepalived::stop_stale(&spec.netns)? {
        done.push(format!("stopped keepalived (pid {pid})"));
    }
    if let Some(pid) = radvd::stop_stale(&spec.netns)? {
        done.push(format!("stopped radvd (pid {pid})"));
    }
    {
        let _bpffs = responder::bpffs_lock()?;
        done.extend(responder::remove_pins(&spec.netns)?);
        done.extend(responder::release_bpffs()?);
    }
    match Created::load(&spec.netns)? {
        Some(created) => done.extend(vip::teardown(&created, &Netlink::open()?).await?),
        None => done.push(format!(
            "no record of what a daemon created for {} (nothing else removed)",
            spec.netns
        )),
    }
    let dir = state_dir(&spec.netns);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        done.push(format!("removed {}", dir.display()));
    }
    let _ = std::fs::remove_dir(Path::new("/run/ntp-xdp"));
    Ok(done)
}
