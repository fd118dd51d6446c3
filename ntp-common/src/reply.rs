//! The NTP header of a server reply, built in place over the client's request.
//!
//! One builder for both paths: the XDP responder calls it on packet memory, the daemon's
//! userspace path on a socket buffer, so their headers agree field for field.

use crate::anchor::{ServerParams, TimeAnchor};
use crate::counters::Counter;
use crate::time::{ns_to_short, ntp_ns_to_timestamp};
use crate::wire::*;

/// The NTP-level rule both paths apply to a request's first byte: only client requests (mode
/// 3) of versions 1-4 are answered. `Some(counter)`: why not (`PassedNotClient` for other
/// modes, which are passed to the host; a bad version is dropped).
#[inline(always)]
pub fn request_rejection(li_vn_mode: u8) -> Option<Counter> {
    if mode(li_vn_mode) != MODE_CLIENT {
        return Some(Counter::PassedNotClient);
    }
    let v = version(li_vn_mode);
    if v < MIN_VERSION || v > MAX_VERSION {
        return Some(Counter::DroppedVersion);
    }
    None
}

/// What the builder needs from the request, read before the header is overwritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    pub version: u8,
    pub poll: i8,
    /// Transmit timestamp, echoed bit for bit as the reply's origin.
    pub transmit: [u8; 8],
}

impl ClientRequest {
    #[inline(always)]
    pub fn parse(hdr: &[u8; NTP_HEADER_LEN]) -> ClientRequest {
        ClientRequest {
            version: version(hdr[OFF_LI_VN_MODE]),
            poll: hdr[OFF_POLL] as i8,
            transmit: [
                hdr[OFF_TRANSMIT_TS],
                hdr[OFF_TRANSMIT_TS + 1],
                hdr[OFF_TRANSMIT_TS + 2],
                hdr[OFF_TRANSMIT_TS + 3],
                hdr[OFF_TRANSMIT_TS + 4],
                hdr[OFF_TRANSMIT_TS + 5],
                hdr[OFF_TRANSMIT_TS + 6],
                hdr[OFF_TRANSMIT_TS + 7],
            ],
        }
    }
}

#[inline(always)]
fn clamp_poll(poll: i8, params: &ServerParams) -> i8 {
    if poll < params.poll_min {
        params.poll_min
    } else if poll > params.poll_max {
        params.poll_max
    } else {
        poll
    }
}

/// Mask of the 32.32 timestamp bits below the clock's precision (RFC 5905 §6: "the bits below
/// the precision should be random" so that timestamps are unpredictable and distinct).
#[inline(always)]
pub fn sub_precision_mask(precision: i8) -> u64 {
    let bits = 32i32 + precision as i32;
    if bits <= 0 {
        0
    } else if bits >= 32 {
        0xffff_ffff
    } else {
        (1u64 << bits) - 1
    }
}

/// The next 32 random bits of a per-CPU xorshift64* generator (`state` never 0; seed it from
/// the kernel's own generator). The bits below the precision need no more than the kernel's
/// `bpf_get_prandom_u32`, itself a per-CPU non-cryptographic generator, and calling that
/// helper costs an answer ~40 ns on a CPU whose returns go through a return thunk.
#[inline(always)]
pub fn next_random(state: &mut u64) -> u32 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
}

/// Transmit timestamp from the time just before sending: bits below the precision randomised,
/// and always after the receive timestamp.
#[inline(always)]
pub fn transmit_timestamp(tx_exact: u64, receive: u64, precision: i8, random: u32) -> u64 {
    let mask = sub_precision_mask(precision);
    let tx = (tx_exact & !mask) | (random as u64 & mask);
    if tx.wrapping_sub(receive) as i64 <= 0 {
        receive.wrapping_add(1)
    } else {
        tx
    }
}

/// Writes a mode 4 reply over `hdr`.
///
/// `rx_mono` and `tx_mono` are CLOCK_MONOTONIC readings at reception and just before sending;
/// `random` supplies the bits below the precision. Returns the receive timestamp written.
#[inline(always)]
pub fn write_server_reply(
    hdr: &mut [u8; NTP_HEADER_LEN],
    req: &ClientRequest,
    anchor: &TimeAnchor,
    params: &ServerParams,
    rx_mono: u64,
    tx_mono: u64,
    random: u32,
) -> u64 {
    let receive = write_reply_but_transmit(hdr, req, anchor, params, rx_mono);
    write_transmit(hdr, anchor, params, receive, tx_mono, random);
    receive
}

