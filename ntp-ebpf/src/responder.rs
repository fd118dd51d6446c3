//! Parse Ethernet → (VLAN) → IPv4/IPv6 → UDP → NTP, answer client requests in place with XDP_TX.
//!
//! Every layer is one function with one bounds check. Anything not addressed to a served
//! address, or not NTP, is passed untouched; malformed NTP is dropped; nothing is ever answered
//! with more bytes than it carried. Valid requests then pass the access list and their
//! source's rate limit (over it: dropped, or a kiss-o'-death now and then). Each packet
//! increments exactly one outcome counter.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::info;
use ntp_common::{
    anchor::{ANCHOR_SLOTS, PARAM_FLAG_LOG},
    checksum::{
        add_words, finish, finish_udp, pseudo_v4, pseudo_v6, udp_request_checksum_ok, verifies,
    },
    counters::COUNTER_COUNT,
    policy::{
        admit, kod_due, rate_key_v6, Admission, GuestClock, ResponderPolicy, SourceState,
        ACL_ALLOW, KISS_DENY, KISS_RATE, POLICY_ACL, POLICY_DEFAULT_DENY, POLICY_GUEST_CLOCKS,
        POLICY_KOD_DENY, POLICY_RATE_LIMIT,
    },
    reply::{
        guest_offset_fixed, request_rejection, write_kiss_of_death, write_server_reply,
        ClientRequest,
    },
    wire::*,
    Counter, ServerParams, TimeAnchor,
};

use crate::packet::{be16, swap, Packet};

/// How many addresses one responder can serve (clock aliases and service addresses).
const MAX_SERVED_ADDRS: u32 = 64;

/// The daemon's clock model, double-buffered; `ANCHOR_ACTIVE[0]` is the publication
/// generation, whose low bit names the live slot.
#[map]
static ANCHORS: Array<TimeAnchor> = Array::with_max_entries(ANCHOR_SLOTS, 0);
#[map]
static ANCHOR_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static SERVER_PARAMS: Array<ServerParams> = Array::with_max_entries(1, 0);
/// Destination addresses answered: IPv6 as is, IPv4 as ::ffff:a.b.c.d. The value is unused.
#[map]
static SERVED_ADDRS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_SERVED_ADDRS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
static POLICY: Array<ResponderPolicy> = Array::with_max_entries(1, 0);
/// Access list: prefixes of ::ffff:0:0/96-mapped IPv4 or IPv6 sources → ACL_ALLOW / ACL_DENY.
#[map]
static ACL: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(4096, 0);
/// Rate-limit state per source (IPv4 address, IPv6 /64). LRU: a full table forgets the
/// longest-idle source, so it never refuses a new one. The daemon sets the size at load.
#[map]
static RATE: LruHashMap<[u8; 16], SourceState> = LruHashMap::with_max_entries(65536, 0);
/// Apparent clock error of each guest (full source address), for the daemon's alarm list.
#[map]
static GUESTS: LruHashMap<[u8; 16], GuestClock> = LruHashMap::with_max_entries(65536, 0);

/// What the packet-independent state says for every packet, read once per packet.
struct Env {
    rx_mono: u64,
    params: ServerParams,
    policy: ResponderPolicy,
}

/// What the admission step decided for a valid request.
#[derive(Clone, Copy)]
enum Admit {
    Answer,
    Kod([u8; 4], Counter),
    Drop(Counter),
}

#[derive(Clone, Copy)]
struct Verdict {
    action: u32,
    counter: Counter,
    /// For answered packets: the reply said LI=3.
    unsynchronized: bool,
}

#[inline(always)]
const fn pass(counter: Counter) -> Verdict {
    Verdict {
        action: XDP_PASS,
        counter,
        unsynchronized: false,
    }
}

#[inline(always)]
const fn drop(counter: Counter) -> Verdict {
    Verdict {
        action: XDP_DROP,
        counter,
        unsynchronized: false,
    }
}

