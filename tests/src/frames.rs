//! Request frames for the kernel fixtures, built with etherparse (an implementation independent
//! of ours), and the byte offsets the tests patch to make them malformed.

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, VlanId,
};
use ntp_common::wire::{li_vn_mode, MODE_CLIENT, NTP_HEADER_LEN};

pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x02];
pub const VIP_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x01];
pub const GUEST_V4: [u8; 4] = [169, 254, 7, 2];
pub const CLOCK_V4: [u8; 4] = [169, 254, 169, 123];
pub const OTHER_V4: [u8; 4] = [169, 254, 7, 1];
pub const GUEST_V6: [u8; 16] = [0xfd, 0, 0x0e, 0xc2, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const CLOCK_V6: [u8; 16] = [
    0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x23,
];
pub const CLIENT_PORT: u16 = 40_123;
/// A recognisable transmit timestamp that the reply must echo as its origin, bit for bit.
pub const CLIENT_TRANSMIT: u64 = 0xeb4c_6f2a_1234_5678;

/// A client request header.
pub fn ntp_request(version: u8, mode: u8, poll: i8) -> Vec<u8> {
    let mut h = vec![0u8; NTP_HEADER_LEN];
    h[0] = li_vn_mode(0, version, mode);
    h[2] = poll as u8;
    h[40..48].copy_from_slice(&CLIENT_TRANSMIT.to_be_bytes());
    h
}

pub fn v4_request() -> Vec<u8> {
    ntp_request(4, MODE_CLIENT, 6)
}

#[derive(Clone, Debug)]
pub enum Vlan {
    Dot1q(u16),
    Dot1ad(u16),
    /// An 802.1ad service tag (outer) around an 802.1Q customer tag (inner).
    QinQ(u16, u16),
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub vlan: Option<Vlan>,
    pub ipv6: bool,
    pub src_v4: [u8; 4],
    pub dst_v4: [u8; 4],
    pub src_v6: [u8; 16],
    pub dst_v6: [u8; 16],
    /// Raw IPv4 options (a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn v4(payload: Vec<u8>) -> Frame {
        Frame {
            vlan: None,
            ipv6: false,
            src_v4: GUEST_V4,
            dst_v4: CLOCK_V4,
            src_v6: GUEST_V6,
            dst_v6: CLOCK_V6,
            ipv4_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            src_port: CLIENT_PORT,
            dst_port: 123,
            payload,
        }
    }

    pub fn v6(payload: Vec<u8>) -> Frame {
        Frame {
            ipv6: true,
            ..Frame::v4(payload)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(GUEST_MAC, VIP_MAC);
        let ip = if self.ipv6 {
            IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: 0,
                    next_header: IpNumber::UDP,
                    hop_limit: 7,
                    source: self.src_v6,
                    destination: self.dst_v6,
                },
                Default::default(),
            )
        } else {
            let mut h = Ipv4Header::new(0, 7, IpNumber::UDP, self.src_v4, self.dst_v4).unwrap();
            h.identification = 0x4242;
            h.more_fragments = self.more_fragments;
            h.fragment_offset = self.fragment_offset.try_into().unwrap();
            h.options = self.ipv4_options.as_slice().try_into().unwrap();
            IpHeaders::Ipv4(h, Default::default())
        };
        let mut out = Vec::new();
        match self.vlan {
            None => eth
                .ip(ip)
                .udp(self.src_port, self.dst_port)
                .write(&mut out, &self.payload),
            Some(Vlan::Dot1q(id)) | Some(Vlan::Dot1ad(id)) => eth
                .single_vlan(VlanId::try_new(id).unwrap())
                .ip(ip)
                .udp(self.src_port, self.dst_port)
                .write(&mut out, &self.payload),
            Some(Vlan::QinQ(outer, inner)) => eth
                .double_vlan(
                    VlanId::try_new(outer).unwrap(),
                    VlanId::try_new(inner).unwrap(),
                )
                .ip(ip)
                .udp(self.src_port, self.dst_port)
                .write(&mut out, &self.payload),
        }
        .unwrap();
        match self.vlan {
            Some(Vlan::Dot1ad(_)) => out[12..14].copy_from_slice(&[0x88, 0xa8]),
            Some(Vlan::QinQ(..)) => {
                out[12..14].copy_from_slice(&[0x88, 0xa8]);
                out[16..18].copy_from_slice(&[0x81, 0x00]);
            }
            _ => {}
        }
        out
    }

    /// Offset of the IP header.
    pub fn l3(&self) -> usize {
        14 + match self.vlan {
            None => 0,
            Some(Vlan::QinQ(..)) => 8,
            Some(_) => 4,
        }
    }

    /// Offset of the UDP header.
    pub fn l4(&self) -> usize {
        self.l3()
            + if self.ipv6 {
                40
            } else {
                20 + self.ipv4_options.len()
            }
    }
}

/// The UDP checksum field as a CHECKSUM_PARTIAL sender leaves it: the folded, uncomplemented
/// sum of the pseudo-header (what Linux writes before it hands the datagram to the device).
pub fn partial_checksum_seed(src: &[u8], dst: &[u8], udp_len: u16) -> u16 {
    let mut sum: u32 = 17 + udp_len as u32;
    for pair in src.chunks(2).chain(dst.chunks(2)) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}
