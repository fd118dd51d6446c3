//! `ntp-xdp fleet`: the operator's side. Pushes are validated here first and written with a
//! compare-and-swap on the config's revision; rollouts go host by host (canary first, the
//! VRRP master last) and stop at the first failure; `status` is one table for the cluster.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use super::agent::Check;
use super::{
    fleet_alarms, rollout_order, store, ApplyState, Desired, FleetAlarm, FleetSpec, HostCommand,
    HostView, Keys, COMMAND, DESIRED, OVERRIDE,
};

/// Operations in one transaction: etcd refuses more than `--max-txn-ops` (128 by default), so
/// what is written for every host goes in batches of this many.
const TXN_OPS: usize = 100;

pub struct Fleet {
    client: Client,
    keys: Keys,
    /// How long one host may take to apply or restart.
    pub host_timeout: Duration,
}

/// What `fleet status --json` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FleetReport {
    pub cluster: String,
    pub config_revision: i64,
    pub hosts: Vec<HostView>,
    pub alarms: Vec<FleetAlarm>,
}

impl Fleet {
    pub async fn connect(spec: &FleetSpec) -> Result<Fleet> {
        Ok(Fleet {
            client: store::connect(spec).await?,
            keys: Keys::new(&spec.cluster),
            host_timeout: Duration::from_secs(120),
        })
    }

    pub async fn report(&mut self, max_offset_spread_s: f64) -> Result<FleetReport> {
        let hosts = store::hosts(&mut self.client, &self.keys).await?;
        let config_revision = store::get(&mut self.client, &self.keys.config())
            .await?
            .map_or(0, |(_, r)| r);
        Ok(FleetReport {
            cluster: self.keys.prefix().to_string(),
            config_revision,
            alarms: fleet_alarms(&hosts, max_offset_spread_s),
            hosts,
        })
    }

