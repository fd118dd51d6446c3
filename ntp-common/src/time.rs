//! Timestamp arithmetic.
//!
//! Internally, NTP time is an unsigned count of nanoseconds since 1900-01-01 00:00:00 UTC, the
//! start of NTP era 0 (`ntp_ns`). A u64 holds that until the year 2484, so there is no era to
//! track inside the daemon or the kernel: the era is dropped only when a value is written on
//! the wire (seconds modulo 2^32) and restored, relative to a pivot, when one is read back.

pub const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
pub const NTP_UNIX_OFFSET_SECS: u64 = 2_208_988_800;
/// Length of one NTP era (2^32 seconds) in nanoseconds.
pub const ERA_NS: u64 = (1u64 << 32) * NANOS_PER_SEC;

/// Frequency corrections are fixed point with 32 fractional bits: `freq_scaled / 2^32` is the
/// rate error in seconds per second. ±2^31 (±0.5) is a hard bound that keeps the
/// multiplication in [`scaled_mul`] inside 64 bits; the daemon clamps far below it.
pub const FREQ_SCALE_BITS: u32 = 32;
pub const MAX_FREQ_SCALED: i64 = (1i64 << 31) - 1;

/// RFC 5905's frequency tolerance PHI: 15 µs of dispersion per second (§7.3). What an anchor
/// whose source states no better grows by.
pub const PHI_NS_PER_SEC: u32 = 15_000;
/// The fastest dispersion growth an anchor carries (ns/s): 16.7 ms/s, beyond any clock worth
/// serving, and small enough that growth × age stays inside 64 bits.
pub const MAX_DISPERSION_GROWTH_NS_PER_S: u32 = (1 << 24) - 1;

