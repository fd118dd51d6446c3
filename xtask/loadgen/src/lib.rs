//! The benchmark's load generator (`ntp-loadgen run`, driven by `cargo xtask bench`): threads
//! in a guest namespace send NTP client requests with sendmmsg and collect replies with
//! recvmmsg, open-loop at a paced rate or closed-loop with a window of outstanding requests.
//! Every reply is validated (length, mode 4, origin = a request's cookie); round-trip time,
//! the server's residence time (transmit − receive) and its timestamp error (receive
//! timestamp against the midpoint of the client's send and receive times, one host clock) are
//! recorded. Bounded in time and in count.

pub mod flood;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ntp_common::time::{ntp_ns_to_timestamp, timestamp_diff_ns, unix_ns_to_ntp_ns};
use ntp_common::wire::*;
use serde::Serialize;

use ntp_user::host::hostclock::read_clock_pair;
use ntp_user::host::netns;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub netns: Option<String>,
    pub threads: usize,
    /// Open loop: requests per second over all threads. None: closed loop with `window`.
    pub rate: Option<u64>,
    pub window: usize,
    pub duration: Duration,
    pub max_requests: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    pub offered_per_s: f64,
    pub sent: u64,
    pub valid: u64,
    pub invalid: u64,
    pub lost: u64,
    /// RATE/DENY kiss-o'-death replies to our requests: not valid, not lost.
    pub kod: u64,
    pub elapsed_s: f64,
    /// What the generator managed to send: below `offered_per_s` when it is the bottleneck.
    pub sent_per_s: f64,
    pub replies_per_s: f64,
    pub loss: f64,
    pub rtt_us: Percentiles,
    pub residence_ns: Percentiles,
    /// |receive timestamp − midpoint of the client's send and receive|, µs.
    pub ts_error_us: Percentiles,
}

const BATCH: usize = 32;
const RING: usize = 1 << 16;
/// A request unanswered this long is lost (and frees its window slot).
const LOSS_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Default)]
struct Pending {
    seq: u64,
    sent_mono: u64,
    sent_unix: u64,
    open: bool,
}

#[derive(Default)]
struct ThreadTally {
    sent: u64,
    valid: u64,
    invalid: u64,
    lost: u64,
    kod: u64,
    rtt_ns: Vec<u64>,
    residence_ns: Vec<i64>,
    ts_error_ns: Vec<i64>,
}

/// Runs the load; returns the figures.
pub fn run(spec: &LoadSpec) -> Result<LoadResult> {
    if spec.threads == 0 || spec.threads > 64 {
        bail!("threads must be 1..=64");
    }
    let ns = match &spec.netns {
        Some(n) => Some(netns::open_named_netns(n)?),
        None => None,
    };
    let start = Instant::now();
    let handles: Vec<_> = (0..spec.threads)
        .map(|i| {
            let spec = spec.clone();
            let ns = ns.as_ref().map(|f| f.try_clone()).transpose();
            std::thread::spawn(move || -> Result<ThreadTally> {
                if let Some(ns) = ns? {
                    netns::enter(&ns)?;
                }
                worker(&spec, i as u64)
            })
        })
        .collect();
    let mut all = ThreadTally::default();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        all.sent += t.sent;
        all.valid += t.valid;
        all.invalid += t.invalid;
        all.lost += t.lost;
        all.kod += t.kod;
        all.rtt_ns.extend(t.rtt_ns);
        all.residence_ns.extend(t.residence_ns);
        all.ts_error_ns.extend(t.ts_error_ns);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let pct_u = |v: &mut Vec<u64>, scale: f64| percentiles(v.iter().map(|x| *x as f64 / scale));
    let pct_i =
        |v: &Vec<i64>, scale: f64| percentiles(v.iter().map(|x| x.unsigned_abs() as f64 / scale));
    Ok(LoadResult {
        offered_per_s: spec.rate.map_or(0.0, |r| r as f64),
        sent: all.sent,
        valid: all.valid,
        invalid: all.invalid,
        lost: all.lost,
        kod: all.kod,
        elapsed_s: elapsed,
        sent_per_s: all.sent as f64 / spec.duration.as_secs_f64(),
        replies_per_s: all.valid as f64 / spec.duration.as_secs_f64(),
        loss: if all.sent == 0 {
            0.0
        } else {
            all.lost as f64 / all.sent as f64
        },
        rtt_us: pct_u(&mut all.rtt_ns, 1e3),
        residence_ns: percentiles(all.residence_ns.iter().map(|x| *x as f64)),
        ts_error_us: pct_i(&all.ts_error_ns, 1e3),
    })
}

