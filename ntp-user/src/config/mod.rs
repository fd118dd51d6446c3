//! The daemon's TOML configuration, validated as a whole before anything is started: an error
//! names the file, the field and the reason.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use ipnet::IpNet;
use serde::Deserialize;

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

/// The configuration `cargo xtask run` and `ntp-user run` use when given no file: serve the
/// host clock as a local stratum on the demo namespace pair.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub service: ServiceSection,
    #[serde(default)]
    pub clock: ClockSection,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamSection>,
    /// Present: the daemon creates and keeps the namespace, veth, addresses and routes.
    pub vip: Option<VipSection>,
    #[serde(default)]
    pub dhcp: DhcpSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub access: AccessSection,
    #[serde(default)]
    pub guest_clocks: GuestClocksSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub alarms: AlarmsSection,
}

/// Per-source rate limiting in the responder (a source: an IPv4 address or an IPv6 /64).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub enable: bool,
    /// Sustained requests per second per source.
    pub rate: f64,
    /// Requests a source may send at once (an `iburst` sends 4-8).
    pub burst: u32,
    /// Answer a source over its rate with a RATE kiss-o'-death (at most one per
    /// `kod_interval`); false: drop silently.
    pub kod: bool,
    pub kod_interval: String,
    /// Poll exponent a RATE kiss-o'-death asks the client to back off to.
    pub kod_poll: i8,
    /// Sources tracked; beyond it the longest idle is forgotten.
    pub sources: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            enable: true,
            rate: 2.0,
            burst: 16,
            kod: true,
            kod_interval: "10s".into(),
            kod_poll: 6,
            sources: 65_536,
        }
    }
}

/// Who may ask. The longest matching prefix decides; with an allow list, sources matching
/// nothing are denied.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// "kod" (a DENY kiss-o'-death, at most one per limits.kod_interval) or "drop".
    pub deny_action: String,
}

impl Default for AccessSection {
    fn default() -> Self {
        AccessSection {
            allow: Vec::new(),
            deny: Vec::new(),
            deny_action: "kod".into(),
        }
    }
}

/// Guests' clocks as their requests show them, and the alarm list of those far off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestClocksSection {
    pub enable: bool,
    /// Guests whose apparent clock error exceeds this are in the alarm list.
    pub alarm_offset: String,
    /// Guests tracked; beyond it the longest idle is forgotten.
    pub guests: u32,
    /// Guests not seen for this long are not listed.
    pub forget_after: String,
    /// Transmit timestamps further off than this are taken as random cookies (chrony and
    /// ntpd-rs do not reveal their time), not as clock errors.
    pub opaque_beyond: String,
}

impl Default for GuestClocksSection {
    fn default() -> Self {
        GuestClocksSection {
            enable: true,
            alarm_offset: "100ms".into(),
            guests: 65_536,
            forget_after: "1h".into(),
            opaque_beyond: "1d".into(),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub enable: bool,
    /// Loopback by default: metrics say who the guests are.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enable: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9273)),
        }
    }
}

/// The local control socket `ntp-user status` talks to (owner-only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Default: /run/ntp-xdp/NETNS/control.sock with a [vip] section, else none.
    pub socket: Option<PathBuf>,
}

