//! The whole clock, sans IO: upstreams → filters → selection → discipline → the anchor the
//! responder serves. Inputs are monotonic timestamps, random cookies and packets; outputs are
//! requests to send, events to log, and anchors to publish.

use std::net::{IpAddr, SocketAddr};

use md5::{Digest as _, Md5};
use ntp_common::time::{ppm_to_freq_scaled, NANOS_PER_SEC};
use ntp_common::wire::{
    Leap as LeapIndicator, LEAP_ADD_SECOND, LEAP_DEL_SECOND, LEAP_NONE, LEAP_UNSYNCHRONIZED,
    MAX_STRATUM,
};
use ntp_common::TimeAnchor;

use crate::clock::bound::{added_dispersion, wander_per_s, DisciplineError};
use crate::clock::discipline::{ClockModel, Discipline, DisciplineConfig, DisciplineEvent};
use crate::clock::leap::{end_of_month_ntp_ns, Leap};
use crate::clock::selection::{select, Candidate, SelectError};
use crate::clock::snapshot::{ClockReference, ClockSnapshot, SourceSnapshot, SourceState};
use crate::clock::upstream::{
    PollConfig, Rejection, ResponseMode, Upstream, UpstreamState, LOCAL_PRECISION,
};

/// A quartz oscillator in a machine room drifts by a few hundredths of a ppm per hour; 0.1
/// covers a room whose temperature moves by a degree or so an hour.
pub const DEFAULT_HOLDOVER_WANDER_PPM_PER_HOUR: f64 = 0.1;

#[derive(Clone, Debug, PartialEq)]
pub struct SystemConfig {
    pub poll: PollConfig,
    pub discipline: DisciplineConfig,
    /// Truechimers needed before the clock is steered (operators of shared services want 3).
    pub min_sources: usize,
    /// With every upstream lost, the clock free-runs on its last frequency this long, then says
    /// it is unsynchronized (LI=3).
    pub max_holdover_ns: u64,
    /// Published in every anchor: replies turn LI=3 if the daemon stops publishing this long.
    pub max_anchor_age_ns: u64,
    /// Smear leap seconds over 24 h instead of announcing them.
    pub leap_smear: bool,
    /// How fast the oscillator's rate may drift (ppm per hour): the error bound served in
    /// holdover grows by it on top of the worst frequency error seen.
    pub holdover_wander_ppm_per_hour: f64,
    pub stratum_override: Option<u8>,
    pub refid_override: Option<[u8; 4]>,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            poll: PollConfig::default(),
            discipline: DisciplineConfig::default(),
            min_sources: 1,
            max_holdover_ns: 3600 * NANOS_PER_SEC,
            max_anchor_age_ns: 30 * NANOS_PER_SEC,
            leap_smear: false,
            holdover_wander_ppm_per_hour: DEFAULT_HOLDOVER_WANDER_PPM_PER_HOUR,
            stratum_override: None,
            refid_override: None,
        }
    }
}

/// Everything worth a log line.
#[derive(Clone, Debug, PartialEq)]
pub enum SystemEvent {
    Rejected {
        upstream: SocketAddr,
        why: Rejection,
    },
    Denied {
        upstream: SocketAddr,
        code: [u8; 4],
    },
    SystemPeerChanged {
        upstream: SocketAddr,
    },
    Falseticker {
        upstream: SocketAddr,
    },
    NoSelection(SelectError),
    Stepped {
        offset_s: f64,
    },
    Corrected {
        phase_s: f64,
        freq_ppm: f64,
    },
    StepRefused {
        offset_s: f64,
    },
    HoldoverEntered,
    HoldoverExpired,
    LeapScheduled(Leap),
    LeapApplied(Leap),
}

/// What the published header says about the reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reference {
    pub stratum: u8,
    pub refid: [u8; 4],
    /// Root delay (s) and the root dispersion of the upstreams the clock follows (s): the
    /// served dispersion adds the clock's own error to it (see [`crate::clock::bound`]).
    pub root_delay: f64,
    pub root_dispersion: f64,
    pub updated_ns: u64,
    pub reference_ntp_ns: u64,
    pub leap: u8,
}