fn percentiles(values: impl Iterator<Item = f64>) -> Percentiles {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
    }
}

fn worker(spec: &LoadSpec, thread: u64) -> Result<ThreadTally> {
    let bind = if spec.target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).context("binding a generator socket")?;
    sock.connect(spec.target)
        .context("connecting the generator socket")?;
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    let mut tally = ThreadTally::default();
    let mut ring = vec![Pending::default(); RING];
    let mut seq: u64 = 0;
    let mut outstanding = 0usize;
    let per_thread_rate = spec.rate.map(|r| (r as f64 / spec.threads as f64).max(1.0));
    let start = Instant::now();
    let end = start + spec.duration;
    let max_per_thread = spec.max_requests / spec.threads as u64;
    let mut reqs = [[0u8; 48]; BATCH];
    let mut bufs = [[0u8; 64]; BATCH];
    let mut oldest: u64 = 0;
    loop {
        let now = Instant::now();
        let sending = now < end && tally.sent < max_per_thread;
        if !sending && outstanding == 0 {
            break;
        }
        if now > end + LOSS_TIMEOUT * 2 {
            break;
        }
        // How many to send now.
        let due = if !sending {
            0
        } else if let Some(r) = per_thread_rate {
            let should = (now.duration_since(start).as_secs_f64() * r) as u64;
            (should.saturating_sub(tally.sent) as usize).min(BATCH)
        } else {
            spec.window.saturating_sub(outstanding).min(BATCH)
        };
        if due > 0 {
            let pair = read_clock_pair()?;
            for req in reqs.iter_mut().take(due) {
                let cookie = (thread << 48) | (seq & 0xffff_ffff_ffff);
                *req = [0u8; 48];
                req[0] = li_vn_mode(0, 4, MODE_CLIENT);
                req[40..48].copy_from_slice(&cookie.to_be_bytes());
                let slot = &mut ring[(seq as usize) % RING];
                if slot.open {
                    tally.lost += 1;
                    outstanding = outstanding.saturating_sub(1);
                }
                *slot = Pending {
                    seq,
                    sent_mono: pair.mono_ns,
                    sent_unix: pair.unix_ns,
                    open: true,
                };
                seq += 1;
                outstanding += 1;
            }
            let n = send_batch(fd, &reqs[..due]);
            // Datagrams the kernel refused (full buffers) are lost at once.
            for k in n..due {
                let s = seq - (due - k) as u64;
                let slot = &mut ring[(s as usize) % RING];
                if slot.open && slot.seq == s {
                    slot.open = false;
                    outstanding = outstanding.saturating_sub(1);
                    tally.lost += 1;
                }
            }
            tally.sent += due as u64;
        }
        let (got, malformed) = recv_batch(fd, &mut bufs);
        tally.invalid += malformed as u64;
        if got > 0 {
            let pair = read_clock_pair()?;
            for buf in bufs.iter().take(got) {
                let reply = &buf[..48];
                let cookie = read_be64(reply, OFF_ORIGIN_TS);
                let s = cookie & 0xffff_ffff_ffff;
                let slot = &mut ring[(s as usize) % RING];
                if mode(reply[0]) != MODE_SERVER
                    || cookie >> 48 != thread
                    || !slot.open
                    || slot.seq != s
                {
                    tally.invalid += 1;
                    continue;
                }
                slot.open = false;
                outstanding = outstanding.saturating_sub(1);
                let code = &reply[OFF_REFID..OFF_REFID + 4];
                if reply[OFF_STRATUM] == STRATUM_UNSPECIFIED && (code == b"RATE" || code == b"DENY")
                {
                    tally.kod += 1;
                    continue;
                }
                tally.valid += 1;
                if tally.rtt_ns.len() < 2_000_000 {
                    tally
                        .rtt_ns
                        .push(pair.mono_ns.saturating_sub(slot.sent_mono));
                    let rx = read_be64(reply, OFF_RECEIVE_TS);
                    let tx = read_be64(reply, OFF_TRANSMIT_TS);
                    tally.residence_ns.push(timestamp_diff_ns(tx, rx));
                    let mid_unix =
                        slot.sent_unix + (pair.unix_ns.saturating_sub(slot.sent_unix)) / 2;
                    let mid = ntp_ns_to_timestamp(unix_ns_to_ntp_ns(mid_unix));
                    tally.ts_error_ns.push(timestamp_diff_ns(rx, mid));
                }
            }
        }
        // Expire requests that waited too long.
        let now_mono = read_clock_pair()?.mono_ns;
        while oldest < seq {
            let slot = &mut ring[(oldest as usize) % RING];
            if slot.seq == oldest && slot.open {
                if now_mono.saturating_sub(slot.sent_mono) < LOSS_TIMEOUT.as_nanos() as u64 {
                    break;
                }
                slot.open = false;
                outstanding = outstanding.saturating_sub(1);
                tally.lost += 1;
            }
            oldest += 1;
        }
        if due == 0 && got == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    Ok(tally)
}

