//! Property tests over arbitrary input (proptest, a bounded number of cases so that
//! `cargo xtask test` spends seconds here): the request rules, the reply builder and the
//! header parser never panic, never answer what they must not, and a reply never grows.

use ntp_common::anchor::{ServerParams, TimeAnchor};
use ntp_common::packet::NtpHeader;
use ntp_common::policy::{admit, Admission, ResponderPolicy, SourceState, POLICY_KOD_RATE};
use ntp_common::reply::{
    request_rejection, write_kiss_of_death, write_server_reply, ClientRequest,
};
use ntp_common::wire::*;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn anchor() -> impl Strategy<Value = TimeAnchor> {
    (
        (
            any::<u64>(),
            1u64..,
            -(1i64 << 31)..(1i64 << 31),
            any::<u64>(),
        ),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>()),
        (any::<[u8; 4]>(), 0u8..4, any::<u8>()),
    )
        .prop_map(
            |(
                (mono_ns, ntp_ns, freq_scaled, max_age_ns),
                (reference, delay, disp, growth),
                (refid, leap, stratum),
            )| {
                TimeAnchor {
                    mono_ns,
                    ntp_ns,
                    freq_scaled,
                    max_age_ns,
                    reference_ntp_ns: reference,
                    root_delay_ns: delay,
                    root_dispersion_ns: disp,
                    dispersion_growth_ns_per_s: growth,
                    refid,
                    leap,
                    stratum,
                    _pad: [0; 2],
                }
            },
        )
}

fn params() -> impl Strategy<Value = ServerParams> {
    (-40i8..=10, any::<i8>(), any::<i8>()).prop_map(|(precision, a, b)| ServerParams {
        precision,
        poll_min: a.min(b),
        poll_max: a.max(b),
        ..ServerParams::DEFAULT
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn only_client_requests_of_versions_1_to_4_are_accepted(b0 in any::<u8>()) {
        let accepted = request_rejection(b0).is_none();
        prop_assert_eq!(accepted, mode(b0) == MODE_CLIENT && (1..=4).contains(&version(b0)));
    }

    #[test]
    fn every_reply_is_a_well_formed_answer_to_its_request(
        req in any::<[u8; 48]>(),
        a in anchor(),
        p in params(),
        rx_after in 0u64..1 << 40,
        residence in 0u64..1 << 20,
        random in any::<u32>(),
    ) {
        let mut hdr = req;
        let parsed = ClientRequest::parse(&hdr);
        let rx = a.mono_ns.wrapping_add(rx_after);
        let receive = write_server_reply(&mut hdr, &parsed, &a, &p, rx, rx.wrapping_add(residence), random);
        prop_assert_eq!(mode(hdr[0]), MODE_SERVER);
        prop_assert_eq!(version(hdr[0]), version(req[0]));
        // The origin is the request's transmit timestamp, bit for bit.
        prop_assert_eq!(&hdr[OFF_ORIGIN_TS..OFF_ORIGIN_TS + 8], &req[OFF_TRANSMIT_TS..]);
        prop_assert_eq!(read_be64(&hdr, OFF_RECEIVE_TS), receive);
        // Transmit follows receive (mod 2^64).
        let tx = read_be64(&hdr, OFF_TRANSMIT_TS);
        prop_assert!((tx.wrapping_sub(receive) as i64) > 0);
        let poll = hdr[OFF_POLL] as i8;
        prop_assert!(poll >= p.poll_min && poll <= p.poll_max);
        if leap(hdr[0]) == LEAP_UNSYNCHRONIZED {
            prop_assert_eq!(hdr[OFF_STRATUM], 0);
        }
    }

    #[test]
    fn a_kiss_of_death_never_carries_usable_time(
        req in any::<[u8; 48]>(),
        a in anchor(),
        code in prop::sample::select(vec![*b"RATE", *b"DENY"]),
        kod_poll in 0i8..=17,
    ) {
        let mut hdr = req;
        let parsed = ClientRequest::parse(&hdr);
        write_kiss_of_death(&mut hdr, &parsed, &a, &ServerParams::DEFAULT, a.mono_ns, a.mono_ns, 0, code, kod_poll);
        prop_assert_eq!(leap(hdr[0]), LEAP_UNSYNCHRONIZED);
        prop_assert_eq!(hdr[OFF_STRATUM], 0);
        prop_assert_eq!(&hdr[OFF_REFID..OFF_REFID + 4], &code[..]);
        prop_assert!(hdr[OFF_POLL] as i8 >= kod_poll);
        prop_assert_eq!(&hdr[OFF_ORIGIN_TS..OFF_ORIGIN_TS + 8], &req[OFF_TRANSMIT_TS..]);
    }

    #[test]
    fn the_header_parser_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let h = NtpHeader::parse(&bytes);
        prop_assert_eq!(h.is_some(), bytes.len() >= NTP_HEADER_LEN);
        if let Some(h) = h {
            prop_assert_eq!(h.transmit_ts, read_be64(&bytes, OFF_TRANSMIT_TS));
        }
    }

    #[test]
    fn the_rate_limit_holds_any_arrival_pattern_to_burst_plus_rate(
        gaps in prop::collection::vec(0u64..50_000_000, 1..400),
        rate in 1u32..1000,
        burst in 1u32..64,
    ) {
        let mut policy = ResponderPolicy::OPEN.with_rate(rate as f64, burst);
        policy.flags |= POLICY_KOD_RATE;
        policy.kod_interval_ns = 1_000_000_000;
        let mut state = SourceState::default();
        let start = 1_000_000_000_000u64;
        let mut now = start;
        let (mut answered, mut kods) = (0u64, 0u64);
        for gap in gaps {
            now += gap;
            match admit(&mut state, now, &policy) {
                Admission::Answer => answered += 1,
                Admission::Limited { kod } => kods += kod as u64,
            }
        }
        let elapsed = (now - start) as f64 * 1e-9;
        prop_assert!(answered as f64 <= burst as f64 + rate as f64 * elapsed + 1.0);
        prop_assert!(kods as f64 <= elapsed + 1.0);
    }
}
