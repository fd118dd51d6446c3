//! Command-line interface.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use ntp_common::ServerParams;

use crate::clock::system::SystemConfig;
use crate::config::parse_refid;
use crate::daemon::{ClockSource, ServeOptions};
use crate::host::hostclock::HostClockIdentity;
use crate::responder::XdpModePref;

/// `--xdp-mode`: the CLI's spelling of [`XdpModePref`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native where it works (on a veth: when the peer can get a pass program), else generic.
    Auto,
    /// Driver mode; on a veth the peer gets a pass program so XDP_TX frames are delivered.
    Native,
    /// Generic (SKB) mode: works on every device, slower.
    Generic,
    /// No XDP: the daemon's userspace path answers everything.
    Off,
}

impl From<XdpModeArg> for XdpModePref {
    fn from(a: XdpModeArg) -> XdpModePref {
        match a {
            XdpModeArg::Auto => XdpModePref::Auto,
            XdpModeArg::Native => XdpModePref::Native,
            XdpModeArg::Generic => XdpModePref::Generic,
            XdpModeArg::Off => XdpModePref::Off,
        }
    }
}

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

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Named network namespace (/run/netns/NS) holding the interface; default: the current one.
    #[arg(long)]
    pub netns: Option<String>,
    /// Interface to attach to.
    #[arg(long)]
    pub interface: String,
    /// Destination address to answer for (repeatable): clock aliases and service addresses.
    #[arg(long = "address", required = true)]
    pub addresses: Vec<IpAddr>,
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Namespace of the veth peer (native mode); default: searched among the initial and named ones.
    #[arg(long)]
    pub peer_netns: Option<String>,
    /// Stratum to announce (1-15).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=15))]
    pub stratum: u8,
    /// Reference ID: up to four ASCII characters (e.g. LOCL, GPS) or an IPv4 address.
    #[arg(long, default_value = "LOCL", value_parser = parse_refid)]
    pub refid: [u8; 4],
    /// How often the anchor is republished.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub publish_interval: Duration,
    /// After this long without a new anchor, replies say unsynchronized (LI=3).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub max_anchor_age: Duration,
    /// Clock precision as log2 seconds (bits below it are randomised in transmit timestamps).
    #[arg(long, default_value_t = -24, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i8).range(-32..=0))]
    pub precision: i8,
    /// Smallest poll exponent echoed back to clients.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i8).range(0..=17))]
    pub poll_min: i8,
    /// Largest poll exponent echoed back to clients.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i8).range(0..=17))]
    pub poll_max: i8,
    /// Log every packet the responder handles (aya-log; for debugging only).
    #[arg(long)]
    pub log_packets: bool,
    /// Upstream NTP server (repeatable): discipline the daemon's own clock against these
    /// instead of serving the host clock.
    #[arg(long = "upstream", value_name = "HOST[:PORT]")]
    pub upstreams: Vec<String>,
    /// Agreeing upstreams needed before the clock is steered.
    #[arg(long, default_value_t = 1)]
    pub min_sources: usize,
    /// With every upstream lost, serve on the last frequency this long, then say LI=3.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub max_holdover: Duration,
    /// Longest interval between polls of an upstream, log2 s (4..=17; default 10 = 1024 s).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i8).range(4..=17))]
    pub upstream_max_poll: i8,
    /// Sustained requests per second per source (IPv4 address, IPv6 /64).
    #[arg(long, default_value_t = 2.0)]
    pub rate_limit: f64,
    /// Requests a source may send at once.
    #[arg(long, default_value_t = 16)]
    pub burst: u32,
    /// Answer everyone without limit (benchmarks).
    #[arg(long)]
    pub no_rate_limit: bool,
    /// Answer only these prefixes (repeatable); the longest match among --allow/--deny wins.
    #[arg(long = "allow", value_name = "PREFIX")]
    pub allow: Vec<ipnet::IpNet>,
    /// Never answer these prefixes (repeatable).
    #[arg(long = "deny", value_name = "PREFIX")]
    pub deny: Vec<ipnet::IpNet>,
    /// What denied sources get: a DENY kiss-o'-death now and then, or nothing.
    #[arg(long, value_enum, default_value = "kod")]
    pub deny_action: crate::config::DenyAction,
    /// Answer requests tagged with this VLAN ID (repeatable); untagged ones always are.
    #[arg(long = "vlan", value_name = "ID")]
    pub vlans: Vec<i64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9273); off without it.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Control socket for `ntp-xdp status --socket`; off without it.
    #[arg(long)]
    pub control_socket: Option<crate::config::names::SafePath>,
    /// Guests whose clock is off by more than this are alarmed.
    #[arg(long, default_value = "100ms")]
    pub guest_alarm_offset: crate::config::HumanDuration,
}

