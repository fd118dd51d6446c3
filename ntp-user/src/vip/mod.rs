//! The VIP host's plumbing, owned by the daemon: a named network namespace, a veth between it
//! and the host (the host end optionally in a bridge), the service address and the clock
//! aliases on the namespace end, routes back to guest subnets, and forwarding off.
//!
//! [`ensure`] is both start-up and drift repair: it compares what exists with the spec, adopts
//! what is already right and fixes the rest, and returns one line per change. What the daemon
//! created (rather than adopted) is recorded in a state file so that `ntp-xdp down` removes
//! exactly that.

//!
//! Beside the plumbing, this folder holds the helper daemons the VIP host runs in its namespace
//! (dnsmasq, keepalived, radvd), their supervision, and the one writer of their config files.

pub mod conffile;
pub mod dhcp;
pub mod helper;
pub mod keepalived;
pub mod radvd;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::IpNet;
use netlink_packet_route::link::InfoKind;
use serde::{Deserialize, Serialize};

use crate::host::files::state_dir;
use crate::host::netlink::Netlink;
use crate::host::netns::{self, create_named_netns, delete_named_netns};

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
    /// Redundant VIP hosts: keepalived owns the service and clock addresses (they are on the
    /// master only), this host keeps its own address.
    pub redundancy: Option<Redundancy>,
    /// Router advertisements with the route to the IPv6 clock addresses (radvd).
    pub router_advertisements: Option<crate::vip::radvd::RadvdSpec>,
}

/// What a redundant VIP host keeps besides what keepalived moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Redundancy {
    /// This host's own address (the VRRP source): on `link`'s namespace end, or on the
    /// guests' link with a shared network.
    pub own_address: IpNet,
    pub keepalived: crate::vip::keepalived::KeepalivedSpec,
    /// Uplinks in the daemon's namespace whose failure makes this host unhealthy.
    pub track_interfaces: Vec<String>,
    /// The link VRRP speaks on, out of the guests' reach (None: the guests' own link).
    pub link: Option<VrrpLink>,
}

/// A second veth from the namespace to a bridge of the VIP hosts' own network.
#[derive(Debug, Clone, PartialEq)]
pub struct VrrpLink {
    pub ns_interface: String,
    pub host_interface: String,
    pub bridge: String,
}

impl VipSpec {
    /// Every address on the guests' namespace end that the daemon keeps there. With
    /// redundancy the service and clock addresses are keepalived's (on the master only: absent
    /// on a standby is right, and drift repair leaves them alone); the daemon keeps the host's
    /// own address, on the VRRP link when there is one.
    pub fn wanted_addresses(&self) -> Vec<IpNet> {
        match &self.redundancy {
            Some(r) if r.link.is_some() => Vec::new(),
            Some(r) => vec![r.own_address],
            None => self.virtual_addresses(),
        }
    }

