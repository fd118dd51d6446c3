//! Network namespaces and the facts about links the attach logic needs (over rtnetlink).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
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
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => facts.name = n,
                LinkAttribute::Link(l) => facts.link = Some(l),
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

/// Finds the namespace holding the peer of veth `local` (which lives in the calling thread's
/// namespace). Candidates are tried in order; a candidate matches when it has a veth at the
/// peer index whose own peer index is `local`'s.
pub fn find_veth_peer(
    local: &LinkFacts,
    candidates: Vec<(String, File)>,
) -> Result<Option<VethPeer>> {
    let Some(peer_index) = local.link else {
        return Ok(None);
    };
    for (label, ns) in candidates {
        let facts = within(&ns, || link_facts(None, Some(peer_index)))?;
        if let Some(f) = facts {
            if f.is_veth() && f.link == Some(local.index) {
                return Ok(Some(VethPeer {
                    netns: ns,
                    netns_label: label,
                    index: peer_index,
                }));
            }
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
