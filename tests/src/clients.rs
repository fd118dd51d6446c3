//! Third-party NTP clients, run query-only and without CAP_SYS_TIME so they can never set the
//! machine's clock.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::unique_name;
use testbed::chrony::NO_SYS_TIME;
pub use testbed::chrony::{
    chronyd_query, ntpdig, ntpdig_best_of_3, ChronyMeasurement, ChronyTracker, NtpdigReply,
    Tracking,
};

/// AWS's ClockBound daemon (`clockbound`, built by `cargo xtask setup`) beside a
/// [`ChronyTracker`], as a guest runs it without a VMClock device: in the tracker's mount
/// namespace it reads chronyd's tracking over /run/chrony/chronyd.sock and publishes its bound
/// in /run/clockbound/shm0, which [`ClockBound::now`] reads as an application does. It runs
/// without CAP_SYS_TIME and with clock-disruption support off (it then only reads chronyd).
pub struct ClockBound {
    child: std::process::Child,
    shm: std::ffi::CString,
    log: PathBuf,
}

/// What ClockBound's client API returns now.
#[derive(Debug, Clone, Copy)]
pub struct ClockBoundNow {
    /// Half the (earliest, latest) interval: the bound on CLOCK_REALTIME's error (seconds).
    pub bound_s: f64,
    pub status: clock_bound_shm::ClockStatus,
}

impl ClockBound {
    /// `max_drift_ppm`: the drift allowance it adds per second since chronyd's tracking was
    /// read (what `ntp-xdp guest-config` suggests).
    pub fn start(tracker: &ChronyTracker, max_drift_ppm: u32) -> Result<ClockBound> {
        let pid = tracker.pid();
        let mount_ns = format!("/proc/{pid}/ns/mnt");
        if std::fs::read_link(&mount_ns)? == std::fs::read_link("/proc/self/ns/mnt")? {
            bail!("chronyd {pid} is not in its own mount namespace yet");
        }
        let run = tracker.run_dir();
        let shm =
            std::ffi::CString::new(run.join("clockbound/shm0").as_os_str().as_encoded_bytes())?;
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("clockbound")));
        let out = std::fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--mount={mount_ns}"))
            .arg("setpriv")
            .args(NO_SYS_TIME)
            .args(["clockbound", "--disable-clock-disruption-support"])
            .args(["--max-drift-rate", &max_drift_ppm.to_string()])
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting clockbound (built by `cargo xtask setup`)")?;
        Ok(ClockBound { child, shm, log })
    }

    /// The bound and status ClockBound's segment gives now.
    pub fn now(&self) -> Result<ClockBoundNow> {
        let mut reader = clock_bound_shm::ShmReader::new(&self.shm)
            .map_err(|e| anyhow!("opening {:?}: {e:?}", self.shm))?;
        let (earliest, latest, status) = reader
            .snapshot()
            .and_then(|ceb| ceb.now())
            .map_err(|e| anyhow!("reading {:?}: {e:?}", self.shm))?;
        let width = latest - earliest;
        Ok(ClockBoundNow {
            bound_s: (width.tv_sec() as f64 + width.tv_nsec() as f64 * 1e-9) / 2.0,
            status,
        })
    }

    /// What it logged (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ClockBound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What a run of sequential queries saw.
#[derive(Default, Debug)]
pub struct ClientTally {
    pub answered: u64,
    pub lost: u64,
    /// Replies whose timestamps went backwards against the previous reply's.
    pub backwards: Vec<String>,
    /// Replies that said unsynchronized (LI=3).
    pub unsynchronized: u64,
}

