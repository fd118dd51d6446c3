//! A fleet in namespaces: a three-member etcd cluster (TLS with client certificates, data in a
//! scratch directory), each member in its own namespace on a store bridge, and three
//! redundant VIP hosts (keepalived, unicast peers) whose daemons are the fleet's agents, on
//! one guest bridge. Everything on 169.254.0.0/16, removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::clients::Polled;
use crate::topology::{Netns, ServeProcess};
use crate::{ntp_xdp_bin, unique_name, CLOCK_V4};
pub use testbed::etcd::{EtcdCluster, EtcdPki};
use testbed::relay::TcpRelay;

pub const SUBNET: u8 = 84;
/// The VIP hosts' own network (VRRP).
pub const VRRP_SUBNET: u8 = 184;
pub const HOSTS: [&str; 3] = ["vip-a", "vip-b", "vip-c"];

/// One VIP host of the fleet.
pub struct FleetHost {
    pub name: &'static str,
    pub netns: String,
    /// Its local config (the whole of it, with `[fleet]`).
    pub config: PathBuf,
    /// Its part of the configuration (names, priority, stratum).
    pub override_text: String,
    pub stratum: u8,
    /// Its daemon's wall clock runs this far behind (libfaketime).
    pub clock_behind: Option<Duration>,
    pub daemon: Option<ServeProcess>,
}

/// What a test changes in a fleet.
#[derive(Default)]
pub struct FleetOptions {
    /// Added to the cluster's part of the configuration (e.g. an `[nts]` section: each host's
    /// override then names its own NTS key file, and every host's `[fleet]` the one seal key
    /// file, [`Fleet::nts_seal_key`]).
    pub cluster_extra: String,
    /// This host reaches etcd through relays the test can cut ([`Fleet::cut_store_link`]).
    pub relayed_host: Option<usize>,
    /// This host's daemon runs with its wall clock behind by this much (libfaketime; the
    /// system clock is untouched).
    pub clock_behind: Option<(usize, Duration)>,
}

/// Where the relays of [`FleetOptions::relayed_host`] listen, on each member's address.
const STORE_RELAY_PORT: u16 = 12379;

/// libfaketime, which [`FleetOptions::clock_behind`] preloads into a daemon.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Three redundant VIP hosts (priorities 150, 100, 50; local strata 10, 11, 12, so a guest
/// can tell who answers) on one guest bridge, with an etcd cluster.
pub struct Fleet {
    /// One fleet at a time in a test binary: three daemons and three etcd members each are a
    /// lot for two cores, and the polling guests measure losses.
    _serial: std::sync::MutexGuard<'static, ()>,
    pub hosts: Vec<FleetHost>,
    pub etcd: EtcdCluster,
    pub guest_bridge: String,
    /// The VIP hosts' own network, where VRRP speaks.
    pub vrrp_bridge: String,
    pub dir: PathBuf,
    pub home: Netns,
    /// The relayed host's way to the store ([`FleetOptions::relayed_host`]).
    store_relays: Vec<TcpRelay>,
    relayed_host: Option<usize>,
}

/// The cluster's part of the configuration: the same on every host. VRRP speaks on
/// `vrrp_bridge`, the VIP hosts' own network.
pub fn cluster_config(bridge: &str, vrrp_bridge: &str, precision: i8) -> String {
    let vrid = 100 + (std::process::id() % 100) as u8;
    format!(
        r#"[service]
addresses = ["{CLOCK_V4}"]
xdp_mode = "generic"
precision = {precision}

[vip]
bridge = "{bridge}"
service_address = "169.254.{SUBNET}.1/24"
repair_interval = "1s"

[redundancy]
virtual_router_id = {vrid}
advert_interval = "300ms"
bridge = "{vrrp_bridge}"

[limits]
enable = false

[metrics]
enable = false
"#
    )
}

impl Fleet {
    pub fn start() -> Result<Fleet> {
        Fleet::start_with("")
    }

    /// With `cluster_extra` added to the cluster's part ([`FleetOptions::cluster_extra`]).
    pub fn start_with(cluster_extra: &str) -> Result<Fleet> {
        Fleet::start_with_options(FleetOptions {
            cluster_extra: cluster_extra.to_string(),
            ..Default::default()
        })
    }

