//! bpffs and the pins that let the responder outlive its daemon: the maps (so a new daemon
//! continues the anchor, counters and tables), the programs and the attachments (bpf_links).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use aya_obj::programs::XdpAttachType;
use ntp_common::maps::{self, LAYOUT_FINGERPRINT};
use ntp_common::Counter;

use super::admission::TableSizes;

/// Where one instance's pins live.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/ntp-xdp").join(instance)
}

/// Maps kept in bpffs so that a restarted daemon continues with the same anchor, addresses,
/// counters, per-source rate state and guest clocks while the pinned attachment keeps
/// answering. (The policy and access list are rewritten from the config at every start.)
pub const PINNED_MAPS: [&str; 6] = [
    maps::ANCHORS,
    maps::ANCHOR_ACTIVE,
    maps::SERVER_PARAMS,
    maps::ATTACHMENTS,
    maps::COUNTERS,
    maps::SOURCES,
];

/// The maps of this build's layout live in a directory named after its fingerprint: a build
/// whose map values are laid out otherwise never opens them.
pub fn map_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-{LAYOUT_FINGERPRINT:016x}"))
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
    // The marker's directory too, if nothing else of ours lives there now.
    if let Some(dir) = Path::new(BPFFS_MARKER).parent() {
        let _ = std::fs::remove_dir(dir);
    }
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
        if path.is_dir() {
            // A map directory (maps-<fingerprint>): its pins, then itself.
            for e in std::fs::read_dir(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .flatten()
            {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
                removed.push(format!("unpinned {}", e.path().display()));
            }
            std::fs::remove_dir(&path).with_context(|| format!("removing {}", path.display()))?;
            continue;
        }
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

/// The per-source table is a cache: a pin of another size (the config changed) is dropped
/// and starts empty, rather than refusing to start.
pub fn drop_resized_tables(dir: &Path, sizes: TableSizes) -> Result<()> {
    let path = dir.join(maps::SOURCES);
    if !path.exists() {
        return Ok(());
    }
    let info = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("reading pinned map {}", path.display()))?;
    let want = sizes.sources();
    if info.max_entries() != want {
        tracing::info!(
            map = maps::SOURCES,
            old = info.max_entries(),
            new = want,
            "table resized by the config; starting it empty"
        );
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Retires maps pinned by a build whose map layout differs (an upgrade that changed a map's
/// value): reusing them would make this build's program read garbage, or serve a reordered
/// anchor as synchronized, and refusing to start would leave the old program serving a frozen
/// anchor. Such maps sit in another `maps-<fingerprint>` directory (or, from builds before
/// fingerprints, in `dir` itself); a counter table of another length is another layout too.
/// The old program keeps its maps until this build's program replaces it in the pinned
/// attachments; the clock continues from its state file, but the served anchor and the
/// per-source tables start anew, so this one restart is not hitless. Returns what was retired.
pub fn retire_other_layouts(dir: &Path) -> Result<Vec<PathBuf>> {
    let ours = map_dir(dir);
    let mut retired = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(retired);
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("maps-") && path != ours {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            retired.push(path);
        } else if PINNED_MAPS.contains(&&*name) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            retired.push(path);
        }
    }
    let counters = ours.join(maps::COUNTERS);
    if counters.exists() {
        let info = aya::maps::MapInfo::from_pin(&counters)
            .with_context(|| format!("reading pinned map {}", counters.display()))?;
        if info.max_entries() != Counter::ALL.len() as u32 || info.value_size() != 8 {
            std::fs::remove_dir_all(&ours)
                .with_context(|| format!("removing {}", ours.display()))?;
            retired.push(ours);
        }
    }
    if !retired.is_empty() {
        tracing::warn!(
            retired = ?retired,
            layout = format!("maps-{LAYOUT_FINGERPRINT:016x}"),
            "maps pinned by a build with another map layout were retired: this restart is not \
             hitless (the served anchor and the per-source tables start anew)"
        );
    }
    Ok(retired)
}
