//! One upstream NTP server, sans IO: when to poll, what to send, and what a response means.
//!
//! The caller owns sockets and timers; this takes monotonic timestamps and bytes as values.

use std::net::SocketAddr;

use ntp_common::packet::NtpHeader;
use ntp_common::time::{short_to_ns, timestamp_to_ntp_ns, NANOS_PER_SEC};
use ntp_common::wire::*;

use crate::clock::discipline::ClockModel;
use crate::clock::filter::{ClockFilter, PeerEstimate, Sample, PHI};

/// Samples with more root distance than this are not used (RFC 5905 MAXDIST).
pub const MAX_DISTANCE: f64 = 1.5;
/// Requests of an iburst go out this far apart (RFC 5905 uses 2 s).
const BURST_SPACING_NS: u64 = 2 * NANOS_PER_SEC;
const BURST_COUNT: u8 = 4;
/// Good responses at one poll interval before it doubles.
const GOOD_BEFORE_BACKOFF: u32 = 4;
/// Precision assumed for our own timestamps (CLOCK_MONOTONIC read in userspace).
pub const LOCAL_PRECISION: f64 = 1e-7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollConfig {
    /// log2 s; defaults 4 (16 s) and 10 (1024 s).
    pub min_poll: i8,
    pub max_poll: i8,
    pub iburst: bool,
    /// Ask for interleaved responses (RFC 9769, chrony's `xleave`): the server then reports
    /// when its previous response really left, from its kernel, instead of a timestamp taken
    /// before sending. A server that does not do it answers in basic mode, which is used.
    pub interleaved: bool,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            min_poll: 4,
            max_poll: 10,
            iburst: true,
            interleaved: true,
        }
    }
}

/// Why a response was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    NotServerMode(u8),
    /// Origin does not match our outstanding request (late, duplicate, or spoofed).
    BogusOrigin,
    /// No request outstanding.
    Unexpected,
    Unsynchronized,
    BadStratum(u8),
    ZeroTransmit,
    /// Negative or absurd delay, or root distance above MAXDIST.
    Insane(&'static str),
    /// Kiss-o'-death.
    Kiss([u8; 4]),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Kiss(code) => write!(f, "kiss-o'-death {}", String::from_utf8_lossy(code)),
            other => write!(f, "{other:?}"),
        }
    }
}

/// After DENY or RSTR, the first back-off (an hour) and the longest (a day).
const DENY_BACKOFF_MIN_NS: u64 = 3600 * NANOS_PER_SEC;
const DENY_BACKOFF_MAX_NS: u64 = 86_400 * NANOS_PER_SEC;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamState {
    Active,
    /// DENY or RSTR: the server asked us to stop. Not polled until `denied_until_ns` (an
    /// hour, doubling to a day while it keeps refusing); meanwhile its name, if it has one,
    /// is resolved again (a pool may give another server).
    Denied([u8; 4]),
}

/// The header fields of the latest valid response.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeerHeader {
    pub stratum: u8,
    pub leap: u8,
    pub refid: [u8; 4],
    pub root_delay: f64,
    pub root_dispersion: f64,
    pub precision: f64,
}

#[derive(Clone, Copy, Debug)]
struct Outstanding {
    cookie: u64,
    sent_mono_ns: u64,
    /// The exchange an interleaved request named (by the server's receive timestamp in its
    /// origin field): what an interleaved answer completes.
    names: Option<Exchange>,
}

impl Outstanding {
    /// The second cookie an interleaved request carries in its receive field, which the
    /// server echoes as origin when it answers interleaved. Never equal to the first: a
    /// server only interleaves when they differ.
    fn interleaved_cookie(&self) -> Option<u64> {
        self.names.map(|_| !self.cookie)
    }
}

