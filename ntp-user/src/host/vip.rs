//! The VIP host's plumbing, owned by the daemon: a named network namespace, a veth between it
//! and the host (the host end optionally in a bridge), the service address and the clock
//! aliases on the namespace end, routes back to guest subnets, and forwarding off.
//!
//! [`ensure`] is both start-up and drift repair: it compares what exists with the spec, adopts
//! what is already right and fixes the rest, and returns one line per change. What the daemon
//! created (rather than adopted) is recorded in a state file so that `ntp-user down` removes
//! exactly that.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlag};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlag, LinkInfo, LinkXdp};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use serde::{Deserialize, Serialize};

use crate::host::netns;

/// What the daemon creates and keeps on a VIP host.
#[derive(Debug, Clone, PartialEq)]
pub struct VipSpec {
    /// The namespace's name under /run/netns; also names the daemon's state and pins.
    pub netns: String,
    /// The veth end inside the namespace (the responder is attached here).
    pub ns_interface: String,
    /// The veth end in the daemon's own namespace.
    pub host_interface: String,
    pub bridge: Option<String>,
    pub create_bridge: bool,
    /// Service addresses with their subnets (IPv4 first, then IPv6).
    pub service_addresses: Vec<IpNet>,
    /// Clock addresses, added as /32 and /128.
    pub aliases: Vec<IpAddr>,
    /// Routes inside the namespace: destination, and gateway (None: on the link).
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
    pub repair_interval: Duration,
    /// Host interfaces (daemon's namespace) the responder is attached to as well.
    pub host_interfaces: Vec<String>,
}

impl VipSpec {
    /// Every address on the namespace end, as it should be configured.
    pub fn wanted_addresses(&self) -> Vec<IpNet> {
        let mut out = self.service_addresses.clone();
        out.extend(self.aliases.iter().map(|a| IpNet::from(*a)));
        out
    }

    /// The addresses the responder answers for.
    pub fn served_addresses(&self) -> Vec<IpAddr> {
        let mut out = self.aliases.clone();
        out.extend(self.service_addresses.iter().map(IpNet::addr));
        out
    }
}

/// The first host address of a subnet (for error messages).
pub fn first_host(net: &IpNet) -> IpAddr {
    net.hosts().next().unwrap_or(net.addr())
}

/// Where the daemon keeps what it must remember across restarts for one namespace.
pub fn state_dir(netns: &str) -> PathBuf {
    Path::new("/run/ntp-xdp").join(netns)
}

/// What this daemon created, as opposed to found: `down` removes exactly this.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub netns: bool,
    pub veth: bool,
    pub bridge: bool,
    /// Addresses and routes added to a namespace the daemon did not create (in one it
    /// created, they go with it).
    pub addresses: Vec<IpNet>,
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
    /// Interface names, to remove even after the config changed.
    pub netns_name: String,
    pub host_interface: String,
    pub ns_interface: String,
    pub bridge_name: Option<String>,
}

impl Created {
    pub fn path(netns: &str) -> PathBuf {
        state_dir(netns).join("created.json")
    }

