//! Per-upstream clock filter (RFC 5905 §10): keep the last eight samples, use the one with the
//! least delay (its offset suffers least from queueing), and estimate jitter from the rest.
//!
//! Samples are stored as absolute estimates of true time at a monotonic instant. Offsets are
//! always computed against the *current* clock model, so corrections the model made since a
//! sample was taken never leave stale offsets behind (what chrony does by slewing its samples).

use crate::clock::discipline::ClockModel;

/// Frequency tolerance: dispersion grows 15 µs per second of sample age (RFC 5905 PHI).
pub const PHI: f64 = 15e-6;
/// A sample with at least this much dispersion is worthless (RFC 5905 MAXDISP).
pub const MAXDISP: f64 = 16.0;
const STAGES: usize = 8;

/// One measurement of an upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Monotonic instant the sample describes (midpoint of request and response).
    pub mono_ns: u64,
    /// Estimate of true NTP time at `mono_ns`.
    pub true_ntp_ns: u64,
    /// Round-trip delay (s).
    pub delay: f64,
    /// Dispersion at `mono_ns` (s): precisions and PHI × delay.
    pub dispersion: f64,
    /// Offset against the model as it was when measured: jitter is computed from these, so a
    /// later frequency error cannot make every sample look noisy (RFC 5905 keeps offsets so).
    pub offset_then: f64,
}

impl Sample {
    /// Offset of true time against `model` (s): positive means the model is behind.
    pub fn offset(&self, model: &ClockModel) -> f64 {
        (self.true_ntp_ns as i128 - model.ntp_at(self.mono_ns) as i128) as f64 * 1e-9
    }

    fn dispersion_at(&self, now_ns: u64) -> f64 {
        self.dispersion + PHI * now_ns.saturating_sub(self.mono_ns) as f64 * 1e-9
    }
}

/// The filter's view of one upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeerEstimate {
    /// The chosen (least-delay) sample.
    pub sample: Sample,
    pub offset: f64,
    pub delay: f64,
    /// Peer dispersion (s) at the time of the estimate.
    pub dispersion: f64,
    /// RMS offset difference of the other samples from the chosen one (s).
    pub jitter: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ClockFilter {
    /// Newest first.
    samples: Vec<Sample>,
    /// The chosen sample last handed on: an estimate is only new if its sample is newer.
    last_used_mono: Option<u64>,
}

impl ClockFilter {
    /// Adds a sample; one describing the same instant (the same exchange, measured again
    /// when an interleaved answer brings its server's real transmit time) replaces the
    /// earlier measurement instead of counting twice.
    pub fn add(&mut self, sample: Sample) {
        if let Some(same) = self
            .samples
            .iter_mut()
            .find(|s| s.mono_ns == sample.mono_ns)
        {
            *same = sample;
            return;
        }
        self.samples.insert(0, sample);
        self.samples.truncate(STAGES);
    }

