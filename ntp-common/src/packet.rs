//! The 48-byte NTP header as a value, for the daemon's client side and tests.

use crate::wire::*;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NtpHeader {
    pub leap: u8,
    pub version: u8,
    pub mode: u8,
    pub stratum: u8,
    pub poll: i8,
    pub precision: i8,
    /// NTP short format (16.16 s).
    pub root_delay: u32,
    pub root_dispersion: u32,
    pub refid: [u8; 4],
    pub reference_ts: u64,
    pub origin_ts: u64,
    pub receive_ts: u64,
    pub transmit_ts: u64,
}

impl NtpHeader {
    /// Parses the fixed header; extension fields after it are ignored. `None` if too short.
    pub fn parse(b: &[u8]) -> Option<NtpHeader> {
        if b.len() < NTP_HEADER_LEN {
            return None;
        }
        Some(NtpHeader {
            leap: leap(b[0]),
            version: version(b[0]),
            mode: mode(b[0]),
            stratum: b[OFF_STRATUM],
            poll: b[OFF_POLL] as i8,
            precision: b[OFF_PRECISION] as i8,
            root_delay: read_be32(b, OFF_ROOT_DELAY),
            root_dispersion: read_be32(b, OFF_ROOT_DISPERSION),
            refid: [b[12], b[13], b[14], b[15]],
            reference_ts: read_be64(b, OFF_REFERENCE_TS),
            origin_ts: read_be64(b, OFF_ORIGIN_TS),
            receive_ts: read_be64(b, OFF_RECEIVE_TS),
            transmit_ts: read_be64(b, OFF_TRANSMIT_TS),
        })
    }

    pub fn serialize(&self) -> [u8; NTP_HEADER_LEN] {
        let mut b = [0u8; NTP_HEADER_LEN];
        b[0] = li_vn_mode(self.leap, self.version, self.mode);
        b[OFF_STRATUM] = self.stratum;
        b[OFF_POLL] = self.poll as u8;
        b[OFF_PRECISION] = self.precision as u8;
        write_be32(&mut b, OFF_ROOT_DELAY, self.root_delay);
        write_be32(&mut b, OFF_ROOT_DISPERSION, self.root_dispersion);
        b[12..16].copy_from_slice(&self.refid);
        write_be64(&mut b, OFF_REFERENCE_TS, self.reference_ts);
        write_be64(&mut b, OFF_ORIGIN_TS, self.origin_ts);
        write_be64(&mut b, OFF_RECEIVE_TS, self.receive_ts);
        write_be64(&mut b, OFF_TRANSMIT_TS, self.transmit_ts);
        b
    }

    /// A client request whose transmit timestamp is `transmit` (any unpredictable value: the
    /// server only echoes it, and matching it is what authenticates the answer's freshness).
    pub fn client_request(poll: i8, transmit: u64) -> NtpHeader {
        NtpHeader {
            version: 4,
            mode: MODE_CLIENT,
            poll,
            transmit_ts: transmit,
            ..Default::default()
        }
    }

    /// The kiss code of a kiss-o'-death packet (stratum 0), if this is one.
    pub fn kiss_code(&self) -> Option<[u8; 4]> {
        (self.stratum == STRATUM_UNSPECIFIED).then_some(self.refid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = NtpHeader {
            leap: 1,
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            poll: -3,
            precision: -24,
            root_delay: 0x0001_8000,
            root_dispersion: 7,
            refid: [169, 254, 0, 1],
            reference_ts: 1,
            origin_ts: 2,
            receive_ts: 3,
            transmit_ts: u64::MAX,
        };
        assert_eq!(NtpHeader::parse(&h.serialize()), Some(h));
        assert_eq!(NtpHeader::parse(&[0u8; 47]), None);
    }

    #[test]
    fn kiss_codes() {
        let mut h = NtpHeader::client_request(6, 9);
        assert_eq!(h.kiss_code(), Some([0; 4]));
        h.stratum = 3;
        assert_eq!(h.kiss_code(), None);
    }
}