/// The last answered exchange: what an interleaved response completes.
#[derive(Clone, Copy, Debug)]
struct Exchange {
    sent_mono_ns: u64,
    recv_mono_ns: u64,
    /// The server's receive timestamp (raw): the next request's origin names the exchange
    /// by it, and it is this exchange's T2.
    remote_receive_ts: u64,
}

/// Which exchange a sample came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseMode {
    Basic,
    /// The previous exchange, completed with the server's transmit timestamp from its kernel.
    Interleaved,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub config: PollConfig,
    pub poll: i8,
    /// 8-bit reachability register: bit 0 is the latest poll.
    pub reach: u8,
    pub state: UpstreamState,
    pub filter: ClockFilter,
    pub header: Option<PeerHeader>,
    /// Requests sent so far.
    pub polls: u64,
    next_poll_ns: u64,
    burst_left: u8,
    /// While denied: when to try once more, and how long the last back-off was.
    denied_until_ns: u64,
    deny_backoff_ns: u64,
    good_at_poll: u32,
    poll_limit: i8,
    outstanding: Option<Outstanding>,
    last_exchange: Option<Exchange>,
    /// How the latest sample was measured.
    pub last_mode: Option<ResponseMode>,
}

impl Upstream {
    pub fn new(addr: SocketAddr, config: PollConfig, now_ns: u64) -> Upstream {
        Upstream {
            addr,
            config,
            poll: config.min_poll,
            reach: 0,
            state: UpstreamState::Active,
            filter: ClockFilter::default(),
            header: None,
            polls: 0,
            next_poll_ns: now_ns,
            burst_left: if config.iburst { BURST_COUNT } else { 1 },
            denied_until_ns: 0,
            deny_backoff_ns: 0,
            good_at_poll: 0,
            poll_limit: config.max_poll,
            outstanding: None,
            last_exchange: None,
            last_mode: None,
        }
    }

    /// Caps the poll exponent (the system polls faster while its clock is not keeping up).
    pub fn set_poll_limit(&mut self, limit: i8) {
        self.poll_limit = limit.clamp(self.config.min_poll, self.config.max_poll);
        if self.poll > self.poll_limit {
            self.poll = self.poll_limit;
            // Bring the next poll forward to the shorter interval.
            if let Some(o) = self.outstanding {
                self.next_poll_ns = self
                    .next_poll_ns
                    .min(o.sent_mono_ns + (NANOS_PER_SEC << self.poll.clamp(0, 17)));
            }
        }
    }

    pub fn next_poll_ns(&self) -> Option<u64> {
        match self.state {
            UpstreamState::Active => Some(self.next_poll_ns),
            UpstreamState::Denied(_) => Some(self.denied_until_ns),
        }
    }

    pub fn is_reachable(&self) -> bool {
        self.reach != 0
    }

    /// Polled long enough (eight times) without one answer in the register, or refusing
    /// service: lost (its name is worth resolving again).
    pub fn is_lost(&self) -> bool {
        match self.state {
            UpstreamState::Active => self.polls >= 8 && self.reach == 0,
            UpstreamState::Denied(_) => true,
        }
    }

    /// Builds the next request. `cookie` must be unpredictable (it goes out as the transmit
    /// timestamp; the server echoes it as origin, so only a real answer can match it).
    pub fn poll(&mut self, now_ns: u64, cookie: u64) -> [u8; NTP_HEADER_LEN] {
        if let UpstreamState::Denied(_) = self.state {
            // The back-off is over: one more try, from a clean register.
            self.state = UpstreamState::Active;
            self.outstanding = None;
            self.last_exchange = None;
            self.reach = 0;
            self.burst_left = 1;
        }
        if self.outstanding.is_some() {
            // The previous request went unanswered.
            self.good_at_poll = 0;
            if self.reach & 0x0f == 0 && self.poll > self.config.min_poll {
                self.poll -= 1;
            }
        }
        self.reach <<= 1;
        self.polls += 1;
        let out = Outstanding {
            cookie,
            sent_mono_ns: now_ns,
            names: self.last_exchange.filter(|_| self.config.interleaved),
        };
        self.outstanding = Some(out);
        if self.burst_left > 1 {
            self.burst_left -= 1;
            self.next_poll_ns = now_ns + BURST_SPACING_NS;
        } else {
            self.burst_left = 0;
            self.next_poll_ns = now_ns + (NANOS_PER_SEC << self.poll.clamp(0, 17));
        }
        // Interleaved: the origin names the last exchange, the receive field carries the
        // second cookie (off-path, as unguessable as the first).
        let mut request = NtpHeader::client_request(self.poll, cookie);
        if let (Some(named), Some(second)) = (out.names, out.interleaved_cookie()) {
            request.origin_ts = named.remote_receive_ts;
            request.receive_ts = second;
        }
        request.serialize()
    }

