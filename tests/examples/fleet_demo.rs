//! `cargo xtask demo --fleet`: the fleet walkthrough on one machine. Three etcd members (TLS,
//! client certificates) and three redundant VIP hosts in namespaces, a guest polling the
//! clock address 20 times a second; then what an operator does: overrides, a push, a rolling
//! push with a canary, a rolling restart, `fleet status`. It prints each command's output and
//! what the guest saw, and removes everything at the end (169.254.84.0/24 and .94.0/24).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use integration_tests::clients::poll;
use integration_tests::fleet::{cluster_config, lost, ready, switches, Fleet};

fn step(f: &Fleet, title: &str, args: &[&str]) -> anyhow::Result<()> {
    println!(
        "\n$ ntp-xdp fleet --config vip-a.toml {}    # {title}",
        args.join(" ")
    );
    print!("{}", f.fleet_ok(args)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("starting three etcd members and three VIP hosts (vip-a, vip-b, vip-c) ...");
    let f = Fleet::start()?;
    let guest = ready(&f, 30);
    println!("each host's override (its names, priority, stratum) is in the store");
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    step(&f, "the cluster as the store sees it", &["status"])?;
    let v1 = f.file(
        "cluster-v1.toml",
        &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -20),
    )?;
    step(&f, "every host applies it", &["push", &v1])?;
    let v2 = f.file(
        "cluster-v2.toml",
        &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -22),
    )?;
    step(
        &f,
        "host by host, vip-b first, the master last",
        &["push", &v2, "--rolling", "--canary", "vip-b"],
    )?;
    step(&f, "one host at a time", &["restart", "--rolling"])?;
    step(&f, "", &["status"])?;
    stop.store(true, Ordering::Relaxed);
    let seen = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the poller panicked"))?;
    println!(
        "\nthe guest sent {} requests: {} unanswered, the answering host changed {} time(s)",
        seen.sent,
        lost(&seen),
        switches(&seen)
    );
    println!("removing everything ...");
    Ok(())
}
