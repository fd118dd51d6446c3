//! The TOML schema: one struct per section, as operators write it, each value in its own type
//! and parsed as it is read (durations, modes, addresses, names and paths; see
//! [`super::names`] and [`super::values`]). Defaults live here, once. [`super::validate`]
//! checks what the types cannot and turns the sections into the daemon's types.
//!
//! The doc comments are the configuration reference (docs/config-reference.md is rendered
//! from them): every field has one, written for operators.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::names::{InterfaceName, NetnsName, SafePath, Token};
use super::values::{HumanDuration, RefId};
use crate::responder::XdpModePref;

/// An ntp-xdp configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and what the responder answers.
    pub service: ServiceSection,
    /// What the served clock follows and how it is disciplined.
    #[serde(default)]
    pub clock: ClockSection,
    /// The NTP servers the clock is disciplined against (one `[[upstream]]` table each).
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamSection>,
    /// Present: the daemon creates and keeps the namespace, veth, addresses and routes.
    pub vip: Option<VipSection>,
    /// Present: the addresses move to a standby VIP host when this one fails (keepalived).
    pub redundancy: Option<RedundancySection>,
    /// DHCP for guests on the service subnet (dnsmasq in the namespace).
    #[serde(default)]
    pub dhcp: DhcpSection,
    /// Per-source rate limiting.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Who may ask.
    #[serde(default)]
    pub access: AccessSection,
    /// Guests' clocks as their requests show them.
    #[serde(default)]
    pub guest_clocks: GuestClocksSection,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The local control socket.
    #[serde(default)]
    pub control: ControlSection,
    /// Alarm thresholds.
    #[serde(default)]
    pub alarms: AlarmsSection,
    /// Present: Network Time Security (RFC 8915) for guests that ask for it.
    pub nts: Option<NtsSection>,
    /// Present: this host is a member of a fleet whose configuration lives in etcd.
    pub fleet: Option<FleetSection>,
}

/// The fleet store and this host's name in it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// etcd client URLs: https:// with TLS (`ca` or `certificate` set), else http://.
    pub endpoints: Vec<Token>,
    /// The cluster (e.g. the availability zone): keys live under `/ntp-xdp/<cluster>/`.
    /// 1-64 of letters, digits, `-`, `_`, `.`.
    pub cluster: String,
    /// This host's name in the cluster (1-64 of letters, digits, `-`, `_`, `.`). Default: the
    /// machine's hostname.
    pub host: Option<String>,
    /// PEM CA of the etcd servers' certificates.
    pub ca: Option<SafePath>,
    /// PEM client certificate (etcd's --client-cert-auth); goes with `key`.
    pub certificate: Option<SafePath>,
    /// PEM private key of `certificate`.
    pub key: Option<SafePath>,
    /// etcd user (needs TLS).
    pub user: Option<Token>,
    /// File holding `user`'s password (needs `user` and TLS).
    pub password_file: Option<SafePath>,
    /// The heartbeat's lease: a host silent this long is shown as lost (2s-5m).
    #[serde(default = "FleetSection::default_lease_ttl")]
    pub lease_ttl: HumanDuration,
    /// After a restart into a pushed configuration, its upstreams must synchronize the clock
    /// within this long (a measurement of its own, not the clock resumed from the daemon
    /// before), or the host goes back to the configuration before it and reports `failed`
    /// (5s-1h).
    #[serde(default = "FleetSection::default_sync_deadline")]
    pub sync_deadline: HumanDuration,
    /// The applied configuration and the agent's state.
    #[serde(default = "FleetSection::default_state_dir")]
    pub state_dir: SafePath,
    /// With `[nts]`: 32 bytes (mode 0600) that seal the NTS cookie keys in etcd; the same
    /// file on every host of the cluster. Default: `state_dir`/nts-seal.key.
    pub nts_seal_key_file: Option<SafePath>,
}

impl FleetSection {
    fn default_lease_ttl() -> HumanDuration {
        HumanDuration::from_secs(10)
    }

    fn default_sync_deadline() -> HumanDuration {
        HumanDuration::from_secs(60)
    }

    fn default_state_dir() -> SafePath {
        SafePath::try_from("/var/lib/ntp-xdp/fleet").expect("a safe path")
    }
}

