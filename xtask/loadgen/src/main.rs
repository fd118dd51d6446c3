//! `ntp-loadgen run` drives NTP load from a guest namespace; `ntp-loadgen micro` times the
//! responder's paths through BPF_PROG_TEST_RUN. Both print JSON for `cargo xtask bench`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ntp-loadgen",
    about = "ntp-xdp's load generator and micro benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send NTP requests from a namespace (bounded in time and count); prints JSON.
    Run {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Open loop at this many requests/s; without it, closed loop with --window.
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 50_000_000)]
        max_requests: u64,
    },
    /// Attach (and pin in --pin-dir) or detach a counting program: `replies` on the guest's
    /// veth counts and drops replies to `flood`; `requests` in place of a server counts and
    /// drops requests (the generator's ceiling).
    Sink {
        #[arg(long)]
        pin_dir: std::path::PathBuf,
        #[arg(long)]
        detach: bool,
        #[arg(long, required_unless_present = "detach")]
        netns: Option<String>,
        #[arg(long, required_unless_present = "detach")]
        interface: Option<String>,
        #[arg(long, value_enum, default_value = "replies")]
        kind: ntp_loadgen::flood::SinkKind,
        /// Generic (skb) XDP instead of native.
        #[arg(long)]
        generic: bool,
    },
    /// Send prebuilt request frames on a packet socket at a paced rate; the outcome is read
    /// from the counters a `sink` pinned in --counts. Prints JSON.
    Flood(ntp_loadgen::flood::FloodSpec),
    /// The responder's per-packet cost through BPF_PROG_TEST_RUN; prints JSON.
    Micro {
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run {
            target,
            netns,
            threads,
            rate,
            window,
            duration,
            max_requests,
        } => ntp_loadgen::run(&ntp_loadgen::LoadSpec {
            target,
            netns,
            threads,
            rate,
            window,
            // Bounded whatever is asked.
            duration: duration.min(Duration::from_secs(120)),
            max_requests,
        })
        .map(|r| println!("{}", serde_json::to_string(&r).expect("serializable"))),
        Command::Sink {
            pin_dir,
            detach: true,
            ..
        } => ntp_loadgen::flood::sink_detach(&pin_dir),
        Command::Sink {
            pin_dir,
            netns,
            interface,
            kind,
            generic,
            ..
        } => ntp_loadgen::flood::sink_attach(
            netns.as_deref().unwrap_or_default(),
            interface.as_deref().unwrap_or_default(),
            kind,
            generic,
            &pin_dir,
        ),
        Command::Flood(spec) => ntp_loadgen::flood::flood(&spec)
            .map(|r| println!("{}", serde_json::to_string(&r).expect("serializable"))),
        Command::Micro { repeat } => ntp_loadgen::micro(repeat).map(|cases| {
            let v: Vec<serde_json::Value> = cases
                .into_iter()
                .map(|(case, verdict, ns)| {
                    serde_json::json!({"case": case, "verdict": verdict, "ns_per_packet": ns})
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
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
