//! What the benchmark's counting programs decide about a frame (`ntp_bench_sink` on the
//! guest's veth counts and drops replies instead of delivering them to sockets;
//! `ntp_bench_drop` on the server's veth counts and drops requests, to measure what the
//! generator alone can push). Never loaded by the daemon.

use crate::checksum::{le_words_sum, pseudo_v4, udp_request_checksum_ok};
use crate::wire::*;

/// Upper half of the transmit timestamp of every generated request: a reply whose origin
/// does not carry it answers someone else's request.
pub const BENCH_ORIGIN_TAG: u32 = 0x6e74_7078; // "ntpx"

/// The frame the counting programs look at: Ethernet, a 20-byte IPv4 header, UDP, 48 bytes of
/// NTP (the generator sends nothing else, and a reply is never longer than its request).
pub const BENCH_FRAME_LEN: usize = ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + NTP_UDP_LEN as usize;

/// Slots of the `BENCH_COUNTS` per-CPU array.
pub const BENCH_VALID_REPLIES: u32 = 0;
pub const BENCH_INVALID_REPLIES: u32 = 1;
pub const BENCH_KOD_REPLIES: u32 = 2;
pub const BENCH_REQUESTS_DROPPED: u32 = 3;
pub const BENCH_SLOTS: u32 = 4;

/// A frame as the counting programs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchFrame {
    /// Not NTP over IPv4/UDP of the generator's shape (ARP, anything else), or a reply to
    /// a request the generator did not send: passed.
    Other,
    /// An NTP request to port 123.
    Request,
    /// A server reply (mode 4 from port 123) to a generated request, checksum good, time given.
    ValidReply,
    /// A reply to a generated request that is a kiss-o'-death (stratum 0).
    KodReply,
    /// Carries the generator's tag but fails a check (checksum, mode, length).
    InvalidReply,
}

/// Classifies a frame whose first [`BENCH_FRAME_LEN`] bytes are `frame`; `le_words` is their
/// UDP segment (the last 56 bytes) summed as native 32-bit words (the eBPF side loads them
/// wide; [`crate::checksum::le_words`] computes the same on the host).
#[inline(always)]
pub fn classify(frame: &[u8; BENCH_FRAME_LEN], le_words: u64) -> BenchFrame {
    let ip = ETH_HEADER_LEN;
    let udp = ip + IPV4_MIN_HEADER_LEN;
    let ntp = udp + UDP_HEADER_LEN;
    if read_be16(frame, 12) != ETH_P_IPV4 || frame[ip] != 0x45 || frame[ip + 9] != IPPROTO_UDP {
        return BenchFrame::Other;
    }
    let (sport, dport) = (read_be16(frame, udp), read_be16(frame, udp + 2));
    if dport == NTP_PORT && sport != NTP_PORT {
        return BenchFrame::Request;
    }
    if sport != NTP_PORT {
        return BenchFrame::Other;
    }
    let src = [
        frame[ip + 12],
        frame[ip + 13],
        frame[ip + 14],
        frame[ip + 15],
    ];
    let dst = [
        frame[ip + 16],
        frame[ip + 17],
        frame[ip + 18],
        frame[ip + 19],
    ];
    let udp_len = read_be16(frame, udp + 4);
    let tag = read_be32(frame, ntp + OFF_ORIGIN_TS);
    if tag != BENCH_ORIGIN_TAG {
        // Someone else's reply (`ntp-loadgen run`, a client under test): theirs to receive.
        return BenchFrame::Other;
    }
    let pseudo = pseudo_v4(&src, &dst, udp_len);
    if udp_len != NTP_UDP_LEN
        || mode(frame[ntp + OFF_LI_VN_MODE]) != MODE_SERVER
        || !udp_request_checksum_ok(
            read_be16(frame, udp + 6),
            pseudo + le_words_sum(le_words),
            pseudo,
            true,
        )
    {
        return BenchFrame::InvalidReply;
    }
    if frame[ntp + OFF_STRATUM] == STRATUM_UNSPECIFIED {
        return BenchFrame::KodReply;
    }
    BenchFrame::ValidReply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{add_words, finish_udp};

    /// A reply from 169.254.169.123:123 to 169.254.220.2:40000, checksum filled in.
    fn reply(stratum: u8, tag: u32) -> [u8; BENCH_FRAME_LEN] {
        let mut f = [0u8; BENCH_FRAME_LEN];
        f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[23] = IPPROTO_UDP;
        f[26..30].copy_from_slice(&[169, 254, 169, 123]);
        f[30..34].copy_from_slice(&[169, 254, 220, 2]);
        f[34..36].copy_from_slice(&NTP_PORT.to_be_bytes());
        f[36..38].copy_from_slice(&40000u16.to_be_bytes());
        f[38..40].copy_from_slice(&NTP_UDP_LEN.to_be_bytes());
        f[42] = li_vn_mode(0, 4, MODE_SERVER);
        f[43] = stratum;
        f[66..70].copy_from_slice(&tag.to_be_bytes());
        f[70..74].copy_from_slice(&7u32.to_be_bytes());
        let pseudo = pseudo_v4(&[169, 254, 169, 123], &[169, 254, 220, 2], NTP_UDP_LEN);
        let c = finish_udp(add_words(pseudo, &f[34..]));
        f[40..42].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn class(f: &[u8; BENCH_FRAME_LEN]) -> BenchFrame {
        classify(f, crate::checksum::le_words(&f[34..]))
    }

    #[test]
    fn replies_requests_and_the_rest() {
        let good = reply(2, BENCH_ORIGIN_TAG);
        assert_eq!(class(&good), BenchFrame::ValidReply);
        assert_eq!(class(&reply(0, BENCH_ORIGIN_TAG)), BenchFrame::KodReply);
        assert_eq!(class(&reply(2, 0x1234_5678)), BenchFrame::Other);
        // Any flipped byte of the segment breaks the checksum (or the tag, mode or length).
        for i in 34..BENCH_FRAME_LEN {
            let mut f = good;
            f[i] ^= 0x10;
            assert_ne!(class(&f), BenchFrame::ValidReply, "byte {i}");
        }
        let mut request = good;
        request[34..36].copy_from_slice(&40000u16.to_be_bytes());
        request[36..38].copy_from_slice(&NTP_PORT.to_be_bytes());
        assert_eq!(class(&request), BenchFrame::Request);
        let mut arp = good;
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(class(&arp), BenchFrame::Other);
        let mut tcp = good;
        tcp[23] = 6;
        assert_eq!(class(&tcp), BenchFrame::Other);
    }
}
