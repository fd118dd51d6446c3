//! `cargo xtask bench`: the same load against four servers on one guest → VIP veth, in one
//! run: the XDP responder in generic and in native mode, the daemon's userspace path
//! (`--xdp-mode off`), and chronyd from Debian as a plain server.
//!
//! Rates come from `ntp-loadgen flood` (prebuilt frames on a packet socket; replies counted
//! and dropped by an XDP program on the guest's veth, so no socket costs the generator), with
//! the generator's own ceiling measured first against a program that drops every request.
//! Latency, residence and timestamp error come from `ntp-loadgen run` (UDP sockets, every
//! reply timed). Writes target/bench/results.json, rate.svg, table.md and prints the table
//! with ratios to chronyd; `--compare OLD.json` adds the change against an earlier run.
//! `--smoke` runs seconds at tiny rates: it checks the harness, not the speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use testbed::chrony::ChronyServer;
use testbed::serve::ServeProcess;
use testbed::Topology;

use testbed::CLOCK_V4 as CLOCK;

/// One step of the rate search.
#[derive(Debug, Clone, Serialize)]
struct Step {
    offered: f64,
    /// What the generator really sent (it is the bottleneck when this falls short).
    sent_per_s: f64,
    replies_per_s: f64,
    loss: f64,
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
    /// Within 10 % of the generator's ceiling: the target's limit may be above
    /// `loss_free_rate`.
    generator_bound: bool,
    /// Replies/s with the generator sending flat out from every core, and from one.
    saturation_replies_per_s: f64,
    saturation_one_thread: f64,
    cpu_ns_per_reply: f64,
    softirq_ns_per_reply: f64,
    /// At the first (moderate) rate, the same for every target.
    latency: Value,
    /// XDP targets: the loaded program's instructions (as the verifier left them) and JIT
    /// bytes.
    program_insns: Option<u64>,
    program_jited_bytes: Option<u64>,
}

/// What the generator delivers with nothing answering (the requests counted and dropped by
/// XDP on the server's veth).
#[derive(Debug, Clone, Serialize)]
struct Ceiling {
    all_threads: f64,
    one_thread: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    smoke: bool,
    /// Generator threads (= cores) and veth queues.
    threads: usize,
    ceiling: Ceiling,
    targets: Vec<TargetResult>,
    micro: Value,
}

/// The run's guest → VIP veth (testbed's topology, one queue pair per core) and the reply
/// counter on the guest's veth, removed on drop; bpf_stats restored on drop.
struct Rig {
    net: Topology,
    bpf_stats_before: Option<String>,
    /// bpffs directory of the run's counting programs.
    pins: PathBuf,
    loadgen: PathBuf,
    vip_mac: String,
    threads: usize,
}

impl Rig {
    fn sink_pins(&self) -> PathBuf {
        self.pins.join("sink")
    }

    fn ceiling_pins(&self) -> PathBuf {
        self.pins.join("ceiling")
    }

    fn sink(&self, args: &[&str]) -> Result<()> {
        crate::status(Command::new(&self.loadgen).arg("sink").args(args))
    }

    /// 169.254.220.0/24 on the veth (VIP .1, guest .2), the clock address on the VIP end.
    fn create(bin: &Path) -> Result<Rig> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
        let net = Topology::with_queues(220, Some(threads))?;
        let mut t = Rig {
            net,
            bpf_stats_before: std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok(),
            pins: PathBuf::from(format!(
                "/sys/fs/bpf/ntpxdp-bench-{}",
                std::process::id() % 100_000
            )),
            loadgen: crate::loadgen_bin(bin),
            vip_mac: String::new(),
            threads,
        };
        // The flood's 254 source addresses live behind the guest veth.
        t.net
            .vip
            .ip(&["route", "add", "169.254.221.0/24", "via", &t.net.guest_v4])?;
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
            .context("enabling kernel.bpf_stats_enabled")?;
        let link: Value =
            serde_json::from_str(&t.net.vip.ip(&["-j", "link", "show", &t.net.vip_if])?)
                .context("ip -j link output")?;
        t.vip_mac = link[0]["address"]
            .as_str()
            .context("no MAC on the VIP veth")?
            .to_string();
        // Native on the guest's veth: it also lets the native responder's XDP_TX deliver
        // (veth needs an XDP program on the peer), and it passes everything but the flood's
        // replies, so `ntp-loadgen run` and chronyd's ARP see their traffic.
        let sink = t.sink_pins();
        t.sink(&[
            "--pin-dir",
            &sink.to_string_lossy(),
            "--netns",
            &t.net.guest.name,
            "--interface",
            &t.net.guest_if,
            "--kind",
            "replies",
        ])?;
        Ok(t)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.sink(&["--detach", "--pin-dir", &self.pins.to_string_lossy()]);
        if let Some(v) = &self.bpf_stats_before {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", v.trim());
        }
    }
}

