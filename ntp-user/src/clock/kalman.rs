//! A Kalman filter estimate of true time against CLOCK_MONOTONIC: the discipline's default
//! estimator (see [`crate::clock::discipline::Estimator`]).
//!
//! The state is the phase of true time at the filter's instant and its rate against
//! CLOCK_MONOTONIC, kept as an absolute line (the filter never sees the model's steering). The
//! oscillator's rate is taken as a random walk of spectral density `wander` ((s/s)² per s), so
//! from one instant to the next the covariance grows by
//!
//! ```text
//! wander · [ dt³/3  dt²/2 ]
//!          [ dt²/2  dt    ]
//! ```
//!
//! Each point measures the phase with the variance its own error states. How much the rate
//! wanders is not known beforehand, and the points' own noise hides it from a single filter
//! (one that expects too much wander predicts almost as well as a right one). So a bank of
//! filters runs side by side, their wanders a factor of 4 apart, each scored by how likely
//! the points it predicted were under its own prediction (the same idea as the windows'
//! prediction scores); the likeliest one's estimate is served. Its covariance gives the phase
//! and frequency errors the served bound states.

use crate::clock::model::ClockModel;

const NS: f64 = 1e-9;

/// A point farther from the prediction than this many standard deviations (and than
/// [`STEP_MIN_S`]) is left out, unless the next ones are too, on the same side.
const OUTLIER_SIGMAS: f64 = 8.0;
/// The smallest jump of the reference the filter treats as a step rather than noise.
pub const STEP_MIN_S: f64 = 500e-6;
/// Consecutive outliers on one side that make a step of the reference: the filter restarts
/// its phase from them.
const STEP_POINTS: u32 = 3;

/// The bank's wanders: the configured centre times 4^k for these k. The centre is a quiet
/// quartz; the bank reaches one 4096 times as quiet and one 16 times as restless (with more
/// restless ones, up to 4^6, those won by chance often enough to raise the simulation's worst
/// wander-case error from 52 to 75 µs).
const BANK_STEPS: std::ops::RangeInclusive<i32> = -6..=2;
const BANK_FACTOR: f64 = 4.0;
/// How fast a filter's score forgets (about the last 64 points).
const SCORE_MEMORY: f64 = 1.0 / 64.0;
/// How fast the averages of the points' weights and normalized innovations forget (about the
/// last 32 points).
const WEIGHT_MEMORY: f64 = 1.0 / 32.0;

/// What became of a point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Absorption {
    /// Taken into the estimate; `restarted`: it confirmed a step of the reference, and the
    /// phase restarted from it.
    Absorbed { restarted: bool },
    /// Far off the prediction and alone so far: left out.
    Outlier { innovation_s: f64 },
}

#[derive(Clone, Debug)]
pub struct Kalman {
    /// True time at `mono_ns` is `ntp_ns` + `phase_s`, running at 1 + `freq` against
    /// CLOCK_MONOTONIC.
    mono_ns: u64,
    ntp_ns: u64,
    phase_s: f64,
    freq: f64,
    /// Covariance of (phase, frequency) at `mono_ns`.
    cov: [[f64; 2]; 2],
    /// Spectral density of the rate's random walk ((s/s)² per s).
    wander: f64,
    /// −log likelihood of the last point under the prediction (up to a constant).
    surprise: f64,
    /// Average share of a point that entered the estimate.
    weight: f64,
    /// Average normalized innovation squared: 1 when the points land as far off the
    /// prediction as the filter expects; above 1, its covariance understates its error.
    nis: f64,
    /// Consecutive outliers and their side.
    outliers: u32,
    outlier_side: f64,
}

impl Kalman {
    /// Starts at a point: true time `true_ntp_ns` at `mono_ns` with error `sigma_s`, the rate
    /// guessed at `freq` (s/s) within `freq_sigma`.
    pub fn start(
        mono_ns: u64,
        true_ntp_ns: u64,
        sigma_s: f64,
        freq: f64,
        freq_sigma: f64,
        wander: f64,
    ) -> Kalman {
        Kalman {
            mono_ns,
            ntp_ns: true_ntp_ns,
            phase_s: 0.0,
            freq,
            cov: [[sigma_s * sigma_s, 0.0], [0.0, freq_sigma * freq_sigma]],
            wander,
            surprise: 0.0,
            weight: 1.0,
            nis: 1.0,
            outliers: 0,
            outlier_side: 0.0,
        }
    }

    /// The estimated rate against CLOCK_MONOTONIC, minus one (s/s).
    pub fn freq(&self) -> f64 {
        self.freq
    }

    /// The current spectral density of the rate's random walk ((s/s)² per s).
    pub fn wander(&self) -> f64 {
        self.wander
    }

    /// About how many points the estimate averages: the inverse of their average weight.
    pub fn effective_points(&self) -> usize {
        (1.0 / self.weight.max(1e-3)).round() as usize
    }

