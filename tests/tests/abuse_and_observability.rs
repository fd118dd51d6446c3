//! Rate limits, access lists, guest clock alarms, metrics and `ntp-xdp status`, end to end:
//! the daemon on a VIP host in a test namespace, guests on its bridge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::clients::{
    chronyd_query, http_get, metric, ntpdig, one_query, paced_queries, skewed_requests,
};
use integration_tests::vip::{VipHost, VipOptions};
use integration_tests::{run, CLOCK_V4};
use ntp_common::Counter;
use ntp_user::observe::status::StatusReport;

const METRICS: &str = "127.0.0.1:9273";

fn status(vip: &VipHost) -> StatusReport {
    vip.status_report().unwrap()
}

fn scrape(vip: &VipHost) -> String {
    http_get(&vip.home, METRICS.parse().unwrap(), "/metrics").unwrap()
}

#[test]
fn a_flooding_guest_is_limited_and_another_guest_is_not_harmed() {
    const RATE: f64 = 1000.0;
    const BURST: f64 = 200.0;
    let mut vip = VipHost::start(VipOptions {
        subnet: 71,
        clock_toml: format!("[limits]\nrate = {RATE}\nburst = {BURST}\nkod_interval = \"1s\"\n"),
        ..Default::default()
    })
    .unwrap();
    let flooder = vip.add_guest().unwrap();
    vip.configure_guest_statically(&flooder, 21).unwrap();
    let polite = vip.add_guest().unwrap();
    vip.configure_guest_statically(&polite, 22).unwrap();
    // Both reach the clock before the flood starts (ARP settled).
    ntpdig(&flooder, CLOCK_V4).unwrap();
    ntpdig(&polite, CLOCK_V4).unwrap();

    // The polite guest: 2000 requests, 4 ms apart (250/s, well within its own limit).
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (g, stop) = (polite.file().unwrap(), stop.clone());
        std::thread::spawn(move || {
            paced_queries(
                g,
                CLOCK_V4,
                2000,
                Duration::from_secs(60),
                Duration::from_millis(4),
                &stop,
            )
        })
    };
    // The flooder: open loop at the generator's full rate, bounded to 8 s.
    let out = run(
        std::process::Command::new(integration_tests::ntp_loadgen_bin()).args([
            "run",
            "--netns",
            &flooder.name,
            "--target",
            &format!("{CLOCK_V4}:123"),
            "--rate",
            "1000000",
            "--duration",
            "8s",
            "--max-requests",
            "5000000",
        ]),
    )
    .unwrap();
    let tally = client.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let flood: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (sent, valid, kod, elapsed) = (
        flood["sent"].as_u64().unwrap(),
        flood["valid"].as_u64().unwrap(),
        flood["kod"].as_u64().unwrap(),
        flood["elapsed_s"].as_f64().unwrap(),
    );
    eprintln!("flood: {flood}\npolite: {tally:?}");

    // The polite guest: under 0.1% lost, every reply a real one.
    let total = tally.answered + tally.lost;
    assert!(total >= 2000, "{tally:?}");
    assert!(
        tally.lost * 1000 < total,
        "polite guest lost {} of {total}",
        tally.lost
    );
    assert_eq!(tally.unsynchronized, 0);
    assert!(tally.backwards.is_empty(), "{:?}", tally.backwards);
    // The flooder: held near its rate (two CPUs may each pass a request on the same token),
    // and at most one KoD per interval (plus the boundary).
    assert!(
        sent > 100_000,
        "the flood was too small to mean anything: {flood}"
    );
    let allowed = RATE * elapsed + BURST;
    assert!(
        (valid as f64) <= 2.0 * allowed,
        "flooder got {valid} replies, allowed about {allowed:.0}"
    );
    assert!(
        valid as f64 >= 0.5 * RATE * 8.0,
        "the limit starved the flooder: {valid}"
    );
    assert!(
        kod >= 1 && kod as f64 <= elapsed.ceil() + 1.0,
        "{kod} KoDs in {elapsed:.1} s at one per second"
    );

    // The operator sees it: counters, the rate-limit metric and the drop-rate alarm.
    let r = status(&vip);
    assert!(
        r.responder.counter(Counter::DroppedRateLimited) > 50_000,
        "{:?}",
        r.responder
    );
    assert!(r.responder.counter(Counter::KodRate) >= kod);
    let body = scrape(&vip);
    assert!(metric(&body, "ntpxdp_rate_limited_total").unwrap() > 50_000.0);
    vip.daemon()
        .unwrap()
        .wait_for_line("alarm=\"drop_rate\"", Duration::from_secs(5))
        .unwrap();
}

