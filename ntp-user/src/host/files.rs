//! Small host IO shared by the daemon's parts: sockets bound to service addresses that may be
//! briefly missing, files replaced atomically and readable by root only, and where the daemon
//! keeps its state.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// Where the daemon keeps what it must remember across restarts for one namespace.
pub fn state_dir(netns: &str) -> PathBuf {
    Path::new("/run/ntp-xdp").join(netns)
}

/// A socket of `kind` bound to `addr`:`port`, with IP_FREEBIND (an alias that is briefly
/// missing, drift being repaired, must not stop the daemon), SO_REUSEADDR, and IPv6-only for
/// IPv6 addresses. `what` names it in errors.
pub fn bind_freebind(
    addr: IpAddr,
    port: u16,
    kind: nix::sys::socket::SockType,
    what: &str,
) -> Result<OwnedFd> {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag};
    use std::os::fd::AsRawFd as _;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None).context("socket()")?;
    setsockopt(&fd, sockopt::IpFreebind, &true).context("IP_FREEBIND")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("IPV6_V6ONLY")?;
    }
    let sa = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(addr, port));
    bind(fd.as_raw_fd(), &sa).with_context(|| format!("binding {addr} port {port} ({what})"))?;
    Ok(fd)
}

/// Writes `bytes` to `path` owner-only and atomically (a restart never reads half a file),
/// creating its directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}