/// NTS: the key exchange over TLS 1.3 and NTS-protected replies from the userspace path.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NtsSection {
    /// PEM certificate chain (leaf first), valid for the name or address guests use.
    pub certificate_chain: SafePath,
    /// PEM private key of the leaf certificate.
    pub private_key: SafePath,
    /// Where the key exchange listens (TCP), in the service namespace. Default (empty): every
    /// served address (the clock addresses and, with [vip], the service address).
    #[serde(default)]
    pub listen: Vec<IpAddr>,
    /// The key exchange's TCP port (not 0).
    #[serde(default = "NtsSection::default_port")]
    pub port: u16,
    /// The cookie keys, kept across restarts; hosts that share it share cookies.
    #[serde(default = "NtsSection::default_key_file")]
    pub key_file: SafePath,
    /// How often a new cookie key is made (cookies stay good for three more; 1s-30d).
    #[serde(default = "NtsSection::default_key_rotation")]
    pub key_rotation: HumanDuration,
    /// The NTP server the key exchange names, at most one per family. Default: the first
    /// clock address of `service.addresses` of the family the guest used.
    pub ntp_server: Option<Vec<IpAddr>>,
}

impl NtsSection {
    fn default_port() -> u16 {
        crate::nts::KE_PORT
    }

    fn default_key_rotation() -> HumanDuration {
        HumanDuration::from_secs(86400)
    }

    fn default_key_file() -> SafePath {
        SafePath::try_from("/var/lib/ntp-xdp/nts-keys.json").expect("a safe path")
    }
}

/// Per-source rate limiting in the responder (a source: an IPv4 address or an IPv6 prefix).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Limit each source's request rate.
    pub enable: bool,
    /// Sustained requests per second per source (0 < rate <= 1000000).
    pub rate: f64,
    /// Requests a source may send at once (an `iburst` sends 4-8; 1-1000000).
    pub burst: u32,
    /// Answer a source over its rate with a RATE kiss-o'-death (at most one per
    /// `kod_interval`); false: drop silently.
    pub kod: bool,
    /// At most one kiss-o'-death per source this often (at least 1s).
    pub kod_interval: HumanDuration,
    /// Poll exponent a RATE kiss-o'-death asks the client to back off to (0-17).
    pub kod_poll: i8,
    /// Sources tracked; beyond it the longest idle is forgotten (1-16777216).
    pub sources: u32,
    /// IPv6 sources share one bucket per prefix of this length (16-64).
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
            kod_interval: HumanDuration::from_secs(10),
            kod_poll: 6,
            sources: 65_536,
            ipv6_prefix: 64,
            kod_global_rate: 1000.0,
        }
    }
}

/// Who may ask. The longest matching prefix decides; with an allow list, sources matching
/// nothing are denied.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// Prefixes answered.
    pub allow: Vec<IpNet>,
    /// Prefixes never answered.
    pub deny: Vec<IpNet>,
    /// What a denied source gets.
    pub deny_action: DenyAction,
    /// VLAN IDs (1-4094) whose tagged requests are answered; untagged ones always are.
    // Kept wide here so that a value out of range gets its own error.
    pub vlans: Vec<i64>,
}

impl Default for AccessSection {
    fn default() -> Self {
        AccessSection {
            allow: Vec::new(),
            deny: Vec::new(),
            deny_action: DenyAction::Kod,
            vlans: Vec::new(),
        }
    }
}

/// What a denied source gets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// A DENY kiss-o'-death, at most one per `limits.kod_interval`.
    Kod,
    /// Nothing.
    Drop,
}

/// Guests' clocks as their requests show them, and the alarm list of those far off.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GuestClocksSection {
    /// Track guests' clocks.
    pub enable: bool,
    /// Guests whose apparent clock error exceeds this are in the alarm list.
    pub alarm_offset: HumanDuration,
    /// Guests tracked; beyond it the longest idle is forgotten (1-16777216).
    pub guests: u32,
    /// Guests not seen for this long are not listed.
    pub forget_after: HumanDuration,
    /// Transmit timestamps further off than this are taken as random cookies (chrony and
    /// ntpd-rs do not reveal their time), not as clock errors. Larger than `alarm_offset`.
    pub opaque_beyond: HumanDuration,
}

impl Default for GuestClocksSection {
    fn default() -> Self {
        GuestClocksSection {
            enable: true,
            alarm_offset: HumanDuration::from_millis(100),
            guests: 65_536,
            forget_after: HumanDuration::from_secs(3600),
            opaque_beyond: HumanDuration::from_secs(86400),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Serve metrics.
    pub enable: bool,
    /// Address and port; loopback by default: metrics say who the guests are.
    pub listen: SocketAddr,
    /// A non-loopback `listen` must be asked for explicitly.
    pub allow_remote: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enable: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9273)),
            allow_remote: false,
        }
    }
}

/// The local control socket `ntp-xdp status` talks to (owner-only).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Its path. Default: /run/ntp-xdp/NETNS/control.sock with a [vip] section, else none.
    pub socket: Option<SafePath>,
}

