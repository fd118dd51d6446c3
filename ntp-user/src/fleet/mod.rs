//! The fleet: VIP hosts of one cluster keep their configuration, state and commands in etcd;
//! the daemon is the agent ([`agent`]), `ntp-xdp fleet` the operator's side ([`ops`]).
//! The store is never on the time path: a daemon that cannot reach it serves with its last
//! good configuration and says so.
//!
//! Keys, under `/ntp-xdp/<cluster>/` (the etcd idioms: revisions, watches, leases, txns):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `config` | the cluster's TOML (no `[fleet]`); its mod revision is *the config revision* | `fleet push` (compare-and-swap) |
//! | `hosts/<h>/override` | TOML merged over the cluster's (names, addresses, priority) | `fleet override` |
//! | `hosts/<h>/desired` | `{"revision": R}`: the config revision this host should run; absent: the newest | `fleet push` (rolling: host by host) |
//! | `hosts/<h>/status` | [`HostStatus`], bound to the host's lease (gone = lost) | the agent, every 2 s |
//! | `hosts/<h>/config_state` | [`ConfigState`]: revision, applying/applied/failed, message | the agent |
//! | `hosts/<h>/command` | [`HostCommand`]: `{"id", "command": "restart"}` | `fleet restart` |
//! | `hosts/<h>/command_state` | [`CommandState`] | the agent |
//! | `restart_slot/<group>` | the host of a VRRP group ([`restart_group`]) restarting now, under its lease: one at a time | agents (txn) |
//! | `nts_keys` | the NTS cookie keys, sealed under the cluster's seal key ([`crate::nts::cookie::SealKey`]), newest rotation wins | agents (compare-and-swap) |
//! | `nts_rotation` | present until the next rotation is due: under a lease of the rotation period, so etcd's clock decides | agents (with `nts_keys`) |
//!
//! Sans IO here: the key names, the values, the TOML merge, the rollout order and the fleet's
//! alarms; [`store`] connects, [`local`] keeps the host's own files, [`agent`] and [`ops`] do
//! the IO.
pub mod agent;
pub mod local;
pub mod ops;
pub mod store;

pub use crate::config::FleetSpec;

use serde::{Deserialize, Serialize};

/// The key names of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/ntp-xdp/{cluster}/"),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }
    /// Held (under its lease) by the one host of restart group `group` ([`restart_group`])
    /// restarting now.
    pub fn restart_slot(&self, group: &str) -> String {
        format!("{}{group}", self.restart_slots())
    }
    pub fn restart_slots(&self) -> String {
        format!("{}restart_slot/", self.prefix)
    }
    /// The NTS cookie keys every host of the cluster uses.
    pub fn nts_keys(&self) -> String {
        format!("{}nts_keys", self.prefix)
    }
    /// Present (under a lease of the rotation period) until the next NTS key rotation is due.
    pub fn nts_rotation(&self) -> String {
        format!("{}nts_rotation", self.prefix)
    }
    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }
    pub fn host(&self, host: &str, what: &str) -> String {
        format!("{}hosts/{host}/{what}", self.prefix)
    }
    /// `hosts/<h>/<what>` → (h, what).
    pub fn split_host_key<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("hosts/")?;
        rest.split_once('/')
    }
}

pub const OVERRIDE: &str = "override";
pub const DESIRED: &str = "desired";
pub const STATUS: &str = "status";
pub const CONFIG_STATE: &str = "config_state";
pub const COMMAND: &str = "command";
pub const COMMAND_STATE: &str = "command_state";

