//! Parse a frame into one family-agnostic description of an NTP client request (Katran's
//! way): Ethernet → (one VLAN tag) → IPv4/IPv6 → UDP → NTP header. Every check that decides
//! whether a frame is ours and well-formed happens here; what comes out is either a
//! [`Request`] the rest of the program handles the same way for both families, or the verdict.

use ntp_common::{
    checksum::{le_words_sum, pseudo_v4, pseudo_v6, udp_request_checksum_ok, verifies},
    maps::Attachment,
    policy::v6_source_is_bogus,
    reply::request_rejection,
    wire::*,
    Counter,
};

use crate::maps::{VLANS, VRRP_PEERS};
use crate::packet::{be16, Packet};
use crate::program::{drop, pass, Verdict};

/// A client request, as far as answering it is concerned.
pub struct Request {
    pub v4: bool,
    /// Offsets of the IP header and of the UDP header.
    pub l3: usize,
    pub l4: usize,
    /// Source address (IPv4 as ::ffff:a.b.c.d).
    pub src: [u8; 16],
    /// VLAN ID of the frame's tag (0: untagged).
    pub vlan: u16,
    /// Sum of the UDP pseudo-header (unchanged when the addresses swap).
    pub pseudo: u32,
    /// Extension fields or a MAC follow the 48-byte header (NTS, symmetric keys): answered by
    /// the userspace path once admitted.
    pub extended: bool,
}

#[inline(always)]
pub fn parse(
    pkt: &Packet,
    ifindex: u32,
    here: &Attachment,
    vrrp_router_id: u8,
) -> Result<Request, Verdict> {
    let Some(eth) = pkt.bytes::<ETH_HEADER_LEN>(0) else {
        return Err(pass(Counter::PassedNotIp));
    };
    let mut ethertype = be16(eth[12], eth[13]);
    let mut l3 = ETH_HEADER_LEN;
    let mut vlan = 0u16;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        // One tag: TCI, then the inner ethertype. A VLAN ID of 0 only carries a priority: the
        // frame is treated as untagged (it shares the untagged rate key).
        let Some(tag) = pkt.bytes::<VLAN_TAG_LEN>(ETH_HEADER_LEN) else {
            return Err(pass(Counter::PassedNotIp));
        };
        vlan = be16(tag[0], tag[1]) & 0x0fff;
        ethertype = be16(tag[2], tag[3]);
        l3 = ETH_HEADER_LEN + VLAN_TAG_LEN;
    }
    let mut req = match ethertype {
        ETH_P_IPV4 => parse_ipv4(pkt, l3, here, vrrp_router_id)?,
        ETH_P_IPV6 => parse_ipv6(pkt, l3, here, vrrp_router_id)?,
        _ => return Err(pass(Counter::PassedNotIp)),
    };
    req.vlan = vlan;
    check_udp_and_ntp(pkt, &mut req)?;
    check_ethernet(pkt, ifindex, here)?;
    // The VLAN is part of a source's rate key: a guest free to pick tags would get a bucket
    // per tag. Only the configured VLANs are answered; a request on another is dropped, not
    // passed: a stack with a device for that VLAN would hand it to the userspace path
    // untagged. Checked last, so that whatever is not an NTP request for us passes as it did.
    if vlan != 0 && VLANS.get_ptr(&vlan).is_none() {
        return Err(drop(Counter::DroppedVlan));
    }
    Ok(req)
}

/// VRRP for this host's group arriving where the responder serves: keepalived's only when it
/// comes from a configured peer (a shared network), never a guest's, whatever it is addressed
/// to. Other groups' VRRP is not ours to judge (None).
#[inline(always)]
fn vrrp(pkt: &Packet, l4: usize, src: &[u8; 16], router_id: u8) -> Option<Verdict> {
    // Version/type, then the virtual router id (RFC 9568 §5.1).
    let Some(header) = pkt.bytes::<2>(l4) else {
        return Some(drop(Counter::DroppedVrrp));
    };
    if header[1] != router_id {
        return None;
    }
    Some(if VRRP_PEERS.get_ptr(src).is_some() {
        pass(Counter::PassedVrrpPeer)
    } else {
        drop(Counter::DroppedVrrp)
    })
}

