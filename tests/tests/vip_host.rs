//! The VIP host as the daemon builds it: its own namespace, veth, bridge, addresses and routes
//! (created with rtnetlink by the daemon, not by the test), DHCP option 121 from a real dnsmasq
//! to a real DHCP client, isolation, drift repair, hitless restarts and `down`.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::clients::{chronyd_query, ntpdig, sequential_queries};
use integration_tests::vip::{VipHost, VipOptions};
use integration_tests::{ip, CLOCK_V4};

#[test]
fn guest_learns_the_clock_route_by_dhcp_and_syncs_through_it() {
    let vip = VipHost::start(VipOptions {
        subnet: 61,
        dhcp: true,
        ..Default::default()
    })
    .unwrap();
    let guest = vip.add_guest().unwrap();
    let lease = vip.dhcp_lease(&guest).unwrap();
    eprintln!("{lease}");
    let routes = guest.ip(&["route"]).unwrap();
    // Option 121: the clock address via the service address, and the default route (RFC 3442
    // clients ignore option 3 when 121 is present).
    assert!(
        routes.contains(&format!("{CLOCK_V4} via {}", vip.service_v4())),
        "no clock route from DHCP:\n{routes}"
    );
    assert!(
        routes.contains(&format!("default via 169.254.{}.254", vip.subnet)),
        "no default route from option 121:\n{routes}"
    );
    assert!(lease.contains(&format!("ntpsrv=[{CLOCK_V4}]")), "{lease}");

    let m = chronyd_query(&guest, CLOCK_V4).unwrap();
    assert!(m.tests_passed, "{m:?}");
    assert_eq!(m.stratum, 10);
    assert!(m.offset_s.abs() < 0.01, "{m:?}");
    let d = ntpdig(&guest, CLOCK_V4).unwrap();
    assert_eq!(d.stratum, 10);
}

#[test]
fn the_namespace_forwards_nothing_from_guests_to_the_host() {
    // A long repair interval: the control half of the test turns forwarding on by hand.
    let vip = VipHost::start(VipOptions {
        subnet: 62,
        repair_interval: "1h",
        ..Default::default()
    })
    .unwrap();
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 20).unwrap();
    // A host address, reachable from the namespace over the veth (the bridge holds it), and
    // a guest that routes it via the service address, as an attacker would.
    let host_addr = "169.254.162.1";
    vip.home
        .ip(&[
            "addr",
            "add",
            &format!("{host_addr}/32"),
            "dev",
            &vip.bridge,
        ])
        .unwrap();
    vip.ns_ip(&[
        "route",
        "add",
        &format!("{host_addr}/32"),
        "dev",
        &vip.ns_if,
    ])
    .unwrap();
    guest
        .ip(&[
            "route",
            "add",
            &format!("{host_addr}/32"),
            "via",
            &vip.service_v4(),
        ])
        .unwrap();
    let reached = |vip: &VipHost| -> usize {
        let listener = {
            let home = vip.home.file().unwrap();
            std::thread::spawn(move || {
                ntp_user::host::netns::enter(&home).unwrap();
                let s = UdpSocket::bind((host_addr, 9999)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(1500)))
                    .unwrap();
                let mut n = 0;
                let mut buf = [0u8; 64];
                while s.recv(&mut buf).is_ok() {
                    n += 1;
                }
                n
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let g = guest.file().unwrap();
        std::thread::spawn(move || {
            ntp_user::host::netns::enter(&g).unwrap();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..5 {
                let _ = s.send_to(b"reach the host?", (host_addr, 9999));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .join()
        .unwrap();
        listener.join().unwrap()
    };
    let forwarding = integration_tests::run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &vip.netns,
        "sysctl",
        "-n",
        "net.ipv4.ip_forward",
    ]))
    .unwrap();
    assert_eq!(forwarding.trim(), "0", "the daemon left forwarding on");
    assert_eq!(
        reached(&vip),
        0,
        "a guest reached a host address through the namespace"
    );

    // Control: with forwarding on, the same packets do reach the host, so the path exists and
    // only the daemon's setting closes it.
    integration_tests::run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &vip.netns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]))
    .unwrap();
    assert!(
        reached(&vip) > 0,
        "the control path does not work; the test proves nothing"
    );
}