/// A server under test, stopped on drop.
struct Server {
    process: ServerProcess,
    /// XDP targets: the responder's program ID (CPU from BPF stats).
    program_id: Option<u32>,
}

enum ServerProcess {
    Daemon(ServeProcess),
    Chronyd(ChronyServer),
}

impl Server {
    fn pid(&self) -> u32 {
        match &self.process {
            ServerProcess::Daemon(d) => d.pid(),
            ServerProcess::Chronyd(c) => c.pid(),
        }
    }
}

fn start_ntp_user(bin: &Path, t: &Rig, mode: &str) -> Result<Server> {
    let mut cmd = Command::new(bin);
    let cmd = cmd
        .args([
            "serve",
            "--netns",
            &t.net.vip.name,
            "--interface",
            &t.net.vip_if,
            "--address",
            CLOCK,
        ])
        .args([
            "--xdp-mode",
            mode,
            "--set",
            "clock.local_stratum=2",
            // No --peer-netns: the reply counter is the guest veth's XDP program.
            // The default admission (access list, per-source rate state, guest clock
            // records), with a rate one generator address never exceeds: its lookups are
            // measured, not the limiter's refusals.
            "--set",
            "limits.rate=1000000.0",
            "--set",
            "limits.burst=1000000",
        ]);
    let serve = ServeProcess::spawn_ref(cmd, "responder attached")
        .with_context(|| format!("ntp-xdp serve --xdp-mode {mode}"))?;
    let program_id = if mode == "off" {
        None
    } else {
        Some(serve.program_id()?)
    };
    Ok(Server {
        process: ServerProcess::Daemon(serve),
        program_id,
    })
}

/// chronyd as a plain server: its own clock as local stratum, every client allowed, no rate
/// limit (chrony limits nothing unless `ratelimit` is given).
fn start_chronyd(t: &Rig) -> Result<Server> {
    Ok(Server {
        process: ServerProcess::Chronyd(ChronyServer::start(&t.net.vip, 2)?),
        program_id: None,
    })
}

