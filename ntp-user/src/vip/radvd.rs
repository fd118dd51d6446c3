//! Router advertisements for IPv6 guests (radvd, in the service namespace, on the guest-facing
//! veth end): a Route Information Option (RFC 4191) for each IPv6 clock address, so guests
//! with `accept_ra_rt_info_max_plen` learn the route to it, and the service prefix for SLAAC.
//! Never a default router (router lifetime 0). On redundant VIP hosts only the master runs it,
//! and it advertises from the group's shared router address, which keepalived moves with the
//! others: guests route the clock address via an address that is always the master's, and the
//! new master's unsolicited neighbour advertisement moves them as its gratuitous ARP moves IPv4
//! guests.

use std::net::Ipv6Addr;
use std::path::PathBuf;

use anyhow::Result;
use ipnet::{IpNet, Ipv6Net};

use crate::host::files::state_dir;
use crate::vip::conffile::{ConfFile, Syntax, Unwritable};

#[derive(Debug, Clone, PartialEq)]
pub struct RadvdSpec {
    pub netns: String,
    pub interface: String,
    /// The service subnet, advertised on-link and for SLAAC.
    pub prefix: Ipv6Net,
    /// The IPv6 clock addresses, each a /128 route via this router.
    pub routes: Vec<Ipv6Net>,
    /// Redundant VIP hosts: the group's [`shared_router_address`], the only source radvd may
    /// send from (none while this host does not hold it), and the route is kept when radvd
    /// stops (the next master advertises it from the same address). None: the interface's
    /// own link-local address, and the route withdrawn when radvd stops.
    pub router_address: Option<Ipv6Addr>,
}

/// The link-local address the hosts of VRRP group `virtual_router_id` send router
/// advertisements from: the EUI-64 address of the group's IPv6 virtual router MAC
/// (00-00-5E-00-02-{VRID}, RFC 9568 §7.3), which no host's own interface has.
pub fn shared_router_address(virtual_router_id: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        0x0200,
        0x5eff,
        0xfe00,
        0x0200 | u16::from(virtual_router_id),
    )
}

impl RadvdSpec {
    /// Sends from the [`shared_router_address`] of VRRP group `virtual_router_id` (redundant
    /// VIP hosts), which it returns: the address that moves with the group's others.
    pub fn share_with_group(&mut self, virtual_router_id: u8) -> Ipv6Addr {
        let router = shared_router_address(virtual_router_id);
        self.router_address = Some(router);
        router
    }

    pub fn config_file(&self) -> PathBuf {
        state_dir(&self.netns).join("radvd.conf")
    }

    pub fn pid_file(&self) -> PathBuf {
        state_dir(&self.netns).join("radvd.pid")
    }

    /// radvd.conf; every value goes through [`Syntax`], which refuses one radvd would read
    /// as more than that value.
    pub fn config_text(&self) -> Result<ConfFile, Unwritable> {
        let r = Syntax::Radvd;
        let remove_route = if self.router_address.is_some() {
            "    RemoveRoute off;\n"
        } else {
            ""
        };
        let routes: String = self
            .routes
            .iter()
            .map(|route| {
                Ok(format!(
                    "  route {} {{\n    AdvRouteLifetime 1800;\n{remove_route}  }};\n",
                    r.word(route)?
                ))
            })
            .collect::<Result<_, Unwritable>>()?;
        let source = match self.router_address {
            Some(a) => format!("  AdvRASrcAddress {{\n    {};\n  }};\n", r.word(a)?),
            None => String::new(),
        };
        r.file(format!(
            "# Written by ntp-xdp for namespace {netns}; rewritten at every start.\n\
             interface {ifname} {{\n  AdvSendAdvert on;\n  AdvDefaultLifetime 0;\n  \
             MinRtrAdvInterval 10;\n  MaxRtrAdvInterval 30;\n{source}  prefix {prefix} {{\n    \
             AdvOnLink on;\n    AdvAutonomous on;\n  }};\n{routes}}};\n",
            netns = r.word(&self.netns)?,
            ifname = r.word(&self.interface)?,
            prefix = r.word(self.prefix.trunc())?,
        ))
    }
}

impl crate::vip::helper::Helper for RadvdSpec {
    fn name(&self) -> &'static str {
        "radvd"
    }

    fn netns(&self) -> &str {
        &self.netns
    }

    fn command(&self) -> Result<(PathBuf, Vec<String>)> {
        crate::vip::helper::write_config(&self.config_file(), &self.config_text()?)?;
        Ok((
            crate::vip::helper::program_path(self.name()),
            vec![
                "--nodaemon".into(),
                "--logmethod=stderr".into(),
                format!("--config={}", self.config_file().display()),
                format!("--pidfile={}", self.pid_file().display()),
            ],
        ))
    }
}

/// Stops a radvd an earlier daemon left running for this namespace.
pub fn stop_stale(netns: &str) -> Result<Option<i32>> {
    crate::vip::helper::stop_by_pid_file(&state_dir(netns).join("radvd.pid"), "radvd")
}

/// The radvd spec for a VIP host: its IPv6 service subnet and IPv6 clock addresses.
pub fn for_vip(
    netns: &str,
    interface: &str,
    service6: IpNet,
    clocks: &[std::net::IpAddr],
) -> Option<RadvdSpec> {
    let IpNet::V6(prefix) = service6 else {
        return None;
    };
    let routes: Vec<Ipv6Net> = clocks
        .iter()
        .filter_map(|a| match a {
            std::net::IpAddr::V6(v6) => Ipv6Net::new(*v6, 128).ok(),
            _ => None,
        })
        .collect();
    Some(RadvdSpec {
        netns: netns.into(),
        interface: interface.into(),
        prefix,
        routes,
        router_address: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_the_clock_route_and_is_no_default_router() {
        let spec = for_vip(
            "ntpxdp-vip",
            "ntpxdp-v0",
            "fd00:ec2:100::1/64".parse().unwrap(),
            &[
                "169.254.169.123".parse().unwrap(),
                "fd00:ec2::123".parse().unwrap(),
            ],
        )
        .unwrap();
        let c = spec.config_text().unwrap();
        let c = c.as_str();
        for want in [
            "interface ntpxdp-v0 {",
            "AdvDefaultLifetime 0;",
            "prefix fd00:ec2:100::/64 {",
            "route fd00:ec2::123/128 {",
        ] {
            assert!(c.contains(want), "{want:?} missing:\n{c}");
        }
        assert!(!c.contains("169.254"), "{c}");
        assert!(!c.contains("AdvRASrcAddress"), "{c}");
        assert!(!c.contains("RemoveRoute"), "{c}");
    }

    #[test]
    fn redundant_hosts_advertise_from_the_groups_address_and_keep_the_route_when_stopping() {
        let mut spec = for_vip(
            "ntpxdp-vip",
            "ntpxdp-v0",
            "fd00:ec2:100::1/64".parse().unwrap(),
            &["fd00:ec2::123".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(
            shared_router_address(51),
            "fe80::200:5eff:fe00:233".parse::<Ipv6Addr>().unwrap()
        );
        spec.router_address = Some(shared_router_address(51));
        let c = spec.config_text().unwrap();
        let c = c.as_str();
        for want in [
            "AdvRASrcAddress {\n    fe80::200:5eff:fe00:233;\n  };",
            "route fd00:ec2::123/128 {\n    AdvRouteLifetime 1800;\n    RemoveRoute off;\n  };",
        ] {
            assert!(c.contains(want), "{want:?} missing:\n{c}");
        }
    }
}
