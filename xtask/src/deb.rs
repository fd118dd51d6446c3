//! `cargo xtask deb`: a Debian package of the daemon, built with dpkg-deb: `ntp-xdp` in
//! /usr/bin, the documented default config as a conffile in /etc/ntp-xdp, the systemd unit
//! (no CAP_SYS_TIME, the clock protected), maintainer scripts (`ntp-xdp down` on removal),
//! and the runtime dependencies. `cargo xtask test` checks it: installed into a scratch root,
//! the unit verified by systemd-analyze, the config accepted, and a purge leaves nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{status, workspace_root};

/// The booted test's name (tests/tests/systemd_package.rs): `cargo xtask test` builds what it
/// needs when it runs.
pub const BOOTED_TEST: &str = "booted_systemd_package";

const PACKAGE: &str = "ntp-xdp";

fn architecture() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("dpkg --print-architecture")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn install(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds the package around `bin` into `out_dir`; returns its path.
pub fn build_deb(bin: &Path, out_dir: &Path) -> Result<PathBuf> {
    build_deb_version(bin, out_dir, env!("CARGO_PKG_VERSION"))
}

/// [`build_deb`] with another version (the booted test's upgrade).
pub fn build_deb_version(bin: &Path, out_dir: &Path, version: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let arch = architecture()?;
    let stage = out_dir.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    // Stripped: the symbols stay in the build tree (target/release/ntp-xdp).
    std::fs::create_dir_all(stage.join("usr/bin"))?;
    status(
        Command::new("strip")
            .args(["--strip-unneeded", "-o"])
            .arg(stage.join("usr/bin/ntp-xdp"))
            .arg(bin),
    )?;
    install(
        &root.join("ntp-user/src/config/default-config.toml"),
        &stage.join("etc/ntp-xdp/ntp-xdp.toml"),
        0o644,
    )?;
    install(
        &root.join("xtask/deb/ntp-xdp.service"),
        &stage.join("lib/systemd/system/ntp-xdp.service"),
        0o644,
    )?;
    install(
        &root.join("xtask/deb/monitoring/ntp-xdp.rules.yml"),
        &stage.join("usr/share/ntp-xdp/monitoring/ntp-xdp.rules.yml"),
        0o644,
    )?;
    install(
        &root.join("xtask/deb/monitoring/ntp-xdp.dashboard.json"),
        &stage.join("usr/share/ntp-xdp/monitoring/ntp-xdp.dashboard.json"),
        0o644,
    )?;
    install(
        &root.join("README.md"),
        &stage.join("usr/share/doc/ntp-xdp/README.md"),
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &root.join("xtask/deb").join(script),
            &stage.join("DEBIAN").join(script),
            0o755,
        )?;
    }
    std::fs::write(
        stage.join("DEBIAN/conffiles"),
        "/etc/ntp-xdp/ntp-xdp.toml\n",
    )?;
    std::fs::write(
        stage.join("DEBIAN/control"),
        format!(
            "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\n\
             Maintainer: ntp-xdp developers <ntp-xdp@localhost>\nSection: net\n\
             Priority: optional\nDepends: libc6, dnsmasq-base, iproute2\n\
             Recommends: keepalived, radvd\nSuggests: prometheus, grafana\n\
             Description: in-kernel NTP responder for cloud guests\n \
             An XDP program answers NTP client requests on a VIP host's service namespace\n \
             from a clock the daemon disciplines against upstream servers; the daemon owns\n \
             the namespace, veth, addresses, DHCP (option 121), router advertisements and,\n \
             with keepalived, the failover to a standby host.\n"
        ),
    )?;
    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// What a scratch-root dpkg needs, and the flags that keep it there.
fn dpkg(scratch: &Path) -> Command {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", scratch.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--force-not-root",
        ])
        .env("DPKG_ROOT", scratch);
    cmd
}