    /// Records when the outstanding request actually left (after the socket was set up), so
    /// that set-up time does not count as network delay.
    pub fn mark_sent(&mut self, sent_ns: u64) {
        if let Some(o) = &mut self.outstanding {
            o.sent_mono_ns = sent_ns;
        }
    }

    /// Handles a response received at `recv_ns`, measured against `model`.
    pub fn on_response(
        &mut self,
        bytes: &[u8],
        recv_ns: u64,
        model: &ClockModel,
    ) -> Result<(), Rejection> {
        let h = NtpHeader::parse(bytes).ok_or(Rejection::Malformed)?;
        if h.mode != MODE_SERVER {
            return Err(Rejection::NotServerMode(h.mode));
        }
        let out = self.outstanding.ok_or(Rejection::Unexpected)?;
        // The exchange measured: this one (basic), or the one the request named, completed
        // with the transmit timestamp of its answer (interleaved, RFC 9769 section 2).
        let (mode, named) = if h.origin_ts == out.cookie {
            (ResponseMode::Basic, None)
        } else if out.interleaved_cookie() == Some(h.origin_ts) {
            (ResponseMode::Interleaved, out.names)
        } else {
            return Err(Rejection::BogusOrigin);
        };
        // From here on the response is genuine: one answer per request.
        self.outstanding = None;
        if let Some(code) = h.kiss_code() {
            self.on_kiss(code, out.sent_mono_ns);
            return Err(Rejection::Kiss(code));
        }
        if h.leap == LEAP_UNSYNCHRONIZED {
            return Err(Rejection::Unsynchronized);
        }
        if h.stratum > MAX_STRATUM {
            return Err(Rejection::BadStratum(h.stratum));
        }
        if h.transmit_ts == 0 || h.receive_ts == 0 {
            return Err(Rejection::ZeroTransmit);
        }
        // This exchange is what the next interleaved request names.
        let this = Exchange {
            sent_mono_ns: out.sent_mono_ns,
            recv_mono_ns: recv_ns,
            remote_receive_ts: h.receive_ts,
        };
        let measured = named.unwrap_or(this);
        self.last_exchange = Some(this);
        let (sent_ns, recv_ns) = (measured.sent_mono_ns, measured.recv_mono_ns);
        let t1 = model.ntp_at(sent_ns);
        let t4 = model.ntp_at(recv_ns);
        let t2 = timestamp_to_ntp_ns(measured.remote_receive_ts, t1);
        let t3 = timestamp_to_ntp_ns(h.transmit_ts, t1);
        let d = |a: u64, b: u64| (a as i128 - b as i128) as f64 * 1e-9;
        let precision = 2f64.powi(h.precision as i32);
        let delay = d(t4, t1) - d(t3, t2);
        if delay < -precision || !(d(t3, t2) >= 0.0) {
            return Err(Rejection::Insane(
                "negative delay or server processing time",
            ));
        }
        let delay = delay.max(precision);
        let offset = (d(t2, t1) + d(t3, t4)) / 2.0;
        let root_delay = short_to_ns(h.root_delay) as f64 * 1e-9;
        let root_dispersion = short_to_ns(h.root_dispersion) as f64 * 1e-9;
        if (root_delay + delay) / 2.0 + root_dispersion > MAX_DISTANCE {
            return Err(Rejection::Insane("root distance above 1.5 s"));
        }
        let mid = sent_ns + (recv_ns.saturating_sub(sent_ns)) / 2;
        self.filter.add(Sample {
            mono_ns: mid,
            true_ntp_ns: model
                .ntp_at(mid)
                .wrapping_add_signed((offset * 1e9).round() as i64),
            delay,
            dispersion: precision + LOCAL_PRECISION + PHI * delay,
            offset_then: offset,
        });
        self.header = Some(PeerHeader {
            stratum: h.stratum,
            leap: h.leap,
            refid: h.refid,
            root_delay,
            root_dispersion,
            precision,
        });
        self.last_mode = Some(mode);
        self.reach |= 1;
        self.good_at_poll += 1;
        if self.burst_left == 0
            && self.good_at_poll >= GOOD_BEFORE_BACKOFF
            && self.poll < self.poll_limit
        {
            self.poll += 1;
            self.good_at_poll = 0;
        }
        Ok(())
    }

