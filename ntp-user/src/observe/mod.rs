//! The daemon's operator surface: the status report (built on request from the kernel's
//! maps and the clock loop's view), alarms evaluated every second, the Prometheus endpoint
//! and the owner-only control socket `ntp-xdp status` talks to.

pub mod alarms;
pub mod guests;
pub mod journal;
pub mod metrics;
pub mod status;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, info, warn};

use crate::clock::snapshot::{refid_text, ClockSnapshot};
use crate::host::hostclock::monotonic_now_ns;
use crate::observe::alarms::{AlarmInputs, AlarmThresholds, Alarms};
use crate::observe::guests::{summarize, GuestPolicy, GuestSummary};
use crate::observe::status::{AnchorStatus, ClockSnapshotCell, ResponderStatus, StatusReport};
use crate::responder::Observer;
use crate::userspace::UserspaceCounters;

#[derive(Debug, Clone, Default)]
pub struct ObserveSpec {
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: Option<PathBuf>,
    /// keepalived's health check asks here: it answers nothing but health, so the check runs
    /// as an unprivileged user (keepalived's `script_user`).
    pub health_socket: Option<PathBuf>,
    pub guests: GuestPolicy,
    pub alarms: AlarmThresholds,
}

/// How often alarms are evaluated.
const ALARM_EVERY: Duration = Duration::from_secs(1);
/// Walking a large guest table costs two syscalls per guest: alarms reuse a recent walk.
const GUEST_WALK_MAX_AGE: Duration = Duration::from_secs(5);

/// A value computed at most once per `max_age`: map walks cost two syscalls per entry, and a
/// scraper (or anyone with the control socket) must not be able to make the daemon walk a
/// 64k-entry table on every request.
struct Recent<T> {
    value: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> Recent<T> {
    fn new() -> Recent<T> {
        Recent {
            value: Mutex::new(None),
        }
    }

    fn get(&self, max_age: Duration, now: Instant, compute: impl FnOnce() -> T) -> T {
        let mut cache = self.value.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, v)) = cache.as_ref() {
            if now.saturating_duration_since(*at) <= max_age {
                return v.clone();
            }
        }
        let v = compute();
        *cache = Some((now, v.clone()));
        v
    }
}

/// The anchor is republished every second: older than this, the clock task is stuck.
const HEALTHY_ANCHOR_AGE: Duration = Duration::from_secs(3);

/// How old a walk of the rate or guest table may be when a report is built.
const WALK_MAX_AGE: Duration = Duration::from_secs(1);

pub struct Observatory {
    spec: ObserveSpec,
    observer: Observer,
    clock: ClockSnapshotCell,
    userspace: Arc<UserspaceCounters>,
    alarms: Mutex<Alarms>,
    guests: Recent<GuestSummary>,
    rate_sources: Recent<usize>,
    /// Set by a redundant VIP host's role watcher.
    vrrp: status::VrrpCell,
    nts: Option<Arc<crate::nts::server::NtsState>>,
    fleet: status::FleetCell,
    started_mono_ns: u64,
}

impl Observatory {
    /// An observatory over `responder`'s maps, with a fresh clock-status cell (for the clock
    /// loop) and userspace counters (for the userspace path) that it reads.
    pub fn for_responder(
        spec: &ObserveSpec,
        responder: &crate::responder::Responder,
        vrrp: status::VrrpCell,
        nts: Option<Arc<crate::nts::server::NtsState>>,
        fleet: status::FleetCell,
    ) -> Result<(Arc<Observatory>, ClockSnapshotCell, Arc<UserspaceCounters>)> {
        let counters = Arc::new(UserspaceCounters::default());
        let clock = ClockSnapshotCell::default();
        let obs = Observatory::new(
            spec.clone(),
            responder.observer()?,
            clock.clone(),
            counters.clone(),
            vrrp,
            nts,
            fleet,
        )?;
        Ok((obs, clock, counters))
    }

    pub fn new(
        spec: ObserveSpec,
        observer: Observer,
        clock: ClockSnapshotCell,
        userspace: Arc<UserspaceCounters>,
        vrrp: status::VrrpCell,
        nts: Option<Arc<crate::nts::server::NtsState>>,
        fleet: status::FleetCell,
    ) -> Result<Arc<Observatory>> {
        Ok(Arc::new(Observatory {
            alarms: Mutex::new(Alarms::new(spec.alarms.clone())),
            spec,
            observer,
            clock,
            userspace,
            guests: Recent::new(),
            rate_sources: Recent::new(),
            vrrp,
            nts,
            fleet,
            started_mono_ns: monotonic_now_ns()?,
        }))
    }