#[test]
fn drift_is_repaired_and_logged() {
    let mut vip = VipHost::start(VipOptions {
        subnet: 63,
        ..Default::default()
    })
    .unwrap();
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 21).unwrap();
    ntpdig(&guest, CLOCK_V4).unwrap();

    let route = vip.configured_route();
    assert!(vip.ns_ip(&["route"]).unwrap().contains(&route));
    vip.ns_ip(&["addr", "del", &format!("{CLOCK_V4}/32"), "dev", &vip.ns_if])
        .unwrap();
    vip.ns_ip(&["route", "del", &route]).unwrap();
    vip.home
        .ip(&["link", "set", &vip.host_if, "nomaster"])
        .unwrap();
    vip.ns_ip(&["link", "set", &vip.ns_if, "down"]).unwrap();
    let wanted = [
        format!("added address {CLOCK_V4}/32"),
        format!("added route {route}"),
        format!("set {} up", vip.ns_if),
        format!("added {} to bridge", vip.host_if),
    ];
    // The state can be visible a moment before the repair pass logs it: collect the log
    // while waiting for both.
    let mut log = String::new();
    let repaired = VipHost::wait_until(Duration::from_secs(10), || {
        let addrs = vip.ns_ip(&["addr", "show", "dev", &vip.ns_if])?;
        let routes = vip.ns_ip(&["route"])?;
        let host_end = vip.home.ip(&["link", "show", &vip.host_if])?;
        for line in vip.daemon()?.drain_log() {
            log.push_str(&line);
            log.push('\n');
        }
        Ok(addrs.contains(&format!("{CLOCK_V4}/32"))
            && addrs.contains("state UP")
            && routes.contains(&route)
            && host_end.contains(&format!("master {}", vip.bridge))
            && wanted.iter().all(|w| log.contains(w)))
    })
    .unwrap();
    for what in &wanted {
        assert!(log.contains(what), "no repair logged for {what:?}:\n{log}");
    }
    assert!(repaired, "drift not repaired within 10 s");
    ntpdig(&guest, CLOCK_V4).unwrap();

    // The veth deleted outright: recreated, re-attached from the pinned program, serving.
    vip.home.ip(&["link", "del", &vip.host_if]).unwrap();
    let back = VipHost::wait_until(Duration::from_secs(10), || {
        Ok(vip
            .ns_ip(&["link", "show", &vip.ns_if])
            .is_ok_and(|s| s.contains("prog/xdp")))
    })
    .unwrap();
    assert!(
        back,
        "the responder was not re-attached to a recreated veth"
    );
    let answered = VipHost::wait_until(Duration::from_secs(10), || {
        Ok(ntpdig(&guest, CLOCK_V4).is_ok())
    })
    .unwrap();
    let log = vip.daemon().unwrap().drain_log().join("\n");
    assert!(
        answered,
        "no answer after the veth was recreated\nguest neighbours: {}\nnamespace end: {}\n{log}",
        guest.ip(&["neigh"]).unwrap_or_default(),
        vip.ns_ip(&["link", "show", &vip.ns_if]).unwrap_or_default(),
    );
    assert!(log.contains("re-attached the responder"), "{log}");
}

/// What `down` must restore: whether the service namespace exists, the links of the host
/// namespace, and this instance's pins, state and dnsmasq. (Only this daemon's: tests run in
/// parallel, and others' namespaces and pins come and go meanwhile.)
#[derive(Debug, PartialEq)]
struct HostState {
    netns_exists: bool,
    host_links: Vec<String>,
    pins_exist: bool,
    state_exists: bool,
    dnsmasq_running: bool,
}

