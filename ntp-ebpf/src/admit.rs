//! Admission: the access list, then the source's rate, then (for a kiss-o'-death) the global
//! KoD budget. Requests with extension fields are checked the same way before they are
//! passed up, but their token is taken by the userspace path that answers them.
//!
//! A source's entry in the LRU table is written only right after the lookup that found it:
//! an LRU table recycles an evicted entry for another source at once (no grace period), so a
//! pointer kept for later (the reply) could by then be another source's entry. The guest's
//! clock reading is therefore known before admission and written with the rate state.

use aya_ebpf::maps::lpm_trie::Key;
use ntp_common::{
    policy::{
        admit_with_kod, global_kod_allowed, kod_due, rate_key, would_admit, Admission,
        ResponderPolicy, SourceKey, SourceRecord, SourceState, ACL_ALLOW, KISS_DENY, KISS_RATE,
        POLICY_ACL, POLICY_DEFAULT_DENY, POLICY_KOD_DENY, POLICY_KOD_RATE, POLICY_RATE_LIMIT,
    },
    Counter,
};

use crate::maps::{ACL, KOD_BUDGET, POLICY, SOURCES, SOURCE_SCRATCH};
use crate::parse::Request;

/// What admission decided for a valid request.
#[derive(Clone, Copy)]
pub enum Admit {
    Answer,
    Kod([u8; 4], Counter),
    Drop(Counter),
}

/// The policy for this packet. Its flags and IPv6 prefix length are read once, into locals,
/// so that a rewrite by the daemon meanwhile (a fleet push) cannot give one packet two
/// decisions (or two source keys); the numbers (rate, burst, KoD spacing) are read from the
/// map where they are used, each once. (A copy of the whole policy costs the answered path
/// ~10 ns more.)
pub struct PacketPolicy {
    pub flags: u8,
    pub v6_prefix_len: u8,
    pub limits: &'static ResponderPolicy,
}

