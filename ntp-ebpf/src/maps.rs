//! The responder's maps. Their names are `ntp_common::maps` constants (aya names a map after
//! its static); the daemon writes them, the programs read them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use ntp_common::{
    anchor::{ANCHOR_MAP_FLAGS, ANCHOR_SLOTS},
    counters::COUNTER_COUNT,
    maps::{Attachment, ATTACHMENT_SLOTS},
    policy::{
        ResponderPolicy, SourceKey, SourceRecord, SourceState, ACL_TRIE_ENTRIES, VLAN_ID_MAX,
    },
    ServerParams, TimeAnchor,
};

/// The daemon's clock model, double-buffered; `ANCHOR_ACTIVE[0]` is the publication
/// generation, whose low bit names the live slot (see `ntp_common::anchor::read_published`).
/// Mmapable: the daemon writes both through a mapping, with release stores.
#[map]
pub static ANCHORS: Array<TimeAnchor> = Array::with_max_entries(ANCHOR_SLOTS, ANCHOR_MAP_FLAGS);
#[map]
pub static ANCHOR_ACTIVE: Array<u32> = Array::with_max_entries(1, ANCHOR_MAP_FLAGS);
#[map]
pub static SERVER_PARAMS: Array<ServerParams> = Array::with_max_entries(1, 0);
/// Served addresses and own MACs, at `attachment_slot(ifindex)` (see `Attachment`).
#[map]
pub static ATTACHMENTS: Array<Attachment> = Array::with_max_entries(ATTACHMENT_SLOTS, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
pub static POLICY: Array<ResponderPolicy> = Array::with_max_entries(1, 0);
/// Access list: prefixes of ::ffff:0:0/96-mapped IPv4 or IPv6 sources → ACL_ALLOW / ACL_DENY,
/// and `::/0` → the default.
#[map]
pub static ACL: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(ACL_TRIE_ENTRIES, 0);
/// Per source (IPv4 address or IPv6 prefix, with its VLAN): its rate state and the clock its
/// answered requests showed, found with one lookup. LRU: a full table forgets the
/// longest-idle source, so it never refuses a new one. Sized at load.
#[map]
pub static SOURCES: LruHashMap<SourceKey, SourceRecord> = LruHashMap::with_max_entries(65536, 0);
/// Where a new source's entry is built and inserted from (the BPF stack has no room for it).
#[map]
pub static SOURCE_SCRATCH: PerCpuArray<SourceRecord> = PerCpuArray::with_max_entries(1, 0);
/// Each CPU's random generator state (`ntp_common::reply::next_random`), seeded on first use.
#[map]
pub static RANDOM: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// VIP hosts whose VRRP may arrive on the guests' side (see `ntp_common::maps::VRRP_PEERS`).
#[map]
pub static VRRP_PEERS: HashMap<[u8; 16], u8> =
    HashMap::with_max_entries(ntp_common::maps::VRRP_PEERS_MAX, 0);
/// The global kiss-o'-death budget, per CPU (no atomics on the fast path).
#[map]
pub static KOD_BUDGET: PerCpuArray<SourceState> = PerCpuArray::with_max_entries(1, 0);
/// The word each CPU's memory barriers exchange (see `crate::program::full_barrier`).
#[map]
pub static BARRIER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// VLAN IDs whose tagged requests are answered (the value is unused). Looked up only for
/// tagged frames: the untagged path costs nothing more.
#[map]
pub static VLANS: HashMap<u16, u8> = HashMap::with_max_entries(VLAN_ID_MAX as u32, 0);
