//! The fleet end to end: a three-member etcd cluster (TLS, client certificates) and three
//! redundant VIP hosts whose daemons are its agents, a guest polling the clock address 20
//! times a second throughout. Pushes (valid, invalid, failing on one host, rolling), a
//! rolling restart, the store failing member by member and all at once, a daemon killed, the
//! master cut off from the store, two operators pushing at once, a host whose clock is behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::clients::{longest_gap, poll, tally_answers};
use integration_tests::fleet::{
    all_applied, cluster_config, hosts, lost, master, nts_key_ids, ready, revision_of,
    same_nts_keys, started, switches, Fleet, FleetOptions,
};

#[test]
fn pushes_are_validated_applied_and_rolled_out_and_restarts_roll_with_one_switch() {
    let f = Fleet::start().unwrap();
    let guest = ready(&f, 30);
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());

    let mut marks: Vec<(&str, std::time::Instant)> = Vec::new();
    // 1. A valid push reaches all three; the precision guests see changes with it.
    marks.push(("push v1", std::time::Instant::now()));
    let v1 = f
        .file(
            "v1.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -20),
        )
        .unwrap();
    let out = f.fleet_ok(&["push", &v1]).unwrap();
    let r1 = revision_of(&out);
    assert!(
        Fleet::wait_until(Duration::from_secs(60), || all_applied(&f, r1)),
        "{:?}",
        hosts(&f)
    );

    marks.push(("v1 applied", std::time::Instant::now()));
    // 2. An invalid push is refused before anything is written.
    let bad = f
        .file(
            "bad.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -20)
                .replace("precision = -20", "precision = 5"),
        )
        .unwrap();
    let out = f.fleet_cmd(&["push", &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service.precision") && err.contains("bad.toml"),
        "{err}"
    );
    assert!(all_applied(&f, r1), "an invalid push changed something");

    // 3. A config that only fails on one host: vip-c's override names an interface it does
    // not have. The rolling push (canary vip-b) stops there; vip-c keeps serving with r1.
    let c = &f.hosts[2];
    let c_override = c
        .override_text
        .replace("[vip]\n", "[vip]\nhost_interfaces = [\"nosuch0\"]\n");
    let file = f.file("c-bad.toml", &c_override).unwrap();
    f.fleet_ok(&["override", "vip-c", &file]).unwrap();
    let v2 = f
        .file(
            "v2.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -22),
        )
        .unwrap();
    let master = master(&f);
    marks.push(("rolling v2", std::time::Instant::now()));
    let out = f.fleet_cmd(&["push", &v2, "--rolling", "--canary", "vip-b"]);
    marks.push(("rolling v2 stopped", std::time::Instant::now()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("vip-c") && text.contains("nosuch0"), "{text}");
    let status = f.fleet_status().unwrap();
    let by = |name: &str| {
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(by("vip-c")["config_state"]["state"], "failed");
    assert_eq!(by("vip-c")["status"]["config_revision"], r1);
    assert_eq!(by("vip-c")["status"]["synchronized"], true);
    assert!(
        status["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alarm"] == "config_failed"),
        "{status}"
    );
    let r2 = by("vip-b")["status"]["config_revision"].as_i64().unwrap();
    assert!(r2 > r1);
    // The master comes last: unless it is the canary or vip-c, the rollout stopped before it.
    if master != "vip-c" && master != "vip-b" {
        assert_eq!(by(&master)["status"]["config_revision"], r1, "{status}");
    }

    // vip-c's override repaired: a rolling push of v2 completes.
    let file = f.file("c-good.toml", &f.hosts[2].override_text).unwrap();
    f.fleet_ok(&["override", "vip-c", &file]).unwrap();
    let v3 = f
        .file(
            "v3.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -23),
        )
        .unwrap();
    marks.push(("rolling v3", std::time::Instant::now()));
    let r3 = revision_of(&f.fleet_ok(&["push", &v3, "--rolling"]).unwrap());
    marks.push(("v3 done", std::time::Instant::now()));
    assert!(all_applied(&f, r3), "{:?}", hosts(&f));

    // 4. An access-list change applies in place: no daemon restarts, and the denied guest
    // gets nothing from then on.
    let denied = f.add_guest(33).unwrap();
    let answered = |g: &integration_tests::topology::Netns| {
        integration_tests::clients::one_query(g, integration_tests::CLOCK_V4)
            .is_ok_and(|r| r.is_some())
    };
    assert!(Fleet::wait_until(Duration::from_secs(5), || answered(
        &denied
    )));
    let before_live = started(&f);
    let v4 = f
        .file(
            "v4.toml",
            &(cluster_config(&f.guest_bridge, &f.vrrp_bridge, -23)
                + "\n[access]\ndeny = [\"169.254.84.33/32\"]\ndeny_action = \"drop\"\n"),
        )
        .unwrap();
    marks.push(("push v4 (live)", std::time::Instant::now()));
    let r4 = revision_of(&f.fleet_ok(&["push", &v4]).unwrap());
    assert!(all_applied(&f, r4), "{:?}", hosts(&f));
    assert_eq!(
        started(&f),
        before_live,
        "an access-list change restarted a daemon"
    );
    assert!(!answered(&denied), "the denied guest is still answered");
    assert!(answered(&guest));

    // 5. A rolling restart: each daemon restarted once, at most one switch of host.
    let before: Vec<u64> = started(&f);
    std::thread::sleep(Duration::from_secs(1));
    let seen_before = {
        stop.store(true, Ordering::Relaxed);
        poller.join().unwrap()
    };
    eprintln!(
        "pushes: {} sent, {} lost, {} switches",
        seen_before.sent,
        lost(&seen_before),
        switches(&seen_before)
    );
    let t0 = marks[0].1;
    for (name, at) in &marks {
        eprintln!("mark {name} at {:?}", at.duration_since(t0));
    }
    for u in &seen_before.unanswered {
        eprintln!("unanswered at {:?}", u.duration_since(t0));
    }
    for w in seen_before.seen.windows(2) {
        if w[0].stratum != w[1].stratum {
            eprintln!(
                "switch {} -> {} at {:?}",
                w[0].stratum,
                w[1].stratum,
                w[1].at.duration_since(t0)
            );
        }
    }
    assert_eq!(lost(&seen_before), 0, "requests lost during pushes");
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    let out = f.fleet_ok(&["restart", "--rolling"]).unwrap();
    eprintln!("{out}");
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    let after = started(&f);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a, "a daemon was not restarted");
    }
    eprintln!(
        "rolling restart: {} sent, {} lost, {} switches",
        seen.sent,
        lost(&seen),
        switches(&seen)
    );
    assert_eq!(lost(&seen), 0, "requests lost during the rolling restart");
    assert!(switches(&seen) <= 1, "{} switches", switches(&seen));
    assert!(seen.seen.iter().all(|s| s.leap != 3));
}