impl PacketPolicy {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

#[inline(always)]
pub fn policy_now() -> PacketPolicy {
    let limits = match POLICY.get_ptr(0) {
        // SAFETY: an array slot, valid for the program's run.
        Some(p) => unsafe { &*p },
        None => &ResponderPolicy::OPEN,
    };
    PacketPolicy {
        // Volatile: the compiler must not read them from the map again in place of these.
        flags: unsafe { core::ptr::read_volatile(&limits.flags) },
        v6_prefix_len: unsafe { core::ptr::read_volatile(&limits.v6_prefix_len) },
        limits,
    }
}

#[inline(always)]
fn denied(source: &[u8; 16], policy: &PacketPolicy) -> bool {
    if !policy.has(POLICY_ACL) {
        return false;
    }
    match ACL.get(Key::new(128, *source)) {
        Some(v) => *v != ACL_ALLOW,
        None => policy.has(POLICY_DEFAULT_DENY),
    }
}

/// One KoD more from the global budget (per CPU)?
#[inline(always)]
fn global_kod(now: u64, policy: &PacketPolicy) -> bool {
    match KOD_BUDGET.get_ptr_mut(0) {
        // Per-CPU slot: no other writer.
        Some(p) => global_kod_allowed(unsafe { &mut *p }, now, policy.limits),
        None => false,
    }
}

/// Inserts a source first seen now, with its rate state and (for an answered request with a
/// clock reading) its guest record. A full LRU table evicts its least recently used entry to
/// make room.
#[inline(always)]
fn insert_source(key: &SourceKey, rate: SourceState, guest: Option<(&[u8; 16], i64, u64)>) {
    // Built in a per-CPU slot, not on the stack (which has no room for it).
    let Some(record) = SOURCE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, used only here and never across a helper that could yield.
    let record = unsafe { &mut *record };
    record.rate = rate;
    match guest {
        Some((addr, offset, now)) => {
            record.guest.requests = 0;
            record.record_guest(addr, offset, now);
        }
        None => {
            // No record: all zero after the rate state, as `SourceRecord::new` makes it, by
            // volatile stores: plain ones are merged into a memset call (a BPF-to-BPF call,
            // whose return costs as much as a helper's on a CPU with a return thunk).
            let words = record as *mut SourceRecord as *mut u64;
            let mut i = core::mem::offset_of!(SourceRecord, guest) / 8;
            while i < core::mem::size_of::<SourceRecord>() / 8 {
                // SAFETY: inside this CPU's slot; every field is plain integers.
                unsafe { core::ptr::write_volatile(words.add(i), 0) };
                i += 1;
            }
        }
    }
    let _ = SOURCES.insert(key, record, 0);
}

/// Access list, then the source's rate. An answered request's guest clock reading
/// (`guest_offset`: see `ntp_common::reply::guest_offset_fixed`) is recorded in its source's
/// entry here, with the rate state, through the pointer its lookup just gave.
#[inline(always)]
pub fn admission(
    req: &Request,
    now: u64,
    policy: &PacketPolicy,
    guest_offset: Option<i64>,
) -> Admit {
    let is_denied = denied(&req.src, policy);
    if is_denied && !policy.has(POLICY_KOD_DENY) {
        return Admit::Drop(Counter::DroppedDenied);
    }
    let rate_limited = policy.has(POLICY_RATE_LIMIT);
    if !is_denied && !rate_limited && guest_offset.is_none() {
        return Admit::Answer;
    }
    // Concurrent requests of one source on two CPUs may both pass on the same token: the
    // limit is exact per CPU and at most #CPUs times looser for a source that floods them all.
    let key = rate_key(&req.src, req.v4, req.vlan, policy.v6_prefix_len);
    let slot = SOURCES.get_ptr_mut(&key);
    let mut state = match slot {
        Some(p) => unsafe { (*p).rate },
        None => SourceState::default(),
    };
    let decision = if is_denied {
        if kod_due(&mut state, now, policy.limits) && global_kod(now, policy) {
            Admit::Kod(KISS_DENY, Counter::KodDeny)
        } else {
            Admit::Drop(Counter::DroppedDenied)
        }
    } else if !rate_limited {
        Admit::Answer
    } else {
        match admit_with_kod(&mut state, now, policy.limits, policy.has(POLICY_KOD_RATE)) {
            Admission::Answer => Admit::Answer,
            Admission::Limited { kod: true } if global_kod(now, policy) => {
                Admit::Kod(KISS_RATE, Counter::KodRate)
            }
            Admission::Limited { .. } => Admit::Drop(Counter::DroppedRateLimited),
        }
    };
    let record = match (decision, guest_offset) {
        (Admit::Answer, Some(offset)) => Some((&req.src, offset, now)),
        _ => None,
    };
    match slot {
        Some(p) => {
            // SAFETY: the entry the lookup above just returned (see the module's note).
            let entry = unsafe { &mut *p };
            if is_denied || rate_limited {
                entry.rate = state;
            }
            if let Some((addr, offset, now)) = record {
                entry.record_guest(addr, offset, now);
            }
        }
        // A full LRU table evicts its least recently used entry to make room.
        None => insert_source(&key, state, record),
    }
    decision
}

/// For a request passed up to the userspace path: the access list, and whether its source
/// still has a token (peeked, not taken: the userspace path takes it when it answers).
#[inline(always)]
pub fn admits_upward(req: &Request, now: u64, policy: &PacketPolicy) -> Result<(), Counter> {
    if denied(&req.src, policy) {
        return Err(Counter::DroppedDenied);
    }
    if policy.has(POLICY_RATE_LIMIT) {
        let key = rate_key(&req.src, req.v4, req.vlan, policy.v6_prefix_len);
        if let Some(record) = unsafe { SOURCES.get(&key) } {
            if !would_admit(&record.rate, now, policy.limits) {
                return Err(Counter::DroppedRateLimited);
            }
        }
    }
    Ok(())
}
