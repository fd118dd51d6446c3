//! The whole clock core in simulated time: no sockets, no sleeping.
//!
//! The world has true time `t` (ns). The host's CLOCK_MONOTONIC runs at (1 + ε) against it,
//! with ε = ±200 ppm plus a random walk. Upstreams answer with their own small errors across a
//! network with exponential jitter and per-server asymmetric delay; one upstream is a
//! falseticker one second off. The daemon's `System` sees only monotonic readings and packets.

use std::net::SocketAddr;

use ntp_common::packet::NtpHeader;
use ntp_common::time::{ntp_ns_to_timestamp, short_to_ns, NANOS_PER_SEC};
use ntp_common::wire::{LEAP_UNSYNCHRONIZED, MODE_SERVER};
use ntp_common::TimeAnchor;
use ntp_user::clock::discipline::{ClockModel, Estimator};
use ntp_user::clock::system::{System, SystemConfig, SystemEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const S: u64 = NANOS_PER_SEC;
/// True time at the start of the simulation (NTP ns): late 2025.
const EPOCH: u64 = 3_972_000_000 * S;

struct Server {
    addr: SocketAddr,
    /// Server clock − true time (ns).
    clock_error_ns: i64,
    /// Fixed one-way delays (ns): outbound and inbound differ (asymmetry).
    out_ns: f64,
    in_ns: f64,
    answering: bool,
}

struct World {
    rng: StdRng,
    /// True time since the start (ns).
    t: u64,
    /// CLOCK_MONOTONIC now (ns), as f64 to integrate the rate exactly.
    mono: f64,
    /// Oscillator error (fraction) and its random-walk step per √s.
    epsilon: f64,
    wander_per_sqrt_s: f64,
    jitter_mean_ns: f64,
    servers: Vec<Server>,
    system: System,
    /// The last anchor as the responder serves it (held up if needed), and as the model gave it.
    last_anchor: Option<TimeAnchor>,
    last_raw: Option<TimeAnchor>,
    events: Vec<SystemEvent>,
    /// Served-time errors observed at publish instants after `measure_from` (ns).
    errors: Vec<f64>,
    measure_from: u64,
    backwards: u64,
    /// True NTP time at the start (ns since 1900).
    epoch: u64,
    /// A leap second inserted at this NTP time (pre-leap scale), announced by the servers
    /// from the start.
    leap_at: Option<u64>,
    /// Publications whose model had to be held up by the responder's monotonic floor by more
    /// than a millisecond (the model itself went back).
    big_holds: u64,
    /// Every publication: (true time since start, served time at that instant, LI).
    served: Vec<(u64, u64, u8)>,
    /// The served error bound against the served error, at both ends of every anchor's
    /// serving interval after `measure_from` (both are straight lines in between).
    bounds: Vec<BoundSample>,
    /// The bound is checked against the smeared timescale of this leap (what a smearing
    /// server promises), not against UTC.
    smeared: Option<ntp_user::clock::leap::Leap>,
}

/// One served instant: served − true time, the bound a reply then states (root delay / 2 +
/// root dispersion), and the part of it this server adds to its upstreams' dispersion (ns).
#[derive(Clone, Copy, Debug)]
struct BoundSample {
    error: f64,
    bound: f64,
    added: f64,
    /// The error the paths' asymmetry causes, which no client can see (ns).
    bias: f64,
}

/// The root dispersion the simulated upstreams state (short format) and their precision.
const SERVER_ROOT_DISPERSION_SHORT: u32 = 10;
const SERVER_PRECISION: i8 = -23;

impl World {
    fn new(
        seed: u64,
        epsilon_ppm: f64,
        falseticker: bool,
        config: SystemConfig,
        initial_error_ns: i64,
    ) -> World {
        World::new_at(
            EPOCH,
            seed,
            epsilon_ppm,
            falseticker,
            config,
            initial_error_ns,
        )
    }

    fn new_at(
        epoch: u64,
        seed: u64,
        epsilon_ppm: f64,
        falseticker: bool,
        config: SystemConfig,
        initial_error_ns: i64,
    ) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut servers = Vec::new();
        for i in 0..4 {
            let base = 200_000.0 + 100_000.0 * i as f64;
            let asym = rng.gen_range(-20_000.0..20_000.0);
            servers.push(Server {
                addr: format!("169.254.1.{}:123", i + 1).parse().unwrap(),
                clock_error_ns: rng.gen_range(-2_000..2_000),
                out_ns: base + asym / 2.0,
                in_ns: base - asym / 2.0,
                answering: true,
            });
        }
        if falseticker {
            servers.push(Server {
                addr: "169.254.1.99:123".parse().unwrap(),
                clock_error_ns: S as i64,
                out_ns: 250_000.0,
                in_ns: 250_000.0,
                answering: true,
            });
        }
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let mono0 = 1_000 * S;
        // The daemon's first guess is the host clock, which may be far off.
        let initial = ClockModel::new(mono0, epoch.wrapping_add_signed(initial_error_ns));
        World {
            rng,
            t: 0,
            mono: mono0 as f64,
            epsilon: epsilon_ppm * 1e-6,
            wander_per_sqrt_s: 0.0,
            jitter_mean_ns: 50_000.0,
            servers,
            system: System::new(config, &addrs, initial, mono0),
            last_anchor: None,
            last_raw: None,
            events: Vec::new(),
            errors: Vec::new(),
            measure_from: u64::MAX,
            backwards: 0,
            epoch,
            leap_at: None,
            big_holds: 0,
            served: Vec::new(),
            bounds: Vec::new(),
            smeared: None,
        }
    }

    /// True NTP time (UTC) at `t`: after an inserted leap, one second less.
    fn true_ntp(&self, t: u64) -> u64 {
        utc(self.epoch + t, self.leap_at)
    }

    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.rng.gen::<f64>()).ln()
    }

    /// Advances true time by `dt_ns`, integrating the oscillator.
    fn advance(&mut self, dt_ns: u64) {
        self.mono += dt_ns as f64 * (1.0 + self.epsilon);
        self.t += dt_ns;
        if self.wander_per_sqrt_s > 0.0 {
            let (u1, u2): (f64, f64) = (self.rng.gen::<f64>().max(1e-300), self.rng.gen());
            let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            self.epsilon += normal * self.wander_per_sqrt_s * (dt_ns as f64 * 1e-9).sqrt();
        }
    }

    fn mono_now(&self) -> u64 {
        self.mono as u64
    }

    /// True time until the monotonic clock reads `mono`.
    fn until_mono(&self, mono: u64) -> u64 {
        ((mono as f64 - self.mono).max(0.0) / (1.0 + self.epsilon)).ceil() as u64
    }

    /// The time the bound is stated against at `t`: UTC, or the smeared timescale.
    fn bound_truth(&self, t: u64) -> f64 {
        match self.smeared {
            Some(l) => {
                let u = self.epoch + t;
                u as f64 - l.smear_ns(u) as f64
            }
            None => self.true_ntp(t) as f64,
        }
    }

    /// Records what `anchor` serves at monotonic `mono` against the truth.
    fn check_bound(&mut self, anchor: &TimeAnchor, mono: u64) {
        if self.t < self.measure_from || !anchor.is_synchronized_at(mono) {
            return;
        }
        // An anchor still warning of an inserted leap after its instant is the one published
        // before it, served during the microsecond until the daemon's wakeup takes the leap:
        // a guest told LI=1 inserts the second itself.
        if anchor.leap == 1 && self.leap_at.is_some_and(|l| self.epoch + self.t >= l) {
            return;
        }
        let error = anchor.ntp_ns_at(mono) as f64 - self.bound_truth(self.t);
        let dispersion = anchor.root_dispersion_at(mono) as f64;
        let upstream = short_to_ns(SERVER_ROOT_DISPERSION_SHORT) as f64
            + 2f64.powi(SERVER_PRECISION as i32) * 1e9;
        self.bounds.push(BoundSample {
            error,
            bound: anchor.root_delay_ns as f64 / 2.0 + dispersion,
            added: dispersion - upstream,
            bias: self.asymmetry_bias_ns(),
        });
    }

    fn publish(&mut self) {
        let now = self.mono_now();
        // The end of the last anchor's serving interval.
        if let Some(prev) = self.last_anchor {
            self.check_bound(&prev, now);
        }
        let (mut anchor, events) = self.system.anchor(now);
        self.events.extend(events);
        if let Some(raw) = self.last_raw.replace(anchor) {
            // The model's own line must not start below its last one beyond rounding: the
            // rate field's half unit (2^-33) over a 16 s publication interval is 2 ns, and
            // the smear's own division as much again. The responder's floor absorbs those.
            let prev = raw;
            if prev.leap != LEAP_UNSYNCHRONIZED
                && anchor.ntp_ns + 4 < prev.ntp_ns_at(anchor.mono_ns)
            {
                self.backwards += 1;
                if std::env::var("NTPX_DEBUG").is_ok() {
                    let at = self.leap_at.map_or(0, |l| l as i128 - self.epoch as i128);
                    eprintln!(
                        "back by {} ns at t = {} s from the leap",
                        prev.ntp_ns_at(anchor.mono_ns) - anchor.ntp_ns,
                        (self.t as i128 - at) as f64 * 1e-9
                    );
                }
            }
        }
        if let Some(prev) = self.last_anchor {
            // What the responder does at every publication (Responder::publish_anchor).
            if prev.is_published() && prev.leap != LEAP_UNSYNCHRONIZED {
                let held = ntp_common::anchor::hold_monotonic(&prev, &mut anchor);
                if held > 1_000_000 {
                    self.big_holds += 1;
                    if std::env::var("NTPX_DEBUG").is_ok() {
                        let at = self.leap_at.map_or(0, |l| l as i128 - self.epoch as i128);
                        eprintln!(
                            "held {held} ns at t = {} s from the leap",
                            (self.t as i128 - at) as f64 * 1e-9
                        );
                    }
                }
            }
        }
        self.served
            .push((self.t, anchor.ntp_ns_at(now), anchor.leap));
        self.check_bound(&anchor, now);
        if self.t >= self.measure_from && anchor.leap != LEAP_UNSYNCHRONIZED {
            let err = anchor.ntp_ns_at(now) as i128 - self.true_ntp(self.t) as i128;
            self.errors.push(err as f64);
        }
        self.last_anchor = Some(anchor);
    }

    /// Runs until true time `until` (ns since start), publishing every `publish_every`.
    fn run(&mut self, until: u64, publish_every: u64) {
        let mut next_publish = self.t;
        while self.t < until {
            let next_poll = self
                .system
                .next_wakeup_ns()
                .map(|m| self.t + self.until_mono(m))
                .unwrap_or(u64::MAX);
            let next = next_poll.min(next_publish).min(until).max(self.t);
            self.advance(next - self.t);
            // Publish on schedule and at every wakeup (slew ends change the model's rate).
            self.publish();
            if self.t >= next_publish {
                next_publish = self.t + publish_every;
            }
            let now = self.mono_now();
            let mut cookie_rng = StdRng::seed_from_u64(self.t);
            let requests = self.system.due_requests(now, || cookie_rng.gen());
            let mut replies = Vec::new();
            for req in requests {
                if let Some(r) = self.answer(req.id, &req.packet) {
                    replies.push(r);
                }
            }
            // Deliver in arrival order, time moving on to each arrival; as the daemon does,
            // republish right after every reply (it may have changed the model).
            replies.sort_by_key(|r| r.0);
            for (t_recv, id, bytes) in replies {
                self.advance(t_recv - self.t);
                let ev = self.system.on_response(id, &bytes, self.mono_now());
                self.events.extend(ev);
                self.publish();
            }
        }
    }

    /// The server's answer to a request sent now: (true arrival time, upstream, bytes).
    fn answer(&mut self, id: usize, req: &[u8]) -> Option<(u64, usize, Vec<u8>)> {
        let (answering, out, inb, err) = {
            let s = &self.servers[id];
            (s.answering, s.out_ns, s.in_ns, s.clock_error_ns)
        };
        if !answering {
            return None;
        }
        let r = NtpHeader::parse(req).unwrap();
        let jitter = self.jitter_mean_ns;
        let t_arrive = self.t + (out + self.exp(jitter)) as u64;
        let t_leave = t_arrive + 15_000;
        let t_back = t_leave + (inb + self.exp(jitter)) as u64;
        let (epoch, leap_at) = (self.epoch, self.leap_at);
        let server_time = |t: u64| utc(epoch + t, leap_at).wrapping_add_signed(err);
        // Servers announce the leap until it has happened on their clocks.
        let announcing = leap_at.is_some_and(|l| epoch + t_arrive < l);
        let h = NtpHeader {
            version: 4,
            mode: MODE_SERVER,
            stratum: 1,
            poll: r.poll,
            precision: SERVER_PRECISION,
            refid: *b"GPS\0",
            root_delay: 0,
            root_dispersion: SERVER_ROOT_DISPERSION_SHORT,
            reference_ts: ntp_ns_to_timestamp(server_time(t_arrive) - S),
            origin_ts: r.transmit_ts,
            receive_ts: ntp_ns_to_timestamp(server_time(t_arrive)),
            transmit_ts: ntp_ns_to_timestamp(server_time(t_leave)),
            leap: announcing as u8,
        };
        Some((t_back, id, h.serialize().to_vec()))
    }

    /// The publications that claimed synchronization: (true time, served time, LI).
    fn synchronized_publications(&self) -> Vec<&(u64, u64, u8)> {
        self.served
            .iter()
            .filter(|(_, _, li)| *li != LEAP_UNSYNCHRONIZED)
            .collect()
    }

    fn stats(&self) -> (f64, f64) {
        let n = self.errors.len() as f64;
        let mean = self.errors.iter().sum::<f64>() / n;
        let max = self.errors.iter().fold(0f64, |m, e| m.max(e.abs()));
        (mean, max)
    }

    /// True rate of time against CLOCK_MONOTONIC, in ppm: what the model should learn.
    fn true_freq_ppm(&self) -> f64 {
        (1.0 / (1.0 + self.epsilon) - 1.0) * 1e6
    }

    /// The error the asymmetric paths of the good servers cause, averaged (ns): no NTP client
    /// can see it, so bounds are stated around it.
    fn asymmetry_bias_ns(&self) -> f64 {
        let good: Vec<&Server> = self
            .servers
            .iter()
            .filter(|s| s.clock_error_ns.abs() < 1_000_000)
            .collect();
        good.iter()
            .map(|s| s.clock_error_ns as f64 + (s.out_ns - s.in_ns) / 2.0)
            .sum::<f64>()
            / good.len() as f64
    }
}

