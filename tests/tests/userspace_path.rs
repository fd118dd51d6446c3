//! The daemon's userspace path: it answers what the responder passes up (requests with a MAC
//! or extension fields get a plain 48-byte reply) and everything with `--xdp-mode off`, with
//! the same header as the kernel path.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use integration_tests::clients::{chronyd_query, ntpdig_best_of_3};
use integration_tests::topology::{Netns, ServeProcess, Topology};
use integration_tests::{ntp_xdp_bin, run, CLOCK_V4, CLOCK_V6};
use ntp_common::wire::*;

/// Sends `request` from the guest to `addr`:123; the reply, if one comes within 1 s.
fn exchange(guest: &Netns, addr: &str, request: Vec<u8>) -> Option<Vec<u8>> {
    let ns = guest.file().unwrap();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        ntp_user::host::netns::enter(&ns).unwrap();
        let sock = UdpSocket::bind(if addr.contains(':') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        })
        .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        sock.send_to(&request, (addr.as_str(), 123)).unwrap();
        let mut buf = [0u8; 1024];
        sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    })
    .join()
    .unwrap()
}

/// Sends all `requests` at once from one socket, then collects replies until a second passes
/// without one.
fn burst(guest: &Netns, addr: &str, requests: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let ns = guest.file().unwrap();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        ntp_user::host::netns::enter(&ns).unwrap();
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        for r in &requests {
            sock.send_to(r, (addr.as_str(), 123)).unwrap();
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    })
    .join()
    .unwrap()
}

fn request(transmit: u64, extra: usize) -> Vec<u8> {
    let mut r = vec![0u8; 48 + extra];
    r[0] = li_vn_mode(0, 4, MODE_CLIENT);
    r[OFF_POLL] = 6;
    r[40..48].copy_from_slice(&transmit.to_be_bytes());
    // A MAC-sized tail (key ID + 16-byte digest) or extension field bytes.
    for (i, b) in r[48..].iter_mut().enumerate() {
        *b = i as u8 | 0x80;
    }
    r
}

fn counter(program: u32, name: &str) -> u64 {
    let out = run(Command::new(ntp_xdp_bin()).args(["stats", "--json"])).unwrap();
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["program_id"] == program)
        .and_then(|s| s["counters"].as_array())
        .and_then(|c| c.iter().find(|c| c[0] == name))
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no {name} for program {program}: {out}"))
}

/// Header fields that do not depend on the instant of reception.
fn fixed_fields(reply: &[u8]) -> (u8, u8, u8, u8, [u8; 4], u64, u64, u32) {
    (
        reply[0],
        reply[OFF_STRATUM],
        reply[OFF_POLL],
        reply[OFF_PRECISION],
        reply[OFF_REFID..OFF_REFID + 4].try_into().unwrap(),
        read_be64(reply, OFF_REFERENCE_TS),
        read_be64(reply, OFF_ORIGIN_TS),
        read_be32(reply, OFF_ROOT_DELAY),
    )
}

#[test]
fn requests_with_a_mac_are_answered_by_userspace_with_the_kernels_header() {
    let t = Topology::new(71).unwrap();
    let serve = ServeProcess::start(&t, "generic", &["--set", "clock.local_stratum=3"]).unwrap();
    let program = serve.program_id().unwrap();
    for addr in [CLOCK_V4, CLOCK_V6] {
        let passed = counter(program, "passed_extension");
        let answered = counter(
            program,
            if addr == CLOCK_V4 {
                "answered_ipv4"
            } else {
                "answered_ipv6"
            },
        );
        let plain =
            exchange(&t.guest, addr, request(0x1111_2222_3333_4444, 0)).expect("no kernel reply");
        let with_mac = exchange(&t.guest, addr, request(0x1111_2222_3333_4444, 20))
            .expect("no userspace reply to a request with a MAC");
        assert_eq!(counter(program, "passed_extension"), passed + 1, "{addr}");
        assert_eq!(
            counter(
                program,
                if addr == CLOCK_V4 {
                    "answered_ipv4"
                } else {
                    "answered_ipv6"
                }
            ),
            answered + 1,
            "{addr}: the kernel answered more than the plain request"
        );
        assert_eq!(with_mac.len(), 48, "{addr}: the unknown tail was echoed");
        assert_eq!(fixed_fields(&plain), fixed_fields(&with_mac), "{addr}");
        // Dispersion grows with the anchor's age: equal to within one short-format unit.
        let (d1, d2) = (
            read_be32(&plain, OFF_ROOT_DISPERSION),
            read_be32(&with_mac, OFF_ROOT_DISPERSION),
        );
        assert!(d1.abs_diff(d2) <= 1, "{addr}: root dispersion {d1} vs {d2}");
        // Receive timestamps from the same clock, a moment apart.
        let (rx1, rx2) = (
            read_be64(&plain, OFF_RECEIVE_TS),
            read_be64(&with_mac, OFF_RECEIVE_TS),
        );
        let apart = ntp_common::time::timestamp_diff_ns(rx2, rx1);
        assert!(
            (0..1_000_000_000).contains(&apart),
            "{addr}: {apart} ns apart"
        );
    }
    // A mode the kernel drops is not answered by userspace either.
    let mut bad = request(1, 20);
    bad[0] = li_vn_mode(0, 4, MODE_SERVER);
    assert!(exchange(&t.guest, CLOCK_V4, bad).is_none());
}

