//! `cargo xtask demo --failover`: two VIP hosts (each a daemon with its own service namespace
//! and keepalived, default VRRP settings) and a guest on one bridge; the guest polls the clock
//! address 20 times a second; the master fails, twice over: its daemon killed with -9, then
//! (a fresh pair) its whole host lost: daemon and keepalived killed with -9 and its links
//! deleted, the pinned responder with them. One line each: what the guest saw. Everything is
//! removed afterwards. Namespaces `ntpxdp-fo-*`, addresses 169.254.90.0/24.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use testbed::netns::{in_netns, plug_guest, Netns};

const HOME: &str = "ntpxdp-fo-home";
const GUEST: &str = "ntpxdp-fo-guest";
const BRIDGE: &str = "ntpxdp-fobr";
/// The VIP hosts' own network, where VRRP speaks (no guest is on it).
const VRRP_BRIDGE: &str = "ntpxdp-fovr";
const CLOCK: &str = "169.254.169.123";

/// Stops the demo's daemons and removes what they made (`down` of their configs), then its
/// host namespace (the guest's is a guard of its own).
struct Cleanup {
    bin: PathBuf,
    configs: Vec<PathBuf>,
    daemons: Vec<Child>,
    home: Netns,
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
            if let Ok(mut down) = in_home(&self.bin, &self.home) {
                let _ = down.args(["down", "--config"]).arg(c).output();
            }
        }
    }
}

/// `bin` run in the demo's host namespace (setns only: `ip netns exec` would remount /sys and
/// hide the bpffs the pins live in).
fn in_home(bin: &Path, home: &Netns) -> Result<Command> {
    in_netns(Command::new(bin), home)
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

/// How the master fails.
#[derive(Clone, Copy)]
enum Failure {
    /// Its daemon killed with -9: keepalived's health check fails and it resigns; the pinned
    /// responder answers until the guests move.
    DaemonKilled,
    /// Daemon and keepalived killed with -9 and its links deleted: nothing resigns, the
    /// standby takes over when the adverts stop.
    HostLost,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::DaemonKilled => "daemon killed",
            Failure::HostLost => "host lost",
        }
    }
}

/// What the guest saw: each answer's arrival and stratum, the requests sent, and the
/// requests answered twice.
struct Seen {
    answers: Vec<(Instant, u8)>,
    sent: u64,
    duplicates: u64,
}

