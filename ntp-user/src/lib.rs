//! ntp-xdp's daemon: loads and feeds the in-kernel responder.
//!
//! Folders by concern; the arrows run one way (`config` and `daemon` at the top, `clock` at
//! the bottom):
//!
//! - [`clock`]: the sans-IO clock core (filter, selection, discipline, leap, the system).
//! - [`nts`]: Network Time Security: the key exchange, cookies, protected packets.
//! - [`responder`]: the eBPF object and its maps, pins, publication, the userspace path.
//! - [`host`]: netlink, network namespaces, the VIP plumbing, DHCP, the host clock.
//! - [`observe`]: status report, alarms, metrics, guest clocks, the control socket.
//! - [`daemon`]: the one runtime: the clock task, standalone and managed modes, repair.
//! - [`fleet`]: the cluster in etcd: the agent (inside the daemon) and `ntp-xdp fleet`.
//! - [`config`]: the TOML schema, its validation and its lowering to daemon options.
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod fleet;
pub mod host;
pub mod nts;
pub mod observe;
pub mod responder;
pub mod userspace;
pub mod vip;
