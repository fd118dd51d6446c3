//! Guest clock health: the responder's per-guest records turned into figures and an alarm
//! list. Sans-IO: records and the current monotonic time in, a summary out.

use std::net::IpAddr;

use ntp_common::policy::{fixed_to_ns, GuestClock};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct GuestPolicy {
    pub enabled: bool,
    /// Guests further off than this are alarmed.
    pub alarm_offset_s: f64,
    /// Guests not seen for this long are left out.
    pub forget_after_s: f64,
    /// Beyond this, a transmit timestamp is a random cookie, not a clock reading.
    pub opaque_beyond_s: f64,
}

impl GuestReport {
    /// The guest as operators name it: its address, and its VLAN where tagged.
    pub fn name(&self) -> String {
        if self.vlan == 0 {
            self.address.to_string()
        } else {
            format!("{}@vlan{}", self.address, self.vlan)
        }
    }
}

impl Default for GuestPolicy {
    fn default() -> Self {
        GuestPolicy {
            enabled: true,
            alarm_offset_s: 0.1,
            forget_after_s: 3600.0,
            opaque_beyond_s: 86_400.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestReport {
    pub address: IpAddr,
    /// The VLAN the guest's requests came on (0: untagged): tenants may reuse addresses.
    #[serde(default)]
    pub vlan: u16,
    /// The guest's clock minus served time, one-way delay included (s).
    pub offset_s: f64,
    pub requests: u64,
    pub last_seen_s_ago: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestSummary {
    /// Guests seen within `forget_after`.
    pub active: usize,
    /// Of those, guests whose requests carry no clock reading (random transmit timestamps).
    pub opaque: usize,
    /// Guests off by more than the alarm threshold, worst first.
    pub alarmed: Vec<GuestReport>,
    /// The worst few guests with a readable clock, alarmed or not.
    pub worst: Vec<GuestReport>,
    pub alarm_offset_s: f64,
}

/// How many guests `worst` lists.
pub const WORST_LISTED: usize = 10;
/// How many alarmed guests a summary lists (the count is in `alarmed_total`'s metric).
pub const ALARMED_LISTED: usize = 1000;

pub fn summarize(
    records: &[(IpAddr, u16, GuestClock)],
    now_mono_ns: u64,
    policy: &GuestPolicy,
) -> GuestSummary {
    let mut readable = Vec::new();
    let mut summary = GuestSummary {
        alarm_offset_s: policy.alarm_offset_s,
        ..Default::default()
    };
    for (addr, vlan, g) in records {
        let ago = now_mono_ns.saturating_sub(g.last_seen_ns) as f64 * 1e-9;
        if ago > policy.forget_after_s {
            continue;
        }
        summary.active += 1;
        let offset_s = fixed_to_ns(g.offset_fixed) as f64 * 1e-9;
        if offset_s.abs() > policy.opaque_beyond_s {
            summary.opaque += 1;
            continue;
        }
        readable.push(GuestReport {
            address: *addr,
            vlan: *vlan,
            offset_s,
            requests: g.requests,
            last_seen_s_ago: ago,
        });
    }
    readable.sort_by(|a, b| b.offset_s.abs().total_cmp(&a.offset_s.abs()));
    summary.alarmed = readable
        .iter()
        .take_while(|g| g.offset_s.abs() > policy.alarm_offset_s)
        .take(ALARMED_LISTED)
        .cloned()
        .collect();
    summary.worst = readable.into_iter().take(WORST_LISTED).collect();
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rec(last: u8, offset_s: f64, seen_ns: u64) -> (IpAddr, u16, GuestClock) {
        (
            IpAddr::from([169, 254, 100, last]),
            0,
            GuestClock {
                offset_fixed: (offset_s * 4_294_967_296.0) as i64,
                requests: 3,
                last_seen_ns: seen_ns,
            },
        )
    }

    #[test]
    fn alarm_list_is_the_guests_beyond_the_threshold_worst_first() {
        let now = 10_000 * S;
        let records = [
            rec(1, 0.000_05, now - S),
            rec(2, -2.0, now - 2 * S),
            rec(3, 0.5, now - 3 * S),
            // Random cookies (chrony): decades off.
            rec(4, -1.0e9, now - S),
            // Off, but not seen for two hours: forgotten.
            rec(5, 30.0, now - 7200 * S),
        ];
        let s = summarize(&records, now, &GuestPolicy::default());
        assert_eq!(s.active, 4);
        assert_eq!(s.opaque, 1);
        let alarmed: Vec<_> = s.alarmed.iter().map(|g| g.address.to_string()).collect();
        assert_eq!(alarmed, ["169.254.100.2", "169.254.100.3"]);
        assert!((s.alarmed[0].offset_s + 2.0).abs() < 1e-6);
        assert!((s.alarmed[0].last_seen_s_ago - 2.0).abs() < 1e-9);
        assert_eq!(s.worst.len(), 3);
        assert_eq!(s.worst[2].address, IpAddr::from([169, 254, 100, 1]));
    }

    #[test]
    fn nobody_alarmed_when_everyone_is_close() {
        let now = 100 * S;
        let records: Vec<_> = (1..50)
            .map(|i| rec(i, 0.001 * i as f64 / 50.0, now))
            .collect();
        let s = summarize(&records, now, &GuestPolicy::default());
        assert!(s.alarmed.is_empty());
        assert_eq!(s.worst.len(), WORST_LISTED);
    }
}
