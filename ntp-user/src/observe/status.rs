//! What `ntp-xdp status` shows and the metrics endpoint exports: one report, built by the
//! daemon on request, sent as JSON over the control socket and rendered here as tables in the
//! manner of `chronyc tracking` and `chronyc sources`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _, Result};
use ntp_common::counters::{Counter as XdpCounter, CounterKind};
use serde::{Deserialize, Serialize};

use crate::clock::snapshot::ClockSnapshot;
use crate::observe::alarms::ActiveAlarm;
use crate::observe::guests::GuestSummary;

/// The clock task's latest snapshot of its clock, shared with the control and metrics tasks.
pub type ClockSnapshotCell = Arc<Mutex<ClockSnapshot>>;

/// The anchor the kernel serves right now, read from its map.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnchorStatus {
    pub published: bool,
    pub age_s: f64,
    pub max_age_s: f64,
    pub stratum: u8,
    pub leap: u8,
    pub refid: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponderStatus {
    /// The XDP program's outcome counters, by name.
    pub counters: BTreeMap<String, u64>,
    pub userspace_answered_ipv4: u64,
    pub userspace_answered_ipv6: u64,
    pub userspace_dropped: u64,
    /// Valid requests the userspace path refused (access list, rate limit).
    #[serde(default)]
    pub userspace_refused: u64,
    /// Sources the rate table tracks.
    pub rate_limited_sources_tracked: usize,
}

impl ResponderStatus {
    pub fn counter(&self, counter: XdpCounter) -> u64 {
        self.counters.get(counter.name()).copied().unwrap_or(0)
    }

    /// Requests judged (answered or refused) and refused (dropped or answered with a KoD).
    pub fn judged_and_refused(&self) -> (u64, u64) {
        let refused: u64 = XdpCounter::ALL
            .iter()
            .filter(|c| matches!(c.kind(), CounterKind::Dropped | CounterKind::Kod))
            .map(|c| self.counter(*c))
            .sum::<u64>()
            + self.userspace_dropped
            + self.userspace_refused;
        let answered = self.counter(XdpCounter::AnsweredV4)
            + self.counter(XdpCounter::AnsweredV6)
            + self.userspace_answered_ipv4
            + self.userspace_answered_ipv6;
        (answered + refused, refused)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_s: f64,
    pub clock: ClockSnapshot,
    pub anchor: AnchorStatus,
    pub responder: ResponderStatus,
    pub guests: GuestSummary,
    pub alarms: Vec<ActiveAlarm>,
    /// With `[redundancy]`: this host's VRRP role.
    #[serde(default)]
    pub vrrp: Option<VrrpStatus>,
    /// With `[nts]`: key exchanges, protected requests, the cookie keys.
    #[serde(default)]
    pub nts: Option<NtsStatus>,
    /// With `[fleet]`: the store's reachability and the config revision this host runs.
    #[serde(default)]
    pub fleet: Option<FleetLink>,
}

/// A fleet member's view of its store, as its agent keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetLink {
    pub cluster: String,
    pub host: String,
    pub store_reachable: bool,
    /// Why not, when not.
    pub store_error: Option<String>,
    /// The config revision it runs (0: its local file).
    pub config_revision: i64,
}

/// The fleet agent's view, shared with the control and metrics tasks.
pub type FleetCell = Arc<Mutex<Option<FleetLink>>>;

/// Network Time Security, as counted since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NtsStatus {
    pub key_exchanges: u64,
    pub key_exchange_failures: u64,
    /// Connections from sources the access list or the rate limit refused.
    pub key_exchanges_refused: u64,
    /// Connections closed at once: their address or IPv6 /64 had its share running.
    #[serde(default)]
    pub key_exchanges_over_source_limit: u64,
    /// Connections closed at once: the server had its most exchanges running.
    #[serde(default)]
    pub key_exchanges_busy: u64,
    /// Exchanges cut off because the client did not finish in time.
    #[serde(default)]
    pub key_exchange_deadlines: u64,
    pub requests_answered: u64,
    /// NAKs for cookies that are not (or no longer) this cluster's.
    pub cookie_failures: u64,
    /// NAKs for requests that did not authenticate with their cookie's key.
    pub authentication_failures: u64,
    pub malformed: u64,
    pub key_rotations: u64,
    /// Cookie key ids kept, the current one last.
    pub key_ids: Vec<u32>,
}

impl NtsStatus {
    pub fn of(state: &crate::nts::server::NtsState) -> NtsStatus {
        let c = &state.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        NtsStatus {
            key_exchanges: load(&c.key_exchanges),
            key_exchange_failures: load(&c.key_exchange_failures),
            key_exchanges_refused: load(&c.key_exchanges_refused),
            key_exchanges_over_source_limit: load(&c.key_exchanges_over_source_limit),
            key_exchanges_busy: load(&c.key_exchanges_busy),
            key_exchange_deadlines: load(&c.key_exchange_deadlines),
            requests_answered: load(&c.requests_answered),
            cookie_failures: load(&c.cookie_failures),
            authentication_failures: load(&c.authentication_failures),
            malformed: load(&c.malformed),
            key_rotations: load(&c.key_rotations),
            key_ids: state.key_ids(),
        }
    }
}