#[inline(always)]
fn parse_ipv4(
    pkt: &Packet,
    l3: usize,
    here: &Attachment,
    vrrp_router_id: u8,
) -> Result<Request, Verdict> {
    let Some(ip) = pkt.bytes::<IPV4_MIN_HEADER_LEN>(l3) else {
        return Err(pass(Counter::PassedNotIp));
    };
    if ip[0] >> 4 != 4 {
        return Err(pass(Counter::PassedNotIp));
    }
    if ip[9] == IPPROTO_VRRP && vrrp_router_id != 0 {
        let l4 = l3 + (ip[0] & 0x0f) as usize * 4;
        let src = ipv4_mapped_key([ip[12], ip[13], ip[14], ip[15]]);
        if let Some(verdict) = vrrp(pkt, l4, &src, vrrp_router_id) {
            return Err(verdict);
        }
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    if !here.serves_v4(dst) {
        return Err(pass(Counter::PassedNotServed));
    }
    if ip[9] != IPPROTO_UDP {
        return Err(pass(Counter::PassedNotNtp));
    }
    // More-fragments flag or a fragment offset: the kernel reassembles, the userspace path
    // admits and answers.
    if be16(ip[6], ip[7]) & 0x3fff != 0 {
        return Err(pass(Counter::PassedFragment));
    }
    let ihl = (ip[0] & 0x0f) as usize;
    if ihl < 5 {
        return Err(drop(Counter::DroppedBadLength));
    }
    let header_len = ihl * 4;
    let total_len = be16(ip[2], ip[3]) as usize;
    let src = [ip[12], ip[13], ip[14], ip[15]];
    // 0/8, 127/8, multicast, broadcast: never a real client, often a reflection attempt.
    let bogus = src[0] == 0 || src[0] == 127 || src[0] >= 224;
    let l4 = l3 + header_len;
    let Some(udp) = pkt.bytes::<UDP_HEADER_LEN>(l4) else {
        return Err(drop(Counter::DroppedShort));
    };
    if be16(udp[2], udp[3]) != NTP_PORT {
        return Err(pass(Counter::PassedNotNtp));
    }
    let udp_len = be16(udp[4], udp[5]);
    if total_len < header_len || udp_len as usize != total_len - header_len {
        return Err(drop(Counter::DroppedBadLength));
    }
    if bogus {
        return Err(drop(Counter::DroppedBadAddress));
    }
    let Some(header_sum) = ipv4_header_sum(pkt, l3, ihl) else {
        return Err(drop(Counter::DroppedShort));
    };
    if !verifies(header_sum) {
        return Err(drop(Counter::DroppedBadIpChecksum));
    }
    Ok(Request {
        v4: true,
        l3,
        l4,
        src: ipv4_mapped_key(src),
        vlan: 0,
        pseudo: pseudo_v4(&src, &dst, udp_len),
        extended: false,
    })
}

/// IPv6 extension headers (RFC 8200 §4, RFC 7045): requests carrying them go to the kernel.
#[inline(always)]
fn is_ipv6_extension_header(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// The IPv6 address at `off` of the header, element by element: a zeroed array filled in a
/// loop becomes a call to `memset` (a BPF-to-BPF call, whose return costs as much as a
/// helper's on a CPU with a return thunk).
#[inline(always)]
fn address_at(ip: &[u8; IPV6_HEADER_LEN], off: usize) -> [u8; 16] {
    [
        ip[off],
        ip[off + 1],
        ip[off + 2],
        ip[off + 3],
        ip[off + 4],
        ip[off + 5],
        ip[off + 6],
        ip[off + 7],
        ip[off + 8],
        ip[off + 9],
        ip[off + 10],
        ip[off + 11],
        ip[off + 12],
        ip[off + 13],
        ip[off + 14],
        ip[off + 15],
    ]
}

#[inline(always)]
fn parse_ipv6(
    pkt: &Packet,
    l3: usize,
    here: &Attachment,
    vrrp_router_id: u8,
) -> Result<Request, Verdict> {
    let Some(ip) = pkt.bytes::<IPV6_HEADER_LEN>(l3) else {
        return Err(pass(Counter::PassedNotIp));
    };
    if ip[0] >> 4 != 6 {
        return Err(pass(Counter::PassedNotIp));
    }
    let src = address_at(ip, 8);
    let dst = address_at(ip, 24);
    if ip[6] == IPPROTO_VRRP && vrrp_router_id != 0 {
        if let Some(verdict) = vrrp(pkt, l3 + IPV6_HEADER_LEN, &src, vrrp_router_id) {
            return Err(verdict);
        }
    }
    if !here.serves_v6(&dst) {
        return Err(pass(Counter::PassedNotServed));
    }
    let next = ip[6];
    if next != IPPROTO_UDP {
        return Err(if is_ipv6_extension_header(next) {
            pass(Counter::PassedIpv6ExtHeader)
        } else {
            pass(Counter::PassedNotNtp)
        });
    }
    let payload_len = be16(ip[4], ip[5]);
    let l4 = l3 + IPV6_HEADER_LEN;
    let Some(udp) = pkt.bytes::<UDP_HEADER_LEN>(l4) else {
        return Err(drop(Counter::DroppedShort));
    };
    if be16(udp[2], udp[3]) != NTP_PORT {
        return Err(pass(Counter::PassedNotNtp));
    }
    let udp_len = be16(udp[4], udp[5]);
    if udp_len != payload_len {
        return Err(drop(Counter::DroppedBadLength));
    }
    // Multicast, unspecified, loopback, IPv4-mapped: never answered (a mapped source would
    // match its IPv4 twin's access rules and records).
    if v6_source_is_bogus(&src) {
        return Err(drop(Counter::DroppedBadAddress));
    }
    Ok(Request {
        v4: false,
        l3,
        l4,
        src,
        vlan: 0,
        pseudo: pseudo_v6(&src, &dst, udp_len),
        extended: false,
    })
}

/// The UDP and NTP checks both families share: length, source port, the request's first
/// byte, extension fields, and (for plain requests) the UDP checksum.
#[inline(always)]
fn check_udp_and_ntp(pkt: &Packet, req: &mut Request) -> Result<(), Verdict> {
    let Some(udp) = pkt.bytes::<UDP_HEADER_LEN>(req.l4) else {
        return Err(drop(Counter::DroppedShort));
    };
    let udp_len = be16(udp[4], udp[5]);
    if (udp_len as usize) < UDP_HEADER_LEN + NTP_HEADER_LEN {
        return Err(drop(Counter::DroppedShort));
    }
    let Some(seg) = pkt.bytes::<{ NTP_UDP_LEN as usize }>(req.l4) else {
        return Err(drop(Counter::DroppedShort));
    };
    if seg[0] == 0 && seg[1] == 0 {
        return Err(drop(Counter::DroppedSourcePort));
    }
    if let Some(why) = request_rejection(seg[UDP_HEADER_LEN + OFF_LI_VN_MODE]) {
        // Replies to the host's own client, symmetric peers, control queries: not ours.
        return Err(if why as u32 == Counter::PassedNotClient as u32 {
            pass(why)
        } else {
            drop(why)
        });
    }
    if udp_len != NTP_UDP_LEN {
        // The kernel's stack verifies the whole datagram's checksum before the userspace
        // path sees it; only the first 56 bytes are in view here.
        req.extended = true;
        return Ok(());
    }
    let field = be16(seg[6], seg[7]);
    let Some(seg_words) = pkt.le_words::<{ NTP_UDP_LEN as usize }>(req.l4) else {
        return Err(drop(Counter::DroppedShort));
    };
    let sum = req.pseudo + le_words_sum(seg_words);
    // IPv6 makes the UDP checksum mandatory: zero is accepted for IPv4 only.
    if !udp_request_checksum_ok(field, sum, req.pseudo, req.v4) {
        return Err(drop(Counter::DroppedBadUdpChecksum));
    }
    Ok(())
}

/// Replies go back to the unicast MAC that sent the request, and only for frames sent to this
/// interface's own MAC: a frame flooded by a bridge for an unknown MAC is not ours, and a
/// reply from that MAC would teach the bridge a false location.
#[inline(always)]
fn check_ethernet(pkt: &Packet, ifindex: u32, here: &Attachment) -> Result<(), Verdict> {
    let Some(eth) = pkt.bytes::<ETH_HEADER_LEN>(0) else {
        return Err(drop(Counter::DroppedShort));
    };
    if eth[0] & 1 != 0 || eth[6] & 1 != 0 {
        return Err(drop(Counter::DroppedBadAddress));
    }
    let dst = [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5], 0, 0];
    if here.owns_mac(dst, ifindex) {
        Ok(())
    } else {
        Err(pass(Counter::PassedOtherHost))
    }
}

/// Sum of the IPv4 header's words (IHL 5..15): the fixed 20 bytes, then any options.
#[inline(always)]
fn ipv4_header_sum(pkt: &Packet, l3: usize, ihl: usize) -> Option<u32> {
    let mut words = pkt.le_words::<IPV4_MIN_HEADER_LEN>(l3)?;
    let mut i = 5usize;
    while i < 15 {
        if i >= ihl {
            break;
        }
        words += pkt.le_words::<4>(l3 + i * 4)?;
        i += 1;
    }
    Some(le_words_sum(words))
}
