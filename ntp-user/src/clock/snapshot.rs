//! What the clock core shows of itself: a typed snapshot, built on request from its state.
//! It is the `clock` of the status report `ntp-xdp status --json` sends, and what the metrics
//! export: its serde form is that report's wire form (words for states, the refid as people
//! read it, the leap indicator's bits).

use std::net::SocketAddr;

use ntp_common::wire::Leap;
use serde::ser::SerializeStruct as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How the last selection judged an upstream, or why it was not judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
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

impl From<SourceState> for String {
    fn from(state: SourceState) -> String {
        state.describe()
    }
}

impl TryFrom<String> for SourceState {
    type Error = String;

    fn try_from(word: String) -> Result<SourceState, String> {
        use SourceState::*;
        let denied = || {
            let code = word.strip_prefix("denied (")?.strip_suffix(')')?;
            Some(Denied(code.as_bytes().try_into().ok()?))
        };
        [
            Selected,
            Candidate,
            Falseticker,
            Outlier,
            Unusable,
            Unreachable,
        ]
        .into_iter()
        .find(|state| state.describe() == word)
        .or_else(denied)
        .ok_or_else(|| format!("{word:?} is not an upstream's state"))
    }
}

/// Where served time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
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

const LOCAL_STRATUM_WORDS: &str = "host clock as local stratum ";

impl ClockReference {
    pub fn describe(&self) -> String {
        match self {
            ClockReference::Starting => "starting".into(),
            ClockReference::Upstreams => "upstream".into(),
            ClockReference::LocalStratum(s) => format!("{LOCAL_STRATUM_WORDS}{s}"),
            ClockReference::KernelDisciplined => {
                "host-clock (kernel clock disciplined by another daemon)".into()
            }
        }
    }
}

impl From<ClockReference> for String {
    fn from(reference: ClockReference) -> String {
        reference.describe()
    }
}

impl TryFrom<String> for ClockReference {
    type Error = String;

    fn try_from(words: String) -> Result<ClockReference, String> {
        use ClockReference::*;
        let local = || {
            Some(LocalStratum(
                words.strip_prefix(LOCAL_STRATUM_WORDS)?.parse().ok()?,
            ))
        };
        [Starting, Upstreams, KernelDisciplined]
            .into_iter()
            .find(|reference| reference.describe() == words)
            .or_else(local)
            .ok_or_else(|| format!("{words:?} is not a clock reference"))
    }
}

/// An upstream as the last selection saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceSnapshot {
    #[serde(rename = "address")]
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
    #[serde(default)]
    pub interleaved: Option<bool>,
}

/// The clock as `ntp-xdp status` shows it. Serialized by hand (see `Serialize` below): the
/// refid's text depends on the stratum beside it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ClockSnapshot {
    pub reference: ClockReference,
    pub synchronized: bool,
    pub stratum: u8,
    /// The refid served; `None` while unsynchronized (the kiss code INIT is served).
    #[serde(deserialize_with = "refid_from_text")]
    pub refid: Option<[u8; 4]>,
    #[serde(deserialize_with = "leap_from_bits")]
    pub leap: Leap,
    /// Last measured offset of the clock against the selected upstreams (s).
    pub offset_s: Option<f64>,
    pub frequency_ppm: f64,
    /// Points the discipline's last fit used: short while the oscillator's rate wanders (0
    /// without a disciplined clock).
    #[serde(default)]
    pub regression_points: usize,
    pub root_delay_s: f64,
    pub root_dispersion_s: f64,
    /// CLOCK_MONOTONIC of the last correction from the reference (by this daemon or, resumed,
    /// by the one before it).
    pub last_sync_mono_ns: Option<u64>,
    /// Synchronized on the last reference's word while no upstream answers (a resumed clock
    /// is in holdover until its upstreams do).
    #[serde(default)]
    pub holdover: bool,
    /// This daemon has measured its reference since it started: a synchronization of its own,
    /// not one carried over from the daemon before it.
    #[serde(default)]
    pub measured_since_start: bool,
    pub sources: Vec<SourceSnapshot>,
    /// Served time minus the host's CLOCK_REALTIME (s), while synchronized: how far the
    /// host's own clock is from what guests get (filled in by the daemon, which reads it).
    #[serde(default)]
    pub host_clock_offset_s: Option<f64>,
}

