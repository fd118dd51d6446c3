//! `ntp-xdp serve` in a child process, its log on a channel.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::Netns;
use crate::topology::Topology;
use crate::{ntp_xdp_bin, CLOCK_V4, CLOCK_V6};

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
        Self::start_in_with(&ntp_xdp_bin(), home, t, mode, extra)
    }

    /// The same with the `ntp-xdp` binary at `bin`.
    pub fn start_in_with(
        bin: &Path,
        home: Option<&Netns>,
        t: &Topology,
        mode: &str,
        extra: &[&str],
    ) -> Result<ServeProcess> {
        let mut cmd = match home {
            Some(ns) => {
                let mut c = ns.command(bin.to_str().ok_or_else(|| anyhow!("path"))?);
                c.arg("serve");
                c
            }
            None => {
                let mut c = Command::new(bin);
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
        Self::spawn_ref(&mut cmd, ready)
    }

    /// [`ServeProcess::spawn`] of a command built in place (`Command::new(..).args(..)`).
    pub fn spawn_ref(cmd: &mut Command, ready: &str) -> Result<ServeProcess> {
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

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}