/// The package installed into a scratch root: files where they belong, the unit verified by
/// systemd-analyze against this machine's units, the config accepted by `ntp-xdp
/// check-config`; purged: nothing of it left.
pub fn check_package(bin: &Path, work: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(work);
    let deb = build_deb(bin, work)?;
    let scratch = work.join("root");
    let admin = scratch.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d))?;
    }
    std::fs::write(admin.join("status"), "")?;
    status(dpkg(&scratch).arg("-i").arg(&deb))?;
    for f in [
        "usr/bin/ntp-xdp",
        "etc/ntp-xdp/ntp-xdp.toml",
        "lib/systemd/system/ntp-xdp.service",
        "usr/share/ntp-xdp/monitoring/ntp-xdp.rules.yml",
        "usr/share/ntp-xdp/monitoring/ntp-xdp.dashboard.json",
    ] {
        if !scratch.join(f).exists() {
            bail!("the package did not install /{f}");
        }
    }
    let sections = Command::new("readelf")
        .arg("--section-headers")
        .arg(scratch.join("usr/bin/ntp-xdp"))
        .output()
        .context("running readelf")?;
    let sections = String::from_utf8_lossy(&sections.stdout);
    if sections.contains(".symtab") || sections.contains(".debug_info") {
        bail!("the packaged ntp-xdp is not stripped");
    }
    let check = Command::new(scratch.join("usr/bin/ntp-xdp"))
        .args(["check-config", "--config"])
        .arg(scratch.join("etc/ntp-xdp/ntp-xdp.toml"))
        .output()?;
    if !check.status.success() {
        bail!(
            "ntp-xdp check-config refused the installed config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // systemd-analyze verify inside the scratch root, with this machine's units beside ours
    // (the unit's dependencies: sysinit.target, network-online.target, ...).
    let units = scratch.join("lib/systemd/system");
    for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let dst = units.join(e.file_name());
            if !dst.exists() && e.path().is_file() {
                let _ = std::fs::copy(e.path(), dst);
            }
        }
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", scratch.display()))
        .arg("/lib/systemd/system/ntp-xdp.service")
        .output()
        .context("running systemd-analyze verify")?;
    let said = String::from_utf8_lossy(&verify.stderr).to_string()
        + &String::from_utf8_lossy(&verify.stdout);
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("ntp-xdp.service") && !l.trim().is_empty())
        .collect();
    if !verify.status.success() || !complaints.is_empty() {
        bail!("systemd-analyze verify: {}", said.trim());
    }
    status(dpkg(&scratch).args(["--purge", PACKAGE]))?;
    for f in [
        "usr/bin/ntp-xdp",
        "etc/ntp-xdp",
        "lib/systemd/system/ntp-xdp.service",
        "usr/share/doc/ntp-xdp",
    ] {
        if scratch.join(f).exists() {
            bail!("purging the package left /{f}");
        }
    }
    let _ = std::fs::remove_dir_all(work);
    Ok(())
}

/// The Debian mirror apt on this machine uses (its sources), for debootstrap.
fn debian_mirror() -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    for e in std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
    {
        texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .trim_end_matches('/')
        .to_string()
}

/// Marks a rootfs that is complete (debootstrap finished, the package's dependencies fetched).
const ROOTFS_READY: &str = ".ntp-xdp-rootfs-ready";

/// A minimal Debian 12 that boots systemd (for the booted package test), built once under
/// target/debian/bookworm: debootstrap from this machine's mirror, then the package's
/// dependencies and recommendations downloaded into apt's cache, so that `apt install
/// ./ntp-xdp_*.deb` in a container without a network resolves them as apt does.
pub fn debian_rootfs() -> Result<PathBuf> {
    let dir = workspace_root().join("target/debian");
    let root = dir.join("bookworm");
    if root.join(ROOTFS_READY).exists() {
        return Ok(root);
    }
    let tmp = dir.join("bookworm.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&dir)?;
    let mirror = debian_mirror();
    eprintln!(
        "xtask: debootstrap bookworm from {mirror} (once; cached in {})",
        root.display()
    );
    status(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,iproute2",
                "bookworm",
            ])
            .arg(&tmp)
            .arg(&mirror),
    )
    .context("debootstrap (the Debian mirror must be reachable)")?;
    status(
        Command::new("chroot")
            .arg(&tmp)
            .args(["apt-get", "install", "--download-only", "-y", "-q"])
            .args(["dnsmasq-base", "iproute2", "keepalived", "radvd"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    std::fs::write(tmp.join(ROOTFS_READY), "")?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&tmp, &root)?;
    Ok(root)
}
