//! Each section's own checks, and its lowering to the daemon's spec where it has one of its
//! own: what needs no other section. [`super::validate`] holds the checks across sections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::error::ConfigError;
use super::names::SafePath;
use super::schema::*;
use crate::clock::discipline::DisciplineConfig;
use crate::clock::system::SystemConfig;
use crate::clock::upstream::PollConfig;
use crate::nts::server::SealKeyFile;

/// The clock is updated at most once per poll: a holdover shorter than two of the longest
/// poll intervals would declare it unsynchronized between ordinary polls.
pub fn check_holdover(max_holdover: Duration, max_poll: i8) -> std::result::Result<(), String> {
    let needed = Duration::from_secs(2u64 << max_poll.clamp(0, 17));
    if max_holdover < needed {
        return Err(format!(
            "{} is shorter than two polls at max_poll {max_poll} ({}); raise it or lower max_poll",
            humantime::format_duration(max_holdover),
            humantime::format_duration(needed)
        ));
    }
    Ok(())
}

impl ServiceSection {
    /// Addresses to answer for, a precision a packet can carry.
    pub fn check(&self, origin: &Path) -> Result<()> {
        let bad = field_error(origin);
        let s = self;
        if s.addresses.is_empty() {
            return Err(bad(
                "service.addresses",
                "at least one address to answer for is needed".into(),
            ));
        }
        if !(-32..=0).contains(&s.precision) {
            return Err(bad(
                "service.precision",
                format!("{} is outside -32..=0 (log2 seconds)", s.precision),
            ));
        }
        Ok(())
    }
}

impl ClockSection {
    /// The clock's discipline, checked; `upstreams`: how many upstreams it follows (0: it
    /// serves the host clock).
    pub fn lower(&self, upstreams: usize, origin: &Path) -> Result<SystemConfig> {
        let bad = field_error(origin);
        let c = self;
        if !(0..=17).contains(&c.min_poll)
            || !(0..=17).contains(&c.max_poll)
            || c.min_poll > c.max_poll
        {
            return Err(bad(
                "clock.min_poll",
                format!(
                    "poll bounds {}..{} must satisfy 0 <= min_poll <= max_poll <= 17",
                    c.min_poll, c.max_poll
                ),
            ));
        }
        if upstreams > 0 {
            if c.min_sources == 0 || c.min_sources > upstreams {
                return Err(bad(
                    "clock.min_sources",
                    format!(
                        "{} must be between 1 and the {} configured upstreams",
                        c.min_sources, upstreams
                    ),
                ));
            }
        }
        if !(c.max_slew_ppm > 0.0 && c.max_slew_ppm <= 100_000.0) {
            return Err(bad(
                "clock.max_slew_ppm",
                format!("{} must be in (0, 100000]", c.max_slew_ppm),
            ));
        }
        // Above 100 ppm an hour no oscillator is worth a bound; zero claims a perfect one.
        if !(c.holdover_wander_ppm_per_hour > 0.0 && c.holdover_wander_ppm_per_hour <= 100.0) {
            return Err(bad(
                "clock.holdover_wander_ppm_per_hour",
                format!("{} must be in (0, 100]", c.holdover_wander_ppm_per_hour),
            ));
        }
        let (panic, holdover, max_age) = (*c.panic_threshold, *c.max_holdover, *c.max_anchor_age);
        check_holdover(holdover, c.max_poll).map_err(|why| bad("clock.max_holdover", why))?;
        if max_age < Duration::from_secs(2) {
            return Err(bad(
                "clock.max_anchor_age",
                "must be at least 2s (the anchor is republished every second)".into(),
            ));
        }
        // A stopped daemon's pinned responder serves its last anchor this long as synchronized:
        // beyond an hour, a dead daemon would go unnoticed by guests for too long.
        if max_age > Duration::from_secs(3600) {
            return Err(bad(
                "clock.max_anchor_age",
                "must be at most 1h (guests are told LI=3 once the daemon stopped this long ago)"
                    .into(),
            ));
        }
        // Zero would refuse every correction after the first: the clock could never follow.
        if panic < Duration::from_millis(1) {
            return Err(bad(
                "clock.panic_threshold",
                "must be at least 1ms (0 would refuse every correction)".into(),
            ));
        }
        for (field, v) in [
            ("clock.stratum", c.stratum),
            ("clock.local_stratum", Some(c.local_stratum)),
        ] {
            if let Some(v) = v {
                if !(1..=15).contains(&v) {
                    return Err(bad(field, format!("{v} is outside 1..=15")));
                }
            }
        }
        let refid_override = c.refid.map(|r| r.0);
        Ok(SystemConfig {
            poll: PollConfig {
                min_poll: c.min_poll,
                max_poll: c.max_poll,
                iburst: true,
                interleaved: c.interleaved,
            },
            discipline: DisciplineConfig {
                max_slew_ppm: c.max_slew_ppm,
                panic_threshold_s: panic.as_secs_f64(),
                ..DisciplineConfig::default()
            },
            min_sources: c.min_sources.max(1),
            max_holdover_ns: ntp_common::time::duration_ns(holdover),
            max_anchor_age_ns: ntp_common::time::duration_ns(max_age),
            leap_smear: c.leap_smear,
            holdover_wander_ppm_per_hour: c.holdover_wander_ppm_per_hour,
            stratum_override: c.stratum,
            refid_override,
        })
    }
}