    fn on_kiss(&mut self, code: [u8; 4], sent_ns: u64) {
        match &code {
            // Rate exceeded: poll less often, starting from the request that was refused.
            b"RATE" => {
                self.poll = (self.poll + 1).min(self.config.max_poll.max(self.config.min_poll));
                self.burst_left = 0;
                self.next_poll_ns = self
                    .next_poll_ns
                    .max(sent_ns + (NANOS_PER_SEC << self.poll.clamp(0, 17)));
            }
            b"DENY" | b"RSTR" => {
                self.state = UpstreamState::Denied(code);
                self.deny_backoff_ns =
                    (self.deny_backoff_ns * 2).clamp(DENY_BACKOFF_MIN_NS, DENY_BACKOFF_MAX_NS);
                self.denied_until_ns = sent_ns + self.deny_backoff_ns;
                self.reach = 0;
                self.header = None;
                self.last_exchange = None;
            }
            _ => {}
        }
    }

    /// The filter's estimate with this upstream's root distance, for selection.
    pub fn estimate(
        &self,
        model: &ClockModel,
        now_ns: u64,
    ) -> Option<(PeerEstimate, PeerHeader, f64)> {
        if !self.is_reachable() || self.state != UpstreamState::Active {
            return None;
        }
        let header = self.header?;
        let est = self
            .filter
            .estimate(model, now_ns, header.precision.max(LOCAL_PRECISION))?;
        let distance = (header.root_delay + est.delay) / 2.0
            + header.root_dispersion
            + est.dispersion
            + est.jitter;
        (distance < MAX_DISTANCE).then_some((est, header, distance))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntp_common::time::ntp_ns_to_timestamp;

    const S: u64 = NANOS_PER_SEC;

    fn upstream() -> Upstream {
        Upstream::new("169.254.0.1:123".parse().unwrap(), PollConfig::default(), 0)
    }

    /// One that never asks for interleaved answers.
    fn basic_upstream() -> Upstream {
        let config = PollConfig {
            interleaved: false,
            ..PollConfig::default()
        };
        Upstream::new("169.254.0.1:123".parse().unwrap(), config, 0)
    }

    /// A server whose clock is `offset_ns` ahead of the model, answering after `one_way_ns`.
    fn answer(
        req: &[u8],
        model: &ClockModel,
        sent: u64,
        offset_ns: i64,
        one_way_ns: u64,
    ) -> (Vec<u8>, u64) {
        let r = NtpHeader::parse(req).unwrap();
        let t2 = model
            .ntp_at(sent + one_way_ns)
            .wrapping_add_signed(offset_ns);
        let h = server_reply(r.transmit_ts, t2, ntp_ns_to_timestamp(t2 + 10_000));
        (h.serialize().to_vec(), sent + 2 * one_way_ns + 10_000)
    }

    /// A stratum-1 server's reply: `origin`, receive time `receive_ns`, `transmit` as given.
    fn server_reply(origin_ts: u64, receive_ns: u64, transmit_ts: u64) -> NtpHeader {
        NtpHeader {
            version: 4,
            mode: MODE_SERVER,
            stratum: 1,
            precision: -20,
            refid: *b"GPS\0",
            origin_ts,
            receive_ts: ntp_ns_to_timestamp(receive_ns),
            transmit_ts,
            reference_ts: ntp_ns_to_timestamp(receive_ns - S),
            ..Default::default()
        }
    }

    #[test]
    fn iburst_then_regular_polls() {
        let mut u = upstream();
        let mut times = vec![];
        let mut now = 0;
        for i in 0..6 {
            assert_eq!(u.next_poll_ns(), Some(now));
            u.poll(now, i);
            times.push(now);
            now = u.next_poll_ns().unwrap();
        }
        assert_eq!(times, vec![0, 2 * S, 4 * S, 6 * S, 22 * S, 38 * S]);
        // Nothing was answered: reach stays 0.
        assert_eq!(u.reach, 0);
    }

    #[test]
    fn measures_offset_and_fills_reach() {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let mut u = upstream();
        let req = u.poll(S, 42);
        let (resp, recv) = answer(&req, &model, S, 250_000, 1_000_000);
        u.on_response(&resp, recv, &model).unwrap();
        assert_eq!(u.reach, 1);
        let (est, header, dist) = u.estimate(&model, recv).unwrap();
        assert!((est.offset - 250e-6).abs() < 1e-8, "{}", est.offset);
        assert!((est.delay - 2e-3).abs() < 1e-8, "{}", est.delay);
        assert_eq!(header.stratum, 1);
        assert!(dist > 1e-3 && dist < 2e-3);
    }

    #[test]
    fn rejects_what_rfc_5905_rejects() {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let cases: Vec<(&str, Box<dyn Fn(&mut NtpHeader)>, Rejection)> = vec![
            (
                "wrong origin",
                Box::new(|h| h.origin_ts ^= 1),
                Rejection::BogusOrigin,
            ),
            (
                // The receive cookie of a request that named no exchange (the first one).
                "interleaved answer to a basic request",
                Box::new(|h| h.origin_ts = !7),
                Rejection::BogusOrigin,
            ),
            (
                "mode 3",
                Box::new(|h| h.mode = 3),
                Rejection::NotServerMode(3),
            ),
            ("LI 3", Box::new(|h| h.leap = 3), Rejection::Unsynchronized),
            (
                "stratum 16",
                Box::new(|h| h.stratum = 16),
                Rejection::BadStratum(16),
            ),
            (
                "zero transmit",
                Box::new(|h| h.transmit_ts = 0),
                Rejection::ZeroTransmit,
            ),
            (
                "huge root dispersion",
                Box::new(|h| h.root_dispersion = 2 << 16),
                Rejection::Insane("root distance above 1.5 s"),
            ),
            (
                "kiss RATE",
                Box::new(|h| {
                    h.stratum = 0;
                    h.refid = *b"RATE"
                }),
                Rejection::Kiss(*b"RATE"),
            ),
        ];
        for (name, mutate, want) in cases {
            let mut u = upstream();
            let req = u.poll(S, 7);
            let (resp, recv) = answer(&req, &model, S, 0, 1_000);
            let mut h = NtpHeader::parse(&resp).unwrap();
            mutate(&mut h);
            assert_eq!(
                u.on_response(&h.serialize(), recv, &model),
                Err(want),
                "{name}"
            );
            assert_eq!(u.reach, 0, "{name}");
        }
        // Unsolicited and short packets.
        let mut u = upstream();
        assert_eq!(
            u.on_response(&[0u8; 48], S, &model),
            Err(Rejection::NotServerMode(0))
        );
        assert_eq!(
            u.on_response(&[0u8; 20], S, &model),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn deny_stops_polling_and_rate_backs_off() {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let mut u = upstream();
        let req = u.poll(S, 7);
        let (resp, recv) = answer(&req, &model, S, 0, 1_000);
        let mut h = NtpHeader::parse(&resp).unwrap();
        h.stratum = 0;
        h.refid = *b"DENY";
        let _ = u.on_response(&h.serialize(), recv, &model);
        assert_eq!(u.state, UpstreamState::Denied(*b"DENY"));
        // Backed off an hour (not forever), and lost: its name is resolved again.
        assert_eq!(u.next_poll_ns(), Some(S + 3600 * S));
        assert!(u.is_lost());
        // After the hour: one more try; refused again, the back-off doubles.
        let req = u.poll(S + 3600 * S, 9);
        assert_eq!(u.state, UpstreamState::Active);
        let (resp, recv) = answer(&req, &model, S + 3600 * S, 0, 1_000);
        let mut h = NtpHeader::parse(&resp).unwrap();
        h.stratum = 0;
        h.refid = *b"RSTR";
        let _ = u.on_response(&h.serialize(), recv, &model);
        assert_eq!(u.state, UpstreamState::Denied(*b"RSTR"));
        assert_eq!(u.next_poll_ns(), Some(S + 3600 * S + 7200 * S));

        let mut u = upstream();
        let before = u.poll;
        let req = u.poll(S, 8);
        let (resp, recv) = answer(&req, &model, S, 0, 1_000);
        let mut h = NtpHeader::parse(&resp).unwrap();
        h.stratum = 0;
        h.refid = *b"RATE";
        let _ = u.on_response(&h.serialize(), recv, &model);
        assert_eq!(u.poll, before + 1);
        assert!(u.next_poll_ns().unwrap() >= S + (S << u.poll));
    }

    /// A chrony-like server `offset_ns` ahead of the model, `one_way_ns` away each way, whose
    /// basic transmit timestamps are taken `early_ns` before its answer really leaves. It
    /// answers interleaved (RFC 9769) when the request's origin names its last receive
    /// timestamp and the request's receive and transmit fields differ.
    #[derive(Default)]
    struct XleaveServer {
        offset_ns: i64,
        one_way_ns: u64,
        early_ns: u64,
        last_rx: u64,
        last_tx: u64,
    }

    impl XleaveServer {
        /// The answer to `req` sent at `sent`: bytes, arrival, whether interleaved.
        fn answer(&mut self, req: &[u8], model: &ClockModel, sent: u64) -> (Vec<u8>, u64, bool) {
            let r = NtpHeader::parse(req).unwrap();
            let server_ns = |mono: u64| model.ntp_at(mono).wrapping_add_signed(self.offset_ns);
            let arrive = sent + self.one_way_ns;
            let leave = arrive + 10_000;
            let interleaved =
                self.last_rx != 0 && r.origin_ts == self.last_rx && r.receive_ts != r.transmit_ts;
            let h = if interleaved {
                server_reply(r.receive_ts, server_ns(arrive), self.last_tx)
            } else {
                let early = ntp_ns_to_timestamp(server_ns(leave) - self.early_ns);
                server_reply(r.transmit_ts, server_ns(arrive), early)
            };
            self.last_rx = h.receive_ts;
            self.last_tx = ntp_ns_to_timestamp(server_ns(leave));
            (h.serialize().to_vec(), leave + self.one_way_ns, interleaved)
        }
    }

    /// Polls `u` `n` times against `server`; the modes of the samples and the last offset.
    fn exchange(u: &mut Upstream, server: &mut XleaveServer, n: u64) -> (Vec<ResponseMode>, f64) {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let mut modes = Vec::new();
        let mut offset = 0.0;
        for i in 0..n {
            let now = u.next_poll_ns().unwrap();
            let req = u.poll(now, 1000 + i);
            let (resp, recv, _) = server.answer(&req, &model, now);
            u.on_response(&resp, recv, &model).unwrap();
            modes.push(u.last_mode.unwrap());
            offset = u
                .filter
                .estimate(&model, recv, 1e-7)
                .unwrap()
                .sample
                .offset(&model);
        }
        (modes, offset)
    }

    #[test]
    fn interleaved_requests_name_the_last_exchange() {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let mut u = upstream();
        let first = NtpHeader::parse(&u.poll(S, 42)).unwrap();
        assert_eq!(
            (first.origin_ts, first.receive_ts),
            (0, 0),
            "nothing to name yet"
        );
        let (resp, recv) = answer(&first.serialize(), &model, S, 0, 1_000);
        u.on_response(&resp, recv, &model).unwrap();
        let server_rx = NtpHeader::parse(&resp).unwrap().receive_ts;
        let second = NtpHeader::parse(&u.poll(3 * S, 43)).unwrap();
        assert_eq!(second.origin_ts, server_rx);
        assert_eq!(second.transmit_ts, 43);
        assert_ne!(second.receive_ts, second.transmit_ts);
        // Switched off: plain RFC 5905 requests.
        let mut u = basic_upstream();
        u.poll(S, 42);
        u.on_response(&resp, recv, &model).unwrap();
        let plain = NtpHeader::parse(&u.poll(3 * S, 43)).unwrap();
        assert_eq!((plain.origin_ts, plain.receive_ts), (0, 0));
    }

    #[test]
    fn interleaved_responses_remove_the_servers_send_path() {
        // The server stamps its basic transmit 8 µs before the answer leaves: a basic client
        // measures it 4 µs behind. Interleaved, the kernel's stamp arrives one poll later.
        let server = || XleaveServer {
            offset_ns: 250_000,
            one_way_ns: 100_000,
            early_ns: 8_000,
            ..Default::default()
        };
        let (modes, offset) = exchange(&mut upstream(), &mut server(), 6);
        assert_eq!(modes[0], ResponseMode::Basic);
        assert!(
            modes[1..].iter().all(|m| *m == ResponseMode::Interleaved),
            "{modes:?}"
        );
        assert!((offset - 250e-6).abs() < 2e-9, "interleaved: {offset}");
        let mut basic = basic_upstream();
        let (modes, offset) = exchange(&mut basic, &mut server(), 6);
        assert!(modes.iter().all(|m| *m == ResponseMode::Basic));
        assert!((offset - 246e-6).abs() < 2e-9, "basic: {offset}");
    }

    #[test]
    fn a_basic_server_answers_interleaved_requests_in_basic_mode() {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let mut u = upstream();
        for i in 0..4 {
            let now = u.next_poll_ns().unwrap();
            let req = u.poll(now, 500 + i);
            let (resp, recv) = answer(&req, &model, now, 250_000, 1_000_000);
            u.on_response(&resp, recv, &model).unwrap();
            assert_eq!(u.last_mode, Some(ResponseMode::Basic));
        }
        let (est, _, _) = u.estimate(&model, 10 * S).unwrap();
        assert!((est.offset - 250e-6).abs() < 1e-8, "{}", est.offset);
    }

    #[test]
    fn poll_interval_grows_with_good_answers_within_bounds() {
        let model = ClockModel::new(0, 3_900_000_000 * S);
        let mut u = upstream();
        for i in 0..200 {
            let now = u.next_poll_ns().unwrap();
            let req = u.poll(now, i);
            let (resp, recv) = answer(&req, &model, now, 0, 1_000);
            u.on_response(&resp, recv, &model).unwrap();
        }
        assert_eq!(u.poll, 10);
        assert_eq!(u.reach, 0xff);
    }
}
