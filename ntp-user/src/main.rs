use std::process::ExitCode;

use clap::Parser as _;
use ntp_common::ServerParams;
use ntp_user::cli::{Cli, Command};
use ntp_user::hostclock::HostClockIdentity;
use ntp_user::serve::{serve, ServeOptions};
use ntp_user::stats::print_stats;

/// netlink-packet-route warns about every attribute newer than itself; that is noise here.
const DEFAULT_LOG_FILTER: &str = "info,netlink_packet_route=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(a) => {
            if a.poll_min > a.poll_max {
                eprintln!(
                    "error: --poll-min ({}) is above --poll-max ({})",
                    a.poll_min, a.poll_max
                );
                return ExitCode::from(2);
            }
            serve(ServeOptions {
                netns: a.netns,
                interface: a.interface,
                addresses: a.addresses,
                xdp_mode: a.xdp_mode,
                peer_netns: a.peer_netns,
                identity: HostClockIdentity {
                    stratum: a.stratum,
                    refid: a.refid,
                    max_age_ns: a.max_anchor_age.as_nanos().min(u64::MAX as u128) as u64,
                },
                params: ServerParams {
                    precision: a.precision,
                    poll_min: a.poll_min,
                    poll_max: a.poll_max,
                    ..ServerParams::DEFAULT
                },
                publish_interval: a.publish_interval,
                log_packets: a.log_packets,
            })
        }
        Command::Stats { json } => print_stats(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
