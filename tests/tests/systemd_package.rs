//! The Debian package as an operator uses it: a booted Debian 12 systemd in a container
//! (systemd-nspawn on the rootfs `cargo xtask test` caches), `apt install ./ntp-xdp_*.deb`,
//! `systemctl enable --now`, a guest on the unit's bridge, restart, stop, remove, purge.
//! `cargo xtask test` builds the package (NTP_XDP_DEB) and the rootfs (NTP_XDP_ROOTFS).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use integration_tests::clients::{chronyd_query, one_query, poll};
use integration_tests::nts::{key_exchange, nts_request, NtsSession, Tamper, TestPki};
use integration_tests::topology::Netns;
use integration_tests::vip::{configure_guest, guest_on_bridge};
use integration_tests::{run, unique_name, CLOCK_V4};
use ntp_user::nts::packet::client_open_reply;

/// The bridge of the package's default config, where guests plug in.
const BRIDGE: &str = "ntpxdp-br0";
/// The default config's service namespace and the interface in it.
const SERVICE_NETNS: &str = "ntpxdp-vip";
const SERVICE_INTERFACE: &str = "ntpxdp-v0";
/// Where `[nts] key_file` defaults to (the unit's StateDirectory).
const NTS_KEY_FILE: &str = "/var/lib/ntp-xdp/nts-keys.json";

fn required_path(var: &str) -> PathBuf {
    let p: PathBuf = std::env::var_os(var)
        .unwrap_or_else(|| panic!("{var} is not set: run this test through `cargo xtask test`"))
        .into();
    assert!(p.exists(), "{var}={} does not exist", p.display());
    p
}

/// A bpffs of the container's own, mounted on the host and bound to its /sys/fs/bpf.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Result<Bpffs> {
        let dir = std::env::temp_dir().join(unique_name("ntpxdp-bootbpf"));
        std::fs::create_dir_all(&dir)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        Ok(Bpffs(dir))
    }

    /// What is pinned in it (not the kernel's own maps.debug and progs.debug).
    fn pinned(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "maps.debug" && n != "progs.debug")
            .collect()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A booted container on an ephemeral snapshot of the rootfs, in network namespace `net`;
/// powered off (then killed) on drop.
struct Container {
    nspawn: Child,
    init: u32,
}

