//! The daemon's clock: a model of true time as a function of CLOCK_MONOTONIC, disciplined
//! against the combined upstream offset. It never touches the host clock.
//!
//! The model is a chain of linear segments, each exactly a [`TimeAnchor`] line (the kernel
//! extrapolates with the same arithmetic), joined without jumps. Each update adds an absolute
//! "true time at this monotonic instant" point; an estimator (a bank of Kalman filters, or a
//! weighted regression over the recent points: [`Estimator`]), taken against the current
//! segment, gives the model's phase and frequency error. The frequency error is corrected at
//! once (a rate change, never a jump); the phase error is slewed away at no more than
//! `max_slew_ppm`. Before the first synchronization the model may step once; afterwards an
//! error above the panic threshold is refused and reported.

use std::collections::VecDeque;

use crate::clock::bound::{DisciplineError, SIGMAS};
use crate::clock::kalman::{Absorption, Kalman, KalmanBank};
pub use crate::clock::model::ClockModel;

const NS: f64 = 1e-9;

/// The largest frequency error the model accepts by default (2 %): far beyond any crystal, but
/// a guest whose TSC was calibrated wrong runs its monotonic clock percents off (seen on a VM
/// here: 0.5 %), and the model must follow it.
pub const MAX_FREQ_PPM: f64 = 20_000.0;

#[derive(Clone, Debug, PartialEq)]
pub struct DisciplineConfig {
    /// Largest rate at which a phase error is slewed away (ppm).
    pub max_slew_ppm: f64,
    /// After the first synchronization, an error above this (s) is refused, not applied.
    pub panic_threshold_s: f64,
    /// Largest frequency correction the model accepts (ppm).
    pub max_freq_ppm: f64,
    /// The longest regression window: at most this many most recent points are kept.
    pub regression_points: usize,
    /// How the points become a phase and a frequency.
    pub estimator: Estimator,
    /// The centre of the Kalman filters' wanders of the oscillator's rate ((s/s)² per s; see
    /// [`crate::clock::kalman`]).
    pub kalman_wander: f64,
}

/// The two estimators the discipline can run (the simulation compares them on the same seeds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Estimator {
    /// Weighted regression over the window of recent points that predicted the next points
    /// best.
    #[default]
    Windows,
    /// A bank of Kalman filters of phase and frequency ([`crate::clock::kalman`]): over the
    /// simulation's cases as close or closer to the truth, with a tighter bound, and twice as
    /// close when the oscillator wanders (README, "The error bound"); not the default while
    /// a namespace run saw it serve 7.5 ms off a minute after its first synchronization.
    Kalman,
}

/// The centre of the Kalman filters' wanders: a quiet quartz, whose rate walks by about 0.02
/// ppm in an hour.
pub const DEFAULT_KALMAN_WANDER: f64 = 1e-19;

impl Default for DisciplineConfig {
    fn default() -> Self {
        DisciplineConfig {
            max_slew_ppm: 500.0,
            panic_threshold_s: 1000.0,
            // Far beyond any crystal, but a guest whose TSC was calibrated wrong runs its
            // monotonic clock percents off (seen on a VM here: 0.5 %), and the model must follow.
            max_freq_ppm: MAX_FREQ_PPM,
            regression_points: WINDOWS[WINDOWS.len() - 1],
            estimator: Estimator::default(),
            kalman_wander: DEFAULT_KALMAN_WANDER,
        }
    }
}

/// What an update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DisciplineEvent {
    /// First synchronization: the model's time was set.
    Stepped { offset_s: f64 },
    /// Phase error being slewed away and the new frequency estimate. `trimmed`: the runs test
    /// found the frequency moving within the window and shortened it (or the Kalman filter
    /// restarted its phase after a step of the reference).
    Corrected {
        phase_s: f64,
        freq_ppm: f64,
        slew_ppm: f64,
        trimmed: bool,
    },
    /// Error above the panic threshold: nothing applied.
    Refused { offset_s: f64 },
    /// A point far off the estimate and alone so far (the Kalman filter's gate): left out.
    Outlier { offset_s: f64 },
}

#[derive(Clone, Copy, Debug)]
struct Point {
    mono_ns: u64,
    true_ntp_ns: u64,
    weight: f64,
}

