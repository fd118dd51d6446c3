//! The daemon's TOML configuration, validated as a whole before anything is started: an error
//! names the file, the field and the reason.
//!
//! - [`schema`]: the sections as operators write them;
//! - [`names`]: the names and paths in them, refused as they are read if they hold anything a
//!   generated file or a command line could not carry;
//! - [`validate`]: every field checked, errors as [`ConfigError`];
//! - [`lower`]: the validated config ([`Validated`]), the one settings type the daemon runs.

pub mod error;
pub mod lower;
pub mod names;
pub mod reference;
pub mod schema;
pub mod sections;
pub mod validate;
pub mod values;

use std::path::Path;

use anyhow::Result;

pub use error::ConfigError;
pub use lower::{ClockSource, FleetSpec, Validated};
pub use schema::*;
pub use sections::check_holdover;
pub use validate::{validate_admission, validate_observe};
pub use values::{parse_refid, HumanDuration, RefId};

/// The configuration `cargo xtask run` and `ntp-xdp run` use when given no file: serve the
/// host clock as a local stratum on the demo namespace pair.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Validated> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::file(path, format!("cannot read: {e}")))?;
    parse(&text, path)
}

/// A config file, or the embedded default without one.
pub fn load_or_default(path: Option<&Path>) -> Result<Validated> {
    match path {
        Some(path) => load(path),
        None => parse(EMBEDDED_DEFAULT, Path::new("(embedded default)")),
    }
}

/// Parses and validates config text; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> Result<Validated> {
    validate::validate(read(text, origin)?, origin, true)
}

/// Validates a configuration assembled as a TOML table (`serve`'s flags over a file).
pub fn parse_table(table: &toml::Table, origin: &Path) -> Result<Validated> {
    let text = toml::to_string(table).map_err(|e| ConfigError::file(origin, e.to_string()))?;
    parse(&text, origin)
}

/// Lays `over` on `base`: tables merge key by key, any other value replaces the base's.
pub fn merge_toml(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_toml(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The TOML as the schema's types; a value refused names the field it was read from.
fn read(text: &str, origin: &Path) -> std::result::Result<Config, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let field = e.path().to_string();
        let reason = e.into_inner().to_string().trim_end().replace('\n', "\n  ");
        match field.as_str() {
            "." => ConfigError::file(origin, reason),
            _ => ConfigError::field(origin, &field, reason),
        }
    })
}

/// Like [`parse`], but without reading the files the config names (NTS certificate and
/// key): what `ntp-xdp fleet push` checks on an operator's machine, where they need not
/// exist. Each host checks them itself before it applies the config.
pub fn parse_portable(text: &str, origin: &Path) -> Result<Validated> {
    validate::validate(read(text, origin)?, origin, false)
}

/// A configuration that sets every field whose value reaches a generated file, a command line
/// or a path, and how to spoil one of them: shared by the tests of `check-config` and of a
/// fleet push.
#[cfg(test)]
pub(crate) mod every_field {
    use std::path::{Path, PathBuf};

    /// The fields, as errors name them. Those under `fleet.` stay on the host (a push has no
    /// `[fleet]`).
    pub const FIELDS: &[&str] = &[
        "service.netns",
        "service.interface",
        "service.peer_netns",
        "vip.host_interface",
        "vip.bridge",
        "vip.host_interfaces[0]",
        "redundancy.bridge",
        "redundancy.interface",
        "redundancy.host_interface",
        "redundancy.track_interfaces[0]",
        "control.socket",
        "nts.certificate_chain",
        "nts.private_key",
        "nts.key_file",
        "upstream[0].address",
        "fleet.endpoints[0]",
        "fleet.cluster",
        "fleet.host",
        "fleet.ca",
        "fleet.certificate",
        "fleet.key",
        "fleet.user",
        "fleet.password_file",
        "fleet.state_dir",
        "fleet.nts_seal_key_file",
    ];