    /// Estimated true time at `mono_ns` minus what `model` says then (s).
    pub fn offset_from(&self, model: &ClockModel, mono_ns: u64) -> f64 {
        let dt_ns = mono_ns as i128 - self.mono_ns as i128;
        let whole = (self.ntp_ns as i128 + dt_ns - model.ntp_at(mono_ns) as i128) as f64;
        (whole + dt_ns as f64 * self.freq) * NS + self.phase_s
    }

    /// Standard errors of the phase at `mono_ns` (s), carried forward from the filter's instant
    /// with the wander, and of the frequency (s/s). The covariance is only as right as the
    /// points' stated errors: when the points land farther off the prediction than it says,
    /// both are widened by that factor.
    pub fn sigmas_at(&self, mono_ns: u64) -> (f64, f64) {
        let dt = mono_ns.saturating_sub(self.mono_ns) as f64 * NS;
        let cov = self.propagated(dt);
        let scale = self.nis.max(1.0).sqrt();
        (
            scale * cov[0][0].max(0.0).sqrt(),
            scale * cov[1][1].max(0.0).sqrt(),
        )
    }

    /// Moves every instant before `at_mono_ns` by `step_ns` (a leap second taken there).
    pub fn shift_before(&mut self, at_mono_ns: u64, step_ns: i64) {
        if self.mono_ns < at_mono_ns {
            self.ntp_ns = self.ntp_ns.wrapping_add_signed(step_ns);
        }
    }

    fn propagated(&self, dt: f64) -> [[f64; 2]; 2] {
        let p = self.cov;
        let q = self.wander;
        // F P Fᵀ + Q with F = [[1, dt], [0, 1]].
        let p00 = p[0][0] + dt * (p[0][1] + p[1][0]) + dt * dt * p[1][1] + q * dt.powi(3) / 3.0;
        let p01 = p[0][1] + dt * p[1][1] + q * dt * dt / 2.0;
        let p11 = p[1][1] + q * dt;
        [[p00, p01], [p01, p11]]
    }

    /// Carries the state forward to `mono_ns` (never back).
    fn advance(&mut self, mono_ns: u64) {
        if mono_ns <= self.mono_ns {
            return;
        }
        let dt_ns = mono_ns - self.mono_ns;
        self.cov = self.propagated(dt_ns as f64 * NS);
        let moved_ns = dt_ns as f64 * self.freq + self.phase_s / NS;
        let whole = moved_ns.floor();
        self.ntp_ns = self
            .ntp_ns
            .wrapping_add(dt_ns)
            .wrapping_add_signed(whole as i64);
        self.phase_s = (moved_ns - whole) * NS;
        self.mono_ns = mono_ns;
    }

    /// Takes a point: true time `true_ntp_ns` at `mono_ns` with error `sigma_s`. A point older
    /// than the filter's instant (upstreams' filters hand on their best sample, which may be
    /// minutes old) measures the phase back then: the line carried back by the frequency, plus
    /// the wander of the time between as noise.
    pub fn absorb(&mut self, mono_ns: u64, true_ntp_ns: u64, sigma_s: f64) -> Absorption {
        self.advance(mono_ns);
        let back = (self.mono_ns - mono_ns) as f64 * NS;
        let h = [1.0, -back];
        let here = (true_ntp_ns as i128 - self.ntp_ns as i128 + (self.mono_ns - mono_ns) as i128)
            as f64
            * NS;
        let innovation = here - (self.phase_s - back * self.freq);
        let noise = sigma_s * sigma_s + self.wander * back.powi(3) / 3.0;
        let p = self.cov;
        let ph = [
            p[0][0] * h[0] + p[0][1] * h[1],
            p[1][0] * h[0] + p[1][1] * h[1],
        ];
        let predicted = h[0] * ph[0] + h[1] * ph[1];
        let spread = (predicted + noise).max(f64::MIN_POSITIVE);
        let gate = (OUTLIER_SIGMAS * spread.sqrt()).max(STEP_MIN_S);
        // A point left out still counts against the filter, as a point at the gate.
        self.surprise = spread.ln() + innovation.abs().min(gate).powi(2) / spread;
        if innovation.abs() > gate {
            let side = innovation.signum();
            self.outliers = if self.outlier_side == side {
                self.outliers + 1
            } else {
                1
            };
            self.outlier_side = side;
            if self.outliers < STEP_POINTS {
                return Absorption::Outlier {
                    innovation_s: innovation,
                };
            }
            // The reference moved: the phase is known no better than the jump, and the point
            // is within the gate again.
            self.cov[0][0] += innovation * innovation;
            self.outliers = 0;
            self.outlier_side = 0.0;
            return match self.absorb(mono_ns, true_ntp_ns, sigma_s) {
                Absorption::Absorbed { .. } => Absorption::Absorbed { restarted: true },
                outlier => outlier,
            };
        }
        self.outliers = 0;
        self.outlier_side = 0.0;
        let gain = [ph[0] / spread, ph[1] / spread];
        self.phase_s += gain[0] * innovation;
        self.freq += gain[1] * innovation;
        // P − K (H P), kept symmetric.
        let p00 = p[0][0] - gain[0] * ph[0];
        let p01 = p[0][1] - gain[0] * ph[1];
        let p11 = p[1][1] - gain[1] * ph[1];
        self.cov = [[p00, p01], [p01, p11]];
        let weight = 1.0 - noise / spread;
        self.weight += (weight - self.weight) * WEIGHT_MEMORY;
        let nis = innovation * innovation / spread;
        self.nis += (nis - self.nis) * WEIGHT_MEMORY;
        Absorption::Absorbed { restarted: false }
    }
}

