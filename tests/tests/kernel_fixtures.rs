//! Packet fixtures through the kernel (BPF_PROG_TEST_RUN): a table of input frames and the
//! verdict, counter and, for replies, the exact reply each must produce.

use anyhow::Result;
use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice, UdpHeaderSlice};
use integration_tests::frames::*;
use ntp_common::policy::*;
use ntp_common::reply::sub_precision_mask;
use ntp_common::time::{ns_to_short, ntp_ns_to_timestamp, NANOS_PER_SEC};
use ntp_common::wire::*;
use ntp_common::{Counter, TimeAnchor};
use ntp_user::host::hostclock::monotonic_now_ns;
use ntp_user::responder::admission::{acl_contents, AclRewrite, AdmissionSpec};
use ntp_user::responder::{AclEntry, Responder, TableSizes};
use std::net::IpAddr;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

#[derive(Clone, Copy, Debug)]
enum AnchorState {
    Synchronized,
    Unsynchronized,
    Stale,
    NeverPublished,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Reply {
        version: u8,
        poll: i8,
    },
    Pass(Counter),
    Drop(Counter),
    /// A kiss-o'-death with this code, counted as `counter`.
    Kod([u8; 4], Counter),
}

struct Case {
    name: String,
    frame: Vec<u8>,
    expect: Expect,
}

fn case(name: &str, frame: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.to_string(),
        frame,
        expect,
    }
}

const ANSWER: Expect = Expect::Reply {
    version: 4,
    poll: 6,
};

fn responder(state: AnchorState) -> Result<(Responder, TimeAnchor)> {
    responder_sized(state, TableSizes::default())
}

/// The VLANs the fixtures' responder answers tagged requests on.
const LISTED_VLANS: [u16; 4] = [10, 20, 100, 4000];

fn responder_sized(state: AnchorState, sizes: TableSizes) -> Result<(Responder, TimeAnchor)> {
    let mut r = Responder::load_sized(sizes)?;
    // BPF_PROG_TEST_RUN delivers on the loopback device (ifindex 1): the fixtures' frames
    // are sent to VIP_MAC, as if it were that device's own.
    r.set_own_macs(&[(VIP_MAC, 1)])?;
    r.set_vlans(&LISTED_VLANS)?;
    r.add_served_address(IpAddr::from(CLOCK_V4))?;
    r.add_served_address(IpAddr::from(CLOCK_V6))?;
    let now = monotonic_now_ns()?;
    let mut anchor = TimeAnchor {
        mono_ns: now,
        ntp_ns: 3_972_000_000 * NANOS_PER_SEC + 123_456_789,
        freq_scaled: 0,
        max_age_ns: 60 * NANOS_PER_SEC,
        reference_ntp_ns: 3_971_999_990 * NANOS_PER_SEC,
        root_delay_ns: 1_000_000,
        root_dispersion_ns: 500_000,
        // Not RFC 5905's 15 µs/s: the reply must grow the bound at the anchor's own rate (a
        // stale anchor, 100 s old, serves 25.5 ms where PHI would give 2 ms).
        dispersion_growth_ns_per_s: 250_000,
        refid: [169, 254, 0, 1],
        leap: LEAP_NONE,
        stratum: 3,
        _pad: [0; 2],
    };
    match state {
        AnchorState::Synchronized => {}
        AnchorState::Unsynchronized => anchor.leap = LEAP_UNSYNCHRONIZED,
        AnchorState::Stale => {
            anchor.mono_ns = now - 100 * NANOS_PER_SEC;
            anchor.max_age_ns = 10 * NANOS_PER_SEC;
        }
        AnchorState::NeverPublished => return Ok((r, TimeAnchor::default())),
    }
    r.publish_anchor(anchor)?;
    Ok((r, anchor))
}

