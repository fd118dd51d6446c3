//! The daemon's TOML configuration, validated as a whole before anything is started: an error
//! names the file, the field and the reason.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde::Deserialize;

use crate::cli::parse_refid;
use crate::discipline::DisciplineConfig;
use crate::serve::XdpModeArg;
use crate::system::SystemConfig;
use crate::upstream::PollConfig;

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
    pub xdp_mode: XdpModeArg,
    pub reference: Reference,
    pub system: SystemConfig,
    pub upstreams: Vec<UpstreamSection>,
    pub local_stratum: u8,
    pub refid_override: Option<[u8; 4]>,
}

impl Validated {
    /// What `serve` runs for this configuration.
    pub fn serve_options(&self) -> crate::serve::ServeOptions {
        use crate::hostclock::HostClockIdentity;
        use crate::serve::ClockSource;
        let clock = if self.reference == Reference::Upstream && !self.upstreams.is_empty() {
            ClockSource::Upstreams {
                system: self.system.clone(),
                upstreams: self.upstreams.iter().map(|u| u.address.clone()).collect(),
            }
        } else {
            ClockSource::HostClock {
                identity: HostClockIdentity {
                    stratum: self.system.stratum_override.unwrap_or(self.local_stratum),
                    refid: self.refid_override.unwrap_or(*b"LOCL"),
                    max_age_ns: self.system.max_anchor_age_ns,
                },
                publish_interval: Duration::from_secs(1),
            }
        };
        crate::serve::ServeOptions {
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
        "auto" => XdpModeArg::Auto,
        "native" => XdpModeArg::Native,
        "generic" => XdpModeArg::Generic,
        other => {
            return Err(bad(
                "service.xdp_mode",
                format!("{other:?} is not one of auto, native, generic"),
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
    })
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
        assert_eq!(v.xdp_mode, XdpModeArg::Auto);
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
}