/// Alarm thresholds: each alarm is logged once when it is raised and once when it clears,
/// and exported as a metric.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// The clock has not been corrected from an upstream for this long (or never, this long
    /// after start).
    pub no_sync_after: String,
    /// The last measured offset of the clock against its upstreams exceeds this.
    pub max_offset: String,
    /// The anchor the kernel serves is older than this (the daemon stopped publishing).
    pub max_anchor_age: String,
    /// More than this fraction of the requests in the last `window` were dropped or refused.
    pub max_drop_fraction: f64,
    pub window: String,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        AlarmsSection {
            no_sync_after: "5m".into(),
            max_offset: "5ms".into(),
            max_anchor_age: "5s".into(),
            max_drop_fraction: 0.01,
            window: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// The host end of the veth (`service.interface` is the namespace end).
    pub host_interface: String,
    /// Bridge the host end joins, so that guests on it reach the namespace.
    pub bridge: Option<String>,
    /// Create `bridge` when it does not exist (and remove it on `down`).
    #[serde(default)]
    pub create_bridge: bool,
    /// The address guests route the clock addresses to, with its subnet (e.g. 169.254.100.1/24).
    pub service_address: IpNet,
    /// An IPv6 service address with its prefix (optional).
    pub service_address6: Option<IpNet>,
    /// Routes back to guest subnets that are not on the service subnet.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// How often what exists is compared with what should (drift repair).
    #[serde(default = "default_repair_interval")]
    pub repair_interval: String,
    /// Host interfaces on the internal network to serve too (physical hosts of the cluster).
    #[serde(default)]
    pub host_interfaces: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub to: IpNet,
    pub via: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpSection {
    /// Run dnsmasq in the namespace for the service subnet (needs [vip]).
    pub enable: bool,
    /// First and last address to lease.
    pub range: Option<[std::net::Ipv4Addr; 2]>,
    pub lease_time: Option<String>,
    /// The guests' default gateway: sent as option 3 and as 0.0.0.0/0 in option 121, since
    /// RFC 3442 clients ignore option 3 when option 121 is present.
    pub router: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Named network namespace holding `interface` (default: the daemon's own).
    pub netns: Option<String>,
    pub interface: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_xdp_mode")]
    pub xdp_mode: String,
    pub peer_netns: Option<String>,
    #[serde(default = "default_precision")]
    pub precision: i8,
    #[serde(default)]
    pub log_packets: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSection {
    /// "upstream" (discipline against [[upstream]]) or "host-clock" (serve the kernel clock).
    pub reference: String,
    pub min_poll: i8,
    pub max_poll: i8,
    pub min_sources: usize,
    pub max_slew_ppm: f64,
    pub panic_threshold: String,
    pub max_holdover: String,
    pub max_anchor_age: String,
    pub leap_smear: bool,
    pub stratum: Option<u8>,
    pub refid: Option<String>,
    /// Stratum announced when serving the host clock (no upstream configured).
    pub local_stratum: u8,
}

impl Default for ClockSection {
    fn default() -> Self {
        ClockSection {
            reference: "upstream".into(),
            min_poll: 4,
            max_poll: 10,
            min_sources: 1,
            max_slew_ppm: 500.0,
            panic_threshold: "1000s".into(),
            max_holdover: "1h".into(),
            max_anchor_age: "30s".into(),
            leap_smear: false,
            stratum: None,
            refid: None,
            local_stratum: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Host name or address, optionally with :port (default 123).
    pub address: String,
    #[serde(default = "default_true")]
    pub iburst: bool,
}

fn default_repair_interval() -> String {
    "1s".into()
}
fn default_xdp_mode() -> String {
    "auto".into()
}
fn default_precision() -> i8 {
    -24
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    Upstream,
    HostClock,
}

/// A configuration that passed validation, in the types the daemon uses.
#[derive(Debug, Clone)]
pub struct Validated {
    pub source: PathBuf,
    pub service: ServiceSection,
    pub xdp_mode: XdpModePref,
    pub reference: Reference,
    pub system: SystemConfig,
    pub upstreams: Vec<UpstreamSection>,
    pub local_stratum: u8,
    pub refid_override: Option<[u8; 4]>,
    /// What the daemon creates and keeps (None: attach to an interface that exists).
    pub vip: Option<crate::host::vip::VipSpec>,
    pub dhcp: Option<crate::host::dhcp::DhcpSpec>,
    pub admission: crate::responder::admission::AdmissionSpec,
    pub observe: crate::observe::ObserveSpec,
}

impl Validated {
    /// What `serve` runs for this configuration.
    pub fn serve_options(&self) -> crate::daemon::ServeOptions {
        use crate::daemon::ClockSource;
        use crate::host::hostclock::HostClockIdentity;
        let clock = if self.reference == Reference::Upstream && !self.upstreams.is_empty() {
            ClockSource::Upstreams {
                system: self.system.clone(),
                upstreams: self.upstreams.iter().map(|u| u.address.clone()).collect(),
            }
        } else {
            ClockSource::HostClock {
                identity: HostClockIdentity {
                    follow_kernel_sync: self.reference == Reference::HostClock,
                    stratum: self.system.stratum_override.unwrap_or(self.local_stratum),
                    refid: self.refid_override.unwrap_or(*b"LOCL"),
                    max_age_ns: self.system.max_anchor_age_ns,
                },
                publish_interval: Duration::from_secs(1),
            }
        };
        crate::daemon::ServeOptions {
            netns: self.service.netns.clone(),
            interface: self.service.interface.clone(),
            addresses: self.service.addresses.clone(),
            xdp_mode: self.xdp_mode,
            peer_netns: self.service.peer_netns.clone(),
            params: ntp_common::ServerParams {
                precision: self.service.precision,
                poll_min: self.system.poll.min_poll,
                poll_max: self.system.poll.max_poll,
                ..ntp_common::ServerParams::DEFAULT
            },
            log_packets: self.service.log_packets,
            clock,
            managed: self.vip.clone().map(|v| (v, self.dhcp.clone())),
            admission: self.admission.clone(),
            observe: self.observe.clone(),
        }
    }
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

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Validated> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("config {}: cannot read: {e}", path.display()))?;
    parse(&text, path)
}

/// Parses and validates config text; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> Result<Validated> {
    let cfg: Config = toml::from_str(text).map_err(|e| {
        anyhow!(
            "config {}: {}",
            origin.display(),
            e.to_string().trim_end().replace('\n', "\n  ")
        )
    })?;
    validate(cfg, origin)
}

fn duration(origin: &Path, field: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value).map_err(|e| {
        anyhow!(
            "config {}: field `{field}`: {value:?} is not a duration like 30s or 1h ({e})",
            origin.display()
        )
    })
}

fn validate(cfg: Config, origin: &Path) -> Result<Validated> {
    let bad =
        |field: &str, why: String| anyhow!("config {}: field `{field}`: {why}", origin.display());
    let s = &cfg.service;
    if s.interface.is_empty() || s.interface.len() > 15 {
        return Err(bad(
            "service.interface",
            "must be 1-15 characters (an interface name)".into(),
        ));
    }
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
    for (i, u) in cfg.upstreams.iter().enumerate() {
        if u.address.trim().is_empty() {
            return Err(bad(&format!("upstream[{i}].address"), "is empty".into()));
        }
    }
    let vip = validate_vip(&cfg, origin)?;
    let dhcp = validate_dhcp(&cfg, vip.as_ref(), origin)?;
    let admission = validate_admission(&cfg.limits, &cfg.access, &cfg.guest_clocks, origin)?;
    let observe = validate_observe(
        &cfg.guest_clocks,
        &cfg.metrics,
        &cfg.control,
        &cfg.alarms,
        vip.as_ref(),
        origin,
    )?;
    let system = SystemConfig {
        poll: PollConfig {
            min_poll: c.min_poll,
            max_poll: c.max_poll,
            iburst: true,
        },
        discipline: DisciplineConfig {
            max_slew_ppm: c.max_slew_ppm,
            panic_threshold_s: panic.as_secs_f64(),
            ..DisciplineConfig::default()
        },
        min_sources: c.min_sources.max(1),
        max_holdover_ns: holdover.as_nanos().min(u64::MAX as u128) as u64,
        max_anchor_age_ns: max_age.as_nanos().min(u64::MAX as u128) as u64,
        leap_smear: c.leap_smear,
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
        |field: &str, why: String| anyhow!("config {}: field `{field}`: {why}", origin.display());
    let kod_interval = duration(origin, "limits.kod_interval", &l.kod_interval)?;
    let mut policy = ResponderPolicy::OPEN;
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
    policy.kod_interval_ns = kod_interval.as_nanos().min(u64::MAX as u128) as u64;
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
    if acl.len() > 4096 {
        return Err(bad(
            "access",
            format!("{} prefixes; at most 4096 fit", acl.len()),
        ));
    }
    if !acl.is_empty() {
        policy.flags |= POLICY_ACL;
    }
    if !a.allow.is_empty() {
        policy.flags |= POLICY_DEFAULT_DENY;
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
    vip: Option<&crate::host::vip::VipSpec>,
    origin: &Path,
) -> Result<crate::observe::ObserveSpec> {
    let bad =
        |field: &str, why: String| anyhow!("config {}: field `{field}`: {why}", origin.display());
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
    let control_socket = match (&control.socket, vip) {
        (Some(p), _) if !p.is_absolute() => {
            return Err(bad(
                "control.socket",
                format!("{} is not an absolute path", p.display()),
            ))
        }
        (Some(p), _) => Some(p.clone()),
        (None, Some(v)) => Some(crate::host::vip::state_dir(&v.netns).join("control.sock")),
        (None, None) => None,
    };
    Ok(crate::observe::ObserveSpec {
        metrics_listen: metrics.enable.then_some(metrics.listen),
        control_socket,
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

fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn validate_vip(cfg: &Config, origin: &Path) -> Result<Option<crate::host::vip::VipSpec>> {
    let bad =
        |field: &str, why: String| anyhow!("config {}: field `{field}`: {why}", origin.display());
    let Some(v) = &cfg.vip else {
        return Ok(None);
    };
    let Some(netns) = cfg.service.netns.clone() else {
        return Err(bad(
            "service.netns",
            "[vip] needs the name of the namespace to create and keep".into(),
        ));
    };
    if netns.is_empty() || netns.len() > 64 || netns.contains('/') || netns.starts_with('.') {
        return Err(bad(
            "service.netns",
            format!("{netns:?} is not a namespace name (1-64 characters, no '/')"),
        ));
    }
    if !is_interface_name(&cfg.service.interface) {
        return Err(bad(
            "service.interface",
            format!("{:?} is not an interface name", cfg.service.interface),
        ));
    }
    for (field, name) in [
        ("vip.host_interface", Some(&v.host_interface)),
        ("vip.bridge", v.bridge.as_ref()),
    ] {
        if let Some(name) = name {
            if !is_interface_name(name) {
                return Err(bad(
                    field,
                    format!("{name:?} is not an interface name (1-15 of A-Z a-z 0-9 - _ .)"),
                ));
            }
        }
    }
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
                    crate::host::vip::first_host(&net),
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
    for (i, name) in v.host_interfaces.iter().enumerate() {
        if !is_interface_name(name) {
            return Err(bad(
                &format!("vip.host_interfaces[{i}]"),
                format!("{name:?} is not an interface name"),
            ));
        }
    }
    Ok(Some(crate::host::vip::VipSpec {
        netns,
        ns_interface: cfg.service.interface.clone(),
        host_interface: v.host_interface.clone(),
        bridge: v.bridge.clone(),
        create_bridge: v.create_bridge,
        service_addresses,
        aliases: cfg.service.addresses.clone(),
        routes,
        repair_interval,
        host_interfaces: v.host_interfaces.clone(),
    }))
}

fn validate_dhcp(
    cfg: &Config,
    vip: Option<&crate::host::vip::VipSpec>,
    origin: &Path,
) -> Result<Option<crate::host::dhcp::DhcpSpec>> {
    let bad =
        |field: &str, why: String| anyhow!("config {}: field `{field}`: {why}", origin.display());
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
    Ok(Some(crate::host::dhcp::DhcpSpec {
        netns: vip.netns.clone(),
        interface: vip.ns_interface.clone(),
        service: subnet,
        range: (range[0], range[1]),
        lease_time,
        router: d.router,
        clock_addresses,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!(
            "{:#}",
            parse(text, Path::new("/etc/ntp-xdp.toml")).unwrap_err()
        )
    }

    const MINIMAL: &str = r#"
[service]
interface = "veth0"
addresses = ["169.254.169.123"]
"#;

    #[test]
    fn embedded_default_is_valid() {
        let v = parse(EMBEDDED_DEFAULT, Path::new("(embedded)")).unwrap();
        assert!(v.upstreams.is_empty());
        assert_eq!(v.local_stratum, 10);
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let v = parse(MINIMAL, Path::new("x.toml")).unwrap();
        assert_eq!(v.system.discipline.max_slew_ppm, 500.0);
        assert_eq!(v.system.poll.min_poll, 4);
        assert_eq!(v.system.poll.max_poll, 10);
        assert_eq!(v.xdp_mode, XdpModePref::Auto);
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = err(&format!("{MINIMAL}[clock]\nmax_holdover = \"forever\"\n"));
        assert!(
            e.contains("/etc/ntp-xdp.toml")
                && e.contains("clock.max_holdover")
                && e.contains("forever"),
            "{e}"
        );
        let e = err(&format!(
            "{MINIMAL}[clock]\nmin_sources = 3\n[[upstream]]\naddress = \"a\"\n"
        ));
        assert!(e.contains("clock.min_sources") && e.contains('3'), "{e}");
        let e = err(&format!("{MINIMAL}[clock]\nmax_holdover = \"10m\"\n"));
        assert!(
            e.contains("clock.max_holdover") && e.contains("max_poll"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[clock]\nstratum = 16\n"));
        assert!(e.contains("clock.stratum") && e.contains("16"), "{e}");
        let e = err(&format!("{MINIMAL}[clock]\nrefid = \"TOOLONG\"\n"));
        assert!(e.contains("clock.refid"), "{e}");
        let e = err(&format!("{MINIMAL}[clock]\nmin_poll = 12\nmax_poll = 6\n"));
        assert!(e.contains("clock.min_poll"), "{e}");
        let e = err("[service]\ninterface = \"veth0\"\naddresses = []\n");
        assert!(e.contains("service.addresses"), "{e}");
        let e = err("[service]\ninterface = \"veth0\"\naddresses = [\"not-an-ip\"]\n");
        assert!(
            e.contains("/etc/ntp-xdp.toml") && e.contains("addresses"),
            "{e}"
        );
        // Unknown fields are errors, not silently ignored typos.
        let e = err(&format!("{MINIMAL}[clock]\nmax_slew = 5\n"));
        assert!(e.contains("max_slew"), "{e}");
        let e = err(&format!("{MINIMAL}[service2]\n"));
        assert!(e.contains("service2"), "{e}");
    }

    #[test]
    fn limits_access_and_observability_sections() {
        use ntp_common::policy::*;
        let v = parse(MINIMAL, Path::new("x.toml")).unwrap();
        let p = v.admission.policy;
        // Safe defaults: limited at 2/s with a burst of 16, RATE and DENY KoDs, guest clocks.
        assert!(p.has(POLICY_RATE_LIMIT) && p.has(POLICY_KOD_RATE) && p.has(POLICY_KOD_DENY));
        assert!(p.has(POLICY_GUEST_CLOCKS) && !p.has(POLICY_ACL));
        assert_eq!(p.emission_ns, 500_000_000);
        assert_eq!(p.burst_tolerance_ns, 15 * 500_000_000);
        assert_eq!(
            v.observe.metrics_listen,
            Some("127.0.0.1:9273".parse().unwrap())
        );
        assert_eq!(v.observe.control_socket, None);
        let v = parse(
            &format!(
                "{MINIMAL}[limits]\nenable = false\n[access]\nallow = [\"169.254.0.0/16\"]\n\
                 deny = [\"169.254.7.0/24\"]\ndeny_action = \"drop\"\n[metrics]\nenable = false\n\
                 [control]\nsocket = \"/run/x.sock\"\n"
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        let p = v.admission.policy;
        assert!(!p.has(POLICY_RATE_LIMIT) && !p.has(POLICY_KOD_DENY));
        assert!(p.has(POLICY_ACL) && p.has(POLICY_DEFAULT_DENY));
        assert_eq!(v.admission.acl.len(), 2);
        assert_eq!(v.observe.metrics_listen, None);
        assert_eq!(
            v.observe.control_socket.as_deref(),
            Some(Path::new("/run/x.sock"))
        );
        let v = parse(VIP, Path::new("x.toml")).unwrap();
        assert_eq!(
            v.observe.control_socket.unwrap(),
            crate::host::vip::state_dir("ntp-vip").join("control.sock")
        );

        for (section, field, want) in [
            ("[limits]\nrate = 0", "limits.rate", "0"),
            ("[limits]\nburst = 0", "limits.burst", "0"),
            (
                "[limits]\nkod_interval = \"often\"",
                "limits.kod_interval",
                "often",
            ),
            ("[limits]\nsources = 0", "limits.sources", "0"),
            (
                "[access]\ndeny_action = \"reject\"",
                "access.deny_action",
                "reject",
            ),
            (
                "[access]\nallow = [\"169.254.0.0/16\"]\ndeny = [\"169.254.0.0/16\"]",
                "access.deny[0]",
                "twice",
            ),
            (
                "[access]\nallow = [\"169.254.0.0/33\"]",
                "allow",
                "169.254.0.0/33",
            ),
            (
                "[guest_clocks]\nalarm_offset = \"2d\"",
                "guest_clocks.opaque_beyond",
                "larger",
            ),
            ("[metrics]\nlisten = \"localhost\"", "listen", "localhost"),
            (
                "[control]\nsocket = \"relative.sock\"",
                "control.socket",
                "absolute",
            ),
            (
                "[alarms]\nmax_drop_fraction = 2.0",
                "alarms.max_drop_fraction",
                "2",
            ),
            ("[alarms]\nwindow = \"10ms\"", "alarms.window", "1s"),
        ] {
            let e = err(&format!("{MINIMAL}{section}\n"));
            assert!(
                e.contains("/etc/ntp-xdp.toml") && e.contains(field) && e.contains(want),
                "{section}: {e}"
            );
        }
    }

    const VIP: &str = r#"
[service]
netns = "ntp-vip"
interface = "ntpv0"
addresses = ["169.254.169.123", "fd00:ec2::123"]

[vip]
host_interface = "ntpv0-host"
service_address = "169.254.100.1/24"
"#;

    #[test]
    fn vip_and_dhcp_sections_are_validated() {
        let v = parse(VIP, Path::new("x.toml")).unwrap();
        let vip = v.vip.unwrap();
        assert_eq!(vip.repair_interval, Duration::from_secs(1));
        assert_eq!(
            vip.served_addresses(),
            vec![
                "169.254.169.123".parse::<IpAddr>().unwrap(),
                "fd00:ec2::123".parse().unwrap(),
                "169.254.100.1".parse().unwrap()
            ]
        );
        let e = err(&VIP.replace("netns = \"ntp-vip\"\n", ""));
        assert!(e.contains("service.netns") && e.contains("[vip]"), "{e}");
        let e = err(&VIP.replace("169.254.100.1/24", "169.254.100.0/24"));
        assert!(
            e.contains("vip.service_address") && e.contains("169.254.100.1/24"),
            "{e}"
        );
        let e = err(&VIP.replace("169.254.100.1/24", "fd00::1/64"));
        assert!(
            e.contains("vip.service_address") && e.contains("IPv4"),
            "{e}"
        );
        let e = err(&VIP.replace("ntpv0-host", "this-name-is-far-too-long"));
        assert!(e.contains("vip.host_interface"), "{e}");
        let e = err(&format!("{VIP}create_bridge = true\n"));
        assert!(e.contains("vip.create_bridge"), "{e}");
        let e = err(&format!(
            "{VIP}routes = [{{ to = \"169.254.200.0/24\", via = \"fd00::1\" }}]\n"
        ));
        assert!(e.contains("vip.routes[0].via"), "{e}");
        let e = err(&format!("{VIP}[dhcp]\nenable = true\n"));
        assert!(e.contains("dhcp.range"), "{e}");
        let e = err(&format!(
            "{VIP}[dhcp]\nenable = true\nrange = [\"169.254.101.10\", \"169.254.101.20\"]\n"
        ));
        assert!(
            e.contains("dhcp.range") && e.contains("169.254.100.0/24"),
            "{e}"
        );
        let e = err(&format!(
            "{VIP}[dhcp]\nenable = true\nrange = [\"169.254.100.1\", \"169.254.100.20\"]\n"
        ));
        assert!(e.contains("service address"), "{e}");
        let e = err(&format!("{MINIMAL}[dhcp]\nenable = true\n"));
        assert!(e.contains("dhcp.enable") && e.contains("[vip]"), "{e}");
        let ok = parse(
            &format!(
                "{VIP}[dhcp]\nenable = true\nrange = [\"169.254.100.10\", \"169.254.100.20\"]\nrouter = \"169.254.100.254\"\n"
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(ok.dhcp.unwrap().clock_addresses.len(), 1);
    }
}