    pub fn start_with_options(options: FleetOptions) -> Result<Fleet> {
        let cluster_extra = options.cluster_extra.as_str();
        if options.clock_behind.is_some() && !Path::new(LIBFAKETIME).exists() {
            bail!("{LIBFAKETIME} is missing: run `cargo xtask setup` (Debian package faketime)");
        }
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let home = Netns::new("nth")?;
        let guest_bridge = unique_name("nb");
        home.add_bridge(&guest_bridge)?;
        let vrrp_bridge = unique_name("nb");
        home.add_bridge(&vrrp_bridge)?;
        let etcd = EtcdCluster::start(&home, SUBNET + 10)?;
        let (store_relays, relayed_endpoints) = match options.relayed_host {
            Some(_) => etcd.relays(STORE_RELAY_PORT)?,
            None => (Vec::new(), Vec::new()),
        };
        let dir = std::env::temp_dir().join(unique_name("ntpxdp-fleet"));
        std::fs::create_dir_all(&dir)?;
        let cluster = cluster_config(&guest_bridge, &vrrp_bridge, -24) + cluster_extra;
        let nts = cluster_extra.contains("[nts]");
        let seal_key = Fleet::nts_seal_key_in(&dir);
        if nts {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&seal_key)?
                .write_all(&rand::random::<[u8; 32]>())?;
        }
        let mut hosts = Vec::new();
        for (i, name) in HOSTS.iter().enumerate() {
            let netns = unique_name("ntv");
            let stratum = 10 + i as u8;
            let peers: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("169.254.{VRRP_SUBNET}.{}", 2 + j))
                .collect();
            let override_text = format!(
                "[service]\nnetns = \"{netns}\"\ninterface = \"{}\"\n\n[vip]\nhost_interface = \
                 \"{}\"\n\n[redundancy]\npriority = {}\ninterface = \"{}\"\nhost_interface = \"{}\"\n\
                 own_address = \"169.254.{VRRP_SUBNET}.{}/24\"\n\
                 unicast_peers = {peers:?}\n\n[clock]\nlocal_stratum = {stratum}\n",
                unique_name("nv"),
                unique_name("nh"),
                150 - 50 * i,
                unique_name("nr"),
                unique_name("nr"),
                2 + i,
            );
            let override_text = if nts {
                format!(
                    "{override_text}\n[nts]\nkey_file = \"{}\"\n",
                    dir.join(name).join("nts-keys.json").display()
                )
            } else {
                override_text
            };
            let mut fleet: toml::Table = etcd
                .fleet_section(name, &dir.join(name))
                .parse::<toml::Table>()?;
            let section = fleet["fleet"].as_table_mut().expect("a table");
            if nts {
                section.insert(
                    "nts_seal_key_file".into(),
                    seal_key.display().to_string().into(),
                );
            }
            if options.relayed_host == Some(i) {
                section.insert("endpoints".into(), relayed_endpoints.clone().into());
            }
            let local = ntp_user::fleet::effective_config(
                &cluster,
                Some(&override_text),
                Some(&fleet["fleet"]),
            )
            .map_err(|e| anyhow!(e))?;
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(&config, local)?;
            hosts.push(FleetHost {
                name,
                netns,
                config,
                override_text,
                stratum,
                clock_behind: options
                    .clock_behind
                    .filter(|(host, _)| *host == i)
                    .map(|(_, behind)| behind),
                daemon: None,
            });
        }
        let mut fleet = Fleet {
            _serial: serial,
            hosts,
            etcd,
            guest_bridge,
            vrrp_bridge,
            dir,
            home,
            store_relays,
            relayed_host: options.relayed_host,
        };
        for i in 0..3 {
            fleet.start_daemon(i)?;
        }
        Ok(fleet)
    }

    /// The relayed host loses the store: nothing passes either way, connections hang.
    pub fn cut_store_link(&self) {
        assert!(!self.store_relays.is_empty(), "no relayed host");
        self.store_relays.iter().for_each(TcpRelay::cut);
    }

    pub fn heal_store_link(&self) {
        self.store_relays.iter().for_each(TcpRelay::heal);
    }

    /// The seal key file every host shares (with `[nts]`).
    pub fn nts_seal_key(&self) -> PathBuf {
        Fleet::nts_seal_key_in(&self.dir)
    }

    fn nts_seal_key_in(dir: &Path) -> PathBuf {
        dir.join("nts-seal.key")
    }

    fn in_home(&self, cmd: Command) -> Command {
        crate::vip::in_netns(cmd, &self.home).expect("the home namespace")
    }

    pub fn start_daemon(&mut self, i: usize) -> Result<()> {
        let mut cmd = Command::new(ntp_xdp_bin());
        cmd.args(["run", "--config"]).arg(&self.hosts[i].config);
        if let Some(behind) = self.hosts[i].clock_behind {
            // CLOCK_MONOTONIC stays true: the responder pairs it with the kernel's.
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME", format!("-{}", behind.as_secs()))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let cmd = self.in_home(cmd);
        self.hosts[i].daemon = Some(ServeProcess::spawn(cmd, "responder attached")?);
        Ok(())
    }

    pub fn kill_daemon(&mut self, i: usize) -> Result<()> {
        match self.hosts[i].daemon.take() {
            Some(d) => d.kill9(),
            None => Ok(()),
        }
    }

    /// `ntp-xdp fleet ARGS` as an operator on the home network (with the config of the first
    /// host that reaches the store directly).
    fn fleet_command(&self, args: &[&str]) -> Command {
        let direct = (0..self.hosts.len())
            .find(|i| Some(*i) != self.relayed_host)
            .expect("a host without relays");
        let mut cmd = Command::new(ntp_xdp_bin());
        cmd.args(["fleet", "--config"])
            .arg(&self.hosts[direct].config)
            .args(["--host-timeout", "60s"])
            .args(args);
        self.in_home(cmd)
    }

    pub fn fleet_cmd(&self, args: &[&str]) -> Output {
        self.fleet_command(args)
            .output()
            .expect("running ntp-xdp fleet")
    }

    /// `fleet ARGS` started, not waited for: an operator's command that takes a while.
    pub fn fleet_spawn(&self, args: &[&str]) -> Result<Operator> {
        let child = self
            .fleet_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ntp-xdp fleet")?;
        Ok(Operator { child: Some(child) })
    }

    /// `fleet ARGS`, which must succeed; its stdout.
    pub fn fleet_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.fleet_cmd(args);
        if !out.status.success() {
            bail!(
                "ntp-xdp fleet {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `text` to a scratch file; its path.
    pub fn file(&self, name: &str, text: &str) -> Result<String> {
        let p = self.dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    }

    /// Pushes the test cluster's config with `precision` (which makes each push differ), as
    /// file `name`, with `extra` arguments (`--rolling`, ...): the revision written.
    pub fn push_cluster(&self, name: &str, precision: i8, extra: &[&str]) -> Result<i64> {
        let file = self.file(
            name,
            &cluster_config(&self.guest_bridge, &self.vrrp_bridge, precision),
        )?;
        let mut args = vec!["push", file.as_str()];
        args.extend_from_slice(extra);
        Ok(revision_of(&self.fleet_ok(&args)?))
    }

    pub fn fleet_status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.fleet_ok(&["status", "--json"])?,
        )?)
    }

    /// The daemon's own report (control socket).
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        let socket = format!("/run/ntp-xdp/{}/control.sock", self.hosts[i].netns);
        crate::status_at(std::path::Path::new(&socket))
    }

    pub fn add_guest(&self, octet: u8) -> Result<Netns> {
        let guest = crate::vip::guest_on_bridge(&self.home, &self.guest_bridge)?;
        crate::vip::configure_guest(&guest, SUBNET, octet)?;
        Ok(guest)
    }

    pub fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

