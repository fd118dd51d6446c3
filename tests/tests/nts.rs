//! Network Time Security end to end: a VIP host with `[nts]`, a test CA, chronyd as an NTS
//! client in a guest namespace, and a minimal client of our own for what chrony never sends
//! (tampered requests, old cookies after a restart and key rotations, idle connections).

use std::time::Duration;

use integration_tests::nts::{
    closed_by_server, idle_connections, key_exchange, key_exchange_within, nts_request, Tamper,
    TestPki,
};
use integration_tests::topology::Netns;
use integration_tests::vip::{VipHost, VipOptions};
use integration_tests::{run, unique_name, CLOCK_V4};
use ntp_common::wire::*;
use ntp_user::nts::packet::client_open_reply;
use ntp_user::observe::status::NtsStatus;

fn nts(vip: &VipHost) -> NtsStatus {
    vip.status_report()
        .unwrap()
        .nts
        .expect("status has an NTS part")
}

fn vip_with_nts(subnet: u8, pki: &TestPki, rotation: &str, extra: &str) -> VipHost {
    VipHost::start(VipOptions {
        subnet,
        clock_toml: format!(
            "[clock]\nlocal_stratum = 10\n\n[nts]\ncertificate_chain = \"{}\"\n\
             private_key = \"{}\"\nkey_file = \"{}\"\nkey_rotation = \"{rotation}\"\n\n{extra}",
            pki.chain.display(),
            pki.key.display(),
            pki.dir.join("keys.json").display()
        ),
        ..Default::default()
    })
    .unwrap()
}

/// `chronyd -Q` with NTS against `addr`, trusting the test CA; its stderr.
fn chronyd_nts_query(guest: &Netns, addr: &str, pki: &TestPki) -> anyhow::Result<String> {
    let dir = pki.dir.join(unique_name("chrony"));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("chrony.conf");
    std::fs::write(
        &conf,
        format!(
            "server {addr} nts iburst maxsamples 1\nntstrustedcerts {ca}\n\
             pidfile {d}/chronyd.pid\ncmdport 0\nbindcmdaddress /\nlogdir {d}\n\
             log measurements\n",
            ca = pki.ca_pem.display(),
            d = dir.display()
        ),
    )?;
    let out = guest
        .command("setpriv")
        .args([
            "--bounding-set",
            "-sys_time",
            "chronyd",
            "-u",
            "root",
            "-Q",
            "-t",
            "10",
            "-f",
        ])
        .arg(&conf)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        anyhow::bail!("chronyd -Q over NTS failed ({}): {stderr}", out.status);
    }
    Ok(stderr)
}

#[test]
fn chronyd_synchronizes_over_nts_and_tampered_requests_get_no_time() {
    let pki = TestPki::new(&[CLOCK_V4]).unwrap();
    let vip = vip_with_nts(75, &pki, "1d", "");
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 31).unwrap();

    // chronyd: the key exchange over TLS 1.3 with the test CA, then authenticated NTP.
    let stderr = chronyd_nts_query(&guest, CLOCK_V4, &pki).unwrap();
    assert!(stderr.contains("System clock wrong by"), "{stderr}");
    let n = nts(&vip);
    assert!(n.key_exchanges >= 1, "{n:?}");
    assert!(n.requests_answered >= 1, "chronyd got no NTS reply: {n:?}");
    assert_eq!(n.authentication_failures + n.cookie_failures, 0, "{n:?}");

    // Our own client: the server record names the clock address, a request authenticates.
    let session = key_exchange(&guest, CLOCK_V4, &pki.ca_der).unwrap();
    assert_eq!(session.server.as_deref(), Some(CLOCK_V4));
    assert_eq!(session.cookies.len(), 8);
    let (reply, uid) = nts_request(
        &guest,
        CLOCK_V4,
        &session,
        &session.cookies[0],
        Tamper::None,
    )
    .unwrap()
    .expect("an answer");
    let fresh = client_open_reply(&reply, &uid, &session.s2c).expect("an authentic reply");
    assert_eq!(
        fresh.len(),
        2,
        "one cookie for the one spent, one per placeholder"
    );
    assert_eq!(mode(reply[0]), MODE_SERVER);
    assert_eq!(reply[OFF_STRATUM], 10);

    // Tampered: the authenticator, then the cookie. A NAK at most, never time.
    for tamper in [Tamper::Authenticator, Tamper::Cookie] {
        let got = nts_request(&guest, CLOCK_V4, &session, &session.cookies[1], tamper).unwrap();
        if let Some((reply, uid)) = got {
            assert!(client_open_reply(&reply, &uid, &session.s2c).is_none());
            assert_eq!(
                reply[OFF_STRATUM], 0,
                "{tamper:?}: a kiss-o'-death, not time"
            );
            assert_eq!(&reply[OFF_REFID..OFF_REFID + 4], b"NTSN", "{tamper:?}");
            assert_eq!(leap(reply[0]), LEAP_UNSYNCHRONIZED);
        }
    }
    let n = nts(&vip);
    assert_eq!(n.authentication_failures, 1, "{n:?}");
    assert_eq!(n.cookie_failures, 1, "{n:?}");
    let metrics = integration_tests::clients::http_get(
        &vip.home,
        "127.0.0.1:9273".parse().unwrap(),
        "/metrics",
    )
    .unwrap();
    assert!(
        metrics.contains("ntpxdp_nts_requests_total{outcome=\"authentication_failure\"} 1"),
        "{metrics}"
    );
}