fn host_state(vip: &VipHost) -> HostState {
    let netns_exists = ip(&["netns", "list"])
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(vip.netns.as_str()));
    let mut host_links: Vec<String> = vip
        .home
        .ip(&["-br", "link"])
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    host_links.sort();
    let dnsmasq_running = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&format!("/{}/dnsmasq", vip.netns)))
    });
    HostState {
        netns_exists,
        host_links,
        pins_exist: ntp_user::responder::pin_dir(&vip.netns).exists(),
        state_exists: ntp_user::host::files::state_dir(&vip.netns).exists(),
        dnsmasq_running,
    }
}

#[test]
fn restarts_and_kill_9_lose_no_request_and_down_leaves_the_host_as_it_was() {
    // The home namespace exists before the daemon: its state then is the baseline.
    let mut vip = VipHost::start(VipOptions {
        subnet: 64,
        xdp_mode: "native",
        dhcp: true,
        // One guest asks as fast as it can: no per-source limit.
        clock_toml: "[limits]\nenable = false\n".into(),
        ..Default::default()
    })
    .unwrap();
    vip.stop_daemon().unwrap();
    vip.down().unwrap();
    let before = host_state(&vip);
    assert!(
        !before.netns_exists && !before.pins_exist && !before.state_exists,
        "{before:?}"
    );

    vip.start_daemon().unwrap();
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 22).unwrap();
    ntpdig(&guest, CLOCK_V4).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (g, stop) = (guest.file().unwrap(), stop.clone());
        std::thread::spawn(move || {
            sequential_queries(g, CLOCK_V4, u64::MAX, Duration::from_secs(90), &stop)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // A clean restart (an upgrade), then a crash.
    assert!(vip.stop_daemon().unwrap(), "daemon exited with an error");
    std::thread::sleep(Duration::from_millis(500));
    let adopted = vip.start_daemon().unwrap().attached.clone();
    std::thread::sleep(Duration::from_millis(500));
    vip.kill_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after_crash = vip.start_daemon().unwrap().attached.clone();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let tally = client.join().unwrap();
    eprintln!(
        "{} replies, {} lost, {} unsynchronized",
        tally.answered, tally.lost, tally.unsynchronized
    );
    for line in [&adopted, &after_crash] {
        assert!(
            line.contains("adopted_anchor=true") && line.contains("links=\"adopted\""),
            "the new daemon did not adopt the pinned responder: {line}"
        );
    }
    assert!(
        tally.answered > 100,
        "too few requests to mean anything: {tally:?}"
    );
    assert_eq!(tally.lost, 0, "requests went unanswered across restarts");
    assert_eq!(tally.unsynchronized, 0);
    assert!(tally.backwards.is_empty(), "{:?}", tally.backwards);

    // `down` refuses while the daemon runs, then removes exactly what was made.
    let refused = vip.down().unwrap_err().to_string();
    assert!(refused.contains("still running"), "{refused}");
    vip.stop_daemon().unwrap();
    let out = vip.down().unwrap();
    eprintln!("{out}");
    drop(guest); // its bridge port goes with it (the kernel removes it asynchronously)
    let mut after = host_state(&vip);
    VipHost::wait_until(Duration::from_secs(5), || {
        after = host_state(&vip);
        Ok(after == before)
    })
    .unwrap();
    assert_eq!(before, after, "down left the host different:\n{out}");
}

#[test]
fn guest_config_prints_a_host_route_and_client_snippets_chrony_accepts() {
    let vip = VipHost::start(VipOptions {
        subnet: 65,
        ..Default::default()
    })
    .unwrap();
    let config = vip.config.to_string_lossy().into_owned();
    let out = integration_tests::run(
        &mut vip
            .ntp_user(&["guest-config", "--config", &config])
            .unwrap(),
    )
    .unwrap();
    assert!(
        out.contains(&format!(
            "destination={CLOCK_V4}/32,gateway={}",
            vip.service_v4()
        )),
        "{out}"
    );
    // The chrony lines parse as chrony configuration (-p prints it and exits).
    let chrony: String = out
        .lines()
        .filter(|l| l.starts_with("server "))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = std::env::temp_dir().join(integration_tests::unique_name("guestconf"));
    std::fs::write(&file, &chrony).unwrap();
    let parsed = integration_tests::run(
        std::process::Command::new("chronyd")
            .arg("-p")
            .arg("-f")
            .arg(&file),
    );
    let _ = std::fs::remove_file(&file);
    let parsed = parsed.unwrap();
    assert!(parsed.contains(&format!("server {CLOCK_V4}")), "{parsed}");
}

#[test]
fn a_restarted_daemon_continues_its_disciplined_clock_without_a_jump() {
    use integration_tests::topology::ChronyServer;
    // The VIP host's upstream: a chronyd on an address of the host namespace.
    let upstream = "169.254.166.1";
    let mut vip = VipHost::start(VipOptions {
        subnet: 66,
        clock_toml: format!(
            "[clock]\nmin_poll = 1\nmax_poll = 4\nmax_holdover = \"1m\"\n\n\
             [limits]\nenable = false\n\n\
             [[upstream]]\naddress = \"{upstream}\"\n"
        ),
        ..Default::default()
    })
    .unwrap();
    vip.home
        .ip(&["addr", "add", &format!("{upstream}/32"), "dev", "lo"])
        .unwrap();
    let _chrony = ChronyServer::start(&vip.home, 3).unwrap();
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 23).unwrap();
    let synced = VipHost::wait_until(Duration::from_secs(40), || {
        Ok(ntpdig(&guest, CLOCK_V4).is_ok_and(|d| d.stratum == 4))
    })
    .unwrap();
    assert!(synced, "the daemon never synchronized to its upstream");

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (g, stop) = (guest.file().unwrap(), stop.clone());
        std::thread::spawn(move || {
            sequential_queries(g, CLOCK_V4, u64::MAX, Duration::from_secs(60), &stop)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    vip.kill_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vip.start_daemon().unwrap();
    vip.daemon()
        .unwrap()
        .wait_for_line("continuing the clock", Duration::from_secs(5))
        .unwrap();
    // Long enough for the new daemon's first corrections from the upstream.
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    let tally = client.join().unwrap();
    eprintln!(
        "{} replies, {} lost, {} unsynchronized",
        tally.answered, tally.lost, tally.unsynchronized
    );
    assert_eq!(tally.lost, 0);
    assert_eq!(
        tally.unsynchronized, 0,
        "guests saw LI=3 while the new daemon re-synchronized"
    );
    assert!(tally.backwards.is_empty(), "{:?}", tally.backwards);
    let m = chronyd_query(&guest, CLOCK_V4).unwrap();
    assert_eq!(m.stratum, 4);
    assert!(m.offset_s.abs() < 0.001, "{m:?}");
}

#[test]
fn physical_hosts_are_served_on_a_host_interface_by_the_same_responder() {
    let vip = VipHost::start(VipOptions {
        subnet: 67,
        physical_host: true,
        ..Default::default()
    })
    .unwrap();
    let (physical, addr, host_if) = vip.physical.as_ref().unwrap();
    // The host interface itself carries the responder (generic: its veth peer is not ours),
    // and the VIP host's namespace has no socket on port 123: the answers come from XDP.
    let link = vip.home.ip(&["link", "show", host_if]).unwrap();
    assert!(
        link.contains("prog/xdp") || link.contains("xdpgeneric"),
        "{link}"
    );
    let sockets = integration_tests::run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &vip.home.name,
        "ss",
        "-uan",
    ]))
    .unwrap();
    assert!(
        !sockets.contains(":123 "),
        "an NTP socket in the host namespace:\n{sockets}"
    );
    let d = ntpdig(physical, addr).unwrap();
    assert_eq!(d.stratum, 10);
    let m = chronyd_query(physical, addr).unwrap();
    assert!(m.tests_passed, "{m:?}");
}