/// Below this many points in the discipline's regression window, the poll shortens.
const POLL_TARGET_POINTS: usize = 32;

/// Samples an upstream needs before its estimate may set the clock the first time.
const FIRST_STEP_SAMPLES: usize = 4;

/// The error a discipline point is given: half the delay beyond the path's least (the most
/// queueing on one leg can shift the offset) on top of half the upstream's jitter (what even
/// its straightest samples scatter by), and never below its precision. (Half: on the
/// simulation's seeds 1–8 it did better than the whole jitter and than fixed floors of 1, 5
/// and 15 µs, and about as well as 30 µs, which would blunt the weighting on quiet paths.)
fn point_sigma(delay: f64, min_delay: f64, jitter: f64, precision: f64) -> f64 {
    let excess = (delay - min_delay).max(0.0) / 2.0;
    let base = jitter / 2.0;
    (excess * excess + base * base).sqrt().max(precision)
}

/// A request the IO must send now: `packet` to upstream `id` at `addr`; the IO reports back
/// with [`System::on_sent`] and [`System::on_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub id: usize,
    pub addr: SocketAddr,
    pub packet: [u8; 48],
}

pub struct System {
    pub(in crate::clock) config: SystemConfig,
    pub(in crate::clock) upstreams: Vec<Upstream>,
    pub(in crate::clock) discipline: Discipline,
    pub(in crate::clock) reference: Option<Reference>,
    system_peer: Option<usize>,
    pending_leap: Option<Leap>,
    /// The last leap taken (NTP time): upstreams' headers go on saying LI=1 for a poll or two
    /// after it, which must not schedule another one a month later.
    last_leap_ntp: Option<u64>,
    /// The leap being smeared, and whether the model has taken it yet.
    smear: Option<(Leap, bool)>,
    in_holdover: bool,
    holdover_expired: bool,
    /// A sample of this system's upstreams has corrected the clock (not only a resumed one).
    measured: bool,
    /// Upper bound the clock's health puts on every upstream's poll exponent.
    poll_limit: i8,
    poll_score: i32,
    last_phase: f64,
    clock_jitter: f64,
    /// For status: the last measured offset, and how the last selection judged each upstream.
    last_offset_s: Option<f64>,
    judged: Vec<(usize, SourceState)>,
    /// An inserted leap second without smear: from (mono, ntp) the served time runs at half
    /// speed until the stepped-back model meets it (~2 s), instead of repeating a second.
    leap_hold: Option<(u64, u64)>,
    /// Monotonic time of the last anchor asked for: wakeups before it are past.
    last_anchor_mono: u64,
}

/// After a leap, announcements are ignored this long (two days): no two leaps are closer.
const LEAP_QUIET_NS: u64 = 2 * 86_400 * NANOS_PER_SEC;

/// The slowest an anchor can run: half speed (the anchor's rate field holds ±0.5).
const HALF_SPEED: i64 = -ntp_common::time::MAX_FREQ_SCALED;

/// RFC 5905 reference ID of an upstream: its IPv4 address, or the first four bytes of the MD5
/// of its IPv6 address.
pub fn refid_of(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let h = Md5::digest(v6.octets());
            [h[0], h[1], h[2], h[3]]
        }
    }
}

impl System {
    /// `initial` is the model to start from (normally the host clock), unsynchronized.
    pub fn new(
        config: SystemConfig,
        upstreams: &[SocketAddr],
        initial: ClockModel,
        now_ns: u64,
    ) -> System {
        System {
            upstreams: upstreams
                .iter()
                .map(|a| Upstream::new(*a, config.poll, now_ns))
                .collect(),
            discipline: Discipline::new(config.discipline.clone(), initial),
            poll_limit: config.poll.max_poll,
            poll_score: 0,
            last_phase: 0.0,
            clock_jitter: 0.0,
            last_offset_s: None,
            judged: Vec::new(),
            leap_hold: None,
            last_anchor_mono: 0,
            config,
            reference: None,
            system_peer: None,
            pending_leap: None,
            last_leap_ntp: None,
            smear: None,
            in_holdover: false,
            holdover_expired: false,
            measured: false,
        }
    }

