//! The daemon's TOML configuration, validated as a whole before anything is started: an error
//! names the file, the field and the reason.
//!
//! - [`schema`]: the sections as operators write them;
//! - [`validate`]: every field checked, errors as [`ConfigError`];
//! - [`lower`]: the validated config ([`Validated`]) and its lowering to daemon options.

pub mod lower;
pub mod schema;
pub mod validate;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub use lower::Validated;
pub use schema::*;
pub use validate::{
    check_holdover, host_preflight, parse_refid, validate_admission, validate_observe,
};

/// A configuration error: the file (or "(command line)"), the field if one is to blame, and
/// why. Callers that report errors elsewhere (a fleet's config state) downcast to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {}: {}{reason}", file.display(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub field: Option<String>,
    pub reason: String,
}

impl ConfigError {
    pub fn field(file: &Path, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            field: Some(field.to_string()),
            reason: reason.into(),
        }
    }

    pub fn file(file: &Path, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            field: None,
            reason: reason.into(),
        }
    }
}

/// The configuration `cargo xtask run` and `ntp-user run` use when given no file: serve the
/// host clock as a local stratum on the demo namespace pair.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Validated> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::file(path, format!("cannot read: {e}")))?;
    parse(&text, path)
}

/// Parses and validates config text; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> Result<Validated> {
    let cfg: Config = toml::from_str(text)
        .map_err(|e| ConfigError::file(origin, e.to_string().trim_end().replace('\n', "\n  ")))?;
    validate::validate(cfg, origin, true)
}