#[xdp]
pub fn ntp_responder(ctx: XdpContext) -> u32 {
    // Receive timestamp: as early as possible.
    let rx_mono = unsafe { bpf_ktime_get_ns() };
    // Read once per packet: the reply builder and the log switch both need them.
    let env = Env {
        rx_mono,
        params: match SERVER_PARAMS.get(0) {
            Some(p) => *p,
            None => ServerParams::DEFAULT,
        },
        policy: match POLICY.get(0) {
            Some(p) => *p,
            None => ResponderPolicy::OPEN,
        },
    };
    let pkt = Packet::new(&ctx);
    let verdict = handle_frame(&pkt, &env);
    count(verdict.counter);
    if verdict.unsynchronized {
        count(Counter::AnsweredUnsynchronized);
    }
    if env.params.flags & PARAM_FLAG_LOG != 0 {
        info!(
            &ctx,
            "ntp-xdp: outcome {} action {}", verdict.counter as u32, verdict.action
        );
    }
    verdict.action
}

/// Attached to the far end of a veth in native mode: XDP_TX on veth only delivers when the
/// peer has an XDP program (kernel 6.x), and this one lets everything through.
#[xdp]
pub fn ntp_peer_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn is_served(key: &[u8; 16]) -> bool {
    SERVED_ADDRS.get_ptr(key).is_some()
}

/// Reads the live anchor. Re-reading the index after the copy catches a flip that happened
/// during it; the daemon never flips twice within a millisecond, so one retry suffices.
#[inline(always)]
fn load_anchor() -> Option<TimeAnchor> {
    let active = ANCHOR_ACTIVE.get_ptr(0)?;
    ntp_common::anchor::read_published(
        || Some(unsafe { core::ptr::read_volatile(active) }),
        |slot| Some(unsafe { core::ptr::read_volatile(ANCHORS.get_ptr(slot)?) }),
    )
}

#[inline(always)]
fn handle_frame(pkt: &Packet, env: &Env) -> Verdict {
    let Some(eth) = pkt.bytes::<ETH_HEADER_LEN>(0) else {
        return pass(Counter::PassedNotIp);
    };
    let mut ethertype = be16(eth[12], eth[13]);
    let mut l3 = ETH_HEADER_LEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        // One tag: TCI, then the inner ethertype.
        let Some(tag) = pkt.bytes::<VLAN_TAG_LEN>(ETH_HEADER_LEN) else {
            return pass(Counter::PassedNotIp);
        };
        ethertype = be16(tag[2], tag[3]);
        l3 = ETH_HEADER_LEN + VLAN_TAG_LEN;
    }
    match ethertype {
        ETH_P_IPV4 => handle_ipv4(pkt, l3, env),
        ETH_P_IPV6 => handle_ipv6(pkt, l3, env),
        _ => pass(Counter::PassedNotIp),
    }
}

