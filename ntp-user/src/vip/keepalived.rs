//! keepalived (VRRP), run by the daemon inside the service namespace the way OpenStack
//! neutron's HA routers run it in theirs: it owns the virtual addresses (the service and clock
//! addresses), moves them to a standby when this host fails, and sends the gratuitous ARPs and
//! unsolicited neighbour advertisements. The daemon writes its configuration, supervises it,
//! and is tracked by it (`ntp-xdp health`): a dead, frozen or unsynchronized daemon gives the
//! addresses up. No preemption: a recovered host comes back as standby. Supervised as every
//! helper is ([`crate::vip::helper`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use tracing::info;

use crate::host::files::state_dir;
use crate::vip::conffile::{ConfFile, Syntax, Unwritable};

#[derive(Debug, Clone, PartialEq)]
pub struct KeepalivedSpec {
    pub netns: String,
    /// The interface VRRP speaks on: the VIP hosts' own link, or the guests' with a shared
    /// network.
    pub vrrp_interface: String,
    /// The interface the addresses live on (the guests' namespace end); keepalived sends
    /// the gratuitous ARPs and neighbour advertisements there.
    pub address_interface: String,
    pub virtual_router_id: u8,
    pub priority: u8,
    pub advert_interval: Duration,
    /// This host's own address on that interface: the VRRP source (unicast_src_ip).
    pub own_address: IpAddr,
    /// Unicast peers (empty: multicast to 224.0.0.18).
    pub unicast_peers: Vec<IpAddr>,
    /// The addresses that move: IPv4 ones are advertised, IPv6 ones follow them.
    pub virtual_addresses: Vec<IpNet>,
    /// The health check keepalived runs every second (`ntp-xdp health --socket ...`).
    pub health_command: Vec<String>,
}

/// The user keepalived runs the health check as: it only asks the health socket, which
/// anyone may, so it runs unprivileged where that user can reach the program (every
/// directory on its path searchable by others, the program executable by others).
pub fn script_user(program: &std::path::Path) -> &'static str {
    use std::os::unix::fs::PermissionsExt as _;
    let others_may = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    };
    let reachable =
        program.is_absolute() && others_may(program) && program.ancestors().skip(1).all(others_may);
    if reachable {
        UNPRIVILEGED_SCRIPT_USER
    } else {
        "root"
    }
}

/// keepalived's VRRP process runs realtime (SCHED_RR) at this priority: with sub-second
/// adverts a master-down interval is under a second, and an XDP flood keeps the cores busy in
/// softirq and in the flooding guests' threads; adverts sent or read late would move the
/// addresses off a healthy master. Its health check runs at normal priority.
pub const VRRP_RT_PRIORITY: u8 = 50;

/// The CPU time (µs) the realtime VRRP process may use without blocking before the kernel
/// stops it (RLIMIT_RTTIME): a guard against a realtime busy loop, with room for a slow start.
const VRRP_RLIMIT_RTTIME_US: u32 = 100_000;

/// Debian's unprivileged user (uid 65534), present on every installation.
pub const UNPRIVILEGED_SCRIPT_USER: &str = "nobody";

impl KeepalivedSpec {
    pub fn config_file(&self) -> PathBuf {
        state_dir(&self.netns).join("keepalived.conf")
    }

    pub fn pid_file(&self) -> PathBuf {
        state_dir(&self.netns).join("keepalived.pid")
    }

    fn vrrp_pid_file(&self) -> PathBuf {
        state_dir(&self.netns).join("keepalived-vrrp.pid")
    }

    /// keepalived.conf for this host. Scripts are checked (`enable_script_security`: keepalived
    /// refuses one that a non-root user could replace); adverts on a unicast group are
    /// accepted from the peers only (`check_unicast_src`). Every value goes through
    /// [`Syntax`], which refuses one keepalived would read as more than that value.
    pub fn config_text(&self) -> Result<ConfFile, Unwritable> {
        let k = Syntax::Keepalived;
        // One quoted string: keepalived splits it into the program and its arguments.
        let script = k.command(&self.health_command)?;
        let script_user = self
            .health_command
            .first()
            .map_or("root", |p| script_user(std::path::Path::new(p)));
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = self
            .virtual_addresses
            .iter()
            .partition(|n| n.addr().is_ipv4());
        let list = |nets: &[&IpNet]| {
            nets.iter()
                .map(|n| {
                    Ok(format!(
                        "    {} dev {}\n",
                        k.word(n)?,
                        k.word(&self.address_interface)?
                    ))
                })
                .collect::<Result<String, Unwritable>>()
        };
        let peers = if self.unicast_peers.is_empty() {
            String::new()
        } else {
            format!(
                "  unicast_src_ip {}\n  check_unicast_src\n  unicast_peer {{\n{}  }}\n",
                k.word(self.own_address)?,
                self.unicast_peers
                    .iter()
                    .map(|p| Ok(format!("    {}\n", k.word(p)?)))
                    .collect::<Result<String, Unwritable>>()?
            )
        };
        // VRRP on a link of its own no longer sees the guests' link fail: watch it.
        let track_link = if self.vrrp_interface == self.address_interface {
            String::new()
        } else {
            format!(
                "  track_interface {{\n    {}\n  }}\n",
                k.word(&self.address_interface)?
            )
        };
        k.file(format!(
            "# Written by ntp-xdp for namespace {netns}; rewritten at every start.\n\
             global_defs {{\n  router_id ntpxdp-{netns}\n  script_user {script_user}\n  \
             enable_script_security\n  vrrp_version 3\n  vrrp_garp_master_repeat 3\n  \
             vrrp_garp_master_refresh 60\n  vrrp_rt_priority {VRRP_RT_PRIORITY}\n  \
             vrrp_rlimit_rttime {VRRP_RLIMIT_RTTIME_US}\n  vrrp_no_swap\n}}\n\
             vrrp_script ntpxdp_health {{\n  script {script}\n  interval 1\n  timeout 1\n  \
             fall 2\n  rise 2\n}}\n\
             vrrp_instance ntpxdp {{\n  state BACKUP\n  nopreempt\n  interface {ifname}\n\
             {track_link}  virtual_router_id {vrid}\n  priority {prio}\n  advert_int {advert}\n\
             {peers}  virtual_ipaddress {{\n{v4}  }}\n  virtual_ipaddress_excluded {{\n{v6}  }}\n  \
             track_script {{\n    ntpxdp_health\n  }}\n}}\n",
            netns = k.word(&self.netns)?,
            script_user = k.word(script_user)?,
            ifname = k.word(&self.vrrp_interface)?,
            vrid = k.word(self.virtual_router_id)?,
            prio = k.word(self.priority)?,
            advert = k.word(self.advert_interval.as_secs_f64())?,
            v4 = list(&v4)?,
            v6 = list(&v6)?,
        ))
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--dont-fork".into(),
            "--log-console".into(),
            "--log-detail".into(),
            "--vrrp".into(),
            format!("--use-file={}", self.config_file().display()),
            format!("--pid={}", self.pid_file().display()),
            format!("--vrrp_pid={}", self.vrrp_pid_file().display()),
        ]
    }
}

