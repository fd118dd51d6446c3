//! Many fleet hosts in one process against a real three-member etcd cluster (TLS, client
//! certificates, in namespaces): each simulated host runs the real agent
//! ([`ntp_user::fleet::agent::Agent`]: lease, heartbeat, watches, restart slot, gate) beside a
//! local side that applies a configuration at once and reports a synchronized clock, and the
//! operator's pushes are the real `ntp-xdp fleet push` ([`ntp_user::fleet::ops::Fleet`]). What
//! it measures is the store traffic of the fleet's own logic; there is no responder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, GetOptions, WatchOptions};
use ntp_user::clock::snapshot::{ClockReference, ClockSnapshot};
use ntp_user::fleet::agent::{Agent, Check, LiveRequest, LocalDaemon};
use ntp_user::fleet::local::LocalFiles;
use ntp_user::fleet::ops::Fleet;
use ntp_user::fleet::{ApplyState, ConfigState, FleetSpec, HostStatus, Keys};
use ntp_user::observe::status::StatusReport;
use ntp_user::observe::Reports;

use crate::fleet::EtcdCluster;
use crate::topology::Netns;
use crate::unique_name;

/// The store's network (169.254.NET.0/24, inside the simulation's own namespaces).
const STORE_NET: u8 = 97;

#[derive(Debug, Clone)]
pub struct ScaleRun {
    pub hosts: usize,
    /// Each host's `fleet.lease_ttl` (its heartbeat is every fifth of it, 0.5 to 2 s).
    pub lease_ttl: Duration,
    /// How long the quiet fleet's store traffic is counted.
    pub steady: Duration,
    /// How long one host may take to apply a push, as `fleet push --host-timeout`.
    pub host_timeout: Duration,
    /// Hosts the store knows (their overrides) that never run: retired or not yet built.
    /// A push writes for them too.
    pub absent: usize,
}

