//! What the clock core shows of itself: a typed snapshot, built on request from its state.
//! `observe` maps it to the status report's wire form.

use std::net::SocketAddr;

use ntp_common::wire::Leap;

/// How the last selection judged an upstream, or why it was not judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceState {
    /// The system peer: the survivor the clock follows.
    Selected,
    /// A survivor of selection, combined with the system peer.
    Candidate,
    /// Outvoted by the majority of the upstreams (Marzullo's intersection).
    Falseticker,
    /// In the majority, but clustered away.
    Outlier,
    /// Reachable, but not usable yet (too few samples, bad header, distance too large).
    #[default]
    Unusable,
    /// No answer in the last eight polls.
    Unreachable,
    /// It sent this kiss-o'-death (DENY, RSTR): it is backed off.
    Denied([u8; 4]),
}

impl SourceState {
    /// The word `ntp-xdp status` shows.
    pub fn describe(&self) -> String {
        match self {
            SourceState::Selected => "selected".into(),
            SourceState::Candidate => "candidate".into(),
            SourceState::Falseticker => "falseticker".into(),
            SourceState::Outlier => "outlier".into(),
            SourceState::Unusable => "unusable".into(),
            SourceState::Unreachable => "unreachable".into(),
            SourceState::Denied(code) => format!("denied ({})", String::from_utf8_lossy(code)),
        }
    }
}

/// Where served time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockReference {
    /// Nothing published yet.
    #[default]
    Starting,
    /// The daemon's own clock, disciplined against upstream servers.
    Upstreams,
    /// The host clock served as a local stratum (no upstream).
    LocalStratum(u8),
    /// The host clock, disciplined by another daemon (the kernel's sync flag is followed).
    KernelDisciplined,
}

impl ClockReference {
    pub fn describe(&self) -> String {
        match self {
            ClockReference::Starting => "starting".into(),
            ClockReference::Upstreams => "upstream".into(),
            ClockReference::LocalStratum(s) => format!("host clock as local stratum {s}"),
            ClockReference::KernelDisciplined => {
                "host-clock (kernel clock disciplined by another daemon)".into()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceSnapshot {
    pub addr: SocketAddr,
    pub state: SourceState,
    pub reach: u8,
    pub poll: i8,
    pub stratum: Option<u8>,
    pub offset_s: Option<f64>,
    pub delay_s: Option<f64>,
    pub jitter_s: Option<f64>,
    /// Whether the latest sample came from an interleaved response (the server's kernel
    /// transmit timestamp); None before the first sample.
    pub interleaved: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClockSnapshot {
    pub reference: ClockReference,
    pub synchronized: bool,
    pub stratum: u8,
    /// The refid served; `None` while unsynchronized (the kiss code INIT is served).
    pub refid: Option<[u8; 4]>,
    pub leap: Leap,
    /// Last measured offset of the clock against the selected upstreams (s).
    pub offset_s: Option<f64>,
    pub frequency_ppm: f64,
    /// Points the discipline's last fit used: short while the oscillator's rate wanders.
    pub regression_points: usize,
    pub root_delay_s: f64,
    pub root_dispersion_s: f64,
    /// CLOCK_MONOTONIC of the last correction from the reference (by this daemon or, resumed,
    /// by the one before it).
    pub last_sync_mono_ns: Option<u64>,
    /// Synchronized on the last reference's word while no upstream answers (a resumed clock
    /// is in holdover until its upstreams do).
    pub holdover: bool,
    /// This daemon has measured its reference since it started: a synchronization of its own,
    /// not one carried over from the daemon before it.
    pub measured_since_start: bool,
    pub sources: Vec<SourceSnapshot>,
    /// Served time minus the host's CLOCK_REALTIME (s), while synchronized: how far the
    /// host's own clock is from what guests get (filled in by the daemon, which reads it).
    pub host_clock_offset_s: Option<f64>,
}