    /// Continues the clock an earlier daemon published in `anchor` (synchronized, younger
    /// than its maximum age): same time, `freq_ppm` as frequency (the anchor's own rate may
    /// include a slew that was under way), same reference until upstreams answer. Served time
    /// goes on without a jump across the restart.
    pub fn resume(
        config: SystemConfig,
        upstreams: &[SocketAddr],
        anchor: &TimeAnchor,
        freq_ppm: f64,
        now_ns: u64,
    ) -> System {
        let model = ClockModel::from_anchor(anchor);
        let mut system = System::new(config, upstreams, model, now_ns);
        system.discipline =
            Discipline::resume(system.config.discipline.clone(), model, freq_ppm, now_ns);
        // The bound goes on from what the anchor served now, growing at its rate (the earlier
        // daemon's frequency error) until an update measures afresh.
        let growth = anchor.dispersion_growth_ns_per_s as f64 * 1e-9;
        system
            .discipline
            .set_error(DisciplineError::unknown(now_ns, growth));
        // The reference was last updated at the anchor's reference timestamp.
        let updated_ns = if anchor.reference_ntp_ns != 0 {
            model.mono_at(anchor.reference_ntp_ns).min(now_ns)
        } else {
            anchor.mono_ns
        };
        system.reference = Some(Reference {
            stratum: anchor.stratum,
            refid: anchor.refid,
            root_delay: anchor.root_delay_ns as f64 * 1e-9,
            root_dispersion: anchor.root_dispersion_at(now_ns) as f64 * 1e-9,
            updated_ns,
            reference_ntp_ns: anchor.reference_ntp_ns,
            leap: LEAP_NONE,
        });
        // Upstreams are not reachable yet because none was asked: not a loss worth a warning.
        system.in_holdover = true;
        system
    }

    /// Adds an upstream (a name that resolved late).
    pub fn add_upstream(&mut self, addr: SocketAddr, now_ns: u64) {
        let mut u = Upstream::new(addr, self.config.poll, now_ns);
        u.set_poll_limit(self.poll_limit);
        self.upstreams.push(u);
    }

    /// Replaces upstream `id` with a fresh one at `addr` (its name now resolves elsewhere).
    pub fn replace_upstream(&mut self, id: usize, addr: SocketAddr, now_ns: u64) {
        let mut u = Upstream::new(addr, self.config.poll, now_ns);
        u.set_poll_limit(self.poll_limit);
        self.upstreams[id] = u;
        self.judged.retain(|(j, _)| *j != id);
        if self.system_peer == Some(id) {
            self.system_peer = None;
        }
    }

    /// The poll exponent the clock's health currently allows.
    pub fn poll_limit(&self) -> i8 {
        self.poll_limit
    }

    pub fn system_peer(&self) -> Option<usize> {
        self.system_peer
    }

    /// The earliest instant something is due: a poll, or the end of a slew (after which the
    /// anchor must be republished at once, or the kernel would extrapolate a stale rate).
    pub fn next_wakeup_ns(&self) -> Option<u64> {
        // A leap must be taken (and a hold ended) on time, or the kernel would serve the old
        // line past it.
        let leap = self
            .pending_leap
            .map(|l| self.discipline.model.mono_at(l.at_ntp_ns) + 1_000);
        self.upstreams
            .iter()
            .filter_map(Upstream::next_poll_ns)
            .chain(self.discipline.slew_end_ns())
            .chain(leap)
            .chain(self.leap_hold_end())
            .chain(self.smear_edges().filter(|m| *m > self.last_anchor_mono))
            .min()
    }