const HOUR: u64 = 3600 * S;

/// UTC on the NTP scale for unleaped time `u`: an inserted leap at `leap_at` repeats a second.
fn utc(u: u64, leap_at: Option<u64>) -> u64 {
    match leap_at {
        Some(l) if u >= l => u - S,
        _ => u,
    }
}

fn converge_and_measure(seed: u64, epsilon_ppm: f64, wander: f64) -> World {
    converge_and_measure_with(seed, epsilon_ppm, wander, Setup::default())
}

fn converge_and_measure_with(seed: u64, epsilon_ppm: f64, wander: f64, setup: Setup) -> World {
    let mut w = World::new(seed, epsilon_ppm, true, config_with(setup), 0);
    w.wander_per_sqrt_s = wander;
    w.run(4 * HOUR, 16 * S);
    w.measure_from = w.t;
    w.run(10 * HOUR, 16 * S);
    w
}

/// Bound on |served − true| after convergence, around the asymmetry bias no client can see.
///
/// Per-direction jitter is exponential with a 50 µs mean, so one sample's offset error has a
/// standard deviation near 35 µs. Each sample enters the discipline's regression weighted by
/// the delay it waited beyond its path's least (its offset can be off by up to half that
/// excess), so straight-through samples steer and queued ones barely count. Over a steady
/// oscillator the window that predicts the next points best is the longest (up to 128 points
/// from four upstreams, hours at 1024 s polls): the phase at its end is good to about
/// 2σ/√n_eff. The maximum over some 1500 publications adds the tail, and the servers' own
/// clocks (±2 µs) and differing path asymmetries (±10 µs, weighted unevenly) add the rest.
/// Measured over seeds 1–32: 3.2 to 16.9 µs, median 8.5 µs (the Kalman filters: 2.4 to 12.4
/// µs, median 6.5 µs). The aim: 20 µs on every seed.
const OFFSET_BOUND_NS: f64 = 20_000.0;

