//! The sans-IO clock core: it takes timestamps and packets as values and returns what the IO
//! must do (requests to send, anchors to publish, when to wake up) and a typed snapshot. No
//! sockets, no clock reads, no randomness of its own, no runtime: `tests/clock_is_sans_io`
//! keeps it so.
pub mod bound;
pub mod discipline;
pub mod filter;
pub mod kalman;
pub mod leap;
pub mod model;
pub mod names;
pub mod selection;
pub mod snapshot;
pub mod system;
pub mod upstream;
