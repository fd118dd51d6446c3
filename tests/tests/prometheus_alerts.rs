//! The operator's alerting rules against a live daemon: Debian's Prometheus scrapes the
//! /metrics of an `ntp-xdp serve` disciplined by two chronyd upstreams, all in the test's own
//! namespaces. Prometheus loads the rules the package ships (xtask/deb/monitoring), with every
//! `for:` a sixtieth as long (5m becomes 5s) and evaluated every second: a typed rewrite of
//! the shipped file, the expressions untouched. Silencing the upstreams must fire the
//! holdover/unsynchronized and the upstreams-unreachable alerts in /api/v1/alerts, and
//! bringing them back must clear both.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use integration_tests::topology::{
    upstream_namespace, ChronyServer, Netns, ServeProcess, Topology,
};
use integration_tests::{run, unique_name};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// The rules file the package installs in /usr/share/ntp-xdp/monitoring/.
const SHIPPED_RULES: &str = include_str!("../../xtask/deb/monitoring/ntp-xdp.rules.yml");
/// The scrape job the rules name (`up{job="ntp-xdp"}`).
const JOB: &str = "ntp-xdp";
const UPSTREAM_STRATUM: u8 = 3;

/// A Prometheus rules file, as far as the shipped one uses it (unknown fields are refused, so
/// the rewrite can drop nothing).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    rules: Vec<AlertRule>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    hold: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The shipped rules for a test that cannot wait minutes: each `for:` a sixtieth as long (at
/// least 1 s), each group evaluated every second.
fn quick_rules(shipped: &str) -> Result<(RuleFile, String)> {
    let mut file: RuleFile = serde_yaml_ng::from_str(shipped).context("the shipped rules")?;
    for group in &mut file.groups {
        group.interval = Some("1s".into());
        for rule in &mut group.rules {
            if let Some(hold) = &rule.hold {
                let d = humantime::parse_duration(hold)
                    .with_context(|| format!("{}: for: {hold:?}", rule.alert))?;
                rule.hold = Some(format!("{}s", (d.as_secs() / 60).max(1)));
            }
        }
    }
    let text = serde_yaml_ng::to_string(&file)?;
    Ok((file, text))
}

/// An active alert (pending or firing) in Prometheus's /api/v1/alerts.
#[derive(Debug, Clone)]
struct ActiveAlert {
    name: String,
    state: String,
    instance: String,
    severity: String,
}

/// Debian's Prometheus running in `ns` with its own storage directory; stopped (SIGTERM,
/// then SIGKILL) and its directory removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    ns: String,
    url: String,
}

impl Prometheus {
    /// Starts it on `listen`, scraping `target` every second with the rules in `rules`, and
    /// waits until it is ready.
    fn start(ns: &Netns, listen: &str, target: &str, rules: &str) -> Result<Prometheus> {
        let dir = std::env::temp_dir().join(unique_name("ntpx-prom"));
        std::fs::create_dir_all(&dir)?;
        let rules_file = dir.join("ntp-xdp.rules.yml");
        std::fs::write(&rules_file, rules)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules_file.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut p = Prometheus {
            child,
            dir,
            ns: ns.name.clone(),
            url: format!("http://{listen}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.get("/-/ready").is_err() {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", p.log());
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready:\n{}", p.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(p)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An HTTP GET from inside its namespace (curl).
    fn get(&self, path: &str) -> Result<String> {
        run(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sSf",
            "--max-time",
            "5",
            &format!("{}{path}", self.url),
        ]))
    }

