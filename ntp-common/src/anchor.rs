//! Map value types shared with the kernel.
//!
//! The daemon publishes its clock model as a [`TimeAnchor`]: "at CLOCK_MONOTONIC reading
//! `mono_ns` the NTP time was `ntp_ns`, and it runs `freq_scaled / 2^32` faster than the
//! monotonic clock". The responder extrapolates from it with `bpf_ktime_get_ns()`, which reads
//! the same clock. The anchor map has two slots and an active index: the daemon writes the
//! inactive slot, then flips the index, so a reader never sees a half-written anchor.

use crate::time::scaled_mul;
use crate::wire::LEAP_UNSYNCHRONIZED;

/// Number of anchor slots (double buffer).
pub const ANCHOR_SLOTS: u32 = 2;

/// The daemon's clock model plus the header fields that change with it. All fields are
/// published together so a reply never mixes two updates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TimeAnchor {
    /// CLOCK_MONOTONIC reading the anchor was taken at.
    pub mono_ns: u64,
    /// NTP time at `mono_ns`, in nanoseconds since 1900 (see [`crate::time`]).
    /// Zero means "never published": the responder does not answer.
    pub ntp_ns: u64,
    /// Rate correction relative to CLOCK_MONOTONIC, 2^-32 units.
    pub freq_scaled: i64,
    /// After this much monotonic time without a new anchor, replies say LI=3, stratum 0.
    pub max_age_ns: u64,
    /// Reference timestamp: when the model was last corrected from its source.
    pub reference_ntp_ns: u64,
    /// Root dispersion at `mono_ns`; the responder adds `dispersion_growth_ns_per_s` × age.
    pub root_dispersion_ns: u64,
    /// Root delay to the reference clock (4 s at most: a longer one is past any usable
    /// distance).
    pub root_delay_ns: u32,
    /// How fast the error bound grows with the anchor's age (ns per second, i.e. ppb): the
    /// daemon's estimate of its own frequency error, covering the longest the anchor may serve.
    pub dispersion_growth_ns_per_s: u32,
    /// Reference ID (IPv4 address of the upstream, or an ASCII kiss/clock code).
    pub refid: [u8; 4],
    /// Leap indicator; 3 = unsynchronized.
    pub leap: u8,
    pub stratum: u8,
    pub _pad: [u8; 2],
}

impl TimeAnchor {
    /// NTP time at monotonic reading `mono_ns`. Readings slightly before the anchor (a packet
    /// timestamped just before a flip) extrapolate backwards rather than wrapping.
    #[inline(always)]
    pub fn ntp_ns_at(&self, mono_ns: u64) -> u64 {
        let elapsed = mono_ns.wrapping_sub(self.mono_ns) as i64;
        let corrected = elapsed.wrapping_add(scaled_mul(elapsed, self.freq_scaled));
        self.ntp_ns.wrapping_add(corrected as u64)
    }

    /// Monotonic time since the anchor was taken (zero for readings before it).
    #[inline(always)]
    pub fn age_ns(&self, mono_ns: u64) -> u64 {
        mono_ns.saturating_sub(self.mono_ns)
    }

    #[inline(always)]
    pub fn is_published(&self) -> bool {
        self.ntp_ns != 0
    }

    /// Root dispersion at monotonic reading `mono_ns`: the published one plus its growth.
    #[inline(always)]
    pub fn root_dispersion_at(&self, mono_ns: u64) -> u64 {
        self.root_dispersion_ns
            .saturating_add(crate::time::dispersion_growth_ns(
                self.age_ns(mono_ns),
                self.dispersion_growth_ns_per_s,
            ))
    }

    /// Whether a reply at `mono_ns` may claim synchronization.
    #[inline(always)]
    pub fn is_synchronized_at(&self, mono_ns: u64) -> bool {
        self.leap != LEAP_UNSYNCHRONIZED && self.age_ns(mono_ns) <= self.max_age_ns
    }
}

