//! `cargo xtask bench`: the same load generator (`ntp-loadgen run`) against four servers on
//! one guest → VIP veth, in one run: the XDP responder in generic and in native mode, the
//! daemon's userspace path (`--xdp-mode off`), and chronyd from Debian as a plain server.
//! Writes target/bench/results.json, target/bench/rate.svg and prints a table with ratios to
//! chronyd. `--smoke` runs seconds at tiny rates: it checks the harness, not the speed.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;

const CLOCK: &str = "169.254.169.123";

/// One step of the rate search.
#[derive(Debug, Clone, Serialize)]
struct Step {
    offered: f64,
    /// What the generator really sent (it is the bottleneck when this falls short).
    sent_per_s: f64,
    replies_per_s: f64,
    loss: f64,
    rtt_p99_us: f64,
    /// Server CPU per reply in this step (ns): BPF run time for XDP targets, process CPU for
    /// userspace servers.
    cpu_ns_per_reply: f64,
    softirq_ns_per_reply: f64,
}

#[derive(Debug, Clone, Serialize)]
struct TargetResult {
    name: String,
    steps: Vec<Step>,
    /// Highest rate sent with < 0.1 % loss.
    loss_free_rate: f64,
    /// The generator could not send more: the target's limit is above `loss_free_rate`.
    generator_bound: bool,
    saturation_replies_per_s: f64,
    cpu_ns_per_reply: f64,
    softirq_ns_per_reply: f64,
    /// At the first (moderate) rate, the same for every target.
    latency: Value,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    smoke: bool,
    targets: Vec<TargetResult>,
    micro: Value,
}

/// Namespaces of the run, removed on drop; bpf_stats restored on drop.
struct Topology {
    guest: String,
    vip: String,
    bpf_stats_before: Option<String>,
}

impl Topology {
    fn create() -> Result<Topology> {
        let pid = std::process::id() % 100_000;
        let t = Topology {
            guest: format!("ntgb{pid}"),
            vip: format!("ntvb{pid}"),
            bpf_stats_before: std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok(),
        };
        let ip = |args: &[&str]| crate::status(Command::new("ip").args(args));
        ip(&["netns", "add", &t.guest])?;
        ip(&["netns", "add", &t.vip])?;
        ip(&[
            "link", "add", "bv0", "netns", &t.vip, "type", "veth", "peer", "name", "bg0", "netns",
            &t.guest,
        ])?;
        let (v, g) = (t.vip.as_str(), t.guest.as_str());
        ip(&["-n", v, "addr", "add", "169.254.220.1/24", "dev", "bv0"])?;
        ip(&["-n", v, "addr", "add", &format!("{CLOCK}/32"), "dev", "bv0"])?;
        ip(&["-n", v, "link", "set", "bv0", "up"])?;
        ip(&["-n", v, "link", "set", "lo", "up"])?;
        ip(&["-n", g, "addr", "add", "169.254.220.2/24", "dev", "bg0"])?;
        ip(&["-n", g, "link", "set", "bg0", "up"])?;
        ip(&["-n", g, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            g,
            "route",
            "add",
            &format!("{CLOCK}/32"),
            "via",
            "169.254.220.1",
        ])?;
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
            .context("enabling kernel.bpf_stats_enabled")?;
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.guest, &self.vip] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if let Some(v) = &self.bpf_stats_before {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", v.trim());
        }
    }
}

