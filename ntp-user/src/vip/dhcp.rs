//! DHCP for guests on the service subnet: dnsmasq from Debian, run and supervised inside the
//! namespace. Option 121 (RFC 3442) carries the route to each clock address via the service
//! address, plus the default route when a router is configured: RFC 3442 clients ignore
//! option 3 when option 121 is present. For platforms that run DHCP already, [`guest_config`]
//! prints the equivalent host route and client snippets.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::host::files::state_dir;

#[derive(Debug, Clone, PartialEq)]
pub struct DhcpSpec {
    pub netns: String,
    pub interface: String,
    /// The service address with its subnet.
    pub service: Ipv4Net,
    pub range: (Ipv4Addr, Ipv4Addr),
    pub lease_time: Duration,
    pub router: Option<Ipv4Addr>,
    /// IPv4 clock addresses, each routed via the service address.
    pub clock_addresses: Vec<Ipv4Addr>,
}

impl DhcpSpec {
    pub fn pid_file(&self) -> PathBuf {
        state_dir(&self.netns).join("dnsmasq.pid")
    }

    pub fn lease_file(&self) -> PathBuf {
        state_dir(&self.netns).join("dnsmasq.leases")
    }

    /// Option 121's routes, as dnsmasq takes them: destination/prefix,gateway pairs.
    pub fn classless_routes(&self) -> Vec<(String, Ipv4Addr)> {
        let mut routes: Vec<(String, Ipv4Addr)> = self
            .clock_addresses
            .iter()
            .map(|a| (format!("{a}/32"), self.service.addr()))
            .collect();
        if let Some(router) = self.router {
            routes.push(("0.0.0.0/0".to_string(), router));
        }
        routes
    }

