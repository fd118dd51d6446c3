//! The fleet agent, inside the daemon: a heartbeat bound to a lease, watches on the cluster's
//! config and this host's keys, new configurations validated like a local file and applied
//! by a hitless restart (or refused, the host left as it was), restart commands. It never
//! blocks the time path: it runs beside it, and without the store the daemon serves on.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, PutOptions, WatchOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::local::{LocalFiles, LocalState, Version};
use super::{
    store, ApplyState, CommandState, ConfigState, Desired, FleetSpec, HostCommand, HostStatus,
    Keys, COMMAND, COMMAND_STATE, CONFIG_STATE, DESIRED, OVERRIDE, STATUS,
};
use crate::config::Validated;
use crate::observe::status::{FleetCell, FleetLink};
use crate::observe::{Observatory, Reports};

/// Where the first-synchronization gate of a restart into a new configuration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// No configuration being proven (none staged before this start).
    Idle,
    Waiting,
    Passed,
    /// Its upstreams did not synchronize the clock in time: the previous one is staged.
    Failed,
}

/// Whether a host that restarted is back, so another host of its VRRP group may restart:
/// synchronized (what keepalived's health check asks) and not still proving a new
/// configuration.
fn is_back(status: &HostStatus, gate: Gate) -> bool {
    status.synchronized && gate != Gate::Waiting
}

/// Why a clock that has not measured its upstreams since the restart fails the gate.
fn unsynchronized_reason(
    clock: &crate::clock::snapshot::ClockSnapshot,
    deadline: Duration,
) -> String {
    let upstreams: Vec<String> = clock
        .sources
        .iter()
        .map(|s| format!("{} reach {:o}", s.addr, s.reach))
        .collect();
    let state = if clock.synchronized {
        "served time was only held over from the previous daemon's clock"
    } else {
        "the clock is unsynchronized"
    };
    format!(
        "no synchronization with this configuration's upstreams within {} of the restart \
         ({state}; upstreams: {})",
        humantime::format_duration(deadline),
        if upstreams.is_empty() {
            "none".to_string()
        } else {
            upstreams.join(", ")
        }
    )
}

/// How a configuration text is checked before it is written or run; `origin` names where it
/// came from in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// What any machine can check (`fleet push` on an operator's machine): the files a host
    /// reads, only that host can.
    Portable,
    /// As a local file on this host, and the interfaces it names exist here (a host before it
    /// applies a pushed configuration).
    OnThisHost,
}

impl Check {
    pub fn run(self, text: &str, origin: &str) -> Result<(), String> {
        let origin = std::path::Path::new(origin);
        let checked = match self {
            Check::Portable => crate::config::parse_portable(text, origin).map(|_| ()),
            Check::OnThisHost => {
                crate::config::parse(text, origin).and_then(|v| host_preflight(&v))
            }
        };
        checked.map_err(|e| format!("{e:#}"))
    }
}

/// What only this host can check before it runs a configuration pushed to it: the
/// interfaces it names exist here.
pub fn host_preflight(v: &Validated) -> Result<()> {
    let origin = v.source.as_path();
    let exists = |name: &str| nix::net::if_::if_nametoindex(name).is_ok();
    let mut named: Vec<(String, &str)> = Vec::new();
    if let Some(vip) = &v.vip {
        for (i, h) in vip.host_interfaces.iter().enumerate() {
            named.push((format!("vip.host_interfaces[{i}]"), h.as_str()));
        }
        if let Some(r) = &vip.redundancy {
            for (i, t) in r.track_interfaces.iter().enumerate() {
                named.push((format!("redundancy.track_interfaces[{i}]"), t.as_str()));
            }
            if let Some(link) = &r.link {
                named.push(("redundancy.bridge".into(), link.bridge.as_str()));
            }
        }
        if let (Some(b), false) = (&vip.bridge, vip.create_bridge) {
            named.push(("vip.bridge".into(), b.as_str()));
        }
    } else if v.service.netns.is_none() {
        named.push(("service.interface".into(), v.service.interface.as_str()));
    }
    for (field, name) in named {
        if !exists(name) {
            return Err(crate::config::ConfigError::field(
                origin,
                &field,
                format!("there is no interface {name:?} on this host"),
            )
            .into());
        }
    }
    Ok(())
}

/// A request to restart the daemon in place: it stops as on SIGTERM (the pinned responder
/// keeps answering) and `ntp-xdp run` starts itself again.
#[derive(Clone, Default, Debug)]
pub struct Restart(Arc<RestartFlag>);

