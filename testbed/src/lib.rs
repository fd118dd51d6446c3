//! The test machine in namespaces, one way for the integration tests, the benchmarks and the
//! demos: namespaces and veths that remove themselves (also when a test fails), guests, the
//! VIP end, bridges, the `ntp-xdp serve` process, and the third-party programs they start
//! (chronyd as server and as query-only client, ntpdig, etcd).
//!
//! Network rules: IPv4 only from 169.254.0.0/16; IPv6 only inside the namespaces made here.
//! Nothing started here may set the clock: NTP programs run without CAP_SYS_TIME.
//!
//! This crate does not depend on ntp-user (xtask uses it before the eBPF toolchain exists);
//! it runs the `ntp-xdp` binary instead.

pub mod chrony;
pub mod etcd;
pub mod netns;
pub mod relay;
pub mod serve;
pub mod topology;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context as _, Result};

pub use netns::{link_namespaces, upstream_namespace, Netns};
pub use topology::Topology;

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
pub fn ntp_xdp_bin() -> PathBuf {
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

/// The load generator (`xtask/loadgen`): `NTP_LOADGEN_BIN`, else beside ntp-xdp.
pub fn ntp_loadgen_bin() -> PathBuf {
    match std::env::var_os("NTP_LOADGEN_BIN") {
        Some(p) => p.into(),
        None => ntp_xdp_bin().with_file_name("ntp-loadgen"),
    }
}

/// A daemon's own report over its control socket (`ntp-xdp status --socket S --json`).
pub fn status_at(socket: &std::path::Path) -> Result<serde_json::Value> {
    let out = run(Command::new(ntp_xdp_bin())
        .arg("status")
        .arg("--socket")
        .arg(socket)
        .arg("--json"))?;
    Ok(serde_json::from_str(&out)?)
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system's temporary directory, named from `prefix`.
    pub fn new(prefix: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
