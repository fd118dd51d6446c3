//! Command-line interface.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Validated};

#[derive(Debug, Parser)]
#[command(
    name = "ntp-xdp",
    version,
    long_version = concat!(
        env!("CARGO_PKG_VERSION"),
        "\nresponder built with ",
        env!("NTP_EBPF_TOOLCHAIN")
    ),
    about = "ntp-xdp: in-kernel NTP responder and its daemon"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the responder to an interface and serve the host clock until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Run the daemon from a TOML config (the embedded default without --config).
    Run {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Validate a config file and print what it would run, without starting anything.
    CheckConfig {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Remove what the daemon of this config created (namespace, veth, bridge, addresses,
    /// routes, pins, dnsmasq), and nothing else. The daemon must be stopped first.
    Down {
        /// The daemon's config (the embedded default without it).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// The systemd unit's ExecStop: unless systemd is restarting UNIT (`systemctl restart`,
    /// a package upgrade), the daemon withdraws as it stops (no address served, dnsmasq and
    /// radvd stopped); a restart leaves the pinned responder answering for the next daemon.
    OnStop {
        /// The daemon's config (the embedded default without it).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// The unit being stopped (systemd's %n).
        #[arg(long)]
        unit: String,
    },
    /// Print, for platforms that run their own DHCP (OpenStack neutron), the subnet host
    /// route to the clock addresses, and chrony / systemd-timesyncd snippets for guests.
    GuestConfig {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Exit 0 when the daemon behind the control socket serves a fresh, synchronized clock:
    /// keepalived's health check on a redundant VIP host.
    Health {
        #[arg(long)]
        socket: std::path::PathBuf,
    },
    /// Ask a running daemon for its clock, upstreams, responder counters, guest clocks and
    /// alarms (over its control socket).
    Status {
        /// The daemon's config (the embedded default without it), to find its control socket.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// The control socket itself.
        #[arg(long, conflicts_with = "config")]
        socket: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The fleet: push configuration, restart host by host, see the cluster (etcd, from the
    /// `[fleet]` section of --config).
    Fleet {
        /// A config with a `[fleet]` section (how to reach the store).
        #[arg(long)]
        config: std::path::PathBuf,
        /// How long one host may take to apply a config or restart.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        host_timeout: Duration,
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Print the counters of every responder loaded on this machine.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Validate FILE (the cluster's config, no [fleet]) for every host and write it with a
    /// compare-and-swap; every host applies it, or with --rolling one after another.
    Push {
        file: std::path::PathBuf,
        /// Host by host (the canary first, the VRRP master last), each applied and
        /// synchronized before the next; stops at the first failure.
        #[arg(long)]
        rolling: bool,
        /// The host to change first (with --rolling).
        #[arg(long, requires = "rolling")]
        canary: Option<String>,
    },
    /// Set HOST's override (its names, addresses, priority), merged over the cluster config.
    Override {
        host: String,
        file: std::path::PathBuf,
    },
    /// Restart every host, one at a time (hitless), each back and synchronized before the
    /// next, the master last.
    Restart {
        #[arg(long, required = true)]
        rolling: bool,
    },
    /// One table for the cluster: role, synchronization, offset, config revision and state,
    /// version, uptime, alarms; lost hosts; the fleet's alarms.
    Status {
        #[arg(long)]
        json: bool,
        /// Alarm when synchronized hosts' offsets span more than this.
        #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
        max_offset_spread: Duration,
    },
}

/// `serve`'s flags: settings of the configuration file's schema, laid over `--config` (or
/// over nothing) and checked by the one path a file takes; `--set` reaches every other one.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A config file the flags are laid over.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Named network namespace (/run/netns/NS) holding the interface (service.netns);
    /// without it, the current one.
    #[arg(long, value_name = "NS")]
    pub netns: Option<String>,
    /// Interface to attach to (service.interface).
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,
    /// Destination address to answer for (repeatable; service.addresses): clock aliases and
    /// service addresses.
    #[arg(long = "address", value_name = "IP")]
    pub addresses: Vec<String>,
    /// Upstream NTP server (repeatable; [[upstream]] address): discipline the daemon's own
    /// clock against these instead of serving the host clock.
    #[arg(long = "upstream", value_name = "HOST[:PORT]")]
    pub upstreams: Vec<String>,
    /// auto, native, generic or off (service.xdp_mode).
    #[arg(long, value_name = "MODE")]
    pub xdp_mode: Option<String>,
    /// Namespace of the veth peer, for native mode (service.peer_netns); without it, searched
    /// among the initial and the named ones.
    #[arg(long, value_name = "NS")]
    pub peer_netns: Option<String>,
    /// Any setting of the config file, by its dotted key, with a TOML value (repeatable):
    /// `--set clock.local_stratum=3`, `--set limits.enable=false`,
    /// `--set 'access.deny=["169.254.7.0/24"]'`. A value that is not TOML is a string
    /// (`--set clock.max_holdover=2h`). Without `--config`, `serve` has no metrics endpoint
    /// unless `--set metrics.enable=true`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// What `serve` names as the origin of its settings in errors.
const COMMAND_LINE: &str = "(command line)";

/// Sections only `ntp-xdp run` acts on: what it builds and runs beside the responder (the VIP
/// host, its helpers, NTS, the fleet agent). `serve` attaches to an interface that exists.
const RUN_ONLY_SECTIONS: [&str; 5] = ["vip", "redundancy", "dhcp", "nts", "fleet"];

impl ServeArgs {
    /// The settings `serve` runs: the `--config` file, or without one a base with no metrics
    /// endpoint (a one-off claims no fixed port), then the flags, then each `--set`,
    /// validated as one configuration.
    pub fn settings(&self) -> anyhow::Result<Validated> {
        let (mut table, origin) = match &self.config {
            Some(path) => (
                read_table(path)?,
                PathBuf::from(format!("{} {COMMAND_LINE}", path.display())),
            ),
            None => (
                "[metrics]\nenable = false\n".parse()?,
                PathBuf::from(COMMAND_LINE),
            ),
        };
        crate::config::merge_toml(&mut table, &self.flags_table());
        for setting in &self.set {
            set_dotted(&mut table, setting)
                .map_err(|why| ConfigError::file(&origin, format!("--set {setting}: {why}")))?;
        }
        if let Some(section) = RUN_ONLY_SECTIONS.iter().find(|s| table.contains_key(**s)) {
            return Err(ConfigError::field(
                &origin,
                section,
                format!(
                    "`serve` attaches to an interface that exists and runs nothing beside it; \
                     [{section}] is for `ntp-xdp run --config FILE`"
                ),
            )
            .into());
        }
        crate::config::parse_table(&table, &origin)
    }

    /// The named flags as the schema's TOML.
    fn flags_table(&self) -> toml::Table {
        use toml::Value;
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut service = toml::Table::new();
        for (key, value) in [
            ("netns", &self.netns),
            ("interface", &self.interface),
            ("xdp_mode", &self.xdp_mode),
            ("peer_netns", &self.peer_netns),
        ] {
            if let Some(v) = value {
                service.insert(key.into(), Value::String(v.clone()));
            }
        }
        if !self.addresses.is_empty() {
            service.insert("addresses".into(), strings(&self.addresses));
        }
        let mut table = toml::Table::new();
        if !service.is_empty() {
            table.insert("service".into(), Value::Table(service));
        }
        if !self.upstreams.is_empty() {
            let upstreams = self.upstreams.iter().map(|u| {
                Value::Table(toml::Table::from_iter([(
                    "address".to_string(),
                    Value::String(u.clone()),
                )]))
            });
            table.insert("upstream".into(), Value::Array(upstreams.collect()));
        }
        table
    }
}

/// A config file as a TOML table; an error names the file.
fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::file(path, format!("cannot read: {e}")))?;
    text.parse()
        .map_err(|e: toml::de::Error| ConfigError::file(path, e.to_string().trim_end()))
}

/// Applies `KEY=VALUE` (a dotted key, a TOML value or else a string) to `table`.
fn set_dotted(table: &mut toml::Table, setting: &str) -> Result<(), String> {
    let (key, value) = setting
        .split_once('=')
        .ok_or("not KEY=VALUE (a dotted key such as clock.local_stratum)")?;
    let value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) if t.len() == 1 => t.remove("v").expect("parsed"),
        Ok(_) => return Err(format!("{value:?} is more than one value")),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("{key:?} is not a dotted key"));
    }
    let (last, path) = parts.split_last().expect("split yields one part");
    let mut here = table;
    for (i, part) in path.iter().enumerate() {
        let next = here
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        here = next
            .as_table_mut()
            .ok_or_else(|| format!("{} is not a table", parts[..=i].join(".")))?;
    }
    here.insert(last.to_string(), value);
    Ok(())
}

/// `guest-config`: for platforms that run their own DHCP, the subnet host route to the
/// clock addresses and snippets for guests' NTP clients.
pub fn guest_config(v: &crate::config::Validated) -> String {
    use std::net::IpAddr;
    let service = |v4: bool| {
        v.vip.as_ref().and_then(|vip| {
            vip.service_addresses
                .iter()
                .map(|n| n.addr())
                .find(|a| a.is_ipv4() == v4)
        })
    };
    let v4 = service(true).and_then(|a| match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    let v6 = service(false).and_then(|a| match a {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    });
    crate::vip::dhcp::guest_config(v4, v6, &v.service.addresses, v.nts.as_ref().map(|n| n.port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClockSource;
    use clap::CommandFactory as _;

    const BASE: [&str; 6] = [
        "ntp-xdp",
        "serve",
        "--interface",
        "veth0",
        "--address",
        "169.254.169.123",
    ];

    fn serve(extra: &[&str]) -> anyhow::Result<Validated> {
        let args: Vec<&str> = BASE.iter().chain(extra).copied().collect();
        match Cli::try_parse_from(&args)?.command {
            Command::Serve(a) => a.settings(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn serve_flags_and_sets_lower_into_the_schema() {
        let v = serve(&[]).unwrap();
        assert!(v.observe.metrics_listen.is_none(), "serve claims no port");
        match v.clock_source() {
            ClockSource::HostClock { identity, .. } => {
                assert_eq!((identity.stratum, identity.refid), (10, *b"LOCL"))
            }
            other => panic!("{other:?}"),
        }
        let v = serve(&[
            "--set",
            "clock.local_stratum=3",
            "--set",
            "clock.refid=GPS",
            "--set",
            "limits.enable=false",
            "--set",
            "access.deny=[\"169.254.7.0/24\"]",
            "--set",
            "metrics.enable=true",
        ])
        .unwrap();
        match v.clock_source() {
            ClockSource::HostClock { identity, .. } => {
                assert_eq!((identity.stratum, identity.refid), (3, *b"GPS\0"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!v
            .admission
            .policy
            .has(ntp_common::policy::POLICY_RATE_LIMIT));
        assert_eq!(v.admission.acl.len(), 1);
        assert!(v.observe.metrics_listen.is_some());
        let v = serve(&[
            "--upstream",
            "169.254.1.1",
            "--upstream",
            "169.254.1.2:1123",
            "--set",
            "clock.min_sources=2",
            "--set",
            "clock.max_holdover=2h",
        ])
        .unwrap();
        match v.clock_source() {
            ClockSource::Upstreams { system, upstreams } => {
                assert_eq!(upstreams, ["169.254.1.1", "169.254.1.2:1123"]);
                assert_eq!(system.min_sources, 2);
                assert_eq!(system.max_holdover_ns, 7200 * 1_000_000_000);
            }
            other => panic!("{other:?}"),
        }
    }

    /// The flags are laid over `--config`'s file: what they name wins, the rest is the file's.
    #[test]
    fn serve_lays_its_flags_over_a_config_file() {
        let file = std::env::temp_dir().join(format!("serve-base-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[service]\ninterface = \"eth9\"\naddresses = [\"169.254.1.9\"]\n\
             [clock]\nlocal_stratum = 7\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let v = serve(&["--config", path, "--set", "service.precision=-20"]).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(v.service.interface.as_str(), "veth0");
        assert_eq!(
            v.service.addresses,
            ["169.254.169.123".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!((v.local_stratum, v.service.precision), (7, -20));
        // A file is read as `run` reads it: the schema's default metrics endpoint stays.
        assert!(v.observe.metrics_listen.is_some(), "{:?}", v.observe);
        assert!(serve(&[]).unwrap().observe.metrics_listen.is_none());
        let e = format!("{:#}", serve(&["--config", path]).unwrap_err());
        assert!(e.contains(path) && e.contains("cannot read"), "{e}");
    }

    /// A bad value is the schema's error, naming the field.
    #[test]
    fn serve_rejects_bad_values_naming_the_field() {
        for (bad, field) in [
            (vec!["--set", "clock.stratum=16"], "clock.stratum"),
            (
                vec!["--set", "clock.local_stratum=0"],
                "clock.local_stratum",
            ),
            (vec!["--set", "service.precision=3"], "service.precision"),
            (vec!["--set", "clock.refid=TOOLONG"], "clock.refid"),
            (vec!["--set", "limits.rate=0"], "limits.rate"),
            (vec!["--set", "limits.rate=fast"], "limits.rate"),
            (vec!["--set", "clock.no_such_key=1"], "no_such_key"),
            (vec!["--xdp-mode", "turbo"], "service.xdp_mode"),
            (vec!["--address", "not-an-ip"], "service.addresses"),
            (
                vec!["--set", "clock.local_stratum"],
                "--set clock.local_stratum",
            ),
            (
                vec!["--set", "service.interface.x=1"],
                "service.interface is not a table",
            ),
            (
                vec!["--set", "limits.rate=5\nlimits.burst=1"],
                "more than one value",
            ),
            (vec!["--set", "vip.bridge=\"br0\""], "field `vip`"),
            (vec!["--set", "fleet.cluster=\"c\""], "field `fleet`"),
            (vec!["--set", "nts.port=4460"], "field `nts`"),
            (vec!["--set", "dhcp.enable=false"], "field `dhcp`"),
            (
                vec!["--set", "redundancy.priority=100"],
                "field `redundancy`",
            ),
        ] {
            let e = format!("{:#}", serve(&bad).expect_err(&format!("{bad:?} accepted")));
            assert!(
                e.contains("(command line)") && e.contains(field),
                "{bad:?}: {e}"
            );
        }
    }

    /// The schema's keys: the names `deny_unknown_fields` lists for an unknown one.
    fn schema_keys() -> std::collections::BTreeSet<String> {
        let listed = |text: &str| -> Vec<String> {
            let e = toml::from_str::<crate::config::Config>(text)
                .expect_err("an unknown key")
                .to_string();
            let list = e.split("expected").nth(1).unwrap_or_else(|| panic!("{e}"));
            list.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let sections = listed("no_such_key = 1\n");
        let mut keys: std::collections::BTreeSet<String> = sections.iter().cloned().collect();
        for section in &sections {
            let text = match section.as_str() {
                "upstream" => "[[upstream]]\nno_such_key = 1\n".to_string(),
                s => format!("[{s}]\nno_such_key = 1\n"),
            };
            keys.extend(listed(&text));
        }
        assert!(
            keys.contains("local_stratum") && keys.contains("rate"),
            "{keys:?}"
        );
        keys
    }

    /// Every default is written once: `serve` has none (the schema's apply), and another
    /// command's defaults are its own flags', never a setting of the schema.
    #[test]
    fn help_shows_no_default_the_schema_owns() {
        let keys = schema_keys();
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!help.contains("[default:"), "{help}");
        fn walk(cmd: &clap::Command, keys: &std::collections::BTreeSet<String>, path: &str) {
            let path = format!("{path} {}", cmd.get_name());
            for arg in cmd.get_arguments() {
                let name = arg.get_id().as_str().replace('-', "_");
                let defaulted = !arg.get_default_values().is_empty();
                assert!(
                    !(defaulted && (keys.contains(&name) || path.ends_with(" serve"))),
                    "{path} --{name} has a default the schema owns"
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub, keys, &path);
            }
        }
        walk(&cli, &keys, "");
    }
}

/// `ntp-xdp status`: the report of the daemon behind a control socket (`socket`, or the one
/// the config names).
pub fn status(config: Option<&Path>, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => {
            let v = crate::config::load_or_default(config)?;
            v.observe.control_socket.ok_or_else(|| {
                anyhow::anyhow!(
                    "config {}: no control socket (set control.socket, or give --socket)",
                    v.source.display()
                )
            })?
        }
    };
    let report = crate::observe::status::query(&socket)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::observe::status::render(&report));
    }
    Ok(())
}

impl FleetCommand {
    /// `ntp-xdp fleet ...`, with the store the `[fleet]` of `config` names.
    pub fn run(self, config: &Path, host_timeout: Duration) -> anyhow::Result<()> {
        let spec = crate::config::load(config)?
            .fleet
            .ok_or_else(|| anyhow::anyhow!("config {}: no [fleet] section", config.display()))?;
        let read = |file: &Path| {
            std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut f = crate::fleet::ops::Fleet::connect(&spec).await?;
            f.host_timeout = host_timeout;
            let mut out = |line: &str| println!("{line}");
            match self {
                FleetCommand::Push {
                    file,
                    rolling,
                    canary,
                } => {
                    let origin = file.display().to_string();
                    let rev = f
                        .push(&read(&file)?, &origin, rolling, canary.as_deref(), &mut out)
                        .await?;
                    println!("done: revision {rev}");
                }
                FleetCommand::Override { host, file } => {
                    let origin = file.display().to_string();
                    let rev = f.set_override(&host, &read(&file)?, &origin).await?;
                    println!("{host}: override written at revision {rev}");
                }
                FleetCommand::Restart { .. } => {
                    f.rolling_restart(&mut out).await?;
                    println!("done: every live host restarted");
                }
                FleetCommand::Status {
                    json,
                    max_offset_spread,
                } => {
                    let r = f.report(max_offset_spread.as_secs_f64()).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        print!("{}", crate::fleet::ops::render(&r));
                    }
                }
            }
            anyhow::Ok(())
        })
    }
}

/// `ntp-xdp stats`: the counters of every loaded responder.
pub fn print_stats(json: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let all = crate::responder::loaded_responder_stats()?;
    let mut out = std::io::stdout().lock();
    let written = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)
    } else {
        all.iter().try_for_each(|stats| {
            writeln!(out, "responder (BPF program id {})", stats.program_id)?;
            for (name, value) in &stats.counters {
                writeln!(out, "  {name:<28} {value:>14}")?;
            }
            Ok(())
        })
    };
    match written {
        // `ntp-xdp stats | head` closing the pipe is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