/// Alarm thresholds: each alarm is logged once when it is raised and once when it clears,
/// and exported as a metric.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// The clock has not been corrected from an upstream for this long (or never, this long
    /// after start).
    pub no_sync_after: HumanDuration,
    /// The last measured offset of the clock against its upstreams exceeds this.
    pub max_offset: HumanDuration,
    /// The anchor the kernel serves is older than this (the daemon stopped publishing).
    pub max_anchor_age: HumanDuration,
    /// More than this fraction of the requests in the last `window` were dropped or refused
    /// (0 < fraction <= 1).
    pub max_drop_fraction: f64,
    /// The window `max_drop_fraction` is measured over (at least 1s).
    pub window: HumanDuration,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        AlarmsSection {
            no_sync_after: HumanDuration::from_secs(300),
            max_offset: HumanDuration::from_millis(5),
            max_anchor_age: HumanDuration::from_secs(5),
            max_drop_fraction: 0.01,
            window: HumanDuration::from_secs(10),
        }
    }
}

/// The namespace, veth, addresses and routes the daemon creates and keeps (a VIP host).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
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
    /// An IPv6 service address with its prefix.
    pub service_address6: Option<IpNet>,
    /// Routes back to guest subnets that are not on the service subnet.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// How often what exists is compared with what should (drift repair; 100ms-1h).
    #[serde(default = "VipSection::default_repair_interval")]
    pub repair_interval: HumanDuration,
    /// Host interfaces on the internal network to serve too (physical hosts of the cluster).
    #[serde(default)]
    pub host_interfaces: Vec<InterfaceName>,
    /// Router advertisements on the service side (radvd): a route to each IPv6 clock address
    /// (RFC 4191) and the service prefix for SLAAC; never a default router. Needs
    /// `service_address6`.
    #[serde(default)]
    pub ipv6_route_advertisements: bool,
}

impl VipSection {
    fn default_repair_interval() -> HumanDuration {
        HumanDuration::from_secs(1)
    }
}

/// Redundant VIP hosts: keepalived (VRRP) moves the service and clock addresses to a standby
/// when this host fails. Absent: a single VIP host.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedundancySection {
    /// The VRRP group the VIP hosts share (1-255), unique on the link.
    pub virtual_router_id: u8,
    /// This host's priority (1-254): the highest healthy host becomes master at start; after
    /// that a recovered host never takes the addresses back (no preemption).
    #[serde(default = "RedundancySection::default_priority")]
    pub priority: u8,
    /// VRRPv3 advertisement interval (10ms-40s); a master is declared dead after ~3 of them.
    /// The default replaces a lost master after 0.72 s at priority 100, so a guest's longest
    /// gap stays under a second.
    #[serde(default = "RedundancySection::default_advert_interval")]
    pub advert_interval: HumanDuration,
    /// The bridge of the VIP hosts' own network (management or a dedicated cluster link) that
    /// VRRP speaks on: the daemon plugs a second veth (`interface` in the namespace,
    /// `host_interface` on the host) into it. Guests must not reach this network.
    pub bridge: Option<InterfaceName>,
    /// The namespace end of the VRRP link's veth.
    #[serde(default = "RedundancySection::default_interface")]
    pub interface: InterfaceName,
    /// The host end of the VRRP link's veth (joins `bridge`).
    #[serde(default = "RedundancySection::default_host_interface")]
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

impl RedundancySection {
    fn default_priority() -> u8 {
        100
    }

    fn default_advert_interval() -> HumanDuration {
        HumanDuration::from_millis(200)
    }

    fn default_interface() -> InterfaceName {
        InterfaceName::try_from("ntpxdp-r0").expect("an interface name")
    }

    fn default_host_interface() -> InterfaceName {
        InterfaceName::try_from("ntpxdp-hr0").expect("an interface name")
    }
}

/// A route from the namespace back to a guest subnet.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// The guest subnet.
    pub to: IpNet,
    /// The gateway (same family as `to`); none: on link.
    pub via: Option<IpAddr>,
}

/// DHCP for guests on the IPv4 service subnet (dnsmasq in the namespace; needs [vip]).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpSection {
    /// Run dnsmasq in the namespace for the service subnet.
    pub enable: bool,
    /// First and last address to lease, inside the service subnet (needed with `enable`).
    pub range: Option<[Ipv4Addr; 2]>,
    /// How long a lease lasts (at least 2m).
    pub lease_time: HumanDuration,
    /// The guests' default gateway: sent as option 3 and as 0.0.0.0/0 in option 121, since
    /// RFC 3442 clients ignore option 3 when option 121 is present.
    pub router: Option<Ipv4Addr>,
}

