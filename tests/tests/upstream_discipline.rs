//! The daemon disciplines its own clock against real upstreams: three chronyd servers
//! (`local stratum 3`) in their own namespaces, reachable from the VIP host's namespace where
//! the daemon runs; a guest queries the clock address with chronyd -Q.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use integration_tests::clients::{chronyd_query, ChronyTracker, ClockBound};
use integration_tests::topology::{
    link_namespaces, ChronyServer, Netns, OffsetServer, ServeProcess, Topology,
};
use integration_tests::CLOCK_V4;
use ntp_common::packet::NtpHeader;
use ntp_common::wire::{LEAP_UNSYNCHRONIZED, MODE_SERVER};
use ntp_user::host::netns;

const UPSTREAM_STRATUM: u8 = 3;

/// One raw query from inside `ns`: the reply's header.
fn query(ns: &Netns, addr: &str) -> Option<NtpHeader> {
    let file = ns.file().ok()?;
    let addr = addr.to_string();
    std::thread::spawn(move || {
        netns::enter(&file).ok()?;
        let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .ok()?;
        let req = NtpHeader::client_request(6, 0x1234_5678_9abc_def0).serialize();
        sock.send_to(&req, (addr.as_str(), 123)).ok()?;
        let mut buf = [0u8; 128];
        let n = sock.recv(&mut buf).ok()?;
        NtpHeader::parse(&buf[..n])
            .filter(|h| h.mode == MODE_SERVER && h.origin_ts == 0x1234_5678_9abc_def0)
    })
    .join()
    .ok()?
}

/// Waits until the guest is answered LI=0 at the upstreams' stratum + 1 (the log is printed if
/// it never is).
fn wait_for_first_sync(t: &Topology, serve: &mut ServeProcess) {
    wait_for_sync_at(t, serve, UPSTREAM_STRATUM + 1..=UPSTREAM_STRATUM + 1)
}

/// Waits until the guest is answered LI=0 at a stratum in `strata`.
fn wait_for_sync_at(t: &Topology, serve: &mut ServeProcess, strata: std::ops::RangeInclusive<u8>) {
    wait_for_or(
        "the first synchronization",
        Duration::from_secs(30),
        &mut || {
            query(&t.guest, CLOCK_V4).is_some_and(|h| strata.contains(&h.stratum) && h.leap == 0)
        },
        || {
            while let Ok(line) = serve.log.try_recv() {
                eprintln!("serve: {line}");
            }
        },
    );
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    wait_for_or(what, timeout, &mut ok, || {})
}