    /// What each field is spoiled with: a line break (a directive of one's own), a quote (out
    /// of a quoted string), a NUL (the end of a C string).
    pub const BAD: [&str; 3] = ["\n", "\"", "\0"];

    /// A scratch directory with the files `[fleet]` names (they must exist).
    pub fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("every-field-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.pem", "client.pem", "client-key.pem", "password"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        dir
    }

    /// The cluster's part (what a push carries).
    pub const CLUSTER: &str = r#"
[service]
netns = "ntp-vip"
interface = "ntpv0"
addresses = ["169.254.169.123", "fd00:ec2::123"]
peer_netns = "ntp-peer"

[vip]
host_interface = "ntpv0-host"
bridge = "ntpv0-br"
service_address = "169.254.100.1/24"
service_address6 = "fd00:ec2::1/64"
host_interfaces = ["eth9"]
ipv6_route_advertisements = true

[redundancy]
virtual_router_id = 51
bridge = "ntp-mgmt"
interface = "ntpv0-r"
host_interface = "ntpv0-hr"
own_address = "169.254.250.2/24"
unicast_peers = ["169.254.250.3"]
track_interfaces = ["eth8"]

[control]
socket = "/run/ntp-xdp/test/control.sock"

[nts]
certificate_chain = "/etc/ntp-xdp/nts-chain.pem"
private_key = "/etc/ntp-xdp/nts-key.pem"
key_file = "/var/lib/ntp-xdp/nts-keys.json"

[[upstream]]
address = "169.254.1.1"
"#;

    /// This host's `[fleet]`, with TLS and a password, its files in `dir`.
    pub fn fleet(dir: &Path) -> String {
        let f = |name: &str| dir.join(name).display().to_string();
        format!(
            "[fleet]\nendpoints = [\"https://169.254.200.1:2379\"]\ncluster = \"az1\"\n\
             host = \"vip-a\"\nca = \"{}\"\ncertificate = \"{}\"\nkey = \"{}\"\n\
             user = \"ntp\"\npassword_file = \"{}\"\nstate_dir = \"/var/lib/ntp-xdp/fleet\"\n\
             nts_seal_key_file = \"{}\"\n",
            f("ca.pem"),
            f("client.pem"),
            f("client-key.pem"),
            f("password"),
            f("seal.key")
        )
    }