    fn api(&self, path: &str) -> Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&self.get(path)?)?;
        if v["status"] != "success" {
            bail!("{path}: {v}");
        }
        Ok(v["data"].clone())
    }

    fn alerts(&self) -> Result<Vec<ActiveAlert>> {
        let data = self.api("/api/v1/alerts")?;
        let text = |a: &serde_json::Value, k: &str| a[k].as_str().unwrap_or_default().to_string();
        Ok(data["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| ActiveAlert {
                name: text(&a["labels"], "alertname"),
                state: text(a, "state"),
                instance: text(&a["labels"], "instance"),
                severity: text(&a["labels"], "severity"),
            })
            .collect())
    }

    /// The scrape target's health ("up", "down", "unknown").
    fn target_health(&self) -> Result<String> {
        let data = self.api("/api/v1/targets?state=active")?;
        Ok(data["activeTargets"][0]["health"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `alerts` until `done` holds for them; what it saw last when it never does.
fn wait_for_alerts(
    prometheus: &Prometheus,
    serve: &ServeProcess,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[ActiveAlert]) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = Vec::new();
    loop {
        if let Ok(alerts) = prometheus.alerts() {
            if done(&alerts) {
                return Ok(start.elapsed());
            }
            last = alerts;
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}; active alerts: {last:?}\n\
                 daemon log:\n{}\nprometheus log:\n{}",
                serve.drain_log().join("\n"),
                prometheus.log()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn firing<'a>(alerts: &'a [ActiveAlert], name: &str) -> Option<&'a ActiveAlert> {
    alerts
        .iter()
        .find(|a| a.name == name && a.state == "firing")
}

#[test]
fn prometheus_fires_and_clears_the_shipped_alerts_when_upstreams_go_silent() -> Result<()> {
    let (rules, rules_text) = quick_rules(SHIPPED_RULES)?;
    let rule = |name: &str| {
        rules
            .groups
            .iter()
            .flat_map(|g| &g.rules)
            .find(|r| r.alert == name)
            .with_context(|| format!("the shipped rules have no {name}"))
    };
    let unsynchronized = rule("NtpXdpUnsynchronized")?;
    let unreachable = rule("NtpXdpUpstreamsUnreachable")?;

    // The daemon in the VIP host's namespace, its upstreams each in a namespace of its own.
    let t = Topology::new(131)?;
    let host = Netns::new("ntph")?;
    let mut upstream_ns = Vec::new();
    let mut addrs = Vec::new();
    for subnet in [132u8, 133] {
        let (ns, addr) = upstream_namespace(&host, subnet)?;
        addrs.push(addr);
        upstream_ns.push(ns);
    }
    let start_upstreams = || -> Result<Vec<ChronyServer>> {
        upstream_ns
            .iter()
            .map(|ns| ChronyServer::start(ns, UPSTREAM_STRATUM))
            .collect()
    };
    let mut upstreams = start_upstreams()?;
    // Namespace-private, and distinct per test process all the same.
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let metrics = format!("169.254.132.2:{port}");
    let web = format!("169.254.132.2:{}", port + 1);
    // 16 s polls; the holdover is two of them.
    let metrics_set = format!("metrics.listen={metrics}");
    let mut args = vec![
        "--set",
        "clock.max_poll=4",
        "--set",
        "clock.max_holdover=32s",
        "--set",
        "metrics.enable=true",
        "--set",
        &metrics_set,
        "--set",
        "metrics.allow_remote=true",
    ];
    for a in &addrs {
        args.extend(["--upstream", a.as_str()]);
    }
    let serve = ServeProcess::start_in(Some(&host), &t, "native", &args)?;
    let prometheus = Prometheus::start(&host, &web, &metrics, &rules_text)?;

    // Healthy: scraped, synchronized, and not one alert of the shipped rules active (the
    // start-up's unsynchronized alert resolves once the clock is synchronized).
    wait_for_alerts(
        &prometheus,
        &serve,
        "a healthy baseline (no active alert)",
        Duration::from_secs(180),
        |alerts| alerts.is_empty() && prometheus.target_health().is_ok_and(|h| h == "up"),
    )?;

    // Upstreams silenced: holdover, then unsynchronized once the holdover runs out; and once
    // eight polls went unanswered, unreachable.
    for u in &mut upstreams {
        u.stop();
    }
    let fired = wait_for_alerts(
        &prometheus,
        &serve,
        "the unsynchronized and upstreams-unreachable alerts to fire",
        Duration::from_secs(400),
        |alerts| {
            firing(alerts, &unsynchronized.alert).is_some()
                && firing(alerts, &unreachable.alert).is_some()
        },
    )?;
    let alerts = prometheus.alerts()?;
    for rule in [unsynchronized, unreachable] {
        let a = firing(&alerts, &rule.alert).context("stopped firing")?;
        assert_eq!(a.instance, metrics, "{a:?}");
        assert_eq!(Some(&a.severity), rule.labels.get("severity"), "{a:?}");
    }
    eprintln!("upstreams silenced: both alerts firing after {fired:?}");

    // Upstreams back: both clear (resolved alerts leave /api/v1/alerts).
    let _upstreams = start_upstreams()?;
    let cleared = wait_for_alerts(
        &prometheus,
        &serve,
        "the alerts to clear",
        Duration::from_secs(400),
        |alerts| {
            !alerts
                .iter()
                .any(|a| a.name == unsynchronized.alert || a.name == unreachable.alert)
        },
    )?;
    eprintln!("upstreams back: both alerts cleared after {cleared:?}");
    assert!(serve.stop()?, "the daemon did not exit cleanly");
    Ok(())
}

#[test]
fn the_quick_rules_differ_from_the_shipped_ones_only_in_timing() -> Result<()> {
    let shipped: RuleFile = serde_yaml_ng::from_str(SHIPPED_RULES)?;
    let (quick, _) = quick_rules(SHIPPED_RULES)?;
    let shipped_rules: Vec<&AlertRule> = shipped.groups.iter().flat_map(|g| &g.rules).collect();
    let quick_rules: Vec<&AlertRule> = quick.groups.iter().flat_map(|g| &g.rules).collect();
    assert_eq!(shipped_rules.len(), quick_rules.len());
    for (s, q) in shipped_rules.iter().zip(&quick_rules) {
        assert_eq!(
            (&s.alert, &s.expr, &s.labels, &s.annotations),
            (&q.alert, &q.expr, &q.labels, &q.annotations)
        );
        assert_eq!(s.hold.is_some(), q.hold.is_some(), "{}", s.alert);
    }
    let unsynchronized = quick_rules
        .iter()
        .find(|r| r.alert == "NtpXdpUnsynchronized")
        .unwrap();
    assert_eq!(unsynchronized.hold.as_deref(), Some("5s"));
    Ok(())
}