#[derive(Clone, Debug)]
pub struct Discipline {
    pub config: DisciplineConfig,
    pub model: ClockModel,
    /// Frequency estimate (ppm vs CLOCK_MONOTONIC), without the slew in progress.
    freq_ppm: f64,
    /// When the slew in progress ends.
    slew_end_ns: Option<u64>,
    points: VecDeque<Point>,
    synchronized: bool,
    last_update_ns: Option<u64>,
    updates: u32,
    /// Per candidate window (WINDOWS): how badly it predicted the points that came next
    /// (weighted squared error, averaged with SCORE_MEMORY).
    window_scores: [f64; WINDOWS.len()],
    /// The window the last fit used (points).
    window: usize,
    /// Bounds on the phase and frequency error of the last fit.
    fit_error: FitError,
    /// The discipline's own error as of the last update.
    error: DisciplineError,
    /// The frequency errors the last updates found (s/s, magnitudes, newest last).
    recent_freq_errors: VecDeque<f64>,
    /// The Kalman filters, once they have a point (with [`Estimator::Kalman`]).
    kalman: Option<KalmanBank>,
}

/// Bounds (SIGMAS standard errors) on a fit's phase at the instant it was fitted for (s) and
/// on its slope (s/s); `slope` is `None` when the fit held the frequency (too few points).
#[derive(Clone, Copy, Debug, PartialEq)]
struct FitError {
    phase_s: f64,
    slope: Option<f64>,
}

/// How many updates' frequency errors the holdover bound remembers: the worst of them is what
/// the frequency may be off by when updates stop.
const FREQ_ERROR_MEMORY: usize = 32;

/// The regression windows the discipline chooses among (newest points). Over a steady
/// oscillator the longest averages the most noise away; when the frequency wanders, a long
/// window's line lags it, and the point that arrives next shows that.
const WINDOWS: [usize; 5] = [8, 16, 32, 64, 128];
/// How fast a window's prediction score forgets: about the last 32 updates count.
const SCORE_MEMORY: f64 = 1.0 / 32.0;
/// A longer window is kept while its score is at most this factor above the best one's.
const SCORE_TOLERANCE: f64 = 1.5;

/// Fewer points than this give no frequency estimate, and the runs test never trims below it.
const MIN_POINTS_FOR_FREQUENCY: usize = 8;
/// The smallest jump of the newest points that counts as a step of the reference.
const STEP_DETECTION_MIN_S: f64 = 500e-6;

/// Updates during which the frequency may move freely (the oscillator's error, up to ±500 ppm,
/// is learned in the first minutes).
const FREQUENCY_LEARNING_UPDATES: u32 = 16;

impl Discipline {
    /// Starts from an initial guess (normally the host clock), unsynchronized.
    pub fn new(config: DisciplineConfig, model: ClockModel) -> Discipline {
        Discipline {
            config,
            model,
            freq_ppm: 0.0,
            slew_end_ns: None,
            points: VecDeque::new(),
            synchronized: false,
            last_update_ns: None,
            updates: 0,
            window_scores: [0.0; WINDOWS.len()],
            window: WINDOWS[WINDOWS.len() - 1],
            fit_error: FitError {
                phase_s: 0.0,
                slope: None,
            },
            error: DisciplineError::unknown(0, MAX_FREQ_PPM * 1e-6),
            recent_freq_errors: VecDeque::new(),
            kalman: None,
        }
    }

    /// Continues a clock that was already synchronized (an earlier daemon's published model):
    /// no initial step, `freq_ppm` as the frequency estimate, the model rebased on it at
    /// `now_ns` without a jump.
    pub fn resume(
        config: DisciplineConfig,
        mut model: ClockModel,
        freq_ppm: f64,
        now_ns: u64,
    ) -> Discipline {
        model.rebase(now_ns, freq_ppm);
        let error = DisciplineError::unknown(now_ns, config.max_freq_ppm * 1e-6);
        Discipline {
            freq_ppm,
            synchronized: true,
            error,
            ..Discipline::new(config, model)
        }
    }

    /// The discipline's own error as of its last update (bounds; see [`crate::clock::bound`]).
    pub fn error(&self) -> DisciplineError {
        self.error
    }

    /// Sets the error a resumed clock starts from (what the anchor it continues stated).
    pub fn set_error(&mut self, error: DisciplineError) {
        self.error = error;
    }

    /// How many of the newest points the last fit used: short when the frequency wanders (for
    /// the Kalman filter, about how many points its estimate averages).
    pub fn window(&self) -> usize {
        self.window
    }

    pub fn is_synchronized(&self) -> bool {
        self.synchronized
    }

    pub fn frequency_ppm(&self) -> f64 {
        self.freq_ppm
    }

    /// When the slew in progress ends: the edge must wake and republish then.
    pub fn slew_end_ns(&self) -> Option<u64> {
        self.slew_end_ns
    }

