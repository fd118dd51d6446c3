//! Types and arithmetic shared by the XDP responder (`ntp-ebpf`) and the daemon (`ntp-xdp`).
//!
//! Everything here is `no_std`, allocation-free and verifier-friendly: fixed-size loops,
//! byte-wise access, no 128-bit arithmetic. The same code builds the reply in the kernel and
//! is unit-tested on the host, so both sides agree on every field by construction.
#![no_std]

pub mod anchor;
pub mod bench;
pub mod checksum;
pub mod counters;
pub mod maps;
pub mod packet;
pub mod policy;
pub mod reply;
pub mod time;
pub mod wire;

pub use anchor::{ServerParams, TimeAnchor};
pub use counters::Counter;
