//! Operator alarms: thresholds on what the daemon and the responder report, raised and
//! cleared as transitions (each logged once). Sans-IO: inputs at an instant in, transitions out.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct AlarmThresholds {
    pub no_sync_after_s: f64,
    pub max_offset_s: f64,
    pub max_anchor_age_s: f64,
    pub max_drop_fraction: f64,
    pub window_s: f64,
}

impl Default for AlarmThresholds {
    fn default() -> Self {
        AlarmThresholds {
            no_sync_after_s: 300.0,
            max_offset_s: 0.005,
            max_anchor_age_s: 5.0,
            max_drop_fraction: 0.01,
            window_s: 10.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// No correction from an upstream for too long (or never since start).
    NoSync,
    /// The clock's last measured offset against its upstreams is too large.
    Offset,
    /// The anchor the kernel serves is too old: the daemon stopped publishing.
    AnchorAge,
    /// Too many requests dropped or refused (malformed, rate-limited, denied).
    DropRate,
    /// Guests whose clocks are off by more than the guest threshold.
    GuestClocks,
    /// A redundant VIP host that cannot hold the addresses (its health check fails: the
    /// clock unsynchronized or stale, an uplink down): it is, or will be, in VRRP FAULT.
    VrrpFault,
    /// A fleet member that cannot reach the fleet's store (etcd): it serves with its last
    /// good configuration and sees no pushes or commands.
    FleetStore,
}

impl AlarmKind {
    pub const ALL: [AlarmKind; 7] = [
        AlarmKind::NoSync,
        AlarmKind::Offset,
        AlarmKind::AnchorAge,
        AlarmKind::DropRate,
        AlarmKind::GuestClocks,
        AlarmKind::VrrpFault,
        AlarmKind::FleetStore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AlarmKind::NoSync => "no_sync",
            AlarmKind::Offset => "offset",
            AlarmKind::AnchorAge => "anchor_age",
            AlarmKind::DropRate => "drop_rate",
            AlarmKind::GuestClocks => "guest_clocks",
            AlarmKind::VrrpFault => "vrrp_fault",
            AlarmKind::FleetStore => "fleet_store_unreachable",
        }
    }
}

/// What the alarms look at, at monotonic instant `now_s`.
#[derive(Debug, Clone, Default)]
pub struct AlarmInputs {
    pub now_s: f64,
    pub started_s: f64,
    /// When the clock was last corrected from its reference (None: never).
    pub last_sync_s: Option<f64>,
    pub offset_s: Option<f64>,
    pub anchor_age_s: Option<f64>,
    /// Cumulative requests the responder judged (answered or refused) and refused.
    pub judged: u64,
    pub refused: u64,
    pub guests_alarmed: usize,
    /// With redundancy: why this host is unhealthy (None: healthy, or no redundancy).
    pub vrrp_unhealthy: Option<String>,
    /// In a fleet: why its store cannot be reached (None: reachable, or no fleet).
    pub fleet_unreachable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub kind: AlarmKind,
    pub raised: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlarm {
    pub name: String,
    pub since_s_ago: f64,
    pub detail: String,
}

/// Fewer requests than this in the window say nothing about a drop rate.
const MIN_REQUESTS_FOR_RATE: u64 = 100;

pub struct Alarms {
    thresholds: AlarmThresholds,
    /// Raised alarms: when, and the detail at the last evaluation.
    active: BTreeMap<AlarmKind, (f64, String)>,
    samples: VecDeque<(f64, u64, u64)>,
    last_now_s: f64,
}

impl Alarms {
    pub fn new(thresholds: AlarmThresholds) -> Alarms {
        Alarms {
            thresholds,
            active: BTreeMap::new(),
            samples: VecDeque::new(),
            last_now_s: 0.0,
        }
    }