    fn guest_summary(&self, max_age: Duration, now_ns: u64) -> GuestSummary {
        if !self.spec.guests.enabled {
            return GuestSummary::default();
        }
        self.guests.get(max_age, Instant::now(), || {
            summarize(&self.observer.guest_clocks(), now_ns, &self.spec.guests)
        })
    }

    fn report_with(&self, guest_max_age: Duration) -> Result<StatusReport> {
        let now = monotonic_now_ns()?;
        let anchor = self.observer.current_anchor()?;
        let counters = self
            .observer
            .counters()?
            .into_iter()
            .map(|(c, v)| (c.name().to_string(), v))
            .collect();
        let u = &self.userspace;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let (answered, answered6) = (load(&u.answered), load(&u.answered_ipv6));
        let synced = anchor.is_synchronized_at(now);
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: now.saturating_sub(self.started_mono_ns) as f64 * 1e-9,
            clock: self.clock(),
            anchor: AnchorStatus {
                published: anchor.is_published(),
                age_s: anchor.age_ns(now) as f64 * 1e-9,
                max_age_s: anchor.max_age_ns as f64 * 1e-9,
                stratum: if synced { anchor.stratum } else { 0 },
                leap: if synced { anchor.leap } else { 3 },
                refid: refid_text(anchor.refid, anchor.stratum),
            },
            responder: ResponderStatus {
                counters,
                userspace_answered_ipv4: answered.saturating_sub(answered6),
                userspace_answered_ipv6: answered6,
                userspace_dropped: load(&u.dropped),
                userspace_refused: load(&u.refused),
                rate_limited_sources_tracked: self.rate_sources.get(
                    WALK_MAX_AGE,
                    Instant::now(),
                    || self.observer.rate_sources(),
                ),
            },
            guests: self.guest_summary(guest_max_age, now),
            alarms: self
                .alarms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .active(),
            vrrp: self.vrrp.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            nts: self.nts.as_deref().map(status::NtsStatus::of),
            fleet: self.fleet.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }

    /// The clock task's latest snapshot (cheap: no walk of the maps).
    pub fn clock(&self) -> ClockSnapshot {
        self.clock.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A report with fresh counters (for `status` and scrapes); table walks at most a second
    /// old. Blocking: async callers take theirs from [`Observatory::reports`].
    pub fn report(&self) -> Result<StatusReport> {
        self.report_with(WALK_MAX_AGE)
    }

    /// Reports for async callers, built off the runtime thread.
    pub fn reports(self: &Arc<Self>) -> Reports {
        let o = self.clone();
        Reports::new(move || o.report())
    }

    /// Whether this host should hold the service addresses: the kernel serves a fresh,
    /// synchronized anchor (the daemon publishes every second; a frozen or unsynchronized one
    /// fails this). keepalived asks it every second through `ntp-xdp health`.
    pub fn health(&self) -> std::result::Result<(), String> {
        let now = monotonic_now_ns().map_err(|e| e.to_string())?;
        let anchor = self.observer.current_anchor().map_err(|e| e.to_string())?;
        if !anchor.is_published() {
            return Err("no anchor published".into());
        }
        let age = anchor.age_ns(now);
        if age > HEALTHY_ANCHOR_AGE.as_nanos() as u64 {
            return Err(format!("the anchor is {:.1} s old", age as f64 * 1e-9));
        }
        if !anchor.is_synchronized_at(now) {
            return Err("the clock is not synchronized".into());
        }
        if let Some(v) = self.vrrp.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if !v.uplinks_down.is_empty() {
                return Err(format!("uplink down: {}", v.uplinks_down.join(", ")));
            }
        }
        Ok(())
    }

