//! Redundant VIP hosts with real keepalived (VRRPv3, unicast peers): two daemons, each with
//! its own service namespace on one guest bridge, share the service and clock addresses. A
//! guest polls the clock address 20 times a second throughout; the master fails (its daemon
//! killed with -9, its daemon frozen with SIGSTOP, its keepalived killed), and the addresses
//! move to the standby. Measured (printed): the longest gap between answered requests;
//! asserted: no LI=3, no reply going backwards, a generous bound on the gap, and the old
//! master, back, stays standby (no second switch). Each host serves its own local stratum
//! (10, 11), so the guest can tell who answers. An IPv6 guest, routed to the IPv6 clock
//! address by router advertisements, goes through the daemon's kill -9, the lost host and
//! SIGTERM as well; every advertisement on its link must come from the host holding the
//! addresses.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::clients::{longest_gap, one_query, poll, poll_counting_at, Polled, Seen};
use integration_tests::topology::{Netns, ServeProcess};
use integration_tests::vip::{RouterAdvert, RouterAdverts};
use integration_tests::vrrp::mac_of;
use integration_tests::{ntp_xdp_bin, run, unique_name, CLOCK_V4, CLOCK_V6};
use ntp_common::packet::NtpHeader;

const SUBNET: u8 = 81;
/// The VIP hosts' own network, where VRRP speaks (guests are not on it).
const VRRP_SUBNET: u8 = 181;

/// Which clock address the guest polls.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    V4,
    /// The IPv6 clock address, routed by router advertisements (the hosts serve both).
    V6,
}

impl Family {
    fn clock(self) -> &'static str {
        match self {
            Family::V4 => CLOCK_V4,
            Family::V6 => CLOCK_V6,
        }
    }
}

/// Where VRRP speaks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum VrrpNet {
    /// A bridge of the VIP hosts' own, which guests cannot reach (the default topology).
    Dedicated,
    /// The guests' own link, with unicast peers (`redundancy.shared_network`).
    Shared,
}

/// One VIP host of the pair: its service namespace, veth and config (the daemons share the
/// test's "host" namespace and its bridge, standing for two machines on one guest network).
struct Host {
    netns: String,
    /// The guests' veth end in its namespace (where the responder is attached).
    ns_if: String,
    /// That veth's end on the guests' bridge, and the VRRP link's (dedicated link only):
    /// deleting them takes the host off both networks.
    host_if: String,
    vrrp_host_if: Option<String>,
    /// Its own address (the VRRP source).
    own: std::net::Ipv4Addr,
    config: PathBuf,
    stratum: u8,
    daemon: Option<ServeProcess>,
}

struct Pair {
    home: Netns,
    hosts: Vec<Host>,
    dir: PathBuf,
    /// The bridge the guests are on.
    guest_bridge: String,
    /// With uplinks: each host's own bridge joins the guests' through this veth end.
    uplinks: Vec<String>,
    vrrp: VrrpNet,
    vrid: u8,
}

impl Pair {
    /// Two VIP hosts on one guest bridge; with `with_uplinks`, each host has a bridge of its
    /// own joined to the guests' bridge by an uplink that its daemon tracks. `advert`: the
    /// advertisement interval, None for the default.
    fn start(with_uplinks: bool, advert: Option<&str>, vrrp: VrrpNet) -> Pair {
        Pair::start_serving(with_uplinks, advert, vrrp, Family::V4)
    }