/// A running `ntp-xdp fleet` command; killed if the test ends first.
pub struct Operator {
    child: Option<Child>,
}

impl Operator {
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its exit and output, once it ends within `timeout`; None while it still runs.
    pub fn finish(&mut self, timeout: Duration) -> Option<Output> {
        if !Fleet::wait_until(timeout, || !self.running()) {
            return None;
        }
        self.child.take()?.wait_with_output().ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            drop(h.daemon.take());
        }
        for h in &self.hosts {
            let mut cmd = Command::new(ntp_xdp_bin());
            cmd.args(["down", "--config"]).arg(&h.config);
            let _ = self.in_home(cmd).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// What the fleet tests and `cargo xtask demo --fleet` look at.

/// Hosts in `fleet status --json`, by name: (lost, config revision, config state).
pub fn hosts(f: &Fleet) -> Vec<(String, bool, i64, String)> {
    let s = f.fleet_status().unwrap();
    s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["status"].is_null(),
                h["status"]["config_revision"].as_i64().unwrap_or(-1),
                h["config_state"]["state"]
                    .as_str()
                    .unwrap_or("-")
                    .to_string(),
            )
        })
        .collect()
}

pub fn all_applied(f: &Fleet, revision: i64) -> bool {
    let h = hosts(f);
    h.len() == 3
        && h.iter()
            .all(|(_, lost, rev, st)| !lost && *rev == revision && st == "applied")
}

