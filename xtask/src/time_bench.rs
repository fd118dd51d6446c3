//! `cargo xtask bench --time`: the served time as a guest sees it, ntp-xdp side by side with
//! chronyd relaying the same upstreams.
//!
//! Three chronyd servers (`local stratum 3`) in namespaces of their own are the upstreams. The
//! daemon runs in the VIP host's namespace, disciplined against them (`--set clock.max_poll=4`),
//! serving the clock address on the VIP veth in native XDP. chronyd as a relay (`-x`, the
//! same three servers at `minpoll 4 maxpoll 4`) serves the VIP veth's service address from the
//! VIP namespace, which reaches the upstreams through the host namespace. After both are
//! synchronized and have settled, a guest measures each in turn with `chronyd -Q` (one sample
//! per query) until the time is up; after each pair the daemon's own served − host clock is
//! read from its status ("ntp-xdp-clock"), which separates its clock from its serving path,
//! with the error bound its replies state ("served_bound_s"). Every namespace shares this
//! machine's one clock, so each offset a guest sees is an error. Returns the samples as JSON;
//! never sets a clock; addresses in 169.254.160.0/21 only, removed at the end.
//!
//! Environment: NTPX_TIME_MINUTES (measuring, default 3), NTPX_TIME_SETTLE_S (default 60),
//! NTPX_TIME_LOG (a file for the daemon's log; its level from NTPX_SERVE_LOG).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use testbed::chrony::{chronyd_query, ChronyServer};
use testbed::serve::ServeProcess;
use testbed::{link_namespaces, upstream_namespace, Netns, Topology, CLOCK_V4};