    /// Ends a slew whose time is up. The new segment starts at `now_ns`, not at the planned
    /// end, so it is continuous with whatever was published meanwhile; the regression absorbs
    /// the sliver of extra correction.
    pub fn advance(&mut self, now_ns: u64) {
        if let Some(end) = self.slew_end_ns {
            if now_ns >= end {
                self.model.rebase(now_ns, self.freq_ppm);
                self.slew_end_ns = None;
            }
        }
    }

    /// Takes a leap second at `at_mono_ns`: the model's time moves by `step_ns`, and so do the
    /// stored points from before it, which were on the old scale.
    pub fn apply_leap(&mut self, at_mono_ns: u64, step_ns: i64) {
        self.model.step(at_mono_ns, step_ns);
        if let Some(k) = &mut self.kalman {
            k.shift_before(at_mono_ns, step_ns);
        }
        for p in &mut self.points {
            if p.mono_ns < at_mono_ns {
                p.true_ntp_ns = p.true_ntp_ns.wrapping_add_signed(step_ns);
            }
        }
    }

    /// The model as it will run once the slew in progress ends: the line measurements are
    /// judged against (a slew is a correction under way, not an error of the past).
    pub fn estimate_line(&self, now_ns: u64) -> ClockModel {
        let mut line = self.model;
        line.rebase(now_ns, self.freq_ppm);
        line
    }

    /// Feeds an offset measured at `now_ns` (true − model, s) with its error `sigma_s`.
    pub fn update(&mut self, now_ns: u64, offset_s: f64, sigma_s: f64) -> DisciplineEvent {
        self.advance(now_ns);
        let true_ntp_ns = self
            .model
            .ntp_at(now_ns)
            .wrapping_add_signed((offset_s / NS).round() as i64);
        self.update_with_point(now_ns, now_ns, true_ntp_ns, offset_s, sigma_s)
    }

    /// Feeds an estimate of true time `true_ntp_ns` at `point_mono_ns` (possibly before
    /// `now_ns`), with its error `sigma_s`.
    pub fn update_at(
        &mut self,
        now_ns: u64,
        point_mono_ns: u64,
        true_ntp_ns: u64,
        sigma_s: f64,
    ) -> DisciplineEvent {
        self.advance(now_ns);
        let offset_s =
            (true_ntp_ns as i128 - self.estimate_line(now_ns).ntp_at(point_mono_ns) as i128) as f64
                * NS;
        self.update_with_point(now_ns, point_mono_ns, true_ntp_ns, offset_s, sigma_s)
    }

