//! chronyd, as a server in a namespace and as a query-only client, and ntpdig: never able to
//! set the clock (no CAP_SYS_TIME; a server also `-x`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::Netns;
use crate::TempDir;

/// A chronyd serving its (this machine's) clock as `local stratum N`, never touching the clock
/// (`-x`, and no CAP_SYS_TIME), with its own pidfile and no command socket.
pub struct ChronyServer {
    child: Child,
    /// Its config and pidfile, removed after it stops.
    _dir: TempDir,
}

impl ChronyServer {
    pub fn start(ns: &Netns, stratum: u8) -> Result<ChronyServer> {
        Self::start_with(ns, &format!("local stratum {stratum}\nallow\n"))
    }

    /// chronyd with `config` (directives) plus its own pidfile and no command socket.
    pub fn start_with(ns: &Netns, config: &str) -> Result<ChronyServer> {
        let dir = TempDir::new("chronysrv")?;
        let conf = dir.0.join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "{config}pidfile {d}/chronyd.pid\ncmdport 0\nbindcmdaddress /\n",
                d = dir.0.display()
            ),
        )?;
        let child = ns
            .command("setpriv")
            .args([
                "--bounding-set",
                "-sys_time",
                "chronyd",
                "-x",
                "-u",
                "root",
                "-d",
                "-f",
            ])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chronyd")?;
        Ok(ChronyServer { child, _dir: dir })
    }

    /// chronyd's process ID (`ip netns exec` and `setpriv` exec, so it keeps the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for ChronyServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// setpriv's arguments that take CAP_SYS_TIME out of a program's reach for good.
pub const NO_SYS_TIME: [&str; 2] = ["--bounding-set", "-sys_time"];

/// Wraps a client so that even a misbehaving one cannot set the clock.
pub fn no_sys_time(ns: &Netns, program: &str) -> Command {
    let mut c = ns.command("setpriv");
    c.args(NO_SYS_TIME).arg(program);
    c
}

#[derive(Debug, Clone, PartialEq)]
pub struct NtpdigReply {
    pub offset_s: f64,
    pub stratum: u8,
    pub leap: String,
}

/// The best of three `ntpdig` queries (the smallest |offset|): one sample on a loaded 2-core
/// machine can carry a millisecond of scheduling delay on one leg, which is the measurement's
/// error, not the server's; NTP clients keep the best of several samples for that reason.
pub fn ntpdig_best_of_3(ns: &Netns, addr: &str) -> Result<NtpdigReply> {
    let mut best: Option<NtpdigReply> = None;
    for _ in 0..3 {
        let r = ntpdig(ns, addr)?;
        if best
            .as_ref()
            .is_none_or(|b| r.offset_s.abs() < b.offset_s.abs())
        {
            best = Some(r);
        }
    }
    Ok(best.expect("three samples"))
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
    /// The measurement's offset from the log (4 significant digits, where the "wrong by" line
    /// prints whole microseconds), in the same sense as `offset_s`.
    pub logged_offset_s: f64,
}

/// One `chronyd -Q` query (the strictest client: it exits 1 on any invalid reply), with the
/// measurements log kept to read the stratum, leap and refid it saw.
pub fn chronyd_query(ns: &Netns, addr: &str) -> Result<ChronyMeasurement> {
    let dir = TempDir::new("chrony")?;
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
        logged_offset_s: f[11].parse().context("offset column")?,
    })
}

/// A guest's chronyd following `addr` as a guest's would (polling every second), under `-x`
/// and without CAP_SYS_TIME: it never touches the clock. Its command socket lets `chronyc
/// tracking` read what it makes of the server, as ClockBound does. The socket is chrony's
/// standard /run/chrony/chronyd.sock (the only one ClockBound knows) in a /run of its own: a
/// mount namespace with a tmpfs on /run, so the machine's /run/chrony is never touched.
pub struct ChronyTracker {
    child: Child,
    /// Its config and pid file, removed with it.
    _dir: TempDir,
}

/// `chronyc tracking`, the figures an error bound is made of (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Tracking {
    pub stratum: u8,
    /// How far chronyd thinks the system clock is from NTP time.
    pub system_time_s: f64,
    pub last_offset_s: f64,
    pub root_delay_s: f64,
    pub root_dispersion_s: f64,
    pub leap: String,
}

impl Tracking {
    /// The bound the server's replies give the guest, with the guest's own path added.
    pub fn root_distance_s(&self) -> f64 {
        self.root_delay_s / 2.0 + self.root_dispersion_s
    }

    /// ClockBound's clock error bound (without its drift allowance, which only widens it).
    pub fn clockbound_s(&self) -> f64 {
        self.system_time_s.abs() + self.root_distance_s()
    }
}

impl ChronyTracker {
    pub fn start(ns: &Netns, addr: &str) -> Result<ChronyTracker> {
        let dir = TempDir::new("chronytrk")?;
        let conf = dir.0.join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "server {addr} iburst minpoll 0 maxpoll 0\npidfile {d}/chronyd.pid\n\
                 cmdport 0\nbindcmdaddress /run/chrony/chronyd.sock\n",
                d = dir.0.display()
            ),
        )?;
        // chronyd opens its command socket only in a directory others cannot enter; ClockBound
        // writes its segment in /run/clockbound.
        let private_run = "mount -t tmpfs -o mode=0755 ntpx-run /run && \
                           mkdir -m 0700 /run/chrony /run/clockbound && exec \"$@\"";
        let child = ns
            .command("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .args([private_run, "sh", "setpriv"])
            .args(NO_SYS_TIME)
            .args(["chronyd", "-x", "-u", "root", "-d", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chronyd")?;
        Ok(ChronyTracker { child, _dir: dir })
    }

    /// chronyd's /run as the test sees it (`ip netns exec`, unshare, sh and setpriv each exec
    /// the next, so the child is chronyd itself).
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run", self.pid()))
    }

    /// chronyd's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tracking(&self) -> Result<Tracking> {
        let out = Command::new("chronyc")
            .arg("-h")
            // chronyc binds its own socket beside this path; chronyd, resolving it in its
            // own namespace, finds it there.
            .arg(self.run_dir().join("chrony/chronyd.sock"))
            .args(["-c", "tracking"])
            .output()
            .context("running chronyc")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // Ref-ID,name,stratum,ref time,system time,last offset,RMS offset,frequency,
        // residual frequency,skew,root delay,root dispersion,update interval,leap status
        let f: Vec<&str> = text.trim().split(',').collect();
        if !out.status.success() || f.len() < 14 {
            bail!(
                "chronyc tracking: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let num = |i: usize| -> Result<f64> {
            f[i].parse().with_context(|| format!("field {i} of {text}"))
        };
        Ok(Tracking {
            stratum: f[2].parse().context("stratum")?,
            system_time_s: num(4)?,
            last_offset_s: num(5)?,
            root_delay_s: num(10)?,
            root_dispersion_s: num(11)?,
            leap: f[13].to_string(),
        })
    }
}

impl Drop for ChronyTracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
