//! NTP (RFC 5905) and the lower-layer wire constants the responder needs.

pub const NTP_PORT: u16 = 123;
/// An NTP header without extension fields or MAC.
pub const NTP_HEADER_LEN: usize = 48;
pub const UDP_HEADER_LEN: usize = 8;
/// The only UDP length the kernel path answers.
pub const NTP_UDP_LEN: u16 = (UDP_HEADER_LEN + NTP_HEADER_LEN) as u16;

pub const ETH_HEADER_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPV4_MIN_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const IPPROTO_UDP: u8 = 17;
/// VRRP (RFC 9568), IPv4 protocol and IPv6 next header alike.
pub const IPPROTO_VRRP: u8 = 112;
/// TTL / hop limit written into every reply (the request's is meaningless for the answer).
pub const REPLY_TTL: u8 = 64;

// Byte offsets inside the NTP header.
pub const OFF_LI_VN_MODE: usize = 0;
pub const OFF_STRATUM: usize = 1;
pub const OFF_POLL: usize = 2;
pub const OFF_PRECISION: usize = 3;
pub const OFF_ROOT_DELAY: usize = 4;
pub const OFF_ROOT_DISPERSION: usize = 8;
pub const OFF_REFID: usize = 12;
pub const OFF_REFERENCE_TS: usize = 16;
pub const OFF_ORIGIN_TS: usize = 24;
pub const OFF_RECEIVE_TS: usize = 32;
pub const OFF_TRANSMIT_TS: usize = 40;

pub const MODE_CLIENT: u8 = 3;
pub const MODE_SERVER: u8 = 4;
pub const MIN_VERSION: u8 = 1;
pub const MAX_VERSION: u8 = 4;

pub const LEAP_NONE: u8 = 0;
pub const LEAP_ADD_SECOND: u8 = 1;
pub const LEAP_DEL_SECOND: u8 = 2;
pub const LEAP_UNSYNCHRONIZED: u8 = 3;

/// The leap indicator (RFC 5905 LI), typed; `bits` is what goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Leap {
    #[default]
    None,
    /// The last minute of the day has 61 seconds.
    InsertSecond,
    /// The last minute of the day has 59 seconds.
    DeleteSecond,
    /// The clock is not synchronized.
    Unsynchronized,
}

impl Leap {
    pub const fn from_bits(li: u8) -> Leap {
        match li & 3 {
            LEAP_NONE => Leap::None,
            LEAP_ADD_SECOND => Leap::InsertSecond,
            LEAP_DEL_SECOND => Leap::DeleteSecond,
            _ => Leap::Unsynchronized,
        }
    }

    pub const fn bits(self) -> u8 {
        match self {
            Leap::None => LEAP_NONE,
            Leap::InsertSecond => LEAP_ADD_SECOND,
            Leap::DeleteSecond => LEAP_DEL_SECOND,
            Leap::Unsynchronized => LEAP_UNSYNCHRONIZED,
        }
    }
}

/// Stratum sent while unsynchronized (RFC 5905: 0 = unspecified/invalid, refid is a kiss code).
pub const STRATUM_UNSPECIFIED: u8 = 0;
pub const MAX_STRATUM: u8 = 15;

/// Kiss code sent with an unsynchronized or stale clock: "not yet synchronized".
pub const KISS_INIT: [u8; 4] = *b"INIT";

#[inline(always)]
pub const fn leap(b0: u8) -> u8 {
    b0 >> 6
}

#[inline(always)]
pub const fn version(b0: u8) -> u8 {
    (b0 >> 3) & 0x7
}

#[inline(always)]
pub const fn mode(b0: u8) -> u8 {
    b0 & 0x7
}

#[inline(always)]
pub const fn li_vn_mode(leap: u8, version: u8, mode: u8) -> u8 {
    ((leap & 0x3) << 6) | ((version & 0x7) << 3) | (mode & 0x7)
}

#[inline(always)]
pub fn read_be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline(always)]
pub fn read_be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub fn read_be64(b: &[u8], off: usize) -> u64 {
    ((read_be32(b, off) as u64) << 32) | read_be32(b, off + 4) as u64
}

#[inline(always)]
pub fn write_be32(b: &mut [u8], off: usize, v: u32) {
    let bytes = v.to_be_bytes();
    b[off] = bytes[0];
    b[off + 1] = bytes[1];
    b[off + 2] = bytes[2];
    b[off + 3] = bytes[3];
}

#[inline(always)]
pub fn write_be64(b: &mut [u8], off: usize, v: u64) {
    write_be32(b, off, (v >> 32) as u32);
    write_be32(b, off + 4, v as u32);
}

/// A served address as the key of the served-address map: IPv6 as is, IPv4 as ::ffff:a.b.c.d.
#[inline(always)]
pub const fn ipv4_mapped_key(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_byte_round_trips() {
        for l in 0..4 {
            for v in 0..8 {
                for m in 0..8 {
                    let b = li_vn_mode(l, v, m);
                    assert_eq!((leap(b), version(b), mode(b)), (l, v, m));
                }
            }
        }
        // A typical v4 client request byte: LI=0, VN=4, mode 3.
        assert_eq!(li_vn_mode(0, 4, MODE_CLIENT), 0x23);
    }

    #[test]
    fn be_helpers() {
        let mut b = [0u8; 8];
        write_be64(&mut b, 0, 0x0102_0304_0506_0708);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(read_be64(&b, 0), 0x0102_0304_0506_0708);
        assert_eq!(read_be16(&b, 6), 0x0708);
        assert_eq!(
            ipv4_mapped_key([169, 254, 169, 123])[10..],
            [0xff, 0xff, 169, 254, 169, 123]
        );
    }
}