/// A redundant VIP host's VRRP state, as the daemon sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VrrpStatus {
    /// "master" (the service and clock addresses are here) or "backup".
    pub role: String,
    /// Role changes since the daemon started.
    pub transitions: u64,
    /// Tracked uplinks that are down now (the host is unhealthy while any is).
    #[serde(default)]
    pub uplinks_down: Vec<String>,
}

/// The role watcher's view, shared with the control and metrics tasks.
pub type VrrpCell = Arc<Mutex<Option<VrrpStatus>>>;

fn si(seconds: Option<f64>) -> String {
    let Some(s) = seconds else {
        return "-".into();
    };
    let a = s.abs();
    if a >= 1.0 {
        format!("{s:+.3}s")
    } else if a >= 1e-3 {
        format!("{:+.3}ms", s * 1e3)
    } else {
        format!("{:+.1}us", s * 1e6)
    }
}

/// Human tables: tracking, sources, responder counters, worst guests, alarms.
pub fn render(r: &StatusReport) -> String {
    let mut o = String::new();
    let c = &r.clock;
    let _ = writeln!(o, "ntp-xdp {} (up {:.0} s)", r.version, r.uptime_s);
    if let Some(v) = &r.vrrp {
        let _ = writeln!(
            o,
            "VRRP: {} ({} role changes since start){}",
            v.role,
            v.transitions,
            if v.uplinks_down.is_empty() {
                String::new()
            } else {
                format!("; uplinks down: {}", v.uplinks_down.join(", "))
            }
        );
    }
    if let Some(f) = &r.fleet {
        let _ = writeln!(
            o,
            "Fleet: {} in {}, config revision {}, store {}",
            f.host,
            f.cluster,
            f.config_revision,
            if f.store_reachable {
                "reachable".to_string()
            } else {
                format!(
                    "UNREACHABLE ({})",
                    f.store_error.as_deref().unwrap_or("not connected yet")
                )
            }
        );
    }
    let _ = writeln!(o, "\nTracking");
    let rows: Vec<(&str, String)> = vec![
        ("Reference", c.reference.describe()),
        ("Synchronized", c.synchronized.to_string()),
        ("Reference ID", c.refid_text()),
        ("Stratum", c.stratum.to_string()),
        ("Last offset", si(c.offset_s)),
        ("Frequency", format!("{:+.3} ppm", c.frequency_ppm)),
        (
            "Regression window",
            format!("{} points", c.regression_points),
        ),
        ("Served − host", si(c.host_clock_offset_s)),
        ("Served error bound", si(c.served_error_bound_s())),
        ("Root delay", si(Some(c.root_delay_s))),
        ("Root dispersion", si(Some(c.root_dispersion_s))),
        ("Root distance", si(Some(c.root_distance_s()))),
        ("Leap indicator", c.leap.bits().to_string()),
        (
            "Served anchor age",
            if r.anchor.published {
                format!("{:.2} s (max {:.0} s)", r.anchor.age_s, r.anchor.max_age_s)
            } else {
                "never published".into()
            },
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "  {k:<18}: {v}");
    }
    if !c.sources.is_empty() {
        let _ = writeln!(o, "\nSources");
        let _ = writeln!(
            o,
            "  {:<28} {:<12} {:>2} {:>4} {:>5} {:>12} {:>12} {:>12} {:>6}",
            "address", "state", "st", "poll", "reach", "offset", "delay", "jitter", "mode"
        );
        for s in &c.sources {
            let _ = writeln!(
                o,
                "  {:<28} {:<12} {:>2} {:>4} {:>5o} {:>12} {:>12} {:>12} {:>6}",
                s.addr.to_string(),
                s.state.describe(),
                s.stratum.map_or("-".into(), |x| x.to_string()),
                s.poll,
                s.reach,
                si(s.offset_s),
                si(s.delay_s),
                si(s.jitter_s),
                match s.interleaved {
                    Some(true) => "xleave",
                    Some(false) => "basic",
                    None => "-",
                }
            );
        }
    }
    let _ = writeln!(o, "\nResponder");
    for (k, v) in &r.responder.counters {
        if *v > 0 {
            let _ = writeln!(o, "  {k:<28} {v:>14}");
        }
    }
    let u = &r.responder;
    let _ = writeln!(
        o,
        "  {:<28} {:>14}\n  {:<28} {:>14}\n  {:<28} {:>14}\n  {:<28} {:>14}",
        "userspace_answered",
        u.userspace_answered_ipv4 + u.userspace_answered_ipv6,
        "userspace_dropped",
        u.userspace_dropped,
        "userspace_refused",
        u.userspace_refused,
        "sources_tracked",
        u.rate_limited_sources_tracked
    );
    let g = &r.guests;
    let _ = writeln!(
        o,
        "\nGuest clocks ({} active, {} without a readable clock, alarm beyond {})",
        g.active,
        g.opaque,
        si(Some(g.alarm_offset_s))
    );
    for x in &g.worst {
        let mark = if x.offset_s.abs() > g.alarm_offset_s {
            "ALARM"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {:<40} {:>12} {:>8} req  seen {:>6.0} s ago  {mark}",
            x.name(),
            si(Some(x.offset_s)),
            x.requests,
            x.last_seen_s_ago
        );
    }
    if let Some(n) = &r.nts {
        let _ = writeln!(o, "\nNTS (cookie keys {:?}, current last)", n.key_ids);
        for (k, v) in [
            ("key_exchanges", n.key_exchanges),
            ("key_exchange_failures", n.key_exchange_failures),
            ("key_exchanges_refused", n.key_exchanges_refused),
            (
                "key_exchanges_over_source_limit",
                n.key_exchanges_over_source_limit,
            ),
            ("key_exchanges_busy", n.key_exchanges_busy),
            ("key_exchange_deadlines", n.key_exchange_deadlines),
            ("requests_answered", n.requests_answered),
            ("cookie_failures", n.cookie_failures),
            ("authentication_failures", n.authentication_failures),
            ("malformed", n.malformed),
            ("key_rotations", n.key_rotations),
        ] {
            let _ = writeln!(o, "  {k:<28} {v:>14}");
        }
    }
    let _ = writeln!(o, "\nAlarms");
    if r.alarms.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for a in &r.alarms {
        let _ = writeln!(
            o,
            "  {:<14} {} (for {:.0} s)",
            a.name, a.detail, a.since_s_ago
        );
    }
    o
}

