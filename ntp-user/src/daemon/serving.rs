//! What both modes run once the responder is set up: the clock task, the userspace path,
//! NTS, observability and the mode's own tasks, on the daemon's one runtime.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use ntp_common::ServerParams;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::clock::snapshot::{ClockReference, ClockSnapshot};
use crate::config::{ClockSource, Validated};
use crate::daemon::clock_task;
use crate::fleet::agent::Restart;
use crate::host::hostclock::HostClockIdentity;
use crate::observe::status::ClockSnapshotCell;
use crate::observe::Observatory;
use crate::responder::Responder;
use crate::userspace::{SharedAdmission, SocketPlace, UserspaceCounters};

/// What the daemon runs beside its own tasks, and how that asks it to stop and start again.
#[derive(Default)]
pub struct Beside {
    /// The fleet agent: started once the responder serves (so its start says the
    /// configuration started), its requests served by the daemon.
    pub agent: Option<crate::fleet::agent::Agent>,
    /// Asked for, the daemon stops as on SIGTERM so that its caller can start it again.
    pub restart: Restart,
}

/// The userspace path's sockets as bound at start, where to bind them again, and the plumbing
/// epoch that says when (managed mode; it never moves in standalone mode).
pub(crate) struct UserSockets {
    pub sockets: Vec<std::net::UdpSocket>,
    pub place: SocketPlace,
    pub plumbing: tokio::sync::watch::Receiver<u64>,
}

/// What both modes run once the responder is set up: observability, the userspace path,
/// the mode's own tasks, and the clock task until shutdown. Returns the userspace counters.
pub(crate) async fn serve_responder(
    settings: &Validated,
    mut beside: Beside,
    responder: &mut Responder,
    user_sockets: UserSockets,
    continuity: Option<clock_task::Continuity>,
    mode_tasks: Vec<AbortOnDrop>,
    vrrp: crate::observe::status::VrrpCell,
) -> Result<Arc<UserspaceCounters>> {
    let nts = match &settings.nts {
        Some(spec) => Some(start_nts(spec, &user_sockets)?),
        None => None,
    };
    let fleet_cell = beside
        .agent
        .as_ref()
        .map(|a| a.cell.clone())
        .unwrap_or_default();
    let (observatory, clock_status, user_counters) = Observatory::for_responder(
        &settings.observe,
        responder,
        vrrp,
        nts.as_ref().map(|n| n.state.clone()),
        fleet_cell,
    )?;
    let result = async {
        let signal = shutdown_signal()?;
        let restart = beside.restart.clone();
        let shutdown = async move {
            tokio::select! {
                () = signal => {}
                () = restart.wait() => info!("restart requested: stopping to start again"),
            }
        };
        let _observe: Vec<AbortOnDrop> = crate::observe::start(observatory.clone())
            .await?
            .into_iter()
            .map(AbortOnDrop)
            .collect();
        let admission: SharedAdmission = Arc::new(std::sync::Mutex::new(
            crate::userspace::UserspaceAdmission::new(responder, settings.admission.policy)?,
        ));
        let nts_state = nts.as_ref().map(|n| n.state.clone());
        let live_admission = admission.clone();
        // Its own thread: TLS handshakes never hold up the clock task or the userspace path.
        let _key_exchange = nts.map(|n| n.start(admission.clone())).transpose()?;
        let _userspace = AbortOnDrop(tokio::spawn(userspace_path(
            user_sockets,
            responder.subscribe(),
            settings.server_params(),
            admission,
            user_counters.clone(),
            nts_state,
        )));
        // Everything is set up: the agent's start says so (it marks a staged configuration
        // applied).
        let writer = responder.admission_writer()?;
        let _agent: Vec<AbortOnDrop> = match beside.agent.take() {
            Some(mut agent) => {
                let (requests, incoming) = tokio::sync::mpsc::channel(1);
                agent.live = Some(requests);
                vec![
                    AbortOnDrop(tokio::spawn(serve_live_requests(
                        incoming,
                        writer,
                        live_admission,
                    ))),
                    AbortOnDrop(tokio::spawn(
                        agent.run(observatory.clone(), beside.restart.clone()),
                    )),
                ]
            }
            None => Vec::new(),
        };

        let _mode_tasks = mode_tasks;
        run_clock(
            &settings.clock_source(),
            responder,
            continuity,
            clock_status,
            shutdown,
        )
        .await
    }
    .await;
    if let Some(socket) = &settings.observe.control_socket {
        let _ = std::fs::remove_file(socket);
    }
    result.map(|()| user_counters)
}

/// Serves the fleet agent's requests: who is answered (policy, access list) changed without a
/// restart, in the kernel's maps and the userspace path's copy of the policy.
async fn serve_live_requests(
    mut incoming: tokio::sync::mpsc::Receiver<crate::fleet::agent::LiveRequest>,
    mut writer: crate::responder::admission::AdmissionWriter,
    userspace: SharedAdmission,
) {
    use crate::fleet::agent::LiveRequest;
    while let Some(request) = incoming.recv().await {
        match request {
            LiveRequest::ApplyAdmission(spec, reply) => {
                let applied = writer.apply(&spec).map(|()| {
                    userspace
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .set_policy(spec.policy)
                });
                let _ = reply.send(applied.map_err(|e| format!("{e:#}")));
            }
        }
    }
}

/// NTS, set up before anything serves: the keys loaded (or made), the certificate read, the
/// listeners bound, so that a mistake stops the start rather than a guest's key exchange.
struct NtsRuntime {
    state: Arc<crate::nts::server::NtsState>,
    spec: crate::nts::server::NtsSpec,
    netns: Option<String>,
    listeners: Vec<std::net::TcpListener>,
    plumbing: tokio::sync::watch::Receiver<u64>,
    tls: Arc<rustls::ServerConfig>,
}