    /// [`Pair::start`]; with [`Family::V6`], the hosts also serve the IPv6 clock address and
    /// route guests to it by router advertisements.
    fn start_serving(
        with_uplinks: bool,
        advert: Option<&str>,
        vrrp: VrrpNet,
        family: Family,
    ) -> Pair {
        let home = Netns::new("nth").unwrap();
        let new_bridge = || {
            let b = unique_name("nb");
            home.add_bridge(&b).unwrap();
            b
        };
        let guest_bridge = new_bridge();
        let vrrp_bridge = new_bridge();
        let mut uplinks = Vec::new();
        let dir = std::env::temp_dir().join(unique_name("ntpxdp-vrrp"));
        std::fs::create_dir_all(&dir).unwrap();
        let vrid = 100 + (std::process::id() % 100) as u8;
        let mut hosts = Vec::new();
        for i in 0..2u8 {
            let netns = unique_name("ntv");
            let (ns_if, host_if) = (unique_name("nv"), unique_name("nh"));
            let config = dir.join(format!("host{i}.toml"));
            let stratum = 10 + i;
            let (own, peer) = (2 + i, 3 - i);
            let vrrp_host_if = (vrrp == VrrpNet::Dedicated).then(|| unique_name("nr"));
            let vrrp_link = match vrrp {
                VrrpNet::Dedicated => format!(
                    "bridge = \"{vrrp_bridge}\"\ninterface = \"{}\"\nhost_interface = \"{}\"\n\
                     own_address = \"169.254.{VRRP_SUBNET}.{own}/24\"\n\
                     unicast_peers = [\"169.254.{VRRP_SUBNET}.{peer}\"]",
                    unique_name("nr"),
                    vrrp_host_if.as_deref().unwrap_or_default(),
                ),
                VrrpNet::Shared => format!(
                    "shared_network = true\nown_address = \"169.254.{SUBNET}.{own}/24\"\n\
                     unicast_peers = [\"169.254.{SUBNET}.{peer}\"]"
                ),
            };
            let (bridge, track) = if with_uplinks {
                let own = new_bridge();
                let (up, up_far) = (unique_name("nu"), unique_name("nu"));
                home.ip(&["link", "add", &up, "type", "veth", "peer", "name", &up_far])
                    .unwrap();
                home.ip(&["link", "set", &up, "master", &own, "up"])
                    .unwrap();
                home.ip(&["link", "set", &up_far, "master", &guest_bridge, "up"])
                    .unwrap();
                let track = format!("track_interfaces = [\"{up}\"]");
                uplinks.push(up);
                (own, track)
            } else {
                (guest_bridge.clone(), String::new())
            };
            let (addresses, ipv6) = match family {
                Family::V4 => (format!("\"{CLOCK_V4}\""), String::new()),
                Family::V6 => (
                    format!("\"{CLOCK_V4}\", \"{CLOCK_V6}\""),
                    format!(
                        "service_address6 = \"fd00:ec2:{SUBNET}::1/64\"\n\
                         ipv6_route_advertisements = true"
                    ),
                ),
            };
            std::fs::write(
                &config,
                format!(
                    r#"[service]
netns = "{netns}"
interface = "{ns_if}"
addresses = [{addresses}]
xdp_mode = "generic"

[clock]
local_stratum = {stratum}

[vip]
host_interface = "{host_if}"
bridge = "{bridge}"
service_address = "169.254.{SUBNET}.1/24"
repair_interval = "1s"
{ipv6}

[redundancy]
virtual_router_id = {vrid}
priority = {prio}
{advert}
{vrrp_link}
{track}

[limits]
enable = false

[metrics]
enable = false
"#,
                    prio = 150 - 50 * i,
                    advert = advert
                        .map(|a| format!("advert_interval = \"{a}\""))
                        .unwrap_or_default(),
                ),
            )
            .unwrap();
            let own_net = if vrrp == VrrpNet::Dedicated {
                VRRP_SUBNET
            } else {
                SUBNET
            };
            hosts.push(Host {
                own: std::net::Ipv4Addr::new(169, 254, own_net, own),
                ns_if,
                host_if,
                vrrp_host_if,
                netns,
                config,
                stratum,
                daemon: None,
            });
        }
        let mut pair = Pair {
            home,
            hosts,
            dir,
            guest_bridge,
            uplinks,
            vrrp,
            vrid,
        };
        for i in 0..2 {
            pair.start_daemon(i);
        }
        pair
    }