impl FleetSection {
    /// The fleet's spec: endpoints that are URLs, names usable in keys, TLS files together,
    /// credentials only over TLS.
    pub fn lower(&self, origin: &Path) -> Result<super::lower::FleetSpec> {
        let f = self;
        let bad = field_error(origin);
        if f.endpoints.is_empty() {
            return Err(bad("fleet.endpoints", "at least one etcd endpoint".into()));
        }
        let tls = f.ca.is_some() || f.certificate.is_some();
        for (i, e) in f.endpoints.iter().enumerate() {
            let scheme_ok = if tls {
                e.starts_with("https://")
            } else {
                e.starts_with("http://")
            };
            if !scheme_ok {
                return Err(bad(
                    &format!("fleet.endpoints[{i}]"),
                    format!(
                        "{e:?} must start with {} ({})",
                        if tls { "https://" } else { "http://" },
                        if tls {
                            "TLS is configured"
                        } else {
                            "no TLS is configured"
                        }
                    ),
                ));
            }
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        };
        if !name_ok(&f.cluster) {
            return Err(bad(
                "fleet.cluster",
                format!("{:?}: 1-64 of letters, digits, '-', '_', '.'", f.cluster),
            ));
        }
        let host = match &f.host {
            Some(h) => h.clone(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
        };
        if !name_ok(&host) {
            return Err(bad(
                "fleet.host",
                format!("{host:?}: 1-64 of letters, digits, '-', '_', '.'"),
            ));
        }
        if f.certificate.is_some() != f.key.is_some() {
            return Err(bad(
                "fleet.certificate",
                "certificate and key go together".into(),
            ));
        }
        for (field, file) in [
            ("fleet.ca", &f.ca),
            ("fleet.certificate", &f.certificate),
            ("fleet.key", &f.key),
            ("fleet.password_file", &f.password_file),
        ] {
            if let Some(p) = file {
                std::fs::metadata(p).map_err(|e| bad(field, format!("{}: {e}", p.display())))?;
            }
        }
        if f.password_file.is_some() && f.user.is_none() {
            return Err(bad("fleet.password_file", "needs fleet.user".into()));
        }
        if !tls && (f.user.is_some() || f.password_file.is_some()) {
            let field = match f.password_file {
                Some(_) => "fleet.password_file",
                None => "fleet.user",
            };
            return Err(bad(
                field,
                "etcd credentials (and the token etcd gives for them) would travel in clear: \
                 needs TLS (fleet.ca, https:// endpoints)"
                    .into(),
            ));
        }
        let lease_ttl = *f.lease_ttl;
        if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(300) {
            return Err(bad("fleet.lease_ttl", "must be between 2s and 5m".into()));
        }
        let sync_deadline = *f.sync_deadline;
        if sync_deadline < Duration::from_secs(5) || sync_deadline > Duration::from_secs(3600) {
            return Err(bad(
                "fleet.sync_deadline",
                "must be between 5s and 1h".into(),
            ));
        }
        let path = |p: &Option<SafePath>| p.clone().map(PathBuf::from);
        let state_dir = PathBuf::from(f.state_dir.clone());
        Ok(super::lower::FleetSpec {
            endpoints: f.endpoints.iter().map(ToString::to_string).collect(),
            cluster: f.cluster.clone(),
            host,
            ca: path(&f.ca),
            certificate: path(&f.certificate),
            key: path(&f.key),
            user: f.user.as_ref().map(ToString::to_string),
            password_file: path(&f.password_file),
            lease_ttl,
            sync_deadline,
            nts_seal_key_file: SealKeyFile(
                path(&f.nts_seal_key_file).unwrap_or_else(|| state_dir.join("nts-seal.key")),
            ),
            state_dir,
        })
    }
}

/// `bad(field, why)`: the error naming `origin`, the field and why.
fn field_error(origin: &Path) -> impl Fn(&str, String) -> anyhow::Error + '_ {
    move |field, why| anyhow::Error::from(ConfigError::field(origin, field, why))
}

