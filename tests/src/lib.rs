//! Shared pieces of the integration tests on top of the `testbed` crate (namespaces that clean
//! up after themselves, the guest ↔ VIP topology, the `ntp-xdp serve` process, third-party
//! programs): what needs ntp-user's library (fleet simulation, NTS packets, frames).
//!
//! Network rules: IPv4 only from 169.254.0.0/16; IPv6 only inside the test's own namespaces.
//! Every namespace is deleted by its guard, also when a test fails.

pub mod clients;
pub mod fleet;
pub mod fleet_scale;
pub mod frames;
pub mod nts;
pub mod topology;
pub mod vip;
pub mod vrrp;

pub use testbed::relay;
pub use testbed::{
    ip, ntp_loadgen_bin, ntp_xdp_bin, run, status_at, unique_name, CLOCK_V4, CLOCK_V6,
};