    /// Evaluates the alarms and logs each transition once.
    pub fn evaluate_alarms(&self) -> Result<()> {
        let r = self.report_with(GUEST_WALK_MAX_AGE)?;
        let now_ns = monotonic_now_ns()?;
        let (judged, refused) = r.responder.judged_and_refused();
        let inputs = AlarmInputs {
            now_s: now_ns as f64 * 1e-9,
            started_s: self.started_mono_ns as f64 * 1e-9,
            last_sync_s: r.clock.last_sync_mono_ns.map(|t| t as f64 * 1e-9),
            offset_s: r.clock.offset_s,
            anchor_age_s: r.anchor.published.then_some(r.anchor.age_s),
            judged,
            refused,
            guests_alarmed: r.guests.alarmed.len(),
            vrrp_unhealthy: r.vrrp.as_ref().and_then(|_| self.health().err()),
            // Only a failed attempt raises it, not the moment before the first connection.
            fleet_unreachable: r.fleet.as_ref().and_then(|f| f.store_error.clone()),
        };
        let transitions = self
            .alarms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .evaluate(&inputs);
        for t in transitions {
            if t.raised {
                warn!(alarm = t.kind.name(), detail = %t.detail, "alarm raised");
            } else {
                info!(alarm = t.kind.name(), "alarm cleared");
            }
        }
        Ok(())
    }
}

/// Status reports for the daemon's async tasks, each built on the blocking pool: a report walks
/// the kernel's rate and guest tables (two syscalls per entry, 64k entries each when full),
/// which must not hold the one runtime thread that also runs the clock task, the userspace
/// path and the health answer keepalived waits on.
#[derive(Clone)]
pub struct Reports(Arc<dyn Fn() -> Result<StatusReport> + Send + Sync>);

impl Reports {
    /// Reports from `build`, a blocking function.
    pub fn new(build: impl Fn() -> Result<StatusReport> + Send + Sync + 'static) -> Reports {
        Reports(Arc::new(build))
    }

    pub async fn get(&self) -> Result<StatusReport> {
        let build = self.0.clone();
        tokio::task::spawn_blocking(move || build())
            .await
            .context("the report task failed")?
    }
}

/// Binds the metrics listener and the control socket (errors here stop the daemon before it
/// serves half-configured), then runs them and the alarm ticker until the handles drop.
pub async fn start(obs: Arc<Observatory>) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if let Some(addr) = obs.spec.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics.listen {addr}: cannot listen"))?;
        info!(%addr, "metrics endpoint: http://{addr}/metrics");
        let o = obs.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let o = o.clone();
                async move {
                    // Map walks are blocking syscalls: off the runtime thread.
                    tokio::task::spawn_blocking(move || scrape(&o))
                        .await
                        .unwrap_or_else(|e| {
                            (
                                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                [("content-type", "text/plain")],
                                format!("{e}\n"),
                            )
                        })
                }
            }),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "the metrics endpoint stopped");
            }
        }));
    }
    let sockets = [
        (obs.spec.control_socket.clone(), Socket::Control),
        (obs.spec.health_socket.clone(), Socket::Health),
    ];
    for (path, kind) in sockets {
        let Some(path) = path else { continue };
        let listener = bind_control(&path, kind)?;
        info!(socket = %path.display(), ?kind, "control socket (ntp-xdp status / health)");
        let o = obs.clone();
        // A local user who opens sessions and sends nothing holds a few of them, never the
        // daemon's descriptors.
        let sessions = Arc::new(tokio::sync::Semaphore::new(CONTROL_SESSIONS));
        tasks.push(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let Ok(permit) = sessions.clone().try_acquire_owned() else {
                            debug!(?kind, "control session refused: too many at once");
                            continue;
                        };
                        let o = o.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            if let Err(e) = control_session(stream, o, kind).await {
                                debug!(error = %format!("{e:#}"), "control session failed");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    let o = obs.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(ALARM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let o = o.clone();
            // Map walks are blocking syscalls: off the runtime thread that serves clients.
            match tokio::task::spawn_blocking(move || o.evaluate_alarms()).await {
                Ok(Err(e)) => warn!(error = %format!("{e:#}"), "alarm evaluation failed"),
                Err(e) => warn!(error = %e, "alarm evaluation panicked"),
                Ok(Ok(())) => {}
            }
        }
    }));
    Ok(tasks)
}

fn scrape(
    o: &Observatory,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    String,
) {
    const CT: (&str, &str) = (
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    );
    match o
        .report()
        .and_then(|r| crate::observe::metrics::encode_report(&r))
    {
        Ok(text) => (axum::http::StatusCode::OK, [CT], text),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("{e:#}\n"),
        ),
    }
}

