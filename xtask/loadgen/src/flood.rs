//! `ntp-loadgen sink` and `ntp-loadgen flood`: a generator that is not the limit.
//!
//! Requests are prebuilt Ethernet frames sent with sendmmsg on an AF_PACKET socket that
//! bypasses the qdisc; replies never reach a socket: `ntp_bench_sink`, an XDP program on the
//! guest's veth, checks and counts them and drops them. So the cores spend their time on the
//! server, not on the generator's sockets. The same frames go to every server (XDP, the
//! userspace path, chronyd). `ntp_bench_drop` in place of a server counts what the generator
//! alone delivers: its ceiling. Both programs stay attached between runs through pinned
//! bpf_links, and `flood` reads their pinned counter map before and after.
//!
//! Bounded: at most 120 s and `max_frames` frames per run; addresses are the caller's (the
//! bench uses 169.254.0.0/16 inside its own namespaces).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{Xdp, XdpMode};
use ntp_common::bench::{
    BENCH_INVALID_REPLIES, BENCH_KOD_REPLIES, BENCH_ORIGIN_TAG, BENCH_REQUESTS_DROPPED,
    BENCH_VALID_REPLIES,
};
use ntp_common::maps::{BENCH_COUNTS, BENCH_DROP_PROGRAM, BENCH_SINK_PROGRAM};
use ntp_common::wire::*;
use serde::Serialize;

use ntp_user::host::netns;
use ntp_user::responder::pins;

/// Which counting program `sink attach` puts on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// Guest side: count and drop the replies to generated requests.
    Replies,
    /// Server side, in place of a server: count and drop every request (the ceiling).
    Requests,
}

/// Loads the counting program and attaches it to `interface` in `netns` (native XDP unless
/// `generic`), pinning the attachment and its counter map in `pin_dir`.
pub fn sink_attach(
    netns_name: &str,
    interface: &str,
    kind: SinkKind,
    generic: bool,
    pin_dir: &Path,
) -> Result<()> {
    // Held until the pins exist: a daemon's `down` must not unmount bpffs in between.
    let _bpffs = pins::bpffs_lock()?;
    pins::ensure_bpffs()?;
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    let mut ebpf = aya::EbpfLoader::new()
        .load(ntp_user::responder::EBPF_OBJECT)
        .context("loading the eBPF object")?;
    let name = match kind {
        SinkKind::Replies => BENCH_SINK_PROGRAM,
        SinkKind::Requests => BENCH_DROP_PROGRAM,
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("{name} missing from the eBPF object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {name}"))?;
    let ns = netns::open_named_netns(netns_name)?;
    let mode = if generic {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    };
    let id = netns::within(&ns, || {
        let if_index = nix::net::if_::if_nametoindex(interface)
            .with_context(|| format!("no interface {interface} in {netns_name}"))?;
        prog.attach_to_if_index(if_index, mode)
            .with_context(|| format!("attaching {name} to {interface} in {netns_name}"))
    })?;
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .map_err(|_| anyhow!("XDP attached without a bpf_link; it cannot be pinned"))?;
    link.pin(pin_dir.join("link"))
        .context("pinning the attachment")?;
    ebpf.map_mut(BENCH_COUNTS)
        .ok_or_else(|| anyhow!("{BENCH_COUNTS} missing"))?
        .pin(pin_dir.join(BENCH_COUNTS))
        .context("pinning the counters")?;
    Ok(())
}

/// Removes the pins (the attachment goes with its last reference), and bpffs itself if it
/// was mounted for them and holds nothing else now.
pub fn sink_detach(pin_dir: &Path) -> Result<()> {
    let _bpffs = pins::bpffs_lock()?;
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    pins::release_bpffs()?;
    Ok(())
}

/// Totals of the pinned counters over all CPUs.
fn read_counts(pin_dir: &Path) -> Result<[u64; 4]> {
    let data = MapData::from_pin(pin_dir.join(BENCH_COUNTS))
        .with_context(|| format!("opening the counters pinned in {}", pin_dir.display()))?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    let mut out = [0u64; 4];
    for (slot, total) in [
        BENCH_VALID_REPLIES,
        BENCH_INVALID_REPLIES,
        BENCH_KOD_REPLIES,
        BENCH_REQUESTS_DROPPED,
    ]
    .into_iter()
    .zip(out.iter_mut())
    {
        *total = map.get(&slot, 0)?.iter().sum();
    }
    Ok(out)
}

/// What `ntp-loadgen flood` sends, and where it reads the outcome.
#[derive(Debug, Clone, clap::Args)]
pub struct FloodSpec {
    /// The guest namespace and its interface to send from.
    #[arg(long)]
    pub netns: String,
    #[arg(long)]
    pub interface: String,
    /// First source address of the frames; they cycle through `sources` consecutive ones.
    #[arg(long)]
    pub src: Ipv4Addr,
    #[arg(long, default_value_t = 1)]
    pub sources: u32,
    #[arg(long)]
    pub target: Ipv4Addr,
    /// The server-side MAC the frames go to.
    #[arg(long, value_parser = parse_mac)]
    pub dst_mac: [u8; 6],
    /// Frames per second over all threads.
    #[arg(long)]
    pub rate: u64,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 100_000_000)]
    pub max_frames: u64,
    /// Where `sink` pinned the counters that see this run's outcome.
    #[arg(long)]
    pub counts: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FloodResult {
    pub offered_per_s: f64,
    pub sent: u64,
    pub elapsed_s: f64,
    pub sent_per_s: f64,
    /// Replies that passed the sink's checks, kiss-o'-death replies, failed ones.
    pub valid: u64,
    pub kod: u64,
    pub invalid: u64,
    /// Requests the ceiling program counted (server side, in place of a server).
    pub arrived: u64,
    pub replies_per_s: f64,
    /// 1 − (replies or arrivals) / sent.
    pub loss: f64,
}

