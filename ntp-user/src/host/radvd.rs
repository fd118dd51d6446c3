//! Router advertisements for IPv6 guests (radvd, in the service namespace, on the guest-facing
//! veth end): a Route Information Option (RFC 4191) for each IPv6 clock address, so guests
//! with `accept_ra_rt_info_max_plen` learn the route to it, and the service prefix for SLAAC.
//! Never a default router (router lifetime 0). On redundant VIP hosts only the master runs it.

use std::path::PathBuf;

use anyhow::Result;
use ipnet::{IpNet, Ipv6Net};

use crate::host::conffile::{ConfFile, Syntax, Unwritable};
use crate::host::vip::state_dir;

#[derive(Debug, Clone, PartialEq)]
pub struct RadvdSpec {
    pub netns: String,
    pub interface: String,
    /// The service subnet, advertised on-link and for SLAAC.
    pub prefix: Ipv6Net,
    /// The IPv6 clock addresses, each a /128 route via this router.
    pub routes: Vec<Ipv6Net>,
}

impl RadvdSpec {
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
        let routes: String = self
            .routes
            .iter()
            .map(|route| {
                Ok(format!(
                    "  route {} {{\n    AdvRouteLifetime 1800;\n  }};\n",
                    r.word(route)?
                ))
            })
            .collect::<Result<_, Unwritable>>()?;
        r.file(format!(
            "# Written by ntp-user for namespace {netns}; rewritten at every start.\n\
             interface {ifname} {{\n  AdvSendAdvert on;\n  AdvDefaultLifetime 0;\n  \
             MinRtrAdvInterval 10;\n  MaxRtrAdvInterval 30;\n  prefix {prefix} {{\n    \
             AdvOnLink on;\n    AdvAutonomous on;\n  }};\n{routes}}};\n",
            netns = r.word(&self.netns)?,
            ifname = r.word(&self.interface)?,
            prefix = r.word(self.prefix.trunc())?,
        ))
    }
}

impl crate::host::helper::Helper for RadvdSpec {
    fn name(&self) -> &'static str {
        "radvd"
    }

    fn netns(&self) -> &str {
        &self.netns
    }

    fn command(&self) -> Result<(PathBuf, Vec<String>)> {
        crate::host::helper::write_config(&self.config_file(), &self.config_text()?)?;
        Ok((
            crate::host::helper::program_path(self.name()),
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
    crate::host::stop_by_pid_file(&state_dir(netns).join("radvd.pid"), "radvd")
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
    }
}