/// A server under test, stopped on drop.
struct Server {
    child: Child,
    /// XDP targets: the responder's program ID (CPU from BPF stats).
    program_id: Option<u32>,
    _dir: Option<TempDir>,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn start_ntp_user(bin: &Path, t: &Topology, mode: &str) -> Result<Server> {
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--netns",
            &t.vip,
            "--interface",
            "bv0",
            "--address",
            CLOCK,
        ])
        .args([
            "--xdp-mode",
            mode,
            "--stratum",
            "2",
            "--peer-netns",
            &t.guest,
            // One generator address: per-source limiting would measure the limiter.
            "--no-rate-limit",
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,netlink_packet_route=error")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ntp-user serve")?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let attached = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("responder attached") => break l,
            Some(Ok(_)) => continue,
            _ => bail!("ntp-user serve --xdp-mode {mode} exited before attaching"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let program_id = if mode == "off" {
        None
    } else {
        attached
            .split("program_id=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
    };
    Ok(Server {
        child,
        program_id,
        _dir: None,
    })
}

fn start_chronyd(t: &Topology) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("ntpxdp-bench-chrony-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("chrony.conf");
    // A plain server: its own clock as local stratum, every client allowed, no rate limit
    // (chrony limits nothing unless `ratelimit` is given), private pidfile, no command socket.
    std::fs::write(
        &conf,
        format!(
            "local stratum 2\nallow\npidfile {d}/chronyd.pid\ncmdport 0\nbindcmdaddress /\n",
            d = dir.display()
        ),
    )?;
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.vip,
            "setpriv",
            "--bounding-set",
            "-sys_time",
        ])
        .args(["chronyd", "-x", "-u", "root", "-d", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting chronyd")?;
    Ok(Server {
        child,
        program_id: None,
        _dir: Some(TempDir(dir)),
    })
}

fn loadgen(bin: &Path, t: &Topology, rate: Option<f64>, duration: Duration) -> Result<Value> {
    let mut cmd = Command::new(crate::loadgen_bin(bin));
    cmd.args([
        "run",
        "--target",
        &format!("{CLOCK}:123"),
        "--netns",
        &t.guest,
    ])
    .args([
        "--threads",
        "1",
        "--duration",
        &format!("{}ms", duration.as_millis()),
    ]);
    match rate {
        Some(r) => cmd.args(["--rate", &format!("{}", r as u64)]),
        None => cmd.args(["--window", "256"]),
    };
    let out = cmd.output().context("running ntp-loadgen run")?;
    if !out.status.success() {
        bail!("loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("loadgen output")
}

/// CPU time a process has run, over all its threads (ns, from schedstat).
/// (`ip netns exec` and `setpriv` exec, so chronyd keeps the child's pid.)
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Total run time of a BPF program (kernel.bpf_stats_enabled must be on).
fn bpf_run_time_ns(program_id: u32) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &program_id.to_string(), "-j"])
        .output()
        .context("running bpftool")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool output")?;
    Ok(v["run_time_ns"].as_u64().unwrap_or(0))
}

/// Softirq time over all CPUs (ns), from /proc/stat.
fn softirq_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    ticks * 1_000_000_000 / hz
}

fn server_cpu_ns(s: &Server) -> Result<u64> {
    match s.program_id {
        Some(id) => bpf_run_time_ns(id),
        None => Ok(process_cpu_ns(s.child.id())),
    }
}

