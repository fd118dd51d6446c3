use std::process::ExitCode;

use clap::Parser as _;
use ntp_user::cli::print_stats;
use ntp_user::cli::{Cli, Command};
use ntp_user::config::ClockSource;
use ntp_user::daemon::{run as serve, Beside, Stopped};

/// netlink-packet-route warns about every attribute newer than itself; that is noise here.
const DEFAULT_LOG_FILTER: &str = "info,netlink_packet_route=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    ntp_user::observe::journal::init(DEFAULT_LOG_FILTER);
    let result = match cli.command {
        Command::Serve(a) => a
            .settings()
            .and_then(|s| serve(&s, Beside::default()))
            .map(|_| ()),
        Command::Run { config } => run_daemon(config.as_deref()),
        Command::Fleet {
            config,
            host_timeout,
            command,
        } => fleet(&config, host_timeout, command),
        Command::CheckConfig { config } => ntp_user::config::load(&config).map(|v| {
            println!("{}: valid", v.source.display());
            println!("{v:#?}");
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
        Command::OnStop { config, unit } => load_config(config.as_deref()).and_then(|v| {
            let vip = v.vip.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "config {}: no [vip] section, so no pinned responder outlives the daemon",
                    v.source.display()
                )
            })?;
            use ntp_user::daemon::managed::{on_systemd_stop, StopKind};
            match on_systemd_stop(&vip.netns, &unit)? {
                StopKind::Restart => println!(
                    "{unit}: restarting; the pinned responder answers until the next daemon adopts it"
                ),
                StopKind::Stop => {
                    println!("{unit}: stopping; the daemon withdraws (no address served)")
                }
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
                ntp_user::vip::dhcp::guest_config(
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

/// `ntp-xdp status`: the report of the daemon behind a control socket.
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

/// `ntp-xdp run`: the daemon from its config; in a fleet, from the configuration last pushed
/// to it (falling back to the one before when that fails to start), with the fleet agent.
fn run_daemon(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    use ntp_user::fleet::local::LocalFiles;
    let local = load_config(path)?;
    let Some(fleet) = local.fleet.clone() else {
        log_clock_source(&local);
        return serve(&local, Beside::default()).map(|_| ());
    };
    let local_text = match path {
        Some(p) => std::fs::read_to_string(p)?,
        None => ntp_user::config::EMBEDDED_DEFAULT.to_string(),
    };
    let local_fleet = local_text
        .parse::<toml::Table>()?
        .remove("fleet")
        .ok_or_else(|| anyhow::anyhow!("no [fleet] table"))?;
    let files = LocalFiles::new(&fleet.state_dir);
    let applied = files.applied_config();
    let start = || -> anyhow::Result<ntp_user::config::Validated> {
        if !applied.exists() {
            return Ok(local.clone());
        }
        // The pushed configuration with this host's own [fleet] (the local file's wins).
        let mut t: toml::Table = std::fs::read_to_string(&applied)?.parse()?;
        t.insert("fleet".into(), local_fleet.clone());
        ntp_user::config::parse(&toml::to_string(&t)?, &applied)
    };
    let result = start().and_then(|v| {
        log_clock_source(&v);
        let running = match applied.exists() {
            true => std::fs::read_to_string(&applied)?,
            false => local_text.clone(),
        };
        let mut agent = ntp_user::fleet::agent::Agent {
            spec: fleet.clone(),
            local_fleet: local_fleet.clone(),
            check: ntp_user::fleet::agent::Check::OnThisHost,
            cell: Default::default(),
            nts_keys: v.nts.as_ref().map(|n| {
                ntp_user::fleet::agent::NtsKeySync::new(n.key_file.clone(), n.key_rotation)
            }),
            running: std::sync::Mutex::new(running),
            live: None,
            problems: Default::default(),
            started_unix: ntp_user::host::hostclock::unix_now_s(),
        };
        let cell = agent.cell.clone();
        let companion = Some(ntp_user::daemon::Companion::new(
            cell,
            Box::new(move |obs, restart, live_admission| {
                agent.live = Some(std::sync::Arc::new(move |text: &str| {
                    let v = ntp_user::config::parse(text, std::path::Path::new("(fleet)"))
                        .map_err(|e| format!("{e:#}"))?;
                    live_admission(&v.admission).map_err(|e| format!("{e:#}"))
                }));
                Box::pin(agent.run(obs, restart))
            }),
        ));
        let beside = Beside {
            companion,
            ..Default::default()
        };
        serve(&v, beside).map(|stopped| stopped == Stopped::Restart)
    });
    match result {
        Ok(true) => Err(restart_self()),
        Ok(false) => Ok(()),
        Err(e) => {
            let why = format!("{e:#}");
            if files.roll_back(&why)? {
                tracing::error!(error = %why, "the pushed configuration failed to start: back to the previous one");
                return Err(restart_self());
            }
            Err(e)
        }
    }
}

/// Replaces this process with a new run of the same command (hitless: the pinned responder
/// answers meanwhile). Returns only if that fails.
fn restart_self() -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "ntp-xdp".into());
    tracing::info!("starting again");
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    anyhow::anyhow!("restarting: {e}")
}

fn log_clock_source(v: &ntp_user::config::Validated) {
    if let ClockSource::HostClock { identity, .. } = &v.clock_source() {
        tracing::info!(
            config = %v.source.display(),
            "no upstream configured: serving the host clock as local stratum {}",
            identity.stratum
        );
    }
}

/// `ntp-xdp fleet ...`.
fn fleet(
    config: &std::path::Path,
    host_timeout: std::time::Duration,
    command: ntp_user::cli::FleetCommand,
) -> anyhow::Result<()> {
    use ntp_user::cli::FleetCommand;
    let v = ntp_user::config::load(config)?;
    let spec = v
        .fleet
        .ok_or_else(|| anyhow::anyhow!("config {}: no [fleet] section", config.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut f = ntp_user::fleet::ops::Fleet::connect(&spec).await?;
        f.host_timeout = host_timeout;
        let mut out = |line: &str| println!("{line}");
        match command {
            FleetCommand::Push {
                file,
                rolling,
                canary,
            } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let origin = file.display().to_string();
                let rev = f
                    .push(&text, &origin, rolling, canary.as_deref(), &mut out)
                    .await?;
                println!("done: revision {rev}");
            }
            FleetCommand::Override { host, file } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let origin = file.display().to_string();
                let rev = f.set_override(&host, &text, &origin).await?;
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
                    print!("{}", ntp_user::fleet::ops::render(&r));
                }
            }
        }
        anyhow::Ok(())
    })
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