/// Every field of a mode 4 reply but the transmit timestamp, so that the clock can be read for
/// it after all the other work (the XDP path: residence then covers what it did). Returns
/// the receive timestamp written; [`write_transmit`] completes the header.
#[inline(always)]
pub fn write_reply_but_transmit(
    hdr: &mut [u8; NTP_HEADER_LEN],
    req: &ClientRequest,
    anchor: &TimeAnchor,
    params: &ServerParams,
    rx_mono: u64,
) -> u64 {
    let synced = anchor.is_synchronized_at(rx_mono);
    let (leap, stratum, refid) = if synced {
        (anchor.leap, anchor.stratum, anchor.refid)
    } else {
        (LEAP_UNSYNCHRONIZED, STRATUM_UNSPECIFIED, KISS_INIT)
    };
    let dispersion = anchor.root_dispersion_at(rx_mono);
    let receive = ntp_ns_to_timestamp(anchor.ntp_ns_at(rx_mono));
    let reference = if anchor.reference_ntp_ns == 0 {
        0
    } else {
        ntp_ns_to_timestamp(anchor.reference_ntp_ns)
    };

    hdr[OFF_LI_VN_MODE] = li_vn_mode(leap, req.version, MODE_SERVER);
    hdr[OFF_STRATUM] = stratum;
    hdr[OFF_POLL] = clamp_poll(req.poll, params) as u8;
    hdr[OFF_PRECISION] = params.precision as u8;
    write_be32(
        hdr,
        OFF_ROOT_DELAY,
        ns_to_short(anchor.root_delay_ns as u64),
    );
    write_be32(hdr, OFF_ROOT_DISPERSION, ns_to_short(dispersion));
    hdr[OFF_REFID] = refid[0];
    hdr[OFF_REFID + 1] = refid[1];
    hdr[OFF_REFID + 2] = refid[2];
    hdr[OFF_REFID + 3] = refid[3];
    write_be64(hdr, OFF_REFERENCE_TS, reference);
    let mut i = 0;
    while i < 8 {
        hdr[OFF_ORIGIN_TS + i] = req.transmit[i];
        i += 1;
    }
    write_be64(hdr, OFF_RECEIVE_TS, receive);
    receive
}

/// The transmit timestamp for monotonic reading `tx_mono`, after `receive`.
#[inline(always)]
pub fn write_transmit(
    hdr: &mut [u8; NTP_HEADER_LEN],
    anchor: &TimeAnchor,
    params: &ServerParams,
    receive: u64,
    tx_mono: u64,
    random: u32,
) {
    let transmit = transmit_timestamp(
        ntp_ns_to_timestamp(anchor.ntp_ns_at(tx_mono)),
        receive,
        params.precision,
        random,
    );
    write_be64(hdr, OFF_TRANSMIT_TS, transmit);
}

/// Writes a kiss-o'-death (RFC 5905 §7.4) over `hdr`: LI=3, stratum 0 and the kiss code as
/// reference ID, so no client can take its time; the origin echoes the request and the
/// receive/transmit timestamps are filled as in a reply (as ntpd does), so that clients match
/// it to their request and act on it. `min_poll` is the poll exponent the client is asked to
/// back off to (the request's, if larger).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn write_kiss_of_death(
    hdr: &mut [u8; NTP_HEADER_LEN],
    req: &ClientRequest,
    anchor: &TimeAnchor,
    params: &ServerParams,
    rx_mono: u64,
    tx_mono: u64,
    random: u32,
    code: [u8; 4],
    min_poll: i8,
) {
    write_server_reply(hdr, req, anchor, params, rx_mono, tx_mono, random);
    hdr[OFF_LI_VN_MODE] = li_vn_mode(LEAP_UNSYNCHRONIZED, req.version, MODE_SERVER);
    hdr[OFF_STRATUM] = STRATUM_UNSPECIFIED;
    hdr[OFF_POLL] = if req.poll > min_poll {
        req.poll
    } else {
        min_poll
    } as u8;
    hdr[OFF_REFID] = code[0];
    hdr[OFF_REFID + 1] = code[1];
    hdr[OFF_REFID + 2] = code[2];
    hdr[OFF_REFID + 3] = code[3];
}