fn wait_for_or(
    what: &str,
    timeout: Duration,
    ok: &mut impl FnMut() -> bool,
    on_timeout: impl FnOnce(),
) {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() >= timeout {
            on_timeout();
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// An upstream's namespace linked to `host` (see [`testbed::netns::upstream_namespace`]).
fn upstream_namespace(host: &Netns, subnet: u8) -> (Netns, String) {
    integration_tests::topology::upstream_namespace(host, subnet).unwrap()
}

#[test]
fn serves_disciplined_time_from_real_upstreams_and_holds_over() {
    let t = Topology::new(51).unwrap();
    let host = Netns::new("nth").unwrap();
    let mut upstreams = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3u8 {
        let (ns, addr) = upstream_namespace(&host, 52 + i);
        upstreams.push((ChronyServer::start(&ns, UPSTREAM_STRATUM).unwrap(), ns));
        addrs.push(addr);
    }
    let control = std::env::temp_dir().join(format!("ntpx-discipline-{}.sock", std::process::id()));
    let control_arg = control.to_string_lossy().into_owned();
    // Polls stay at 16 s; the holdover is two of them.
    let control_set = format!("control.socket={control_arg}");
    let mut args = vec![
        "--set",
        &control_set,
        "--set",
        "clock.max_poll=4",
        "--set",
        "clock.max_holdover=32s",
        "--set",
        "clock.max_anchor_age=30s",
        // The test polls the responder in tight loops; a RATE KoD would read as LI=3.
        "--set",
        "limits.enable=false",
    ];
    for a in &addrs {
        args.push("--upstream");
        args.push(a);
    }
    let mut serve = ServeProcess::start_in(Some(&host), &t, "native", &args).unwrap();
    assert!(
        serve.attached.contains("disciplined against"),
        "{}",
        serve.attached
    );

    // Before the first synchronization the responder says LI=3; after it, stratum N+1.
    wait_for_first_sync(&t, &mut serve);
    serve
        .wait_for_line("source selected", Duration::from_secs(5))
        .unwrap();

    if std::env::var("NTPX_DEBUG").is_ok() {
        eprintln!(
            "ntpdig: {:?}",
            integration_tests::clients::ntpdig(&t.guest, CLOCK_V4)
        );
        eprintln!("raw: {:?}", query(&t.guest, CLOCK_V4));
    }
    let mut m = chronyd_query(&t.guest, CLOCK_V4).unwrap();
    // The first synchronization steps on an iburst estimate; later corrections slew the
    // rest away at up to 500 ppm. Allow the loop some polls to get there.
    let start = Instant::now();
    while m.offset_s.abs() >= 100e-6 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(2));
        m = chronyd_query(&t.guest, CLOCK_V4).unwrap();
    }
    eprintln!(
        "guest sees offset {:.1} µs after {:?}",
        m.offset_s * 1e6,
        start.elapsed()
    );
    if std::env::var("NTPX_DEBUG").is_ok() {
        while let Ok(line) = serve.log.try_recv() {
            eprintln!("serve: {line}");
        }
    }
    assert!(m.tests_passed, "{m:?}");
    assert_eq!(m.stratum, UPSTREAM_STRATUM + 1, "{m:?}");
    // Refid: the IPv4 address of the selected upstream, as chrony prints it (hex).
    let refids: Vec<String> = addrs
        .iter()
        .map(|a| {
            a.split('.')
                .map(|o| format!("{:02X}", o.parse::<u8>().unwrap()))
                .collect::<String>()
        })
        .collect();
    assert!(
        refids.contains(&m.refid),
        "refid {} is none of {refids:?}",
        m.refid
    );
    // Everyone here shares one clock, so the served time should match it closely.
    assert!(m.offset_s.abs() < 100e-6, "offset {} s", m.offset_s);
    // chronyd answers interleaved requests once it knows the client: every source's latest
    // sample carries its server's kernel transmit stamp. The daemon's own served − host
    // clock is as close as what the guest saw.
    let mut status = serde_json::Value::Null;
    wait_for("every source interleaved", Duration::from_secs(40), || {
        status = integration_tests::status_at(&control).unwrap_or_default();
        let sources = status["clock"]["sources"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        sources.len() == 3 && sources.iter().all(|s| s["interleaved"] == true)
    });
    let host_offset = status["clock"]["host_clock_offset_s"].as_f64().unwrap();
    assert!(
        host_offset.abs() < 100e-6,
        "served − host clock {host_offset} s"
    );

    // Lose every upstream: holdover, then LI=3 once the (shortened) maximum holdover passes.
    for (server, _) in &mut upstreams {
        server.stop();
    }
    let h = query(&t.guest, CLOCK_V4).unwrap();
    assert_eq!(
        h.leap, 0,
        "still synchronized right after losing the upstreams"
    );
    wait_for(
        "LI=3 after the maximum holdover",
        Duration::from_secs(60),
        || {
            query(&t.guest, CLOCK_V4)
                .is_some_and(|h| h.leap == LEAP_UNSYNCHRONIZED && h.stratum == 0)
        },
    );
    serve
        .wait_for_line("maximum holdover exceeded", Duration::from_secs(5))
        .unwrap();
    assert!(serve.stop().unwrap(), "daemon did not exit cleanly");
    let _ = std::fs::remove_file(&control);
}

/// The error bound a guest reads: its chronyd's `chronyc tracking` root delay / 2 + root
/// dispersion, and the bound AWS's ClockBound daemon publishes from it, are at least the
/// guest's measured offset to the true (host) clock, with honest upstreams and with one whose
/// time is 1 ms off; and the dispersion the daemon serves is its own estimate, microseconds,
/// not RFC 5905's growing 15 µs/s.
#[test]
fn a_guests_error_bound_covers_its_offset_with_honest_and_wrong_upstreams() {
    let t = Topology::new(111).unwrap();
    let host = Netns::new("nth").unwrap();
    let mut namespaces = Vec::new();
    let mut chronys = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..4u8 {
        let (ns, addr) = upstream_namespace(&host, 112 + i);
        if i < 3 {
            chronys.push(ChronyServer::start(&ns, UPSTREAM_STRATUM).unwrap());
        }
        addrs.push(addr);
        namespaces.push(ns);
    }
    let _wrong = OffsetServer::start(&namespaces[3], 1_000_000).unwrap();
    let cases = [
        ("honest upstreams", [0, 1, 2]),
        ("one upstream 1 ms off", [0, 1, 3]),
    ];
    for (label, chosen) in cases {
        let control = std::env::temp_dir().join(format!("ntpx-bound-{}.sock", std::process::id()));
        let control_arg = control.to_string_lossy().into_owned();
        let control_set = format!("control.socket={control_arg}");
        let mut args = vec![
            "--set",
            &control_set,
            "--set",
            "clock.max_poll=4",
            // The guest polls every second.
            "--set",
            "limits.enable=false",
        ];
        for &i in &chosen {
            args.push("--upstream");
            args.push(&addrs[i]);
        }
        let mut serve = ServeProcess::start_in(Some(&host), &t, "native", &args).unwrap();
        // The upstream 1 ms off answers at stratum 2: where it is the reference the daemon
        // names, it serves stratum 3 (see below).
        let served_strata = if chosen.contains(&3) {
            UPSTREAM_STRATUM..=UPSTREAM_STRATUM + 1
        } else {
            UPSTREAM_STRATUM + 1..=UPSTREAM_STRATUM + 1
        };
        wait_for_sync_at(&t, &mut serve, served_strata.clone());
        let guest = ChronyTracker::start(&t.guest, CLOCK_V4).unwrap();
        let tracking = std::cell::RefCell::new(None);
        wait_for_or(
            "the guest's chronyd to follow the clock address",
            Duration::from_secs(60),
            &mut || {
                let t = guest.tracking();
                let ok = t.as_ref().is_ok_and(|t| {
                    t.stratum
                        .checked_sub(1)
                        .is_some_and(|s| served_strata.contains(&s))
                        && t.leap == "Normal"
                });
                *tracking.borrow_mut() = Some(t);
                ok
            },
            || eprintln!("last tracking: {:?}", tracking.borrow()),
        );
        // As `ntp-xdp guest-config` suggests: 50 ppm of drift allowance per second since
        // ClockBound last read chronyd (once a second).
        let clockbound = ClockBound::start(&guest, 50).unwrap();
        let clockbound_now = std::cell::RefCell::new(None);
        wait_for_or(
            "ClockBound to publish a synchronized bound",
            Duration::from_secs(30),
            &mut || {
                let now = clockbound.now();
                let ok = now
                    .as_ref()
                    .is_ok_and(|n| n.status == clock_bound_shm::ClockStatus::Synchronized);
                *clockbound_now.borrow_mut() = Some(now);
                ok
            },
            || {
                eprintln!(
                    "last reading: {:?}\nclockbound's log:\n{}",
                    clockbound_now.borrow(),
                    clockbound.log()
                )
            },
        );
        // Until the regression holds enough points for a frequency (some 40 s here), the
        // frequency is known only within the model's ±2 %, and the bound says so.
        let started = Instant::now();
        wait_for(
            "the served bound to settle",
            Duration::from_secs(180),
            || {
                query(&t.guest, CLOCK_V4)
                    .is_some_and(|h| ntp_common::time::short_to_ns(h.root_dispersion) < 200_000)
            },
        );
        eprintln!(
            "{label}: bound settled {:?} after the guest started",
            started.elapsed()
        );
        let mut worst_ratio: f64 = 0.0;
        let mut dispersions = Vec::new();
        for round in 0..5 {
            let measured = chronyd_query(&t.guest, CLOCK_V4).unwrap();
            let tr = guest.tracking().unwrap();
            let published = clockbound.now().unwrap();
            let served = query(&t.guest, CLOCK_V4).expect("a reply");
            let served_dispersion =
                ntp_common::time::short_to_ns(served.root_dispersion) as f64 * 1e-9;
            let served_delay = ntp_common::time::short_to_ns(served.root_delay) as f64 * 1e-9;
            let status = integration_tests::status_at(&control).unwrap();
            let host_offset = status["clock"]["host_clock_offset_s"].as_f64().unwrap();
            let status_bound = status["clock"]["root_delay_s"].as_f64().unwrap() / 2.0
                + status["clock"]["root_dispersion_s"].as_f64().unwrap();
            eprintln!(
                "{label}, round {round}: guest offset {:+.1} µs; chrony's root delay/2 + \
                 dispersion {:.1} µs (ClockBound's formula {:.1} µs, its daemon {:.1} µs); \
                 served root delay {:.1} µs, dispersion {:.1} µs; daemon: served − host \
                 {:+.1} µs, bound {:.1} µs",
                measured.offset_s * 1e6,
                tr.root_distance_s() * 1e6,
                tr.clockbound_s() * 1e6,
                published.bound_s * 1e6,
                served_delay * 1e6,
                served_dispersion * 1e6,
                host_offset * 1e6,
                status_bound * 1e6,
            );
            // The upstream 1 ms off may stay a truechimer: with 16 s polls its RFC 5905 root
            // distance (aged filter dispersion) spans the millisecond. Its stratum 2 then
            // ranks it first, but its points barely weigh in the regression (their scatter
            // sets their weight): served time and bound stay honest either way.
            assert!(
                served.leap == 0
                    && (UPSTREAM_STRATUM..=UPSTREAM_STRATUM + 1).contains(&served.stratum),
                "{label}: {served:?}"
            );
            assert!(
                tr.root_distance_s() >= measured.offset_s.abs(),
                "{label}: the guest's bound {tr:?} is below its offset {measured:?}"
            );
            assert!(tr.clockbound_s() >= measured.offset_s.abs(), "{label}");
            assert_eq!(
                published.status,
                clock_bound_shm::ClockStatus::Synchronized,
                "{label}: {published:?}"
            );
            assert!(
                published.bound_s >= measured.offset_s.abs(),
                "{label}: ClockBound's bound {published:?} is below the offset {measured:?}"
            );
            assert!(
                status_bound >= host_offset.abs(),
                "{label}: served bound {status_bound} s, served − host {host_offset} s"
            );
            dispersions.push(served_dispersion);
            worst_ratio = worst_ratio.max(measured.offset_s.abs() / tr.root_distance_s());
        }
        eprintln!("{label}: largest |offset| / bound {worst_ratio:.3}");
        // The daemon's own estimate, not a tolerance: RFC 5905's growth served 490–720 µs
        // here. (The wire rounds up to 15.3 µs steps; chronyd upstreams state their own.) A
        // reply may carry a wider bound for a moment while a wrong upstream's points widen
        // the regression's scatter: wider is honest, so the median is what is checked.
        dispersions.sort_by(f64::total_cmp);
        assert!(
            dispersions[dispersions.len() / 2] < 200e-6,
            "{label}: served root dispersions {dispersions:?} s"
        );
        drop(clockbound);
        drop(guest);
        assert!(serve.stop().unwrap(), "daemon did not exit cleanly");
        let _ = std::fs::remove_file(&control);
    }
}

/// A DNS server that reads every query and answers none, on 127.0.0.1:53 of a namespace.
struct SilentResolver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    queries: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentResolver {
    fn start(ns: &Netns) -> SilentResolver {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let queries = std::sync::Arc::new(AtomicU64::new(0));
        let file = ns.file().unwrap();
        let (s, q) = (stop.clone(), queries.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&file).unwrap();
            let sock = UdpSocket::bind("127.0.0.1:53").unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    q.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ready_rx.recv().unwrap();
        SilentResolver {
            stop,
            queries,
            thread: Some(thread),
        }
    }

    fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SilentResolver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Removes `/etc/netns/NAME` (where `ip netns exec` finds a namespace's own resolv.conf).
struct NetnsEtc(std::path::PathBuf);

impl NetnsEtc {
    fn resolv_conf(ns: &Netns, text: &str) -> NetnsEtc {
        let dir = std::path::Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        NetnsEtc(dir)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// An upstream given by name whose resolver never answers: the clock task must not wait for
/// it. With a literal upstream beside it, the daemon synchronizes and publishes on time
/// (max_anchor_age is 2 s, so a stall shows as LI=3 or silence) while the name's lookups
/// time out in the background.
#[test]
fn a_resolver_that_never_answers_never_stalls_the_clock() {
    let t = Topology::new(56).unwrap();
    let host = Netns::new("nth").unwrap();
    let ns = Netns::new("ntu").unwrap();
    link_namespaces(&host, "169.254.57.2/24", &ns, "169.254.57.1/24").unwrap();
    let _upstream = ChronyServer::start(&ns, UPSTREAM_STRATUM).unwrap();
    // The daemon's resolver: a socket on its namespace's loopback that reads queries and
    // never answers (nothing leaves the test's namespaces).
    let silent = SilentResolver::start(&host);
    let _resolv = NetnsEtc::resolv_conf(
        &host,
        "nameserver 127.0.0.1\noptions timeout:30 attempts:3\n",
    );
    let args = [
        "--upstream",
        "169.254.57.1",
        "--upstream",
        "ntp.blackholed.test",
        "--set",
        "clock.min_sources=1",
        "--set",
        "clock.max_poll=4",
        "--set",
        "clock.max_anchor_age=2s",
        "--set",
        "limits.enable=false",
    ];
    let mut serve = ServeProcess::start_in(Some(&host), &t, "generic", &args).unwrap();
    wait_for_first_sync(&t, &mut serve);
    // Twenty seconds of queries, four a second: every one answered as synchronized, while
    // the name's first lookup (30 s per attempt) is still hanging.
    let start = Instant::now();
    let (mut answered, mut stale) = (0, 0);
    while start.elapsed() < Duration::from_secs(20) {
        match query(&t.guest, CLOCK_V4) {
            Some(h) if h.leap == 0 => answered += 1,
            _ => stale += 1,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut log = Vec::new();
    while let Ok(line) = serve.log.try_recv() {
        log.push(line);
    }
    assert_eq!(
        stale,
        0,
        "{stale} queries unanswered or LI=3 ({answered} fine):\n{}",
        log.join("\n")
    );
    assert!(answered >= 60, "{answered}");
    // The lookup is under way and has not finished (it will time out, then be retried).
    assert!(silent.queries() > 0, "the daemon never asked the resolver");
    assert!(
        !log.iter().any(|l| l.contains("upstream resolved")),
        "{}",
        log.join("\n")
    );
}
