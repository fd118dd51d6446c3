//! Read-only handles on the responder's maps for the operator's views (status, metrics,
//! `ntp-xdp stats`), opened independently of the [`Responder`](super::Responder) the clock
//! task holds.

use std::net::IpAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::Ebpf;
use ntp_common::maps;
use ntp_common::policy::{GuestClock, SourceKey, SourceRecord};
use ntp_common::{Counter, TimeAnchor};

use super::admission::key_address;
use super::anchor_maps::AnchorMaps;
use super::object::RESPONDER_PROGRAM;

/// Read-only handles on the maps operators look at (counters, guest clocks, rate table),
/// independent of the [`Responder`] the clock loop holds mutably.
pub struct Observer {
    anchor: AnchorMaps,
    counters: PerCpuArray<MapData, u64>,
    sources: HashMap<MapData, SourceKey, SourceRecord>,
}

impl Observer {
    /// Opens the maps of a loaded object through handles of their own.
    pub fn open(ebpf: &Ebpf) -> Result<Observer> {
        Ok(Observer {
            anchor: AnchorMaps::new(
                &reopen(ebpf, maps::ANCHORS)?,
                &reopen(ebpf, maps::ANCHOR_ACTIVE)?,
                false,
            )?,
            counters: PerCpuArray::try_from(reopen(ebpf, maps::COUNTERS)?)?,
            sources: HashMap::try_from(reopen(ebpf, maps::SOURCES)?)?,
        })
    }

    /// The anchor the kernel serves now.
    pub fn current_anchor(&self) -> Result<TimeAnchor> {
        self.anchor
            .read()
            .map(|(_, anchor)| anchor)
            .ok_or_else(|| anyhow!("the anchor was republished twice while being read"))
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        read_counters(&self.counters)
    }

    /// Every guest clock record: (source address, VLAN, record). An IPv6 guest's is its
    /// rate prefix's, under the address of its last request with a clock reading.
    pub fn guest_clocks(&self) -> Vec<(IpAddr, u16, GuestClock)> {
        self.sources
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((key_address(&v.guest_addr), k.vlan, v.guest_clock()?)))
            .collect()
    }

    /// How many sources the per-source table tracks now.
    pub fn rate_sources(&self) -> usize {
        self.sources.keys().flatten().count()
    }
}

pub(super) fn reopen(ebpf: &Ebpf, name: &str) -> Result<aya::maps::Map> {
    let map = ebpf
        .map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    let id = match map {
        aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::LpmTrie(d)
        | aya::maps::Map::HashMap(d)
        | aya::maps::Map::Array(d) => d.info()?.id(),
        _ => bail!("map {name} has an unexpected type"),
    };
    Ok(aya::maps::Map::from_map_data(MapData::from_id(id)?)?)
}

pub(super) fn read_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
) -> Result<Vec<(Counter, u64)>> {
    let mut totals = Vec::with_capacity(Counter::ALL.len());
    for &c in Counter::ALL {
        let values = counters.get(&(c as u32), 0).context("reading counters")?;
        totals.push((c, values.iter().sum()));
    }
    Ok(totals)
}

/// Counters of a responder loaded by another process, found by program ID.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResponderStats {
    pub program_id: u32,
    pub counters: Vec<(String, u64)>,
}

/// Finds every loaded `ntp_responder` program on the machine and reads its counters.
pub fn loaded_responder_stats() -> Result<Vec<ResponderStats>> {
    let mut found = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.name_as_str() != Some(RESPONDER_PROGRAM) {
            continue;
        }
        let Some(map_ids) = info.map_ids()? else {
            continue;
        };
        for id in map_ids {
            let map_info = aya::maps::MapInfo::from_id(id)?;
            if map_info.name_as_str() != Some(maps::COUNTERS) {
                continue;
            }
            let data = MapData::from_id(id)?;
            let map = aya::maps::Map::from_map_data(data)?;
            let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map)?;
            let totals = read_counters(&counters)?;
            found.push(ResponderStats {
                program_id: info.id(),
                counters: totals
                    .into_iter()
                    .map(|(c, v)| (c.name().to_string(), v))
                    .collect(),
            });
        }
    }
    if found.is_empty() {
        bail!("no {RESPONDER_PROGRAM} program is loaded on this machine (is `ntp-xdp serve` running?)");
    }
    Ok(found)
}