impl Container {
    fn boot(
        rootfs: &Path,
        net: &Netns,
        bpffs: &Bpffs,
        debs: &Path,
        upgrade: &Path,
    ) -> Result<Container> {
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.log", net.name)))?;
        let nspawn = Command::new("systemd-nspawn")
            .args(["--boot", "--ephemeral", "--register=no", "--keep-unit"])
            .arg("--directory")
            .arg(rootfs)
            .arg(format!("--network-namespace-path=/run/netns/{}", net.name))
            // BPF, namespaces, links: what the unit's own bounding set then narrows.
            .arg("--capability=all")
            // nspawn's own seccomp filter refuses bpf() to the container's services.
            .arg("--system-call-filter=bpf perf_event_open")
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.0.display()))
            .arg(format!("--bind-ro={}:/root/debs", debs.display()))
            .arg(format!("--bind-ro={}:/root/upgrade", upgrade.display()))
            // The daemon sets sysctls in the namespaces it creates.
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting systemd-nspawn")?;
        let mut c = Container { nspawn, init: 0 };
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.init == 0 {
            if Instant::now() > deadline {
                bail!("the container's init did not appear");
            }
            if let Some(status) = c.nspawn.try_wait()? {
                bail!("systemd-nspawn exited: {status}");
            }
            c.init = container_init(c.nspawn.id()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(100));
        }
        // Booted: `systemctl is-system-running --wait` says how it ended, once PID 1 listens.
        let mut state = String::new();
        wait_for("the container's systemd", Duration::from_secs(120), || {
            let out = c
                .command(&["systemctl", "is-system-running", "--wait"])
                .output();
            state = out.map_or_else(
                |e| e.to_string(),
                |o| String::from_utf8_lossy(&o.stdout).into_owned(),
            );
            !state.trim().is_empty()
        })?;
        if !state.trim().ends_with("running") {
            let failed = c.exec(&["systemctl", "--failed", "--no-legend"]);
            bail!("the container booted to {state:?}; failed units: {failed:?}");
        }
        Ok(c)
    }

    /// Runs a command in every namespace of the container (as `nsenter -a`).
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.init.to_string(),
            "-a",
            "env",
            "DEBIAN_FRONTEND=noninteractive",
        ])
        .args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Result<String> {
        run(&mut self.command(args))
    }

    fn sh(&self, script: &str) -> Result<String> {
        self.exec(&["sh", "-c", script])
    }

    /// The path of `p` inside the container, seen from the host.
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.init))
    }

    fn journal(&self) -> String {
        self.exec(&["journalctl", "-u", "ntp-xdp", "--no-pager", "-o", "cat"])
            .unwrap_or_default()
    }

    /// The daemon's own journal entries (not systemd's about the unit), at `priority` or more
    /// urgent, with the priority each was filed at.
    fn daemon_entries(&self, priority: &str) -> Result<Vec<JournalEntry>> {
        let out = self.exec(&[
            "journalctl",
            "-u",
            "ntp-xdp",
            "--no-pager",
            "-o",
            "json",
            "-p",
            priority,
        ])?;
        let mut entries = Vec::new();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("journal entry {line:?}"))?;
            if v["SYSLOG_IDENTIFIER"] != "ntp-xdp" {
                continue;
            }
            let field = |name: &str| v[name].as_str().unwrap_or_default().to_string();
            entries.push(JournalEntry {
                priority: field("PRIORITY").parse().unwrap_or(u8::MAX),
                message: field("MESSAGE"),
            });
        }
        Ok(entries)
    }

    /// The unit's status line (sd_notify STATUS=, shown by `systemctl status`).
    fn status_text(&self) -> String {
        self.exec(&[
            "systemctl",
            "show",
            "-p",
            "StatusText",
            "--value",
            "ntp-xdp",
        ])
        .unwrap_or_default()
        .trim()
        .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.command(&["systemctl", "poweroff"]).status();
        // After the container stops, nspawn removes its ephemeral copy of the rootfs (hundreds
        // of MB): killed during that, it would leave the copy behind.
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

struct JournalEntry {
    priority: u8,
    message: String,
}

/// Whether a cookie the guest got before answers an NTS request with a reply that
/// authenticates under the session's keys.
fn cookie_works(guest: &Netns, session: &NtsSession, cookie: &[u8]) -> Result<bool> {
    let got = nts_request(guest, CLOCK_V4, session, cookie, Tamper::None)?;
    Ok(got
        .and_then(|(reply, uid)| client_open_reply(&reply, &uid, &session.s2c))
        .is_some())
}

/// The child of `nspawn` that is PID 1 of its own PID namespace.
fn container_init(nspawn: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
        };
        let parent = field("PPid:").and_then(|v| v.first()?.parse::<u32>().ok());
        let nspid = field("NSpid:").unwrap_or_default();
        if parent == Some(nspawn) && nspid.len() > 1 && nspid.last() == Some(&"1") {
            return nspid.first()?.parse().ok();
        }
    }
    None
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// How many times the journal says a daemon attached and served.
fn servings(c: &Container) -> usize {
    c.journal()
        .matches("responder attached (pinned); serving")
        .count()
}

/// 20 requests a second from the guest through `action`; every one answered.
fn no_request_lost(guest: &Netns, what: &str, action: impl FnOnce() -> Result<()>) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(guest, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let acted = action();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let polled = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    acted?;
    eprintln!(
        "{what}: {} of {} requests answered",
        polled.seen.len(),
        polled.sent
    );
    if !polled.unanswered.is_empty() || polled.sent < 40 {
        bail!(
            "{what}: {} of {} requests unanswered",
            polled.unanswered.len(),
            polled.sent
        );
    }
    Ok(())
}

