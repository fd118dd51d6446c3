//! The userspace path: UDP sockets in the service namespace, one per served address, that
//! answer what the responder passes up (requests with extension fields or a MAC, fragments,
//! IPv6 with extension headers) and everything when XDP is off (`xdp_mode = "off"`).
//!
//! Every request it answers passes the same admission as the kernel's: the access list (the
//! same LPM map) and the source's rate (the same SOURCES map, where it takes the token the
//! kernel only peeked at before passing the request up).
//!
//! The reply is built by the kernel's own builder ([`write_server_reply`]) from the same
//! anchor the kernel serves, with the kernel's receive timestamp: both paths give the same
//! header. Requests with extension fields get a plain 48-byte reply without the unknown
//! fields, as chrony does: never longer than the request.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData};
use ntp_common::policy::{
    admit, global_kod_allowed, kod_due, rate_key, v6_source_is_bogus, Admission, ResponderPolicy,
    SourceKey, SourceRecord, SourceState, ACL_ALLOW, KISS_DENY, KISS_RATE, POLICY_ACL,
    POLICY_DEFAULT_DENY, POLICY_KOD_DENY, POLICY_RATE_LIMIT,
};
use ntp_common::reply::{
    request_rejection, write_kiss_of_death, write_server_reply, ClientRequest,
};
use ntp_common::wire::ipv4_mapped_key;
use ntp_common::wire::{NTP_HEADER_LEN, OFF_LI_VN_MODE};
use ntp_common::{Counter, ServerParams, TimeAnchor};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::host::hostclock::monotonic_now_ns;
use crate::host::netns;
use crate::nts::packet::{nak as nts_nak, KISS_NTSN};
use crate::nts::server::{NtsResponse, NtsState};

/// The userspace path's admission, shared by its sockets and the NTS key exchange.
pub type SharedAdmission = Arc<std::sync::Mutex<UserspaceAdmission>>;

/// Why a request got no answer from the userspace path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// Shorter than an NTP header.
    Short,
    /// Mode or version the kernel would drop too.
    Rejected(Counter),
    /// From port 0: nowhere to answer.
    SourcePort,
    /// No anchor was ever published.
    NoAnchor,
}

/// What admission decided for a request the userspace path would answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Answer,
    /// A kiss-o'-death with this code instead of time, asking for at least this poll.
    Kod {
        code: [u8; 4],
        poll: i8,
    },
    /// Nothing: denied, over its rate, or a source that is never answered.
    Drop,
}

/// The userspace path's admission: the kernel's maps, read and written through handles of
/// its own, and the same policy.
pub struct UserspaceAdmission {
    policy: ResponderPolicy,
    acl: LpmTrie<MapData, [u8; 16], u8>,
    /// The kernel's per-source table: this path takes tokens from its rate state and leaves
    /// the guest's clock record as it is.
    sources: HashMap<MapData, SourceKey, SourceRecord>,
    /// The global KoD budget of this path (the kernel keeps its own per CPU).
    kod_budget: SourceState,
}

impl UserspaceAdmission {
    pub fn new(
        responder: &crate::responder::Responder,
        policy: ResponderPolicy,
    ) -> Result<UserspaceAdmission> {
        use ntp_common::maps;
        Ok(UserspaceAdmission {
            policy,
            acl: LpmTrie::try_from(responder.reopen_map(maps::ACL)?)?,
            sources: HashMap::try_from(responder.reopen_map(maps::SOURCES)?)?,
            kod_budget: SourceState::default(),
        })
    }

    /// A new policy (a live configuration change); the maps are the kernel's, already written.
    pub fn set_policy(&mut self, policy: ResponderPolicy) {
        self.policy = policy;
    }