    pub fn load(netns: &str) -> Result<Option<Created>> {
        let path = Created::path(netns);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a state file of this daemon", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("reading {}", path.display()))),
        }
    }

    pub fn save(&self) -> Result<()> {
        let path = Created::path(&self.netns_name);
        std::fs::create_dir_all(state_dir(&self.netns_name))
            .with_context(|| format!("creating {}", state_dir(&self.netns_name).display()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// One link as rtnetlink reports it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub kind: Option<InfoKind>,
    pub up: bool,
    pub controller: Option<u32>,
    /// The XDP program attached to it (any mode).
    pub xdp_prog_id: Option<u32>,
}

/// A blocking rtnetlink session bound to the namespace it was opened in.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a session in the calling thread's namespace. Not for use inside a tokio runtime.
    pub fn open() -> Result<Netlink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a netlink runtime")?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
            tokio::spawn(conn);
            anyhow::Ok(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    /// Opens a session bound to `ns`.
    pub fn open_in(ns: &File) -> Result<Netlink> {
        netns::within(ns, Netlink::open)
    }

    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let handle = self.handle.clone();
        let reply = self.rt.block_on(async {
            handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next()
                .await
        });
        let msg = match reply {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(None)
            }
            Err(e) => return Err(anyhow!(e).context(format!("RTM_GETLINK {name}"))),
        };
        let mut link = Link {
            index: msg.header.index,
            kind: None,
            up: msg.header.flags.contains(&LinkFlag::Up),
            controller: None,
            xdp_prog_id: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k);
                        }
                    }
                }
                LinkAttribute::Xdp(xdp) => {
                    for x in xdp {
                        if let LinkXdp::ProgId(id) = x {
                            link.xdp_prog_id = (id != 0).then_some(id);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Some(link))
    }

    fn run<F, T>(&self, what: &str, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, rtnetlink::Error>>,
    {
        self.rt
            .block_on(f)
            .map_err(|e| anyhow!(e).context(what.to_string()))
    }

    pub fn add_bridge(&self, name: &str) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("creating bridge {name}"), async move {
            h.link().add().bridge(name.to_string()).execute().await
        })
    }

    /// Creates a veth pair here and moves `peer` into `peer_ns`.
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: &File) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("creating veth {name}/{peer}"), async move {
            h.link()
                .add()
                .veth(name.to_string(), peer.to_string())
                .execute()
                .await
        })?;
        let peer_link = self
            .link(peer)?
            .with_context(|| format!("veth end {peer} vanished after creation"))?;
        let h = self.handle.clone();
        let fd = peer_ns.as_raw_fd();
        self.run(&format!("moving {peer} into its namespace"), async move {
            h.link()
                .set(peer_link.index)
                .setns_by_fd(fd)
                .execute()
                .await
        })
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run("setting a link up", async move {
            h.link().set(index).up().execute().await
        })
    }

    pub fn set_controller(&self, index: u32, controller: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run("adding a link to its bridge", async move {
            h.link().set(index).controller(controller).execute().await
        })
    }

    pub fn delete_link(&self, index: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run("deleting a link", async move {
            h.link().del(index).execute().await
        })
    }

    /// Addresses on link `index`, with prefix lengths.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let h = self.handle.clone();
        let msgs: Vec<_> = self.run("RTM_GETADDR", async move {
            h.address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
        })?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    if let Ok(net) = IpNet::new(*ip, m.header.prefix_len) {
                        out.push(net);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Adds an address; IPv6 ones without duplicate address detection, so they answer at once.
    pub fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("adding address {net}"), async move {
            let mut req = h.address().add(index, net.addr(), net.prefix_len());
            if net.addr().is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
            }
            req.execute().await
        })
    }

    pub fn delete_address(&self, index: u32, net: IpNet) -> Result<()> {
        let h = self.handle.clone();
        let msgs: Vec<_> = self.run("RTM_GETADDR", async move {
            h.address()
                .get()
                .set_link_index_filter(index)
                .set_address_filter(net.addr())
                .execute()
                .try_collect()
                .await
        })?;
        for m in msgs {
            let h = self.handle.clone();
            self.run(&format!("deleting address {net}"), async move {
                h.address().del(m).execute().await
            })?;
        }
        Ok(())
    }

    /// Main-table unicast routes of one family: destination, gateway, output interface.
    pub fn routes(&self, v6: bool) -> Result<Vec<(IpNet, Option<IpAddr>, Option<u32>)>> {
        let h = self.handle.clone();
        let version = if v6 {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        let msgs: Vec<_> = self.run("RTM_GETROUTE", async move {
            h.route().get(version).execute().try_collect().await
        })?;
        let mut out = Vec::new();
        for m in msgs {
            let (dst, gw, oif) = route_fields(&m);
            let dst = dst.unwrap_or(if v6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            });
            if let Ok(net) = IpNet::new(dst, m.header.destination_prefix_length) {
                out.push((net, gw, oif));
            }
        }
        Ok(out)
    }

    pub fn add_route(&self, to: IpNet, via: Option<IpAddr>, oif: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("adding route {to}"), async move {
            let req = h.route().add().output_interface(oif);
            match (to, via) {
                (IpNet::V4(n), Some(IpAddr::V4(g))) => {
                    req.v4()
                        .destination_prefix(n.addr(), n.prefix_len())
                        .gateway(g)
                        .execute()
                        .await
                }
                (IpNet::V4(n), _) => {
                    req.v4()
                        .scope(RouteScope::Link)
                        .destination_prefix(n.addr(), n.prefix_len())
                        .execute()
                        .await
                }
                (IpNet::V6(n), Some(IpAddr::V6(g))) => {
                    req.v6()
                        .destination_prefix(n.addr(), n.prefix_len())
                        .gateway(g)
                        .execute()
                        .await
                }
                (IpNet::V6(n), _) => {
                    req.v6()
                        .destination_prefix(n.addr(), n.prefix_len())
                        .execute()
                        .await
                }
            }
        })
    }

    pub fn delete_route(&self, to: IpNet, via: Option<IpAddr>) -> Result<()> {
        let h = self.handle.clone();
        let version = if to.addr().is_ipv6() {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        let msgs: Vec<_> = self.run("RTM_GETROUTE", async move {
            h.route().get(version).execute().try_collect().await
        })?;
        for m in msgs {
            let (dst, gw, _) = route_fields(&m);
            if dst == Some(to.addr())
                && m.header.destination_prefix_length == to.prefix_len()
                && gw == via
            {
                let h = self.handle.clone();
                self.run(&format!("deleting route {to}"), async move {
                    h.route().del(m).execute().await
                })?;
            }
        }
        Ok(())
    }
}

