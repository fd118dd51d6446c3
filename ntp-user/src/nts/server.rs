//! The IO around the NTS core: the key exchange over TLS 1.3 (tokio-rustls) on a thread of
//! its own, the cookie keys' file and its rotation, and [`NtsState::respond`] for the
//! userspace path.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::cookie::{CookieKeys, SessionKeys};
use super::ke::{self, Negotiated};
use super::packet::{self, Parsed, Verdict};
use super::slots::{ExchangeSlots, Refused, Slot, SlotLimits};
use super::{ALPN, EXPORTER_LABEL};
use crate::host::netns;

/// The `[nts]` section, validated.
#[derive(Debug, Clone)]
pub struct NtsSpec {
    pub certificate_chain: PathBuf,
    pub private_key: PathBuf,
    /// Addresses the key exchange listens on (in the service namespace), and its port.
    pub listen: Vec<IpAddr>,
    pub port: u16,
    /// Where the cookie keys are kept across restarts (and shared by hosts that share it).
    pub key_file: PathBuf,
    pub key_rotation: Duration,
    /// False in a fleet: the fleet agent rotates the keys in the store (one host at a time,
    /// so two hosts never make different keys under one id) and this server adopts them.
    pub rotate_locally: bool,
    /// The NTP server the key exchange names (its "server" record), per family: the clock
    /// address guests reach. None: no record, the client uses the key exchange's address.
    pub ntp_server_v4: Option<IpAddr>,
    pub ntp_server_v6: Option<IpAddr>,
}

/// What NTS did, for `stats`, status and metrics.
#[derive(Debug, Default)]
pub struct NtsCounters {
    pub key_exchanges: AtomicU64,
    /// Handshakes or requests that failed, and Error records sent.
    pub key_exchange_failures: AtomicU64,
    /// Key exchange connections from sources the access list or rate limit refused.
    pub key_exchanges_refused: AtomicU64,
    /// Connections closed at once because their address or IPv6 /64 had its share of
    /// exchanges running ([`SlotLimits`]).
    pub key_exchanges_over_source_limit: AtomicU64,
    /// Connections closed at once because the server had its most exchanges running.
    pub key_exchanges_busy: AtomicU64,
    /// Exchanges cut off because the client did not finish its part in time.
    pub key_exchange_deadlines: AtomicU64,
    pub requests_answered: AtomicU64,
    /// NAKs for cookies that are not (or no longer) ours.
    pub cookie_failures: AtomicU64,
    /// NAKs for requests whose cookie opened but whose authenticator did not verify.
    pub authentication_failures: AtomicU64,
    /// NTS fields that did not make a request: never answered.
    pub malformed: AtomicU64,
    pub key_rotations: AtomicU64,
}

/// The cookie keys and counters, shared by the key exchange and the userspace path.
#[derive(Debug)]
pub struct NtsState {
    keys: RwLock<CookieKeys>,
    pub counters: NtsCounters,
}

/// What the userspace path sends for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtsResponse {
    /// Not an NTS request: answer it as any other.
    NotNts,
    /// The protected reply.
    Reply(Vec<u8>),
    /// A NAK: a kiss-o'-death NTSN with this identifier field (see [`packet::nak`]).
    Nak(Vec<u8>),
    /// Nothing (malformed NTS fields).
    Drop,
}