impl ClockSnapshot {
    /// RFC 5905 root distance: what a client adds to its error bound for this server.
    pub fn root_distance_s(&self) -> f64 {
        self.root_delay_s / 2.0 + self.root_dispersion_s
    }

    /// The bound on |served time − true time| a guest reads from the replies (root delay / 2 +
    /// root dispersion), while they claim synchronization.
    pub fn served_error_bound_s(&self) -> Option<f64> {
        self.synchronized.then(|| self.root_distance_s())
    }

    /// The refid as people read it; INIT while unsynchronized.
    pub fn refid_text(&self) -> String {
        self.refid
            .map_or_else(|| "INIT".into(), |r| refid_text(r, self.stratum))
    }
}

impl Serialize for ClockSnapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("ClockSnapshot", 15)?;
        s.serialize_field("reference", &self.reference)?;
        s.serialize_field("synchronized", &self.synchronized)?;
        s.serialize_field("stratum", &self.stratum)?;
        s.serialize_field("refid", &self.refid_text())?;
        s.serialize_field("leap", &self.leap.bits())?;
        s.serialize_field("offset_s", &self.offset_s)?;
        s.serialize_field("frequency_ppm", &self.frequency_ppm)?;
        s.serialize_field("regression_points", &self.regression_points)?;
        s.serialize_field("root_delay_s", &self.root_delay_s)?;
        s.serialize_field("root_dispersion_s", &self.root_dispersion_s)?;
        s.serialize_field("last_sync_mono_ns", &self.last_sync_mono_ns)?;
        s.serialize_field("holdover", &self.holdover)?;
        s.serialize_field("measured_since_start", &self.measured_since_start)?;
        s.serialize_field("sources", &self.sources)?;
        s.serialize_field("host_clock_offset_s", &self.host_clock_offset_s)?;
        s.end()
    }
}

/// A reference ID as people read it: a dotted IPv4 address (stratum 2 and above: the
/// upstream's address or its IPv6 address's hash), or the ASCII code.
pub fn refid_text(refid: [u8; 4], stratum: u8) -> String {
    if stratum >= 2 {
        std::net::Ipv4Addr::from(refid).to_string()
    } else {
        refid
            .iter()
            .take_while(|b| **b != 0)
            .map(|b| {
                if b.is_ascii_graphic() {
                    *b as char
                } else {
                    '?'
                }
            })
            .collect()
    }
}

/// The refid back from [`refid_text`]'s text: a dotted address, or a code of up to four
/// characters (INIT: none).
fn refid_from_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 4]>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "INIT" {
        return Ok(None);
    }
    if let Ok(address) = text.parse::<std::net::Ipv4Addr>() {
        return Ok(Some(address.octets()));
    }
    let mut code = [0u8; 4];
    if text.len() > code.len() {
        return Err(serde::de::Error::custom(format!(
            "{text:?} is neither an address nor a reference code"
        )));
    }
    code[..text.len()].copy_from_slice(text.as_bytes());
    Ok(Some(code))
}