    /// Checks `cluster` merged with every known host's override (or alone when no host is
    /// known yet), as each host would run it.
    async fn validate_for_hosts(
        &mut self,
        cluster: &str,
        hosts: &[HostView],
        origin: &str,
    ) -> Result<()> {
        if hosts.is_empty() {
            let text = super::effective_config(cluster, None, None).map_err(|e| anyhow!(e))?;
            return Check::Portable.run(&text, origin).map_err(|e| anyhow!(e));
        }
        // Every host's override in one read: a cluster has hundreds of hosts.
        let all = self
            .client
            .get(
                self.keys.hosts(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .context("reading the hosts' overrides")?;
        let overrides: std::collections::BTreeMap<String, String> = all
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let (host, part) = self.keys.split_host_key(&key)?;
                (part == OVERRIDE).then(|| {
                    (
                        host.to_string(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
            })
            .collect();
        for h in hosts {
            let over = overrides.get(&h.host).map(String::as_str);
            let text = super::effective_config(cluster, over, None)
                .map_err(|e| anyhow!("for host {}: {e}", h.host))?;
            Check::Portable
                .run(&text, origin)
                .map_err(|e| anyhow!("for host {}: {e}", h.host))?;
        }
        Ok(())
    }

    /// `fleet push`: validated, written with a compare-and-swap; without `rolling` every host
    /// applies it at once, with it host by host. Prints progress; returns the new revision.
    pub async fn push(
        &mut self,
        cluster: &str,
        origin: &str,
        rolling: bool,
        canary: Option<&str>,
        out: &mut dyn FnMut(&str),
    ) -> Result<i64> {
        let hosts = store::hosts(&mut self.client, &self.keys).await?;
        if let Some(c) = canary {
            if !hosts.iter().any(|h| h.host == c && !h.lost()) {
                bail!("canary {c} is not a live host of this cluster");
            }
        }
        self.validate_for_hosts(cluster, &hosts, origin).await?;
        let key = self.keys.config();
        let current = store::get(&mut self.client, &key).await?;
        let read_rev = current.as_ref().map_or(0, |(_, r)| *r);
        let guard = match &current {
            Some((_, r)) => Compare::mod_revision(key.clone(), CompareOp::Equal, *r),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        };
        let changed = || {
            anyhow!(
                "the cluster config changed since it was read at revision {read_rev} (another \
                 operator?): this push was not written; look at it and push again"
            )
        };
        if rolling {
            // Every host stays where it is until its turn: pinned to what it runs before the
            // config changes, while it is still the one read (a pin to what a host runs
            // changes nothing there, should the config write below lose to another push).
            for batch in hosts.chunks(TXN_OPS) {
                let mut pins = Vec::with_capacity(batch.len());
                for h in batch {
                    let now = running_revision(h);
                    pins.push(TxnOp::put(
                        self.keys.host(&h.host, DESIRED),
                        serde_json::to_vec(&Desired { revision: now })?,
                        None,
                    ));
                }
                let resp = self
                    .client
                    .txn(Txn::new().when([guard.clone()]).and_then(pins))
                    .await
                    .context("pinning the hosts")?;
                if !resp.succeeded() {
                    return Err(changed());
                }
            }
        }
        // Without --rolling every host runs the newest: the pins go. With few enough hosts they
        // go in the config's own transaction; beyond, in batches before it under the same
        // guard, so a push cut off midway leaves hosts following the config as it was, never
        // pinned behind a config already written.
        let unpin = |batch: &[HostView]| -> Vec<TxnOp> {
            batch
                .iter()
                .map(|h| TxnOp::delete(self.keys.host(&h.host, DESIRED), None))
                .collect()
        };
        let mut write = vec![TxnOp::put(key.clone(), cluster, None)];
        if !rolling {
            if hosts.len() < TXN_OPS {
                write.extend(unpin(&hosts));
            } else {
                for batch in hosts.chunks(TXN_OPS) {
                    let resp = self
                        .client
                        .txn(Txn::new().when([guard.clone()]).and_then(unpin(batch)))
                        .await
                        .context("unpinning the hosts")?;
                    if !resp.succeeded() {
                        return Err(changed());
                    }
                }
            }
        }
        let resp = self
            .client
            .txn(Txn::new().when([guard]).and_then(write))
            .await
            .context("writing the config")?;
        if !resp.succeeded() {
            return Err(changed());
        }
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow!("no revision in the store's answer"))?;
        out(&format!("config revision {revision} written"));
        let live: Vec<HostView> = hosts.into_iter().filter(|h| !h.lost()).collect();
        if !rolling {
            for h in &live {
                if let Waited::Superseded(newer) = self.wait_applied(&h.host, revision, out).await?
                {
                    bail!(superseded(revision, &h.host, newer));
                }
            }
            return Ok(revision);
        }
        for host in rollout_order(&live, canary) {
            // Only while this push's config is the cluster's: a later push owns the hosts.
            let moved = self
                .client
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            revision,
                        )])
                        .and_then([TxnOp::put(
                            self.keys.host(&host, DESIRED),
                            serde_json::to_vec(&Desired { revision })?,
                            None,
                        )]),
                )
                .await?;
            if !moved.succeeded() {
                let newer = store::get(&mut self.client, &key)
                    .await?
                    .map_or(0, |(_, r)| r);
                bail!(superseded(revision, &host, newer));
            }
            out(&format!("{host}: applying revision {revision}"));
            let waited = self
                .wait_applied(&host, revision, out)
                .await
                .with_context(|| {
                    format!("rollout stopped at {host}; later hosts keep their config")
                })?;
            if let Waited::Superseded(newer) = waited {
                bail!(superseded(revision, &host, newer));
            }
        }
        Ok(revision)
    }

    /// Waits until `host` runs `revision` and is synchronized, or says it failed; stops
    /// waiting when the cluster config is pushed again meanwhile (the host goes on to that).
    async fn wait_applied(
        &mut self,
        host: &str,
        revision: i64,
        out: &mut dyn FnMut(&str),
    ) -> Result<Waited> {
        let deadline = Instant::now() + self.host_timeout;
        loop {
            let now = store::get(&mut self.client, &self.keys.config())
                .await?
                .map_or(0, |(_, r)| r);
            if now != revision {
                return Ok(Waited::Superseded(now));
            }
            let h = self.host(host).await?;
            if let Some(c) = h.config_state.as_ref().filter(|c| c.revision == revision) {
                if c.state == ApplyState::Failed {
                    bail!("{host} failed revision {revision}: {}", c.message);
                }
            }
            if let Some(s) = &h.status {
                if s.config_revision == revision && s.synchronized {
                    out(&format!(
                        "{host}: applied revision {revision}, synchronized"
                    ));
                    return Ok(Waited::Applied);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{host} did not report revision {revision} applied and synchronized within {}",
                    humantime::format_duration(self.host_timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn host(&mut self, host: &str) -> Result<HostView> {
        // This host's keys only: a rollout reads one host for each of the others.
        Ok(
            store::hosts_under(&mut self.client, &self.keys, &self.keys.host(host, ""))
                .await?
                .into_iter()
                .find(|h| h.host == host)
                .unwrap_or_else(|| HostView {
                    host: host.to_string(),
                    ..Default::default()
                }),
        )
    }

    /// `fleet override HOST FILE`: the host's own part, validated over the cluster config.
    pub async fn set_override(&mut self, host: &str, text: &str, origin: &str) -> Result<i64> {
        if let Some((cluster, _)) = store::get(&mut self.client, &self.keys.config()).await? {
            let merged =
                super::effective_config(&cluster, Some(text), None).map_err(|e| anyhow!(e))?;
            Check::Portable
                .run(&merged, origin)
                .map_err(|e| anyhow!(e))?;
        } else {
            text.parse::<toml::Table>()
                .map_err(|e| anyhow!("{origin}: not TOML: {e}"))?;
        }
        let resp = self
            .client
            .put(self.keys.host(host, OVERRIDE), text, None)
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// `fleet restart --rolling`: one host at a time, each back and synchronized before the
    /// next, the master last (its addresses move to a standby once, when it stops).
    pub async fn rolling_restart(&mut self, out: &mut dyn FnMut(&str)) -> Result<()> {
        let hosts = store::hosts(&mut self.client, &self.keys).await?;
        let lost: Vec<&str> = hosts
            .iter()
            .filter(|h| h.lost())
            .map(|h| h.host.as_str())
            .collect();
        if !lost.is_empty() {
            out(&format!("skipping lost hosts: {}", lost.join(", ")));
        }
        let live: Vec<HostView> = hosts.into_iter().filter(|h| !h.lost()).collect();
        for host in rollout_order(&live, None) {
            let before = live
                .iter()
                .find(|h| h.host == host)
                .and_then(|h| h.status.as_ref())
                .map_or(0, |s| s.started_unix);
            let id = format!("{:016x}", rand::random::<u64>());
            let cmd = HostCommand {
                id: id.clone(),
                command: "restart".into(),
            };
            self.client
                .put(
                    self.keys.host(&host, COMMAND),
                    serde_json::to_vec(&cmd)?,
                    None,
                )
                .await?;
            out(&format!("{host}: restarting"));
            let deadline = Instant::now() + self.host_timeout;
            loop {
                let h = self.host(&host).await?;
                let done = h
                    .command_state
                    .as_ref()
                    .is_some_and(|c| c.id == id && c.state == "done");
                if let Some(c) = h
                    .command_state
                    .as_ref()
                    .filter(|c| c.id == id && c.state == "failed")
                {
                    bail!("{host}: restart failed: {}", c.message);
                }
                // Synchronized by a measurement of the new process's own, not only the clock
                // it resumed.
                let back = h.status.as_ref().is_some_and(|s| {
                    s.started_unix != before && s.synchronized && s.measured_since_start
                });
                if done && back {
                    out(&format!("{host}: back and synchronized"));
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{host} was not back and synchronized within {}; stopping",
                        humantime::format_duration(self.host_timeout)
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }
}

/// How a wait for a host to apply a push ended (other than by an error).
enum Waited {
    Applied,
    /// The cluster config was pushed again (its revision now): that push owns the hosts.
    Superseded(i64),
}

/// Why a push stopped when another one came.
fn superseded(revision: i64, host: &str, newer: i64) -> String {
    format!(
        "push of revision {revision} stopped at {host}: the cluster config was pushed again \
         since (revision {newer}); the newer push decides what the hosts run, and this one \
         writes nothing more"
    )
}

/// The config revision a host runs now (0: its local file).
fn running_revision(h: &HostView) -> i64 {
    h.status
        .as_ref()
        .map(|s| s.config_revision)
        .or_else(|| {
            h.config_state
                .as_ref()
                .filter(|c| c.state == ApplyState::Applied)
                .map(|c| c.revision)
        })
        .unwrap_or(0)
}

/// The table `fleet status` prints.
pub fn render(r: &FleetReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {} config revision {}",
        r.cluster, r.config_revision
    );
    let _ = writeln!(
        o,
        "{:<16} {:<6} {:<7} {:<5} {:>3} {:>11} {:>8} {:<22} {:<9} {:>8} alarms",
        "host", "state", "role", "sync", "st", "offset", "rev", "config", "version", "uptime"
    );
    for h in &r.hosts {
        let c = h.config_state.as_ref().map_or("-".to_string(), |c| {
            format!(
                "{} {}",
                c.revision,
                match c.state {
                    ApplyState::Applying => "applying",
                    ApplyState::Applied => "applied",
                    ApplyState::Failed => "FAILED",
                }
            )
        });
        match &h.status {
            Some(s) => {
                let _ = writeln!(
                    o,
                    "{:<16} {:<6} {:<7} {:<5} {:>3} {:>11} {:>8} {:<22} {:<9} {:>7.0}s {}",
                    h.host,
                    "up",
                    s.role,
                    if s.synchronized { "yes" } else { "NO" },
                    s.stratum,
                    s.offset_s
                        .map_or("-".into(), |x| format!("{:+.1}us", x * 1e6)),
                    s.config_revision,
                    c,
                    s.version,
                    s.uptime_s,
                    s.alarms.join(",")
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "{:<16} {:<6} {:<7} {:<5} {:>3} {:>11} {:>8} {:<22}",
                    h.host, "LOST", "-", "-", "-", "-", "-", c
                );
            }
        }
    }
    let _ = writeln!(o, "\nalarms");
    if r.alarms.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for a in &r.alarms {
        let _ = writeln!(o, "  {:<24} {}", a.alarm, a.detail);
    }
    o
}
