//! Who gets answered: access control, per-source rate limiting and the guest-clock record,
//! as map value types and pure functions the kernel and the host tests share.
//!
//! Rate limiting is GCRA (the "virtual scheduling" form of a token bucket): each source keeps
//! a theoretical arrival time (TAT). A request at `now` conforms when `TAT - now` is at most
//! the burst tolerance, and then moves the TAT one emission interval on. That is a token
//! bucket of `burst` tokens refilled at `rate`, kept in one u64 with no division in the kernel.

/// Rate limiting is on.
pub const POLICY_RATE_LIMIT: u8 = 1;
/// Limited sources get a RATE kiss-o'-death (at most one per `kod_interval_ns`); else silence.
pub const POLICY_KOD_RATE: u8 = 2;
/// Denied sources get a DENY kiss-o'-death (at most one per `kod_interval_ns`); else silence.
pub const POLICY_KOD_DENY: u8 = 4;
/// The access list is consulted.
pub const POLICY_ACL: u8 = 8;
/// Sources that match no access-list entry are denied (an allow list is configured).
pub const POLICY_DEFAULT_DENY: u8 = 16;
/// Guests' apparent clock errors are recorded.
pub const POLICY_GUEST_CLOCKS: u8 = 32;

/// Access-list entry values (LPM trie keyed by prefix; the longest match decides).
pub const ACL_ALLOW: u8 = 1;
pub const ACL_DENY: u8 = 2;
/// Prefixes one access list may hold. The trie has room for two lists and their default
/// entries (`::/0`), so that a rewrite puts every new entry in before any stale one goes.
pub const ACL_MAX_PREFIXES: u32 = 4096;
pub const ACL_TRIE_ENTRIES: u32 = 2 * (ACL_MAX_PREFIXES + 1);

/// VLAN IDs an operator can list (0 marks a priority-tagged frame, which belongs to no VLAN
/// and is treated as untagged; 4095 is reserved).
pub const VLAN_ID_MAX: u16 = 4094;

/// Kiss codes (RFC 5905 §7.4).
pub const KISS_RATE: [u8; 4] = *b"RATE";
pub const KISS_DENY: [u8; 4] = *b"DENY";

/// How the responder treats sources, written by the daemon into a one-entry array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ResponderPolicy {
    /// GCRA emission interval, 1/rate (ns).
    pub emission_ns: u64,
    /// How far the TAT may run ahead of now: (burst - 1) × emission (ns).
    pub burst_tolerance_ns: u64,
    /// At most one kiss-o'-death per source within this (ns).
    pub kod_interval_ns: u64,
    /// `POLICY_*`.
    pub flags: u8,
    /// Poll exponent a RATE kiss-o'-death asks for (at least the request's).
    pub kod_poll: i8,
    /// IPv6 sources share a rate bucket per this prefix (16..=64; one guest usually holds a
    /// whole /64 and can pick any address in it).
    pub v6_prefix_len: u8,
    pub _pad: [u8; 5],
    /// All sources together: at most one kiss-o'-death per this (ns) per CPU on average, with
    /// `kod_global_tolerance_ns` of burst (a spoofed-source flood meets every source's first
    /// KoD; this keeps the total bounded). 0: no global cap.
    pub kod_global_emission_ns: u64,
    pub kod_global_tolerance_ns: u64,
}

impl ResponderPolicy {
    /// Everything answered, nothing recorded: what a responder does before the daemon says
    /// otherwise (and what the benchmarks measure as the bare path).
    pub const OPEN: ResponderPolicy = ResponderPolicy {
        emission_ns: 0,
        burst_tolerance_ns: 0,
        kod_interval_ns: 0,
        flags: 0,
        kod_poll: 0,
        v6_prefix_len: 64,
        _pad: [0; 5],
        kod_global_emission_ns: 0,
        kod_global_tolerance_ns: 0,
    };

    /// A token bucket of `burst` requests refilled at `per_second`.
    pub fn with_rate(mut self, per_second: f64, burst: u32) -> ResponderPolicy {
        let emission = if per_second > 0.0 {
            (1e9 / per_second) as u64
        } else {
            u64::MAX / 4
        };
        self.emission_ns = emission.max(1);
        self.burst_tolerance_ns = self
            .emission_ns
            .saturating_mul(burst.saturating_sub(1) as u64);
        self.flags |= POLICY_RATE_LIMIT;
        self
    }

