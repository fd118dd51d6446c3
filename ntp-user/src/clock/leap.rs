//! Leap seconds: when an announced leap takes effect, and the optional 24-hour linear smear
//! (as the big clouds serve it) that hides it from clients.

use ntp_common::time::{NANOS_PER_SEC, NTP_UNIX_OFFSET_SECS};

const DAY_NS: u64 = 86_400 * NANOS_PER_SEC;
/// The smear runs from 12 h before the leap to 12 h after it.
pub const SMEAR_HALF_WINDOW_NS: u64 = DAY_NS / 2;

/// Days since 1970-01-01 of a civil date (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// A leap second announced by LI takes effect at the end of the current UTC month: this is the
/// NTP time of the first instant of the next month.
pub fn end_of_month_ntp_ns(ntp_ns: u64) -> u64 {
    let unix_days =
        (ntp_ns / NANOS_PER_SEC) as i64 / 86_400 - (NTP_UNIX_OFFSET_SECS / 86_400) as i64;
    let (y, m, _) = civil_from_days(unix_days);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next = days_from_civil(ny, nm, 1) + (NTP_UNIX_OFFSET_SECS / 86_400) as i64;
    next as u64 * DAY_NS
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leap {
    /// +1 s inserted (LI=1) or deleted (LI=2).
    pub insert: bool,
    /// NTP time (before the leap is applied) at which it takes effect.
    pub at_ntp_ns: u64,
}

impl Leap {
    /// How the model's time moves when the leap takes effect.
    pub fn step_ns(&self) -> i64 {
        if self.insert {
            -(NANOS_PER_SEC as i64)
        } else {
            NANOS_PER_SEC as i64
        }
    }

    /// Smear applied at unleaped time `u` (ns since 1900): ramps linearly from 0 to the leap's
    /// full second across the window. Served time = u − smear.
    pub fn smear_ns(&self, u: u64) -> i64 {
        let start = self.at_ntp_ns - SMEAR_HALF_WINDOW_NS;
        let full = -self.step_ns();
        if u <= start {
            0
        } else if u >= self.at_ntp_ns + SMEAR_HALF_WINDOW_NS {
            full
        } else {
            ((u - start) as i128 * full as i128 / DAY_NS as i128) as i64
        }
    }

    /// Whether `u` lies inside the smear window.
    pub fn smearing_at(&self, u: u64) -> bool {
        u > self.at_ntp_ns - SMEAR_HALF_WINDOW_NS && u < self.at_ntp_ns + SMEAR_HALF_WINDOW_NS
    }

    /// Rate change of served time during the smear (ppm): -11.57 for an inserted second.
    pub fn smear_rate_ppm(&self) -> f64 {
        self.step_ns() as f64 / DAY_NS as f64 * 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ntp_of(y: i64, m: u32, d: u32, secs: u64) -> u64 {
        ((days_from_civil(y, m, d) as u64 * 86_400 + NTP_UNIX_OFFSET_SECS) + secs) * NANOS_PER_SEC
    }

    #[test]
    fn calendar_round_trip() {
        for z in [-719_468, -1, 0, 1, 10_957, 17_167, 20_000, 24_000, 60_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2016, 12, 31), 17_166);
    }

    #[test]
    fn leaps_take_effect_at_month_end() {
        // The 2016-12-31 leap second: LI=1 seen during December takes effect 2017-01-01 00:00.
        assert_eq!(
            end_of_month_ntp_ns(ntp_of(2016, 12, 31, 3600)),
            ntp_of(2017, 1, 1, 0)
        );
        assert_eq!(
            end_of_month_ntp_ns(ntp_of(2015, 6, 1, 0)),
            ntp_of(2015, 7, 1, 0)
        );
        // February of a leap year.
        assert_eq!(
            end_of_month_ntp_ns(ntp_of(2028, 2, 29, 86_399)),
            ntp_of(2028, 3, 1, 0)
        );
        // NTP seconds of 2017-01-01 are well known: 3692217600.
        assert_eq!(ntp_of(2017, 1, 1, 0) / NANOS_PER_SEC, 3_692_217_600);
    }

    #[test]
    fn smear_is_linear_over_24_hours() {
        let leap = Leap {
            insert: true,
            at_ntp_ns: ntp_of(2017, 1, 1, 0),
        };
        let at = leap.at_ntp_ns;
        assert_eq!(leap.smear_ns(at - SMEAR_HALF_WINDOW_NS), 0);
        assert_eq!(leap.smear_ns(at), 500_000_000);
        assert_eq!(leap.smear_ns(at + SMEAR_HALF_WINDOW_NS), 1_000_000_000);
        assert_eq!(leap.smear_ns(at + 10 * SMEAR_HALF_WINDOW_NS), 1_000_000_000);
        assert!((leap.smear_rate_ppm() + 11.574).abs() < 1e-3);
        let del = Leap {
            insert: false,
            ..leap
        };
        assert_eq!(del.smear_ns(at), -500_000_000);
        assert!((del.smear_rate_ppm() - 11.574).abs() < 1e-3);
    }
}