/// A request goes out every 50 ms whatever became of the earlier ones (each its cookie in the
/// transmit timestamp, echoed as the answer's origin); one counts as answered within 500 ms.
/// Waits for a first answer (30 s at most), then polls for `span`; `answered` counts answers.
fn poll(span: Duration, answered: &AtomicU64) -> Result<Seen> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(2)))?;
    let mut req = [0u8; 48];
    req[0] = 0x23; // LI 0, version 4, mode 3
    let mut cookie = 0x5eed_0000_0000_0000u64;
    let mut buf = [0u8; 128];
    let start = Instant::now();
    let mut answer = |sock: &UdpSocket, cookie: u64| -> Option<u8> {
        req[40..48].copy_from_slice(&cookie.to_be_bytes());
        sock.send_to(&req, (CLOCK, 123)).ok()?;
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .ok()?;
        // An answer to an earlier request that came late is read past: otherwise each read
        // would take the one before and the loop would stay one answer behind.
        let stratum = loop {
            let got = sock.recv(&mut buf).ok()?;
            if got >= 48 && buf[24..32] == cookie.to_be_bytes() && buf[0] & 7 == 4 {
                break buf[1];
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(2))).ok()?;
        Some(stratum)
    };
    while answer(&sock, cookie).is_none() {
        cookie += 1;
        if start.elapsed() > Duration::from_secs(30) {
            bail!("no VIP host took the addresses within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    sock.set_read_timeout(Some(Duration::from_millis(2)))?;
    let mut seen = Seen {
        answers: Vec::new(),
        sent: 0,
        duplicates: 0,
    };
    // Cookie → when it went out, and whether it was answered.
    let mut in_flight: HashMap<u64, (Instant, bool)> = HashMap::new();
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < span || !in_flight.is_empty() {
        let now = Instant::now();
        if now >= next && start.elapsed() < span {
            cookie += 1;
            seen.sent += 1;
            req[40..48].copy_from_slice(&cookie.to_be_bytes());
            let _ = sock.send_to(&req, (CLOCK, 123));
            in_flight.insert(cookie, (now, false));
            next = (next + Duration::from_millis(50)).max(now);
        }
        if let Ok(n) = sock.recv(&mut buf) {
            let origin = u64::from_be_bytes(buf[24..32].try_into().expect("8 bytes"));
            if n >= 48 && buf[0] & 7 == 4 {
                if let Some((_, answered_before)) = in_flight.get_mut(&origin) {
                    if *answered_before {
                        seen.duplicates += 1;
                    } else {
                        *answered_before = true;
                        seen.answers.push((Instant::now(), buf[1]));
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // Kept 500 ms: a late answer, or a second one, still counts.
        in_flight.retain(|_, (sent, _)| sent.elapsed() < Duration::from_millis(500));
    }
    Ok(seen)
}

pub fn demo(bin: &Path) -> Result<()> {
    for failure in [Failure::DaemonKilled, Failure::HostLost] {
        let line = fail_over(bin, failure)?;
        println!("{line}");
    }
    Ok(())
}

/// Two VIP hosts and a guest; the master fails as `failure` says; what the guest saw.
fn fail_over(bin: &Path, failure: Failure) -> Result<String> {
    let dir = std::env::temp_dir().join("ntpxdp-failover-demo");
    std::fs::create_dir_all(&dir)?;
    let configs: Vec<PathBuf> = (0..2u8)
        .map(|i| dir.join(format!("host{i}.toml")))
        .collect();
    for (i, path) in configs.iter().enumerate() {
        std::fs::write(path, config(i as u8))?;
    }
    // What an interrupted demo left: `down` of its configs in its host namespace, which
    // goes with them.
    if Path::new("/run/netns").join(HOME).exists() {
        drop(Cleanup {
            bin: bin.to_path_buf(),
            configs: configs.clone(),
            daemons: vec![],
            home: Netns { name: HOME.into() },
        });
    }
    let mut cleanup = Cleanup {
        bin: bin.to_path_buf(),
        configs: configs.clone(),
        daemons: Vec::new(),
        home: Netns::named(HOME)?,
    };
    cleanup.home.add_bridge(BRIDGE)?;
    cleanup.home.add_bridge(VRRP_BRIDGE)?;
    for (i, path) in configs.iter().enumerate() {
        eprintln!("xtask: VIP host {i} (local stratum {})", 10 + i);
        let child = in_home(bin, &cleanup.home)?
            .args(["run", "--config"])
            .arg(path)
            .env("NO_COLOR", "1")
            .stderr(Stdio::null())
            .spawn()
            .context("starting a daemon")?;
        cleanup.daemons.push(child);
    }
    let guest = plug_guest(Some(&cleanup.home), BRIDGE, Netns::named(GUEST)?)?;
    guest.ip(&["addr", "add", "169.254.90.21/24", "dev", "eth0"])?;
    guest.ip(&[
        "route",
        "add",
        &format!("{CLOCK}/32"),
        "via",
        "169.254.90.1",
    ])?;

    let guest_ns = guest.file()?;
    let answered = Arc::new(AtomicU64::new(0));
    let poller = {
        let answered = answered.clone();
        std::thread::spawn(move || -> Result<Seen> {
            nix::sched::setns(guest_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            poll(Duration::from_secs(15), &answered)
        })
    };
    // Three seconds of answers from the master first (45 s at most: election, then polling).
    let waiting = Instant::now();
    while answered.load(Ordering::Relaxed) < 60 {
        if poller.is_finished() || waiting.elapsed() > Duration::from_secs(45) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let master = in_home(bin, &cleanup.home)?
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
    eprintln!("xtask: the master is host {master}: {}", failure.name());
    cleanup.daemons[master].kill()?;
    cleanup.daemons[master].wait()?;
    if let Failure::HostLost = failure {
        let state = format!("/run/ntp-xdp/ntpxdp-fo-{master}");
        for f in ["keepalived-vrrp.pid", "keepalived.pid"] {
            let pid = std::fs::read_to_string(format!("{state}/{f}")).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for link in [
            format!("ntpxdp-foh{master}"),
            format!("ntpxdp-forh{master}"),
        ] {
            cleanup.home.ip(&["link", "del", &link])?;
        }
    }
    let seen = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))??;
    let gap = seen
        .answers
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    let switches = seen.answers.windows(2).filter(|w| w[0].1 != w[1].1).count();
    drop(guest);
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "failover ({}): {} of {} answered, longest gap {:.0} ms, {switches} switch(es) of the \
         answering host, {} duplicate answer(s)",
        failure.name(),
        seen.answers.len(),
        seen.sent,
        gap.as_secs_f64() * 1e3,
        seen.duplicates
    ))
}