#[test]
fn booted_systemd_package() -> Result<()> {
    let deb = required_path("NTP_XDP_DEB");
    let rootfs = required_path("NTP_XDP_ROOTFS");
    let deb_name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let net = Netns::new("nboot")?;
    let bpffs = Bpffs::new()?;
    let upgrade_dir = required_path("NTP_XDP_DEB_UPGRADE");
    let c = Container::boot(
        &rootfs,
        &net,
        &bpffs,
        deb.parent().unwrap(),
        upgrade_dir.parent().unwrap(),
    )?;

    // As an operator: install (apt resolves the dependencies), raise the per-source rate for
    // one guest polling 20/s (a conffile edit), enable and start.
    c.exec(&[
        "apt-get",
        "install",
        "-y",
        "-q",
        &format!("/root/debs/{deb_name}"),
    ])?;
    let not_started = c.sh(
        "for u in keepalived radvd dnsmasq; do printf '%s=%s\\n' $u $(systemctl is-active $u); done",
    );
    let not_started = not_started.or_else(|e| Ok::<_, anyhow::Error>(e.to_string()))?;
    for unit in ["keepalived", "radvd", "dnsmasq"] {
        assert!(
            not_started.contains(&format!("{unit}=inactive")),
            "Debian's {unit} unit runs after the install: {not_started}"
        );
    }
    c.sh("printf '\\n[limits]\\nrate = 100.0\\nburst = 200\\n' >> /etc/ntp-xdp/ntp-xdp.toml")?;
    // NTS with a certificate of a test CA: its cookie keys must outlive the upgrade.
    let pki = TestPki::new(&[CLOCK_V4])?;
    std::fs::copy(&pki.chain, c.path("/etc/ntp-xdp/nts-chain.pem"))?;
    std::fs::copy(&pki.key, c.path("/etc/ntp-xdp/nts-key.pem"))?;
    c.sh("chmod 600 /etc/ntp-xdp/nts-key.pem && printf '\\n[nts]\\n\
         certificate_chain = \"/etc/ntp-xdp/nts-chain.pem\"\\n\
         private_key = \"/etc/ntp-xdp/nts-key.pem\"\\n' >> /etc/ntp-xdp/ntp-xdp.toml")?;
    c.exec(&["systemctl", "enable", "--now", "ntp-xdp"])?;
    wait_for("the daemon to serve", Duration::from_secs(60), || {
        servings(&c) == 1
    })
    .with_context(|| c.journal())?;

    // systemctl status names what it serves (the daemon's STATUS=).
    let expected_status = format!("to guests on bridge {BRIDGE} (namespace {SERVICE_NETNS})");
    wait_for("the unit's status line", Duration::from_secs(10), || {
        c.status_text().contains(&expected_status)
    })
    .with_context(|| format!("StatusText={:?}", c.status_text()))?;
    let status_text = c.status_text();
    assert!(
        status_text.starts_with("serving ") && status_text.contains(CLOCK_V4),
        "the status line does not name the clock address: {status_text:?}"
    );
    let status = c
        .command(&["systemctl", "status", "--no-pager", "-l", "ntp-xdp"])
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("active (running)") && status.contains(&status_text),
        "systemctl status does not show the status line:\n{status}"
    );

    // The journal files the daemon's lines at their levels: a drift it repairs (the namespace
    // end's IPv6 addresses flushed; the IPv4 guest is not disturbed) is a warning, serving is
    // info.
    c.exec(&[
        "ip",
        "-n",
        SERVICE_NETNS,
        "-6",
        "addr",
        "flush",
        "dev",
        SERVICE_INTERFACE,
        "scope",
        "global",
    ])?;
    let mut warnings = Vec::new();
    wait_for(
        "the repair's warning in the journal",
        Duration::from_secs(30),
        || {
            warnings = c.daemon_entries("warning").unwrap_or_default();
            warnings
                .iter()
                .any(|e| e.message.contains("drift repaired"))
        },
    )
    .with_context(|| {
        let all = c.daemon_entries("debug").unwrap_or_default();
        all.iter()
            .map(|e| format!("<{}> {}", e.priority, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    for e in warnings
        .iter()
        .filter(|e| e.message.contains("drift repaired"))
    {
        assert_eq!(
            e.priority, 4,
            "a warning filed as {}: {}",
            e.priority, e.message
        );
    }
    assert!(
        !warnings
            .iter()
            .any(|e| e.message.contains("responder attached")),
        "`journalctl -p warning` shows info lines"
    );
    let all = c.daemon_entries("debug")?;
    let serving = all
        .iter()
        .find(|e| e.message.contains("responder attached (pinned); serving"))
        .context("no serving line in the journal")?;
    assert_eq!(serving.priority, 6, "{}", serving.message);

    // A guest on the unit's bridge.
    let guest = guest_on_bridge(&net, BRIDGE)?;
    configure_guest(&guest, 100, 50)?;
    let m = chronyd_query(&guest, CLOCK_V4)?;
    assert!(m.tests_passed, "chronyd's tests failed: {m:?}");

    // restart: hitless.
    no_request_lost(&guest, "systemctl restart", || {
        c.exec(&["systemctl", "restart", "ntp-xdp"])?;
        wait_for(
            "the restarted daemon to serve",
            Duration::from_secs(60),
            || servings(&c) == 2,
        )
    })?;

    // NTS: a guest's key exchange, and the cookie keys as they are on disk.
    let session = key_exchange(&guest, CLOCK_V4, &pki.ca_der)?;
    assert!(
        cookie_works(&guest, &session, &session.cookies[0])?,
        "an NTS request before the upgrade got no authentic reply"
    );
    let keys_before = std::fs::read(c.path(NTS_KEY_FILE))
        .with_context(|| format!("the NTS key file {NTS_KEY_FILE}"))?;

    // An upgrade to a higher version: hitless (postinst's try-restart), the conffile edit
    // and the NTS keys kept.
    let upgrade = required_path("NTP_XDP_DEB_UPGRADE");
    let upgrade_name = upgrade.file_name().unwrap().to_string_lossy().into_owned();
    no_request_lost(&guest, "upgrade", || {
        c.exec(&[
            "apt-get",
            "install",
            "-y",
            "-q",
            &format!("/root/upgrade/{upgrade_name}"),
        ])?;
        wait_for(
            "the upgraded daemon to serve",
            Duration::from_secs(60),
            || servings(&c) == 3,
        )
    })?;
    let version = c.exec(&["dpkg-query", "-W", "-f=${Version}", "ntp-xdp"])?;
    assert!(version.ends_with("+upgrade1"), "installed: {version}");
    let config = std::fs::read_to_string(c.path("/etc/ntp-xdp/ntp-xdp.toml"))?;
    assert!(
        config.contains("rate = 100.0") && config.contains("[nts]"),
        "the upgrade lost the conffile edits"
    );
    let keys_after = std::fs::read(c.path(NTS_KEY_FILE))?;
    assert!(
        keys_after == keys_before,
        "the upgrade changed the NTS key file"
    );
    assert!(
        cookie_works(&guest, &session, &session.cookies[1])?,
        "a cookie from before the upgrade got no authentic reply"
    );

    // stop: no time from this host within a second of asking.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll(&guest, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    c.exec(&["systemctl", "stop", "ntp-xdp"])?;
    let stopped = asked.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let polled = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    let last = polled
        .seen
        .iter()
        .map(|s| s.at)
        .max()
        .context("no answer before the stop")?;
    eprintln!(
        "systemctl stop: returned after {stopped:?}; last answer {:?} after it was asked",
        last.saturating_duration_since(asked)
    );
    assert!(
        last < asked + Duration::from_secs(1),
        "a stopped service answered {:?} after the stop was asked\n{}",
        last - asked,
        c.journal()
    );
    assert!(one_query(&guest, CLOCK_V4)?.is_none());
    assert!(
        c.journal().contains("withdrawn"),
        "the stop did not withdraw:\n{}",
        c.journal()
    );
    // A start serves again (the plumbing stayed).
    c.exec(&["systemctl", "start", "ntp-xdp"])?;
    wait_for("time after a start", Duration::from_secs(60), || {
        matches!(one_query(&guest, CLOCK_V4), Ok(Some(_)))
    })?;

    // remove: the service, the plumbing and the pins go; the config and keys stay.
    c.exec(&["apt-get", "remove", "-y", "-q", "ntp-xdp"])?;
    let leftovers = c.sh(
        "ip netns list; ip -br link show ntpxdp-br0 2>/dev/null; ls /run/ntp-xdp 2>/dev/null; \
         cat /proc/[0-9]*/comm | grep -E 'ntp-xdp|dnsmasq|radvd|keepalived' || true",
    )?;
    assert!(leftovers.trim().is_empty(), "apt remove left: {leftovers}");
    let pinned = bpffs.pinned();
    assert!(pinned.is_empty(), "apt remove left pins: {pinned:?}");
    assert!(!c.path("/usr/bin/ntp-xdp").exists());
    assert!(
        c.path("/etc/ntp-xdp/ntp-xdp.toml").exists(),
        "remove took the conffile"
    );
    assert!(one_query(&guest, CLOCK_V4)?.is_none());

    // purge: nothing of it left; what the operator put in /etc/ntp-xdp (the NTS certificate
    // and key) is theirs, and dpkg keeps the directory for it.
    c.exec(&["apt-get", "purge", "-y", "-q", "ntp-xdp"])?;
    let mut kept: Vec<String> = std::fs::read_dir(c.path("/etc/ntp-xdp"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        ["nts-chain.pem", "nts-key.pem"],
        "apt purge left files of the package in /etc/ntp-xdp"
    );
    for p in [
        "/var/lib/ntp-xdp",
        "/etc/systemd/system/multi-user.target.wants/ntp-xdp.service",
        "/lib/systemd/system/ntp-xdp.service",
    ] {
        assert!(!c.path(p).exists(), "apt purge left {p}");
    }
    let dpkg = c.command(&["dpkg", "-s", "ntp-xdp"]).output()?;
    assert!(!dpkg.status.success(), "dpkg still knows ntp-xdp");
    Ok(())
}
