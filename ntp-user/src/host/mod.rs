//! The operating system's primitives the daemon builds on: netlink, network namespaces,
//! packet timestamps, the host clock, and small file and socket helpers.
pub mod files;
pub mod hostclock;
pub mod netlink;
pub mod netns;
pub mod timestamping;
