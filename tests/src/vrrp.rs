//! Forged VRRPv3 adverts (RFC 9568 §5), as an attacker on a guest sends them: whole Ethernet
//! frames on an AF_PACKET socket, so the test chooses every address (its own or a spoofed
//! peer's source; the multicast group or one VIP host's MAC and address).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};
use etherparse::{IpNumber, PacketBuilder};

use crate::topology::Netns;

/// VRRP's IPv4 multicast group 224.0.0.18 and its MAC.
pub const VRRP_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
pub const VRRP_GROUP_MAC: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x12];

/// One advert: who it claims to come from, where it goes, what it claims.
#[derive(Clone, Debug)]
pub struct Advert {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dst_mac: [u8; 6],
    pub router_id: u8,
    pub priority: u8,
    pub addresses: Vec<Ipv4Addr>,
}

impl Advert {
    /// The VRRP message: version 3, type 1 (advertisement), a 1 s interval (in centiseconds),
    /// the addresses, and the checksum over the IPv4 pseudo-header (RFC 9568 §5.2.8).
    pub fn message(&self) -> Vec<u8> {
        let mut m = vec![
            0x31,
            self.router_id,
            self.priority,
            self.addresses.len() as u8,
        ];
        m.extend_from_slice(&100u16.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        for a in &self.addresses {
            m.extend_from_slice(&a.octets());
        }
        // etherparse sums the words in memory order: its result goes back the same way.
        let checksum = self.pseudo_header_sum(&m).ones_complement();
        m[6..8].copy_from_slice(&checksum.to_ne_bytes());
        m
    }

    /// The one's-complement sum over the IPv4 pseudo-header and `message` (etherparse's).
    fn pseudo_header_sum(&self, message: &[u8]) -> etherparse::checksum::Sum16BitWords {
        etherparse::checksum::Sum16BitWords::new()
            .add_4bytes(self.src.octets())
            .add_4bytes(self.dst.octets())
            .add_2bytes([0, IpNumber(112).0])
            .add_2bytes((message.len() as u16).to_be_bytes())
            .add_slice(message)
    }

    /// The whole frame, TTL 255 as VRRP requires.
    pub fn frame(&self, src_mac: [u8; 6]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(src_mac, self.dst_mac)
            .ipv4(self.src.octets(), self.dst.octets(), 255)
            .write(&mut out, IpNumber(112), &self.message())
            .expect("an advert fits a frame");
        out
    }
}

/// An AF_PACKET socket on one interface of a namespace: frames go out as written.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    pub fn open(ns: &Netns, interface: &str) -> Result<PacketSocket> {
        let file = ns.file()?;
        let interface = interface.to_string();
        // A socket belongs to the namespace it was made in: make it on a thread that enters it.
        std::thread::spawn(move || -> Result<PacketSocket> {
            testbed::netns::enter(&file)?;
            let ifindex = nix::net::if_::if_nametoindex(interface.as_str())
                .with_context(|| format!("no interface {interface}"))?
                as i32;
            // SAFETY: a plain socket(2) call; the descriptor is owned at once.
            let raw = unsafe { nix::libc::socket(nix::libc::AF_PACKET, nix::libc::SOCK_RAW, 0) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
            }
            // SAFETY: `raw` is a new descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            Ok(PacketSocket { fd, ifindex })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the socket thread panicked"))?
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut addr: nix::libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = nix::libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address outlive the call; lengths are theirs.
        let sent = unsafe {
            nix::libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<nix::libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error()).context("sending a frame");
        }
        if sent as usize != frame.len() {
            bail!("sent {sent} of {} bytes", frame.len());
        }
        Ok(())
    }
}

/// The MAC of `interface` in `ns` (`ip -br link`).
pub fn mac_of(ns: &str, interface: &str) -> Result<[u8; 6]> {
    let out = crate::ip(&["-n", ns, "-br", "link", "show", interface])?;
    let text = out
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC in {out:?}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("{text:?} is not a MAC");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("{text:?} is not a MAC"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum verifies: the sum over pseudo-header and message, checksum included, is
    /// all ones.
    #[test]
    fn the_advert_checksum_verifies() {
        let a = Advert {
            src: Ipv4Addr::new(169, 254, 81, 21),
            dst: VRRP_GROUP,
            dst_mac: VRRP_GROUP_MAC,
            router_id: 7,
            priority: 255,
            addresses: vec![Ipv4Addr::new(169, 254, 81, 1)],
        };
        let m = a.message();
        assert_eq!(a.pseudo_header_sum(&m).ones_complement(), 0);
        let f = a.frame([2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[..6], &VRRP_GROUP_MAC);
        assert_eq!(f[14 + 8], 255, "TTL");
        assert_eq!(f[14 + 9], 112, "protocol");
    }
}
