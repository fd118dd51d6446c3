//! The TOML schema: one struct per section, as operators write it (strings for durations and
//! modes; names and paths as the [`super::names`] types, checked as they are read);
//! [`super::validate`] turns it into the daemon's types.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::names::{InterfaceName, NetnsName, SafePath, Token};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub service: ServiceSection,
    #[serde(default)]
    pub clock: ClockSection,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamSection>,
    /// Present: the daemon creates and keeps the namespace, veth, addresses and routes.
    pub vip: Option<VipSection>,
    /// Present: the addresses move to a standby VIP host when this one fails (keepalived).
    pub redundancy: Option<RedundancySection>,
    #[serde(default)]
    pub dhcp: DhcpSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub access: AccessSection,
    #[serde(default)]
    pub guest_clocks: GuestClocksSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub alarms: AlarmsSection,
    /// Present: Network Time Security (RFC 8915) for guests that ask for it.
    pub nts: Option<NtsSection>,
    /// Present: this host is a member of a fleet whose configuration lives in etcd.
    pub fleet: Option<FleetSection>,
}

/// The fleet store and this host's name in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// etcd client URLs (https:// with TLS).
    pub endpoints: Vec<Token>,
    /// The cluster (e.g. the availability zone): keys live under /ntp-xdp/<cluster>/.
    pub cluster: String,
    /// This host's name in the cluster. Default: the machine's hostname.
    pub host: Option<String>,
    /// PEM CA of the etcd servers' certificates.
    pub ca: Option<SafePath>,
    /// PEM client certificate and key (etcd's --client-cert-auth).
    pub certificate: Option<SafePath>,
    pub key: Option<SafePath>,
    pub user: Option<Token>,
    pub password_file: Option<SafePath>,
    /// The heartbeat's lease: a host silent this long is shown as lost.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: String,
    /// After a restart into a pushed configuration, its upstreams must synchronize the clock
    /// within this long (a measurement of its own, not the clock resumed from the daemon
    /// before), or the host goes back to the configuration before it and reports `failed`.
    #[serde(default = "default_sync_deadline")]
    pub sync_deadline: String,
    /// The applied configuration and the agent's state. Default: /var/lib/ntp-xdp/fleet.
    pub state_dir: Option<SafePath>,
    /// With `[nts]`: 32 bytes (mode 0600) that seal the NTS cookie keys in etcd; the same
    /// file on every host of the cluster. Default: `state_dir`/nts-seal.key.
    pub nts_seal_key_file: Option<SafePath>,
}

fn default_lease_ttl() -> String {
    "10s".into()
}

fn default_sync_deadline() -> String {
    "60s".into()
}

/// NTS: the key exchange over TLS 1.3 and NTS-protected replies from the userspace path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NtsSection {
    /// PEM certificate chain (leaf first), valid for the name or address guests use.
    pub certificate_chain: SafePath,
    /// PEM private key of the leaf certificate.
    pub private_key: SafePath,
    /// Where the key exchange listens (TCP), in the service namespace. Default: every
    /// served address (the clock addresses and, with [vip], the service address).
    #[serde(default)]
    pub listen: Vec<IpAddr>,
    #[serde(default = "default_nts_port")]
    pub port: u16,
    /// The cookie keys, kept across restarts; hosts that share it share cookies.
    /// Default: /var/lib/ntp-xdp/nts-keys.json.
    pub key_file: Option<SafePath>,
    /// How often a new cookie key is made (cookies stay good for three more).
    #[serde(default = "default_nts_rotation")]
    pub key_rotation: String,
    /// The NTP server the key exchange names, per family. Default: the first clock address
    /// of `service.addresses` of the family the guest used.
    pub ntp_server: Option<Vec<IpAddr>>,
}

fn default_nts_port() -> u16 {
    crate::nts::KE_PORT
}

fn default_nts_rotation() -> String {
    "1d".into()
}