/// Like [`parse`], but without reading the files the config names (NTS certificate and
/// key): what `ntp-user fleet push` checks on an operator's machine, where they need not
/// exist. Each host checks them itself before it applies the config.
pub fn parse_portable(text: &str, origin: &Path) -> Result<Validated> {
    let cfg: Config = toml::from_str(text)
        .map_err(|e| ConfigError::file(origin, e.to_string().trim_end().replace('\n', "\n  ")))?;
    validate::validate(cfg, origin, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responder::XdpModePref;
    use std::net::IpAddr;
    use std::time::Duration;

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
        assert!(v.system.poll.interleaved, "interleaved requests by default");
        assert_eq!(v.xdp_mode, XdpModePref::Auto);
        let v = parse(
            &format!("{MINIMAL}[clock]\ninterleaved = false\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(!v.system.poll.interleaved);
        assert_eq!(v.system.holdover_wander_ppm_per_hour, 0.1);
        let v = parse(
            &format!("{MINIMAL}[clock]\nholdover_wander_ppm_per_hour = 0.5\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(v.system.holdover_wander_ppm_per_hour, 0.5);
        let e = err(&format!(
            "{MINIMAL}[clock]\nholdover_wander_ppm_per_hour = -1.0\n"
        ));
        assert!(
            e.contains("/etc/ntp-xdp.toml") && e.contains("clock.holdover_wander_ppm_per_hour"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[clock]\ninterleaved = \"yes\"\n"));
        assert!(
            e.contains("/etc/ntp-xdp.toml") && e.contains("interleaved"),
            "{e}"
        );
    }

    #[test]
    fn the_nts_section_is_validated() {
        // A certificate and key that go together, from rcgen, in a scratch directory.
        let dir = std::env::temp_dir().join(format!("ntscfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["169.254.169.123".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (chain, keyfile) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&keyfile, key.serialize_pem()).unwrap();
        let section = |extra: &str| {
            format!(
                "{MINIMAL}[nts]\ncertificate_chain = \"{}\"\nprivate_key = \"{}\"\n{extra}",
                chain.display(),
                keyfile.display()
            )
        };
        let v = parse(&section(""), Path::new("x.toml")).unwrap();
        let n = v.nts.unwrap();
        assert_eq!(n.listen, ["169.254.169.123".parse::<IpAddr>().unwrap()]);
        assert_eq!(n.port, 4460);
        assert_eq!(n.key_rotation, Duration::from_secs(86400));
        assert_eq!(n.ntp_server_v4, Some("169.254.169.123".parse().unwrap()));
        assert_eq!(n.ntp_server_v6, None);
        let e = err(&section("listen = [\"169.254.1.1\"]\n"));
        assert!(
            e.contains("nts.listen[0]") && e.contains("169.254.1.1"),
            "{e}"
        );
        let e = err(&section("key_rotation = \"0s\"\n"));
        assert!(e.contains("nts.key_rotation"), "{e}");
        let e = err(&section(
            "ntp_server = [\"169.254.1.1\", \"169.254.1.2\"]\n",
        ));
        assert!(e.contains("nts.ntp_server"), "{e}");
        let e = err(&format!(
            "{MINIMAL}[nts]\ncertificate_chain = \"/nonexistent.pem\"\nprivate_key = \"{}\"\n",
            keyfile.display()
        ));
        assert!(
            e.contains("/etc/ntp-xdp.toml")
                && e.contains("nts.certificate_chain")
                && e.contains("/nonexistent.pem"),
            "{e}"
        );
        // On an operator's machine the files need not exist; everything else is checked.
        let missing = format!(
            "{MINIMAL}[nts]\ncertificate_chain = \"/nonexistent.pem\"\nprivate_key = \"/nonexistent.key\"\n"
        );
        assert!(parse_portable(&missing, Path::new("x.toml")).is_ok());
        assert!(parse_portable(
            &format!("{missing}key_rotation = \"0s\"\n"),
            Path::new("x.toml")
        )
        .is_err());
        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&keyfile, other.serialize_pem()).unwrap();
        let e = err(&section(""));
        assert!(e.contains("do not go together"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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

    /// Errors are typed: a caller that reports them elsewhere gets file, field and reason.
    #[test]
    fn errors_carry_file_field_and_reason() {
        let text = EMBEDDED_DEFAULT.replace("[service]", "[service]\nprecision = 5");
        let e = parse(&text, Path::new("/etc/x.toml")).unwrap_err();
        let c = e.downcast_ref::<ConfigError>().expect("a ConfigError");
        assert_eq!(c.file, Path::new("/etc/x.toml"));
        assert_eq!(c.field.as_deref(), Some("service.precision"));
        assert!(!c.reason.is_empty());
        assert!(e
            .to_string()
            .starts_with("config /etc/x.toml: field `service.precision`: "));
    }

    /// Values that would break the service are refused, each naming its field and why.
    #[test]
    fn values_that_break_the_service_are_refused() {
        for (section, field, why) in [
            (
                "[limits]\nkod_interval = \"0s\"",
                "limits.kod_interval",
                "at least 1s",
            ),
            (
                "[clock]\npanic_threshold = \"0s\"",
                "clock.panic_threshold",
                "at least 1ms",
            ),
            (
                "[clock]\nmax_anchor_age = \"30d\"",
                "clock.max_anchor_age",
                "at most 1h",
            ),
            (
                "[limits]\nipv6_prefix = 128",
                "limits.ipv6_prefix",
                "16..=64",
            ),
            (
                "[limits]\nkod_global_rate = 0",
                "limits.kod_global_rate",
                "(0, 1000000]",
            ),
            (
                "[metrics]\nlisten = \"0.0.0.0:9273\"",
                "metrics.listen",
                "allow_remote",
            ),
        ] {
            let e = err(&format!("{MINIMAL}{section}\n"));
            assert!(e.contains(field) && e.contains(why), "{section}: {e}");
        }
        // A remote metrics endpoint asked for explicitly is fine; the IPv6 prefix is applied.
        let v = parse(
            &format!(
                "{MINIMAL}[metrics]\nlisten = \"0.0.0.0:9273\"\nallow_remote = true\n\
                 [limits]\nipv6_prefix = 56\nkod_global_rate = 50\n"
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(v.admission.policy.v6_prefix_len, 56);
        assert_eq!(v.admission.policy.kod_global_emission_ns, 20_000_000);
    }
}
