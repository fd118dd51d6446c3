//! Installs what the build and the tests need, and nothing that is already there.
//!
//! - nightly Rust with rust-src (the eBPF crate is built with `-Z build-std=core`);
//! - Debian's LLVM 22 development files, matching the nightly's LLVM, and bpf-linker built
//!   against them (bpf-linker's default feature wants LLVM 23, which Debian does not ship);
//! - the tools the tests drive: chrony, ntpsec's ntpdig/ntpdate, iproute2, setpriv, tcpdump;
//!   dnsmasq (the daemon's DHCP server) and busybox (udhcpc, the test guests' DHCP client).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::status;

const APT_PACKAGES: &[&str] = &[
    // bpf-linker's build
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // tests and operations
    "chrony",
    "ntpsec-ntpdig",
    "ntpsec-ntpdate",
    "iproute2",
    "util-linux",
    "tcpdump",
    "ethtool",
    "bpftool",
    // DHCP for guests (the binary only: dnsmasq-base has no service to start), and the
    // tests' DHCP client (busybox udhcpc)
    "dnsmasq-base",
    "busybox",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup() -> Result<()> {
    ensure_nightly()?;
    ensure_apt_packages()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_nightly() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output();
    if let Ok(out) = installed {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rust-src") {
            return Ok(());
        }
    }
    eprintln!("setup: installing the nightly toolchain with rust-src");
    status(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// While packages install, no service may start: chrony's postinst would otherwise start a
/// system chronyd that talks to public pools and steps this machine's clock.
struct NoServiceStarts {
    created: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn new() -> Result<NoServiceStarts> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(NoServiceStarts { created: false });
        }
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# ntp-xdp setup: no service starts during install\nexit 101\n",
        )
        .context("writing policy-rc.d")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        Ok(NoServiceStarts { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

fn ensure_apt_packages() -> Result<()> {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing Debian packages {}; run `cargo xtask setup` as root (or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let _guard = NoServiceStarts::new()?;
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
    // LLVM_SYS_221_PREFIX is read by llvm-sys, LLVM_PREFIX by bpf-linker's own build script
    // (without it, it follows /usr/bin/llvm-config, which may be another LLVM).
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}