impl NtsState {
    pub fn new(keys: CookieKeys) -> NtsState {
        NtsState {
            keys: RwLock::new(keys),
            counters: NtsCounters::default(),
        }
    }

    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).ids()
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, CookieKeys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// New cookies for `session` under the current key.
    pub fn cookies(&self, session: &SessionKeys, n: usize) -> Vec<Vec<u8>> {
        let keys = self.keys();
        (0..n).map(|_| keys.seal(session, rand::random())).collect()
    }

    /// The answer to `request` (admitted, valid), whose plain reply header is `header`.
    pub fn respond(&self, request: &[u8], header: &[u8; 48]) -> NtsResponse {
        let req = match packet::parse(request) {
            Parsed::NotNts => return NtsResponse::NotNts,
            Parsed::Malformed(why) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                debug!(why, "malformed NTS request dropped");
                return NtsResponse::Drop;
            }
            Parsed::Request(r) => r,
        };
        let verdict = packet::verify(request, &req, &self.keys());
        match verdict {
            Verdict::Authentic(session) => {
                let cookies = self.cookies(&session, packet::cookies_wanted(&req));
                let reply =
                    packet::protected_reply(header, &req, &session, &cookies, rand::random());
                self.counters
                    .requests_answered
                    .fetch_add(1, Ordering::Relaxed);
                NtsResponse::Reply(reply)
            }
            Verdict::UnknownCookie => {
                self.counters
                    .cookie_failures
                    .fetch_add(1, Ordering::Relaxed);
                NtsResponse::Nak(req.unique_id.to_vec())
            }
            Verdict::BadAuthenticator => {
                self.counters
                    .authentication_failures
                    .fetch_add(1, Ordering::Relaxed);
                NtsResponse::Nak(req.unique_id.to_vec())
            }
        }
    }

    /// Adopts the file's keys when they changed (another host or an operator wrote them),
    /// then rotates if due and writes the file back.
    /// `rotation` None: never rotate here (a fleet agent does).
    fn refresh(&self, file: &Path, rotation: Option<Duration>) -> Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if let Some(on_disk) = read_keys(file)? {
            if on_disk != *keys {
                info!(ids = ?on_disk.ids(), file = %file.display(), "NTS cookie keys changed on disk: adopted");
                if on_disk.current().id != keys.current().id {
                    self.counters.key_rotations.fetch_add(1, Ordering::Relaxed);
                }
                *keys = on_disk;
            }
        }
        let Some(rotation) = rotation else {
            return Ok(());
        };
        if keys.rotate_if_due(
            crate::host::hostclock::unix_now_s(),
            rotation.as_secs().max(1),
            rand::random(),
        ) {
            self.counters.key_rotations.fetch_add(1, Ordering::Relaxed);
            write_keys(file, &keys)?;
            info!(current = keys.current().id, kept = ?keys.ids(), "NTS cookie key rotated");
        }
        Ok(())
    }
}

fn read_keys(file: &Path) -> Result<Option<CookieKeys>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let keys: CookieKeys = serde_json::from_str(&text)
        .with_context(|| format!("{}: not an NTS key file", file.display()))?;
    keys.check()
        .map_err(|why| anyhow!("{}: {why}", file.display()))?;
    Ok(Some(keys))
}

/// Writes the keys readable by root only, atomically (a restart never reads half a file).
pub fn write_keys(file: &Path, keys: &CookieKeys) -> Result<()> {
    crate::host::files::write_atomic(file, serde_json::to_string(keys)?.as_bytes())
}

/// The keys of `file`, made (and written) when there is none; rotated if due.
pub fn load_or_create_keys(file: &Path, rotation: Option<Duration>) -> Result<NtsState> {
    let keys = match read_keys(file)? {
        Some(k) => {
            info!(ids = ?k.ids(), file = %file.display(), "NTS cookie keys loaded");
            k
        }
        None => {
            let k = CookieKeys::new(
                rand::random(),
                rand::random::<u32>() >> 1,
                crate::host::hostclock::unix_now_s(),
            );
            write_keys(file, &k)?;
            info!(file = %file.display(), "NTS cookie keys created");
            k
        }
    };
    let state = NtsState::new(keys);
    state.refresh(file, rotation)?;
    Ok(state)
}

impl NtsSpec {
    /// Its TLS 1.3 server configuration (see [`tls_config`]): the files load and go together.
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        tls_config(&self.certificate_chain, &self.private_key)
    }
}