/// The longest a held-back anchor takes to hand over to the model it was held above, and the
/// fastest it may run slow to get there (as a fraction, 2^-32 units): 500 ppm.
pub const HOLD_ABSORB_NS: u64 = 1_000_000_000;
pub const HOLD_MAX_SLOW_SCALED: i64 = 2_147_484; // 500e-6 × 2^32

/// Keeps served time monotonic across an update: if `next` would serve, at its own reference
/// point, less than `prev` serves there, it starts at `prev`'s time instead and runs slow
/// (by what it was held back over [`HOLD_ABSORB_NS`], at most 500 ppm), so that it meets its
/// model's line again rather than staying ahead of it for good. `prev` must be a synchronized
/// anchor (an LI=3 one is not time clients keep). Returns how far `next` was raised (ns).
pub fn hold_monotonic(prev: &TimeAnchor, next: &mut TimeAnchor) -> u64 {
    let floor = prev.ntp_ns_at(next.mono_ns);
    if next.ntp_ns >= floor {
        return 0;
    }
    let held = floor - next.ntp_ns;
    next.ntp_ns = floor;
    // held / HOLD_ABSORB_NS as a 2^-32 fraction, without 128-bit arithmetic.
    let slow = if held >= HOLD_ABSORB_NS {
        HOLD_MAX_SLOW_SCALED
    } else {
        // Rounded up, so that a hold of a few ns is gone after one absorb period.
        let s = (held << 32).div_ceil(HOLD_ABSORB_NS) as i64;
        if s > HOLD_MAX_SLOW_SCALED {
            HOLD_MAX_SLOW_SCALED
        } else {
            s
        }
    };
    let f = next.freq_scaled - slow;
    next.freq_scaled = if f < -crate::time::MAX_FREQ_SCALED {
        -crate::time::MAX_FREQ_SCALED
    } else {
        f
    };
    held
}

/// Header parameters that belong to the server rather than to the clock model.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServerParams {
    /// log2 seconds of the clock's precision (e.g. -24 ≈ 60 ns); bits below it are randomised.
    pub precision: i8,
    /// Bounds for the poll exponent echoed in replies.
    pub poll_min: i8,
    pub poll_max: i8,
    /// `PARAM_FLAG_*`.
    pub flags: u8,
    /// The VRRP group of a redundant VIP host (0: none): adverts for it arriving where the
    /// responder serves are dropped unless they come from a `VRRP_PEERS` address.
    pub vrrp_router_id: u8,
    pub _pad: [u8; 3],
}

/// Emit an aya-log line for every packet the responder handles (diagnostics; off by default).
pub const PARAM_FLAG_LOG: u8 = 1;

impl ServerParams {
    pub const DEFAULT: ServerParams = ServerParams {
        precision: -24,
        poll_min: 4,
        poll_max: 10,
        flags: 0,
        vrrp_router_id: 0,
        _pad: [0; 3],
    };
}

