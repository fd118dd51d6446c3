//! A guest namespace and a VIP namespace joined by a veth, as on a VIP host: the VIP side holds
//! a service address and the clock aliases; the guest routes the clock addresses via the
//! service address.

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{ip, ntp_user_bin, unique_name, CLOCK_V4, CLOCK_V6};

/// Joins two namespaces with a veth: `a_addr` and `b_addr` are CIDR addresses.
pub fn link_namespaces(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> Result<()> {
    let a_if = unique_name("la");
    let b_if = unique_name("lb");
    ip(&[
        "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
        &b.name,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", &a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", &b_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    Ok(())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn file(&self) -> Result<File> {
        File::open(format!("/run/netns/{}", self.name)).context("opening the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it and with it the peer.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Guest ↔ VIP over one veth.
pub struct Topology {
    pub guest: Netns,
    pub vip: Netns,
    pub vip_if: String,
    pub guest_if: String,
    pub service_v4: String,
    pub guest_v4: String,
    pub service_v6: String,
    pub guest_v6: String,
}

impl Topology {
    /// `subnet` picks 169.254.<subnet>.0/24 and fd00:ec2:<subnet>::/64 for the link.
    pub fn new(subnet: u8) -> Result<Topology> {
        let guest = Netns::new("ntg")?;
        let vip = Netns::new("ntv")?;
        let vip_if = unique_name("nv");
        let guest_if = unique_name("ng");
        ip(&[
            "link",
            "add",
            &vip_if,
            "netns",
            &vip.name,
            "type",
            "veth",
            "peer",
            "name",
            &guest_if,
            "netns",
            &guest.name,
        ])?;
        let t = Topology {
            service_v4: format!("169.254.{subnet}.1"),
            guest_v4: format!("169.254.{subnet}.2"),
            service_v6: format!("fd00:ec2:{subnet}::1"),
            guest_v6: format!("fd00:ec2:{subnet}::2"),
            guest,
            vip,
            vip_if,
            guest_if,
        };
        let v = &t.vip;
        v.ip(&[
            "addr",
            "add",
            &format!("{}/24", t.service_v4),
            "dev",
            &t.vip_if,
        ])?;
        v.ip(&["addr", "add", &format!("{CLOCK_V4}/32"), "dev", &t.vip_if])?;
        v.ip(&[
            "addr",
            "add",
            &format!("{}/64", t.service_v6),
            "dev",
            &t.vip_if,
            "nodad",
        ])?;
        v.ip(&[
            "addr",
            "add",
            &format!("{CLOCK_V6}/128"),
            "dev",
            &t.vip_if,
            "nodad",
        ])?;
        v.ip(&["link", "set", &t.vip_if, "up"])?;
        let g = &t.guest;
        g.ip(&[
            "addr",
            "add",
            &format!("{}/24", t.guest_v4),
            "dev",
            &t.guest_if,
        ])?;
        g.ip(&[
            "addr",
            "add",
            &format!("{}/64", t.guest_v6),
            "dev",
            &t.guest_if,
            "nodad",
        ])?;
        g.ip(&["link", "set", &t.guest_if, "up"])?;
        // What DHCP option 121 gives a guest: the clock address via the service address.
        g.ip(&[
            "route",
            "add",
            &format!("{CLOCK_V4}/32"),
            "via",
            &t.service_v4,
        ])?;
        g.ip(&[
            "-6",
            "route",
            "add",
            &format!("{CLOCK_V6}/128"),
            "via",
            &t.service_v6,
        ])?;
        Ok(t)
    }

    /// Whether any XDP program is attached to the VIP end or the guest end.
    pub fn xdp_attached(&self) -> Result<(bool, bool)> {
        let v = self.vip.ip(&["link", "show", &self.vip_if])?;
        let g = self.guest.ip(&["link", "show", &self.guest_if])?;
        Ok((v.contains("prog/xdp"), g.contains("prog/xdp")))
    }
}

/// `ntp-xdp serve` running in the foreground of a child process; SIGTERM on drop.
pub struct ServeProcess {
    child: Child,
    pub log: mpsc::Receiver<String>,
    /// The "responder attached" log line (mode, peer, program id).
    pub attached: String,
}

impl ServeProcess {
    /// Starts `ntp-xdp serve` on the topology's VIP end and waits until it says it attached.
    pub fn start(t: &Topology, mode: &str, extra: &[&str]) -> Result<ServeProcess> {
        Self::start_in(None, t, mode, extra)
    }

    /// The same, with the daemon itself running in `home` (the VIP host's own namespace, where
    /// its upstreams are reachable).
    pub fn start_in(
        home: Option<&Netns>,
        t: &Topology,
        mode: &str,
        extra: &[&str],
    ) -> Result<ServeProcess> {
        let mut cmd = match home {
            Some(ns) => {
                let mut c = ns.command(ntp_user_bin().to_str().ok_or_else(|| anyhow!("path"))?);
                c.arg("serve");
                c
            }
            None => {
                let mut c = Command::new(ntp_user_bin());
                c.arg("serve");
                c
            }
        };
        cmd.args(["--netns", &t.vip.name, "--interface", &t.vip_if])
            .args([
                "--address",
                CLOCK_V4,
                "--address",
                CLOCK_V6,
                "--xdp-mode",
                mode,
            ])
            .args(extra);
        ServeProcess::spawn(cmd, "responder attached")
    }

    /// Runs `cmd` (an ntp-xdp command) with its log on a channel, and waits for `ready` in it.
    pub fn spawn(mut cmd: Command, ready: &str) -> Result<ServeProcess> {
        cmd.env(
            "RUST_LOG",
            std::env::var("NTPX_SERVE_LOG")
                .unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
        )
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning ntp-xdp")?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut serve = ServeProcess {
            child,
            log: rx,
            attached: String::new(),
        };
        serve.attached = serve.wait_for_line(ready, Duration::from_secs(30))?;
        Ok(serve)
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Log lines received so far (without waiting).
    pub fn drain_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// The BPF program id the serve process logged.
    pub fn program_id(&self) -> Result<u32> {
        self.attached
            .split("program_id=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no program_id in {:?}", self.attached))
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => {
                    let status = self.child.try_wait()?;
                    bail!(
                        "no {needle:?} from ntp-xdp serve (exit: {status:?}); log:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn stop(mut self) -> Result<bool> {
        self.terminate()
    }

    /// The process ID (to signal it: SIGSTOP for a frozen daemon).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn terminate(&mut self) -> Result<bool> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status.success());
        }
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(false)
    }
}

/// A chronyd serving its (this machine's) clock as `local stratum N`, never touching the clock
/// (`-x`, and no CAP_SYS_TIME), with its own pidfile and no command socket.
pub struct ChronyServer {
    child: Child,
    dir: std::path::PathBuf,
}

impl ChronyServer {
    pub fn start(ns: &Netns, stratum: u8) -> Result<ChronyServer> {
        Self::start_with(ns, &format!("local stratum {stratum}\nallow\n"))
    }

    /// chronyd with `config` (directives) plus its own pidfile and no command socket.
    pub fn start_with(ns: &Netns, config: &str) -> Result<ChronyServer> {
        let dir = std::env::temp_dir().join(unique_name("chronysrv"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "{config}pidfile {d}/chronyd.pid\ncmdport 0\nbindcmdaddress /\n",
                d = dir.display()
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
        Ok(ChronyServer { child, dir })
    }

    pub fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for ChronyServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// A small NTP server in `ns` that answers every client request with the host's clock plus a
/// fixed offset: an upstream whose time is wrong by a known amount (chronyd cannot serve a
/// clock other than its own). It states stratum 2 and a 15 µs root dispersion, as an honest
/// server would.
pub struct OffsetServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OffsetServer {
    pub fn start(ns: &Netns, offset_ns: i64) -> Result<OffsetServer> {
        use ntp_common::packet::NtpHeader;
        use ntp_common::time::{ntp_ns_to_timestamp, unix_ns_to_ntp_ns};
        use ntp_common::wire::{MODE_CLIENT, MODE_SERVER};
        let file = ns.file()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let bound = ntp_user::host::netns::enter(&file)
                .and_then(|_| Ok(std::net::UdpSocket::bind("0.0.0.0:123")?))
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(100)))?;
                    Ok(s)
                });
            let sock = match bound {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let now = || {
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                unix_ns_to_ntp_ns(unix).wrapping_add_signed(offset_ns)
            };
            let mut buf = [0u8; 512];
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let received = now();
                let Some(req) = NtpHeader::parse(&buf[..n]).filter(|h| h.mode == MODE_CLIENT)
                else {
                    continue;
                };
                let reply = NtpHeader {
                    version: req.version.clamp(1, 4),
                    mode: MODE_SERVER,
                    stratum: 2,
                    poll: req.poll,
                    precision: -20,
                    refid: *b"OFST",
                    root_delay: 0,
                    root_dispersion: 1,
                    reference_ts: ntp_ns_to_timestamp(received - 1_000_000_000),
                    origin_ts: req.transmit_ts,
                    receive_ts: ntp_ns_to_timestamp(received),
                    transmit_ts: ntp_ns_to_timestamp(now()),
                    leap: 0,
                };
                let _ = sock.send_to(&reply.serialize(), from);
            }
        });
        ready_rx
            .recv()
            .context("the offset server's thread ended")?
            .context("binding the offset server")?;
        Ok(OffsetServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for OffsetServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
