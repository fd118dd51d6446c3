//! The benchmark's counting programs (`ntp_common::bench`): loaded by `ntp-loadgen flood`,
//! never by the daemon. Counting in XDP and dropping keeps sockets, and the CPU they cost,
//! out of the generator's side of the measurement.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use ntp_common::bench::{
    classify, BenchFrame, BENCH_FRAME_LEN, BENCH_INVALID_REPLIES, BENCH_KOD_REPLIES,
    BENCH_REQUESTS_DROPPED, BENCH_SLOTS, BENCH_VALID_REPLIES,
};
use ntp_common::wire::{ETH_HEADER_LEN, IPV4_MIN_HEADER_LEN, NTP_UDP_LEN};

use crate::packet::Packet;

#[map]
pub static BENCH_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BENCH_SLOTS, 0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = BENCH_COUNTS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn look(ctx: &XdpContext) -> BenchFrame {
    let pkt = Packet::new(ctx);
    let Some(frame) = pkt.bytes::<BENCH_FRAME_LEN>(0) else {
        return BenchFrame::Other;
    };
    let Some(words) =
        pkt.le_words::<{ NTP_UDP_LEN as usize }>(ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN)
    else {
        return BenchFrame::Other;
    };
    classify(frame, words)
}

/// On the guest's veth: replies to the generator are counted (valid, kiss-o'-death, invalid)
/// and dropped; everything else (ARP, the generator's own traffic) passes.
#[xdp]
pub fn ntp_bench_sink(ctx: XdpContext) -> u32 {
    let slot = match look(&ctx) {
        BenchFrame::ValidReply => BENCH_VALID_REPLIES,
        BenchFrame::KodReply => BENCH_KOD_REPLIES,
        BenchFrame::InvalidReply => BENCH_INVALID_REPLIES,
        BenchFrame::Request | BenchFrame::Other => return XDP_PASS,
    };
    count(slot);
    XDP_DROP
}

/// On the server's veth in place of a server: every NTP request is counted and dropped, so
/// the count is what the generator alone delivers (its ceiling).
#[xdp]
pub fn ntp_bench_drop(ctx: XdpContext) -> u32 {
    match look(&ctx) {
        BenchFrame::Request => {
            count(BENCH_REQUESTS_DROPPED);
            XDP_DROP
        }
        _ => XDP_PASS,
    }
}