impl LimitsSection {
    /// The responder's rate limits and kiss-o'-death settings (without the access list's).
    pub fn policy(&self, origin: &Path) -> Result<ntp_common::policy::ResponderPolicy> {
        use ntp_common::policy::*;
        let bad = field_error(origin);
        let l = self;
        let kod_interval = *l.kod_interval;
        // Zero would send a KoD for every refused request: a reflector, not a limiter.
        if kod_interval < Duration::from_secs(1) {
            return Err(bad(
                "limits.kod_interval",
                "must be at least 1s (one kiss-o'-death per source per interval)".into(),
            ));
        }
        if !(16..=64).contains(&l.ipv6_prefix) {
            return Err(bad(
                "limits.ipv6_prefix",
                format!("{} is outside 16..=64", l.ipv6_prefix),
            ));
        }
        if !(l.kod_global_rate.is_finite() && l.kod_global_rate > 0.0 && l.kod_global_rate <= 1e6) {
            return Err(bad(
                "limits.kod_global_rate",
                format!("{} must be in (0, 1000000] per second", l.kod_global_rate),
            ));
        }
        let mut policy = ResponderPolicy::OPEN.with_global_kod_cap(
            l.kod_global_rate,
            (l.kod_global_rate / 10.0).clamp(1.0, 1e5) as u32,
        );
        policy.v6_prefix_len = l.ipv6_prefix;
        if l.enable {
            if !(l.rate.is_finite() && l.rate > 0.0 && l.rate <= 1e6) {
                return Err(bad(
                    "limits.rate",
                    format!("{} must be in (0, 1000000] requests per second", l.rate),
                ));
            }
            if l.burst == 0 || l.burst > 1_000_000 {
                return Err(bad(
                    "limits.burst",
                    format!("{} must be in 1..=1000000", l.burst),
                ));
            }
            policy = policy.with_rate(l.rate, l.burst);
            if l.kod {
                policy.flags |= POLICY_KOD_RATE;
            }
        }
        if !(0..=17).contains(&l.kod_poll) {
            return Err(bad(
                "limits.kod_poll",
                format!("{} is outside 0..=17 (log2 seconds)", l.kod_poll),
            ));
        }
        if !(1..=16_777_216).contains(&l.sources) {
            return Err(bad(
                "limits.sources",
                format!("{} must be in 1..=16777216", l.sources),
            ));
        }
        policy.kod_interval_ns = ntp_common::time::duration_ns(kod_interval);
        policy.kod_poll = l.kod_poll;
        Ok(policy)
    }
}