    /// At most `per_second` kiss-o'-death packets in all (per CPU), with a burst of `burst`.
    pub fn with_global_kod_cap(mut self, per_second: f64, burst: u32) -> ResponderPolicy {
        if per_second > 0.0 {
            self.kod_global_emission_ns = ((1e9 / per_second) as u64).max(1);
            self.kod_global_tolerance_ns = self
                .kod_global_emission_ns
                .saturating_mul(burst.saturating_sub(1) as u64);
        }
        self
    }

    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Who a request is from, as the rate and guest tables key it: the address (IPv4 as
/// ::ffff:a.b.c.d) and the VLAN it came on (0: untagged), so tenants with overlapping
/// addresses on different VLANs never share a bucket or a record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub vlan: u16,
    pub _pad: [u8; 2],
}

impl SourceKey {
    #[inline(always)]
    pub const fn new(addr: [u8; 16], vlan: u16) -> SourceKey {
        SourceKey {
            addr,
            vlan,
            _pad: [0; 2],
        }
    }
}

/// Per-source state in the LRU rate table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceState {
    /// GCRA theoretical arrival time (CLOCK_MONOTONIC ns).
    pub tat_ns: u64,
    /// When this source last got a kiss-o'-death (0: never).
    pub last_kod_ns: u64,
}

/// What a source's request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Answer,
    /// Over its rate: dropped, with a RATE kiss-o'-death when `kod`.
    Limited {
        kod: bool,
    },
}

/// Whether a request at `now_ns` would conform, without taking its token: the kernel's check
/// before it passes a request up to the userspace path, which takes the token itself (so one
/// request is never charged twice, and a source that has used its tokens is dropped in the
/// kernel instead of costing the userspace path).
#[inline(always)]
pub fn would_admit(state: &SourceState, now_ns: u64, policy: &ResponderPolicy) -> bool {
    state.tat_ns <= now_ns || state.tat_ns - now_ns <= policy.burst_tolerance_ns
}

/// The global kiss-o'-death budget: GCRA on one shared state. Returns whether a KoD may go.
#[inline(always)]
pub fn global_kod_allowed(state: &mut SourceState, now_ns: u64, policy: &ResponderPolicy) -> bool {
    if policy.kod_global_emission_ns == 0 {
        return true;
    }
    let tat = if state.tat_ns > now_ns {
        state.tat_ns
    } else {
        now_ns
    };
    if tat - now_ns > policy.kod_global_tolerance_ns {
        return false;
    }
    state.tat_ns = tat.saturating_add(policy.kod_global_emission_ns);
    true
}

/// GCRA step for one request at `now_ns` (CLOCK_MONOTONIC). A refused request does not move
/// the TAT, so a flooder is held at exactly its rate, not shut out.
#[inline(always)]
pub fn admit(state: &mut SourceState, now_ns: u64, policy: &ResponderPolicy) -> Admission {
    admit_with_kod(state, now_ns, policy, policy.has(POLICY_KOD_RATE))
}

/// [`admit`] with the policy's `POLICY_KOD_RATE` flag as read once for the request (the
/// kernel reads the flags once per packet, whatever the daemon rewrites meanwhile).
#[inline(always)]
pub fn admit_with_kod(
    state: &mut SourceState,
    now_ns: u64,
    policy: &ResponderPolicy,
    kod_rate: bool,
) -> Admission {
    let tat = if state.tat_ns > now_ns {
        state.tat_ns
    } else {
        now_ns
    };
    if tat - now_ns > policy.burst_tolerance_ns {
        return Admission::Limited {
            kod: kod_rate && kod_due(state, now_ns, policy),
        };
    }
    state.tat_ns = tat.saturating_add(policy.emission_ns);
    Admission::Answer
}

/// Whether a kiss-o'-death may go to this source now; if so, records that one went.
#[inline(always)]
pub fn kod_due(state: &mut SourceState, now_ns: u64, policy: &ResponderPolicy) -> bool {
    if state.last_kod_ns != 0 && now_ns.wrapping_sub(state.last_kod_ns) < policy.kod_interval_ns {
        return false;
    }
    // Zero means "never": a (boot-time) zero reading still counts as sent.
    state.last_kod_ns = if now_ns == 0 { 1 } else { now_ns };
    true
}

