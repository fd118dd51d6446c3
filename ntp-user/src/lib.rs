//! ntp-xdp's daemon: loads and feeds the in-kernel responder.
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dhcp;
pub mod discipline;
pub mod filter;
pub mod hostclock;
pub mod leap;
pub mod managed;
pub mod netns;
pub mod selection;
pub mod serve;
pub mod stats;
pub mod system;
pub mod upstream;
pub mod vip;
pub mod xdp;
