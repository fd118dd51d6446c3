//! The responder as the daemon sees it: load the embedded eBPF object, fill its maps, attach it,
//! publish anchors, read counters.
//!
//! - [`object`]: the embedded object and the names of its programs and maps;
//! - [`pins`]: bpffs, pinned maps, programs and attachments (hitless restarts);
//! - [`anchor_maps`]: the anchor's two maps, mapped, as the daemon publishes and reads them;
//! - [`observer`]: read-only map handles for status and metrics;
//! - [`admission`]: access list, rate limit and table sizes as one value;
//! - [`userspace`]: the path that answers what the kernel passes up;
//! - [`test_run`]: BPF_PROG_TEST_RUN for fixtures and micro benchmarks.

pub mod admission;
pub mod anchor_maps;
pub mod attach;
pub mod object;
pub mod observer;
pub mod pins;
pub mod test_run;

use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use ntp_common::maps::{
    self, attachment_slot, Attachment, ATTACHMENT_MACS, ATTACHMENT_SLOTS, SERVED_V4_MAX,
    SERVED_V6_MAX,
};
use ntp_common::policy::ResponderPolicy;
use ntp_common::wire::ipv4_mapped_key;
use ntp_common::{Counter, ServerParams, TimeAnchor};

pub use admission::{acl_key, key_address, AclEntry, TableSizes};
pub use object::{EBPF_OBJECT, PEER_PASS_PROGRAM, RESPONDER_PROGRAM};
pub use observer::{loaded_responder_stats, Observer, ResponderStats};
pub use pins::{
    attach_pinned, bpffs_lock, ensure_bpffs, pin_dir, pinned_program, release_bpffs, remove_pins,
    Attached,
};
pub use test_run::TestRunOutcome;

/// How the responder is attached: what the config's `xdp_mode` and `serve --xdp-mode` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpModePref {
    /// Native where it works (on a veth: when the peer can get a pass program), else generic.
    Auto,
    /// Driver mode; on a veth the peer gets a pass program so XDP_TX frames are delivered.
    Native,
    /// Generic (SKB) mode: works on every device, slower.
    Generic,
    /// No XDP: the daemon's userspace path answers everything.
    Off,
}

