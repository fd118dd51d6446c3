//! `cargo xtask bench --fleet-scale [--hosts N]`: N simulated fleet hosts (the real agent
//! beside a local side that applies at once and reports a synchronized clock) against a real
//! three-member etcd with TLS in namespaces; pushes in place, by restart, and rolling with a
//! canary; then the quiet fleet's store traffic. Prints the figures.

use std::time::Duration;

use integration_tests::fleet_scale::{simulate, ScaleRun};

fn main() -> anyhow::Result<()> {
    let mut run = ScaleRun {
        hosts: 300,
        lease_ttl: Duration::from_secs(10),
        steady: Duration::from_secs(60),
        host_timeout: Duration::from_secs(120),
        absent: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--hosts" => run.hosts = args.next().unwrap_or_default().parse()?,
            "--steady-s" => {
                run.steady = Duration::from_secs(args.next().unwrap_or_default().parse()?)
            }
            other => anyhow::bail!("unknown argument {other:?} (--hosts N, --steady-s S)"),
        }
    }
    if run.hosts < 2 {
        anyhow::bail!("--hosts: at least 2 (a canary and another)");
    }
    eprintln!(
        "starting 3 etcd members and {} simulated hosts ...",
        run.hosts
    );
    print!("{}", simulate(&run)?);
    Ok(())
}
