//! The anchor maps as the daemon writes and reads them: through shared mappings of the two
//! arrays (`BPF_F_MMAPABLE`), with the ordering `ntp_common::anchor::read_published` relies
//! on. A map update syscall per slot and one for the generation would not do on a weakly
//! ordered CPU: the kernel copies each value with a plain `memcpy` (`array_map_update_elem` →
//! `copy_map_value`), and nothing between two such calls orders the first copy before the
//! second for another CPU.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{Map, MapData};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use ntp_common::anchor::{read_published, ANCHOR_MAP_FLAGS, ANCHOR_SLOTS};
use ntp_common::{maps, TimeAnchor};

/// An anchor as the 64-bit words it is stored in.
const WORDS: usize = size_of::<TimeAnchor>() / 8;
const _: () = assert!(size_of::<TimeAnchor>() == WORDS * 8);

/// The anchor slots and the generation word, mapped.
pub struct AnchorMaps {
    slots: Mapping,
    generation: Mapping,
}

impl AnchorMaps {
    /// Maps `ANCHORS` and `ANCHOR_ACTIVE` of a loaded object (`writable` for the publisher).
    pub fn new(anchors: &Map, active: &Map, writable: bool) -> Result<AnchorMaps> {
        Ok(AnchorMaps {
            slots: Mapping::new(
                array(anchors, maps::ANCHORS)?,
                maps::ANCHORS,
                size_of::<TimeAnchor>(),
                ANCHOR_SLOTS,
                writable,
            )?,
            generation: Mapping::new(
                array(active, maps::ANCHOR_ACTIVE)?,
                maps::ANCHOR_ACTIVE,
                size_of::<u32>(),
                1,
                writable,
            )?,
        })
    }

    /// Writes `anchor` into the slot of `generation` (not the live one), then makes
    /// `generation` live. Every store is a release store: a reader that sees any word of this
    /// slot also sees the generation that made the other slot live, and one that sees
    /// `generation` sees the whole slot.
    pub fn publish(&self, generation: u32, anchor: &TimeAnchor) {
        let words: &[u64] = bytemuck::cast_slice(std::slice::from_ref(anchor));
        for (word, value) in self.slot(generation & 1).iter().zip(words) {
            word.store(*value, Ordering::Release);
        }
        self.generation().store(generation, Ordering::Release);
    }

    /// The live generation and its anchor, whole; `None` if the publisher rewrote the slots
    /// twice while this read them.
    pub fn read(&self) -> Option<(u32, TimeAnchor)> {
        let last = std::cell::Cell::new(0);
        let anchor = read_published(
            || {
                let g = self.generation().load(Ordering::Relaxed);
                last.set(g);
                Some(g)
            },
            |slot| {
                let mut words = [0u64; WORDS];
                for (w, word) in words.iter_mut().zip(self.slot(slot)) {
                    *w = word.load(Ordering::Relaxed);
                }
                Some(bytemuck::cast::<[u64; WORDS], TimeAnchor>(words))
            },
            || fence(Ordering::Acquire),
        )?;
        // On success the last generation read is the one the copy was checked against.
        Some((last.get(), anchor))
    }

    fn generation(&self) -> &AtomicU32 {
        // SAFETY: the mapping holds the map's one u32 value at offset 0, page-aligned.
        unsafe { &*self.generation.ptr.as_ptr().cast::<AtomicU32>() }
    }

    fn slot(&self, slot: u32) -> &[AtomicU64] {
        let start = (slot % ANCHOR_SLOTS) as usize * WORDS;
        // SAFETY: the mapping holds ANCHOR_SLOTS values of WORDS words each, back to back
        // (checked when mapped: the value size is a multiple of 8), page-aligned.
        unsafe {
            std::slice::from_raw_parts(
                self.slots.ptr.as_ptr().cast::<AtomicU64>().add(start),
                WORDS,
            )
        }
    }
}

/// The values of one array map, mapped shared (and unmapped on drop).
struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapped memory is only accessed through atomics.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(
        map: &MapData,
        name: &str,
        value_size: usize,
        entries: u32,
        writable: bool,
    ) -> Result<Mapping> {
        let info = map.info().with_context(|| format!("reading map {name}"))?;
        if info.map_flags() & ANCHOR_MAP_FLAGS != ANCHOR_MAP_FLAGS
            || info.value_size() as usize != value_size
            || info.max_entries() != entries
        {
            bail!(
                "map {name} is not this build's (flags {:#x}, value size {}, {} entries)",
                info.map_flags(),
                info.value_size(),
                info.max_entries()
            );
        }
        // An array map's values are laid out every round_up(value_size, 8) bytes.
        let len = entries as usize * value_size.next_multiple_of(8);
        let mut prot = ProtFlags::PROT_READ;
        if writable {
            prot |= ProtFlags::PROT_WRITE;
        }
        let length = NonZeroUsize::new(len).ok_or_else(|| anyhow!("map {name} is empty"))?;
        // SAFETY: a new shared mapping of the map's values, owned by the returned value.
        let ptr = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, map.fd(), 0) }
            .with_context(|| format!("mapping {name}"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped by `Mapping::new` with this length; nothing borrows it any more.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

fn array<'a>(map: &'a Map, name: &str) -> Result<&'a MapData> {
    match map {
        Map::Array(data) => Ok(data),
        _ => bail!("map {name} is not an array"),
    }
}
