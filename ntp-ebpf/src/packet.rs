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

impl Packet {
    /// The `N` bytes at `off` (a multiple of four) summed as native 32-bit words, for
    /// [`ntp_common::checksum::le_words_sum`]; `None` when the frame is shorter.
    #[inline(always)]
    pub fn le_words<const N: usize>(&self, off: usize) -> Option<u64> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        let mut sum = 0u64;
        let mut i = 0;
        while i < N / 4 {
            // SAFETY: inside the frame (checked above). One 32-bit load instead of four byte
            // loads: the kernel allows unaligned packet loads where the CPU does them well
            // (x86-64, arm64), as C programs' header structs rely on; a byte order swap is left
            // to the caller's one folded sum.
            sum += unsafe { core::ptr::read((p + i * 4) as *const u32) } as u64;
            i += 1;
        }
        Some(sum)
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
