//! The IO edge of the disciplined clock: sockets, timers and signals around [`System`].
//!
//! One connected UDP socket per request on a random source port (RFC 9109), a random transmit
//! timestamp as the request's cookie, the anchor republished after every change of the model
//! and at least once a second.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::clock::discipline::ClockModel;
use crate::clock::names::{literal_address, UpstreamNames};
use crate::clock::system::{System, SystemConfig, SystemEvent};
use crate::host::hostclock::{monotonic_now_ns, read_clock_pair};
use crate::host::timestamping;
use crate::responder::Responder;
use ntp_common::time::unix_ns_to_ntp_ns;

/// Longest gap between publications: keeps the anchor's age far below its maximum.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How long a request waits for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Names that did not resolve, or whose upstream was lost, are resolved again this often.
const RESOLVE_RETRY: Duration = Duration::from_secs(60);
/// One resolution's limit: a resolver that never answers costs a retry, never a stall.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a resolution came to: the name and its address, or why not.
type Resolution = (String, Result<SocketAddr>);

/// Resolves `name` in a task of its own, within [`RESOLVE_TIMEOUT`], and sends the outcome:
/// the clock loop never waits for DNS, it hands names over and takes answers as they come.
fn spawn_resolution(name: String, answers: mpsc::UnboundedSender<Resolution>) {
    tokio::spawn(async move {
        let r = match tokio::time::timeout(RESOLVE_TIMEOUT, resolve(&name)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "resolving upstream {name:?}: no answer within {RESOLVE_TIMEOUT:?}"
            )),
        };
        let _ = answers.send((name, r));
    });
}

/// Resolves `host` or `host:port` (default port 123).
pub async fn resolve(name: &str) -> Result<SocketAddr> {
    if let Some(a) = literal_address(name) {
        return Ok(a);
    }
    let with_port = if name
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        name.to_string()
    } else {
        format!("{name}:123")
    };
    let mut addrs = tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("resolving upstream {name:?}"))?;
    addrs
        .next()
        .with_context(|| format!("upstream {name:?} resolved to no address"))
}

struct Reply {
    id: usize,
    bytes: Vec<u8>,
    recv_ns: u64,
}

/// Sends `req` from a fresh socket and forwards the answer (if any) with its receive time.
/// Returns the monotonic time just after the send, for the request's origin.
async fn send_request(
    id: usize,
    addr: SocketAddr,
    req: [u8; 48],
    replies: mpsc::Sender<Reply>,
) -> Result<u64> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .context("binding a client socket")?;
    timestamping::enable(&sock)?;
    sock.connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // The fallback, stamped just before the syscall: on a veth the answer can arrive (and be
    // stamped by the kernel) before this task runs again after send().
    let before_send = monotonic_now_ns()?;
    sock.send(&req)
        .await
        .with_context(|| format!("sending to {addr}"))?;
    // The kernel's transmit stamp, taken as the datagram left through the driver: the send
    // path is then on neither leg, as with the reply's receive stamp (chronyd does the same).
    let sent_ns = match kernel_transmit_time(&sock).await? {
        Some(t) => t,
        None => {
            debug!(%addr, "no kernel transmit timestamp; using the time before send()");
            before_send
        }
    };
    tokio::spawn(async move {
        if let Ok(Ok((bytes, recv_ns))) =
            tokio::time::timeout(RESPONSE_TIMEOUT, recv_timestamped(&sock)).await
        {
            let _ = replies.send(Reply { id, bytes, recv_ns }).await;
        }
    });
    Ok(sent_ns)
}