    fn ntp_user(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ntp_xdp_bin());
        cmd.args(args);
        integration_tests::vip::in_netns(cmd, &self.home).unwrap()
    }

    fn start_daemon(&mut self, i: usize) {
        let config = self.hosts[i].config.display().to_string();
        let cmd = self.ntp_user(&["run", "--config", &config]);
        self.hosts[i].daemon = Some(ServeProcess::spawn(cmd, "responder attached").unwrap());
    }

    fn status(&self, i: usize) -> serde_json::Value {
        let socket = format!("/run/ntp-xdp/{}/control.sock", self.hosts[i].netns);
        let out = run(Command::new(ntp_xdp_bin()).args(["status", "--socket", &socket, "--json"]))
            .unwrap();
        serde_json::from_str(&out).unwrap()
    }

    fn role(&self, i: usize) -> String {
        self.status(i)["vrrp"]["role"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until one master is elected (both start as BACKUP, without preemption): one
    /// daemon says master, the other backup, and the guest is answered by the master.
    fn elected(&self, guest: &Netns) -> usize {
        let mut master = usize::MAX;
        assert!(
            wait_until(Duration::from_secs(30), || {
                let roles = [self.role(0), self.role(1)];
                let Some(m) = roles.iter().position(|r| r == "master") else {
                    return false;
                };
                let answered = one_query(guest, CLOCK_V4)
                    .ok()
                    .flatten()
                    .and_then(|r| NtpHeader::parse(&r))
                    .map(|h| h.stratum);
                master = m;
                roles[1 - m] == "backup" && answered == Some(self.hosts[m].stratum)
            }),
            "no VIP host took the addresses"
        );
        master
    }

    fn add_guest(&self) -> Netns {
        self.add_guest_at(21)
    }

    /// A guest at 169.254.SUBNET.`octet`.
    fn add_guest_at(&self, octet: u8) -> Netns {
        let guest =
            integration_tests::vip::guest_on_bridge(&self.home, &self.guest_bridge).unwrap();
        integration_tests::vip::configure_guest(&guest, SUBNET, octet).unwrap();
        guest
    }

    /// The whole host `i` lost at once: its daemon, keepalived and radvd killed with -9
    /// (nothing resigns), then its veths deleted (the pinned responder goes with its
    /// interface).
    fn lose_host(&mut self, i: usize) {
        self.hosts[i].daemon.take().unwrap().kill9().unwrap();
        let state = format!("/run/ntp-xdp/{}", self.hosts[i].netns);
        for f in ["keepalived-vrrp.pid", "keepalived.pid", "radvd.pid"] {
            signal_pid_file(&format!("{state}/{f}"), nix::sys::signal::Signal::SIGKILL);
        }
        let h = &self.hosts[i];
        for link in std::iter::once(&h.host_if).chain(&h.vrrp_host_if) {
            self.home.ip(&["link", "del", link]).unwrap();
        }
    }

    /// The virtual addresses (IPv4 and IPv6) present on host `i`'s guest-side interface.
    fn held_addresses(&self, i: usize) -> Vec<String> {
        let h = &self.hosts[i];
        let out =
            run(Command::new("ip").args(["-n", &h.netns, "-j", "addr", "show", "dev", &h.ns_if]))
                .unwrap();
        let links: serde_json::Value = serde_json::from_str(&out).unwrap();
        let moving = [
            format!("169.254.{SUBNET}.1"),
            CLOCK_V4.to_string(),
            format!("fd00:ec2:{SUBNET}::1"),
            CLOCK_V6.to_string(),
            ntp_user::vip::radvd::shared_router_address(self.vrid).to_string(),
        ];
        links[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["local"].as_str())
            .filter(|a| moving.iter().any(|m| m == a))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            drop(h.daemon.take());
        }
        for h in &self.hosts {
            let config = h.config.display().to_string();
            let _ = self.ntp_user(&["down", "--config", &config]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// How the master fails.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Failure {
    /// kill -9 of its daemon (the pinned responder and keepalived live on; the health check
    /// fails, so keepalived gives the addresses up).
    DaemonKilled,
    /// SIGSTOP of its daemon: alive but frozen (the health check times out).
    DaemonFrozen,
    /// kill -9 of its keepalived (the addresses stay on its interface; the standby stops
    /// hearing it and takes them; the daemon starts a new keepalived, which releases them).
    KeepalivedKilled,
    /// Its uplink to the guests' network set down (the daemon tracks it: unhealthy, it gives
    /// the addresses up; the standby stops hearing it and takes them).
    UplinkDown,
    /// The whole host gone at once: daemon and keepalived killed with -9, its links (and the
    /// pinned responder on them) deleted. Nothing resigns: the standby takes over when it
    /// stops hearing adverts.
    HostLost,
}

#[test]
fn the_addresses_move_when_the_master_daemon_is_killed() {
    failover(Failure::DaemonKilled, Family::V4);
}

#[test]
fn the_addresses_move_when_the_master_daemon_is_frozen() {
    failover(Failure::DaemonFrozen, Family::V4);
}

#[test]
fn the_addresses_move_when_the_masters_keepalived_is_killed() {
    failover(Failure::KeepalivedKilled, Family::V4);
}

#[test]
fn the_addresses_move_when_the_masters_uplink_goes_down() {
    failover(Failure::UplinkDown, Family::V4);
}

/// With the default configuration, the standby answers well within the old 1 s default's
/// master-down interval (3.6 s) after the master's host vanishes.
#[test]
fn the_addresses_move_when_the_masters_whole_host_is_lost() {
    failover(Failure::HostLost, Family::V4);
}

/// An IPv6 guest, routed to the clock address by the master's router advertisements, through
/// the kill -9 of the master's daemon: the same figures as IPv4, and only the host holding the
/// addresses advertises a route.
#[test]
fn the_ipv6_clock_address_moves_when_the_master_daemon_is_killed() {
    failover(Failure::DaemonKilled, Family::V6);
}

/// The same when the master's whole host is lost.
#[test]
fn the_ipv6_clock_address_moves_when_the_masters_whole_host_is_lost() {
    failover(Failure::HostLost, Family::V6);
}

fn signal_pid_file(path: &str, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = std::fs::read_to_string(path) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}

/// Answers the guest must see after an event (three seconds of polling) before the test
/// judges what followed it.
const SETTLE_ANSWERS: u64 = 60;

/// Waits until the poller has counted `n` answers in all.
fn answered_at_least(answered: &AtomicU64, n: u64) -> bool {
    wait_until(Duration::from_secs(60), || {
        answered.load(Ordering::Relaxed) >= n
    })
}

/// The longest time between two answers the guest saw.
/// An IPv6 guest of the pair: it takes its address and the route to the IPv6 clock address
/// from router advertisements; returns once it is answered there by `master`. The capture of
/// every advertisement on its link starts first.
fn ipv6_guest(pair: &Pair, guest: &Netns, master: usize) -> RouterAdverts {
    let adverts = RouterAdverts::capture(guest, "eth0").unwrap();
    integration_tests::vip::accept_router_advertisements(guest).unwrap();
    let master_stratum = pair.hosts[master].stratum;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let addrs = guest
                .ip(&["-6", "addr", "show", "dev", "eth0"])
                .unwrap_or_default();
            !addrs.contains("tentative")
                && one_query(guest, CLOCK_V6)
                    .ok()
                    .flatten()
                    .and_then(|r| NtpHeader::parse(&r))
                    .is_some_and(|h| h.stratum == master_stratum)
        }),
        "the guest was not answered at {CLOCK_V6} by the master:\n{}\n{}",
        guest.ip(&["-6", "route"]).unwrap_or_default(),
        guest.ip(&["-6", "addr"]).unwrap_or_default()
    );
    adverts
}