/// One message header per buffer, without addresses (the socket is connected or bound).
pub(crate) fn mmsg_headers(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: a zeroed mmsghdr is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// sendmmsg on a connected socket; returns how many datagrams the kernel took.
fn send_batch(fd: i32, reqs: &[[u8; 48]]) -> usize {
    let mut iovs: Vec<libc::iovec> = reqs
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.as_ptr() as *mut libc::c_void,
            iov_len: 48,
        })
        .collect();
    let mut msgs = mmsg_headers(&mut iovs);
    // SAFETY: msgs and the buffers they point to outlive the call.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT) };
    n.max(0) as usize
}

/// recvmmsg without waiting: (48-byte replies packed at the front of `bufs`, datagrams of any
/// other size).
fn recv_batch(fd: i32, bufs: &mut [[u8; 64]; BATCH]) -> (usize, usize) {
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: 64,
        })
        .collect();
    let mut msgs = mmsg_headers(&mut iovs);
    // SAFETY: as above; no timeout with MSG_DONTWAIT.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            BATCH as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n <= 0 {
        return (0, 0);
    }
    // Keep only well-sized replies, packed at the front.
    let mut kept = 0;
    for i in 0..n as usize {
        if msgs[i].msg_len == 48 {
            if kept != i {
                bufs[kept] = bufs[i];
            }
            kept += 1;
        }
    }
    (kept, n as usize - kept)
}

/// The Ethernet ends of a frame: (destination, source).
pub type Macs = ([u8; 6], [u8; 6]);

/// An Ethernet/IPv4/UDP frame carrying a 48-byte NTP request from `src:port` to `dst:123`
/// (first byte `ntp_b0`, transmit timestamp `transmit`), checksums filled in.
pub fn request_frame(
    macs: Macs,
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    ntp_b0: u8,
    transmit: u64,
) -> [u8; 90] {
    use ntp_common::checksum::{add_words, finish, finish_udp, pseudo_v4};
    let mut f = [0u8; 90];
    f[0..6].copy_from_slice(&macs.0);
    f[6..12].copy_from_slice(&macs.1);
    f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&(20 + NTP_UDP_LEN).to_be_bytes());
    f[22] = 64;
    f[23] = IPPROTO_UDP;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    let ip_check = finish(add_words(0, &f[14..34]));
    f[24..26].copy_from_slice(&ip_check.to_be_bytes());
    f[34..36].copy_from_slice(&port.to_be_bytes());
    f[36..38].copy_from_slice(&NTP_PORT.to_be_bytes());
    f[38..40].copy_from_slice(&NTP_UDP_LEN.to_be_bytes());
    f[42] = ntp_b0;
    f[82..90].copy_from_slice(&transmit.to_be_bytes());
    let c = finish_udp(add_words(pseudo_v4(&src, &dst, NTP_UDP_LEN), &f[34..90]));
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