/// With the oscillator's rate wandering (random walk of 3e-10/√s, about 0.02 ppm per hour,
/// typical of an uncompensated quartz) a long window's line lags the rate: over a window of T
/// seconds the walk bends the phase by about 3e-10 · T^1.5 / √3, 16 µs at T = 2000 s and 100
/// µs at 2 h. The discipline sees it as long windows predicting the next points worse, uses a
/// shorter one, and polls faster so that a short window still holds enough points; what is
/// left is the noise of the short window plus the lag within it, with the maximum over six
/// hours on top. Measured over seeds 1–32: 38 to 105 µs, median 66 µs (the Kalman filters:
/// 13.8 to 52.4 µs, median 26 µs).
const WANDER_OFFSET_BOUND_NS: f64 = 130_000.0;

/// The seeds the convergence tests run (each is ten simulated hours, milliseconds to run), or
/// the one in NTPX_SEED.
fn seeds() -> Vec<u64> {
    match std::env::var("NTPX_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => (1..=32).collect(),
    }
}

fn check_converged(w: &World, label: &str) {
    check_converged_within(w, label, OFFSET_BOUND_NS)
}

fn check_converged_within(w: &World, label: &str, bound_ns: f64) {
    if std::env::var("NTPX_DEBUG").is_ok() {
        for e in &w.events {
            if !matches!(
                e,
                SystemEvent::Corrected { .. } | SystemEvent::Falseticker { .. }
            ) {
                eprintln!("{label}: {e:?}");
            }
        }
    }
    let (mean, max) = w.stats();
    let bias = w.asymmetry_bias_ns();
    let worst = w.errors.iter().fold(0f64, |m, e| m.max((e - bias).abs()));
    let freq_err = w.system.frequency_ppm() - w.true_freq_ppm();
    eprintln!(
        "{label}: {} samples, mean error {:.1} µs, max |error| {:.1} µs, max |error - bias| {:.1} µs \
         (bias {:.1} µs), frequency error {:.4} ppm, poll limit {}",
        w.errors.len(),
        mean / 1e3,
        max / 1e3,
        worst / 1e3,
        bias / 1e3,
        freq_err,
        w.system.poll_limit()
    );
    assert!(w.errors.len() > 1000, "{label}: too few measurements");
    assert!(worst < bound_ns, "{label}: max |error - bias| {worst} ns");
    assert!(
        freq_err.abs() < 0.1,
        "{label}: frequency error {freq_err} ppm"
    );
    assert_eq!(w.backwards, 0, "{label}: published time went backwards");
    let false_addr: SocketAddr = "169.254.1.99:123".parse().unwrap();
    // Before the others answer, the falseticker may be the only candidate (the first reply
    // to arrive). The one step waits for a full iburst, by which time the others have
    // answered and outvote it: the step was not its second, and from then on it is never
    // selected.
    let first_step = w
        .events
        .iter()
        .position(|e| matches!(e, SystemEvent::Stepped { .. }))
        .expect("a first synchronization");
    assert!(
        matches!(w.events[first_step], SystemEvent::Stepped { offset_s } if offset_s.abs() < 0.01),
        "{label}: the first step followed the falseticker: {:?}",
        w.events[first_step]
    );
    assert!(
        !w.events[first_step..].iter().any(
            |e| matches!(e, SystemEvent::SystemPeerChanged { upstream } if *upstream == false_addr)
        ),
        "{label}: the falseticker was selected"
    );
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, SystemEvent::Falseticker { upstream } if *upstream == false_addr)),
        "{label}: the falseticker was never recognised"
    );
    let peer = w.system.system_peer().expect("a system peer");
    assert_ne!(w.system.upstream_addr(peer), Some(false_addr));
}