/// Key of the rate table: an IPv4 source as ::ffff:a.b.c.d, an IPv6 source by its prefix of
/// `prefix_len` bits (clamped to 16..=64), each with its VLAN.
#[inline(always)]
pub fn rate_key(src: &[u8; 16], is_v4: bool, vlan: u16, prefix_len: u8) -> SourceKey {
    if is_v4 {
        return SourceKey::new(*src, vlan);
    }
    let bits = if prefix_len < 16 {
        16
    } else if prefix_len > 64 {
        64
    } else {
        prefix_len
    } as usize;
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        let keep = if (i + 1) * 8 <= bits {
            0xff
        } else if i * 8 >= bits {
            0
        } else {
            0xffu8 << (8 - (bits - i * 8))
        };
        addr[i] = src[i] & keep;
        i += 1;
    }
    SourceKey::new(addr, vlan)
}

/// IPv6 sources never answered: unspecified and loopback (::/96, which holds ::1 and the
/// deprecated IPv4-compatible form), IPv4-mapped (::ffff:0:0/96: an IPv4 guest's address
/// seen through IPv6, which would match its IPv4 access rules and records), and multicast.
#[inline(always)]
pub fn v6_source_is_bogus(src: &[u8; 16]) -> bool {
    if src[0] == 0xff {
        return true;
    }
    let mut high = 0u8;
    let mut i = 0;
    while i < 10 {
        high |= src[i];
        i += 1;
    }
    high == 0 && ((src[10] == 0 && src[11] == 0) || (src[10] == 0xff && src[11] == 0xff))
}

/// A guest's clock as its requests show it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GuestClock {
    /// The guest's transmit timestamp minus the served receive time, in NTP 32.32 units as a
    /// signed difference (era-proof within ±68 years). It includes the one-way delay.
    pub offset_fixed: i64,
    /// Requests seen (answered) since the entry was created.
    pub requests: u64,
    /// CLOCK_MONOTONIC reading of the last request.
    pub last_seen_ns: u64,
}

/// One source's entry in the per-source table: its rate state and the clock its answered
/// requests showed, found with one lookup per request. Keyed by [`rate_key`]: an IPv6 guest's
/// record is its prefix's, with the full address of the last request that carried a clock
/// reading, so guests sharing a prefix (SLAAC on one link) share one record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceRecord {
    pub rate: SourceState,
    /// `guest.requests == 0`: no clock reading recorded (a rate entry only).
    pub guest: GuestClock,
    /// The address `guest` was seen from (IPv4 as ::ffff:a.b.c.d).
    pub guest_addr: [u8; 16],
}

impl SourceRecord {
    /// The entry of a source first seen now, holding `rate`.
    #[inline(always)]
    pub const fn new(rate: SourceState) -> SourceRecord {
        SourceRecord {
            rate,
            guest: GuestClock {
                offset_fixed: 0,
                requests: 0,
                last_seen_ns: 0,
            },
            guest_addr: [0; 16],
        }
    }

    /// Records a request from `addr` whose clock read `offset_fixed` at `now_ns`.
    #[inline(always)]
    pub fn record_guest(&mut self, addr: &[u8; 16], offset_fixed: i64, now_ns: u64) {
        self.guest.offset_fixed = offset_fixed;
        self.guest.requests += 1;
        self.guest.last_seen_ns = now_ns;
        self.guest_addr = *addr;
    }

    /// The guest's clock record, if any request carried one.
    pub fn guest_clock(&self) -> Option<GuestClock> {
        (self.guest.requests != 0).then_some(self.guest)
    }
}

/// Converts a 32.32 difference to nanoseconds without 128-bit arithmetic.
pub fn fixed_to_ns(fixed: i64) -> i64 {
    let secs = fixed >> 32;
    let frac = (fixed & 0xffff_ffff) as u64;
    secs.saturating_mul(1_000_000_000)
        .saturating_add(((frac * 1_000_000_000) >> 32) as i64)
}