const UPSTREAM_STRATUM: u8 = 3;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits until `addr` answers the guest synchronized at the upstreams' stratum + 1.
fn wait_synchronized(t: &Topology, addr: &str, what: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(m) = chronyd_query(&t.guest, addr) {
            if m.stratum == UPSTREAM_STRATUM + 1 && m.tests_passed {
                eprintln!(
                    "time bench: {what} synchronized after {:?}",
                    start.elapsed()
                );
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("{what} did not synchronize within 180 s");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The daemon's own view from its status: served time − host clock, and the error bound its
/// replies state (root delay / 2 + root dispersion; none while unsynchronized).
fn daemon_clock(socket: &std::path::Path) -> Result<(f64, Option<f64>)> {
    let status = testbed::status_at(socket)?;
    clock_of(&status["clock"])
}

/// (served − host clock, served error bound) from the status report's `clock`: the fields
/// must be there (a renamed one fails the bench rather than reading as zero).
fn clock_of(clock: &Value) -> Result<(f64, Option<f64>)> {
    let field = |name: &str| {
        clock[name]
            .as_f64()
            .with_context(|| format!("no clock.{name} in the status: {clock}"))
    };
    let offset = field("host_clock_offset_s")?;
    let synchronized = clock["synchronized"]
        .as_bool()
        .with_context(|| format!("no clock.synchronized in the status: {clock}"))?;
    let bound = field("root_delay_s")? / 2.0 + field("root_dispersion_s")?;
    Ok((offset, synchronized.then_some(bound)))
}

/// Runs the comparison against `ntp-xdp` at `bin`: the samples and the run's settings.
pub fn run(bin: &std::path::Path) -> Result<Value> {
    let minutes = env_f64("NTPX_TIME_MINUTES", 3.0);
    let settle = Duration::from_secs_f64(env_f64("NTPX_TIME_SETTLE_S", 60.0));
    let t = Topology::new(160)?;
    let host = Netns::new("nth")?;
    let mut upstreams = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3u8 {
        let subnet = 161 + i;
        let (ns, addr) = upstream_namespace(&host, subnet)?;
        // Answers to the relay go back through the host namespace.
        ns.ip(&[
            "route",
            "add",
            "169.254.164.0/24",
            "via",
            &format!("169.254.{subnet}.2"),
        ])?;
        upstreams.push((ChronyServer::start(&ns, UPSTREAM_STRATUM)?, ns));
        addrs.push(addr);
    }
    // The relay's way to the upstreams: VIP namespace → host namespace (forwarding).
    link_namespaces(&host, "169.254.164.1/24", &t.vip, "169.254.164.2/24")?;
    host.command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()?;
    for a in &addrs {
        let net = a.rsplit_once('.').map(|(n, _)| n).unwrap_or(a);
        t.vip.ip(&[
            "route",
            "add",
            &format!("{net}.0/24"),
            "via",
            "169.254.164.1",
        ])?;
    }

    // The daemon's own view, served time − the host clock, read over its control socket:
    // what is left of a guest-seen offset beyond it is the serving path's.
    let control = std::env::temp_dir().join(format!("ntpx-time-bench-{}.sock", std::process::id()));
    let control_arg = control.to_string_lossy().into_owned();
    let control_set = format!("control.socket={control_arg}");
    let mut args = vec![
        "--set",
        "clock.max_poll=4",
        "--set",
        "limits.enable=false",
        "--set",
        &control_set,
    ];
    for a in &addrs {
        args.push("--upstream");
        args.push(a);
    }
    let serve = ServeProcess::start_in_with(bin, Some(&host), &t, "native", &args)?;
    let mut relay_conf = String::new();
    for a in &addrs {
        relay_conf.push_str(&format!("server {a} iburst minpoll 4 maxpoll 4\n"));
    }
    relay_conf.push_str(&format!("allow\nbindaddress {}\n", t.service_v4));
    let _relay = ChronyServer::start_with(&t.vip, &relay_conf)?;

    wait_synchronized(&t, CLOCK_V4, "ntp-xdp")?;
    wait_synchronized(&t, &t.service_v4, "the chronyd relay")?;
    eprintln!("time bench: settling for {settle:?}, then measuring for {minutes} min");
    std::thread::sleep(settle);

    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs_f64(minutes * 60.0) {
        for (server, addr) in [
            ("ntp-xdp", CLOCK_V4),
            ("chronyd-relay", t.service_v4.as_str()),
        ] {
            match chronyd_query(&t.guest, addr) {
                Ok(m) => samples.push(serde_json::json!({
                    "t_s": start.elapsed().as_secs_f64(),
                    "server": server,
                    "offset_s": m.logged_offset_s,
                    "printed_offset_s": m.offset_s,
                })),
                Err(e) => eprintln!("time bench: {server}: {e:#}"),
            }
        }
        match daemon_clock(&control) {
            Ok((offset, bound)) => samples.push(serde_json::json!({
                "t_s": start.elapsed().as_secs_f64(),
                "server": "ntp-xdp-clock",
                "offset_s": offset,
                "served_bound_s": bound,
            })),
            Err(e) => eprintln!("time bench: daemon status: {e:#}"),
        }
    }
    let _ = std::fs::remove_file(&control);
    if let Ok(path) = std::env::var("NTPX_TIME_LOG") {
        std::fs::write(&path, serve.drain_log().join("\n"))?;
    }
    Ok(serde_json::json!({
        "upstreams": addrs,
        "minutes": minutes,
        "settle_s": settle.as_secs_f64(),
        "samples": samples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_bound_is_stated_only_while_synchronized() {
        let clock = serde_json::json!({
            "synchronized": true, "root_delay_s": 4e-6, "root_dispersion_s": 1e-6,
            "host_clock_offset_s": -2e-6,
        });
        let (offset, bound) = clock_of(&clock).unwrap();
        assert_eq!(offset, -2e-6);
        assert!((bound.unwrap() - 3e-6).abs() < 1e-12);
        let mut unsynchronized = clock.clone();
        unsynchronized["synchronized"] = false.into();
        assert_eq!(clock_of(&unsynchronized).unwrap().1, None);
        let mut renamed = clock;
        renamed
            .as_object_mut()
            .unwrap()
            .remove("host_clock_offset_s");
        assert!(clock_of(&renamed).is_err());
    }
}
