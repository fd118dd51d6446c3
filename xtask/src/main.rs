//! `cargo xtask setup | build | run | test`: everything a fresh machine needs, in one place.

mod bench;
mod deb;
mod failover;
mod setup;
mod time_bench;

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
    /// Set up, build, and run the daemon in the foreground with the embedded default config
    /// (it creates its namespace, veth, bridge and DHCP); removes what it created on exit.
    Run {
        /// Extra arguments for `ntp-xdp run` (e.g. `-- --config FILE`).
        #[arg(last = true)]
        run_args: Vec<String>,
    },
    /// Run, plus a guest namespace that gets its route by DHCP (option 121) and queries the
    /// clock address with chronyd -Q; removes everything on exit. With --failover: two
    /// redundant VIP hosts, the master killed while a guest polls; prints the longest gap.
    /// With --fleet: three etcd members and three VIP hosts; overrides, a push, a rolling
    /// push, a rolling restart and `fleet status`, as an operator would.
    Demo {
        #[arg(long, conflicts_with = "fleet")]
        failover: bool,
        #[arg(long)]
        fleet: bool,
    },
    /// Set up, build, and benchmark the responder (generic, native), the userspace path and
    /// chronyd side by side; writes target/bench/{results.json,rate.svg,table.md} and the
    /// summary with the machine as docs/benchmarks/<YYYY-MM-DD>-<flood|time|fleet-scale>.md.
    Bench {
        /// Seconds at tiny rates: checks the harness runs, measures nothing.
        #[arg(long)]
        smoke: bool,
        /// An earlier run's results.json: print the change against it.
        #[arg(long, value_name = "OLD.json")]
        compare: Option<PathBuf>,
        /// Instead of rates: the served time side by side with a chronyd relay on the same
        /// upstreams, as a guest sees it (a few minutes).
        #[arg(long, conflicts_with_all = ["smoke", "compare"])]
        time: bool,
        /// Instead of rates: the fleet's agents as simulated hosts against a real 3-member
        /// etcd (pushes in place, by restart, rolling with a canary; the store's write rate).
        #[arg(long, conflicts_with_all = ["smoke", "compare", "time"])]
        fleet_scale: bool,
        /// With --fleet-scale: how many hosts.
        #[arg(long, requires = "fleet_scale", default_value_t = 300)]
        hosts: usize,
    },
    /// Set up, build in release mode, and package: target/deb/ntp-xdp_VERSION_ARCH.deb.
    Deb,
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
        Task::Run { run_args } => run_daemon(&run_args),
        Task::Demo {
            failover: false,
            fleet: true,
        } => setup::setup()
            .and_then(|()| require_root("cargo xtask demo --fleet"))
            .and_then(|()| build(true))
            .and_then(|bin| fleet_demo(&bin)),
        Task::Demo {
            failover: false,
            fleet: false,
        } => demo(),
        Task::Demo { failover: true, .. } => setup::setup()
            .and_then(|()| require_root("cargo xtask demo --failover"))
            .and_then(|()| build(true))
            .and_then(|bin| failover::demo(&bin)),
        Task::Bench { time: true, .. } => setup::setup()
            .and_then(|()| require_root("cargo xtask bench --time"))
            .and_then(|()| build(true))
            .and_then(|bin| {
                bench::time_bench(&bin, &workspace_root().join("target/bench"), &records_dir())
            }),
        Task::Bench {
            fleet_scale: true,
            hosts,
            ..
        } => setup::setup()
            .and_then(|()| require_root("cargo xtask bench --fleet-scale"))
            .and_then(|()| bench::fleet_scale(hosts, &records_dir())),
        Task::Bench { smoke, compare, .. } => setup::setup()
            .and_then(|()| require_root("cargo xtask bench"))
            .and_then(|()| build(!smoke))
            .and_then(|bin| {
                let dir = workspace_root().join(if smoke {
                    "target/bench-smoke"
                } else {
                    "target/bench"
                });
                // A smoke run measures nothing: its record stays beside its outputs.
                let records = if smoke { dir.clone() } else { records_dir() };
                bench::bench(&bin, &dir, &records, smoke, compare.as_deref())
            }),
        Task::Deb => setup::setup().and_then(|()| build(true)).and_then(|bin| {
            let deb = deb::build_deb(&bin, &workspace_root().join("target/deb"))?;
            println!("{}", deb.display());
            Ok(())
        }),
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

