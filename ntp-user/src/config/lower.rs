//! The validated configuration in the daemon's types, and its lowering to the daemon's
//! options.

use std::path::PathBuf;
use std::time::Duration;

use super::schema::*;
use crate::clock::system::SystemConfig;
use crate::responder::XdpModePref;

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
    pub vip: Option<crate::vip::VipSpec>,
    pub dhcp: Option<crate::vip::dhcp::DhcpSpec>,
    pub admission: crate::responder::admission::AdmissionSpec,
    pub observe: crate::observe::ObserveSpec,
    pub nts: Option<crate::nts::server::NtsSpec>,
    pub fleet: Option<crate::fleet::FleetSpec>,
}

impl Validated {
    /// What `serve` runs for this configuration.
    pub fn serve_options(&self) -> crate::daemon::ServeOptions {
        use crate::daemon::ClockSource;
        use crate::host::hostclock::HostClockIdentity;
        let clock = if self.reference == Reference::Upstream && !self.upstreams.is_empty() {
            ClockSource::Upstreams {
                system: self.system.clone(),
                upstreams: self
                    .upstreams
                    .iter()
                    .map(|u| u.address.to_string())
                    .collect(),
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
            netns: self.service.netns.as_ref().map(ToString::to_string),
            interface: self.service.interface.to_string(),
            addresses: self.service.addresses.clone(),
            xdp_mode: self.xdp_mode,
            peer_netns: self.service.peer_netns.as_ref().map(ToString::to_string),
            params: ntp_common::ServerParams {
                precision: self.service.precision,
                poll_min: self.system.poll.min_poll,
                poll_max: self.system.poll.max_poll,
                vrrp_router_id: self
                    .vip
                    .as_ref()
                    .and_then(|v| v.redundancy.as_ref())
                    .map_or(0, |r| r.keepalived.virtual_router_id),
                ..ntp_common::ServerParams::DEFAULT
            },
            log_packets: self.service.log_packets,
            clock,
            managed: self.vip.clone().map(|v| (v, self.dhcp.clone())),
            admission: self.admission.clone(),
            observe: self.observe.clone(),
            nts: self.nts.clone(),
            companion: None,
            restart: Default::default(),
        }
    }
}