    pub fn evaluate(&mut self, i: &AlarmInputs) -> Vec<Transition> {
        let t = &self.thresholds;
        self.last_now_s = i.now_s;
        self.samples.push_back((i.now_s, i.judged, i.refused));
        while self
            .samples
            .front()
            .is_some_and(|(s, _, _)| i.now_s - s > t.window_s)
        {
            self.samples.pop_front();
        }
        let mut state: Vec<(AlarmKind, Option<String>)> = Vec::new();
        let unsynced_for = i.now_s - i.last_sync_s.unwrap_or(i.started_s);
        state.push((
            AlarmKind::NoSync,
            (unsynced_for > t.no_sync_after_s).then(|| match i.last_sync_s {
                Some(_) => format!("no correction from an upstream for {unsynced_for:.0} s"),
                None => format!("never synchronized in {unsynced_for:.0} s since start"),
            }),
        ));
        state.push((
            AlarmKind::Offset,
            i.offset_s
                .filter(|o| o.abs() > t.max_offset_s)
                .map(|o| format!("last offset {:.6} s exceeds {:.6} s", o, t.max_offset_s)),
        ));
        state.push((
            AlarmKind::AnchorAge,
            i.anchor_age_s
                .filter(|a| *a > t.max_anchor_age_s)
                .map(|a| format!("the served anchor is {a:.1} s old")),
        ));
        let drop = self.samples.front().and_then(|(_, j0, r0)| {
            let judged = i.judged.saturating_sub(*j0);
            let refused = i.refused.saturating_sub(*r0);
            (judged >= MIN_REQUESTS_FOR_RATE).then(|| (refused as f64 / judged as f64, judged))
        });
        state.push((
            AlarmKind::DropRate,
            drop.filter(|(f, _)| *f > t.max_drop_fraction)
                .map(|(f, n)| {
                    format!(
                        "{:.2}% of {n} requests dropped or refused in the last {:.0} s",
                        f * 100.0,
                        t.window_s
                    )
                }),
        ));
        state.push((
            AlarmKind::GuestClocks,
            (i.guests_alarmed > 0).then(|| {
                format!(
                    "{} guest clock(s) off beyond the threshold",
                    i.guests_alarmed
                )
            }),
        ));
        state.push((
            AlarmKind::VrrpFault,
            i.vrrp_unhealthy
                .as_ref()
                .map(|why| format!("this VIP host cannot hold the addresses: {why}")),
        ));
        state.push((
            AlarmKind::FleetStore,
            i.fleet_unreachable.as_ref().map(|why| {
                format!("the fleet store is unreachable (serving the last good config): {why}")
            }),
        ));
        let mut transitions = Vec::new();
        for (kind, detail) in state {
            match (detail, self.active.contains_key(&kind)) {
                (Some(d), false) => {
                    self.active.insert(kind, (i.now_s, d.clone()));
                    transitions.push(Transition {
                        kind,
                        raised: true,
                        detail: d,
                    });
                }
                (Some(d), true) => {
                    if let Some(entry) = self.active.get_mut(&kind) {
                        entry.1 = d;
                    }
                }
                (None, true) => {
                    self.active.remove(&kind);
                    transitions.push(Transition {
                        kind,
                        raised: false,
                        detail: String::new(),
                    });
                }
                (None, false) => {}
            }
        }
        transitions
    }

    pub fn is_active(&self, kind: AlarmKind) -> bool {
        self.active.contains_key(&kind)
    }

