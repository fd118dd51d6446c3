//! Validation: every field checked, each error naming the file, the field and the reason
//! ([`ConfigError`]), before anything is started.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use ipnet::IpNet;

use super::error::ConfigError;
use super::lower::Validated;
use super::names::SafePath;
use super::schema::*;
use crate::clock::discipline::DisciplineConfig;
use crate::clock::system::SystemConfig;
use crate::clock::upstream::PollConfig;
use crate::responder::XdpModePref;

/// Parses a reference ID: an IPv4 address (stratum 2+ convention) or 1-4 ASCII characters,
/// NUL-padded (stratum 1 and local clocks).
pub fn parse_refid(s: &str) -> Result<[u8; 4], String> {
    if let Ok(v4) = s.parse::<Ipv4Addr>() {
        return Ok(v4.octets());
    }
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{s:?} is neither an IPv4 address nor 1-4 printable ASCII characters"
        ));
    }
    let mut id = [0u8; 4];
    id[..s.len()].copy_from_slice(s.as_bytes());
    Ok(id)
}

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

fn duration(origin: &Path, field: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value).map_err(|e| {
        ConfigError::field(
            origin,
            field,
            format!("{value:?} is not a duration like 30s or 1h ({e})"),
        )
        .into()
    })
}

/// `host_files`: read the files the config names (false on an operator's machine).
pub(super) fn validate(cfg: Config, origin: &Path, host_files: bool) -> Result<Validated> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    let s = &cfg.service;
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
    let xdp_mode = match s.xdp_mode.as_str() {
        "auto" => XdpModePref::Auto,
        "native" => XdpModePref::Native,
        "generic" => XdpModePref::Generic,
        "off" => XdpModePref::Off,
        other => {
            return Err(bad(
                "service.xdp_mode",
                format!("{other:?} is not one of auto, native, generic, off"),
            ))
        }
    };
    let c = &cfg.clock;
    let reference = match c.reference.as_str() {
        "upstream" => Reference::Upstream,
        "host-clock" => Reference::HostClock,
        other => {
            return Err(bad(
                "clock.reference",
                format!("{other:?} is not one of upstream, host-clock"),
            ))
        }
    };
    if !(0..=17).contains(&c.min_poll) || !(0..=17).contains(&c.max_poll) || c.min_poll > c.max_poll
    {
        return Err(bad(
            "clock.min_poll",
            format!(
                "poll bounds {}..{} must satisfy 0 <= min_poll <= max_poll <= 17",
                c.min_poll, c.max_poll
            ),
        ));
    }
    if reference == Reference::Upstream && !cfg.upstreams.is_empty() {
        if c.min_sources == 0 || c.min_sources > cfg.upstreams.len() {
            return Err(bad(
                "clock.min_sources",
                format!(
                    "{} must be between 1 and the {} configured upstreams",
                    c.min_sources,
                    cfg.upstreams.len()
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
    let panic = duration(origin, "clock.panic_threshold", &c.panic_threshold)?;
    let holdover = duration(origin, "clock.max_holdover", &c.max_holdover)?;
    let max_age = duration(origin, "clock.max_anchor_age", &c.max_anchor_age)?;
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
    let refid_override = match &c.refid {
        Some(r) => Some(parse_refid(r).map_err(|e| bad("clock.refid", e))?),
        None => None,
    };
    let mut vip = validate_vip(&cfg, origin)?;
    let dhcp = validate_dhcp(&cfg, vip.as_ref(), origin)?;
    let admission = validate_admission(&cfg.limits, &cfg.access, &cfg.guest_clocks, origin)?;
    let mut observe = validate_observe(
        &cfg.guest_clocks,
        &cfg.metrics,
        &cfg.control,
        &cfg.alarms,
        vip.as_ref(),
        origin,
    )?;
    validate_redundancy(&cfg, &mut vip, origin)?;
    observe.health_socket = vip
        .as_ref()
        .filter(|v| v.redundancy.is_some())
        .map(|v| crate::vip::health_socket(&v.netns));
    if let Some(v) = &vip {
        check_helper_files(v, origin)?;
    }
    let fleet = match &cfg.fleet {
        Some(f) => Some(validate_fleet(f, origin)?),
        None => None,
    };
    let nts = match &cfg.nts {
        Some(n) => Some(validate_nts(
            n,
            &cfg.service,
            vip.as_ref(),
            fleet.as_ref(),
            host_files,
            origin,
        )?),
        None => None,
    };
    let system = SystemConfig {
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
    };
    Ok(Validated {
        source: origin.to_path_buf(),
        xdp_mode,
        reference,
        system,
        local_stratum: c.local_stratum,
        refid_override,
        upstreams: cfg.upstreams,
        service: cfg.service,
        vip,
        dhcp,
        admission,
        observe,
        nts,
        fleet,
    })
}

/// The `[fleet]` section: endpoints that are URLs, names usable in keys, TLS files together,
/// credentials only over TLS.
pub fn validate_fleet(f: &FleetSection, origin: &Path) -> Result<super::lower::FleetSpec> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
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
    let lease_ttl = duration(origin, "fleet.lease_ttl", &f.lease_ttl)?;
    if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(300) {
        return Err(bad("fleet.lease_ttl", "must be between 2s and 5m".into()));
    }
    let sync_deadline = duration(origin, "fleet.sync_deadline", &f.sync_deadline)?;
    if sync_deadline < Duration::from_secs(5) || sync_deadline > Duration::from_secs(3600) {
        return Err(bad(
            "fleet.sync_deadline",
            "must be between 5s and 1h".into(),
        ));
    }
    let path = |p: &Option<SafePath>| p.clone().map(PathBuf::from);
    let state_dir = path(&f.state_dir).unwrap_or_else(|| "/var/lib/ntp-xdp/fleet".into());
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
        nts_seal_key_file: path(&f.nts_seal_key_file)
            .unwrap_or_else(|| state_dir.join("nts-seal.key")),
        state_dir,
    })
}

/// The `[nts]` section: the certificate and key load and go together, the addresses are
/// served ones, the rotation is sane. In a fleet, whose store holds the cookie keys: the
/// store is reached over TLS and the seal key is there.
pub fn validate_nts(
    n: &NtsSection,
    service: &ServiceSection,
    vip: Option<&crate::vip::VipSpec>,
    fleet: Option<&super::lower::FleetSpec>,
    host_files: bool,
    origin: &Path,
) -> Result<crate::nts::server::NtsSpec> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    if host_files {
        crate::nts::server::tls_config(&n.certificate_chain, &n.private_key)
            .map_err(|e| bad("nts.certificate_chain", format!("{e:#}")))?;
    }
    if let Some(f) = fleet {
        if !f.tls() {
            return Err(bad(
                "fleet.ca",
                "[nts] shares its cookie keys through etcd: the fleet needs TLS (fleet.ca, \
                 https:// endpoints) so that no one on the path sees them"
                    .into(),
            ));
        }
        if host_files {
            crate::nts::server::read_seal_key(&f.nts_seal_key_file)
                .map_err(|e| bad("fleet.nts_seal_key_file", format!("{e:#}")))?;
        }
    }
    let served = match vip {
        Some(v) => v.served_addresses(),
        None => service.addresses.clone(),
    };
    let listen = if n.listen.is_empty() {
        served.clone()
    } else {
        n.listen.clone()
    };
    for (i, a) in listen.iter().enumerate() {
        if !served.contains(a) {
            return Err(bad(
                &format!("nts.listen[{i}]"),
                format!("{a} is not an address this host serves time on ({served:?})"),
            ));
        }
    }
    if n.port == 0 {
        return Err(bad("nts.port", "must not be 0".into()));
    }
    let key_rotation = duration(origin, "nts.key_rotation", &n.key_rotation)?;
    if key_rotation < Duration::from_secs(1) || key_rotation > Duration::from_secs(30 * 86400) {
        return Err(bad(
            "nts.key_rotation",
            "must be between 1s and 30d (cookies outlive it by three rotations)".into(),
        ));
    }
    let key_file = n
        .key_file
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ntp-xdp/nts-keys.json".into());
    if key_file.file_name().is_none() {
        return Err(bad("nts.key_file", "must name a file".into()));
    }
    let pick = |v4: bool| -> Result<Option<IpAddr>> {
        match &n.ntp_server {
            Some(list) => {
                let mut it = list.iter().filter(|a| a.is_ipv4() == v4);
                let first = it.next().copied();
                if it.next().is_some() {
                    return Err(bad(
                        "nts.ntp_server",
                        "at most one address per family".into(),
                    ));
                }
                Ok(first)
            }
            None => Ok(service
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == v4)
                .copied()),
        }
    };
    Ok(crate::nts::server::NtsSpec {
        certificate_chain: n.certificate_chain.clone().into(),
        private_key: n.private_key.clone().into(),
        listen,
        port: n.port,
        key_file,
        key_rotation,
        rotate_locally: fleet.is_none(),
        ntp_server_v4: pick(true)?,
        ntp_server_v6: pick(false)?,
    })
}