#[inline(always)]
fn handle_ipv4(pkt: &Packet, l3: usize, env: &Env) -> Verdict {
    let Some(ip) = pkt.bytes::<IPV4_MIN_HEADER_LEN>(l3) else {
        return pass(Counter::PassedNotIp);
    };
    if ip[0] >> 4 != 4 {
        return pass(Counter::PassedNotIp);
    }
    if !is_served(&ipv4_mapped_key([ip[16], ip[17], ip[18], ip[19]])) {
        return pass(Counter::PassedNotServed);
    }
    if ip[9] != IPPROTO_UDP {
        return pass(Counter::PassedNotNtp);
    }
    // More-fragments flag or a fragment offset: leave it to the kernel's reassembly.
    if be16(ip[6], ip[7]) & 0x3fff != 0 {
        return pass(Counter::PassedFragment);
    }
    let ihl = (ip[0] & 0x0f) as usize;
    if ihl < 5 {
        return drop(Counter::DroppedBadLength);
    }
    let header_len = ihl * 4;
    let total_len = be16(ip[2], ip[3]) as usize;
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];

    let l4 = l3 + header_len;
    let Some(udp) = pkt.bytes::<UDP_HEADER_LEN>(l4) else {
        return drop(Counter::DroppedShort);
    };
    if be16(udp[2], udp[3]) != NTP_PORT {
        return pass(Counter::PassedNotNtp);
    }
    let udp_len = be16(udp[4], udp[5]);
    if total_len < header_len || udp_len as usize != total_len - header_len {
        return drop(Counter::DroppedBadLength);
    }
    // 0/8, 127/8, multicast, broadcast: never a real client, often a reflection attempt.
    if src[0] == 0 || src[0] == 127 || src[0] >= 224 {
        return drop(Counter::DroppedBadAddress);
    }
    let seg = match ntp_request(pkt, l4, udp_len) {
        Ok(seg) => seg,
        Err(v) => return v,
    };
    let Some(header_sum) = ipv4_header_sum(pkt, l3, ihl) else {
        return drop(Counter::DroppedShort);
    };
    if !verifies(header_sum) {
        return drop(Counter::DroppedBadIpChecksum);
    }
    let pseudo = pseudo_v4(&src, &dst, udp_len);
    let field = be16(seg[6], seg[7]);
    if !udp_request_checksum_ok(field, add_words(pseudo, seg), pseudo, true) {
        return drop(Counter::DroppedBadUdpChecksum);
    }
    if !ethernet_addresses_ok(pkt) {
        return drop(Counter::DroppedBadAddress);
    }
    let Some(anchor) = load_anchor() else {
        return drop(Counter::DroppedNoAnchor);
    };
    if !anchor.is_published() {
        return drop(Counter::DroppedNoAnchor);
    }
    let source = ipv4_mapped_key(src);
    let (kod, counter) = match admission(&source, &source, env) {
        Admit::Answer => (None, Counter::AnsweredV4),
        Admit::Kod(code, counter) => (Some(code), counter),
        Admit::Drop(counter) => return drop(counter),
    };

    // Turn the frame around: MACs, addresses, TTL, then a fresh header checksum.
    swap_ethernet(pkt);
    let Some(ip) = pkt.bytes::<IPV4_MIN_HEADER_LEN>(l3) else {
        return drop(Counter::DroppedShort);
    };
    swap::<4>(ip, 12, 16);
    ip[8] = REPLY_TTL;
    ip[10] = 0;
    ip[11] = 0;
    let Some(sum) = ipv4_header_sum(pkt, l3, ihl) else {
        return drop(Counter::DroppedShort);
    };
    let Some(ip) = pkt.bytes::<IPV4_MIN_HEADER_LEN>(l3) else {
        return drop(Counter::DroppedShort);
    };
    let check = finish(sum);
    ip[10] = (check >> 8) as u8;
    ip[11] = check as u8;

    let synced = answer(seg, &anchor, env, pseudo, kod, &source);
    Verdict {
        action: XDP_TX,
        counter,
        unsynchronized: kod.is_none() && !synced,
    }
}

/// IPv6 extension headers (RFC 8200 §4, RFC 7045): requests carrying them go to the kernel.
#[inline(always)]
fn is_ipv6_extension_header(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[inline(always)]
fn handle_ipv6(pkt: &Packet, l3: usize, env: &Env) -> Verdict {
    let Some(ip) = pkt.bytes::<IPV6_HEADER_LEN>(l3) else {
        return pass(Counter::PassedNotIp);
    };
    if ip[0] >> 4 != 6 {
        return pass(Counter::PassedNotIp);
    }
    let mut dst = [0u8; 16];
    let mut src = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        src[i] = ip[8 + i];
        dst[i] = ip[24 + i];
        i += 1;
    }
    if !is_served(&dst) {
        return pass(Counter::PassedNotServed);
    }
    let next = ip[6];
    if next != IPPROTO_UDP {
        return if is_ipv6_extension_header(next) {
            pass(Counter::PassedIpv6ExtHeader)
        } else {
            pass(Counter::PassedNotNtp)
        };
    }
    let payload_len = be16(ip[4], ip[5]);
    let l4 = l3 + IPV6_HEADER_LEN;
    let Some(udp) = pkt.bytes::<UDP_HEADER_LEN>(l4) else {
        return drop(Counter::DroppedShort);
    };
    if be16(udp[2], udp[3]) != NTP_PORT {
        return pass(Counter::PassedNotNtp);
    }
    let udp_len = be16(udp[4], udp[5]);
    if udp_len != payload_len {
        return drop(Counter::DroppedBadLength);
    }
    // Multicast (ff00::/8) or unspecified (::) sources are never answered.
    let mut any = 0u8;
    let mut i = 0;
    while i < 16 {
        any |= src[i];
        i += 1;
    }
    if src[0] == 0xff || any == 0 {
        return drop(Counter::DroppedBadAddress);
    }
    let seg = match ntp_request(pkt, l4, udp_len) {
        Ok(seg) => seg,
        Err(v) => return v,
    };
    let pseudo = pseudo_v6(&src, &dst, udp_len);
    let field = be16(seg[6], seg[7]);
    // IPv6 makes the UDP checksum mandatory: zero is not accepted.
    if !udp_request_checksum_ok(field, add_words(pseudo, seg), pseudo, false) {
        return drop(Counter::DroppedBadUdpChecksum);
    }
    if !ethernet_addresses_ok(pkt) {
        return drop(Counter::DroppedBadAddress);
    }
    let Some(anchor) = load_anchor() else {
        return drop(Counter::DroppedNoAnchor);
    };
    if !anchor.is_published() {
        return drop(Counter::DroppedNoAnchor);
    }
    let (kod, counter) = match admission(&src, &rate_key_v6(&src), env) {
        Admit::Answer => (None, Counter::AnsweredV6),
        Admit::Kod(code, counter) => (Some(code), counter),
        Admit::Drop(counter) => return drop(counter),
    };

    swap_ethernet(pkt);
    let Some(ip) = pkt.bytes::<IPV6_HEADER_LEN>(l3) else {
        return drop(Counter::DroppedShort);
    };
    swap::<16>(ip, 8, 24);
    ip[7] = REPLY_TTL;

    let synced = answer(seg, &anchor, env, pseudo, kod, &src);
    Verdict {
        action: XDP_TX,
        counter,
        unsynchronized: kod.is_none() && !synced,
    }
}