    pub fn active(&self) -> Vec<ActiveAlarm> {
        self.active
            .iter()
            .map(|(k, (since, detail))| ActiveAlarm {
                name: k.name().to_string(),
                since_s_ago: self.last_now_s - since,
                detail: detail.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced(now: f64) -> AlarmInputs {
        AlarmInputs {
            now_s: now,
            started_s: 0.0,
            last_sync_s: Some(now - 10.0),
            offset_s: Some(1e-5),
            anchor_age_s: Some(0.5),
            ..Default::default()
        }
    }

    #[test]
    fn each_alarm_is_reported_once_per_transition() {
        let mut a = Alarms::new(AlarmThresholds::default());
        assert!(a.evaluate(&synced(100.0)).is_empty());
        let mut i = synced(101.0);
        i.offset_s = Some(0.02);
        let t = a.evaluate(&i);
        assert_eq!(t.len(), 1);
        assert!(t[0].raised && t[0].kind == AlarmKind::Offset, "{t:?}");
        // Still too large: no new transition.
        i.now_s = 102.0;
        assert!(a.evaluate(&i).is_empty());
        assert_eq!(a.active().len(), 1);
        assert!((a.active()[0].since_s_ago - 1.0).abs() < 1e-9);
        // Back within bounds: one clear.
        let t = a.evaluate(&synced(103.0));
        assert_eq!(
            t,
            vec![Transition {
                kind: AlarmKind::Offset,
                raised: false,
                detail: String::new()
            }]
        );
    }

    #[test]
    fn no_sync_counts_from_start_until_the_first_sync() {
        let mut a = Alarms::new(AlarmThresholds::default());
        let mut i = AlarmInputs {
            now_s: 200.0,
            started_s: 0.0,
            ..Default::default()
        };
        assert!(a.evaluate(&i).is_empty());
        i.now_s = 301.0;
        let t = a.evaluate(&i);
        assert!(t[0].raised && t[0].detail.contains("never"), "{t:?}");
        i.last_sync_s = Some(300.5);
        assert!(!a.evaluate(&i)[0].raised);
    }

    #[test]
    fn drop_rate_over_the_window() {
        let mut a = Alarms::new(AlarmThresholds::default());
        let mut i = synced(0.0);
        a.evaluate(&i);
        // 1000 requests, 5 refused: 0.5%, under 1%.
        i.now_s = 5.0;
        i.judged = 1000;
        i.refused = 5;
        assert!(a.evaluate(&i).is_empty());
        // A flood: 100k more, 90k refused.
        i.now_s = 8.0;
        i.judged = 101_000;
        i.refused = 90_005;
        let t = a.evaluate(&i);
        assert!(t[0].kind == AlarmKind::DropRate && t[0].raised, "{t:?}");
        // The flood ends; once it is out of the window the alarm clears.
        i.now_s = 15.0;
        i.judged = 102_000;
        assert!(a.evaluate(&i).is_empty(), "still within the window");
        i.now_s = 30.0;
        i.judged = 103_000;
        let t = a.evaluate(&i);
        assert!(
            t.iter().any(|t| t.kind == AlarmKind::DropRate && !t.raised),
            "{t:?}"
        );
    }

    #[test]
    fn a_stale_anchor_and_guests_raise_their_alarms() {
        let mut a = Alarms::new(AlarmThresholds::default());
        let mut i = synced(50.0);
        i.anchor_age_s = Some(9.0);
        i.guests_alarmed = 2;
        let kinds: Vec<_> = a.evaluate(&i).into_iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [AlarmKind::AnchorAge, AlarmKind::GuestClocks]);
        assert!(a.is_active(AlarmKind::GuestClocks));
    }

    #[test]
    fn an_unhealthy_redundant_host_raises_vrrp_fault() {
        let mut a = Alarms::new(AlarmThresholds::default());
        let mut i = AlarmInputs {
            now_s: 10.0,
            last_sync_s: Some(9.0),
            vrrp_unhealthy: Some("uplink down: eth1".into()),
            ..Default::default()
        };
        let t = a.evaluate(&i);
        assert!(t
            .iter()
            .any(|t| t.kind == AlarmKind::VrrpFault && t.raised && t.detail.contains("eth1")));
        i.now_s = 11.0;
        i.vrrp_unhealthy = None;
        let t = a.evaluate(&i);
        assert!(t
            .iter()
            .any(|t| t.kind == AlarmKind::VrrpFault && !t.raised));
    }
}