/// Destination, gateway and output interface of a route message.
fn route_fields(
    m: &netlink_packet_route::route::RouteMessage,
) -> (Option<IpAddr>, Option<IpAddr>, Option<u32>) {
    let (mut dst, mut gw, mut oif) = (None, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Gateway(g) => gw = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    (dst, gw, oif)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Forwarding sysctls that must be off in the namespace: it serves time and DHCP, and must
/// never become a path from a guest to the host.
const FORWARDING_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// Turns forwarding off in the calling thread's namespace; names each one that was on.
fn forwarding_off() -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for path in FORWARDING_SYSCTLS {
        let now = match std::fs::read_to_string(path) {
            Ok(v) => v,
            // IPv6 disabled on this host: nothing to forward.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow!(e).context(format!("reading {path}"))),
        };
        if now.trim() != "0" {
            std::fs::write(path, "0").with_context(|| format!("writing 0 to {path}"))?;
            changed.push(format!("forwarding turned off ({path} was {})", now.trim()));
        }
    }
    Ok(changed)
}

/// Creates the named namespace as `ip netns add` does: an empty file under /run/netns with a
/// new network namespace bind-mounted on it (by a short-lived thread that unshares).
pub fn create_named_netns(name: &str) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let dir = Path::new("/run/netns");
    std::fs::create_dir_all(dir).context("creating /run/netns")?;
    // /run/netns is made a shared mount point, so that namespaces created later are seen by
    // processes in other mount namespaces (as iproute2 does).
    if mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .is_err()
    {
        mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .context("bind-mounting /run/netns on itself")?;
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .context("making /run/netns a shared mount")?;
    }
    let path = netns::named_netns_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting the new namespace on {}", target.display()))
    })
    .join()
    .map_err(|_| anyhow!("the namespace-creating thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(())
}

/// Removes a named namespace (its veth ends go with it).
pub fn delete_named_netns(name: &str) -> Result<()> {
    let path = netns::named_netns_path(name);
    nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", path.display()))?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// Brings what exists in line with `spec`, from the daemon's own namespace. Returns one line per
/// change made (empty: everything was as it should be). `created` records what was made.
pub fn ensure(spec: &VipSpec, created: &mut Created, host: &Netlink) -> Result<Vec<String>> {
    let mut changes = Vec::new();
    created.netns_name = spec.netns.clone();
    created.host_interface = spec.host_interface.clone();
    created.ns_interface = spec.ns_interface.clone();

    if !netns::named_netns_path(&spec.netns).exists() {
        create_named_netns(&spec.netns)?;
        created.netns = true;
        changes.push(format!("created network namespace {}", spec.netns));
    }
    let ns = netns::open_named_netns(&spec.netns)?;
    let inside = Netlink::open_in(&ns)?;

    // The bridge, if any.
    let bridge_index = match &spec.bridge {
        None => None,
        Some(name) => match host.link(name)? {
            Some(l) => Some(l.index),
            None if spec.create_bridge => {
                host.add_bridge(name)?;
                created.bridge = true;
                created.bridge_name = Some(name.clone());
                changes.push(format!("created bridge {name}"));
                Some(
                    host.link(name)?
                        .context("bridge vanished after creation")?
                        .index,
                )
            }
            None => bail!(
                "bridge {name:?} (vip.bridge) does not exist; create it or set vip.create_bridge"
            ),
        },
    };
    if let (Some(index), Some(name)) = (bridge_index, &spec.bridge) {
        if !host.link(name)?.is_some_and(|l| l.up) {
            host.set_up(index)?;
            changes.push(format!("set bridge {name} up"));
        }
    }

    // The veth: both ends must exist, each where it belongs; a lone end is replaced.
    let host_end = host.link(&spec.host_interface)?;
    let ns_end = inside.link(&spec.ns_interface)?;
    let veth_ok = matches!((&host_end, &ns_end), (Some(h), Some(n))
        if h.kind == Some(InfoKind::Veth) && n.kind == Some(InfoKind::Veth));
    if !veth_ok {
        if let Some(h) = &host_end {
            if h.kind != Some(InfoKind::Veth) {
                bail!(
                    "{} exists on the host and is not a veth; choose another vip.host_interface",
                    spec.host_interface
                );
            }
            host.delete_link(h.index)?;
            changes.push(format!(
                "removed {} (its peer was gone)",
                spec.host_interface
            ));
        }
        if let Some(n) = &ns_end {
            inside.delete_link(n.index)?;
            changes.push(format!("removed {} (its peer was gone)", spec.ns_interface));
        }
        host.add_veth(&spec.host_interface, &spec.ns_interface, &ns)?;
        created.veth = true;
        changes.push(format!(
            "created veth {} (host) / {} (in {})",
            spec.host_interface, spec.ns_interface, spec.netns
        ));
    }
    let host_end = host
        .link(&spec.host_interface)?
        .context("host veth end vanished")?;
    let ns_end = inside
        .link(&spec.ns_interface)?
        .context("namespace veth end vanished")?;
    if let Some(bridge) = bridge_index {
        if host_end.controller != Some(bridge) {
            host.set_controller(host_end.index, bridge)?;
            changes.push(format!(
                "added {} to bridge {}",
                spec.host_interface,
                spec.bridge.as_deref().unwrap_or("")
            ));
        }
    }
    if !host_end.up {
        host.set_up(host_end.index)?;
        changes.push(format!("set {} up", spec.host_interface));
    }
    if !ns_end.up {
        inside.set_up(ns_end.index)?;
        changes.push(format!("set {} up", spec.ns_interface));
    }
    if let Some(lo) = inside.link("lo")? {
        if !lo.up {
            inside.set_up(lo.index)?;
            changes.push(format!("set lo up in {}", spec.netns));
        }
    }

    // Addresses on the namespace end.
    let have = inside.addresses(ns_end.index)?;
    for net in spec.wanted_addresses() {
        if !have.contains(&net) {
            inside.add_address(ns_end.index, net)?;
            if !created.netns && !created.addresses.contains(&net) {
                created.addresses.push(net);
            }
            changes.push(format!("added address {net} to {}", spec.ns_interface));
        }
    }

    // Routes back to guest subnets.
    for &(to, via) in &spec.routes {
        let present = inside
            .routes(to.addr().is_ipv6())?
            .iter()
            .any(|&(d, g, _)| d == to && g == via);
        if !present {
            inside.add_route(to, via, ns_end.index)?;
            if !created.netns && !created.routes.contains(&(to, via)) {
                created.routes.push((to, via));
            }
            changes.push(match via {
                Some(g) => format!("added route {to} via {g} in {}", spec.netns),
                None => format!(
                    "added route {to} dev {} in {}",
                    spec.ns_interface, spec.netns
                ),
            });
        }
    }

    changes.extend(netns::within(&ns, forwarding_off)?);
    if !changes.is_empty() {
        created.save()?;
    }
    Ok(changes)
}

/// Removes what `created` says the daemon made. Returns one line per removal.
pub fn teardown(created: &Created, host: &Netlink) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let ns_path = netns::named_netns_path(&created.netns_name);
    if ns_path.exists() && !created.netns {
        let ns = netns::open_named_netns(&created.netns_name)?;
        let inside = Netlink::open_in(&ns)?;
        if !created.veth {
            if let Some(l) = inside.link(&created.ns_interface)? {
                for &(to, via) in &created.routes {
                    inside.delete_route(to, via)?;
                    done.push(format!("removed route {to}"));
                }
                for &net in &created.addresses {
                    inside.delete_address(l.index, net)?;
                    done.push(format!("removed address {net}"));
                }
            }
        }
    }
    if created.veth {
        if let Some(l) = host.link(&created.host_interface)? {
            host.delete_link(l.index)?;
            done.push(format!("removed veth {}", created.host_interface));
        }
    }
    if created.bridge {
        if let Some(name) = &created.bridge_name {
            if let Some(l) = host.link(name)? {
                host.delete_link(l.index)?;
                done.push(format!("removed bridge {name}"));
            }
        }
    }
    if created.netns && ns_path.exists() {
        delete_named_netns(&created.netns_name)?;
        done.push(format!("removed network namespace {}", created.netns_name));
    }
    Ok(done)
}