fn table() -> Vec<Case> {
    let v4 = Frame::v4(v4_request());
    let v6 = Frame::v6(v4_request());
    let mut cases = vec![
        case("v4 request over IPv4", v4.build(), ANSWER),
        case("v4 request over IPv6", v6.build(), ANSWER),
    ];
    for version in 1..=3 {
        cases.push(case(
            &format!("v{version} request"),
            Frame::v4(ntp_request(version, MODE_CLIENT, 6)).build(),
            Expect::Reply { version, poll: 6 },
        ));
    }
    for (poll, want) in [(0i8, 4i8), (17, 10), (-6, 4)] {
        cases.push(case(
            &format!("poll {poll} clamped to {want}"),
            Frame::v4(ntp_request(4, MODE_CLIENT, poll)).build(),
            Expect::Reply {
                version: 4,
                poll: want,
            },
        ));
    }
    let with_options = |opts: Vec<u8>| Frame {
        ipv4_options: opts,
        ..v4.clone()
    };
    cases.push(case(
        "IPv4 with 4 bytes of options",
        with_options(vec![1, 1, 1, 0]).build(),
        ANSWER,
    ));
    cases.push(case(
        "IPv4 with 40 bytes of options (IHL 15)",
        with_options(vec![1; 40]).build(),
        ANSWER,
    ));
    for (name, vlan) in [
        ("802.1Q", Vlan::Dot1q(100)),
        ("802.1ad", Vlan::Dot1ad(4000)),
    ] {
        cases.push(case(
            &format!("{name} IPv4"),
            Frame {
                vlan: Some(vlan.clone()),
                ..v4.clone()
            }
            .build(),
            ANSWER,
        ));
        cases.push(case(
            &format!("{name} IPv6"),
            Frame {
                vlan: Some(vlan),
                ..v6.clone()
            }
            .build(),
            ANSWER,
        ));
    }

    // A tag whose VLAN is not listed: the request is dropped and counted, never answered
    // and never passed up (whatever the tag's type); what is not a request for us passes.
    let tagged = |vlan: Vlan, frame: &Frame| {
        Frame {
            vlan: Some(vlan),
            ..frame.clone()
        }
        .build()
    };
    let unlisted = Expect::Drop(Counter::DroppedVlan);
    cases.push(case(
        "802.1Q IPv4, VLAN not listed",
        tagged(Vlan::Dot1q(300), &v4),
        unlisted,
    ));
    cases.push(case(
        "802.1Q IPv6, VLAN not listed",
        tagged(Vlan::Dot1q(4094), &v6),
        unlisted,
    ));
    cases.push(case(
        "802.1ad IPv4, VLAN not listed",
        tagged(Vlan::Dot1ad(301), &v4),
        unlisted,
    ));
    cases.push(case(
        "802.1ad IPv6, VLAN not listed",
        tagged(Vlan::Dot1ad(1), &v6),
        unlisted,
    ));
    let mut padded = v4_request();
    padded.extend_from_slice(&[0u8; 20]);
    cases.push(case(
        "symmetric-key MAC, VLAN not listed",
        tagged(Vlan::Dot1q(300), &Frame::v4(padded)),
        unlisted,
    ));
    cases.push(case(
        "mode 4, VLAN not listed",
        tagged(Vlan::Dot1q(300), &Frame::v4(ntp_request(4, 4, 6))),
        Expect::Pass(Counter::PassedNotClient),
    ));
    cases.push(case(
        "UDP to port 124, VLAN not listed",
        tagged(
            Vlan::Dot1q(300),
            &Frame {
                dst_port: 124,
                ..v4.clone()
            },
        ),
        Expect::Pass(Counter::PassedNotNtp),
    ));
    // VLAN ID 0 only carries a priority: the frame is untagged as far as VLANs go.
    cases.push(case(
        "priority tag (VLAN 0) IPv4",
        tagged(Vlan::Dot1q(0), &v4),
        ANSWER,
    ));
    cases.push(case(
        "priority tag (VLAN 0) IPv6",
        tagged(Vlan::Dot1q(0), &v6),
        ANSWER,
    ));
    // Two tags (802.1ad around 802.1Q) are never parsed, listed or not: passed untouched.
    cases.push(case(
        "QinQ, both VLANs listed",
        tagged(Vlan::QinQ(100, 10), &v4),
        Expect::Pass(Counter::PassedNotIp),
    ));
    cases.push(case(
        "QinQ, neither VLAN listed",
        tagged(Vlan::QinQ(300, 301), &v6),
        Expect::Pass(Counter::PassedNotIp),
    ));

    // Not for us: passed untouched.
    cases.push(case(
        "IPv4 to another address",
        Frame {
            dst_v4: OTHER_V4,
            ..v4.clone()
        }
        .build(),
        Expect::Pass(Counter::PassedNotServed),
    ));
    let mut other6 = CLOCK_V6;
    other6[15] = 0x24;
    cases.push(case(
        "IPv6 to another address",
        Frame {
            dst_v6: other6,
            ..v6.clone()
        }
        .build(),
        Expect::Pass(Counter::PassedNotServed),
    ));
    cases.push(case(
        "UDP to port 124",
        Frame {
            dst_port: 124,
            ..v4.clone()
        }
        .build(),
        Expect::Pass(Counter::PassedNotNtp),
    ));
    cases.push(case(
        "UDP from port 123 to port 124",
        Frame {
            src_port: 123,
            dst_port: 124,
            ..v6.clone()
        }
        .build(),
        Expect::Pass(Counter::PassedNotNtp),
    ));
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ethernet2(GUEST_MAC, VIP_MAC)
        .ipv4(GUEST_V4, CLOCK_V4, 64)
        .tcp(CLIENT_PORT, 123, 1, 1024)
        .write(&mut tcp, &v4_request())
        .unwrap();
    cases.push(case(
        "TCP to port 123",
        tcp,
        Expect::Pass(Counter::PassedNotNtp),
    ));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    cases.push(case("ARP", arp, Expect::Pass(Counter::PassedNotIp)));
    let mut qinq = Frame {
        vlan: Some(Vlan::Dot1q(5)),
        ..v4.clone()
    }
    .build();
    qinq[16] = 0x81; // inner ethertype 0x8100: a second tag
    qinq[17] = 0x00;
    cases.push(case(
        "two VLAN tags",
        qinq,
        Expect::Pass(Counter::PassedNotIp),
    ));
    cases.push(case(
        "IPv4 fragment (more fragments)",
        Frame {
            more_fragments: true,
            ..v4.clone()
        }
        .build(),
        Expect::Pass(Counter::PassedFragment),
    ));
    cases.push(case(
        "IPv4 fragment (offset)",
        Frame {
            fragment_offset: 185,
            ..v4.clone()
        }
        .build(),
        Expect::Pass(Counter::PassedFragment),
    ));
    let mut hop_by_hop = v6.build();
    hop_by_hop[14 + 6] = 0;
    cases.push(case(
        "IPv6 with a hop-by-hop header",
        hop_by_hop,
        Expect::Pass(Counter::PassedIpv6ExtHeader),
    ));
    let mut ext = v4_request();
    ext.extend_from_slice(&[0x01, 0x04, 0x00, 0x10]);
    ext.extend_from_slice(&[0u8; 12]);
    cases.push(case(
        "extension field (NTS-style)",
        Frame::v4(ext.clone()).build(),
        Expect::Pass(Counter::PassedExtension),
    ));
    cases.push(case(
        "extension field over IPv6",
        Frame::v6(ext).build(),
        Expect::Pass(Counter::PassedExtension),
    ));
    let mut mac = v4_request();
    mac.extend_from_slice(&[0, 0, 0, 1]);
    mac.extend_from_slice(&[0xab; 16]);
    cases.push(case(
        "symmetric-key MAC",
        Frame::v4(mac).build(),
        Expect::Pass(Counter::PassedExtension),
    ));
    let full = v4.build();
    cases.push(case(
        "truncated inside the IPv4 header",
        full[..24].to_vec(),
        Expect::Pass(Counter::PassedNotIp),
    ));

    // NTP that is not a client request (replies to the host's own client, symmetric peers,
    // control queries): passed to the host, never answered here.
    for mode in [0u8, 1, 2, 4, 5, 6, 7] {
        cases.push(case(
            &format!("mode {mode}"),
            Frame::v4(ntp_request(4, mode, 6)).build(),
            Expect::Pass(Counter::PassedNotClient),
        ));
    }
    cases.push(case(
        "mode 7 over IPv6",
        Frame::v6(ntp_request(2, 7, 0)).build(),
        Expect::Pass(Counter::PassedNotClient),
    ));
    // A frame a bridge flooded for another MAC (unknown unicast): not ours to answer.
    let mut other_mac = v4.build();
    other_mac[0..6].copy_from_slice(&[0x02, 0x00, 0x5e, 0x00, 0x00, 0x99]);
    cases.push(case(
        "sent to another MAC",
        other_mac,
        Expect::Pass(Counter::PassedOtherHost),
    ));
    // IPv6 sources that are never answered: IPv4-mapped (would match IPv4 rules and records),
    // loopback, IPv4-compatible.
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12..].copy_from_slice(&GUEST_V4);
    let mut loopback = [0u8; 16];
    loopback[15] = 1;
    let mut compatible = [0u8; 16];
    compatible[12..].copy_from_slice(&GUEST_V4);
    for (name, src) in [
        ("IPv4-mapped IPv6 source", mapped),
        ("::1 source", loopback),
        ("IPv4-compatible IPv6 source", compatible),
    ] {
        cases.push(case(
            name,
            Frame {
                src_v6: src,
                ..v6.clone()
            }
            .build(),
            Expect::Drop(Counter::DroppedBadAddress),
        ));
    }
    // Malformed NTP to a served address: dropped.
    for version in [0u8, 5, 6, 7] {
        cases.push(case(
            &format!("version {version}"),
            Frame::v4(ntp_request(version, MODE_CLIENT, 6)).build(),
            Expect::Drop(Counter::DroppedVersion),
        ));
    }
    cases.push(case(
        "40-byte NTP payload",
        Frame::v4(v4_request()[..40].to_vec()).build(),
        Expect::Drop(Counter::DroppedShort),
    ));
    cases.push(case(
        "empty UDP payload",
        Frame::v6(Vec::new()).build(),
        Expect::Drop(Counter::DroppedShort),
    ));
    cases.push(case(
        "frame cut inside the NTP header",
        full[..full.len() - 10].to_vec(),
        Expect::Drop(Counter::DroppedShort),
    ));
    cases.push(case(
        "frame cut inside the UDP header",
        full[..v4.l4() + 4].to_vec(),
        Expect::Drop(Counter::DroppedShort),
    ));
    cases.push(case(
        "source port 0",
        Frame {
            src_port: 0,
            ..v4.clone()
        }
        .build(),
        Expect::Drop(Counter::DroppedSourcePort),
    ));
    let mut udp_len = v4.build();
    udp_len[v4.l4() + 5] = 60;
    cases.push(case(
        "UDP length above the IP payload",
        udp_len,
        Expect::Drop(Counter::DroppedBadLength),
    ));
    let mut v6_len = v6.build();
    v6_len[14 + 5] = 64;
    cases.push(case(
        "IPv6 payload length above the UDP length",
        v6_len,
        Expect::Drop(Counter::DroppedBadLength),
    ));
    let mut ihl4 = v4.build();
    ihl4[14] = 0x44;
    cases.push(case("IHL 4", ihl4, Expect::Drop(Counter::DroppedBadLength)));
    let mut bad_ip_sum = v4.build();
    bad_ip_sum[14 + 10] ^= 0x5a;
    cases.push(case(
        "bad IPv4 header checksum",
        bad_ip_sum,
        Expect::Drop(Counter::DroppedBadIpChecksum),
    ));
    let mut bad_udp = v4.build();
    bad_udp[v4.l4() + 7] ^= 0x01;
    cases.push(case(
        "bad UDP checksum",
        bad_udp,
        Expect::Drop(Counter::DroppedBadUdpChecksum),
    ));
    let mut bad_udp6 = v6.build();
    bad_udp6[v6.l4() + 6] ^= 0x80;
    cases.push(case(
        "bad UDP checksum over IPv6",
        bad_udp6,
        Expect::Drop(Counter::DroppedBadUdpChecksum),
    ));
    let mut altered = v4.build();
    let last = altered.len() - 1;
    altered[last] ^= 0xff; // payload changed after the checksum was computed
    cases.push(case(
        "payload altered after checksumming",
        altered,
        Expect::Drop(Counter::DroppedBadUdpChecksum),
    ));
    let mut zero4 = v4.build();
    zero4[v4.l4() + 6] = 0;
    zero4[v4.l4() + 7] = 0;
    cases.push(case("zero UDP checksum over IPv4 (none)", zero4, ANSWER));
    let mut zero6 = v6.build();
    zero6[v6.l4() + 6] = 0;
    zero6[v6.l4() + 7] = 0;
    cases.push(case(
        "zero UDP checksum over IPv6",
        zero6,
        Expect::Drop(Counter::DroppedBadUdpChecksum),
    ));
    let mut partial4 = v4.build();
    let seed = partial_checksum_seed(&GUEST_V4, &CLOCK_V4, 56).to_be_bytes();
    partial4[v4.l4() + 6..v4.l4() + 8].copy_from_slice(&seed);
    cases.push(case("checksum-offload seed over IPv4", partial4, ANSWER));
    let mut partial6 = v6.build();
    let seed = partial_checksum_seed(&GUEST_V6, &CLOCK_V6, 56).to_be_bytes();
    partial6[v6.l4() + 6..v6.l4() + 8].copy_from_slice(&seed);
    cases.push(case("checksum-offload seed over IPv6", partial6, ANSWER));
    for (name, src) in [
        ("multicast", [224, 0, 0, 1]),
        ("broadcast", [255; 4]),
        ("zero", [0; 4]),
        ("loopback", [127, 0, 0, 1]),
    ] {
        cases.push(case(
            &format!("{name} IPv4 source"),
            Frame {
                src_v4: src,
                ..v4.clone()
            }
            .build(),
            Expect::Drop(Counter::DroppedBadAddress),
        ));
    }
    let mut mcast6 = [0u8; 16];
    mcast6[0] = 0xff;
    mcast6[1] = 0x02;
    mcast6[15] = 1;
    cases.push(case(
        "multicast IPv6 source",
        Frame {
            src_v6: mcast6,
            ..v6.clone()
        }
        .build(),
        Expect::Drop(Counter::DroppedBadAddress),
    ));
    cases.push(case(
        "unspecified IPv6 source",
        Frame {
            src_v6: [0; 16],
            ..v6.clone()
        }
        .build(),
        Expect::Drop(Counter::DroppedBadAddress),
    ));
    let mut bcast_mac = v4.build();
    bcast_mac[..6].copy_from_slice(&[0xff; 6]);
    cases.push(case(
        "broadcast destination MAC",
        bcast_mac,
        Expect::Drop(Counter::DroppedBadAddress),
    ));
    cases.push(case(
        "VRRP where no group is configured: not the responder's",
        vrrp_v4(GUEST_V4, VRRP_ROUTER_ID, true),
        Expect::Pass(Counter::PassedNotServed),
    ));
    cases
}