/// Sends requests one after another from `guest_ns` to `addr`:123 (each waits up to 250 ms for
/// its reply) until `count` are answered, `deadline` passes or `stop` is set. Checks each reply
/// echoes its request's transmit timestamp, and that receive and transmit timestamps never go
/// backwards: requests are sequential, so each is received after the previous reply was sent.
pub fn sequential_queries(
    guest_ns: std::fs::File,
    addr: &str,
    count: u64,
    deadline: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> ClientTally {
    paced_queries(
        guest_ns,
        addr,
        count,
        deadline,
        std::time::Duration::ZERO,
        stop,
    )
}

/// [`sequential_queries`] with `pause` between one reply (or loss) and the next request: a
/// client polling at a steady rate.
pub fn paced_queries(
    guest_ns: std::fs::File,
    addr: &str,
    count: u64,
    deadline: std::time::Duration,
    pause: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> ClientTally {
    use ntp_common::wire::{li_vn_mode, mode, read_be64, MODE_CLIENT, MODE_SERVER};
    use std::sync::atomic::Ordering;
    testbed::netns::enter(&guest_ns).expect("entering the guest namespace");
    let sock = std::net::UdpSocket::bind(if addr.contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })
    .expect("binding the client socket");
    sock.connect((addr, 123))
        .expect("connecting the client socket");
    sock.set_read_timeout(Some(std::time::Duration::from_millis(250)))
        .unwrap();
    let mut tally = ClientTally::default();
    let (mut last_rx, mut last_tx) = (0u64, 0u64);
    let mut buf = [0u8; 128];
    let start = std::time::Instant::now();
    let mut seq: u64 = 0x5eed_0000_0000_0000 | rand_low();
    while tally.answered < count && start.elapsed() < deadline && !stop.load(Ordering::Relaxed) {
        if !pause.is_zero() && tally.answered + tally.lost > 0 {
            std::thread::sleep(pause);
        }
        seq += 1;
        let mut req = [0u8; 48];
        req[0] = li_vn_mode(0, 4, MODE_CLIENT);
        req[40..48].copy_from_slice(&seq.to_be_bytes());
        if sock.send(&req).is_err() {
            tally.lost += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        let reply = loop {
            match sock.recv(&mut buf) {
                // A late reply to an earlier request: skip it.
                Ok(48) if buf[24..32] != seq.to_be_bytes() => continue,
                Ok(48) => break Some(buf),
                Ok(n) => panic!("reply of {n} bytes"),
                Err(_) => break None,
            }
        };
        let Some(reply) = reply else {
            tally.lost += 1;
            continue;
        };
        assert_eq!(mode(reply[0]), MODE_SERVER);
        if reply[0] >> 6 == 3 {
            tally.unsynchronized += 1;
        }
        let rx = read_be64(&reply, 32);
        let tx = read_be64(&reply, 40);
        if rx <= last_tx || tx <= last_tx || rx <= last_rx {
            tally.backwards.push(format!(
                "#{}: rx {rx:#x} tx {tx:#x} after rx {last_rx:#x} tx {last_tx:#x}",
                tally.answered
            ));
        }
        last_rx = rx;
        last_tx = tx;
        tally.answered += 1;
    }
    tally
}

fn rand_low() -> u64 {
    (std::process::id() as u64) << 24
}

/// Sends `count` requests from `ns` to `addr`:123 whose transmit timestamps read the host
/// clock shifted by `skew_s` (a guest whose clock is that far off); returns how many were
/// answered with this request's origin.
pub fn skewed_requests(
    ns: &crate::topology::Netns,
    addr: &str,
    skew_s: f64,
    count: u32,
) -> anyhow::Result<u32> {
    use ntp_common::time::{ntp_ns_to_timestamp, unix_ns_to_ntp_ns};
    use ntp_common::wire::{li_vn_mode, MODE_CLIENT};
    let file = ns.file()?;
    let addr = addr.to_string();
    std::thread::spawn(move || -> anyhow::Result<u32> {
        testbed::netns::enter(&file)?;
        let sock = unbound_socket_for(addr.parse()?)?;
        sock.connect((addr.as_str(), 123))?;
        sock.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
        let mut answered = 0;
        for _ in 0..count {
            let unix_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as i128
                + (skew_s * 1e9) as i128;
            let tx = ntp_ns_to_timestamp(unix_ns_to_ntp_ns(unix_ns as u64));
            let mut req = [0u8; 48];
            req[0] = li_vn_mode(0, 4, MODE_CLIENT);
            req[40..48].copy_from_slice(&tx.to_be_bytes());
            sock.send(&req)?;
            let mut buf = [0u8; 128];
            if let Ok(48) = sock.recv(&mut buf) {
                if buf[24..32] == req[40..48] {
                    answered += 1;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(answered)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// `GET path` from inside `ns` (the metrics endpoint listens on that namespace's loopback).
pub fn http_get(
    ns: &crate::topology::Netns,
    addr: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let file = ns.file()?;
    let path = path.to_string();
    std::thread::spawn(move || -> anyhow::Result<String> {
        testbed::netns::enter(&file)?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no HTTP header end in {text:?}"))?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        Ok(body.to_string())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// The value of one sample (`name{labels}` exactly as exposed) in a Prometheus text body.
pub fn metric(body: &str, sample: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// One client request from `ns` to `addr`:123: the reply, or None after 500 ms.
pub fn one_query(ns: &crate::topology::Netns, addr: &str) -> anyhow::Result<Option<Vec<u8>>> {
    one_query_with_tail(ns, addr, 0)
}

/// [`one_query`] with `tail` bytes after the header (20: a key ID and MD5 digest, as a
/// symmetric-key client sends): what the responder passes up to the userspace path.
pub fn one_query_with_tail(
    ns: &crate::topology::Netns,
    addr: &str,
    tail: usize,
) -> anyhow::Result<Option<Vec<u8>>> {
    use ntp_common::wire::{li_vn_mode, MODE_CLIENT};
    let file = ns.file()?;
    let addr = addr.to_string();
    std::thread::spawn(move || -> anyhow::Result<Option<Vec<u8>>> {
        testbed::netns::enter(&file)?;
        let sock = unbound_socket_for(addr.parse()?)?;
        sock.connect((addr.as_str(), 123))?;
        sock.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
        let mut req = vec![0u8; 48 + tail];
        req[0] = li_vn_mode(0, 4, MODE_CLIENT);
        req[40..48].copy_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
        sock.send(&req)?;
        let mut buf = [0u8; 128];
        Ok(sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// A UDP socket on an ephemeral port of `addr`'s family.
fn unbound_socket_for(addr: std::net::IpAddr) -> std::io::Result<std::net::UdpSocket> {
    let any: std::net::IpAddr = if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    std::net::UdpSocket::bind((any, 0))
}

/// What the guest saw of one request.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub at: std::time::Instant,
    pub stratum: u8,
    pub leap: u8,
    pub transmit: u64,
}

/// What the poller saw: every answer in order, how many requests went out, and how many got a
/// second answer (two hosts answering one request).
/// The longest time between two consecutive answers.
pub fn longest_gap(seen: &[Seen]) -> std::time::Duration {
    seen.windows(2)
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap_or_default()
}

pub struct Polled {
    pub seen: Vec<Seen>,
    pub sent: u64,
    pub duplicates: u64,
    /// When the requests that got no answer were sent.
    pub unanswered: Vec<std::time::Instant>,
}

/// Polls the clock address 20 times a second until `stop`, each request from a fresh socket
/// whose request carries its own cookie, sent on time whether or not the earlier ones were
/// answered (a gap is seen as a guest polling at that rate sees it). An answer counts within
/// 500 ms of its request; after it, the socket is read 30 ms more for a second one.
pub fn poll(
    guest: &crate::topology::Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Polled> {
    poll_counting(guest, stop, Default::default())
}

/// [`poll`], counting the answers in `answered` as they come (a test waits on it instead of
/// sleeping).
pub fn poll_counting(
    guest: &crate::topology::Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Polled> {
    poll_counting_at(guest, crate::CLOCK_V4, stop, answered)
}

/// [`poll_counting`] of the clock address `addr` (IPv4 or IPv6).
pub fn poll_counting_at(
    guest: &crate::topology::Netns,
    addr: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Polled> {
    use std::time::{Duration, Instant};
    const PACE: Duration = Duration::from_millis(50);
    const ANSWER_WAIT: Duration = Duration::from_millis(500);
    const SECOND_ANSWER_WAIT: Duration = Duration::from_millis(30);
    /// A request in flight: its socket, cookie, when it went and when its answer came.
    struct InFlight {
        sock: std::net::UdpSocket,
        cookie: u64,
        sent: Instant,
        answered: Option<Instant>,
    }
    let addr: std::net::IpAddr = addr.parse().expect("a clock address");
    let file = guest.file().unwrap();
    std::thread::spawn(move || {
        testbed::netns::enter(&file).unwrap();
        let mut p = Polled {
            seen: Vec::new(),
            sent: 0,
            duplicates: 0,
            unanswered: Vec::new(),
        };
        let mut in_flight: Vec<InFlight> = Vec::new();
        let mut next = Instant::now();
        let mut buf = [0u8; 128];
        loop {
            let stopping = stop.load(std::sync::atomic::Ordering::Relaxed);
            if stopping && in_flight.is_empty() {
                break;
            }
            let now = Instant::now();
            if !stopping && now >= next {
                p.sent += 1;
                let sock = unbound_socket_for(addr).unwrap();
                sock.set_nonblocking(true).unwrap();
                let cookie = 0x5eed_0000_0000_0000u64 | p.sent;
                let req = ntp_common::packet::NtpHeader::client_request(6, cookie).serialize();
                // A route or send the kernel refuses is a request that goes unanswered.
                if sock.connect((addr, 123)).is_ok() {
                    let _ = sock.send(&req);
                }
                in_flight.push(InFlight {
                    sock,
                    cookie,
                    sent: now,
                    answered: None,
                });
                next = (next + PACE).max(now);
            }
            for f in &mut in_flight {
                while let Ok(n) = f.sock.recv(&mut buf) {
                    let Some(h) = ntp_common::packet::NtpHeader::parse(&buf[..n])
                        .filter(|h| h.origin_ts == f.cookie)
                    else {
                        continue;
                    };
                    if f.answered.is_some() {
                        p.duplicates += 1;
                        continue;
                    }
                    let at = Instant::now();
                    f.answered = Some(at);
                    p.seen.push(Seen {
                        at,
                        stratum: h.stratum,
                        leap: h.leap,
                        transmit: h.transmit_ts,
                    });
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let now = Instant::now();
            in_flight.retain(|f| match f.answered {
                Some(at) => now - at < SECOND_ANSWER_WAIT,
                None if now - f.sent < ANSWER_WAIT => true,
                None => {
                    p.unanswered.push(f.sent);
                    false
                }
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        p.unanswered.sort();
        p
    })
}

/// What a guest got back from the clock address: time, and kiss-o'-death codes.
#[derive(Debug, Default)]
pub struct Answers {
    pub sent: u64,
    /// Replies that gave time (stratum above 0).
    pub time: u64,
    /// Kiss-o'-death codes, in the order they came.
    pub kisses: Vec<[u8; 4]>,
}

impl Answers {
    pub fn kisses_of(&self, code: &[u8; 4]) -> usize {
        self.kisses.iter().filter(|k| *k == code).count()
    }
}

/// Sends a request to the clock address every `pace` from `guest` until `stop`, each reply
/// awaited at most `pace` on one socket, so that a late one still counts: a guest that polls
/// hard enough to meet a short window in which the server answers wrongly.
pub fn tally_answers(
    guest: &crate::topology::Netns,
    pace: std::time::Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Answers> {
    let file = guest.file().unwrap();
    std::thread::spawn(move || {
        testbed::netns::enter(&file).unwrap();
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect((crate::CLOCK_V4, 123)).unwrap();
        const TAG: u64 = 0x7a11;
        let mut a = Answers::default();
        let mut buf = [0u8; 128];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            a.sent += 1;
            let req = ntp_common::packet::NtpHeader::client_request(6, TAG << 48 | a.sent);
            let _ = sock.send(&req.serialize());
            let deadline = std::time::Instant::now() + pace;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left)).unwrap();
                let Ok(n) = sock.recv(&mut buf) else { break };
                match ntp_common::packet::NtpHeader::parse(&buf[..n]) {
                    Some(h) if h.origin_ts >> 48 != TAG => {}
                    Some(h) if h.stratum == 0 => a.kisses.push(h.refid),
                    Some(_) => a.time += 1,
                    None => {}
                }
            }
        }
        a
    })
}

/// ntpd-rs's `ntp-ctl`, as `cargo xtask setup` installs it (cargo's bin directory), or the
/// one on PATH.
pub fn ntp_ctl_bin() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    home.map(|h| h.join("bin/ntp-ctl"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "ntp-ctl".into())
}