/// Who sent each router advertisement, by its source link-layer address (`macs`: each host's
/// on the guests' link): once the new master has advertised, every one must have come from
/// the host that held the addresses then (`master` before `failed_at`, `standby` from
/// `moved_at` on; either in between), with the route to the IPv6 clock address.
fn check_adverts(
    capture: RouterAdverts,
    macs: [[u8; 6]; 2],
    (master, standby): (usize, usize),
    (failed_at, moved_at): (Instant, Instant),
) {
    let who = |ra: &RouterAdvert| {
        ra.source_mac
            .and_then(|m| macs.iter().position(|h| *h == m))
    };
    // The new master, asked every second, answers within a few.
    assert!(
        wait_until(Duration::from_secs(20), || {
            capture
                .received()
                .iter()
                .any(|ra| ra.at >= moved_at && who(ra) == Some(standby))
        }),
        "the new master sent no router advertisement"
    );
    let adverts = capture.finish().unwrap();
    eprintln!(
        "{} router advertisements, from (source, host) {:?}",
        adverts.len(),
        adverts
            .iter()
            .map(|ra| (ra.source, who(ra)))
            .collect::<std::collections::BTreeSet<_>>()
    );
    let clock: std::net::Ipv6Addr = CLOCK_V6.parse().unwrap();
    for ra in &adverts {
        let sender = who(ra);
        let holder = if ra.at < failed_at {
            vec![master]
        } else if ra.at >= moved_at {
            vec![standby]
        } else {
            vec![master, standby]
        };
        assert!(
            sender.is_some_and(|s| holder.contains(&s)),
            "a router advertisement from {:?} (host {sender:?}) {:?} after the failure, while \
             host {holder:?} held the addresses: {ra:?}",
            ra.source,
            ra.at.checked_duration_since(failed_at),
        );
        assert!(
            ra.routes.iter().any(|r| *r == (clock, 128, 1800)),
            "no route to {CLOCK_V6}: {ra:?}"
        );
    }
    assert!(
        adverts
            .iter()
            .any(|ra| who(ra) == Some(master) && ra.at < failed_at),
        "no router advertisement from the master before the failure: {adverts:?}"
    );
}

