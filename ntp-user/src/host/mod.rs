//! The host plumbing: netlink, network namespaces, the VIP host's namespace/veth/addresses,
//! DHCP (dnsmasq) and the host clock.
pub mod dhcp;
pub mod hostclock;
pub mod netlink;
pub mod netns;
pub mod vip;
