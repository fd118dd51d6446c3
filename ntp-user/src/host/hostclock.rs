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

/// The host clock's rate against CLOCK_MONOTONIC, learned from successive readings (sans IO).
///
/// Usually 0: whoever disciplines the host clock (chrony, PTP) adjusts the kernel's frequency,
/// which both clocks share. But some hypervisors keep a guest's CLOCK_REALTIME on time by
/// stepping it (seen here: +0.5 ms every 100 ms, a monotonic clock 0.5 % slow); between
/// publications the kernel extrapolates on CLOCK_MONOTONIC, so served time would lag the
/// host clock by up to the publish interval times that rate. The slope over the last
/// [`RATE_WINDOW_NS`] of readings corrects it; a jump (a step of the host clock) restarts it.
#[derive(Debug, Clone, Default)]
pub struct HostClockRate {
    readings: std::collections::VecDeque<ClockPair>,
}

/// The span of readings the rate is taken over.
pub const RATE_WINDOW_NS: u64 = 16 * NANOS_PER_SEC;
/// A difference between successive readings beyond this is a step, not a rate.
const STEP_NS: i64 = 50_000_000;
/// Rates beyond this are not a clock's: ignored.
const MAX_RATE_PPM: f64 = 20_000.0;

impl HostClockRate {
    /// Takes a reading; returns the rate (ppm) of CLOCK_REALTIME against CLOCK_MONOTONIC.
    pub fn update(&mut self, pair: ClockPair) -> f64 {
        let offset = |p: &ClockPair| p.unix_ns as i64 - p.mono_ns as i64;
        if let Some(last) = self.readings.back() {
            let mono_gap = pair.mono_ns.saturating_sub(last.mono_ns) as i64;
            let offset_gap = offset(&pair) - offset(last);
            // More than STEP_NS beyond what a maximal rate explains over the gap: a step.
            if (offset_gap.abs() as f64) > STEP_NS as f64 + mono_gap as f64 * MAX_RATE_PPM * 1e-6 {
                self.readings.clear();
            }
        }
        self.readings.push_back(pair);
        while self
            .readings
            .front()
            .is_some_and(|f| pair.mono_ns.saturating_sub(f.mono_ns) > RATE_WINDOW_NS)
            && self.readings.len() > 2
        {
            self.readings.pop_front();
        }
        let (Some(first), Some(last)) = (self.readings.front(), self.readings.back()) else {
            return 0.0;
        };
        let span = last.mono_ns.saturating_sub(first.mono_ns);
        if span < NANOS_PER_SEC {
            return 0.0;
        }
        let ppm = (offset(last) - offset(first)) as f64 / span as f64 * 1e6;
        if ppm.abs() > MAX_RATE_PPM {
            0.0
        } else {
            ppm
        }
    }
}

/// An anchor that serves the host clock as it is now.
pub fn host_clock_anchor(identity: &HostClockIdentity) -> Result<TimeAnchor> {
    host_clock_anchor_at(identity, read_clock_pair()?, 0.0)
}

/// An anchor that serves the host clock read as `pair`, running at `rate_ppm` against
/// CLOCK_MONOTONIC (see [`HostClockRate`]).
pub fn host_clock_anchor_at(
    identity: &HostClockIdentity,
    pair: ClockPair,
    rate_ppm: f64,
) -> Result<TimeAnchor> {
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
        freq_scaled: ntp_common::time::ppm_to_freq_scaled(rate_ppm),
        max_age_ns: identity.max_age_ns,
        reference_ntp_ns: ntp_ns,
        root_delay_ns: 0,
        root_dispersion_ns: dispersion_ns,
        // The host clock states no frequency error of its own: RFC 5905's tolerance.
        dispersion_growth_ns_per_s: ntp_common::time::PHI_NS_PER_SEC,
        refid: identity.refid,
        leap,
        stratum: identity.stratum,
        _pad: [0; 2],
    })
}

/// Whole seconds since the Unix epoch by CLOCK_REALTIME (0 for a clock before 1970): for
/// ages of things kept on disk or in the fleet store, never for served time.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;

    fn pair(mono_ns: u64, unix_ns: u64) -> ClockPair {
        ClockPair { mono_ns, unix_ns }
    }

    #[test]
    fn a_host_clock_stepped_forward_in_small_steps_has_a_rate() {
        // +0.5 ms every 100 ms: 5000 ppm, read once a second.
        let mut r = HostClockRate::default();
        let base = 1_700_000_000 * S;
        let mut rate = 0.0;
        for i in 0..20u64 {
            let mono = 100 * S + i * S;
            rate = r.update(pair(mono, base + i * S + i * 5_000_000));
        }
        assert!((rate - 5000.0).abs() < 1.0, "{rate}");
    }

    #[test]
    fn a_plain_host_clock_has_none_and_a_step_restarts_the_estimate() {
        let mut r = HostClockRate::default();
        let base = 1_700_000_000 * S;
        for i in 0..10u64 {
            assert_eq!(r.update(pair(100 * S + i * S, base + i * S)), 0.0);
        }
        // Set back an hour: a step, not a rate.
        let rate = r.update(pair(110 * S, base + 10 * S - 3600 * S));
        assert_eq!(rate, 0.0);
        assert_eq!(r.update(pair(111 * S, base + 11 * S - 3600 * S)), 0.0);
    }
}
