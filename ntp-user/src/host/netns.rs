//! Network namespaces and the facts about links the attach logic needs (over rtnetlink).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::RouteNetlinkMessage;
use nix::sched::{setns, CloneFlags};

/// Where `ip netns add NAME` puts a namespace.
pub fn named_netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A handle on the calling thread's current network namespace.
pub fn current_netns() -> Result<File> {
    File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")
}

pub fn open_named_netns(name: &str) -> Result<File> {
    let path = named_netns_path(name);
    File::open(&path).with_context(|| {
        format!(
            "network namespace {name:?} not found ({} cannot be opened)",
            path.display()
        )
    })
}

/// Moves the calling thread into `ns`.
pub fn enter(ns: &File) -> Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}

/// Runs `f` inside `ns` and comes back to the namespace the thread was in, even on error.
pub fn within<T>(ns: &File, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = current_netns()?;
    enter(ns)?;
    let result = f();
    enter(&home).context("returning to the original network namespace")?;
    result
}

/// What the attach logic needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer's namespace as an ID local to this namespace; absent when
    /// the peer is in this same namespace.
    pub link_netnsid: Option<i32>,
}

impl LinkFacts {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// Queries one link in the calling thread's namespace, by name or index.
pub fn link_facts(name: Option<&str>, index: Option<u32>) -> Result<Option<LinkFacts>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a netlink runtime")?;
    rt.block_on(async {
        // The socket binds to the namespace the thread is in now.
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        let task = tokio::spawn(conn);
        let mut request = handle.link().get();
        if let Some(name) = name {
            request = request.match_name(name.to_string());
        }
        if let Some(index) = index {
            request = request.match_index(index);
        }
        let reply = request.execute().try_next().await;
        task.abort();
        let msg = match reply {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => return Ok(None),
            Err(e) => return Err(anyhow!(e).context("RTM_GETLINK")),
        };
        let mut facts = LinkFacts {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            link: None,
            link_netnsid: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => facts.name = n,
                LinkAttribute::Link(l) => facts.link = Some(l),
                LinkAttribute::NetnsId(id) => facts.link_netnsid = Some(id),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            facts.kind = Some(match kind {
                                InfoKind::Veth => "veth".to_string(),
                                other => format!("{other:?}").to_lowercase(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Some(facts))
    })
}

/// The far end of a veth: its namespace and index.
pub struct VethPeer {
    pub netns: File,
    pub netns_label: String,
    pub index: u32,
}

/// The ID the calling thread's namespace uses for the namespace `ns` (RTM_GETNSID), if any.
pub fn nsid_of(ns: &File) -> Result<Option<i32>> {
    use std::os::fd::AsRawFd as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a netlink runtime")?;
    rt.block_on(async {
        let (conn, mut handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        let task = tokio::spawn(conn);
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut replies = handle
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
                    task.abort();
                    return Err(anyhow!("RTM_GETNSID: {e}"));
                }
                _ => {}
            }
        }
        task.abort();
        Ok(id)
    })
}

/// Finds the namespace holding the peer of veth `local` (which lives in the calling thread's
/// namespace). Interface indexes repeat across namespaces (every new namespace's first veth is
/// often ifindex 2), so a candidate is matched by identity: the kernel's ID for the candidate,
/// seen from here, must equal the ID `local` names its peer's namespace by.
pub fn find_veth_peer(
    local: &LinkFacts,
    candidates: Vec<(String, File)>,
) -> Result<Option<VethPeer>> {
    let Some(peer_index) = local.link else {
        return Ok(None);
    };
    let Some(peer_nsid) = local.link_netnsid else {
        // Both ends in this namespace.
        return Ok(Some(VethPeer {
            netns: current_netns()?,
            netns_label: "(same namespace)".to_string(),
            index: peer_index,
        }));
    };
    for (label, ns) in candidates {
        if nsid_of(&ns)? != Some(peer_nsid) {
            continue;
        }
        let facts = within(&ns, || link_facts(None, Some(peer_index)))?;
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

/// Every named namespace under /run/netns.
pub fn named_namespaces() -> Vec<(String, File)> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(f) = File::open(entry.path()) {
                out.push((name, f));
            }
        }
    }
    out
}