/// The micro benchmark's request: to the loopback MAC TEST_RUN delivers on, from a guest port.
fn micro_frame(src: [u8; 4], dst: [u8; 4], ntp_b0: u8) -> [u8; 90] {
    let macs = ([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);
    request_frame(macs, src, dst, 40000, ntp_b0, 0x0102_0304_0506_0708)
}

/// The responder's cost per packet through BPF_PROG_TEST_RUN, for the answered path and the
/// main drop and pass paths: (case, verdict, ns per run). Each run gets a fresh copy of the
/// frame (one run per syscall, the kernel's own timer): repeating in one call would run the
/// program on its own reply after the first time.
pub fn micro(repeat: u32) -> Result<Vec<(String, u32, f64)>> {
    use ntp_user::responder::Responder;
    let mut r = Responder::load()?;
    let clock = [169, 254, 169, 123];
    r.add_served_address(std::net::IpAddr::from(clock))?;
    // BPF_PROG_TEST_RUN delivers on the loopback device (ifindex 1): the frames' MAC is its.
    r.set_own_macs(&[([0x02, 0, 0, 0, 0, 1], 1)])?;
    let identity = ntp_user::host::hostclock::HostClockIdentity {
        follow_kernel_sync: false,
        stratum: 2,
        refid: *b"BNCH",
        max_age_ns: 3600 * 1_000_000_000,
    };
    r.publish_anchor(ntp_user::host::hostclock::host_clock_anchor(&identity)?)?;
    let good = micro_frame([169, 254, 1, 2], clock, li_vn_mode(0, 4, MODE_CLIENT));
    let mut bad_mode = good.clone();
    bad_mode[42] = li_vn_mode(0, 4, MODE_SERVER);
    let not_served = micro_frame(
        [169, 254, 1, 2],
        [169, 254, 1, 1],
        li_vn_mode(0, 4, MODE_CLIENT),
    );
    let mut bad_sum = good.clone();
    bad_sum[40] ^= 0x55;
    use ntp_common::policy::*;
    // The default config's admission (rate limit with KoD, guest clock records) with a rate
    // no repeat run exhausts: the cost of the lookups on the answered path. Then a rate that
    // is exhausted at once: the cost of refusing a flood.
    let mut policed = ResponderPolicy::OPEN.with_rate(1e9, 1_000_000);
    policed.flags |= POLICY_KOD_RATE | POLICY_GUEST_CLOCKS;
    policed.kod_interval_ns = 10_000_000_000;
    let mut flooded = ResponderPolicy::OPEN.with_rate(1e-3, 1);
    flooded.flags |= POLICY_KOD_RATE | POLICY_GUEST_CLOCKS;
    flooded.kod_interval_ns = 3_600_000_000_000;
    let open = ResponderPolicy::OPEN;
    let mut guests_only = ResponderPolicy::OPEN;
    guests_only.flags |= POLICY_GUEST_CLOCKS;
    let mut out = vec![(
        "floor (XDP_PASS only: the harness)".to_string(),
        2,
        r.test_run_floor(&good, repeat)?.as_nanos() as f64,
    )];
    for (label, name, policy, frame) in [
        ("answered_ipv4", "answered_ipv4", open, good.clone()),
        ("passed_not_served", "passed_not_served", open, not_served),
        (
            "dropped_bad_udp_checksum",
            "dropped_bad_udp_checksum",
            open,
            bad_sum,
        ),
        ("passed_not_client", "passed_not_client", open, bad_mode),
        (
            "answered_ipv4 (guest clocks)",
            "answered_ipv4",
            guests_only,
            good.clone(),
        ),
        (
            "answered_ipv4 (rate limit + guest clocks)",
            "answered_ipv4",
            policed,
            good.clone(),
        ),
        ("dropped_rate_limited", "kod_rate", flooded, good),
    ] {
        r.set_policy(policy)?;
        if policy.emission_ns > 1_000_000_000 {
            // Spend the source's one token: what follows is refused.
            r.test_run(&frame)?;
        }
        let before = r.counters()?;
        let verdict = r.test_run(&frame)?.action;
        let moved: Vec<&str> = r
            .counters()?
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((c, _), _)| c.name())
            .collect();
        if moved != [name] {
            bail!("micro case {label}: the responder counted {moved:?} (verdict {verdict})");
        }
        let (steady, per_run) = r.test_run_mean(&frame, repeat)?;
        // The refused case answers its first excess request with a KoD, then drops.
        if steady != verdict && name != "kod_rate" {
            bail!("micro case {label}: verdict {steady} in the timed runs, {verdict} first");
        }
        out.push((label.to_string(), steady, per_run.as_nanos() as f64));
    }
    Ok(out)
}