/// Runs `ntp-loadgen SUBCOMMAND ...` and parses the JSON it prints.
fn loadgen(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().context("running ntp-loadgen")?;
    if !out.status.success() {
        bail!(
            "ntp-loadgen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("ntp-loadgen output")
}

/// `ntp-loadgen run` at `rate` through UDP sockets: every reply timed.
fn timed_run(t: &Rig, rate: f64, duration: Duration) -> Result<Value> {
    loadgen(
        Command::new(&t.loadgen)
            .args([
                "run",
                "--target",
                &format!("{CLOCK}:123"),
                "--netns",
                &t.net.guest.name,
            ])
            .args(["--threads", "1", "--rate", &format!("{}", rate as u64)])
            .args(["--duration", &format!("{}ms", duration.as_millis())]),
    )
}

/// `ntp-loadgen flood` at `rate` from `threads` threads, outcome read from `counts`.
fn flood(t: &Rig, counts: &Path, rate: f64, threads: usize, duration: Duration) -> Result<Value> {
    loadgen(
        Command::new(&t.loadgen)
            .args(["flood", "--netns", &t.net.guest.name])
            .args(["--interface", &t.net.guest_if])
            // 254 guests behind the guest veth (the VIP routes their /24 back through it).
            .args(["--src", "169.254.221.1", "--sources", "254"])
            .args(["--target", CLOCK, "--dst-mac", &t.vip_mac])
            .args(["--rate", &format!("{}", rate as u64)])
            .args(["--threads", &threads.to_string()])
            .args(["--duration", &format!("{}ms", duration.as_millis())])
            .arg("--counts")
            .arg(counts),
    )
}

/// The generator's ceiling: what it delivers to the server's veth with a program there that
/// counts and drops every request (no server).
fn ceiling(t: &Rig, smoke: bool) -> Result<Ceiling> {
    let pins = t.ceiling_pins();
    let pins_s = pins.to_string_lossy();
    t.sink(&[
        "--pin-dir",
        &pins_s,
        "--netns",
        &t.net.vip.name,
        "--interface",
        &t.net.vip_if,
        "--kind",
        "requests",
        "--generic",
    ])?;
    let (rate, step) = if smoke {
        (2000.0, Duration::from_millis(300))
    } else {
        (FLAT_OUT, Duration::from_secs(2))
    };
    let result = (|| -> Result<Ceiling> {
        let all = flood(t, &pins, rate, t.threads, step)?;
        let one = flood(t, &pins, rate, 1, step)?;
        let arrived = |v: &Value| {
            v["arrived"].as_f64().unwrap_or(0.0) / v["elapsed_s"].as_f64().unwrap_or(1.0)
        };
        Ok(Ceiling {
            all_threads: arrived(&all),
            one_thread: arrived(&one),
        })
    })();
    t.sink(&["--detach", "--pin-dir", &pins_s])?;
    let c = result?;
    eprintln!(
        "  generator ceiling: {:.0}/s from {} threads, {:.0}/s from one",
        c.all_threads, t.threads, c.one_thread
    );
    Ok(c)
}

/// An offered rate no target on this machine kind reaches: the generator sends flat out.
const FLAT_OUT: f64 = 20e6;

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

/// What `bpftool prog show` says of a loaded BPF program.
fn bpf_prog_info(program_id: u32) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &program_id.to_string(), "-j"])
        .output()
        .context("running bpftool")?;
    serde_json::from_slice(&out.stdout).context("bpftool output")
}

/// Total run time of a BPF program (kernel.bpf_stats_enabled must be on).
fn bpf_run_time_ns(program_id: u32) -> Result<u64> {
    Ok(bpf_prog_info(program_id)?["run_time_ns"]
        .as_u64()
        .unwrap_or(0))
}

/// The loaded program's size: (instructions after the verifier's rewrites, JIT bytes).
fn bpf_prog_size(program_id: u32) -> Result<(u64, u64)> {
    let v = bpf_prog_info(program_id)?;
    Ok((
        v["bytes_xlated"].as_u64().unwrap_or(0) / 8,
        v["bytes_jited"].as_u64().unwrap_or(0),
    ))
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
        None => Ok(process_cpu_ns(s.pid())),
    }
}