fn failover(failure: Failure, family: Family) {
    let uplinks = failure == Failure::UplinkDown;
    let mut pair = Pair::start_serving(uplinks, None, VrrpNet::Dedicated, family);
    let guest = pair.add_guest();
    let master = pair.elected(&guest);
    let standby = 1 - master;
    let macs = [0, 1].map(|i| mac_of(&pair.hosts[i].netns, &pair.hosts[i].ns_if).unwrap());
    let adverts = (family == Family::V6).then(|| ipv6_guest(&pair, &guest, master));

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let poller = poll_counting_at(&guest, family.clock(), stop.clone(), answered.clone());
    assert!(
        answered_at_least(&answered, SETTLE_ANSWERS),
        "the master did not answer the guest steadily"
    );
    let failed_at = Instant::now();
    let state = format!("/run/ntp-xdp/{}", pair.hosts[master].netns);
    let daemon_pid =
        nix::unistd::Pid::from_raw(pair.hosts[master].daemon.as_ref().unwrap().pid() as i32);
    match failure {
        Failure::DaemonKilled => pair.hosts[master].daemon.take().unwrap().kill9().unwrap(),
        Failure::DaemonFrozen => {
            nix::sys::signal::kill(daemon_pid, nix::sys::signal::Signal::SIGSTOP).unwrap()
        }
        Failure::KeepalivedKilled => {
            for f in ["keepalived-vrrp.pid", "keepalived.pid"] {
                signal_pid_file(&format!("{state}/{f}"), nix::sys::signal::Signal::SIGKILL);
            }
        }
        Failure::UplinkDown => {
            pair.home
                .ip(&["link", "set", &pair.uplinks[master], "down"])
                .unwrap();
        }
        Failure::HostLost => pair.lose_host(master),
    }
    let standby_stratum = pair.hosts[standby].stratum;
    let moved = wait_until(Duration::from_secs(20), || {
        one_query(&guest, family.clock())
            .ok()
            .flatten()
            .and_then(|r| NtpHeader::parse(&r))
            .is_some_and(|h| h.stratum == standby_stratum)
    });
    assert!(moved, "the standby never answered after {failure:?}");
    let moved_at = Instant::now();
    let moved_after = moved_at - failed_at;
    // The old master comes back: as standby, and the guest sees no second switch.
    match failure {
        Failure::DaemonKilled => pair.start_daemon(master),
        Failure::DaemonFrozen => {
            nix::sys::signal::kill(daemon_pid, nix::sys::signal::Signal::SIGCONT).unwrap()
        }
        // Its daemon restarts keepalived by itself.
        Failure::KeepalivedKilled => {}
        Failure::UplinkDown => {
            // Back only once the old master has noticed and given the addresses up: a link
            // that comes back sooner meets two masters, and VRRP keeps the higher priority
            // (README: when the hosts lose each other).
            assert!(
                wait_until(Duration::from_secs(10), || {
                    let s = pair.status(master);
                    s["vrrp"]["role"] == "backup"
                        && s["alarms"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|a| a["name"] == "vrrp_fault"))
                }),
                "the master kept the addresses with its uplink down, or raised no vrrp_fault"
            );
            pair.home
                .ip(&["link", "set", &pair.uplinks[master], "up"])
                .unwrap();
        }
        Failure::HostLost => {}
    }
    if failure != Failure::HostLost {
        assert!(
            wait_until(Duration::from_secs(30), || pair.role(master) == "backup"),
            "the old master did not come back as standby"
        );
    }
    // Three seconds of answers from here on show whether a second switch follows.
    let now = answered.load(Ordering::Relaxed);
    assert!(
        answered_at_least(&answered, now + SETTLE_ANSWERS),
        "the guest stopped being answered after the old master came back"
    );
    stop.store(true, Ordering::Relaxed);
    let Polled {
        seen,
        sent,
        duplicates,
        ..
    } = poller.join().unwrap();
    assert_eq!(duplicates, 0, "{duplicates} requests got two answers");

    let after_move: Vec<&Seen> = seen
        .iter()
        .skip_while(|s| s.stratum != standby_stratum)
        .collect();
    assert!(
        after_move.iter().all(|s| s.stratum == standby_stratum),
        "a second switch back to the old master"
    );
    assert!(seen.iter().all(|s| s.leap == 0), "a reply said LI=3");
    let gap = longest_gap(&seen);
    let backwards = seen
        .windows(2)
        .filter_map(|w| {
            let d = ntp_common::time::timestamp_diff_ns(w[1].transmit, w[0].transmit);
            (d < 0).then_some(-d)
        })
        .max()
        .unwrap_or(0);
    if let Some(adverts) = adverts {
        check_adverts(adverts, macs, (master, standby), (failed_at, moved_at));
    }
    eprintln!(
        "{failure:?} ({family:?}): {} of {sent} requests answered, longest gap {:?}, \
         standby answering {:?} after the failure, worst step back {} µs",
        seen.len(),
        gap,
        moved_after,
        backwards / 1000
    );
    // Both hosts serve this machine's clock: they disagree by microseconds at most.
    assert!(backwards < 1_000_000, "a reply went back {backwards} ns");
    // A lost host is noticed by the adverts' timers alone: well under the old default's
    // 3.6 s, with room for a loaded machine (the figure is in README).
    let bound = if failure == Failure::HostLost {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    assert!(gap < bound, "longest gap {gap:?}");
    if failure != Failure::HostLost {
        assert_eq!(pair.status(master)["vrrp"]["role"], "backup");
    }
    assert_eq!(pair.status(standby)["vrrp"]["role"], "master");
}

