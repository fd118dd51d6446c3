//! The responder as the daemon sees it: load the embedded eBPF object, fill its maps, attach it,
//! publish anchors, read counters.

pub mod admission;
pub mod stats;
pub mod userspace;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use aya_obj::programs::XdpAttachType;
use ipnet::IpNet;
use ntp_common::policy::{GuestClock, ResponderPolicy, SourceState, ACL_ALLOW, ACL_DENY};
use ntp_common::wire::ipv4_mapped_key;
use ntp_common::{Counter, ServerParams, TimeAnchor};

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

/// The compiled `ntp-ebpf` object, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntp-ebpf"));

pub const RESPONDER_PROGRAM: &str = "ntp_responder";
pub const PEER_PASS_PROGRAM: &str = "ntp_peer_pass";
pub const COUNTERS_MAP: &str = "COUNTERS";
pub const RATE_MAP: &str = "RATE";
pub const GUESTS_MAP: &str = "GUESTS";

/// Maps kept in bpffs so that a restarted daemon continues with the same anchor, addresses,
/// counters, per-source rate state and guest clocks while the pinned attachment keeps
/// answering. (The policy and access list are rewritten from the config at every start.)
pub const PINNED_MAPS: [&str; 7] = [
    "ANCHORS",
    "ANCHOR_ACTIVE",
    "SERVER_PARAMS",
    "SERVED_ADDRS",
    COUNTERS_MAP,
    RATE_MAP,
    GUESTS_MAP,
];

/// Sizes of the per-source tables, set when the object is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// Rate-limit state: sources beyond this evict the longest idle.
    pub rate_sources: u32,
    /// Guest clock records.
    pub guests: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            rate_sources: 65_536,
            guests: 65_536,
        }
    }
}

/// An access-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub prefix: IpNet,
    pub allow: bool,
}

/// The LPM key of a prefix: IPv4 as ::ffff:a.b.c.d/(96 + len).
pub fn acl_key(prefix: IpNet) -> LpmKey<[u8; 16]> {
    let prefix = prefix.trunc();
    match prefix {
        IpNet::V4(n) => LpmKey::new(
            96 + n.prefix_len() as u32,
            ipv4_mapped_key(n.addr().octets()),
        ),
        IpNet::V6(n) => LpmKey::new(n.prefix_len() as u32, n.addr().octets()),
    }
}

/// Address of a map key (IPv4-mapped or IPv6).
pub fn key_address(key: &[u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Read-only handles on the maps operators look at (counters, guest clocks, rate table),
/// independent of the [`Responder`] the clock loop holds mutably.
pub struct Observer {
    anchors: Array<MapData, TimeAnchor>,
    active: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    guests: HashMap<MapData, [u8; 16], GuestClock>,
    rate: HashMap<MapData, [u8; 16], SourceState>,
}

impl Observer {
    /// The anchor the kernel serves now.
    pub fn current_anchor(&self) -> Result<TimeAnchor> {
        let slot = self.active.get(&0, 0).context("reading ANCHOR_ACTIVE")? & 1;
        self.anchors.get(&slot, 0).context("reading ANCHORS")
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        read_counters(&self.counters)
    }

    /// Every guest clock record: (source address, record).
    pub fn guest_clocks(&self) -> Vec<(IpAddr, GuestClock)> {
        self.guests
            .iter()
            .flatten()
            .map(|(k, v)| (key_address(&k), v))
            .collect()
    }

    /// How many sources the rate table tracks now.
    pub fn rate_sources(&self) -> usize {
        self.rate.keys().flatten().count()
    }
}

fn reopen(ebpf: &Ebpf, name: &str) -> Result<aya::maps::Map> {
    let map = ebpf
        .map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    let id = match map {
        aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::HashMap(d)
        | aya::maps::Map::Array(d) => d.info()?.id(),
        _ => bail!("map {name} has an unexpected type"),
    };
    Ok(aya::maps::Map::from_map_data(MapData::from_id(id)?)?)
}

/// Where one instance's pins live.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/ntp-xdp").join(instance)
}

/// Left by a daemon that mounted bpffs itself, so that the last `down` can unmount it again.
const BPFFS_MARKER: &str = "/run/ntp-xdp/bpffs-mounted";
/// What the kernel shows in every fresh bpffs (the bpf_preload iterators): not pins.
const BPFFS_KERNEL_ENTRIES: [&str; 2] = ["maps.debug", "progs.debug"];

/// Serializes mounting bpffs and pinning into it against `down` unmounting it. The lock is on
/// /run (always there, never replaced by a mount), not on /sys/fs/bpf, whose inode a mount
/// changes.
pub fn bpffs_lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = std::fs::File::open("/run").context("opening /run")?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking /run for bpffs: {e}"))
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf unless one is there already (call with [`bpffs_lock`] held).
pub fn ensure_bpffs() -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !is_bpffs(root) {
        std::fs::create_dir_all(root).context("creating /sys/fs/bpf")?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs on /sys/fs/bpf")?;
        let marker = Path::new(BPFFS_MARKER);
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(marker, b"").with_context(|| format!("writing {BPFFS_MARKER}"))?;
    }
    Ok(())
}