fn measure(
    t: &Rig,
    name: &str,
    s: &Server,
    ceiling: &Ceiling,
    smoke: bool,
) -> Result<TargetResult> {
    // Wait until it answers at all (chronyd needs a moment).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let probe = timed_run(t, 100.0, Duration::from_millis(300))?;
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
                25e3, 50e3, 75e3, 100e3, 150e3, 200e3, 300e3, 400e3, 600e3, 800e3, 1e6, 1.25e6,
                1.5e6, 2e6, 2.5e6, 3e6, 4e6,
            ],
            Duration::from_secs(2),
        )
    };
    // Latency at a moderate rate, every reply timed through sockets.
    let probe_rate = if smoke { 500.0 } else { 10e3 };
    let r = timed_run(t, probe_rate, step)?;
    let latency = serde_json::json!({
        "offered": probe_rate,
        "rtt_us": r["rtt_us"],
        "residence_ns": r["residence_ns"],
        "ts_error_us": r["ts_error_us"],
    });
    let counts = t.sink_pins();
    let mut steps = Vec::new();
    for rate in rates {
        let (cpu0, irq0) = (server_cpu_ns(s)?, softirq_ns());
        let r = flood(t, &counts, rate, t.threads, step)?;
        let (cpu1, irq1) = (server_cpu_ns(s)?, softirq_ns());
        let valid = r["valid"].as_u64().unwrap_or(0).max(1) as f64;
        let invalid = r["invalid"].as_u64().unwrap_or(0);
        if invalid > 0 {
            bail!("{name}: {invalid} replies failed the counter's checks at {rate}/s");
        }
        let st = Step {
            offered: rate,
            sent_per_s: r["sent_per_s"].as_f64().unwrap_or(0.0),
            replies_per_s: r["replies_per_s"].as_f64().unwrap_or(0.0),
            loss: r["loss"].as_f64().unwrap_or(1.0),
            cpu_ns_per_reply: cpu1.saturating_sub(cpu0) as f64 / valid,
            softirq_ns_per_reply: irq1.saturating_sub(irq0) as f64 / valid,
        };
        eprintln!(
            "  {name:<16} offered {:>8.0}/s  sent {:>8.0}/s  replies {:>8.0}/s  loss {:>6.3}%  cpu {:>7.0} ns/reply",
            st.offered, st.sent_per_s, st.replies_per_s, st.loss * 100.0, st.cpu_ns_per_reply
        );
        // On veth a request is handled in the sender's own softirq, so a server that keeps
        // up slows the sender down rather than losing: either way the step is the last.
        let saturated = st.loss > 0.05 || st.sent_per_s < 0.9 * st.offered;
        steps.push(st);
        if saturated {
            break;
        }
    }
    let best = steps.iter().filter(|s| s.loss < 0.001).last().cloned();
    let sat_rate = if smoke { 2000.0 } else { FLAT_OUT };
    let sat_all = flood(t, &counts, sat_rate, t.threads, step)?;
    let sat_one = flood(t, &counts, sat_rate, 1, step)?;
    let loss_free_rate = best.as_ref().map_or(0.0, |b| b.sent_per_s);
    let size = s.program_id.map(bpf_prog_size).transpose()?;
    Ok(TargetResult {
        name: name.to_string(),
        loss_free_rate,
        generator_bound: loss_free_rate >= 0.9 * ceiling.all_threads,
        cpu_ns_per_reply: best.as_ref().map_or(0.0, |b| b.cpu_ns_per_reply),
        softirq_ns_per_reply: best.as_ref().map_or(0.0, |b| b.softirq_ns_per_reply),
        saturation_replies_per_s: sat_all["replies_per_s"].as_f64().unwrap_or(0.0),
        saturation_one_thread: sat_one["replies_per_s"].as_f64().unwrap_or(0.0),
        steps,
        latency,
        program_insns: size.map(|(insns, _)| insns),
        program_jited_bytes: size.map(|(_, jited)| jited),
    })
}

/// The machine a run measures on: cores, CPU model, kernel, and the load average when the
/// run starts (other work on the machine skews every figure).
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
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cores} × {cpu}, Linux {kernel}, load average {} at start",
        if load.len() == 3 {
            load.join(" ")
        } else {
            "?".into()
        }
    )
}