#[test]
fn cookies_outlive_a_restart_and_key_rotations_then_expire() {
    let pki = TestPki::new(&[CLOCK_V4]).unwrap();
    let rotation = Duration::from_secs(2);
    let mut vip = vip_with_nts(76, &pki, "2s", "");
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 32).unwrap();
    let session = key_exchange(&guest, CLOCK_V4, &pki.ca_der).unwrap();
    let ids_before = nts(&vip).key_ids;

    // A hitless restart: the keys come back from the key file; the old cookie still works.
    assert!(vip.stop_daemon().unwrap());
    vip.start_daemon().unwrap();
    let authentic = |cookie: &[u8]| {
        let got = nts_request(&guest, CLOCK_V4, &session, cookie, Tamper::None).unwrap();
        got.and_then(|(reply, uid)| client_open_reply(&reply, &uid, &session.s2c))
            .is_some()
    };
    assert!(
        authentic(&session.cookies[0]),
        "a cookie from before the restart"
    );

    // After one rotation: the old cookie still works, and the new current key is another.
    let rotated = || Ok(nts(&vip).key_ids.last() != ids_before.last());
    assert!(
        VipHost::wait_until(rotation * 5, rotated).unwrap(),
        "no rotation"
    );
    assert!(authentic(&session.cookies[1]), "a cookie one rotation old");

    // Once its key has been rotated out (three more), it is NAKed: a new key exchange is due.
    let first = *ids_before.last().unwrap();
    let gone = || Ok(!nts(&vip).key_ids.contains(&first));
    assert!(
        VipHost::wait_until(rotation * 12, gone).unwrap(),
        "the first key stayed"
    );
    assert!(
        !authentic(&session.cookies[2]),
        "a cookie whose key is gone"
    );
    assert!(nts(&vip).cookie_failures >= 1);
    let again = key_exchange(&guest, CLOCK_V4, &pki.ca_der).unwrap();
    let got = nts_request(&guest, CLOCK_V4, &again, &again.cookies[0], Tamper::None)
        .unwrap()
        .unwrap();
    assert!(client_open_reply(&got.0, &got.1, &again.s2c).is_some());
}

#[test]
fn guest_config_gives_chrony_an_nts_line_it_accepts() {
    let pki = TestPki::new(&[CLOCK_V4]).unwrap();
    let vip = vip_with_nts(77, &pki, "1d", "");
    let config = vip.config.to_string_lossy().into_owned();
    let out = run(&mut vip
        .ntp_user(&["guest-config", "--config", &config])
        .unwrap())
    .unwrap();
    let line = format!("server {CLOCK_V4} nts prefer iburst");
    assert!(out.contains(&line), "{out}");
    let file = pki.dir.join("guest.conf");
    std::fs::write(
        &file,
        format!("{line}\nntstrustedcerts {}\n", pki.ca_pem.display()),
    )
    .unwrap();
    let parsed = run(std::process::Command::new("chronyd")
        .arg("-p")
        .arg("-f")
        .arg(&file))
    .unwrap();
    assert!(parsed.contains(" nts"), "{parsed}");
}

#[test]
fn key_exchanges_pass_the_access_list_as_requests_do() {
    let pki = TestPki::new(&[CLOCK_V4]).unwrap();
    let vip = vip_with_nts(
        78,
        &pki,
        "1d",
        "[access]\ndeny = [\"169.254.78.41/32\"]\ndeny_action = \"drop\"\n",
    );
    let (allowed, denied) = (vip.add_guest().unwrap(), vip.add_guest().unwrap());
    vip.configure_guest_statically(&allowed, 40).unwrap();
    vip.configure_guest_statically(&denied, 41).unwrap();
    let session = key_exchange(&allowed, CLOCK_V4, &pki.ca_der).unwrap();
    assert!(key_exchange(&denied, CLOCK_V4, &pki.ca_der).is_err());
    assert_eq!(nts(&vip).key_exchanges_refused, 1);
    // Cookies do not open the access list: the denied guest using the allowed one's gets
    // nothing (denied requests are dropped before NTS looks at them).
    let got = nts_request(
        &denied,
        CLOCK_V4,
        &session,
        &session.cookies[0],
        Tamper::None,
    )
    .unwrap();
    assert!(got.is_none(), "a denied source got an answer");
    let got = nts_request(
        &allowed,
        CLOCK_V4,
        &session,
        &session.cookies[1],
        Tamper::None,
    )
    .unwrap();
    assert!(got.is_some());
}

