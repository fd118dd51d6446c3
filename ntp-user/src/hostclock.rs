//! The host clock as a (temporary) reference: an anchor that pairs a CLOCK_MONOTONIC reading
//! with CLOCK_REALTIME. Used until the discipline loop replaces it, and for `host-clock` mode.

use anyhow::{Context as _, Result};
use nix::time::{clock_gettime, ClockId};
use ntp_common::time::{unix_ns_to_ntp_ns, NANOS_PER_SEC};
use ntp_common::wire::LEAP_NONE;
use ntp_common::TimeAnchor;

/// A simultaneous reading of the two clocks.
#[derive(Debug, Clone, Copy)]
pub struct ClockPair {
    pub mono_ns: u64,
    pub unix_ns: u64,
}

fn read_ns(clock: ClockId) -> Result<u64> {
    let ts = clock_gettime(clock).with_context(|| format!("clock_gettime({clock:?})"))?;
    Ok(ts.tv_sec() as u64 * NANOS_PER_SEC + ts.tv_nsec() as u64)
}

/// Reads CLOCK_REALTIME between two CLOCK_MONOTONIC readings and pairs it with their midpoint.
pub fn read_clock_pair() -> Result<ClockPair> {
    let m1 = read_ns(ClockId::CLOCK_MONOTONIC)?;
    let unix_ns = read_ns(ClockId::CLOCK_REALTIME)?;
    let m2 = read_ns(ClockId::CLOCK_MONOTONIC)?;
    Ok(ClockPair {
        mono_ns: m1 + (m2 - m1) / 2,
        unix_ns,
    })
}

pub fn monotonic_now_ns() -> Result<u64> {
    read_ns(ClockId::CLOCK_MONOTONIC)
}

/// Header fields a host-clock anchor carries.
#[derive(Debug, Clone, Copy)]
pub struct HostClockIdentity {
    pub stratum: u8,
    pub refid: [u8; 4],
    pub max_age_ns: u64,
}

/// An anchor that serves the host clock as it is now.
pub fn host_clock_anchor(identity: &HostClockIdentity) -> Result<TimeAnchor> {
    let pair = read_clock_pair()?;
    let ntp_ns = unix_ns_to_ntp_ns(pair.unix_ns);
    Ok(TimeAnchor {
        mono_ns: pair.mono_ns,
        ntp_ns,
        freq_scaled: 0,
        max_age_ns: identity.max_age_ns,
        reference_ntp_ns: ntp_ns,
        root_delay_ns: 0,
        root_dispersion_ns: 0,
        refid: identity.refid,
        leap: LEAP_NONE,
        stratum: identity.stratum,
        _pad: [0; 2],
    })
}