    /// Moves samples taken before `mono_ns` by `step_ns` (a leap second changed the scale).
    pub fn shift_before(&mut self, mono_ns: u64, step_ns: i64) {
        for s in &mut self.samples {
            if s.mono_ns < mono_ns {
                s.true_ntp_ns = s.true_ntp_ns.wrapping_add_signed(step_ns);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The least round-trip delay among the stages (s): the path's baseline, against which a
    /// sample's extra delay bounds its extra error.
    pub fn min_delay(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.delay).min_by(f64::total_cmp)
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The current estimate at `now_ns`, computed against `model`.
    pub fn estimate(
        &self,
        model: &ClockModel,
        now_ns: u64,
        precision: f64,
    ) -> Option<PeerEstimate> {
        let mut sorted: Vec<(Sample, f64)> = self
            .samples
            .iter()
            .map(|s| (*s, s.dispersion_at(now_ns)))
            .filter(|(_, d)| *d < MAXDISP)
            .collect();
        if sorted.is_empty() {
            return None;
        }
        // Least distance first, RFC 5905 style: half the delay plus dispersion aged since the
        // sample. Aging makes a fresh sample beat an old one unless the old one had a clearly
        // shorter path; without it a lucky old sample would block updates for hours.
        let key = |s: &Sample| s.delay / 2.0 + s.dispersion_at(now_ns);
        sorted.sort_by(|a, b| key(&a.0).total_cmp(&key(&b.0)));
        let best = sorted[0].0;
        let best_offset = best.offset(model);
        let mut dispersion = 0.0;
        let mut weight = 0.5;
        for (_, d) in &sorted {
            dispersion += d * weight;
            weight /= 2.0;
        }
        let jitter = if sorted.len() > 1 {
            let sum: f64 = sorted[1..]
                .iter()
                .map(|(s, _)| (s.offset_then - best.offset_then).powi(2))
                .sum();
            (sum / (sorted.len() - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(PeerEstimate {
            sample: best,
            offset: best_offset,
            delay: best.delay,
            dispersion,
            jitter: jitter.max(precision),
        })
    }

    /// The estimate, if its chosen sample has not been handed on before (RFC 5905: a sample is
    /// used at most once, so one lucky low-delay sample does not steer the clock repeatedly).
    pub fn take_new_estimate(
        &mut self,
        model: &ClockModel,
        now_ns: u64,
        precision: f64,
    ) -> Option<PeerEstimate> {
        let est = self.estimate(model, now_ns, precision)?;
        if self.last_used_mono.is_some_and(|m| est.sample.mono_ns <= m) {
            return None;
        }
        self.last_used_mono = Some(est.sample.mono_ns);
        Some(est)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn model() -> ClockModel {
        ClockModel::new(0, 3_900_000_000 * S)
    }

    fn sample(m: &ClockModel, at_s: u64, offset_us: i64, delay_ms: f64) -> Sample {
        let mono = at_s * S;
        Sample {
            mono_ns: mono,
            true_ntp_ns: m.ntp_at(mono).wrapping_add_signed(offset_us * 1000),
            delay: delay_ms * 1e-3,
            dispersion: 1e-6,
            offset_then: offset_us as f64 * 1e-6,
        }
    }

    #[test]
    fn picks_the_least_delay_sample() {
        let m = model();
        let mut f = ClockFilter::default();
        for (i, (off, delay)) in [(500, 9.0), (20, 1.0), (-300, 5.0), (400, 7.0)]
            .iter()
            .enumerate()
        {
            f.add(sample(&m, 16 * i as u64, *off, *delay));
        }
        let e = f.estimate(&m, 64 * S, 1e-7).unwrap();
        assert!((e.offset - 20e-6).abs() < 1e-9);
        assert_eq!(e.delay, 1e-3);
        // Jitter: RMS of 480, -320 and 380 µs from the chosen one.
        let want = ((480f64.powi(2) + 320f64.powi(2) + 380f64.powi(2)) / 3.0).sqrt() * 1e-6;
        assert!((e.jitter - want).abs() < 1e-9, "{} vs {want}", e.jitter);
    }

    #[test]
    fn min_delay_is_the_least_over_the_stages() {
        let m = model();
        let mut f = ClockFilter::default();
        assert_eq!(f.min_delay(), None);
        for (i, delay) in [3.0, 1.5, 2.0].iter().enumerate() {
            f.add(sample(&m, i as u64, 0, *delay));
        }
        assert_eq!(f.min_delay(), Some(1.5e-3));
    }

    #[test]
    fn a_remeasured_exchange_replaces_its_sample() {
        let m = model();
        let mut f = ClockFilter::default();
        f.add(sample(&m, 0, 10, 1.0));
        f.add(sample(&m, 16, 90, 1.2));
        f.add(sample(&m, 16, 50, 1.1));
        assert_eq!(f.len(), 2);
        let e = f.estimate(&m, 17 * S, 1e-7).unwrap();
        // The second instant's offset is the later measurement's: jitter from 10 to 50 µs.
        assert!((e.jitter - 40e-6).abs() < 1e-9, "{}", e.jitter);
    }

    #[test]
    fn a_sample_is_handed_on_once() {
        let m = model();
        let mut f = ClockFilter::default();
        f.add(sample(&m, 0, 10, 1.0));
        assert!(f.take_new_estimate(&m, S, 1e-7).is_some());
        // A worse sample later: the best is still the old one, already used.
        f.add(sample(&m, 16, 90, 4.0));
        assert!(f.take_new_estimate(&m, 17 * S, 1e-7).is_none());
        // A better, newer one is handed on.
        f.add(sample(&m, 32, 15, 0.5));
        assert!(f.take_new_estimate(&m, 33 * S, 1e-7).is_some());
    }

    #[test]
    fn keeps_eight_stages_and_ages_dispersion() {
        let m = model();
        let mut f = ClockFilter::default();
        for i in 0..12 {
            f.add(sample(&m, i, 0, 1.0 + i as f64));
        }
        assert_eq!(f.len(), 8);
        let young = f.estimate(&m, 12 * S, 1e-7).unwrap().dispersion;
        let old = f.estimate(&m, 1012 * S, 1e-7).unwrap().dispersion;
        // PHI × 1000 s, weighted over the stages (sum of weights 1 - 2^-8).
        assert!((old - young - PHI * 1000.0 * (1.0 - 1.0 / 256.0)).abs() < 1e-9);
    }
}