/// Where benchmark runs leave their dated summaries for the documentation to link.
fn records_dir() -> PathBuf {
    workspace_root().join("docs/benchmarks")
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

/// The load generator, built beside ntp-xdp by [`build`].
pub fn loadgen_bin(ntp_user: &Path) -> PathBuf {
    ntp_user.with_file_name("ntp-loadgen")
}

/// `cargo xtask demo --fleet`: the fleet walkthrough (tests/examples/fleet_demo.rs, on the
/// integration tests' fleet harness) against the binary just built.
fn fleet_demo(bin: &Path) -> Result<()> {
    let status = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "run",
            "--quiet",
            "-p",
            "integration-tests",
            "--example",
            "fleet_demo",
        ])
        .env("NTP_XDP_BIN", bin)
        .env("NTP_LOADGEN_BIN", loadgen_bin(bin))
        .status()
        .context("running the fleet demo")?;
    if !status.success() {
        bail!("the fleet demo failed ({status})");
    }
    Ok(())
}

/// Builds the ntp-xdp binary (crate ntp-user) and the load generator; returns its path.
fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "ntp-user", "-p", "ntp-loadgen"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("ntp-xdp"))
}

/// The scratch-root package check's name, as the filter matches it.
const DEBIAN_PACKAGE_TEST: &str = "debian_package";

fn test(filter: Option<&str>) -> Result<()> {
    setup::setup()?;
    require_root("cargo xtask test")?;
    let bin = build(false)?;
    // The package as it ships (release, stripped), for the scratch-root check and the booted
    // test, built once.
    let packaged = match filter {
        Some(f) if !deb::BOOTED_TEST.contains(f) && !DEBIAN_PACKAGE_TEST.contains(f) => None,
        _ => Some(build(true)?),
    };
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "ntp-ebpf",
        ])
        .env("NTP_XDP_BIN", &bin)
        .env("NTP_LOADGEN_BIN", loadgen_bin(&bin))
        .stdout(std::process::Stdio::piped());
    if let Some(release) = &packaged {
        let debs = workspace_root().join("target/deb-booted");
        let deb = deb::build_deb(release, &debs)?;
        // A higher version of the same, for the upgrade.
        let upgrade = deb::build_deb_version(
            release,
            &debs.join("upgrade"),
            concat!(env!("CARGO_PKG_VERSION"), "+upgrade1"),
        )?;
        cmd.env("NTP_XDP_DEB", deb)
            .env("NTP_XDP_DEB_UPGRADE", upgrade)
            .env("NTP_XDP_ROOTFS", deb::debian_rootfs()?);
    }
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    // Its own process group: a suite that runs out of time is stopped whole, test binaries
    // and what they started included.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut totals = TestTotals::default();
    let deadline = std::time::Instant::now() + SUITE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                totals.add(&line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                println!(
                    "test suite_timeout ... FAILED: the suite ran out of its {} minutes; still \
                     running: {:?}",
                    SUITE_TIMEOUT.as_secs() / 60,
                    totals.running
                );
                totals.failed += 1;
                break;
            }
        }
    }
    let exit = child.wait()?;
    // Formatting: `cargo fmt --all -- --check` as one more test.
    if filter.is_none() {
        let fmt = Command::new("cargo")
            .current_dir(workspace_root())
            .args(["fmt", "--all", "--", "--check"])
            .output()
            .context("running cargo fmt")?;
        if fmt.status.success() {
            println!("test fmt_check ... ok");
            totals.passed += 1;
        } else {
            let files: Vec<String> = String::from_utf8_lossy(&fmt.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("Diff in "))
                .map(str::to_string)
                .collect();
            println!(
                "test fmt_check ... FAILED: `cargo fmt --all` would change {files:?} {}",
                String::from_utf8_lossy(&fmt.stderr).trim()
            );
            totals.failed += 1;
        }
    }
    // The benchmark harness's smoke mode: it runs, parses and writes its outputs.
    if filter.is_none() {
        match bench_smoke(&bin) {
            Ok(()) => {
                println!("test bench_smoke ... ok");
                totals.passed += 1;
            }
            Err(e) => {
                println!("test bench_smoke ... FAILED: {e:#}");
                totals.failed += 1;
            }
        }
    }
    // The Debian package: installed into a scratch root, verified, purged.
    if filter.is_none_or(|f| DEBIAN_PACKAGE_TEST.contains(f)) {
        let release = packaged.as_deref().unwrap_or(&bin);
        match deb::check_package(release, &workspace_root().join("target/deb-check")) {
            Ok(()) => {
                println!("test {DEBIAN_PACKAGE_TEST} ... ok");
                totals.passed += 1;
            }
            Err(e) => {
                println!("test {DEBIAN_PACKAGE_TEST} ... FAILED: {e:#}");
                totals.failed += 1;
            }
        }
    }
    // The alerting rules the package ships: promtool's unit tests.
    if filter.is_none_or(|f| "alert_rules".contains(f)) {
        let rules = Command::new("promtool")
            .current_dir(workspace_root().join("xtask/deb/monitoring"))
            .args(["test", "rules", "ntp-xdp.rules.test.yml"])
            .output()
            .context("running promtool")?;
        if rules.status.success() {
            println!("test alert_rules ... ok");
            totals.passed += 1;
        } else {
            println!(
                "test alert_rules ... FAILED: {}{}",
                String::from_utf8_lossy(&rules.stdout),
                String::from_utf8_lossy(&rules.stderr)
            );
            totals.failed += 1;
        }
    }
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

