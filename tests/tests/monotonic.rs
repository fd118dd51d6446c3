//! Time never goes backwards for a guest while the anchor changes under it: 100,000 sequential
//! requests from the guest namespace while the daemon side republishes, hundreds of times per
//! second, anchors whose phase jumps back and forth and whose rate swings by ±300 ppm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::programs::XdpMode;
use integration_tests::clients::sequential_queries;
use integration_tests::topology::Topology;
use integration_tests::CLOCK_V4;
use ntp_common::time::{ppm_to_freq_scaled, NANOS_PER_SEC};
use ntp_user::host::hostclock::{host_clock_anchor, HostClockIdentity};
use ntp_user::host::netlink::Netlink;
use ntp_user::host::netns;
use ntp_user::responder::Responder;

const REQUESTS: u64 = 100_000;
/// Bounds the loop in time as well as in count.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn no_timestamp_goes_backwards_across_anchor_updates() {
    let t = Topology::new(41).unwrap();
    let mut r = Responder::load().unwrap();
    r.add_served_address(CLOCK_V4.parse().unwrap()).unwrap();
    let identity = HostClockIdentity {
        follow_kernel_sync: false,
        stratum: 2,
        refid: [169, 254, 0, 1],
        max_age_ns: 10 * NANOS_PER_SEC,
    };
    r.publish_anchor(host_clock_anchor(&identity).unwrap())
        .unwrap();
    let vip = t.vip.file().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let link = rt
        .block_on(async { Netlink::open_in(&vip)?.link(&t.vip_if).await })
        .unwrap()
        .unwrap();
    r.set_own_macs(&[(link.mac.unwrap(), link.index)]).unwrap();
    netns::within(&vip, || Ok(r.attach_responder(link.index, XdpMode::Skb)?)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let guest = t.guest.file().unwrap();
    let client_stop = stop.clone();
    let handle = std::thread::spawn(move || {
        let tally = sequential_queries(guest, CLOCK_V4, REQUESTS, DEADLINE, &client_stop);
        client_stop.store(true, Ordering::Relaxed);
        tally
    });

    // Phase offsets (µs) and rates (ppm) cycled through: backward jumps must be held, rate
    // swings must not bend time backwards at the moment of the flip.
    let offsets_us: [i64; 5] = [0, 250, -400, 75, -30];
    let rates_ppm = [0.0, 300.0, -300.0, 120.0];
    let (mut publications, mut held_back) = (0u64, 0u64);
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < DEADLINE + Duration::from_secs(5) {
        let mut a = host_clock_anchor(&identity).unwrap();
        let k = publications as usize;
        a.ntp_ns = a
            .ntp_ns
            .wrapping_add_signed(offsets_us[k % offsets_us.len()] * 1_000);
        a.freq_scaled = ppm_to_freq_scaled(rates_ppm[k % rates_ppm.len()]);
        if r.publish_anchor(a).unwrap().held_back_ns > 0 {
            held_back += 1;
        }
        publications += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let tally = handle.join().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!(
        "{} replies, {} lost, {publications} anchors published ({:.0}/s), {held_back} held back",
        tally.answered,
        tally.lost,
        publications as f64 / elapsed
    );
    assert!(
        tally.answered >= REQUESTS,
        "only {} replies before the deadline",
        tally.answered
    );
    assert_eq!(tally.lost, 0, "requests went unanswered");
    assert!(
        tally.backwards.is_empty(),
        "time went backwards:\n{}",
        tally.backwards.join("\n")
    );
    // The test is only meaningful if the anchor really changed under the client, often, and
    // the hold-back path was taken.
    assert!(
        publications as f64 / elapsed > 50.0,
        "anchor republished too rarely"
    );
    assert!(held_back > 0, "no backward jump was ever requested");
}