/// What `systemctl stop` does to the master: SIGTERM to the daemon, then (KillMode=mixed)
/// SIGKILL to whatever is left of the unit once the daemon has exited. The daemon stops
/// keepalived and waits for it: when the daemon has exited, the addresses are already off the
/// master, so they are never on two hosts; the standby takes over.
#[test]
fn sigterm_to_the_master_daemon_releases_the_addresses_before_it_exits() {
    sigterm_to_the_master(Family::V4);
}

/// The same for an IPv6 guest: the IPv6 addresses and the router address are released too,
/// and only the host holding them advertises the route.
#[test]
fn sigterm_to_the_master_daemon_releases_the_ipv6_addresses_before_it_exits() {
    sigterm_to_the_master(Family::V6);
}

fn sigterm_to_the_master(family: Family) {
    let mut pair = Pair::start_serving(false, None, VrrpNet::Dedicated, family);
    let guest = pair.add_guest();
    let master = pair.elected(&guest);
    let standby = 1 - master;
    let macs = [0, 1].map(|i| mac_of(&pair.hosts[i].netns, &pair.hosts[i].ns_if).unwrap());
    let adverts = (family == Family::V6).then(|| ipv6_guest(&pair, &guest, master));
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let poller = poll_counting_at(&guest, family.clock(), stop.clone(), answered.clone());
    assert!(answered_at_least(&answered, SETTLE_ANSWERS));
    if family == Family::V6 {
        let held = pair.held_addresses(master);
        assert_eq!(held.len(), 5, "the master holds {held:?}");
    }

    let daemon = pair.hosts[master].daemon.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    let state = format!("/run/ntp-xdp/{}", pair.hosts[master].netns);
    let vrrp_child = format!("{state}/keepalived-vrrp.pid");
    // A slow keepalived (a loaded machine): its VRRP process holds the release back until
    // the daemon has had half a second to exit without waiting for it.
    signal_pid_file(&vrrp_child, nix::sys::signal::Signal::SIGSTOP);
    let stopping = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exited = |pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        })
    };
    let exited_early = wait_until(Duration::from_millis(500), || exited(pid));
    signal_pid_file(&vrrp_child, nix::sys::signal::Signal::SIGCONT);
    assert!(
        !exited_early,
        "the daemon exited while keepalived still held the addresses"
    );
    // The moment it has exited (not reaped yet), systemd's SIGKILL to the rest of the unit.
    nix::sys::wait::waitid(
        nix::sys::wait::Id::Pid(pid),
        nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
    )
    .unwrap();
    let exited_after = stopping.elapsed();
    for f in ["keepalived-vrrp.pid", "keepalived.pid"] {
        signal_pid_file(&format!("{state}/{f}"), nix::sys::signal::Signal::SIGKILL);
    }
    let held = pair.held_addresses(master);
    assert!(
        daemon.stop().unwrap(),
        "the daemon did not exit cleanly on SIGTERM"
    );
    assert!(
        held.is_empty(),
        "the daemon exited with the master still holding {held:?}"
    );
    let standby_stratum = pair.hosts[standby].stratum;
    assert!(
        wait_until(Duration::from_secs(20), || pair.role(standby) == "master"),
        "the standby did not take the addresses"
    );
    let moved_at = Instant::now();
    let now = answered.load(Ordering::Relaxed);
    assert!(answered_at_least(&answered, now + SETTLE_ANSWERS));
    stop.store(true, Ordering::Relaxed);
    let Polled {
        seen,
        sent,
        duplicates,
        ..
    } = poller.join().unwrap();
    if let Some(adverts) = adverts {
        check_adverts(adverts, macs, (master, standby), (stopping, moved_at));
    }
    eprintln!(
        "SIGTERM ({family:?}): daemon exited {exited_after:?} after it, {} of {sent} requests \
         answered, longest gap {:?}",
        seen.len(),
        longest_gap(&seen)
    );
    assert_eq!(duplicates, 0, "{duplicates} requests got two answers");
    assert_eq!(seen.last().map(|s| s.stratum), Some(standby_stratum));
    assert!(pair.held_addresses(master).is_empty());
}

