//! Turning a request around in place: Ethernet and IP addresses swapped, the NTP reply (or a
//! kiss-o'-death) written over the request, fresh checksums. Never more bytes than came in.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use ntp_common::{
    checksum::{finish, finish_udp, le_words_sum},
    reply::{
        guest_offset_fixed, next_random, write_kiss_of_death, write_reply_but_transmit,
        write_transmit, ClientRequest,
    },
    time::ntp_ns_to_timestamp,
    wire::*,
    ServerParams, TimeAnchor,
};

use crate::maps::RANDOM;
use crate::packet::{be16, swap, Packet};
use crate::parse::Request;

/// Swaps the frame's MACs and IP addresses, sets the TTL / hop limit, and (IPv4) writes a
/// fresh header checksum. `None`: the frame changed under us (never, in practice).
#[inline(always)]
pub fn turn_around(pkt: &Packet, req: &Request) -> Option<()> {
    let eth = pkt.bytes::<ETH_HEADER_LEN>(0)?;
    swap::<6>(eth, 0, 6);
    if req.v4 {
        let ip = pkt.bytes::<IPV4_MIN_HEADER_LEN>(req.l3)?;
        swap::<4>(ip, 12, 16);
        // Only the TTL's word changes (the addresses swap, their sum stays): the checksum is
        // updated for it (RFC 1624, eqn. 3) from the request's, which verified, instead of
        // summing the header (and its options) again.
        let old_check = be16(ip[10], ip[11]);
        let old_word = be16(ip[8], ip[9]);
        let new_word = be16(REPLY_TTL, ip[9]);
        let check = finish(!old_check as u32 + !old_word as u32 + new_word as u32);
        ip[8] = REPLY_TTL;
        ip[10] = (check >> 8) as u8;
        ip[11] = check as u8;
    } else {
        let ip = pkt.bytes::<IPV6_HEADER_LEN>(req.l3)?;
        swap::<16>(ip, 8, 24);
        ip[7] = REPLY_TTL;
    }
    Some(())
}

/// 32 random bits from this CPU's generator, seeded from the kernel's on first use.
#[inline(always)]
fn random_bits() -> u32 {
    let Some(state) = RANDOM.get_ptr_mut(0) else {
        return unsafe { bpf_get_prandom_u32() };
    };
    // SAFETY: this CPU's slot; the program is not preempted by itself on a CPU.
    let state = unsafe { &mut *state };
    if *state == 0 {
        *state = (unsafe { bpf_get_prandom_u32() } as u64) << 32
            | unsafe { bpf_get_prandom_u32() } as u64
            | 1;
    }
    next_random(state)
}

/// The guest's clock reading its request carries: its transmit timestamp against the receive
/// time the reply serves (the same computation). `None` for a zero transmit timestamp, which
/// says nothing about the guest's clock.
#[inline(always)]
pub fn guest_offset(pkt: &Packet, req: &Request, anchor: &TimeAnchor, rx_mono: u64) -> Option<i64> {
    let transmit = *pkt.bytes::<8>(req.l4 + UDP_HEADER_LEN + OFF_TRANSMIT_TS)?;
    if u64::from_ne_bytes(transmit) == 0 {
        return None;
    }
    let receive = ntp_ns_to_timestamp(anchor.ntp_ns_at(rx_mono));
    Some(guest_offset_fixed(transmit, receive))
}

/// What the reply is built from besides the request: the anchor, the server's header fields,
/// the poll a kiss-o'-death asks for and the receive time.
pub struct ReplyContext<'a> {
    pub anchor: &'a TimeAnchor,
    pub params: &'a ServerParams,
    pub kod_poll: i8,
    pub rx_mono: u64,
}

/// Writes the NTP reply (or a kiss-o'-death with `kod`) and the UDP header over the request
/// segment. Returns whether a reply claims synchronization.
#[inline(always)]
pub fn answer(
    pkt: &Packet,
    req: &Request,
    cx: &ReplyContext,
    kod: Option<[u8; 4]>,
) -> Option<bool> {
    let seg = pkt.bytes::<{ NTP_UDP_LEN as usize }>(req.l4)?;
    swap::<2>(seg, 0, 2);
    seg[6] = 0;
    seg[7] = 0;
    // SAFETY: the NTP header is the last 48 of the segment's 56 bytes.
    let hdr = unsafe { &mut *(seg.as_mut_ptr().add(UDP_HEADER_LEN) as *mut [u8; NTP_HEADER_LEN]) };
    let request = ClientRequest::parse(hdr);
    let random = random_bits();
    let rx_mono = cx.rx_mono;
    match kod {
        None => {
            let receive = write_reply_but_transmit(hdr, &request, cx.anchor, cx.params, rx_mono);
            // Transmit timestamp: read after every other field, just before the checksum
            // that covers it.
            let tx_mono = unsafe { bpf_ktime_get_ns() };
            write_transmit(hdr, cx.anchor, cx.params, receive, tx_mono, random);
        }
        Some(code) => write_kiss_of_death(
            hdr,
            &request,
            cx.anchor,
            cx.params,
            rx_mono,
            unsafe { bpf_ktime_get_ns() },
            random,
            code,
            cx.kod_poll,
        ),
    }
    // The pseudo-header sum does not change when source and destination swap.
    let words = pkt.le_words::<{ NTP_UDP_LEN as usize }>(req.l4)?;
    let seg = pkt.bytes::<{ NTP_UDP_LEN as usize }>(req.l4)?;
    let check = finish_udp(req.pseudo + le_words_sum(words));
    seg[6] = (check >> 8) as u8;
    seg[7] = check as u8;
    Some(kod.is_none() && cx.anchor.is_synchronized_at(rx_mono))
}