/// Which host answered (its stratum) changed this many times.
pub fn switches(p: &Polled) -> usize {
    p.seen
        .windows(2)
        .filter(|w| w[0].stratum != w[1].stratum)
        .count()
}

/// The longest time between two answers the guest saw.
pub fn lost(p: &Polled) -> u64 {
    p.sent - p.seen.len() as u64
}

pub fn set_overrides(f: &Fleet) {
    for h in &f.hosts {
        let file = f
            .file(&format!("{}-override.toml", h.name), &h.override_text)
            .unwrap();
        f.fleet_ok(&["override", h.name, &file]).unwrap();
    }
}

/// A guest at 169.254.84.OCTET, once all three hosts report, their overrides are in the
/// store, and a master holds the addresses and answers it.
pub fn ready(f: &Fleet, octet: u8) -> crate::topology::Netns {
    let guest = f.add_guest(octet).unwrap();
    assert!(Fleet::wait_until(Duration::from_secs(20), || {
        hosts(f).iter().filter(|h| !h.1).count() == 3
    }));
    set_overrides(f);
    master(f);
    assert!(Fleet::wait_until(Duration::from_secs(10), || {
        crate::clients::one_query(&guest, crate::CLOCK_V4).is_ok_and(|r| r.is_some())
    }));
    guest
}

pub fn revision_of(out: &str) -> i64 {
    out.lines()
        .find_map(|l| l.strip_prefix("done: revision "))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out}"))
}

/// The host whose heartbeat says it is the VRRP master.
pub fn master(f: &Fleet) -> String {
    let find = || {
        let s = f.fleet_status().unwrap();
        s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["status"]["role"] == "master")
            .and_then(|h| h["host"].as_str())
            .map(str::to_string)
    };
    let mut found = None;
    Fleet::wait_until(Duration::from_secs(15), || {
        found = find();
        found.is_some()
    });
    found.unwrap_or_else(|| {
        for h in &f.hosts {
            if let Some(d) = &h.daemon {
                eprintln!("--- {} ---\n{}", h.name, d.drain_log().join("\n"));
            }
        }
        panic!("no master: {}", f.fleet_status().unwrap())
    })
}

pub fn started(f: &Fleet) -> Vec<u64> {
    let s = f.fleet_status().unwrap();
    let mut v: Vec<(String, u64)> = s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["status"]["started_unix"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

/// Each host's NTS key ids, as its status shows them (empty for a host that does not answer).
pub fn nts_key_ids(f: &Fleet) -> Vec<Vec<u64>> {
    (0..f.hosts.len())
        .map(|i| {
            f.status(i).map_or(vec![], |s| {
                s["nts"]["key_ids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default()
            })
        })
        .collect()
}

/// Whether every host holds the same NTS keys.
pub fn same_nts_keys(f: &Fleet) -> bool {
    let ids = nts_key_ids(f);
    !ids[0].is_empty() && ids.iter().all(|i| *i == ids[0])
}