/// The master flooded by a guest for 60 s (bounded in time and count, open loop at one
/// generator thread's full rate) while another guest polls: with the default configuration,
/// the adverts and the health check keep up, so neither host changes role.
#[test]
fn a_flooded_master_keeps_the_addresses() {
    let pair = Pair::start(false, None, VrrpNet::Dedicated);
    let guest = pair.add_guest();
    let flooder = pair.add_guest_at(22);
    let master = pair.elected(&guest);
    let transitions = |i: usize| pair.status(i)["vrrp"]["transitions"].as_u64().unwrap_or(0);
    let before = [transitions(0), transitions(1)];

    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    let out = run(Command::new(integration_tests::ntp_loadgen_bin()).args([
        "run",
        "--netns",
        &flooder.name,
        "--target",
        &format!("{CLOCK_V4}:123"),
        "--rate",
        "1000000",
        "--duration",
        "60s",
        "--max-requests",
        "60000000",
    ]))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let Polled { seen, sent, .. } = poller.join().unwrap();
    let flood: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!(
        "flooded master: flood sent {} answered {} in {} s; polite guest {} of {sent} \
         answered, longest gap {:?}",
        flood["sent"],
        flood["valid"],
        flood["elapsed_s"],
        seen.len(),
        longest_gap(&seen)
    );
    assert!(
        flood["valid"].as_u64().unwrap_or(0) > 100_000,
        "the flood never reached the master: {flood}"
    );
    assert_eq!(
        [transitions(0), transitions(1)],
        before,
        "a role changed under the flood"
    );
    assert_eq!(pair.role(master), "master");
    assert_eq!(pair.role(1 - master), "backup");
    assert!(
        seen.iter().all(|s| s.stratum == pair.hosts[master].stratum),
        "a reply came from the standby: the addresses moved"
    );
}

/// A guest forges VRRPv3 adverts for the cluster's group while it polls the clock address 20
/// times a second: from its own address and (where VRRP has a link of its own) from each
/// peer's, to the multicast group and to each host's own MAC and address, claiming priority
/// 255 (take over) and 0 (the master resigns). The responder drops them where they arrive, so
/// the master keeps the addresses: no failover, no gap.
#[test]
fn forged_adverts_from_a_guest_move_nothing_on_a_dedicated_vrrp_link() {
    forged_adverts(VrrpNet::Dedicated);
}

/// The same on a shared network with unicast peers, without spoofing a peer's address (a
/// shared network trusts guests not to: README, Security model).
#[test]
fn forged_adverts_from_a_guest_move_nothing_on_a_shared_network() {
    forged_adverts(VrrpNet::Shared);
}