/// Unmounts /sys/fs/bpf if a daemon of ours mounted it and it holds nothing but the kernel's
/// own entries (call with [`bpffs_lock`] held). Returns what it did.
pub fn release_bpffs() -> Result<Option<String>> {
    let root = Path::new("/sys/fs/bpf");
    if !Path::new(BPFFS_MARKER).exists() || !is_bpffs(root) {
        return Ok(None);
    }
    let unused = std::fs::read_dir(root)
        .context("reading /sys/fs/bpf")?
        .flatten()
        .all(|e| BPFFS_KERNEL_ENTRIES.contains(&&*e.file_name().to_string_lossy()));
    if !unused {
        return Ok(None);
    }
    nix::mount::umount(root).context("unmounting /sys/fs/bpf")?;
    std::fs::remove_file(BPFFS_MARKER).with_context(|| format!("removing {BPFFS_MARKER}"))?;
    Ok(Some(
        "unmounted the bpffs the daemon had mounted on /sys/fs/bpf".into(),
    ))
}

/// Removes an instance's pins: the pinned attachments go (the responder detaches), then the
/// maps. Returns what was removed.
pub fn remove_pins(instance: &str) -> Result<Vec<String>> {
    let dir = pin_dir(instance);
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(removed);
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Links first: nothing may run against maps that are about to go.
    names.sort_by_key(|n| (!n.starts_with("link_"), n.clone()));
    for name in names {
        let path = dir.join(&name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(format!("unpinned {}", path.display()));
    }
    std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    // The shared parent goes when it holds nothing else.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}

/// How an attachment came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new pinned attachment.
    New,
    /// A pinned attachment of an earlier daemon, now running this daemon's program (replaced
    /// atomically: no packet sees the interface without a program).
    Adopted,
}

/// Attaches `prog` to `if_index` (of the calling thread's namespace) through a bpf_link pinned
/// at `link_path`, or, when such a pin still drives this interface, replaces the program in it.
/// `attached_prog_id` is the program the interface runs now (IFLA_XDP), which tells a live pin
/// from one whose device was deleted.
pub fn attach_pinned(
    prog: &mut Xdp,
    if_index: u32,
    mode: XdpMode,
    link_path: &Path,
    attached_prog_id: Option<u32>,
) -> Result<Attached> {
    if link_path.exists() {
        if let Ok(pinned) = PinnedLink::from_pin(link_path) {
            let fd_link: FdLink = pinned.into();
            let live = fd_link
                .info()
                .is_ok_and(|info| Some(info.program_id()) == attached_prog_id);
            if live {
                let link = XdpLink::try_from(fd_link).context("the pinned link is not XDP")?;
                prog.attach_to_link(link)
                    .context("replacing the program in the pinned attachment")?;
                return Ok(Attached::Adopted);
            }
        }
        std::fs::remove_file(link_path)
            .with_context(|| format!("removing stale pin {}", link_path.display()))?;
    }
    let id = prog.attach_to_if_index(if_index, mode)?;
    let link = prog.take_link(id)?;
    let fd_link: FdLink = link
        .try_into()
        .map_err(|_| anyhow!("the kernel attached XDP without a bpf_link; it cannot be pinned"))?;
    fd_link
        .pin(link_path)
        .with_context(|| format!("pinning the attachment at {}", link_path.display()))?;
    Ok(Attached::New)
}

/// A program pinned by a running or earlier daemon (for re-attaching after drift).
pub fn pinned_program(instance: &str, program: &str) -> Result<Xdp> {
    let path = pin_dir(instance).join(format!("prog_{program}"));
    Xdp::from_pin(&path, XdpAttachType::Interface)
        .with_context(|| format!("opening pinned program {}", path.display()))
}

/// A reader copies an anchor in well under a microsecond; flipping no faster than this keeps
/// the double buffer safe without locks (see `load_anchor` in ntp-ebpf).
const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(1);

/// Key of the served-address map for an address.
pub fn served_address_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped_key(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What one publication did to the anchor the daemon asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    pub slot: u32,
    /// How far the requested time was raised so that served time never goes backwards.
    pub held_back_ns: u64,
}

/// What a packet run through the program (BPF_PROG_TEST_RUN) came out as.
#[derive(Debug, Clone)]
pub struct TestRunOutcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub struct Responder {
    ebpf: Ebpf,
    active_slot: u32,
    last_anchor: Option<TimeAnchor>,
    last_publish: Option<Instant>,
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
        Ok(Observer {
            anchors: Array::try_from(reopen(&self.ebpf, "ANCHORS")?)?,
            active: Array::try_from(reopen(&self.ebpf, "ANCHOR_ACTIVE")?)?,
            counters: PerCpuArray::try_from(reopen(&self.ebpf, COUNTERS_MAP)?)?,
            guests: HashMap::try_from(reopen(&self.ebpf, GUESTS_MAP)?)?,
            rate: HashMap::try_from(reopen(&self.ebpf, RATE_MAP)?)?,
        })
    }

    /// Who is answered, limited or denied, and whether guest clocks are recorded.
    pub fn set_policy(&mut self, policy: ResponderPolicy) -> Result<()> {
        let mut map: Array<_, ResponderPolicy> = Array::try_from(self.map("POLICY")?)?;
        map.set(0, policy, 0).context("writing POLICY")?;
        Ok(())
    }

    /// Makes the access list exactly `entries`.
    pub fn set_access_list(&mut self, entries: &[AclEntry]) -> Result<()> {
        let mut map: LpmTrie<_, [u8; 16], u8> = LpmTrie::try_from(self.map("ACL")?)?;
        let old: Vec<LpmKey<[u8; 16]>> = map.keys().flatten().collect();
        for k in old {
            map.remove(&k).context("clearing the access list")?;
        }
        for e in entries {
            let value = if e.allow { ACL_ALLOW } else { ACL_DENY };
            map.insert(&acl_key(e.prefix), value, 0)
                .with_context(|| format!("adding {} to the access list", e.prefix))?;
        }
        Ok(())
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
        Ok(Responder {
            ebpf,
            active_slot: 0,
            last_anchor: None,
            last_publish: None,
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
        check_pinned_layout(dir)?;
        drop_resized_tables(dir, sizes)?;
        let paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        sizes.apply(&mut loader);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut responder = Responder::with_programs_loaded(ebpf, Some(dir))?;
        // Continue from what the attached program serves now.
        let active: u32 = Array::<_, u32>::try_from(responder.map("ANCHOR_ACTIVE")?)?
            .get(&0, 0)
            .context("reading ANCHOR_ACTIVE")?
            .min(ntp_common::anchor::ANCHOR_SLOTS - 1);
        let anchor: TimeAnchor = Array::<_, TimeAnchor>::try_from(responder.map("ANCHORS")?)?
            .get(&active, 0)
            .context("reading ANCHORS")?;
        responder.active_slot = active;
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
        let mut map: HashMap<_, [u8; 16], u8> = HashMap::try_from(self.map("SERVED_ADDRS")?)?;
        let wanted: Vec<[u8; 16]> = addrs.iter().map(|a| served_address_key(*a)).collect();
        let stale: Vec<[u8; 16]> = map
            .keys()
            .flatten()
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            map.remove(&k).context("removing a served address")?;
        }
        for k in wanted {
            map.insert(k, 1, 0).context("adding a served address")?;
        }
        Ok(())
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
        let mut map: Array<_, ServerParams> = Array::try_from(self.map("SERVER_PARAMS")?)?;
        map.set(0, params, 0).context("writing SERVER_PARAMS")?;
        Ok(())
    }

    pub fn add_served_address(&mut self, addr: IpAddr) -> Result<()> {
        let mut map: HashMap<_, [u8; 16], u8> = HashMap::try_from(self.map("SERVED_ADDRS")?)?;
        map.insert(served_address_key(addr), 1, 0)
            .with_context(|| format!("adding served address {addr}"))?;
        Ok(())
    }

    /// Publishes a clock model. The inactive slot is written first, then the index flips, so
    /// the kernel reads either the old or the new anchor whole. If the new model would put the
    /// time at its own reference point behind what the old one serves there, the time is held
    /// at the old value and runs slow until the model meets it ([`hold_monotonic`]): guests
    /// never see time go backwards across an update.
    ///
    /// [`hold_monotonic`]: ntp_common::anchor::hold_monotonic
    pub fn publish_anchor(&mut self, mut anchor: TimeAnchor) -> Result<Publication> {
        if let Some(last) = self.last_publish {
            let since = last.elapsed();
            if since < MIN_PUBLISH_INTERVAL {
                std::thread::sleep(MIN_PUBLISH_INTERVAL - since);
            }
        }
        let mut held_back_ns = 0;
        // Replies from an unsynchronized anchor (LI=3) are not time clients keep, so the first
        // synchronized anchor may start below them (the daemon's one initial step).
        if let Some(prev) = self
            .last_anchor
            .filter(|p| p.is_published() && p.leap != ntp_common::wire::LEAP_UNSYNCHRONIZED)
        {
            held_back_ns = ntp_common::anchor::hold_monotonic(&prev, &mut anchor);
        }
        let slot = 1 - self.active_slot;
        {
            let mut anchors: Array<_, TimeAnchor> = Array::try_from(self.map("ANCHORS")?)?;
            anchors
                .set(slot, anchor, 0)
                .context("writing the anchor slot")?;
        }
        let mut active: Array<_, u32> = Array::try_from(self.map("ANCHOR_ACTIVE")?)?;
        active
            .set(0, slot, 0)
            .context("flipping the active anchor")?;
        self.active_slot = slot;
        self.last_anchor = Some(anchor);
        self.published.send_replace(anchor);
        self.last_publish = Some(Instant::now());
        Ok(Publication { slot, held_back_ns })
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

    /// The kernel's ID of the loaded responder program (as `ntp-user stats` and bpftool show it).
    pub fn program_id(&mut self) -> Result<u32> {
        Ok(self.xdp(RESPONDER_PROGRAM)?.info()?.id())
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or_else(|| anyhow!("map {COUNTERS_MAP} missing"))?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        read_counters(&counters)
    }

    /// Runs one frame through the responder in the kernel (BPF_PROG_TEST_RUN).
    pub fn test_run(&mut self, frame: &[u8]) -> Result<TestRunOutcome> {
        let (action, frame, _) = self.run_frame(frame)?;
        Ok(TestRunOutcome { action, frame })
    }

    /// Runs a fresh copy of `frame` `runs` times, one run per syscall: the verdict (all must
    /// agree) and the kernel's mean time for one run (its timer included). One call with a
    /// `repeat` count would not do: the kernel runs every repetition on the same buffer, so
    /// after a reply (written in place) the later runs would see the reply.
    pub fn test_run_mean(&mut self, frame: &[u8], runs: u32) -> Result<(u32, Duration)> {
        let mut total = Duration::ZERO;
        let mut verdict = None;
        for _ in 0..runs.max(1) {
            let (action, _, took) = self.run_frame(frame)?;
            if verdict.is_some_and(|v| v != action) {
                bail!("the verdict changed between runs of one frame ({verdict:?} then {action})");
            }
            verdict = Some(action);
            total += took;
        }
        Ok((verdict.unwrap_or(0), total / runs.max(1)))
    }

    /// One run of the responder on `frame`: verdict, output frame, the kernel's time for it.
    fn run_frame(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.xdp(RESPONDER_PROGRAM)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
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
    fn apply(&self, loader: &mut EbpfLoader) {
        loader.map_max_entries(RATE_MAP, self.rate_sources.max(1));
        loader.map_max_entries(GUESTS_MAP, self.guests.max(1));
    }
}

/// The per-source tables are caches: a pin of another size (the config changed) is dropped
/// and starts empty, rather than refusing to start.
fn drop_resized_tables(dir: &Path, sizes: TableSizes) -> Result<()> {
    for (name, want) in [(RATE_MAP, sizes.rate_sources), (GUESTS_MAP, sizes.guests)] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if info.max_entries() != want.max(1) {
            tracing::info!(
                map = name,
                old = info.max_entries(),
                new = want,
                "table resized by the config; starting it empty"
            );
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Refuses maps pinned by a build whose map layout differs: reusing them would make the new
/// program read garbage. (`ntp-user down` clears them; the restart is then not hitless.)
fn check_pinned_layout(dir: &Path) -> Result<()> {
    let expect = [
        ("ANCHORS", std::mem::size_of::<TimeAnchor>() as u32),
        ("ANCHOR_ACTIVE", 4),
        ("SERVER_PARAMS", std::mem::size_of::<ServerParams>() as u32),
        ("SERVED_ADDRS", 1),
        (COUNTERS_MAP, 8),
        (RATE_MAP, std::mem::size_of::<SourceState>() as u32),
        (GUESTS_MAP, std::mem::size_of::<GuestClock>() as u32),
    ];
    for (name, value_size) in expect {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let max_ok = name != COUNTERS_MAP || info.max_entries() == Counter::ALL.len() as u32;
        if info.value_size() != value_size || !max_ok {
            bail!(
                "the map pinned at {} was made by an incompatible build (value size {}, expected \
                 {value_size}); stop the old daemon and run `ntp-user down` first",
                path.display(),
                info.value_size()
            );
        }
    }
    Ok(())
}

fn read_counters<T: std::borrow::Borrow<MapData>>(
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
            if map_info.name_as_str() != Some(COUNTERS_MAP) {
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
        bail!("no {RESPONDER_PROGRAM} program is loaded on this machine (is `ntp-user serve` running?)");
    }
    Ok(found)
}

#[cfg(test)]
mod object_tests {
    /// The embedded object was compiled by the pinned eBPF toolchain (its DWARF producer names
    /// that rustc), not by whatever "nightly" the machine has: proves the pin holds.
    #[test]
    fn the_object_comes_from_the_pinned_toolchain() {
        let toolchain = env!("NTP_EBPF_TOOLCHAIN");
        let out = std::process::Command::new("rustup")
            .args(["run", toolchain, "rustc", "-V"])
            .output()
            .expect("rustup run");
        assert!(out.status.success(), "{toolchain} is not installed");
        // "rustc 1.98.0-nightly (3daae5e42 2026-06-14)"
        let version = String::from_utf8(out.stdout).unwrap();
        let version = version.trim().strip_prefix("rustc ").unwrap();
        let producer = format!("rustc version {version}");
        let found = super::EBPF_OBJECT
            .windows(producer.len())
            .any(|w| w == producer.as_bytes());
        assert!(
            found,
            "the eBPF object was not built by {toolchain} ({producer})"
        );
    }
}