/// `cargo xtask bench --smoke` in miniature, checked: every target measured, outputs written.
fn bench_smoke(bin: &Path) -> Result<()> {
    let dir = workspace_root().join("target/bench-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    bench::bench(bin, &dir, &dir, true, None)?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("results.json"))?)?;
    let targets = v["targets"].as_array().context("no targets")?;
    let names: Vec<&str> = targets.iter().filter_map(|t| t["name"].as_str()).collect();
    if names != ["xdp-generic", "xdp-native", "userspace", "chronyd"] {
        bail!("targets measured: {names:?}");
    }
    for t in targets {
        if t["steps"].as_array().is_none_or(|s| s.is_empty())
            || t["latency"]["rtt_us"]["p50"].as_f64().unwrap_or(0.0) <= 0.0
        {
            bail!("{} has no measurements: {t}", t["name"]);
        }
        // The reply counter on the guest veth saw this target's replies to the flood.
        if t["loss_free_rate"].as_f64().unwrap_or(0.0) <= 0.0
            || t["saturation_replies_per_s"].as_f64().unwrap_or(0.0) <= 0.0
        {
            bail!("no flood replies counted for {}: {t}", t["name"]);
        }
    }
    if v["ceiling"]["all_threads"].as_f64().unwrap_or(0.0) <= 0.0 {
        bail!("the generator's ceiling was not measured: {}", v["ceiling"]);
    }
    if v["micro"].as_array().is_none_or(|m| m.len() < 4) {
        bail!("micro cases missing: {}", v["micro"]);
    }
    // The dated summary: the table and the machine it ran on.
    let record = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-flood.md"))
        .context("no dated <YYYY-MM-DD>-flood.md record")?;
    let text = std::fs::read_to_string(&record)?;
    if !text.contains("load average") || !text.contains("| chronyd |") {
        bail!(
            "{} lacks the machine or the table: {text}",
            record.display()
        );
    }
    let svg = std::fs::read_to_string(dir.join("rate.svg"))?;
    if !svg.contains("<svg") || !svg.contains("chronyd") {
        bail!("rate.svg is not a plot of the targets");
    }
    Ok(())
}

/// The whole suite's time (CI gives a run 90 minutes, set-up and builds included): a test
/// that hangs fails the suite by name instead of eating CI's time silently.
const SUITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(70 * 60);

#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Tests libtest said have been running for over 60 seconds and have not finished yet.
    running: Vec<String>,
}

impl TestTotals {
    /// Adds a libtest line such as `test result: ok. 27 passed; 0 failed; 1 ignored; ...`, and
    /// keeps the names of long-running tests until they finish.
    fn add(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" has been running for over 60 seconds"))
        {
            self.running.push(name.to_string());
        } else if let Some((name, _)) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... "))
        {
            self.running.retain(|r| r != name);
        }
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

/// Names in the embedded default config (ntp-user/src/config/default-config.toml) the demo relies on.
const DEFAULT_BRIDGE: &str = "ntpxdp-br0";
const DEMO_GUEST_NS: &str = "ntpxdp-guest";
const CLOCK_V4: &str = "169.254.169.123";