    fn update_with_point(
        &mut self,
        now_ns: u64,
        point_mono_ns: u64,
        true_ntp_ns: u64,
        offset_s: f64,
        sigma_s: f64,
    ) -> DisciplineEvent {
        if !offset_s.is_finite() {
            return DisciplineEvent::Refused { offset_s };
        }
        let point = Point {
            mono_ns: point_mono_ns,
            true_ntp_ns,
            weight: 1.0 / sigma_s.max(1e-7).powi(2),
        };
        if !self.synchronized {
            self.model.step(now_ns, (offset_s / NS).round() as i64);
            self.synchronized = true;
            self.last_update_ns = Some(now_ns);
            self.points.push_back(point);
            if self.config.estimator == Estimator::Kalman {
                self.kalman = Some(self.start_kalman(&point, sigma_s));
            }
            // One point: its own error, and a frequency known only within the model's limits.
            self.error = DisciplineError {
                phase_s: SIGMAS * sigma_s,
                ..DisciplineError::unknown(now_ns, self.config.max_freq_ppm * 1e-6)
            };
            return DisciplineEvent::Stepped { offset_s };
        }
        // The point itself beyond the threshold is refused before it can pull a long window's
        // line part of the way (one 100 s point among 128 moves the phase by a second or so).
        if offset_s.abs() > self.config.panic_threshold_s {
            return DisciplineEvent::Refused { offset_s };
        }
        let (phase, slope, trimmed) = match self.config.estimator {
            Estimator::Windows => {
                self.score_windows(&point, now_ns);
                let (phase, slope, kept) = self.fit(Some(point), now_ns);
                if phase.abs() > self.config.panic_threshold_s {
                    return DisciplineEvent::Refused { offset_s: phase };
                }
                self.points.push_back(point);
                let trimmed = kept < self.points.len();
                // Points the fit rejected (older than a step, or than a frequency change)
                // stay gone.
                while self.points.len() > kept.min(self.config.regression_points) {
                    self.points.pop_front();
                }
                (phase, slope, trimmed)
            }
            Estimator::Kalman => {
                // Judged on a copy: a refused point leaves the filter as it was.
                let mut kalman = match &self.kalman {
                    Some(k) => k.clone(),
                    // A resumed clock: the first point of its own starts the filter.
                    None => self.start_kalman(&point, sigma_s),
                };
                let restarted = match kalman.absorb(point.mono_ns, point.true_ntp_ns, sigma_s) {
                    Absorption::Absorbed { restarted } => restarted,
                    Absorption::Outlier { .. } => {
                        // Only the count of outliers in a row changed.
                        self.kalman = Some(kalman);
                        return DisciplineEvent::Outlier { offset_s };
                    }
                };
                let reference = self.estimate_line(now_ns);
                let best = kalman.best();
                let phase = best.offset_from(&reference, now_ns);
                if phase.abs() > self.config.panic_threshold_s {
                    return DisciplineEvent::Refused { offset_s: phase };
                }
                let slope = best.freq() - self.freq_ppm * 1e-6;
                let (phase_sigma, freq_sigma) = best.sigmas_at(now_ns);
                self.fit_error = FitError {
                    phase_s: SIGMAS * phase_sigma,
                    slope: Some(SIGMAS * freq_sigma),
                };
                self.window = best.effective_points();
                self.kalman = Some(kalman);
                (phase, slope, restarted)
            }
        };
        let max_freq = self.config.max_freq_ppm;
        // Once the oscillator's error is learned, one update may only nudge the frequency: a
        // burst of disagreeing points must not swing the served rate beyond the slew limit.
        let mut change = slope * 1e6;
        if self.updates >= FREQUENCY_LEARNING_UPDATES {
            let nudge = self.config.max_slew_ppm / 4.0;
            change = change.clamp(-nudge, nudge);
        }
        self.updates += 1;
        let freq_before = self.freq_ppm;
        self.freq_ppm = (self.freq_ppm + change).clamp(-max_freq, max_freq);
        // What the fit found but the clamps kept out of the frequency is error left in it.
        let unapplied = (slope - (self.freq_ppm - freq_before) * 1e-6).abs();
        // Slew the phase over at least the time since the last update, and slower if needed
        // to stay within the slew limit.
        let interval = self
            .last_update_ns
            .map_or(1.0, |l| (now_ns.saturating_sub(l) as f64 * NS).max(1.0));
        let slew_time = interval.max(phase.abs() / (self.config.max_slew_ppm * 1e-6));
        let slew_ppm = phase / slew_time * 1e6;
        self.model.rebase(now_ns, self.freq_ppm + slew_ppm);
        let slew_end_ns = now_ns + (slew_time / NS) as u64;
        self.slew_end_ns = Some(slew_end_ns);
        self.last_update_ns = Some(now_ns);
        self.note_error(now_ns, phase, slope.abs(), unapplied, slew_end_ns);
        DisciplineEvent::Corrected {
            phase_s: phase,
            freq_ppm: self.freq_ppm,
            slew_ppm,
            trimmed,
        }
    }

    /// Kalman filters started at `point`, the rate guessed at the current frequency and known
    /// only within the model's limits.
    fn start_kalman(&self, point: &Point, sigma_s: f64) -> KalmanBank {
        KalmanBank::start(Kalman::start(
            point.mono_ns,
            point.true_ntp_ns,
            sigma_s,
            self.freq_ppm * 1e-6,
            self.config.max_freq_ppm * 1e-6,
            self.config.kalman_wander,
        ))
    }

    /// Records the error bounds of the update just made at `now_ns`: the fit's, plus the
    /// frequency error the clamps left in, the frequency error the fit found (kept for
    /// holdover), and the phase `phase` being slewed away until `slew_end_ns`.
    fn note_error(
        &mut self,
        now_ns: u64,
        phase: f64,
        freq_found: f64,
        unapplied: f64,
        slew_end_ns: u64,
    ) {
        // A fit that held the frequency says nothing new about it: the last bound stands.
        let freq = self.fit_error.slope.unwrap_or(self.error.freq) + unapplied;
        // While the oscillator's error is being learned, the corrections are that error, not
        // the estimate's: they say nothing of how far a learned frequency strays.
        if self.updates > FREQUENCY_LEARNING_UPDATES {
            self.recent_freq_errors.push_back(freq_found + unapplied);
            if self.recent_freq_errors.len() > FREQ_ERROR_MEMORY {
                self.recent_freq_errors.pop_front();
            }
        }
        let worst = self.recent_freq_errors.iter().copied().fold(freq, f64::max);
        self.error = DisciplineError {
            at_ns: now_ns,
            phase_s: self.fit_error.phase_s,
            freq,
            worst_freq: worst,
            slew_phase_s: phase,
            slew_end_ns,
        };
    }

