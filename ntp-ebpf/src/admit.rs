//! Admission: the access list, then the source's rate, then (for a kiss-o'-death) the global
//! KoD budget. Requests with extension fields are checked the same way before they are
//! passed up, but their token is taken by the userspace path that answers them.

use aya_ebpf::maps::lpm_trie::Key;
use ntp_common::{
    policy::{
        admit, global_kod_allowed, kod_due, rate_key, would_admit, Admission, ResponderPolicy,
        SourceKey, SourceRecord, SourceState, ACL_ALLOW, KISS_DENY, KISS_RATE, POLICY_ACL,
        POLICY_DEFAULT_DENY, POLICY_KOD_DENY, POLICY_RATE_LIMIT,
    },
    Counter,
};

use crate::maps::{ACL, KOD_BUDGET, SOURCES, SOURCE_SCRATCH};
use crate::parse::Request;

/// What admission decided for a valid request.
#[derive(Clone, Copy)]
pub enum Admit {
    Answer,
    Kod([u8; 4], Counter),
    Drop(Counter),
}

#[inline(always)]
fn denied(source: &[u8; 16], policy: &ResponderPolicy) -> bool {
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
fn global_kod(now: u64, policy: &ResponderPolicy) -> bool {
    match KOD_BUDGET.get_ptr_mut(0) {
        // Per-CPU slot: no other writer.
        Some(p) => global_kod_allowed(unsafe { &mut *p }, now, policy),
        None => false,
    }
}

/// Inserts a source first seen now, with its rate state and (address, offset, time) of its
/// clock reading. A full LRU table evicts its least recently used entry to make room.
#[inline(always)]
fn insert_source(key: &SourceKey, rate: SourceState, guest: Option<(&[u8; 16], i64, u64)>) {
    // Built in a per-CPU slot, not on the stack (which has no room for it).
    let Some(record) = SOURCE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, used only here and never across a helper that could yield.
    let record = unsafe { &mut *record };
    *record = SourceRecord::new(rate);
    if let Some((addr, offset, now)) = guest {
        record.record_guest(addr, offset, now);
    }
    let _ = SOURCES.insert(key, record, 0);
}

/// The source's entry in the per-source table as admission left it (`None`: not looked up,
/// or first seen), for the answer to add the guest's clock to without a second lookup.
pub struct Source(Option<*mut SourceRecord>);

impl Source {
    /// Records a guest's clock reading (`offset_fixed`): in the entry admission found, or
    /// else (no rate limiting, or a source's first request) in the one this looks up or
    /// inserts.
    #[inline(always)]
    pub fn record_guest(self, req: &Request, offset: i64, now: u64, policy: &ResponderPolicy) {
        let entry = match self.0 {
            Some(p) => p,
            None => {
                let key = rate_key(&req.src, req.v4, req.vlan, policy.v6_prefix_len);
                match SOURCES.get_ptr_mut(&key) {
                    Some(p) => p,
                    None => {
                        insert_source(&key, SourceState::default(), Some((&req.src, offset, now)));
                        return;
                    }
                }
            }
        };
        unsafe { (*entry).record_guest(&req.src, offset, now) };
    }
}

/// Access list, then the source's rate.
#[inline(always)]
pub fn admission(req: &Request, now: u64, policy: &ResponderPolicy) -> (Admit, Source) {
    let is_denied = denied(&req.src, policy);
    if is_denied && !policy.has(POLICY_KOD_DENY) {
        return (Admit::Drop(Counter::DroppedDenied), Source(None));
    }
    if !is_denied && !policy.has(POLICY_RATE_LIMIT) {
        return (Admit::Answer, Source(None));
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
        if kod_due(&mut state, now, policy) && global_kod(now, policy) {
            Admit::Kod(KISS_DENY, Counter::KodDeny)
        } else {
            Admit::Drop(Counter::DroppedDenied)
        }
    } else {
        match admit(&mut state, now, policy) {
            Admission::Answer => Admit::Answer,
            Admission::Limited { kod: true } if global_kod(now, policy) => {
                Admit::Kod(KISS_RATE, Counter::KodRate)
            }
            Admission::Limited { .. } => Admit::Drop(Counter::DroppedRateLimited),
        }
    };
    match slot {
        Some(p) => unsafe { (*p).rate = state },
        // A full LRU table evicts its least recently used entry to make room.
        None => insert_source(&key, state, None),
    }
    let source = Source(slot);
    (decision, source)
}

/// For a request passed up to the userspace path: the access list, and whether its source
/// still has a token (peeked, not taken: the userspace path takes it when it answers).
#[inline(always)]
pub fn admits_upward(req: &Request, now: u64, policy: &ResponderPolicy) -> Result<(), Counter> {
    if denied(&req.src, policy) {
        return Err(Counter::DroppedDenied);
    }
    if policy.has(POLICY_RATE_LIMIT) {
        let key = rate_key(&req.src, req.v4, req.vlan, policy.v6_prefix_len);
        if let Some(record) = unsafe { SOURCES.get(&key) } {
            if !would_admit(&record.rate, now, policy) {
                return Err(Counter::DroppedRateLimited);
            }
        }
    }
    Ok(())
}
