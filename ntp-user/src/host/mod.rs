//! The host plumbing: netlink, network namespaces, the VIP host's namespace/veth/addresses,
//! DHCP (dnsmasq) and the host clock.
pub mod dhcp;
pub mod files;
pub mod helper;
pub mod hostclock;
pub mod keepalived;
pub mod netlink;
pub mod netns;
pub mod radvd;
pub mod timestamping;
pub mod vip;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// Whether `pid` has exited and waits for its parent to reap it (a helper of this very
/// process, whose reaper is not running while it stops).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? == "Z"))
        .unwrap_or(false)
}

/// Stops a helper (dnsmasq, keepalived) an earlier daemon left running: the pid in
/// `pid_file`, only if that process is `program` and names that pid file on its command line
/// (a recycled pid is never signalled). Returns the pid stopped.
pub fn stop_by_pid_file(pid_file: &Path, program: &str) -> Result<Option<i32>> {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return Ok(None);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(None);
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    let argv0 = cmdline.split('\0').next().unwrap_or("");
    if !argv0.ends_with(program) || !cmdline.contains(&*pid_file.to_string_lossy()) {
        return Ok(None);
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("stopping a stale {program}"))?;
    for _ in 0..100 {
        if nix::sys::signal::kill(pid, None).is_err() || is_zombie(pid.as_raw()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(pid_file);
    Ok(Some(pid.as_raw()))
}
