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
    /// `reference = "host-clock"`: the host clock is disciplined by chrony or PTP, so its
    /// unsynchronized flag makes replies say LI=3 and its maximum error is the root
    /// dispersion. (A local stratum, chrony's `local stratum 10`, serves regardless.)
    pub follow_kernel_sync: bool,
}

/// What the kernel says of its clock's discipline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelClockState {
    /// Not TIME_ERROR: whoever disciplines the clock says it is synchronized.
    pub synchronized: bool,
    /// The kernel's maximum error (µs): grows by 500 ppm while nobody updates it.
    pub max_error_us: i64,
}

/// Reads the kernel's synchronization state with ntp_gettime(3): a read-only call, it takes
/// no mode bits and can change nothing (the daemon never adjusts the host clock).
pub fn kernel_clock_state() -> Result<KernelClockState> {
    // SAFETY: ntp_gettime only writes the struct it is given.
    let mut tv: libc::ntptimeval = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::ntp_gettime(&mut tv) };
    if state < 0 {
        return Err(std::io::Error::last_os_error()).context("ntp_gettime");
    }
    Ok(KernelClockState {
        synchronized: state != libc::TIME_ERROR,
        max_error_us: tv.maxerror,
    })
}

/// An anchor that serves the host clock as it is now.
pub fn host_clock_anchor(identity: &HostClockIdentity) -> Result<TimeAnchor> {
    let pair = read_clock_pair()?;
    let ntp_ns = unix_ns_to_ntp_ns(pair.unix_ns);
    let (leap, dispersion_ns) = if identity.follow_kernel_sync {
        let k = kernel_clock_state()?;
        (
            if k.synchronized {
                LEAP_NONE
            } else {
                ntp_common::wire::LEAP_UNSYNCHRONIZED
            },
            k.max_error_us.clamp(0, 16_000_000) as u64 * 1_000,
        )
    } else {
        (LEAP_NONE, 0)
    };
    Ok(TimeAnchor {
        mono_ns: pair.mono_ns,
        ntp_ns,
        freq_scaled: 0,
        max_age_ns: identity.max_age_ns,
        reference_ntp_ns: ntp_ns,
        root_delay_ns: 0,
        root_dispersion_ns: dispersion_ns,
        refid: identity.refid,
        leap,
        stratum: identity.stratum,
        _pad: [0; 2],
    })
}
