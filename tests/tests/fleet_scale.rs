//! The fleet's own logic at scale: 50 simulated hosts in VRRP groups of three, each the real
//! agent (lease, heartbeat, watches, restart slot, first-synchronization gate) with a local
//! side that applies at once, against a real three-member etcd with TLS, and 100 more hosts
//! the store knows that never run; the pushes are the operator's real `fleet push`.
//! Behaviour only: the figures are `cargo xtask bench --fleet-scale`'s.

use std::time::Duration;

use integration_tests::fleet_scale::{simulate, ScaleRun};

#[test]
fn fifty_simulated_hosts_apply_every_push_and_a_canary_rollout_goes_in_order() {
    let hosts = 50;
    let f = simulate(&ScaleRun {
        hosts,
        lease_ttl: Duration::from_secs(10),
        steady: Duration::from_secs(5),
        host_timeout: Duration::from_secs(120),
        // With them, a push writes for more hosts than etcd takes in one transaction.
        absent: 100,
    })
    .unwrap();
    eprintln!("{f}");
    // In place: every host applied it and reported it, nothing restarted.
    let live = &f.live_push;
    assert_eq!(live.hosts_applied, hosts, "{f}");
    assert!(
        live.last_config_applied.is_some() && live.last_status.is_some(),
        "{f}"
    );
    assert_eq!(live.restarts, 0, "{f}");
    // A restart for each host, one at a time through the restart slot, every one applied.
    let all = &f.restart_push;
    assert_eq!(all.hosts_applied, hosts, "{f}");
    assert!(
        all.last_config_applied.is_some() && all.last_status.is_some(),
        "{f}"
    );
    assert_eq!(all.restarts, hosts, "{f}");
    // One host of a VRRP group restarts at a time, and groups do not wait for each other.
    assert!(f.slots_held_by_strangers.is_empty(), "{f}");
    assert!(f.most_slots_held >= 2, "{f}");
    // Rolling with a canary: the canary first, then every other host once, in name order.
    let rolling = &f.rolling_push;
    assert_eq!(rolling.hosts_applied, hosts, "{f}");
    assert_eq!(rolling.restarts, hosts, "{f}");
    let mut expected: Vec<String> = (0..hosts)
        .map(|i| format!("h{i:03}"))
        .filter(|h| *h != f.canary)
        .collect();
    expected.insert(0, f.canary.clone());
    assert_eq!(rolling.order, expected, "{f}");
    // The quiet fleet: a heartbeat key, a config state and a desired revision per host, one
    // lease each, and writes going on (the heartbeats).
    assert!(f.steady.keys >= 3 * hosts as i64, "{f}");
    assert!(f.steady.leases >= hosts, "{f}");
    assert!(f.steady.revisions_per_s > 0.0, "{f}");
}