#[test]
fn with_xdp_off_the_userspace_path_serves_real_clients() {
    let t = Topology::new(72).unwrap();
    let serve = ServeProcess::start(&t, "off", &["--set", "clock.local_stratum=5"]).unwrap();
    assert!(
        serve.attached.contains("mode=\"off\""),
        "{}",
        serve.attached
    );
    assert_eq!(
        t.xdp_attached().unwrap(),
        (false, false),
        "XDP attached in off mode"
    );
    for addr in [CLOCK_V4, CLOCK_V6] {
        let dig = ntpdig_best_of_3(&t.guest, addr).unwrap_or_else(|e| panic!("{addr}: {e:#}"));
        assert_eq!(dig.stratum, 5, "{addr}");
        assert!(dig.offset_s.abs() < 1e-3, "{addr}: {dig:?}");
        let m = chronyd_query(&t.guest, addr).unwrap_or_else(|e| panic!("{addr}: {e:#}"));
        assert!(m.tests_passed, "{addr}: {m:?}");
        assert_eq!(m.stratum, 5);
    }
}

/// Every request that gets time has passed the access list and the rate limit, whichever
/// path answers it: a denied guest's request padded with a MAC-sized tail is dropped in the
/// kernel (passing it up would give it a full LI=0 reply from userspace), and with XDP off the userspace
/// path itself refuses it; a guest over its rate gets no more than its burst through
/// userspace either (the kernel peeks, userspace takes the tokens).
#[test]
fn the_userspace_path_applies_the_access_list_and_the_rate_limit() {
    for (subnet, mode) in [(75u8, "generic"), (76, "off")] {
        let t = Topology::new(subnet).unwrap();
        let deny = format!("access.deny=[\"{}/32\"]", t.guest_v4);
        let serve = ServeProcess::start_in(
            None,
            &t,
            mode,
            &["--set", &deny, "--set", "access.deny_action=drop"],
        )
        .unwrap();
        for extra in [0, 20] {
            assert_eq!(
                exchange(&t.guest, CLOCK_V4, request(0x0bad_0bad_0000_0001, extra)),
                None,
                "{mode}: a denied guest got an answer to a request with {extra} extra bytes"
            );
        }
        // IPv6 is not denied: answered, padded or not.
        assert!(
            exchange(&t.guest, CLOCK_V6, request(7, 20)).is_some(),
            "{mode}"
        );
        drop(serve);

        // A burst of 3 at 1/s: ten padded requests back to back get at most 3 with time.
        let serve = ServeProcess::start_in(
            None,
            &t,
            mode,
            &["--set", "limits.rate=1.0", "--set", "limits.burst=3"],
        )
        .unwrap();
        let replies = burst(
            &t.guest,
            CLOCK_V4,
            (0..10u64).map(|i| request(0x1000 + i, 20)).collect(),
        );
        let with_time = replies
            .iter()
            .filter(|r| r[0] >> 6 != LEAP_UNSYNCHRONIZED)
            .count();

        assert!(
            (1..=4).contains(&with_time),
            "{mode}: {with_time} of 10 padded requests got time at 1/s with a burst of 3 (replies: {:?})",
            replies.iter().map(|r| (r.len(), r[0] >> 6, r[OFF_STRATUM])).collect::<Vec<_>>()
        );
        drop(serve);
    }
}
