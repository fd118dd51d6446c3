//! The model of true time as the kernel will extrapolate it: a line against CLOCK_MONOTONIC,
//! exactly a [`TimeAnchor`]'s.

use ntp_common::time::{freq_scaled_to_ppm, ppm_to_freq_scaled};
use ntp_common::TimeAnchor;

/// The model as the kernel will extrapolate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockModel {
    segment: TimeAnchor,
}

impl ClockModel {
    pub fn new(mono_ns: u64, ntp_ns: u64) -> ClockModel {
        ClockModel {
            segment: TimeAnchor {
                mono_ns,
                ntp_ns,
                ..Default::default()
            },
        }
    }

    /// The line an anchor describes (a published model, e.g. one an earlier daemon left).
    pub fn from_anchor(anchor: &TimeAnchor) -> ClockModel {
        ClockModel {
            segment: TimeAnchor {
                mono_ns: anchor.mono_ns,
                ntp_ns: anchor.ntp_ns,
                freq_scaled: anchor.freq_scaled,
                ..Default::default()
            },
        }
    }

    /// NTP time (ns since 1900) at a monotonic reading, on the current segment.
    pub fn ntp_at(&self, mono_ns: u64) -> u64 {
        self.segment.ntp_ns_at(mono_ns)
    }

    /// Rate relative to CLOCK_MONOTONIC, in ppm (including any slew in progress).
    pub fn freq_ppm(&self) -> f64 {
        freq_scaled_to_ppm(self.segment.freq_scaled)
    }

    pub fn freq_scaled(&self) -> i64 {
        self.segment.freq_scaled
    }

    /// Starts a new segment at `mono_ns`, continuous with the old one, with a new rate.
    pub fn rebase(&mut self, mono_ns: u64, freq_ppm: f64) {
        let ntp_ns = self.ntp_at(mono_ns);
        self.segment.mono_ns = mono_ns;
        self.segment.ntp_ns = ntp_ns;
        self.segment.freq_scaled = ppm_to_freq_scaled(freq_ppm);
    }

    /// The monotonic reading at which the current segment reaches `ntp_ns`.
    pub fn mono_at(&self, ntp_ns: u64) -> u64 {
        let dt = (ntp_ns as i128 - self.segment.ntp_ns as i128) as f64;
        let rate = 1.0 + self.freq_ppm() * 1e-6;
        self.segment
            .mono_ns
            .wrapping_add_signed((dt / rate).round() as i64)
    }

    /// Moves the time at `mono_ns` by `delta_ns` (the one allowed step, and leap seconds).
    pub fn step(&mut self, mono_ns: u64, delta_ns: i64) {
        let ntp_ns = self.ntp_at(mono_ns);
        self.segment.mono_ns = mono_ns;
        self.segment.ntp_ns = ntp_ns.wrapping_add_signed(delta_ns);
    }
}
