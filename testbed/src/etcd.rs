//! A three-member etcd cluster in namespaces: TLS with client certificates, data in a scratch
//! directory, each member in its own namespace on a store bridge; removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;
use crate::relay::TcpRelay;
use crate::{unique_name, TempDir};

/// The etcd cluster's PKI: a CA, one server certificate for the members' addresses, and a
/// client certificate for the fleet.
pub struct EtcdPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdPki {
    fn new(dir: &Path, addrs: &[String]) -> Result<EtcdPki> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "ntp-xdp fleet test CA");
        let ca = ca.self_signed(&ca_key)?;
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let server_key = rcgen::KeyPair::generate()?;
        let mut server = rcgen::CertificateParams::new(addrs.to_vec())?;
        server
            .distinguished_name
            .push(rcgen::DnType::CommonName, "etcd");
        server.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server = server.signed_by(&server_key, &ca, &ca_key)?;
        let client_key = rcgen::KeyPair::generate()?;
        let mut client = rcgen::CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ntp-xdp");
        client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client.signed_by(&client_key, &ca, &ca_key)?;
        Ok(EtcdPki {
            ca: write("ca.pem", ca.pem())?,
            server_cert: write("server.pem", server.pem())?,
            server_key: write("server-key.pem", server_key.serialize_pem())?,
            client_cert: write("client.pem", client.pem())?,
            client_key: write("client-key.pem", client_key.serialize_pem())?,
        })
    }
}

struct Member {
    ns: Netns,
    addr: String,
    name: String,
    child: Option<Child>,
}

/// Three etcd members on a bridge in `home` (169.254.NET.1-3; `home` has .100).
pub struct EtcdCluster {
    members: Vec<Member>,
    pub pki: EtcdPki,
    pub endpoints: Vec<String>,
    dir: TempDir,
    initial_cluster: String,
}

impl EtcdCluster {
    pub fn start(home: &Netns, net: u8) -> Result<EtcdCluster> {
        // Removed with everything in it (the PKI's private keys) if a step below fails.
        let dir = TempDir::new("etcd")?;
        let bridge = unique_name("ns");
        home.add_bridge(&bridge)?;
        home.ip(&[
            "addr",
            "add",
            &format!("169.254.{net}.100/24"),
            "dev",
            &bridge,
        ])?;
        let addrs: Vec<String> = (1..=3).map(|i| format!("169.254.{net}.{i}")).collect();
        let pki = EtcdPki::new(&dir.0, &addrs)?;
        let mut members = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let ns = Netns::new("nte")?;
            let (inner, outer) = (unique_name("ne"), unique_name("ne"));
            crate::ip(&[
                "link", "add", &inner, "netns", &ns.name, "type", "veth", "peer", "name", &outer,
                "netns", &home.name,
            ])?;
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", &inner])?;
            ns.ip(&["link", "set", &inner, "up"])?;
            home.ip(&["link", "set", &outer, "master", &bridge, "up"])?;
            members.push(Member {
                ns,
                addr: addr.clone(),
                name: format!("m{i}"),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=https://{}:2380", m.name, m.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            endpoints: addrs.iter().map(|a| format!("https://{a}:2379")).collect(),
            members,
            pki,
            dir,
            initial_cluster,
        };
        for i in 0..3 {
            cluster.start_member(i)?;
        }
        cluster.wait_healthy(home, Duration::from_secs(30))?;
        Ok(cluster)
    }

    pub fn start_member(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let data = self.dir.0.join(&m.name);
        let log = std::fs::File::create(self.dir.0.join(format!("{}.log", m.name)))?;
        let p = &self.pki;
        let child =
            m.ns.command("etcd")
                .args(["--name", &m.name, "--data-dir"])
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &format!("https://{}:2379", m.addr),
                    "--advertise-client-urls",
                    &format!("https://{}:2379", m.addr),
                    "--listen-peer-urls",
                    &format!("https://{}:2380", m.addr),
                    "--initial-advertise-peer-urls",
                    &format!("https://{}:2380", m.addr),
                    "--initial-cluster",
                    &self.initial_cluster,
                    "--initial-cluster-token",
                    &self.dir.0.file_name().unwrap().to_string_lossy(),
                    "--initial-cluster-state",
                    "new",
                    "--client-cert-auth",
                    "--logger",
                    "zap",
                    "--log-level",
                    "warn",
                ])
                .arg("--trusted-ca-file")
                .arg(&p.ca)
                .arg("--cert-file")
                .arg(&p.server_cert)
                .arg("--key-file")
                .arg(&p.server_key)
                .arg("--peer-trusted-ca-file")
                .arg(&p.ca)
                .arg("--peer-cert-file")
                .arg(&p.server_cert)
                .arg("--peer-key-file")
                .arg(&p.server_key)
                .arg("--peer-client-cert-auth")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawning etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// One relay per member, listening on the member's address at `port` (so the server
    /// certificate's addresses still match) and forwarding to its client port; with the
    /// endpoints to give a host that reaches the store through them.
    pub fn relays(&self, port: u16) -> Result<(Vec<TcpRelay>, Vec<String>)> {
        let mut relays = Vec::new();
        for m in &self.members {
            let addr: std::net::IpAddr = m.addr.parse()?;
            relays.push(TcpRelay::start(
                &m.ns,
                (addr, port).into(),
                (addr, 2379).into(),
            )?);
        }
        let endpoints = self
            .members
            .iter()
            .map(|m| format!("https://{}:{port}", m.addr))
            .collect();
        Ok((relays, endpoints))
    }

    /// SIGKILL one member.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// etcdctl with the client certificate, from `ns` (or without it when `with_cert` is
    /// false: what a stranger on the network gets).
    pub fn etcdctl(&self, ns: &Netns, with_cert: bool, args: &[&str]) -> Output {
        let mut c = ns.command("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints.join(",")))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=3s")
            .arg(format!("--cacert={}", self.pki.ca.display()));
        if with_cert {
            c.arg(format!("--cert={}", self.pki.client_cert.display()))
                .arg(format!("--key={}", self.pki.client_key.display()));
        }
        c.args(args).output().expect("running etcdctl")
    }

    pub fn wait_healthy(&self, home: &Netns, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.etcdctl(home, true, &["endpoint", "health"]);
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = (0..3)
                    .map(|i| {
                        std::fs::read_to_string(self.dir.0.join(format!("m{i}.log")))
                            .unwrap_or_default()
                    })
                    .collect();
                bail!(
                    "etcd not healthy: {}{}\nlogs:\n{logs}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The `[fleet]` section for host `host`.
    pub fn fleet_section(&self, host: &str, state_dir: &Path) -> String {
        format!(
            "[fleet]\nendpoints = {:?}\ncluster = \"az-test\"\nhost = \"{host}\"\nca = \"{}\"\n\
             certificate = \"{}\"\nkey = \"{}\"\nlease_ttl = \"4s\"\nsync_deadline = \"15s\"\n\
             state_dir = \"{}\"\n",
            self.endpoints,
            self.pki.ca.display(),
            self.pki.client_cert.display(),
            self.pki.client_key.display(),
            state_dir.display()
        )
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
