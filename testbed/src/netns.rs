//! Network namespaces deleted on drop, the veths between them, bridges and guests on them.

use std::fs::File;
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};

use crate::{ip, unique_name, CLOCK_V4};

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace with a name unique to this process, made from `prefix`.
    pub fn new(prefix: &str) -> Result<Netns> {
        Self::create(unique_name(prefix))
    }

    /// A namespace with a fixed name (a demo's, that an operator may look for): one of that
    /// name left by an interrupted run is deleted first.
    pub fn named(name: &str) -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        Self::create(name.to_string())
    }

    fn create(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn file(&self) -> Result<File> {
        File::open(format!("/run/netns/{}", self.name)).context("opening the namespace")
    }

    /// A bridge named `name` in this namespace, up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it and with it the peer.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the network namespace `ns` (setns).
pub fn enter(ns: &File) -> Result<()> {
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}

/// `cmd` runs in `ns`'s network namespace, entered with setns only (same mount namespace, so
/// the bpffs and /run/ntp-xdp stay visible; `ip netns exec` would remount /sys).
pub fn in_netns(mut cmd: Command, ns: &Netns) -> Result<Command> {
    let ns = ns.file()?;
    // SAFETY: setns is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// Joins two namespaces with a veth: `a_addr` and `b_addr` are CIDR addresses.
pub fn link_namespaces(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> Result<()> {
    let a_if = unique_name("la");
    let b_if = unique_name("lb");
    ip(&[
        "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
        &b.name,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", &a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", &b_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    Ok(())
}

/// An upstream's namespace on 169.254.`subnet`.0/24, linked to `host` (which is .2): the
/// namespace and the upstream's address (.1).
pub fn upstream_namespace(host: &Netns, subnet: u8) -> Result<(Netns, String)> {
    let ns = Netns::new("ntu")?;
    link_namespaces(
        host,
        &format!("169.254.{subnet}.2/24"),
        &ns,
        &format!("169.254.{subnet}.1/24"),
    )?;
    Ok((ns, format!("169.254.{subnet}.1")))
}

/// A guest namespace whose `eth0` is a port of `bridge` in `home` (no address yet).
pub fn guest_on_bridge(home: &Netns, bridge: &str) -> Result<Netns> {
    plug_guest(Some(home), bridge, Netns::new("ntg")?)
}

/// Plugs `guest` into `bridge` (in `home`, or the machine's own namespace) through a veth:
/// the port on the bridge, `eth0` in the guest, both up.
pub fn plug_guest(home: Option<&Netns>, bridge: &str, guest: Netns) -> Result<Netns> {
    let port = unique_name("np");
    let mut add = vec!["link", "add", &port];
    if let Some(h) = home {
        add.extend(["netns", &h.name]);
    }
    add.extend(["type", "veth", "peer", "name", "eth0", "netns", &guest.name]);
    ip(&add)?;
    let on_bridge = ["link", "set", &port, "master", bridge, "up"];
    match home {
        Some(h) => h.ip(&on_bridge)?,
        None => ip(&on_bridge)?,
    };
    guest.ip(&["link", "set", "eth0", "up"])?;
    Ok(guest)
}

/// A guest's static address 169.254.SUBNET.OCTET/24 and its route to the clock address via
/// the service address 169.254.SUBNET.1, as DHCP would give them.
pub fn configure_guest(guest: &Netns, subnet: u8, octet: u8) -> Result<()> {
    guest.ip(&[
        "addr",
        "add",
        &format!("169.254.{subnet}.{octet}/24"),
        "dev",
        "eth0",
    ])?;
    guest.ip(&[
        "route",
        "add",
        &format!("{CLOCK_V4}/32"),
        "via",
        &format!("169.254.{subnet}.1"),
    ])?;
    Ok(())
}