/// The TLS 1.3 server configuration: the certificate chain and key, ALPN `ntske/1` only.
pub fn tls_config(chain: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
        .with_context(|| format!("reading {}", chain.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", chain.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", chain.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: no PEM private key in it", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and the private key do not go together")?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Binds the key exchange's listeners in the namespace of this name (the current one
/// without). IP_FREEBIND, as for the userspace path's sockets.
pub fn bind_listeners(
    netns_name: Option<&str>,
    addrs: &[IpAddr],
    port: u16,
) -> Result<Vec<std::net::TcpListener>> {
    let bind = || -> Result<Vec<std::net::TcpListener>> {
        use nix::sys::socket::{listen, Backlog, SockType};
        let mut out = Vec::new();
        for addr in addrs {
            let fd = crate::host::files::bind_freebind(*addr, port, SockType::Stream, "NTS-KE")?;
            listen(&fd, Backlog::new(128).expect("a valid backlog")).context("listen()")?;
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            out.push(l);
        }
        Ok(out)
    };
    match netns_name {
        Some(name) => netns::within(&netns::open_named_netns(name)?, bind),
        None => bind(),
    }
}

/// Whether a source may have time (the access list and its rate), as the userspace path
/// decides it.
pub type Admit = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// How long a client has for the TLS handshake and its request (up to End of Message), from
/// the moment it is accepted. An honest client sends its ClientHello at once and its request
/// right after the handshake: two round trips and a signature, milliseconds here. Three
/// seconds leave room for a lost segment (TCP retransmits after 1 s) on a loaded host, while
/// a connection that sends nothing holds its slot no longer than that.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
/// How long writing the response may take (it fits in a socket buffer: only a client that
/// stopped reading takes long).
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(2);
/// Cookies a key exchange hands out (RFC 8915 §4.1.6 suggests eight).
const COOKIES_PER_KE: usize = 8;

/// Everything the key exchange serves with.
pub struct KeyExchange {
    pub spec: NtsSpec,
    /// The service namespace the listeners are bound in again when `plumbing` moves on.
    pub netns_name: Option<String>,
    pub listeners: Vec<std::net::TcpListener>,
    pub plumbing: watch::Receiver<u64>,
    pub tls: Arc<rustls::ServerConfig>,
    pub state: Arc<NtsState>,
    pub admit: Admit,
}

/// The key exchange running on a thread of its own; stopped (and its sockets closed) when
/// dropped.
///
/// Its own thread, with its own runtime, because of what TLS costs: each handshake is a
/// signature and a key agreement, and a guest can start as many as it can open connections.
/// The daemon's runtime has one thread for the clock task, the userspace path and the
/// health answer keepalived waits on; handshakes there would delay each of them. Here the
/// kernel's scheduler shares the CPUs between the two threads, and the time path never waits
/// for a handshake.
pub struct KeyExchangeThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeyExchange {
    /// Starts serving on the thread `nts-ke`.
    pub fn spawn(self) -> Result<KeyExchangeThread> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nts-ke".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "the NTS key exchange's runtime did not start");
                        return;
                    }
                };
                let outcome = rt.block_on(async {
                    tokio::select! {
                        r = self.serve() => Some(r),
                        _ = stopped => None,
                    }
                });
                if let Some(Err(e)) = outcome {
                    tracing::error!(error = %format!("{e:#}"), "the NTS key exchange stopped");
                }
                // Exchanges in flight are dropped; a key-file refresh gets a moment to end.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("starting the NTS key exchange's thread")?;
        Ok(KeyExchangeThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Serves the key exchange until the future is dropped; when `plumbing` moves on the
    /// listeners are bound again in the recreated namespace. Rotates the cookie keys as due.
    pub async fn serve(self) -> Result<()> {
        let KeyExchange {
            spec,
            netns_name,
            listeners,
            mut plumbing,
            tls,
            state,
            admit,
        } = self;
        let server = Arc::new(Server {
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            slots: ExchangeSlots::new(SlotLimits::DEFAULT),
            deadlines: Deadlines::DEFAULT,
            state,
            admit,
            spec,
        });
        let spec = &server.spec;
        let mut listeners = Some(listeners);
        let mut rotation = tokio::time::interval(
            (spec.key_rotation / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
        );
        loop {
            let ls = match listeners.take() {
                Some(l) => l,
                None => match bind_listeners(netns_name.as_deref(), &spec.listen, spec.port) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "binding the NTS key exchange again failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let mut tasks = tokio::task::JoinSet::new();
            for l in ls {
                let l = tokio::net::TcpListener::from_std(l).context("registering a listener")?;
                info!(address = %l.local_addr()?, "NTS key exchange listening");
                tasks.spawn(server.clone().accept_loop(l));
            }
            let rebind = loop {
                tokio::select! {
                    Some(done) = tasks.join_next() => {
                        done.context("an NTS-KE task failed")??;
                    }
                    _ = rotation.tick() => {
                        let server = server.clone();
                        let refreshed = tokio::task::spawn_blocking(move || {
                            let spec = &server.spec;
                            server.state.refresh(
                                &spec.key_file,
                                spec.rotate_locally.then_some(spec.key_rotation),
                            )
                        })
                        .await?;
                        if let Err(e) = refreshed {
                            warn!(error = %format!("{e:#}"), "NTS cookie keys: refresh failed; keeping the keys in memory");
                        }
                    }
                    Ok(()) = plumbing.changed() => break true,
                }
            };
            if rebind {
                info!("plumbing recreated: binding the NTS key exchange again");
                tasks.abort_all();
            }
        }
    }
}

impl Drop for KeyExchangeThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the NTS key exchange's thread panicked");
            }
        }
    }
}