    /// Scores every candidate window by how well its line, fitted before `point` arrived,
    /// predicts it. The windows are judged on the same points, so the point's own noise,
    /// common to all, does not decide between them.
    fn score_windows(&mut self, point: &Point, now_ns: u64) {
        if self.points.len() < MIN_POINTS_FOR_FREQUENCY {
            return;
        }
        let reference = self.estimate_line(now_ns);
        let pts: Vec<Point> = self.points.iter().copied().collect();
        let (x, r) = Self::coordinates(point, &reference, now_ns);
        for (score, &size) in self.window_scores.iter_mut().zip(&WINDOWS) {
            let newest = &pts[pts.len().saturating_sub(size)..];
            let (phase, slope, _, _) = Self::fit_points(newest, &reference, now_ns);
            let error = r - (phase + slope * x);
            *score += (point.weight * error * error - *score) * SCORE_MEMORY;
        }
    }

    /// The longest window whose prediction score is within `SCORE_TOLERANCE` of the best, and
    /// within the configured longest: over a steady oscillator the scores differ by their
    /// noise alone, and the longest averages the most; a lagging line scores clearly worse.
    fn best_window(&self) -> usize {
        let limit = self.config.regression_points.max(MIN_POINTS_FOR_FREQUENCY);
        let allowed = || {
            self.window_scores
                .iter()
                .zip(&WINDOWS)
                .filter(move |(_, &size)| size <= limit)
        };
        let best = allowed().map(|(&s, _)| s).fold(f64::INFINITY, f64::min);
        allowed()
            .filter(|(&s, _)| s <= best * SCORE_TOLERANCE)
            .map(|(_, &size)| size)
            .max()
            .unwrap_or(MIN_POINTS_FOR_FREQUENCY)
    }

    /// Weighted least squares of (time, true − model) over the window plus `extra`: the
    /// phase error at `now_ns` (s), the frequency error (s/s), both against the model as it
    /// will run once the slew in progress ends, and how many of the newest points to keep
    /// (fewer than given when the reference stepped or the frequency moved; the points older
    /// than the window in use stay, for when a longer window predicts better again).
    fn fit(&mut self, extra: Option<Point>, now_ns: u64) -> (f64, f64, usize) {
        let reference = self.estimate_line(now_ns);
        let mut pts: Vec<Point> = self.points.iter().copied().chain(extra).collect();
        // Step detection: the newest points all far on one side of what the older ones
        // predict means the reference moved (every upstream changed its mind at once): the
        // older points describe a time that no longer holds.
        const RECENT: usize = 3;
        if pts.len() >= RECENT + 4 {
            let (older, recent) = pts.split_at(pts.len() - RECENT);
            let (a, b, _, rms) = Self::fit_points(older, &reference, now_ns);
            // A real step, not wander: well outside the scatter, and at least half a ms.
            let bound = (8.0 * rms).max(STEP_DETECTION_MIN_S);
            let residuals: Vec<f64> = recent
                .iter()
                .map(|p| {
                    let (x, r) = Self::coordinates(p, &reference, now_ns);
                    r - (a + b * x)
                })
                .collect();
            if residuals.iter().all(|r| *r > bound) || residuals.iter().all(|r| *r < -bound) {
                pts = recent.to_vec();
            }
        }
        let all = pts.len();
        let window = self.best_window().min(all);
        let mut pts = pts.split_off(all - window);
        self.window = window;
        let (phase, slope, kept) = loop {
            let (intercept, slope, residual_runs, _) = Self::fit_points(&pts, &reference, now_ns);
            // Too few points (just after a step) say nothing reliable about frequency: points
            // seconds apart from different upstreams would turn their small biases into wild
            // slopes. Hold the frequency and take the phase as their mean.
            if pts.len() < MIN_POINTS_FOR_FREQUENCY {
                let (mean, _, _, _) = Self::fit_points_fixed_slope(&pts, &reference, now_ns);
                break (mean, 0.0, pts.len());
            }
            // Runs test (as chrony does): residuals of a model that fits alternate in sign;
            // long runs mean the frequency moved within the window, so drop the oldest points.
            // Once per update: a chance run must not cut the window down to a few noisy
            // points; a real change goes on failing the test at the next updates.
            let n = pts.len();
            if n < window {
                self.window = n;
                break (intercept, slope, n);
            }
            if n <= MIN_POINTS_FOR_FREQUENCY || !too_few_runs(n, residual_runs) {
                break (intercept, slope, all);
            }
            pts.drain(..n / 4);
        };
        self.fit_error = Self::fit_error(&pts, &reference, now_ns, phase, slope);
        (phase, slope, kept)
    }

