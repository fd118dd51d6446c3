//! Validation of a whole configuration before anything is started: each section checks itself
//! ([`super::sections`]); here are the checks across sections. Each error names the file, the
//! field and the reason ([`ConfigError`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use ipnet::IpNet;

use super::error::ConfigError;
use super::lower::Validated;
use super::schema::*;
use crate::responder::XdpModePref;

/// `host_files`: read the files the config names (false on an operator's machine).
pub(super) fn validate(cfg: Config, origin: &Path, host_files: bool) -> Result<Validated> {
    let s = &cfg.service;
    s.check(origin)?;
    let xdp_mode = XdpModePref::from(s.xdp_mode);
    let c = &cfg.clock;
    let reference = c.reference;
    let upstreams = match reference {
        Reference::Upstream => cfg.upstreams.len(),
        Reference::HostClock => 0,
    };
    let system = c.lower(upstreams, origin)?;
    let refid_override = system.refid_override;
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
        .map(|v| v.health_socket());
    if let Some(v) = &vip {
        check_helper_files(v, origin)?;
    }
    let fleet = match &cfg.fleet {
        Some(f) => Some(f.lower(origin)?),
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
            f.nts_seal_key_file
                .read()
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
    let key_rotation = *n.key_rotation;
    if key_rotation < Duration::from_secs(1) || key_rotation > Duration::from_secs(30 * 86400) {
        return Err(bad(
            "nts.key_rotation",
            "must be between 1s and 30d (cookies outlive it by three rotations)".into(),
        ));
    }
    let key_file = PathBuf::from(n.key_file.clone());
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
    let spec = crate::nts::server::NtsSpec {
        certificate_chain: n.certificate_chain.clone().into(),
        private_key: n.private_key.clone().into(),
        listen,
        port: n.port,
        key_file,
        key_rotation,
        rotate_locally: fleet.is_none(),
        ntp_server_v4: pick(true)?,
        ntp_server_v6: pick(false)?,
    };
    if host_files {
        spec.tls_config()
            .map_err(|e| bad("nts.certificate_chain", format!("{e:#}")))?;
    }
    Ok(spec)
}

/// The responder's admission from the `[limits]`, `[access]` and `[guest_clocks]` sections.
pub fn validate_admission(
    l: &LimitsSection,
    a: &AccessSection,
    g: &GuestClocksSection,
    origin: &Path,
) -> Result<crate::responder::admission::AdmissionSpec> {
    use ntp_common::policy::*;
    let mut policy = l.policy(origin)?;
    if a.deny_action == DenyAction::Kod {
        policy.flags |= POLICY_KOD_DENY;
    }
    let acl = a.acl(origin)?;
    let vlans = a.vlan_ids(origin)?;
    g.policy(origin)?;
    if g.enable {
        policy.flags |= POLICY_GUEST_CLOCKS;
    }
    let mut spec = crate::responder::admission::AdmissionSpec {
        policy,
        acl,
        vlans,
        tables: crate::responder::TableSizes {
            rate_sources: l.sources,
            guests: g.guests,
        },
    };
    spec.policy.flags |= spec.acl_policy_flags();
    Ok(spec)
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
    let guests = g.policy(origin)?;
    let alarms = a.thresholds(origin)?;
    let metrics_listen = metrics.listen_address(origin)?;
    let control_socket = match (&control.socket, vip) {
        (Some(p), _) => Some(p.clone().into()),
        (None, Some(v)) => Some(v.default_control_socket()),
        (None, None) => None,
    };
    Ok(crate::observe::ObserveSpec {
        metrics_listen,
        control_socket,
        health_socket: None,
        guests,
        alarms,
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
                    net.hosts().next().unwrap_or(net.addr()),
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
    let repair_interval = *v.repair_interval;
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&repair_interval) {
        return Err(bad(
            "vip.repair_interval",
            "must be between 100ms and 1h".into(),
        ));
    }
    let mut spec = crate::vip::VipSpec {
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
        router_advertisements: None,
    };
    match (v.ipv6_route_advertisements, v.service_address6) {
        (false, _) => {}
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
            spec.router_advertisements = spec.router_advertisements_for(s6);
        }
    }
    Ok(Some(spec))
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
    let advert = *r.advert_interval;
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
    let health_socket = v.health_socket();
    // IPv6 guests route the clock address via the router advertisements' source: the group's
    // address, which moves with the others.
    let mut virtual_addresses = v.virtual_addresses();
    if let Some(ra) = v.router_advertisements.as_mut() {
        let router = ra.share_with_group(r.virtual_router_id);
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
    let lease_time = *d.lease_time;
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{every_field, parse_portable, reference, ConfigError};

    /// Every duration key of the schema, spoiled, is refused as it is read, and the error
    /// names the file, that key and the value.
    #[test]
    fn a_bad_duration_names_its_field() {
        let schema = reference::json_schema();
        let defs = schema["$defs"].as_object().unwrap();
        let mut fields = Vec::new();
        for (section, property) in schema["properties"].as_object().unwrap() {
            let text = property.to_string();
            let Some(def) = defs.keys().find(|d| text.contains(&format!("/{d}\""))) else {
                continue;
            };
            for (key, p) in defs[def]["properties"].as_object().unwrap() {
                if p.to_string().contains("#/$defs/Duration\"") {
                    fields.push((section.clone(), key.clone()));
                }
            }
        }
        assert!(fields.len() >= 17, "{fields:?}");
        let dir = every_field::scratch("durations");
        let base = format!("{}{}", every_field::CLUSTER, every_field::fleet(&dir));
        for (section, key) in fields {
            let mut root: toml::Table = base.parse().unwrap();
            root.entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap()
                .insert(key.clone(), toml::Value::String("soon".into()));
            let text = toml::to_string(&root).unwrap();
            let e = parse_portable(&text, Path::new("/etc/ntp-xdp.toml"))
                .expect_err(&format!("{section}.{key} = \"soon\" was accepted"));
            let c = e.downcast_ref::<ConfigError>().expect("a ConfigError");
            assert_eq!(c.file, Path::new("/etc/ntp-xdp.toml"));
            assert_eq!(
                c.field.as_deref(),
                Some(format!("{section}.{key}").as_str())
            );
            assert!(c.reason.contains("\"soon\" is not a duration"), "{e:#}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