/// A host's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// "master", "backup", or "single" (no redundancy).
    pub role: String,
    pub synchronized: bool,
    pub stratum: u8,
    pub offset_s: Option<f64>,
    /// Reach registers of the upstreams, by address.
    pub upstream_reach: Vec<(String, u8)>,
    pub alarms: Vec<String>,
    /// The config revision it runs (0: its local file, never a pushed one).
    pub config_revision: i64,
    pub version: String,
    pub uptime_s: f64,
    /// Process start (Unix s): tells a restarted daemon from one that kept running.
    pub started_unix: u64,
    /// Synchronized only on the last reference's word: no upstream answers now.
    #[serde(default)]
    pub holdover: bool,
    /// This daemon has measured its reference since it started (a resumed clock has not).
    #[serde(default)]
    pub measured_since_start: bool,
    /// When the clock was last corrected from its reference (Unix s), by this daemon or the
    /// one it resumed from.
    #[serde(default)]
    pub last_sync_unix: Option<f64>,
    /// Values in the store this host cannot use: (key, why). Each is a fleet alarm.
    #[serde(default)]
    pub store_problems: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyState {
    Applying,
    Applied,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigState {
    pub revision: i64,
    pub state: ApplyState,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCommand {
    pub id: String,
    /// "restart": a hitless restart.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandState {
    pub id: String,
    /// "running", "done", "failed".
    pub state: String,
    pub message: String,
}

/// The configuration a host runs: the cluster's, its override over it, and its own `[fleet]`
/// section (how it reaches the store is its own business).
pub fn effective_config(
    cluster: &str,
    host_override: Option<&str>,
    local_fleet: Option<&toml::Value>,
) -> Result<String, String> {
    let mut base: toml::Table = cluster
        .parse()
        .map_err(|e| format!("the cluster config is not TOML: {e}"))?;
    if base.contains_key("fleet") {
        return Err("the cluster config has a [fleet] section; each host keeps its own".into());
    }
    if let Some(o) = host_override {
        let over: toml::Table = o
            .parse()
            .map_err(|e| format!("the host override is not TOML: {e}"))?;
        crate::config::merge_toml(&mut base, &over);
    }
    if let Some(f) = local_fleet {
        base.insert("fleet".into(), f.clone());
    }
    toml::to_string(&base).map_err(|e| e.to_string())
}

/// The hosts that restart one at a time: those of one VRRP group (the same
/// `redundancy.virtual_router_id`), so that one of them always holds the group's addresses.
/// None without `[redundancy]`: the hitless restart needs no other host (the pinned responder
/// answers throughout), and a cluster of hundreds restarts into a push at once.
pub fn restart_group(config: &str) -> Option<String> {
    let t: toml::Table = config.parse().ok()?;
    let vrid = t
        .get("redundancy")?
        .get("virtual_router_id")?
        .as_integer()?;
    Some(format!("vrrp-{vrid}"))
}

/// Whether going from `old` to `new` (whole configurations) changes only what a running
/// daemon can change in place: the access list and the rate limit (not the table sizes,
/// fixed when the maps are made).
pub fn live_changeable(old: &str, new: &str) -> bool {
    let strip = |text: &str| -> Option<toml::Table> {
        let mut t: toml::Table = text.parse().ok()?;
        t.remove("access");
        t.remove("fleet");
        if let Some(toml::Value::Table(l)) = t.get_mut("limits") {
            l.retain(|k, _| k == "sources");
            if l.is_empty() {
                t.remove("limits");
            }
        }
        Some(t)
    };
    match (strip(old), strip(new)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// One host as `fleet status` and the rollouts see it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub host: String,
    /// None: its lease expired (lost), or it never reported.
    pub status: Option<HostStatus>,
    pub config_state: Option<ConfigState>,
    pub desired: Option<i64>,
    pub command_state: Option<CommandState>,
}

impl HostView {
    pub fn lost(&self) -> bool {
        self.status.is_none()
    }
    pub fn is_master(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.role == "master")
    }
}

/// The order a rollout visits hosts: the canary, then standbys and single hosts, the VRRP
/// master last (it changes once a standby has shown the change is good).
pub fn rollout_order(hosts: &[HostView], canary: Option<&str>) -> Vec<String> {
    let mut rest: Vec<&HostView> = hosts
        .iter()
        .filter(|h| Some(h.host.as_str()) != canary)
        .collect();
    rest.sort_by_key(|h| (h.is_master(), h.host.clone()));
    canary
        .map(str::to_string)
        .into_iter()
        .chain(rest.into_iter().map(|h| h.host.clone()))
        .collect()
}

/// What is wrong with the fleet as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetAlarm {
    pub alarm: String,
    pub detail: String,
}

/// The fleet's alarms: lost hosts, failed configs, live hosts on different config revisions,
/// and synchronized hosts whose offsets are further apart than `max_offset_spread_s`.
pub fn fleet_alarms(hosts: &[HostView], max_offset_spread_s: f64) -> Vec<FleetAlarm> {
    let mut out = Vec::new();
    for h in hosts {
        if h.lost() {
            out.push(FleetAlarm {
                alarm: "host_lost".into(),
                detail: format!("{}: no heartbeat within its lease", h.host),
            });
        }
        if let Some(c) = &h.config_state {
            if c.state == ApplyState::Failed {
                out.push(FleetAlarm {
                    alarm: "config_failed".into(),
                    detail: format!("{}: revision {}: {}", h.host, c.revision, c.message),
                });
            }
        }
    }
    for h in hosts {
        if let Some(c) = h.command_state.as_ref().filter(|c| c.state == "failed") {
            out.push(FleetAlarm {
                alarm: "command_failed".into(),
                detail: format!("{}: {}", h.host, c.message),
            });
        }
    }
    // A value in the store hosts cannot use: one alarm per key, naming who said so.
    let mut problems: std::collections::BTreeMap<&str, (&str, Vec<&str>)> = Default::default();
    for h in hosts {
        for (key, why) in h.status.iter().flat_map(|s| &s.store_problems) {
            // A host's own keys are reported in its config or command state already.
            if key.contains(&format!("/hosts/{}/", h.host)) {
                continue;
            }
            problems
                .entry(key)
                .or_insert((why, Vec::new()))
                .1
                .push(&h.host);
        }
    }
    for (key, (why, by)) in problems {
        out.push(FleetAlarm {
            alarm: "store_value_unusable".into(),
            detail: format!("{key}: {why} (seen by {})", by.join(", ")),
        });
    }
    let live: Vec<&HostStatus> = hosts.iter().filter_map(|h| h.status.as_ref()).collect();
    let mut revisions: Vec<i64> = live.iter().map(|s| s.config_revision).collect();
    revisions.sort_unstable();
    revisions.dedup();
    if revisions.len() > 1 {
        out.push(FleetAlarm {
            alarm: "config_revisions_differ".into(),
            detail: format!("live hosts run revisions {revisions:?}"),
        });
    }
    let offsets: Vec<f64> = live
        .iter()
        .filter(|s| s.synchronized)
        .filter_map(|s| s.offset_s)
        .collect();
    if let (Some(lo), Some(hi)) = (
        offsets.iter().copied().reduce(f64::min),
        offsets.iter().copied().reduce(f64::max),
    ) {
        if hi - lo > max_offset_spread_s {
            out.push(FleetAlarm {
                alarm: "offsets_disagree".into(),
                detail: format!(
                    "synchronized hosts' offsets span {:.1} µs (limit {:.1} µs)",
                    (hi - lo) * 1e6,
                    max_offset_spread_s * 1e6
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A push, of the cluster's config or of a host's override, is refused on the operator's
    /// machine and by each host when a value that reaches a generated file, a command line
    /// or a path holds a line break, a quote or a NUL; the error names the field.
    #[test]
    fn a_push_refuses_values_that_could_break_out_of_a_file_or_command_line() {
        use crate::config::every_field;
        let dir = every_field::scratch("push");
        let local_fleet = every_field::fleet(&dir)
            .parse::<toml::Table>()
            .unwrap()
            .remove("fleet")
            .unwrap();
        let cluster = every_field::CLUSTER;
        let origin = "etcd /ntp-xdp/az1/config@7";
        let text = effective_config(cluster, None, Some(&local_fleet)).unwrap();
        agent::Check::Portable
            .run(&text, origin)
            .expect("the base config is valid");
        let pushed = every_field::FIELDS
            .iter()
            .filter(|f| !f.starts_with("fleet."));
        for field in pushed {
            for bad in every_field::BAD {
                let (spoiled, value) = every_field::spoil(cluster, field, bad);
                // The value in the cluster's config, and in a host's override over a good one.
                for text in [
                    effective_config(&spoiled, None, Some(&local_fleet)),
                    effective_config(cluster, Some(&spoiled), Some(&local_fleet)),
                ] {
                    let text = text.unwrap();
                    for check in [agent::Check::Portable, agent::Check::OnThisHost] {
                        let e = check
                            .run(&text, origin)
                            .expect_err(&format!("{field} = {value:?} was accepted"));
                        assert!(
                            e.contains(origin)
                                && e.contains(&format!("field `{field}`"))
                                && e.contains(&format!("{value:?}")),
                            "{e}"
                        );
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_access_and_limits_change_live() {
        let base = "[service]\ninterface = \"v0\"\n[limits]\nrate = 2.0\nsources = 100\n";
        assert!(live_changeable(
            base,
            &format!("{base}[access]\ndeny = [\"169.254.1.1/32\"]\n")
        ));
        assert!(live_changeable(
            base,
            &base.replace("rate = 2.0", "rate = 5.0")
        ));
        assert!(live_changeable(
            base,
            &format!("{base}[access]\nvlans = [100]\n")
        ));
        assert!(live_changeable(
            base,
            "[limits]\nsources = 100\nburst = 3\n[service]\ninterface = \"v0\"\n"
        ));
        assert!(!live_changeable(
            base,
            &base.replace("sources = 100", "sources = 200")
        ));
        assert!(!live_changeable(base, &base.replace("v0", "v1")));
        assert!(!live_changeable(base, "not toml ["));
    }

    #[test]
    fn keys_split_back_into_host_and_part() {
        let k = Keys::new("az1");
        assert_eq!(k.config(), "/ntp-xdp/az1/config");
        let s = k.host("vip-a", STATUS);
        assert_eq!(s, "/ntp-xdp/az1/hosts/vip-a/status");
        assert_eq!(k.split_host_key(&s), Some(("vip-a", "status")));
        assert_eq!(k.split_host_key("/ntp-xdp/az2/hosts/a/status"), None);
    }

    /// Hosts of one VRRP group restart one at a time; a host without redundancy waits for
    /// no one.
    #[test]
    fn a_vrrp_group_shares_a_restart_slot_and_a_single_host_needs_none() {
        let k = Keys::new("az1");
        let a = "[service]\ninterface = \"v\"\n\n[redundancy]\nvirtual_router_id = 51\n";
        let b = "[redundancy]\nvirtual_router_id = 51\npriority = 50\n";
        let other = "[redundancy]\nvirtual_router_id = 52\n";
        assert_eq!(restart_group(a), restart_group(b));
        assert_ne!(restart_group(a), restart_group(other));
        let slot = k.restart_slot(&restart_group(a).unwrap());
        assert_eq!(slot, "/ntp-xdp/az1/restart_slot/vrrp-51");
        assert!(slot.starts_with(&k.restart_slots()));
        assert_eq!(restart_group("[service]\ninterface = \"v\"\n"), None);
        assert_eq!(restart_group("not toml ["), None);
    }

    #[test]
    fn the_override_wins_table_by_table_and_fleet_stays_local() {
        let fleet: toml::Value = toml::from_str::<toml::Table>("cluster = \"az1\"")
            .unwrap()
            .into();
        let merged = effective_config(
            "[clock]\nlocal_stratum = 10\nmin_poll = 4\n[limits]\nrate = 2.0\n",
            Some("[clock]\nmin_poll = 3\n[service]\ninterface = \"v0\"\n"),
            Some(&fleet),
        )
        .unwrap();
        let t: toml::Table = merged.parse().unwrap();
        assert_eq!(t["clock"]["local_stratum"].as_integer(), Some(10));
        assert_eq!(t["clock"]["min_poll"].as_integer(), Some(3));
        assert_eq!(t["limits"]["rate"].as_float(), Some(2.0));
        assert_eq!(t["service"]["interface"].as_str(), Some("v0"));
        assert_eq!(t["fleet"]["cluster"].as_str(), Some("az1"));
        let e = effective_config("[fleet]\ncluster = \"x\"\n", None, Some(&fleet)).unwrap_err();
        assert!(e.contains("[fleet]"), "{e}");
        assert!(effective_config("not toml [", None, None).is_err());
    }

    fn host(name: &str, role: &str, rev: i64, offset: f64) -> HostView {
        HostView {
            host: name.into(),
            status: Some(HostStatus {
                role: role.into(),
                synchronized: true,
                offset_s: Some(offset),
                config_revision: rev,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rollouts_visit_the_canary_first_and_the_master_last() {
        let hosts = [
            host("a", "master", 1, 0.0),
            host("b", "backup", 1, 0.0),
            host("c", "backup", 1, 0.0),
        ];
        assert_eq!(rollout_order(&hosts, None), ["b", "c", "a"]);
        assert_eq!(rollout_order(&hosts, Some("c")), ["c", "b", "a"]);
        assert_eq!(rollout_order(&hosts, Some("a")), ["a", "b", "c"]);
    }

    #[test]
    fn fleet_alarms_name_what_is_wrong() {
        let ok = [host("a", "master", 5, 1e-6), host("b", "backup", 5, 3e-6)];
        assert!(fleet_alarms(&ok, 100e-6).is_empty());
        let mut bad = ok.to_vec();
        bad.push(HostView {
            host: "c".into(),
            config_state: Some(ConfigState {
                revision: 6,
                state: ApplyState::Failed,
                message: "vip.host_interfaces[0]: no such interface".into(),
            }),
            ..Default::default()
        });
        bad[1].status.as_mut().unwrap().config_revision = 4;
        bad[1].status.as_mut().unwrap().offset_s = Some(500e-6);
        bad[0].command_state = Some(CommandState {
            id: String::new(),
            state: "failed".into(),
            message: "/ntp-xdp/az1/hosts/a/command: not a command".into(),
        });
        // Every host says the shared key is unusable: one alarm; a host's own key is said in
        // its states already.
        for h in bad.iter_mut().filter_map(|h| h.status.as_mut()) {
            h.store_problems = vec![("/ntp-xdp/az1/nts_keys".into(), "does not open".into())];
        }
        bad[0]
            .status
            .as_mut()
            .unwrap()
            .store_problems
            .push(("/ntp-xdp/az1/hosts/a/desired".into(), "not JSON".into()));
        let names: Vec<String> = fleet_alarms(&bad, 100e-6)
            .into_iter()
            .map(|a| a.alarm)
            .collect();
        assert_eq!(
            names,
            [
                "host_lost",
                "config_failed",
                "command_failed",
                "store_value_unusable",
                "config_revisions_differ",
                "offsets_disagree"
            ]
        );
    }
}