#[test]
fn the_store_failing_never_stops_the_time_and_lost_hosts_are_shown() {
    let mut f = Fleet::start().unwrap();
    let guest = ready(&f, 31);

    // Without a client certificate the store says nothing.
    let out = f
        .etcd
        .etcdctl(&f.home, false, &["get", "--prefix", "/ntp-xdp/"]);
    assert!(
        !out.status.success(),
        "etcd answered a client without a certificate"
    );
    let out = f.etcd.etcdctl(
        &f.home,
        true,
        &["get", "--prefix", "--keys-only", "/ntp-xdp/"],
    );
    assert!(out.status.success());

    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    let t0 = std::time::Instant::now();
    let mut marks: Vec<(&str, std::time::Instant)> = Vec::new();
    // One member down: pushes and status still work.
    f.etcd.kill_member(0);
    marks.push(("member 0 killed, push v1", std::time::Instant::now()));
    let r1 = f.push_cluster("v1.toml", -21, &[]).unwrap();
    assert!(all_applied(&f, r1), "{:?}", hosts(&f));
    // The member back: it catches up with the others, and pushes go on.
    f.etcd.start_member(0).unwrap();
    f.etcd
        .wait_healthy(&f.home, Duration::from_secs(30))
        .unwrap();
    marks.push(("member 0 back, push v1b", std::time::Instant::now()));
    let r1 = f.push_cluster("v1b.toml", -22, &[]).unwrap();
    assert!(all_applied(&f, r1), "{:?}", hosts(&f));

    // All members down for a minute: every daemon serves on with its config, and says the
    // store is unreachable.
    marks.push(("v1b applied; all killed", std::time::Instant::now()));
    let down_at = std::time::Instant::now();
    for i in 0..3 {
        f.etcd.kill_member(i);
    }
    let alarmed = |f: &Fleet, i: usize| {
        f.status(i).is_ok_and(|s| {
            s["alarms"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["name"] == "fleet_store_unreachable"))
                && s["fleet"]["store_reachable"] == false
        })
    };
    assert!(Fleet::wait_until(Duration::from_secs(30), || (0..3).all(|i| alarmed(&f, i))));
    // The outage lasts a minute (the fault, not a wait for an event); all along, each host
    // runs the config it had and says the store is lost.
    while down_at.elapsed() < Duration::from_secs(60) {
        for i in 0..3 {
            let s = f.status(i).unwrap();
            assert_eq!(s["fleet"]["config_revision"], r1, "{}", s["fleet"]);
            assert!(alarmed(&f, i), "{}", s["fleet"]);
            assert_eq!(s["clock"]["synchronized"], true);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    marks.push(("alarms seen; restarting members", std::time::Instant::now()));
    // Back: the agents reconnect, the alarm clears, a push applies.
    for i in 0..3 {
        f.etcd.start_member(i).unwrap();
    }
    f.etcd
        .wait_healthy(&f.home, Duration::from_secs(30))
        .unwrap();
    assert!(Fleet::wait_until(Duration::from_secs(30), || (0..3).all(|i| !alarmed(&f, i))));
    let v2 = f
        .file(
            "v2.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -20),
        )
        .unwrap();
    marks.push(("push v2", std::time::Instant::now()));
    let r2 = revision_of(&f.fleet_ok(&["push", &v2]).unwrap());
    assert!(all_applied(&f, r2), "{:?}", hosts(&f));
    marks.push(("v2 applied", std::time::Instant::now()));
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    eprintln!(
        "{} sent, {} lost, {} switches",
        seen.sent,
        lost(&seen),
        switches(&seen)
    );
    for (name, at) in &marks {
        eprintln!("mark {name} at {:?}", at.duration_since(t0));
    }
    for u in &seen.unanswered {
        eprintln!("unanswered at {:?}", u.duration_since(t0));
    }
    assert_eq!(lost(&seen), 0, "requests lost while the store failed");

    // A daemon killed: shown as lost within its lease (4 s), with the alarm.
    f.kill_daemon(2).unwrap();
    assert!(Fleet::wait_until(Duration::from_secs(8), || {
        hosts(&f).iter().any(|h| h.0 == "vip-c" && h.1)
    }));
    let s = f.fleet_status().unwrap();
    assert!(
        s["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alarm"] == "host_lost"),
        "{s}"
    );
    let text = f.fleet_ok(&["status"]).unwrap();
    assert!(text.contains("LOST"), "{text}");
}