    /// Access list, then the source's rate, at `now` (CLOCK_MONOTONIC ns).
    pub fn admit(&mut self, from: IpAddr, now: u64) -> Admitted {
        let (addr, v4) = match from.to_canonical() {
            IpAddr::V4(a) => (ipv4_mapped_key(a.octets()), true),
            IpAddr::V6(a) => (a.octets(), false),
        };
        if !v4 && v6_source_is_bogus(&addr) {
            return Admitted::Drop;
        }
        let p = self.policy;
        let denied = p.has(POLICY_ACL)
            && match self.acl.get(&LpmKey::new(128, addr), 0) {
                Ok(v) => v != ACL_ALLOW,
                Err(_) => p.has(POLICY_DEFAULT_DENY),
            };
        if denied && !p.has(POLICY_KOD_DENY) {
            return Admitted::Drop;
        }
        if !denied && !p.has(POLICY_RATE_LIMIT) {
            return Admitted::Answer;
        }
        // Sockets do not see VLAN tags. The kernel drops requests on unlisted VLANs before
        // the stack sees them; a tagged frame reaches a socket only through a VLAN device an
        // operator made (the daemon makes none), and then shares its address's untagged
        // bucket: a tag never buys a second one here.
        let key = rate_key(&addr, v4, 0, p.v6_prefix_len);
        let mut record = self
            .sources
            .get(&key, 0)
            .unwrap_or(SourceRecord::new(SourceState::default()));
        let state = &mut record.rate;
        let decision = if denied {
            if kod_due(state, now, &p) && global_kod_allowed(&mut self.kod_budget, now, &p) {
                Admitted::Kod {
                    code: KISS_DENY,
                    poll: p.kod_poll,
                }
            } else {
                Admitted::Drop
            }
        } else {
            match admit(state, now, &p) {
                Admission::Answer => Admitted::Answer,
                Admission::Limited { kod: true }
                    if global_kod_allowed(&mut self.kod_budget, now, &p) =>
                {
                    Admitted::Kod {
                        code: KISS_RATE,
                        poll: p.kod_poll,
                    }
                }
                Admission::Limited { .. } => Admitted::Drop,
            }
        };
        if let Err(e) = self.sources.insert(key, record, 0) {
            debug!(error = %e, "rate table update failed");
        }
        decision
    }
}

/// Builds the reply to `request` (sans IO): the 48-byte header, or why there is none.
pub fn answer(
    request: &[u8],
    from_port: u16,
    anchor: &TimeAnchor,
    params: &ServerParams,
    rx_mono: u64,
    tx_mono: u64,
    random: u32,
) -> Result<[u8; NTP_HEADER_LEN], Unanswered> {
    let Some(hdr) = request.get(..NTP_HEADER_LEN) else {
        return Err(Unanswered::Short);
    };
    let mut reply: [u8; NTP_HEADER_LEN] = hdr.try_into().expect("48 bytes");
    if from_port == 0 {
        return Err(Unanswered::SourcePort);
    }
    if let Some(why) = request_rejection(reply[OFF_LI_VN_MODE]) {
        return Err(Unanswered::Rejected(why));
    }
    if !anchor.is_published() {
        return Err(Unanswered::NoAnchor);
    }
    let req = ClientRequest::parse(&reply);
    write_server_reply(&mut reply, &req, anchor, params, rx_mono, tx_mono, random);
    Ok(reply)
}

/// Turns an answer into a kiss-o'-death with `code` (sans IO), as the kernel does.
pub fn kiss_of_death(
    request: &[u8],
    anchor: &TimeAnchor,
    params: &ServerParams,
    times: (u64, u64),
    random: u32,
    code: [u8; 4],
    kod_poll: i8,
) -> Option<[u8; NTP_HEADER_LEN]> {
    let mut reply: [u8; NTP_HEADER_LEN] = request.get(..NTP_HEADER_LEN)?.try_into().ok()?;
    let req = ClientRequest::parse(&reply);
    write_kiss_of_death(
        &mut reply, &req, anchor, params, times.0, times.1, random, code, kod_poll,
    );
    Some(reply)
}

