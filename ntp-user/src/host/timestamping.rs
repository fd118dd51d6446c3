//! Kernel software timestamps on UDP sockets, as chronyd takes them: the receive time comes
//! with the datagram, the transmit time from the socket's error queue once the datagram left
//! through the driver (SO_TIMESTAMPING, `SOF_TIMESTAMPING_TX_SOFTWARE`). Stamps are
//! CLOCK_REALTIME; the daemon's clock works in CLOCK_MONOTONIC, so each is converted by the
//! realtime time elapsed since it (never by the offset between the clocks, which a host clock
//! step would change).

use std::os::fd::{AsFd, AsRawFd as _};

use anyhow::{Context as _, Result};
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage, TimestampingFlag,
};

use super::hostclock::read_clock_pair;

/// Asks for software transmit and receive timestamps, reported without the packet's bytes.
pub fn enable(sock: &impl AsFd) -> Result<()> {
    let flags = TimestampingFlag::SOF_TIMESTAMPING_SOFTWARE
        | TimestampingFlag::SOF_TIMESTAMPING_TX_SOFTWARE
        | TimestampingFlag::SOF_TIMESTAMPING_RX_SOFTWARE
        | TimestampingFlag::SOF_TIMESTAMPING_OPT_TSONLY;
    setsockopt(sock, sockopt::Timestamping, &flags).context("SO_TIMESTAMPING")
}

/// A kernel timestamp (CLOCK_REALTIME ns) as CLOCK_MONOTONIC, by the realtime elapsed since;
/// `None` for a stamp in the future or more than a second old (not this datagram's).
pub fn to_monotonic(stamp_unix_ns: u64) -> Result<Option<u64>> {
    let pair = read_clock_pair()?;
    let elapsed = pair.unix_ns.checked_sub(stamp_unix_ns);
    Ok(elapsed
        .filter(|e| *e < 1_000_000_000)
        .map(|e| pair.mono_ns - e))
}

/// The software timestamp a control message carries, if any (SCM_TIMESTAMPNS or
/// SCM_TIMESTAMPING).
pub fn stamp_of(cmsg: &ControlMessageOwned) -> Option<u64> {
    let ts = match cmsg {
        ControlMessageOwned::ScmTimestampns(ts) => *ts,
        ControlMessageOwned::ScmTimestampsns(t) => t.system,
        _ => return None,
    };
    let ns = ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64;
    (ns != 0).then_some(ns)
}

/// The transmit timestamp waiting in the socket's error queue (CLOCK_REALTIME ns), without
/// blocking: `None` when none is there (yet).
pub fn take_transmit_stamp(sock: &impl AsFd) -> Option<u64> {
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = Vec::with_capacity(512);
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let mut cmsgs = msg.cmsgs().ok()?;
    cmsgs.find_map(|c| stamp_of(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram over loopback: the kernel stamps its departure and its arrival, the first
    /// before the second, and both convert to monotonic readings around the send. The kernel
    /// turns receive stamping on for the whole host through deferred work after the first
    /// socket asks (`net_enable_timestamp`): on a loaded machine the first datagrams may
    /// arrive unstamped, so the exchange is repeated (bounded) until one is.
    #[tokio::test]
    async fn transmit_and_receive_stamps_arrive() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable(&a).unwrap();
        enable(&b).unwrap();
        for attempt in 0..200 {
            let before = crate::host::hostclock::monotonic_now_ns().unwrap();
            a.send_to(b"ntp", b.local_addr().unwrap()).unwrap();
            let mut tx = None;
            for _ in 0..100 {
                tx = take_transmit_stamp(&a);
                if tx.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let mut buf = [0u8; 16];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = Vec::with_capacity(512);
            let msg = recvmsg::<SockaddrStorage>(
                b.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .unwrap();
            let rx = msg.cmsgs().unwrap().find_map(|c| stamp_of(&c));
            let (Some(tx), Some(rx)) = (tx, rx) else {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            };
            let tx = to_monotonic(tx).unwrap().unwrap();
            let rx = to_monotonic(rx).unwrap().unwrap();
            let after = crate::host::hostclock::monotonic_now_ns().unwrap();
            // Conversions are good to the clock pair's own reading time: allow 50 µs.
            let slack = 50_000;
            assert!(
                before <= tx + slack && tx <= rx + slack && rx <= after + slack,
                "attempt {attempt}: before {before} tx {tx} rx {rx} after {after}"
            );
            return;
        }
        panic!("200 datagrams over loopback and none carried both stamps");
    }
}
