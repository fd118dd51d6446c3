//! NTS from the guest's side, for tests: a test CA and a server certificate (rcgen), and a
//! minimal NTS client (rustls for the key exchange, the request and reply checks of
//! `ntp_user::nts::packet`) to send the requests chrony never sends: tampered ones, old
//! cookies after a restart.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use ntp_user::nts::ke::{self, REC_ERROR, REC_NEW_COOKIE, REC_SERVER};
use rustls_pki_types::{CertificateDer, ServerName};

use crate::topology::Netns;
use crate::unique_name;

/// A CA and a server certificate it signed for `names` (addresses or DNS names), as PEM files
/// in a scratch directory removed on drop.
pub struct TestPki {
    pub dir: PathBuf,
    pub chain: PathBuf,
    pub key: PathBuf,
    pub ca_pem: PathBuf,
    pub ca_der: CertificateDer<'static>,
}

impl TestPki {
    pub fn new(names: &[&str]) -> Result<TestPki> {
        let dir = std::env::temp_dir().join(unique_name("ntspki"));
        std::fs::create_dir_all(&dir)?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "ntp-xdp test CA");
        let ca = ca.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut leaf =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
        let pki = TestPki {
            chain: dir.join("chain.pem"),
            key: dir.join("key.pem"),
            ca_pem: dir.join("ca.pem"),
            ca_der: ca.der().clone(),
            dir,
        };
        std::fs::write(&pki.chain, leaf.pem() + &ca.pem())?;
        std::fs::write(&pki.key, key.serialize_pem())?;
        std::fs::write(&pki.ca_pem, ca.pem())?;
        Ok(pki)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a key exchange gave the client.
#[derive(Debug, Clone)]
pub struct NtsSession {
    pub c2s: [u8; 32],
    pub s2c: [u8; 32],
    pub cookies: Vec<Vec<u8>>,
    /// The server record (the NTP server to use), if sent.
    pub server: Option<String>,
}

/// Runs `f` in a thread inside `ns`.
fn within<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = ns.file()?;
    std::thread::spawn(move || {
        testbed::netns::enter(&file)?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("the client thread panicked"))?
}

/// A key exchange with `addr`:4460 from `ns`, trusting `ca` and checking the certificate
/// against `addr`.
pub fn key_exchange(ns: &Netns, addr: &str, ca: &CertificateDer<'static>) -> Result<NtsSession> {
    key_exchange_within(ns, addr, ca, Duration::from_secs(5))
}

/// [`key_exchange`], giving up when the server is silent for `wait`.
pub fn key_exchange_within(
    ns: &Netns,
    addr: &str,
    ca: &CertificateDer<'static>,
    wait: Duration,
) -> Result<NtsSession> {
    let (addr, ca) = (addr.to_string(), ca.clone());
    within(ns, move || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"ntske/1".to_vec()];
        let name = ServerName::try_from(addr.clone())?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let ip: std::net::IpAddr = addr.parse()?;
        // A daemon that just started may not listen yet: a few tries.
        let mut tries = 0;
        let mut tcp = loop {
            match TcpStream::connect_timeout(&SocketAddr::new(ip, 4460), Duration::from_secs(3)) {
                Ok(t) => break t,
                Err(e) if tries < 20 && e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).with_context(|| format!("connecting to {addr}:4460")),
            }
        };
        tcp.set_read_timeout(Some(wait))?;
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        tls.write_all(&ke::client_request())?;
        let mut out = Vec::new();
        match tls.read_to_end(&mut out) {
            Ok(_) => {}
            // A server that closes without close_notify still sent what it sent.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e).context("reading the key exchange response"),
        }
        let records = ke::split_records(&out)
            .map_err(|e| anyhow!("{e}"))?
            .ok_or_else(|| anyhow!("incomplete response: {out:?}"))?;
        if let Some(e) = records.iter().find(|r| r.kind == REC_ERROR) {
            bail!("the server sent an error record {:?}", e.body);
        }
        let export = |s2c| -> Result<[u8; 32]> {
            Ok(conn.export_keying_material(
                [0u8; 32],
                ntp_user::nts::EXPORTER_LABEL,
                Some(&ke::exporter_context(s2c)),
            )?)
        };
        Ok(NtsSession {
            c2s: export(false)?,
            s2c: export(true)?,
            cookies: records
                .iter()
                .filter(|r| r.kind == REC_NEW_COOKIE)
                .map(|r| r.body.to_vec())
                .collect(),
            server: records
                .iter()
                .find(|r| r.kind == REC_SERVER)
                .map(|r| String::from_utf8_lossy(r.body).into_owned()),
        })
    })
}

/// How a test spoils a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    None,
    /// One bit of the authenticator's ciphertext flipped.
    Authenticator,
    /// One bit of the cookie flipped.
    Cookie,
}

/// One NTS request from `ns` to `addr`:123 with `cookie`; the raw reply within 1 s, if any.
pub fn nts_request(
    ns: &Netns,
    addr: &str,
    session: &NtsSession,
    cookie: &[u8],
    tamper: Tamper,
) -> Result<Option<(Vec<u8>, [u8; 32])>> {
    let mut header = [0u8; 48];
    header[0] = 0x23; // LI 0, NTPv4, client
    header[40..48].copy_from_slice(&rand::random::<u64>().to_be_bytes());
    let unique_id: [u8; 32] = rand::random();
    let mut cookie = cookie.to_vec();
    if tamper == Tamper::Cookie {
        cookie[30] ^= 0x04;
    }
    let mut req = ntp_user::nts::packet::client_request(
        &header,
        &unique_id,
        &cookie,
        1,
        &session.c2s,
        rand::random(),
    );
    if tamper == Tamper::Authenticator {
        let n = req.len();
        req[n - 3] ^= 0x01;
    }
    let addr = addr.to_string();
    within(ns, move || {
        let sock = UdpSocket::bind(if addr.contains(':') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        })?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        sock.send_to(&req, (addr.as_str(), 123))?;
        let mut buf = [0u8; 2048];
        Ok(sock
            .recv(&mut buf)
            .ok()
            .map(|n| (buf[..n].to_vec(), unique_id)))
    })
}

/// `n` TCP connections from `ns` to `addr`:4460 that never send a byte (a guest holding the
/// key exchange's slots). None: the server reset it before `connect` returned.
pub fn idle_connections(ns: &Netns, addr: &str, n: usize) -> Result<Vec<Option<TcpStream>>> {
    let to = SocketAddr::new(addr.parse()?, 4460);
    within(ns, move || {
        (0..n)
            .map(
                |i| match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                    Ok(s) => {
                        s.set_nonblocking(true)?;
                        Ok(Some(s))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("idle connection {i} to {to}")),
                },
            )
            .collect()
    })
}

/// Whether the server closed or reset `conn` (non-blocking: an open, silent one would block).
pub fn closed_by_server(conn: &Option<TcpStream>) -> bool {
    let Some(conn) = conn else {
        return true;
    };
    let mut byte = [0u8; 1];
    match (&*conn).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}
