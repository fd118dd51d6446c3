//! The Prometheus exposition of a [`StatusReport`], with the maintained `prometheus-client`
//! crate. A fresh registry per scrape: every figure is read from the maps or the clock loop
//! at that moment, so nothing here keeps state of its own.

use std::sync::atomic::AtomicU64;

use anyhow::Result;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use ntp_common::counters::{Counter as XdpCounter, CounterKind};

use crate::clock::snapshot::{SourceSnapshot, SourceState};
use crate::observe::alarms::AlarmKind;
use crate::observe::status::StatusReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathFamily {
    path: &'static str,
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Upstream {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Guest {
    guest: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Alarm {
    alarm: &'static str,
}

type FGauge = Gauge<f64, AtomicU64>;

fn gauge(reg: &mut Registry, name: &str, help: &str, v: f64) {
    let g = FGauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn family_gauge<L>(reg: &mut Registry, name: &str, help: &str, rows: Vec<(L, f64)>)
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, FGauge>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).set(v);
    }
    reg.register(name, help, f);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn family_counter<L>(reg: &mut Registry, name: &str, help: &str, rows: Vec<(L, u64)>)
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, f);
}

/// The text exposition format of `r`.
pub fn encode_report(r: &StatusReport) -> Result<String> {
    let mut reg = Registry::with_prefix("ntpxdp");
    let resp = &r.responder;

    let replies = [
        ("xdp", "ipv4", resp.counter(XdpCounter::AnsweredV4)),
        ("xdp", "ipv6", resp.counter(XdpCounter::AnsweredV6)),
        ("userspace", "ipv4", resp.userspace_answered_ipv4),
        ("userspace", "ipv6", resp.userspace_answered_ipv6),
    ];
    family_counter(
        &mut reg,
        "replies",
        "NTP replies sent, by path and address family",
        replies
            .map(|(path, family, v)| (PathFamily { path, family }, v))
            .to_vec(),
    );

    let dropped = Family::<Reason, Counter>::default();
    let passed = Family::<Reason, Counter>::default();
    for c in XdpCounter::ALL {
        let family = match c.kind() {
            CounterKind::Dropped => &dropped,
            CounterKind::Passed => &passed,
            _ => continue,
        };
        family
            .get_or_create(&Reason {
                reason: c.reason().to_string(),
            })
            .inc_by(resp.counter(*c));
    }
    dropped
        .get_or_create(&Reason {
            reason: "userspace_invalid".into(),
        })
        .inc_by(resp.userspace_dropped);
    dropped
        .get_or_create(&Reason {
            reason: "userspace_refused".into(),
        })
        .inc_by(resp.userspace_refused);
    reg.register("requests_dropped", "Requests dropped, by reason", dropped);
    reg.register(
        "packets_passed",
        "Packets the XDP program left to the kernel, by reason",
        passed,
    );

    family_counter(
        &mut reg,
        "kiss_of_death_sent",
        "Kiss-o'-death replies sent, by code",
        vec![
            (Code { code: "RATE" }, resp.counter(XdpCounter::KodRate)),
            (Code { code: "DENY" }, resp.counter(XdpCounter::KodDeny)),
        ],
    );

    counter(
        &mut reg,
        "rate_limited",
        "Requests over their source's rate (dropped or answered with RATE)",
        resp.counter(XdpCounter::DroppedRateLimited) + resp.counter(XdpCounter::KodRate),
    );
    counter(
        &mut reg,
        "replies_unsynchronized",
        "XDP replies that said LI=3 (unsynchronized or stale anchor)",
        resp.counter(XdpCounter::AnsweredUnsynchronized),
    );
    gauge(
        &mut reg,
        "rate_limit_sources",
        "Sources the rate table tracks",
        resp.rate_limited_sources_tracked as f64,
    );

    let c = &r.clock;
    gauge(
        &mut reg,
        "clock_synchronized",
        "1 when the clock is synchronized",
        c.synchronized as u8 as f64,
    );
    gauge(
        &mut reg,
        "clock_stratum",
        "Stratum served",
        c.stratum as f64,
    );
    gauge(
        &mut reg,
        "clock_leap",
        "Leap indicator served",
        c.leap.bits() as f64,
    );
    if let Some(o) = c.offset_s {
        gauge(
            &mut reg,
            "clock_offset_seconds",
            "Last measured offset against the upstreams",
            o,
        );
    }
    gauge(
        &mut reg,
        "clock_frequency_ppm",
        "Frequency correction of the clock model",
        c.frequency_ppm,
    );
    if let Some(o) = c.host_clock_offset_s {
        gauge(
            &mut reg,
            "clock_host_offset_seconds",
            "Served time minus the host's CLOCK_REALTIME",
            o,
        );
    }
    if let Some(b) = c.served_error_bound_s() {
        gauge(
            &mut reg,
            "clock_served_error_bound_seconds",
            "Bound on |served time - true time| the replies state (root delay/2 + root dispersion)",
            b,
        );
    }
    gauge(
        &mut reg,
        "clock_regression_points",
        "Points the discipline's last fit used (short while the oscillator's rate wanders)",
        c.regression_points as f64,
    );
    gauge(
        &mut reg,
        "clock_root_delay_seconds",
        "Root delay",
        c.root_delay_s,
    );
    gauge(
        &mut reg,
        "clock_root_dispersion_seconds",
        "Root dispersion",
        c.root_dispersion_s,
    );
    gauge(
        &mut reg,
        "clock_root_distance_seconds",
        "Root distance (delay/2 + dispersion)",
        c.root_distance_s(),
    );
    if r.anchor.published {
        gauge(
            &mut reg,
            "anchor_age_seconds",
            "Age of the anchor the kernel serves",
            r.anchor.age_s,
        );
    }

    let up = |f: &dyn Fn(&SourceSnapshot) -> Option<f64>| {
        c.sources
            .iter()
            .filter_map(|s| {
                f(s).map(|v| {
                    (
                        Upstream {
                            upstream: s.addr.to_string(),
                        },
                        v,
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    family_gauge(
        &mut reg,
        "upstream_reach",
        "8-bit reachability register",
        up(&|s| Some(s.reach as f64)),
    );
    family_gauge(
        &mut reg,
        "upstream_interleaved",
        "1 when the latest sample came from an interleaved response (the server's kernel transmit timestamp)",
        up(&|s| s.interleaved.map(|x| x as u8 as f64)),
    );
    family_gauge(
        &mut reg,
        "upstream_selected",
        "1 for the system peer",
        up(&|s| Some((s.state == SourceState::Selected) as u8 as f64)),
    );
    family_gauge(
        &mut reg,
        "upstream_falseticker",
        "1 when outvoted by the others",
        up(&|s| Some((s.state == SourceState::Falseticker) as u8 as f64)),
    );
    family_gauge(
        &mut reg,
        "upstream_offset_seconds",
        "Filtered offset",
        up(&|s| s.offset_s),
    );
    family_gauge(
        &mut reg,
        "upstream_delay_seconds",
        "Round-trip delay",
        up(&|s| s.delay_s),
    );
    family_gauge(
        &mut reg,
        "upstream_jitter_seconds",
        "Filter jitter",
        up(&|s| s.jitter_s),
    );

    let g = &r.guests;
    gauge(
        &mut reg,
        "guests_active",
        "Guests seen recently",
        g.active as f64,
    );
    gauge(
        &mut reg,
        "guests_opaque",
        "Guests whose requests carry no readable clock",
        g.opaque as f64,
    );
    gauge(
        &mut reg,
        "guest_clock_alarms",
        "Guests whose clock is off beyond the threshold",
        g.alarmed.len() as f64,
    );
    family_gauge(
        &mut reg,
        "guest_clock_offset_seconds",
        "Apparent clock error of each alarmed guest",
        g.alarmed
            .iter()
            .map(|x| (Guest { guest: x.name() }, x.offset_s))
            .collect(),
    );
    family_gauge(
        &mut reg,
        "alarm",
        "1 while the alarm is raised",
        AlarmKind::ALL
            .iter()
            .map(|k| {
                let on = r.alarms.iter().any(|a| a.name == k.name());
                (Alarm { alarm: k.name() }, on as u8 as f64)
            })
            .collect(),
    );
    gauge(
        &mut reg,
        "uptime_seconds",
        "Seconds since the daemon started",
        r.uptime_s,
    );
    if let Some(v) = &r.vrrp {
        gauge(
            &mut reg,
            "vrrp_master",
            "1 while this redundant VIP host holds the service and clock addresses",
            if v.role == "master" { 1.0 } else { 0.0 },
        );
        gauge(
            &mut reg,
            "vrrp_transitions",
            "VRRP role changes since the daemon started",
            v.transitions as f64,
        );
    }
    if let Some(f) = &r.fleet {
        gauge(
            &mut reg,
            "fleet_store_up",
            "1 while the fleet's etcd is reachable",
            f.store_reachable as u8 as f64,
        );
        gauge(
            &mut reg,
            "fleet_config_revision",
            "The fleet config revision this host runs (0: its local file)",
            f.config_revision as f64,
        );
    }
    if let Some(n) = &r.nts {
        let by_outcome = |rows: &[(&'static str, u64)]| {
            rows.iter()
                .map(|&(outcome, v)| (Outcome { outcome }, v))
                .collect()
        };
        family_counter(
            &mut reg,
            "nts_key_exchanges",
            "NTS key exchanges, by outcome (refused: access list or rate; source_limit: the \
             address or IPv6 /64 had its share running; busy: the server had its most running; \
             deadline: the client did not finish in time)",
            by_outcome(&[
                ("ok", n.key_exchanges),
                ("failed", n.key_exchange_failures),
                ("refused", n.key_exchanges_refused),
                ("source_limit", n.key_exchanges_over_source_limit),
                ("busy", n.key_exchanges_busy),
                ("deadline", n.key_exchange_deadlines),
            ]),
        );
        family_counter(
            &mut reg,
            "nts_requests",
            "NTS-protected requests, by outcome (failures get an NTS NAK, malformed nothing)",
            by_outcome(&[
                ("answered", n.requests_answered),
                ("cookie_failure", n.cookie_failures),
                ("authentication_failure", n.authentication_failures),
                ("malformed", n.malformed),
            ]),
        );
        counter(
            &mut reg,
            "nts_key_rotations",
            "NTS cookie key rotations",
            n.key_rotations,
        );
    }

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_the_figures() {
        let mut r = StatusReport::default();
        r.responder.counters.insert("answered_ipv4".into(), 42);
        r.responder
            .counters
            .insert("dropped_rate_limited".into(), 7);
        r.responder.counters.insert("kod_rate".into(), 1);
        r.clock.sources.push(SourceSnapshot {
            addr: "169.254.1.1:123".parse().unwrap(),
            state: SourceState::Selected,
            reach: 255,
            poll: 6,
            stratum: Some(1),
            offset_s: None,
            delay_s: None,
            jitter_s: None,
            interleaved: None,
        });
        r.clock.synchronized = true;
        r.clock.root_delay_s = 40e-6;
        r.clock.root_dispersion_s = 7e-6;
        r.alarms.push(crate::observe::alarms::ActiveAlarm {
            name: "drop_rate".into(),
            since_s_ago: 1.0,
            detail: String::new(),
        });
        let text = encode_report(&r).unwrap();
        for want in [
            "ntpxdp_replies_total{path=\"xdp\",family=\"ipv4\"} 42",
            "ntpxdp_requests_dropped_total{reason=\"rate_limited\"} 7",
            "ntpxdp_kiss_of_death_sent_total{code=\"RATE\"} 1",
            "ntpxdp_rate_limited_total 8",
            "ntpxdp_upstream_reach{upstream=\"169.254.1.1:123\"} 255",
            "ntpxdp_alarm{alarm=\"drop_rate\"} 1",
            "ntpxdp_alarm{alarm=\"no_sync\"} 0",
            "ntpxdp_clock_served_error_bound_seconds 0.000027",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    /// Sample names in an exposition: a counter's samples end in `_total`.
    fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                [name, "counter"] => Some(format!("{name}_total")),
                [name, _] => Some(name.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Every `ntpxdp_` name in `text` (a PromQL expression, a rules file, a dashboard).
    fn named_metrics(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("ntpxdp_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        names
    }

    /// The alerting rules and the Grafana dashboard the package ships query only metrics the
    /// daemon exports (with every optional section on: VRRP, NTS, the fleet).
    #[test]
    fn shipped_rules_and_dashboard_name_exported_metrics() {
        let mut r = StatusReport::default();
        r.clock.offset_s = Some(0.001);
        r.clock.host_clock_offset_s = Some(0.001);
        r.anchor.published = true;
        r.vrrp = Some(Default::default());
        r.nts = Some(Default::default());
        r.fleet = Some(Default::default());
        let exported = exported_names(&encode_report(&r).unwrap());
        let rules = include_str!("../../../xtask/deb/monitoring/ntp-xdp.rules.yml");
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../../xtask/deb/monitoring/ntp-xdp.dashboard.json"
        ))
        .unwrap();
        let mut queries: Vec<String> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().unwrap().iter())
            .map(|t| t["expr"].as_str().unwrap().to_string())
            .collect();
        queries.extend(
            dashboard["templating"]["list"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v["definition"].as_str().map(str::to_string)),
        );
        assert!(queries.len() >= 10, "{queries:?}");
        for q in &queries {
            assert!(!named_metrics(q).is_empty(), "a query names no metric: {q}");
        }
        let mut named = named_metrics(rules);
        named.extend(queries.iter().flat_map(|q| named_metrics(q)));
        assert!(named.len() > 20);
        let unknown: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "not exported: {unknown:?}\nexported: {exported:?}"
        );
    }
}