/// Validates the UDP header and NTP header shared by both families and returns the UDP
/// segment (header + 48 bytes of NTP), or the verdict for a request that is not answered here.
#[inline(always)]
fn ntp_request(
    pkt: &Packet,
    l4: usize,
    udp_len: u16,
) -> Result<&'static mut [u8; NTP_UDP_LEN as usize], Verdict> {
    if (udp_len as usize) < UDP_HEADER_LEN + NTP_HEADER_LEN {
        return Err(drop(Counter::DroppedShort));
    }
    let Some(seg) = pkt.bytes::<{ NTP_UDP_LEN as usize }>(l4) else {
        return Err(drop(Counter::DroppedShort));
    };
    if seg[0] == 0 && seg[1] == 0 {
        return Err(drop(Counter::DroppedSourcePort));
    }
    if let Some(why) = request_rejection(seg[UDP_HEADER_LEN + OFF_LI_VN_MODE]) {
        return Err(drop(why));
    }
    // Extension fields or a MAC (NTS, symmetric keys): a userspace server's business.
    if udp_len != NTP_UDP_LEN {
        return Err(pass(Counter::PassedExtension));
    }
    Ok(seg)
}

/// Sum of the IPv4 header's words (IHL 5..15), read four bytes at a time.
#[inline(always)]
fn ipv4_header_sum(pkt: &Packet, l3: usize, ihl: usize) -> Option<u32> {
    let mut sum = 0u32;
    let mut i = 0usize;
    while i < 15 {
        if i >= ihl {
            break;
        }
        let word = pkt.bytes::<4>(l3 + i * 4)?;
        sum = add_words(sum, word);
        i += 1;
    }
    Some(sum)
}

/// Replies go back to the unicast MAC that sent the request, from the one it was sent to.
#[inline(always)]
fn ethernet_addresses_ok(pkt: &Packet) -> bool {
    match pkt.bytes::<ETH_HEADER_LEN>(0) {
        Some(eth) => eth[0] & 1 == 0 && eth[6] & 1 == 0,
        None => false,
    }
}

#[inline(always)]
fn swap_ethernet(pkt: &Packet) {
    if let Some(eth) = pkt.bytes::<ETH_HEADER_LEN>(0) {
        swap::<6>(eth, 0, 6);
    }
}