    /// dnsmasq's command line: DHCP only (DNS off), this interface only, no config files read.
    pub fn dnsmasq_args(&self) -> Vec<String> {
        let routes = self
            .classless_routes()
            .iter()
            .map(|(d, g)| format!("{d},{g}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--port=0".into(),
            format!("--interface={}", self.interface),
            "--bind-interfaces".into(),
            "--dhcp-authoritative".into(),
            format!(
                "--dhcp-range={},{},{},{}",
                self.range.0,
                self.range.1,
                self.service.netmask(),
                self.lease_time.as_secs()
            ),
            format!("--dhcp-option=option:classless-static-route,{routes}"),
            // No DNS server is offered (this namespace runs none).
            "--dhcp-option=option:dns-server".into(),
            // NTP servers (option 42): the clock addresses themselves.
            format!(
                "--dhcp-option=option:ntp-server,{}",
                self.clock_addresses
                    .iter()
                    .map(Ipv4Addr::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            format!("--dhcp-leasefile={}", self.lease_file().display()),
            format!("--pid-file={}", self.pid_file().display()),
            "--log-facility=-".into(),
            "--log-dhcp".into(),
        ];
        // dnsmasq offers itself as the router unless told otherwise.
        args.push(match self.router {
            Some(r) => format!("--dhcp-option=option:router,{r}"),
            None => "--dhcp-option=option:router".into(),
        });
        args
    }
}

/// Stops a dnsmasq an earlier daemon left running for this namespace (by its pid file, and
/// only if that process is dnsmasq using that pid file).
pub fn stop_stale(spec_netns: &str) -> Result<Option<i32>> {
    crate::vip::helper::stop_by_pid_file(&state_dir(spec_netns).join("dnsmasq.pid"), "dnsmasq")
}

impl crate::vip::helper::Helper for DhcpSpec {
    fn name(&self) -> &'static str {
        "dnsmasq"
    }

    fn netns(&self) -> &str {
        &self.netns
    }

    /// If the daemon dies, dnsmasq goes on serving leases until the next daemon replaces it
    /// ([`stop_stale`]); it drops root to its own user, which also clears any parent-death
    /// signal.
    fn command(&self) -> Result<(PathBuf, Vec<String>)> {
        Ok((
            crate::vip::helper::program_path(self.name()),
            self.dnsmasq_args(),
        ))
    }
}

/// What a platform with its own DHCP (OpenStack neutron) configures instead, and what guests
/// put in their NTP client's configuration.
pub fn guest_config(
    service_v4: Option<Ipv4Addr>,
    service_v6: Option<std::net::Ipv6Addr>,
    clock_addresses: &[std::net::IpAddr],
    nts_port: Option<u16>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let v4: Vec<_> = clock_addresses.iter().filter(|a| a.is_ipv4()).collect();
    let v6: Vec<_> = clock_addresses.iter().filter(|a| a.is_ipv6()).collect();
    out.push_str(
        "# Route to the clock address: a neutron subnet host route (or DHCP option 121)\n",
    );
    if let Some(gw) = service_v4 {
        for a in &v4 {
            let _ = writeln!(
                out,
                "#   openstack subnet set --host-route destination={a}/32,gateway={gw} GUEST_SUBNET"
            );
        }
        let routes: Vec<String> = v4
            .iter()
            .map(|a| format!("{{\"destination\": \"{a}/32\", \"nexthop\": \"{gw}\"}}"))
            .collect();
        let _ = writeln!(out, "#   \"host_routes\": [{}]", routes.join(", "));
    }
    if let Some(gw) = service_v6 {
        for a in &v6 {
            let _ = writeln!(
                out,
                "#   openstack subnet set --host-route destination={a}/128,gateway={gw} GUEST_SUBNET_V6"
            );
        }
    }
    out.push_str("\n# chrony (/etc/chrony/chrony.conf or /etc/chrony/sources.d/ntp-xdp.sources)\n");
    for a in v4.iter().chain(v6.iter()) {
        let _ = writeln!(out, "server {a} prefer iburst minpoll 4 maxpoll 4");
    }
    if let Some(port) = nts_port {
        out.push_str(
            "\n# chrony with NTS (authenticated time; instead of the lines above). The server's\n\
             # certificate must name the address; a private CA goes in ntstrustedcerts.\n",
        );
        let port = if port == 4460 {
            String::new()
        } else {
            format!(" ntsport {port}")
        };
        for a in v4.iter().chain(v6.iter()) {
            let _ = writeln!(
                out,
                "server {a} nts{port} prefer iburst minpoll 4 maxpoll 4"
            );
        }
        out.push_str("ntstrustedcerts /etc/chrony/ntp-xdp-ca.pem\n");
    }
    out.push_str(
        "\n# Error bound: every reply states root delay / 2 + root dispersion, a bound on the\n\
         # served time's error (the clock's own estimate, growing in holdover). chrony adds its\n\
         # own path and reports the sum in `chronyc tracking`; sources whose bound exceeds\n\
         # maxdistance are not used (chrony then says it is unsynchronized rather than serve a\n\
         # bound past what the application tolerates). Set it to that tolerance (s):\n\
         maxdistance 0.001\n\
         # ClockBound (https://github.com/aws/clock-bound) turns chrony's state into a bound\n\
         # applications read: |offset| + root dispersion + root delay / 2, widened by its drift\n\
         # allowance. Without a VMClock device:\n\
         #   clockbound --max-drift-rate 50 --disable-clock-disruption-support\n",
    );
    out.push_str("\n# systemd-timesyncd (/etc/systemd/timesyncd.conf.d/ntp-xdp.conf)\n");
    let _ = writeln!(out, "# [Time]");
    let _ = writeln!(
        out,
        "# NTP={}",
        v4.iter()
            .chain(v6.iter())
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(router: Option<Ipv4Addr>) -> DhcpSpec {
        DhcpSpec {
            netns: "ntp-vip".into(),
            interface: "ntpv0".into(),
            service: "169.254.100.1/24".parse().unwrap(),
            range: (
                "169.254.100.10".parse().unwrap(),
                "169.254.100.20".parse().unwrap(),
            ),
            lease_time: Duration::from_secs(3600),
            router,
            clock_addresses: vec!["169.254.169.123".parse().unwrap()],
        }
    }

    #[test]
    fn option_121_routes_the_clock_via_the_service_address_and_keeps_the_default_route() {
        let args = spec(Some("169.254.100.254".parse().unwrap())).dnsmasq_args();
        assert!(args.contains(&"--dhcp-option=option:classless-static-route,169.254.169.123/32,169.254.100.1,0.0.0.0/0,169.254.100.254".to_string()), "{args:?}");
        assert!(args.contains(&"--dhcp-option=option:router,169.254.100.254".to_string()));
        assert!(args.contains(
            &"--dhcp-range=169.254.100.10,169.254.100.20,255.255.255.0,3600".to_string()
        ));
        // Without a router, dnsmasq must not offer itself as one.
        let args = spec(None).dnsmasq_args();
        assert!(args.contains(&"--dhcp-option=option:router".to_string()));
        assert!(args.contains(
            &"--dhcp-option=option:classless-static-route,169.254.169.123/32,169.254.100.1"
                .to_string()
        ));
    }

    #[test]
    fn guest_config_names_route_and_servers() {
        let text = guest_config(
            Some("169.254.100.1".parse().unwrap()),
            None,
            &[
                "169.254.169.123".parse().unwrap(),
                "fd00:ec2::123".parse().unwrap(),
            ],
            Some(4461),
        );
        assert!(
            text.contains("server 169.254.169.123 nts ntsport 4461 prefer iburst"),
            "{text}"
        );
        assert!(
            text.contains("destination=169.254.169.123/32,gateway=169.254.100.1"),
            "{text}"
        );
        assert!(
            text.contains("server 169.254.169.123 prefer iburst"),
            "{text}"
        );
        assert!(
            text.contains("server fd00:ec2::123 prefer iburst"),
            "{text}"
        );
        assert!(text.contains("NTP=169.254.169.123 fd00:ec2::123"), "{text}");
        // What a guest needs for its error bound: an uncommented chrony directive, and the
        // ClockBound daemon's command line.
        assert!(text.lines().any(|l| l == "maxdistance 0.001"), "{text}");
        assert!(
            text.contains("clockbound --max-drift-rate 50 --disable-clock-disruption-support"),
            "{text}"
        );
    }
}
