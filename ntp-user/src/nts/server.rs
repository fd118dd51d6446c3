//! The IO around the NTS core: the key exchange over TLS 1.3 (tokio-rustls), the cookie keys'
//! file and its rotation, and [`NtsState::respond`] for the userspace path.

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

/// Connections handled at once; more wait in the listen queue.
const MAX_CONCURRENT: usize = 64;
/// A key exchange that takes longer is cut off (a slow client holds a slot).
const KE_TIMEOUT: Duration = Duration::from_secs(10);
/// Cookies a key exchange hands out (RFC 8915 §4.1.6 suggests eight).
const COOKIES_PER_KE: usize = 8;

/// Serves the key exchange until the task is dropped; when `plumbing` moves on the
/// listeners are bound again in the recreated namespace. Rotates the cookie keys as due.
pub async fn serve(
    spec: NtsSpec,
    netns_name: Option<String>,
    listeners: Vec<std::net::TcpListener>,
    mut plumbing: watch::Receiver<u64>,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<NtsState>,
    admit: Admit,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    let spec = Arc::new(spec);
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
            let (acceptor, slots, state, admit, spec) = (
                acceptor.clone(),
                slots.clone(),
                state.clone(),
                admit.clone(),
                spec.clone(),
            );
            tasks.spawn(async move { accept_loop(l, acceptor, slots, state, admit, spec).await });
        }
        let rebind = loop {
            tokio::select! {
                Some(done) = tasks.join_next() => {
                    done.context("an NTS-KE task failed")??;
                }
                _ = rotation.tick() => {
                    let (state, spec) = (state.clone(), spec.clone());
                    let refreshed = tokio::task::spawn_blocking(move || {
                        state.refresh(
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

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<tokio::sync::Semaphore>,
    state: Arc<NtsState>,
    admit: Admit,
    spec: Arc<NtsSpec>,
) -> Result<()> {
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
        };
        if !admit(peer.ip()) {
            state
                .counters
                .key_exchanges_refused
                .fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (acceptor, state, spec) = (acceptor.clone(), state.clone(), spec.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let local = stream.local_addr()?.ip().to_canonical();
                key_exchange(stream, local, acceptor, &state, &spec).await
            };
            let outcome = tokio::time::timeout(KE_TIMEOUT, exchange)
                .await
                .unwrap_or_else(|_| Err(anyhow!("timed out")));
            match outcome {
                Ok(()) => {
                    state.counters.key_exchanges.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    state
                        .counters
                        .key_exchange_failures
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, error = %format!("{e:#}"), "NTS key exchange failed");
                }
            }
        });
    }
}

/// One key exchange: TLS 1.3 with ALPN ntske/1, the client's records, the keys exported,
/// cookies and the server record sent back.
/// `local`: the address the client reached, which picks the family of the server record.
async fn key_exchange<S>(
    stream: S,
    local: IpAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    state: &NtsState,
    spec: &NtsSpec,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
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
    let (response, failed) = match records_result {
        Err(e) => (ke::error_response(e), Some(e.to_string())),
        Ok(Negotiated::NtpV4AesSiv) => {
            let conn = tls.get_ref().1;
            let c2s = conn
                .export_keying_material(
                    [0u8; 32],
                    EXPORTER_LABEL,
                    Some(&ke::exporter_context(false)),
                )
                .context("exporting the C2S key")?;
            let s2c = conn
                .export_keying_material(
                    [0u8; 32],
                    EXPORTER_LABEL,
                    Some(&ke::exporter_context(true)),
                )
                .context("exporting the S2C key")?;
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
    tls.write_all(&response)
        .await
        .context("writing the response")?;
    tls.shutdown().await.ok();
    match failed {
        Some(why) => Err(anyhow!(why)),
        None => Ok(()),
    }
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
        let server = key_exchange(a, local, acceptor, &state, &spec);
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
}