#[test]
fn host_clock_mode_follows_the_kernels_synchronization_flag() {
    use integration_tests::clients::one_query;
    use ntp_user::host::hostclock::kernel_clock_state;
    // reference = "host-clock": the host clock is disciplined by someone else (chrony, PTP),
    // so what the kernel says of it is what guests are told.
    let vip = VipHost::start(VipOptions {
        subnet: 67,
        clock_toml: "[clock]\nreference = \"host-clock\"\nstratum = 2\nrefid = \"PTP\"\n".into(),
        ..Default::default()
    })
    .unwrap();
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 21).unwrap();
    let before = kernel_clock_state().unwrap();
    let reply = one_query(&guest, CLOCK_V4).unwrap().expect("no reply");
    let after = kernel_clock_state().unwrap();
    assert_eq!(
        before.synchronized, after.synchronized,
        "the kernel's state changed meanwhile"
    );
    eprintln!("kernel clock: {before:?}");
    let li = reply[0] >> 6;
    if before.synchronized {
        assert_eq!((li, reply[1], &reply[12..16]), (0, 2, &b"PTP\0"[..]));
        // Root dispersion: the kernel's maximum error (µs → NTP short format), which grows
        // by 500 ppm between the daemon's updates of the kernel clock by its owner.
        let disp_us = u32::from_be_bytes(reply[8..12].try_into().unwrap()) as f64 / 65.536;
        assert!(
            (disp_us - before.max_error_us as f64).abs() <= 1_000.0 + 0.0005 * 2e6,
            "dispersion {disp_us} µs, kernel max error {} µs",
            before.max_error_us
        );
    } else {
        assert_eq!((li, reply[1], &reply[12..16]), (3, 0, &b"INIT"[..]));
    }
}