fn forged_adverts(net: VrrpNet) {
    use integration_tests::vrrp::{Advert, PacketSocket, VRRP_GROUP, VRRP_GROUP_MAC};
    use std::net::Ipv4Addr;

    let pair = Pair::start(false, Some("1s"), net);
    assert_eq!(pair.vrrp, net);
    let guest = pair.add_guest();
    let master = pair.elected(&guest);
    // keepalived checked health as the unprivileged user wherever that user can reach the
    // program (this checkout's path decides): the election needed that check to pass.
    let conf = std::fs::read_to_string(format!(
        "/run/ntp-xdp/{}/keepalived.conf",
        pair.hosts[master].netns
    ))
    .unwrap();
    let user =
        ntp_user::vip::keepalived::script_user(&std::fs::canonicalize(ntp_xdp_bin()).unwrap());
    eprintln!("keepalived's health check runs as {user}");
    assert!(
        conf.contains(&format!("script_user {user}\n")) && conf.contains("enable_script_security"),
        "{conf}"
    );
    let transitions = |i: usize| pair.status(i)["vrrp"]["transitions"].as_u64().unwrap_or(0);
    let before = [transitions(0), transitions(1)];

    let guest_addr = Ipv4Addr::new(169, 254, SUBNET, 21);
    let mut sources = vec![guest_addr];
    if net == VrrpNet::Dedicated {
        sources.extend(pair.hosts.iter().map(|h| h.own));
    }
    let mut destinations = vec![(VRRP_GROUP, VRRP_GROUP_MAC)];
    for h in &pair.hosts {
        destinations.push((h.own, mac_of(&h.netns, &h.ns_if).unwrap()));
    }
    let moving = vec![
        Ipv4Addr::new(169, 254, SUBNET, 1),
        CLOCK_V4.parse().unwrap(),
    ];
    let mut adverts = Vec::new();
    for &src in &sources {
        for &(dst, dst_mac) in &destinations {
            for priority in [255, 0] {
                adverts.push(Advert {
                    src,
                    dst,
                    dst_mac,
                    router_id: pair.vrid,
                    priority,
                    addresses: moving.clone(),
                });
            }
        }
    }
    let socket = PacketSocket::open(&guest, "eth0").unwrap();
    let guest_mac = mac_of(&guest.name, "eth0").unwrap();
    let frames: Vec<Vec<u8>> = adverts.iter().map(|a| a.frame(guest_mac)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    // Ten seconds of adverts every 100 ms: ten times the master-down interval at 1 s adverts.
    for _ in 0..100 {
        for f in &frames {
            socket.send(f).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let Polled { seen, sent, .. } = poller.join().unwrap();

    let gap = longest_gap(&seen);
    let dropped: Vec<u64> = (0..2)
        .map(|i| {
            pair.status(i)["responder"]["counters"]["dropped_vrrp"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect();
    eprintln!(
        "{net:?}: {} forged adverts sent, {} of {sent} requests answered, longest gap {gap:?}, \
         dropped_vrrp per host {dropped:?}",
        100 * frames.len(),
        seen.len()
    );
    // The attack reached the hosts and was refused there.
    assert!(
        dropped.iter().all(|&d| d > 0),
        "the forged adverts never reached a host's responder: {dropped:?}"
    );
    assert!(
        seen.iter().all(|s| s.stratum == pair.hosts[master].stratum),
        "a reply came from the standby: the addresses moved"
    );
    assert_eq!(pair.role(master), "master");
    assert_eq!(pair.role(1 - master), "backup");
    assert_eq!(
        [transitions(0), transitions(1)],
        before,
        "a role changed during the attack"
    );
    assert!(gap < Duration::from_secs(1), "longest gap {gap:?}");
}

/// `systemctl stop` of the master (the unit's ExecStop asked it to withdraw, then SIGTERM):
/// by the time its daemon has exited, keepalived has released the addresses (nothing is left
/// for systemd to SIGKILL), its responder serves nothing, and the standby answers.
#[test]
fn a_master_stopped_for_good_releases_the_addresses_before_it_exits() {
    let mut pair = Pair::start(false, None, VrrpNet::Dedicated);
    let guest = pair.add_guest();
    let master = pair.elected(&guest);
    let standby = 1 - master;
    let netns = pair.hosts[master].netns.clone();
    let state = format!("/run/ntp-xdp/{netns}");
    let keepalived: Vec<i32> = ["keepalived.pid", "keepalived-vrrp.pid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("{state}/{f}")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    assert!(!keepalived.is_empty(), "no keepalived pid files in {state}");
    std::fs::write(ntp_user::daemon::managed::withdraw_marker(&netns), b"").unwrap();
    let exited_cleanly = pair.hosts[master].daemon.take().unwrap().stop().unwrap();
    assert!(exited_cleanly, "the master's daemon did not exit cleanly");
    let alive: Vec<i32> = keepalived
        .iter()
        .copied()
        // Running (a zombie has exited; its new parent reaps it).
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        alive.is_empty(),
        "keepalived {alive:?} outlived the daemon that stopped it"
    );
    let held = integration_tests::ip(&[
        "-n",
        &netns,
        "addr",
        "show",
        "dev",
        &pair.hosts[master].ns_if,
    ])
    .unwrap();
    assert!(
        !held.contains(CLOCK_V4),
        "the stopped master still holds {CLOCK_V4}:\n{held}"
    );
    let standby_stratum = pair.hosts[standby].stratum;
    assert!(
        wait_until(Duration::from_secs(10), || {
            one_query(&guest, CLOCK_V4)
                .ok()
                .flatten()
                .and_then(|r| NtpHeader::parse(&r))
                .is_some_and(|h| h.stratum == standby_stratum)
        }),
        "the standby did not take over from the stopped master"
    );
}
