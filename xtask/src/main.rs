//! `cargo xtask setup | build | run | test`: everything a fresh machine needs, in one place.

mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "ntp-xdp developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly + rust-src, LLVM 22 dev files, bpf-linker, test tools.
    Setup,
    /// Set up, then build the daemon (with the eBPF object embedded) in release mode.
    Build,
    /// Set up, build, and run the responder on a demo guest/VIP namespace pair (foreground).
    Run {
        /// Extra arguments for `ntp-user serve` (e.g. `-- --xdp-mode generic`).
        #[arg(last = true)]
        serve_args: Vec<String>,
    },
    /// Set up, then run every test: unit tests, kernel fixtures, end-to-end in namespaces.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => setup::setup().and_then(|()| build(true)).map(|_| ()),
        Task::Run { serve_args } => run_demo(&serve_args),
        Task::Test { filter } => test(filter.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (BPF, network namespaces, XDP); run it as root or with sudo");
    }
    Ok(())
}

/// Builds ntp-user; returns the binary's path.
fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "ntp-user"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("ntp-user"))
}

fn test(filter: Option<&str>) -> Result<()> {
    setup::setup()?;
    require_root("cargo xtask test")?;
    let bin = build(false)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "ntp-ebpf",
        ])
        .env("NTP_USER_BIN", &bin)
        .stdout(std::process::Stdio::piped());
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = TestTotals::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let exit = child.wait()?;
    // One closing line for the whole suite (cargo prints one per test binary).
    println!(
        "\nsummary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !exit.success() || totals.failed > 0 {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    /// Adds a libtest line such as `test result: ok. 27 passed; 0 failed; 1 ignored; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (n, what) = match words.as_slice() {
                [.., n, what] => (n.parse::<u64>().unwrap_or(0), *what),
                _ => continue,
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn totals_from_libtest_lines() {
        let mut t = TestTotals::default();
        t.add("test result: ok. 27 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("running 5 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (30, 2, 1));
    }
}

/// The demo's fixed names and addresses: an embedded default that works on a fresh machine.
const DEMO_VIP_NS: &str = "ntpxdp-vip";
const DEMO_GUEST_NS: &str = "ntpxdp-guest";
const DEMO_VIP_IF: &str = "ntpxdp-v0";
const DEMO_GUEST_IF: &str = "ntpxdp-g0";
const DEMO_SERVICE_V4: &str = "169.254.100.1";
const DEMO_GUEST_V4: &str = "169.254.100.2";
const DEMO_SERVICE_V6: &str = "fd00:ec2:100::1";
const DEMO_GUEST_V6: &str = "fd00:ec2:100::2";
const CLOCK_V4: &str = "169.254.169.123";
const CLOCK_V6: &str = "fd00:ec2::123";

fn ip(args: &[&str]) -> Result<()> {
    status(Command::new("ip").args(args))
}

/// `ip -n NS ARGS...`
fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    status(Command::new("ip").args(["-n", ns]).args(args))
}

/// Removes the demo namespaces (and with them the veth), whatever state they are in.
struct DemoTopology;

impl DemoTopology {
    fn create() -> Result<DemoTopology> {
        Self::remove();
        let t = DemoTopology;
        ip(&["netns", "add", DEMO_VIP_NS])?;
        ip(&["netns", "add", DEMO_GUEST_NS])?;
        ip(&[
            "link",
            "add",
            DEMO_VIP_IF,
            "netns",
            DEMO_VIP_NS,
            "type",
            "veth",
            "peer",
            "name",
            DEMO_GUEST_IF,
            "netns",
            DEMO_GUEST_NS,
        ])?;
        let v = |args: &[&str]| ip_in(DEMO_VIP_NS, args);
        v(&["link", "set", "lo", "up"])?;
        v(&[
            "addr",
            "add",
            &format!("{DEMO_SERVICE_V4}/24"),
            "dev",
            DEMO_VIP_IF,
        ])?;
        v(&["addr", "add", &format!("{CLOCK_V4}/32"), "dev", DEMO_VIP_IF])?;
        v(&[
            "addr",
            "add",
            &format!("{DEMO_SERVICE_V6}/64"),
            "dev",
            DEMO_VIP_IF,
            "nodad",
        ])?;
        v(&[
            "addr",
            "add",
            &format!("{CLOCK_V6}/128"),
            "dev",
            DEMO_VIP_IF,
            "nodad",
        ])?;
        v(&["link", "set", DEMO_VIP_IF, "up"])?;
        let g = |args: &[&str]| ip_in(DEMO_GUEST_NS, args);
        g(&["link", "set", "lo", "up"])?;
        g(&[
            "addr",
            "add",
            &format!("{DEMO_GUEST_V4}/24"),
            "dev",
            DEMO_GUEST_IF,
        ])?;
        g(&[
            "addr",
            "add",
            &format!("{DEMO_GUEST_V6}/64"),
            "dev",
            DEMO_GUEST_IF,
            "nodad",
        ])?;
        g(&["link", "set", DEMO_GUEST_IF, "up"])?;
        g(&[
            "route",
            "add",
            &format!("{CLOCK_V4}/32"),
            "via",
            DEMO_SERVICE_V4,
        ])?;
        g(&[
            "-6",
            "route",
            "add",
            &format!("{CLOCK_V6}/128"),
            "via",
            DEMO_SERVICE_V6,
        ])?;
        Ok(t)
    }

    fn remove() {
        for ns in [DEMO_VIP_NS, DEMO_GUEST_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for DemoTopology {
    fn drop(&mut self) {
        Self::remove();
    }
}

fn run_demo(serve_args: &[String]) -> Result<()> {
    setup::setup()?;
    require_root("cargo xtask run")?;
    let bin = build(true)?;
    let topology = DemoTopology::create()?;
    eprintln!(
        "xtask: demo guest namespace {DEMO_GUEST_NS} routes {CLOCK_V4} and {CLOCK_V6} to \
         {DEMO_VIP_NS}, where the responder answers. Try, in another shell:\n  \
         ip netns exec {DEMO_GUEST_NS} ntpdig {CLOCK_V4}\n  \
         ip netns exec {DEMO_GUEST_NS} ntpdig {CLOCK_V6}\n  \
         {} stats\nCtrl-C stops the responder and removes the namespaces.",
        bin.display()
    );
    // Ctrl-C reaches the whole foreground group: the daemon detaches, and we stay alive to
    // remove the namespaces afterwards.
    // SAFETY: replacing the SIGINT disposition with SIG_IGN has no handler to be unsafe in.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .context("ignoring SIGINT")?;
    let mut cmd = Command::new(&bin);
    if serve_args.is_empty() {
        // The embedded default config (ntp-user/src/default-config.toml) names the same
        // namespace and interface as this demo.
        cmd.arg("run");
    } else {
        cmd.args(["serve", "--netns", DEMO_VIP_NS, "--interface", DEMO_VIP_IF])
            .args(["--address", CLOCK_V4, "--address", CLOCK_V6])
            .args(serve_args);
    }
    // The child must not inherit SIG_IGN, or Ctrl-C would not reach it.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::SigHandler::SigDfl,
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        });
    }
    let result = status(&mut cmd);
    drop(topology);
    eprintln!("xtask: demo namespaces removed");
    result
}