/// The kernel's transmit timestamp of the datagram just sent, as CLOCK_MONOTONIC. Drivers
/// stamp in their transmit routine, normally within send() itself; a few ms at most are waited.
async fn kernel_transmit_time(sock: &UdpSocket) -> Result<Option<u64>> {
    for _ in 0..TX_STAMP_TRIES {
        if let Some(stamp) = timestamping::take_transmit_stamp(sock) {
            return timestamping::to_monotonic(stamp);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(None)
}

/// Tries (1 ms apart) for a transmit timestamp before falling back to the time before send().
const TX_STAMP_TRIES: usize = 5;

/// Receives one datagram with the kernel's receive timestamp, as CLOCK_MONOTONIC.
async fn recv_timestamped(sock: &UdpSocket) -> std::io::Result<(Vec<u8>, u64)> {
    let (bytes, _, rx) = crate::userspace::recv_timestamped(sock).await?;
    Ok((bytes, rx))
}

/// A socket that never carries traffic but keeps kernel receive timestamping enabled.
pub async fn timestamp_keeper() -> Result<std::net::UdpSocket> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("binding the timestamp keeper")?;
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
        .context("SO_TIMESTAMPNS")?;
    // Enabling is deferred to a kernel work item: give it a moment.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(sock)
}

/// Logs what deserves a line, once per state change.
#[derive(Default)]
struct EventLog {
    falsetickers: HashSet<SocketAddr>,
    no_selection: bool,
}

impl EventLog {
    fn log(&mut self, events: Vec<SystemEvent>) {
        let mut seen_falsetickers = HashSet::new();
        for e in events {
            match e {
                SystemEvent::Rejected { upstream, why } => {
                    debug!(%upstream, %why, "response not used")
                }
                SystemEvent::Denied { upstream, code } => error!(
                    %upstream, code = %String::from_utf8_lossy(&code),
                    "upstream refused service (kiss-o'-death): backed off (an hour, doubling to a \
                     day); its name is resolved again"
                ),
                SystemEvent::SystemPeerChanged { upstream } => {
                    self.no_selection = false;
                    info!(%upstream, "source selected")
                }
                SystemEvent::Falseticker { upstream } => {
                    seen_falsetickers.insert(upstream);
                    if self.falsetickers.insert(upstream) {
                        warn!(%upstream, "falseticker: outvoted by the other upstreams");
                    }
                }
                SystemEvent::NoSelection(why) => {
                    if !self.no_selection {
                        self.no_selection = true;
                        warn!(%why, "no source selected");
                    }
                }
                SystemEvent::Stepped { offset_s } => {
                    info!(offset_s, "clock set (first synchronization)")
                }
                SystemEvent::Corrected { phase_s, freq_ppm } => {
                    debug!(phase_s, freq_ppm, "clock corrected")
                }
                SystemEvent::StepRefused { offset_s } => {
                    error!(
                        offset_s,
                        "offset above the panic threshold refused; serving on without it"
                    )
                }
                SystemEvent::HoldoverEntered => {
                    warn!("every upstream lost: holdover on the last frequency")
                }
                SystemEvent::HoldoverExpired => {
                    error!("maximum holdover exceeded: serving as unsynchronized (LI=3)")
                }
                SystemEvent::LeapScheduled(l) => info!(
                    insert = l.insert,
                    "leap second scheduled at the end of the month"
                ),
                SystemEvent::LeapApplied(l) => info!(insert = l.insert, "leap second applied"),
            }
        }
        if !seen_falsetickers.is_empty() {
            self.falsetickers.retain(|a| seen_falsetickers.contains(a));
        }
    }
}

/// What a managed daemon keeps across its restarts so that served time goes on without a
/// jump: the frequency estimate (the published anchor's rate may include a slew under way).
#[derive(Debug, Clone)]
pub struct Continuity {
    pub state_file: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct SavedClock {
    freq_ppm: f64,
}

impl Continuity {
    fn load(&self) -> Option<f64> {
        let bytes = std::fs::read(&self.state_file).ok()?;
        serde_json::from_slice::<SavedClock>(&bytes)
            .ok()
            .map(|c| c.freq_ppm)
            .filter(|f| f.is_finite() && f.abs() < crate::clock::discipline::MAX_FREQ_PPM)
    }

    fn save(&self, freq_ppm: f64) {
        let tmp = self.state_file.with_extension("tmp");
        let ok = serde_json::to_vec(&SavedClock { freq_ppm })
            .ok()
            .and_then(|b| std::fs::write(&tmp, b).ok())
            .and_then(|_| std::fs::rename(&tmp, &self.state_file).ok());
        if ok.is_none() {
            warn!(file = %self.state_file.display(), "could not save the frequency estimate");
        }
    }
}

/// Disciplines the clock against `upstreams` and publishes it until `shutdown` resolves.
/// With `continuity`, a synchronized anchor an earlier daemon left in the maps is continued.
pub async fn run_disciplined(
    responder: &mut Responder,
    config: SystemConfig,
    upstreams: &[String],
    continuity: Option<Continuity>,
    status: crate::observe::status::ClockSnapshotCell,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if upstreams.is_empty() {
        bail!("no upstream configured");
    }
    let mut names = UpstreamNames::new(upstreams);
    // Addresses are upstreams at once; names are resolved by tasks of their own, and become
    // upstreams when they answer. Publishing never waits for DNS.
    let first: Vec<(String, SocketAddr)> = upstreams
        .iter()
        .filter_map(|n| literal_address(n).map(|a| (n.clone(), a)))
        .collect();
    for (name, a) in &first {
        info!(upstream = %name, address = %a, "upstream configured");
    }
    let addrs: Vec<SocketAddr> = first.iter().map(|(_, a)| *a).collect();
    let (resolved_tx, mut resolved_rx) = mpsc::unbounded_channel::<Resolution>();
    let mut resolving: HashSet<String> = HashSet::new();
    // Kernel software receive timestamps are switched on lazily and off again when the last
    // socket asking for them closes; a packet arriving in between is stamped when read. One
    // socket that asks for them for the daemon's whole life keeps them on for the per-request
    // sockets.
    let _timestamp_keeper = timestamp_keeper().await?;
    // Start from the host clock, unsynchronized; the first synchronization sets the model.
    // Unless an earlier daemon's synchronized clock is still being served: that goes on.
    let pair = read_clock_pair()?;
    let adopted = responder
        .current_anchor()
        .filter(|a| a.is_synchronized_at(pair.mono_ns));
    let mut system = match (adopted, &continuity) {
        (Some(anchor), Some(c)) => {
            let freq_ppm = c
                .load()
                .unwrap_or_else(|| ntp_common::time::freq_scaled_to_ppm(anchor.freq_scaled));
            info!(
                freq_ppm,
                stratum = anchor.stratum,
                "continuing the clock the previous daemon served"
            );
            System::resume(config, &addrs, &anchor, freq_ppm, pair.mono_ns)
        }
        _ => {
            let initial = ClockModel::new(pair.mono_ns, unix_ns_to_ntp_ns(pair.unix_ns));
            System::new(config, &addrs, initial, pair.mono_ns)
        }
    };
    // The first resolutions are the system's first upstreams, in order.
    for (i, (name, _)) in first.iter().enumerate() {
        names.bind(name, i);
    }
    let mut saved_freq = f64::NAN;
    let mut log = EventLog::default();
    let (tx, mut rx) = mpsc::channel::<Reply>(256);
    tokio::pin!(shutdown);
    // The first tick is at once: names are asked for as the loop starts.
    let mut resolve_timer = tokio::time::interval(RESOLVE_RETRY);
    resolve_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut publish = |system: &mut System,
                       responder: &mut Responder,
                       log: &mut EventLog|
     -> Result<()> {
        let now = monotonic_now_ns()?;
        let (anchor, events) = system.anchor(now);
        log.log(events);
        let publication = responder.publish_anchor(anchor)?;
        if publication.stepped_back_ns > 0 {
            error!(
                stepped_back_s = publication.stepped_back_ns as f64 * 1e-9,
                "the clock went back too far to hold served time: stepped back, serving LI=3 \
                 for a while"
            );
        }
        let mut snapshot = system.snapshot(now, &anchor);
        if snapshot.synchronized {
            if let Ok(pair) = read_clock_pair() {
                let host = ntp_common::time::unix_ns_to_ntp_ns(pair.unix_ns);
                snapshot.host_clock_offset_s =
                    Some((anchor.ntp_ns_at(pair.mono_ns) as i128 - host as i128) as f64 * 1e-9);
            }
        }
        *status.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        if let Some(c) = &continuity {
            let f = system.frequency_ppm();
            if system.is_synchronized() && (saved_freq.is_nan() || (f - saved_freq).abs() >= 1e-3) {
                c.save(f);
                saved_freq = f;
            }
        }
        Ok(())
    };
    publish(&mut system, responder, &mut log)?;
    loop {
        let now = monotonic_now_ns()?;
        for req in system.due_requests(now, rand::random::<u64>) {
            let addr = req.addr;
            match send_request(req.id, addr, req.packet, tx.clone()).await {
                Ok(sent) => system.on_sent(req.id, sent),
                Err(e) => debug!(%addr, error = %format!("{e:#}"), "request not sent"),
            }
        }
        let now = monotonic_now_ns()?;
        let wake = system
            .next_wakeup_ns()
            .map_or(PUBLISH_EVERY, |t| {
                Duration::from_nanos(t.saturating_sub(now))
            })
            .min(PUBLISH_EVERY);
        tokio::select! {
            _ = tokio::time::sleep(wake) => publish(&mut system, responder, &mut log)?,
            Some(reply) = rx.recv() => {
                let events = system.on_response(reply.id, &reply.bytes, reply.recv_ns);
                log.log(events);
                // The model may have changed: the kernel must not extrapolate the old rate.
                publish(&mut system, responder, &mut log)?;
            }
            _ = resolve_timer.tick() => {
                for name in names.due(&system) {
                    if resolving.insert(name.clone()) {
                        spawn_resolution(name, resolved_tx.clone());
                    }
                }
            }
            Some((name, result)) = resolved_rx.recv() => {
                resolving.remove(&name);
                match result {
                    Ok(a) => {
                        if let Some(change) =
                            names.resolved(&name, a, &mut system, monotonic_now_ns()?)
                        {
                            info!(upstream = %name, address = %a, %change, "upstream resolved");
                        }
                    }
                    Err(e) => warn!(
                        upstream = %name,
                        error = %format!("{e:#}"),
                        "upstream not resolved; will retry"
                    ),
                }
            }
            _ = &mut shutdown => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kernel_receive_timestamps_arrive() {
        let _keeper = timestamp_keeper().await.unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        nix::sys::socket::setsockopt(
            &client,
            nix::sys::socket::sockopt::ReceiveTimestampns,
            &true,
        )
        .unwrap();
        client.connect(server.local_addr().unwrap()).await.unwrap();
        server
            .send_to(b"hello", client.local_addr().unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = monotonic_now_ns().unwrap();
        let (bytes, recv_ns) = recv_timestamped(&client).await.unwrap();
        assert_eq!(bytes, b"hello");
        // The datagram arrived ~20 ms before we read it: the kernel's stamp says so.
        assert!(
            recv_ns < before,
            "receive time {recv_ns} is not the kernel's ({before}; {} ns later)",
            recv_ns as i128 - before as i128
        );
    }
}