/// The VRRP group of the fixtures' redundant VIP host, and one of its peers.
const VRRP_ROUTER_ID: u8 = 42;
const VRRP_PEER_V4: [u8; 4] = [169, 254, 7, 3];

/// A VRRPv3 advert for `router_id` from `src`, to the multicast group or to the VIP's MAC.
fn vrrp_v4(src: [u8; 4], router_id: u8, multicast: bool) -> Vec<u8> {
    use integration_tests::vrrp::{Advert, VRRP_GROUP, VRRP_GROUP_MAC};
    let (dst, dst_mac) = if multicast {
        (VRRP_GROUP, VRRP_GROUP_MAC)
    } else {
        (OTHER_V4.into(), VIP_MAC)
    };
    Advert {
        src: src.into(),
        dst,
        dst_mac,
        router_id,
        priority: 255,
        addresses: vec![CLOCK_V4.into()],
    }
    .frame(GUEST_MAC)
}

/// The same over IPv6 (next header 112, to ff02::12).
fn vrrp_v6(src: [u8; 16], router_id: u8) -> Vec<u8> {
    let mut group = [0u8; 16];
    group[0] = 0xff;
    group[1] = 0x02;
    group[15] = 0x12;
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(GUEST_MAC, [0x33, 0x33, 0, 0, 0, 0x12])
        .ipv6(src, group, 255)
        .write(
            &mut out,
            etherparse::IpNumber(112),
            &[0x31, router_id, 255, 1, 0, 100, 0, 0],
        )
        .unwrap();
    out
}

/// A redundant VIP host's responder: VRRP for its group from anyone but its peers is dropped
/// where guests are; its peers' and other groups' VRRP passes.
fn vrrp_cases() -> Vec<Case> {
    let mut truncated = vrrp_v4(GUEST_V4, VRRP_ROUTER_ID, true);
    // The IP header's end: no VRRP header at all (total length and checksum left as built;
    // the program must not read past the frame).
    truncated.truncate(14 + 20);
    vec![
        case(
            "VRRP for the group from a guest, multicast",
            vrrp_v4(GUEST_V4, VRRP_ROUTER_ID, true),
            Expect::Drop(Counter::DroppedVrrp),
        ),
        case(
            "VRRP for the group from a guest, to the VIP host's MAC",
            vrrp_v4(GUEST_V4, VRRP_ROUTER_ID, false),
            Expect::Drop(Counter::DroppedVrrp),
        ),
        case(
            "VRRP for the group from a guest over IPv6",
            vrrp_v6(GUEST_V6, VRRP_ROUTER_ID),
            Expect::Drop(Counter::DroppedVrrp),
        ),
        case(
            "VRRP cut after the IP header",
            truncated,
            Expect::Drop(Counter::DroppedVrrp),
        ),
        case(
            "VRRP for the group from a peer",
            vrrp_v4(VRRP_PEER_V4, VRRP_ROUTER_ID, true),
            Expect::Pass(Counter::PassedVrrpPeer),
        ),
        case(
            "VRRP for another group",
            vrrp_v4(GUEST_V4, VRRP_ROUTER_ID + 1, true),
            Expect::Pass(Counter::PassedNotServed),
        ),
        case(
            "NTP still answered",
            Frame::v4(v4_request()).build(),
            ANSWER,
        ),
    ]
}