/// The responder's admission from the `[limits]`, `[access]` and `[guest_clocks]` sections.
pub fn validate_admission(
    l: &LimitsSection,
    a: &AccessSection,
    g: &GuestClocksSection,
    origin: &Path,
) -> Result<crate::responder::admission::AdmissionSpec> {
    use ntp_common::policy::*;
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    let kod_interval = duration(origin, "limits.kod_interval", &l.kod_interval)?;
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
    match a.deny_action.as_str() {
        "kod" => policy.flags |= POLICY_KOD_DENY,
        "drop" => {}
        other => {
            return Err(bad(
                "access.deny_action",
                format!("{other:?} is not one of kod, drop"),
            ))
        }
    }
    let mut acl = Vec::new();
    for (field, list, allow) in [
        ("access.allow", &a.allow, true),
        ("access.deny", &a.deny, false),
    ] {
        for (i, net) in list.iter().enumerate() {
            if acl
                .iter()
                .any(|e: &crate::responder::AclEntry| e.prefix == net.trunc())
            {
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
    policy.flags |= crate::responder::admission::acl_policy_flags(&acl);
    let mut vlans: Vec<u16> = Vec::new();
    for (i, id) in a.vlans.iter().enumerate() {
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
    if g.enable {
        policy.flags |= POLICY_GUEST_CLOCKS;
    }
    if !(1..=16_777_216).contains(&g.guests) {
        return Err(bad(
            "guest_clocks.guests",
            format!("{} must be in 1..=16777216", g.guests),
        ));
    }
    Ok(crate::responder::admission::AdmissionSpec {
        policy,
        acl,
        vlans,
        tables: crate::responder::TableSizes {
            rate_sources: l.sources,
            guests: g.guests,
        },
    })
}

/// Metrics, control socket, guest-clock and alarm thresholds from their sections.
pub fn validate_observe(
    g: &GuestClocksSection,
    metrics: &MetricsSection,
    control: &ControlSection,
    a: &AlarmsSection,
    vip: Option<&crate::vip::VipSpec>,
    origin: &Path,
) -> Result<crate::observe::ObserveSpec> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    let alarm_offset = duration(origin, "guest_clocks.alarm_offset", &g.alarm_offset)?;
    let opaque_beyond = duration(origin, "guest_clocks.opaque_beyond", &g.opaque_beyond)?;
    if opaque_beyond <= alarm_offset {
        return Err(bad(
            "guest_clocks.opaque_beyond",
            "must be larger than guest_clocks.alarm_offset".into(),
        ));
    }
    if !(a.max_drop_fraction > 0.0 && a.max_drop_fraction <= 1.0) {
        return Err(bad(
            "alarms.max_drop_fraction",
            format!("{} must be in (0, 1]", a.max_drop_fraction),
        ));
    }
    let window = duration(origin, "alarms.window", &a.window)?;
    if window < Duration::from_secs(1) {
        return Err(bad("alarms.window", "must be at least 1s".into()));
    }
    if metrics.enable && !metrics.listen.ip().is_loopback() && !metrics.allow_remote {
        return Err(bad(
            "metrics.listen",
            format!(
                "{} is not a loopback address; the metrics name guests, so set \
                 metrics.allow_remote = true to serve them beyond this host",
                metrics.listen
            ),
        ));
    }
    let control_socket = match (&control.socket, vip) {
        (Some(p), _) => Some(p.clone().into()),
        (None, Some(v)) => Some(crate::host::files::state_dir(&v.netns).join("control.sock")),
        (None, None) => None,
    };
    Ok(crate::observe::ObserveSpec {
        metrics_listen: metrics.enable.then_some(metrics.listen),
        control_socket,
        health_socket: None,
        guests: crate::observe::guests::GuestPolicy {
            enabled: g.enable,
            alarm_offset_s: alarm_offset.as_secs_f64(),
            forget_after_s: duration(origin, "guest_clocks.forget_after", &g.forget_after)?
                .as_secs_f64(),
            opaque_beyond_s: opaque_beyond.as_secs_f64(),
        },
        alarms: crate::observe::alarms::AlarmThresholds {
            no_sync_after_s: duration(origin, "alarms.no_sync_after", &a.no_sync_after)?
                .as_secs_f64(),
            max_offset_s: duration(origin, "alarms.max_offset", &a.max_offset)?.as_secs_f64(),
            max_anchor_age_s: duration(origin, "alarms.max_anchor_age", &a.max_anchor_age)?
                .as_secs_f64(),
            max_drop_fraction: a.max_drop_fraction,
            window_s: window.as_secs_f64(),
        },
    })
}

fn validate_vip(cfg: &Config, origin: &Path) -> Result<Option<crate::vip::VipSpec>> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    let Some(v) = &cfg.vip else {
        return Ok(None);
    };
    let Some(netns) = cfg.service.netns.clone() else {
        return Err(bad(
            "service.netns",
            "[vip] needs the name of the namespace to create and keep".into(),
        ));
    };
    if v.host_interface == cfg.service.interface || v.bridge.as_ref() == Some(&v.host_interface) {
        return Err(bad(
            "vip.host_interface",
            "must differ from service.interface and vip.bridge".into(),
        ));
    }
    if v.create_bridge && v.bridge.is_none() {
        return Err(bad(
            "vip.create_bridge",
            "is set but no vip.bridge is named".into(),
        ));
    }
    let mut service_addresses = Vec::new();
    for (field, net, want_v4) in [
        ("vip.service_address", Some(v.service_address), true),
        ("vip.service_address6", v.service_address6, false),
    ] {
        let Some(net) = net else { continue };
        if net.addr().is_ipv4() != want_v4 {
            return Err(bad(
                field,
                format!(
                    "{net} is not an {} address with a prefix",
                    if want_v4 { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        if net.prefix_len() < net.max_prefix_len() && net.addr() == net.network() {
            return Err(bad(
                field,
                format!(
                    "{net} is the subnet itself; give the address, e.g. {}/{}",
                    crate::vip::first_host(&net),
                    net.prefix_len()
                ),
            ));
        }
        if cfg.service.addresses.contains(&net.addr()) {
            return Err(bad(
                field,
                format!(
                    "{} is also a clock address in service.addresses",
                    net.addr()
                ),
            ));
        }
        service_addresses.push(net);
    }
    let mut routes = Vec::new();
    for (i, r) in v.routes.iter().enumerate() {
        if let Some(via) = r.via {
            if via.is_ipv4() != r.to.addr().is_ipv4() {
                return Err(bad(
                    &format!("vip.routes[{i}].via"),
                    format!("{via} is not of the same family as {}", r.to),
                ));
            }
        }
        routes.push((r.to.trunc(), r.via));
    }
    let repair_interval = duration(origin, "vip.repair_interval", &v.repair_interval)?;
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&repair_interval) {
        return Err(bad(
            "vip.repair_interval",
            "must be between 100ms and 1h".into(),
        ));
    }
    Ok(Some(crate::vip::VipSpec {
        netns: netns.to_string(),
        ns_interface: cfg.service.interface.to_string(),
        host_interface: v.host_interface.to_string(),
        bridge: v.bridge.as_ref().map(ToString::to_string),
        create_bridge: v.create_bridge,
        service_addresses,
        aliases: cfg.service.addresses.clone(),
        routes,
        repair_interval,
        host_interfaces: v.host_interfaces.iter().map(ToString::to_string).collect(),
        redundancy: None,
        router_advertisements: match (v.ipv6_route_advertisements, v.service_address6) {
            (false, _) => None,
            (true, None) => {
                return Err(bad(
                    "vip.ipv6_route_advertisements",
                    "needs vip.service_address6 (the advertisements come from it)".into(),
                ))
            }
            (true, Some(s6)) => {
                if !cfg.service.addresses.iter().any(|a| a.is_ipv6()) {
                    return Err(bad(
                        "vip.ipv6_route_advertisements",
                        "service.addresses has no IPv6 clock address to route to".into(),
                    ));
                }
                crate::vip::radvd::for_vip(
                    &netns,
                    &cfg.service.interface,
                    s6,
                    &cfg.service.addresses,
                )
            }
        },
    }))
}

/// `[redundancy]`: checked against the `[vip]` it extends. VRRP speaks on a link of the VIP
/// hosts' own (`bridge`) unless the operator chose the guests' link (`shared_network`), where
/// unicast peers are required so that adverts from anyone else are refused.
fn validate_redundancy(
    cfg: &Config,
    vip: &mut Option<crate::vip::VipSpec>,
    origin: &Path,
) -> Result<()> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    let Some(r) = &cfg.redundancy else {
        return Ok(());
    };
    let Some(v) = vip.as_mut() else {
        return Err(bad(
            "redundancy",
            "needs a [vip] section (the addresses that move are the VIP host's)".into(),
        ));
    };
    if r.virtual_router_id == 0 {
        return Err(bad(
            "redundancy.virtual_router_id",
            "must be 1..=255".into(),
        ));
    }
    if !(1..=254).contains(&r.priority) {
        return Err(bad(
            "redundancy.priority",
            format!("{} is outside 1..=254", r.priority),
        ));
    }
    let advert = duration(origin, "redundancy.advert_interval", &r.advert_interval)?;
    if !(Duration::from_millis(10)..=Duration::from_secs(40)).contains(&advert) {
        return Err(bad(
            "redundancy.advert_interval",
            "must be between 10ms and 40s (VRRPv3 centiseconds)".into(),
        ));
    }
    let service = v.service_addresses[0];
    let own = r.own_address;
    let link = match (&r.bridge, r.shared_network) {
        (Some(_), true) => {
            return Err(bad(
                "redundancy.shared_network",
                "VRRP speaks either on redundancy.bridge or on the guests' link, not both".into(),
            ))
        }
        (None, false) => {
            return Err(bad(
                "redundancy.bridge",
                "VRRP must speak where guests cannot reach it: name the bridge of the VIP \
                 hosts' own network, or set redundancy.shared_network = true with \
                 unicast_peers (which trusts guests not to spoof a peer's address)"
                    .into(),
            ))
        }
        (None, true) => None,
        (Some(bridge), false) => {
            let taken = [
                v.ns_interface.as_str(),
                v.host_interface.as_str(),
                v.bridge.as_deref().unwrap_or_default(),
            ];
            if taken.contains(&r.interface.as_str()) || r.interface == r.host_interface {
                return Err(bad(
                    "redundancy.interface",
                    "must differ from the guests' veth ends, vip.bridge and \
                     redundancy.host_interface"
                        .into(),
                ));
            }
            if taken.contains(&r.host_interface.as_str()) || &r.host_interface == bridge {
                return Err(bad(
                    "redundancy.host_interface",
                    "must differ from the guests' veth ends, vip.bridge and redundancy.bridge"
                        .into(),
                ));
            }
            if v.bridge.as_deref() == Some(bridge.as_str()) {
                return Err(bad(
                    "redundancy.bridge",
                    format!("{bridge:?} is the guests' bridge (vip.bridge)"),
                ));
            }
            Some(crate::vip::VrrpLink {
                ns_interface: r.interface.to_string(),
                host_interface: r.host_interface.to_string(),
                bridge: bridge.to_string(),
            })
        }
    };
    let own_ok = own.addr().is_ipv4()
        && own.prefix_len() < 32
        && own.addr() != own.network()
        && if link.is_some() {
            // On the VIP hosts' own link: nothing guests use.
            v.service_addresses
                .iter()
                .all(|s| !s.contains(&own.addr()) && !own.contains(&s.addr()))
                && !v.aliases.contains(&own.addr())
        } else {
            own.prefix_len() == service.prefix_len() && service.contains(&own.addr())
        };
    if !own_ok {
        return Err(bad(
            "redundancy.own_address",
            if link.is_some() {
                format!(
                    "{own} must be an IPv4 address with its prefix on the VRRP link, outside \
                     the service subnet {}",
                    service.trunc()
                )
            } else {
                format!(
                    "{own} must be an IPv4 address in the service subnet {}, with its prefix",
                    service.trunc()
                )
            },
        ));
    }
    if own.addr() == service.addr() {
        return Err(bad(
            "redundancy.own_address",
            "is the service address itself, which moves between hosts".into(),
        ));
    }
    if link.is_none() && r.unicast_peers.is_empty() {
        return Err(bad(
            "redundancy.unicast_peers",
            "a shared network needs the peers' addresses: keepalived accepts adverts from \
             them only"
                .into(),
        ));
    }
    if r.unicast_peers.len() > crate::responder::MAX_VRRP_PEERS {
        return Err(bad(
            "redundancy.unicast_peers",
            format!(
                "{} peers; at most {} (the responder's table of VRRP peers)",
                r.unicast_peers.len(),
                crate::responder::MAX_VRRP_PEERS
            ),
        ));
    }
    for (i, p) in r.unicast_peers.iter().enumerate() {
        if !p.is_ipv4() || !own.contains(p) || *p == own.addr() || *p == service.addr() {
            return Err(bad(
                &format!("redundancy.unicast_peers[{i}]"),
                format!("{p} must be another host's own address in {}", own.trunc()),
            ));
        }
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "ntp-xdp".into());
    let health_socket = crate::vip::health_socket(&v.netns);
    // IPv6 guests route the clock address via the router advertisements' source: the group's
    // address, which moves with the others.
    let mut virtual_addresses = v.virtual_addresses();
    if let Some(ra) = v.router_advertisements.as_mut() {
        let router = crate::vip::radvd::shared_router_address(r.virtual_router_id);
        ra.router_address = Some(router);
        virtual_addresses
            .push(ipnet::IpNet::new(router.into(), 64).expect("64 is an IPv6 prefix length"));
    }
    v.redundancy = Some(crate::vip::Redundancy {
        own_address: own,
        track_interfaces: r.track_interfaces.iter().map(ToString::to_string).collect(),
        keepalived: crate::vip::keepalived::KeepalivedSpec {
            netns: v.netns.clone(),
            vrrp_interface: link
                .as_ref()
                .map_or_else(|| v.ns_interface.clone(), |l| l.ns_interface.clone()),
            address_interface: v.ns_interface.clone(),
            virtual_router_id: r.virtual_router_id,
            priority: r.priority,
            advert_interval: advert,
            own_address: own.addr(),
            unicast_peers: r.unicast_peers.clone(),
            virtual_addresses,
            health_command: vec![
                exe,
                "health".into(),
                "--socket".into(),
                health_socket.display().to_string(),
            ],
        },
        link,
    });
    Ok(())
}

/// The helpers' files render: a value they cannot carry (the daemon's own path, say) is a
/// config error here, not a helper that never starts.
fn check_helper_files(v: &crate::vip::VipSpec, origin: &Path) -> Result<()> {
    if let Some(r) = &v.redundancy {
        r.keepalived
            .config_text()
            .map_err(|e| ConfigError::field(origin, "redundancy", e.to_string()))?;
    }
    if let Some(ra) = &v.router_advertisements {
        ra.config_text().map_err(|e| {
            ConfigError::field(origin, "vip.ipv6_route_advertisements", e.to_string())
        })?;
    }
    Ok(())
}

fn validate_dhcp(
    cfg: &Config,
    vip: Option<&crate::vip::VipSpec>,
    origin: &Path,
) -> Result<Option<crate::vip::dhcp::DhcpSpec>> {
    let bad =
        |field: &str, why: String| anyhow::Error::from(ConfigError::field(origin, field, why));
    let d = &cfg.dhcp;
    if !d.enable {
        return Ok(None);
    }
    let Some(vip) = vip else {
        return Err(bad(
            "dhcp.enable",
            "DHCP is served inside the namespace the daemon keeps: it needs a [vip] section".into(),
        ));
    };
    let Some(IpNet::V4(subnet)) = vip.service_addresses.first().copied() else {
        return Err(bad(
            "dhcp.enable",
            "needs an IPv4 vip.service_address".into(),
        ));
    };
    let in_subnet = |a: std::net::Ipv4Addr| {
        subnet.contains(&a) && a != subnet.network() && a != subnet.broadcast()
    };
    let range = match d.range {
        Some(r) => r,
        None => {
            return Err(bad(
                "dhcp.range",
                format!(
                    "is needed: the first and last address to lease, inside {}",
                    subnet.trunc()
                ),
            ))
        }
    };
    if !in_subnet(range[0]) || !in_subnet(range[1]) || range[0] > range[1] {
        return Err(bad(
            "dhcp.range",
            format!(
                "{} - {} must be an ascending range of host addresses inside {}",
                range[0],
                range[1],
                subnet.trunc()
            ),
        ));
    }
    if (range[0]..=range[1]).contains(&subnet.addr()) {
        return Err(bad(
            "dhcp.range",
            format!("contains the service address {}", subnet.addr()),
        ));
    }
    if let Some(router) = d.router {
        if !in_subnet(router) {
            return Err(bad(
                "dhcp.router",
                format!("{router} is not a host address inside {}", subnet.trunc()),
            ));
        }
    }
    let lease_time = match &d.lease_time {
        Some(s) => duration(origin, "dhcp.lease_time", s)?,
        None => Duration::from_secs(3600),
    };
    if lease_time < Duration::from_secs(120) {
        return Err(bad(
            "dhcp.lease_time",
            "must be at least 2m (dnsmasq's minimum)".into(),
        ));
    }
    let clock_addresses = cfg
        .service
        .addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect::<Vec<_>>();
    if clock_addresses.is_empty() {
        return Err(bad(
            "dhcp.enable",
            "option 121 routes IPv4 clock addresses, and service.addresses has none".into(),
        ));
    }
    Ok(Some(crate::vip::dhcp::DhcpSpec {
        netns: vip.netns.clone(),
        interface: vip.ns_interface.clone(),
        service: subnet,
        range: (range[0], range[1]),
        lease_time,
        router: d.router,
        clock_addresses,
    }))
}