/// Stops this namespace's keepalived (an earlier daemon's, or this daemon's as it exits) and
/// waits for it: the parent (which takes its VRRP child with it and releases the addresses),
/// and the VRRP child too in case the parent was killed without a chance to.
pub fn stop_stale(netns: &str) -> Result<Option<i32>> {
    let parent = crate::vip::helper::stop_by_pid_file(
        &state_dir(netns).join("keepalived.pid"),
        "keepalived",
    )?;
    let child = crate::vip::helper::stop_by_pid_file(
        &state_dir(netns).join("keepalived-vrrp.pid"),
        "keepalived",
    )?;
    Ok(parent.or(child))
}

impl crate::vip::helper::Helper for KeepalivedSpec {
    fn name(&self) -> &'static str {
        "keepalived"
    }

    fn netns(&self) -> &str {
        &self.netns
    }

    fn command(&self) -> Result<(PathBuf, Vec<String>)> {
        crate::vip::helper::write_config(&self.config_file(), &self.config_text()?)?;
        Ok((crate::vip::helper::program_path(self.name()), self.args()))
    }

    /// A keepalived killed outright leaves its addresses behind: a new one starts from none
    /// (it adds them again if it becomes master), so this host never holds them as a standby.
    fn before_start(
        &self,
        ns: &std::fs::File,
    ) -> impl std::future::Future<Output = Result<()>> + Send {
        let ns = ns.try_clone();
        async move { release_addresses(self, &ns.context("duplicating the namespace handle")?).await }
    }
}

/// Removes the virtual addresses from the interface (those present).
async fn release_addresses(spec: &KeepalivedSpec, ns: &std::fs::File) -> Result<()> {
    let inside = crate::host::netlink::Netlink::open_in(ns)?;
    let Some(link) = inside.link(&spec.address_interface).await? else {
        return Ok(());
    };
    let present = inside.addresses(link.index).await?;
    for net in &spec.virtual_addresses {
        if present.contains(net) {
            inside.delete_address(link.index, *net).await?;
            info!(address = %net, "released a virtual address a stopped keepalived left");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_everything_that_moves() {
        let spec = KeepalivedSpec {
            netns: "ntpxdp-vip".into(),
            vrrp_interface: "ntpxdp-r0".into(),
            address_interface: "ntpxdp-v0".into(),
            virtual_router_id: 51,
            priority: 150,
            advert_interval: Duration::from_millis(500),
            own_address: "169.254.200.2".parse().unwrap(),
            unicast_peers: vec!["169.254.200.3".parse().unwrap()],
            virtual_addresses: vec![
                "169.254.100.1/24".parse().unwrap(),
                "169.254.169.123/32".parse().unwrap(),
                "fd00:ec2::123/128".parse().unwrap(),
            ],
            health_command: vec!["/usr/bin/ntp-xdp".into(), "health".into()],
        };
        let c = spec.config_text().unwrap();
        let c = c.as_str();
        for want in [
            "state BACKUP",
            "nopreempt",
            "virtual_router_id 51",
            "priority 150",
            "advert_int 0.5",
            "interface ntpxdp-r0\n  track_interface {\n    ntpxdp-v0\n  }",
            "unicast_src_ip 169.254.200.2\n  check_unicast_src",
            "enable_script_security",
            "169.254.200.3",
            "169.254.100.1/24 dev ntpxdp-v0",
            "169.254.169.123/32 dev ntpxdp-v0",
            "virtual_ipaddress_excluded {\n    fd00:ec2::123/128 dev ntpxdp-v0",
            "script \"/usr/bin/ntp-xdp health\"",
            "track_script",
            "vrrp_rt_priority 50",
            "vrrp_no_swap",
        ] {
            assert!(c.contains(want), "{want:?} missing from:\n{c}");
        }
    }
}
