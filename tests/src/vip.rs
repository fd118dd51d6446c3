//! A VIP host in a test namespace: the daemon runs there (as on the host's initial namespace)
//! from a config with a `[vip]` section, so it creates its own service namespace, veth, bridge
//! and addresses. Guests are namespaces on that bridge.
//!
//! The daemon is started by entering the host namespace with setns only (not `ip netns exec`,
//! which also remounts /sys and would hide the bpffs its pins live in).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::topology::{Netns, ServeProcess};
use crate::{ip, ntp_xdp_bin, run, unique_name, CLOCK_V4, CLOCK_V6};
pub use testbed::netns::{configure_guest, guest_on_bridge, in_netns};

/// The udhcpc event script test guests (and `cargo xtask demo`) use: the address, then the
/// option 121 routes (RFC 3442), else option 3. Prints what it applied.
pub const UDHCPC_SCRIPT: &str = include_str!("../assets/udhcpc.sh");

pub struct VipOptions {
    /// 169.254.<subnet>.0/24 is the service subnet.
    pub subnet: u8,
    pub dhcp: bool,
    pub repair_interval: &'static str,
    pub xdp_mode: &'static str,
    /// Lines for the `[clock]` section, and any further sections (e.g. `[[upstream]]`).
    pub clock_toml: String,
    /// A physical host of the cluster: a namespace on a host interface (169.254.<subnet+50>.0/24,
    /// the VIP host at .1), which the daemon serves too (`vip.host_interfaces`).
    pub physical_host: bool,
    /// Router advertisements with the IPv6 clock route (radvd).
    pub ipv6_ra: bool,
}

impl Default for VipOptions {
    fn default() -> Self {
        VipOptions {
            subnet: 60,
            dhcp: false,
            repair_interval: "300ms",
            xdp_mode: "auto",
            clock_toml: String::new(),
            physical_host: false,
            ipv6_ra: false,
        }
    }
}

pub struct VipHost {
    /// The VIP host's own namespace (where the daemon runs, the bridge and host veth end live).
    pub home: Netns,
    /// The service namespace the daemon creates.
    pub netns: String,
    pub ns_if: String,
    pub host_if: String,
    pub bridge: String,
    pub subnet: u8,
    pub config: PathBuf,
    /// The physical host namespace, the VIP host's address facing it and its interface there.
    pub physical: Option<(Netns, String, String)>,
    dir: PathBuf,
    daemon: Option<ServeProcess>,
}

impl VipHost {
    /// Writes the config and starts the daemon; returns once the responder is attached.
    pub fn start(opts: VipOptions) -> Result<VipHost> {
        let home = Netns::new("ntg")?;
        let dir = std::env::temp_dir().join(unique_name("ntpxdp-vip"));
        std::fs::create_dir_all(&dir)?;
        let s = opts.subnet;
        let mut host = VipHost {
            home,
            netns: unique_name("ntv"),
            ns_if: unique_name("nv"),
            host_if: unique_name("nh"),
            bridge: unique_name("nb"),
            subnet: s,
            config: dir.join("ntp-xdp.toml"),
            physical: None,
            dir,
            daemon: None,
        };
        let (mut host_interfaces, mut internal_addr) = (String::new(), String::new());
        if opts.physical_host {
            let p = Netns::new("ntg")?;
            let (h_if, p_if) = (unique_name("ni"), unique_name("ni"));
            let net = s.wrapping_add(50);
            ip(&[
                "link",
                "add",
                &h_if,
                "netns",
                &host.home.name,
                "type",
                "veth",
                "peer",
                "name",
                &p_if,
                "netns",
                &p.name,
            ])?;
            host.home
                .ip(&["addr", "add", &format!("169.254.{net}.1/24"), "dev", &h_if])?;
            host.home.ip(&["link", "set", &h_if, "up"])?;
            p.ip(&["addr", "add", &format!("169.254.{net}.2/24"), "dev", &p_if])?;
            p.ip(&["link", "set", &p_if, "up"])?;
            host_interfaces = format!("host_interfaces = [\"{h_if}\"]");
            internal_addr = format!(", \"169.254.{net}.1\"");
            host.physical = Some((p, format!("169.254.{net}.1"), h_if));
        }
        let config = format!(
            r#"[service]
netns = "{netns}"
interface = "{ns_if}"
addresses = ["{CLOCK_V4}", "{CLOCK_V6}"{internal_addr}]
xdp_mode = "{mode}"

[vip]
host_interface = "{host_if}"
bridge = "{bridge}"
create_bridge = true
service_address = "169.254.{s}.1/24"
service_address6 = "fd00:ec2:{s}::1/64"
repair_interval = "{repair}"
routes = [{{ to = "169.254.{r}.0/24", via = "169.254.{s}.254" }}]
{host_interfaces}
ipv6_route_advertisements = {ra}

[dhcp]
enable = {dhcp}
range = ["169.254.{s}.100", "169.254.{s}.150"]
router = "169.254.{s}.254"
lease_time = "10m"

{clock}
"#,
            netns = host.netns,
            ns_if = host.ns_if,
            host_if = host.host_if,
            bridge = host.bridge,
            mode = opts.xdp_mode,
            repair = opts.repair_interval,
            r = s.wrapping_add(100),
            dhcp = opts.dhcp,
            ra = opts.ipv6_ra,
            clock = if opts.clock_toml.is_empty() {
                "[clock]\nlocal_stratum = 10".to_string()
            } else {
                opts.clock_toml.clone()
            },
        );
        std::fs::write(&host.config, config)?;
        host.start_daemon()?;
        Ok(host)
    }