#[test]
fn deny_and_allow_lists_end_to_end() {
    let vip = VipHost::start(VipOptions {
        subnet: 72,
        clock_toml: "[access]\nallow = [\"169.254.72.0/24\"]\ndeny = [\"169.254.72.21/32\"]\n\
                     deny_action = \"kod\"\n"
            .into(),
        ..Default::default()
    })
    .unwrap();
    let denied = vip.add_guest().unwrap();
    vip.configure_guest_statically(&denied, 21).unwrap();
    let allowed = vip.add_guest().unwrap();
    vip.configure_guest_statically(&allowed, 22).unwrap();
    // A guest on the bridge with an address outside the allowed /24.
    let outside = vip.add_guest().unwrap();
    outside
        .ip(&["addr", "add", "169.254.73.9/16", "dev", "eth0"])
        .unwrap();
    outside
        .ip(&[
            "route",
            "add",
            &format!("{CLOCK_V4}/32"),
            "via",
            "169.254.72.1",
        ])
        .unwrap();

    assert!(ntpdig(&allowed, CLOCK_V4).is_ok());
    assert!(chronyd_query(&allowed, CLOCK_V4).is_ok());
    // The denied guest's first request gets a DENY kiss-o'-death (same size, origin echoed)...
    let kod = one_query(&denied, CLOCK_V4)
        .unwrap()
        .expect("no DENY kiss-o'-death");
    assert_eq!(kod.len(), 48);
    assert_eq!((kod[0] >> 6, kod[1], &kod[12..16]), (3, 0, &b"DENY"[..]));
    assert_eq!(kod[24..32], 0x1234_5678_9abc_def0u64.to_be_bytes());
    // ...and the next ones within the KoD interval nothing: chronyd -Q gets no answer.
    assert!(chronyd_query(&denied, CLOCK_V4).is_err());
    assert_eq!(one_query(&denied, CLOCK_V4).unwrap(), None);
    // Outside the allow list: the same.
    assert!(one_query(&outside, CLOCK_V4)
        .unwrap()
        .is_some_and(|r| r[12..16] == *b"DENY"));
    assert!(ntpdig(&outside, CLOCK_V4).is_err());
    let r = status(&vip);
    assert_eq!(
        r.responder.counter(Counter::KodDeny),
        2,
        "{:?}",
        r.responder.counters
    );
    assert!(
        r.responder.counter(Counter::DroppedDenied) >= 3,
        "{:?}",
        r.responder.counters
    );
    // ntpdig's request and chronyd's from the allowed guest, nothing else.
    let answered = r.responder.counter(Counter::AnsweredV4);
    assert!((2..=10).contains(&answered), "{:?}", r.responder.counters);
}

