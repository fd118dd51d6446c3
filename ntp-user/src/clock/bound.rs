//! The error bound served with the time: a guest may take root delay / 2 + root dispersion as
//! a bound on |served time − true time| at the instant of the reply.
//!
//! Root delay is the paths' own uncertainty (half a round trip is the most an asymmetric path
//! can shift an offset), summed down to the reference clock. Root dispersion is the upstreams'
//! own plus what this server estimates of its clock: the discipline's phase error when it last
//! updated, the phase still being slewed away, and from that update on its frequency error
//! plus the worst frequency error it has seen lately, with the oscillator's rate wandering by
//! a configured allowance: small between updates, what the bound grows by in holdover. Nothing
//! here is a constant tolerance such as RFC 5905's 15 ppm: every term is measured, except the
//! wander allowance, which is configured.

/// How many standard errors of the regression the phase and frequency bounds span.
pub const SIGMAS: f64 = 3.0;

/// What the discipline knows about its own error after an update (bounds, not 1σ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DisciplineError {
    /// The monotonic instant the bounds describe: the last update.
    pub at_ns: u64,
    /// Bound on the phase error of the line the clock converges to, at `at_ns` (s).
    pub phase_s: f64,
    /// Bound on its frequency error (s/s).
    pub freq: f64,
    /// The largest frequency error the discipline found in its recent updates (s/s): how far
    /// its frequency may be off when no update comes to say so.
    pub worst_freq: f64,
    /// The phase correction being slewed away from `at_ns` (s) and when the slew ends: served
    /// time is off the converged line by what is left of it.
    pub slew_phase_s: f64,
    pub slew_end_ns: u64,
}

impl DisciplineError {
    /// A clock whose frequency is known only within `freq` (s/s) and whose phase not at all
    /// better than what the caller states elsewhere.
    pub fn unknown(at_ns: u64, freq: f64) -> DisciplineError {
        DisciplineError {
            at_ns,
            phase_s: 0.0,
            freq,
            worst_freq: freq,
            slew_phase_s: 0.0,
            slew_end_ns: at_ns,
        }
    }

    /// What is left of the slew at `now_ns` (s).
    fn slew_left_s(&self, now_ns: u64) -> f64 {
        if now_ns >= self.slew_end_ns {
            return 0.0;
        }
        let total = self.slew_end_ns.saturating_sub(self.at_ns).max(1) as f64;
        let left = (self.slew_end_ns - now_ns.max(self.at_ns)) as f64;
        self.slew_phase_s.abs() * left / total
    }
}

/// Converts a wander allowance in ppm per hour to s/s per s.
pub fn wander_per_s(ppm_per_hour: f64) -> f64 {
    ppm_per_hour * 1e-6 / 3600.0
}

/// The dispersion this server adds at `now_ns` (s), and how fast it grows from there (s/s)
/// over the next `horizon_ns` (the longest an anchor may be served).
///
/// From the last update on, the phase may drift by the frequency bound plus the worst
/// frequency error found lately (what the frequency may be off by when updates stop), and
/// the rate itself by `wander_per_s` per second. Between updates, seconds to minutes apart,
/// the last two add a few µs; in holdover they are what the bound grows by. The growth served
/// is the slope at the far end of the horizon, so that the straight line the responder
/// extrapolates from `now_ns` stays above the bound, which only ever bends upwards.
pub fn added_dispersion(
    e: &DisciplineError,
    wander_per_s: f64,
    now_ns: u64,
    horizon_ns: u64,
) -> (f64, f64) {
    let t = now_ns.saturating_sub(e.at_ns) as f64 * 1e-9;
    let end = t + horizon_ns as f64 * 1e-9;
    let freq = e.freq + e.worst_freq;
    let value = e.phase_s + e.slew_left_s(now_ns) + freq * t + 0.5 * wander_per_s * t * t;
    (value, freq + wander_per_s * end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn error() -> DisciplineError {
        DisciplineError {
            at_ns: 100 * S,
            phase_s: 5e-6,
            freq: 1e-9,
            worst_freq: 20e-9,
            slew_phase_s: -40e-6,
            slew_end_ns: 180 * S,
        }
    }

    const WANDER: f64 = 0.1e-6 / 3600.0;

    #[test]
    fn the_slew_left_counts_until_it_ends() {
        let e = DisciplineError {
            worst_freq: 0.0,
            ..error()
        };
        let (at_update, _) = added_dispersion(&e, 0.0, 100 * S, 30 * S);
        assert!((at_update - 45e-6).abs() < 1e-12, "{at_update}");
        // Halfway through the slew: half of it left, plus 40 s of the frequency error.
        let (half, rate) = added_dispersion(&e, 0.0, 140 * S, 30 * S);
        assert!((half - (5e-6 + 20e-6 + 40e-9)).abs() < 1e-12, "{half}");
        assert_eq!(rate, 1e-9);
        let (after, _) = added_dispersion(&e, 0.0, 200 * S, 30 * S);
        assert!((after - (5e-6 + 100e-9)).abs() < 1e-12, "{after}");
    }

    #[test]
    fn holdover_grows_by_the_worst_frequency_and_the_wander_from_the_update_on() {
        let e = error();
        let t = 3600.0;
        let now = e.at_ns + 3600 * S;
        let (v, rate) = added_dispersion(&e, WANDER, now, 30 * S);
        let want = 5e-6 + (1e-9 + 20e-9) * t + 0.5 * WANDER * t * t;
        assert!((v - want).abs() < 1e-12, "{v} vs {want}");
        assert!((rate - (21e-9 + WANDER * (t + 30.0))).abs() < 1e-15);
        // 0.1 ppm/h over an hour: 180 µs of the bound.
        assert!((0.5 * WANDER * t * t - 180e-6).abs() < 1e-9);
    }

    #[test]
    fn the_served_line_stays_above_the_bound_over_its_horizon() {
        let e = error();
        for start_s in [150u64, 2000, 5000] {
            let now = e.at_ns + start_s * S;
            let (v0, rate) = added_dispersion(&e, WANDER, now, 30 * S);
            for age in 0..=30u64 {
                let (v, _) = added_dispersion(&e, WANDER, now + age * S, 30 * S);
                assert!(
                    v0 + rate * age as f64 >= v - 1e-15,
                    "from {start_s} s, at age {age} s: {} < {v}",
                    v0 + rate * age as f64
                );
            }
        }
    }
}