fn leap_from_bits<'de, D: Deserializer<'de>>(d: D) -> Result<Leap, D::Error> {
    Ok(Leap::from_bits(u8::deserialize(d)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refids_read_as_people_expect() {
        assert_eq!(refid_text([169, 254, 0, 1], 3), "169.254.0.1");
        assert_eq!(refid_text(*b"LOCL", 10), "76.79.67.76");
        assert_eq!(refid_text(*b"GPS\0", 1), "GPS");
        assert_eq!(refid_text(*b"INIT", 0), "INIT");
    }

    fn upstream_clock() -> ClockSnapshot {
        ClockSnapshot {
            reference: ClockReference::Upstreams,
            synchronized: true,
            stratum: 3,
            refid: Some([169, 254, 0, 1]),
            leap: Leap::InsertSecond,
            offset_s: Some(-2.5e-6),
            frequency_ppm: 12.25,
            regression_points: 9,
            root_delay_s: 40e-6,
            root_dispersion_s: 7e-6,
            last_sync_mono_ns: Some(123_456_789),
            holdover: true,
            measured_since_start: true,
            sources: vec![
                SourceSnapshot {
                    addr: "169.254.0.1:123".parse().unwrap(),
                    state: SourceState::Selected,
                    reach: 0o377,
                    poll: 4,
                    stratum: Some(2),
                    offset_s: Some(1e-6),
                    delay_s: Some(2e-6),
                    jitter_s: Some(3e-7),
                    interleaved: Some(true),
                },
                SourceSnapshot {
                    addr: "[fd00::1]:123".parse().unwrap(),
                    state: SourceState::Denied(*b"RSTR"),
                    reach: 0,
                    poll: 10,
                    stratum: None,
                    offset_s: None,
                    delay_s: None,
                    jitter_s: None,
                    interleaved: None,
                },
            ],
            host_clock_offset_s: Some(1.5e-6),
        }
    }

    /// The control socket's JSON: the words, texts and numbers its readers (`ntp-xdp status`,
    /// the fleet's heartbeat, the tests) look for, under the names they look for them.
    #[test]
    fn the_wire_form_is_what_status_readers_read() {
        let json = serde_json::to_value(upstream_clock()).unwrap();
        let want = serde_json::json!({
            "reference": "upstream",
            "synchronized": true,
            "stratum": 3,
            "refid": "169.254.0.1",
            "leap": 1,
            "offset_s": -2.5e-6,
            "frequency_ppm": 12.25,
            "regression_points": 9,
            "root_delay_s": 40e-6,
            "root_dispersion_s": 7e-6,
            "last_sync_mono_ns": 123_456_789,
            "holdover": true,
            "measured_since_start": true,
            "sources": [
                {
                    "address": "169.254.0.1:123",
                    "state": "selected",
                    "reach": 255,
                    "poll": 4,
                    "stratum": 2,
                    "offset_s": 1e-6,
                    "delay_s": 2e-6,
                    "jitter_s": 3e-7,
                    "interleaved": true,
                },
                {
                    "address": "[fd00::1]:123",
                    "state": "denied (RSTR)",
                    "reach": 0,
                    "poll": 10,
                    "stratum": null,
                    "offset_s": null,
                    "delay_s": null,
                    "jitter_s": null,
                    "interleaved": null,
                },
            ],
            "host_clock_offset_s": 1.5e-6,
        });
        assert_eq!(json, want);
    }

    #[test]
    fn the_wire_form_reads_back_as_the_snapshot() {
        let mut clocks = vec![upstream_clock(), ClockSnapshot::default()];
        for (reference, stratum, refid) in [
            (ClockReference::LocalStratum(10), 10, *b"LOCL"),
            (ClockReference::LocalStratum(1), 1, *b"GPS\0"),
            (ClockReference::KernelDisciplined, 4, *b"LOCL"),
        ] {
            clocks.push(ClockSnapshot {
                reference,
                synchronized: true,
                stratum,
                refid: Some(refid),
                ..Default::default()
            });
        }
        for state in [
            SourceState::Candidate,
            SourceState::Falseticker,
            SourceState::Outlier,
            SourceState::Unusable,
            SourceState::Unreachable,
        ] {
            let mut c = upstream_clock();
            c.sources[0].state = state;
            clocks.push(c);
        }
        for clock in clocks {
            let text = serde_json::to_string(&clock).unwrap();
            let back: ClockSnapshot = serde_json::from_str(&text).unwrap();
            assert_eq!(back, clock, "{text}");
        }
    }

    #[test]
    fn unknown_words_are_refused() {
        for words in ["\"upstreams\"", "\"host clock as local stratum x\""] {
            assert!(
                serde_json::from_str::<ClockReference>(words).is_err(),
                "{words}"
            );
        }
        for words in ["\"chosen\"", "\"denied (TOOLONG)\""] {
            assert!(
                serde_json::from_str::<SourceState>(words).is_err(),
                "{words}"
            );
        }
    }
}