#[test]
fn wrong_guest_clocks_are_alarmed_and_metrics_and_status_follow_traffic() {
    let mut vip = VipHost::start(VipOptions {
        subnet: 74,
        clock_toml: "[guest_clocks]\nalarm_offset = \"500ms\"\n".into(),
        ..Default::default()
    })
    .unwrap();
    // The endpoint and the first anchor come just after the daemon says it is attached.
    let published = VipHost::wait_until(Duration::from_secs(10), || {
        Ok(http_get(&vip.home, METRICS.parse().unwrap(), "/metrics")
            .is_ok_and(|body| metric(&body, "ntpxdp_clock_stratum") == Some(10.0)))
    })
    .unwrap();
    assert!(published);
    let before = scrape(&vip);
    let xdp_v4 = "ntpxdp_replies_total{path=\"xdp\",family=\"ipv4\"}";
    let replies_before = metric(&before, xdp_v4).unwrap();
    assert_eq!(metric(&before, "ntpxdp_clock_stratum"), Some(10.0));
    assert_eq!(
        metric(&before, "ntpxdp_alarm{alarm=\"guest_clocks\"}"),
        Some(0.0)
    );

    let skewed = vip.add_guest().unwrap();
    vip.configure_guest_statically(&skewed, 31).unwrap();
    let honest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&honest, 32).unwrap();
    let chrony = vip.add_guest().unwrap();
    vip.configure_guest_statically(&chrony, 33).unwrap();

    // A guest whose clock runs 2 s ahead, one that is right (ntpdig sends its clock), and
    // chrony, which sends a random transmit timestamp and so says nothing of its clock.
    assert_eq!(skewed_requests(&skewed, CLOCK_V4, 2.0, 4).unwrap(), 4);
    for _ in 0..3 {
        ntpdig(&honest, CLOCK_V4).unwrap();
    }
    chronyd_query(&chrony, CLOCK_V4).unwrap();

    let alarmed = VipHost::wait_until(Duration::from_secs(10), || {
        Ok(status(&vip).alarms.iter().any(|a| a.name == "guest_clocks"))
    })
    .unwrap();
    assert!(alarmed, "no guest_clocks alarm");
    let r = status(&vip);
    let g = &r.guests;
    assert_eq!(g.alarmed.len(), 1, "{g:?}");
    assert_eq!(g.alarmed[0].address.to_string(), "169.254.74.31");
    assert!((1.9..2.1).contains(&g.alarmed[0].offset_s), "{g:?}");
    assert_eq!(g.alarmed[0].requests, 4);
    let honest_row = g
        .worst
        .iter()
        .find(|x| x.address.to_string() == "169.254.74.32")
        .unwrap_or_else(|| panic!("the honest guest is not listed: {g:?}"));
    assert!(honest_row.offset_s.abs() < 0.05, "{honest_row:?}");
    assert!(
        g.opaque >= 1,
        "chrony's random cookie was read as a clock: {g:?}"
    );
    vip.daemon()
        .unwrap()
        .wait_for_line("alarm raised", Duration::from_secs(5))
        .unwrap();

    // Metrics moved with the traffic: 4 + 3 + chrony's requests, at least.
    let after = scrape(&vip);
    assert!(metric(&after, xdp_v4).unwrap() >= replies_before + 8.0);
    assert_eq!(metric(&after, "ntpxdp_guest_clock_alarms"), Some(1.0));
    let off = metric(
        &after,
        "ntpxdp_guest_clock_offset_seconds{guest=\"169.254.74.31\"}",
    )
    .unwrap();
    assert!((1.9..2.1).contains(&off), "{off}");
    assert_eq!(
        metric(&after, "ntpxdp_alarm{alarm=\"guest_clocks\"}"),
        Some(1.0)
    );
    assert!(metric(&after, "ntpxdp_anchor_age_seconds").unwrap() < 5.0);

    // The human view has every section, and only the owner may ask.
    let config = vip.config.to_string_lossy().into_owned();
    let text = run(&mut vip.ntp_user(&["status", "--config", &config]).unwrap()).unwrap();
    for want in [
        "Tracking",
        "Responder",
        "answered_ipv4",
        "169.254.74.31",
        "ALARM",
        "guest_clocks",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    let socket = ntp_user::host::files::state_dir(&vip.netns).join("control.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    use std::os::unix::process::CommandExt as _;
    let nobody = std::process::Command::new(integration_tests::ntp_xdp_bin())
        .args(["status", "--socket", socket.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("control socket"));
}