#[test]
fn converges_with_a_fast_oscillator() {
    for seed in seeds() {
        let w = converge_and_measure(seed, 200.0, 0.0);
        check_converged(&w, &format!("+200 ppm, seed {seed}"));
    }
}

#[test]
fn converges_with_a_slow_wandering_oscillator() {
    // Random walk: about 0.02 ppm per hour of drift in the oscillator's rate.
    for seed in seeds() {
        let w = converge_and_measure(seed, -200.0, 3e-10);
        check_converged_within(
            &w,
            &format!("-200 ppm with wander, seed {seed}"),
            WANDER_OFFSET_BOUND_NS,
        );
    }
}

#[test]
fn tracks_the_extremes_of_oscillator_error() {
    for (seed, ppm) in [(3, 500.0), (4, -500.0)] {
        let w = converge_and_measure(seed, ppm, 0.0);
        check_converged(&w, &format!("{ppm} ppm"));
    }
}

#[test]
fn holdover_drifts_slowly_then_reports_unsynchronized() {
    let config = SystemConfig {
        max_holdover_ns: 4 * HOUR,
        ..SystemConfig::default()
    };
    let mut w = World::new(5, 200.0, false, config, 0);
    w.wander_per_sqrt_s = 3e-10;
    w.run(4 * HOUR, 16 * S);
    for s in &mut w.servers {
        s.answering = false;
    }
    w.measure_from = w.t;
    w.run(5 * HOUR, 16 * S);
    // One hour of holdover: the error comes from the frequency estimate and the wander alone.
    // Bound: the random walk's phase after T = 3600 s has σ = 3e-10 · T^1.5 / √3 ≈ 37 µs
    // (≈ 110 µs at 3σ); a frequency error of up to 0.03 ppm when holdover starts adds 108 µs;
    // the phase error it started with adds up to 20 µs (the converged bound).
    let (_, max) = w.stats();
    eprintln!("after 1 h of holdover: max |error| {:.1} µs", max / 1e3);
    assert!(max < 300_000.0, "holdover drift {max} ns in one hour");
    assert!(w.last_anchor.unwrap().leap != LEAP_UNSYNCHRONIZED);
    // The bound grows by the worst frequency error seen and the wander allowance (0.1 ppm/h:
    // 180 µs over the hour), not by RFC 5905's 15 ppm (54 ms).
    let a = w.last_anchor.unwrap();
    let dispersion = a.root_dispersion_at(w.mono_now()) as f64;
    assert!(
        dispersion > 180_000.0 && dispersion < 5_000_000.0,
        "root dispersion after 1 h of holdover: {dispersion} ns"
    );
    // Reachability empties after eight unanswered polls (polling speeds up as they fail).
    w.run(7 * HOUR, 16 * S);
    assert!(w.events.contains(&SystemEvent::HoldoverEntered));
    // Past the maximum holdover, the clock says it is unsynchronized.
    w.run(8 * HOUR + 60 * S, 16 * S);
    assert!(w.events.contains(&SystemEvent::HoldoverExpired));
    assert_eq!(w.last_anchor.unwrap().leap, LEAP_UNSYNCHRONIZED);
    assert_eq!(w.backwards, 0);
}

