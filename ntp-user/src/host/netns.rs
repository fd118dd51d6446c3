//! Network namespaces: named ones under /run/netns (created and removed as `ip netns` does),
//! and entering one for a moment.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns add NAME` puts a namespace.
pub fn named_netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A handle on the calling thread's current network namespace.
pub fn current_netns() -> Result<File> {
    File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")
}

pub fn open_named_netns(name: &str) -> Result<File> {
    let path = named_netns_path(name);
    File::open(&path).with_context(|| {
        format!(
            "network namespace {name:?} not found ({} cannot be opened)",
            path.display()
        )
    })
}

/// Moves the calling thread into `ns`.
pub fn enter(ns: &File) -> Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}

/// Runs `f` inside `ns` and comes back to the namespace the thread was in, even on error.
pub fn within<T>(ns: &File, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = current_netns()?;
    enter(ns)?;
    let result = f();
    enter(&home).context("returning to the original network namespace")?;
    result
}

/// Every named namespace under /run/netns.
pub fn named_namespaces() -> Vec<(String, File)> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(f) = File::open(entry.path()) {
                out.push((name, f));
            }
        }
    }
    out
}

/// Creates the named namespace as `ip netns add` does: an empty file under /run/netns with a
/// new network namespace bind-mounted on it (by a short-lived thread that unshares).
pub fn create_named_netns(name: &str) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let dir = Path::new("/run/netns");
    std::fs::create_dir_all(dir).context("creating /run/netns")?;
    // /run/netns is made a shared mount point, so that namespaces created later are seen by
    // processes in other mount namespaces (as iproute2 does).
    if mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .is_err()
    {
        mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .context("bind-mounting /run/netns on itself")?;
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .context("making /run/netns a shared mount")?;
    }
    let path = named_netns_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting the new namespace on {}", target.display()))
    })
    .join()
    .map_err(|_| anyhow!("the namespace-creating thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(())
}

/// Removes a named namespace (its veth ends go with it).
pub fn delete_named_netns(name: &str) -> Result<()> {
    let path = named_netns_path(name);
    nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", path.display()))?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}