fn start_nts(spec: &crate::nts::server::NtsSpec, sockets: &UserSockets) -> Result<NtsRuntime> {
    use crate::nts::server;
    let tls = server::tls_config(&spec.certificate_chain, &spec.private_key)?;
    let state = Arc::new(
        server::load_or_create_keys(
            &spec.key_file,
            spec.rotate_locally.then_some(spec.key_rotation),
        )
        .context("NTS cookie keys")?,
    );
    let netns = sockets.place.netns.clone();
    let listeners = server::bind_listeners(netns.as_deref(), &spec.listen, spec.port)?;
    Ok(NtsRuntime {
        state,
        spec: spec.clone(),
        netns,
        listeners,
        plumbing: sockets.plumbing.clone(),
        tls,
    })
}

impl NtsRuntime {
    /// Starts the key exchange on its thread; it stops when the handle is dropped.
    fn start(self, admission: SharedAdmission) -> Result<crate::nts::server::KeyExchangeThread> {
        let admit: crate::nts::server::Admit = Arc::new(move |ip| {
            let now = crate::host::hostclock::monotonic_now_ns().unwrap_or(0);
            let decision = admission
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(ip, now);
            decision == crate::userspace::Admitted::Answer
        });
        crate::nts::server::KeyExchange {
            spec: self.spec,
            netns_name: self.netns,
            listeners: self.listeners,
            plumbing: self.plumbing,
            tls: self.tls,
            state: self.state,
            admit,
        }
        .spawn()
    }
}

/// Aborts a task when dropped (when the runtime's main future ends).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the userspace path; logs if it ever stops.
async fn userspace_path(
    sockets: UserSockets,
    anchors: tokio::sync::watch::Receiver<ntp_common::TimeAnchor>,
    params: ServerParams,
    admission: SharedAdmission,
    counters: Arc<UserspaceCounters>,
    nts: Option<Arc<crate::nts::server::NtsState>>,
) {
    let UserSockets {
        sockets,
        place,
        plumbing,
    } = sockets;
    if let Err(e) = crate::userspace::serve(
        sockets, place, plumbing, anchors, params, admission, counters, nts,
    )
    .await
    {
        tracing::error!(error = %format!("{e:#}"), "the userspace path stopped");
    }
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = sigint.recv() => info!("SIGINT: stopping"),
        }
    })
}

/// Runs the clock `source` and publishes it until `shutdown`: the host clock, or the daemon's
/// own disciplined one (continuing across restarts with `continuity`).
async fn run_clock(
    source: &ClockSource,
    responder: &mut Responder,
    continuity: Option<clock_task::Continuity>,
    status: ClockSnapshotCell,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    match source {
        ClockSource::HostClock {
            identity,
            publish_interval,
        } => serve_host_clock(responder, identity, *publish_interval, status, shutdown).await,
        ClockSource::Upstreams { system, upstreams } => {
            clock_task::run_disciplined(
                responder,
                system.clone(),
                upstreams,
                continuity,
                status,
                shutdown,
            )
            .await
        }
    }
}

async fn serve_host_clock(
    responder: &mut Responder,
    identity: &HostClockIdentity,
    publish_interval: Duration,
    status: ClockSnapshotCell,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut ticker = tokio::time::interval(publish_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut kernel_unsynced = false;
    let mut rate = crate::host::hostclock::HostClockRate::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let pair = crate::host::hostclock::read_clock_pair()?;
                let anchor = crate::host::hostclock::host_clock_anchor_at(
                    identity,
                    pair,
                    rate.update(pair),
                )?;
                let unsynced = anchor.leap == ntp_common::wire::LEAP_UNSYNCHRONIZED;
                if unsynced != kernel_unsynced {
                    kernel_unsynced = unsynced;
                    if unsynced {
                        warn!("the kernel says the host clock is unsynchronized: serving LI=3");
                    } else {
                        info!("the kernel says the host clock is synchronized: serving it");
                    }
                }
                let publication = responder.publish_anchor(anchor)?;
                *status.lock().unwrap_or_else(|e| e.into_inner()) = ClockSnapshot {
                    reference: if identity.follow_kernel_sync {
                        ClockReference::KernelDisciplined
                    } else {
                        ClockReference::LocalStratum(identity.stratum)
                    },
                    synchronized: !unsynced,
                    root_dispersion_s: anchor.root_dispersion_ns as f64 * 1e-9,
                    stratum: identity.stratum,
                    refid: Some(identity.refid),
                    leap: ntp_common::wire::Leap::from_bits(anchor.leap),
                    last_sync_mono_ns: (!unsynced).then_some(anchor.mono_ns),
                    // The host clock is read afresh at every publication.
                    measured_since_start: !unsynced,
                    ..Default::default()
                };
                if publication.stepped_back_ns > 0 {
                    tracing::error!(
                        stepped_back_s = publication.stepped_back_ns as f64 * 1e-9,
                        unsynchronized_for_s = crate::responder::STEP_UNSYNC_NS / 1_000_000_000,
                        "the host clock went back too far to hold served time: stepped back, \
                         serving LI=3 for a while"
                    );
                } else if publication.held_back_ns > 1_000_000 {
                    warn!(
                        held_back_ms = publication.held_back_ns as f64 / 1e6,
                        "host clock went backwards; holding served time until it catches up"
                    );
                }
            }
            _ = &mut shutdown => break,
        }
    }
    Ok(())
}