// SAFETY: both are repr(C) with explicit padding and no invalid bit patterns (bytemuck checks
// the same claim at compile time through its derive).
#[cfg(feature = "user")]
unsafe impl aya::Pod for TimeAnchor {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServerParams {}

/// How the anchor maps are created: `BPF_F_MMAPABLE`. The daemon writes them through a shared
/// mapping with release stores; a `bpf_map_update_elem` call per slot and per generation would
/// order nothing for another CPU (the kernel copies the value with a plain `memcpy`,
/// `array_map_update_elem` → `copy_map_value`, and nothing on the syscall path is a barrier).
pub const ANCHOR_MAP_FLAGS: u32 = 1 << 10;

/// Reads the live anchor of the double buffer without locks and without assuming anything
/// about how often the daemon publishes. `generation` reads `ANCHOR_ACTIVE[0]` (bumped once
/// per publication; the live slot is its low bit), `slot` copies one slot. The writer only
/// ever writes the slot that is not live, then bumps the generation; so a copy during which the
/// generation did not move is whole. If it moved, one more try on the new slot; if it moved
/// again, `None` (the daemon is rewriting as fast as this reads: no answer beats a torn one).
///
/// On a weakly ordered CPU (arm64) that argument needs the order of memory operations to hold
/// across CPUs, so both sides fence (a seqlock's pairing):
/// - the writer stores every word of a slot, then the generation, each with release semantics:
///   a reader that sees a word of publication n also sees generation n - 1, and one that sees
///   generation n sees all of slot n's words;
/// - `order` runs between each generation read and the slot copy around it, and must keep
///   the loads before it ahead of the loads after it (`smp_rmb`; stronger is fine). In XDP
///   that is a fully ordered BPF atomic (BPF has no fence instruction); in the daemon an
///   acquire fence.
///
/// Then every load the reader makes sees the writer as of some point of its program no
/// earlier than the point the last generation read saw, and the copy's loads lie between
/// the two generation reads that bracket it: if those agree, the writer did not write that
/// slot in between (it writes the other slot until it bumps the generation).
#[inline(always)]
pub fn read_published<A>(
    generation: impl Fn() -> Option<u32>,
    slot: impl Fn(u32) -> Option<A>,
    order: impl Fn(),
) -> Option<A> {
    let first = generation()?;
    order();
    let anchor = slot(first & 1)?;
    order();
    let second = generation()?;
    if second == first {
        return Some(anchor);
    }
    order();
    let anchor = slot(second & 1)?;
    order();
    let third = generation()?;
    if third == second {
        Some(anchor)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{ppm_to_freq_scaled, NANOS_PER_SEC};

    fn anchor(freq_ppm: f64) -> TimeAnchor {
        TimeAnchor {
            mono_ns: 1_000 * NANOS_PER_SEC,
            ntp_ns: 3_900_000_000 * NANOS_PER_SEC,
            freq_scaled: ppm_to_freq_scaled(freq_ppm),
            max_age_ns: 10 * NANOS_PER_SEC,
            ..Default::default()
        }
    }

    #[test]
    fn layout_is_stable() {
        // The kernel and the daemon must agree byte for byte.
        assert_eq!(core::mem::size_of::<TimeAnchor>(), 64);
        assert_eq!(core::mem::size_of::<ServerParams>(), 8);
    }

    #[test]
    fn extrapolation_without_rate() {
        let a = anchor(0.0);
        assert_eq!(a.ntp_ns_at(a.mono_ns), a.ntp_ns);
        assert_eq!(a.ntp_ns_at(a.mono_ns + 1_500), a.ntp_ns + 1_500);
        // Slightly before the anchor: backwards, not wrapped.
        assert_eq!(a.ntp_ns_at(a.mono_ns - 700), a.ntp_ns - 700);
    }

    #[test]
    fn extrapolation_with_rate() {
        // +200 ppm over 10 s is +2 ms; -500 ppm over 100 s is -50 ms.
        let a = anchor(200.0);
        let got = a.ntp_ns_at(a.mono_ns + 10 * NANOS_PER_SEC) - a.ntp_ns;
        assert!(got.abs_diff(10 * NANOS_PER_SEC + 2_000_000) <= 2, "{got}");
        let b = anchor(-500.0);
        let got = b.ntp_ns_at(b.mono_ns + 100 * NANOS_PER_SEC) - b.ntp_ns;
        assert!(
            got.abs_diff(100 * NANOS_PER_SEC - 50_000_000) <= 25,
            "{got}"
        );
    }

    #[test]
    fn extrapolation_is_monotonic_in_the_reading() {
        for ppm in [-500.0, -1.0, 0.0, 3.3, 500.0] {
            let a = anchor(ppm);
            let mut last = 0;
            let mut t = a.mono_ns - 10_000;
            while t < a.mono_ns + 10_000 {
                let v = a.ntp_ns_at(t);
                assert!(v >= last, "ppm {ppm}: {v} < {last} at {t}");
                last = v;
                t += 7;
            }
        }
    }

    #[test]
    fn a_held_anchor_runs_slow_until_the_model_meets_it() {
        // The model steps back 1 s (a host clock set back, say) and is republished each
        // second; served time never goes back and meets the model again at ~500 ppm.
        let mut prev = anchor(0.0);
        let mut model_ntp = prev.ntp_ns - NANOS_PER_SEC;
        let mut served = prev.ntp_ns;
        let mut met = None;
        for i in 1..5_000u64 {
            let mono = prev.mono_ns + NANOS_PER_SEC;
            model_ntp += NANOS_PER_SEC;
            let mut next = TimeAnchor {
                mono_ns: mono,
                ntp_ns: model_ntp,
                ..prev
            };
            next.freq_scaled = 0;
            let held = hold_monotonic(&prev, &mut next);
            assert!(next.ntp_ns >= prev.ntp_ns_at(mono), "backwards at {i}");
            assert!(next.ntp_ns >= served);
            served = next.ntp_ns;
            if held == 0 && met.is_none() {
                met = Some(i);
            }
            prev = next;
        }
        // 1 s at 500 ppm: 2000 s.
        let met = met.expect("never met the model");
        assert!((1990..=2010).contains(&met), "{met}");
        // A tiny hold (rounding) is absorbed within the next second, not at 500 ppm.
        let prev = anchor(0.0);
        let mut next = TimeAnchor {
            mono_ns: prev.mono_ns + NANOS_PER_SEC,
            ntp_ns: prev.ntp_ns + NANOS_PER_SEC - 20,
            ..prev
        };
        assert_eq!(hold_monotonic(&prev, &mut next), 20);
        let slow_ppm = -crate::time::freq_scaled_to_ppm(next.freq_scaled);
        assert!((0.015..0.025).contains(&slow_ppm), "{slow_ppm}");
    }

    #[test]
    fn staleness() {
        let mut a = anchor(0.0);
        assert!(a.is_synchronized_at(a.mono_ns + 10 * NANOS_PER_SEC));
        assert!(!a.is_synchronized_at(a.mono_ns + 10 * NANOS_PER_SEC + 1));
        a.leap = LEAP_UNSYNCHRONIZED;
        assert!(!a.is_synchronized_at(a.mono_ns));
        assert!(!TimeAnchor::default().is_published());
    }

    /// A model of the double buffer: every interleaving of writer steps between the reader's
    /// steps (a slot is copied in two halves on both sides, as memcpy may be), checked for a
    /// torn read. Publication n writes (n, n) into slot n & 1, then sets the generation to n.
    ///
    /// The model runs the writer's steps in its program order and lets each reader load see
    /// the memory as of the steps done so far, a point that only moves forward. That is what
    /// the barriers of `read_published` give on any CPU: the writer's stores are release
    /// stores (each is seen only with all before it), and the reader's `order` keeps a load
    /// after it from seeing an earlier point than a load before it saw. Nothing orders the
    /// loads within one copy among themselves, so the model copies the halves in either order:
    /// with two halves, that covers every pair of points between the bracketing reads.
    mod double_buffer {
        use super::super::read_published;
        use core::cell::{Cell, RefCell};

        struct Model {
            slots: RefCell<[(u32, u32); 2]>,
            generation: Cell<u32>,
            /// Writer steps done: 3 per publication (half, half, flip).
            done: Cell<u32>,
            /// Writer steps to run at each reader yield point, in order.
            schedule: RefCell<[u8; 8]>,
            point: Cell<usize>,
            /// The reader copies the second half first.
            reversed: bool,
            /// What the reader did, in order: 'g' a generation read, 's' a slot copy, 'o' an
            /// `order` call.
            trace: RefCell<[u8; 16]>,
            traced: Cell<usize>,
        }

        impl Model {
            fn new(schedule: [u8; 8], reversed: bool) -> Model {
                Model {
                    slots: RefCell::new([(0, 0); 2]),
                    generation: Cell::new(0),
                    done: Cell::new(0),
                    schedule: RefCell::new(schedule),
                    point: Cell::new(0),
                    reversed,
                    trace: RefCell::new([0; 16]),
                    traced: Cell::new(0),
                }
            }
            fn writer_step(&self) {
                let step = self.done.get();
                let n = step / 3 + 1;
                let slot = (n & 1) as usize;
                match step % 3 {
                    0 => self.slots.borrow_mut()[slot].0 = n,
                    1 => self.slots.borrow_mut()[slot].1 = n,
                    _ => self.generation.set(n),
                }
                self.done.set(step + 1);
            }
            fn record(&self, event: u8) {
                let n = self.traced.get();
                self.trace.borrow_mut()[n] = event;
                self.traced.set(n + 1);
            }
            fn trace(&self) -> [u8; 16] {
                *self.trace.borrow()
            }
            fn yield_point(&self) {
                let i = self.point.get();
                self.point.set(i + 1);
                let k = self.schedule.borrow().get(i).copied().unwrap_or(0);
                for _ in 0..k {
                    self.writer_step();
                }
            }
            fn generation(&self) -> Option<u32> {
                self.record(b'g');
                self.yield_point();
                Some(self.generation.get())
            }
            fn slot(&self, i: u32) -> Option<(u32, u32)> {
                self.record(b's');
                let half = |second: bool| {
                    self.yield_point();
                    let s = self.slots.borrow()[i as usize];
                    if second {
                        s.1
                    } else {
                        s.0
                    }
                };
                if self.reversed {
                    let b = half(true);
                    Some((half(false), b))
                } else {
                    let a = half(false);
                    Some((a, half(true)))
                }
            }
            /// The reader of an earlier build: it compared only the low bits of the index.
            fn read_low_bit_only(&self) -> Option<(u32, u32)> {
                let first = self.generation()? & 1;
                let anchor = self.slot(first)?;
                let second = self.generation()? & 1;
                if second == first {
                    return Some(anchor);
                }
                self.slot(second)
            }
        }

        fn schedules() -> impl Iterator<Item = [u8; 8]> {
            (0..5u32.pow(8)).map(|mut code| {
                let mut s = [0u8; 8];
                for v in &mut s {
                    *v = (code % 5) as u8;
                    code /= 5;
                }
                s
            })
        }

        #[test]
        fn no_interleaving_tears_a_read() {
            let mut answered = 0u32;
            for (schedule, reversed) in schedules().flat_map(|s| [(s, false), (s, true)]) {
                let m = Model::new(schedule, reversed);
                // Two publications before the reader starts: both slots hold something.
                for _ in 0..6 {
                    m.writer_step();
                }
                // `order` is no step of its own (the model is the order it guarantees), but
                // it must stand between every generation read and slot copy.
                let read = read_published(|| m.generation(), |i| m.slot(i), || m.record(b'o'));
                let trace = m.trace();
                let trace = &trace[..m.traced.get()];
                assert!(
                    trace.windows(2).all(|w| w.contains(&b'o')),
                    "no barrier between two reads: {:?}",
                    core::str::from_utf8(trace)
                );
                if let Some((a, b)) = read {
                    assert_eq!(a, b, "torn read under {schedule:?}, reversed {reversed}");
                    answered += 1;
                }
                // At most one publication during the read: it is always answered.
                let writer_steps: u32 = schedule.iter().map(|&k| k as u32).sum();
                if writer_steps <= 3 {
                    assert!(read.is_some(), "no answer under {schedule:?}");
                }
            }
            assert!(answered > 0);
        }

        #[test]
        fn the_low_bit_reader_could_tear() {
            let torn = schedules().any(|schedule| {
                let m = Model::new(schedule, false);
                for _ in 0..6 {
                    m.writer_step();
                }
                m.read_low_bit_only().is_some_and(|(a, b)| a != b)
            });
            assert!(torn, "the model should find the old reader's torn read");
        }
    }
}