/// Per-source rate limiting in the responder (a source: an IPv4 address or an IPv6 /64).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub enable: bool,
    /// Sustained requests per second per source.
    pub rate: f64,
    /// Requests a source may send at once (an `iburst` sends 4-8).
    pub burst: u32,
    /// Answer a source over its rate with a RATE kiss-o'-death (at most one per
    /// `kod_interval`); false: drop silently.
    pub kod: bool,
    pub kod_interval: String,
    /// Poll exponent a RATE kiss-o'-death asks the client to back off to.
    pub kod_poll: i8,
    /// Sources tracked; beyond it the longest idle is forgotten.
    pub sources: u32,
    /// IPv6 sources share one bucket per prefix of this length (16..=64).
    pub ipv6_prefix: u8,
    /// Kiss-o'-death packets per second in all, whatever their sources (a spoofed-source
    /// flood meets every source's first KoD; this bounds the total). Per CPU.
    pub kod_global_rate: f64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            enable: true,
            rate: 2.0,
            burst: 16,
            kod: true,
            kod_interval: "10s".into(),
            kod_poll: 6,
            sources: 65_536,
            ipv6_prefix: 64,
            kod_global_rate: 1000.0,
        }
    }
}

/// Who may ask. The longest matching prefix decides; with an allow list, sources matching
/// nothing are denied.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// "kod" (a DENY kiss-o'-death, at most one per limits.kod_interval) or "drop".
    pub deny_action: String,
    /// VLAN IDs (1..=4094) whose tagged requests are answered; untagged ones always are.
    /// Kept wide here so that a value out of range gets its own error.
    pub vlans: Vec<i64>,
}

impl Default for AccessSection {
    fn default() -> Self {
        AccessSection {
            allow: Vec::new(),
            deny: Vec::new(),
            deny_action: "kod".into(),
            vlans: Vec::new(),
        }
    }
}

/// Guests' clocks as their requests show them, and the alarm list of those far off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestClocksSection {
    pub enable: bool,
    /// Guests whose apparent clock error exceeds this are in the alarm list.
    pub alarm_offset: String,
    /// Guests tracked; beyond it the longest idle is forgotten.
    pub guests: u32,
    /// Guests not seen for this long are not listed.
    pub forget_after: String,
    /// Transmit timestamps further off than this are taken as random cookies (chrony and
    /// ntpd-rs do not reveal their time), not as clock errors.
    pub opaque_beyond: String,
}

impl Default for GuestClocksSection {
    fn default() -> Self {
        GuestClocksSection {
            enable: true,
            alarm_offset: "100ms".into(),
            guests: 65_536,
            forget_after: "1h".into(),
            opaque_beyond: "1d".into(),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub enable: bool,
    /// Loopback by default: metrics say who the guests are.
    pub listen: std::net::SocketAddr,
    /// A non-loopback `listen` must be asked for explicitly.
    pub allow_remote: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enable: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9273)),
            allow_remote: false,
        }
    }
}

/// The local control socket `ntp-xdp status` talks to (owner-only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Default: /run/ntp-xdp/NETNS/control.sock with a [vip] section, else none.
    pub socket: Option<SafePath>,
}

/// Alarm thresholds: each alarm is logged once when it is raised and once when it clears,
/// and exported as a metric.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// The clock has not been corrected from an upstream for this long (or never, this long
    /// after start).
    pub no_sync_after: String,
    /// The last measured offset of the clock against its upstreams exceeds this.
    pub max_offset: String,
    /// The anchor the kernel serves is older than this (the daemon stopped publishing).
    pub max_anchor_age: String,
    /// More than this fraction of the requests in the last `window` were dropped or refused.
    pub max_drop_fraction: f64,
    pub window: String,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        AlarmsSection {
            no_sync_after: "5m".into(),
            max_offset: "5ms".into(),
            max_anchor_age: "5s".into(),
            max_drop_fraction: 0.01,
            window: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// The host end of the veth (`service.interface` is the namespace end).
    pub host_interface: InterfaceName,
    /// Bridge the host end joins, so that guests on it reach the namespace.
    pub bridge: Option<InterfaceName>,
    /// Create `bridge` when it does not exist (and remove it on `down`).
    #[serde(default)]
    pub create_bridge: bool,
    /// The address guests route the clock addresses to, with its subnet (e.g. 169.254.100.1/24).
    pub service_address: IpNet,
    /// An IPv6 service address with its prefix (optional).
    pub service_address6: Option<IpNet>,
    /// Routes back to guest subnets that are not on the service subnet.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// How often what exists is compared with what should (drift repair).
    #[serde(default = "default_repair_interval")]
    pub repair_interval: String,
    /// Host interfaces on the internal network to serve too (physical hosts of the cluster).
    #[serde(default)]
    pub host_interfaces: Vec<InterfaceName>,
    /// Router advertisements on the service side (radvd): a route to each IPv6 clock address
    /// (RFC 4191) and the service prefix for SLAAC; never a default router. Needs
    /// `service_address6`.
    #[serde(default)]
    pub ipv6_route_advertisements: bool,
}

