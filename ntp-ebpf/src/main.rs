//! The in-kernel NTP responder. Built for `bpfel-unknown-none` by `ntp-user/build.rs`; on the
//! host this crate is an empty stub so that workspace tooling keeps working.
//!
//! One path for every packet: [`parse`] describes the request whatever its family (or gives
//! the verdict), [`admit`] decides who is answered, [`respond`] turns the frame around. Each
//! packet increments exactly one outcome counter. Anything not addressed to a served address
//! on this interface's MAC, or not NTP, is passed untouched (but VRRP for this host's group
//! from anyone but its peers: a guest must not move the addresses); malformed NTP is dropped;
//! nothing is ever answered with more bytes than it carried.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The one fully ordered atomic BPF has on every CPU version (an exchange): `core::sync::atomic`
// offers no read-modify-write on this target.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod admit;
#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod respond;

#[cfg(target_arch = "bpf")]
pub use bench::{ntp_bench_drop, ntp_bench_sink};
#[cfg(target_arch = "bpf")]
pub use program::*;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        helpers::bpf_ktime_get_ns,
        macros::xdp,
        programs::XdpContext,
    };
    use aya_log_ebpf::info;
    use ntp_common::{
        anchor::PARAM_FLAG_LOG,
        maps::{attachment_slot, Attachment},
        policy::POLICY_GUEST_CLOCKS,
        Counter, ServerParams, TimeAnchor,
    };

    use crate::admit::{admission, admits_upward, policy_now, Admit};
    use crate::maps::{ANCHORS, ANCHOR_ACTIVE, ATTACHMENTS, BARRIER, COUNTERS, SERVER_PARAMS};
    use crate::packet::Packet;
    use crate::parse::parse;
    use crate::respond::{answer, guest_offset, turn_around, ReplyContext};

    #[derive(Clone, Copy)]
    pub struct Verdict {
        pub action: u32,
        pub counter: Counter,
        /// For answered packets: the reply said LI=3.
        pub unsynchronized: bool,
    }

    #[inline(always)]
    pub const fn pass(counter: Counter) -> Verdict {
        Verdict {
            action: XDP_PASS,
            counter,
            unsynchronized: false,
        }
    }

    #[inline(always)]
    pub const fn drop(counter: Counter) -> Verdict {
        Verdict {
            action: XDP_DROP,
            counter,
            unsynchronized: false,
        }
    }

    #[xdp]
    pub fn ntp_responder(ctx: XdpContext) -> u32 {
        // Receive timestamp: as early as possible.
        let rx_mono = unsafe { bpf_ktime_get_ns() };
        let params = match SERVER_PARAMS.get(0) {
            Some(p) => p,
            None => &ServerParams::DEFAULT,
        };
        let pkt = Packet::new(&ctx);
        let verdict = handle(&pkt, ctx.ingress_ifindex() as u32, rx_mono, params);
        count(verdict.counter);
        if verdict.unsynchronized {
            count(Counter::AnsweredUnsynchronized);
        }
        if params.flags & PARAM_FLAG_LOG != 0 {
            info!(
                &ctx,
                "ntp-xdp: outcome {} action {}", verdict.counter as u32, verdict.action
            );
        }
        verdict.action
    }

    /// Attached to the far end of a veth in native mode: XDP_TX on veth only delivers when
    /// the peer has an XDP program (kernel 6.x), and this one lets everything through.
    #[xdp]
    pub fn ntp_peer_pass(_ctx: XdpContext) -> u32 {
        XDP_PASS
    }

    #[inline(always)]
    fn count(counter: Counter) {
        if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
            // Per-CPU slot: no other writer.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn load_anchor() -> Option<TimeAnchor> {
        let active = ANCHOR_ACTIVE.get_ptr(0)?;
        let barrier = BARRIER.get_ptr_mut(0)?;
        ntp_common::anchor::read_published(
            || Some(unsafe { core::ptr::read_volatile(active) }),
            |slot| Some(unsafe { core::ptr::read_volatile(ANCHORS.get_ptr(slot)?) }),
            || unsafe { full_barrier(barrier) },
        )
    }

    /// A full memory barrier (`smp_mb`), which `read_published` needs between the generation
    /// and the slot it names on weakly ordered CPUs. BPF has no fence instruction; its atomics
    /// that return a value (BPF_FETCH, BPF_XCHG, BPF_CMPXCHG) are fully ordered, and every JIT
    /// emits them so (arm64: SWPAL, or LDXR/STLXR + DMB ISH; x86: XCHG). An exchange is what
    /// LLVM emits at this object's CPU version (a fetch-add needs v3) whether or not its
    /// result is used, and it works on kernels from 5.12; on this CPU's own word it costs no
    /// cache line traffic. (Load-acquire instructions would do without the word, but need
    /// kernel 6.15 and `-mcpu=v4`.) The object test checks that the exchanges are there.
    #[inline(always)]
    unsafe fn full_barrier(word: *mut u64) {
        unsafe {
            core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                word, 0,
            )
        };
    }

    #[inline(always)]
    fn handle(pkt: &Packet, ifindex: u32, rx_mono: u64, params: &ServerParams) -> Verdict {
        // One array read (no hashing) for everything decided before any packet arrived.
        let here = match ATTACHMENTS.get_ptr(attachment_slot(ifindex)) {
            Some(p) => unsafe { &*p },
            None => &Attachment::EMPTY,
        };
        let req = match parse(pkt, ifindex, here, params.vrrp_router_id) {
            Ok(req) => req,
            Err(verdict) => return verdict,
        };
        let policy = policy_now();
        if req.extended {
            // The userspace path answers it; admitted here first, so a denied or flooding
            // source costs the kernel a lookup, not the daemon a wakeup.
            return match admits_upward(&req, rx_mono, &policy) {
                Ok(()) => pass(Counter::PassedExtension),
                Err(counter) => drop(counter),
            };
        }
        let Some(anchor) = load_anchor() else {
            return drop(Counter::DroppedNoAnchor);
        };
        if !anchor.is_published() {
            return drop(Counter::DroppedNoAnchor);
        }
        let guest = if policy.has(POLICY_GUEST_CLOCKS) {
            guest_offset(pkt, &req, &anchor, rx_mono)
        } else {
            None
        };
        let admitted = admission(&req, rx_mono, &policy, guest);
        let (kod, counter) = match admitted {
            Admit::Answer if req.v4 => (None, Counter::AnsweredV4),
            Admit::Answer => (None, Counter::AnsweredV6),
            Admit::Kod(code, counter) => (Some(code), counter),
            Admit::Drop(counter) => return drop(counter),
        };
        if turn_around(pkt, &req).is_none() {
            return drop(Counter::DroppedShort);
        }
        let cx = ReplyContext {
            anchor: &anchor,
            params,
            kod_poll: policy.limits.kod_poll,
            rx_mono,
        };
        let Some(synced) = answer(pkt, &req, &cx, kod) else {
            return drop(Counter::DroppedShort);
        };
        Verdict {
            action: XDP_TX,
            counter,
            unsynchronized: kod.is_none() && !synced,
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible licence so the program may use every helper aya-log needs.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("ntp-ebpf is an eBPF object; ntp-xdp embeds and loads it");
}