/// Parses a duration such as `500ms`, `1s` or `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms or 2s: {e}"))
}

impl ServeArgs {
    /// `serve`'s flags as daemon options. The flags are another source of the same settings
    /// as a config file's sections, so they go through the same validators.
    pub fn into_options(self) -> anyhow::Result<ServeOptions> {
        let a = self;
        if a.poll_min > a.poll_max {
            anyhow::bail!(
                "--poll-min ({}) is above --poll-max ({})",
                a.poll_min,
                a.poll_max
            );
        }
        if !a.upstreams.is_empty() && (a.min_sources == 0 || a.min_sources > a.upstreams.len()) {
            anyhow::bail!(
                "--min-sources {} must be between 1 and the {} upstreams given",
                a.min_sources,
                a.upstreams.len()
            );
        }
        let max_age_ns = ntp_common::time::duration_ns(a.max_anchor_age);
        if !a.upstreams.is_empty() {
            crate::config::check_holdover(a.max_holdover, a.upstream_max_poll)
                .map_err(|why| anyhow::anyhow!("--max-holdover: {why}"))?;
        }
        let clock = if a.upstreams.is_empty() {
            ClockSource::HostClock {
                identity: HostClockIdentity {
                    follow_kernel_sync: false,
                    stratum: a.stratum,
                    refid: a.refid,
                    max_age_ns,
                },
                publish_interval: a.publish_interval,
            }
        } else {
            ClockSource::Upstreams {
                system: SystemConfig {
                    min_sources: a.min_sources,
                    max_anchor_age_ns: max_age_ns,
                    max_holdover_ns: ntp_common::time::duration_ns(a.max_holdover),
                    poll: crate::clock::upstream::PollConfig {
                        max_poll: a.upstream_max_poll,
                        ..Default::default()
                    },
                    ..SystemConfig::default()
                },
                upstreams: a.upstreams,
            }
        };
        let origin = std::path::Path::new("(command line)");
        let limits = crate::config::LimitsSection {
            enable: !a.no_rate_limit,
            rate: a.rate_limit,
            burst: a.burst,
            ..Default::default()
        };
        let access = crate::config::AccessSection {
            allow: a.allow,
            deny: a.deny,
            deny_action: a.deny_action,
            vlans: a.vlans,
        };
        let guests = crate::config::GuestClocksSection {
            alarm_offset: a.guest_alarm_offset,
            ..Default::default()
        };
        let admission = crate::config::validate_admission(&limits, &access, &guests, origin)?;
        let observe = crate::config::validate_observe(
            &guests,
            &crate::config::MetricsSection {
                enable: a.metrics_listen.is_some(),
                listen: a
                    .metrics_listen
                    .unwrap_or_else(|| crate::config::MetricsSection::default().listen),
                // An address given on the command line is asked for explicitly.
                allow_remote: true,
            },
            &crate::config::ControlSection {
                socket: a.control_socket,
            },
            &crate::config::AlarmsSection::default(),
            None,
            origin,
        )?;
        Ok(ServeOptions {
            admission,
            observe,
            netns: a.netns,
            interface: a.interface,
            addresses: a.addresses,
            xdp_mode: a.xdp_mode.into(),
            peer_netns: a.peer_netns,
            params: ServerParams {
                precision: a.precision,
                poll_min: a.poll_min,
                poll_max: a.poll_max,
                ..ServerParams::DEFAULT
            },
            log_packets: a.log_packets,
            clock,
            managed: None,
            // NTS needs a certificate and a key file: configured in `[nts]` (`ntp-xdp run`).
            nts: None,
            companion: None,
            restart: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refids() {
        assert_eq!(parse_refid("LOCL").unwrap(), *b"LOCL");
        assert_eq!(parse_refid("GPS").unwrap(), [b'G', b'P', b'S', 0]);
        assert_eq!(parse_refid("169.254.0.1").unwrap(), [169, 254, 0, 1]);
        assert!(parse_refid("").is_err());
        assert!(parse_refid("TOOLONG").is_err());
        assert!(parse_refid("a b").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert!(parse_duration("ten").unwrap_err().contains("ten"));
    }

    #[test]
    fn serve_rejects_bad_values() {
        let base = [
            "ntp-xdp",
            "serve",
            "--interface",
            "veth0",
            "--address",
            "169.254.169.123",
        ];
        assert!(Cli::try_parse_from(base).is_ok());
        for bad in [
            vec!["--stratum", "16"],
            vec!["--stratum", "0"],
            vec!["--precision", "3"],
            vec!["--xdp-mode", "turbo"],
            vec!["--address", "not-an-ip"],
        ] {
            let mut args: Vec<&str> = base.to_vec();
            args.extend(bad.iter());
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?} accepted");
        }
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
