//! The responder's maps as both sides name them, and the fingerprint of their value layouts.
//!
//! The eBPF crate declares each map as a static of the same name (aya names a map after its
//! static); `ntp-xdp` checks at test time that the object holds exactly these.

use crate::anchor::{ServerParams, TimeAnchor};
use crate::policy::{GuestClock, ResponderPolicy, SourceKey, SourceRecord, SourceState};

/// The anchor's two slots.
pub const ANCHORS: &str = "ANCHORS";
/// `[0]`: the publication generation; the live slot is `generation & 1`.
pub const ANCHOR_ACTIVE: &str = "ANCHOR_ACTIVE";
pub const SERVER_PARAMS: &str = "SERVER_PARAMS";
/// Per attachment, at `attachment_slot(ifindex)`: the served addresses and the attached
/// interfaces' own MACs ([`Attachment`]), read once per packet.
pub const ATTACHMENTS: &str = "ATTACHMENTS";
pub const COUNTERS: &str = "COUNTERS";
pub const POLICY: &str = "POLICY";
pub const ACL: &str = "ACL";
/// Per source ([`SourceKey`] from `policy::rate_key`): its rate state and its guest clock
/// record ([`SourceRecord`]), one lookup per request.
pub const SOURCES: &str = "SOURCES";
/// Per CPU: where a new source's entry is built before it is inserted (the BPF stack has
/// no room for it).
pub const SOURCE_SCRATCH: &str = "SOURCE_SCRATCH";
/// Per CPU: the state of the generator of the bits below the precision.
pub const RANDOM: &str = "RANDOM";
/// Per-CPU state of the global kiss-o'-death budget.
pub const KOD_BUDGET: &str = "KOD_BUDGET";
/// The VIP hosts whose VRRP adverts may arrive on the guests' side (a shared network's
/// unicast peers, as ::ffff:a.b.c.d); VRRP from any other source is dropped there.
pub const VRRP_PEERS: &str = "VRRP_PEERS";
/// How many peers `VRRP_PEERS` holds (a config with more is refused).
pub const VRRP_PEERS_MAX: u32 = 16;
/// A word per CPU that the responder's memory barriers exchange (BPF has no fence instruction,
/// only fully ordered atomics; on a per-CPU word they share no cache line between CPUs).
pub const BARRIER: &str = "BARRIER";
/// VLAN IDs whose tagged requests are answered (the value is unused); untagged ones always are.
pub const VLANS: &str = "VLANS";

/// Slots of the attachment table: an interface's is its ifindex modulo this.
pub const ATTACHMENT_SLOTS: u32 = 256;
/// Attached interfaces whose ifindexes share a slot (ifindexes repeat across namespaces: the
/// responder serves in the VIP namespace and on host interfaces).
pub const ATTACHMENT_MACS: usize = 4;
/// Served addresses per family (clock aliases and service addresses).
pub const SERVED_V4_MAX: usize = 16;
pub const SERVED_V6_MAX: usize = 16;

/// The slot of the attachment table for an interface.
#[inline(always)]
pub const fn attachment_slot(ifindex: u32) -> u32 {
    ifindex % ATTACHMENT_SLOTS
}

/// What the daemon decides about an attachment before any packet arrives, in one array entry
/// (array lookups cost no hashing): the addresses answered, and the MACs of the attached
/// interfaces with this slot's ifindexes. Each MAC is paired with its interface's ifindex
/// (and matched by both): ifindexes repeat across namespaces, MACs do not, so only frames
/// sent to the receiving interface's own MAC are answered. The served addresses are the same
/// in every slot. Unused places are zero, and past their count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Attachment {
    /// MAC (6 bytes, then two zero bytes) of each attached interface in this slot.
    pub macs: [[u8; 8]; ATTACHMENT_MACS],
    /// The ifindex of the interface that owns `macs[i]`.
    pub mac_ifindex: [u32; ATTACHMENT_MACS],
    /// Served IPv4 destination addresses, in network order.
    pub v4: [[u8; 4]; SERVED_V4_MAX],
    /// Served IPv6 destination addresses.
    pub v6: [[u8; 16]; SERVED_V6_MAX],
    pub mac_count: u8,
    pub v4_count: u8,
    pub v6_count: u8,
    pub _pad: u8,
}

impl Attachment {
    pub const EMPTY: Attachment = Attachment {
        macs: [[0; 8]; ATTACHMENT_MACS],
        mac_ifindex: [0; ATTACHMENT_MACS],
        v4: [[0; 4]; SERVED_V4_MAX],
        v6: [[0; 16]; SERVED_V6_MAX],
        mac_count: 0,
        v4_count: 0,
        v6_count: 0,
        _pad: 0,
    };

    /// Whether IPv4 `dst` is served.
    #[inline(always)]
    pub fn serves_v4(&self, dst: [u8; 4]) -> bool {
        let n = self.v4_count as usize;
        let mut i = 0;
        while i < SERVED_V4_MAX {
            if i >= n {
                return false;
            }
            if self.v4[i] == dst {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether IPv6 `dst` is served.
    #[inline(always)]
    pub fn serves_v6(&self, dst: &[u8; 16]) -> bool {
        let n = self.v6_count as usize;
        let hi = u64::from_ne_bytes([
            dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7],
        ]);
        let lo = u64::from_ne_bytes([
            dst[8], dst[9], dst[10], dst[11], dst[12], dst[13], dst[14], dst[15],
        ]);
        let mut i = 0;
        while i < SERVED_V6_MAX {
            if i >= n {
                return false;
            }
            let a = &self.v6[i];
            let a_hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
            let a_lo = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
            if a_hi == hi && a_lo == lo {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether `mac` is the own MAC of the attached interface `ifindex`.
    #[inline(always)]
    pub fn owns_mac(&self, mac: [u8; 8], ifindex: u32) -> bool {
        let n = self.mac_count as usize;
        let mut i = 0;
        while i < ATTACHMENT_MACS {
            if i >= n {
                return false;
            }
            if self.macs[i] == mac && self.mac_ifindex[i] == ifindex {
                return true;
            }
            i += 1;
        }
        false
    }
}

// SAFETY: repr(C), no padding, every bit pattern valid (bytemuck's derive checks it).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Attachment {}

/// Counts of the benchmark's programs (`crate::bench`), never used by the daemon.
pub const BENCH_COUNTS: &str = "BENCH_COUNTS";

pub const ALL: [&str; 15] = [
    ANCHORS,
    ANCHOR_ACTIVE,
    SERVER_PARAMS,
    ATTACHMENTS,
    COUNTERS,
    POLICY,
    ACL,
    SOURCES,
    SOURCE_SCRATCH,
    RANDOM,
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
        size_of::<SourceRecord>(),
        offset_of!(SourceRecord, guest),
        offset_of!(SourceRecord, guest_addr),
        size_of::<ResponderPolicy>(),
        crate::counters::COUNTER_COUNT as usize,
        // The anchor's slot selection: the generation word (this build: u32, slot = gen & 1).
        size_of::<u32>(),
        crate::anchor::ANCHOR_SLOTS as usize,
        // How the anchor maps are created (mmapable: the daemon writes them through a mapping).
        crate::anchor::ANCHOR_MAP_FLAGS as usize,
        size_of::<SourceKey>(),
        size_of::<Attachment>(),
        ATTACHMENT_SLOTS as usize,
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