/// Writes a run's summary as `DIR/<YYYY-MM-DD>-<kind>.md` (UTC date; `-2`, `-3`... when the
/// day already has one: a result documentation links is never overwritten); returns its path.
pub fn write_record(dir: &Path, kind: &str, command: &str, summary: &str) -> Result<PathBuf> {
    let date = time::OffsetDateTime::now_utc().date();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = (1..)
        .map(|n| match n {
            1 => dir.join(format!("{date}-{kind}.md")),
            n => dir.join(format!("{date}-{kind}-{n}.md")),
        })
        .find(|p| !p.exists())
        .expect("an unused name");
    std::fs::write(
        &path,
        format!("# `{command}`, {date}\n\n{}\n", summary.trim_end()),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs the benchmark with `bin` (a built ntp-xdp); writes its outputs under `out_dir`.
/// The summary also goes to `records` as a dated file ([`write_record`]).
pub fn bench(
    bin: &Path,
    out_dir: &Path,
    records: &Path,
    smoke: bool,
    compare: Option<&Path>,
) -> Result<()> {
    let machine = machine();
    // Read first: a bad file should fail before minutes of measuring.
    let old: Option<Value> = match compare {
        Some(p) => Some(
            serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a bench results.json", p.display()))?,
        ),
        None => None,
    };
    let t = Rig::create(bin)?;
    eprintln!("xtask bench: generator ceiling");
    let ceiling = ceiling(&t, smoke)?;
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
        targets.push(measure(&t, name, &server, &ceiling, smoke)?);
        drop(server);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Namespaces gone and bpf_stats back off: its two clock reads per run would be timed too.
    let threads = t.threads;
    drop(t);
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
    let report = Report {
        machine,
        smoke,
        threads,
        ceiling,
        targets,
        micro,
    };
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    plot(&report, &out_dir.join("rate.svg"))?;
    let mut table = table(&report);
    if let Some(old) = &old {
        table.push_str(&compare_reports(old, &serde_json::to_value(&report)?));
    }
    std::fs::write(out_dir.join("table.md"), &table)?;
    let command = match (smoke, compare) {
        (true, _) => "cargo xtask bench --smoke".to_string(),
        (false, Some(old)) => format!("cargo xtask bench --compare {}", old.display()),
        (false, None) => "cargo xtask bench".to_string(),
    };
    let record = write_record(records, "flood", &command, &table)?;
    println!("{table}");
    println!(
        "written: {}/results.json, rate.svg, table.md; {}",
        out_dir.display(),
        record.display()
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
        "Generator ceiling (requests delivered to the server's veth, counted and dropped there \
         by XDP, no server): {:.0}/s from {} threads, {:.0}/s from one.\n",
        r.ceiling.all_threads, r.threads, r.ceiling.one_thread
    );
    let _ = writeln!(
        s,
        "| target | loss-free rate /s | flat out replies/s, {} threads | flat out, 1 thread | server CPU ns/reply | softirq ns/reply | RTT p50/p99/p99.9 µs | residence p50/p99 ns | timestamp error p50/p99 µs |",
        r.threads
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for t in &r.targets {
        let l = &t.latency;
        let _ = writeln!(
            s,
            "| {} | {:.0}{}{} | {:.0}{} | {:.0} | {:.0}{} | {:.0} | {:.0}/{:.0}/{:.0} | {:.0}/{:.0} | {:.1}/{:.1} |",
            t.name,
            t.loss_free_rate,
            if t.generator_bound { " ≥ (generator-bound)" } else { "" },
            ratio(t.loss_free_rate, chrony.map(|c| c.loss_free_rate), false),
            t.saturation_replies_per_s,
            ratio(t.saturation_replies_per_s, chrony.map(|c| c.saturation_replies_per_s), false),
            t.saturation_one_thread,
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
        "\nRatios in parentheses are against chronyd (CPU: chronyd's over the target's). Server \
         CPU is the BPF program's run time (bpf_stats) for XDP targets and the process's CPU \
         time for userspace servers, at the loss-free step. Latency, residence and timestamp \
         error at {:.0}/s through sockets for every target.",
        r.targets.first().map_or(0.0, |t| t.latency["offered"].as_f64().unwrap_or(0.0))
    );
    if let Some(native) = r.targets.iter().find(|t| t.name == "xdp-native") {
        let ns = native.cpu_ns_per_reply;
        if ns > 0.0 {
            // Minimum NTP request on the wire: 90-byte frame + FCS + preamble + gap = 114 B.
            let line_rate = |gbps: f64| gbps * 1e9 / (114.0 * 8.0);
            let _ = writeln!(
                s,
                "\nOn paper, from the native program's {ns:.0} ns per reply: one core runs it \
                 {:.1} M times/s; a 10 GbE port full of NTP requests ({:.1} Mpps) needs {:.1} \
                 cores and a 25 GbE port ({:.1} Mpps) {:.1} cores for the program alone (the \
                 driver's receive and XDP_TX work come on top; not measured here).",
                1e3 / ns,
                line_rate(10.0) / 1e6,
                line_rate(10.0) * ns / 1e9,
                line_rate(25.0) / 1e6,
                line_rate(25.0) * ns / 1e9,
            );
            // The veth softirq time holds both ends' driver work (the generator's transmit,
            // the reply's delivery and the sink's count too): an upper bound of that share.
            let all = ns + native.softirq_ns_per_reply;
            let _ = writeln!(
                s,
                "With the softirq time per reply too ({all:.0} ns: an upper bound, it holds \
                 both veth ends' work): {:.1} M replies/s per core; 10 GbE {:.1} cores, 25 GbE \
                 {:.1} cores.",
                1e3 / all,
                line_rate(10.0) * all / 1e9,
                line_rate(25.0) * all / 1e9,
            );
        }
    }
    for t in &r.targets {
        if let (Some(insns), Some(jited)) = (t.program_insns, t.program_jited_bytes) {
            let _ = writeln!(
                s,
                "\n{}: the loaded responder is {insns} instructions ({jited} bytes JIT-compiled).",
                t.name
            );
        }
    }
    let _ = writeln!(
        s,
        "\nMicro (BPF_PROG_TEST_RUN, ns per packet, harness included):"
    );
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

/// The change from an earlier run's results.json to this one's, target by target.
fn compare_reports(old: &Value, new: &Value) -> String {
    use std::fmt::Write as _;
    let change = |o: f64, n: f64| {
        if o > 0.0 {
            format!("{o:.0} → {n:.0} ({:+.1} %)", (n / o - 1.0) * 100.0)
        } else {
            format!("– → {n:.0}")
        }
    };
    let num = |v: &Value, path: &[&str]| path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nChange against the earlier run ({}):\n",
        old["machine"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "| target | loss-free rate /s | flat out replies/s | server CPU ns/reply | residence p50 ns |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let empty = Vec::new();
    let old_targets = old["targets"].as_array().unwrap_or(&empty);
    for t in new["targets"].as_array().unwrap_or(&empty) {
        let name = t["name"].as_str().unwrap_or("?");
        let Some(o) = old_targets.iter().find(|o| o["name"] == t["name"]) else {
            let _ = writeln!(s, "| {name} | new | | | |");
            continue;
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} |",
            change(num(o, &["loss_free_rate"]), num(t, &["loss_free_rate"])),
            change(
                num(o, &["saturation_replies_per_s"]),
                num(t, &["saturation_replies_per_s"])
            ),
            change(num(o, &["cpu_ns_per_reply"]), num(t, &["cpu_ns_per_reply"])),
            change(
                num(o, &["latency", "residence_ns", "p50"]),
                num(t, &["latency", "residence_ns", "p50"])
            ),
        );
    }
    let old_micro = old["micro"].as_array().unwrap_or(&empty);
    for c in new["micro"].as_array().unwrap_or(&empty) {
        if let Some(o) = old_micro.iter().find(|o| o["case"] == c["case"]) {
            let _ = writeln!(
                s,
                "- micro {}: {} ns",
                c["case"].as_str().unwrap_or("?"),
                change(num(o, &["ns_per_packet"]), num(c, &["ns_per_packet"]))
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
    let max_cpu = r
        .targets
        .iter()
        .flat_map(|t| t.steps.iter().map(|s| s.cpu_ns_per_reply))
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
        .caption("server CPU per reply vs offered", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, (1.0..max_cpu * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered /s")
        .y_desc("ns / reply")
        .draw()?;
    for (t, c) in r.targets.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                t.steps
                    .iter()
                    .map(|s| (s.offered, s.cpu_ns_per_reply.max(1.0))),
                c,
            ))?
            .label(t.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// One server's guest-seen offsets in the time comparison.
#[derive(Debug, Serialize)]
struct TimeSummary {
    server: String,
    samples: usize,
    median_abs_us: f64,
    p95_abs_us: f64,
    median_us: f64,
}

/// `cargo xtask bench --fleet-scale --hosts N`: runs tests/examples/fleet_scale.rs (N
/// simulated hosts, each the fleet's real agent with a local side that applies at once,
/// against a real three-member etcd with TLS in namespaces) and prints its figures. A debug
/// build: what is measured is the store's work (etcd is its own binary), not the agents'.
pub fn fleet_scale(hosts: usize, records: &Path) -> Result<()> {
    // Built first: the load average recorded is the machine's, not the compiler's.
    crate::status(
        Command::new("cargo")
            .current_dir(crate::workspace_root())
            .args([
                "build",
                "--quiet",
                "-p",
                "integration-tests",
                "--example",
                "fleet_scale",
            ]),
    )?;
    let machine = machine();
    let out = Command::new(crate::workspace_root().join("target/debug/examples/fleet_scale"))
        .args(["--hosts", &hosts.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running the fleet scale bench")?;
    if !out.status.success() {
        bail!("the fleet scale bench failed ({})", out.status);
    }
    let figures = String::from_utf8_lossy(&out.stdout);
    print!("{figures}");
    let record = write_record(
        records,
        "fleet-scale",
        &format!("cargo xtask bench --fleet-scale --hosts {hosts}"),
        &format!("Machine: {machine}\n\n{figures}"),
    )?;
    println!("written: {}", record.display());
    Ok(())
}

/// `cargo xtask bench --time`: the time comparison ([`crate::time_bench`]: ntp-xdp and a
/// chronyd relay on the same three upstreams, a guest measuring both in turn); writes
/// time.json / time.svg / time.md under `out_dir`.
pub fn time_bench(bin: &Path, out_dir: &Path, records: &Path) -> Result<()> {
    let machine = machine();
    let run = crate::time_bench::run(bin).context("the time bench")?;
    let samples = run["samples"].as_array().context("no samples")?;
    let mut summaries = Vec::new();
    for server in ["ntp-xdp", "chronyd-relay", "ntp-xdp-clock"] {
        let offsets: Vec<f64> = samples
            .iter()
            .filter(|s| s["server"] == server)
            .filter_map(|s| s["offset_s"].as_f64())
            .map(|o| o * 1e6)
            .collect();
        if offsets.is_empty() {
            bail!("no samples of {server}");
        }
        let mut abs: Vec<f64> = offsets.iter().map(|o| o.abs()).collect();
        abs.sort_by(f64::total_cmp);
        let mut signed = offsets.clone();
        signed.sort_by(f64::total_cmp);
        let q = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        summaries.push(TimeSummary {
            server: server.to_string(),
            samples: offsets.len(),
            median_abs_us: q(&abs, 0.5),
            p95_abs_us: q(&abs, 0.95),
            median_us: q(&signed, 0.5),
        });
    }
    let bound = served_bound_summary(samples);
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(
        out_dir.join("time.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "machine": machine,
            "summary": summaries,
            "served_bound": bound,
            "run": run,
        }))?,
    )?;
    plot_time(samples, &out_dir.join("time.svg"))?;
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {}; {} min of guest measurements (`chronyd -Q`, one sample each, servers in \
         turn) after {} s of settling; three chronyd upstreams, `local stratum 3`.\n",
        machine, run["minutes"], run["settle_s"]
    );
    let _ = writeln!(
        s,
        "| server | samples | median \\|offset\\| µs | p95 \\|offset\\| µs | median offset µs |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for m in &summaries {
        let name = match m.server.as_str() {
            "ntp-xdp-clock" => "(ntp-xdp's clock: served − host clock, its own status)",
            other => other,
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:+.1} |",
            name, m.samples, m.median_abs_us, m.p95_abs_us, m.median_us
        );
    }
    if let Some(b) = &bound {
        let _ = writeln!(
            s,
            "\nThe error bound ntp-xdp's replies state (root delay / 2 + root dispersion, from \
             its status with each \"ntp-xdp-clock\" sample): median {:.1} µs, largest {:.1} µs \
             over {} samples; its largest |served − host clock| is {:.1} µs.",
            b.median_us, b.max_us, b.samples, b.max_abs_offset_us
        );
    }
    std::fs::write(out_dir.join("time.md"), &s)?;
    let record = write_record(records, "time", "cargo xtask bench --time", &s)?;
    println!("{s}");
    println!(
        "written: {}/time.json, time.svg, time.md; {}",
        out_dir.display(),
        record.display()
    );
    Ok(())
}

/// The bound the daemon served beside its own offsets (µs), over the samples that had one.
#[derive(Debug, Serialize)]
struct ServedBoundSummary {
    samples: usize,
    median_us: f64,
    max_us: f64,
    /// The largest |served − host clock| among the same samples.
    max_abs_offset_us: f64,
}

/// (t, bound µs, offset µs) of the daemon's own samples that carry a served bound.
fn served_bounds(samples: &[Value]) -> Vec<(f64, f64, f64)> {
    samples
        .iter()
        .filter(|s| s["server"] == "ntp-xdp-clock")
        .filter_map(|s| {
            Some((
                s["t_s"].as_f64()?,
                s["served_bound_s"].as_f64()? * 1e6,
                s["offset_s"].as_f64()? * 1e6,
            ))
        })
        .collect()
}

fn served_bound_summary(samples: &[Value]) -> Option<ServedBoundSummary> {
    let points = served_bounds(samples);
    let mut bounds: Vec<f64> = points.iter().map(|p| p.1).collect();
    bounds.sort_by(f64::total_cmp);
    Some(ServedBoundSummary {
        samples: bounds.len(),
        median_us: *bounds.get(bounds.len() / 2)?,
        max_us: *bounds.last()?,
        max_abs_offset_us: points.iter().map(|p| p.2.abs()).fold(0.0, f64::max),
    })
}

fn plot_time(samples: &[Value], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = |server: &str| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter(|s| s["server"] == server)
            .filter_map(|s| Some((s["t_s"].as_f64()?, s["offset_s"].as_f64()? * 1e6)))
            .collect()
    };
    let (xdp, relay, clock) = (
        points("ntp-xdp"),
        points("chronyd-relay"),
        points("ntp-xdp-clock"),
    );
    let bounds = served_bounds(samples);
    let t_max = xdp.iter().chain(&relay).map(|p| p.0).fold(1.0, f64::max);
    let y = xdp
        .iter()
        .chain(&relay)
        .chain(&clock)
        .map(|p| p.1.abs())
        .chain(bounds.iter().map(|b| b.1))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("guest-seen offset", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max * 1.02, -y * 1.1..y * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("offset µs")
        .draw()?;
    let green = RGBColor(0, 140, 60);
    for (name, pts, c) in [
        ("ntp-xdp", xdp, RED),
        ("chronyd relay", relay, BLUE),
        ("ntp-xdp's clock vs host (its status)", clock, green),
    ] {
        chart
            .draw_series(LineSeries::new(pts.clone(), c))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 2, c.filled())))?;
    }
    // The served bound as an envelope: every offset of the daemon's clock should sit inside.
    let grey = RGBColor(110, 110, 110);
    chart
        .draw_series(LineSeries::new(bounds.iter().map(|b| (b.0, b.1)), grey))?
        .label("± served error bound (its status)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], grey));
    chart.draw_series(LineSeries::new(bounds.iter().map(|b| (b.0, -b.1)), grey))?;
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Value> {
        let mut v = Vec::new();
        for (i, (bound, offset)) in [(3e-6, 0.5e-6), (4e-6, -1e-6), (2e-6, 0.2e-6)]
            .into_iter()
            .enumerate()
        {
            let t = i as f64;
            v.push(serde_json::json!({"t_s": t, "server": "ntp-xdp", "offset_s": 1e-6}));
            v.push(serde_json::json!({"t_s": t, "server": "chronyd-relay", "offset_s": -2e-6}));
            v.push(serde_json::json!({
                "t_s": t, "server": "ntp-xdp-clock", "offset_s": offset, "served_bound_s": bound,
            }));
        }
        // Unsynchronized at that instant: no bound.
        v.push(serde_json::json!({
            "t_s": 3.0, "server": "ntp-xdp-clock", "offset_s": 9e-6, "served_bound_s": null,
        }));
        v
    }

    #[test]
    fn records_are_dated_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("ntpx-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = write_record(&dir, "rate", "cargo xtask bench", "Machine: m\n").unwrap();
        let second = write_record(&dir, "rate", "cargo xtask bench", "second\n").unwrap();
        let today = time::OffsetDateTime::now_utc().date().to_string();
        assert_eq!(first, dir.join(format!("{today}-rate.md")));
        assert_eq!(second, dir.join(format!("{today}-rate-2.md")));
        let text = std::fs::read_to_string(&first).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.starts_with("# `cargo xtask bench`, "), "{text}");
        assert!(text.contains("Machine: m"), "{text}");
        // YYYY-MM-DD
        let b = today.as_bytes();
        assert!(b.len() == 10 && b[4] == b'-' && b[7] == b'-', "{today}");
    }

    #[test]
    fn the_machine_names_its_load_at_start() {
        let m = machine();
        assert!(
            m.contains(" × ") && m.contains("Linux ") && m.contains("load average "),
            "{m}"
        );
    }

    #[test]
    fn the_time_summary_carries_the_served_bound() {
        let b = served_bound_summary(&samples()).unwrap();
        assert_eq!(b.samples, 3);
        assert!((b.median_us - 3.0).abs() < 1e-9, "{b:?}");
        assert!((b.max_us - 4.0).abs() < 1e-9, "{b:?}");
        assert!((b.max_abs_offset_us - 1.0).abs() < 1e-9, "{b:?}");
        assert!(served_bound_summary(&samples()[..2]).is_none());
    }

    #[test]
    fn the_time_plot_draws_the_served_bound() {
        let dir = std::env::temp_dir().join(format!("ntpx-time-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("time.svg");
        plot_time(&samples(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.contains("served error bound"), "{svg}");
    }
}