#[test]
fn a_wrong_host_clock_never_reaches_the_served_time() {
    // The daemon starts from a host clock an hour fast (an operator's `date -s`): the first
    // synchronization steps the model once; from then on, served time is the upstreams'.
    let mut w = World::new(6, 150.0, false, SystemConfig::default(), 3600 * S as i64);
    w.run(2 * HOUR, 16 * S);
    let steps = w
        .events
        .iter()
        .filter(|e| matches!(e, SystemEvent::Stepped { .. }))
        .count();
    assert_eq!(steps, 1, "exactly one step, at the first synchronization");
    w.measure_from = w.t;
    w.run(4 * HOUR, 16 * S);
    let (_, max) = w.stats();
    assert!(max < 50_000.0, "served time is off by {max} ns");
    // The model never reads the host clock again: it has no input for it. A host clock
    // stepped now would change nothing; what the System consumes is listed in its API.
}

#[test]
fn large_offsets_after_sync_are_slewed_at_the_limit_or_refused() {
    let mut w = World::new(7, 0.0, false, SystemConfig::default(), 0);
    w.run(HOUR, 16 * S);
    // Every upstream jumps 50 ms: slewed at ≤ 500 ppm, so it takes ≥ 100 s, and never jumps.
    for s in &mut w.servers {
        s.clock_error_ns += 50_000_000;
    }
    let mut prev: Option<(u64, u64)> = None;
    let start = w.t;
    let mut max_rate: f64 = 0.0;
    while w.t < start + 3 * HOUR {
        let until = w.t + 4 * S;
        w.run(until, 4 * S);
        let a = w.last_anchor.unwrap();
        let served = a.ntp_ns_at(w.mono_now());
        if let Some((t0, s0)) = prev {
            let rate = (served - s0) as f64 / (w.t - t0) as f64 - 1.0;
            max_rate = max_rate.max(rate.abs());
        }
        prev = Some((w.t, served));
    }
    eprintln!(
        "max served rate deviation while slewing 50 ms: {:.1} ppm",
        max_rate * 1e6
    );
    // The phase slews at ≤ 500 ppm; while the step is being recognised the frequency may be
    // nudged by up to a quarter of that.
    assert!(
        max_rate < 625e-6,
        "served rate off by {:.1} ppm, above 500 + 125",
        max_rate * 1e6
    );
    let (_, _) = (w.stats(), ());
    let err = w.last_anchor.unwrap().ntp_ns_at(w.mono_now()) as i128
        - (w.true_ntp(w.t) as i128 + 50_000_000);
    assert!(
        err.abs() < 100_000,
        "did not converge on the new time: {err} ns"
    );

    // Above the panic threshold: refused.
    let config = SystemConfig {
        discipline: ntp_user::clock::discipline::DisciplineConfig {
            panic_threshold_s: 10.0,
            ..Default::default()
        },
        ..SystemConfig::default()
    };
    let mut w = World::new(8, 0.0, false, config, 0);
    w.run(HOUR, 16 * S);
    for s in &mut w.servers {
        s.clock_error_ns += 100 * S as i64;
    }
    // The jump first shows as enormous filter jitter (upstreams unusable); once the old
    // samples have aged out of the filters, the 100 s offset reaches the discipline.
    w.run(6 * HOUR, 16 * S);
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, SystemEvent::StepRefused { .. })));
    let err = w.last_anchor.unwrap().ntp_ns_at(w.mono_now()) as i128 - w.true_ntp(w.t) as i128;
    assert!(
        err.abs() < 1_000_000,
        "a refused offset moved the clock by {err} ns"
    );
}

/// A leap at the end of the month that contains EPOCH, and a world that starts `before` it.
fn leap_world(before: u64, smear: bool) -> (World, u64) {
    leap_world_seeded(7, before, smear)
}

fn leap_world_seeded(seed: u64, before: u64, smear: bool) -> (World, u64) {
    leap_world_with(seed, before, smear, Setup::default())
}

fn leap_world_with(seed: u64, before: u64, smear: bool, setup: Setup) -> (World, u64) {
    let leap = ntp_user::clock::leap::end_of_month_ntp_ns(EPOCH);
    let config = SystemConfig {
        leap_smear: smear,
        ..config_with(setup)
    };
    let mut w = World::new_at(leap - before, seed, 200.0, true, config, 0);
    w.leap_at = Some(leap);
    (w, leap)
}