/// How long each part of an exchange may take.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    request: Duration,
    response: Duration,
}

impl Deadlines {
    const DEFAULT: Deadlines = Deadlines {
        request: REQUEST_DEADLINE,
        response: RESPONSE_DEADLINE,
    };
}

/// What the accept loops share.
struct Server {
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<ExchangeSlots>,
    deadlines: Deadlines,
    state: Arc<NtsState>,
    admit: Admit,
    spec: NtsSpec,
}

impl Server {
    /// Accepts every connection at once (so its source is known) and either starts its
    /// exchange or closes it: a source the access list or rate refuses, a source with its
    /// share running, a server with its most running.
    async fn accept_loop(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<()> {
        let counters = &self.state.counters;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, say: give the exchanges running time to end.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let source = peer.ip().to_canonical();
            let counter = if !(self.admit)(source) {
                &counters.key_exchanges_refused
            } else {
                match self.slots.try_take(source) {
                    Ok(slot) => {
                        tokio::spawn(self.clone().run_exchange(stream, peer, slot));
                        continue;
                    }
                    Err(Refused::Address | Refused::V6Prefix) => {
                        &counters.key_exchanges_over_source_limit
                    }
                    Err(Refused::Busy) => &counters.key_exchanges_busy,
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // A reset: nothing lingers on this side for a connection never served.
            let _ = stream.set_zero_linger();
        }
    }

    async fn run_exchange(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        _slot: Slot,
    ) {
        let counters = &self.state.counters;
        let local = match stream.local_addr() {
            Ok(a) => a.ip().to_canonical(),
            Err(_) => return,
        };
        let outcome = key_exchange(
            stream,
            local,
            &self.acceptor,
            &self.state,
            &self.spec,
            self.deadlines,
        )
        .await;
        match outcome {
            Ok(()) => {
                counters.key_exchanges.fetch_add(1, Ordering::Relaxed);
            }
            Err(ExchangeError::Deadline(part)) => {
                counters
                    .key_exchange_deadlines
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, part, "NTS key exchange cut off at its deadline");
            }
            Err(ExchangeError::Failed(e)) => {
                counters
                    .key_exchange_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, error = %format!("{e:#}"), "NTS key exchange failed");
            }
        }
    }
}