#[inline(always)]
pub const fn unix_ns_to_ntp_ns(unix_ns: u64) -> u64 {
    unix_ns + NTP_UNIX_OFFSET_SECS * NANOS_PER_SEC
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years): the maps' unit.
pub fn duration_ns(d: core::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Converts a parts-per-million frequency offset to the fixed-point form of the anchor.
pub fn ppm_to_freq_scaled(ppm: f64) -> i64 {
    let scaled = ppm * 1e-6 * (1u64 << FREQ_SCALE_BITS) as f64;
    let bound = MAX_FREQ_SCALED as f64;
    if scaled.is_nan() {
        0
    } else if scaled > bound {
        MAX_FREQ_SCALED
    } else if scaled < -bound {
        -MAX_FREQ_SCALED
    } else {
        // Round half away from zero without libm.
        (if scaled >= 0.0 {
            scaled + 0.5
        } else {
            scaled - 0.5
        }) as i64
    }
}

pub fn freq_scaled_to_ppm(freq_scaled: i64) -> f64 {
    freq_scaled as f64 / (1u64 << FREQ_SCALE_BITS) as f64 * 1e6
}

/// `x * f / 2^32` without overflow for any `x` and |f| < 2^31, rounding toward zero.
/// Split into high and low 32-bit halves because BPF has no 128-bit multiply.
#[inline(always)]
pub fn scaled_mul(x: i64, f: i64) -> i64 {
    let negative = (x < 0) != (f < 0);
    let ux = x.unsigned_abs();
    let mut uf = f.unsigned_abs();
    if uf > MAX_FREQ_SCALED as u64 {
        uf = MAX_FREQ_SCALED as u64;
    }
    let hi = ux >> 32;
    let lo = ux & 0xffff_ffff;
    let r = hi.wrapping_mul(uf).wrapping_add((lo * uf) >> 32);
    if negative {
        (r as i64).wrapping_neg()
    } else {
        r as i64
    }
}

/// The high 64 bits of the 128-bit product `a × b`, from 32-bit halves (BPF has no wider
/// multiply).
#[inline(always)]
const fn mul_high(a: u64, b: u64) -> u64 {
    let (a_hi, a_lo) = (a >> 32, a & 0xffff_ffff);
    let (b_hi, b_lo) = (b >> 32, b & 0xffff_ffff);
    let lo_lo = a_lo * b_lo;
    let hi_lo = a_hi * b_lo;
    let lo_hi = a_lo * b_hi;
    // Each partial sum fits: (2^32 - 1)^2 + 2 × (2^32 - 1) < 2^64.
    let mid = (lo_lo >> 32) + (hi_lo & 0xffff_ffff) + (lo_hi & 0xffff_ffff);
    a_hi * b_hi + (hi_lo >> 32) + (lo_hi >> 32) + (mid >> 32)
}

/// ⌊n / 10^9⌋ for every u64, exactly, without a division: BPF JITs turn `/` into a hardware
/// divide that costs as much as the rest of a reply's arithmetic. This is the compilers'
/// reciprocal for 10^9 = 2^9 × 1953125: ⌊⌊n / 2^9⌋ × M / 2^64⌋ / 2^11.
#[inline(always)]
pub const fn div_1e9(n: u64) -> u64 {
    mul_high(n >> 9, 0x0044_b82f_a09b_5a53) >> 11
}

/// Nanoseconds since the NTP epoch to an on-wire 32.32 timestamp, rounded to the nearest
/// 2^-32 s. Seconds are taken modulo 2^32: the era is implicit on the wire (RFC 5905 §6).
#[inline(always)]
pub fn ntp_ns_to_timestamp(ntp_ns: u64) -> u64 {
    let secs = div_1e9(ntp_ns);
    let rem = ntp_ns - secs * NANOS_PER_SEC;
    // rem < 2^30, so rem << 32 < 2^62: no overflow. With rem <= 10^9 - 1 the rounded fraction
    // stays below 2^32, so it never spills into the seconds.
    let frac = div_1e9((rem << 32) + NANOS_PER_SEC / 2);
    (secs << 32).wrapping_add(frac)
}

/// The nanoseconds within its era that an on-wire timestamp stands for, rounded to nearest.
#[inline(always)]
pub fn timestamp_to_era_ns(ts: u64) -> u64 {
    let secs = ts >> 32;
    let frac = ts & 0xffff_ffff;
    secs * NANOS_PER_SEC + ((frac * NANOS_PER_SEC + (1 << 31)) >> 32)
}

/// An on-wire timestamp to nanoseconds since the NTP epoch, choosing the era that puts the
/// result closest to `pivot_ntp_ns` (a time known to be within 68 years, such as now).
pub fn timestamp_to_ntp_ns(ts: u64, pivot_ntp_ns: u64) -> u64 {
    let in_era = timestamp_to_era_ns(ts);
    let pivot_era = pivot_ntp_ns / ERA_NS;
    let mut best = pivot_era * ERA_NS + in_era;
    let mut best_dist = best.abs_diff(pivot_ntp_ns);
    for candidate in [
        (pivot_era + 1)
            .checked_mul(ERA_NS)
            .and_then(|b| b.checked_add(in_era)),
        pivot_era.checked_sub(1).map(|e| e * ERA_NS + in_era),
    ]
    .into_iter()
    .flatten()
    {
        let dist = candidate.abs_diff(pivot_ntp_ns);
        if dist < best_dist {
            best = candidate;
            best_dist = dist;
        }
    }
    best
}

/// Signed difference `a - b` of two on-wire timestamps in nanoseconds, valid when they are less
/// than 68 years apart, whatever eras they are in (RFC 5905's 64-bit difference arithmetic).
pub fn timestamp_diff_ns(a: u64, b: u64) -> i64 {
    let d = a.wrapping_sub(b) as i64; // 32.32 signed fixed point
    let secs = d >> 32;
    let frac = (d & 0xffff_ffff) as u64;
    secs * NANOS_PER_SEC as i64 + ((frac * NANOS_PER_SEC) >> 32) as i64
}

/// Nanoseconds to NTP short format (16.16 seconds), rounded up so that delays and dispersions
/// are never understated; saturates at the largest value.
#[inline(always)]
pub fn ns_to_short(ns: u64) -> u32 {
    // 65536 s is the format's limit; anything at or above it saturates.
    if ns >= 65_536 * NANOS_PER_SEC {
        return u32::MAX;
    }
    let v = div_1e9((ns << 16) + NANOS_PER_SEC - 1);
    if v > u32::MAX as u64 {
        u32::MAX
    } else {
        v as u32
    }
}

pub fn short_to_ns(short: u32) -> u64 {
    ((short as u64) * NANOS_PER_SEC) >> 16
}

/// Dispersion added over `age_ns` at `growth_ns_per_s`.
#[inline(always)]
pub fn dispersion_growth_ns(age_ns: u64, growth_ns_per_s: u32) -> u64 {
    // Age capped at 2^40 ns (about 18 minutes times 1000) and growth below 2^24 keep the
    // product in 64 bits; any anchor that old is long past its maximum age.
    let age = if age_ns > (1 << 40) { 1 << 40 } else { age_ns };
    let growth = if growth_ns_per_s > MAX_DISPERSION_GROWTH_NS_PER_S {
        MAX_DISPERSION_GROWTH_NS_PER_S
    } else {
        growth_ns_per_s
    };
    // Rounded up: a bound never shrinks by rounding.
    div_1e9(age * growth as u64 + NANOS_PER_SEC - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn durations_saturate_at_the_maps_limit() {
        assert_eq!(
            duration_ns(core::time::Duration::from_millis(1500)),
            1_500_000_000
        );
        assert_eq!(duration_ns(core::time::Duration::MAX), u64::MAX);
    }

    #[test]
    fn div_1e9_is_exact() {
        let edges = [
            0,
            1,
            SEC - 1,
            SEC,
            SEC + 1,
            u32::MAX as u64,
            (1 << 62) + SEC / 2,
            ERA_NS - 1,
            ERA_NS,
            u64::MAX / SEC * SEC - 1,
            u64::MAX / SEC * SEC,
            u64::MAX - 1,
            u64::MAX,
        ];
        for n in edges {
            assert_eq!(div_1e9(n), n / SEC, "{n}");
        }
        // Every multiple of 10^9 and its neighbours over a spread of magnitudes, and a
        // pseudo-random sweep of the whole range.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = x >> (x % 40);
            assert_eq!(div_1e9(n), n / SEC, "{n}");
            let m = (n / SEC) * SEC;
            for k in [m.wrapping_sub(1), m, m.wrapping_add(1)] {
                assert_eq!(div_1e9(k), k / SEC, "{k}");
            }
        }
    }

    #[test]
    fn timestamp_rounding() {
        // Exactly half a second is 0x8000_0000.
        assert_eq!(ntp_ns_to_timestamp(SEC / 2), 0x8000_0000);
        // 1 ns is 4.29 units of 2^-32 s: rounds to 4.
        assert_eq!(ntp_ns_to_timestamp(1), 4);
        // 999_999_999 ns rounds to 2^32 - 4, not to a carry.
        assert_eq!(ntp_ns_to_timestamp(SEC - 1), (1u64 << 32) - 4);
        // Whole seconds are exact.
        assert_eq!(ntp_ns_to_timestamp(5 * SEC), 5u64 << 32);
    }

    #[test]
    fn timestamp_round_trip_within_half_unit() {
        let pivot = unix_ns_to_ntp_ns(1_763_700_000 * SEC);
        for ns in [
            0u64,
            1,
            2,
            3,
            499_999_999,
            500_000_000,
            999_999_999,
            123_456_789,
        ] {
            let t = pivot + ns;
            let back = timestamp_to_ntp_ns(ntp_ns_to_timestamp(t), pivot);
            // One 2^-32 s unit is 0.23 ns; two roundings stay within 1 ns.
            assert!(back.abs_diff(t) <= 1, "{t} -> {back}");
        }
    }

    #[test]
    fn era_boundary_2036() {
        // 2036-02-07 06:28:16 UTC is the first second of era 1.
        let era1 = ERA_NS;
        let before = era1 - SEC / 4;
        let after = era1 + SEC / 4;
        let ts_before = ntp_ns_to_timestamp(before);
        let ts_after = ntp_ns_to_timestamp(after);
        assert_eq!(ts_before >> 32, 0xffff_ffff);
        assert_eq!(ts_after >> 32, 0);
        // Read back against a pivot on either side of the boundary, the era is restored.
        for pivot in [era1 - 3600 * SEC, era1 + 3600 * SEC] {
            assert_eq!(timestamp_to_ntp_ns(ts_before, pivot), before);
            assert_eq!(timestamp_to_ntp_ns(ts_after, pivot), after);
        }
        // Differences across the boundary are small and signed.
        assert_eq!(timestamp_diff_ns(ts_after, ts_before), (SEC / 2) as i64);
        assert_eq!(timestamp_diff_ns(ts_before, ts_after), -((SEC / 2) as i64));
    }

    #[test]
    fn era_zero_has_no_earlier_era() {
        let ts = ntp_ns_to_timestamp(10 * SEC);
        assert_eq!(timestamp_to_ntp_ns(ts, 0), 10 * SEC);
    }

    #[test]
    fn scaled_mul_matches_wide_arithmetic() {
        let fs = [
            0i64,
            1,
            -1,
            858_993,
            -858_993,
            2_147_483,
            MAX_FREQ_SCALED,
            -MAX_FREQ_SCALED,
        ];
        let xs = [
            0i64,
            1,
            -1,
            999_999_999,
            -5_000_000_000,
            3_600_000_000_000,
            i64::MAX / 4,
        ];
        for &f in &fs {
            for &x in &xs {
                let wide = (x as i128 * f as i128) / (1i128 << 32); // rounds toward zero
                let got = scaled_mul(x, f) as i128;
                // The split form may differ by one unit from a single wide rounding.
                assert!((got - wide).abs() <= 1, "x={x} f={f} got={got} wide={wide}");
            }
        }
    }

    #[test]
    fn ppm_conversion() {
        assert_eq!(ppm_to_freq_scaled(0.0), 0);
        // 1 ppm = 2^32 / 1e6 = 4294.967 units.
        assert_eq!(ppm_to_freq_scaled(1.0), 4295);
        assert_eq!(ppm_to_freq_scaled(-1.0), -4295);
        assert!((freq_scaled_to_ppm(ppm_to_freq_scaled(200.0)) - 200.0).abs() < 1e-3);
        assert_eq!(ppm_to_freq_scaled(1e9), MAX_FREQ_SCALED);
        assert_eq!(ppm_to_freq_scaled(f64::NAN), 0);
    }

    #[test]
    fn short_format() {
        assert_eq!(ns_to_short(0), 0);
        assert_eq!(ns_to_short(SEC), 0x1_0000);
        // Rounded up: 1 ns is one unit, never zero.
        assert_eq!(ns_to_short(1), 1);
        assert_eq!(ns_to_short(15_258), 1); // 2^-16 s = 15258.79 ns
        assert_eq!(ns_to_short(15_259), 2);
        assert_eq!(ns_to_short(70_000 * SEC), u32::MAX);
        assert_eq!(ns_to_short(u64::MAX), u32::MAX);
        assert_eq!(short_to_ns(0x1_0000), SEC);
    }

    #[test]
    fn phi_growth() {
        assert_eq!(dispersion_growth_ns(SEC, PHI_NS_PER_SEC), 15_000);
        assert_eq!(dispersion_growth_ns(100 * SEC, PHI_NS_PER_SEC), 1_500_000);
        assert_eq!(dispersion_growth_ns(0, 7), 0);
        // Rounded up: 3 ppb over half a second is 1.5 ns, served as 2.
        assert_eq!(dispersion_growth_ns(SEC / 2, 3), 2);
        assert_eq!(
            dispersion_growth_ns(u64::MAX, u32::MAX),
            dispersion_growth_ns(1 << 40, MAX_DISPERSION_GROWTH_NS_PER_S)
        );
    }

    #[test]
    fn unix_offset() {
        // 1970-01-01 is 2208988800 s after 1900-01-01.
        assert_eq!(
            ntp_ns_to_timestamp(unix_ns_to_ntp_ns(0)) >> 32,
            2_208_988_800
        );
    }
}