/// Every repair restores the whole service, not only the responder: after the service
/// namespace is deleted underneath the daemon, and after the veth is deleted, a new guest
/// gets a DHCP lease (dnsmasq follows into the new plumbing) and a request with a MAC tail is
/// answered (the userspace path's sockets are bound again in the new namespace).
#[test]
fn repairs_restore_dhcp_and_the_userspace_path() {
    use integration_tests::clients::one_query_with_tail;
    let mut vip = VipHost::start(VipOptions {
        subnet: 68,
        dhcp: true,
        ..Default::default()
    })
    .unwrap();
    let first = vip.add_guest().unwrap();
    vip.dhcp_lease(&first).unwrap();
    assert!(one_query_with_tail(&first, CLOCK_V4, 20).unwrap().is_some());

    for what in ["namespace deleted", "veth deleted"] {
        if what == "namespace deleted" {
            ip(&["netns", "del", &vip.netns]).unwrap();
        } else {
            vip.home.ip(&["link", "del", &vip.host_if]).unwrap();
        }
        let back = VipHost::wait_until(Duration::from_secs(15), || {
            Ok(vip
                .ns_ip(&["link", "show", &vip.ns_if])
                .is_ok_and(|s| s.contains("prog/xdp")))
        })
        .unwrap();
        assert!(back, "{what}: the responder was not re-attached");
        let guest = vip.add_guest().unwrap();
        let lease = vip.dhcp_lease(&guest);
        let answered = VipHost::wait_until(Duration::from_secs(10), || {
            Ok(one_query_with_tail(&guest, CLOCK_V4, 20)?.is_some())
        })
        .unwrap();
        let log = vip.daemon().unwrap().drain_log().join("\n");
        assert!(lease.is_ok(), "{what}: no DHCP lease: {lease:?}\n{log}");
        assert!(
            answered,
            "{what}: a MAC-tailed request went unanswered\n{log}"
        );
        assert!(
            log.contains("restarting dnsmasq") && log.contains("binding the userspace path again"),
            "{what}: {log}"
        );
    }
}