    pub fn service_v4(&self) -> String {
        format!("169.254.{}.1", self.subnet)
    }

    /// The route the config asks for inside the namespace.
    pub fn configured_route(&self) -> String {
        format!("169.254.{}.0/24", self.subnet.wrapping_add(100))
    }

    /// `ntp-xdp ARGS` in the host namespace (setns only: same mount namespace and bpffs).
    pub fn ntp_user(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(ntp_xdp_bin());
        cmd.args(args);
        in_netns(cmd, &self.home)
    }

    /// Starts `ntp-xdp run --config` and waits until the responder is attached.
    pub fn start_daemon(&mut self) -> Result<&mut ServeProcess> {
        if self.daemon.is_some() {
            bail!("the daemon is already running");
        }
        let config = self.config.to_string_lossy().into_owned();
        let cmd = self.ntp_user(&["run", "--config", &config])?;
        self.daemon = Some(ServeProcess::spawn(cmd, "responder attached")?);
        Ok(self.daemon.as_mut().unwrap())
    }

    pub fn daemon(&mut self) -> Result<&mut ServeProcess> {
        self.daemon
            .as_mut()
            .ok_or_else(|| anyhow!("the daemon is not running"))
    }

    /// SIGTERM and wait.
    pub fn stop_daemon(&mut self) -> Result<bool> {
        match self.daemon.take() {
            Some(d) => d.stop(),
            None => Ok(true),
        }
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill_daemon(&mut self) -> Result<()> {
        match self.daemon.take() {
            Some(d) => d.kill9(),
            None => Ok(()),
        }
    }

    /// `ntp-xdp down --config`: its output.
    pub fn down(&self) -> Result<String> {
        let config = self.config.to_string_lossy().into_owned();
        run(&mut self.ntp_user(&["down", "--config", &config])?)
    }

    /// `ip -n <service namespace> ARGS`
    pub fn ns_ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.netns];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A guest namespace plugged into the bridge (no address yet).
    pub fn add_guest(&self) -> Result<Netns> {
        guest_on_bridge(&self.home, &self.bridge)
    }

    /// A static address on the service subnet and the route DHCP would give.
    pub fn configure_guest_statically(&self, guest: &Netns, host_octet: u8) -> Result<()> {
        configure_guest(guest, self.subnet, host_octet)
    }

