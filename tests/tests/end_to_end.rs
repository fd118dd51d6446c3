//! End to end: `ntp-xdp serve` on the VIP side of a veth, real NTP clients in the guest
//! namespace, over IPv4 and IPv6, in generic and native XDP mode.

use std::process::Command;

use integration_tests::clients::{chronyd_query, ntpdig, ntpdig_best_of_3};
use integration_tests::topology::{ServeProcess, Topology};
use integration_tests::{ntp_xdp_bin, run, CLOCK_V4, CLOCK_V6};

const STRATUM: u8 = 4;
/// |offset| bound the issue sets; on one machine the true offset is zero, so this bounds the
/// whole error (timestamps, extrapolation, client estimate).
const MAX_OFFSET_S: f64 = 1e-3;

fn answered(program: u32, counter: &str) -> u64 {
    let out = run(Command::new(ntp_xdp_bin()).args(["stats", "--json"])).unwrap();
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mine = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["program_id"] == program)
        .unwrap_or_else(|| panic!("program {program} not in stats: {out}"));
    mine["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == counter)
        .and_then(|c| c[1].as_u64())
        .unwrap()
}

fn clients_accept_replies(mode: &str, subnet: u8) {
    let t = Topology::new(subnet).unwrap();
    let serve = ServeProcess::start(
        &t,
        mode,
        &["--set", &format!("clock.local_stratum={STRATUM}")],
    )
    .unwrap();
    assert!(
        serve.attached.contains(&format!("mode=\"{mode}\"")),
        "{}",
        serve.attached
    );
    let (vip_xdp, guest_xdp) = t.xdp_attached().unwrap();
    assert!(vip_xdp, "no XDP program on the VIP end");
    // Native mode on veth needs a program on the peer; generic mode must not touch it.
    assert_eq!(
        guest_xdp,
        mode == "native",
        "peer program presence in {mode} mode"
    );

    for addr in [CLOCK_V4, CLOCK_V6] {
        let dig =
            ntpdig_best_of_3(&t.guest, addr).unwrap_or_else(|e| panic!("{mode} {addr}: {e:#}"));
        assert_eq!(dig.stratum, STRATUM, "{mode} {addr}: {dig:?}");
        assert_eq!(dig.leap, "no-leap", "{mode} {addr}: {dig:?}");
        assert!(dig.offset_s.abs() < MAX_OFFSET_S, "{mode} {addr}: {dig:?}");

        let chrony =
            chronyd_query(&t.guest, addr).unwrap_or_else(|e| panic!("{mode} {addr}: {e:#}"));
        assert!(
            chrony.tests_passed,
            "{mode} {addr}: chronyd's packet tests failed: {chrony:?}"
        );
        assert_eq!(chrony.stratum, STRATUM, "{mode} {addr}: {chrony:?}");
        assert_eq!(chrony.leap, "N", "{mode} {addr}: {chrony:?}");
        assert_eq!(
            chrony.refid, "4C4F434C",
            "{mode} {addr}: refid should be LOCL: {chrony:?}"
        );
        assert!(
            chrony.offset_s.abs() < MAX_OFFSET_S,
            "{mode} {addr}: {chrony:?}"
        );
    }
    let ok = serve.stop().unwrap();
    assert!(ok, "ntp-xdp serve did not exit cleanly on SIGTERM");
    assert_eq!(
        t.xdp_attached().unwrap(),
        (false, false),
        "XDP programs left attached after SIGTERM"
    );
}

#[test]
fn chronyd_and_ntpdig_accept_replies_in_generic_mode() {
    clients_accept_replies("generic", 31);
}

#[test]
fn chronyd_and_ntpdig_accept_replies_in_native_mode() {
    clients_accept_replies("native", 32);
}

#[test]
fn stats_count_exactly_what_clients_sent() {
    let t = Topology::new(33).unwrap();
    let serve = ServeProcess::start(&t, "auto", &[]).unwrap();
    let id = serve.program_id().unwrap();
    // ntpdig sends exactly one request per run.
    for _ in 0..3 {
        ntpdig(&t.guest, CLOCK_V4).unwrap();
    }
    for _ in 0..2 {
        ntpdig(&t.guest, CLOCK_V6).unwrap();
    }
    assert_eq!(answered(id, "answered_ipv4"), 3);
    assert_eq!(answered(id, "answered_ipv6"), 2);
    assert_eq!(answered(id, "answered_unsynchronized"), 0);
}

#[test]
fn serve_reports_bad_arguments_clearly() {
    let out = Command::new(ntp_xdp_bin())
        .args([
            "serve",
            "--netns",
            "no-such-netns-here",
            "--interface",
            "x",
            "--address",
            CLOCK_V4,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-netns-here"), "{err}");
    let out = Command::new(ntp_xdp_bin())
        .args([
            "serve",
            "--interface",
            "x",
            "--address",
            CLOCK_V4,
            "--set",
            "clock.refid=TOOLONG",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clock.refid") && err.contains("TOOLONG"),
        "{err}"
    );
}