/// Access list, then the source's rate. `source` is the full address (IPv4 mapped), `rate_key`
/// the rate table's key for it.
#[inline(always)]
fn admission(source: &[u8; 16], rate_key: &[u8; 16], env: &Env) -> Admit {
    let policy = &env.policy;
    let mut denied = false;
    if policy.has(POLICY_ACL) {
        denied = match ACL.get(Key::new(128, *source)) {
            Some(v) => *v != ACL_ALLOW,
            None => policy.has(POLICY_DEFAULT_DENY),
        };
    }
    if denied && !policy.has(POLICY_KOD_DENY) {
        return Admit::Drop(Counter::DroppedDenied);
    }
    if !denied && !policy.has(POLICY_RATE_LIMIT) {
        return Admit::Answer;
    }
    // Concurrent requests of one source on two CPUs may both pass on the same token: the
    // limit is exact per CPU and at most #CPUs times looser for a source that floods them all.
    let slot = RATE.get_ptr_mut(rate_key);
    let mut state = match slot {
        Some(p) => unsafe { *p },
        None => SourceState::default(),
    };
    let decision = if denied {
        if kod_due(&mut state, env.rx_mono, policy) {
            Admit::Kod(KISS_DENY, Counter::KodDeny)
        } else {
            Admit::Drop(Counter::DroppedDenied)
        }
    } else {
        match admit(&mut state, env.rx_mono, policy) {
            Admission::Answer => Admit::Answer,
            Admission::Limited { kod: true } => Admit::Kod(KISS_RATE, Counter::KodRate),
            Admission::Limited { kod: false } => Admit::Drop(Counter::DroppedRateLimited),
        }
    };
    match slot {
        Some(p) => unsafe { *p = state },
        // A full LRU table evicts its least recently used entry to make room.
        None => {
            let _ = RATE.insert(rate_key, &state, 0);
        }
    }
    decision
}

/// Remembers what a guest's request said about its clock.
#[inline(always)]
fn record_guest(source: &[u8; 16], offset_fixed: i64, now: u64) {
    match GUESTS.get_ptr_mut(source) {
        Some(g) => unsafe {
            (*g).offset_fixed = offset_fixed;
            (*g).requests += 1;
            (*g).last_seen_ns = now;
        },
        None => {
            let entry = GuestClock {
                offset_fixed,
                requests: 1,
                last_seen_ns: now,
            };
            let _ = GUESTS.insert(source, &entry, 0);
        }
    }
}

/// Writes the NTP reply (or a kiss-o'-death with `kod`) and the UDP header over the request
/// segment. Returns whether a reply claims synchronization.
#[inline(always)]
fn answer(
    seg: &mut [u8; NTP_UDP_LEN as usize],
    anchor: &TimeAnchor,
    env: &Env,
    pseudo: u32,
    kod: Option<[u8; 4]>,
    source: &[u8; 16],
) -> bool {
    swap::<2>(seg, 0, 2);
    seg[6] = 0;
    seg[7] = 0;
    // SAFETY: the NTP header is the last 48 of the segment's 56 bytes.
    let hdr = unsafe { &mut *(seg.as_mut_ptr().add(UDP_HEADER_LEN) as *mut [u8; NTP_HEADER_LEN]) };
    let req = ClientRequest::parse(hdr);
    // Transmit timestamp: the last moment before the checksum that covers it.
    let tx_mono = unsafe { bpf_ktime_get_ns() };
    let random = unsafe { bpf_get_prandom_u32() };
    let rx_mono = env.rx_mono;
    match kod {
        None => {
            let receive =
                write_server_reply(hdr, &req, anchor, &env.params, rx_mono, tx_mono, random);
            // A zero transmit timestamp says nothing about the guest's clock.
            if env.policy.has(POLICY_GUEST_CLOCKS) && u64::from_be_bytes(req.transmit) != 0 {
                record_guest(source, guest_offset_fixed(req.transmit, receive), rx_mono);
            }
        }
        Some(code) => write_kiss_of_death(
            hdr,
            &req,
            anchor,
            &env.params,
            rx_mono,
            tx_mono,
            random,
            code,
            env.policy.kod_poll,
        ),
    }
    // The pseudo-header sum does not change when source and destination swap.
    let check = finish_udp(add_words(pseudo, seg));
    seg[6] = (check >> 8) as u8;
    seg[7] = check as u8;
    kod.is_none() && anchor.is_synchronized_at(rx_mono)
}