/// What a control socket answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Socket {
    /// Status and health, to the daemon's owner (and root) only: mode 0600, the peer's uid
    /// checked.
    Control,
    /// Health only, to root, the daemon's owner and keepalived's unprivileged check user
    /// (mode 0666, the peer's uid checked): all it tells is whether this host is fit to
    /// hold the addresses.
    Health,
}

/// The uid keepalived's health check runs as (`keepalived::UNPRIVILEGED_SCRIPT_USER`).
fn health_checker_uid() -> Option<u32> {
    nix::unistd::User::from_name(crate::vip::keepalived::UNPRIVILEGED_SCRIPT_USER)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// Sessions a control socket serves at once.
const CONTROL_SESSIONS: usize = 8;

fn bind_control(path: &std::path::Path, kind: Socket) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if kind == Socket::Health {
            // keepalived's unprivileged check must reach the socket whatever the umask was.
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                if d.starts_with("/run/ntp-xdp") {
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                        .with_context(|| format!("chmod 755 {}", d.display()))?;
                }
            }
        }
    }
    // A socket file left by a daemon that was killed (only one daemon runs per instance) is
    // replaced; anything else at that path is not ours to remove.
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).with_context(|| {
                format!(
                    "control.socket {}: removing the stale socket",
                    path.display()
                )
            })?;
        }
        Ok(_) => anyhow::bail!(
            "control.socket {}: a file that is not a socket is there; choose another path or \
             remove it",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("control.socket {}: cannot bind", path.display()))?;
    let mode = match kind {
        Socket::Control => 0o600,
        Socket::Health => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("control.socket {}: chmod {mode:o}", path.display()))?;
    Ok(listener)
}

async fn control_session(
    mut stream: tokio::net::UnixStream,
    o: Arc<Observatory>,
    kind: Socket,
) -> Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let allowed =
        peer == me || peer == 0 || (kind == Socket::Health && Some(peer) == health_checker_uid());
    if !allowed {
        stream
            .write_all(b"error: permission denied (not the daemon's owner)\n")
            .await?;
        return Ok(());
    }
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .context("no command")??;
    let command = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    let answer = match command.as_str() {
        "status" if kind == Socket::Control => match o.reports().get().await {
            Ok(r) => serde_json::to_string(&r)? + "\n",
            Err(e) => format!("error: {e:#}\n"),
        },
        "health" => match o.health() {
            Ok(()) => "ok\n".to_string(),
            Err(why) => format!("unhealthy: {why}\n"),
        },
        other => format!("error: unknown command {other:?} (known: status, health)\n"),
    };
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_value_is_computed_once_per_window() {
        let r = Recent::new();
        let t0 = Instant::now();
        let mut walks = 0;
        for ms in [0, 10, 500, 999, 1000] {
            r.get(
                Duration::from_secs(1),
                t0 + Duration::from_millis(ms),
                || {
                    walks += 1;
                    walks
                },
            );
        }
        assert_eq!(walks, 1, "one walk within the second");
        let v = r.get(
            Duration::from_secs(1),
            t0 + Duration::from_millis(1001),
            || 42,
        );
        assert_eq!(v, 42, "a new walk after it");
    }

    #[tokio::test]
    async fn the_health_socket_is_open_to_the_check_and_the_control_socket_is_not() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("ntpxdp-hs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let (health, control) = (dir.join("health.sock"), dir.join("control.sock"));
        let _h = bind_control(&health, Socket::Health).unwrap();
        let _c = bind_control(&control, Socket::Control).unwrap();
        assert_eq!(mode(&health), 0o666);
        assert_eq!(mode(&control), 0o600);
        assert!(
            health_checker_uid().is_some(),
            "the health check's user exists here"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_control_socket_replaces_only_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("ntpxdp-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        // A stale socket (a killed daemon's): replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        bind_control(&path, Socket::Control).unwrap();
        // Anything else: left alone, with a clear error.
        let other = dir.join("precious.txt");
        std::fs::write(&other, b"keep me").unwrap();
        let e = format!("{:#}", bind_control(&other, Socket::Control).unwrap_err());
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), b"keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