    /// Bounds on the phase at `now_ns` and the slope of the line (`phase`, `slope`) fitted to
    /// `pts`, from the weighted scatter of the points around it. The points' weights say how
    /// their errors compare; the scatter says how large they are. With fewer points than a
    /// frequency needs, the slope was held and the scatter of so few is no measure: the
    /// points' own stated errors are the least it is taken to be.
    fn fit_error(
        pts: &[Point],
        reference: &ClockModel,
        now_ns: u64,
        phase: f64,
        slope: f64,
    ) -> FitError {
        let xs = Self::weighted_coordinates(pts, reference, now_ns);
        let n = xs.len();
        let sw: f64 = xs.iter().map(|p| p.2).sum();
        if n == 0 || sw <= 0.0 {
            return FitError {
                phase_s: 0.0,
                slope: None,
            };
        }
        let free_slope = n >= MIN_POINTS_FOR_FREQUENCY;
        let dof = n.saturating_sub(if free_slope { 2 } else { 1 }).max(1) as f64;
        let mut scale = xs
            .iter()
            .map(|p| p.2 * (p.1 - (phase + slope * p.0)).powi(2))
            .sum::<f64>()
            / dof;
        if !free_slope {
            scale = scale.max(1.0);
        }
        let mx = xs.iter().map(|p| p.0 * p.2).sum::<f64>() / sw;
        let my = xs.iter().map(|p| p.1 * p.2).sum::<f64>() / sw;
        let sxx: f64 = xs.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
        let mean_bound = SIGMAS * (scale / sw).sqrt();
        if !free_slope || sxx <= 0.0 {
            return FitError {
                phase_s: mean_bound,
                slope: None,
            };
        }
        // The slope served is shrunk towards zero by its significance: what it left out of the
        // least-squares slope is error on top of the standard error.
        let raw_slope = xs
            .iter()
            .map(|p| p.2 * (p.0 - mx) * (p.1 - my))
            .sum::<f64>()
            / sxx;
        let slope_bound = SIGMAS * (scale / sxx).sqrt() + (raw_slope - slope).abs();
        // The phase at now is the weighted mean carried over |mx| seconds by the slope.
        FitError {
            phase_s: mean_bound + mx.abs() * slope_bound,
            slope: Some(slope_bound),
        }
    }

    /// Weighted mean residual of `pts` (the phase with the frequency held).
    fn fit_points_fixed_slope(
        pts: &[Point],
        reference: &ClockModel,
        now_ns: u64,
    ) -> (f64, f64, usize, f64) {
        let sw: f64 = pts.iter().map(|p| p.weight).sum();
        let mean = pts
            .iter()
            .map(|p| Self::coordinates(p, reference, now_ns).1 * p.weight)
            .sum::<f64>()
            / sw.max(f64::MIN_POSITIVE);
        (mean, 0.0, pts.len(), 0.0)
    }

    /// (seconds before `now_ns`, true − reference in s) of a point.
    fn coordinates(p: &Point, reference: &ClockModel, now_ns: u64) -> (f64, f64) {
        let x = (p.mono_ns as i128 - now_ns as i128) as f64 * NS;
        let r = (p.true_ntp_ns as i128 - reference.ntp_at(p.mono_ns) as i128) as f64 * NS;
        (x, r)
    }

    /// Each point's (time, residual against `reference`, weight).
    fn weighted_coordinates(
        pts: &[Point],
        reference: &ClockModel,
        now_ns: u64,
    ) -> Vec<(f64, f64, f64)> {
        pts.iter()
            .map(|p| {
                let (x, r) = Self::coordinates(p, reference, now_ns);
                (x, r, p.weight)
            })
            .collect()
    }

