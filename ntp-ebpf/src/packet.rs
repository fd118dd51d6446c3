//! Bounds-checked views of packet memory: one check per layer, byte-wise access after it.

use aya_ebpf::programs::XdpContext;

pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Packet {
        Packet {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// The `N` bytes at `off`, or `None` when the frame is shorter. The returned view is only
    /// used until the next view of overlapping bytes is taken.
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, off: usize) -> Option<&'static mut [u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: the verifier-visible check above proves [p, p + N) lies inside the frame,
        // which stays valid for the whole program run. u8 arrays need no alignment.
        Some(unsafe { &mut *(p as *mut [u8; N]) })
    }
}

#[inline(always)]
pub fn be16(hi: u8, lo: u8) -> u16 {
    ((hi as u16) << 8) | lo as u16
}

#[inline(always)]
pub fn swap<const N: usize>(a: &mut [u8], a_off: usize, b_off: usize) {
    let mut i = 0;
    while i < N {
        let t = a[a_off + i];
        a[a_off + i] = a[b_off + i];
        a[b_off + i] = t;
        i += 1;
    }
}