/// Why an exchange gave no cookies.
#[derive(Debug)]
enum ExchangeError {
    /// The client did not finish this part in time.
    Deadline(&'static str),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for ExchangeError {
    fn from(e: anyhow::Error) -> ExchangeError {
        ExchangeError::Failed(e)
    }
}

/// One key exchange: TLS 1.3 with ALPN ntske/1, the client's records, the keys exported,
/// cookies and the server record sent back.
/// `local`: the address the client reached, which picks the family of the server record.
async fn key_exchange<S>(
    stream: S,
    local: IpAddr,
    acceptor: &tokio_rustls::TlsAcceptor,
    state: &NtsState,
    spec: &NtsSpec,
    deadlines: Deadlines,
) -> Result<(), ExchangeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = async {
        let mut tls = acceptor.accept(stream).await.context("TLS handshake")?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            bail!("client did not ask for ALPN ntske/1");
        }
        let mut buf = Vec::new();
        let records_result = loop {
            let mut chunk = [0u8; 512];
            let n = tls.read(&mut chunk).await.context("reading the request")?;
            if n == 0 {
                bail!("connection closed before End of Message");
            }
            buf.extend_from_slice(&chunk[..n]);
            match ke::split_records(&buf) {
                Ok(None) => continue,
                Ok(Some(records)) => break ke::negotiate(&records),
                Err(e) => break Err(e),
            }
        };
        anyhow::Ok((tls, records_result))
    };
    let (mut tls, records_result) = tokio::time::timeout(deadlines.request, request)
        .await
        .map_err(|_| ExchangeError::Deadline("handshake and request"))??;
    let (response, failed) = match records_result {
        Err(e) => (ke::error_response(e), Some(e.to_string())),
        Ok(Negotiated::NtpV4AesSiv) => {
            let conn = tls.get_ref().1;
            let export = |s2c: bool| {
                conn.export_keying_material(
                    [0u8; 32],
                    EXPORTER_LABEL,
                    Some(&ke::exporter_context(s2c)),
                )
                .with_context(|| format!("exporting the {} key", if s2c { "S2C" } else { "C2S" }))
            };
            let (c2s, s2c) = (export(false)?, export(true)?);
            let cookies = state.cookies(&SessionKeys { c2s, s2c }, COOKIES_PER_KE);
            let server = if local.is_ipv4() {
                spec.ntp_server_v4
            } else {
                spec.ntp_server_v6
            }
            .map(|a| a.to_string());
            (
                ke::response(Negotiated::NtpV4AesSiv, server.as_deref(), None, &cookies),
                None,
            )
        }
        Ok(other) => (
            ke::response(other, None, None, &[]),
            Some(format!("nothing in common: {other:?}")),
        ),
    };
    let respond = async {
        tls.write_all(&response)
            .await
            .context("writing the response")?;
        tls.shutdown().await.ok();
        anyhow::Ok(())
    };
    tokio::time::timeout(deadlines.response, respond)
        .await
        .map_err(|_| ExchangeError::Deadline("response"))??;
    match failed {
        Some(why) => Err(ExchangeError::Failed(anyhow!(why))),
        None => Ok(()),
    }
}

/// Where the NTS seal key of a fleet is kept (the same file on every host of the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealKeyFile(pub std::path::PathBuf);

impl SealKeyFile {
    /// The key, read and checked ([`read_seal_key`]).
    pub fn read(&self) -> Result<super::cookie::SealKey> {
        read_seal_key(&self.0)
    }
}