/// Attachments follow the config across restarts: a host interface taken out of
/// `vip.host_interfaces` loses the pinned responder an earlier daemon left on it (it would
/// otherwise go on answering from maps nobody updates).
#[test]
fn a_host_interface_taken_out_of_the_config_is_released() {
    let mut vip = VipHost::start(VipOptions {
        subnet: 69,
        physical_host: true,
        ..Default::default()
    })
    .unwrap();
    let host_if = {
        let (physical, addr, host_if) = vip.physical.as_ref().unwrap();
        ntpdig(physical, addr).unwrap();
        host_if.clone()
    };
    vip.stop_daemon().unwrap();
    let config = std::fs::read_to_string(&vip.config).unwrap();
    let without: String = config
        .lines()
        .filter(|l| !l.starts_with("host_interfaces"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&vip.config, without).unwrap();
    vip.start_daemon().unwrap();
    let log = vip.daemon().unwrap().drain_log().join("\n");
    let link = vip.home.ip(&["link", "show", &host_if]).unwrap();
    assert!(
        !link.contains("prog/xdp") && !link.contains("xdpgeneric"),
        "the responder stayed on {host_if}:\n{link}\n{log}"
    );
    // The clock address on the service side is still served.
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 21).unwrap();
    ntpdig(&guest, CLOCK_V4).unwrap();
}

/// IPv6 guests learn the route to the clock address from router advertisements (radvd in the
/// service namespace: a Route Information Option, RFC 4191, and the service prefix for
/// SLAAC), then sync over IPv6 with ntpdig.
#[test]
fn ipv6_guests_learn_the_clock_route_from_router_advertisements() {
    let vip = VipHost::start(VipOptions {
        subnet: 70,
        ipv6_ra: true,
        ..Default::default()
    })
    .unwrap();
    let guest = vip.add_guest().unwrap();
    integration_tests::vip::accept_router_advertisements(&guest).unwrap();
    let learned = VipHost::wait_until(Duration::from_secs(30), || {
        let routes = guest.ip(&["-6", "route"])?;
        let addrs = guest.ip(&["-6", "addr", "show", "dev", "eth0"])?;
        Ok(routes.contains("fd00:ec2::123 via fe80")
            && addrs.contains(&format!("fd00:ec2:{}:", vip.subnet))
            && !addrs.contains("tentative"))
    })
    .unwrap();
    assert!(
        learned,
        "no clock route or address from router advertisements:\n{}\n{}",
        guest.ip(&["-6", "route"]).unwrap_or_default(),
        guest.ip(&["-6", "addr"]).unwrap_or_default()
    );
    let routes = guest.ip(&["-6", "route"]).unwrap();
    assert!(
        !routes.contains("default"),
        "the VIP host advertised itself as a default router:\n{routes}"
    );
    let d = ntpdig(&guest, "fd00:ec2::123").unwrap();
    assert_eq!(d.stratum, 10);
}

/// An upgrade whose build lays a map out otherwise finds the old build's pins: the new daemon
/// retires them and serves (with fresh maps and the clock from its state file) rather than
/// refuse to start while the old program serves a frozen anchor.
#[test]
fn a_restart_across_a_map_layout_change_serves_again() {
    let mut vip = VipHost::start(VipOptions {
        subnet: 73,
        xdp_mode: "native",
        ..Default::default()
    })
    .unwrap();
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 23).unwrap();
    ntpdig(&guest, CLOCK_V4).unwrap();
    // The build before: its maps under another fingerprint, its attachments pinned.
    assert!(vip.stop_daemon().unwrap(), "daemon exited with an error");
    let pins = ntp_user::responder::pin_dir(&vip.netns);
    let ours = ntp_user::responder::pins::map_dir(&pins);
    let theirs = pins.join("maps-00000000deadbeef");
    std::fs::rename(&ours, &theirs).unwrap();
    let attached = vip.start_daemon().unwrap().attached.clone();
    assert!(
        attached.contains("adopted_anchor=false") && attached.contains("links=\"adopted\""),
        "{attached}"
    );
    assert!(!theirs.exists(), "the old layout's maps were left");
    assert!(ours.exists());
    // The pinned attachment now runs this build's program, on this build's maps.
    let mut last = None;
    let served = VipHost::wait_until(Duration::from_secs(30), || {
        last = Some(ntpdig(&guest, CLOCK_V4));
        Ok(matches!(&last, Some(Ok(r)) if r.leap == "no-leap"))
    })
    .unwrap();
    assert!(served, "no synchronized answer after the upgrade: {last:?}");
}
