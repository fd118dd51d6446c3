//! The validated configuration, the one settings type the daemon runs, and what follows from
//! it (the clock source, the server's parameters).

use std::path::PathBuf;
use std::time::Duration;

use super::schema::*;
use crate::clock::system::SystemConfig;
use crate::host::hostclock::HostClockIdentity;
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
    pub fleet: Option<FleetSpec>,
}

/// Where served time comes from.
#[derive(Debug, Clone)]
pub enum ClockSource {
    /// The host clock as it is (already disciplined by chrony/PTP, or no upstream at all:
    /// a local stratum like chrony's `local stratum 10`).
    HostClock {
        identity: HostClockIdentity,
        publish_interval: Duration,
    },
    /// The daemon's own clock, disciplined against these upstreams.
    Upstreams {
        system: SystemConfig,
        upstreams: Vec<String>,
    },
}

impl Validated {
    /// Where served time comes from: the upstreams when there are any to follow, otherwise
    /// the host clock (as the kernel disciplines it, or as a local stratum).
    pub fn clock_source(&self) -> ClockSource {
        if self.reference == Reference::Upstream && !self.upstreams.is_empty() {
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
        }
    }

    /// What the responder puts in every reply besides the time (packet logging aside: the
    /// standalone mode turns it on with its log pump).
    pub fn server_params(&self) -> ntp_common::ServerParams {
        ntp_common::ServerParams {
            precision: self.service.precision,
            poll_min: self.system.poll.min_poll,
            poll_max: self.system.poll.max_poll,
            vrrp_router_id: self
                .vip
                .as_ref()
                .and_then(|v| v.redundancy.as_ref())
                .map_or(0, |r| r.keepalived.virtual_router_id),
            ..ntp_common::ServerParams::DEFAULT
        }
    }

    /// The service namespace, if the interface is in one of its own.
    pub fn netns(&self) -> Option<&str> {
        self.service.netns.as_ref().map(|n| n.as_str())
    }
}

/// The `[fleet]` section, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub host: String,
    /// TLS: the CA that signed the servers' certificates, and this client's certificate and key.
    pub ca: Option<PathBuf>,
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The host's status key lives this long after its last heartbeat.
    pub lease_ttl: Duration,
    /// A restart into a pushed configuration must synchronize with its upstreams this soon.
    pub sync_deadline: Duration,
    /// Where the applied configuration and the agent's state are kept.
    pub state_dir: PathBuf,
    /// The key that seals the NTS cookie keys in the store (with `[nts]`).
    pub nts_seal_key_file: crate::nts::server::SealKeyFile,
}

impl FleetSpec {
    /// Whether the store is reached over TLS (what travels to it is private).
    pub fn tls(&self) -> bool {
        self.ca.is_some() || self.certificate.is_some()
    }
}
