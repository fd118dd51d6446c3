use std::process::ExitCode;

use clap::Parser as _;
use ntp_user::cli::{Cli, Command};
use ntp_user::daemon::{run as serve, ClockSource};
use ntp_user::responder::stats::print_stats;

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
        Command::Serve(a) => a.into_options().and_then(serve),
        Command::Run { config } => load_config(config.as_deref()).and_then(|v| {
            if let ClockSource::HostClock { identity, .. } = &v.serve_options().clock {
                tracing::info!(
                    config = %v.source.display(),
                    "no upstream configured: serving the host clock as local stratum {}",
                    identity.stratum
                );
            }
            serve(v.serve_options())
        }),
        Command::CheckConfig { config } => ntp_user::config::load(&config).map(|v| {
            println!("{}: valid", v.source.display());
            println!("{:#?}", v.serve_options());
        }),
        Command::Stats { json } => print_stats(json),
        Command::Status {
            config,
            socket,
            json,
        } => status(config.as_deref(), socket, json),
        Command::Health { socket } => ntp_user::observe::status::query_health(&socket),
        Command::Down { config } => load_config(config.as_deref()).and_then(|v| {
            let vip = v.vip.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "config {}: no [vip] section, so the daemon created nothing to remove",
                    v.source.display()
                )
            })?;
            for line in ntp_user::daemon::down(vip)? {
                println!("{line}");
            }
            Ok(())
        }),
        Command::GuestConfig { config } => load_config(config.as_deref()).map(|v| {
            let svc = |v4: bool| {
                v.vip.as_ref().and_then(|vip| {
                    vip.service_addresses
                        .iter()
                        .map(|n| n.addr())
                        .find(|a| a.is_ipv4() == v4)
                })
            };
            let v4 = svc(true).and_then(|a| match a {
                std::net::IpAddr::V4(a) => Some(a),
                _ => None,
            });
            let v6 = svc(false).and_then(|a| match a {
                std::net::IpAddr::V6(a) => Some(a),
                _ => None,
            });
            print!(
                "{}",
                ntp_user::host::dhcp::guest_config(
                    v4,
                    v6,
                    &v.service.addresses,
                    v.nts.as_ref().map(|n| n.port)
                )
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ntp-user status`: the report of the daemon behind a control socket.
fn status(
    config: Option<&std::path::Path>,
    socket: Option<std::path::PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => {
            let v = load_config(config)?;
            v.observe.control_socket.ok_or_else(|| {
                anyhow::anyhow!(
                    "config {}: no control socket (set control.socket, or give --socket)",
                    v.source.display()
                )
            })?
        }
    };
    let report = ntp_user::observe::status::query(&socket)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", ntp_user::observe::status::render(&report));
    }
    Ok(())
}

/// A config file, or the embedded default without one.
fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<ntp_user::config::Validated> {
    match path {
        Some(path) => ntp_user::config::load(path),
        None => ntp_user::config::parse(
            ntp_user::config::EMBEDDED_DEFAULT,
            std::path::Path::new("(embedded default)"),
        ),
    }
}