const FLOOD_BATCH: usize = 64;
/// Distinct frames per thread (source ports and sequence numbers), reused in turn.
const FRAMES_PER_THREAD: usize = 1024;

/// The MAC of `interface` in the calling thread's namespace.
fn own_mac(interface: &str) -> Result<[u8; 6]> {
    for ifa in nix::ifaddrs::getifaddrs()? {
        if ifa.interface_name != interface {
            continue;
        }
        if let Some(link) = ifa.address.as_ref().and_then(|a| a.as_link_addr()) {
            if let Some(mac) = link.addr() {
                return Ok(mac);
            }
        }
    }
    bail!("no MAC found for {interface}")
}

/// A raw socket on `if_index` that sends frames as they are, around the qdisc, and receives
/// nothing (protocol 0).
fn packet_socket(if_index: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll is valid; family and index filled in below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = if_index as i32;
    // SAFETY: addr lives across the call; its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("binding the packet socket");
    }
    let one: libc::c_int = 1;
    // SAFETY: an int option, its size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
    }
    Ok(fd)
}

/// Sends frames at the paced rate for the duration; returns how many the kernel took.
fn flood_thread(spec: &FloodSpec, thread: usize, src_mac: [u8; 6], if_index: u32) -> Result<u64> {
    let fd = packet_socket(if_index)?;
    let frames: Vec<[u8; 90]> = (0..FRAMES_PER_THREAD)
        .map(|i| {
            let n = thread * FRAMES_PER_THREAD + i;
            let port = 1024 + (n % 60000) as u16;
            let src = Ipv4Addr::from(u32::from(spec.src) + (n as u32 % spec.sources.max(1)));
            let transmit = ((BENCH_ORIGIN_TAG as u64) << 32) | i as u64;
            crate::request_frame(
                (spec.dst_mac, src_mac),
                src.octets(),
                spec.target.octets(),
                port,
                li_vn_mode(0, 4, MODE_CLIENT),
                transmit,
            )
        })
        .collect();
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let mut msgs = crate::mmsg_headers(&mut iovs);
    let rate = (spec.rate as f64 / spec.threads as f64).max(1.0);
    let limit = spec.max_frames / spec.threads as u64;
    let start = Instant::now();
    let end = start + spec.duration;
    let mut sent = 0u64;
    let mut next = 0usize;
    loop {
        let now = Instant::now();
        if now >= end || sent >= limit {
            break;
        }
        let due = ((now.duration_since(start).as_secs_f64() * rate) as u64)
            .saturating_sub(sent)
            .min(FLOOD_BATCH as u64)
            .min(limit - sent) as usize;
        if due == 0 {
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        let n = due.min(FRAMES_PER_THREAD - next);
        // A frame the kernel refuses (full queue) counts as sent and lost: the offered load
        // was asked for.
        // SAFETY: msgs[next..next + n] and the frames they point to outlive the call.
        unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr().add(next),
                n as u32,
                libc::MSG_DONTWAIT,
            )
        };
        sent += n as u64;
        next = (next + n) % FRAMES_PER_THREAD;
    }
    Ok(sent)
}

pub fn flood(spec: &FloodSpec) -> Result<FloodResult> {
    if spec.threads == 0 || spec.threads > 16 {
        bail!("threads must be 1..=16");
    }
    let duration = spec.duration.min(Duration::from_secs(120));
    let spec = FloodSpec {
        duration,
        ..spec.clone()
    };
    let ns = netns::open_named_netns(&spec.netns)?;
    let (src_mac, if_index) = netns::within(&ns, || {
        let idx = nix::net::if_::if_nametoindex(spec.interface.as_str())
            .with_context(|| format!("no interface {} in {}", spec.interface, spec.netns))?;
        Ok((own_mac(&spec.interface)?, idx))
    })?;
    let before = read_counts(&spec.counts)?;
    let start = Instant::now();
    let handles: Vec<_> = (0..spec.threads)
        .map(|t| {
            let spec = spec.clone();
            let ns = ns.try_clone();
            std::thread::spawn(move || -> Result<u64> {
                netns::enter(&ns?)?;
                flood_thread(&spec, t, src_mac, if_index)
            })
        })
        .collect();
    let mut sent = 0;
    for h in handles {
        sent += h
            .join()
            .map_err(|_| anyhow!("a generator thread panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Replies still on their way.
    std::thread::sleep(Duration::from_millis(100));
    let after = read_counts(&spec.counts)?;
    let d = |i: usize| after[i].saturating_sub(before[i]);
    let (valid, invalid, kod, arrived) = (d(0), d(1), d(2), d(3));
    let outcome = if arrived > 0 { arrived } else { valid + kod };
    Ok(FloodResult {
        offered_per_s: spec.rate as f64,
        sent,
        elapsed_s: elapsed,
        sent_per_s: sent as f64 / elapsed,
        valid,
        kod,
        invalid,
        arrived,
        replies_per_s: (valid + kod) as f64 / elapsed,
        loss: if sent == 0 {
            0.0
        } else {
            1.0 - (outcome.min(sent) as f64 / sent as f64)
        },
    })
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("{s:?} is not a MAC address");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}