#[test]
fn nts_cookies_work_on_whichever_host_holds_the_addresses() {
    use integration_tests::nts::{key_exchange, nts_request, Tamper, TestPki};
    use ntp_user::nts::packet::client_open_reply;
    let pki = TestPki::new(&[integration_tests::CLOCK_V4]).unwrap();
    let mut f = Fleet::start_with(&format!(
        "\n[nts]\ncertificate_chain = \"{}\"\nprivate_key = \"{}\"\nkey_rotation = \"5s\"\n",
        pki.chain.display(),
        pki.key.display()
    ))
    .unwrap();
    let guest = f.add_guest(32).unwrap();
    // The three hosts made their own keys at start; through the store, sealed under the seal
    // key they share, they agree, and keep agreeing across rotations.
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || same_nts_keys(&f)),
        "{:?}",
        nts_key_ids(&f)
    );
    // What etcd holds says nothing of the keys: not their bytes, in any spelling.
    let out = f.etcd.etcdctl(
        &f.home,
        true,
        &["get", "/ntp-xdp/az-test/nts_keys", "--print-value-only"],
    );
    assert!(out.status.success(), "{out:?}");
    let stored = out.stdout;
    let text = String::from_utf8_lossy(&stored);
    assert!(text.contains("sealed"), "{text}");
    assert!(!text.contains("created_unix"), "keys in clear: {text}");
    let mut seen = 0;
    for h in &f.hosts {
        let file = f.dir.join(h.name).join("nts-keys.json");
        let local: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for k in local["keys"].as_array().unwrap() {
            let bytes: Vec<u8> = serde_json::from_value(k["key"].clone()).unwrap();
            assert_eq!(bytes.len(), 32);
            let json = serde_json::to_string(&bytes).unwrap();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                !stored.windows(32).any(|w| w == bytes.as_slice()),
                "raw key bytes in etcd"
            );
            assert!(
                !text.contains(&json[1..json.len() - 1]),
                "a key's JSON in etcd: {text}"
            );
            assert!(
                !text.to_ascii_lowercase().contains(&hex),
                "a key in hex in etcd"
            );
            seen += 1;
        }
    }
    assert!(seen >= 3, "the hosts' key files hold their keys");
    let first = nts_key_ids(&f)[0].clone();
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || {
            let ids = nts_key_ids(&f);
            ids[0].last() != first.last() && same_nts_keys(&f)
        }),
        "no common rotation: {:?}",
        nts_key_ids(&f)
    );

    // A guest's cookies from the master work on the standby that takes over.
    let master = master(&f);
    let session = key_exchange(&guest, integration_tests::CLOCK_V4, &pki.ca_der).unwrap();
    let authentic = |cookie: &[u8]| {
        nts_request(
            &guest,
            integration_tests::CLOCK_V4,
            &session,
            cookie,
            Tamper::None,
        )
        .unwrap()
        .is_some_and(|(reply, uid)| client_open_reply(&reply, &uid, &session.s2c).is_some())
    };
    assert!(authentic(&session.cookies[0]));
    // A rotation reaches the other hosts within a heartbeat: wait until they agree, so the
    // key that sealed the cookie is theirs too.
    assert!(Fleet::wait_until(
        Duration::from_secs(10),
        || same_nts_keys(&f)
    ));
    let i = f.hosts.iter().position(|h| h.name == master).unwrap();
    f.kill_daemon(i).unwrap();
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || {
            (0..3)
                .filter(|j| *j != i)
                .any(|j| f.status(j).is_ok_and(|s| s["vrrp"]["role"] == "master"))
        }),
        "no standby took over"
    );
    // The new master's gratuitous ARPs move the guest off the dead one's MAC.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        authentic(&session.cookies[1]),
        "a cookie from the old master was refused by the new one"
    );

    // Sealed keys altered in the store: no host can open them; one alarm names the key (no
    // host replaces them: another seal key could have written them), and rotation waits.
    let key = "/ntp-xdp/az-test/nts_keys";
    let out = f
        .etcd
        .etcdctl(&f.home, true, &["get", key, "--print-value-only"]);
    let mut sealed: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let n = sealed["nonce"][0].as_u64().unwrap();
    sealed["nonce"][0] = ((n + 1) % 256).into();
    let out = f
        .etcd
        .etcdctl(&f.home, true, &["put", key, &sealed.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let unusable = |f: &Fleet| -> Vec<String> {
        f.fleet_status().unwrap()["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["alarm"] == "store_value_unusable")
            .map(|a| a["detail"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || {
            let u = unusable(&f);
            u.len() == 1 && u[0].contains(key) && u[0].contains("do not open")
        }),
        "{:?}",
        unusable(&f)
    );
}

#[test]
fn access_list_rewrites_in_place_never_refuse_an_allowed_guest_nor_answer_a_denied_one() {
    // Guest .30 is allowed and guest .33 denied by both lists, but one is an allow list (what
    // matches nothing is denied) and the other a deny list, and a thousand other prefixes
    // change each time: 100 pushes alternate between them, each applied in place by every
    // host's agent, while both guests poll the clock address hard.
    let f = Fleet::start().unwrap();
    let allowed = ready(&f, 30);
    let denied = f.add_guest(33).unwrap();
    let config = |i: usize| {
        let others: Vec<String> = (0..1000)
            .map(|j| format!("\"fd00:ec2:{:x}::{j:x}/128\"", 0xf0 + i % 2))
            .collect();
        let others = others.join(", ");
        let lists = if i % 2 == 0 {
            format!("allow = [\"169.254.84.0/24\"]\ndeny = [\"169.254.84.32/27\", {others}]")
        } else {
            format!("deny = [\"169.254.84.33/32\", {others}]")
        };
        format!(
            "{}\n[access]\n{lists}\ndeny_action = \"kod\"\n",
            cluster_config(&f.guest_bridge, &f.vrrp_bridge, -24)
        )
    };
    let push = |i: usize| {
        let file = f.file(&format!("access-{i}.toml"), &config(i)).unwrap();
        let revision = revision_of(&f.fleet_ok(&["push", &file]).unwrap());
        assert!(all_applied(&f, revision), "push {i}: {:?}", hosts(&f));
    };
    push(0);
    let before = started(&f);

    let stop = Arc::new(AtomicBool::new(false));
    let pace = Duration::from_millis(2);
    let allowed_saw = tally_answers(&allowed, pace, stop.clone());
    let denied_saw = tally_answers(&denied, pace, stop.clone());
    for i in 1..=100 {
        push(i);
    }
    stop.store(true, Ordering::Relaxed);
    let (allowed_saw, denied_saw) = (allowed_saw.join().unwrap(), denied_saw.join().unwrap());
    eprintln!(
        "allowed guest: {} sent, {} answered, kisses {:?}; denied guest: {} sent, {} answered, \
         {} kisses",
        allowed_saw.sent,
        allowed_saw.time,
        allowed_saw.kisses,
        denied_saw.sent,
        denied_saw.time,
        denied_saw.kisses.len()
    );
    assert_eq!(
        started(&f),
        before,
        "a rewrite restarted a daemon instead of applying in place"
    );
    assert_eq!(
        allowed_saw.kisses_of(b"DENY"),
        0,
        "the allowed guest was told DENY"
    );
    assert!(
        allowed_saw.time * 2 >= allowed_saw.sent,
        "the allowed guest went unanswered: {} of {}",
        allowed_saw.time,
        allowed_saw.sent
    );
    assert_eq!(denied_saw.time, 0, "the denied guest got time");
    // Its requests did reach the responder, which refused them.
    assert!(
        denied_saw.kisses_of(b"DENY") >= 1,
        "{:?}",
        denied_saw.kisses
    );
}

/// What an operator gets wrong, and what the store does behind the fleet's back: a rolling
/// push of a configuration whose upstreams never answer stops at its canary, which goes back
/// to what it ran (its clock only resumed from the daemon before it: never proof that the
/// configuration works); values no agent can use in `desired` and `command` are reported with
/// their key, one alarm each, and every agent stays in its session; a host pinned to a
/// revision compaction removed re-pins to the current one and says so. A guest polls
/// throughout and loses nothing.
#[test]
fn a_push_that_cannot_synchronize_stops_at_its_canary_and_bad_values_never_stop_an_agent() {
    let f = Fleet::start().unwrap();
    let guest = ready(&f, 34);
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    let r1 = f.push_cluster("v1.toml", -21, &[]).unwrap();
    assert!(all_applied(&f, r1), "{:?}", hosts(&f));
    let by = |name: &str| {
        f.fleet_status().unwrap()["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == name)
            .unwrap()
            .clone()
    };
    let alarms = || -> Vec<(String, String)> {
        f.fleet_status().unwrap()["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["alarm"].as_str().unwrap().to_string(),
                    a["detail"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let started_b = by("vip-b")["status"]["started_unix"].as_u64().unwrap();

    // 1. Upstreams that never answer (nothing has that address): the canary restarts into
    // it, resumes its clock, measures nothing, and fails; the rest stay on r1.
    let silent = f
        .file(
            "silent.toml",
            &(cluster_config(&f.guest_bridge, &f.vrrp_bridge, -21)
                + "\n[[upstream]]\naddress = \"169.254.185.9\"\n"),
        )
        .unwrap();
    let out = f.fleet_cmd(&["push", &silent, "--rolling", "--canary", "vip-b"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("rollout stopped at vip-b") && text.contains("no synchronization"),
        "{text}"
    );
    let b = by("vip-b");
    assert_eq!(b["config_state"]["state"], "failed", "{b}");
    assert!(
        b["config_state"]["message"]
            .as_str()
            .unwrap()
            .contains("169.254.185.9"),
        "{b}"
    );
    assert_ne!(
        b["status"]["started_unix"], started_b,
        "the canary never restarted"
    );
    // Back on r1 (a restart into the configuration before), measured again.
    assert!(
        Fleet::wait_until(Duration::from_secs(30), || {
            let b = by("vip-b");
            b["status"]["config_revision"] == r1 && b["status"]["measured_since_start"] == true
        }),
        "{}",
        by("vip-b")
    );
    for other in ["vip-a", "vip-c"] {
        let h = by(other);
        assert_eq!(h["status"]["config_revision"], r1, "{h}");
        assert_eq!(h["desired"], r1, "{h}");
    }
    assert!(alarms()
        .iter()
        .any(|(a, d)| a == "config_failed" && d.contains("vip-b")));

    // 2. Garbage where an agent reads: each reported with its key, one alarm each.
    let put = |key: &str, value: &str| {
        let out = f.etcd.etcdctl(&f.home, true, &["put", key, value]);
        assert!(out.status.success(), "{out:?}");
    };
    put(
        "/ntp-xdp/az-test/hosts/vip-c/desired",
        "{\"revision\": \"soon\"",
    );
    put("/ntp-xdp/az-test/hosts/vip-a/command", "reboot please");
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || {
            let a = alarms();
            a.iter()
                .filter(|(n, d)| n == "config_failed" && d.contains("vip-c/desired"))
                .count()
                == 1
                && a.iter()
                    .filter(|(n, d)| n == "command_failed" && d.contains("vip-a/command"))
                    .count()
                    == 1
        }),
        "{:?}",
        alarms()
    );
    // Every agent is still in its session, heartbeat after heartbeat.
    for i in 0..3 {
        let s = f.status(i).unwrap();
        assert_eq!(s["fleet"]["store_reachable"], true, "{}", s["fleet"]);
    }
    // Values fixed: a push reaches every host.
    let out = f.etcd.etcdctl(
        &f.home,
        true,
        &["del", "/ntp-xdp/az-test/hosts/vip-c/desired"],
    );
    assert!(out.status.success());
    put(
        "/ntp-xdp/az-test/hosts/vip-a/command",
        "{\"id\": \"nothing\", \"command\": \"none\"}",
    );
    let r2 = f.push_cluster("v2.toml", -22, &[]).unwrap();
    assert!(all_applied(&f, r2), "{:?}", hosts(&f));

    // 3. A rollout paused with vip-c pinned to r1, and the store compacted: r1's config is
    // gone. vip-c re-pins to the current revision, says so, and stays connected.
    let r3 = f.push_cluster("v3.toml", -23, &[]).unwrap();
    assert!(all_applied(&f, r3), "{:?}", hosts(&f));
    let out = f.etcd.etcdctl(&f.home, true, &["compact", &r3.to_string()]);
    assert!(out.status.success(), "{out:?}");
    put(
        "/ntp-xdp/az-test/hosts/vip-c/desired",
        &format!("{{\"revision\": {r1}}}"),
    );
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || {
            let c = by("vip-c");
            c["desired"] == r3
                && c["config_state"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("compacted"))
        }),
        "{}",
        by("vip-c")
    );
    assert_eq!(by("vip-c")["status"]["config_revision"], r3);
    let s = f.status(2).unwrap();
    assert_eq!(s["fleet"]["store_reachable"], true, "{}", s["fleet"]);
    assert!(s["fleet"]["store_error"].is_null(), "{}", s["fleet"]);

    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    eprintln!(
        "{} sent, {} lost, {} switches",
        seen.sent,
        lost(&seen),
        switches(&seen)
    );
    assert_eq!(lost(&seen), 0, "requests lost");
    assert!(seen.seen.iter().all(|s| s.leap != 3));
}

/// The master cut off from the store: its link to every etcd member blackholed (relays that
/// stop forwarding and hold the connections open, as a dropped link does). It serves on with
/// what it runs; the operator and the other hosts see it lost; a push made meanwhile reaches
/// the others; once the link heals its heartbeat returns and it applies that push.
#[test]
fn a_host_cut_off_from_the_store_serves_on_is_shown_lost_and_catches_up_after() {
    let f = Fleet::start_with_options(FleetOptions {
        relayed_host: Some(0),
        ..Default::default()
    })
    .unwrap();
    let guest = ready(&f, 35);
    // vip-a has the highest priority: it holds the addresses, so the guest's time is its.
    assert!(
        Fleet::wait_until(Duration::from_secs(30), || master(&f) == "vip-a"),
        "{:?}",
        hosts(&f)
    );
    let a_stratum = f.hosts[0].stratum;
    let r0 = f.status(0).unwrap()["fleet"]["config_revision"].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    let t0 = Instant::now();

    f.cut_store_link();
    let unreachable = |f: &Fleet| {
        f.status(0).is_ok_and(|s| {
            s["fleet"]["store_reachable"] == false
                && s["alarms"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|a| a["name"] == "fleet_store_unreachable"))
        })
    };
    // Its lease runs out: lost to everyone else, with the alarm; it knows it is cut off.
    assert!(
        Fleet::wait_until(Duration::from_secs(30), || {
            hosts(&f).iter().any(|h| h.0 == "vip-a" && h.1)
        }),
        "{:?}",
        hosts(&f)
    );
    let lost_at = t0.elapsed();
    let s = f.fleet_status().unwrap();
    assert!(
        s["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alarm"] == "host_lost" && a["detail"].as_str().unwrap().contains("vip-a")),
        "{s}"
    );
    assert!(f.fleet_ok(&["status"]).unwrap().contains("LOST"));
    assert!(Fleet::wait_until(Duration::from_secs(30), || unreachable(
        &f
    )));

    // A push meanwhile: the others apply it; the cut-off host keeps what it runs.
    let r1 = f.push_cluster("v1.toml", -21, &[]).unwrap();
    let others_on = |f: &Fleet, r: i64| {
        hosts(f)
            .iter()
            .filter(|h| h.0 != "vip-a")
            .all(|h| !h.1 && h.2 == r && h.3 == "applied")
    };
    assert!(
        Fleet::wait_until(Duration::from_secs(30), || others_on(&f, r1)),
        "{:?}",
        hosts(&f)
    );
    // The partition lasts 30 s (the fault, not a wait for an event): all along, vip-a runs
    // what it ran, synchronized, and says the store is lost.
    loop {
        let s = f.status(0).unwrap();
        assert_eq!(s["fleet"]["config_revision"], r0, "{}", s["fleet"]);
        assert_eq!(s["clock"]["synchronized"], true);
        assert!(unreachable(&f), "{}", s["fleet"]);
        assert!(hosts(&f).iter().any(|h| h.0 == "vip-a" && h.1));
        if t0.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let cut_for = t0.elapsed();
    let answered_while_cut: Vec<u8> = {
        // The answers so far are the partition's: the poller keeps going.
        stop.store(true, Ordering::Relaxed);
        let seen = poller.join().unwrap();
        eprintln!(
            "cut off for {cut_for:?} (lost to the others after {lost_at:?}): {} sent, {} lost, \
             longest gap {:?}",
            seen.sent,
            lost(&seen),
            longest_gap(&seen.seen)
        );
        assert!(
            longest_gap(&seen.seen) < Duration::from_secs(2),
            "the guest went unanswered for {:?} while the master was cut off from the store",
            longest_gap(&seen.seen)
        );
        seen.seen.iter().map(|s| s.stratum).collect()
    };
    assert!(
        answered_while_cut.iter().all(|s| *s == a_stratum),
        "another host answered while vip-a was cut off: strata {:?}",
        {
            let mut v = answered_while_cut.clone();
            v.dedup();
            v
        }
    );

    // Healed: it reconnects, its heartbeat returns, and it applies the push it missed.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    let healed = Instant::now();
    f.heal_store_link();
    assert!(
        Fleet::wait_until(Duration::from_secs(90), || all_applied(&f, r1)),
        "{:?}",
        hosts(&f)
    );
    eprintln!("caught up {:?} after the link healed", healed.elapsed());
    assert!(Fleet::wait_until(Duration::from_secs(30), || !unreachable(
        &f
    )));
    let s = f.fleet_status().unwrap();
    assert!(
        !s["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alarm"] == "host_lost"),
        "{s}"
    );
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    eprintln!(
        "after the heal: {} sent, {} lost, {} switches, longest gap {:?}",
        seen.sent,
        lost(&seen),
        switches(&seen),
        longest_gap(&seen.seen)
    );
    assert!(
        longest_gap(&seen.seen) < Duration::from_secs(2),
        "the guest went unanswered for {:?} while vip-a caught up",
        longest_gap(&seen.seen)
    );
    assert!(seen.seen.iter().all(|s| s.leap != 3));
}

/// Two operators at once: A's rolling push is under way, held at its canary (the cluster's
/// restart slot is taken, as while another host restarts), when B pushes another config. A
/// stops at once and says why, and writes nothing more: no host is told to run A's revision.
/// Once the slot is free, every host ends on B's revision.
#[test]
fn a_second_operators_push_is_never_undone_by_the_first_ones_rollout() {
    let f = Fleet::start().unwrap();
    let _guest = ready(&f, 36);
    let etcdctl = |args: &[&str]| {
        let out = f.etcd.etcdctl(&f.home, true, args);
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    };
    let by = |name: &str| {
        f.fleet_status().unwrap()["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == name)
            .unwrap()
            .clone()
    };
    let slot = "/ntp-xdp/az-test/restart_slot";
    etcdctl(&["put", slot, "held-by-the-test"]);
    let va = f
        .file(
            "a.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -21),
        )
        .unwrap();
    let vb = f
        .file(
            "b.toml",
            &cluster_config(&f.guest_bridge, &f.vrrp_bridge, -22),
        )
        .unwrap();
    let mut a = f
        .fleet_spawn(&["push", &va, "--rolling", "--canary", "vip-b"])
        .unwrap();
    // A's canary has A's revision staged and waits for the slot to restart into it.
    let mut ra = 0;
    assert!(
        Fleet::wait_until(Duration::from_secs(30), || {
            let b = by("vip-b");
            ra = b["desired"].as_i64().unwrap_or(0);
            b["config_state"]["state"] == "applying" && b["config_state"]["revision"] == ra
        }),
        "{}",
        by("vip-b")
    );
    assert!(a.running(), "A's rollout ended before B's push");

    let mut b = f.fleet_spawn(&["push", &vb]).unwrap();
    let out = a.finish(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "A's rollout goes on after B's push: {}",
            f.fleet_status().unwrap()
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("operator A: {text}");
    let rb = f.fleet_status().unwrap()["config_revision"]
        .as_i64()
        .unwrap();
    assert!(rb > ra);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("pushed again") && text.contains(&format!("revision {rb}")),
        "{text}"
    );
    for name in ["vip-a", "vip-b", "vip-c"] {
        let h = by(name);
        assert_ne!(h["desired"], ra, "A's revision is still desired: {h}");
    }

    // The slot free: the hosts restart one at a time, and B's push completes.
    etcdctl(&["del", slot]);
    let out = b
        .finish(Duration::from_secs(240))
        .unwrap_or_else(|| panic!("B's push did not end: {:?}", hosts(&f)));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(revision_of(&text), rb);
    assert!(
        Fleet::wait_until(Duration::from_secs(60), || all_applied(&f, rb)),
        "{:?}",
        hosts(&f)
    );
    for name in ["vip-a", "vip-b", "vip-c"] {
        let h = by(name);
        assert_ne!(h["desired"], ra, "A's revision is desired again: {h}");
    }
}

/// NTS key rotation is timed by the store (the `nts_rotation` key under a lease of the
/// rotation period), not by the hosts' clocks: with vip-c's daemon living three hours in the
/// past (libfaketime; the system clock is untouched), every key looks "from the future" to it
/// and three hours old to the others, yet the cluster rotates once per period, and all three
/// hosts keep the same keys.
#[test]
fn a_host_whose_clock_is_behind_cannot_make_the_fleet_rotate_nts_keys_on_every_tick() {
    use integration_tests::nts::TestPki;
    const ROTATION: Duration = Duration::from_secs(5);
    const BEHIND: Duration = Duration::from_secs(3 * 3600);
    const WINDOW: Duration = Duration::from_secs(30);
    let pki = TestPki::new(&[integration_tests::CLOCK_V4]).unwrap();
    let f = Fleet::start_with_options(FleetOptions {
        cluster_extra: format!(
            "\n[nts]\ncertificate_chain = \"{}\"\nprivate_key = \"{}\"\nkey_rotation = \"{}s\"\n",
            pki.chain.display(),
            pki.key.display(),
            ROTATION.as_secs()
        ),
        clock_behind: Some((2, BEHIND)),
        ..Default::default()
    })
    .unwrap();
    assert!(Fleet::wait_until(Duration::from_secs(30), || {
        hosts(&f).iter().filter(|h| !h.1).count() == 3
    }));
    // vip-c's daemon reads its wall clock three hours behind: its start time says so.
    let start = started(&f);
    let behind = start[0] as i64 - start[2] as i64;
    assert!(
        (behind - BEHIND.as_secs() as i64).abs() < 600,
        "vip-c's clock is not behind: start times {start:?}"
    );
    assert!(
        Fleet::wait_until(Duration::from_secs(30), || same_nts_keys(&f)),
        "{:?}",
        nts_key_ids(&f)
    );
    // Each rotation is one write of the sealed keys: the key's version counts them.
    let writes = || -> u64 {
        let out = f.etcd.etcdctl(
            &f.home,
            true,
            &["get", "/ntp-xdp/az-test/nts_keys", "-w", "json"],
        );
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["kvs"][0]["version"].as_u64().unwrap()
    };
    let before = writes();
    let from = Instant::now();
    // The window is what is measured: rotations in it, not an event to wait for.
    std::thread::sleep(WINDOW);
    let rotations = writes() - before;
    let window = from.elapsed();
    // Rotations are a period apart, give or take the delay between a rotation's lease grant
    // and its write (one interval can be that much shorter on a loaded machine): one extra.
    // Timed by each host's clock, vip-c would rotate on every tick (0.8 s) of its agent.
    let allowed = window.as_secs() / ROTATION.as_secs() + 2;
    eprintln!(
        "{rotations} rotations in {window:?} with a {ROTATION:?} period (at most {allowed}); \
         key ids {:?}",
        nts_key_ids(&f)
    );
    assert!(rotations >= 1, "no rotation in {window:?}");
    assert!(
        rotations <= allowed,
        "{rotations} rotations in {window:?}, more than one per {ROTATION:?}"
    );
    assert!(
        Fleet::wait_until(Duration::from_secs(20), || same_nts_keys(&f)),
        "the hosts' keys differ: {:?}",
        nts_key_ids(&f)
    );
}
