//! The daemon: one runtime that runs the clock task, the userspace path, observability and,
//! in managed mode, the plumbing's repair and DHCP.
pub mod clock_task;
pub mod managed;
pub mod standalone;
