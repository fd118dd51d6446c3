//! Shared pieces of the integration tests: namespaces that clean up after themselves, the
//! guest ↔ VIP topology, the `ntp-xdp serve` process, third-party NTP clients and frames.
//!
//! Network rules: IPv4 only from 169.254.0.0/16; IPv6 only inside the test's own namespaces.
//! Every namespace is deleted by its guard, also when a test fails.

pub mod clients;
pub mod fleet;
pub mod fleet_scale;
pub mod frames;
pub mod nts;
pub mod relay;
pub mod topology;
pub mod vip;
pub mod vrrp;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context as _, Result};

/// The clock addresses the big clouds use (EC2: 169.254.169.123 and fd00:ec2::123).
pub const CLOCK_V4: &str = "169.254.169.123";
pub const CLOCK_V6: &str = "fd00:ec2::123";

/// A short name, unique on this machine for this process (interface names have 15 bytes).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 100_000)
}

/// Runs a command and fails with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Path of the `ntp-xdp` binary under test: `NTP_XDP_BIN` (set by `cargo xtask test`), else
/// the debug build next to this workspace.
/// The load generator (`xtask/loadgen`), built beside ntp-xdp by `cargo xtask test`.
pub fn ntp_loadgen_bin() -> std::path::PathBuf {
    match std::env::var_os("NTP_LOADGEN_BIN") {
        Some(p) => p.into(),
        None => ntp_user_bin().with_file_name("ntp-loadgen"),
    }
}

/// A daemon's own report over its control socket (`ntp-xdp status --socket S --json`).
pub fn status_at(socket: &std::path::Path) -> Result<serde_json::Value> {
    let out = run(Command::new(ntp_user_bin())
        .arg("status")
        .arg("--socket")
        .arg(socket)
        .arg("--json"))?;
    Ok(serde_json::from_str(&out)?)
}

pub fn ntp_user_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("NTP_XDP_BIN") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ntp-xdp");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo xtask test`, or build ntp-xdp first",
        p.display()
    );
    p
}