/// One push, as the operator's command and the store saw it.
#[derive(Debug, Clone, Default)]
pub struct PushFigures {
    pub revision: i64,
    /// Until `fleet push` wrote the config: its checks (every host's override read and
    /// the config validated with it).
    pub checks: Duration,
    /// Until `fleet push` returned: every host reported the revision applied and synchronized.
    pub operator: Duration,
    /// From the config's write until the last host's `config_state` said `applied` for it.
    pub last_config_applied: Option<Duration>,
    /// From the config's write until the last host's heartbeat carried it.
    pub last_status: Option<Duration>,
    /// Hosts whose `config_state` says `applied` for the revision at the end.
    pub hosts_applied: usize,
    /// Restarts the push caused (the simulated hosts restart their agents at once).
    pub restarts: usize,
    /// The hosts in the order the rollout moved them (rolling pushes).
    pub order: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SteadyFigures {
    pub window: Duration,
    /// Store revisions (each a write: a put or a transaction that wrote) per second.
    pub revisions_per_s: f64,
    /// Raft entries committed per second (writes, lease grants and revokes, ...).
    pub raft_entries_per_s: f64,
    /// Keys under the cluster's prefix.
    pub keys: i64,
    /// Bytes of the cluster's values (one read of the prefix).
    pub value_bytes: usize,
    /// Leases the store holds.
    pub leases: usize,
    /// The store's database size (bytes, as the member reports it).
    pub db_size: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ScaleFigures {
    pub hosts: usize,
    /// Until every host's heartbeat was in the store.
    pub joined: Duration,
    /// A change of the access list only: applied in place by every host at once.
    pub live_push: PushFigures,
    /// A change that needs the hitless restart, to every host at once (one host of each VRRP
    /// group at a time).
    pub restart_push: PushFigures,
    /// A change that needs the restart, `--rolling --canary`.
    pub rolling_push: PushFigures,
    pub canary: String,
    pub steady: SteadyFigures,
    /// The agent's heartbeat (and lease keep-alive) interval.
    pub heartbeat: Duration,
    /// The most restart slots held at once (one per VRRP group restarting).
    pub most_slots_held: usize,
    /// Restart slots seen held by a host outside the slot's group: (slot key, host).
    pub slots_held_by_strangers: Vec<(String, String)>,
}

/// The cluster's configuration: the precision changes by a restart, the access list in
/// place. VIP hosts in VRRP groups of three (each host's override names its group).
pub fn cluster_config(precision: i8, allow: &str) -> String {
    format!(
        "[service]\naddresses = [\"169.254.169.123\"]\nprecision = {precision}\n\n[vip]\n\
         bridge = \"ntpsim-g\"\nservice_address = \"169.254.84.1/24\"\n\n[redundancy]\n\
         bridge = \"ntpsim-v\"\n\n[access]\nallow = [{allow}]\n\n[metrics]\nenable = false\n"
    )
}

/// Hosts in one VRRP group (one restart at a time within it).
pub const GROUP: usize = 3;

/// Host `i`'s own part: its interfaces, and its VRRP group (virtual router `i / GROUP`), its
/// priority and peers in it.
pub fn host_override(i: usize) -> String {
    let (group, member) = (i / GROUP, i % GROUP);
    let peers: Vec<String> = (0..GROUP)
        .filter(|m| *m != member)
        .map(|m| format!("169.254.184.{}", 2 + m))
        .collect();
    format!(
        "[service]\nnetns = \"ntpsim{i}\"\ninterface = \"sv{i}\"\n\n[vip]\nhost_interface = \
         \"sh{i}\"\n\n[redundancy]\nvirtual_router_id = {}\npriority = {}\ninterface = \
         \"sr{i}\"\nhost_interface = \"sq{i}\"\nown_address = \"169.254.184.{}/24\"\n\
         unicast_peers = {peers:?}\n",
        1 + group % 255,
        150 - 50 * member,
        2 + member,
    )
}

fn host_name(i: usize) -> String {
    format!("h{i:03}")
}

/// A simulated host's local side: the daemon's clock synchronized by a measurement of its
/// own since it started, the report its heartbeat carries.
fn local_daemon() -> LocalDaemon {
    let clock = ClockSnapshot {
        reference: ClockReference::Upstreams,
        synchronized: true,
        stratum: 2,
        offset_s: Some(1e-6),
        measured_since_start: true,
        ..Default::default()
    };
    let report_clock = clock.clone();
    let started = Instant::now();
    LocalDaemon {
        reports: Reports::new(move || {
            Ok(StatusReport {
                version: "sim".into(),
                uptime_s: started.elapsed().as_secs_f64(),
                clock: report_clock.clone(),
                ..Default::default()
            })
        }),
        clock: Arc::new(move || clock.clone()),
    }
}

/// One simulated host: the agent, and a new one whenever it asks for the restart (what
/// `ntp-xdp run` does by exec), running what its state directory says.
async fn host_loop(
    spec: FleetSpec,
    local_fleet: toml::Value,
    local_text: String,
    check: Check,
    restarts: Arc<AtomicUsize>,
) {
    loop {
        let applied = LocalFiles::new(&spec.state_dir).applied_config();
        let running = std::fs::read_to_string(&applied).unwrap_or_else(|_| local_text.clone());
        // The access list and limits "applied" in place at once (until the agent, and with it
        // the sender, is gone).
        let (live, mut requests) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(LiveRequest::ApplyAdmission(_, reply)) = requests.recv().await {
                let _ = reply.send(Ok(()));
            }
        });
        let agent = Agent {
            spec: spec.clone(),
            local_fleet: local_fleet.clone(),
            check,
            cell: Default::default(),
            started_unix: ntp_user::host::hostclock::unix_now_s(),
            nts_keys: None,
            running: Mutex::new(running),
            live: Some(live),
            problems: Default::default(),
        };
        let restart = ntp_user::daemon::Restart::default();
        agent.run_beside(local_daemon(), restart.clone()).await;
        if !restart.requested() {
            return;
        }
        restarts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per host, when its `config_state` said `applied` for a revision and when its heartbeat
/// first carried it (from a watch on the hosts' keys).
#[derive(Default)]
struct Seen {
    config_applied: BTreeMap<(String, i64), Instant>,
    status: BTreeMap<(String, i64), Instant>,
}

async fn watch_hosts(mut client: Client, keys: Keys, seen: Arc<Mutex<Seen>>) -> Result<()> {
    let mut stream = client
        .watch(keys.hosts(), Some(WatchOptions::new().with_prefix()))
        .await?;
    while let Some(resp) = stream.message().await? {
        let now = Instant::now();
        let mut seen = seen.lock().unwrap();
        for kv in resp.events().iter().filter_map(|e| e.kv()) {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some((host, part)) = keys.split_host_key(&key) else {
                continue;
            };
            match part {
                ntp_user::fleet::CONFIG_STATE => {
                    if let Ok(c) = serde_json::from_slice::<ConfigState>(kv.value()) {
                        if c.state == ApplyState::Applied {
                            seen.config_applied
                                .entry((host.to_string(), c.revision))
                                .or_insert(now);
                        }
                    }
                }
                ntp_user::fleet::STATUS => {
                    if let Ok(s) = serde_json::from_slice::<HostStatus>(kv.value()) {
                        seen.status
                            .entry((host.to_string(), s.config_revision))
                            .or_insert(now);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The restart slots held now, the most held at once, and any held by a host of another
/// group (from a watch on the slots).
#[derive(Default)]
struct Slots {
    held: BTreeMap<String, String>,
    most: usize,
    strangers: Vec<(String, String)>,
}

async fn watch_slots(mut client: Client, keys: Keys, slots: Arc<Mutex<Slots>>) -> Result<()> {
    let mut stream = client
        .watch(
            keys.restart_slots(),
            Some(WatchOptions::new().with_prefix()),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        let mut slots = slots.lock().unwrap();
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match e.event_type() {
                etcd_client::EventType::Put => {
                    let host = String::from_utf8_lossy(kv.value()).into_owned();
                    let group = host
                        .strip_prefix('h')
                        .and_then(|i| i.parse::<usize>().ok())
                        .map(|i| ntp_user::fleet::restart_group(&host_override(i)));
                    if group.flatten().map(|g| keys.restart_slot(&g)) != Some(key.clone()) {
                        slots.strangers.push((key.clone(), host.clone()));
                    }
                    slots.held.insert(key, host);
                }
                etcd_client::EventType::Delete => {
                    slots.held.remove(&key);
                }
            }
            slots.most = slots.most.max(slots.held.len());
        }
    }
    Ok(())
}

struct Sim {
    keys: Keys,
    operator: Fleet,
    client: Client,
    seen: Arc<Mutex<Seen>>,
    restarts: Arc<AtomicUsize>,
    hosts: Vec<String>,
}

impl Sim {
    async fn push(
        &mut self,
        text: &str,
        rolling: bool,
        canary: Option<&str>,
    ) -> Result<PushFigures> {
        let restarts_before = self.restarts.load(Ordering::Relaxed);
        let start = Instant::now();
        let mut order = Vec::new();
        let mut lines = Vec::new();
        let mut written = None;
        let pushed = self
            .operator
            .push(
                text,
                "fleet-scale push",
                rolling,
                canary,
                &mut |line: &str| {
                    if let Some((host, _)) = line.split_once(": applying revision") {
                        order.push(host.to_string());
                    }
                    if line.starts_with("config revision") {
                        written = Some(Instant::now());
                    }
                    lines.push(line.to_string());
                },
            )
            .await;
        let revision = pushed.with_context(|| format!("fleet push: {}", lines.join("\n")))?;
        let operator = start.elapsed();
        let written = written.context("fleet push did not say it wrote the config")?;
        // The heartbeat of the last host may reach the watch a moment after the operator's read.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = {
                let seen = self.seen.lock().unwrap();
                self.hosts.iter().all(|h| {
                    seen.config_applied.contains_key(&(h.clone(), revision))
                        && seen.status.contains_key(&(h.clone(), revision))
                })
            };
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last = |m: &BTreeMap<(String, i64), Instant>| {
            self.hosts
                .iter()
                .map(|h| m.get(&(h.clone(), revision)).copied())
                .collect::<Option<Vec<Instant>>>()
                .and_then(|v| v.into_iter().max())
                .map(|t| t.saturating_duration_since(written))
        };
        let (last_config_applied, last_status) = {
            let seen = self.seen.lock().unwrap();
            (last(&seen.config_applied), last(&seen.status))
        };
        let hosts_applied = ntp_user::fleet::store::hosts(&mut self.client, &self.keys)
            .await?
            .iter()
            .filter(|h| {
                h.config_state
                    .as_ref()
                    .is_some_and(|c| c.revision == revision && c.state == ApplyState::Applied)
            })
            .count();
        Ok(PushFigures {
            revision,
            checks: written.saturating_duration_since(start),
            operator,
            last_config_applied,
            last_status,
            hosts_applied,
            restarts: self.restarts.load(Ordering::Relaxed) - restarts_before,
            order,
        })
    }

    async fn steady(&mut self, window: Duration) -> Result<SteadyFigures> {
        let before = self.client.status().await?;
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let after = self.client.status().await?;
        let secs = t0.elapsed().as_secs_f64();
        let rev = |s: &etcd_client::StatusResponse| s.header().map_or(0, |h| h.revision());
        let all = self
            .client
            .get(self.keys.prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let leases = self.client.leases().await?.leases().len();
        Ok(SteadyFigures {
            window,
            revisions_per_s: (rev(&after) - rev(&before)) as f64 / secs,
            raft_entries_per_s: after.raft_index().saturating_sub(before.raft_index()) as f64
                / secs,
            keys: all.count(),
            value_bytes: all.kvs().iter().map(|kv| kv.value().len()).sum(),
            leases,
            db_size: after.db_size(),
        })
    }
}

/// Runs the simulation: `run.hosts` agents join; a live push and a restart push to every host
/// at once; a rolling push with a canary; then the quiet fleet's store traffic is counted.
pub fn simulate(run: &ScaleRun) -> Result<ScaleFigures> {
    let home = Netns::new("nsh")?;
    let etcd = EtcdCluster::start(&home, STORE_NET)?;
    let dir = std::env::temp_dir().join(unique_name("ntpxdp-scale"));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let netns = home.file()?;
    let run = run.clone();
    let endpoints = etcd.endpoints.clone();
    let pki = (
        etcd.pki.ca.clone(),
        etcd.pki.client_cert.clone(),
        etcd.pki.client_key.clone(),
    );
    // The store's addresses are in the home namespace: this thread, and the runtime's threads
    // it starts, live there.
    std::thread::spawn(move || -> Result<ScaleFigures> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the simulation's namespace")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let result = runtime.block_on(simulate_in(&run, &dir, endpoints, pki));
        // The agents' tasks stop with the runtime.
        runtime.shutdown_timeout(Duration::from_secs(5));
        result
    })
    .join()
    .map_err(|_| anyhow!("the simulation's thread panicked"))?
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fleet_table(spec: &FleetSpec) -> toml::Value {
    let text = format!(
        "endpoints = {:?}\ncluster = \"{}\"\nhost = \"{}\"\nca = \"{}\"\ncertificate = \"{}\"\n\
         key = \"{}\"\nlease_ttl = \"{}s\"\nstate_dir = \"{}\"\n",
        spec.endpoints,
        spec.cluster,
        spec.host,
        spec.ca.as_ref().expect("TLS").display(),
        spec.certificate.as_ref().expect("TLS").display(),
        spec.key.as_ref().expect("TLS").display(),
        spec.lease_ttl.as_secs(),
        spec.state_dir.display(),
    );
    toml::Value::Table(text.parse().expect("a [fleet] table"))
}

async fn simulate_in(
    run: &ScaleRun,
    dir: &Path,
    endpoints: Vec<String>,
    (ca, certificate, key): (PathBuf, PathBuf, PathBuf),
) -> Result<ScaleFigures> {
    let cluster = unique_name("scale");
    let spec_of = |host: &str| FleetSpec {
        endpoints: endpoints.clone(),
        cluster: cluster.clone(),
        host: host.to_string(),
        ca: Some(ca.clone()),
        certificate: Some(certificate.clone()),
        key: Some(key.clone()),
        user: None,
        password_file: None,
        lease_ttl: run.lease_ttl,
        sync_deadline: Duration::from_secs(60),
        state_dir: dir.join(host),
        nts_seal_key_file: ntp_user::nts::server::SealKeyFile(dir.join("nts-seal.key")),
    };
    // Hosts check a pushed configuration as a local file (their interfaces aside: they have
    // none).
    let check = Check::Portable;
    let base = cluster_config(-20, "");
    let restarts = Arc::new(AtomicUsize::new(0));
    let hosts: Vec<String> = (0..run.hosts).map(host_name).collect();
    let keys = Keys::new(&cluster);
    let operator_spec = spec_of("operator");
    let mut client = ntp_user::fleet::store::connect(&operator_spec).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = tokio::spawn(watch_hosts(client.clone(), keys.clone(), seen.clone()));
    let slots = Arc::new(Mutex::new(Slots::default()));
    let slot_watcher = tokio::spawn(watch_slots(client.clone(), keys.clone(), slots.clone()));
    let start = Instant::now();
    let mut operator = Fleet::connect(&operator_spec).await?;
    operator.host_timeout = run.host_timeout;
    for i in 0..run.hosts + run.absent {
        operator
            .set_override(&host_name(i), &host_override(i), "fleet-scale override")
            .await?;
    }
    let mut tasks = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let spec = spec_of(h);
        let local_fleet = fleet_table(&spec);
        let local_text =
            ntp_user::fleet::effective_config(&base, Some(&host_override(i)), Some(&local_fleet))
                .map_err(|e| anyhow!(e))?;
        tasks.push(tokio::spawn(host_loop(
            spec,
            local_fleet,
            local_text,
            check,
            restarts.clone(),
        )));
    }
    let deadline = start + run.host_timeout.max(Duration::from_secs(60));
    loop {
        let live = ntp_user::fleet::store::hosts(&mut client, &keys)
            .await?
            .iter()
            .filter(|h| !h.lost())
            .count();
        if live == hosts.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("{live} of {} hosts joined", hosts.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let joined = start.elapsed();
    let mut sim = Sim {
        keys,
        operator,
        client,
        seen,
        restarts,
        hosts,
    };
    let live_push = sim
        .push(&cluster_config(-20, "\"169.254.0.0/16\""), false, None)
        .await
        .context("the live push")?;
    let restart_push = sim
        .push(&cluster_config(-21, "\"169.254.0.0/16\""), false, None)
        .await
        .context("the restart push")?;
    let canary = host_name(run.hosts / 2);
    let rolling_push = sim
        .push(
            &cluster_config(-22, "\"169.254.0.0/16\""),
            true,
            Some(&canary),
        )
        .await
        .context("the rolling push")?;
    let steady = sim.steady(run.steady).await?;
    for t in tasks {
        t.abort();
    }
    watcher.abort();
    slot_watcher.abort();
    let slots = std::mem::take(&mut *slots.lock().unwrap());
    Ok(ScaleFigures {
        hosts: run.hosts,
        joined,
        live_push,
        restart_push,
        rolling_push,
        canary,
        steady,
        heartbeat: (run.lease_ttl / 5).clamp(Duration::from_millis(500), Duration::from_secs(2)),
        most_slots_held: slots.most,
        slots_held_by_strangers: slots.strangers,
    })
}

impl std::fmt::Display for ScaleFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let opt = |d: Option<Duration>| d.map_or("-".to_string(), ms);
        let n = self.hosts as f64;
        writeln!(
            f,
            "{} simulated hosts in VRRP groups of {GROUP} (real agents, heartbeat every {}), 3 \
             etcd members with TLS",
            self.hosts,
            ms(self.heartbeat)
        )?;
        writeln!(
            f,
            "joined (every heartbeat in the store): {}",
            ms(self.joined)
        )?;
        writeln!(
            f,
            "restart slots held at once: at most {}; held by a host of another group: {} {:?}",
            self.most_slots_held,
            self.slots_held_by_strangers.len(),
            &self.slots_held_by_strangers[..self.slots_held_by_strangers.len().min(3)]
        )?;
        for (what, p) in [
            (
                "push, access list (in place), every host at once",
                &self.live_push,
            ),
            (
                "push, restart, every host at once (one per VRRP group at a time)",
                &self.restart_push,
            ),
            ("push --rolling --canary (restart)", &self.rolling_push),
        ] {
            writeln!(
                f,
                "{what}: revision {} applied by {}/{} hosts; written after {} of checks, then the \
                 last config_state applied {}, the last heartbeat with it {}; `fleet push` \
                 returned after {} in all ({} restarts{})",
                p.revision,
                p.hosts_applied,
                self.hosts,
                ms(p.checks),
                opt(p.last_config_applied),
                opt(p.last_status),
                ms(p.operator),
                p.restarts,
                if p.order.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {:.0} ms per host, canary {}",
                        p.operator.as_secs_f64() * 1e3 / n,
                        p.order.first().map_or("-", String::as_str)
                    )
                },
            )?;
        }
        let s = &self.steady;
        writeln!(
            f,
            "steady state over {:.0} s: {:.1} writes/s ({:.2} per host), {:.1} raft entries/s; \
             {} keys ({} value bytes), {} leases, database {} bytes",
            s.window.as_secs_f64(),
            s.revisions_per_s,
            s.revisions_per_s / n,
            s.raft_entries_per_s,
            s.keys,
            s.value_bytes,
            s.leases,
            s.db_size
        )?;
        writeln!(
            f,
            "per host: 2 watches (config, its own keys), 1 lease renewed every {} ({:.1} \
             renewals/s for the fleet)",
            ms(self.heartbeat),
            n / self.heartbeat.as_secs_f64()
        )
    }
}