impl Default for DhcpSection {
    fn default() -> Self {
        DhcpSection {
            enable: false,
            range: None,
            lease_time: HumanDuration::from_secs(3600),
            router: None,
        }
    }
}

/// Where and what the responder answers.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Named network namespace holding `interface` (default: the daemon's own).
    pub netns: Option<NetnsName>,
    /// The interface the responder attaches to.
    pub interface: InterfaceName,
    /// The clock addresses answered for (at least one).
    pub addresses: Vec<IpAddr>,
    /// How the XDP program is attached.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Namespace of the veth peer (native XDP on a veth needs a program on the peer).
    pub peer_netns: Option<NetnsName>,
    /// The precision announced (log2 seconds, -32..=0).
    #[serde(default = "ServiceSection::default_precision")]
    pub precision: i8,
    /// Log every packet (debugging).
    #[serde(default)]
    pub log_packets: bool,
}

impl ServiceSection {
    fn default_precision() -> i8 {
        -24
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native where it works (on a veth: when the peer can get a pass program), else generic.
    #[default]
    Auto,
    /// Driver mode; on a veth the peer gets a pass program so XDP_TX frames are delivered.
    Native,
    /// Generic (SKB) mode: works on every device, slower.
    Generic,
    /// No XDP: the daemon's userspace path answers everything.
    Off,
}

impl From<XdpMode> for XdpModePref {
    fn from(m: XdpMode) -> XdpModePref {
        match m {
            XdpMode::Auto => XdpModePref::Auto,
            XdpMode::Native => XdpModePref::Native,
            XdpMode::Generic => XdpModePref::Generic,
            XdpMode::Off => XdpModePref::Off,
        }
    }
}

/// What the served clock follows and how it is disciplined.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSection {
    /// What the served clock follows.
    pub reference: Reference,
    /// Shortest poll interval (log2 seconds, 0-17).
    pub min_poll: i8,
    /// Longest poll interval (log2 seconds, `min_poll`-17).
    pub max_poll: i8,
    /// Ask upstreams for interleaved responses (their kernel's transmit timestamps).
    pub interleaved: bool,
    /// Upstreams that must agree before the clock is corrected (1 to the number of upstreams).
    pub min_sources: usize,
    /// Largest slew rate (ppm, 0 < rate <= 100000).
    pub max_slew_ppm: f64,
    /// How fast the oscillator's rate may drift (ppm per hour, 0 < wander <= 100): the served
    /// error bound grows by it in holdover.
    pub holdover_wander_ppm_per_hour: f64,
    /// A correction larger than this is refused (at least 1ms).
    pub panic_threshold: HumanDuration,
    /// How long the clock is served as synchronized without a correction (at least two polls
    /// at `max_poll`).
    pub max_holdover: HumanDuration,
    /// How long a stopped daemon's responder serves its last anchor as synchronized (2s-1h).
    pub max_anchor_age: HumanDuration,
    /// Smear leap seconds instead of stepping.
    pub leap_smear: bool,
    /// Stratum announced instead of the upstreams' plus one (1-15).
    pub stratum: Option<u8>,
    /// Reference ID announced instead of the upstream's: an IPv4 address or 1-4 ASCII
    /// characters.
    pub refid: Option<RefId>,
    /// Stratum announced when serving the host clock (no upstream configured; 1-15).
    pub local_stratum: u8,
}

impl Default for ClockSection {
    fn default() -> Self {
        ClockSection {
            reference: Reference::Upstream,
            min_poll: 4,
            max_poll: 10,
            interleaved: true,
            min_sources: 1,
            max_slew_ppm: 500.0,
            holdover_wander_ppm_per_hour:
                crate::clock::system::DEFAULT_HOLDOVER_WANDER_PPM_PER_HOUR,
            panic_threshold: HumanDuration::from_secs(1000),
            max_holdover: HumanDuration::from_secs(3600),
            max_anchor_age: HumanDuration::from_secs(30),
            leap_smear: false,
            stratum: None,
            refid: None,
            local_stratum: 10,
        }
    }
}

/// What the served clock follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Reference {
    /// Discipline against the `[[upstream]]` servers (the host clock when there are none).
    Upstream,
    /// Serve the kernel clock, as synchronized as the kernel says it is.
    HostClock,
}

/// An NTP server the clock is disciplined against.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Host name or address, optionally with :port (default 123).
    pub address: Token,
    /// Send a burst of requests at start.
    #[serde(default = "UpstreamSection::default_iburst")]
    pub iburst: bool,
}

impl UpstreamSection {
    fn default_iburst() -> bool {
        true
    }
}