#[test]
fn an_announced_leap_second_is_passed_on_then_taken_without_going_back() {
    let (mut w, leap) = leap_world(4 * HOUR, false);
    let at = leap - w.epoch;
    w.run(at + 2 * HOUR, 16 * S);
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, SystemEvent::LeapScheduled(l) if l.insert && l.at_ntp_ns == leap)));
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, SystemEvent::LeapApplied(_))));
    let synced = w.synchronized_publications();
    // Before the leap, once synchronized, replies warn of it (LI=1); after it, never.
    let warned = synced
        .iter()
        .filter(|(t, _, li)| *t + 60 * S < at && *li == 1)
        .count();
    let unwarned = synced
        .iter()
        .filter(|(t, _, li)| *t + 60 * S < at && *li != 1)
        .count();
    assert!(
        warned > 100 && unwarned < 5,
        "LI=1 in {warned}, not in {unwarned} before the leap"
    );
    assert!(synced
        .iter()
        .filter(|(t, _, _)| *t > at)
        .all(|(_, _, li)| *li == 0));
    // The model itself takes the leap without going back: the responder's floor only ever
    // absorbs rounding, and served time never decreases.
    assert_eq!(w.big_holds, 0, "the leap was left to the responder's floor");
    assert_eq!(w.backwards, 0);
    let mut last = 0;
    for (t, served, _) in &synced {
        assert!(*served >= last, "served time went back at t = {t}");
        last = *served;
    }
    // During the second that repeats, served time runs ahead of UTC by at most that second;
    // about two seconds later (half speed) it is back on UTC.
    let bias = w.asymmetry_bias_ns();
    for (t, served, _) in &synced {
        let err = *served as f64 - w.true_ntp(*t) as f64 - bias;
        if *t >= at && *t < at + 3 * S {
            assert!(
                (-1e5..=1.0001e9).contains(&err),
                "t = leap + {} ns: error {err}",
                t - at
            );
        } else if *t >= at + 3 * S && *t < at + 2 * HOUR {
            assert!(
                err.abs() < OFFSET_BOUND_NS * 2.0,
                "t = leap + {} s: error {err}",
                (t - at) / S
            );
        }
    }
    let held: Vec<_> = synced
        .iter()
        .filter(|(t, _, _)| *t >= at && *t < at + 3 * S)
        .collect();
    assert!(!held.is_empty(), "no publication during the hold");
}

#[test]
fn a_smeared_leap_is_never_announced_and_follows_the_ramp() {
    let (mut w, leap) = leap_world(14 * HOUR, true);
    let at = leap - w.epoch;
    w.run(at + 14 * HOUR, 16 * S);
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, SystemEvent::LeapApplied(_))));
    let synced = w.synchronized_publications();
    assert!(synced.len() > 1000);
    // A smeared leap is never announced: clients would apply it twice.
    assert!(
        synced.iter().all(|(_, _, li)| *li == 0),
        "LI set while smearing"
    );
    assert_eq!(w.big_holds, 0);
    assert_eq!(w.backwards, 0);
    let bias = w.asymmetry_bias_ns();
    let l = ntp_user::clock::leap::Leap {
        insert: true,
        at_ntp_ns: leap,
    };
    let mut worst: f64 = 0.0;
    for (t, served, _) in &synced {
        // Converged (after the first two hours): served = u − smear(u), u = unleaped time.
        if *t < 2 * HOUR {
            continue;
        }
        let u = w.epoch + t;
        let want = u as f64 - l.smear_ns(u) as f64;
        let err = *served as f64 - want - bias;
        worst = worst.max(err.abs());
    }
    // The ramp is 11.6 ppm for a day: the loop follows a rate step as well as it tracks its
    // oscillator, so the error stays near the convergence bound.
    assert!(
        worst < OFFSET_BOUND_NS * 2.0,
        "max |served - smeared UTC| {worst} ns"
    );
    // Halfway through the window half the second is smeared in; after it, plain UTC.
    let (_, at_leap, _) = synced
        .iter()
        .min_by_key(|(t, _, _)| t.abs_diff(at))
        .unwrap();
    let half = *at_leap as f64 - (leap as f64 - 0.5e9);
    assert!(
        half.abs() < 1e6,
        "at the leap, served is {half} ns from the ramp's midpoint"
    );
    let (t_end, end, _) = synced.last().unwrap();
    assert!((*end as f64 - w.true_ntp(*t_end) as f64 - bias).abs() < OFFSET_BOUND_NS * 2.0);
}