/// Ignores SIGINT here (Ctrl-C reaches the whole foreground group: the daemon stops, and we
/// stay alive to clean up), and returns a command whose child gets the default back.
fn command_with_default_sigint(program: &Path) -> Result<Command> {
    // SAFETY: replacing the SIGINT disposition with SIG_IGN has no handler to be unsafe in.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .context("ignoring SIGINT")?;
    let mut cmd = Command::new(program);
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
    Ok(cmd)
}

/// `ntp-xdp down` with the same config: removes what the daemon created.
fn down(bin: &Path, run_args: &[String]) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.arg("down");
    if let Some(i) = run_args.iter().position(|a| a == "--config") {
        cmd.args(&run_args[i..(i + 2).min(run_args.len())]);
    }
    status(&mut cmd)
}

/// `cargo xtask run`: the daemon in the foreground with the embedded default config (or the
/// arguments given, e.g. `-- --config FILE`); what it created is removed when it stops.
fn run_daemon(run_args: &[String]) -> Result<()> {
    setup::setup()?;
    require_root("cargo xtask run")?;
    let bin = build(true)?;
    eprintln!(
        "xtask: the daemon creates namespace ntpxdp-vip (clock addresses {CLOCK_V4} and \
         fd00:ec2::123), a veth into bridge {DEFAULT_BRIDGE} and DHCP on 169.254.100.0/24.\n  \
         {} stats        responder counters\n  \
         cargo xtask demo    a guest that gets its route by DHCP and queries the clock\n\
         Ctrl-C stops it; then `ntp-xdp down` removes what it created.",
        bin.display()
    );
    let mut cmd = command_with_default_sigint(&bin)?;
    cmd.arg("run").args(run_args);
    let result = status(&mut cmd);
    let cleaned = down(&bin, run_args);
    result.and(cleaned)
}

/// `cargo xtask demo`: the daemon with the embedded default, a guest namespace on its bridge
/// that gets its address and the option 121 route from dnsmasq with a real DHCP client, then
/// `chronyd -Q` against the clock address from the guest. Removes everything on exit.
fn demo() -> Result<()> {
    use std::io::BufRead as _;
    setup::setup()?;
    require_root("cargo xtask demo")?;
    let bin = build(true)?;
    let mut daemon = Command::new(&bin)
        .arg("run")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting ntp-xdp run")?;
    let stderr = daemon.stderr.take().context("daemon stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("  daemon | {line}");
            if line.contains("responder attached") {
                let _ = tx.send(());
            }
        }
    });
    let result = (|| -> Result<()> {
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .context("the daemon did not attach the responder within 60 s")?;
        // Removed with its bridge port when dropped (one an interrupted demo left, first).
        let guest = testbed::netns::plug_guest(
            None,
            DEFAULT_BRIDGE,
            testbed::Netns::named(DEMO_GUEST_NS)?,
        )?;
        let script = workspace_root().join("tests/assets/udhcpc.sh");
        eprintln!("xtask: guest {DEMO_GUEST_NS}: DHCP (busybox udhcpc)");
        status(
            guest
                .command("busybox")
                .args(["udhcpc", "-i", "eth0"])
                .args([
                    "-f",
                    "-q",
                    "-n",
                    "-t",
                    "10",
                    "-T",
                    "1",
                    "-O",
                    "staticroutes",
                    "-s",
                ])
                .arg(&script),
        )?;
        eprintln!("xtask: guest routes:");
        eprint!("{}", guest.ip(&["route"])?);
        eprintln!("xtask: chronyd -Q {CLOCK_V4} from the guest (query only, no CAP_SYS_TIME):");
        let dir = testbed::TempDir::new("ntpxdp-demo")?;
        let conf = dir.path().join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "server {CLOCK_V4} iburst\npidfile {d}/chronyd.pid\ncmdport 0\nbindcmdaddress /\n",
                d = dir.path().display()
            ),
        )?;
        status(
            testbed::chrony::no_sys_time(&guest, "chronyd")
                .args(["-u", "root", "-Q", "-t", "10", "-f"])
                .arg(&conf),
        )
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    let cleaned = down(&bin, &[]);
    eprintln!("xtask: demo removed");
    result.and(cleaned)
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