/// Key of the served-address map for an address.
pub fn served_address_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped_key(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The most served time is held above a model that went back (it then runs slow, at 500 ppm at
/// most, until the model meets it): a second takes ~33 min to absorb. Beyond it, holding
/// would serve time ahead of the model for days (an hour: 83 days); the daemon steps instead.
pub const MAX_HOLD_NS: u64 = 1_000_000_000;
/// After such a step, replies say LI=3 this long, so clients see the discontinuity for what it
/// is rather than take the earlier time as synchronized.
pub const STEP_UNSYNC_NS: u64 = 300 * 1_000_000_000;

/// Serializes the daemon's read-modify-writes of the attachment table: the served addresses
/// and the own MACs share its entries, and different tasks write each.
static ATTACHMENT_WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The responder's attachment table (served addresses and own MACs, see
/// [`ntp_common::maps::Attachment`]).
pub struct Attachments<T = MapData>(Array<T, Attachment>);

impl Attachments<MapData> {
    fn open(ebpf: &Ebpf) -> Result<Attachments> {
        Ok(Attachments(Array::try_from(observer::reopen(
            ebpf,
            maps::ATTACHMENTS,
        )?)?))
    }
}

impl<'a> Attachments<&'a mut MapData> {
    fn from_map(map: &'a mut aya::maps::Map) -> Result<Self> {
        Ok(Attachments(Array::try_from(map)?))
    }
}

impl<T: std::borrow::BorrowMut<MapData>> Attachments<T> {
    /// Rewrites every slot with `change` (only the slots it changes are written).
    fn rewrite(&mut self, mut change: impl FnMut(u32, &mut Attachment)) -> Result<()> {
        let _one_writer = ATTACHMENT_WRITES.lock().unwrap_or_else(|e| e.into_inner());
        for slot in 0..ATTACHMENT_SLOTS {
            let old = self.0.get(&slot, 0).context("reading ATTACHMENTS")?;
            let mut new = old;
            change(slot, &mut new);
            if new != old {
                // An array entry is copied in place: a packet meanwhile may see a mix of the
                // old and new sets (served or not, as just before or just after the change).
                self.0.set(slot, new, 0).context("writing ATTACHMENTS")?;
            }
        }
        Ok(())
    }

    /// The served addresses (the same in every slot).
    fn served(&self) -> Result<Vec<IpAddr>> {
        let a = self.0.get(&0, 0).context("reading ATTACHMENTS")?;
        let v4 = a.v4[..(a.v4_count as usize).min(SERVED_V4_MAX)]
            .iter()
            .map(|o| IpAddr::from(*o));
        let v6 = a.v6[..(a.v6_count as usize).min(SERVED_V6_MAX)]
            .iter()
            .map(|o| IpAddr::from(*o));
        Ok(v4.chain(v6).collect())
    }

    /// Makes the served addresses exactly `addrs`.
    pub fn set_served(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for addr in addrs {
            match addr {
                IpAddr::V4(a) if !v4.contains(&a.octets()) => v4.push(a.octets()),
                IpAddr::V6(a) if !v6.contains(&a.octets()) => v6.push(a.octets()),
                _ => {}
            }
        }
        if v4.len() > SERVED_V4_MAX || v6.len() > SERVED_V6_MAX {
            bail!(
                "{} IPv4 and {} IPv6 addresses to serve: the responder serves at most \
                 {SERVED_V4_MAX} of each",
                v4.len(),
                v6.len()
            );
        }
        self.rewrite(|_, a| {
            a.v4 = [[0; 4]; SERVED_V4_MAX];
            a.v4[..v4.len()].copy_from_slice(&v4);
            a.v4_count = v4.len() as u8;
            a.v6 = [[0; 16]; SERVED_V6_MAX];
            a.v6[..v6.len()].copy_from_slice(&v6);
            a.v6_count = v6.len() as u8;
        })
    }

    /// Makes the own MACs exactly `macs` (MAC, ifindex of the attached interface that owns it).
    pub fn set_own_macs(&mut self, macs: &[([u8; 6], u32)]) -> Result<()> {
        let mut slots: std::collections::BTreeMap<u32, Vec<([u8; 8], u32)>> = Default::default();
        for (m, ifindex) in macs {
            let key = [m[0], m[1], m[2], m[3], m[4], m[5], 0, 0];
            let here = slots.entry(attachment_slot(*ifindex)).or_default();
            if !here.contains(&(key, *ifindex)) {
                here.push((key, *ifindex));
            }
            if here.len() > ATTACHMENT_MACS {
                bail!(
                    "more than {ATTACHMENT_MACS} attached interfaces with ifindexes equal \
                     modulo {ATTACHMENT_SLOTS} (ifindex {ifindex})"
                );
            }
        }
        self.rewrite(|slot, a| {
            let wanted = slots.get(&slot).map(Vec::as_slice).unwrap_or_default();
            a.macs = [[0; 8]; ATTACHMENT_MACS];
            a.mac_ifindex = [0; ATTACHMENT_MACS];
            for (i, (mac, ifindex)) in wanted.iter().enumerate() {
                a.macs[i] = *mac;
                a.mac_ifindex[i] = *ifindex;
            }
            a.mac_count = wanted.len() as u8;
        })
    }
}

/// The responder's served addresses, held by another task.
pub struct ServedAddrs(Attachments);

impl ServedAddrs {
    /// Makes the served addresses exactly `addrs`.
    pub fn set(&mut self, addrs: &[IpAddr]) -> Result<()> {
        self.0.set_served(addrs)
    }
}

/// The size of the responder's VRRP peer table (`VRRP_PEERS` in the eBPF object).
pub const MAX_VRRP_PEERS: usize = ntp_common::maps::VRRP_PEERS_MAX as usize;

/// Makes a map of addresses (keyed as the served addresses are) exactly `addrs` (stale ones
/// out first).
fn set_address_keys<T: std::borrow::BorrowMut<MapData>>(
    map: &mut HashMap<T, [u8; 16], u8>,
    addrs: &[IpAddr],
) -> Result<()> {
    let wanted: Vec<[u8; 16]> = addrs.iter().map(|a| served_address_key(*a)).collect();
    let stale: Vec<[u8; 16]> = map
        .keys()
        .flatten()
        .filter(|k| !wanted.contains(k))
        .collect();
    for k in stale {
        map.remove(&k).context("removing an address")?;
    }
    for k in wanted {
        map.insert(k, 1, 0).context("adding an address")?;
    }
    Ok(())
}

/// The responder's own MACs (see [`Responder::set_own_macs`]), held by another task.
pub struct OwnMacs(Attachments);

impl OwnMacs {
    /// Makes the own MACs exactly `macs`.
    pub fn set(&mut self, macs: &[([u8; 6], u32)]) -> Result<()> {
        self.0.set_own_macs(macs)
    }
}

/// What one publication did to the anchor the daemon asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    /// The generation now live (its slot is `generation & 1`).
    pub generation: u32,
    /// The model went back by more than [`MAX_HOLD_NS`]: served time was stepped back by this
    /// much instead of held, and replies say LI=3 for [`STEP_UNSYNC_NS`].
    pub stepped_back_ns: u64,
    /// How far the requested time was raised so that served time never goes backwards.
    pub held_back_ns: u64,
}

pub struct Responder {
    ebpf: Ebpf,
    /// `ANCHORS` and `ANCHOR_ACTIVE`, mapped for publishing.
    anchor_maps: anchor_maps::AnchorMaps,
    /// `ANCHOR_ACTIVE[0]`: bumped by one at every publication, the live slot is its low bit.
    /// The kernel re-reads it after copying an anchor and discards a copy whose generation
    /// moved meanwhile, so no timing between publications is assumed.
    generation: u32,
    last_anchor: Option<TimeAnchor>,
    /// After a step back beyond [`MAX_HOLD_NS`]: anchors say LI=3 until this monotonic time.
    unsynchronized_until: Option<u64>,
    /// Every published anchor, for the userspace path (same anchor as the kernel).
    published: tokio::sync::watch::Sender<TimeAnchor>,
}

impl Responder {
    /// Loads the object and both programs into the kernel (verifier included); attaches nothing.
    pub fn load() -> Result<Responder> {
        Responder::load_sized(TableSizes::default())
    }

    /// [`Responder::load`] with the per-source tables sized.
    pub fn load_sized(sizes: TableSizes) -> Result<Responder> {
        let mut loader = EbpfLoader::new();
        sizes.apply(&mut loader);
        let ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut responder = Responder::with_programs_loaded(ebpf, None)?;
        responder.set_params(ServerParams::DEFAULT)?;
        Ok(responder)
    }

    /// Handles for reading counters and guest records from another task.
    pub fn observer(&self) -> Result<Observer> {
        Observer::open(&self.ebpf)
    }

    /// Who is answered, limited or denied, and whether guest clocks are recorded.
    pub fn set_policy(&mut self, policy: ResponderPolicy) -> Result<()> {
        let mut map: Array<_, ResponderPolicy> = Array::try_from(self.map(maps::POLICY)?)?;
        map.set(0, policy, 0).context("writing POLICY")?;
        Ok(())
    }

    /// Makes the access list exactly `entries`, in place (see [`admission::AclRewrite`]).
    pub fn set_access_list(&mut self, entries: &[AclEntry]) -> Result<()> {
        let mut map: LpmTrie<_, [u8; 16], u8> = LpmTrie::try_from(self.map(maps::ACL)?)?;
        admission::write_access_list(&mut map, entries, || Ok(()))
    }

    /// Makes the VLANs whose tagged requests are answered exactly `vlans` (untagged requests
    /// always are; a request tagged otherwise is dropped).
    pub fn set_vlans(&mut self, vlans: &[u16]) -> Result<()> {
        let mut map: HashMap<_, u16, u8> = HashMap::try_from(self.map(maps::VLANS)?)?;
        admission::write_vlans(&mut map, vlans)
    }

    /// Writes the policy, the access list and the VLANs of `spec` into the maps.
    pub fn apply_admission(&mut self, spec: &admission::AdmissionSpec) -> Result<()> {
        self.admission_writer()?.apply(spec)
    }

    /// Handles on the policy, the access list and the VLANs for another task: the fleet
    /// agent changes them live, without a restart.
    pub fn admission_writer(&self) -> Result<admission::AdmissionWriter> {
        use observer::reopen;
        Ok(admission::AdmissionWriter {
            policy: Array::try_from(reopen(&self.ebpf, maps::POLICY)?)?,
            acl: LpmTrie::try_from(reopen(&self.ebpf, maps::ACL)?)?,
            vlans: HashMap::try_from(reopen(&self.ebpf, maps::VLANS)?)?,
        })
    }

    /// Loads (verifies) both programs, pinning them under `pin_dir` when given.
    fn with_programs_loaded(mut ebpf: Ebpf, pin_dir: Option<&Path>) -> Result<Responder> {
        for name in [RESPONDER_PROGRAM, PEER_PASS_PROGRAM] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading XDP program {name} (verifier)"))?;
            if let Some(dir) = pin_dir {
                let pin = dir.join(format!("prog_{name}"));
                let _ = std::fs::remove_file(&pin);
                prog.pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
            }
        }
        let anchor_maps = anchor_maps::AnchorMaps::new(
            ebpf.map(maps::ANCHORS)
                .ok_or_else(|| anyhow!("map {} missing", maps::ANCHORS))?,
            ebpf.map(maps::ANCHOR_ACTIVE)
                .ok_or_else(|| anyhow!("map {} missing", maps::ANCHOR_ACTIVE))?,
            true,
        )?;
        Ok(Responder {
            ebpf,
            anchor_maps,
            generation: 0,
            last_anchor: None,
            unsynchronized_until: None,
            published: tokio::sync::watch::Sender::new(TimeAnchor::default()),
        })
    }

    /// Loads the programs with their maps pinned under `dir`: maps an earlier daemon left are
    /// reused as they are (anchor, served addresses, counters), so what the attached program
    /// serves continues; the programs are pinned too, for re-attachment after drift.
    pub fn load_pinned(dir: &Path, sizes: TableSizes) -> Result<Responder> {
        // Held until the programs are pinned: a `down` elsewhere must not unmount in between.
        let _bpffs = bpffs_lock()?;
        ensure_bpffs()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        pins::retire_other_layouts(dir)?;
        let map_dir = pins::map_dir(dir);
        std::fs::create_dir_all(&map_dir)
            .with_context(|| format!("creating {}", map_dir.display()))?;
        pins::drop_resized_tables(&map_dir, sizes)?;
        let mut loader = EbpfLoader::new();
        sizes.apply(&mut loader);
        for name in pins::PINNED_MAPS {
            loader.map_pin_path(name, map_dir.join(name));
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut responder = Responder::with_programs_loaded(ebpf, Some(dir))?;
        // Continue from what the attached program serves now, and its generation.
        let (generation, anchor) = responder
            .anchor_maps
            .read()
            .ok_or_else(|| anyhow!("the pinned anchor is being rewritten by another daemon"))?;
        responder.generation = generation;
        responder.last_anchor = anchor.is_published().then_some(anchor);
        responder.published.send_replace(anchor);
        Ok(responder)
    }

    /// The anchors as they are published, for the userspace path.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<TimeAnchor> {
        self.published.subscribe()
    }

    /// The anchor the kernel serves now (adopted from an earlier daemon, or last published).
    pub fn current_anchor(&self) -> Option<TimeAnchor> {
        self.last_anchor
    }

    /// Makes the served-address map exactly `addrs` (a pinned map may hold an older config's).
    pub fn set_served_addresses(&mut self, addrs: &[IpAddr]) -> Result<()> {
        Attachments::from_map(self.map(maps::ATTACHMENTS)?)?.set_served(addrs)
    }

    /// Makes the VRRP peer table exactly `peers` (at most [`MAX_VRRP_PEERS`]): the only sources whose adverts for this
    /// host's group (`ServerParams::vrrp_router_id`) pass where the responder serves.
    pub fn set_vrrp_peers(&mut self, peers: &[IpAddr]) -> Result<()> {
        let mut map: HashMap<_, [u8; 16], u8> = HashMap::try_from(self.map(maps::VRRP_PEERS)?)?;
        set_address_keys(&mut map, peers)
    }

    /// Makes the table of own MACs exactly `macs` (MAC, ifindex of the attached interface
    /// that owns it): frames to any other MAC are passed, never answered.
    pub fn set_own_macs(&mut self, macs: &[([u8; 6], u32)]) -> Result<()> {
        Attachments::from_map(self.map(maps::ATTACHMENTS)?)?.set_own_macs(macs)
    }

    /// A handle on the served-address map for another task (a redundant VIP host's role
    /// watcher: the addresses are served only while this host holds them).
    pub fn served_addrs(&self) -> Result<ServedAddrs> {
        Ok(ServedAddrs(Attachments::open(&self.ebpf)?))
    }

    /// A handle on the own-MAC table for another task (the repair pass re-registers the MAC
    /// of an interface it recreated).
    pub fn own_macs(&self) -> Result<OwnMacs> {
        Ok(OwnMacs(Attachments::open(&self.ebpf)?))
    }

    /// A handle of its own on one of the maps (for the userspace path's admission, which
    /// reads and writes the same maps from another task).
    pub fn reopen_map(&self, name: &str) -> Result<aya::maps::Map> {
        observer::reopen(&self.ebpf, name)
    }

    /// One of the loaded programs, for attaching.
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self.xdp(name)?)
    }

    /// Routes the program's aya-log records to the `log` facade (diagnostics, off by default).
    pub fn enable_kernel_log(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("initialising aya-log")
    }

    pub fn set_params(&mut self, params: ServerParams) -> Result<()> {
        let mut map: Array<_, ServerParams> = Array::try_from(self.map(maps::SERVER_PARAMS)?)?;
        map.set(0, params, 0).context("writing SERVER_PARAMS")?;
        Ok(())
    }

    pub fn add_served_address(&mut self, addr: IpAddr) -> Result<()> {
        let mut table = Attachments::from_map(self.map(maps::ATTACHMENTS)?)?;
        let mut served = table.served()?;
        served.push(addr);
        table
            .set_served(&served)
            .with_context(|| format!("adding served address {addr}"))
    }

    /// Publishes a clock model. The inactive slot is written first, then the index flips, so
    /// the kernel reads either the old or the new anchor whole. If the new model would put the
    /// time at its own reference point behind what the old one serves there, the time is held
    /// at the old value and runs slow until the model meets it ([`hold_monotonic`]): guests
    /// never see time go backwards across an update.
    ///
    /// [`hold_monotonic`]: ntp_common::anchor::hold_monotonic
    pub fn publish_anchor(&mut self, mut anchor: TimeAnchor) -> Result<Publication> {
        let mut held_back_ns = 0;
        let mut stepped_back_ns = 0;
        // Replies from an unsynchronized anchor (LI=3) are not time clients keep, so the first
        // synchronized anchor may start below them (the daemon's one initial step).
        if let Some(prev) = self
            .last_anchor
            .filter(|p| p.is_published() && p.leap != ntp_common::wire::LEAP_UNSYNCHRONIZED)
        {
            let mut held = anchor;
            let back = ntp_common::anchor::hold_monotonic(&prev, &mut held);
            if back > MAX_HOLD_NS {
                // Too far to hold: step, and say so to clients for a while.
                stepped_back_ns = back;
                self.unsynchronized_until = Some(anchor.mono_ns.saturating_add(STEP_UNSYNC_NS));
            } else {
                anchor = held;
                held_back_ns = back;
            }
        }
        if let Some(until) = self.unsynchronized_until {
            if anchor.mono_ns < until {
                anchor.leap = ntp_common::wire::LEAP_UNSYNCHRONIZED;
            } else {
                self.unsynchronized_until = None;
            }
        }
        let generation = self.generation.wrapping_add(1);
        self.anchor_maps.publish(generation, &anchor);
        self.generation = generation;
        self.last_anchor = Some(anchor);
        self.published.send_replace(anchor);
        Ok(Publication {
            generation,
            stepped_back_ns,
            held_back_ns,
        })
    }

    /// Attaches the responder to `if_index` of the calling thread's network namespace.
    pub fn attach_responder(&mut self, if_index: u32, mode: XdpMode) -> Result<(), ProgramError> {
        self.xdp(RESPONDER_PROGRAM)?
            .attach_to_if_index(if_index, mode)
            .map(|_| ())
    }

    /// Attaches the pass-through program (for the far end of a veth in native mode).
    pub fn attach_peer_pass(&mut self, if_index: u32) -> Result<(), ProgramError> {
        self.xdp(PEER_PASS_PROGRAM)?
            .attach_to_if_index(if_index, XdpMode::Driver)
            .map(|_| ())
    }

    /// The kernel's ID of the loaded responder program (as `ntp-xdp stats` and bpftool show it).
    pub fn program_id(&mut self) -> Result<u32> {
        Ok(self.xdp(RESPONDER_PROGRAM)?.info()?.id())
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or_else(|| anyhow!("map {} missing", maps::COUNTERS))?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        observer::read_counters(&counters)
    }

    fn xdp(&mut self, name: &str) -> Result<&mut Xdp, ProgramError> {
        self.ebpf
            .program_mut(name)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }
}

impl TableSizes {
    /// Entries of the per-source table, which holds both (a source's rate state and its
    /// guest clock record share an entry).
    pub fn sources(&self) -> u32 {
        self.rate_sources.max(self.guests).max(1)
    }

    fn apply(&self, loader: &mut EbpfLoader) {
        loader.map_max_entries(maps::SOURCES, self.sources());
    }
}
