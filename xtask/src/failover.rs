//! `cargo xtask demo --failover`: two VIP hosts (each a daemon with its own service namespace
//! and keepalived) and a guest on one bridge; the guest polls the clock address 20 times a
//! second; the master's daemon is killed with -9; the longest gap the guest saw is printed.
//! Everything is removed afterwards. Namespaces `ntpxdp-fo-*`, addresses 169.254.90.0/24.

use std::net::UdpSocket;
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::{ip, plug_guest};

const HOME: &str = "ntpxdp-fo-home";
const GUEST: &str = "ntpxdp-fo-guest";
const BRIDGE: &str = "ntpxdp-fobr";
/// The VIP hosts' own network, where VRRP speaks (no guest is on it).
const VRRP_BRIDGE: &str = "ntpxdp-fovr";
const CLOCK: &str = "169.254.169.123";

/// Removes the demo's namespaces, daemons and pins, whatever state they are in.
struct Cleanup {
    bin: PathBuf,
    configs: Vec<PathBuf>,
    daemons: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = d.wait();
        }
        for c in &self.configs {
            let _ = in_home(&self.bin)
                .args(["down", "--config"])
                .arg(c)
                .output();
        }
        for ns in [GUEST, HOME] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `bin` run in the demo's host namespace (setns only: `ip netns exec` would remount /sys and
/// hide the bpffs the pins live in).
fn in_home(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    if let Ok(ns) = std::fs::File::open(format!("/run/netns/{HOME}")) {
        // SAFETY: setns is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(())
            });
        }
    }
    cmd
}

fn config(i: u8) -> String {
    format!(
        r#"[service]
netns = "ntpxdp-fo-{i}"
interface = "ntpxdp-fov{i}"
addresses = ["{CLOCK}"]
xdp_mode = "generic"
[clock]
local_stratum = {stratum}
[vip]
host_interface = "ntpxdp-foh{i}"
bridge = "{BRIDGE}"
service_address = "169.254.90.1/24"
[redundancy]
virtual_router_id = 90
priority = {prio}
advert_interval = "1s"
bridge = "{VRRP_BRIDGE}"
interface = "ntpxdp-for{i}"
host_interface = "ntpxdp-forh{i}"
own_address = "169.254.190.{own}/24"
unicast_peers = ["169.254.190.{peer}"]
[limits]
enable = false
[metrics]
enable = false
"#,
        stratum = 10 + i,
        prio = 150 - 50 * i,
        own = 2 + i,
        peer = 3 - i,
    )
}

/// One query from the guest, its transmit timestamp a cookie the answer must echo as its
/// origin (a late answer to an earlier query is not this one's): the answer's stratum.
fn query(sock: &UdpSocket, cookie: u64) -> Option<u8> {
    let mut req = [0u8; 48];
    req[0] = 0x23; // LI 0, version 4, mode 3
    req[40..48].copy_from_slice(&cookie.to_be_bytes());
    sock.send_to(&req, (CLOCK, 123)).ok()?;
    let mut buf = [0u8; 128];
    loop {
        let n = sock.recv(&mut buf).ok()?;
        if n >= 48 && buf[24..32] == cookie.to_be_bytes() {
            return (buf[0] & 7 == 4).then_some(buf[1]);
        }
    }
}

pub fn demo(bin: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join("ntpxdp-failover-demo");
    std::fs::create_dir_all(&dir)?;
    let configs: Vec<PathBuf> = (0..2u8)
        .map(|i| dir.join(format!("host{i}.toml")))
        .collect();
    for (i, path) in configs.iter().enumerate() {
        std::fs::write(path, config(i as u8))?;
    }
    let mut cleanup = Cleanup {
        bin: bin.to_path_buf(),
        configs: configs.clone(),
        daemons: Vec::new(),
    };
    // What an interrupted demo left (`down` of its configs, its namespaces).
    drop(Cleanup {
        bin: bin.to_path_buf(),
        configs: configs.clone(),
        daemons: vec![],
    });
    ip(&["netns", "add", HOME])?;
    ip(&["netns", "add", GUEST])?;
    ip(&["-n", HOME, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", HOME, "link", "set", BRIDGE, "up"])?;
    ip(&["-n", HOME, "link", "add", VRRP_BRIDGE, "type", "bridge"])?;
    ip(&["-n", HOME, "link", "set", VRRP_BRIDGE, "up"])?;
    for (i, path) in configs.iter().enumerate() {
        eprintln!("xtask: VIP host {i} (local stratum {})", 10 + i);
        let child = in_home(bin)
            .args(["run", "--config"])
            .arg(path)
            .env("NO_COLOR", "1")
            .stderr(Stdio::null())
            .spawn()
            .context("starting a daemon")?;
        cleanup.daemons.push(child);
    }
    plug_guest(Some(HOME), "ntpxdp-fog", BRIDGE, GUEST)?;
    ip(&[
        "-n",
        GUEST,
        "addr",
        "add",
        "169.254.90.21/24",
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        GUEST,
        "route",
        "add",
        &format!("{CLOCK}/32"),
        "via",
        "169.254.90.1",
    ])?;

    let guest = std::fs::File::open(format!("/run/netns/{GUEST}"))?;
    let poller = std::thread::spawn(move || -> Result<(Vec<(Instant, u8)>, u32)> {
        nix::sched::setns(guest.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(300)))?;
        // Until a master answers (30 s at most), then 20 s of polling at 20/s.
        let start = Instant::now();
        let mut cookie = 0x5eed_0000_0000_0000u64;
        while query(&sock, cookie).is_none() {
            cookie += 1;
            if start.elapsed() > Duration::from_secs(30) {
                bail!("no VIP host took the addresses within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let (mut seen, mut sent) = (Vec::new(), 0);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let t = Instant::now();
            sent += 1;
            cookie += 1;
            if let Some(stratum) = query(&sock, cookie) {
                seen.push((Instant::now(), stratum));
            }
            std::thread::sleep(Duration::from_millis(50).saturating_sub(t.elapsed()));
        }
        Ok((seen, sent))
    });
    // Give the poller time to find the master and poll a while, then kill the master.
    std::thread::sleep(Duration::from_secs(8));
    let master = in_home(bin)
        .args([
            "status",
            "--json",
            "--socket",
            "/run/ntp-xdp/ntpxdp-fo-0/control.sock",
        ])
        .output()
        .ok()
        .filter(|o| String::from_utf8_lossy(&o.stdout).contains("\"master\""))
        .map_or(1, |_| 0);
    eprintln!("xtask: killing the master's daemon (host {master}) with SIGKILL");
    cleanup.daemons[master].kill()?;
    cleanup.daemons[master].wait()?;
    let (seen, sent) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))??;
    let gap = seen
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    let switches = seen.windows(2).filter(|w| w[0].1 != w[1].1).count();
    println!(
        "failover: {} of {sent} requests answered, longest gap {:.0} ms, {switches} switch(es) \
         of the answering host",
        seen.len(),
        gap.as_secs_f64() * 1e3
    );
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("xtask: demo removed");
    Ok(())
}