/// The bound's figures for one case over all seeds: violations (|error| above the bound) and
/// the median added dispersion against the median |error|.
struct BoundReport {
    samples: usize,
    violations: usize,
    worst_excess_ns: f64,
    median_error_ns: f64,
    median_added_ns: f64,
    median_bound_ns: f64,
    /// Instants where the added dispersion alone was below |error − asymmetry bias|: how
    /// often the clock's own estimate missed its own error (the root delay covers the rest).
    own_misses: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bound_report(samples: &[BoundSample]) -> BoundReport {
    let violations: Vec<&BoundSample> =
        samples.iter().filter(|b| b.error.abs() > b.bound).collect();
    BoundReport {
        samples: samples.len(),
        violations: violations.len(),
        worst_excess_ns: violations
            .iter()
            .map(|b| b.error.abs() - b.bound)
            .fold(0.0, f64::max),
        median_error_ns: median(samples.iter().map(|b| b.error.abs()).collect()),
        median_added_ns: median(samples.iter().map(|b| b.added).collect()),
        median_bound_ns: median(samples.iter().map(|b| b.bound).collect()),
        own_misses: samples
            .iter()
            .filter(|b| (b.error - b.bias).abs() > b.added)
            .count(),
    }
}

/// Runs `case` on every seed, prints its figures and checks that the bound always held.
fn check_bound_case(label: &str, case: impl Fn(u64) -> World) -> BoundReport {
    let r = bound_case_report(label, case);
    eprintln!(
        "bound, {label}: {} instants, {} violations, median |error| {:.2} µs, median added \
         dispersion {:.2} µs (ratio {:.1}), median bound {:.1} µs; added dispersion below \
         |error - asymmetry bias| at {} instants",
        r.samples,
        r.violations,
        r.median_error_ns / 1e3,
        r.median_added_ns / 1e3,
        r.median_added_ns / r.median_error_ns,
        r.median_bound_ns / 1e3,
        r.own_misses,
    );
    assert_eq!(r.violations, 0, "{label}: the bound was below the error");
    r
}

/// `case`'s figures over every seed, with the seeds whose bound did not hold named.
fn bound_case_report(label: &str, mut case: impl FnMut(u64) -> World) -> BoundReport {
    let mut all = Vec::new();
    for seed in seeds() {
        let w = case(seed);
        assert!(
            w.bounds.len() > 100,
            "{label}, seed {seed}: too few served instants ({})",
            w.bounds.len()
        );
        let r = bound_report(&w.bounds);
        if r.violations > 0 {
            eprintln!(
                "{label}, seed {seed}: the bound was below the error at {} of {} instants \
                 (worst by {:.1} µs)",
                r.violations,
                r.samples,
                r.worst_excess_ns / 1e3
            );
        }
        all.extend(w.bounds);
    }
    bound_report(&all)
}

/// What the cases vary in the comparison of the estimators: the estimator, and a poll
/// exponent fixed for every upstream (so that both see the same samples) or left to adapt.
#[derive(Clone, Copy, Debug, Default)]
struct Setup {
    estimator: Estimator,
    fixed_poll: Option<i8>,
}

/// The configuration every case runs with, but for the setup's.
fn config_with(setup: Setup) -> SystemConfig {
    let mut config = SystemConfig::default();
    config.discipline.estimator = setup.estimator;
    if let Some(poll) = setup.fixed_poll {
        config.poll.min_poll = poll;
        config.poll.max_poll = poll;
    }
    config
}

/// A world converged for three hours, measured for the next two.
fn converged_world(
    seed: u64,
    falseticker: bool,
    setup: Setup,
    prepare: impl FnOnce(&mut World),
) -> World {
    let mut w = World::new(seed, 200.0, falseticker, config_with(setup), 0);
    prepare(&mut w);
    w.run(3 * HOUR, 16 * S);
    w.measure_from = w.t;
    w
}

fn steady_case(seed: u64, setup: Setup) -> World {
    let mut w = converged_world(seed, false, setup, |_| {});
    w.run(5 * HOUR, 16 * S);
    w
}

fn falseticker_case(seed: u64, setup: Setup) -> World {
    let mut w = converged_world(seed, true, setup, |_| {});
    w.run(5 * HOUR, 16 * S);
    w
}

fn upstream_step_case(seed: u64, setup: Setup) -> World {
    let mut w = converged_world(seed, false, setup, |_| {});
    w.servers[(seed % 4) as usize].clock_error_ns += 10_000_000;
    w.run(5 * HOUR, 16 * S);
    w
}

/// Every path 150 µs slower outbound than back: a 75 µs error no client can see, which only
/// the paths' root delay / 2 can cover.
fn asymmetric_case(seed: u64, setup: Setup) -> World {
    let mut w = converged_world(seed, false, setup, |w| {
        for s in &mut w.servers {
            s.out_ns += 75_000.0;
            s.in_ns -= 75_000.0;
        }
    });
    w.run(5 * HOUR, 16 * S);
    w
}

/// The oscillator wanders as the simulation's worst (3e-10/√s), and when the upstreams go
/// silent its rate jumps by the worst frequency error the discipline found lately, in the
/// direction that adds to the error its estimate already has.
fn holdover_case(seed: u64, setup: Setup) -> World {
    let mut w = converged_world(seed, false, setup, |w| w.wander_per_sqrt_s = 3e-10);
    w.run(4 * HOUR, 16 * S);
    for s in &mut w.servers {
        s.answering = false;
    }
    let off = w.system.frequency_ppm() - w.true_freq_ppm();
    let worst = w.system.discipline_error().worst_freq;
    // ε is the monotonic clock's rate error: true time runs at 1/(1 + ε), so a faster
    // oscillator makes the model's frequency too high.
    w.epsilon += off.signum() * worst;
    w.measure_from = w.t;
    w.run(5 * HOUR - 60 * S, 16 * S);
    w
}

/// Announced: the hold after the leap serves up to a second ahead of UTC, and says so.
fn leap_case(seed: u64, setup: Setup) -> World {
    let (mut w, leap) = leap_world_with(seed, 3 * HOUR, false, setup);
    w.run(2 * HOUR, 16 * S);
    w.measure_from = w.t;
    w.run(leap - w.epoch + 2 * HOUR, 16 * S);
    w
}

/// Smeared: the bound is against the smeared timescale the server serves.
fn smeared_case(seed: u64, setup: Setup) -> World {
    let (mut w, leap) = leap_world_with(seed, 14 * HOUR, true, setup);
    w.smeared = Some(ntp_user::clock::leap::Leap {
        insert: true,
        at_ntp_ns: leap,
    });
    w.run(2 * HOUR, 16 * S);
    w.measure_from = w.t;
    w.run(leap - w.epoch + 12 * HOUR, 16 * S);
    w
}

/// The oscillator's rate walks by 3e-10/√s (see [`WANDER_OFFSET_BOUND_NS`]), a falseticker
/// among the upstreams; four hours to converge, six measured.
fn wander_case(seed: u64, setup: Setup) -> World {
    converge_and_measure_with(seed, -200.0, 3e-10, setup)
}

type Case = fn(u64, Setup) -> World;

/// Every case the bound is checked in, by the name the tables give it.
const BOUND_CASES: [(&str, Case); 8] = [
    ("steady", steady_case),
    ("falseticker", falseticker_case),
    ("step 10 ms", upstream_step_case),
    ("asymmetric", asymmetric_case),
    ("holdover 1 h", holdover_case),
    ("leap", leap_case),
    ("smeared leap", smeared_case),
    ("wander", wander_case),
];

fn bound_case(name: &str) -> Case {
    BOUND_CASES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, case)| *case)
        .expect("a case of that name")
}