fn measure(bin: &Path, t: &Topology, name: &str, s: &Server, smoke: bool) -> Result<TargetResult> {
    // Wait until it answers at all (chronyd needs a moment).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let probe = loadgen(bin, t, Some(100.0), Duration::from_millis(300))?;
        if probe["valid"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{name} does not answer");
        }
    }
    let (rates, step): (Vec<f64>, Duration) = if smoke {
        (vec![200.0, 1000.0], Duration::from_millis(300))
    } else {
        (
            vec![
                10e3, 25e3, 50e3, 75e3, 100e3, 150e3, 200e3, 300e3, 400e3, 600e3, 800e3,
            ],
            Duration::from_secs(2),
        )
    };
    let mut steps = Vec::new();
    let mut latency = Value::Null;
    for rate in rates {
        let (cpu0, irq0) = (server_cpu_ns(s)?, softirq_ns());
        let r = loadgen(bin, t, Some(rate), step)?;
        let (cpu1, irq1) = (server_cpu_ns(s)?, softirq_ns());
        let valid = r["valid"].as_u64().unwrap_or(0).max(1) as f64;
        let st = Step {
            offered: rate,
            sent_per_s: r["sent_per_s"].as_f64().unwrap_or(0.0),
            replies_per_s: r["replies_per_s"].as_f64().unwrap_or(0.0),
            loss: r["loss"].as_f64().unwrap_or(1.0),
            rtt_p99_us: r["rtt_us"]["p99"].as_f64().unwrap_or(0.0),
            cpu_ns_per_reply: cpu1.saturating_sub(cpu0) as f64 / valid,
            softirq_ns_per_reply: irq1.saturating_sub(irq0) as f64 / valid,
        };
        eprintln!(
            "  {name:<16} offered {:>8.0}/s  sent {:>8.0}/s  replies {:>8.0}/s  loss {:>6.3}%  p99 {:>7.1} µs  cpu {:>7.0} ns/reply",
            st.offered, st.sent_per_s, st.replies_per_s, st.loss * 100.0, st.rtt_p99_us, st.cpu_ns_per_reply
        );
        if latency.is_null() {
            latency = serde_json::json!({
                "offered": rate,
                "rtt_us": r["rtt_us"],
                "residence_ns": r["residence_ns"],
                "ts_error_us": r["ts_error_us"],
            });
        }
        // Beyond what the generator can send, higher steps measure the generator.
        let saturated = st.loss > 0.05 || st.sent_per_s < 0.9 * st.offered;
        steps.push(st);
        if saturated {
            break;
        }
    }
    let best = steps.iter().filter(|s| s.loss < 0.001).last().cloned();
    let sat = loadgen(bin, t, None, step)?;
    Ok(TargetResult {
        name: name.to_string(),
        loss_free_rate: best.as_ref().map_or(0.0, |b| b.sent_per_s),
        generator_bound: steps
            .last()
            .is_some_and(|s| s.loss < 0.001 && s.sent_per_s < 0.9 * s.offered),
        cpu_ns_per_reply: best.as_ref().map_or(0.0, |b| b.cpu_ns_per_reply),
        softirq_ns_per_reply: best.as_ref().map_or(0.0, |b| b.softirq_ns_per_reply),
        saturation_replies_per_s: sat["replies_per_s"].as_f64().unwrap_or(0.0),
        steps,
        latency,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{cores} × {cpu}, Linux {kernel}")
}

/// Runs the benchmark with `bin` (a built ntp-user); writes its outputs under `out_dir`.
pub fn bench(bin: &Path, out_dir: &Path, smoke: bool) -> Result<()> {
    let t = Topology::create()?;
    let mut targets = Vec::new();
    for (name, mode) in [
        ("xdp-generic", Some("generic")),
        ("xdp-native", Some("native")),
        ("userspace", Some("off")),
        ("chronyd", None),
    ] {
        eprintln!("xtask bench: {name}");
        let server = match mode {
            Some(m) => start_ntp_user(bin, &t, m)?,
            None => start_chronyd(&t)?,
        };
        targets.push(measure(bin, &t, name, &server, smoke)?);
        drop(server);
        std::thread::sleep(Duration::from_millis(200));
    }
    let micro_out = Command::new(crate::loadgen_bin(bin))
        .args(["micro", "--repeat", if smoke { "1000" } else { "200000" }])
        .output()
        .context("running ntp-loadgen micro")?;
    if !micro_out.status.success() {
        bail!(
            "ntp-loadgen micro: {}",
            String::from_utf8_lossy(&micro_out.stderr)
        );
    }
    let micro: Value =
        serde_json::from_slice(&micro_out.stdout).context("ntp-loadgen micro output")?;
    drop(t);
    let report = Report {
        machine: machine(),
        smoke,
        targets,
        micro,
    };
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    plot(&report, &out_dir.join("rate.svg"))?;
    let table = table(&report);
    std::fs::write(out_dir.join("table.md"), &table)?;
    println!("{table}");
    println!(
        "written: {}/results.json, rate.svg, table.md",
        out_dir.display()
    );
    Ok(())
}

fn table(r: &Report) -> String {
    use std::fmt::Write as _;
    let chrony = r.targets.iter().find(|t| t.name == "chronyd");
    let ratio = |v: f64, c: Option<f64>, inverse: bool| match c {
        Some(c) if c > 0.0 && v > 0.0 => {
            format!(" ({:.1}×)", if inverse { c / v } else { v / c })
        }
        _ => String::new(),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {}{}\n",
        r.machine,
        if r.smoke {
            " (smoke run: not a measurement)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "| target | loss-free rate /s (sent) | saturation replies/s | server CPU ns/reply | softirq ns/reply | RTT p50/p99/p99.9 µs | residence p50/p99 ns | timestamp error p50/p99 µs |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for t in &r.targets {
        let l = &t.latency;
        let _ = writeln!(
            s,
            "| {} | {:.0}{}{} | {:.0}{} | {:.0}{} | {:.0} | {:.0}/{:.0}/{:.0} | {:.0}/{:.0} | {:.1}/{:.1} |",
            t.name,
            t.loss_free_rate,
            if t.generator_bound { " ≥ (generator-bound)" } else { "" },
            ratio(t.loss_free_rate, chrony.map(|c| c.loss_free_rate), false),
            t.saturation_replies_per_s,
            ratio(t.saturation_replies_per_s, chrony.map(|c| c.saturation_replies_per_s), false),
            t.cpu_ns_per_reply,
            ratio(t.cpu_ns_per_reply, chrony.map(|c| c.cpu_ns_per_reply), true),
            t.softirq_ns_per_reply,
            l["rtt_us"]["p50"].as_f64().unwrap_or(0.0),
            l["rtt_us"]["p99"].as_f64().unwrap_or(0.0),
            l["rtt_us"]["p999"].as_f64().unwrap_or(0.0),
            l["residence_ns"]["p50"].as_f64().unwrap_or(0.0),
            l["residence_ns"]["p99"].as_f64().unwrap_or(0.0),
            l["ts_error_us"]["p50"].as_f64().unwrap_or(0.0),
            l["ts_error_us"]["p99"].as_f64().unwrap_or(0.0),
        );
    }
    let _ =
        writeln!(
        s,
        "\nRatios in parentheses are against chronyd (CPU: chronyd's over the target's). Latency, \
         residence and timestamp error at the first step ({:.0}/s) for every target.",
        r.targets.first().map_or(0.0, |t| t.latency["offered"].as_f64().unwrap_or(0.0))
    );
    let _ = writeln!(s, "\nMicro (BPF_PROG_TEST_RUN, ns per packet):");
    if let Some(cases) = r.micro.as_array() {
        for c in cases {
            let _ = writeln!(
                s,
                "- {}: {:.0} ns",
                c["case"].as_str().unwrap_or("?"),
                c["ns_per_packet"].as_f64().unwrap_or(0.0)
            );
        }
    }
    s
}

fn plot(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let max_rate = r
        .targets
        .iter()
        .flat_map(|t| t.steps.iter().map(|s| s.offered.max(s.replies_per_s)))
        .fold(1.0, f64::max);
    let max_p99 = r
        .targets
        .iter()
        .flat_map(|t| t.steps.iter().map(|s| s.rtt_p99_us))
        .fold(1.0, f64::max);
    let colors = [RED, BLUE, GREEN, BLACK];
    let mut chart = ChartBuilder::on(&left)
        .caption("replies/s vs offered", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, 0.0..max_rate * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("offered /s")
        .y_desc("replies /s")
        .draw()?;
    for (t, c) in r.targets.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                t.steps.iter().map(|s| (s.offered, s.replies_per_s)),
                c,
            ))?
            .label(t.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    let mut chart = ChartBuilder::on(&right)
        .caption("client RTT p99 vs offered", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, 0.0..max_p99 * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("offered /s")
        .y_desc("p99 µs")
        .draw()?;
    for (t, c) in r.targets.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                t.steps.iter().map(|s| (s.offered, s.rtt_p99_us)),
                c,
            ))?
            .label(t.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