/// One guest opens far more key-exchange connections than its share, and more than a
/// server-wide pool of 64 slots would hold, and holds them without sending a byte; another guest's key exchange
/// still goes through. The server takes the first guest's share, cuts those at the request
/// deadline, and closes the rest at once, each counted.
#[test]
fn idle_connections_from_one_guest_do_not_stop_another_guests_key_exchange() {
    const IDLE: usize = 150;
    let pki = TestPki::new(&[CLOCK_V4]).unwrap();
    // No rate limit (as for guests behind NAT): the per-source cap alone must protect.
    let vip = vip_with_nts(85, &pki, "1d", "[limits]\nenable = false\n");
    let (hog, other) = (vip.add_guest().unwrap(), vip.add_guest().unwrap());
    vip.configure_guest_statically(&hog, 50).unwrap();
    vip.configure_guest_statically(&other, 51).unwrap();
    // The key exchange is up.
    key_exchange(&other, CLOCK_V4, &pki.ca_der).unwrap();

    let idle = idle_connections(&hog, CLOCK_V4, IDLE).unwrap();
    // A generous wait, yet shorter than what a server-wide pool of 64 slots held 10 s each
    // would make the other guest wait behind 86 queued idle connections (20 s).
    let session = key_exchange_within(&other, CLOCK_V4, &pki.ca_der, Duration::from_secs(15))
        .expect("the other guest's key exchange while one guest holds idle connections");
    assert_eq!(session.cookies.len(), 8);

    // Every idle connection is closed by the server: the share at its deadline, the rest
    // at once.
    let counted = || {
        let n = nts(&vip);
        Ok(n.key_exchanges_over_source_limit + n.key_exchange_deadlines == IDLE as u64)
    };
    assert!(
        VipHost::wait_until(Duration::from_secs(60), counted).unwrap(),
        "{:?}",
        nts(&vip)
    );
    let n = nts(&vip);
    assert!(n.key_exchanges_over_source_limit >= 1, "{n:?}");
    assert!(n.key_exchange_deadlines >= 1, "{n:?}");
    assert_eq!(n.key_exchanges, 2, "{n:?}");
    assert!(
        VipHost::wait_until(Duration::from_secs(30), || Ok(idle
            .iter()
            .all(closed_by_server)))
        .unwrap(),
        "{} idle connections still open",
        idle.iter().filter(|c| !closed_by_server(c)).count()
    );
    let metrics = integration_tests::clients::http_get(
        &vip.home,
        "127.0.0.1:9273".parse().unwrap(),
        "/metrics",
    )
    .unwrap();
    let line = format!(
        "ntpxdp_nts_key_exchanges_total{{outcome=\"source_limit\"}} {}",
        n.key_exchanges_over_source_limit
    );
    assert!(metrics.contains(&line), "{metrics}");
}

/// `ntp-ctl force-sync` of ntpd-rs (from `cargo xtask setup`) with one NTS source, in a pty
/// (it insists on a terminal) and without CAP_SYS_TIME: it measures, and with the offset
/// under a second it only says so. Its output.
fn ntpd_rs_force_sync(guest: &Netns, addr: &str, pki: &TestPki) -> anyhow::Result<String> {
    let conf = pki.dir.join(unique_name("ntpdrs")).with_extension("toml");
    std::fs::write(
        &conf,
        format!(
            "[observability]\nlog-level = \"warn\"\n\n[[source]]\nmode = \"nts\"\n\
             address = \"{addr}\"\ncertificate-authority = \"{}\"\n\n\
             [synchronization]\nminimum-agreeing-sources = 1\n",
            pki.ca_pem.display()
        ),
    )?;
    let ctl = integration_tests::clients::ntp_ctl_bin();
    let inner = format!(
        "setpriv --bounding-set -sys_time timeout 30 {} force-sync -c {}",
        ctl.display(),
        conf.display()
    );
    let out = guest
        .command("script")
        .args(["-q", "-e", "-c", &inner, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        anyhow::bail!("ntp-ctl force-sync failed ({}): {text}", out.status);
    }
    Ok(text)
}

#[test]
fn ntpd_rs_gets_its_time_over_nts() {
    let pki = TestPki::new(&[CLOCK_V4]).unwrap();
    let vip = vip_with_nts(79, &pki, "1d", "");
    let guest = vip.add_guest().unwrap();
    vip.configure_guest_statically(&guest, 33).unwrap();
    let out = ntpd_rs_force_sync(&guest, CLOCK_V4, &pki).unwrap();
    assert!(
        out.contains("already within 1s of the correct time"),
        "ntpd-rs did not get time: {out}"
    );
    let n = nts(&vip);
    assert!(n.key_exchanges >= 1, "{n:?}");
    assert!(
        n.requests_answered >= 1,
        "ntpd-rs sent no NTS request: {n:?}"
    );
    assert_eq!(n.authentication_failures + n.cookie_failures, 0, "{n:?}");
}