/// What the userspace path did, for logs and `stats`.
#[derive(Debug, Default)]
pub struct UserspaceCounters {
    pub answered: AtomicU64,
    /// Of `answered`, to IPv6 clients (IPv4-mapped senders count as IPv4).
    pub answered_ipv6: AtomicU64,
    pub answered_with_extensions: AtomicU64,
    /// Invalid requests (short, bad mode or version, port 0, no anchor yet).
    pub dropped: AtomicU64,
    /// Valid requests refused by the access list or the rate limit (KoD or silence).
    pub refused: AtomicU64,
}

/// Binds a socket on port 123 of each address, inside `ns` when given. IP_FREEBIND: an alias
/// that is briefly missing (drift being repaired) must not stop the daemon.
pub fn bind_sockets(ns: Option<&File>, addrs: &[IpAddr]) -> Result<Vec<std::net::UdpSocket>> {
    let bind = || -> Result<Vec<std::net::UdpSocket>> {
        use nix::sys::socket::{setsockopt, sockopt, SockType};
        let mut out = Vec::new();
        for addr in addrs {
            let fd = crate::host::files::bind_freebind(*addr, 123, SockType::Datagram, "NTP")?;
            setsockopt(&fd, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
            let sock = std::net::UdpSocket::from(fd);
            sock.set_nonblocking(true)?;
            out.push(sock);
        }
        Ok(out)
    };
    match ns {
        Some(ns) => netns::within(ns, bind),
        None => bind(),
    }
}

/// Where the userspace path's sockets live: the addresses, in the namespace of this name (the
/// current one without), so that they can be bound again in a recreated namespace.
#[derive(Debug, Clone)]
pub struct SocketPlace {
    pub netns: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl SocketPlace {
    pub fn bind(&self) -> Result<Vec<std::net::UdpSocket>> {
        match &self.netns {
            Some(name) => bind_sockets(Some(&netns::open_named_netns(name)?), &self.addresses),
            None => bind_sockets(None, &self.addresses),
        }
    }
}

/// Answers on `sockets` until the task is dropped, from the anchor the kernel serves. When
/// `plumbing` moves on (the namespace or veth was recreated), the sockets are bound again at
/// `place`: the old ones would be left in an orphaned namespace.
pub async fn serve(
    sockets: Vec<std::net::UdpSocket>,
    place: SocketPlace,
    mut plumbing: watch::Receiver<u64>,
    anchors: watch::Receiver<TimeAnchor>,
    params: ServerParams,
    admission: SharedAdmission,
    counters: Arc<UserspaceCounters>,
    nts: Option<Arc<NtsState>>,
) -> Result<()> {
    let server = SocketServer {
        anchors,
        params,
        admission,
        counters,
        nts,
    };
    let mut sockets = Some(sockets);
    loop {
        let socks = match sockets.take() {
            Some(s) => s,
            None => match place.bind() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "binding the userspace path again failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let mut tasks = tokio::task::JoinSet::new();
        for sock in socks {
            let sock = UdpSocket::from_std(sock).context("registering a server socket")?;
            info!(address = %sock.local_addr()?, "userspace path listening");
            tasks.spawn(serve_socket(sock, server.clone()));
        }
        tokio::select! {
            Some(done) = tasks.join_next() => {
                done.context("a userspace server task failed")??;
            }
            Ok(()) = plumbing.changed() => {
                info!("plumbing recreated: binding the userspace path again");
                tasks.abort_all();
            }
            else => return Ok(()),
        }
    }
}

/// What each socket's server answers from and counts into.
#[derive(Clone)]
struct SocketServer {
    anchors: watch::Receiver<TimeAnchor>,
    params: ServerParams,
    admission: SharedAdmission,
    counters: Arc<UserspaceCounters>,
    nts: Option<Arc<NtsState>>,
}

async fn serve_socket(sock: UdpSocket, server: SocketServer) -> Result<()> {
    let SocketServer {
        anchors,
        params,
        admission,
        counters,
        nts,
    } = server;
    // Requests that arrive before the first publication wait in the socket rather than be
    // dropped for want of an anchor (a daemon starting, or restarting, answers them all).
    let mut first = anchors.clone();
    let _ = first.wait_for(|a| a.is_published()).await;
    loop {
        let (bytes, from, rx_mono) = recv_timestamped(&sock).await?;
        let anchor = *anchors.borrow();
        let tx_mono = monotonic_now_ns()?;
        let reply = answer(
            &bytes,
            from.port(),
            &anchor,
            &params,
            rx_mono,
            tx_mono,
            rand::random(),
        );
        // Valid requests only: admission comes after the checks, as in the kernel.
        let admitted = match &reply {
            Ok(_) => admission
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(from.ip(), rx_mono),
            Err(_) => Admitted::Drop,
        };
        // Let the clock task run between requests, whatever a flood sends.
        yield_if_busy().await;
        match (reply, admitted) {
            (Ok(reply), Admitted::Answer) => {
                let protected = match nts.as_deref().map(|n| n.respond(&bytes, &reply)) {
                    None | Some(NtsResponse::NotNts) => None,
                    Some(NtsResponse::Reply(r)) => Some(r),
                    Some(NtsResponse::Nak(unique_id)) => {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        let times = (rx_mono, tx_mono);
                        if let Some(kod) = kiss_of_death(
                            &bytes,
                            &anchor,
                            &params,
                            times,
                            rand::random(),
                            KISS_NTSN,
                            params.poll_min,
                        ) {
                            let _ = sock.send_to(&nts_nak(&kod, &unique_id), from).await;
                        }
                        continue;
                    }
                    Some(NtsResponse::Drop) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let sent = match &protected {
                    Some(p) => sock.send_to(p, from).await,
                    None => sock.send_to(&reply, from).await,
                };
                if sent.is_ok() {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                    if from.is_ipv6() && from.ip().to_canonical().is_ipv6() {
                        counters.answered_ipv6.fetch_add(1, Ordering::Relaxed);
                    }
                    if bytes.len() > NTP_HEADER_LEN {
                        counters
                            .answered_with_extensions
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Refused (access list, rate limit): a KoD or silence, counted as refused.
            (Ok(_), refusal) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                if let Admitted::Kod { code, poll } = refusal {
                    let times = (rx_mono, tx_mono);
                    if let Some(kod) =
                        kiss_of_death(&bytes, &anchor, &params, times, rand::random(), code, poll)
                    {
                        let _ = sock.send_to(&kod, from).await;
                    }
                }
            }
            (Err(why), _) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                debug!(%from, ?why, "request not answered");
            }
        }
    }
}

/// Lets the clock task and the control tasks run between requests: a flood on the userspace
/// path must never starve the clock (tokio's budget makes the yield cheap when idle).
async fn yield_if_busy() {
    tokio::task::consume_budget().await;
}

/// One datagram, its sender and the kernel's receive time as CLOCK_MONOTONIC (the socket must
/// have SO_TIMESTAMPNS on). The kernel stamps with CLOCK_REALTIME; the conversion reads both
/// clocks right after, so scheduling delay between arrival and this task running counts as
/// what it is: time already passed, not network delay.
pub(crate) async fn recv_timestamped(
    sock: &UdpSocket,
) -> std::io::Result<(Vec<u8>, SocketAddr, u64)> {
    use nix::sys::socket::{recvmsg, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd as _;
    loop {
        sock.readable().await?;
        let result = sock.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = [0u8; 2048];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            // Room for SCM_TIMESTAMPNS or SCM_TIMESTAMPING (three timespecs), whichever the
            // socket asked for.
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::Timestamps);
            let msg = recvmsg::<SockaddrStorage>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)?;
            let kernel_rx = msg
                .cmsgs()
                .map_err(std::io::Error::from)?
                .find_map(|c| crate::host::timestamping::stamp_of(&c));
            let from = msg
                .address
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                        .or_else(|| {
                            a.as_sockaddr_in6()
                                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                        })
                })
                .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
            let n = msg.bytes;
            Ok((buf[..n].to_vec(), from, kernel_rx))
        });
        match result {
            Ok((bytes, from, kernel_rx)) => {
                // The kernel stamps in CLOCK_REALTIME: converted by the time waited since; a
                // missing stamp is "now".
                let rx = match kernel_rx {
                    Some(stamp) => crate::host::timestamping::to_monotonic(stamp)
                        .map_err(std::io::Error::other)?,
                    None => None,
                };
                let rx = match rx {
                    Some(rx) => rx,
                    None => monotonic_now_ns().map_err(std::io::Error::other)?,
                };
                return Ok((bytes, from, rx));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntp_common::wire::*;

    const S: u64 = 1_000_000_000;

    fn anchor() -> TimeAnchor {
        TimeAnchor {
            mono_ns: 10 * S,
            ntp_ns: 3_972_000_000 * S,
            max_age_ns: 30 * S,
            stratum: 2,
            refid: [169, 254, 0, 9],
            ..Default::default()
        }
    }

    fn request(b0: u8, extra: usize) -> Vec<u8> {
        let mut r = vec![0u8; 48 + extra];
        r[0] = b0;
        r[40..48].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        r
    }

    #[test]
    fn extension_fields_get_a_plain_48_byte_reply() {
        let req = request(li_vn_mode(0, 4, MODE_CLIENT), 72);
        let reply = answer(
            &req,
            40000,
            &anchor(),
            &ServerParams::DEFAULT,
            11 * S,
            11 * S + 500,
            7,
        )
        .unwrap();
        assert_eq!(reply.len(), 48);
        assert_eq!(mode(reply[0]), MODE_SERVER);
        assert_eq!(reply[OFF_STRATUM], 2);
        assert_eq!(
            reply[OFF_ORIGIN_TS..OFF_ORIGIN_TS + 8],
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn the_error_bound_is_the_anchors_as_the_kernel_serves_it() {
        let a = TimeAnchor {
            root_delay_ns: 60_000,
            root_dispersion_ns: 9_000,
            dispersion_growth_ns_per_s: 2_000,
            ..anchor()
        };
        let req = request(li_vn_mode(0, 4, MODE_CLIENT), 0);
        // 5 s after the anchor: 9 µs + 5 s × 2 µs/s.
        let reply = answer(
            &req,
            40000,
            &a,
            &ServerParams::DEFAULT,
            15 * S,
            15 * S + 500,
            7,
        )
        .unwrap();
        let root = |off| u32::from_be_bytes(reply[off..off + 4].try_into().unwrap());
        assert_eq!(root(OFF_ROOT_DELAY), ntp_common::time::ns_to_short(60_000));
        assert_eq!(
            root(OFF_ROOT_DISPERSION),
            ntp_common::time::ns_to_short(19_000)
        );
    }

    #[test]
    fn the_kernel_rules_apply() {
        let judge = |request: &[u8], from_port, anchor: &TimeAnchor| {
            answer(request, from_port, anchor, &ServerParams::DEFAULT, 0, 0, 0).map(|_| ())
        };
        let (a, ok) = (anchor(), li_vn_mode(0, 4, MODE_CLIENT));
        assert_eq!(judge(&request(ok, 0)[..47], 1, &a), Err(Unanswered::Short));
        assert_eq!(judge(&request(ok, 0), 0, &a), Err(Unanswered::SourcePort));
        assert_eq!(
            judge(&request(li_vn_mode(0, 4, MODE_SERVER), 0), 1, &a),
            Err(Unanswered::Rejected(Counter::PassedNotClient))
        );
        assert_eq!(
            judge(&request(li_vn_mode(0, 5, MODE_CLIENT), 0), 1, &a),
            Err(Unanswered::Rejected(Counter::DroppedVersion))
        );
        assert_eq!(
            judge(&request(ok, 0), 1, &TimeAnchor::default()),
            Err(Unanswered::NoAnchor)
        );
        assert_eq!(judge(&request(ok, 0), 1, &a), Ok(()));
    }
}