impl AccessSection {
    /// The access list: each prefix once, as many as the responder's table holds.
    pub fn acl(&self, origin: &Path) -> Result<Vec<crate::responder::AclEntry>> {
        use ntp_common::policy::ACL_MAX_PREFIXES;
        let bad = field_error(origin);
        let mut acl: Vec<crate::responder::AclEntry> = Vec::new();
        for (field, list, allow) in [
            ("access.allow", &self.allow, true),
            ("access.deny", &self.deny, false),
        ] {
            for (i, net) in list.iter().enumerate() {
                if acl.iter().any(|e| e.prefix == net.trunc()) {
                    return Err(bad(
                        &format!("{field}[{i}]"),
                        format!("{net} is listed twice (in allow and deny, or repeated)"),
                    ));
                }
                acl.push(crate::responder::AclEntry {
                    prefix: net.trunc(),
                    allow,
                });
            }
        }
        if acl.len() > ACL_MAX_PREFIXES as usize {
            return Err(bad(
                "access",
                format!("{} prefixes; at most {ACL_MAX_PREFIXES} fit", acl.len()),
            ));
        }
        Ok(acl)
    }

    /// The VLAN IDs answered: each a VLAN ID, each once.
    pub fn vlan_ids(&self, origin: &Path) -> Result<Vec<u16>> {
        use ntp_common::policy::VLAN_ID_MAX;
        let bad = field_error(origin);
        let mut vlans: Vec<u16> = Vec::new();
        for (i, id) in self.vlans.iter().enumerate() {
            let field = format!("access.vlans[{i}]");
            let id = u16::try_from(*id)
                .ok()
                .filter(|id| (1..=VLAN_ID_MAX).contains(id))
                .ok_or_else(|| bad(&field, format!("{id} is not a VLAN ID (1..={VLAN_ID_MAX})")))?;
            if vlans.contains(&id) {
                return Err(bad(&field, format!("VLAN {id} is listed twice")));
            }
            vlans.push(id);
        }
        Ok(vlans)
    }
}

impl GuestClocksSection {
    /// How guests' clocks are tracked and alarmed.
    pub fn policy(&self, origin: &Path) -> Result<crate::observe::guests::GuestPolicy> {
        let bad = field_error(origin);
        if !(1..=16_777_216).contains(&self.guests) {
            return Err(bad(
                "guest_clocks.guests",
                format!("{} must be in 1..=16777216", self.guests),
            ));
        }
        if self.opaque_beyond <= self.alarm_offset {
            return Err(bad(
                "guest_clocks.opaque_beyond",
                "must be larger than guest_clocks.alarm_offset".into(),
            ));
        }
        Ok(crate::observe::guests::GuestPolicy {
            enabled: self.enable,
            alarm_offset_s: self.alarm_offset.as_secs_f64(),
            forget_after_s: self.forget_after.as_secs_f64(),
            opaque_beyond_s: self.opaque_beyond.as_secs_f64(),
        })
    }
}

impl AlarmsSection {
    /// The alarms' thresholds.
    pub fn thresholds(&self, origin: &Path) -> Result<crate::observe::alarms::AlarmThresholds> {
        let bad = field_error(origin);
        let a = self;
        if !(a.max_drop_fraction > 0.0 && a.max_drop_fraction <= 1.0) {
            return Err(bad(
                "alarms.max_drop_fraction",
                format!("{} must be in (0, 1]", a.max_drop_fraction),
            ));
        }
        if *a.window < Duration::from_secs(1) {
            return Err(bad("alarms.window", "must be at least 1s".into()));
        }
        Ok(crate::observe::alarms::AlarmThresholds {
            no_sync_after_s: a.no_sync_after.as_secs_f64(),
            max_offset_s: a.max_offset.as_secs_f64(),
            max_anchor_age_s: a.max_anchor_age.as_secs_f64(),
            max_drop_fraction: a.max_drop_fraction,
            window_s: a.window.as_secs_f64(),
        })
    }
}

impl MetricsSection {
    /// Where metrics are served (None: not at all); beyond this host only when asked for.
    pub fn listen_address(&self, origin: &Path) -> Result<Option<SocketAddr>> {
        if self.enable && !self.listen.ip().is_loopback() && !self.allow_remote {
            return Err(field_error(origin)(
                "metrics.listen",
                format!(
                    "{} is not a loopback address; the metrics name guests, so set \
                     metrics.allow_remote = true to serve them beyond this host",
                    self.listen
                ),
            ));
        }
        Ok(self.enable.then_some(self.listen))
    }
}
