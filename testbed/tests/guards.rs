//! The testbed's guards and builders on real namespaces (root): what they make is there, with
//! the settings asked for, and is gone when the guard drops, also after a failed step.

use std::path::Path;

use testbed::netns::{guest_on_bridge, plug_guest};
use testbed::{ip, unique_name, Netns, Topology, CLOCK_V4};

fn exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

#[test]
fn a_namespace_goes_with_its_guard_also_when_a_step_fails() {
    let name = {
        let ns = Netns::new("tbg").unwrap();
        assert!(exists(&ns.name));
        // A step that fails (no such device) leaves the guard to clean up.
        assert!(ns.ip(&["link", "set", "nosuchdev", "up"]).is_err());
        ns.name.clone()
    };
    assert!(!exists(&name), "{name} is still there");
}

#[test]
fn a_fixed_name_left_by_an_interrupted_run_is_taken_over() {
    let name = unique_name("tbf");
    ip(&["netns", "add", &name]).unwrap();
    let ns = Netns::named(&name).unwrap();
    // A fresh namespace: its loopback is up, as Netns makes it.
    assert!(ns.ip(&["link", "show", "lo"]).unwrap().contains("UP"));
    drop(ns);
    assert!(!exists(&name));
}

#[test]
fn the_topology_has_the_asked_queues_and_the_guest_routes_the_clock_to_the_vip_end() {
    let t = Topology::with_queues(231, Some(3)).unwrap();
    for (ns, ifname) in [(&t.vip, &t.vip_if), (&t.guest, &t.guest_if)] {
        let link: serde_json::Value =
            serde_json::from_str(&ns.ip(&["-d", "-j", "link", "show", ifname]).unwrap()).unwrap();
        assert_eq!(link[0]["num_tx_queues"], 3, "{link}");
        assert_eq!(link[0]["num_rx_queues"], 3, "{link}");
    }
    let route = t.guest.ip(&["route", "get", CLOCK_V4]).unwrap();
    assert!(route.contains(&format!("via {}", t.service_v4)), "{route}");
    let names = (t.guest.name.clone(), t.vip.name.clone());
    drop(t);
    assert!(!exists(&names.0) && !exists(&names.1));
}

#[test]
fn a_guest_on_a_bridge_reaches_another_and_its_port_goes_with_it() {
    let home = Netns::new("tbh").unwrap();
    let bridge = unique_name("tbb");
    home.add_bridge(&bridge).unwrap();
    let a = guest_on_bridge(&home, &bridge).unwrap();
    let b = plug_guest(Some(&home), &bridge, Netns::new("tbg").unwrap()).unwrap();
    a.ip(&["addr", "add", "169.254.232.1/24", "dev", "eth0"])
        .unwrap();
    b.ip(&["addr", "add", "169.254.232.2/24", "dev", "eth0"])
        .unwrap();
    // A datagram from one guest to the other across the bridge.
    let (a_ns, b_ns) = (a.file().unwrap(), b.file().unwrap());
    let receiver = std::thread::spawn(move || {
        testbed::netns::enter(&b_ns).unwrap();
        let sock = std::net::UdpSocket::bind("169.254.232.2:9999").unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    });
    std::thread::spawn(move || {
        testbed::netns::enter(&a_ns).unwrap();
        let sock = std::net::UdpSocket::bind("169.254.232.1:0").unwrap();
        // Repeated until the receiver is bound (the first may also wait on ARP).
        while !receiver.is_finished() {
            let _ = sock.send_to(b"across", "169.254.232.2:9999");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let (got, from) = receiver.join().unwrap();
        assert_eq!(got, b"across");
        assert_eq!(from.ip().to_string(), "169.254.232.1");
    })
    .join()
    .unwrap();
    let ports = |home: &Netns| home.ip(&["link", "show", "master", &bridge]).unwrap();
    assert_eq!(ports(&home).matches("master").count(), 2);
    drop(b);
    // The kernel tears a deleted namespace's devices down in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ports(&home).matches("master").count() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the port stayed: {}",
            ports(&home)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
