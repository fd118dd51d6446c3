//! Network Time Security (RFC 8915) for guests that ask for it: the key exchange over TLS 1.3
//! on TCP 4460, and NTS-protected replies from the userspace path (the kernel passes every
//! request with extension fields up, after the same admission).
//!
//! - [`ke`]: the key exchange's records, sans IO.
//! - [`cookie`]: cookies sealed under server keys that rotate, sans IO.
//! - [`packet`]: NTS extension fields in NTP packets: parse, verify, protect, NAK; sans IO.
//! - [`slots`]: key exchanges in progress, capped per source, sans IO.
//! - [`server`]: the TLS listener on its own thread, the key file and its rotation, the
//!   userspace path's hook.
pub mod cookie;
pub mod ke;
pub mod packet;
pub mod server;
pub mod slots;

/// NTS next protocol: NTPv4 (RFC 8915 §7.7).
pub const NEXT_PROTOCOL_NTPV4: u16 = 0;
/// AEAD_AES_SIV_CMAC_256 (RFC 5297), the one algorithm every NTS implementation has.
pub const AEAD_AES_SIV_CMAC_256: u16 = 15;
/// The key exchange's TCP port.
pub const KE_PORT: u16 = 4460;
pub const ALPN: &[u8] = b"ntske/1";
/// The TLS exporter label for the session keys (RFC 8915 §5.1).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-network-time-security";