/// Sends `command` to the daemon behind `socket` and reads its whole answer, within
/// `timeout` (a frozen daemon does not answer: that is an answer too).
fn ask(socket: &Path, command: &str, timeout: std::time::Duration) -> Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the daemon's control socket {} (is the daemon running, and are you \
             its owner?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .context("reading the daemon's answer")?;
    Ok(text)
}

/// Asks the daemon whether it should hold the service addresses (`ntp-xdp health`, run by
/// keepalived every second): Ok, or why not.
pub fn query_health(socket: &Path) -> Result<()> {
    let text = ask(socket, "health", std::time::Duration::from_millis(800))?;
    match text.trim() {
        "ok" => Ok(()),
        other => bail!("{other}"),
    }
}

/// Asks the daemon behind `socket` for its report.
pub fn query(socket: &Path) -> Result<StatusReport> {
    let text = ask(socket, "status", std::time::Duration::from_secs(10))?;
    if let Some(err) = text.strip_prefix("error: ") {
        bail!("the daemon says: {}", err.trim());
    }
    serde_json::from_str(&text).context("the daemon's answer is not a status report")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::snapshot::{SourceSnapshot, SourceState};

    #[test]
    fn judged_and_refused_count_every_refusal() {
        let mut r = ResponderStatus::default();
        for (k, v) in [
            ("answered_ipv4", 90),
            ("answered_ipv6", 5),
            ("dropped_rate_limited", 3),
            ("kod_rate", 1),
            ("dropped_version", 1),
            ("passed_not_ntp", 1000),
            ("answered_unsynchronized", 7),
        ] {
            r.counters.insert(k.into(), v);
        }
        r.userspace_answered_ipv4 = 10;
        assert_eq!(r.judged_and_refused(), (110, 5));
    }

    #[test]
    fn the_served_error_bound_sits_next_to_the_host_offset() {
        let mut r = StatusReport::default();
        r.clock.synchronized = true;
        r.clock.root_delay_s = 40e-6;
        r.clock.root_dispersion_s = 7e-6;
        r.clock.host_clock_offset_s = Some(-2e-6);
        let text = render(&r);
        let offset = text.find("Served − host").expect("host offset row");
        let bound = text.find("Served error bound").expect("bound row");
        assert!(bound > offset, "{text}");
        assert!(
            text[bound..].lines().next().unwrap().contains("27.0us"),
            "{text}"
        );
        r.clock.synchronized = false;
        assert_eq!(r.clock.served_error_bound_s(), None);
    }

    #[test]
    fn render_shows_every_section() {
        let mut r = StatusReport::default();
        r.clock.sources.push(SourceSnapshot {
            addr: "169.254.1.1:123".parse().unwrap(),
            state: SourceState::Selected,
            reach: 0o377,
            poll: 6,
            stratum: Some(1),
            offset_s: Some(12e-6),
            delay_s: None,
            jitter_s: None,
            interleaved: None,
        });
        r.alarms.push(ActiveAlarm {
            name: "no_sync".into(),
            since_s_ago: 3.0,
            detail: "never synchronized".into(),
        });
        let text = render(&r);
        for want in [
            "Tracking",
            "Sources",
            "377",
            "+12.0us",
            "Responder",
            "Guest clocks",
            "no_sync",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