    /// `text` with `bad` put after the first character of `field`'s value; and that value.
    pub fn spoil(text: &str, field: &str, bad: &str) -> (String, String) {
        let mut root = toml::Value::Table(text.parse().unwrap());
        let mut value = &mut root;
        for part in field.split('.') {
            let (key, index) = match part.split_once('[') {
                Some((k, i)) => (k, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
                None => (part, None),
            };
            value = value
                .get_mut(key)
                .unwrap_or_else(|| panic!("{field} is not in the config"));
            if let Some(i) = index {
                value = &mut value.as_array_mut().unwrap()[i];
            }
        }
        let good = value.as_str().unwrap().to_string();
        let spoiled = format!("{}{bad}{}", &good[..1], &good[1..]);
        *value = toml::Value::String(spoiled.clone());
        (toml::to_string(&root).unwrap(), spoiled)
    }
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
    fn refids() {
        assert_eq!(parse_refid("LOCL").unwrap(), *b"LOCL");
        assert_eq!(parse_refid("GPS").unwrap(), [b'G', b'P', b'S', 0]);
        assert_eq!(parse_refid("169.254.0.1").unwrap(), [169, 254, 0, 1]);
        assert!(parse_refid("").is_err());
        assert!(parse_refid("TOOLONG").is_err());
        assert!(parse_refid("a b").is_err());
    }

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

    /// Redundant hosts with router advertisements: radvd sends from the group's router
    /// address, which keepalived moves with the service and clock addresses.
    #[test]
    fn redundant_hosts_advertise_routes_from_an_address_that_moves() {
        let v = parse(
            "[service]\nnetns = \"ns\"\ninterface = \"v0\"\n\
             addresses = [\"169.254.169.123\", \"fd00:ec2::123\"]\n\
             [vip]\nhost_interface = \"h0\"\nbridge = \"br0\"\n\
             service_address = \"169.254.100.1/24\"\nservice_address6 = \"fd00:ec2:100::1/64\"\n\
             ipv6_route_advertisements = true\n[redundancy]\nvirtual_router_id = 7\n\
             bridge = \"mgmt\"\nown_address = \"169.254.250.2/24\"\n\
             unicast_peers = [\"169.254.250.3\"]\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let spec = v.vip.unwrap();
        let router: IpAddr = "fe80::200:5eff:fe00:207".parse().unwrap();
        let ra = spec.router_advertisements.as_ref().unwrap();
        assert_eq!(ra.router_address.map(IpAddr::V6), Some(router));
        let keepalived = &spec.redundancy.as_ref().unwrap().keepalived;
        assert!(keepalived
            .virtual_addresses
            .contains(&ipnet::IpNet::new(router, 64).unwrap()));
        // Not an address the responder answers on.
        assert!(!spec.served_addresses().contains(&router));
    }

    #[test]
    fn vrrp_speaks_where_guests_cannot_reach_it() {
        let vip = |redundancy: &str| {
            format!(
                "[service]\nnetns = \"ns\"\ninterface = \"v0\"\naddresses = [\"169.254.169.123\"]\n\
                 [vip]\nhost_interface = \"h0\"\nbridge = \"br0\"\n\
                 service_address = \"169.254.100.1/24\"\n[redundancy]\nvirtual_router_id = 7\n\
                 {redundancy}"
            )
        };
        // A link of the VIP hosts' own: VRRP and the own address there, nothing on the
        // guests' link but the moving addresses.
        let v = parse(
            &vip("bridge = \"mgmt\"\nown_address = \"169.254.250.2/24\"\n\
                  unicast_peers = [\"169.254.250.3\"]\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        let spec = v.vip.clone().unwrap();
        let r = spec.redundancy.as_ref().unwrap();
        let link = r.link.as_ref().unwrap();
        assert_eq!(
            (link.bridge.as_str(), link.ns_interface.as_str()),
            ("mgmt", "ntpxdp-r0")
        );
        assert_eq!(r.keepalived.vrrp_interface, "ntpxdp-r0");
        assert_eq!(r.keepalived.address_interface, "v0");
        assert!(spec.wanted_addresses().is_empty());
        assert_eq!(v.server_params().vrrp_router_id, 7);
        assert!(v.observe.health_socket.is_some());
        assert!(r
            .keepalived
            .health_command
            .iter()
            .any(|a| a.ends_with("health.sock")));
        // Neither a link nor an explicit shared network: refused, with the way out.
        let e = err(&vip("own_address = \"169.254.100.2/24\"\n"));
        assert!(
            e.contains("redundancy.bridge") && e.contains("shared_network"),
            "{e}"
        );
        // A shared network needs its peers (keepalived checks adverts' sources against them).
        let e = err(&vip(
            "shared_network = true\nown_address = \"169.254.100.2/24\"\n",
        ));
        assert!(e.contains("redundancy.unicast_peers"), "{e}");
        let v = parse(
            &vip(
                "shared_network = true\nown_address = \"169.254.100.2/24\"\n\
                  unicast_peers = [\"169.254.100.3\"]\n",
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        let spec = v.vip.unwrap();
        assert_eq!(
            spec.wanted_addresses(),
            ["169.254.100.2/24".parse().unwrap()]
        );
        // The own address on a link of its own is not one guests use.
        let e = err(&vip(
            "bridge = \"mgmt\"\nown_address = \"169.254.100.2/24\"\n",
        ));
        assert!(e.contains("redundancy.own_address"), "{e}");
        // Peers on the own address's link.
        let e = err(&vip(
            "bridge = \"mgmt\"\nown_address = \"169.254.250.2/24\"\n\
                          unicast_peers = [\"169.254.100.3\"]\n",
        ));
        assert!(e.contains("redundancy.unicast_peers[0]"), "{e}");
        let e = err(&vip(
            "bridge = \"br0\"\nown_address = \"169.254.250.2/24\"\n",
        ));
        assert!(e.contains("guests' bridge"), "{e}");
        let e = err(&vip("bridge = \"mgmt\"\nshared_network = true\n\
                          own_address = \"169.254.250.2/24\"\n"));
        assert!(e.contains("redundancy.shared_network"), "{e}");
    }

    #[test]
    fn nts_keys_go_through_a_fleet_only_over_tls_and_sealed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("ntsfleet-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["169.254.169.123".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (chain, keyfile, ca) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("ca.pem"));
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&keyfile, key.serialize_pem()).unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let seal = dir.join("nts-seal.key");
        std::fs::write(&seal, [9u8; 32]).unwrap();
        std::fs::set_permissions(&seal, std::fs::Permissions::from_mode(0o600)).unwrap();
        let nts = format!(
            "[nts]\ncertificate_chain = \"{}\"\nprivate_key = \"{}\"\n",
            chain.display(),
            keyfile.display()
        );
        let tls_fleet = |extra: &str| {
            format!(
                "[fleet]\nendpoints = [\"https://169.254.200.1:2379\"]\ncluster = \"az1\"\n\
                 host = \"a\"\nca = \"{}\"\nstate_dir = \"{}\"\n{extra}",
                ca.display(),
                dir.display()
            )
        };
        let plain_fleet = |extra: &str| {
            format!(
                "[fleet]\nendpoints = [\"http://169.254.200.1:2379\"]\ncluster = \"az1\"\n\
                 host = \"a\"\nstate_dir = \"{}\"\n{extra}",
                dir.display()
            )
        };
        // TLS and the seal key (by default in state_dir): accepted; the fleet rotates.
        let v = parse(
            &format!("{MINIMAL}{nts}{}", tls_fleet("")),
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(!v.nts.unwrap().rotate_locally);
        assert_eq!(v.fleet.unwrap().nts_seal_key_file.0, seal);
        // No TLS: NTS is refused, and so are credentials; a fleet alone without TLS is not.
        let e = err(&format!("{MINIMAL}{nts}{}", plain_fleet("")));
        assert!(
            e.contains("/etc/ntp-xdp.toml") && e.contains("fleet.ca") && e.contains("[nts]"),
            "{e}"
        );
        assert!(parse_portable(
            &format!("{MINIMAL}{nts}{}", plain_fleet("")),
            Path::new("x.toml")
        )
        .is_err());
        assert!(parse(
            &format!("{MINIMAL}{}", plain_fleet("")),
            Path::new("x.toml")
        )
        .is_ok());
        let pw = dir.join("password");
        std::fs::write(&pw, "secret\n").unwrap();
        let e = err(&format!(
            "{MINIMAL}{}",
            plain_fleet(&format!(
                "user = \"ntp\"\npassword_file = \"{}\"\n",
                pw.display()
            ))
        ));
        assert!(
            e.contains("fleet.password_file") && e.contains("in clear"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}{}", plain_fleet("user = \"ntp\"\n")));
        assert!(e.contains("fleet.user") && e.contains("TLS"), "{e}");
        assert!(parse(
            &format!(
                "{MINIMAL}{}",
                tls_fleet(&format!(
                    "user = \"ntp\"\npassword_file = \"{}\"\n",
                    pw.display()
                ))
            ),
            Path::new("x.toml")
        )
        .is_ok());
        // The seal key: missing, readable by others, the wrong size.
        let elsewhere = dir.join("other.key");
        let with_seal = format!(
            "{MINIMAL}{nts}{}",
            tls_fleet(&format!(
                "nts_seal_key_file = \"{}\"\n",
                elsewhere.display()
            ))
        );
        let e = err(&with_seal);
        assert!(
            e.contains("fleet.nts_seal_key_file") && e.contains("other.key"),
            "{e}"
        );
        // On an operator's machine it need not exist.
        assert!(parse_portable(&with_seal, Path::new("x.toml")).is_ok());
        std::fs::write(&elsewhere, [1u8; 32]).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = err(&with_seal);
        assert!(
            e.contains("fleet.nts_seal_key_file") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::write(&elsewhere, [1u8; 16]).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = err(&with_seal);
        assert!(
            e.contains("fleet.nts_seal_key_file") && e.contains("16 bytes"),
            "{e}"
        );
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
        // Tagged requests: none answered unless their VLAN is listed.
        assert!(v.admission.vlans.is_empty());
        let trunk = parse(
            &format!("{MINIMAL}[access]\nvlans = [100, 4094, 1]\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(trunk.admission.vlans, [100, 4094, 1]);
        assert_eq!(v.observe.metrics_listen, None);
        assert_eq!(
            v.observe.control_socket.as_deref(),
            Some(Path::new("/run/x.sock"))
        );
        let v = parse(VIP, Path::new("x.toml")).unwrap();
        assert_eq!(
            v.observe.control_socket.unwrap(),
            crate::host::files::state_dir("ntp-vip").join("control.sock")
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
            ("[access]\nvlans = [100, 0]", "access.vlans[1]", "1..=4094"),
            ("[access]\nvlans = [4095]", "access.vlans[0]", "4095"),
            ("[access]\nvlans = [-1]", "access.vlans[0]", "-1"),
            ("[access]\nvlans = [7, 7]", "access.vlans[1]", "twice"),
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

    /// `check-config`: a line break, a quote or a NUL in any value that reaches a generated
    /// file, a command line or a path is refused, and the error names the file, the field and
    /// the value.
    #[test]
    fn values_that_could_break_out_of_a_file_or_command_line_are_refused() {
        let dir = every_field::scratch("check-config");
        let text = format!("{}{}", every_field::CLUSTER, every_field::fleet(&dir));
        parse_portable(&text, Path::new("x.toml")).expect("the base config is valid");
        for field in every_field::FIELDS {
            for bad in every_field::BAD {
                let (spoiled, value) = every_field::spoil(&text, field, bad);
                let e = parse(&spoiled, Path::new("/etc/ntp-xdp.toml"))
                    .expect_err(&format!("{field} = {value:?} was accepted"));
                let c = e.downcast_ref::<ConfigError>().expect("a ConfigError");
                assert_eq!(c.file, Path::new("/etc/ntp-xdp.toml"));
                assert_eq!(c.field.as_deref(), Some(*field), "{e:#}");
                assert!(c.reason.contains(&format!("{value:?}")), "{e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What the helpers' files carry is rendered when the config is checked: a value they
    /// cannot carry is a config error, not a helper that never starts.
    #[test]
    fn the_helper_files_are_rendered_when_checked() {
        let dir = every_field::scratch("render");
        let text = format!("{}{}", every_field::CLUSTER, every_field::fleet(&dir));
        let v = parse_portable(&text, Path::new("x.toml")).unwrap();
        let vip = v.vip.unwrap();
        let keepalived = vip.redundancy.unwrap().keepalived.config_text().unwrap();
        assert!(
            keepalived
                .as_str()
                .contains("health --socket /run/ntp-xdp/ntp-vip/health.sock\""),
            "{}",
            keepalived.as_str()
        );
        let radvd = vip.router_advertisements.unwrap().config_text().unwrap();
        assert!(radvd.as_str().contains("interface ntpv0 {"));
        let _ = std::fs::remove_dir_all(&dir);
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
