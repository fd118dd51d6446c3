//! ntp-xdp's daemon: loads and feeds the in-kernel responder.
pub mod cli;
pub mod hostclock;
pub mod netns;
pub mod serve;
pub mod stats;
pub mod xdp;