/// Redundant VIP hosts: keepalived (VRRP) moves the service and clock addresses to a standby
/// when this host fails. Absent: a single VIP host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedundancySection {
    /// The VRRP group the VIP hosts share (1-255), unique on the link.
    pub virtual_router_id: u8,
    /// This host's priority (1-254): the highest healthy host becomes master at start; after
    /// that a recovered host never takes the addresses back (no preemption).
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// VRRPv3 advertisement interval (10ms-40s); a master is declared dead after ~3 of them.
    #[serde(default = "default_advert_interval")]
    pub advert_interval: String,
    /// The bridge of the VIP hosts' own network (management or a dedicated cluster link) that
    /// VRRP speaks on: the daemon plugs a second veth (`interface` in the namespace,
    /// `host_interface` on the host) into it. Guests must not reach this network.
    pub bridge: Option<InterfaceName>,
    /// The namespace end of the VRRP link's veth.
    #[serde(default = "default_vrrp_interface")]
    pub interface: InterfaceName,
    /// The host end of the VRRP link's veth (joins `bridge`).
    #[serde(default = "default_vrrp_host_interface")]
    pub host_interface: InterfaceName,
    /// VRRP on the guests' own link instead of `bridge`: needs `unicast_peers` (keepalived
    /// then accepts adverts from them only, and the responder drops VRRP from any other
    /// source). It trusts guests not to spoof a peer's address.
    #[serde(default)]
    pub shared_network: bool,
    /// This host's own address on the VRRP link, with the subnet (the VRRP source); with
    /// `shared_network`, an address in the service subnet (the service address itself moves
    /// between hosts).
    pub own_address: IpNet,
    /// The other VIP hosts' own addresses (unicast VRRP); empty: multicast.
    #[serde(default)]
    pub unicast_peers: Vec<IpAddr>,
    /// Interfaces of the daemon's namespace that connect this host to the guests (its
    /// uplinks): while one is down or without carrier, the host is unhealthy and gives the
    /// addresses up; back, it stays standby.
    #[serde(default)]
    pub track_interfaces: Vec<InterfaceName>,
}

fn default_priority() -> u8 {
    100
}

fn default_vrrp_interface() -> InterfaceName {
    InterfaceName::try_from("ntpxdp-r0").expect("an interface name")
}

fn default_vrrp_host_interface() -> InterfaceName {
    InterfaceName::try_from("ntpxdp-hr0").expect("an interface name")
}

/// A lost master is replaced after three adverts plus a skew (0.72 s at priority 100), so a
/// guest's longest gap stays under a second.
fn default_advert_interval() -> String {
    "200ms".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub to: IpNet,
    pub via: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpSection {
    /// Run dnsmasq in the namespace for the service subnet (needs [vip]).
    pub enable: bool,
    /// First and last address to lease.
    pub range: Option<[std::net::Ipv4Addr; 2]>,
    pub lease_time: Option<String>,
    /// The guests' default gateway: sent as option 3 and as 0.0.0.0/0 in option 121, since
    /// RFC 3442 clients ignore option 3 when option 121 is present.
    pub router: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Named network namespace holding `interface` (default: the daemon's own).
    pub netns: Option<NetnsName>,
    pub interface: InterfaceName,
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_xdp_mode")]
    pub xdp_mode: String,
    pub peer_netns: Option<NetnsName>,
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
    /// Ask upstreams for interleaved responses (their kernel's transmit timestamps).
    pub interleaved: bool,
    pub min_sources: usize,
    pub max_slew_ppm: f64,
    /// How fast the oscillator's rate may drift (ppm per hour): the served error bound grows
    /// by it in holdover.
    pub holdover_wander_ppm_per_hour: f64,
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
            interleaved: true,
            min_sources: 1,
            max_slew_ppm: 500.0,
            holdover_wander_ppm_per_hour:
                crate::clock::system::DEFAULT_HOLDOVER_WANDER_PPM_PER_HOUR,
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
    pub address: Token,
    #[serde(default = "default_true")]
    pub iburst: bool,
}

fn default_repair_interval() -> String {
    "1s".into()
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