#[test]
fn the_bound_holds_in_steady_state_and_stays_tight() {
    let r = check_bound_case("steady state", |seed| {
        bound_case("steady")(seed, Setup::default())
    });
    // The dispersion this server adds is its own error estimate, not a 15 ppm tolerance:
    // within five times the error it bounds (RFC 5905's growth made it ~250 times).
    assert!(
        r.median_added_ns <= 5.0 * r.median_error_ns,
        "median added dispersion {:.1} µs against median |error| {:.1} µs",
        r.median_added_ns / 1e3,
        r.median_error_ns / 1e3
    );
}

#[test]
fn the_bound_holds_with_a_falseticker() {
    check_bound_case("falseticker", |seed| {
        bound_case("falseticker")(seed, Setup::default())
    });
}

#[test]
fn the_bound_holds_after_an_upstream_steps_by_10_ms() {
    check_bound_case("an upstream steps 10 ms", |seed| {
        bound_case("step 10 ms")(seed, Setup::default())
    });
}

#[test]
fn the_bound_holds_over_asymmetric_paths() {
    check_bound_case("asymmetric paths", |seed| {
        bound_case("asymmetric")(seed, Setup::default())
    });
}

#[test]
fn the_bound_holds_through_an_hour_of_holdover() {
    check_bound_case("1 h holdover", |seed| {
        bound_case("holdover 1 h")(seed, Setup::default())
    });
}

#[test]
fn the_bound_holds_across_a_leap_second() {
    check_bound_case("inserted leap", |seed| {
        bound_case("leap")(seed, Setup::default())
    });
    check_bound_case("smeared leap", |seed| {
        bound_case("smeared leap")(seed, Setup::default())
    });
}

#[test]
fn the_bound_holds_while_the_oscillator_wanders() {
    check_bound_case("wander", |seed| {
        bound_case("wander")(seed, Setup::default())
    });
}

/// Both estimators on every case and seed: the tables README's error-bound section gives
/// (`cargo test -p ntp-user --test simulation -- --ignored --nocapture compare`). Worst and
/// median |error − asymmetry bias| over the served instants, bound violations, the median
/// added dispersion against the median |error|, and the median poll exponent at the end: the
/// estimators also decide how often the upstreams are asked, so the second table fixes the
/// poll at 256 s for both.
#[test]
#[ignore = "a comparison that runs every case four times; run it explicitly"]
fn compare_estimators() {
    let mut violations = 0;
    for fixed_poll in [None, Some(8)] {
        let mut rows = Vec::new();
        for (name, case) in BOUND_CASES {
            for estimator in [Estimator::Windows, Estimator::Kalman] {
                let setup = Setup {
                    estimator,
                    fixed_poll,
                };
                let mut worst: f64 = 0.0;
                let mut debiased = Vec::new();
                let mut polls = Vec::new();
                let r = bound_case_report(name, |seed| {
                    let w = case(seed, setup);
                    polls.push(w.system.poll_limit() as f64);
                    for b in &w.bounds {
                        worst = worst.max((b.error - b.bias).abs());
                        debiased.push((b.error - b.bias).abs());
                    }
                    w
                });
                violations += r.violations;
                rows.push(format!(
                    "| {name} | {estimator:?} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} |",
                    worst / 1e3,
                    median(debiased) / 1e3,
                    r.violations,
                    r.median_added_ns / 1e3,
                    r.median_added_ns / r.median_error_ns,
                    median(polls),
                ));
            }
        }
        eprintln!(
            "poll: {}",
            fixed_poll.map_or("adaptive".into(), |p| format!("fixed at 2^{p} s"))
        );
        eprintln!(
            "| case | estimator | worst µs | median µs | violations | median added µs | \
             added / median |error| | poll |"
        );
        eprintln!("|---|---|---|---|---|---|---|---|");
        for row in rows {
            eprintln!("{row}");
        }
    }
    assert_eq!(violations, 0, "the bound was below the error");
}

/// A daemon that resumes the clock the one before it served is synchronized and in holdover,
/// but has measured nothing itself: what a rollout's gate tells from a configuration whose
/// upstreams answer. Only a sample of its own upstreams makes it `measured_since_start`.
#[test]
fn a_resumed_clock_is_in_holdover_until_its_own_upstreams_answer() {
    let config = SystemConfig::default();
    let mut w = World::new(11, 30.0, false, config.clone(), 0);
    w.run(HOUR, 16 * S);
    let anchor = w.last_anchor.unwrap();
    let now = w.mono_now();
    let before = w.system.snapshot(now, &anchor);
    assert!(before.synchronized && before.measured_since_start && !before.holdover);
    // The next daemon resumes that anchor, with upstreams that do not answer.
    let addrs: Vec<SocketAddr> = w.servers.iter().map(|s| s.addr).collect();
    w.system = System::resume(config, &addrs, &anchor, w.system.frequency_ppm(), now);
    for s in &mut w.servers {
        s.answering = false;
    }
    w.run(HOUR + 120 * S, 16 * S);
    let anchor = w.last_anchor.unwrap();
    let resumed = w.system.snapshot(w.mono_now(), &anchor);
    assert!(
        resumed.synchronized,
        "the resumed clock is served as synchronized"
    );
    assert!(resumed.holdover);
    assert!(!resumed.measured_since_start, "{resumed:?}");
    assert!(
        resumed.last_sync_mono_ns.is_some_and(|t| t <= now),
        "the last real synchronization is the earlier daemon's"
    );
    // Its upstreams answer: a measurement of its own.
    for s in &mut w.servers {
        s.answering = true;
    }
    w.run(HOUR + 300 * S, 16 * S);
    let anchor = w.last_anchor.unwrap();
    let measured = w.system.snapshot(w.mono_now(), &anchor);
    assert!(measured.synchronized && measured.measured_since_start && !measured.holdover);
    assert!(measured.last_sync_mono_ns.is_some_and(|t| t > now));
}
