use std::process::ExitCode;

use clap::Parser as _;
use ntp_user::cli::{Cli, Command};
use ntp_user::{config, daemon};

/// netlink-packet-route warns about every attribute newer than itself; that is noise here.
const DEFAULT_LOG_FILTER: &str = "info,netlink_packet_route=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    ntp_user::observe::journal::init(DEFAULT_LOG_FILTER);
    let result = match cli.command {
        Command::Serve(a) => a
            .settings()
            .and_then(|s| daemon::run(&s, daemon::Beside::default()))
            .map(drop),
        Command::Run { config } => daemon::run_from_config(config.as_deref()),
        Command::Fleet {
            config,
            host_timeout,
            command,
        } => command.run(&config, host_timeout),
        Command::CheckConfig { config } => config::load(&config).map(|v| {
            println!("{}: valid", v.source.display());
            println!("{v:#?}");
        }),
        Command::Stats { json } => ntp_user::cli::print_stats(json),
        Command::Status {
            config,
            socket,
            json,
        } => ntp_user::cli::status(config.as_deref(), socket, json),
        Command::Health { socket } => ntp_user::observe::status::query_health(&socket),
        Command::Down { config } => config::load_or_default(config.as_deref())
            .and_then(|v| daemon::down(&v))
            .map(|lines| lines.iter().for_each(|l| println!("{l}"))),
        Command::OnStop { config, unit } => config::load_or_default(config.as_deref())
            .and_then(|v| daemon::on_stop(&v, &unit))
            .map(|line| println!("{line}")),
        Command::GuestConfig { config } => config::load_or_default(config.as_deref())
            .map(|v| print!("{}", ntp_user::cli::guest_config(&v))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