#[derive(Default, Debug)]
struct RestartFlag {
    requested: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Restart {
    pub fn request(&self) {
        self.0
            .requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.notify.notify_one();
    }

    pub fn requested(&self) -> bool {
        self.0.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once a restart is requested.
    pub async fn wait(&self) {
        if !self.requested() {
            self.0.notify.notified().await;
        }
    }
}

pub struct Agent {
    pub spec: FleetSpec,
    /// This host's own `[fleet]` table, kept in every configuration it runs.
    pub local_fleet: toml::Value,
    /// How a configuration pushed to this host is checked before it is applied.
    pub check: Check,
    pub cell: FleetCell,
    pub started_unix: u64,
    /// With NTS: the agent rotates the keys in the store and every host's file follows it.
    pub nts_keys: Option<NtsKeySync>,
    /// The configuration running now (to tell what can change in place).
    pub running: std::sync::Mutex<String>,
    /// Where requests to the daemon go: the access list and rate limit applied in place (set
    /// by the daemon once it serves).
    pub live: Option<tokio::sync::mpsc::Sender<LiveRequest>>,
    /// Values in the store this host cannot use, by key: in every heartbeat until they go.
    pub problems: StoreProblems,
}

/// Values in the store a host cannot use: key → why.
pub type StoreProblems = std::sync::Mutex<std::collections::BTreeMap<String, String>>;

/// Why a configuration was not applied in place.
enum LiveFailure {
    /// The configuration cannot be applied: recorded as refused.
    Refused(String),
    /// The daemon is going away (its side of the channel is gone): nothing is recorded, so
    /// the daemon that comes next applies it.
    Stopping,
}

/// What the agent asks of the daemon it runs in.
#[derive(Debug)]
pub enum LiveRequest {
    /// Answer by this access list and rate limit from now on, without a restart; the reply
    /// says whether it took.
    ApplyAdmission(
        crate::responder::admission::AdmissionSpec,
        tokio::sync::oneshot::Sender<Result<(), String>>,
    ),
}

/// The NTS cookie keys kept in step with the store's.
pub struct NtsKeySync {
    /// The NTS server's key file, which it adopts.
    pub file: std::path::PathBuf,
    pub rotation: Duration,
    /// What was last wrong with the store's keys, logged once until it changes.
    problem: std::sync::Mutex<Option<String>>,
}

impl NtsKeySync {
    pub fn new(file: std::path::PathBuf, rotation: Duration) -> NtsKeySync {
        NtsKeySync {
            file,
            rotation,
            problem: Default::default(),
        }
    }

    /// Logs `problem` if it is new; None: all is well again.
    fn report(&self, problem: Option<String>) {
        let mut last = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if *last != problem {
            match &problem {
                Some(p) => warn!(problem = %p, "fleet: the NTS cookie keys are not shared"),
                None if last.is_some() => info!("fleet: the NTS cookie keys are shared again"),
                None => {}
            }
            *last = problem;
        }
    }
}

/// What the agent reads of its own daemon: the status report its heartbeat carries and the
/// clock's snapshot the first-synchronization gate watches.
#[derive(Clone)]
pub struct LocalDaemon {
    pub reports: Reports,
    pub clock: Arc<dyn Fn() -> crate::clock::snapshot::ClockSnapshot + Send + Sync>,
}

impl LocalDaemon {
    /// The daemon's observatory.
    pub fn of(obs: &Arc<Observatory>) -> LocalDaemon {
        let o = obs.clone();
        LocalDaemon {
            reports: obs.reports(),
            clock: Arc::new(move || o.clock()),
        }
    }
}

impl Agent {
    /// Runs until the daemon stops (or restarts itself).
    pub async fn run(self, obs: Arc<Observatory>, restart: Restart) {
        self.run_beside(LocalDaemon::of(&obs), restart).await
    }

    /// Runs beside `local` until the daemon stops (or `restart` is requested).
    pub async fn run_beside(self, local: LocalDaemon, restart: Restart) {
        let files = LocalFiles::new(&self.spec.state_dir);
        self.set_link(false, None, &files);
        let (gate_tx, gate_rx) = watch::channel(Gate::Idle);
        tokio::join!(
            self.first_sync_gate(&local, &files, gate_tx),
            self.sessions(&local.reports, &restart, &files, gate_rx)
        );
    }

    /// Sessions with the store, one after another, until a restart is due.
    async fn sessions(
        &self,
        reports: &Reports,
        restart: &Restart,
        files: &LocalFiles,
        mut gate: watch::Receiver<Gate>,
    ) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let err = match self.session(reports, restart, files, &mut gate).await {
                Ok(()) => return, // a restart was requested
                Err(e) => format!("{e:#}"),
            };
            let was_up = self.link().is_some_and(|l| l.store_reachable);
            if was_up {
                warn!(error = %err, "fleet: lost the store; serving on with the last good config");
            } else {
                tracing::debug!(error = %err, "fleet: store unreachable");
            }
            self.set_link(false, Some(err), files);
            // Without the store there is no restart slot to wait for: a configuration that
            // failed its gate is left at once (the restart back is hitless).
            if *gate.borrow() == Gate::Failed {
                restart.request();
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                Ok(()) = gate.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            if was_up {
                backoff = Duration::from_millis(500);
            }
        }
    }

    /// After a restart into a staged configuration: `applied` once the clock has synchronized
    /// with this configuration's upstreams (a measurement of this daemon's own: the clock it
    /// resumed from the previous daemon says "synchronized" for up to the maximum holdover
    /// whether they answer or not). Past `sync_deadline` without one, the previous
    /// configuration is put back and the failure remembered; the session restarts into it.
    async fn first_sync_gate(
        &self,
        local: &LocalDaemon,
        files: &LocalFiles,
        gate: watch::Sender<Gate>,
    ) {
        let version = match files.state() {
            Ok(s) => s.applying,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "fleet: local state");
                None
            }
        };
        let Some(version) = version else {
            return;
        };
        gate.send_replace(Gate::Waiting);
        info!(
            revision = version.revision,
            deadline = %humantime::format_duration(self.spec.sync_deadline),
            "fleet: the new configuration is running; waiting for its upstreams to synchronize the clock"
        );
        let deadline = tokio::time::Instant::now() + self.spec.sync_deadline;
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        loop {
            ticker.tick().await;
            let clock = (local.clock)();
            if clock.synchronized && clock.measured_since_start {
                match files.mark_applied() {
                    Ok(_) => info!(
                        revision = version.revision,
                        "fleet: the new configuration synchronized the clock: applied"
                    ),
                    Err(e) => warn!(error = %format!("{e:#}"), "fleet: local state"),
                }
                gate.send_replace(Gate::Passed);
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let why = unsynchronized_reason(&clock, self.spec.sync_deadline);
                match files.roll_back(&why) {
                    Ok(_) => {
                        warn!(revision = version.revision, reason = %why, "fleet: the new configuration failed; going back to the previous one")
                    }
                    Err(e) => warn!(error = %format!("{e:#}"), "fleet: local state"),
                }
                gate.send_replace(Gate::Failed);
                return;
            }
        }
    }

    /// Records what is wrong with `key`'s value (None: nothing, now); true when that changed.
    fn problem(&self, key: &str, why: Option<&str>) -> bool {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(w) if p.get(key).map(String::as_str) != Some(w) => {
                warn!(
                    key,
                    problem = w,
                    "fleet: a value in the store this host cannot use"
                );
                p.insert(key.to_string(), w.to_string());
                true
            }
            None if p.remove(key).is_some() => {
                info!(key, "fleet: the value in the store is usable again");
                true
            }
            _ => false,
        }
    }

    fn link(&self) -> Option<FleetLink> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_link(&self, reachable: bool, error: Option<String>, files: &LocalFiles) {
        let revision = files
            .state()
            .ok()
            .and_then(|s| s.applied)
            .map_or(0, |v| v.revision);
        *self.cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(FleetLink {
            cluster: self.spec.cluster.clone(),
            host: self.spec.host.clone(),
            store_reachable: reachable,
            store_error: error,
            config_revision: revision,
        });
    }

    /// One connection to the store, until it fails (Err) or a restart is due (Ok).
    async fn session(
        &self,
        reports: &Reports,
        restart: &Restart,
        files: &LocalFiles,
        gate: &mut watch::Receiver<Gate>,
    ) -> Result<()> {
        let keys = Keys::new(&self.spec.cluster);
        let me = |what| keys.host(&self.spec.host, what);
        let mut client = store::connect(&self.spec).await?;
        let ttl = self.spec.lease_ttl.as_secs().max(2) as i64;
        let lease = client.lease_grant(ttl, None).await.context("lease")?.id();
        let (mut keeper, mut keepalives) = client.lease_keep_alive(lease).await?;
        let was = self.link().is_some_and(|l| l.store_error.is_some());
        self.set_link(true, None, files);
        if was {
            info!("fleet: store reachable again");
        } else {
            info!(endpoints = %self.spec.endpoints.join(","), cluster = %self.spec.cluster, host = %self.spec.host, "fleet: connected");
        }
        self.report_local_state(&mut client, &keys, files).await?;
        let status = self.beat(&mut client, reports, lease, &keys, files).await?;
        // Watch from the revision the first evaluation reads at: nothing is missed between.
        let start = client
            .get(keys.config(), None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let mut config_watch = client
            .watch(
                keys.config(),
                Some(WatchOptions::new().with_start_revision(start + 1)),
            )
            .await?;
        let mut host_watch = client
            .watch(
                keys.host(&self.spec.host, ""),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start + 1),
                ),
            )
            .await?;
        // A slot this host took for its restart stays its own (now under this session's lease)
        // until it is back: synchronized, its configuration proven, so keepalived's health
        // check passes again before another host of its group may go.
        let mut holding = self.keep_restart_slot(&mut client, &keys, lease).await?;
        if holding && is_back(&status, *gate.borrow()) {
            self.release_restart_slot(&mut client, &keys).await?;
            holding = false;
        }
        // A restart waits for its VRRP group's restart slot: one host at a time, so that some
        // host always holds the addresses (all at once, none would for an election).
        let mut pending = *gate.borrow_and_update() == Gate::Failed
            || self.evaluate(&mut client, &keys, files).await?;
        let mut told = false;
        let mut ticker = tokio::time::interval(
            (self.spec.lease_ttl / 5).clamp(Duration::from_millis(500), Duration::from_secs(2)),
        );
        loop {
            let relevant = tokio::select! {
                _ = ticker.tick() => {
                    keeper.keep_alive().await.context("lease keep-alive")?;
                    let status = self.beat(&mut client, reports, lease, &keys, files).await?;
                    if holding && is_back(&status, *gate.borrow()) {
                        self.release_restart_slot(&mut client, &keys).await?;
                        holding = false;
                    }
                    self.sync_nts_keys(&mut client, &keys).await?;
                    false
                }
                m = keepalives.message() => {
                    match m.context("lease keep-alive stream")? {
                        Some(r) if r.ttl() <= 0 => bail!("the lease expired"),
                        Some(_) => false,
                        None => bail!("the lease keep-alive stream ended"),
                    }
                }
                m = config_watch.message() => {
                    m?.ok_or_else(|| anyhow!("the config watch ended"))?;
                    true
                }
                Ok(()) = gate.changed() => {
                    // The gate's outcome is in the local state: report it. Failed: the
                    // previous configuration is staged again, and restarted into.
                    self.report_local_state(&mut client, &keys, files).await?;
                    if *gate.borrow_and_update() == Gate::Failed {
                        pending = true;
                    }
                    true
                }
                m = host_watch.message() => {
                    let resp = m?.ok_or_else(|| anyhow!("the host watch ended"))?;
                    resp.events().iter().any(|e| {
                        e.kv().is_some_and(|kv| {
                            let k = String::from_utf8_lossy(kv.key());
                            k == me(OVERRIDE) || k == me(DESIRED) || k == me(COMMAND)
                        })
                    })
                }
            };
            if relevant && self.evaluate(&mut client, &keys, files).await? {
                pending = true;
            }
            if pending {
                if self.take_restart_slot(&mut client, &keys, lease).await? {
                    restart.request();
                    return Ok(());
                }
                if !told {
                    info!("fleet: restart due; waiting for another host's restart to finish");
                    told = true;
                }
            }
        }
    }

    /// Takes the restart slot of this host's group for it (bound to its lease, so a host that
    /// dies frees it); true when it has it, or needs none.
    async fn take_restart_slot(
        &self,
        client: &mut Client,
        keys: &Keys,
        lease: i64,
    ) -> Result<bool> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let group = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            super::restart_group(&running)
        };
        let Some(group) = group else {
            return Ok(true);
        };
        let key = keys.restart_slot(&group);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.spec.host.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if client.txn(txn).await?.succeeded() {
            return Ok(true);
        }
        Ok(store::get(client, &key)
            .await?
            .is_some_and(|(holder, _)| holder == self.spec.host))
    }

    /// The restart slots this host holds (one, or one per group its configurations named).
    async fn held_restart_slots(
        &self,
        client: &mut Client,
        keys: &Keys,
    ) -> Result<Vec<etcd_client::KeyValue>> {
        let slots = client
            .get(
                keys.restart_slots(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .context("reading the restart slots")?;
        Ok(slots
            .kvs()
            .iter()
            .filter(|kv| kv.value() == self.spec.host.as_bytes())
            .cloned()
            .collect())
    }

    /// Applies `op` to each restart slot this host holds, each guarded by the slot's mod
    /// revision; true when one was.
    async fn rewrite_held_slots(
        &self,
        client: &mut Client,
        keys: &Keys,
        op: impl Fn(&[u8]) -> etcd_client::TxnOp,
    ) -> Result<bool> {
        use etcd_client::{Compare, CompareOp, Txn};
        let mut done = false;
        for kv in self.held_restart_slots(client, keys).await? {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    kv.key(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([op(kv.key())]);
            done |= client.txn(txn).await?.succeeded();
        }
        Ok(done)
    }

    /// Moves the restart slots this host holds onto `lease` (the previous process's lease
    /// ends with it); true when it holds one.
    async fn keep_restart_slot(
        &self,
        client: &mut Client,
        keys: &Keys,
        lease: i64,
    ) -> Result<bool> {
        let host = self.spec.host.clone();
        self.rewrite_held_slots(client, keys, |key| {
            etcd_client::TxnOp::put(key, host.clone(), Some(PutOptions::new().with_lease(lease)))
        })
        .await
    }

    /// Frees the restart slot this host holds (it is back), whichever group's it is: the
    /// configuration it restarted into may have moved it to another.
    async fn release_restart_slot(&self, client: &mut Client, keys: &Keys) -> Result<()> {
        self.rewrite_held_slots(client, keys, |key| etcd_client::TxnOp::delete(key, None))
            .await?;
        info!("fleet: back after the restart; restart slot released");
        Ok(())
    }

    /// Puts the heartbeat under the lease.
    async fn beat(
        &self,
        client: &mut Client,
        reports: &Reports,
        lease: i64,
        keys: &Keys,
        files: &LocalFiles,
    ) -> Result<HostStatus> {
        let mut status = heartbeat(reports, files, self.started_unix).await?;
        status.store_problems = self
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        client
            .put(
                keys.host(&self.spec.host, STATUS),
                serde_json::to_vec(&status)?,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .context("heartbeat")?;
        Ok(status)
    }

    /// Tells the store what this host did while it could not, or before its restart.
    async fn report_local_state(
        &self,
        client: &mut Client,
        keys: &Keys,
        files: &LocalFiles,
    ) -> Result<()> {
        let mut s = files.state()?;
        if let Some(state) = config_state_of(&s) {
            self.put_mine(client, keys, CONFIG_STATE, &state).await?;
        }
        if let Some(id) = s.restarting_for.take() {
            let done = CommandState {
                id,
                state: "done".into(),
                message: String::new(),
            };
            self.put_mine(client, keys, COMMAND_STATE, &done).await?;
            files.save(&s)?;
        }
        Ok(())
    }

    /// Reads what this host should run and do; true when a restart is due (a configuration
    /// staged, or a restart command).
    async fn evaluate(&self, client: &mut Client, keys: &Keys, files: &LocalFiles) -> Result<bool> {
        let me = |what| keys.host(&self.spec.host, what);
        // Commands first: a restart also picks up whatever configuration is due.
        let command = match store::get(client, &me(COMMAND)).await? {
            Some((text, _)) => match serde_json::from_str::<HostCommand>(&text) {
                Ok(c) => {
                    self.problem(&me(COMMAND), None);
                    Some(c)
                }
                Err(e) => {
                    // Said once, in the command's state and the heartbeat; the session goes on.
                    let why = format!("not a command ({{\"id\", \"command\"}}): {e}");
                    if self.problem(&me(COMMAND), Some(&why)) {
                        let st = CommandState {
                            id: String::new(),
                            state: "failed".into(),
                            message: format!("{}: {why}", me(COMMAND)),
                        };
                        self.put_mine(client, keys, COMMAND_STATE, &st).await?;
                    }
                    None
                }
            },
            None => {
                self.problem(&me(COMMAND), None);
                None
            }
        };
        if let Some(cmd) = command {
            let handled = store::get(client, &me(COMMAND_STATE))
                .await?
                .and_then(|(t, _)| serde_json::from_str::<CommandState>(&t).ok())
                .is_some_and(|s| s.id == cmd.id);
            if !handled {
                let (state, message, restart) = match cmd.command.as_str() {
                    "restart" => ("running", String::new(), true),
                    other => ("failed", format!("unknown command {other:?}"), false),
                };
                let st = CommandState {
                    id: cmd.id.clone(),
                    state: state.into(),
                    message,
                };
                self.put_mine(client, keys, COMMAND_STATE, &st).await?;
                if restart {
                    let mut s = files.state()?;
                    s.restarting_for = Some(cmd.id);
                    files.save(&s)?;
                    info!("fleet: restart command: restarting (hitless)");
                    // A configuration due too is staged first, so the restart applies it.
                    let _ = self.stage_due_config(client, keys, files).await?;
                    return Ok(true);
                }
            }
        }
        self.stage_due_config(client, keys, files).await
    }

    /// Stages the configuration this host should run, if it is new here; true if staged.
    async fn stage_due_config(
        &self,
        client: &mut Client,
        keys: &Keys,
        files: &LocalFiles,
    ) -> Result<bool> {
        let me = |what| keys.host(&self.spec.host, what);
        let Some((latest, latest_rev)) = store::get(client, &keys.config()).await? else {
            return Ok(false); // no cluster config yet: the local file stays
        };
        let desired_value = store::get(client, &me(DESIRED)).await?;
        let desired = match &desired_value {
            None => None,
            Some((t, _)) => match serde_json::from_str::<Desired>(t) {
                Ok(d) => Some(d.revision),
                Err(e) => {
                    // Reported failed with the key; this host runs on with what it has.
                    let why = format!(
                        "{}: not a desired revision ({{\"revision\": R}}): {e}",
                        me(DESIRED)
                    );
                    if self.problem(&me(DESIRED), Some(&why)) {
                        warn!(reason = %why, "fleet: ignoring a value this host cannot use");
                        self.put_config_state(client, keys, 0, ApplyState::Failed, &why)
                            .await?;
                    }
                    return Ok(false);
                }
            },
        };
        if self.problem(&me(DESIRED), None) {
            // The bad value is gone: what this host runs is its state again.
            self.report_local_state(client, keys, files).await?;
        }
        let mut revision = desired.unwrap_or(latest_rev);
        if revision <= 0 {
            return Ok(false); // pinned to its local file
        }
        let host_override = store::get(client, &me(OVERRIDE)).await?;
        let override_revision = host_override.as_ref().map_or(0, |(_, r)| *r);
        let state = files.state()?;
        if state
            .applying
            .is_some_and(|v| v.revision != revision || v.override_revision != override_revision)
        {
            // The running configuration is still proving itself: the next one waits for it.
            return Ok(false);
        }
        // Compared before anything is fetched: what runs already needs no old revision.
        let known = |v: Version| {
            state.applied == Some(v)
                || state.applying == Some(v)
                || state.failed.as_ref().is_some_and(|(f, _)| *f == v)
        };
        if known(Version {
            revision,
            override_revision,
        }) {
            return Ok(false);
        }
        let mut note = String::new();
        let cluster = if revision == latest_rev {
            latest
        } else {
            match store::get_at(client, &keys.config(), revision).await {
                Ok(Some(text)) => text,
                Ok(None) => {
                    let version = Version {
                        revision,
                        override_revision,
                    };
                    let why = format!("{}: revision {revision} has no config", me(DESIRED));
                    return self.refuse(client, keys, files, version, why).await;
                }
                Err(e) if format!("{e:#}").contains("compacted") => {
                    // The store no longer has it: the current revision is pinned instead, in
                    // the store too (unless the desired revision changed meanwhile).
                    note = format!(
                        "revision {revision} was compacted away; re-pinned to the current \
                         revision {latest_rev}"
                    );
                    warn!(revision, current = latest_rev, "fleet: the desired revision was compacted away; re-pinned to the current one");
                    if let Some((_, desired_mod)) = &desired_value {
                        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                        let txn = Txn::new()
                            .when([Compare::mod_revision(
                                me(DESIRED),
                                CompareOp::Equal,
                                *desired_mod,
                            )])
                            .and_then([TxnOp::put(
                                me(DESIRED),
                                serde_json::to_vec(&Desired {
                                    revision: latest_rev,
                                })?,
                                None,
                            )]);
                        client.txn(txn).await?;
                    }
                    revision = latest_rev;
                    if known(Version {
                        revision,
                        override_revision,
                    }) {
                        self.put_config_state(client, keys, revision, ApplyState::Applied, &note)
                            .await?;
                        return Ok(false);
                    }
                    latest
                }
                Err(e) => return Err(e),
            }
        };
        let version = Version {
            revision,
            override_revision,
        };
        let origin = format!("etcd {}@{revision}", keys.config());
        let checked = super::effective_config(
            &cluster,
            host_override.as_ref().map(|(t, _)| t.as_str()),
            Some(&self.local_fleet),
        )
        .and_then(|text| self.check.run(&text, &origin).map(|()| text));
        match checked {
            Ok(text)
                if self.live.is_some() && {
                    let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    super::live_changeable(&running, &text)
                } =>
            {
                match self.apply_in_place(&text).await {
                    Ok(()) => {
                        files.record_applied(&text, version)?;
                        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = text;
                        self.put_config_state(client, keys, revision, ApplyState::Applied, &note)
                            .await?;
                        info!(
                            revision,
                            "fleet: new configuration applied in place (access list, limits)"
                        );
                        Ok(false)
                    }
                    Err(LiveFailure::Refused(why)) => {
                        self.refuse(client, keys, files, version, why).await
                    }
                    // Not the configuration's fault: the next daemon applies it.
                    Err(LiveFailure::Stopping) => Err(anyhow::anyhow!(
                        "revision {revision} not applied in place: the daemon is stopping"
                    )),
                }
            }
            Ok(text) => {
                files.stage(&text, version)?;
                self.put_config_state(client, keys, revision, ApplyState::Applying, &note)
                    .await?;
                info!(
                    revision,
                    "fleet: new configuration staged; restarting into it (hitless)"
                );
                Ok(true)
            }
            Err(why) => self.refuse(client, keys, files, version, why).await,
        }
    }

    /// Asks the daemon to answer by `text`'s access list and rate limit from now on.
    async fn apply_in_place(&self, text: &str) -> Result<(), LiveFailure> {
        let settings = crate::config::parse(text, std::path::Path::new("(fleet)"))
            .map_err(|e| LiveFailure::Refused(format!("{e:#}")))?;
        let daemon = self.live.as_ref().ok_or(LiveFailure::Stopping)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        daemon
            .send(LiveRequest::ApplyAdmission(settings.admission, reply))
            .await
            .map_err(|_| LiveFailure::Stopping)?;
        match answer.await {
            Ok(result) => result.map_err(LiveFailure::Refused),
            Err(_) => Err(LiveFailure::Stopping),
        }
    }

    /// Keeps this host's NTS cookie keys the cluster's: the store holds them, sealed under
    /// the seal key every host has ([`crate::nts::cookie::SealKey`]: whoever reads the store
    /// learns nothing of them). A rotation is due when the store's `nts_rotation` key is gone:
    /// it is written with every rotation under a lease of the rotation period, so the store's
    /// clock decides, not the hosts' (a host whose clock is behind would find every key "from
    /// the future" and rotate on every tick). Whichever agent finds it due first rotates
    /// (compare-and-swap on both keys: one new key, never two under one id); every host's key
    /// file follows the store, and its NTS server adopts the file. The first host to publish
    /// seeds the store, and a value that is not sealed is replaced; a sealed one that does not
    /// open here (another seal key, or altered) is left alone and raised as a store problem:
    /// this host keeps its keys.
    async fn sync_nts_keys(&self, client: &mut Client, keys: &Keys) -> Result<()> {
        use crate::nts::cookie::{CookieKeys, StoredKeysError};
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let Some(sync) = &self.nts_keys else {
            return Ok(());
        };
        let seal = match self.spec.nts_seal_key_file.read() {
            Ok(k) => k,
            Err(e) => {
                sync.report(Some(format!("{e:#}")));
                return Ok(());
            }
        };
        let local = std::fs::read_to_string(&sync.file)
            .ok()
            .and_then(|t| serde_json::from_str::<CookieKeys>(&t).ok())
            .filter(|k| k.check().is_ok());
        let key = keys.nts_keys();
        let marker = keys.nts_rotation();
        let stored = store::get(client, &key).await?;
        let opened = stored
            .as_ref()
            .map(|(t, rev)| (CookieKeys::open_from_store(t, &seal, &key), *rev));
        let (mut cluster, guard, adopted) = match opened {
            Some((Ok(s), rev)) => (
                s,
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                true,
            ),
            Some((Err(e @ (StoredKeysError::DoesNotOpen | StoredKeysError::Invalid(_))), _)) => {
                let why = e.to_string();
                sync.report(Some(format!("{key}: {why}")));
                self.problem(&key, Some(&why));
                return Ok(());
            }
            Some((Err(e), rev)) => match local {
                Some(ref l) => {
                    info!(key = %key, reason = %e, "fleet: replacing the store's NTS cookie keys with this host's, sealed");
                    (
                        l.clone(),
                        Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                        false,
                    )
                }
                None => return Ok(()),
            },
            None => match local {
                Some(ref l) => (
                    l.clone(),
                    Compare::version(key.clone(), CompareOp::Equal, 0),
                    false,
                ),
                None => return Ok(()),
            },
        };
        self.problem(&key, None);
        let due = adopted && store::get(client, &marker).await?.is_none();
        if due || !adopted {
            // The key's created time is only a label now: due means the marker expired.
            let rotated = due
                && cluster.rotate_if_due(crate::host::hostclock::unix_now_s(), 0, rand::random());
            let sealed = cluster.seal_for_store(&seal, &key, rand::random());
            let lease = client
                .lease_grant(sync.rotation.as_secs().max(2) as i64, None)
                .await
                .context("a lease for the NTS key rotation")?
                .id();
            let txn = Txn::new()
                .when([guard, Compare::version(marker.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(key.clone(), sealed, None),
                    TxnOp::put(
                        marker.clone(),
                        format!("{:?}", cluster.ids()),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                ]);
            if !client.txn(txn).await?.succeeded() {
                // Another host seeded or rotated first: its keys are adopted next time.
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            info!(ids = ?cluster.ids(), rotated, "fleet: NTS cookie keys written to the store, sealed");
        }
        sync.report(None);
        if local.as_ref() != Some(&cluster) {
            crate::nts::server::write_keys(&sync.file, &cluster)?;
            info!(ids = ?cluster.ids(), "fleet: NTS cookie keys from the store");
        }
        Ok(())
    }

    /// A configuration this host does not run (invalid here, or it failed to apply in
    /// place): remembered so it is never tried again, reported `failed` with the reason;
    /// nothing changed.
    async fn refuse(
        &self,
        client: &mut Client,
        keys: &Keys,
        files: &LocalFiles,
        version: Version,
        why: String,
    ) -> Result<bool> {
        let mut s = files.state()?;
        s.failed = Some((version, why.clone()));
        files.save(&s)?;
        warn!(revision = version.revision, reason = %why, "fleet: configuration refused; nothing changed");
        self.put_config_state(client, keys, version.revision, ApplyState::Failed, &why)
            .await?;
        Ok(false)
    }

    async fn put_config_state(
        &self,
        client: &mut Client,
        keys: &Keys,
        revision: i64,
        state: ApplyState,
        message: &str,
    ) -> Result<()> {
        let s = ConfigState {
            revision,
            state,
            message: message.to_string(),
        };
        self.put_mine(client, keys, CONFIG_STATE, &s).await
    }

    /// Puts `value` as JSON under this host's `what` key (no lease: it outlives the host).
    async fn put_mine(
        &self,
        client: &mut Client,
        keys: &Keys,
        what: &str,
        value: &impl serde::Serialize,
    ) -> Result<()> {
        client
            .put(
                keys.host(&self.spec.host, what),
                serde_json::to_vec(value)?,
                None,
            )
            .await
            .with_context(|| format!("writing {what}"))?;
        Ok(())
    }
}

/// What a heartbeat says: this host's status report (built off the runtime thread: it walks the
/// kernel's tables) and the configuration revision it runs.
async fn heartbeat(reports: &Reports, files: &LocalFiles, started_unix: u64) -> Result<HostStatus> {
    let report = reports.get().await?;
    let state = files.state()?;
    Ok(HostStatus {
        role: report
            .vrrp
            .as_ref()
            .map_or("single".into(), |v| v.role.clone()),
        synchronized: report.clock.synchronized,
        stratum: report.anchor.stratum,
        offset_s: report.clock.offset_s,
        upstream_reach: report
            .clock
            .sources
            .iter()
            .map(|s| (s.addr.to_string(), s.reach))
            .collect(),
        alarms: report.alarms.iter().map(|a| a.name.clone()).collect(),
        config_revision: state.applied.map_or(0, |v| v.revision),
        version: report.version.clone(),
        uptime_s: report.uptime_s,
        started_unix,
        holdover: report.clock.holdover,
        measured_since_start: report.clock.measured_since_start,
        last_sync_unix: report.clock.last_sync_mono_ns.and_then(|t| {
            let now = crate::host::hostclock::read_clock_pair().ok()?;
            Some((now.unix_ns as f64 - now.mono_ns.saturating_sub(t) as f64) * 1e-9)
        }),
        store_problems: Vec::new(),
    })
}

/// The config state to report from the local files: the newest attempt's outcome.
fn config_state_of(s: &LocalState) -> Option<ConfigState> {
    if let Some(v) = s.applying {
        return Some(ConfigState {
            revision: v.revision,
            state: ApplyState::Applying,
            message: "running; waiting for its upstreams to synchronize the clock".into(),
        });
    }
    let applied = s.applied.map(|v| ConfigState {
        revision: v.revision,
        state: ApplyState::Applied,
        message: String::new(),
    });
    match (&s.failed, applied) {
        (Some((v, why)), a) if a.as_ref().is_none_or(|a| v.revision >= a.revision) => {
            Some(ConfigState {
                revision: v.revision,
                state: ApplyState::Failed,
                message: why.clone(),
            })
        }
        (_, a) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_attempt_is_what_is_reported() {
        let v = |r| Version {
            revision: r,
            override_revision: 0,
        };
        let mut s = LocalState::default();
        assert_eq!(config_state_of(&s), None);
        s.applied = Some(v(5));
        assert_eq!(config_state_of(&s).unwrap().state, ApplyState::Applied);
        s.failed = Some((v(7), "no such interface".into()));
        let c = config_state_of(&s).unwrap();
        assert_eq!((c.revision, c.state), (7, ApplyState::Failed));
        s.applied = Some(v(9));
        assert_eq!(config_state_of(&s).unwrap().state, ApplyState::Applied);
        // Restarted into revision 11, not yet proven by a synchronization: applying.
        s.applying = Some(v(11));
        let c = config_state_of(&s).unwrap();
        assert_eq!((c.revision, c.state), (11, ApplyState::Applying));
    }

    /// The heartbeat's report is built off the runtime thread: while the report is blocked
    /// (as a walk of full tables blocks), another task of the same current-thread runtime,
    /// the daemon's kind, still runs, and it is that task that lets the report finish.
    #[test]
    fn the_heartbeat_report_does_not_hold_the_runtime_thread() {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let started_tx = std::sync::Mutex::new(Some(started_tx));
        let release_rx = std::sync::Mutex::new(release_rx);
        let reports = Reports::new(move || {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            // Built on the runtime thread, nothing could release it: fail, not hang.
            release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| anyhow!("no other task ran while the report was being built"))?;
            Ok(crate::observe::status::StatusReport {
                version: "9.9.9".into(),
                ..Default::default()
            })
        });
        // No state directory: the agent's state reads as empty.
        let dir = std::env::temp_dir().join(format!("ntpxdp-no-state-{}", std::process::id()));
        let files = LocalFiles::new(&dir);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (status, ()) = runtime.block_on(async {
            let other_task = async {
                started_rx.await.expect("the report never started");
                release_tx.send(()).unwrap();
            };
            tokio::join!(heartbeat(&reports, &files, 7), other_task)
        });
        let status = status.unwrap();
        assert_eq!((status.version.as_str(), status.started_unix), ("9.9.9", 7));
        assert_eq!(status.config_revision, 0);
    }
}
