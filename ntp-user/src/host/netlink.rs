//! The daemon's one rtnetlink client: links, addresses, routes and namespace IDs, in the
//! namespace each session was opened in, as tasks on the daemon's runtime.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlag, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlag, LinkInfo, LinkXdp};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope};

use crate::host::netns;

/// One link as rtnetlink reports it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub up: bool,
    pub controller: Option<u32>,
    /// The XDP program attached to it (any mode).
    pub xdp_prog_id: Option<u32>,
    /// For a veth: its peer's index (IFLA_LINK), in the namespace `peer_netnsid` names (None:
    /// this namespace).
    pub peer_index: Option<u32>,
    pub peer_netnsid: Option<i32>,
    /// Its MAC address (Ethernet-like links).
    pub mac: Option<[u8; 6]>,
    /// It has carrier (IFF_LOWER_UP): its peer or cable is there and up.
    pub carrier: bool,
}

impl Link {
    pub fn is_veth(&self) -> bool {
        self.kind == Some(InfoKind::Veth)
    }
}

/// An rtnetlink session bound to the namespace it was opened in; its connection is a task on
/// the runtime that opened it (the daemon's one runtime), and ends when the session drops.
pub struct Netlink {
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens a session in the calling thread's namespace (the socket binds to it now). Must
    /// be called on a tokio runtime.
    pub fn open() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        let connection = tokio::spawn(conn);
        Ok(Netlink { handle, connection })
    }

    /// Opens a session bound to `ns`.
    pub fn open_in(ns: &File) -> Result<Netlink> {
        netns::within(ns, Netlink::open)
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let request = self.handle.link().get().match_name(name.to_string());
        self.get_link(request, name).await
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let request = self.handle.link().get().match_index(index);
        self.get_link(request, &format!("ifindex {index}")).await
    }

    async fn get_link(
        &self,
        request: rtnetlink::LinkGetRequest,
        what: &str,
    ) -> Result<Option<Link>> {
        let msg = match request.execute().try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(None)
            }
            Err(e) => return Err(anyhow!(e).context(format!("RTM_GETLINK {what}"))),
        };
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            up: msg.header.flags.contains(&LinkFlag::Up),
            controller: None,
            xdp_prog_id: None,
            peer_index: None,
            peer_netnsid: None,
            mac: None,
            carrier: msg.header.flags.contains(&LinkFlag::LowerUp),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::Link(l) => link.peer_index = Some(l),
                LinkAttribute::NetnsId(id) => link.peer_netnsid = Some(id),
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

    /// The ID this session's namespace uses for the namespace `ns` (RTM_GETNSID), if any.
    pub async fn nsid_of(&self, ns: &File) -> Result<Option<i32>> {
        use futures::StreamExt as _;
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
        use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
        use netlink_packet_route::RouteNetlinkMessage;
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut replies = self
            .handle
            .clone()
            .request(req)
            .map_err(|e| anyhow!(e).context("RTM_GETNSID"))?;
        let mut id = None;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    for attr in m.attributes {
                        if let NsidAttribute::Id(v) = attr {
                            id = (v >= 0).then_some(v);
                        }
                    }
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(anyhow!("RTM_GETNSID: {e}"));
                }
                _ => {}
            }
        }
        Ok(id)
    }

    async fn run<F, T>(&self, what: &str, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, rtnetlink::Error>>,
    {
        f.await.map_err(|e| anyhow!(e).context(what.to_string()))
    }

    pub async fn add_bridge(&self, name: &str) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("creating bridge {name}"), async move {
            h.link().add().bridge(name.to_string()).execute().await
        })
        .await
    }

    /// Creates a veth pair here and moves `peer` into `peer_ns`.
    pub async fn add_veth(&self, name: &str, peer: &str, peer_ns: &File) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("creating veth {name}/{peer}"), async move {
            h.link()
                .add()
                .veth(name.to_string(), peer.to_string())
                .execute()
                .await
        })
        .await?;
        let peer_link = self
            .link(peer)
            .await?
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
        .await
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run("setting a link up", async move {
            h.link().set(index).up().execute().await
        })
        .await
    }

    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<()> {
        let h = self.handle.clone();
        self.run("setting a link's MAC", async move {
            h.link().set(index).address(mac.to_vec()).execute().await
        })
        .await
    }

    pub async fn set_controller(&self, index: u32, controller: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run("adding a link to its bridge", async move {
            h.link().set(index).controller(controller).execute().await
        })
        .await
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run("deleting a link", async move {
            h.link().del(index).execute().await
        })
        .await
    }

    /// The kernel's messages for the addresses on link `index` (only `address`, if given).
    async fn address_messages(
        &self,
        index: u32,
        address: Option<IpAddr>,
    ) -> Result<Vec<AddressMessage>> {
        let h = self.handle.clone();
        self.run("RTM_GETADDR", async move {
            let mut req = h.address().get().set_link_index_filter(index);
            if let Some(address) = address {
                req = req.set_address_filter(address);
            }
            req.execute().try_collect().await
        })
        .await
    }

    /// Addresses on link `index`, with prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        for m in self.address_messages(index, None).await? {
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
    pub async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
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
        .await
    }

    pub async fn delete_address(&self, index: u32, net: IpNet) -> Result<()> {
        for m in self.address_messages(index, Some(net.addr())).await? {
            let h = self.handle.clone();
            self.run(&format!("deleting address {net}"), async move {
                h.address().del(m).execute().await
            })
            .await?;
        }
        Ok(())
    }

    /// Every route message of one family.
    async fn route_messages(
        &self,
        v6: bool,
    ) -> Result<Vec<netlink_packet_route::route::RouteMessage>> {
        let h = self.handle.clone();
        let version = if v6 {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        self.run("RTM_GETROUTE", async move {
            h.route().get(version).execute().try_collect().await
        })
        .await
    }

    /// Main-table unicast routes of one family: destination, gateway, output interface.
    pub async fn routes(&self, v6: bool) -> Result<Vec<(IpNet, Option<IpAddr>, Option<u32>)>> {
        let msgs = self.route_messages(v6).await?;
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

    pub async fn add_route(&self, to: IpNet, via: Option<IpAddr>, oif: u32) -> Result<()> {
        let h = self.handle.clone();
        self.run(&format!("adding route {to}"), async move {
            let req = h.route().add().output_interface(oif);
            match to {
                IpNet::V4(n) => {
                    let req = req.v4().destination_prefix(n.addr(), n.prefix_len());
                    match via {
                        Some(IpAddr::V4(g)) => req.gateway(g),
                        // Without a gateway, the destination is on the link.
                        _ => req.scope(RouteScope::Link),
                    }
                    .execute()
                    .await
                }
                IpNet::V6(n) => {
                    let req = req.v6().destination_prefix(n.addr(), n.prefix_len());
                    match via {
                        Some(IpAddr::V6(g)) => req.gateway(g),
                        _ => req,
                    }
                    .execute()
                    .await
                }
            }
        })
        .await
    }

    pub async fn delete_route(&self, to: IpNet, via: Option<IpAddr>) -> Result<()> {
        let msgs = self.route_messages(to.addr().is_ipv6()).await?;
        for m in msgs {
            let (dst, gw, _) = route_fields(&m);
            if dst == Some(to.addr())
                && m.header.destination_prefix_length == to.prefix_len()
                && gw == via
            {
                let h = self.handle.clone();
                self.run(&format!("deleting route {to}"), async move {
                    h.route().del(m).execute().await
                })
                .await?;
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

/// The far end of a veth: its namespace and index.
pub struct VethPeer {
    pub netns: File,
    pub netns_label: String,
    pub index: u32,
}

impl Netlink {
    /// Finds the namespace holding the peer of veth `local` (which lives in this session's
    /// namespace). Interface indexes repeat across namespaces (every new namespace's first
    /// veth is often ifindex 2), so a candidate is matched by identity: the kernel's ID for
    /// the candidate, seen from here, must equal the ID `local` names its peer's namespace by.
    pub async fn find_veth_peer(
        &self,
        local: &Link,
        candidates: Vec<(String, File)>,
    ) -> Result<Option<VethPeer>> {
        let Some(peer_index) = local.peer_index else {
            return Ok(None);
        };
        let Some(peer_nsid) = local.peer_netnsid else {
            // Both ends in this namespace.
            return Ok(Some(VethPeer {
                netns: netns::current_netns()?,
                netns_label: "(same namespace)".to_string(),
                index: peer_index,
            }));
        };
        for (label, ns) in candidates {
            if self.nsid_of(&ns).await? != Some(peer_nsid) {
                continue;
            }
            let there = Netlink::open_in(&ns)?;
            let facts = there.link_by_index(peer_index).await?;
            if facts.is_some_and(|f| f.is_veth()) {
                return Ok(Some(VethPeer {
                    netns: ns,
                    netns_label: label,
                    index: peer_index,
                }));
            }
        }
        Ok(None)
    }
}
