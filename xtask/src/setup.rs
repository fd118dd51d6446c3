//! Installs what the build and the tests need, and nothing that is already there.
//!
//! - the eBPF crate's dated nightly with rust-src, as `ntp-ebpf/rust-toolchain.toml` names it
//!   (the crate is built with `-Z build-std=core`); plain "nightly" is never installed or updated;
//! - Debian's LLVM development files of major `BPF_LLVM_MAJOR`, and bpf-linker (pinned version)
//!   built against them; then a check that the nightly's LLVM major is the linker's;
//! - the tools the tests drive: chrony, ntpsec's ntpdig/ntpdate, iproute2, setpriv, tcpdump;
//!   dnsmasq (the daemon's DHCP server) and busybox (udhcpc, the test guests' DHCP client).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::status;

/// The LLVM major that bpf-linker is built against (the newest Debian ships). The eBPF
/// toolchain's rustc must be on the same major: its bitcode is read by this LLVM.
const BPF_LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The eBPF crate's toolchain file: the one place the dated nightly is named.
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../ntp-ebpf/rust-toolchain.toml");

const APT_PACKAGES: &[&str] = &[
    // bpf-linker's build (LLVM of BPF_LLVM_MAJOR)
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
    // VRRP for redundant VIP hosts (the daemon runs it; its service is never started)
    "keepalived",
    // router advertisements with the route to the IPv6 clock address
    "radvd",
    // the fleet store (the tests run their own members; the service is never started), and
    // protoc for the etcd client's gRPC code
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // the package test: a booted Debian 12 systemd in a container (debootstrap, systemd-nspawn)
    "debootstrap",
    "systemd-container",
    // the alerting rules' unit tests (promtool test rules) and the live alerts test (the
    // prometheus binary in a test namespace, asked with curl); its service is never started
    "prometheus",
    // the fleet test of a host whose clock is behind: libfaketime preloaded into its daemon
    // (the system clock is never touched)
    "faketime",
    "curl",
];

pub fn setup() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    ensure_toolchain(&toolchain)?;
    ensure_apt_packages()?;
    ensure_bpf_linker()?;
    ensure_cargo_tool(&NTPD_RS)?;
    ensure_cargo_tool(&CLOCKBOUND)?;
    ensure_rustfmt()?;
    check_llvm_majors(&toolchain)
}

/// `[toolchain] channel` of ntp-ebpf/rust-toolchain.toml, e.g. "nightly-2026-06-15".
pub fn ebpf_toolchain() -> Result<String> {
    let doc: toml::Table = EBPF_TOOLCHAIN_FILE
        .parse()
        .context("parsing ntp-ebpf/rust-toolchain.toml")?;
    let channel = doc
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .context("ntp-ebpf/rust-toolchain.toml has no [toolchain] channel")?;
    if channel == "nightly" || channel == "stable" || channel == "beta" {
        bail!(
            "ntp-ebpf/rust-toolchain.toml names the moving channel {channel:?}; pin a dated \
             nightly whose LLVM major is {BPF_LLVM_MAJOR}"
        );
    }
    Ok(channel.to_owned())
}

/// rustfmt for the host toolchain (`cargo xtask test` checks formatting); rustup skips it
/// when it is there.
fn ensure_rustfmt() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fmt", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("setup: installing rustfmt");
    status(Command::new("rustup").args(["component", "add", "rustfmt"]))
}

/// Installs exactly the eBPF toolchain with rust-src (idempotent: rustup skips what is there).
fn ensure_toolchain(toolchain: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output();
    if let Ok(out) = installed {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rust-src") {
            return Ok(());
        }
    }
    eprintln!("setup: installing the eBPF toolchain {toolchain} with rust-src");
    status(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// The LLVM major a rustc was built on, from `rustc -vV` ("LLVM version: 22.1.6").
fn rustc_llvm_major(toolchain: &str) -> Result<u32> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "-vV"])
        .output()
        .with_context(|| format!("running rustc -vV of {toolchain}"))?;
    if !out.status.success() {
        bail!(
            "rustc -vV of {toolchain} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    llvm_major_of_rustc(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("no LLVM version in rustc -vV of {toolchain}"))
}

fn llvm_major_of_rustc(version_verbose: &str) -> Option<u32> {
    let v = version_verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?;
    v.split('.').next()?.trim().parse().ok()
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

/// bpf-linker on PATH: its version and the LLVM major of the libLLVM it loads (ldd).
struct InstalledLinker {
    version: String,
    llvm_major: Option<u32>,
}

fn installed_bpf_linker() -> Option<InstalledLinker> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    // "bpf-linker 0.13.0"
    let version = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)?
        .to_owned();
    let path = Command::new("sh")
        .args(["-c", "command -v bpf-linker"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&path.stdout).trim().to_owned();
    let ldd = Command::new("ldd").arg(&path).output().ok()?;
    let llvm_major = llvm_major_of_ldd(&String::from_utf8_lossy(&ldd.stdout));
    Some(InstalledLinker {
        version,
        llvm_major,
    })
}

/// "libLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1" (or "libLLVM-22.so") → 22.
fn llvm_major_of_ldd(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        let rest = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))?;
        rest.split(['.', '-']).next()?.parse().ok()
    })
}