/// Kalman filters differing only in their wander, the likeliest one served.
#[derive(Clone, Debug)]
pub struct KalmanBank {
    filters: Vec<Kalman>,
    /// Per filter: average −log likelihood of the points it predicted.
    scores: Vec<f64>,
    best: usize,
}

impl KalmanBank {
    /// Filters like `centre` (see [`Kalman::start`]) but for their wander, spread around its.
    pub fn start(centre: Kalman) -> KalmanBank {
        let filters: Vec<Kalman> = BANK_STEPS
            .map(|k| Kalman {
                wander: centre.wander * BANK_FACTOR.powi(k),
                ..centre.clone()
            })
            .collect();
        let centre = BANK_STEPS.clone().position(|k| k == 0).unwrap_or(0);
        KalmanBank {
            scores: vec![0.0; filters.len()],
            filters,
            best: centre,
        }
    }

    /// The filter served.
    pub fn best(&self) -> &Kalman {
        &self.filters[self.best]
    }

    /// Gives the point to every filter and scores them; what became of it in the filter that
    /// is served now.
    pub fn absorb(&mut self, mono_ns: u64, true_ntp_ns: u64, sigma_s: f64) -> Absorption {
        let mut outcomes = Vec::with_capacity(self.filters.len());
        for (filter, score) in self.filters.iter_mut().zip(&mut self.scores) {
            outcomes.push(filter.absorb(mono_ns, true_ntp_ns, sigma_s));
            *score += (filter.surprise - *score) * SCORE_MEMORY;
        }
        // The likeliest; among near ties the one served so far (a switch moves the estimate),
        // else the quieter one, which averages more.
        let min = self.scores.iter().copied().fold(f64::INFINITY, f64::min);
        if self.scores[self.best] > min + SCORE_TIE {
            self.best = self
                .scores
                .iter()
                .position(|&s| s <= min + SCORE_TIE)
                .unwrap_or(self.best);
        }
        outcomes[self.best]
    }

    pub fn shift_before(&mut self, at_mono_ns: u64, step_ns: i64) {
        for f in &mut self.filters {
            f.shift_before(at_mono_ns, step_ns);
        }
    }
}