// SAFETY: repr(C), explicit padding, every bit pattern valid (bytemuck's derive checks it).
#[cfg(feature = "user")]
unsafe impl aya::Pod for ResponderPolicy {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceState {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for GuestClock {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceRecord {}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    fn policy() -> ResponderPolicy {
        let mut p = ResponderPolicy::OPEN.with_rate(2.0, 8);
        p.kod_interval_ns = 10 * S;
        p.flags |= POLICY_KOD_RATE;
        p
    }

    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::size_of::<ResponderPolicy>(), 48);
        assert_eq!(core::mem::size_of::<SourceKey>(), 20);
        assert_eq!(core::mem::size_of::<SourceState>(), 16);
        assert_eq!(core::mem::size_of::<GuestClock>(), 24);
        assert_eq!(core::mem::size_of::<SourceRecord>(), 56);
    }

    #[test]
    fn a_source_record_keeps_the_last_guest_address() {
        let mut r = SourceRecord::new(SourceState {
            tat_ns: 7,
            last_kod_ns: 0,
        });
        assert_eq!(r.guest_clock(), None);
        let a = [0xfd, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
        let mut b = a;
        b[15] = 9;
        r.record_guest(&a, 10, 100);
        r.record_guest(&b, -20, 200);
        assert_eq!(r.guest_addr, b);
        assert_eq!(
            r.guest_clock(),
            Some(GuestClock {
                offset_fixed: -20,
                requests: 2,
                last_seen_ns: 200
            })
        );
        // The rate state is untouched by the guest's record.
        assert_eq!(r.rate.tat_ns, 7);
    }

    #[test]
    fn burst_then_rate() {
        let p = policy();
        let mut s = SourceState::default();
        let t0 = 1_000 * S;
        // A burst of 8 at one instant passes, the 9th is limited (with the one KoD).
        for i in 0..8 {
            assert_eq!(admit(&mut s, t0, &p), Admission::Answer, "request {i}");
        }
        assert_eq!(admit(&mut s, t0, &p), Admission::Limited { kod: true });
        assert_eq!(admit(&mut s, t0, &p), Admission::Limited { kod: false });
        // Refill at 2/s: one more after 500 ms, not two.
        assert_eq!(admit(&mut s, t0 + 500 * MS, &p), Admission::Answer);
        assert_eq!(
            admit(&mut s, t0 + 500 * MS, &p),
            Admission::Limited { kod: false }
        );
        // Ten seconds on: the KoD interval has passed and the bucket is full again.
        for _ in 0..8 {
            assert_eq!(admit(&mut s, t0 + 11 * S, &p), Admission::Answer);
        }
        assert_eq!(
            admit(&mut s, t0 + 11 * S, &p),
            Admission::Limited { kod: true }
        );
    }

    #[test]
    fn a_flood_is_held_at_the_rate() {
        // 1000 requests/s for 10 s against 2/s with a burst of 8: 8 + 2 × 10 pass.
        let p = policy();
        let mut s = SourceState::default();
        let (mut answered, mut kods) = (0, 0);
        for i in 0..10_000u64 {
            match admit(&mut s, 1_000 * S + i * MS, &p) {
                Admission::Answer => answered += 1,
                Admission::Limited { kod } => kods += kod as u32,
            }
        }
        assert!((27..=29).contains(&answered), "{answered}");
        // One KoD per 10 s interval.
        assert_eq!(kods, 1);
    }

    #[test]
    fn iburst_passes_the_defaults() {
        // ntpd's iburst: 8 requests 2 s apart; chrony's: 4. Default 1/s, burst 8.
        let p = ResponderPolicy::OPEN.with_rate(1.0, 8);
        let mut s = SourceState::default();
        for i in 0..8 {
            assert_eq!(admit(&mut s, 5 * S + i * 2 * S, &p), Admission::Answer);
        }
        // ntpdate -q style: four back to back.
        let mut s = SourceState::default();
        for _ in 0..4 {
            assert_eq!(admit(&mut s, 5 * S, &p), Admission::Answer);
        }
    }

    #[test]
    fn kod_spacing_survives_a_zero_clock() {
        let p = policy();
        let mut s = SourceState::default();
        assert!(kod_due(&mut s, 0, &p));
        assert!(!kod_due(&mut s, 5 * S, &p));
        assert!(kod_due(&mut s, 10 * S + 1, &p));
    }

    #[test]
    fn ipv6_sources_share_their_prefix() {
        let a = [0xfd, 0, 0xe, 0xc2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
        let mut b = a;
        b[15] = 9;
        assert_eq!(rate_key(&a, false, 0, 64), rate_key(&b, false, 0, 64));
        b[7] = 2;
        assert_ne!(rate_key(&a, false, 0, 64), rate_key(&b, false, 0, 64));
        // A /56 holds both; a /63 too (bit 63 differs only in the /64).
        assert_eq!(rate_key(&a, false, 0, 56), rate_key(&b, false, 0, 56));
        let mut c = a;
        c[7] = 0;
        assert_eq!(rate_key(&a, false, 0, 63), rate_key(&c, false, 0, 63));
        assert_ne!(rate_key(&a, false, 0, 64), rate_key(&c, false, 0, 64));
        // Out of range is clamped: /128 aggregates as /64, /8 as /16.
        assert_eq!(rate_key(&a, false, 0, 128), rate_key(&a, false, 0, 64));
        assert_eq!(rate_key(&a, false, 0, 8), rate_key(&a, false, 0, 16));
    }

    #[test]
    fn vlans_never_share_a_bucket() {
        let v4 = crate::wire::ipv4_mapped_key([169, 254, 10, 20]);
        assert_ne!(rate_key(&v4, true, 10, 64), rate_key(&v4, true, 20, 64));
        assert_eq!(rate_key(&v4, true, 10, 64), SourceKey::new(v4, 10));
    }

    #[test]
    fn bogus_ipv6_sources() {
        let mut mapped = crate::wire::ipv4_mapped_key([169, 254, 1, 2]);
        assert!(v6_source_is_bogus(&mapped));
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert!(v6_source_is_bogus(&loopback));
        assert!(v6_source_is_bogus(&[0u8; 16]));
        let mut mc = [0u8; 16];
        mc[0] = 0xff;
        assert!(v6_source_is_bogus(&mc));
        let ula = [0xfd, 0, 0xe, 0xc2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
        assert!(!v6_source_is_bogus(&ula));
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        ll[15] = 7;
        assert!(!v6_source_is_bogus(&ll));
        // NAT64's well-known prefix 64:ff9b::/96 is a real source.
        mapped[0] = 0;
        mapped[1] = 0x64;
        mapped[2] = 0xff;
        mapped[3] = 0x9b;
        mapped[10] = 0;
        mapped[11] = 0;
        assert!(!v6_source_is_bogus(&mapped));
    }

    #[test]
    fn the_peek_takes_no_token() {
        let p = policy();
        let mut s = SourceState::default();
        for _ in 0..100 {
            assert!(would_admit(&s, 5 * S, &p));
        }
        for _ in 0..8 {
            assert_eq!(admit(&mut s, 5 * S, &p), Admission::Answer);
        }
        assert!(!would_admit(&s, 5 * S, &p));
        assert!(would_admit(&s, 5 * S + 500 * MS, &p));
    }

    #[test]
    fn the_global_kod_cap_holds_a_spoofed_flood() {
        // 100 KoD/s with a burst of 10, a million distinct sources in one second.
        let p = policy().with_global_kod_cap(100.0, 10);
        let mut g = SourceState::default();
        let sent = (0..1_000_000u64)
            .filter(|i| global_kod_allowed(&mut g, 5 * S + i * 1_000, &p))
            .count();
        assert!((100..=111).contains(&sent), "{sent}");
        let uncapped = policy();
        assert!(global_kod_allowed(
            &mut SourceState::default(),
            0,
            &uncapped
        ));
    }

    #[test]
    fn fixed_point_conversion() {
        assert_eq!(fixed_to_ns(2 << 32), 2 * S as i64);
        assert_eq!(fixed_to_ns(-(2 << 32)), -2 * (S as i64));
        assert_eq!(fixed_to_ns(1 << 31), 500 * MS as i64);
        assert_eq!(fixed_to_ns(-(1 << 31)), -500 * (MS as i64));
        assert_eq!(fixed_to_ns(i64::MIN), -(1i64 << 31) * S as i64);
    }
}
