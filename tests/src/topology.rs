//! The guest ↔ VIP topology, `ntp-xdp serve` and chronyd servers come from `testbed`; here is
//! what needs ntp-common's packets: an upstream whose time is off by a known amount.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result};

pub use testbed::chrony::ChronyServer;
pub use testbed::netns::{link_namespaces, upstream_namespace, Netns};
pub use testbed::serve::ServeProcess;
pub use testbed::topology::Topology;

/// A small NTP server in `ns` that answers every client request with the host's clock plus a
/// fixed offset: an upstream whose time is wrong by a known amount (chronyd cannot serve a
/// clock other than its own). It states stratum 2 and a 15 µs root dispersion, as an honest
/// server would.
pub struct OffsetServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OffsetServer {
    pub fn start(ns: &Netns, offset_ns: i64) -> Result<OffsetServer> {
        use ntp_common::packet::NtpHeader;
        use ntp_common::time::{ntp_ns_to_timestamp, unix_ns_to_ntp_ns};
        use ntp_common::wire::{MODE_CLIENT, MODE_SERVER};
        let file = ns.file()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let bound = testbed::netns::enter(&file)
                .and_then(|_| Ok(std::net::UdpSocket::bind("0.0.0.0:123")?))
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(100)))?;
                    Ok(s)
                });
            let sock = match bound {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let now = || {
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                unix_ns_to_ntp_ns(unix).wrapping_add_signed(offset_ns)
            };
            let mut buf = [0u8; 512];
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let received = now();
                let Some(req) = NtpHeader::parse(&buf[..n]).filter(|h| h.mode == MODE_CLIENT)
                else {
                    continue;
                };
                let reply = NtpHeader {
                    version: req.version.clamp(1, 4),
                    mode: MODE_SERVER,
                    stratum: 2,
                    poll: req.poll,
                    precision: -20,
                    refid: *b"OFST",
                    root_delay: 0,
                    root_dispersion: 1,
                    reference_ts: ntp_ns_to_timestamp(received - 1_000_000_000),
                    origin_ts: req.transmit_ts,
                    receive_ts: ntp_ns_to_timestamp(received),
                    transmit_ts: ntp_ns_to_timestamp(now()),
                    leap: 0,
                };
                let _ = sock.send_to(&reply.serialize(), from);
            }
        });
        ready_rx
            .recv()
            .context("the offset server's thread ended")?
            .context("binding the offset server")?;
        Ok(OffsetServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for OffsetServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
