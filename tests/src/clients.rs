//! Third-party NTP clients, run query-only and without CAP_SYS_TIME so they can never set the
//! machine's clock.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::topology::Netns;
use crate::unique_name;

/// Wraps a client so that even a misbehaving one cannot set the clock.
fn no_sys_time(ns: &Netns, program: &str) -> Command {
    let mut c = ns.command("setpriv");
    c.args(["--bounding-set", "-sys_time", program]);
    c
}

#[derive(Debug, Clone, PartialEq)]
pub struct NtpdigReply {
    pub offset_s: f64,
    pub stratum: u8,
    pub leap: String,
}

/// One `ntpdig` (ntpsec) query, JSON output.
pub fn ntpdig(ns: &Netns, addr: &str) -> Result<NtpdigReply> {
    let out = no_sys_time(ns, "ntpdig")
        .args(["-j", "-t", "2", addr])
        .output()
        .context("running ntpdig")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ntpdig {addr} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("ntpdig output is not JSON: {stdout}"))?;
    Ok(NtpdigReply {
        offset_s: v["offset"]
            .as_f64()
            .ok_or_else(|| anyhow!("no offset in {v}"))?,
        stratum: v["stratum"]
            .as_u64()
            .ok_or_else(|| anyhow!("no stratum in {v}"))? as u8,
        leap: v["leap"].as_str().unwrap_or_default().to_string(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChronyMeasurement {
    /// "System clock wrong by X seconds": chronyd's own conclusion.
    pub offset_s: f64,
    pub leap: String,
    pub stratum: u8,
    pub refid: String,
    /// The "123 567 ABCD" test columns of the measurements log, all passed.
    pub tests_passed: bool,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `chronyd -Q` query (the strictest client: it exits 1 on any invalid reply), with the
/// measurements log kept to read the stratum, leap and refid it saw.
pub fn chronyd_query(ns: &Netns, addr: &str) -> Result<ChronyMeasurement> {
    let dir = TempDir(std::env::temp_dir().join(unique_name("chrony")));
    std::fs::create_dir_all(&dir.0)?;
    let conf = dir.0.join("chrony.conf");
    std::fs::write(
        &conf,
        format!(
            "server {addr} iburst maxsamples 1\npidfile {d}/chronyd.pid\ncmdport 0\n\
             bindcmdaddress /\nlogdir {d}\nlog rawmeasurements measurements\n",
            d = dir.0.display()
        ),
    )?;
    let out = no_sys_time(ns, "chronyd")
        .args(["-u", "root", "-Q", "-t", "5", "-f"])
        .arg(&conf)
        .output()
        .context("running chronyd")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.0.join("measurements.log")).unwrap_or_default();
        let raw = std::fs::read_to_string(dir.0.join("rawmeasurements.log")).unwrap_or_default();
        let log = format!("{log}{raw}");
        bail!(
            "chronyd -Q {addr} failed ({}): {stderr}\nmeasurements:\n{log}",
            out.status
        );
    }
    let offset_s = stderr
        .lines()
        .find_map(|l| {
            let rest = l.split("System clock wrong by ").nth(1)?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| anyhow!("chronyd printed no offset: {stderr}"))?;
    let log = std::fs::read_to_string(dir.0.join("measurements.log"))
        .context("reading chronyd's measurements.log")?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.split_whitespace().count() >= 17)
        .ok_or_else(|| anyhow!("no measurement in {log}"))?;
    // Date Time IP L St 123 567 ABCD LP RP Score Offset PeerDel PeerDisp RootDel RootDisp Refid MTxRx
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 17 {
        bail!("unexpected measurements line: {line}");
    }
    Ok(ChronyMeasurement {
        offset_s,
        leap: f[3].to_string(),
        stratum: f[4].parse().context("stratum column")?,
        refid: f[16].to_string(),
        tests_passed: f[5] == "111" && f[6] == "111" && f[7] == "1111",
    })
}

/// What a run of sequential queries saw.
#[derive(Default, Debug)]
pub struct ClientTally {
    pub answered: u64,
    pub lost: u64,
    /// Replies whose timestamps went backwards against the previous reply's.
    pub backwards: Vec<String>,
    /// Replies that said unsynchronized (LI=3).
    pub unsynchronized: u64,
}

/// Sends requests one after another from `guest_ns` to `addr`:123 (each waits up to 250 ms for
/// its reply) until `count` are answered, `deadline` passes or `stop` is set. Checks each reply
/// echoes its request's transmit timestamp, and that receive and transmit timestamps never go
/// backwards: requests are sequential, so each is received after the previous reply was sent.
pub fn sequential_queries(
    guest_ns: std::fs::File,
    addr: &str,
    count: u64,
    deadline: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> ClientTally {
    use ntp_common::wire::{li_vn_mode, mode, read_be64, MODE_CLIENT, MODE_SERVER};
    use std::sync::atomic::Ordering;
    ntp_user::netns::enter(&guest_ns).expect("entering the guest namespace");
    let sock = std::net::UdpSocket::bind(if addr.contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })
    .expect("binding the client socket");
    sock.connect((addr, 123))
        .expect("connecting the client socket");
    sock.set_read_timeout(Some(std::time::Duration::from_millis(250)))
        .unwrap();
    let mut tally = ClientTally::default();
    let (mut last_rx, mut last_tx) = (0u64, 0u64);
    let mut buf = [0u8; 128];
    let start = std::time::Instant::now();
    let mut seq: u64 = 0x5eed_0000_0000_0000 | rand_low();
    while tally.answered < count && start.elapsed() < deadline && !stop.load(Ordering::Relaxed) {
        seq += 1;
        let mut req = [0u8; 48];
        req[0] = li_vn_mode(0, 4, MODE_CLIENT);
        req[40..48].copy_from_slice(&seq.to_be_bytes());
        if sock.send(&req).is_err() {
            tally.lost += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        let reply = loop {
            match sock.recv(&mut buf) {
                // A late reply to an earlier request: skip it.
                Ok(48) if buf[24..32] != seq.to_be_bytes() => continue,
                Ok(48) => break Some(buf),
                Ok(n) => panic!("reply of {n} bytes"),
                Err(_) => break None,
            }
        };
        let Some(reply) = reply else {
            tally.lost += 1;
            continue;
        };
        assert_eq!(mode(reply[0]), MODE_SERVER);
        if reply[0] >> 6 == 3 {
            tally.unsynchronized += 1;
        }
        let rx = read_be64(&reply, 32);
        let tx = read_be64(&reply, 40);
        if rx <= last_tx || tx <= last_tx || rx <= last_rx {
            tally.backwards.push(format!(
                "#{}: rx {rx:#x} tx {tx:#x} after rx {last_rx:#x} tx {last_tx:#x}",
                tally.answered
            ));
        }
        last_rx = rx;
        last_tx = tx;
        tally.answered += 1;
    }
    tally
}

fn rand_low() -> u64 {
    (std::process::id() as u64) << 24
}