    /// Weighted least squares over `pts`: (phase at now, slope, number of residual sign runs,
    /// RMS residual).
    fn fit_points(pts: &[Point], reference: &ClockModel, now_ns: u64) -> (f64, f64, usize, f64) {
        let xs = Self::weighted_coordinates(pts, reference, now_ns);
        let sw: f64 = xs.iter().map(|p| p.2).sum();
        let mx = xs.iter().map(|p| p.0 * p.2).sum::<f64>() / sw;
        let my = xs.iter().map(|p| p.1 * p.2).sum::<f64>() / sw;
        let sxx: f64 = xs.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
        // Fewer than two points, or all at one instant: no frequency information.
        if xs.len() < 2 || sxx <= 0.0 {
            let latest = xs.last().map_or(0.0, |p| p.1);
            return (latest, 0.0, xs.len(), 0.0);
        }
        let sxy: f64 = xs.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
        let raw_slope = sxy / sxx;
        let intercept_raw = my - raw_slope * mx;
        // Shrink the slope by its significance: slope² / (slope² + se²). A real frequency
        // error (hundreds of ppm at start) passes whole; the noise of a few close points does
        // not steer the rate. se from the weighted residual scatter (n − 2 degrees of freedom).
        let n = xs.len() as f64;
        let mean_w = sw / n;
        let scatter: f64 = xs
            .iter()
            .map(|p| p.2 / mean_w * (p.1 - (intercept_raw + raw_slope * p.0)).powi(2))
            .sum::<f64>()
            / (n - 2.0).max(1.0);
        let se2 = scatter / (sxx / mean_w);
        let slope = if se2 > 0.0 {
            raw_slope * raw_slope * raw_slope / (raw_slope * raw_slope + se2)
        } else {
            raw_slope
        };
        let intercept = my - slope * mx;
        let mut runs = 1;
        let mut last_sign = None;
        let mut sq = 0.0;
        for p in &xs {
            let residual = p.1 - (intercept + slope * p.0);
            sq += residual * residual;
            let sign = residual >= 0.0;
            if last_sign.is_some_and(|s| s != sign) {
                runs += 1;
            }
            last_sign = Some(sign);
        }
        (intercept, slope, runs, (sq / xs.len() as f64).sqrt())
    }
}