    /// Where the smear window opens and closes (the anchor's rate changes there).
    fn smear_edges(&self) -> impl Iterator<Item = u64> {
        let model = self.discipline.model;
        self.smear.into_iter().flat_map(move |(l, applied)| {
            // Unleaped time u is the model's time, plus the leap's second once taken.
            let to_model = move |u: u64| {
                if applied {
                    u.wrapping_add_signed(l.step_ns())
                } else {
                    u
                }
            };
            [
                l.at_ntp_ns - crate::clock::leap::SMEAR_HALF_WINDOW_NS,
                l.at_ntp_ns + crate::clock::leap::SMEAR_HALF_WINDOW_NS,
            ]
            .map(|u| model.mono_at(to_model(u)) + 1_000)
        })
    }

    /// When the half-speed line of a leap hold meets the stepped-back model.
    fn leap_hold_end(&self) -> Option<u64> {
        let (mono, _) = self.leap_hold?;
        let model_rate = 1.0 + self.discipline.model.freq_ppm() * 1e-6;
        let hold_rate = 1.0 + HALF_SPEED as f64 / (1u64 << 32) as f64;
        Some(mono + (1e9 / (model_rate - hold_rate)).ceil() as u64 + 1_000)
    }

    /// Requests due at `now_ns`. `cookie` supplies unpredictable transmit timestamps.
    pub fn due_requests(
        &mut self,
        now_ns: u64,
        mut cookie: impl FnMut() -> u64,
    ) -> Vec<SendRequest> {
        let mut out = Vec::new();
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            if u.next_poll_ns().is_some_and(|t| t <= now_ns) {
                out.push(SendRequest {
                    id: i,
                    addr: u.addr,
                    packet: u.poll(now_ns, cookie()),
                });
            }
        }
        out
    }

    /// The request to upstream `id` left at `sent_ns` (the origin its answer is measured from).
    pub fn on_sent(&mut self, id: usize, sent_ns: u64) {
        if let Some(u) = self.upstreams.get_mut(id) {
            u.mark_sent(sent_ns);
        }
    }

    pub fn upstream_count(&self) -> usize {
        self.upstreams.len()
    }

    pub fn upstream_addr(&self, id: usize) -> Option<SocketAddr> {
        self.upstreams.get(id).map(|u| u.addr)
    }

    /// Eight polls unanswered.
    pub fn upstream_is_lost(&self, id: usize) -> bool {
        self.upstreams.get(id).is_some_and(|u| u.is_lost())
    }

    pub fn frequency_ppm(&self) -> f64 {
        self.discipline.frequency_ppm()
    }

    /// The discipline's error bounds as of its last update.
    pub fn discipline_error(&self) -> DisciplineError {
        self.discipline.error()
    }

    pub fn is_synchronized(&self) -> bool {
        self.discipline.is_synchronized()
    }

    /// A datagram from upstream `id`, received at `recv_ns`.
    pub fn on_response(&mut self, id: usize, bytes: &[u8], recv_ns: u64) -> Vec<SystemEvent> {
        let mut events = Vec::new();
        self.discipline.advance(recv_ns);
        // A leap due before this answer must be in the model before the answer is measured.
        self.apply_due_leap(recv_ns, &mut events);
        let addr = self.upstreams[id].addr;
        if let Err(why) = self.upstreams[id].on_response(bytes, recv_ns, &self.discipline.model) {
            if let UpstreamState::Denied(code) = self.upstreams[id].state {
                events.push(SystemEvent::Denied {
                    upstream: addr,
                    code,
                });
            } else {
                events.push(SystemEvent::Rejected {
                    upstream: addr,
                    why,
                });
            }
            return events;
        }
        self.clock_update(id, recv_ns, &mut events);
        events
    }

    fn clock_update(&mut self, from: usize, now_ns: u64, events: &mut Vec<SystemEvent>) {
        // Samples may be hours old at long polls: judge them against the estimate line, not
        // against the slewing segment extrapolated back over that time.
        let model = self.discipline.estimate_line(now_ns);
        let mut cands = Vec::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            if let Some((est, header, distance)) = u.estimate(&model, now_ns) {
                cands.push(Candidate {
                    id: i,
                    offset: est.offset,
                    root_distance: distance,
                    jitter: est.jitter,
                    stratum: header.stratum,
                    leap: header.leap,
                });
            }
        }
        let selection = match select(&cands, self.config.min_sources) {
            Ok(s) => s,
            Err(e) => {
                self.judged.clear();
                events.push(SystemEvent::NoSelection(e));
                return;
            }
        };
        self.judged = selection
            .survivors
            .iter()
            .enumerate()
            .map(|(rank, &i)| {
                let state = if rank == 0 {
                    SourceState::Selected
                } else {
                    SourceState::Candidate
                };
                (i, state)
            })
            .chain(
                selection
                    .falsetickers
                    .iter()
                    .map(|&i| (i, SourceState::Falseticker)),
            )
            .chain(
                selection
                    .outliers
                    .iter()
                    .map(|&i| (i, SourceState::Outlier)),
            )
            .collect();
        for &f in &selection.falsetickers {
            events.push(SystemEvent::Falseticker {
                upstream: self.upstreams[f].addr,
            });
        }
        let peer = selection.survivors[0];
        if self.system_peer != Some(peer) {
            self.system_peer = Some(peer);
            events.push(SystemEvent::SystemPeerChanged {
                upstream: self.upstreams[peer].addr,
            });
        }
        // The clock is updated when a survivor has a sample not used before (RFC 5905 waits
        // for the system peer alone, which starves the loop when the peer changes often).
        if !selection.survivors.contains(&from) {
            return;
        }
        // The one step of the first synchronization waits for the iburst to fill the filter:
        // a first packet often waits for ARP/ND on its way out, an asymmetric delay that
        // would otherwise be stepped into the clock.
        if !self.discipline.is_synchronized()
            && self.upstreams[from].filter.len() < FIRST_STEP_SAMPLES
        {
            return;
        }
        let precision = self.upstreams[from].header.map_or(1e-6, |h| h.precision);
        let Some(est) = self.upstreams[from]
            .filter
            .take_new_estimate(&model, now_ns, precision)
        else {
            return;
        };
        let header = self.upstreams[peer]
            .header
            .expect("a survivor has a header");
        // The combined offset is a weighted mean of the survivors': its error from their
        // paths and their clocks is within the largest of theirs.
        let (root_delay, upstream_dispersion) = selection
            .survivors
            .iter()
            .filter_map(|&i| self.upstreams[i].estimate(&model, now_ns))
            .fold((0.0f64, 0.0f64), |(delay, disp), (est, h, _)| {
                (
                    delay.max(h.root_delay + est.delay),
                    disp.max(h.root_dispersion + h.precision),
                )
            });
        // One point per fresh survivor sample: points from different samples have independent
        // errors, which the regression's runs test relies on. The selection decides who counts.
        // Its weight comes from the delay it waited beyond the path's least: queueing on one
        // leg shifts the offset by up to half that, so a sample that went straight through
        // counts far more than one that queued (chrony and ntpd-rs weight by delay too).
        let min_delay = self.upstreams[from].filter.min_delay().unwrap_or(est.delay);
        let sigma = point_sigma(est.delay, min_delay, est.jitter, precision);
        let point_mono = est.sample.mono_ns;
        let true_ntp = est.sample.true_ntp_ns;
        match self
            .discipline
            .update_at(now_ns, point_mono, true_ntp, sigma)
        {
            DisciplineEvent::Refused { offset_s } => {
                events.push(SystemEvent::StepRefused { offset_s });
                return;
            }
            DisciplineEvent::Outlier { .. } => return,
            DisciplineEvent::Stepped { offset_s } => {
                self.last_offset_s = Some(offset_s);
                events.push(SystemEvent::Stepped { offset_s })
            }
            DisciplineEvent::Corrected {
                phase_s,
                freq_ppm,
                trimmed,
                ..
            } => {
                // Clock jitter (RFC 5905): RMS of successive phase errors. Persistent errors
                // (a wandering frequency) stand out against it; white noise does not.
                let diff = phase_s - self.last_phase;
                self.last_phase = phase_s;
                self.clock_jitter = (self.clock_jitter.powi(2)
                    + (diff * diff - self.clock_jitter.powi(2)) / 4.0)
                    .sqrt();
                // A short window predicting best means the frequency wanders faster than
                // the points average noise away: poll faster for more points per hour (chrony's
                // poll target, here over the points of every upstream).
                let wandering = self.discipline.window() < POLL_TARGET_POINTS;
                self.adapt_poll(
                    phase_s.abs() > 4.0 * self.clock_jitter.max(1e-6) || trimmed || wandering,
                );
                self.last_offset_s = Some(phase_s);
                events.push(SystemEvent::Corrected { phase_s, freq_ppm })
            }
        }
        if self.in_holdover {
            self.in_holdover = false;
        }
        self.holdover_expired = false;
        self.measured = true;
        let addr = self.upstreams[peer].addr;
        self.reference = Some(Reference {
            stratum: self
                .config
                .stratum_override
                .unwrap_or((header.stratum + 1).min(MAX_STRATUM)),
            refid: self.config.refid_override.unwrap_or(refid_of(addr.ip())),
            root_delay,
            root_dispersion: upstream_dispersion + LOCAL_PRECISION,
            updated_ns: now_ns,
            reference_ntp_ns: self.discipline.model.ntp_at(now_ns),
            leap: selection.leap,
        });
        self.schedule_leap(selection.leap, now_ns, events);
    }

    /// ntpd's poll "jiggle": a clock that is not keeping up (phase error large against the
    /// noise, or a frequency that moved within the regression window) polls faster; a run of
    /// good updates lets it poll slower, within the configured bounds.
    fn adapt_poll(&mut self, struggling: bool) {
        let (min, max) = (self.config.poll.min_poll, self.config.poll.max_poll);
        // One struggling update outweighs six good ones: a clock that struggles on more than
        // about one update in seven polls faster, one that struggles rarely polls slower.
        self.poll_score += if struggling { -6 } else { 1 };
        if self.poll_score <= -12 {
            self.poll_limit = (self.poll_limit - 1).max(min);
            self.poll_score = 0;
        } else if self.poll_score >= 16 {
            self.poll_limit = (self.poll_limit + 1).min(max);
            self.poll_score = 0;
        }
        for u in &mut self.upstreams {
            u.set_poll_limit(self.poll_limit);
        }
    }

    fn schedule_leap(&mut self, leap: u8, now_ns: u64, events: &mut Vec<SystemEvent>) {
        let now_ntp = self.discipline.model.ntp_at(now_ns);
        match leap {
            1 | 2
                if self.pending_leap.is_none()
                    && self
                        .last_leap_ntp
                        .is_none_or(|l| now_ntp >= l + LEAP_QUIET_NS) =>
            {
                let l = Leap {
                    insert: leap == 1,
                    at_ntp_ns: end_of_month_ntp_ns(now_ntp),
                };
                self.pending_leap = Some(l);
                if self.config.leap_smear {
                    self.smear = Some((l, false));
                }
                events.push(SystemEvent::LeapScheduled(l));
            }
            // Withdrawn before it happened.
            0 if self.pending_leap.is_some_and(|l| now_ntp < l.at_ntp_ns) => {
                self.pending_leap = None;
                self.smear = None;
            }
            _ => {}
        }
    }

    /// Applies a leap whose instant has passed: the model's time moves by one second (the
    /// published anchor holds time still for that second rather than going back), and every
    /// stored sample from before the leap moves with it.
    fn apply_due_leap(&mut self, now_ns: u64, events: &mut Vec<SystemEvent>) {
        let Some(leap) = self.pending_leap else {
            return;
        };
        let model = self.discipline.model;
        if model.ntp_at(now_ns) < leap.at_ntp_ns {
            return;
        }
        let at_mono = model.mono_at(leap.at_ntp_ns);
        if leap.insert && !self.config.leap_smear {
            // Served time goes on from where it is now, at half speed, rather than back.
            self.leap_hold = Some((now_ns, model.ntp_at(now_ns)));
        }
        self.discipline.apply_leap(at_mono, leap.step_ns());
        for u in &mut self.upstreams {
            u.filter.shift_before(at_mono, leap.step_ns());
        }
        self.pending_leap = None;
        self.last_leap_ntp = Some(leap.at_ntp_ns);
        if let Some((l, applied)) = &mut self.smear {
            if *l == leap {
                *applied = true;
            }
        }
        events.push(SystemEvent::LeapApplied(leap));
    }

    /// The clock and its upstreams as `ntp-xdp status` shows them. `anchor` is what was
    /// published at `now_ns`.
    pub fn snapshot(&self, now_ns: u64, anchor: &TimeAnchor) -> ClockSnapshot {
        let model = self.discipline.estimate_line(now_ns);
        let sources = self
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let est = u.estimate(&model, now_ns);
                let state = match u.state {
                    UpstreamState::Denied(code) => SourceState::Denied(code),
                    UpstreamState::Active if !u.is_reachable() => SourceState::Unreachable,
                    UpstreamState::Active => self
                        .judged
                        .iter()
                        .find(|(j, _)| *j == i)
                        .map_or(SourceState::Unusable, |(_, s)| *s),
                };
                SourceSnapshot {
                    addr: u.addr,
                    state,
                    reach: u.reach,
                    poll: u.poll,
                    stratum: u.header.map(|h| h.stratum),
                    offset_s: est.map(|(e, _, _)| e.offset),
                    delay_s: est.map(|(e, _, _)| e.delay),
                    jitter_s: est.map(|(e, _, _)| e.jitter),
                    interleaved: u.last_mode.map(|m| m == ResponseMode::Interleaved),
                }
            })
            .collect();
        let synced = anchor.is_synchronized_at(now_ns);
        ClockSnapshot {
            reference: ClockReference::Upstreams,
            synchronized: synced,
            stratum: if synced { anchor.stratum } else { 0 },
            refid: synced.then_some(anchor.refid),
            leap: LeapIndicator::from_bits(anchor.leap),
            offset_s: self.last_offset_s,
            frequency_ppm: self.discipline.frequency_ppm(),
            regression_points: if synced { self.discipline.window() } else { 0 },
            root_delay_s: anchor.root_delay_ns as f64 * 1e-9,
            // What a reply at `now_ns` states.
            root_dispersion_s: anchor.root_dispersion_at(now_ns) as f64 * 1e-9,
            last_sync_mono_ns: self
                .reference
                .filter(|_| self.discipline.is_synchronized())
                .map(|r| r.updated_ns),
            holdover: synced && self.in_holdover,
            measured_since_start: synced && self.measured,
            sources,
            // The core reads no clock: the daemon fills this in.
            host_clock_offset_s: None,
        }
    }

    /// The dispersion the clock adds to its upstreams' at `now_ns` (s) and its growth (s/s) over
    /// the longest an anchor may be served.
    fn added_dispersion(&self, now_ns: u64) -> (f64, f64) {
        added_dispersion(
            &self.discipline.error(),
            wander_per_s(self.config.holdover_wander_ppm_per_hour),
            now_ns,
            self.config.max_anchor_age_ns,
        )
    }

    /// The anchor to publish at `now_ns`, plus events (holdover, leap) that happened.
    pub fn anchor(&mut self, now_ns: u64) -> (TimeAnchor, Vec<SystemEvent>) {
        let mut events = Vec::new();
        self.last_anchor_mono = now_ns;
        self.discipline.advance(now_ns);
        self.apply_due_leap(now_ns, &mut events);
        let model = self.discipline.model;
        let mut anchor = TimeAnchor {
            mono_ns: now_ns,
            ntp_ns: model.ntp_at(now_ns),
            freq_scaled: model.freq_scaled(),
            max_age_ns: self.config.max_anchor_age_ns,
            leap: LEAP_UNSYNCHRONIZED,
            ..Default::default()
        };
        if let Some((leap, applied)) = self.smear {
            // Served time is u − smear(u), u being time as if the leap had not happened; the
            // model takes the leap at its instant, so served time is continuous across it.
            let u = if applied {
                anchor.ntp_ns.wrapping_add_signed(-leap.step_ns())
            } else {
                anchor.ntp_ns
            };
            anchor.ntp_ns = u.wrapping_add_signed(-leap.smear_ns(u));
            if leap.smearing_at(u) {
                anchor.freq_scaled = ppm_to_freq_scaled(model.freq_ppm() + leap.smear_rate_ppm());
            } else if applied {
                self.smear = None;
            }
        }
        // A leap second's hold serves time ahead of the model (by up to the second): the bound
        // says so. A smear is not counted: its bound is against the smeared timescale.
        let mut held_ahead = 0;
        if let Some((mono, ntp)) = self.leap_hold {
            let hold = TimeAnchor {
                mono_ns: mono,
                ntp_ns: ntp,
                freq_scaled: HALF_SPEED,
                ..Default::default()
            };
            let held = hold.ntp_ns_at(now_ns);
            if held > anchor.ntp_ns {
                held_ahead = held - anchor.ntp_ns;
                anchor.ntp_ns = held;
                anchor.freq_scaled = HALF_SPEED;
            } else {
                self.leap_hold = None;
            }
        }
        let Some(r) = self.reference.filter(|_| self.discipline.is_synchronized()) else {
            return (anchor, events);
        };
        let since_update = now_ns.saturating_sub(r.updated_ns);
        if since_update > self.config.max_holdover_ns {
            if !self.holdover_expired {
                self.holdover_expired = true;
                events.push(SystemEvent::HoldoverExpired);
            }
            return (anchor, events);
        }
        let reachable = self.upstreams.iter().any(|u| u.is_reachable());
        if !reachable && !self.in_holdover {
            self.in_holdover = true;
            events.push(SystemEvent::HoldoverEntered);
        }
        let (added, growth) = self.added_dispersion(now_ns);
        anchor.reference_ntp_ns = r.reference_ntp_ns;
        anchor.root_delay_ns = (r.root_delay * 1e9).ceil().min(u32::MAX as f64) as u32;
        anchor.root_dispersion_ns = ((r.root_dispersion + added) * 1e9).ceil() as u64 + held_ahead;
        anchor.dispersion_growth_ns_per_s = (growth * 1e9)
            .ceil()
            .min(ntp_common::time::MAX_DISPERSION_GROWTH_NS_PER_S as f64)
            as u32;
        anchor.refid = r.refid;
        anchor.stratum = r.stratum;
        // A smeared leap is never announced; otherwise LI warns until the leap happens.
        anchor.leap = match self.pending_leap {
            Some(l) if !self.config.leap_smear => {
                if l.insert {
                    LEAP_ADD_SECOND
                } else {
                    LEAP_DEL_SECOND
                }
            }
            _ => LEAP_NONE,
        };
        (anchor, events)
    }
}

#[cfg(test)]
mod tests {
    use super::point_sigma;

    #[test]
    fn queued_samples_weigh_less() {
        // Straight through: half the jitter; 100 µs of queueing: its half dominates.
        let straight = point_sigma(0.001, 0.001, 10e-6, 1e-7);
        let queued = point_sigma(0.0011, 0.001, 10e-6, 1e-7);
        assert!((straight - 5e-6).abs() < 1e-12);
        assert!((queued - (50e-6f64.powi(2) + 5e-6f64.powi(2)).sqrt()).abs() < 1e-12);
        // Never below the precision, never negative excess.
        assert_eq!(point_sigma(0.001, 0.002, 0.0, 2e-6), 2e-6);
    }
}