/// Installs the pinned bpf-linker against Debian's LLVM unless exactly that one is there.
fn ensure_bpf_linker() -> Result<()> {
    if let Some(linker) = installed_bpf_linker() {
        if linker.version == BPF_LINKER_VERSION && linker.llvm_major == Some(BPF_LLVM_MAJOR) {
            return Ok(());
        }
        eprintln!(
            "setup: bpf-linker {} (LLVM {}) is not the pinned {BPF_LINKER_VERSION} for LLVM \
             {BPF_LLVM_MAJOR}; reinstalling",
            linker.version,
            linker
                .llvm_major
                .map_or_else(|| "unknown".to_owned(), |m| m.to_string())
        );
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {BPF_LLVM_MAJOR} (about a minute)");
    // LLVM_SYS_221_PREFIX is read by llvm-sys, LLVM_PREFIX by bpf-linker's own build script
    // (without it, it follows /usr/bin/llvm-config, which may be another LLVM).
    status(
        Command::new("cargo")
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{BPF_LLVM_MAJOR}"),
            ])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// A tool built from crates.io at a pinned version, installed by `cargo install --locked`.
struct CargoTool {
    /// The crate on crates.io.
    krate: &'static str,
    version: &'static str,
    /// The installed binary whose `--version` says which version is there.
    binary: &'static str,
    /// Why the tests need it (for the log).
    purpose: &'static str,
}

/// ntpd-rs, the tests' second NTS client (not in Debian 12): its `ntp-ctl force-sync`
/// measures through NTS and, the clock being right, only says so.
const NTPD_RS: CargoTool = CargoTool {
    krate: "ntpd",
    version: "1.9.0",
    binary: "ntp-ctl",
    purpose: "the NTS tests (about two minutes)",
};

/// AWS's ClockBound daemon (not in Debian 12): the error-bound test runs it in a guest, where
/// it reads chronyd's tracking over the command socket and publishes the bound in shared memory.
const CLOCKBOUND: CargoTool = CargoTool {
    krate: "clock-bound-d",
    version: "2.0.3",
    binary: "clockbound",
    purpose: "the error-bound test (about two minutes)",
};

fn ensure_cargo_tool(tool: &CargoTool) -> Result<()> {
    let installed = Command::new(tool.binary)
        .arg("--version")
        .output()
        .ok()
        // ntp-ctl prints its version on stderr.
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.trim().to_string()
        });
    if installed.as_deref() == Some(&format!("{} {}", tool.binary, tool.version)) {
        return Ok(());
    }
    eprintln!(
        "setup: building {} {} for {}",
        tool.krate, tool.version, tool.purpose
    );
    status(Command::new("cargo").args([
        "install",
        "--force",
        "--locked",
        tool.krate,
        "--version",
        tool.version,
    ]))
}

/// Fails before any build when the eBPF toolchain's LLVM is not bpf-linker's: otherwise the
/// link fails deep in ntp-user's build script with "ERROR llvm: Invalid record".
fn check_llvm_majors(toolchain: &str) -> Result<()> {
    let rustc_major = rustc_llvm_major(toolchain)?;
    let linker = installed_bpf_linker().context("bpf-linker is not on PATH after setup")?;
    let linker_major = linker
        .llvm_major
        .context("cannot tell which LLVM bpf-linker loads (no libLLVM in ldd's output)")?;
    llvm_majors_agree(toolchain, rustc_major, linker_major)
}

fn llvm_majors_agree(toolchain: &str, rustc_major: u32, linker_major: u32) -> Result<()> {
    if rustc_major != linker_major {
        bail!(
            "the eBPF toolchain {toolchain} is built on LLVM {rustc_major}, but bpf-linker \
             loads LLVM {linker_major}: its bitcode would fail to link (\"Invalid record\"). \
             Set ntp-ebpf/rust-toolchain.toml to a dated nightly built on LLVM {linker_major} \
             (`rustup run nightly-YYYY-MM-DD rustc -vV` shows it), or move BPF_LLVM_MAJOR in \
             xtask/src/setup.rs to {rustc_major} where Debian ships llvm-{rustc_major}-dev."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_toolchain_is_a_dated_nightly() {
        let t = ebpf_toolchain().unwrap();
        assert!(t.starts_with("nightly-20"), "{t}");
    }

    #[test]
    fn llvm_major_from_rustc_and_ldd() {
        let vv =
            "rustc 1.98.0-nightly (3daae5e42 2026-06-14)\nbinary: rustc\nLLVM version: 22.1.6\n";
        assert_eq!(llvm_major_of_rustc(vv), Some(22));
        assert_eq!(llvm_major_of_rustc("rustc 1.0\n"), None);
        let ldd = "\tlinux-vdso.so.1 (0x0)\n\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x0)\n";
        assert_eq!(llvm_major_of_ldd(ldd), Some(22));
        assert_eq!(llvm_major_of_ldd("\tlibLLVM-23.so => /x (0x0)\n"), Some(23));
        assert_eq!(llvm_major_of_ldd("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }

    #[test]
    fn a_mismatch_names_both_versions_and_the_fix() {
        llvm_majors_agree("nightly-2026-06-15", 22, 22).unwrap();
        let e = llvm_majors_agree("nightly", 23, 22)
            .unwrap_err()
            .to_string();
        assert!(e.contains("LLVM 23") && e.contains("LLVM 22"), "{e}");
        assert!(e.contains("rust-toolchain.toml"), "{e}");
    }
}