/// Whether `runs` sign runs among `n` independent residuals is improbably few: more than two
/// standard deviations below the (n + 1) / 2 expected.
fn too_few_runs(n: usize, runs: usize) -> bool {
    let expected = (n as f64 + 1.0) / 2.0;
    let sd = ((n as f64 - 1.0) / 4.0).sqrt();
    (runs as f64) < expected - 2.0 * sd
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn discipline() -> Discipline {
        discipline_with(Estimator::default())
    }

    fn discipline_with(estimator: Estimator) -> Discipline {
        Discipline::new(
            DisciplineConfig {
                estimator,
                ..Default::default()
            },
            ClockModel::new(10 * S, 3_900_000_000 * S),
        )
    }

    #[test]
    fn segments_are_continuous() {
        let mut m = ClockModel::new(0, 1_000 * S);
        let before = m.ntp_at(5 * S);
        m.rebase(5 * S, 250.0);
        assert_eq!(m.ntp_at(5 * S), before);
        // 250 ppm over 4 s is 1 ms.
        assert!((m.ntp_at(9 * S) - before).abs_diff(4 * S + 1_000_000) <= 2);
    }

    #[test]
    fn first_update_steps_then_never_again() {
        let mut d = discipline();
        assert!(!d.is_synchronized());
        let t = 20 * S;
        let before = d.model.ntp_at(t);
        assert_eq!(
            d.update(t, 3.5, 1e-5),
            DisciplineEvent::Stepped { offset_s: 3.5 }
        );
        assert!(d.is_synchronized());
        assert_eq!(d.model.ntp_at(t), before + 3_500_000_000);
        // A 2 s error afterwards is slewed at the limit, not stepped.
        let t2 = 36 * S;
        let at = d.model.ntp_at(t2);
        match d.update(t2, 2.0, 1e-5) {
            DisciplineEvent::Corrected { slew_ppm, .. } => assert!(slew_ppm.abs() <= 500.0 + 1e-9),
            e => panic!("{e:?}"),
        }
        assert_eq!(d.model.ntp_at(t2), at, "no jump at the update");
    }

    #[test]
    fn errors_above_the_panic_threshold_are_refused() {
        let mut d = discipline();
        d.config.panic_threshold_s = 1.0;
        d.update(20 * S, 0.0, 1e-5);
        let model_before = d.model;
        assert!(matches!(
            d.update(36 * S, 5.0, 1e-5),
            DisciplineEvent::Refused { .. }
        ));
        assert_eq!(d.model, model_before);
    }

    /// Feeds `updates` points 64 s apart with Gaussian noise of `noise_s` from a truth whose
    /// rate against CLOCK_MONOTONIC is `rate_ppm(seconds since start)`; returns the
    /// windows the fits used, update by update.
    fn windows_used(updates: usize, noise_s: f64, rate_ppm: impl Fn(f64) -> f64) -> Vec<usize> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut d = discipline_with(Estimator::Windows);
        let (t0, step) = (10 * S, 64 * S);
        let mut truth = 3_900_000_000.0 * S as f64;
        let mut t = t0;
        let mut used = Vec::new();
        for _ in 0..updates {
            t += step;
            truth += step as f64 * (1.0 + rate_ppm((t - t0) as f64 * NS) * 1e-6);
            d.advance(t);
            let normal = {
                let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(1e-300), rng.gen());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            };
            let offset = (truth - d.model.ntp_at(t) as f64) * NS + noise_s * normal;
            d.update(t, offset, noise_s);
            used.push(d.window());
        }
        used
    }

    /// The phase bound (s) after `updates` points 64 s apart with Gaussian noise of `noise_s`,
    /// each stated as 5 µs, and the served error then (s).
    fn phase_bound_after(updates: usize, noise_s: f64, estimator: Estimator) -> (f64, f64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut d = discipline_with(estimator);
        let mut t = 10 * S;
        for _ in 0..updates {
            t += 64 * S;
            d.advance(t);
            let normal = {
                let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(1e-300), rng.gen());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            };
            let truth = 3_900_000_000 * S + (t - 10 * S);
            let offset = (truth as i128 - d.model.ntp_at(t) as i128) as f64 * NS;
            d.update(t, offset + noise_s * normal, 5e-6);
        }
        let truth = 3_900_000_000 * S + (t - 10 * S);
        let error = (truth as i128 - d.estimate_line(t).ntp_at(t) as i128) as f64 * NS;
        (d.error().phase_s, error.abs())
    }

    #[test]
    fn the_regression_bound_follows_the_measured_scatter() {
        // Points stated as 5 µs each: the bound comes from how much they really scatter.
        let (quiet, _) = phase_bound_after(200, 2e-6, Estimator::Windows);
        let (noisy, _) = phase_bound_after(200, 40e-6, Estimator::Windows);
        assert!(noisy > 8.0 * quiet, "{quiet} vs {noisy}");
        // More points, a tighter phase.
        let (early, _) = phase_bound_after(12, 40e-6, Estimator::Windows);
        assert!(early > noisy, "{early} vs {noisy}");
        // A quiet clock's bound is microseconds, not RFC 5905's milliseconds.
        assert!(quiet < 3e-6, "{quiet}");
    }

    #[test]
    fn the_kalman_bound_covers_points_noisier_than_stated() {
        // Points stated as 5 µs that scatter by 40 µs land far off the prediction: the filter
        // takes it as wander and widens its bound until it covers the error.
        let (quiet, quiet_error) = phase_bound_after(200, 2e-6, Estimator::Kalman);
        let (noisy, noisy_error) = phase_bound_after(200, 40e-6, Estimator::Kalman);
        assert!(
            quiet_error < quiet && noisy_error < noisy,
            "{quiet_error} {noisy_error}"
        );
        assert!(noisy > 3.0 * quiet, "{quiet} vs {noisy}");
        assert!(quiet < 5e-6, "{quiet}");
    }

    #[test]
    fn a_steady_rate_uses_the_longest_window() {
        let used = windows_used(400, 20e-6, |_| 50.0);
        let settled = &used[200..];
        let longest = settled.iter().filter(|&&w| w == 128).count();
        assert!(
            longest * 10 >= settled.len() * 9,
            "the longest window in {longest} of {} updates",
            settled.len()
        );
    }

    #[test]
    fn a_wandering_rate_shortens_the_window() {
        // The rate swings ±0.5 ppm with a two-hour period: a 128-point window (2.3 h) cannot
        // follow it (the runs test and the prediction scores both see that).
        let used = windows_used(400, 20e-6, |t| {
            50.0 + 0.5 * (2.0 * std::f64::consts::PI * t / 7200.0).sin()
        });
        let settled = &used[200..];
        let short = settled.iter().filter(|&&w| w < 64).count();
        assert!(
            short * 2 >= settled.len(),
            "a window under 64 points in only {short} of {} updates",
            settled.len()
        );
    }

    #[test]
    fn learns_a_constant_frequency_error() {
        for estimator in [Estimator::Windows, Estimator::Kalman] {
            learns_a_constant_frequency_error_with(estimator);
        }
    }

    fn learns_a_constant_frequency_error_with(estimator: Estimator) {
        // True time runs 200 ppm fast against CLOCK_MONOTONIC; measurements are exact.
        let mut d = discipline_with(estimator);
        let t0 = 10 * S;
        let truth = |mono: u64| 3_900_000_000 * S + ((mono - t0) as f64 * (1.0 + 200e-6)) as u64;
        let mut t = 20 * S;
        for _ in 0..40 {
            d.advance(t);
            let offset = (truth(t) as i128 - d.model.ntp_at(t) as i128) as f64 * NS;
            d.update(t, offset, 1e-6);
            t += 64 * S;
        }
        assert!(
            (d.frequency_ppm() - 200.0).abs() < 0.01,
            "{estimator:?}: {}",
            d.frequency_ppm()
        );
        d.advance(t);
        let err = (truth(t) as i128 - d.model.ntp_at(t) as i128).abs();
        assert!(err < 1_000, "{estimator:?}: {err} ns");
    }
}