#[test]
fn vrrp_for_the_group_is_dropped_unless_a_peer_sent_it() {
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    r.set_params(ntp_common::ServerParams {
        vrrp_router_id: VRRP_ROUTER_ID,
        ..ntp_common::ServerParams::DEFAULT
    })
    .unwrap();
    r.set_vrrp_peers(&[IpAddr::from(VRRP_PEER_V4)]).unwrap();
    let failures: Vec<String> = vrrp_cases()
        .iter()
        .flat_map(|c| run_case(&mut r, &anchor, c, false))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn counters(r: &Responder) -> Vec<u64> {
    r.counters().unwrap().into_iter().map(|(_, v)| v).collect()
}

/// Runs `case`, checks the verdict and that exactly the expected counters moved by one.
fn run_case(r: &mut Responder, anchor: &TimeAnchor, c: &Case, unsynchronized: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let before = counters(r);
    let mono_before = monotonic_now_ns().unwrap();
    let out = r.test_run(&c.frame).unwrap();
    let mono_after = monotonic_now_ns().unwrap();
    let after = counters(r);

    let (want_action, want_counter) = match c.expect {
        Expect::Reply { .. } if c.frame[12..14] == [0x86, 0xdd] || is_v6_under_vlan(&c.frame) => {
            (XDP_TX, Counter::AnsweredV6)
        }
        Expect::Reply { .. } => (XDP_TX, Counter::AnsweredV4),
        Expect::Pass(counter) => (XDP_PASS, counter),
        Expect::Drop(counter) => (XDP_DROP, counter),
        Expect::Kod(_, counter) => (XDP_TX, counter),
    };
    if out.action != want_action {
        failures.push(format!(
            "{}: action {} (want {want_action})",
            c.name, out.action
        ));
    }
    for &counter in Counter::ALL {
        let moved = after[counter as usize] - before[counter as usize];
        let want = (counter == want_counter
            || (counter == Counter::AnsweredUnsynchronized
                && matches!(c.expect, Expect::Reply { .. })
                && unsynchronized)) as u64;
        if moved != want {
            failures.push(format!(
                "{}: counter {} moved by {moved} (want {want})",
                c.name,
                counter.name()
            ));
        }
    }
    match c.expect {
        Expect::Reply { version, poll } => {
            if let Err(e) = check_reply(
                &c.frame,
                &out.frame,
                anchor,
                version,
                poll,
                unsynchronized,
                mono_before,
                mono_after,
            ) {
                failures.push(format!("{}: {e}", c.name));
            }
        }
        Expect::Kod(code, _) => {
            if let Err(e) = check_kod(&c.frame, &out.frame, code) {
                failures.push(format!("{}: {e}", c.name));
            }
        }
        // Passed and dropped frames are never modified.
        _ if out.frame != c.frame => failures.push(format!("{}: frame was modified", c.name)),
        _ => {}
    }
    failures
}

fn is_v6_under_vlan(frame: &[u8]) -> bool {
    matches!(frame[12..14], [0x81, 0x00] | [0x88, 0xa8]) && frame[16..18] == [0x86, 0xdd]
}

#[allow(clippy::too_many_arguments)]
fn check_reply(
    req: &[u8],
    rep: &[u8],
    a: &TimeAnchor,
    version: u8,
    poll: i8,
    unsynchronized: bool,
    mono_before: u64,
    mono_after: u64,
) -> Result<(), String> {
    let fail = |what: String| Err(what);
    if rep.len() != req.len() {
        return fail(format!(
            "reply is {} bytes, request {}",
            rep.len(),
            req.len()
        ));
    }
    if rep[0..6] != req[6..12] || rep[6..12] != req[0..6] {
        return fail("MAC addresses not swapped".into());
    }
    let vlan = matches!(req[12..14], [0x81, 0x00] | [0x88, 0xa8]);
    let l3 = if vlan { 18 } else { 14 };
    if rep[12..l3] != req[12..l3] {
        return fail("Ethernet type or VLAN tag changed".into());
    }
    let (l4, udp_check_ok) = if rep[l3] >> 4 == 4 {
        let ip = Ipv4HeaderSlice::from_slice(&rep[l3..]).map_err(|e| e.to_string())?;
        let orig = Ipv4HeaderSlice::from_slice(&req[l3..]).unwrap();
        if ip.source() != orig.destination() || ip.destination() != orig.source() {
            return fail("IPv4 addresses not swapped".into());
        }
        if ip.ttl() != REPLY_TTL {
            return fail(format!("TTL {}", ip.ttl()));
        }
        if ip.options() != orig.options()
            || ip.total_len() != orig.total_len()
            || ip.identification() != orig.identification()
        {
            return fail("IPv4 options, length or identification changed".into());
        }
        if ip.header_checksum() != ip.to_header().calc_header_checksum() {
            return fail("IPv4 header checksum wrong".into());
        }
        let l4 = l3 + ip.slice().len();
        let udp = UdpHeaderSlice::from_slice(&rep[l4..]).unwrap().to_header();
        let want = udp
            .calc_checksum_ipv4(&ip.to_header(), &rep[l4 + 8..])
            .unwrap();
        (l4, udp.checksum == want)
    } else {
        let ip = Ipv6HeaderSlice::from_slice(&rep[l3..]).map_err(|e| e.to_string())?;
        let orig = Ipv6HeaderSlice::from_slice(&req[l3..]).unwrap();
        if ip.source() != orig.destination() || ip.destination() != orig.source() {
            return fail("IPv6 addresses not swapped".into());
        }
        if ip.hop_limit() != REPLY_TTL {
            return fail(format!("hop limit {}", ip.hop_limit()));
        }
        if ip.payload_length() != orig.payload_length() {
            return fail("IPv6 payload length changed".into());
        }
        let l4 = l3 + 40;
        let udp = UdpHeaderSlice::from_slice(&rep[l4..]).unwrap().to_header();
        let want = udp
            .calc_checksum_ipv6(&ip.to_header(), &rep[l4 + 8..])
            .unwrap();
        (l4, udp.checksum == want && udp.checksum != 0)
    };
    if rep[l4..l4 + 2] != req[l4 + 2..l4 + 4] || rep[l4 + 2..l4 + 4] != req[l4..l4 + 2] {
        return fail("UDP ports not swapped".into());
    }
    if read_be16(rep, l4 + 4) != 56 {
        return fail("UDP length changed".into());
    }
    if !udp_check_ok {
        return fail("UDP checksum wrong".into());
    }
    let ntp = &rep[l4 + 8..];
    let (leap_want, stratum_want, refid_want) = if unsynchronized {
        (LEAP_UNSYNCHRONIZED, 0, KISS_INIT)
    } else {
        (a.leap, a.stratum, a.refid)
    };
    let checks: [(&str, u64, u64); 7] = [
        (
            "LI/VN/mode",
            ntp[0] as u64,
            li_vn_mode(leap_want, version, MODE_SERVER) as u64,
        ),
        ("stratum", ntp[1] as u64, stratum_want as u64),
        ("poll", ntp[2] as u64, poll as u8 as u64),
        ("precision", ntp[3] as u64, (-24i8) as u8 as u64),
        (
            "root delay",
            read_be32(ntp, 4) as u64,
            ns_to_short(a.root_delay_ns as u64) as u64,
        ),
        (
            "reference timestamp",
            read_be64(ntp, 16),
            ntp_ns_to_timestamp(a.reference_ntp_ns),
        ),
        ("origin timestamp", read_be64(ntp, 24), CLIENT_TRANSMIT),
    ];
    for (what, got, want) in checks {
        if got != want {
            return fail(format!("{what}: got {got:#x}, want {want:#x}"));
        }
    }
    if ntp[12..16] != refid_want {
        return fail(format!("refid {:?}", &ntp[12..16]));
    }
    let disp = read_be32(ntp, 8);
    let disp_lo = ns_to_short(a.root_dispersion_at(mono_before));
    let disp_hi = ns_to_short(a.root_dispersion_at(mono_after));
    if disp < disp_lo || disp > disp_hi {
        return fail(format!(
            "root dispersion {disp} outside {disp_lo}..={disp_hi}"
        ));
    }
    // Receive and transmit lie between the anchor's time before and after the run.
    let lo = ntp_ns_to_timestamp(a.ntp_ns_at(mono_before));
    let hi = ntp_ns_to_timestamp(a.ntp_ns_at(mono_after));
    let rx = read_be64(ntp, 32);
    let tx = read_be64(ntp, 40);
    if rx < lo || rx > hi {
        return fail(format!("receive {rx:#x} outside {lo:#x}..={hi:#x}"));
    }
    if tx <= rx || tx > hi + sub_precision_mask(-24) {
        return fail(format!("transmit {tx:#x} not in ({rx:#x}, {hi:#x}]"));
    }
    Ok(())
}

/// A kiss-o'-death: the request's size, addresses and ports turned around, checksums valid,
/// LI=3, stratum 0, the kiss code as refid, the request's transmit as origin.
fn check_kod(req: &[u8], rep: &[u8], code: [u8; 4]) -> Result<(), String> {
    if rep.len() != req.len() {
        return Err(format!("KoD is {} bytes, request {}", rep.len(), req.len()));
    }
    let l3 = 14;
    let l4 = if rep[l3] >> 4 == 4 {
        let ip = Ipv4HeaderSlice::from_slice(&rep[l3..]).map_err(|e| e.to_string())?;
        let orig = Ipv4HeaderSlice::from_slice(&req[l3..]).unwrap();
        if ip.source() != orig.destination() || ip.destination() != orig.source() {
            return Err("IPv4 addresses not swapped".into());
        }
        if ip.header_checksum() != ip.to_header().calc_header_checksum() {
            return Err("IPv4 header checksum wrong".into());
        }
        let l4 = l3 + ip.slice().len();
        let udp = UdpHeaderSlice::from_slice(&rep[l4..]).unwrap().to_header();
        if udp.checksum
            != udp
                .calc_checksum_ipv4(&ip.to_header(), &rep[l4 + 8..])
                .unwrap()
        {
            return Err("UDP checksum wrong".into());
        }
        l4
    } else {
        let ip = Ipv6HeaderSlice::from_slice(&rep[l3..]).map_err(|e| e.to_string())?;
        let orig = Ipv6HeaderSlice::from_slice(&req[l3..]).unwrap();
        if ip.source() != orig.destination() || ip.destination() != orig.source() {
            return Err("IPv6 addresses not swapped".into());
        }
        let l4 = l3 + 40;
        let udp = UdpHeaderSlice::from_slice(&rep[l4..]).unwrap().to_header();
        if udp.checksum
            != udp
                .calc_checksum_ipv6(&ip.to_header(), &rep[l4 + 8..])
                .unwrap()
        {
            return Err("UDP checksum wrong".into());
        }
        l4
    };
    if rep[l4..l4 + 2] != req[l4 + 2..l4 + 4] {
        return Err("UDP ports not swapped".into());
    }
    let ntp = &rep[l4 + 8..];
    if ntp[0] != li_vn_mode(LEAP_UNSYNCHRONIZED, version(req[l4 + 8]), MODE_SERVER) {
        return Err(format!("LI/VN/mode {:#x}", ntp[0]));
    }
    if ntp[1] != 0 || ntp[12..16] != code {
        return Err(format!("stratum {} refid {:?}", ntp[1], &ntp[12..16]));
    }
    if read_be64(ntp, 24) != read_be64(&req[l4 + 8..], 40) {
        return Err("origin is not the request's transmit timestamp".into());
    }
    if (ntp[2] as i8) < KOD_POLL {
        return Err(format!("poll {} below the KoD's {KOD_POLL}", ntp[2] as i8));
    }
    Ok(())
}

fn run_table(state: AnchorState, unsynchronized: bool, cases: &[Case]) {
    let (mut r, anchor) = responder(state).unwrap();
    let failures: Vec<String> = cases
        .iter()
        .flat_map(|c| run_case(&mut r, &anchor, c, unsynchronized))
        .collect();
    assert!(
        failures.is_empty(),
        "{} fixture failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fixture_table_with_a_synchronized_anchor() {
    let cases = table();
    assert!(cases.len() > 60, "the table lost cases: {}", cases.len());
    run_table(AnchorState::Synchronized, false, &cases);
}

#[test]
fn unsynchronized_anchor_answers_with_li3_stratum0() {
    let cases = vec![
        case("v4 over IPv4", Frame::v4(v4_request()).build(), ANSWER),
        case("v4 over IPv6", Frame::v6(v4_request()).build(), ANSWER),
    ];
    run_table(AnchorState::Unsynchronized, true, &cases);
}

#[test]
fn stale_anchor_answers_with_li3_stratum0() {
    let cases = vec![
        case("v4 over IPv4", Frame::v4(v4_request()).build(), ANSWER),
        case(
            "v3 over IPv6",
            Frame::v6(ntp_request(3, MODE_CLIENT, 6)).build(),
            Expect::Reply {
                version: 3,
                poll: 6,
            },
        ),
    ];
    run_table(AnchorState::Stale, true, &cases);
}

#[test]
fn no_anchor_means_no_answer() {
    let cases = vec![
        case(
            "v4 over IPv4",
            Frame::v4(v4_request()).build(),
            Expect::Drop(Counter::DroppedNoAnchor),
        ),
        case(
            "v4 over IPv6",
            Frame::v6(v4_request()).build(),
            Expect::Drop(Counter::DroppedNoAnchor),
        ),
    ];
    run_table(AnchorState::NeverPublished, false, &cases);
}

#[test]
fn the_table_covers_every_outcome() {
    // A counter no fixture reaches is a code path no fixture tests.
    let cases = table();
    let mut reached: Vec<Counter> = vec![Counter::AnsweredUnsynchronized, Counter::DroppedNoAnchor];
    let policy_cases = scenarios().into_iter().flat_map(|s| s.steps);
    let other_cases: Vec<Case> = policy_cases.chain(vrrp_cases()).collect();
    for c in cases.iter().chain(other_cases.iter()) {
        match c.expect {
            Expect::Pass(x) | Expect::Drop(x) | Expect::Kod(_, x) => reached.push(x),
            Expect::Reply { .. } => reached.extend([Counter::AnsweredV4, Counter::AnsweredV6]),
        }
    }
    for counter in Counter::ALL {
        assert!(
            reached.contains(counter),
            "no fixture reaches {}",
            counter.name()
        );
    }
}

#[test]
fn replies_never_exceed_requests_and_drops_never_answer_across_random_mutations() {
    // Random single-byte mutations of valid requests: whatever the program does, it never
    // answers with more bytes than it got, and every answer still verifies.
    let (mut r, _) = responder(AnchorState::Synchronized).unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let bases = [
        Frame::v4(v4_request()).build(),
        Frame::v6(v4_request()).build(),
    ];
    for i in 0..2000 {
        let mut f = bases[i % 2].clone();
        let n = next();
        let pos = (n as usize >> 8) % f.len();
        f[pos] ^= (n as u8) | 1;
        let out = r.test_run(&f).unwrap();
        assert!(out.frame.len() <= f.len());
        if out.action == XDP_TX {
            // A mutation the program accepted must still have produced valid checksums.
            let l3 = 14;
            if f[l3] >> 4 == 4 {
                let ip = Ipv4HeaderSlice::from_slice(&out.frame[l3..]).unwrap();
                assert_eq!(
                    ip.header_checksum(),
                    ip.to_header().calc_header_checksum(),
                    "mutation at {pos}"
                );
            }
        } else if out.action != XDP_PASS && out.action != XDP_DROP {
            panic!("unexpected action {} for mutation at {pos}", out.action);
        }
    }
}

// ---- Access list and rate limiting: sequences of requests against one policy. ----

const KOD_POLL: i8 = 7;

struct Scenario {
    name: &'static str,
    sizes: TableSizes,
    policy: ResponderPolicy,
    acl: Vec<AclEntry>,
    steps: Vec<Case>,
    /// The rate table must never hold more than this many sources.
    max_rate_sources: usize,
}

fn from_v4(src: [u8; 4]) -> Vec<u8> {
    Frame {
        src_v4: src,
        ..Frame::v4(v4_request())
    }
    .build()
}

fn from_v6(src: [u8; 16]) -> Vec<u8> {
    Frame {
        src_v6: src,
        ..Frame::v6(v4_request())
    }
    .build()
}

fn acl(entries: &[(&str, bool)]) -> Vec<AclEntry> {
    entries
        .iter()
        .map(|(p, allow)| AclEntry {
            prefix: p.parse().unwrap(),
            allow: *allow,
        })
        .collect()
}

fn limited(rate: f64, burst: u32, kod: bool) -> ResponderPolicy {
    let mut p = ResponderPolicy::OPEN.with_rate(rate, burst);
    p.kod_interval_ns = 3600 * NANOS_PER_SEC;
    p.kod_poll = KOD_POLL;
    if kod {
        p.flags |= POLICY_KOD_RATE;
    }
    p
}

fn scenarios() -> Vec<Scenario> {
    let rate_kod = Expect::Kod(KISS_RATE, Counter::KodRate);
    let rate_drop = Expect::Drop(Counter::DroppedRateLimited);
    let deny_kod = Expect::Kod(KISS_DENY, Counter::KodDeny);
    let denied = Expect::Drop(Counter::DroppedDenied);
    let other_guest = [169, 254, 8, 9];
    let mut same_64 = GUEST_V6;
    same_64[15] = 0x77;
    let mut other_64 = GUEST_V6;
    other_64[7] = 1;

    let mut out = Vec::new();
    // A burst of 4 per source, then one RATE KoD per interval, then silence; other sources
    // and other /64s keep their own buckets; addresses in one /64 share one.
    let mut steps = Vec::new();
    for i in 0..4 {
        steps.push(case(&format!("v4 burst {i}"), from_v4(GUEST_V4), ANSWER));
    }
    steps.push(case("v4 over the burst: KoD", from_v4(GUEST_V4), rate_kod));
    steps.push(case("v4 again: dropped", from_v4(GUEST_V4), rate_drop));
    steps.push(case("another v4 source", from_v4(other_guest), ANSWER));
    for i in 0..4 {
        steps.push(case(&format!("v6 burst {i}"), from_v6(GUEST_V6), ANSWER));
    }
    steps.push(case("v6, same /64: KoD", from_v6(same_64), rate_kod));
    steps.push(case("v6, same /64: dropped", from_v6(GUEST_V6), rate_drop));
    steps.push(case("v6, another /64", from_v6(other_64), ANSWER));
    out.push(Scenario {
        name: "rate limit with KoD",
        sizes: TableSizes::default(),
        policy: limited(0.001, 4, true),
        acl: vec![],
        steps,
        max_rate_sources: 4,
    });

    // Without KoD: limited requests are only dropped.
    let mut steps = vec![case("first", from_v4(GUEST_V4), ANSWER)];
    steps.push(case("second: dropped", from_v4(GUEST_V4), rate_drop));
    out.push(Scenario {
        name: "rate limit, silent",
        sizes: TableSizes::default(),
        policy: limited(0.001, 1, false),
        acl: vec![],
        steps,
        max_rate_sources: 1,
    });

    // A deny list with KoD: one DENY KoD, then silence. Others answered.
    let mut p = ResponderPolicy::OPEN;
    p.flags |= POLICY_ACL | POLICY_KOD_DENY;
    p.kod_interval_ns = 3600 * NANOS_PER_SEC;
    p.kod_poll = KOD_POLL;
    out.push(Scenario {
        name: "deny list with KoD",
        sizes: TableSizes::default(),
        policy: p,
        acl: acl(&[("169.254.7.0/24", false), ("fd00:ec2:7::/64", false)]),
        steps: vec![
            case("denied: KoD", from_v4(GUEST_V4), deny_kod),
            case("denied again: dropped", from_v4(GUEST_V4), denied),
            case("denied v6: KoD", from_v6(GUEST_V6), deny_kod),
            case("not listed", from_v4(other_guest), ANSWER),
            case("not listed v6", from_v6(other_64), ANSWER),
        ],
        max_rate_sources: 2,
    });

    // An allow list (everything else denied, silently) with a more specific deny inside it.
    let mut p = ResponderPolicy::OPEN;
    p.flags |= POLICY_ACL | POLICY_DEFAULT_DENY;
    out.push(Scenario {
        name: "allow list",
        sizes: TableSizes::default(),
        policy: p,
        acl: acl(&[
            ("169.254.0.0/16", true),
            ("169.254.7.2/32", false),
            ("fd00:ec2::/32", true),
        ]),
        steps: vec![
            case("allowed", from_v4(other_guest), ANSWER),
            case(
                "denied inside the allowed prefix",
                from_v4(GUEST_V4),
                denied,
            ),
            case("allowed v6", from_v6(GUEST_V6), ANSWER),
            case(
                "v6 outside the allow list",
                from_v6([0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
                denied,
            ),
            case(
                "v4 outside the allow list",
                Frame {
                    src_v4: [198, 51, 100, 7],
                    ..Frame::v4(v4_request())
                }
                .build(),
                denied,
            ),
        ],
        max_rate_sources: 0,
    });

    // Requests with extension fields are admitted in the kernel before they are passed up:
    // a denied source's padded request is dropped here, and one over its rate too; one with
    // tokens left is passed without taking one (the userspace path takes it).
    let padded = |src: [u8; 4]| {
        let mut payload = v4_request();
        payload.extend_from_slice(&[0u8; 20]);
        Frame {
            src_v4: src,
            ..Frame::v4(payload)
        }
        .build()
    };
    let mut p = limited(0.001, 1, false);
    p.flags |= POLICY_ACL;
    out.push(Scenario {
        name: "extension fields are admitted before they are passed",
        sizes: TableSizes::default(),
        policy: p,
        acl: acl(&[("169.254.7.0/24", false)]),
        steps: vec![
            case("denied, padded", padded(GUEST_V4), denied),
            case(
                "padded, tokens left",
                padded(other_guest),
                Expect::Pass(Counter::PassedExtension),
            ),
            case(
                "padded again: still a token",
                padded(other_guest),
                Expect::Pass(Counter::PassedExtension),
            ),
            case("plain takes the token", from_v4(other_guest), ANSWER),
            case("padded, over the rate", padded(other_guest), rate_drop),
        ],
        max_rate_sources: 1,
    });

    // VLANs: the same address on two VLANs is two sources.
    let on_vlan = |id: u16| {
        Frame {
            vlan: Some(Vlan::Dot1q(id)),
            ..Frame::v4(v4_request())
        }
        .build()
    };
    out.push(Scenario {
        name: "VLANs keep their own buckets",
        sizes: TableSizes::default(),
        policy: limited(0.001, 1, false),
        acl: vec![],
        steps: vec![
            case("vlan 10", on_vlan(10), ANSWER),
            case("vlan 10 again: limited", on_vlan(10), rate_drop),
            case("vlan 20, same address", on_vlan(20), ANSWER),
            case("untagged, same address", from_v4(GUEST_V4), ANSWER),
        ],
        max_rate_sources: 3,
    });

    // A guest over its rate cannot get a fresh bucket by tagging its requests: an unlisted
    // VLAN is never answered, whichever tag type carries it.
    let tagged_v4 = |vlan: Vlan| {
        Frame {
            vlan: Some(vlan),
            ..Frame::v4(v4_request())
        }
        .build()
    };
    let unlisted = Expect::Drop(Counter::DroppedVlan);
    out.push(Scenario {
        name: "an unlisted tag buys no bucket",
        sizes: TableSizes::default(),
        policy: limited(0.001, 1, false),
        acl: vec![],
        steps: vec![
            case("untagged", from_v4(GUEST_V4), ANSWER),
            case("untagged again: limited", from_v4(GUEST_V4), rate_drop),
            case("802.1Q 300", tagged_v4(Vlan::Dot1q(300)), unlisted),
            case("802.1Q 301", tagged_v4(Vlan::Dot1q(301)), unlisted),
            case("802.1ad 302", tagged_v4(Vlan::Dot1ad(302)), unlisted),
            case(
                "priority tag: untagged",
                tagged_v4(Vlan::Dot1q(0)),
                rate_drop,
            ),
            case(
                "listed VLAN 20: its own tenant",
                tagged_v4(Vlan::Dot1q(20)),
                ANSWER,
            ),
        ],
        max_rate_sources: 2,
    });

    // The IPv6 aggregation prefix is a setting: with /48, two /64s of one /48 share.
    let mut p = limited(0.001, 1, false);
    p.v6_prefix_len = 48;
    out.push(Scenario {
        name: "IPv6 aggregated per /48",
        sizes: TableSizes::default(),
        policy: p,
        acl: vec![],
        steps: vec![
            case("one /64", from_v6(GUEST_V6), ANSWER),
            case(
                "another /64 of the /48: limited",
                from_v6(other_64),
                rate_drop,
            ),
        ],
        max_rate_sources: 1,
    });

    // A spoofed-source flood: every source's first excess request would earn a KoD; the
    // global budget (here one, and no refill to speak of) lets one through.
    let p = limited(0.001, 1, true).with_global_kod_cap(1e-6, 1);
    let mut steps = Vec::new();
    for i in 0..5u8 {
        let src = [169, 254, 50, i + 1];
        steps.push(case(&format!("spoofed {i}"), from_v4(src), ANSWER));
        let over = if i == 0 { rate_kod } else { rate_drop };
        steps.push(case(&format!("spoofed {i} over"), from_v4(src), over));
    }
    out.push(Scenario {
        name: "global KoD budget",
        sizes: TableSizes::default(),
        policy: p,
        acl: vec![],
        steps,
        max_rate_sources: 5,
    });

    // More sources than the table holds: every new source is answered (the table never fails
    // closed), it never grows past its size, and a limited source that was evicted is
    // forgotten, so it is answered again (it never fails open for the ones it still holds).
    let mut steps = vec![
        case("A", from_v4(GUEST_V4), ANSWER),
        case("A again: limited", from_v4(GUEST_V4), rate_kod),
        case("A held: dropped", from_v4(GUEST_V4), rate_drop),
    ];
    // The kernel's LRU gives a second chance to entries used since they were last looked
    // at: sources that come back (like the flooder) outlive one-shot ones, so the crowd
    // here comes back too, and the oldest of all (A) goes.
    for i in 0..1000u32 {
        let src = [169, 254, 100 + (i / 250) as u8, (i % 250) as u8 + 1];
        steps.push(case(&format!("source {i}"), from_v4(src), ANSWER));
        steps.push(case(&format!("source {i} again"), from_v4(src), rate_kod));
    }
    steps.push(case("A after eviction", from_v4(GUEST_V4), ANSWER));
    // Forgotten entirely: its next excess request gets a KoD again.
    steps.push(case("A limited again", from_v4(GUEST_V4), rate_kod));
    out.push(Scenario {
        name: "LRU eviction",
        sizes: TableSizes {
            rate_sources: 64,
            guests: 64,
        },
        policy: limited(0.001, 1, true),
        acl: vec![],
        steps,
        max_rate_sources: 64,
    });
    out
}

#[test]
fn access_list_and_rate_limit_scenarios() {
    // The global KoD budget is per CPU: every run on one CPU.
    let mut cpu0 = nix::sched::CpuSet::new();
    cpu0.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0).unwrap();
    let mut failures = Vec::new();
    for s in scenarios() {
        let (mut r, anchor) = responder_sized(AnchorState::Synchronized, s.sizes).unwrap();
        r.set_policy(s.policy).unwrap();
        r.set_access_list(&s.acl).unwrap();
        let observer = r.observer().unwrap();
        for c in &s.steps {
            for f in run_case(&mut r, &anchor, c, false) {
                failures.push(format!("{}: {f}", s.name));
            }
        }
        let held = observer.rate_sources();
        if held > s.max_rate_sources {
            failures.push(format!(
                "{}: the rate table holds {held} sources (at most {})",
                s.name, s.max_rate_sources
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs `cases` in order on `r`; the failures, each prefixed with `what`.
fn run_cases(r: &mut Responder, anchor: &TimeAnchor, what: &str, cases: &[Case]) -> Vec<String> {
    cases
        .iter()
        .flat_map(|c| run_case(r, anchor, c, false))
        .map(|f| format!("{what}: {f}"))
        .collect()
}

#[test]
fn tagged_requests_are_answered_only_on_the_configured_vlans() {
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    // What a config without `access.vlans` writes: no VLAN listed.
    let mut spec = AdmissionSpec::open();
    r.apply_admission(&spec).unwrap();
    let on = |vlan: Vlan, frame: Frame| {
        Frame {
            vlan: Some(vlan),
            ..frame
        }
        .build()
    };
    let (v4, v6) = (Frame::v4(v4_request()), Frame::v6(v4_request()));
    let unlisted = Expect::Drop(Counter::DroppedVlan);
    let untagged = [
        case("untagged IPv4", v4.build(), ANSWER),
        case("untagged IPv6", v6.build(), ANSWER),
    ];
    let mut failures = run_cases(&mut r, &anchor, "no VLAN listed", &untagged);
    failures.extend(run_cases(
        &mut r,
        &anchor,
        "no VLAN listed",
        &[
            case("802.1Q 100", on(Vlan::Dot1q(100), v4.clone()), unlisted),
            case("802.1ad 100", on(Vlan::Dot1ad(100), v6.clone()), unlisted),
        ],
    ));
    // Listed and unlisted live, through the writer the fleet agent's in-place change uses.
    for (listed, other) in [(200u16, 100u16), (100, 200)] {
        spec.vlans = vec![listed];
        r.admission_writer().unwrap().apply(&spec).unwrap();
        let what = format!("VLAN {listed} listed");
        failures.extend(run_cases(&mut r, &anchor, &what, &untagged));
        failures.extend(run_cases(
            &mut r,
            &anchor,
            &what,
            &[
                case("802.1Q listed", on(Vlan::Dot1q(listed), v4.clone()), ANSWER),
                case(
                    "802.1ad listed",
                    on(Vlan::Dot1ad(listed), v6.clone()),
                    ANSWER,
                ),
                case("802.1Q other", on(Vlan::Dot1q(other), v4.clone()), unlisted),
                case(
                    "802.1ad other",
                    on(Vlan::Dot1ad(other), v6.clone()),
                    unlisted,
                ),
            ],
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The served addresses and own MACs live in one array entry per ifindex slot: an interface
/// whose ifindex shares the slot never lends its MAC to another, and each family's addresses
/// are served exactly as the daemon last wrote them, through either handle.
#[test]
fn served_addresses_and_own_macs_are_matched_per_interface() {
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    let (v4, v6) = (
        Frame::v4(v4_request()).build(),
        Frame::v6(v4_request()).build(),
    );
    let mut to_other_mac = v4.clone();
    let other_mac = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x77];
    to_other_mac[0..6].copy_from_slice(&other_mac);
    let other_host = Expect::Pass(Counter::PassedOtherHost);
    let not_served = Expect::Pass(Counter::PassedNotServed);
    let mut failures = Vec::new();
    // VIP_MAC belongs to ifindex 257 (the loopback's slot, another namespace's interface);
    // the loopback (ifindex 1, where TEST_RUN delivers) owns another MAC.
    r.set_own_macs(&[(VIP_MAC, 257), (other_mac, 1)]).unwrap();
    failures.extend(run_cases(
        &mut r,
        &anchor,
        "VIP_MAC on ifindex 257",
        &[
            case("to VIP_MAC", v4.clone(), other_host),
            case("to the loopback's MAC", to_other_mac.clone(), ANSWER),
        ],
    ));
    r.own_macs().unwrap().set(&[(VIP_MAC, 1)]).unwrap();
    failures.extend(run_cases(
        &mut r,
        &anchor,
        "VIP_MAC on ifindex 1",
        &[
            case("to VIP_MAC", v4.clone(), ANSWER),
            case("to a MAC no longer own", to_other_mac, other_host),
        ],
    ));
    r.set_served_addresses(&[IpAddr::from(CLOCK_V6)]).unwrap();
    failures.extend(run_cases(
        &mut r,
        &anchor,
        "IPv6 served",
        &[
            case("IPv4", v4.clone(), not_served),
            case("IPv6", v6.clone(), ANSWER),
        ],
    ));
    let mut served = r.served_addrs().unwrap();
    served.set(&[]).unwrap();
    failures.extend(run_cases(
        &mut r,
        &anchor,
        "nothing served",
        &[
            case("IPv4", v4.clone(), not_served),
            case("IPv6", v6.clone(), not_served),
        ],
    ));
    // The addresses after several others of each family.
    let mut many: Vec<IpAddr> = (1..10u8)
        .flat_map(|i| {
            let mut v6 = CLOCK_V6;
            v6[15] ^= i;
            [IpAddr::from([169, 254, 200, i]), IpAddr::from(v6)]
        })
        .collect();
    many.extend([IpAddr::from(CLOCK_V4), IpAddr::from(CLOCK_V6)]);
    served.set(&many).unwrap();
    failures.extend(run_cases(
        &mut r,
        &anchor,
        "ten of each served",
        &[case("IPv4", v4, ANSWER), case("IPv6", v6, ANSWER)],
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let too_many: Vec<IpAddr> = (0..=ntp_common::maps::SERVED_V4_MAX as u8)
        .map(|i| IpAddr::from([169, 254, 201, i]))
        .collect();
    let err = r.set_served_addresses(&too_many).unwrap_err();
    assert!(format!("{err:#}").contains("at most"), "{err:#}");
}

#[test]
fn every_state_of_an_access_list_rewrite_answers_as_the_old_or_the_new_list() {
    // Guests `allowed` and GUEST_V4/GUEST_V6 (denied) are so in both lists, but one list
    // allows (what matches nothing is denied) and the other only denies: the default flips.
    let allow_list = acl(&[
        ("169.254.7.0/24", true),
        ("169.254.7.0/30", false),
        ("fd00:ec2::/32", true),
        ("fd00:ec2:7::/48", false),
    ]);
    let deny_list = acl(&[("169.254.7.2/32", false), ("fd00:ec2:7::/64", false)]);
    let allowed_v4 = [169, 254, 7, 9];
    let mut allowed_v6 = GUEST_V6;
    allowed_v6[5] = 8;
    let denied = Expect::Drop(Counter::DroppedDenied);
    let guests = [
        case("allowed guest", from_v4(allowed_v4), ANSWER),
        case("allowed guest v6", from_v6(allowed_v6), ANSWER),
        case("denied guest", from_v4(GUEST_V4), denied),
        case("denied guest v6", from_v6(GUEST_V6), denied),
    ];
    let policy = |list: &[AclEntry]| {
        let mut p = ResponderPolicy::OPEN;
        p.flags |= ntp_user::responder::admission::acl_policy_flags(list);
        p
    };
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    let mut failures = Vec::new();
    for (old, new) in [(&allow_list, &deny_list), (&deny_list, &allow_list)] {
        r.set_access_list(old).unwrap();
        let current = acl_contents(old);
        let states = AclRewrite::plan(&current, &acl_contents(new)).states(&current);
        assert!(states.len() >= 4, "{states:?}");
        for (step, state) in states.iter().enumerate() {
            // The trie exactly as the rewrite leaves it after `step` writes (it holds ::/0,
            // so nothing is added to it), read with either list's policy.
            let entries: Vec<AclEntry> = state
                .iter()
                .map(|(k, v)| AclEntry {
                    prefix: k.prefix(),
                    allow: *v == ACL_ALLOW,
                })
                .collect();
            r.set_access_list(&entries).unwrap();
            for (which, p) in [("old", policy(old)), ("new", policy(new))] {
                r.set_policy(p).unwrap();
                let what = format!("after {step} writes, {which} policy");
                failures.extend(run_cases(&mut r, &anchor, &what, &guests));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn guest_clocks_are_recorded_from_transmit_timestamps() {
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    let mut p = ResponderPolicy::OPEN;
    p.flags |= POLICY_GUEST_CLOCKS;
    r.set_policy(p).unwrap();
    let observer = r.observer().unwrap();

    // A guest whose clock is 2 s ahead of the served time, twice.
    let ahead = |mono: u64| {
        let t = ntp_ns_to_timestamp(anchor.ntp_ns_at(mono) + 2 * NANOS_PER_SEC);
        let mut req = v4_request();
        req[40..48].copy_from_slice(&t.to_be_bytes());
        req
    };
    for _ in 0..2 {
        let now = monotonic_now_ns().unwrap();
        let out = r.test_run(&Frame::v4(ahead(now)).build()).unwrap();
        assert_eq!(out.action, XDP_TX);
    }
    // A guest that sends a zero transmit timestamp tells nothing about its clock.
    let mut zero = v4_request();
    zero[40..48].fill(0);
    let silent = [169, 254, 9, 9];
    let out = r
        .test_run(
            &Frame {
                src_v4: silent,
                ..Frame::v4(zero)
            }
            .build(),
        )
        .unwrap();
    assert_eq!(out.action, XDP_TX);

    let records = observer.guest_clocks();
    assert_eq!(records.len(), 1, "{records:?}");
    let (addr, _vlan, g) = records[0];
    assert_eq!(addr, IpAddr::from(GUEST_V4));
    assert_eq!(g.requests, 2);
    // 2 s ahead, less the few microseconds between building the request and the run.
    let offset = ntp_common::policy::fixed_to_ns(g.offset_fixed);
    assert!(
        (1_990_000_000..=2_000_000_000).contains(&offset),
        "offset {offset} ns"
    );
    let now = monotonic_now_ns().unwrap();
    assert!(g.last_seen_ns <= now && now - g.last_seen_ns < 10 * NANOS_PER_SEC);
}

/// With rate limiting on, a guest's clock is recorded in its rate entry (one lookup per
/// request): one entry per source for both, and an IPv6 guest's record is its /64's, under
/// the address of its last request.
#[test]
fn guest_clocks_share_the_rate_entry_of_their_source() {
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    // A burst of two, then nothing for 1000 s.
    let mut p = ResponderPolicy::OPEN.with_rate(0.001, 2);
    p.flags |= POLICY_GUEST_CLOCKS;
    r.set_policy(p).unwrap();
    let observer = r.observer().unwrap();
    let ahead = || {
        let now = monotonic_now_ns().unwrap();
        let t = ntp_ns_to_timestamp(anchor.ntp_ns_at(now) + 2 * NANOS_PER_SEC);
        let mut req = v4_request();
        req[40..48].copy_from_slice(&t.to_be_bytes());
        req
    };
    let mut second_v6 = GUEST_V6;
    second_v6[15] = 9;
    for frame in [
        Frame::v4(ahead()),
        Frame::v4(ahead()),
        Frame::v6(ahead()),
        Frame {
            src_v6: second_v6,
            ..Frame::v6(ahead())
        },
    ] {
        assert_eq!(r.test_run(&frame.build()).unwrap().action, XDP_TX);
    }
    // The rate state is in the same entries: the v4 guest's burst is spent, and the
    // refused request is not recorded.
    let out = r.test_run(&Frame::v4(ahead()).build()).unwrap();
    assert_eq!(out.action, XDP_DROP);
    let mut records = observer.guest_clocks();
    records.sort_by_key(|(addr, _, _)| *addr);
    let seen: Vec<(IpAddr, u64)> = records.iter().map(|(a, _, g)| (*a, g.requests)).collect();
    assert_eq!(
        seen,
        [(IpAddr::from(GUEST_V4), 2), (IpAddr::from(second_v6), 2)],
        "{records:?}"
    );
    assert_eq!(observer.rate_sources(), 2);
}

/// A spoofed-source flood on every CPU, through a table far too small for its sources (each
/// insert evicts another source's entry, which the LRU table hands out again at once), while
/// a few resident sources per CPU keep being answered (their lookups find their entries, which
/// the flood recycles): every guest clock record still lands in the entry of the source that
/// sent it. Each source's requests carry its own clock error (its last address byte × 10 s,
/// plus 5 s), so a record written into an entry recycled for another source shows as an
/// address or an offset that is not the entry's.
#[test]
fn guest_records_stay_in_their_own_sources_entry_under_a_spoofed_flood() {
    const RESIDENTS: u8 = 4;
    const SOURCES_PER_CPU: u8 = 200;
    const ROUNDS: usize = 50;
    let tiny = TableSizes {
        rate_sources: 16,
        guests: 16,
    };
    let (mut r, anchor) = responder_sized(AnchorState::Synchronized, tiny).unwrap();
    let mut p = ResponderPolicy::OPEN.with_rate(1e9, 1_000_000);
    p.flags |= POLICY_GUEST_CLOCKS | POLICY_KOD_RATE;
    p.kod_interval_ns = 10 * NANOS_PER_SEC;
    r.set_policy(p).unwrap();
    let offset_of = |last: u8| (last as u64 * 10 + 5) * NANOS_PER_SEC;
    let cpus = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    let now = monotonic_now_ns().unwrap();
    let request = |cpu: usize, last: u8| {
        let t = ntp_ns_to_timestamp(anchor.ntp_ns_at(now) + offset_of(last));
        let mut req = v4_request();
        req[40..48].copy_from_slice(&t.to_be_bytes());
        Frame {
            src_v4: [169, 254, 100 + cpu as u8, last],
            ..Frame::v4(req)
        }
        .build()
    };
    // Per CPU: a resident's request, then a new source's, and so on.
    let frames: Vec<Vec<Vec<u8>>> = (0..cpus)
        .map(|cpu| {
            (RESIDENTS + 1..=SOURCES_PER_CPU)
                .flat_map(|last| [request(cpu, 1 + last % RESIDENTS), request(cpu, last)])
                .collect()
        })
        .collect();
    let prog: &aya::programs::Xdp = r.program(ntp_user::responder::RESPONDER_PROGRAM).unwrap();
    std::thread::scope(|scope| {
        for mine in &frames {
            scope.spawn(move || {
                let mut out = vec![0u8; 512];
                for _ in 0..ROUNDS {
                    for frame in mine {
                        let run = aya::programs::TestRun::test_run(
                            prog,
                            aya::programs::TestRunOptions {
                                data_in: Some(frame),
                                data_out: Some(&mut out),
                                repeat: 1,
                                ..Default::default()
                            },
                        )
                        .unwrap();
                        assert_eq!(run.return_value, XDP_TX);
                    }
                }
            });
        }
    });
    // Each record's offset is its source's less the time since the frames were built.
    let elapsed = (monotonic_now_ns().unwrap() - now) as i64;
    let table: aya::maps::HashMap<_, SourceKey, SourceRecord> =
        aya::maps::HashMap::try_from(r.reopen_map(ntp_common::maps::SOURCES).unwrap()).unwrap();
    let mut records = 0;
    for entry in table.iter() {
        let (key, record) = entry.unwrap();
        let Some(guest) = record.guest_clock() else {
            continue;
        };
        records += 1;
        assert_eq!(
            record.guest_addr, key.addr,
            "the entry of {key:?} holds another source's record: {record:?}"
        );
        let want = offset_of(key.addr[15]) as i64;
        let got = ntp_common::policy::fixed_to_ns(guest.offset_fixed);
        assert!(
            got <= want && want - got <= elapsed,
            "the entry of {key:?} holds an offset of {got} ns, its source sent {want} ns"
        );
    }
    assert!(records > 0, "no guest record survived the flood");
}

/// The transmit timestamp's bits below the precision are random (RFC 5905 §6), from the
/// responder's own per-CPU generator: they vary from reply to reply.
#[test]
fn the_bits_below_the_precision_vary_between_replies() {
    let (mut r, _) = responder(AnchorState::Synchronized).unwrap();
    let frame = Frame::v4(v4_request()).build();
    // Untagged IPv4: the NTP header at 42, its transmit timestamp 40 bytes in.
    let low: std::collections::HashSet<u64> = (0..64)
        .map(|_| {
            let out = r.test_run(&frame).unwrap();
            assert_eq!(out.action, XDP_TX);
            read_be64(&out.frame, 82) & sub_precision_mask(-24)
        })
        .collect();
    // 64 draws of 8 bits: ~56 distinct values expected, fewer than 32 one time in 10^15.
    assert!(low.len() >= 32, "{} distinct low bits", low.len());
}

#[test]
fn truncated_and_garbled_frames_are_never_answered_wrongly() {
    let (mut r, _) = responder(AnchorState::Synchronized).unwrap();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for base in [
        Frame::v4(v4_request()).build(),
        Frame::v6(v4_request()).build(),
    ] {
        // Every truncation: the lengths in the headers no longer hold, so never an answer.
        // (The kernel refuses test frames shorter than an Ethernet header.)
        for len in 14..base.len() {
            let out = r.test_run(&base[..len]).unwrap();
            assert_ne!(out.action, XDP_TX, "answered a frame cut to {len} bytes");
        }
        // Several bytes garbled at once, anywhere after the Ethernet header: whatever is
        // answered is exactly as long as the request and echoes its transmit timestamp.
        for _ in 0..3000 {
            let mut f = base.clone();
            for _ in 0..1 + next() % 6 {
                let n = next();
                let pos = 14 + (n as usize >> 8) % (f.len() - 14);
                f[pos] = n as u8;
            }
            let out = r.test_run(&f).unwrap();
            if out.action == XDP_TX {
                assert_eq!(out.frame.len(), f.len());
                let l4 = f.len() - 48;
                assert_eq!(out.frame[l4 + 24..l4 + 32], f[l4 + 40..l4 + 48]);
                assert_eq!(mode(out.frame[l4]), MODE_SERVER);
            } else {
                assert!(out.action == XDP_PASS || out.action == XDP_DROP);
            }
        }
    }
}

/// Removes a test's pin directory and releases bpffs if a daemon of ours mounted it.
struct PinDirGuard(std::path::PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        if let Ok(_lock) = ntp_user::responder::bpffs_lock() {
            let _ = ntp_user::responder::release_bpffs();
        }
        let _ = std::fs::remove_dir("/run/ntp-xdp");
    }
}

/// Maps pinned by a build with another map layout (its fingerprint directory) are never
/// adopted: they are retired and the daemon starts with fresh ones, rather than serve misread
/// anchors or refuse to start. Maps of this build's layout are adopted, with the anchor and
/// its generation.
#[test]
fn pins_of_another_layout_are_retired_and_ours_adopted() -> Result<()> {
    let instance = format!("ntv-layout-{}", std::process::id());
    let dir = ntp_user::responder::pin_dir(&instance);
    let _guard = PinDirGuard(dir.clone());
    // This build's layout: pinned, published, then adopted by a second load.
    let (anchor, generation) = {
        let mut r = Responder::load_pinned(&dir, TableSizes::default())?;
        let (_, anchor) = responder(AnchorState::Synchronized)?;
        let p = r.publish_anchor(anchor)?;
        (anchor, p.generation)
    };
    let mut again = Responder::load_pinned(&dir, TableSizes::default())?;
    assert_eq!(again.current_anchor(), Some(anchor));
    assert_eq!(again.publish_anchor(anchor)?.generation, generation + 1);
    drop(again);
    // Another build's maps beside ours (an upgrade that changed a map's layout): retired, so
    // the new build starts rather than leaving the old program to serve a frozen anchor;
    // ours are adopted as before.
    let foreign = dir.join("maps-00000000deadbeef");
    std::fs::create_dir(&foreign)?;
    let retired = ntp_user::responder::pins::retire_other_layouts(&dir)?;
    assert_eq!(retired, vec![foreign.clone()]);
    assert!(!foreign.exists());
    std::fs::create_dir(&foreign)?;
    let mut upgraded = Responder::load_pinned(&dir, TableSizes::default())?;
    assert!(!foreign.exists(), "maps of another layout were left");
    assert_eq!(upgraded.current_anchor(), Some(anchor));
    assert_eq!(upgraded.publish_anchor(anchor)?.generation, generation + 2);
    drop(upgraded);
    // Only this build's maps as another build left them: nothing of theirs is read.
    let ours = ntp_user::responder::pins::map_dir(&dir);
    std::fs::rename(&ours, &foreign)?;
    let fresh = Responder::load_pinned(&dir, TableSizes::default())?;
    assert!(!foreign.exists());
    assert_eq!(
        fresh.current_anchor(),
        None,
        "an anchor of another layout was adopted"
    );
    Ok(())
}

/// The NTP header of a reply frame (IPv4, no options).
fn reply_header(frame: &[u8]) -> ntp_common::packet::NtpHeader {
    ntp_common::packet::NtpHeader::parse(&frame[42..]).expect("an NTP reply")
}

/// A model (here: the host clock in host-clock mode) that goes back a little is held: served
/// time never goes backwards and stays synchronized. One that goes back far (an hour) is not
/// held for the 83 days 500 ppm would take: served time steps back, replies say LI=3 for a
/// while, and the publication says so (the daemon logs an error).
#[test]
fn a_small_step_back_is_held_and_a_large_one_is_stepped_with_li3() {
    let (mut r, anchor) = responder(AnchorState::Synchronized).unwrap();
    let frame = Frame::v4(v4_request()).build();
    let before = r.test_run(&frame).unwrap();
    let t_before = reply_header(&before.frame).transmit_ts;

    // 10 ms back: held.
    let mut small = anchor;
    small.mono_ns = monotonic_now_ns().unwrap();
    small.ntp_ns = anchor.ntp_ns_at(small.mono_ns) - 10_000_000;
    let p = r.publish_anchor(small).unwrap();
    assert!(
        p.held_back_ns >= 9_000_000 && p.stepped_back_ns == 0,
        "{p:?}"
    );
    let h = reply_header(&r.test_run(&frame).unwrap().frame);
    assert_eq!(h.leap, LEAP_NONE);
    assert!(h.transmit_ts >= t_before, "served time went backwards");

    // An hour back: stepped, LI=3.
    let mut large = anchor;
    large.mono_ns = monotonic_now_ns().unwrap();
    large.ntp_ns = anchor.ntp_ns_at(large.mono_ns) - 3600 * NANOS_PER_SEC;
    let p = r.publish_anchor(large).unwrap();
    assert!(
        p.stepped_back_ns > 3599 * NANOS_PER_SEC && p.held_back_ns == 0,
        "{p:?}"
    );
    let h = reply_header(&r.test_run(&frame).unwrap().frame);
    assert_eq!(
        h.leap, LEAP_UNSYNCHRONIZED,
        "a step back must not be served as synchronized"
    );
    let served = ntp_common::time::timestamp_to_ntp_ns(h.transmit_ts, anchor.ntp_ns);
    assert!(
        served < anchor.ntp_ns_at(large.mono_ns) - 3590 * NANOS_PER_SEC,
        "served time was held instead of stepped"
    );
    // Anchors published within the next minutes stay LI=3.
    let mut next = large;
    next.mono_ns += NANOS_PER_SEC;
    next.ntp_ns += NANOS_PER_SEC;
    r.publish_anchor(next).unwrap();
    let h = reply_header(&r.test_run(&frame).unwrap().frame);
    assert_eq!(h.leap, LEAP_UNSYNCHRONIZED);
}