    /// The service and clock addresses.
    pub fn virtual_addresses(&self) -> Vec<IpNet> {
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

    /// The socket keepalived's health check asks (`ntp-xdp health --socket`).
    pub fn health_socket(&self) -> PathBuf {
        state_dir(&self.netns).join("health.sock")
    }

    /// The control socket when none is configured: beside the namespace's other state.
    pub fn default_control_socket(&self) -> PathBuf {
        state_dir(&self.netns).join("control.sock")
    }

    /// Router advertisements on the namespace end for the IPv6 service subnet `service6`,
    /// routing to the IPv6 clock addresses (None: `service6` is not IPv6).
    pub fn router_advertisements_for(&self, service6: IpNet) -> Option<radvd::RadvdSpec> {
        radvd::for_vip(&self.netns, &self.ns_interface, service6, &self.aliases)
    }
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
    /// The MAC of the namespace end: a recreated veth gets it back, so guests' ARP and
    /// neighbour caches stay right (the responder answers only frames sent to its own MAC).
    #[serde(default)]
    pub ns_mac: Option<[u8; 6]>,
    /// The VRRP link's veth, by its host end's name.
    #[serde(default)]
    pub vrrp_host_interface: Option<String>,
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

/// Sysctls of the namespace, with the value each must have: forwarding off (it serves time and
/// DHCP, and must never become a path from a guest to the host), and address announcements
/// on (a gratuitous ARP / unsolicited NA when the veth comes up: after a repair recreated it
/// with a new MAC, guests must not keep sending to the old one).
const NAMESPACE_SYSCTLS: [(&str, &str); 4] = [
    ("/proc/sys/net/ipv4/ip_forward", "0"),
    ("/proc/sys/net/ipv6/conf/all/forwarding", "0"),
    ("/proc/sys/net/ipv4/conf/all/arp_notify", "1"),
    ("/proc/sys/net/ipv6/conf/all/ndisc_notify", "1"),
];

/// Sets the namespace's sysctls in the calling thread's namespace; names each one changed.
fn namespace_sysctls() -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for (path, want) in NAMESPACE_SYSCTLS {
        let now = match std::fs::read_to_string(path) {
            Ok(v) => v,
            // IPv6 disabled on this host: nothing to forward.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow!(e).context(format!("reading {path}"))),
        };
        if now.trim() != want {
            std::fs::write(path, want).with_context(|| format!("writing {want} to {path}"))?;
            changed.push(format!("{path} set to {want} (was {})", now.trim()));
        }
    }
    Ok(changed)
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ensured {
    /// One line per change, for the log (empty: everything was as it should be).
    pub changes: Vec<String>,
    /// The namespace or the veth was (re)created: whatever was bound to the old ones (the
    /// userspace path's sockets, dnsmasq) must follow.
    pub recreated: bool,
}

/// Brings what exists in line with `spec`, from the daemon's own namespace. Returns one line per
/// change made (empty: everything was as it should be). `created` records what was made.
pub async fn ensure(spec: &VipSpec, created: &mut Created, host: &Netlink) -> Result<Ensured> {
    let mut changes = Vec::new();
    let mut recreated = false;
    created.netns_name = spec.netns.clone();
    created.host_interface = spec.host_interface.clone();
    created.ns_interface = spec.ns_interface.clone();

    if !netns::named_netns_path(&spec.netns).exists() {
        create_named_netns(&spec.netns)?;
        created.netns = true;
        recreated = true;
        changes.push(format!("created network namespace {}", spec.netns));
    }
    let ns = netns::open_named_netns(&spec.netns)?;
    let inside = Netlink::open_in(&ns)?;

    // The bridge, if any.
    let bridge_index = match &spec.bridge {
        None => None,
        Some(name) => match host.link(name).await? {
            Some(l) => Some(l.index),
            None if spec.create_bridge => {
                host.add_bridge(name).await?;
                created.bridge = true;
                created.bridge_name = Some(name.clone());
                changes.push(format!("created bridge {name}"));
                Some(
                    host.link(name)
                        .await?
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
        if !host.link(name).await?.is_some_and(|l| l.up) {
            host.set_up(index).await?;
            changes.push(format!("set bridge {name} up"));
        }
    }

    let veth = Veth {
        host_end: &spec.host_interface,
        ns_end: &spec.ns_interface,
        netns: &spec.netns,
        field: "vip.host_interface",
        ours: created.veth,
    };
    if veth.ensure(host, &inside, &ns, &mut changes).await? {
        created.veth = true;
        recreated = true;
    }
    let host_end = host
        .link(&spec.host_interface)
        .await?
        .context("host veth end vanished")?;
    let mut ns_end = inside
        .link(&spec.ns_interface)
        .await?
        .context("namespace veth end vanished")?;
    match (created.ns_mac, ns_end.mac) {
        (Some(want), Some(have)) if want != have => {
            inside.set_mac(ns_end.index, want).await?;
            ns_end.mac = Some(want);
            changes.push(format!(
                "gave {} its MAC back ({})",
                spec.ns_interface,
                mac_text(&want)
            ));
        }
        (None, Some(have)) => created.ns_mac = Some(have),
        _ => {}
    }
    if let Some(bridge) = bridge_index {
        if host_end.controller != Some(bridge) {
            host.set_controller(host_end.index, bridge).await?;
            changes.push(format!(
                "added {} to bridge {}",
                spec.host_interface,
                spec.bridge.as_deref().unwrap_or("")
            ));
        }
    }
    if !host_end.up {
        host.set_up(host_end.index).await?;
        changes.push(format!("set {} up", spec.host_interface));
    }
    // Addresses on the namespace end.
    let have = inside.addresses(ns_end.index).await?;
    for net in spec.wanted_addresses() {
        if !have.contains(&net) {
            inside.add_address(ns_end.index, net).await?;
            if !created.netns && !created.addresses.contains(&net) {
                created.addresses.push(net);
            }
            changes.push(format!("added address {net} to {}", spec.ns_interface));
        }
    }

    // Up only once its addresses are on: bringing it up then announces them (arp_notify,
    // ndisc_notify), so guests that knew the MAC of a deleted veth learn the new one at once.
    if !ns_end.up {
        inside.set_up(ns_end.index).await?;
        changes.push(format!("set {} up", spec.ns_interface));
    }
    if let Some(lo) = inside.link("lo").await? {
        if !lo.up {
            inside.set_up(lo.index).await?;
            changes.push(format!("set lo up in {}", spec.netns));
        }
    }

    // Routes back to guest subnets.
    for &(to, via) in &spec.routes {
        let present = inside
            .routes(to.addr().is_ipv6())
            .await?
            .iter()
            .any(|&(d, g, _)| d == to && g == via);
        if !present {
            inside.add_route(to, via, ns_end.index).await?;
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

    if let Some(r) = &spec.redundancy {
        if let Some(link) = &r.link {
            // keepalived's sockets are bound to the old link: it restarts with the others.
            recreated |= ensure_vrrp_link(
                link,
                r.own_address,
                spec,
                created,
                host,
                &inside,
                &ns,
                &mut changes,
            )
            .await?;
        }
    }

    changes.extend(netns::within(&ns, namespace_sysctls)?);
    if !changes.is_empty() {
        created.save()?;
    }
    Ok(Ensured { changes, recreated })
}

/// A veth pair from the daemon's namespace into the service namespace.
struct Veth<'a> {
    host_end: &'a str,
    ns_end: &'a str,
    netns: &'a str,
    /// The config field naming the host end (for the error when the name is taken).
    field: &'a str,
    /// This daemon made the pair (its state file says so): a lone host end is its own to
    /// replace. Any other link of that name is someone else's and is never removed.
    ours: bool,
}

impl Veth<'_> {
    /// Both ends must exist, each where it belongs; a lone end is replaced when it is ours.
    /// True when the pair was (re)created.
    async fn ensure(
        &self,
        host: &Netlink,
        inside: &Netlink,
        ns: &std::fs::File,
        changes: &mut Vec<String>,
    ) -> Result<bool> {
        let host_end = host.link(self.host_end).await?;
        let ns_end = inside.link(self.ns_end).await?;
        let veth_ok = matches!((&host_end, &ns_end), (Some(h), Some(n))
            if h.kind == Some(InfoKind::Veth) && n.kind == Some(InfoKind::Veth));
        if veth_ok {
            return Ok(false);
        }
        if let Some(h) = &host_end {
            if h.kind != Some(InfoKind::Veth) {
                bail!(
                    "{} exists on the host and is not a veth; choose another {}",
                    self.host_end,
                    self.field
                );
            }
            if !self.ours {
                bail!(
                    "{} exists on the host and its peer is not {} in {}: it is not this \
                     daemon's; choose another {}",
                    self.host_end,
                    self.ns_end,
                    self.netns,
                    self.field
                );
            }
            host.delete_link(h.index).await?;
            changes.push(format!("removed {} (its peer was gone)", self.host_end));
        }
        if let Some(n) = &ns_end {
            inside.delete_link(n.index).await?;
            changes.push(format!("removed {} (its peer was gone)", self.ns_end));
        }
        host.add_veth(self.host_end, self.ns_end, ns).await?;
        changes.push(format!(
            "created veth {} (host) / {} (in {})",
            self.host_end, self.ns_end, self.netns
        ));
        Ok(true)
    }
}

/// The VRRP link: its veth, the host end in the VIP hosts' bridge (which must exist: it is
/// the operator's network), this host's own address on the namespace end, both ends up. True
/// when the veth was (re)created.
#[allow(clippy::too_many_arguments)]
async fn ensure_vrrp_link(
    link: &VrrpLink,
    own_address: IpNet,
    spec: &VipSpec,
    created: &mut Created,
    host: &Netlink,
    inside: &Netlink,
    ns: &std::fs::File,
    changes: &mut Vec<String>,
) -> Result<bool> {
    let bridge = host.link(&link.bridge).await?.with_context(|| {
        format!(
            "bridge {:?} (redundancy.bridge) does not exist: it is the VIP hosts' own network",
            link.bridge
        )
    })?;
    let veth = Veth {
        host_end: &link.host_interface,
        ns_end: &link.ns_interface,
        netns: &spec.netns,
        field: "redundancy.host_interface",
        ours: created.vrrp_host_interface.as_deref() == Some(link.host_interface.as_str()),
    };
    let recreated = veth.ensure(host, inside, ns, changes).await?;
    if recreated {
        created.vrrp_host_interface = Some(link.host_interface.clone());
    }
    let host_end = host
        .link(&link.host_interface)
        .await?
        .context("the VRRP link's host end vanished")?;
    if host_end.controller != Some(bridge.index) {
        host.set_controller(host_end.index, bridge.index).await?;
        changes.push(format!(
            "added {} to bridge {}",
            link.host_interface, link.bridge
        ));
    }
    if !host_end.up {
        host.set_up(host_end.index).await?;
        changes.push(format!("set {} up", link.host_interface));
    }
    let ns_end = inside
        .link(&link.ns_interface)
        .await?
        .context("the VRRP link's namespace end vanished")?;
    if !inside.addresses(ns_end.index).await?.contains(&own_address) {
        inside.add_address(ns_end.index, own_address).await?;
        changes.push(format!(
            "added address {own_address} to {}",
            link.ns_interface
        ));
    }
    if !ns_end.up {
        inside.set_up(ns_end.index).await?;
        changes.push(format!("set {} up", link.ns_interface));
    }
    Ok(recreated)
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Removes what `created` says the daemon made. Returns one line per removal.
pub async fn teardown(created: &Created, host: &Netlink) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let ns_path = netns::named_netns_path(&created.netns_name);
    if ns_path.exists() && !created.netns {
        let ns = netns::open_named_netns(&created.netns_name)?;
        let inside = Netlink::open_in(&ns)?;
        if !created.veth {
            if let Some(l) = inside.link(&created.ns_interface).await? {
                for &(to, via) in &created.routes {
                    inside.delete_route(to, via).await?;
                    done.push(format!("removed route {to}"));
                }
                for &net in &created.addresses {
                    inside.delete_address(l.index, net).await?;
                    done.push(format!("removed address {net}"));
                }
            }
        }
    }
    if created.veth {
        if let Some(l) = host.link(&created.host_interface).await? {
            host.delete_link(l.index).await?;
            done.push(format!("removed veth {}", created.host_interface));
        }
    }
    if let Some(name) = &created.vrrp_host_interface {
        if let Some(l) = host.link(name).await? {
            host.delete_link(l.index).await?;
            done.push(format!("removed veth {name}"));
        }
    }
    if created.bridge {
        if let Some(name) = &created.bridge_name {
            if let Some(l) = host.link(name).await? {
                host.delete_link(l.index).await?;
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