/// Scores closer than this count as a tie (log likelihood per point).
const SCORE_TIE: f64 = 0.01;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const S: u64 = 1_000_000_000;
    const EPOCH: u64 = 3_900_000_000 * S;

    /// A simulated oscillator: true time against CLOCK_MONOTONIC with a rate error that walks
    /// randomly by `walk` per √s, read through Gaussian noise of `noise_s` every `every` s.
    struct Oscillator {
        rng: rand::rngs::StdRng,
        mono: u64,
        /// True time since EPOCH (ns).
        truth: f64,
        rate: f64,
        walk: f64,
    }

    impl Oscillator {
        fn new(seed: u64, rate: f64, walk: f64) -> Oscillator {
            Oscillator {
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                mono: 10 * S,
                truth: 0.0,
                rate,
                walk,
            }
        }

        fn normal(&mut self) -> f64 {
            let (u1, u2): (f64, f64) = (self.rng.gen::<f64>().max(1e-300), self.rng.gen());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }

        fn tick(&mut self, every: u64) {
            self.mono += every;
            self.truth += every as f64 * (1.0 + self.rate);
            self.rate += self.walk * (every as f64 * NS).sqrt() * self.normal();
        }

        fn read(&mut self, noise_s: f64) -> u64 {
            EPOCH + (self.truth + noise_s / NS * self.normal()).round() as u64
        }

        fn error_of(&self, k: &Kalman) -> f64 {
            let model = ClockModel::new(self.mono, EPOCH + self.truth.round() as u64);
            k.offset_from(&model, self.mono)
        }
    }

    fn run(
        osc: &mut Oscillator,
        k: &mut Kalman,
        points: usize,
        every: u64,
        noise_s: f64,
    ) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        for _ in 0..points {
            osc.tick(every);
            let read = osc.read(noise_s);
            k.absorb(osc.mono, read, noise_s);
            out.push((osc.error_of(k), k.sigmas_at(osc.mono).0));
        }
        out
    }

    #[test]
    fn learns_phase_and_frequency_of_a_steady_oscillator() {
        let mut osc = Oscillator::new(1, 150e-6, 0.0);
        osc.tick(S);
        let first = osc.read(20e-6);
        let mut k = Kalman::start(osc.mono, first, 20e-6, 0.0, 500e-6, 1e-20);
        let errors = run(&mut osc, &mut k, 400, 16 * S, 20e-6);
        // Within 0.01 ppm, and within the three standard errors the filter states.
        let freq_error = (k.freq() - 150e-6).abs();
        assert!(freq_error < 1e-8, "{freq_error}");
        assert!(freq_error < 3.0 * k.sigmas_at(osc.mono).1, "{freq_error}");
        let (last, sigma) = *errors.last().unwrap();
        // 400 points of 20 µs noise: a few µs of phase error, and the filter knows it.
        assert!(last.abs() < 5e-6, "{last}");
        assert!(sigma < 5e-6 && sigma > 0.3e-6, "{sigma}");
    }

    #[test]
    fn the_bank_serves_a_filter_whose_bound_covers_the_error() {
        // An oscillator walking by 3e-10/√s (9e-20 (s/s)²/s), a bank centred ten times too
        // quiet and one a thousand times too restless: whichever filter either serves, three
        // of its standard errors cover the error at 97 % of the points or more (measured: 98 %;
        // the served bound adds the frequency terms of [`crate::clock::bound`] on top).
        for centre in [9e-21, 9e-17] {
            let mut misses = 0;
            let mut total = 0;
            for seed in 1..=8 {
                let mut osc = Oscillator::new(seed, -80e-6, 3e-10);
                osc.tick(S);
                let first = osc.read(10e-6);
                let mut bank =
                    KalmanBank::start(Kalman::start(osc.mono, first, 10e-6, 0.0, 500e-6, centre));
                for i in 0..3000 {
                    osc.tick(16 * S);
                    let read = osc.read(10e-6);
                    bank.absorb(osc.mono, read, 10e-6);
                    if i >= 500 {
                        let best = bank.best();
                        total += 1;
                        if osc.error_of(best).abs() > 3.0 * best.sigmas_at(osc.mono).0 {
                            misses += 1;
                        }
                    }
                }
            }
            assert!(
                misses * 100 < total * 3,
                "centre {centre:e}: {misses} of {total} beyond 3σ"
            );
        }
    }

    #[test]
    fn a_lone_outlier_is_left_out_and_a_step_is_followed() {
        let mut osc = Oscillator::new(3, 20e-6, 0.0);
        osc.tick(S);
        let first = osc.read(10e-6);
        let mut k = Kalman::start(osc.mono, first, 10e-6, 0.0, 500e-6, 1e-19);
        run(&mut osc, &mut k, 100, 16 * S, 10e-6);
        osc.tick(16 * S);
        let far = osc.read(10e-6) + 5_000_000;
        assert!(matches!(
            k.absorb(osc.mono, far, 10e-6),
            Absorption::Outlier { .. }
        ));
        assert!(osc.error_of(&k).abs() < 10e-6);
        run(&mut osc, &mut k, 1, 16 * S, 10e-6);
        // The reference steps by 5 ms: after three points on that side the filter follows.
        osc.truth += 5e6;
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            osc.tick(16 * S);
            let read = osc.read(10e-6);
            outcomes.push(k.absorb(osc.mono, read, 10e-6));
        }
        assert_eq!(outcomes[2], Absorption::Absorbed { restarted: true });
        assert!(osc.error_of(&k).abs() < 100e-6, "{}", osc.error_of(&k));
    }

    #[test]
    fn an_older_point_measures_the_phase_back_then() {
        let mut osc = Oscillator::new(4, 50e-6, 0.0);
        osc.tick(S);
        let first = osc.read(1e-6);
        let mut k = Kalman::start(osc.mono, first, 1e-6, 0.0, 500e-6, 1e-20);
        run(&mut osc, &mut k, 50, 16 * S, 1e-6);
        // A point read 100 s ago, handed on late, agrees with the line carried back.
        let (mono_then, read_then) = (osc.mono, osc.read(1e-6));
        osc.tick(100 * S);
        let now = osc.read(1e-6);
        k.absorb(osc.mono, now, 1e-6);
        assert_eq!(
            k.absorb(mono_then, read_then, 1e-6),
            Absorption::Absorbed { restarted: false }
        );
        assert!(osc.error_of(&k).abs() < 2e-6, "{}", osc.error_of(&k));
    }
}
