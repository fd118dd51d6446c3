//! The responder's maps as both sides name them, and the fingerprint of their value layouts.
//!
//! The eBPF crate declares each map as a static of the same name (aya names a map after its
//! static); `ntp-user` checks at test time that the object holds exactly these.

use crate::anchor::{ServerParams, TimeAnchor};
use crate::policy::{GuestClock, ResponderPolicy, SourceKey, SourceState};

/// The anchor's two slots.
pub const ANCHORS: &str = "ANCHORS";
/// `[0]`: the publication generation; the live slot is `generation & 1`.
pub const ANCHOR_ACTIVE: &str = "ANCHOR_ACTIVE";
pub const SERVER_PARAMS: &str = "SERVER_PARAMS";
pub const SERVED_ADDRS: &str = "SERVED_ADDRS";
pub const COUNTERS: &str = "COUNTERS";
pub const POLICY: &str = "POLICY";
pub const ACL: &str = "ACL";
pub const RATE: &str = "RATE";
pub const GUESTS: &str = "GUESTS";
/// The MACs of the interfaces the responder is attached to (8 bytes, the last two zero) →
/// their ifindex: only frames sent to the receiving interface's own MAC are answered.
pub const OWN_MACS: &str = "OWN_MACS";
/// Per-CPU state of the global kiss-o'-death budget.
pub const KOD_BUDGET: &str = "KOD_BUDGET";
/// The VIP hosts whose VRRP adverts may arrive on the guests' side (a shared network's
/// unicast peers, as ::ffff:a.b.c.d); VRRP from any other source is dropped there.
pub const VRRP_PEERS: &str = "VRRP_PEERS";
/// A word per CPU that the responder's memory barriers exchange (BPF has no fence instruction,
/// only fully ordered atomics; on a per-CPU word they share no cache line between CPUs).
pub const BARRIER: &str = "BARRIER";
/// VLAN IDs whose tagged requests are answered (the value is unused); untagged ones always are.
pub const VLANS: &str = "VLANS";

/// Counts of the benchmark's programs (`crate::bench`), never used by the daemon.
pub const BENCH_COUNTS: &str = "BENCH_COUNTS";

pub const ALL: [&str; 15] = [
    ANCHORS,
    ANCHOR_ACTIVE,
    SERVER_PARAMS,
    SERVED_ADDRS,
    COUNTERS,
    POLICY,
    ACL,
    RATE,
    GUESTS,
    OWN_MACS,
    KOD_BUDGET,
    VRRP_PEERS,
    BARRIER,
    VLANS,
    BENCH_COUNTS,
];

pub const RESPONDER_PROGRAM: &str = "ntp_responder";
pub const PEER_PASS_PROGRAM: &str = "ntp_peer_pass";
/// The benchmark's reply counter (guest side) and request counter (server side).
pub const BENCH_SINK_PROGRAM: &str = "ntp_bench_sink";
pub const BENCH_DROP_PROGRAM: &str = "ntp_bench_drop";

/// FNV-1a over the sizes and field offsets of every pinned map value: a build that reorders
/// or resizes a field gets another fingerprint, so its daemon never adopts maps whose bytes it
/// would misread (the pins live under a directory named after it).
pub const LAYOUT_FINGERPRINT: u64 = {
    use core::mem::{offset_of, size_of};
    let parts = [
        size_of::<TimeAnchor>(),
        offset_of!(TimeAnchor, mono_ns),
        offset_of!(TimeAnchor, ntp_ns),
        offset_of!(TimeAnchor, freq_scaled),
        offset_of!(TimeAnchor, max_age_ns),
        offset_of!(TimeAnchor, reference_ntp_ns),
        offset_of!(TimeAnchor, root_delay_ns),
        offset_of!(TimeAnchor, root_dispersion_ns),
        offset_of!(TimeAnchor, dispersion_growth_ns_per_s),
        offset_of!(TimeAnchor, refid),
        offset_of!(TimeAnchor, leap),
        offset_of!(TimeAnchor, stratum),
        size_of::<ServerParams>(),
        offset_of!(ServerParams, precision),
        offset_of!(ServerParams, poll_min),
        offset_of!(ServerParams, poll_max),
        offset_of!(ServerParams, flags),
        offset_of!(ServerParams, vrrp_router_id),
        size_of::<SourceState>(),
        size_of::<GuestClock>(),
        size_of::<ResponderPolicy>(),
        crate::counters::COUNTER_COUNT as usize,
        // The anchor's slot selection: the generation word (this build: u32, slot = gen & 1).
        size_of::<u32>(),
        crate::anchor::ANCHOR_SLOTS as usize,
        // How the anchor maps are created (mmapable: the daemon writes them through a mapping).
        crate::anchor::ANCHOR_MAP_FLAGS as usize,
        size_of::<SourceKey>(),
        // Bump to force a new layout when a meaning changes without a size or offset.
        1,
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < parts.len() {
        let mut v = parts[i] as u64;
        let mut b = 0;
        while b < 8 {
            h ^= v & 0xff;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            v >>= 8;
            b += 1;
        }
        i += 1;
    }
    h
};