/// A guest's apparent clock error: its transmit timestamp minus the served receive time, as
/// a signed 32.32 difference (the era wraps away).
#[inline(always)]
pub fn guest_offset_fixed(guest_transmit: [u8; 8], receive: u64) -> i64 {
    u64::from_be_bytes(guest_transmit).wrapping_sub(receive) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{ntp_ns_to_timestamp, timestamp_diff_ns, NANOS_PER_SEC};

    const SEC: u64 = NANOS_PER_SEC;

    fn anchor() -> TimeAnchor {
        TimeAnchor {
            mono_ns: 50 * SEC,
            ntp_ns: 3_972_000_000 * SEC,
            freq_scaled: 0,
            max_age_ns: 10 * SEC,
            reference_ntp_ns: 3_971_999_990 * SEC,
            root_delay_ns: 1_000_000,
            root_dispersion_ns: 500_000,
            dispersion_growth_ns_per_s: 40,
            refid: [169, 254, 0, 1],
            leap: LEAP_NONE,
            stratum: 3,
            _pad: [0; 2],
        }
    }

    fn request(version: u8, poll: i8) -> [u8; NTP_HEADER_LEN] {
        let mut h = [0u8; NTP_HEADER_LEN];
        h[0] = li_vn_mode(0, version, MODE_CLIENT);
        h[OFF_POLL] = poll as u8;
        h[OFF_TRANSMIT_TS..].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04]);
        h
    }

    fn build(anchor: &TimeAnchor, rx: u64, tx: u64, h: &mut [u8; 48]) {
        let req = ClientRequest::parse(h);
        write_server_reply(h, &req, anchor, &ServerParams::DEFAULT, rx, tx, 0xffff_ffff);
    }

    #[test]
    fn synchronized_reply_fields() {
        let a = anchor();
        let mut h = request(4, 6);
        build(&a, a.mono_ns + 2 * SEC, a.mono_ns + 2 * SEC + 300, &mut h);
        assert_eq!(h[0], li_vn_mode(0, 4, MODE_SERVER));
        assert_eq!(h[OFF_STRATUM], 3);
        assert_eq!(h[OFF_POLL], 6);
        assert_eq!(h[OFF_PRECISION] as i8, -24);
        assert_eq!(read_be32(&h, OFF_ROOT_DELAY), ns_to_short(1_000_000));
        // 0.5 ms + 2 s × 40 ns/s: the anchor's own growth, not RFC 5905's 15 µs/s.
        assert_eq!(read_be32(&h, OFF_ROOT_DISPERSION), ns_to_short(500_080));
        assert_eq!(h[OFF_REFID..OFF_REFID + 4], [169, 254, 0, 1]);
        assert_eq!(
            read_be64(&h, OFF_REFERENCE_TS),
            ntp_ns_to_timestamp(a.reference_ntp_ns)
        );
        assert_eq!(
            h[OFF_ORIGIN_TS..OFF_ORIGIN_TS + 8],
            [0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]
        );
        let rx = read_be64(&h, OFF_RECEIVE_TS);
        let tx = read_be64(&h, OFF_TRANSMIT_TS);
        assert_eq!(rx, ntp_ns_to_timestamp(a.ntp_ns + 2 * SEC));
        assert!(tx > rx);
        // Transmit is within one precision unit (2^-24 s ≈ 60 ns) of the true send time.
        assert!(timestamp_diff_ns(tx, rx).abs_diff(300) < 60);
    }

    #[test]
    fn version_is_echoed_and_poll_clamped() {
        let a = anchor();
        for (v, poll, want_poll) in [(1, 0, 4), (3, 17, 10), (4, -3, 4), (2, 8, 8)] {
            let mut h = request(v, poll);
            build(&a, a.mono_ns, a.mono_ns + 10, &mut h);
            assert_eq!(version(h[0]), v);
            assert_eq!(mode(h[0]), MODE_SERVER);
            assert_eq!(h[OFF_POLL] as i8, want_poll);
        }
    }

    #[test]
    fn stale_or_unsynchronized_anchor_says_so() {
        let mut a = anchor();
        let mut h = request(4, 6);
        build(&a, a.mono_ns + 11 * SEC, a.mono_ns + 11 * SEC + 10, &mut h);
        assert_eq!(leap(h[0]), LEAP_UNSYNCHRONIZED);
        assert_eq!(h[OFF_STRATUM], 0);
        assert_eq!(&h[OFF_REFID..OFF_REFID + 4], b"INIT");

        a.leap = LEAP_UNSYNCHRONIZED;
        let mut h = request(4, 6);
        build(&a, a.mono_ns, a.mono_ns + 10, &mut h);
        assert_eq!(leap(h[0]), LEAP_UNSYNCHRONIZED);
        assert_eq!(h[OFF_STRATUM], 0);
    }

    #[test]
    fn leap_warning_is_passed_through() {
        let mut a = anchor();
        a.leap = LEAP_ADD_SECOND;
        let mut h = request(4, 6);
        build(&a, a.mono_ns, a.mono_ns + 10, &mut h);
        assert_eq!(leap(h[0]), LEAP_ADD_SECOND);
        assert_eq!(h[OFF_STRATUM], 3);
    }

    #[test]
    fn transmit_never_equals_or_precedes_receive() {
        // Same instant and random bits that would land below the receive timestamp.
        let rx = ntp_ns_to_timestamp(3_972_000_000 * SEC);
        for random in [0u32, 1, 0xff, 0xffff_ffff] {
            let tx = transmit_timestamp(rx, rx, -24, random);
            assert!(tx > rx);
        }
        // Randomised bits stay below the precision.
        let tx = transmit_timestamp(rx + (1 << 20), rx, -24, 0xffff_ffff);
        assert_eq!(
            tx & !sub_precision_mask(-24),
            (rx + (1 << 20)) & !sub_precision_mask(-24)
        );
    }

    #[test]
    fn kiss_of_death_carries_no_usable_time() {
        let a = anchor();
        let mut h = request(3, 5);
        let req = ClientRequest::parse(&h);
        write_kiss_of_death(
            &mut h,
            &req,
            &a,
            &ServerParams::DEFAULT,
            a.mono_ns,
            a.mono_ns + 10,
            7,
            *b"RATE",
            8,
        );
        assert_eq!(h[0], li_vn_mode(LEAP_UNSYNCHRONIZED, 3, MODE_SERVER));
        assert_eq!(h[OFF_STRATUM], 0);
        assert_eq!(&h[OFF_REFID..OFF_REFID + 4], b"RATE");
        assert_eq!(h[OFF_POLL], 8);
        assert_eq!(h[OFF_ORIGIN_TS..OFF_ORIGIN_TS + 8], req.transmit);
        assert_ne!(read_be64(&h, OFF_TRANSMIT_TS), 0);
    }

    #[test]
    fn guest_offsets() {
        let rx = ntp_ns_to_timestamp(3_972_000_000 * SEC);
        let ahead = (rx + (2u64 << 32)).to_be_bytes();
        assert_eq!(guest_offset_fixed(ahead, rx), 2 << 32);
        let behind = (rx - (1u64 << 31)).to_be_bytes();
        assert_eq!(guest_offset_fixed(behind, rx), -(1 << 31));
        // Across the era boundary.
        assert_eq!(guest_offset_fixed(5u64.to_be_bytes(), u64::MAX - 4), 10);
    }

    #[test]
    fn precision_masks() {
        assert_eq!(sub_precision_mask(-32), 0);
        assert_eq!(sub_precision_mask(-40), 0);
        assert_eq!(sub_precision_mask(-24), 0xff);
        assert_eq!(sub_precision_mask(-20), 0xfff);
        assert_eq!(sub_precision_mask(0), 0xffff_ffff);
    }

    #[test]
    fn the_random_bits_vary_and_never_stick() {
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut seen_low = 0u32;
        let mut all_low = u32::MAX;
        let mut values = [0u32; 10_000];
        for v in values.iter_mut() {
            let r = next_random(&mut state);
            assert_ne!(state, 0);
            seen_low |= r;
            all_low &= r;
            *v = r;
        }
        values.sort_unstable();
        // Every bit is set sometimes and clear sometimes, and no value repeats in 10 000.
        assert_eq!(seen_low, u32::MAX);
        assert_eq!(all_low, 0);
        assert!(values.windows(2).all(|w| w[0] != w[1]));
    }
}