/// The NTS seal key from `path`: exactly 32 bytes, in a regular file no one but its owner
/// may read or write (`head -c 32 /dev/urandom > FILE; chmod 600 FILE`, the same file on
/// every host of the cluster).
pub fn read_seal_key(path: &Path) -> Result<super::cookie::SealKey> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "{}: make it with `head -c 32 /dev/urandom > FILE; chmod 600 FILE` and copy it \
             to every host of the cluster",
            path.display()
        )
    })?;
    if !meta.is_file() {
        anyhow::bail!("{}: not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{}: mode {mode:03o} lets others read or change it; chmod 600",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: {} bytes, not 32 (head -c 32 /dev/urandom makes one)",
            path.display(),
            bytes.len()
        )
    })?;
    Ok(super::cookie::SealKey::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nts::ke::{self, REC_AEAD, REC_NEW_COOKIE, REC_NEXT_PROTOCOL, REC_SERVER};

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA, and a server certificate for 169.254.169.123 signed by it, in a scratch dir.
    fn pki() -> (Scratch, PathBuf, PathBuf, CertificateDer<'static>) {
        let dir = std::env::temp_dir().join(format!("nts-test-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["169.254.169.123".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let (chain, keyfile) = (dir.join("chain.pem"), dir.join("key.pem"));
        std::fs::write(&chain, leaf.pem() + &ca.pem()).unwrap();
        std::fs::write(&keyfile, key.serialize_pem()).unwrap();
        (Scratch(dir), chain, keyfile, ca.der().clone())
    }

    fn spec(dir: &Path) -> NtsSpec {
        NtsSpec {
            certificate_chain: dir.join("chain.pem"),
            private_key: dir.join("key.pem"),
            listen: vec![],
            port: 4460,
            key_file: dir.join("keys.json"),
            key_rotation: Duration::from_secs(3600),
            rotate_locally: true,
            ntp_server_v4: Some("169.254.169.123".parse().unwrap()),
            ntp_server_v6: None,
        }
    }

    fn client(ca: CertificateDer<'static>, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Runs one exchange of `request` over an in-memory pipe; returns the server's outcome,
    /// the client's view of the response, and the keys the client exported.
    async fn exchange(
        request: Vec<u8>,
        alpn: &[u8],
    ) -> (Result<()>, Result<Vec<u8>>, SessionKeys, Arc<NtsState>) {
        let (scratch, chain, key, ca) = pki();
        let spec = spec(&scratch.0);
        let state = Arc::new(load_or_create_keys(&spec.key_file, Some(spec.key_rotation)).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(&chain, &key).unwrap());
        let (a, b) = tokio::io::duplex(1 << 16);
        let local: IpAddr = "169.254.169.123".parse().unwrap();
        let server = async {
            key_exchange(a, local, &acceptor, &state, &spec, Deadlines::DEFAULT)
                .await
                .map_err(|e| anyhow!("{e:?}"))
        };
        let connector = client(ca, alpn);
        let client = async {
            let name = rustls_pki_types::ServerName::try_from("169.254.169.123").unwrap();
            let mut tls = connector.connect(name, b).await?;
            tls.write_all(&request).await?;
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await?;
            let conn = tls.get_ref().1;
            let c2s = conn.export_keying_material(
                [0u8; 32],
                EXPORTER_LABEL,
                Some(&ke::exporter_context(false)),
            )?;
            let s2c = conn.export_keying_material(
                [0u8; 32],
                EXPORTER_LABEL,
                Some(&ke::exporter_context(true)),
            )?;
            anyhow::Ok((out, SessionKeys { c2s, s2c }))
        };
        let (s, c) = tokio::join!(server, client);
        let (out, keys) = match c {
            Ok((o, k)) => (Ok(o), k),
            Err(e) => (
                Err(e),
                SessionKeys {
                    c2s: [0; 32],
                    s2c: [0; 32],
                },
            ),
        };
        (s, out, keys, state)
    }

    #[tokio::test]
    async fn a_key_exchange_hands_out_cookies_holding_the_exported_keys() {
        let (server, out, keys, state) = exchange(ke::client_request(), ALPN).await;
        server.unwrap();
        let out = out.unwrap();
        let recs = ke::split_records(&out).unwrap().unwrap();
        let body = |k| recs.iter().find(|r| r.kind == k).unwrap().body;
        assert_eq!(body(REC_NEXT_PROTOCOL), [0, 0]);
        assert_eq!(body(REC_AEAD), [0, 15]);
        assert_eq!(body(REC_SERVER), b"169.254.169.123");
        let cookies: Vec<_> = recs.iter().filter(|r| r.kind == REC_NEW_COOKIE).collect();
        assert_eq!(cookies.len(), COOKIES_PER_KE);
        for c in cookies {
            let opened = state.keys().open(c.body).expect("our cookie");
            assert_eq!(
                opened, keys,
                "the cookie holds the keys the client exported"
            );
        }
        assert_ne!(keys.c2s, keys.s2c);
    }

    #[tokio::test]
    async fn a_bad_request_gets_an_error_record_and_no_cookie() {
        let (server, out, _, _) = exchange(vec![0x80, 0, 0, 0], ALPN).await;
        assert!(server.is_err());
        assert_eq!(
            out.unwrap(),
            ke::error_response(ke::KeError::BadRequest(""))
        );
    }

    #[tokio::test]
    async fn a_client_without_the_ntske_alpn_gets_nothing() {
        let (server, out, _, _) = exchange(ke::client_request(), b"http/1.1").await;
        assert!(server.is_err());
        assert!(out.is_err() || out.unwrap().is_empty());
    }

    /// A client that connects and stalls: before its ClientHello, or after the handshake
    /// with half a request. Either is cut off at the request deadline, not left to hold its
    /// slot.
    #[tokio::test]
    async fn a_client_that_stalls_is_cut_off_at_the_request_deadline() {
        let (scratch, chain, key, ca) = pki();
        let spec = spec(&scratch.0);
        let state = load_or_create_keys(&spec.key_file, Some(spec.key_rotation)).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(&chain, &key).unwrap());
        let local: IpAddr = "169.254.169.123".parse().unwrap();
        let short = Deadlines {
            request: Duration::from_millis(200),
            response: Duration::from_millis(200),
        };
        // Silent: nothing after the connection.
        let (a, _silent) = tokio::io::duplex(1 << 16);
        let got = key_exchange(a, local, &acceptor, &state, &spec, short).await;
        assert!(
            matches!(got, Err(ExchangeError::Deadline("handshake and request"))),
            "{got:?}"
        );
        // The handshake, then the first bytes of a request and no more.
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = key_exchange(a, local, &acceptor, &state, &spec, short);
        let client = async {
            let name = rustls_pki_types::ServerName::try_from("169.254.169.123").unwrap();
            let mut tls = client(ca, ALPN).connect(name, b).await.unwrap();
            tls.write_all(&ke::client_request()[..5]).await.unwrap();
            tls.flush().await.unwrap();
            // Held open until the server gives up.
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            rest
        };
        let (got, rest) = tokio::join!(server, client);
        assert!(
            matches!(got, Err(ExchangeError::Deadline("handshake and request"))),
            "{got:?}"
        );
        assert!(rest.is_empty(), "no response for half a request");
    }

    #[test]
    fn the_key_file_survives_a_restart_and_a_bad_one_is_named() {
        let dir = std::env::temp_dir().join(format!("nts-keys-{}", rand::random::<u64>()));
        let _scratch = Scratch(dir.clone());
        let file = dir.join("keys.json");
        let a = load_or_create_keys(&file, Some(Duration::from_secs(3600))).unwrap();
        let b = load_or_create_keys(&file, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(a.key_ids(), b.key_ids());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&file, "not json").unwrap();
        let e = load_or_create_keys(&file, Some(Duration::from_secs(3600))).unwrap_err();
        assert!(format!("{e:#}").contains("keys.json"), "{e:#}");
    }

    #[test]
    fn a_seal_key_is_32_bytes_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("fleet-seal-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nts-seal.key");
        let e = format!("{:#}", read_seal_key(&file).unwrap_err());
        assert!(
            e.contains("nts-seal.key") && e.contains("/dev/urandom"),
            "{e}"
        );
        let set = |bytes: &[u8], mode: u32| {
            std::fs::write(&file, bytes).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set(&[3; 32], 0o600);
        assert_eq!(
            read_seal_key(&file).unwrap(),
            super::super::cookie::SealKey::new([3; 32])
        );
        set(&[3; 32], 0o640);
        let e = format!("{:#}", read_seal_key(&file).unwrap_err());
        assert!(e.contains("640") && e.contains("chmod 600"), "{e}");
        set(&[3; 31], 0o600);
        let e = format!("{:#}", read_seal_key(&file).unwrap_err());
        assert!(e.contains("31 bytes"), "{e}");
        set(b"", 0o400);
        assert!(read_seal_key(&file).is_err());
        let e = format!("{:#}", read_seal_key(&dir).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