    /// The daemon's report (`ntp-xdp status --json` through its config's control socket).
    pub fn status_report(&self) -> Result<ntp_user::observe::status::StatusReport> {
        let config = self.config.to_string_lossy().into_owned();
        let out = run(&mut self.ntp_user(&["status", "--config", &config, "--json"])?)?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Runs a real DHCP client (busybox udhcpc) in the guest; returns what it printed.
    pub fn dhcp_lease(&self, guest: &Netns) -> Result<String> {
        let script = self.dir.join("udhcpc.sh");
        std::fs::write(&script, UDHCPC_SCRIPT)?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let out = guest
            .command("busybox")
            .args([
                "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "10", "-T", "1",
            ])
            .args(["-O", "staticroutes", "-O", "ntpsrv", "-s"])
            .arg(&script)
            .output()
            .context("running busybox udhcpc")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("udhcpc got no lease ({}): {text}", out.status);
        }
        Ok(text)
    }

    /// Polls `check` until it returns true or `timeout` passes.
    pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if check()? {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for VipHost {
    fn drop(&mut self) {
        let _ = self.stop_daemon();
        let _ = self.down();
        // Whatever `down` could not remove (a failed test may leave anything) goes too.
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir_all(ntp_user::responder::pin_dir(&self.netns));
        let _ = std::fs::remove_dir_all(ntp_user::host::files::state_dir(&self.netns));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes `guest` take routes and an address from router advertisements as a Linux guest set up
/// for IPv6 clock routes does (`accept_ra`, `accept_ra_rt_info_max_plen = 128`, SLAAC), then
/// sets its link down and up so that it solicits a router at once.
pub fn accept_router_advertisements(guest: &Netns) -> Result<()> {
    for (key, value) in [
        ("accept_ra", "1"),
        ("accept_ra_rt_info_max_plen", "128"),
        ("autoconf", "1"),
    ] {
        run(guest
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.eth0.{key}={value}")]))?;
    }
    guest.ip(&["link", "set", "eth0", "down"])?;
    guest.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

/// One router advertisement a guest received.
#[derive(Clone, Debug)]
pub struct RouterAdvert {
    pub at: Instant,
    /// Its IPv6 source (a link-local address of the router).
    pub source: std::net::Ipv6Addr,
    /// The sender's MAC, from the source link-layer address option.
    pub source_mac: Option<[u8; 6]>,
    /// Its Route Information Options (RFC 4191): prefix, length, lifetime in seconds.
    pub routes: Vec<(std::net::Ipv6Addr, u8, u32)>,
}

impl RouterAdvert {
    /// The ICMPv6 message (type 134), or None for anything else.
    pub fn parse(at: Instant, source: std::net::Ipv6Addr, m: &[u8]) -> Option<RouterAdvert> {
        const HEADER: usize = 16;
        if m.len() < HEADER || m[0] != 134 {
            return None;
        }
        let mut ra = RouterAdvert {
            at,
            source,
            source_mac: None,
            routes: Vec::new(),
        };
        let mut opts = &m[HEADER..];
        while opts.len() >= 2 {
            let len = usize::from(opts[1]) * 8;
            if len == 0 || len > opts.len() {
                return None;
            }
            let o = &opts[..len];
            match o[0] {
                1 if len >= 8 => ra.source_mac = o[2..8].try_into().ok(),
                24 if len >= 8 => {
                    let mut prefix = [0u8; 16];
                    let n = (len - 8).min(16);
                    prefix[..n].copy_from_slice(&o[8..8 + n]);
                    let lifetime = u32::from_be_bytes(o[4..8].try_into().ok()?);
                    ra.routes.push((prefix.into(), o[2], lifetime));
                }
                _ => {}
            }
            opts = &opts[len..];
        }
        Some(ra)
    }
}

/// Every router advertisement that reaches a guest's interface, on a raw ICMPv6 socket in its
/// namespace, which also sends a router solicitation every second: any radvd running on the
/// link answers within about a second of being asked (silent ones are asked too).
pub struct RouterAdverts {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<RouterAdvert>>>,
    reader: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RouterAdverts {
    pub fn capture(ns: &Netns, interface: &str) -> Result<RouterAdverts> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        let file = ns.file()?;
        let interface = interface.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen_by_reader = seen.clone();
        let (ready, opened) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || -> Result<()> {
            let open = || -> Result<(OwnedFd, u32)> {
                testbed::netns::enter(&file)?;
                let ifindex = nix::net::if_::if_nametoindex(interface.as_str())
                    .with_context(|| format!("no interface {interface}"))?;
                // SAFETY: a plain socket(2) call; the descriptor is owned at once.
                let raw = unsafe {
                    nix::libc::socket(
                        nix::libc::AF_INET6,
                        nix::libc::SOCK_RAW,
                        nix::libc::IPPROTO_ICMPV6,
                    )
                };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error()).context("socket(ICMPv6)");
                }
                // SAFETY: `raw` is a new descriptor nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let timeout = nix::sys::time::TimeVal::new(0, 100_000);
                nix::sys::socket::setsockopt(
                    &fd,
                    nix::sys::socket::sockopt::ReceiveTimeout,
                    &timeout,
                )?;
                // Neighbour discovery is refused unless its hop limit is 255 (RFC 4861).
                let hops: nix::libc::c_int = 255;
                // SAFETY: the option value is a live c_int of the size given.
                let set = unsafe {
                    nix::libc::setsockopt(
                        fd.as_raw_fd(),
                        nix::libc::IPPROTO_IPV6,
                        nix::libc::IPV6_MULTICAST_HOPS,
                        std::ptr::addr_of!(hops).cast(),
                        std::mem::size_of::<nix::libc::c_int>() as u32,
                    )
                };
                if set < 0 {
                    return Err(std::io::Error::last_os_error()).context("IPV6_MULTICAST_HOPS");
                }
                Ok((fd, ifindex))
            };
            let (fd, ifindex) = match open() {
                Ok(o) => {
                    let _ = ready.send(Ok(()));
                    o
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            // All routers, ff02::2, on this interface.
            // SAFETY: sockaddr_in6 is plain data; zero is a valid starting value.
            let mut routers: nix::libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            routers.sin6_family = nix::libc::AF_INET6 as u16;
            routers.sin6_addr.s6_addr =
                std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2).octets();
            routers.sin6_scope_id = ifindex;
            // Type 133, code 0, checksum (the kernel's), reserved.
            let solicitation = [133u8, 0, 0, 0, 0, 0, 0, 0];
            let mut next_solicitation = Instant::now();
            let mut buf = [0u8; 1500];
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() >= next_solicitation {
                    // A solicitation the kernel refuses is one no router answers.
                    // SAFETY: the buffer and the address outlive the call; lengths are theirs.
                    unsafe {
                        nix::libc::sendto(
                            fd.as_raw_fd(),
                            solicitation.as_ptr().cast(),
                            solicitation.len(),
                            0,
                            std::ptr::addr_of!(routers).cast(),
                            std::mem::size_of::<nix::libc::sockaddr_in6>() as u32,
                        )
                    };
                    next_solicitation += Duration::from_secs(1);
                }
                // SAFETY: sockaddr_in6 is plain data; zero is a valid starting value.
                let mut from: nix::libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<nix::libc::sockaddr_in6>() as u32;
                // SAFETY: the buffer and `from` outlive the call; the kernel writes at most
                // their lengths.
                let n = unsafe {
                    nix::libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        std::ptr::addr_of_mut!(from).cast(),
                        &mut from_len,
                    )
                };
                if n <= 0 {
                    continue;
                }
                let source = std::net::Ipv6Addr::from(from.sin6_addr.s6_addr);
                if let Some(ra) = RouterAdvert::parse(Instant::now(), source, &buf[..n as usize]) {
                    seen_by_reader
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ra);
                }
            }
            Ok(())
        });
        opened
            .recv()
            .context("the capture thread ended")?
            .map_err(|e| anyhow!(e))?;
        Ok(RouterAdverts {
            stop,
            seen,
            reader: Some(reader),
        })
    }

    /// What was received so far, in order.
    pub fn received(&self) -> Vec<RouterAdvert> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops capturing; what was received, in order.
    pub fn finish(mut self) -> Result<Vec<RouterAdvert>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.reader
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow!("the capture thread panicked"))??;
        Ok(self.received())
    }
}

impl Drop for RouterAdverts {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
